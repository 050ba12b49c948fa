"""Patient-level metrics: AUC, its bootstrap confidence interval, DeLong's test, ROC points.

AUC uses midranks (the Mann-Whitney statistic), so ties count one half, as in scikit-learn
and pROC. DeLong's covariance uses the fast midrank algorithm of Sun & Xu (2014, IEEE Signal
Processing Letters 21:1389), O(n log n) per score instead of the O(m n) pairwise kernel.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata

from fpstore.errors import ClassifyError


def _check(y, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[-1] != y.shape[0]:
        raise ClassifyError(f"{y.shape[0]} labels but scores of shape {scores.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ClassifyError("labels must be 0/1")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ClassifyError(f"AUC needs both classes; got {n_pos} positive of {len(y)} patients")
    if not np.isfinite(scores).all():
        raise ClassifyError("scores contain NaN or infinity")
    return y.astype(bool), scores


def auc(y, scores) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties 1/2."""
    pos, s = _check(y, scores)
    m, n = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(s)
    return float((ranks[pos].sum() - m * (m + 1) / 2) / (m * n))


def bootstrap_ci(
    y, scores, n_boot: int = 2000, seed: int = 0, level: float = 0.95, chunk: int = 250
) -> tuple[float, float]:
    """Percentile CI of the AUC, resampling patients with replacement.

    Resamples that draw a single class have no AUC and are skipped (they are
    rare unless a class has a handful of patients); the CI uses the rest.
    """
    pos, s = _check(y, scores)
    rng = np.random.default_rng(seed)
    n = len(s)
    aucs = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        yy, ss = pos[idx], s[idx]
        m = yy.sum(axis=1)
        ok = (m > 0) & (m < n)
        ranks = rankdata(ss[ok], axis=1)
        mm = m[ok].astype(np.float64)
        aucs.append(((ranks * yy[ok]).sum(axis=1) - mm * (mm + 1) / 2) / (mm * (n - mm)))
    values = np.concatenate(aucs)
    if len(values) < 0.5 * n_boot:
        raise ClassifyError(
            f"only {len(values)} of {n_boot} bootstrap resamples had both classes; "
            "too few patients of one class for a confidence interval"
        )
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def delong_cov(y, scores) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their DeLong covariance (k, k) for scores (k, n) on the same patients."""
    pos, s = _check(y, np.atleast_2d(scores))
    m, n = int(pos.sum()), int((~pos).sum())
    x, z = s[:, pos], s[:, ~pos]
    tx = rankdata(x, axis=1)
    tz = rankdata(z, axis=1)
    t = rankdata(s, axis=1)
    tx_all, tz_all = t[:, pos], t[:, ~pos]
    aucs = (tx_all.sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tx_all - tx) / n  # per positive: share of negatives it beats
    v01 = 1.0 - (tz_all - tz) / m  # per negative: share of positives that beat it
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(y, scores_a, scores_b) -> dict:
    """DeLong's two-sided test that two scores on the same patients have equal AUC."""
    aucs, cov = delong_cov(y, np.vstack([scores_a, scores_b]))
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    if var <= 1e-15:  # identical rankings: no evidence of a difference
        return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "z": 0.0, "p": 1.0}
    z = diff / np.sqrt(var)
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "z": float(z),
        "p": float(2 * norm.sf(abs(z))),
    }


def roc_points(y, scores) -> dict:
    """ROC curve points (fpr, tpr, threshold), one per distinct score, from (0, 0) to (1, 1)."""
    pos, s = _check(y, scores)
    order = np.argsort(-s, kind="mergesort")
    s, pos = s[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(pos)[last]
    fp = (last + 1) - tp
    return {
        "fpr": np.r_[0.0, fp / (~pos).sum()].tolist(),
        "tpr": np.r_[0.0, tp / pos.sum()].tolist(),
        "threshold": np.r_[np.inf, s[last]].tolist(),
    }


def summarize(y, scores, n_boot: int = 2000, seed: int = 0) -> dict:
    """AUC with its 95% bootstrap CI and the class counts."""
    low, high = bootstrap_ci(y, scores, n_boot=n_boot, seed=seed)
    y = np.asarray(y)
    return {
        "auc": auc(y, scores),
        "ci_low": low,
        "ci_high": high,
        "n": int(len(y)),
        "n_pos": int(y.sum()),
        "n_neg": int(len(y) - y.sum()),
    }
