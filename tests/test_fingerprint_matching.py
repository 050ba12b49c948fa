"""The matching game on constructed fingerprints whose right answer is known."""

import numpy as np
import pytest

from fpstore.errors import TrainingError
from fpstore.fingerprint.matching import match_halves


def _fp(rows):
    return np.array(rows, dtype=float)


def test_perfect_matching_and_chance():
    rng = np.random.default_rng(0)
    fp = rng.normal(size=(6, 16))
    keys = [f"c{i}" for i in range(6)]
    patients = ["p0", "p0", "p1", "p2", "p3", "p4"]
    noisy = fp + rng.normal(scale=0.01, size=fp.shape)
    result = match_halves(fp, keys, patients, noisy[::-1], keys[::-1], patients[::-1])
    assert result.core_accuracy == 1.0 and result.core_correct == 6 and not result.misses
    assert result.chance_core == pytest.approx(1 / 6)
    assert result.n_patients == 5 and result.patient_accuracy == 1.0
    assert result.chance_patient == pytest.approx(1 / 5)


def test_scale_does_not_matter_and_misses_are_listed():
    left = _fp([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # c1's right half looks like c2's left half, and the other way round.
    right = _fp([[5, 0, 0], [0, 0, 2], [0, 3, 0]])
    result = match_halves(
        left, ["c0", "c1", "c2"], ["a", "b", "c"], right, ["c0", "c1", "c2"], ["a", "b", "c"]
    )
    assert result.core_correct == 1 and result.core_accuracy == pytest.approx(1 / 3, abs=1e-4)
    assert [(m["left"], m["matched"]) for m in result.misses] == [("c1", "c2"), ("c2", "c1")]
    assert all(m["rank_of_true"] == 2 and not m["same_patient"] for m in result.misses)
    assert result.median_rank == 2 and result.top5_accuracy == 1.0  # ranks 1, 2, 2


def test_median_rank_and_top5_on_a_known_ordering():
    n = 10
    left, right = np.eye(n), np.eye(n)
    right[0] = -left[0]  # c0's right half is the farthest of all: rank 10
    right[3, 9] = 0.5  # c3's right half drifts away from c3 (cosine 0.89) ...
    right[4, 3] = 10.0  # ... and c4's points almost at c3 (0.995): c3's true half ranks 2nd
    keys, patients = [f"c{i}" for i in range(n)], list("abcdefghij")
    result = match_halves(left, keys, patients, right, keys, patients)
    assert result.core_correct == 8
    assert sorted((m["left"], m["rank_of_true"]) for m in result.misses) == [("c0", 10), ("c3", 2)]
    assert result.median_rank == 1.0 and result.top5_accuracy == pytest.approx(9 / 10)


def test_ties_earn_the_expected_credit_of_a_random_choice():
    left = _fp([[1, 0], [0, 1]])
    # Both right halves are equally far from c0's left half: a coin flip, credit 1/2.
    right = _fp([[1, 1], [1, 1.0000000001]])
    result = match_halves(left, ["c0", "c1"], ["a", "b"], right, ["c0", "c1"], ["a", "b"])
    assert result.ties == 2
    assert result.core_correct == pytest.approx(1.0)  # 1/2 + 1/2
    assert {m["credit"] for m in result.misses} == {0.5}


def test_patient_with_two_cores_pooled_accuracy():
    # Patient P has cores c0 and c1 that look alike; matching at the core level swaps them,
    # pooling their fingerprints per patient finds the patient.
    left = _fp([[1, 0.1, 0], [1, -0.1, 0], [0, 0, 1]])
    right = _fp([[1, -0.1, 0], [1, 0.1, 0], [0, 0, 1]])
    keys = ["c0", "c1", "c2"]
    patients = ["P", "P", "Q"]
    result = match_halves(left, keys, patients, right, keys, patients)
    assert result.core_correct == 1  # only c2
    assert all(m["same_patient"] for m in result.misses)
    assert result.n_patients == 2 and result.patient_accuracy == 1.0


def test_left_halves_without_a_right_half_are_not_counted():
    left = _fp([[1, 0], [0, 1]])
    right = _fp([[1, 0]])
    result = match_halves(left, ["c0", "c9"], ["a", "z"], right, ["c0"], ["a"])
    assert result.n_cores == 1 and result.unmatchable == 1 and result.core_accuracy == 1.0
    with pytest.raises(TrainingError, match="both sides"):
        match_halves(left[:0], [], [], right, ["c0"], ["a"])
