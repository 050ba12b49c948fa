"""Loading bags and labels from the store, pooled by tissue type.

Fingerprints are read with pyarrow straight into one (N, dim) float32 matrix (through
``FeatureStore.fingerprints``); tissue types are joined by patch id; labels come from the
cohort's LABELS table. Patients with a missing label, without patches, or without patches of
the pooled tissue types are excluded and counted, never silently dropped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fpstore.classify.bags import Bags, align_labels, parse_pool
from fpstore.config import MARKERS, check_choice
from fpstore.errors import ClassifyError, StoreError
from fpstore.store.cohorts import read_cohort
from fpstore.store.layout import StoreLayout
from fpstore.store.tissue import read_tissue_types

# The pixel methods (the direct patch CNN) see every patch at this size, whichever encoder
# placed it: the paper's 112 um patches at a ResNet's 224 px.
PIXELS_PX = 224


@dataclass
class Dataset:
    """Bags of labelled patients, their labels (0/1) and what was left out, by reason."""

    cohort: str
    marker: str
    encoder: str | None
    pool: str
    bags: Bags
    y: np.ndarray
    counts: dict = field(default_factory=dict)
    # Labelled patients before pooling (ids, labels, sites): the basis of the CV groups, so
    # that every pool of a cohort splits its patients the same way.
    split_basis: tuple = ()

    def summary(self) -> dict:
        return {
            "cohort": self.cohort,
            "patients": int(self.bags.n_patients),
            "positive": int(self.y.sum()),
            "negative": int(len(self.y) - self.y.sum()),
            "patches": int(len(self.bags.bag_index)),
            **self.counts,
        }


def load_labels(store: Path, cohort: str, marker: str) -> tuple[np.ndarray, list, np.ndarray]:
    """(patient_ids, status with None for missing, sites) of one marker in a cohort."""
    check_choice("classify", "marker", marker, MARKERS)
    rows = read_cohort(store, cohort).marker_labels(marker)
    if rows.num_rows == 0:
        raise ClassifyError(f"cohort {cohort!r} has no {marker} labels; check the clinical table")
    return (
        np.asarray(rows.column("patient_id").to_pylist(), dtype=str),
        rows.column("status").to_pylist(),
        np.asarray([s or "" for s in rows.column("site").to_pylist()], dtype=str),
    )


def load_tissue(store, cohort: str) -> pa.Table | None:
    """patch_id -> tissue_type for the cohort (None when `fpstore tissue predict` has not run)."""
    return read_tissue_types(store, cohort)


def _patch_keys(store: Path, cohort: str, encoder: str | None):
    """(keys table, vectors or None): fingerprints, or keys only for the pixel method."""
    from fpstore.store import open as open_store

    with open_store(store) as fs:
        if encoder is not None:
            fp = fs.fingerprints(encoder, cohort)
            return fp.keys, fp.vectors
        # patch-cnn reads pixels: any encoder's patch keys give the coordinates.
        keys = fs.table("patches", cohort=cohort).to_arrow()
        return keys, None


def load_bags(
    store: Path, cohort: str, encoder: str | None, tissue_required: bool = False
) -> tuple[Bags, dict]:
    """All patches of a cohort as bags, with tissue types where the store has them."""
    keys, vectors = _patch_keys(store, cohort, encoder)
    if keys.num_rows == 0:
        raise StoreError(
            f"cohort {cohort!r} has no patches in {str(store)!r}; run `fpstore extract` first"
        )
    tissue_table = load_tissue(store, cohort)
    counts = {}
    tissue = None
    if tissue_table is not None:
        where = pc.index_in(keys.column("patch_id"), value_set=tissue_table.column("patch_id"))
        types = (
            tissue_table.column("tissue_type")
            .take(where.fill_null(0))
            .to_numpy(zero_copy_only=False)
        )
        tissue = np.where(
            where.is_null().to_numpy(zero_copy_only=False), "unknown", types.astype(str)
        )
        counts["patches_without_tissue_type"] = int((tissue == "unknown").sum())
    elif tissue_required:
        raise StoreError(
            f"cohort {cohort!r} has no tissue types; run "
            f"`fpstore tissue predict --cohort {cohort}` or use --pool all"
        )
    n = keys.num_rows
    features = vectors if vectors is not None else np.zeros((n, 0), np.float32)
    bags = Bags.from_patches(
        keys.column("patient_id").to_numpy(zero_copy_only=False),
        features,
        tissue=tissue,
        patch_ids=keys.column("patch_id").to_numpy(zero_copy_only=False),
        slide_ids=keys.column("slide_id").to_numpy(zero_copy_only=False),
        site_of_patch=np.asarray([s or "" for s in keys.column("site").to_pylist()], dtype=str),
    )
    return bags, counts


def load_dataset(
    store: Path,
    cohort: str,
    marker: str,
    encoder: str | None,
    pool: str = "all",
    bags: Bags | None = None,
    counts: dict | None = None,
    patches: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Labelled, pooled bags of one cohort and marker; ``bags`` reuses an earlier load.

    ``patches``: at most this many stored patches per patient, drawn before pooling (as an
    extraction of that many would have drawn them: ``Bags.sample``); None keeps them all.
    """
    types = parse_pool(pool)
    if bags is None:
        bags, counts = load_bags(store, cohort, encoder, tissue_required=types is not None)
    bags = bags.sample(patches, seed)
    counts = dict(counts or {})
    patient_ids, status, sites = load_labels(store, cohort, marker)
    labelled, y, label_counts = align_labels(bags, patient_ids, status)
    counts.update(label_counts)
    # The clinical table's site wins over the patch keys' (the cohort definition owns it).
    site_of = {p: s for p, s in zip(patient_ids, sites) if s}
    if labelled.sites is not None:
        labelled.sites = np.array(
            [site_of.get(p, s) for p, s in zip(labelled.patient_ids, labelled.sites)]
        )
    y_all = y
    pooled = labelled.pool(pool)
    if types is not None:
        keep = np.isin(labelled.patient_ids, pooled.patient_ids)
        counts["no_pool_patches"] = int((~keep).sum())
        y = y[keep]
    if pooled.n_patients == 0:
        raise ClassifyError(
            f"no labelled {marker} patients with {pool} patches in cohort {cohort!r}"
        )
    return Dataset(
        cohort,
        marker,
        encoder,
        pool,
        pooled,
        y,
        counts,
        (labelled.patient_ids, y_all, labelled.sites),
    )


