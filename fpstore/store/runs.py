"""Classifier runs in the store: ``runs/<run_id>/{patients.parquet, patches.parquet, run.json}``.

The prediction tables and run.json are written in a hidden staging folder that becomes
``runs/<run_id>`` in one rename, so a run folder is whole (and the ``predictions`` view,
which globs ``runs/*/patients.parquet``, never sees an unfinished run's rows). Every
run.json has one shape:

    run_id, kind        classify, cv / external (a compare member), predict
    config              the run's settings; every kind has marker, cohort (the cohort the run
                        scored; a cross-validated one for classify), method, encoder (null for
                        pixels) and pool, then its own settings
    score_range         [low, high] of its scores (heatmap and map colours)
    ...                 metrics, folds, ROC points, fold assignment, by kind
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fpstore.errors import StoreError
from fpstore.store.io import (
    staged_folder,
    write_json_atomic,
    write_parquet_atomic,
    writer_alive,
)
from fpstore.store.layout import StoreLayout
from fpstore.store.schema import file_metadata


def write_run(
    store,
    run_id: str,
    document: dict,
    patients: pa.Table,
    patches: pa.Table | None,
    attention: pa.Table | None = None,
    model: Callable[[], object] | None = None,
) -> Path:
    """Write one run: its patient predictions, patch predictions and attention (if any) and
    run.json, filled aside and moved to ``runs/<run_id>`` in one step, the run's commit.

    ``model`` writes the run's saved model (``models/classify/<run_id>``) before that step:
    a store lists a model only once its run exists (``store.models.list_models``), so a
    killed run leaves neither. Models that a killed writer left without their run go first.
    """
    layout = StoreLayout.of(store)
    folder = layout.run_dir(run_id)
    tables = (patients, patches, attention)
    if layout.is_remote:  # no folder rename on object storage: the model, then run.json last
        if model is not None:
            model()
        _write_run_files(folder, run_id, document, tables)
        return folder
    with staged_folder(folder) as staged:
        remove_orphan_models(layout)
        if model is not None:
            model()
        _write_run_files(staged, run_id, document, tables)
    return folder


def _write_run_files(folder, run_id: str, document: dict, tables) -> None:
    patients, patches, attention = tables
    write_parquet_atomic(
        patients, folder / "patients.parquet", file_metadata("predictions", run_id=run_id)
    )
    if patches is not None:
        write_parquet_atomic(
            patches, folder / "patches.parquet", file_metadata("patch_predictions", run_id=run_id)
        )
    if attention is not None:
        write_parquet_atomic(
            attention,
            folder / "attention.parquet",
            file_metadata("patch_attention", run_id=run_id),
        )
    write_json_atomic(document, folder / "run.json")


def remove_orphan_models(layout: StoreLayout) -> int:
    """Remove the model folders whose run a killed classify never committed (no run folder,
    no live writer of that run); returns how many."""
    models = layout.models_dir
    if not models.is_dir():
        return 0
    removed = 0
    for folder in models.iterdir():
        if folder.name.startswith(".") or (layout.run_dir(folder.name) / "run.json").exists():
            continue
        if writer_alive(layout.runs_dir, folder.name):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def write_compare(store, compare_id: str, document: dict) -> Path:
    """A comparison's summary (its member runs are written with ``write_run``), in a folder
    that appears whole, like a run's."""
    layout = StoreLayout.of(store)
    folder = layout.run_dir(compare_id)
    if layout.is_remote:
        return write_json_atomic(document, folder / "compare.json")
    with staged_folder(folder) as staged:
        write_json_atomic(document, staged / "compare.json")
    return folder / "compare.json"


def list_compares(store) -> list[dict]:
    """Every comparison's summary (compare.json), oldest first (ids start with the time)."""
    folder = StoreLayout.of(store).runs_dir
    if not folder.is_dir():
        return []
    return [
        json.loads((p / "compare.json").read_text())
        for p in sorted(folder.iterdir())
        if (p / "compare.json").is_file()
    ]


def list_runs(store) -> list[str]:
    folder = StoreLayout.of(store).runs_dir
    return (
        sorted(p.name for p in folder.iterdir() if (p / "run.json").is_file())
        if folder.is_dir()
        else []
    )


