"""Score tissue types against truth masks: accuracy, per-class F1, confusion matrix.

``evaluate_tissue`` scores the stored tissue table, or computes each of ``methods`` in memory
(nothing written) so that methods are compared on the same patches.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fpstore.config import TISSUE_TYPES
from fpstore.errors import ConfigError, StoreError
from fpstore.store.layout import StoreLayout, visible_files
from fpstore.tissue.data import cohort_slides, read_slide_patches, slide_path, stored_slide_files
from fpstore.tissue.rules import RuleThresholds, rule_probabilities
from fpstore.tissue.truth import find_mask, load_truth, patch_truth
from fpstore.tissue.type_patches import TissueTyper, iter_tissue


@dataclass
class MethodScores:
    method: str
    n_patches: int
    accuracy: float
    macro_f1: float  # over the classes present in the truth
    per_class: dict  # {type: {precision, recall, f1, support}}
    confusion: list  # rows: true type, columns: predicted type, TISSUE_TYPES order
    seconds: float = 0.0
    failed: list = field(default_factory=list)


@dataclass
class EvaluationReport:
    cohort: str
    encoder: str
    truth: str
    n_slides: int  # slides with a truth mask
    slides_without_truth: list
    truth_counts: dict
    methods: list  # [MethodScores]

    def to_dict(self) -> dict:
        return asdict(self)


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix."""
    n = len(TISSUE_TYPES)
    confusion = np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)
    per_class = {}
    for i, name in enumerate(TISSUE_TYPES):
        tp, support, predicted = confusion[i, i], confusion[i].sum(), confusion[:, i].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(support),
        }
    present = [c for c in per_class.values() if c["support"]]
    return {
        "n_patches": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(np.mean([c["f1"] for c in present])) if present else 0.0,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def truth_by_patch(
    store: Path,
    cohort: str,
    truth: Path,
    encoder: str | None = None,
    downsample: float | None = None,
) -> tuple[str, dict[str, int], list[str]]:
    """(encoder, {patch_id: true type index}, slides without a mask) for stored patches."""
    masks = load_truth(truth, downsample)
    encoder, files = stored_slide_files(store, cohort, encoder)
    locations = cohort_slides(store, cohort)
    labels, missing = {}, []
    for path in files:
        slide = read_slide_patches(path, with_fingerprints=False)
        mask = find_mask(masks, slide.slide_id, slide_path(locations, slide.slide_id))
        if mask is None:
            missing.append(slide.slide_id)
            continue
        keys = slide.keys
        true = patch_truth(
            mask.read(),
            mask.downsample,
            keys.column("x").to_numpy(),
            keys.column("y").to_numpy(),
            keys.column("size_px").to_numpy(),
        )
        labels.update(zip(keys.column("patch_id").to_pylist(), true.tolist()))
    if not labels:
        raise ConfigError(
            f"no truth mask in {str(truth)!r} matches a slide of cohort {cohort!r} (masks are "
            f"named by the slide's file stem); slides: {', '.join(missing[:5])}"
        )
    return encoder, labels, missing


def evaluate_tissue(
    store: Path,
    cohort: str,
    truth: Path,
    methods: list[str] | None = None,
    models: dict[str, Path] | None = None,
    encoder: str | None = None,
    downsample: float | None = None,
    thresholds: RuleThresholds = RuleThresholds(),
    progress: bool = True,
) -> EvaluationReport:
    """Score ``methods`` (computed now) or, with none given, the stored tissue table."""
    encoder, labels, missing = truth_by_patch(store, cohort, truth, encoder, downsample)
    results = []
    if methods:
        for method in methods:
            typer = TissueTyper(store, method, (models or {}).get(method), thresholds)
            start = time.perf_counter()
            predicted, failed = {}, []
            for slide in iter_tissue(store, cohort, typer, encoder, progress=progress):
                if slide.error:
                    failed.append({"slide_id": slide.slide_id, "error": slide.error})
                    continue
                predicted.update(
                    zip(
                        slide.keys.column("patch_id").to_pylist(),
                        slide.probabilities.argmax(axis=1).tolist(),
                    )
                )
            results.append(_score(method, labels, predicted, time.perf_counter() - start, failed))
    else:
        for method, predicted in _stored_predictions(store, cohort).items():
            results.append(_score(method, labels, predicted, 0.0, []))
    n_types = len(TISSUE_TYPES)
    counts = np.bincount(np.fromiter(labels.values(), dtype=np.int64), minlength=n_types)
    return EvaluationReport(
        cohort=cohort,
        encoder=encoder,
        truth=str(truth),
        n_slides=len({p.split("/")[0] for p in labels}),
        slides_without_truth=missing,
        truth_counts={name: int(c) for name, c in zip(TISSUE_TYPES, counts)},
        methods=results,
    )


def evaluate_patch_truth(
    truth: Path,
    methods: list[str] | None = None,
    models: dict[str, Path] | None = None,
    thresholds: RuleThresholds = RuleThresholds(),
    out_px: int = 224,
) -> EvaluationReport:
    """Score pixel methods on a CSV of labelled patches (``truth.read_patch_truth``).

    Each image is one slide: its stains are estimated from its labelled patches, which are
    read at ``out_px`` as the extraction would. Fingerprint methods need stored patches and
    are refused. ``store`` is not needed: trained models come from ``models``.
    """
    from fpstore.slides.slide import open_slide
    from fpstore.tissue.data import slide_pixel_features
    from fpstore.tissue.methods import get_method
    from fpstore.tissue.trained import TissueModel
    from fpstore.tissue.truth import read_patch_truth

    methods = list(methods or ["rules"])
    for method in methods:
        if get_method(method).reads != "pixels":
            raise ConfigError(
                f"--method {method} types stored fingerprints; a patch truth file has only "
                "pixels: use rules or pixel-logreg"
            )
    patches = read_patch_truth(truth)
    by_image: dict[Path, list] = {}
    for patch in patches:
        by_image.setdefault(patch.image, []).append(patch)
    start = time.perf_counter()
    features, labels = [], []
    for image, rows in by_image.items():
        keys = pa.table(
            {
                "x": [p.x for p in rows],
                "y": [p.y for p in rows],
                "size_px": [float(p.size_px) for p in rows],
                "out_px": [out_px] * len(rows),
            }
        )
        slide = open_slide(image, mpp=rows[0].mpp)
        try:
            features.append(slide_pixel_features(slide, keys)[0])
        finally:
            slide.close()
        labels += [TISSUE_TYPES.index(p.tissue_type) for p in rows]
    X, y = np.concatenate(features), np.array(labels, dtype=np.int64)
    seconds = time.perf_counter() - start
    results = []
    for method in methods:
        if get_method(method).trained:
            if method not in (models or {}):
                raise ConfigError(f"--method {method} needs --model {method}=PATH here")
            probabilities = TissueModel.load(models[method]).predict_proba(X)
        else:
            probabilities = rule_probabilities(X, thresholds)
        results.append(
            MethodScores(method=method, seconds=seconds, **scores(y, probabilities.argmax(1)))
        )
    counts = np.bincount(y, minlength=len(TISSUE_TYPES))
    return EvaluationReport(
        cohort=f"patch truth ({len(by_image)} images)",
        encoder="",
        truth=str(truth),
        n_slides=len(by_image),
        slides_without_truth=[],
        truth_counts={name: int(c) for name, c in zip(TISSUE_TYPES, counts)},
        methods=results,
    )


def _stored_predictions(store: Path, cohort: str) -> dict[str, dict[str, int]]:
    """{method: {patch_id: type index}} from the stored tissue table."""
    files = visible_files(StoreLayout.of(store).tissue_dir(cohort))
    if not files:
        raise StoreError(
            f"cohort {cohort!r} has no tissue table yet; run `fpstore tissue predict --cohort "
            f"{cohort}` or pass --method to evaluate methods without storing them"
        )
    by_method: dict[str, dict[str, int]] = {}
    index = {name: i for i, name in enumerate(TISSUE_TYPES)}
    for path in files:
        table = pq.read_table(path, columns=["patch_id", "tissue_type", "method"]).to_pydict()
        for patch, kind, method in zip(table["patch_id"], table["tissue_type"], table["method"]):
            by_method.setdefault(method, {})[patch] = index[kind]
    return by_method


def _score(
    method: str, labels: dict, predicted: dict, seconds: float, failed: list
) -> MethodScores:
    common = [p for p in labels if p in predicted]
    y_true = np.array([labels[p] for p in common], dtype=np.int64)
    y_pred = np.array([predicted[p] for p in common], dtype=np.int64)
    return MethodScores(method=method, seconds=seconds, failed=failed, **scores(y_true, y_pred))
