"""AUC, its bootstrap CI, DeLong's test and ROC points, against scikit-learn and pROC."""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from fpstore.classify.metrics import (
    auc,
    bootstrap_ci,
    delong_cov,
    delong_test,
    roc_points,
    summarize,
)
from fpstore.errors import ClassifyError

# pROC's aSAH data set (Turck et al. 2010, 113 patients with aneurysmal subarachnoid
# haemorrhage, shipped with the R package pROC): outcome Poor = 1 (41 patients), s100b and
# wfns (a 5-level ordinal score, so heavy ties). pROC's documentation (?roc.test) prints for
#   roc.test(roc(aSAH$outcome, aSAH$s100b), roc(aSAH$outcome, aSAH$wfns))
#   "DeLong's test for two correlated ROC curves: Z = -2.209, p-value = 0.02718;
#    AUC of roc1 0.7313686, AUC of roc2 0.8236789".
ASAH_POOR = [
    0,
    0,
    0,
    0,
    1,
    1,
    0,
    1,
    0,
    0,
    1,
    0,
    1,
    1,
    0,
    0,
    1,
    0,
    1,
    1,
    1,
    0,
    1,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    1,
    0,
    0,
    1,
    1,
    0,
    1,
    1,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    1,
    1,
    0,
    0,
    0,
    1,
    0,
    0,
    0,
    1,
    0,
    1,
    0,
    0,
    1,
    1,
    1,
    0,
    1,
    1,
    0,
    1,
    1,
    1,
    1,
    0,
    0,
    0,
    1,
    1,
    0,
    1,
    0,
    0,
    0,
    0,
    0,
    0,
    1,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    1,
    1,
    1,
    1,
    1,
    1,
    0,
    0,
    0,
    1,
    0,
    0,
    0,
]
ASAH_S100B = [
    0.13,
    0.14,
    0.1,
    0.04,
    0.13,
    0.1,
    0.47,
    0.16,
    0.18,
    0.1,
    0.12,
    0.1,
    0.44,
    0.71,
    0.04,
    0.08,
    0.49,
    0.04,
    0.07,
    0.33,
    0.09,
    0.09,
    0.07,
    0.11,
    0.07,
    0.17,
    0.07,
    0.11,
    0.13,
    0.19,
    0.05,
    0.16,
    0.41,
    0.14,
    0.34,
    0.35,
    0.48,
    0.09,
    0.96,
    0.25,
    0.5,
    0.46,
    0.16,
    0.07,
    0.43,
    0.45,
    0.11,
    0.08,
    0.09,
    0.86,
    0.52,
    0.08,
    0.06,
    0.13,
    2.07,
    0.1,
    0.14,
    0.15,
    0.07,
    0.06,
    0.77,
    0.05,
    0.09,
    0.3,
    0.03,
    0.09,
    0.04,
    0.23,
    0.7,
    0.09,
    0.27,
    0.71,
    0.08,
    0.26,
    0.08,
    0.16,
    0.09,
    0.13,
    0.1,
    0.08,
    0.11,
    0.33,
    0.11,
    0.28,
    0.07,
    0.1,
    0.32,
    0.22,
    0.07,
    0.05,
    0.24,
    0.38,
    0.1,
    0.15,
    0.08,
    0.14,
    0.1,
    0.07,
    0.04,
    0.19,
    0.56,
    0.14,
    0.58,
    0.32,
    0.82,
    0.74,
    0.15,
    0.47,
    0.17,
    0.44,
    0.15,
    0.5,
    0.48,
]
ASAH_WFNS = [
    1,
    1,
    1,
    1,
    3,
    2,
    5,
    4,
    1,
    2,
    5,
    2,
    5,
    5,
    1,
    2,
    5,
    2,
    2,
    5,
    2,
    1,
    1,
    1,
    1,
    2,
    1,
    2,
    1,
    1,
    3,
    4,
    2,
    1,
    4,
    5,
    4,
    1,
    4,
    2,
    5,
    5,
    1,
    1,
    2,
    4,
    1,
    1,
    2,
    5,
    5,
    2,
    1,
    2,
    5,
    1,
    2,
    2,
    2,
    1,
    5,
    1,
    1,
    2,
    5,
    2,
    1,
    4,
    5,
    2,
    4,
    4,
    1,
    4,
    1,
    2,
    1,
    4,
    2,
    1,
    2,
    3,
    2,
    4,
    2,
    1,
    4,
    5,
    1,
    1,
    5,
    4,
    2,
    2,
    1,
    1,
    1,
    3,
    1,
    2,
    5,
    2,
    2,
    5,
    5,
    5,
    2,
    4,
    4,
    5,
    1,
    1,
    1,
]


