"""Where everything lives in a store: the one place that names its folders and files.

A store is a local folder or a prefix on object storage (``s3://bucket/prefix``, see
``fpstore.store.remote``); the same layout holds for both:

    cohorts/<cohort>/slides.parquet, labels.parquet, cohort.json
    locks/cohort=<cohort>.lock     held by extraction (shared) and cohort add (exclusive)
    fingerprints/encoder=<id>/cohort=<cohort>/<slide_id>.parquet
    status/encoder=<id>/cohort=<cohort>/<slide_id>.json (and .<slide_id>.lock claims)
    tissue/cohort=<cohort>/<slide_id>.parquet
    runs/<run_id>/run.json, patients.parquet, patches.parquet (compare.json for comparisons)
    models/tissue/<method>.npz
    models/fingerprint/<name>.pt   trained fingerprint networks (``fpstore train-fingerprint``)
    models/classify/<model_id>/card.json, README.md, final.npz, fold-<k>.npz
    cache/...                      derived data, rebuilt when stale, safe to delete
    cache/tissue-masks/<settings>/<slide>.npz   a slide's tissue mask (``tissue_mask_file``)
    cache/patches/cohort=<cohort>/px=<px>       patches for the patch CNN (``patch_cache_dir``)
    cache/fingerprint-cores/<cohort>/<crop>     pseudo-cores for training (``pseudo_cores_dir``)
    cache/similarity/encoder=<id>/<cohort>      the vector index (``fpstore.store.similarity``)

Temporary files start with '.' and end in '.tmp', folders are filled under a hidden
``.staging/`` beside their place (``fpstore.store.io``): every listing here skips names
that start with '.'.
"""

from __future__ import annotations

import re
from pathlib import Path

from fpstore.errors import StoreError
from fpstore.store.remote import RemotePath, store_root

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")
# Under ``status_root`` and ``tissue_root``: every slide's file, for DuckDB's readers.
STATUS_FILES = "encoder=*/cohort=*/*.json"
TISSUE_FILES = "cohort=*/*.parquet"


def check_partition_value(kind: str, value: str) -> str:
    """An encoder id or cohort name must be a safe folder name (it becomes ``kind=value``)."""
    if not _SAFE_ID.match(value or "") or "/" in value:
        raise StoreError(
            f"{kind} {value!r} cannot name a partition folder; use letters, digits and _ . : + -"
        )
    return value


def visible_files(folder, pattern: str = "*.parquet") -> list:
    """Files under ``folder`` matching ``pattern``, temporary and hidden files left out."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))


def partitions(folder, key: str) -> dict:
    """{value: folder} of the hive partitions ``key=value`` directly under ``folder``."""
    if not folder.is_dir():
        return {}
    prefix = f"{key}="
    return {
        p.name[len(prefix) :]: p
        for p in sorted(folder.iterdir())
        if p.is_dir() and p.name.startswith(prefix)
    }


class StoreLayout:
    """Paths of a store; ``StoreLayout.of(x)`` accepts a layout, a Path, a str or a URL."""

    def __init__(self, root):
        self.root: Path | RemotePath = store_root(root)
        if isinstance(self.root, Path) and self.root.exists() and not self.root.is_dir():
            raise StoreError(
                f"store {str(self.root)!r} is a file, not a folder; pass --store with a new "
                "or existing store folder"
            )

    @classmethod
    def of(cls, store) -> StoreLayout:
        return store if isinstance(store, StoreLayout) else cls(store)

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"StoreLayout({str(self.root)!r})"

    @property
    def is_remote(self) -> bool:
        return isinstance(self.root, RemotePath)

    def exists(self) -> bool:
        return self.root.is_dir()

    # -- cohorts --
    @property
    def cohorts_dir(self):
        return self.root / "cohorts"

    def cohort_dir(self, cohort: str):
        return self.cohorts_dir / cohort

    def cohort_file(self, cohort: str, name: str):
        """``slides.parquet``, ``labels.parquet`` or ``cohort.json`` of a cohort."""
        return self.cohort_dir(cohort) / name

    def cohort_lock_file(self, cohort: str):
        """Extraction holds it shared for its whole run; ``cohort add`` exclusively."""
        return self.root / "locks" / f"cohort={cohort}.lock"

    # -- fingerprints and their status --
    @property
    def fingerprints_dir(self):
        return self.root / "fingerprints"

    def fingerprint_dir(self, encoder: str, cohort: str):
        return self.fingerprints_dir / f"encoder={encoder}" / f"cohort={cohort}"

    def fingerprint_file(self, encoder: str, cohort: str, slide_id: str):
        return self.fingerprint_dir(encoder, cohort) / f"{slide_id}.parquet"

    @property
    def status_root(self):
        return self.root / "status"

    def status_dir(self, encoder: str, cohort: str):
        return self.status_root / f"encoder={encoder}" / f"cohort={cohort}"

    def status_file(self, encoder: str, cohort: str, slide_id: str):
        return self.status_dir(encoder, cohort) / f"{slide_id}.json"

    def claim_file(self, encoder: str, cohort: str, slide_id: str):
        return self.status_dir(encoder, cohort) / f".{slide_id}.lock"

    def encoder_cohorts(self) -> dict[str, dict[str, list]]:
        """{encoder: {cohort: [fingerprint files]}} of every non-empty partition."""
        found = {}
        for encoder, folder in partitions(self.fingerprints_dir, "encoder").items():
            cohorts = {c: visible_files(f) for c, f in partitions(folder, "cohort").items()}
            cohorts = {c: files for c, files in cohorts.items() if files}
            if cohorts:
                found[encoder] = cohorts
        return found

    # -- tissue types --
    @property
    def tissue_root(self):
        return self.root / "tissue"

    def tissue_dir(self, cohort: str):
        return self.tissue_root / f"cohort={cohort}"

    def tissue_file(self, cohort: str, slide_id: str):
        return self.tissue_dir(cohort) / f"{slide_id}.parquet"

    # -- classifier runs and models --
    @property
    def runs_dir(self):
        return self.root / "runs"

    def run_dir(self, run_id: str):
        return self.runs_dir / run_id

    def tissue_model_file(self, method: str):
        return self.root / "models" / "tissue" / f"{method}.npz"

    @property
    def models_dir(self):
        """Saved classifier models, one folder each (see ``fpstore.store.models``)."""
        return self.root / "models" / "classify"

    def model_dir(self, model_id: str):
        return self.models_dir / model_id

    @property
    def fingerprint_models_dir(self):
        """Trained fingerprint networks: the checkpoints ``--encoder fingerprint`` can use."""
        return self.root / "models" / "fingerprint"

    def fingerprint_model_file(self, name: str):
        """A trained fingerprint network kept in the store (``models/fingerprint/<name>.pt``)."""
        return self.fingerprint_models_dir / f"{name}.pt"

    # -- derived data --
    def cache_dir(self, *parts: str):
        folder = self.root / "cache"
        for part in parts:
            folder = folder / part
        return folder

    def patch_cache_dir(self, cohort: str, out_px: int):
        """The LMDB cache of a cohort's patches at ``out_px`` (what the patch CNN reads)."""
        return self.cache_dir("patches", f"cohort={cohort}", f"px={out_px}")

    def pseudo_cores_dir(self, cohort: str):
        """The cut pseudo-cores of a cohort's slides (fingerprint training), one folder per
        crop setting inside."""
        return self.cache_dir("fingerprint-cores", cohort)

    def tissue_mask_file(self, settings: str, slide: str):
        """One slide file's tissue mask made with one set of mask settings (both digests)."""
        return self.cache_dir("tissue-masks", settings) / f"{slide}.npz"
