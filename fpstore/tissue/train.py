"""Assemble training data for a tissue classifier and fit it.

Sources of labels:
    tiles      a folder with one sub-folder of image tiles per class (public datasets'
               layout); fingerprint methods encode the tiles with ``encoder`` first
    truth      truth masks of a stored cohort (``fpstore synth`` writes them)
    rules      the label-free rules on a sample of a stored cohort's patches: a fingerprint
               classifier learns to reproduce them and then types millions of patches
               without reading pixels
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fpstore.config import check_choice
from fpstore.errors import FpstoreError, TrainingError
from fpstore.tissue.data import (
    cohort_slides,
    read_slide_patches,
    read_tiles,
    slide_path,
    slide_pixel_features,
    stored_slide_files,
)
from fpstore.tissue.features import pixel_features
from fpstore.tissue.rules import RuleThresholds, rule_probabilities
from fpstore.tissue.trained import TissueModel, TissueTrainConfig, fit_tissue_model
from fpstore.tissue.truth import find_mask, load_truth, patch_truth

LABEL_SOURCES = ("truth", "rules")
_TILE_OPTIONS = ("encoder", "encoder_options", "mapping", "batch", "progress")
_LABEL_OPTIONS = ("labels", "truth", "downsample", "thresholds")  # one PatchLabels
_STORE_OPTIONS = (*_LABEL_OPTIONS, "encoder", "sample", "progress")


@dataclass(frozen=True)
class PatchLabels:
    """Where a stored cohort's training patches get their labels: ``truth`` masks (the
    folder ``fpstore synth`` writes; ``downsample``: level-0 px per mask px, when its
    truth.json does not say) or the label-free ``rules`` (with their ``thresholds``)."""

    labels: str = "truth"
    truth: Path | None = None
    downsample: float | None = None
    thresholds: RuleThresholds = RuleThresholds()

    def __post_init__(self):
        check_choice("train", "labels", self.labels, LABEL_SOURCES)
        if self.labels == "truth" and self.truth is None:
            raise TrainingError("--labels truth needs --truth DIR (the truth masks)")


def train_from_tiles(
    tiles: Path,
    config: TissueTrainConfig,
    encoder: str | None = None,
    encoder_options: dict | None = None,
    mapping: dict[str, str] | None = None,
    batch: int = 32,
    progress: bool = True,
) -> TissueModel:
    """Fit on labelled tiles (one folder per class); tiles should span ~112 um each."""
    size = 224
    enc = None
    if config.source == "fingerprints":
        if encoder is None:
            raise TrainingError(
                f"{config.method} on tiles needs --encoder: the encoder whose fingerprints the "
                "model will type (the one `fpstore extract` used)"
            )
        from fpstore.encoders.registry import create_encoder

        enc = create_encoder(encoder, **(encoder_options or {}))
        size = enc.preprocessing.out_px
    images, labels = read_tiles(tiles, mapping, size, config.max_per_class, config.seed)
    if enc is None:
        X, meta = pixel_features(images), {}
    else:
        X = _encode(enc, images, batch, progress)
        meta = {"encoder": {"id": enc.id, "hash": enc.hash, "dim": enc.dim}}
    meta["trained_on"] = {"source": "tiles", "path": str(tiles)}
    return fit_tissue_model(X, labels, config, meta)


def _encode(encoder, images: np.ndarray, batch: int, progress: bool) -> np.ndarray:
    import torch
    from tqdm import tqdm

    parts = []
    for start in tqdm(
        range(0, len(images), batch), desc="encode tiles", unit="batch", disable=not progress
    ):
        parts.append(encoder.encode(torch.from_numpy(images[start : start + batch])).cpu().numpy())
    return np.concatenate(parts)


def train_from_store(
    store: Path,
    cohort: str,
    config: TissueTrainConfig,
    labelling: PatchLabels,
    encoder: str | None = None,
    sample: int = 20_000,
    progress: bool = True,
) -> TissueModel:
    """Fit on a stored cohort's patches labelled by truth masks or by the rules.

    ``sample``: at most this many patches (0: all), drawn at random over the cohort (pixels
    are read for rule labels and pixel methods: the slow part).
    """
    from tqdm import tqdm

    labels, truth = labelling.labels, labelling.truth
    encoder_id, files = stored_slide_files(store, cohort, encoder)
    masks = load_truth(truth, labelling.downsample) if labels == "truth" else {}
    needs_pixels = labels == "rules" or config.source == "pixels"
    locations = cohort_slides(store, cohort)
    chosen = _sample_rows(files, sample, config.seed)
    X_parts, y_parts, encoder_hash, failed = [], [], None, []
    for path in tqdm(files, desc="training patches", unit="slide", disable=not progress):
        rows = chosen.get(path)
        if rows is None or not len(rows):
            continue
        try:
            slide = read_slide_patches(path, with_fingerprints=config.source == "fingerprints")
            keys = slide.keys.take(rows)
            if labels == "truth":
                mask = find_mask(masks, slide.slide_id, slide_path(locations, slide.slide_id))
                if mask is None:
                    continue
                y = patch_truth(
                    mask.read(),
                    mask.downsample,
                    keys.column("x").to_numpy(),
                    keys.column("y").to_numpy(),
                    keys.column("size_px").to_numpy(),
                )
            features = _pixel_features(slide.slide_id, keys, locations) if needs_pixels else None
        except FpstoreError as error:  # one bad slide is reported, the others train
            failed.append({"slide_id": path.stem, "error": str(error)})
            continue
        if labels == "rules":
            y = rule_probabilities(features, labelling.thresholds).argmax(axis=1)
        encoder_hash = slide.metadata.get("encoder_hash", encoder_hash)
        X_parts.append(features if config.source == "pixels" else slide.fingerprints[rows])
        y_parts.append(y)
    if not X_parts:
        raise TrainingError(
            f"no training patches: no slide of cohort {cohort!r} has "
            + ("a truth mask in " + repr(str(truth)) if labels == "truth" else "stored patches")
        )
    meta = {
        "trained_on": {
            "source": labels,
            "cohort": cohort,
            "slides": len(X_parts),
            "truth": str(truth) if truth else None,
            "failed": failed,
        }
    }
    if config.source == "fingerprints":
        meta["encoder"] = {"id": encoder_id, "hash": encoder_hash, "dim": int(X_parts[0].shape[1])}
    return fit_tissue_model(np.concatenate(X_parts), np.concatenate(y_parts), config, meta)


def _sample_rows(files: list[Path], sample: int, seed: int) -> dict[Path, np.ndarray]:
    """{file: sorted row indices}: all rows, or ``sample`` drawn uniformly over all files."""
    import pyarrow.parquet as pq

    sizes = [pq.ParquetFile(p).metadata.num_rows for p in files]
    total = sum(sizes)
    if sample <= 0 or sample >= total:
        return {p: np.arange(n) for p, n in zip(files, sizes)}
    picked = np.sort(np.random.default_rng(seed).choice(total, sample, replace=False))
    bounds = np.cumsum([0] + sizes)
    return {
        p: picked[(picked >= lo) & (picked < hi)] - lo
        for p, lo, hi in zip(files, bounds[:-1], bounds[1:])
    }


def _pixel_features(slide_id: str, keys, locations: dict) -> np.ndarray:
    from fpstore.cohort.cohorts import open_cohort_slide

    if slide_id not in locations:
        raise TrainingError(f"slide {slide_id!r} is not in the cohort's slides table")
    handle = open_cohort_slide(locations[slide_id])
    try:
        # The sampled patches stand in for the slide when its stains are estimated.
        features, _ = slide_pixel_features(handle, keys)
    finally:
        handle.close()
    return features


def train_tissue(
    store: Path,
    config: TissueTrainConfig,
    out: Path | None = None,
    tiles: Path | None = None,
    cohort: str | None = None,
    **options,
) -> dict:
    """Fit from ``tiles`` or a stored ``cohort`` (see the two functions above) and save it.

    Saves to ``out`` or ``store/models/tissue/<method>.npz``, where ``predict`` looks first.
    Returns the model's description with the path it was saved to.
    """
    from fpstore.store.layout import StoreLayout

    if (tiles is None) == (cohort is None):
        raise TrainingError("train from --tiles DIR or from --cohort NAME (one of the two)")
    given = {k: v for k, v in options.items() if v is not None}
    allowed = _TILE_OPTIONS if tiles is not None else _STORE_OPTIONS
    stray = sorted(set(given) - set(allowed))
    if stray:
        source = "--tiles" if tiles is not None else "--cohort"
        raise TrainingError(f"options {', '.join(stray)} do not apply to training from {source}")
    if tiles is not None:
        model = train_from_tiles(tiles, config, **given)
    else:
        labelling = PatchLabels(**{k: given.pop(k) for k in _LABEL_OPTIONS if k in given})
        model = train_from_store(store, cohort, config, labelling, **given)
    path = model.save(out or StoreLayout.of(store).tissue_model_file(config.method))
    return model.describe() | {"path": str(path)}