RUN_SETTINGS = ("marker", "cohort", "method", "encoder", "pool")


@dataclass
class Run:
    """One classifier run: its run.json document and per-patient predictions."""

    run_id: str
    path: Path
    document: dict
    patients: pa.Table  # PATIENT_PREDICTIONS

    @property
    def config(self) -> dict:
        return self.document["config"]

    @property
    def kind(self) -> str:
        return self.document["kind"]

    @property
    def cohort(self) -> str:
        return self.config["cohort"]

    @property
    def marker(self) -> str:
        return self.config["marker"]

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def encoder(self) -> str | None:
        return self.config["encoder"]

    @property
    def pool(self) -> str:
        return self.config["pool"]

    @property
    def score_range(self) -> tuple[float, float]:
        low, high = self.document["score_range"]
        return float(low), float(high)

    @property
    def patches_path(self) -> Path:
        return self.path / "patches.parquet"

    def patch_scores(self, slide_id: str | None = None) -> pa.Table:
        """Patch predictions (PATCH_PREDICTIONS), one row per patch (folds averaged)."""
        if not self.patches_path.is_file():
            raise StoreError(
                f"run {self.run_id!r} stored no patch predictions ({self.patches_path}); "
                "rerun `fpstore classify` with a method that scores patches (mil)"
            )
        filters = [("slide_id", "=", slide_id)] if slide_id is not None else None
        table = pq.read_table(
            self.patches_path, columns=["cohort", "slide_id", "patch_id", "score"], filters=filters
        )
        if table.num_rows and len(table.column("patch_id").unique()) < table.num_rows:
            table = table.group_by(["cohort", "slide_id", "patch_id"]).aggregate(
                [("score", "mean")]
            )
            table = table.rename_columns(["cohort", "slide_id", "patch_id", "score"])
        return table

    @property
    def has_attention(self) -> bool:
        return (self.path / "attention.parquet").is_file()

    def patch_attention(self, slide_id: str | None = None) -> pa.Table:
        """Attention per patch (PATCH_ATTENTION's keys and ``attention``; folds averaged) of
        a method with attention (abmil)."""
        path = self.path / "attention.parquet"
        if not path.is_file():
            raise StoreError(
                f"run {self.run_id!r} of method {self.method!r} stored no attention ({path}); "
                "classify with --method abmil"
            )
        filters = [("slide_id", "=", slide_id)] if slide_id is not None else None
        columns = ["cohort", "slide_id", "patch_id", "attention"]
        table = pq.read_table(path, columns=columns, filters=filters)
        if table.num_rows and len(table.column("patch_id").unique()) < table.num_rows:
            table = table.group_by(columns[:3]).aggregate([("attention", "mean")])
            table = table.rename_columns(columns)
        return table

    def slides_with_patch_scores(self) -> list[str]:
        table = (
            pq.read_table(self.patches_path, columns=["slide_id"])
            if self.patches_path.is_file()
            else None
        )
        return sorted(table.column("slide_id").unique().to_pylist()) if table is not None else []


def load_run(store, run_id: str) -> Run:
    folder = StoreLayout.of(store).run_dir(run_id)
    if not (folder / "run.json").is_file():
        known = list_runs(store)
        raise StoreError(
            f"no run {run_id!r} in {str(store)!r}; runs there: "
            f"{', '.join(known) or 'none, run `fpstore classify` first'}"
        )
    document = json.loads((folder / "run.json").read_text())
    config = document.get("config")
    missing = [k for k in RUN_SETTINGS if not isinstance(config, dict) or k not in config]
    if missing or "score_range" not in document or "kind" not in document:
        raise StoreError(
            f"run {run_id!r} has no {', '.join(missing) or 'kind or score_range'} in its "
            "run.json: an older fpstore wrote it; rerun it with `fpstore classify`"
        )
    patients_path = folder / "patients.parquet"
    if not patients_path.is_file():
        raise StoreError(f"run {run_id!r} has no {patients_path}; the run did not finish, rerun it")
    return Run(run_id, folder, document, pq.read_table(patients_path))
