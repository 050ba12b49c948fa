"""ROC curves with bootstrap bands: the numbers agree with scikit-learn, the figure is drawn."""

import numpy as np
import pytest
from _report_store import build_store
from PIL import Image
from sklearn.metrics import roc_auc_score

from fpstore.report.roc import FPR_GRID, plot_roc, roc_band, roc_curve, run_roc_curves, tpr_at
from fpstore.store.runs import load_run


def test_tpr_at_takes_the_highest_tpr_reached_at_each_fpr():
    fpr = np.array([0.0, 0.0, 0.5, 0.5, 1.0])
    tpr = np.array([0.0, 0.5, 0.5, 1.0, 1.0])
    assert tpr_at(fpr, tpr, np.array([0.0, 0.25, 0.5, 0.75, 1.0])).tolist() == [
        0.5,
        0.5,
        1.0,
        1.0,
        1.0,
    ]


def test_curve_auc_ci_and_band_are_consistent():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(60), np.zeros(40)].astype(int)
    scores = y * 1.0 + rng.normal(size=100)
    curve = roc_curve(y, scores, "demo", n_boot=300, seed=1)
    assert curve.auc == pytest.approx(roc_auc_score(y, scores))
    assert curve.ci[0] < curve.auc < curve.ci[1]
    assert (curve.n_pos, curve.n_neg) == (60, 40)
    grid, low, high = curve.band
    assert (low <= high).all() and low.min() >= 0 and high.max() <= 1
    inside = (low <= tpr_at(curve.fpr, curve.tpr, grid) + 1e-9) & (
        tpr_at(curve.fpr, curve.tpr, grid) <= high + 1e-9
    )
    assert inside.mean() > 0.9
    # A stronger signal gives a narrower band.
    sharp = roc_curve(y, y * 3.0 + rng.normal(size=100), "sharp", n_boot=300, seed=1)
    assert (sharp.band[2] - sharp.band[1]).mean() < (high - low).mean()


def test_band_is_seeded():
    y = np.r_[np.ones(10), np.zeros(10)]
    s = np.linspace(0, 1, 20)[::-1] + np.sin(np.arange(20))
    a = roc_band(y, s, n_boot=50, seed=3)
    b = roc_band(y, s, n_boot=50, seed=3)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2]) and len(a[0]) == len(FPR_GRID)


def test_run_curves_and_figure(tmp_path):
    store = build_store(tmp_path / "store")
    run = load_run(store, "mil-run")
    [curve] = run_roc_curves(run, n_boot=200)
    labels = run.patients.column("label").to_numpy()
    assert curve.label == "toy test"
    assert curve.auc == pytest.approx(
        roc_auc_score(labels, run.patients.column("score").to_numpy())
    )
    path = plot_roc([curve], tmp_path / "roc.png", "ER")
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (450, 450, 3)
    assert image.std() > 20
    blue = np.array([31, 119, 180])  # tab10's first colour: the curve
    assert (np.abs(image.astype(int) - blue).sum(axis=2) < 30).sum() > 200
