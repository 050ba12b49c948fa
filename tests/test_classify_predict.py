"""Train once, predict anywhere: saved models, their cards, `predict`, `--patches` sampling."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fpstore.classify.bags import Bags
from fpstore.classify.data import load_dataset
from fpstore.classify.pipeline import ClassifyConfig, classify
from fpstore.classify.predict import PredictConfig, predict
from fpstore.classify.protocol import score_bags
from fpstore.classify.saved_models import card_page, load_model, model_rows
from fpstore.cli.main import cli
from fpstore.errors import ClassifyError, ConfigError, StoreError
from fpstore.report.html import UNLABELLED, build_report, pick_examples
from fpstore.report.roc import run_roc_curves
from fpstore.slides.grid import sample_patches
from fpstore.store.runs import load_run
from tests._classify_bags import make_bags
from tests._classify_store import add_cohort

FAST = {"max_epochs": 20, "patience": 4}
META = {
    "encoder_hash": "h-enc",
    "weights_hash": "w-enc",
    "dim": "8",
    "precision": "fp32",
    "patches": "all",
    "seed": "0",
    "min_tissue": "0.5",
    "patch_um": "112.0",
    "out_px": "224",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store whose MIL run on 'train' (tested on 'ext') saved its final and fold models."""
    store = tmp_path_factory.mktemp("predict-store")
    add_cohort(store, "train", 90, seed=1, tissue=True, metadata=META)
    add_cohort(store, "ext", 40, seed=2, tissue=False, metadata=META)
    add_cohort(store, "bf16", 20, seed=3, tissue=False, metadata={**META, "precision": "bf16"})
    add_cohort(store, "rehashed", 20, seed=3, tissue=False, metadata={**META, "encoder_hash": "x"})
    add_cohort(store, "unlabelled", 20, seed=4, tissue=False, metadata=META, labelled=False)
    cfg = ClassifyConfig(
        marker="ER",
        cohort="train",
        encoder="enc",
        external="ext",
        n_boot=200,
        classifier=FAST,
        save_models="all",
        site_probe=False,
    )
    return store, classify(store, cfg, progress=False)


def _run_scores(store, run_id, role=None):
    table = pq.read_table(store / "runs" / run_id / "patients.parquet").to_pylist()
    return {r["patient_id"]: r for r in table if role is None or r["role"] == role}


def test_classify_saves_the_final_and_fold_models_with_a_card_that_round_trips(trained):
    store, doc = trained
    model_id = doc["model"]["model_id"]
    assert model_id == doc["run_id"]
    folder = store / "models" / "classify" / model_id
    on_disk = json.loads((folder / "card.json").read_text())
    saved = load_model(store, model_id)
    assert saved.card == on_disk
    card = saved.card
    assert card["marker"] == "ER" and card["method"] == "mil" and card["pool"] == "all"
    assert card["models"] == ["final"] + [f"fold-{k}" for k in range(5)]
    assert card["encoder"]["id"] == "enc" and card["encoder"]["hash"] == "h-enc"
    assert card["encoder"]["precision"] == "fp32" and card["encoder"]["stain_norm"] == "none"
    patients = doc["data"]["patients"]  # the run's: labelled, with fingerprints
    assert card["training"]["cohort"] == "train" and card["training"]["patients"] == patients
    sites = card["training"]["sites"]
    assert sum(s["patients"] for s in sites.values()) == patients and len(sites) == 6
    assert card["performance"]["cv"]["auc"] == doc["cv"]["metrics"]["auc"]
    assert card["performance"]["external"]["auc"] == doc["external_validation"]["metrics"]["auc"]
    assert card["performance"]["permutation_p"] is None
    assert card["settings"]["max_epochs"] == 20 and card["score_range"] == [-1.0, 1.0]
    page = (folder / "README.md").read_text()
    assert page == card_page(card) and model_id in page and "CV AUC" in page
    assert sorted(p.name for p in folder.glob("*.npz")) == ["final.npz"] + [
        f"fold-{k}.npz" for k in range(5)
    ]
    [row] = model_rows(store)
    assert row["model"] == model_id and row["cv_auc"] == card["performance"]["cv"]["auc"]
    with pytest.raises(StoreError, match="no model 'nope'"):
        load_model(store, "nope")


def test_the_saved_final_model_scores_the_external_cohort_as_the_run_did(trained):
    store, doc = trained
    out = predict(store, PredictConfig(model=doc["run_id"], cohort="ext", n_boot=200), False)
    mine = _run_scores(store, out["run_id"])
    theirs = _run_scores(store, doc["run_id"], role="external")
    # predict scores every patient with fingerprints, the unlabelled one (ext-P0000) too; the
    # run's external test had only the labelled ones.
    assert set(mine) - set(theirs) == {"ext-P0000"} and set(theirs) <= set(mine)
    shared = sorted(theirs)
    np.testing.assert_allclose(
        [mine[p]["score"] for p in shared], [theirs[p]["score"] for p in shared], atol=1e-6
    )
    assert out["predict"]["metrics"] == doc["external_validation"]["metrics"]
    assert all(mine[p]["role"] == "predict" and mine[p]["fold"] is None for p in mine)
    # DeLong against the run that scored the same patients: identical rankings, p = 1.
    [row] = [r for r in out["delong"] if r["run"] == doc["run_id"]]
    assert row["role"] == "external" and row["n_shared"] == 38 and row["p"] == 1.0
    run = load_run(store, out["run_id"])
    assert run.kind == "predict" and run.cohort == "ext" and run.score_range == (-1.0, 1.0)
    assert run.config["model"] == doc["run_id"] and run.config["trained_on"] == "train"


