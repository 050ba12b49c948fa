"""Cross-validation, external validation and comparisons on numpy bags (no store needed).

cross_validate: the paper's protocol (5 groups; train on 3, early-stop on 1, test on 1; every
patient tested exactly once), per-fold and pooled test AUC with a bootstrap CI.
external_validate: a final model trained on the whole first cohort (4 groups train, 1 group
early-stops) and tested once on the other cohort.
compare: several (method, features, pool) entries on identical splits, with DeLong p-values on
the patients that each pair shares.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from fpstore.classify.bags import Bags
from fpstore.classify.methods import create_classifier
from fpstore.classify.metrics import auc, delong_test, roc_points, summarize
from fpstore.classify.splits import Fold, cv_folds, final_fold, make_groups
from fpstore.errors import ClassifyError


@dataclass
class Predictions:
    """Scores per tested patient and, where the method has them, per patch."""

    patient_ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    folds: np.ndarray  # -1 for an external test
    n_patches: np.ndarray
    patch_ids: np.ndarray | None = None
    slide_ids: np.ndarray | None = None
    patch_folds: np.ndarray | None = None
    patch_scores: np.ndarray | None = None


@dataclass
class ValidationResult:
    kind: str  # "cv" or "external"
    method: str
    classifier: dict
    predictions: Predictions
    metrics: dict
    roc: dict
    folds: list[dict] = field(default_factory=list)
    groups: dict = field(default_factory=dict)  # patient_id -> group of the training cohort

    def to_dict(self, roc: bool = True) -> dict:
        out = {
            "kind": self.kind,
            "method": self.method,
            "metrics": self.metrics,
            "folds": self.folds,
            "classifier": self.classifier,
        }
        if roc:
            out["roc"] = self.roc
        return out


def assign_groups(
    patient_ids, y, split: str = "patient", sites=None, n_folds: int = 5, seed: int = 0
) -> dict[str, int]:
    """patient_id -> group; sorted ids first, so the same patients always get the same groups."""
    patient_ids = np.asarray(patient_ids).astype(str)
    order = np.argsort(patient_ids)
    groups = make_groups(
        np.asarray(y)[order],
        split,
        None if sites is None else np.asarray(sites)[order],
        n_folds,
        seed,
    )
    return dict(zip(patient_ids[order].tolist(), groups.tolist()))


def _group_array(bags: Bags, groups: dict[str, int]) -> np.ndarray:
    missing = [p for p in bags.patient_ids if p not in groups]
    if missing:
        raise ClassifyError(f"{len(missing)} patients have no group, e.g. {missing[0]!r}")
    return np.array([groups[p] for p in bags.patient_ids], dtype=np.int64)


def _fit(method, bags: Bags, y, fold: Fold, seed: int, images, classifier_kw):
    if len(np.unique(y[fold.train])) != 2:
        raise ClassifyError(
            f"fold {fold.index}: the training groups hold one class only; "
            "too few patients of the other class for this pool and split"
        )
    model = create_classifier(method, seed=seed, images=images, **(classifier_kw or {}))
    return model.fit(
        bags.subset(fold.train), y[fold.train], eval_set=(bags.subset(fold.es), y[fold.es])
    )


def _score(model, bags: Bags) -> tuple[np.ndarray, np.ndarray | None]:
    """Patient scores and patch scores; where a method has patch scores, the patient score
    is their mean (what its decision_function computes), so patches are scored only once."""
    patch = model.patch_scores(bags)
    if patch is None:
        return model.decision_function(bags), None
    sums = np.bincount(bags.bag_index, weights=patch, minlength=bags.n_patients)
    return sums / np.maximum(bags.n_patches(), 1), patch


def _metrics(y, scores, n_boot: int, seed: int) -> tuple[dict, dict]:
    return summarize(y, scores, n_boot=n_boot, seed=seed), roc_points(y, scores)


def cross_validate(
    bags: Bags,
    y,
    method: str = "mil",
    groups: dict[str, int] | None = None,
    n_folds: int = 5,
    split: str = "patient",
    seed: int = 0,
    n_boot: int = 2000,
    classifier_kw: dict | None = None,
    images=None,
    progress: bool = True,
) -> ValidationResult:
    """The paper's k-fold protocol; every patient of ``bags`` is tested exactly once."""
    y = np.asarray(y)
    if groups is None:
        groups = assign_groups(bags.patient_ids, y, split, bags.sites, n_folds, seed)
    g = _group_array(bags, groups)
    scores = np.full(bags.n_patients, np.nan)
    fold_of = np.full(bags.n_patients, -1, dtype=np.int64)
    patch_parts, fold_rows, classifier = [], [], {}
    folds = cv_folds(g)
    for fold in tqdm(folds, desc=f"{method} folds", file=sys.stderr, disable=not progress):
        model = _fit(method, bags, y, fold, seed + fold.index, images, classifier_kw)
        test = bags.subset(fold.test)
        scores[fold.test], patch = _score(model, test)
        fold_of[fold.test] = fold.index
        if patch is not None:
            patch_parts.append((test, fold.index, patch))
        classifier = classifier or model.describe()
        yt = y[fold.test]
        fold_rows.append(
            {
                "fold": fold.index,
                "n_train": len(fold.train),
                "n_es": len(fold.es),
                "n_test": len(fold.test),
                "n_test_pos": int(yt.sum()),
                "auc": auc(yt, scores[fold.test]) if len(np.unique(yt)) == 2 else None,
                "es_score": getattr(model, "es_score_", None),
                "best_epoch": getattr(
                    model, "best_epoch_", getattr(model, "best_iteration_", None)
                ),
            }
        )
    metrics, roc = _metrics(y, scores, n_boot, seed)
    fold_aucs = [f["auc"] for f in fold_rows if f["auc"] is not None]
    metrics["mean_fold_auc"] = float(np.mean(fold_aucs)) if fold_aucs else None
    metrics["sd_fold_auc"] = float(np.std(fold_aucs)) if fold_aucs else None
    predictions = Predictions(
        bags.patient_ids, y, scores, fold_of, bags.n_patches(), *_patch_columns(patch_parts)
    )
    return ValidationResult(
        "cv",
        method,
        classifier,
        predictions,
        metrics,
        roc,
        fold_rows,
        {p: int(v) for p, v in zip(bags.patient_ids, g)},
    )


