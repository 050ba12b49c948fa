import numpy as np
import pytest

from fpstore.classify.bags import Bags
from fpstore.classify.methods import create_classifier
from fpstore.classify.permutation import permutation_test, shuffle_within
from fpstore.classify.protocol import cross_validate
from fpstore.classify.settings import CVProtocol
from fpstore.errors import ClassifyError
from tests._classify_bags import make_bags

LOGREG = create_classifier("logreg")


def test_shuffle_within_keeps_each_sites_labels():
    rng = np.random.default_rng(0)
    y = np.array([1, 1, 0, 0, 0, 1, 1, 1, 0, 1])
    sites = np.array(list("AAAAABBBBB"))
    shuffled = shuffle_within(y, sites, rng)
    for site in "AB":
        assert sorted(shuffled[sites == site]) == sorted(y[sites == site])
    assert sorted(shuffle_within(y, None, rng)) == sorted(y)
    again = shuffle_within(y, sites, np.random.default_rng(0))
    assert (again == shuffled).all()


def site_confounded_bags(n_patients=120, n_sites=4, seed=0):
    """No morphology signal: the label's prevalence differs by site and features show the site."""
    rng = np.random.default_rng(seed)
    site_of = rng.integers(0, n_sites, n_patients)
    y = (rng.random(n_patients) < np.where(site_of < n_sites // 2, 0.85, 0.25)).astype(np.int8)
    n_patches, dim = 6, 8
    index = np.repeat(np.arange(n_patients), n_patches)
    x = rng.normal(size=(len(index), dim)).astype(np.float32)
    x[:, 0] += 3.0 * site_of[index]
    ids = np.array([f"P{i:04d}" for i in range(n_patients)])
    return Bags(
        patient_ids=ids,
        features=x,
        bag_index=index,
        patch_ids=np.array([f"{p}/{k}" for p, k in zip(ids[index], range(len(index)))]),
        slide_ids=ids[index],
        sites=np.array([f"S{s}" for s in site_of]),
    ), y


def test_within_site_shuffles_do_not_credit_a_model_for_recognising_the_site():
    bags, y = site_confounded_bags()
    cv = cross_validate(bags, y, LOGREG, CVProtocol(n_boot=200), progress=False)
    assert cv.metrics["ci_low"] > 0.5  # the bootstrap CI alone is fooled by the site
    perm = permutation_test(bags, y, cv.metrics["auc"], LOGREG, CVProtocol(permutations=19), False)
    assert perm["shuffled_within"] == "site"
    assert perm["null_mean"] > 0.6  # the null keeps each site's prevalence
    assert perm["p_value"] > 0.05


def test_a_planted_signal_beats_every_shuffle():
    bags, y = make_bags(n_patients=100, n_patches=8, dim=8, seed=1)
    cv = cross_validate(bags, y, LOGREG, CVProtocol(n_boot=200), progress=False)
    perm = permutation_test(bags, y, cv.metrics["auc"], LOGREG, CVProtocol(permutations=19), False)
    assert perm["shuffled_within"] == "cohort"  # make_bags gives no sites here
    assert perm["n_permutations"] == 19 and len(perm["null_aucs"]) == 19
    assert perm["p_value"] == pytest.approx(1 / 20)
    assert perm["null_q025"] < 0.5 < perm["null_q975"]


def test_permutations_must_be_positive():
    bags, y = make_bags(n_patients=30, n_patches=4, dim=4)
    with pytest.raises(ClassifyError, match="at least 1"):
        permutation_test(bags, y, 0.5, LOGREG, CVProtocol(permutations=0), False)