def test_fold_models_reproduce_the_cross_validated_test_scores(trained):
    store, doc = trained
    saved = load_model(store, doc["run_id"])
    data = load_dataset(store, "train", "ER", "enc")
    stored = _run_scores(store, doc["run_id"], role="test")
    for k in range(5):
        ids = [p for p, r in stored.items() if r["fold"] == k]
        bags = data.bags.subset(np.isin(data.bags.patient_ids, ids))
        scores, _ = score_bags(saved.estimator(f"fold-{k}"), bags)
        expected = [stored[p]["score"] for p in bags.patient_ids]
        np.testing.assert_array_equal(scores.astype(np.float32), np.float32(expected))


def test_predict_refuses_fingerprints_of_another_encoder_hash_or_precision(trained):
    store, doc = trained
    with pytest.raises(ClassifyError, match=r"encoder hash 'x' \(model: 'h-enc'\)"):
        predict(store, PredictConfig(model=doc["run_id"], cohort="rehashed"), False)
    result = CliRunner().invoke(
        cli, ["predict", "--store", str(store), "--model", doc["run_id"], "--cohort", "bf16"]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.count("\n") == 1 and "precision 'bf16' (model: 'fp32')" in result.output
    with pytest.raises(ConfigError, match="--cohort NAME or --slides"):
        PredictConfig(model=doc["run_id"])
    own = predict(store, PredictConfig(model=doc["run_id"], cohort="train"), False, save=False)
    assert "is not a test" in own["notes"][0]  # scoring the training cohort says so


def test_an_unlabelled_cohort_is_scored_with_null_labels_and_no_auc(trained):
    store, doc = trained
    out = predict(store, PredictConfig(model=doc["run_id"], cohort="unlabelled"), False)
    assert out["predict"]["metrics"] == {} and out["data"]["labelled"] == 0
    table = pq.read_table(Path(out["run_path"]) / "patients.parquet")
    assert table.num_rows == 19 and table.column("label").null_count == 19
    run = load_run(store, out["run_id"])
    assert run_roc_curves(run) == []
    picked = pick_examples(store, run, 4)
    assert len(picked) == 4 and {c for c, *_ in picked} <= set(UNLABELLED)


def test_a_model_folder_shipped_elsewhere_scores_the_same(trained, tmp_path):
    store, doc = trained
    shipped = tmp_path / "shipped" / "er-model"
    shutil.copytree(store / "models" / "classify" / doc["run_id"], shipped)
    a = predict(store, PredictConfig(model=doc["run_id"], cohort="ext"), False, save=False)
    b = predict(store, PredictConfig(model=str(shipped), cohort="ext"), False, save=False)
    np.testing.assert_array_equal(a["predict"]["metrics"]["auc"], b["predict"]["metrics"]["auc"])
    runner = CliRunner()
    shown = runner.invoke(cli, ["models", "show", str(shipped), "--store", str(store)])
    assert shown.exit_code == 0 and f"# fpstore model {doc['run_id']}" in shown.output
    listed = runner.invoke(cli, ["models", "list", "--store", str(store)])
    assert listed.exit_code == 0 and doc["run_id"] in listed.output
    scored = runner.invoke(
        cli,
        ["predict", "--store", str(store), "--model", str(shipped), "--cohort", "ext"],
    )
    assert scored.exit_code == 0, scored.output
    assert "AUC " in scored.output and "DeLong p" in scored.output


def test_patch_sampling_is_seeded_per_patient_and_draws_what_extraction_draws():
    bags, _ = make_bags(n_patients=30, n_patches=10, dim=4, seed=0)
    a, b, c = bags.sample(4, seed=1), bags.sample(4, seed=1), bags.sample(4, seed=2)
    assert (a.n_patches() == 4).all() and bags.sample(None) is bags
    assert np.array_equal(a.patch_ids, b.patch_ids)
    assert not np.array_equal(a.patch_ids, c.patch_ids)
    assert np.array_equal(bags.sample(20, seed=1).patch_ids, bags.patch_ids)  # fewer: keep all
    # A patient's draw does not depend on the other patients.
    few = bags.subset(np.arange(5, 12)).sample(4, seed=1)
    assert np.array_equal(few.patch_ids, a.subset(np.arange(5, 12)).patch_ids)
    # Two slides per patient, stored out of slide-id order (each in its grid's order): the
    # draw is extraction's over the patient's slides in slide-id order (sample_patches).
    rows = {"P1/b": 5, "P1/a": 6, "P2/a": 7}
    slides = np.array([s for s, n in rows.items() for _ in range(n)])
    patch_ids = np.array([f"{s}#{k}" for s, n in rows.items() for k in range(n)])
    mixed = Bags(["P1", "P2"], np.zeros((18, 1)), [0] * 11 + [1] * 7, None, patch_ids, slides)
    grids = {s: pa.table({"patch_id": patch_ids[slides == s]}) for s in rows}
    drawn = sample_patches(grids, 3, seed=5, patients={s: s[:2] for s in rows})
    expected = {q for t in drawn.values() for q in t.column("patch_id").to_pylist()}
    assert set(mixed.sample(3, seed=5).patch_ids) == expected


def test_classify_patches_draws_that_many_per_patient(trained):
    store, _ = trained
    doc = classify(
        store,
        ClassifyConfig(
            marker="ER",
            cohort="ext",
            encoder="enc",
            method="logreg",
            patches=3,
            n_boot=200,
            site_probe=False,
        ),
        progress=False,
        save=False,
    )
    assert doc["data"]["patches"] == 3 * doc["data"]["patients"]
    assert doc["config"]["patches"] == 3
    with pytest.raises(ConfigError, match="patches"):
        ClassifyConfig(marker="ER", cohort="ext", patches=0)


CMU = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"


def _tiny_encoder():
    """A one-convolution encoder registered as 'tiny-predict' (the model, not the encoder,
    is under test; fpstore never downloads weights)."""
    import torch

    from fpstore.encoders.base import Encoder, Preprocessing, state_dict_hash
    from fpstore.encoders.registry import list_encoders, register_encoder

    def tiny(out_px: int = 64):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 16, 16), torch.nn.Flatten(2))
        body = torch.nn.Sequential(net, torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten())
        pre = Preprocessing(patch_um=112.0, out_px=out_px)
        return Encoder("tiny-predict", body, 8, pre, state_dict_hash(body), "test encoder")

    if "tiny-predict" not in list_encoders():
        register_encoder("tiny-predict")(tiny)


