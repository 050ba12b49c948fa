"""The gated-attention MIL head (abmil): learning, attention, saved state, runs and heatmaps."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fpstore.classify.bags import Bags
from fpstore.classify.methods import compare_methods, create_classifier
from fpstore.classify.protocol import cross_validate

FAST = {"max_epochs": 30, "patience": 6}


def _sparse_witness_bags(n_patients=160, n_patches=20, dim=16, seed=0):
    """Positive patients hold 2 witness patches (feature 0 + 3) among 20; negatives none:
    the setting attention is for, where the mean of all patches dilutes the signal."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n_patients) < 0.5).astype(np.int8)
    index = np.repeat(np.arange(n_patients), n_patches)
    x = rng.normal(size=(len(index), dim)).astype(np.float32)
    witness = (np.tile(np.arange(n_patches), n_patients) < 2) & (y[index] == 1)
    x[witness, 0] += 3
    ids = [f"P{i:03d}" for i in range(n_patients)]
    patch_ids = [f"S{i // n_patches:03d}/{224 * (i % n_patches)}_0_224" for i in range(len(index))]
    return Bags(ids, x, index, patch_ids=patch_ids), y, witness


def test_abmil_is_registered_and_compared_by_default_beside_the_paper_head():
    assert {"mil", "abmil"} <= set(compare_methods())


def test_attention_finds_the_witness_patches():
    bags, y, witness = _sparse_witness_bags()
    train, test = np.arange(120), np.arange(120, 160)
    model = create_classifier("abmil").fit(
        bags.subset(train[:90]), y[:90], eval_set=(bags.subset(train[90:]), y[90:120])
    )
    held = bags.subset(test)
    attention = model.patch_attention(held)
    np.testing.assert_allclose(np.bincount(held.bag_index, attention), 1.0, atol=1e-5)
    w = witness[120 * 20 :]
    positive = y[held.bag_index] == 1
    assert attention[w].mean() > 3 * attention[positive & ~w].mean()
    # The patch scores' mean per patient is the patient's logit (the harness relies on it).
    means = np.bincount(held.bag_index, model.patch_scores(held)) / 20
    np.testing.assert_allclose(means, model.decision_function(held), atol=1e-5)


@pytest.mark.slow
def test_abmil_beats_the_mean_head_under_cv_where_few_patches_carry_the_signal():
    bags, y, _ = _sparse_witness_bags()
    cv = {
        m: cross_validate(bags, y, create_classifier(m), n_boot=200, progress=False)
        for m in ("mil", "abmil")
    }
    assert cv["abmil"].metrics["auc"] > 0.75
    assert cv["abmil"].metrics["auc"] > cv["mil"].metrics["auc"] + 0.1
    assert cv["abmil"].predictions.patch_attention.shape == (len(bags.bag_index),)


def test_saved_state_rebuilds_the_same_scores_and_wrong_sizes_are_refused():
    from fpstore.errors import ClassifyError

    bags, y, _ = _sparse_witness_bags(n_patients=60, seed=1)
    model = create_classifier("abmil", **FAST).fit(bags, y)
    state = model.get_state()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    again = create_classifier("abmil", **FAST).set_state(state)
    np.testing.assert_array_equal(again.decision_function(bags), model.decision_function(bags))
    with pytest.raises(ClassifyError, match="do not fit the head's config"):
        create_classifier("abmil", hidden=8).set_state(state)


def test_classify_abmil_saves_attention_and_predict_and_heatmap_use_it(tmp_path):
    from fpstore.classify.pipeline import ClassifyConfig, classify
    from fpstore.classify.predict import PredictConfig, predict
    from fpstore.report.heatmap import slide_heatmap
    from fpstore.store import open as open_store
    from tests._classify_store import add_cohort

    slide = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"
    store = tmp_path / "store"
    add_cohort(store, "train", 60, seed=1, tissue=True, slide_path=str(slide), slide_y=1344)
    add_cohort(store, "ext", 30, seed=2, tissue=False, slide_path=str(slide), slide_y=1344)
    doc = classify(
        store,
        ClassifyConfig(
            marker="ER",
            cohort="train",
            method="abmil",
            external="ext",
            n_boot=200,
            classifier=FAST,
        ),
        progress=False,
    )
    folder = Path(doc["run_path"])
    attention = pq.read_table(folder / "attention.parquet")
    patches = pq.read_table(folder / "patches.parquet")
    assert attention.column("patch_id").to_pylist() == patches.column("patch_id").to_pylist()
    assert set(attention.column("cohort").to_pylist()) == {"train", "ext"}
    model_dir = Path(doc["model"]["path"])
    assert sorted(p.name for p in model_dir.iterdir()) == ["README.md", "card.json", "final.npz"]
    assert json.loads((model_dir / "card.json").read_text())["method"] == "abmil"
    with open_store(store) as fs:
        sums = fs.sql(
            "SELECT patch_id[1:position('/' in patch_id) - 1] AS slide, sum(attention) AS a "
            "FROM patch_attention WHERE run_id = ? AND cohort = 'ext' GROUP BY slide",
            [doc["run_id"]],
        ).rows()
    assert len(sums) == 28  # 30 less one unlabelled, one without patches
    assert all(abs(r["a"] - 1) < 1e-4 for r in sums)
    pred = predict(
        store, PredictConfig(model=doc["run_id"], cohort="ext", n_boot=200), progress=False
    )
    assert (Path(pred["run_path"]) / "attention.parquet").is_file()
    assert pred["predict"]["metrics"]["auc"] == pytest.approx(
        doc["external_validation"]["metrics"]["auc"], abs=1e-6
    )
    slide_id = attention.column("slide_id")[0].as_py()
    result = slide_heatmap(store, doc["run_id"], slide_id, tmp_path / "maps", max_px=256)
    assert result.attention_png is not None and result.attention_png.is_file()
