"""Classifier runs in the store: ``runs/<run_id>/{patients.parquet, patches.parquet, run.json}``.

The prediction tables are written first and run.json last, each atomically, so a folder with
a run.json holds a whole run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fpstore.errors import StoreError
from fpstore.store.io import write_json_atomic, write_parquet_atomic
from fpstore.store.layout import StoreLayout
from fpstore.store.schema import file_metadata


def write_run(
    store, run_id: str, document: dict, patients: pa.Table, patches: pa.Table | None
) -> Path:
    """Write one run: its patient predictions, patch predictions (if any), then run.json."""
    folder = StoreLayout.of(store).run_dir(run_id)
    write_parquet_atomic(
        patients, folder / "patients.parquet", file_metadata("predictions", run_id=run_id)
    )
    if patches is not None:
        write_parquet_atomic(
            patches, folder / "patches.parquet", file_metadata("patch_predictions", run_id=run_id)
        )
    write_json_atomic(document, folder / "run.json")
    return folder


# Methods whose scores are tanh outputs in [-1, 1] (the paper's MIL head); the others
# (logistic regression, XGBoost, the patch CNN) give probabilities in [0, 1].
SIGNED_METHODS = {"mil"}


def write_compare(store, compare_id: str, document: dict) -> Path:
    """A comparison's summary (its member runs are written with ``write_run``)."""
    return write_json_atomic(document, StoreLayout.of(store).run_dir(compare_id) / "compare.json")


def list_runs(store) -> list[str]:
    folder = StoreLayout.of(store).runs_dir
    return (
        sorted(p.name for p in folder.iterdir() if (p / "run.json").is_file())
        if folder.is_dir()
        else []
    )


def _setting(config: dict, key: str):
    """A run setting, top level first, then in a nested "config" block."""
    if config.get(key) is not None:
        return config[key]
    nested = config.get("config")
    return nested.get(key) if isinstance(nested, dict) else None


@dataclass
class Run:
    """One classifier run: its settings and per-patient predictions."""

    run_id: str
    path: Path
    config: dict
    patients: pa.Table  # PATIENT_PREDICTIONS

    @property
    def cohort(self) -> str:
        value = _setting(self.config, "cohort")
        if value:
            return str(value)
        cohorts = self.patients.column("cohort").unique().to_pylist()
        return str(cohorts[0]) if cohorts else ""

    @property
    def marker(self) -> str | None:
        return _setting(self.config, "marker")

    @property
    def method(self) -> str | None:
        return _setting(self.config, "method")

    @property
    def encoder(self) -> str | None:
        return _setting(self.config, "encoder")

    @property
    def score_range(self) -> tuple[float, float]:
        """The run's score range: (-1, 1) for the MIL head, (0, 1) for probabilities."""
        given = _setting(self.config, "score_range")
        if given:
            return float(given[0]), float(given[1])
        if self.method in SIGNED_METHODS:
            return -1.0, 1.0
        scores = self.patients.column("score").to_numpy()
        if len(scores) and scores.min() >= 0.0 and scores.max() <= 1.0 and self.method is not None:
            return 0.0, 1.0
        return -1.0, 1.0

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
    config = json.loads((folder / "run.json").read_text())
    patients_path = folder / "patients.parquet"
    if not patients_path.is_file():
        raise StoreError(f"run {run_id!r} has no {patients_path}; the run did not finish, rerun it")
    return Run(run_id, folder, config, pq.read_table(patients_path))