def _patch_columns(parts) -> tuple:
    if not parts:
        return None, None, None, None
    ids = [t.patch_ids if t.patch_ids is not None else np.array([""] * len(s)) for t, _, s in parts]
    slides = [
        t.slide_ids if t.slide_ids is not None else np.array([""] * len(s)) for t, _, s in parts
    ]
    folds = [np.full(len(s), k) for _, k, s in parts]
    return (
        np.concatenate(ids),
        np.concatenate(slides),
        np.concatenate(folds),
        np.concatenate([s for _, _, s in parts]).astype(np.float32),
    )


def external_validate(
    train_bags: Bags,
    train_y,
    test_bags: Bags,
    test_y,
    method: str = "mil",
    groups: dict[str, int] | None = None,
    n_folds: int = 5,
    split: str = "patient",
    seed: int = 0,
    n_boot: int = 2000,
    classifier_kw: dict | None = None,
    images=None,
    test_images=None,
) -> ValidationResult:
    """Train the final model on the whole training cohort, then test once on the other."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    overlap = set(train_bags.patient_ids) & set(test_bags.patient_ids)
    if overlap:
        raise ClassifyError(
            f"{len(overlap)} patients are in both the training and the external cohort, e.g. "
            f"{sorted(overlap)[0]!r}; an external test must be disjoint"
        )
    if groups is None:
        groups = assign_groups(
            train_bags.patient_ids, train_y, split, train_bags.sites, n_folds, seed
        )
    fold = final_fold(_group_array(train_bags, groups))
    model = _fit(method, train_bags, train_y, fold, seed, images, classifier_kw)
    if test_images is not None:
        model.images = test_images
    scores, patch = _score(model, test_bags)
    metrics, roc = _metrics(test_y, scores, n_boot, seed)
    parts = [] if patch is None else [(test_bags, -1, patch)]
    predictions = Predictions(
        test_bags.patient_ids,
        test_y,
        scores,
        np.full(test_bags.n_patients, -1),
        test_bags.n_patches(),
        *_patch_columns(parts),
    )
    info = {
        "fold": None,
        "n_train": len(fold.train),
        "n_es": len(fold.es),
        "n_test": test_bags.n_patients,
        "n_test_pos": int(test_y.sum()),
        "auc": metrics["auc"],
        "es_score": getattr(model, "es_score_", None),
        "best_epoch": getattr(model, "best_epoch_", getattr(model, "best_iteration_", None)),
    }
    return ValidationResult(
        "external", method, model.describe(), predictions, metrics, roc, [info], dict(groups)
    )


@dataclass
class Entry:
    """One row of a comparison: a name, its bags and labels, and the method to run."""

    name: str
    bags: Bags
    y: np.ndarray
    method: str
    test_bags: Bags | None = None  # given: external validation on these
    test_y: np.ndarray | None = None
    classifier_kw: dict | None = None
    images: object = None
    test_images: object = None


def compare(
    entries: list[Entry],
    n_folds: int = 5,
    split: str = "patient",
    seed: int = 0,
    n_boot: int = 2000,
    progress: bool = True,
    groups: dict | None = None,
) -> dict:
    """Run every entry on the same groups; DeLong p-values pairwise on shared patients.

    Without ``groups`` they come from the union of the entries' patients (a pool can drop
    patients that have no patch of its tissue types), so every entry sees each patient in the
    same role.
    """
    if not entries:
        raise ClassifyError("nothing to compare")
    if groups is None:
        groups = _union_groups(entries, n_folds, split, seed)
    results = []
    for e in tqdm(entries, desc="compare", file=sys.stderr, disable=not progress):
        common = dict(
            method=e.method,
            groups=groups,
            n_folds=n_folds,
            seed=seed,
            n_boot=n_boot,
            classifier_kw=e.classifier_kw,
            images=e.images,
        )
        if e.test_bags is None:
            results.append(cross_validate(e.bags, e.y, progress=False, **common))
        else:
            results.append(
                external_validate(
                    e.bags, e.y, e.test_bags, e.test_y, test_images=e.test_images, **common
                )
            )
    pvalues = [[_paired_p(a, b) for b in results] for a in results]
    rows = []
    for e, r, p in zip(entries, results, pvalues):
        m = r.metrics
        rows.append(
            {
                "name": e.name,
                "method": e.method,
                "n": m["n"],
                "auc": m["auc"],
                "ci_low": m["ci_low"],
                "ci_high": m["ci_high"],
                "mean_fold_auc": m.get("mean_fold_auc"),
                "p_vs_first": p[0],
            }
        )
    return {
        "rows": rows,
        "pairwise_p": pvalues,
        "names": [e.name for e in entries],
        "results": results,
        "groups": groups,
    }


def _union_groups(entries: list[Entry], n_folds: int, split: str, seed: int) -> dict:
    label_of, site_of = {}, {}
    for e in entries:
        for i, p in enumerate(e.bags.patient_ids):
            label_of[p] = int(e.y[i])
            if e.bags.sites is not None:
                site_of[p] = e.bags.sites[i]
    patients = np.array(sorted(label_of))
    sites = np.array([site_of.get(p) for p in patients], dtype=object) if split == "site" else None
    return assign_groups(patients, [label_of[p] for p in patients], split, sites, n_folds, seed)


def _paired_p(a: ValidationResult, b: ValidationResult) -> float | None:
    """DeLong p-value on the patients both results scored (None if not two classes)."""
    if a is b:
        return None
    index_b = {p: i for i, p in enumerate(b.predictions.patient_ids)}
    shared = [(i, index_b[p]) for i, p in enumerate(a.predictions.patient_ids) if p in index_b]
    if not shared:
        return None
    ia, ib = np.array(shared).T
    y = a.predictions.labels[ia]
    if len(np.unique(y)) != 2:
        return None
    return delong_test(y, a.predictions.scores[ia], b.predictions.scores[ib])["p"]
