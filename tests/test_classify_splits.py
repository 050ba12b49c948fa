"""The CV protocol's split invariants: roles, stratification, sites, determinism."""

import numpy as np
import pytest

from fpstore.classify.protocol import assign_groups
from fpstore.classify.splits import cv_folds, final_fold, site_groups, stratified_groups
from fpstore.errors import ClassifyError


def _labels(n=103, rate=0.3, seed=0):
    return (np.random.default_rng(seed).random(n) < rate).astype(int)


def test_each_fold_gives_a_patient_one_role_and_tests_everyone_once():
    y = _labels()
    folds = cv_folds(stratified_groups(y, 5, seed=1))
    assert len(folds) == 5
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested) == list(range(len(y)))
    for f in folds:
        train, es, test = set(f.train), set(f.es), set(f.test)
        assert not (train & es) and not (train & test) and not (es & test)
        assert len(train | es | test) == len(y)
        assert len(es) and len(test)
    # Three groups train, one early-stops, one tests.
    groups = stratified_groups(y, 5, seed=1)
    for f in folds:
        assert len(np.unique(groups[f.train])) == 3
        assert len(np.unique(groups[f.es])) == len(np.unique(groups[f.test])) == 1


def test_groups_are_stratified_and_balanced():
    y = _labels(n=211, rate=0.17, seed=3)
    groups = stratified_groups(y, 5, seed=0)
    for label in (0, 1):
        per_group = np.bincount(groups[y == label], minlength=5)
        assert per_group.max() - per_group.min() <= 1
    sizes = np.bincount(groups)
    assert sizes.max() - sizes.min() <= 1


def test_groups_are_deterministic_by_seed_and_independent_of_input_order():
    y = _labels()
    assert np.array_equal(stratified_groups(y, 5, 7), stratified_groups(y, 5, 7))
    assert not np.array_equal(stratified_groups(y, 5, 7), stratified_groups(y, 5, 8))
    ids = np.array([f"P{i:03d}" for i in range(len(y))])
    order = np.random.default_rng(0).permutation(len(y))
    assert assign_groups(ids, y, seed=4) == assign_groups(ids[order], y[order], seed=4)


def test_too_few_patients_of_a_class_is_refused_with_the_fix():
    y = np.array([1] * 20 + [0] * 3)
    with pytest.raises(ClassifyError, match="lower --folds"):
        stratified_groups(y, 5)


def test_site_groups_keep_each_site_whole_and_balance_sizes():
    rng = np.random.default_rng(2)
    sites = np.array([f"TSS{s:02d}" for s in rng.integers(0, 12, 300)])
    y = (rng.random(300) < 0.4).astype(int)
    groups = site_groups(y, sites, 5, seed=0)
    for site in np.unique(sites):
        assert len(np.unique(groups[sites == site])) == 1
    for g in range(5):
        assert set(y[groups == g]) == {0, 1}
    sizes = np.bincount(groups)
    assert sizes.max() < 2.5 * sizes.min()
    assert np.array_equal(groups, site_groups(y, sites, 5, seed=0))


def test_site_split_refuses_too_few_sites_or_a_one_class_group():
    y = np.array([0, 1] * 20)
    with pytest.raises(ClassifyError, match="at least 5 sites"):
        site_groups(y, np.array(["A", "B", "C", "D"] * 10), 5)
    # Site E holds all positives: some group always lacks one class.
    sites = np.array(["A", "B", "C", "D", "E", "F"] * 5 + ["E"] * 10)
    y = np.array([0] * 30 + [1] * 10)
    y[sites == "E"] = 1
    with pytest.raises(ClassifyError, match="both classes"):
        site_groups(y, sites, 5)
    with pytest.raises(ClassifyError, match="no site"):
        site_groups(np.array([0, 1] * 5), np.array(["A", ""] * 5), 5)


def test_final_fold_trains_on_all_but_the_early_stopping_group():
    groups = stratified_groups(_labels(), 5, seed=0)
    f = final_fold(groups)
    assert len(f.train) + len(f.es) == len(groups)
    assert not set(f.train) & set(f.es)
    assert len(f.test) == 0
