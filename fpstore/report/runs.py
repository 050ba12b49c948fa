"""The thin layer between the store and the figures: runs, patch scores, tissue types, slides.

Reads ``runs/<run_id>/{run.json, patients.parquet, patches.parquet}``, the ``tissue`` tables
and the cohorts' ``slides.parquet`` with pyarrow, and hands plain numpy arrays to the
figure code, which never sees the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fpstore.errors import StoreError

# Methods whose scores are tanh outputs in [-1, 1] (the paper's MIL head); the others
# (logistic regression, XGBoost, the patch CNN) give probabilities in [0, 1].
SIGNED_METHODS = {"mil"}


def list_runs(store: Path) -> list[str]:
    folder = Path(store) / "runs"
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


def load_run(store: Path, run_id: str) -> Run:
    folder = Path(store) / "runs" / run_id
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


def parse_patch_ids(patch_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, size_px) level-0 arrays from ids "<slide_id>/<x>_<y>_<size_px>" (schema.patch_id)."""
    try:
        parts = np.array([p.rsplit("/", 1)[1].split("_") for p in patch_ids], dtype=np.int64)
    except (IndexError, ValueError) as error:
        raise StoreError(
            f"patch ids must look like '<slide_id>/<x>_<y>_<size_px>': {error}"
        ) from None
    parts = parts.reshape(-1, 3)
    return parts[:, 0], parts[:, 1], parts[:, 2].astype(np.float64)


@dataclass
class SlidePatches:
    """One slide's scored patches as arrays, aligned row by row."""

    cohort: str
    patch_ids: list[str]
    x: np.ndarray
    y: np.ndarray
    size_px: np.ndarray
    scores: np.ndarray
    tissue_types: np.ndarray | None  # object array; None when no tissue table exists

    @property
    def has_tissue(self) -> bool:
        return self.tissue_types is not None


def tissue_table(store: Path, cohort: str, slide_id: str) -> pa.Table | None:
    path = Path(store) / "tissue" / f"cohort={cohort}" / f"{slide_id}.parquet"
    return pq.read_table(path, columns=["patch_id", "tissue_type"]) if path.is_file() else None


def lookup(keys: list[str], table: pa.Table | None, column: str) -> np.ndarray | None:
    """``table[column]`` for each key of ``keys`` (by patch_id); None where absent."""
    if table is None:
        return None
    index = dict(zip(table.column("patch_id").to_pylist(), table.column(column).to_pylist()))
    return np.array([index.get(k) for k in keys], dtype=object)


def slide_patches(store: Path, run: Run, slide_id: str) -> SlidePatches:
    table = run.patch_scores(slide_id)
    if table.num_rows == 0:
        scored = run.slides_with_patch_scores()
        raise StoreError(
            f"run {run.run_id!r} has no patch scores for slide {slide_id!r}; slides with scores: "
            f"{', '.join(scored[:10]) or 'none'}{' ...' if len(scored) > 10 else ''}. "
            "A full heatmap "
            "needs the slide extracted with `fpstore extract --patches all` and classified"
        )
    cohort = table.column("cohort")[0].as_py()
    ids = table.column("patch_id").to_pylist()
    x, y, size = parse_patch_ids(ids)
    types = lookup(ids, tissue_table(store, cohort, slide_id), "tissue_type")
    return SlidePatches(cohort, ids, x, y, size, table.column("score").to_numpy(), types)


def cohort_slides(store: Path, cohort: str) -> pa.Table:
    path = Path(store) / "cohorts" / cohort / "slides.parquet"
    if not path.is_file():
        raise StoreError(f"cohort {cohort!r} has no {path}; add it with `fpstore cohort add`")
    return pq.read_table(path)


def open_cohort_slide(store: Path, cohort: str, slide_id: str):
    """The slide file of ``slide_id`` as the cohort registered it (with its mpp override)."""
    from fpstore.slides.slide import open_slide

    slides = cohort_slides(store, cohort)
    match = [row for row in slides.to_pylist() if row["slide_id"] == slide_id]
    if not match:
        raise StoreError(f"slide {slide_id!r} is not in cohort {cohort!r}")
    return open_slide(match[0]["path"], mpp=match[0].get("mpp_override"))


def patient_labels(store: Path, cohort: str, marker: str) -> dict[str, int | None]:
    """Clinical status (1, 0 or None) per patient for ``marker`` from the cohort's labels."""
    path = Path(store) / "cohorts" / cohort / "labels.parquet"
    if not path.is_file():
        raise StoreError(f"cohort {cohort!r} has no {path}; add it with `fpstore cohort add`")
    table = pq.read_table(
        path, columns=["patient_id", "marker", "status"], filters=[("marker", "=", marker)]
    )
    return dict(zip(table.column("patient_id").to_pylist(), table.column("status").to_pylist()))
