"""The evidence table: pooling per-seed differences, the Markdown it writes."""

import math

import numpy as np
import pytest

from fpstore.errors import ConfigError


def test_pooled_differences_weigh_each_seed_by_its_precision():
    from fpstore.evidence import markdown, pooled

    def row(seed, diff, var_diff):
        return {
            "seed": seed,
            "marker": "ER",
            "method": "mil",
            "fingerprint_setting": "fingerprint-hed",
            "control_setting": "random-resnet34+macenko",
            "n": 150,
            "positives": 100,
            "auc_fingerprint": 0.8 + diff,
            "var_fingerprint": 0.001,
            "auc_control": 0.8,
            "var_control": 0.001,
            "diff": diff,
            "var_diff": var_diff,
            "p": 0.5,
        }

    rows = [row(0, 0.10, 0.001), row(1, -0.02, 0.004), row(2, 0.04, 0.002)]
    (result,) = pooled(rows)
    weights = np.array([1000.0, 250.0, 500.0])
    expected = float((weights * [0.10, -0.02, 0.04]).sum() / weights.sum())
    assert result["diff"]["estimate"] == pytest.approx(expected)
    half_width = 1.959964 * math.sqrt(1 / weights.sum())
    assert result["diff"]["ci_low"] == pytest.approx(expected - half_width, abs=1e-5)
    assert result["fingerprint_behind"] == [1]
    seeds = [
        {"seed": s, "match": {"core_accuracy": 0.5, "patient_accuracy": 0.7, "crop_px": 1400}}
        for s in (0, 1, 2)
    ]
    table = markdown({"rows": rows, "pooled": [result], "seeds": seeds})
    assert "| 1 | ER | mil | plain / macenko | 150 (100) |" in table
    assert "test array (cores cut as 1400 px squares): seed 0: 0.50 of cores" in table
    assert "seeds where the fingerprints trail" in table and "| 1 |" in table.splitlines()[-3]


def test_the_evidence_table_replaces_only_its_section(tmp_path):
    from fpstore.evidence import write_section

    doc = tmp_path / "results.md"
    doc.write_text(
        "# Results\nbefore\n<!-- evidence:start -->\nold\n<!-- evidence:end -->\nafter\n"
    )
    write_section(doc, "| new |\n")
    assert doc.read_text() == (
        "# Results\nbefore\n<!-- evidence:start -->\n| new |\n<!-- evidence:end -->\nafter\n"
    )
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ConfigError, match="evidence:start"):
        write_section(tmp_path / "plain.md", "x")


def test_each_encoder_takes_its_setting_from_the_training_cohort_then_meets_the_other(tmp_path):
    from fpstore.evidence import CONTROL_ENCODER, FINGERPRINT, _chosen_settings, _external
    from tests._classify_store import add_cohort

    ids = {FINGERPRINT: ["fp", "fp+macenko"], CONTROL_ENCODER: ["ctl", "ctl+macenko"]}
    encoders = tuple(i for pair in ids.values() for i in pair)
    add_cohort(tmp_path, "tcga", 60, seed=1, tissue=False, encoders=encoders)
    add_cohort(tmp_path, "external", 40, seed=2, tissue=False, encoders=encoders)
    chosen = _chosen_settings(tmp_path, "ER", ids, folds=3, seed=0)
    assert set(chosen) == {FINGERPRINT, CONTROL_ENCODER}
    for base, (encoder_id, cv_auc) in chosen.items():
        assert encoder_id in ids[base] and 0.0 <= cv_auc <= 1.0
    rows = _external(tmp_path, "ER", chosen, ("mil", "logreg"), folds=3, seed=0)
    assert [r["method"] for r in rows] == ["mil", "logreg"]
    for r in rows:
        assert r["n"] >= 30 and 0 < r["positives"] < r["n"]
        assert r["diff"] == pytest.approx(r["auc_fingerprint"] - r["auc_control"])
        assert r["var_fingerprint"] > 0 and r["var_control"] > 0 and 0 <= r["p"] <= 1