def load_scoring_bags(
    store: Path,
    cohort: str,
    marker: str,
    encoder: str | None,
    pool: str = "all",
    patches: int | None = None,
    seed: int = 0,
) -> tuple[Bags, np.ndarray, dict]:
    """Every patient of a cohort with patches, for a saved model to score: (pooled bags,
    labels with NO_LABEL where the cohort has none for ``marker``, counts)."""
    from fpstore.classify.protocol import NO_LABEL

    types = parse_pool(pool)
    bags, counts = load_bags(store, cohort, encoder, tissue_required=types is not None)
    bags = bags.sample(patches, seed)
    check_choice("predict", "marker", marker, MARKERS)
    rows = read_cohort(store, cohort).marker_labels(marker)
    known = {
        p: s
        for p, s in zip(rows.column("patient_id").to_pylist(), rows.column("status").to_pylist())
        if s is not None
    }
    pooled = bags.pool(pool)
    if pooled.n_patients == 0:
        raise ClassifyError(f"no patient of cohort {cohort!r} has {pool} patches")
    y = np.array([known.get(p, NO_LABEL) for p in pooled.patient_ids], dtype=np.int8)
    counts = {
        **counts,
        "patients": int(pooled.n_patients),
        "labelled": int((y != NO_LABEL).sum()),
        "no_pool_patches": int(bags.n_patients - pooled.n_patients),
        "patches": int(len(pooled.bag_index)),
    }
    return pooled, y, counts


# Extraction settings a model depends on, from the fingerprint files' metadata. A file
# without ``stain_norm`` was written before stain normalisation existed: none.
SETTING_KEYS = (
    "encoder_hash",
    "dim",
    "precision",
    "stain_norm",
    "weights_hash",
    "patch_um",
    "out_px",
    "patches",
    "seed",
    "min_tissue",
    "encoder_spec",
)


