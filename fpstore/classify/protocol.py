"""Cross-validation, external validation and comparisons on numpy bags (no store needed).

Every function takes an estimator (the protocol in ``fpstore.classify.methods``) and fits
fresh copies of it (scikit-learn's ``clone``, the seed set per fit), so one harness runs every
method.

cross_validate: the paper's protocol (5 groups; train on 3, early-stop on 1, test on 1; every
patient tested exactly once), per-fold and pooled test AUC with a bootstrap CI.
fit_final: the final model, trained on the whole cohort (4 groups train, 1 group early-stops).
score: a fitted model's patient (and patch) scores on any bags, with metrics where labelled.
external_validate: fit_final, then score once on the other cohort.
validate_entries: several entries (method, features, pool) on identical splits, with DeLong
p-values on the patients that each pair shares (what `fpstore compare` runs).

The validation settings (folds, split, seed, bootstrap, fixed groups) come as one
``CVProtocol`` (``fpstore.classify.settings``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from fpstore.classify.bags import Bags
from fpstore.classify.metrics import auc, delong_test, roc_points, summarize
from fpstore.classify.settings import CVProtocol
from fpstore.classify.splits import Fold, cv_folds, final_fold, make_groups
from fpstore.errors import ClassifyError

NO_LABEL = -1  # a scored patient without a clinical label (stored as null)
DEFAULT_PROTOCOL = CVProtocol()


@dataclass
class Predictions:
    """Scores per tested patient and, where the method has them, per patch."""

    patient_ids: np.ndarray
    labels: np.ndarray  # 0, 1 or NO_LABEL
    scores: np.ndarray
    folds: np.ndarray  # -1 for an external test or a prediction
    n_patches: np.ndarray
    patch_ids: np.ndarray | None = None
    slide_ids: np.ndarray | None = None
    patch_folds: np.ndarray | None = None
    patch_scores: np.ndarray | None = None
    patch_attention: np.ndarray | None = None  # where the method has attention (abmil)

    def labelled(self) -> np.ndarray:
        """Mask of the patients with a label."""
        return self.labels != NO_LABEL


@dataclass
class ValidationResult:
    kind: str  # "cv", "external" or "predict"
    classifier: dict
    predictions: Predictions
    metrics: dict  # empty when fewer than two classes are labelled
    roc: dict
    folds: list[dict] = field(default_factory=list)
    groups: dict = field(default_factory=dict)  # patient_id -> group of the training cohort
    # The fitted models: one per fold (cross_validate with keep_models), or the final one.
    models: list = field(default_factory=list, repr=False)

    def to_dict(self, roc: bool = True) -> dict:
        out = {
            "kind": self.kind,
            "metrics": self.metrics,
            "folds": self.folds,
            "classifier": self.classifier,
        }
        if roc:
            out["roc"] = self.roc
        return out


def score_range(kind: str, predictions: Predictions) -> list[float]:
    """The range a run's scores live in, for heatmaps (``MethodSpec.score_range``): tanh
    [-1, 1], probabilities [0, 1], logits symmetric around 0 to their largest magnitude."""
    if kind == "tanh":
        return [-1.0, 1.0]
    if kind == "probability":
        return [0.0, 1.0]
    values = [predictions.scores] + (
        [] if predictions.patch_scores is None else [predictions.patch_scores]
    )
    bound = float(max(np.abs(v).max() for v in values if len(v))) or 1.0
    return [-bound, bound]


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


def _group_array(bags: Bags, groups: Mapping[str, int]) -> np.ndarray:
    missing = [p for p in bags.patient_ids if p not in groups]
    if missing:
        raise ClassifyError(f"{len(missing)} patients have no group, e.g. {missing[0]!r}")
    return np.array([groups[p] for p in bags.patient_ids], dtype=np.int64)


def fresh(estimator, seed: int):
    """An unfitted copy of ``estimator`` (scikit-learn's ``clone``) with ``seed`` in its config."""
    from sklearn.base import clone

    model = clone(estimator)
    return model.set_params(config=replace(model.settings, seed=seed))


def _fit(estimator, bags: Bags, y, fold: Fold, seed: int):
    if len(np.unique(y[fold.train])) != 2:
        raise ClassifyError(
            f"fold {fold.index}: the training groups hold one class only; "
            "too few patients of the other class for this pool and split"
        )
    return fresh(estimator, seed).fit(
        bags.subset(fold.train), y[fold.train], eval_set=(bags.subset(fold.es), y[fold.es])
    )


def score_bags(model, bags: Bags) -> tuple[np.ndarray, np.ndarray | None]:
    """Patient scores and patch scores; where a method has patch scores, the patient score
    is their mean (what its decision_function computes), so patches are scored only once."""
    patch = model.patch_scores(bags)
    if patch is None:
        return model.decision_function(bags), None
    return bags.patient_means(patch), patch


def patch_attention(model, bags: Bags) -> np.ndarray | None:
    """(N,) attention per patch for a method that has it (``patch_attention``), else None."""
    attend = getattr(model, "patch_attention", None)
    return None if attend is None else attend(bags)


def _metrics(y, scores, n_boot: int, seed: int) -> tuple[dict, dict]:
    return summarize(y, scores, n_boot=n_boot, seed=seed), roc_points(y, scores)


def _fit_info(model) -> dict:
    return {
        "es_score": getattr(model, "es_score_", None),
        "best_epoch": getattr(model, "best_epoch_", getattr(model, "best_iteration_", None)),
    }


def _groups_of(bags: Bags, y, protocol: CVProtocol) -> np.ndarray:
    """Each patient's group: the protocol's fixed groups, or drawn from these bags' patients."""
    groups = protocol.groups
    if groups is None:
        p = protocol
        groups = assign_groups(bags.patient_ids, y, p.split, bags.sites, p.folds, p.seed)
    return _group_array(bags, groups)


def _fold_row(fold: Fold, y_test: np.ndarray, test_scores: np.ndarray, model) -> dict:
    return {
        "fold": fold.index,
        "n_train": len(fold.train),
        "n_es": len(fold.es),
        "n_test": len(fold.test),
        "n_test_pos": int(y_test.sum()),
        "auc": auc(y_test, test_scores) if len(np.unique(y_test)) == 2 else None,
        **_fit_info(model),
    }


def cross_validate(
    bags: Bags,
    y,
    estimator,
    protocol: CVProtocol = DEFAULT_PROTOCOL,
    progress: bool = True,
    keep_models: bool = False,
) -> ValidationResult:
    """The paper's k-fold protocol; every patient of ``bags`` is tested exactly once.

    Fold k's model is a fresh copy of ``estimator`` seeded ``protocol.seed + k``;
    ``keep_models`` keeps the fitted fold models in the result (to save them).
    """
    y = np.asarray(y)
    g = _groups_of(bags, y, protocol)
    scores = np.full(bags.n_patients, np.nan)
    fold_of = np.full(bags.n_patients, -1, dtype=np.int64)
    patch_parts, fold_rows, models = [], [], []
    classifier: dict = {}
    name = estimator.describe()["method"]
    for fold in tqdm(cv_folds(g), desc=f"{name} folds", file=sys.stderr, disable=not progress):
        model = _fit(estimator, bags, y, fold, protocol.seed + fold.index)
        test = bags.subset(fold.test)
        scores[fold.test], patch = score_bags(model, test)
        fold_of[fold.test] = fold.index
        if patch is not None:
            patch_parts.append((test, fold.index, patch, patch_attention(model, test)))
        classifier = classifier or model.describe()
        if keep_models:
            models.append(model)
        fold_rows.append(_fold_row(fold, y[fold.test], scores[fold.test], model))
    metrics, roc = _metrics(y, scores, protocol.n_boot, protocol.seed)
    fold_aucs = [f["auc"] for f in fold_rows if f["auc"] is not None]
    metrics["mean_fold_auc"] = float(np.mean(fold_aucs)) if fold_aucs else None
    metrics["sd_fold_auc"] = float(np.std(fold_aucs)) if fold_aucs else None
    predictions = Predictions(
        bags.patient_ids, y, scores, fold_of, bags.n_patches(), *_patch_columns(patch_parts)
    )
    return ValidationResult(
        "cv",
        classifier,
        predictions,
        metrics,
        roc,
        fold_rows,
        {p: int(v) for p, v in zip(bags.patient_ids, g)},
        models,
    )


def _patch_columns(parts) -> tuple:
    """(patch ids, slide ids, folds, scores, attention) from (bags, fold, scores, attention)."""
    if not parts:
        return None, None, None, None, None
    ids = [
        t.patch_ids if t.patch_ids is not None else np.array([""] * len(s)) for t, _, s, _ in parts
    ]
    slides = [
        t.slide_ids if t.slide_ids is not None else np.array([""] * len(s)) for t, _, s, _ in parts
    ]
    folds = [np.full(len(s), k) for _, k, s, _ in parts]
    attention = [a for *_, a in parts]
    return (
        np.concatenate(ids),
        np.concatenate(slides),
        np.concatenate(folds),
        np.concatenate([s for _, _, s, _ in parts]).astype(np.float32),
        None if any(a is None for a in attention) else np.concatenate(attention).astype(np.float32),
    )


def fit_final(
    estimator, bags: Bags, y, protocol: CVProtocol = DEFAULT_PROTOCOL
) -> tuple[Any, dict]:
    """The final model: trained on the whole cohort, all groups but group 0, which early-stops
    it. Returns the fitted model and its row for the per-fold table."""
    y = np.asarray(y)
    fold = final_fold(_groups_of(bags, y, protocol))
    model = _fit(estimator, bags, y, fold, protocol.seed)
    return model, {
        "fold": None,
        "n_train": len(fold.train),
        "n_es": len(fold.es),
        **_fit_info(model),
    }


def score(
    model, bags: Bags, y=None, n_boot: int = 2000, seed: int = 0, kind: str = "predict"
) -> ValidationResult:
    """A fitted model's scores on ``bags``; AUC, CI and ROC over the labelled patients
    (``y``: 0, 1 or NO_LABEL per patient; None: none labelled) when both classes are there."""
    y = np.full(bags.n_patients, NO_LABEL, np.int8) if y is None else np.asarray(y)
    scores, patch = score_bags(model, bags)
    labelled = y != NO_LABEL
    metrics: dict = {}
    roc: dict = {}
    if len(np.unique(y[labelled])) == 2:
        metrics, roc = _metrics(y[labelled], scores[labelled], n_boot, seed)
    predictions = Predictions(
        bags.patient_ids,
        y,
        scores,
        np.full(bags.n_patients, -1),
        bags.n_patches(),
        *_patch_columns([] if patch is None else [(bags, -1, patch, patch_attention(model, bags))]),
    )
    return ValidationResult(kind, model.describe(), predictions, metrics, roc, models=[model])


def external_validate(
    train_bags: Bags,
    train_y,
    test_bags: Bags,
    test_y,
    estimator,
    protocol: CVProtocol = DEFAULT_PROTOCOL,
    test_images=None,
) -> ValidationResult:
    """Train the final model on the whole training cohort, then test once on the other."""
    overlap = set(train_bags.patient_ids) & set(test_bags.patient_ids)
    if overlap:
        raise ClassifyError(
            f"{len(overlap)} patients are in both the training and the external cohort, e.g. "
            f"{sorted(overlap)[0]!r}; an external test must be disjoint"
        )
    model, info = fit_final(estimator, train_bags, train_y, protocol)
    if test_images is not None:
        model.images = test_images
    return external_score(model, info, test_bags, test_y, protocol)


def external_score(model, info: dict, test_bags: Bags, test_y, protocol: CVProtocol):
    """The external-validation result of a final model (``fit_final``) on a labelled cohort."""
    test_y = np.asarray(test_y)
    result = score(model, test_bags, test_y, protocol.n_boot, protocol.seed, kind="external")
    if not result.metrics:
        raise ClassifyError(
            f"the external cohort's {test_bags.n_patients} patients are not of both classes"
        )
    result.folds = [
        {
            **info,
            "n_test": test_bags.n_patients,
            "n_test_pos": int(test_y.sum()),
            "auc": result.metrics["auc"],
        }
    ]
    return result


@dataclass
class Entry:
    """One row of a comparison: its display name, bags and labels, and the estimator to run.

    ``tags`` (e.g. method, encoder, pool) are copied into the row as data.
    """

    name: str
    bags: Bags
    y: np.ndarray
    estimator: object
    test_bags: Bags | None = None  # given: external validation on these
    test_y: np.ndarray | None = None
    test_images: object = None
    tags: dict = field(default_factory=dict)


def validate_entries(
    entries: list[Entry], protocol: CVProtocol = DEFAULT_PROTOCOL, progress: bool = True
) -> dict:
    """Run every entry on the same groups; DeLong p-values pairwise on shared patients.

    Without ``protocol.groups`` they come from the union of the entries' patients (a pool can
    drop patients that have no patch of its tissue types), so every entry sees each patient in
    the same role.
    """
    if not entries:
        raise ClassifyError("nothing to compare")
    if protocol.groups is None:
        protocol = protocol.with_groups(_union_groups(entries, protocol))
    results = []
    for e in tqdm(entries, desc="compare", file=sys.stderr, disable=not progress):
        if e.test_bags is None:
            result = cross_validate(e.bags, e.y, e.estimator, protocol, progress=False)
        else:
            result = external_validate(
                e.bags, e.y, e.test_bags, e.test_y, e.estimator, protocol, e.test_images
            )
        results.append(result)
    pvalues = [[_paired_p(a, b) for b in results] for a in results]
    return {
        "rows": [_compare_row(e, r, p) for e, r, p in zip(entries, results, pvalues)],
        "pairwise_p": pvalues,
        "names": [e.name for e in entries],
        "results": results,
        "groups": protocol.groups,
    }


def _compare_row(entry: Entry, result: ValidationResult, pvalues: list) -> dict:
    m = result.metrics
    return {
        "name": entry.name,
        **entry.tags,
        "n": m["n"],
        "auc": m["auc"],
        "ci_low": m["ci_low"],
        "ci_high": m["ci_high"],
        "mean_fold_auc": m.get("mean_fold_auc"),
        "p_vs_first": pvalues[0],
    }


def _union_groups(entries: list[Entry], protocol: CVProtocol) -> dict:
    label_of, site_of = {}, {}
    for e in entries:
        for i, p in enumerate(e.bags.patient_ids):
            label_of[p] = int(e.y[i])
            if e.bags.sites is not None:
                site_of[p] = e.bags.sites[i]
    patients = np.array(sorted(label_of))
    split = protocol.split
    sites = np.array([site_of.get(p) for p in patients], dtype=object) if split == "site" else None
    labels = [label_of[p] for p in patients]
    return assign_groups(patients, labels, split, sites, protocol.folds, protocol.seed)


def _paired_p(a: ValidationResult, b: ValidationResult) -> float | None:
    if a is b:
        return None
    pa, pb = a.predictions, b.predictions
    n, test = shared_delong(pa.patient_ids, pa.labels, pa.scores, pb.patient_ids, pb.scores)
    return None if test is None else test["p"]


def shared_delong(ids_a, labels_a, scores_a, ids_b, scores_b) -> tuple[int, dict | None]:
    """(patients shared, DeLong's test) of two scorings on the labelled patients both scored;
    the test (``delong_test``: auc_a, auc_b, diff, z, p) is None unless both classes are there."""
    index_b = {p: i for i, p in enumerate(ids_b)}
    labels_a = np.asarray(labels_a)
    shared = [
        (i, index_b[p]) for i, p in enumerate(ids_a) if p in index_b and labels_a[i] != NO_LABEL
    ]
    if not shared:
        return 0, None
    ia, ib = np.array(shared).T
    y = labels_a[ia]
    if len(np.unique(y)) != 2:
        return len(shared), None
    return len(shared), delong_test(y, np.asarray(scores_a)[ia], np.asarray(scores_b)[ib])
