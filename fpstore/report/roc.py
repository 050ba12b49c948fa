"""ROC curves with bootstrap confidence bands (the paper's Fig. 5b).

AUC, its CI and the curve's points come from ``fpstore.classify.metrics`` so that the
figure and the ``classify``/``compare`` tables agree to the digit. The band is the
pointwise percentile interval of the true positive rate at fixed false positive rates
over the same kind of patient bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fpstore.classify.metrics import auc, bootstrap_ci, roc_points
from fpstore.config import check_range

FPR_GRID = np.linspace(0.0, 1.0, 101)


@dataclass
class RocCurve:
    label: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    ci: tuple[float, float]
    band: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # (fpr grid, tpr low, tpr high)
    n_pos: int
    n_neg: int

    def legend(self) -> str:
        return (
            f"{self.label}: AUC {self.auc:.3f} ({self.ci[0]:.3f}-{self.ci[1]:.3f}), "
            f"n={self.n_pos}+/{self.n_neg}-"
        )


def tpr_at(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray = FPR_GRID) -> np.ndarray:
    """The curve's highest TPR at each FPR of ``grid`` (points sorted by FPR, as from roc_points)."""
    return tpr[np.searchsorted(fpr, grid, side="right") - 1]


def roc_band(
    y, scores, n_boot: int = 1000, seed: int = 0, level: float = 0.95, grid: np.ndarray = FPR_GRID
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise percentile band of the TPR over patient bootstrap resamples."""
    check_range("roc_band", "n_boot", n_boot, 10)
    check_range("roc_band", "level", level, 0.5, 0.999)
    y = np.asarray(y).astype(bool)
    s = np.asarray(scores, np.float64)
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        yy = y[idx]
        if yy.all() or not yy.any():
            continue  # one class only: no ROC curve
        points = roc_points(yy.astype(int), s[idx])
        curves.append(tpr_at(np.asarray(points["fpr"]), np.asarray(points["tpr"]), grid))
    alpha = (1 - level) / 2
    low, high = np.quantile(np.array(curves), [alpha, 1 - alpha], axis=0)
    return grid, low, high


def roc_curve(y, scores, label: str, n_boot: int = 1000, seed: int = 0) -> RocCurve:
    """Points, AUC, bootstrap CI and band of one set of patient scores."""
    y = np.asarray(y).astype(int)
    points = roc_points(y, scores)
    return RocCurve(
        label=label,
        fpr=np.asarray(points["fpr"]),
        tpr=np.asarray(points["tpr"]),
        auc=auc(y, scores),
        ci=bootstrap_ci(y, scores, n_boot=max(n_boot, 200), seed=seed),
        band=roc_band(y, scores, n_boot=n_boot, seed=seed),
        n_pos=int(y.sum()),
        n_neg=int(len(y) - y.sum()),
    )


def plot_roc(
    curves: list[RocCurve], path: Path, title: str = "", size_in: float = 4.5, dpi: int = 100
) -> Path:
    """Curves with shaded bands, the chance diagonal, and AUC (CI) in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size_in, size_in), dpi=dpi)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
    for i, curve in enumerate(curves):
        color = plt.cm.tab10(i % 10)
        if curve.band is not None:
            grid, low, high = curve.band
            ax.fill_between(grid, low, high, color=color, alpha=0.2, step="post", linewidth=0)
        ax.plot(curve.fpr, curve.tpr, color=color, linewidth=2, label=curve.legend())
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_roc_curves(run, n_boot: int = 1000, seed: int = 0) -> list[RocCurve]:
    """One curve per role of a run (cross-validated test patients pooled over folds; external)."""
    table = run.patients
    table = table.filter(table.column("label").is_valid())  # a curve needs labels
    roles = table.column("role").to_numpy(zero_copy_only=False).astype(str)
    labels = table.column("label").to_numpy()
    scores = table.column("score").to_numpy().astype(np.float64)
    curves = []
    for role in sorted(set(roles)):
        keep = roles == role
        y = (labels[keep] > 0).astype(int)
        if y.min() == y.max():
            continue  # one class only: no curve to draw
        cohort = ",".join(sorted(set(table.column("cohort").to_numpy(zero_copy_only=False)[keep])))
        curves.append(roc_curve(y, scores[keep], f"{cohort} {role}", n_boot=n_boot, seed=seed))
    return curves