def test_train_on_slides_then_predict_on_bare_slides(tmp_path):
    from fpstore.cohort.cohorts import add_cohort as add_slides
    from fpstore.extract.config import ExtractConfig
    from fpstore.extract.run import extract

    _tiny_encoder()
    scans, new = tmp_path / "scans", tmp_path / "new"
    scans.mkdir()
    new.mkdir()
    for i in range(6):
        (scans / f"T{i}.svs").symlink_to(CMU)
    for name in ("N1", "N2"):
        (new / f"{name}.svs").symlink_to(CMU)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "patient_id,slide,ER,PR,Her2,site\n"
        + "".join(
            f"T{i},{scans / f'T{i}.svs'},{'Positive' if i % 2 else 'Negative'},,,S{i % 3}\n"
            for i in range(6)
        )
    )
    store = tmp_path / "store"
    add_slides(store, "train", clinical=labels, fmt="csv")
    options = {"out_px": 32}
    extract(
        store,
        "train",
        ExtractConfig(
            encoder="tiny-predict", encoder_options=options, patches=6, device="cpu", num_workers=0
        ),
        progress=False,
    )
    cfg = ClassifyConfig(
        marker="ER", cohort="train", method="logreg", folds=3, n_boot=100, site_probe=False
    )
    model_id = classify(store, cfg, progress=False)["model"]["model_id"]
    encoder = load_model(store, model_id).card["encoder"]
    assert encoder["spec"] == {"name": "tiny-predict", "options": options}
    assert encoder["extracted_patches"] == "6"

    out = predict(store, PredictConfig(model=model_id, slides=(str(new / "*.svs"),)), False)
    assert out["config"]["cohort"].startswith("slides-") and out["extraction"]["ok"] == 2
    assert out["data"]["patients"] == 2 and out["data"]["labelled"] == 0
    assert out["data"]["patches"] == 12  # as many per patient as the model was trained on
    table = pq.read_table(Path(out["run_path"]) / "patients.parquet")
    assert sorted(table.column("patient_id").to_pylist()) == ["N1", "N2"]
    # Again, from the CLI: the slides' cohort is reused and nothing is extracted twice.
    again = CliRunner().invoke(
        cli,
        ["predict", "--store", str(store), "--model", model_id, "--slides", str(new / "*.svs")]
        + ["--json"],
    )
    assert again.exit_code == 0, again.output
    second = json.loads(again.output)
    assert second["extraction"]["ok"] == 0 and second["extraction"]["skipped"] == 2
    assert second["config"]["cohort"] == out["config"]["cohort"]
    assert second["predict"]["metrics"] == {} and second["data"] == out["data"]
    # The report reads a predict run as a classify run: heatmaps of the scored slides.
    report = build_report(store, out["run_id"], tmp_path / "report", n_heatmaps=2, embed=None)
    assert sorted(report.heatmaps) == ["N1", "N2"]
    assert "no label" in report.index.read_text() and model_id in report.index.read_text()