def ensure_tissue_types(store, cohort: str, encoder: str | None, progress: bool = True) -> str:
    """Tissue types for a pool that needs them, typed on the spot when the cohort has none:
    from the fingerprints when the store holds a tissue model trained on this encoder's
    (seconds for a cohort), else with the label-free rules on the patches' pixels (what
    `fpstore tissue predict` runs by default). Says so on stderr and returns the note for the
    run ('' when the types were there); a StoreError naming `fpstore tissue predict` when the
    rules could type no slide (slides moved, say)."""
    from fpstore.store.tissue import read_tissue_types
    from fpstore.tissue.methods import FINGERPRINT_METHODS
    from fpstore.tissue.trained import TissueModel
    from fpstore.tissue.type_patches import predict_tissue

    if read_tissue_types(store, cohort) is not None:
        return ""
    layout = StoreLayout.of(store)
    for method in FINGERPRINT_METHODS:
        path = layout.tissue_model_file(method)
        if (
            encoder is not None
            and path.is_file()
            and (TissueModel.load(path).encoder or {}).get("id") == encoder
        ):
            summary = predict_tissue(store, cohort, method, encoder=encoder, progress=progress)
            if not summary.failed:
                return f"typed the tissue of cohort {cohort!r} with the stored {method} model"
    print(
        f"note: cohort {cohort!r} has no tissue types; typing its patches with the label-free "
        "rules (`fpstore tissue predict`)",
        file=sys.stderr,
    )
    summary = predict_tissue(store, cohort, "rules", encoder=encoder, progress=progress)
    if summary.n_slides == 0:
        first = summary.failed[0]["error"] if summary.failed else "no patches"
        raise StoreError(
            f"cohort {cohort!r} has no tissue types for this pool and the label-free rules "
            f"typed none of its slides ({first}); fix that and run `fpstore tissue predict "
            f"--cohort {cohort}`, or use --pool all"
        )
    failed = f", {len(summary.failed)} slides failed" if summary.failed else ""
    return (
        f"typed the tissue of cohort {cohort!r} with the label-free rules "
        f"({summary.n_patches} patches of {summary.n_slides} slides{failed})"
    )


def fingerprint_settings(store: Path, cohort: str, encoder: str) -> dict:
    """The extraction settings a cohort's fingerprints share (``partition_settings`` refuses
    a mixed set, naming the repair)."""
    from fpstore.store.fingerprints import partition_settings

    settings = partition_settings(store, encoder, cohort)
    return {k: settings.get(k, "none" if k == "stain_norm" else None) for k in SETTING_KEYS}


def cache_images(
    store: Path, cohort: str, bags: Bags, out_px: int = PIXELS_PX, progress: bool = True
):
    """An ``images(patch_ids)`` reader over the LMDB patch cache of the cohort, every patch
    at ``out_px`` (whatever size the encoders that placed the patches resize to).

    The cache lives in ``store/cache/patches/cohort=<c>/px=<out_px>``; patches missing from it
    are read from the slides (coordinates from the patch ids and the cohort's slide table) and
    added, so the slow slide reads happen once per patch, not once per epoch.
    """
    from tqdm import tqdm

    from fpstore.cohort.cohorts import open_cohort_slide
    from fpstore.slides.cache import PatchCache

    if bags.patch_ids is None:
        raise ClassifyError("reading patch images needs bags with patch ids")
    folder = StoreLayout.of(store).patch_cache_dir(cohort, out_px)
    keys = _patch_keys(store, cohort, None)[0]
    info = {
        p: (x, y_, size)
        for p, x, y_, size in zip(
            *(keys.column(c).to_pylist() for c in ("patch_id", "x", "y", "size_px"))
        )
    }
    cache = PatchCache(folder, readonly=False)
    have = set(cache.keys())
    missing = [p for p in bags.patch_ids if p not in have]
    if missing:
        slides = read_cohort(store, cohort).slide_records()
        by_slide: dict[str, list[str]] = {}
        for p in missing:
            by_slide.setdefault(p.rsplit("/", 1)[0], []).append(p)
        bar = tqdm(
            total=len(missing),
            desc=f"caching {cohort} patches",
            file=sys.stderr,
            disable=not progress,
        )
        for row in slides:
            wanted = by_slide.get(row.slide_id)
            if not wanted:
                continue
            slide = open_cohort_slide(row)
            try:
                xy = np.array([info[p][:2] for p in wanted])
                cache.put_many(wanted, slide.read_patches(xy, info[wanted[0]][2], out_px))
            finally:
                slide.close()
            bar.update(len(wanted))
        bar.close()
    cache.close()
    reader = PatchCache(folder)

    def images(patch_ids) -> np.ndarray:
        return np.stack([reader.get(p).image for p in patch_ids])

    return images