def _scores(seed, n=150, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    s = y * 0.8 + rng.normal(size=n)
    return y, (np.round(s, 1) if ties else s)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_auc_equals_scikit_learn(seed, ties):
    y, s = _scores(seed, ties=ties)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_hand_example():
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 0.35 beats one of two, 0.8 both.
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(3 / 4)
    # A tie counts one half.
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)


def test_auc_refuses_one_class_and_nan():
    with pytest.raises(ClassifyError, match="both classes"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ClassifyError, match="NaN"):
        auc([0, 1], [0.1, np.nan])


def test_bootstrap_ci_matches_a_plain_resampling_loop_with_scikit_learn():
    y, s = _scores(3, n=60)
    low, high = bootstrap_ci(y, s, n_boot=400, seed=11)
    # The same draws, one at a time, scored by scikit-learn.
    rng = np.random.default_rng(11)
    values = []
    for _ in range(400):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(y):
            values.append(roc_auc_score(y[idx], s[idx]))
    ref = np.quantile(values, [0.025, 0.975])
    assert (low, high) == pytest.approx(tuple(ref), abs=1e-12)


def test_bootstrap_ci_brackets_the_auc_is_seeded_and_narrows_with_more_patients():
    y, s = _scores(4, n=80)
    low, high = bootstrap_ci(y, s, seed=0)
    assert low < auc(y, s) < high
    assert bootstrap_ci(y, s, seed=0) == (low, high)
    assert bootstrap_ci(y, s, seed=1) != (low, high)
    y_big, s_big = _scores(4, n=1000)
    low_b, high_b = bootstrap_ci(y_big, s_big, seed=0)
    assert high_b - low_b < (high - low) / 2


def test_uninformative_scores_have_a_ci_containing_one_half():
    rng = np.random.default_rng(5)
    y = (rng.random(200) < 0.5).astype(int)
    summary = summarize(y, rng.normal(size=200))
    assert summary["ci_low"] < 0.5 < summary["ci_high"]
    assert (summary["n"], summary["n_pos"] + summary["n_neg"]) == (200, 200)


def test_delong_reproduces_the_proc_documentation_example():
    y = np.array(ASAH_POOR)
    assert (len(y), y.sum()) == (113, 41)
    result = delong_test(y, ASAH_S100B, ASAH_WFNS)
    assert result["auc_a"] == pytest.approx(0.7313686, abs=5e-8)
    assert result["auc_b"] == pytest.approx(0.8236789, abs=5e-8)
    assert result["z"] == pytest.approx(-2.209, abs=5e-4)
    assert result["p"] == pytest.approx(0.02718, abs=5e-6)


def _brute_force_delong(y, scores):
    """DeLong (1988) from the pairwise kernel psi(x, z) = 1 if x > z, 1/2 if equal: O(m n)."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    return v10.mean(axis=1), np.cov(v10) / pos.shape[1] + np.cov(v01) / neg.shape[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_delong_equals_the_pairwise_definition_with_ties(seed):
    y, a = _scores(seed, n=90, ties=True)
    b = np.round(a + np.random.default_rng(seed + 9).normal(size=90), 0)
    aucs, cov = delong_cov(y, np.vstack([a, b]))
    ref_aucs, ref_cov = _brute_force_delong(y, np.vstack([a, b]))
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-9, atol=1e-15)
    z = (aucs[0] - aucs[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert delong_test(y, a, b)["p"] == pytest.approx(2 * norm.sf(abs(z)))


def test_delong_same_scores_is_no_evidence_of_a_difference():
    y, s = _scores(2)
    assert delong_test(y, s, s * 3 + 1)["p"] == 1.0


def test_roc_points_match_scikit_learn():
    y, s = _scores(6, ties=True)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    points = roc_points(y, s)
    np.testing.assert_allclose(points["fpr"], fpr)
    np.testing.assert_allclose(points["tpr"], tpr)
    assert points["fpr"][0] == 0 and points["tpr"][-1] == 1
    assert np.trapezoid(points["tpr"], points["fpr"]) == pytest.approx(auc(y, s))
