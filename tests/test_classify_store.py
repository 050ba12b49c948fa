"""`fpstore classify` / `compare` on a tiny hand-made store: loading, pooling, saved runs, CLI."""

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fpstore.classify.data import load_dataset
from fpstore.classify.leakage import site_probe
from fpstore.classify.pipeline import ClassifyConfig, CompareConfig, classify, compare
from fpstore.cli.main import cli
from fpstore.errors import CohortError, StoreError
from fpstore.store.schema import PATCH_PREDICTIONS, PATIENT_PREDICTIONS
from tests._classify_bags import make_bags
from tests._classify_store import add_cohort as _add_cohort

FAST = {"max_epochs": 20, "patience": 4}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify-store")
    _add_cohort(root, "train", 90, seed=1, tissue=True, encoders=("enc", "enc2"))
    _add_cohort(root, "ext", 40, seed=2, tissue=False)
    return root


def test_dataset_excludes_and_counts_missing_labels_and_patients_without_pooled_patches(store):
    data = load_dataset(store, "train", "ER", "enc", pool="epithelium")
    assert data.counts["missing_label"] == 1  # patient 0
    assert data.counts["no_patches"] == 1  # patient 1: labelled, no fingerprints
    assert data.counts["no_pool_patches"] >= 1  # patient 2: no epithelium
    assert "train-P0000" not in data.bags.patient_ids and "train-P0002" not in data.bags.patient_ids
    assert set(data.bags.tissue) == {"epithelium"}
    # Groups are drawn before pooling: patient 2 (no epithelium) still has its group.
    assert "train-P0002" in data.split_basis[0]
    assert len(data.split_basis[0]) == data.bags.n_patients + data.counts["no_pool_patches"]


def test_classify_saves_a_run_with_predictions_config_and_fold_assignment(store):
    cfg = ClassifyConfig(
        marker="ER", cohort="train", encoder="enc", pool="epithelium", n_boot=300, classifier=FAST
    )
    doc = classify(store, cfg, progress=False)
    folder = Path(doc["run_path"])
    patients = pq.read_table(folder / "patients.parquet")
    assert patients.schema.equals(PATIENT_PREDICTIONS, check_metadata=False)
    assert patients.num_rows == doc["data"]["patients"] == doc["cv"]["metrics"]["n"]
    assert set(patients.column("role").to_pylist()) == {"test"}
    patches = pq.read_table(folder / "patches.parquet")
    assert patches.schema.equals(PATCH_PREDICTIONS, check_metadata=False)
    assert patches.num_rows == doc["data"]["patches"]
    saved = json.loads((folder / "run.json").read_text())
    assert saved["config"]["pool"] == "epithelium" and saved["config"]["classifier"] == FAST
    assert saved["classifier"]["max_epochs"] == 20
    # Which method typed the pooled patches, and the precision of epithelium to expect.
    (typing,) = saved["tissue_typing"]
    assert typing["cohort"] == "train" and set(typing["methods"]) == {"rules"}
    assert typing["methods"]["rules"]["expected_epithelium_precision"] is not None
    # Every labelled patient with patches has a group, the ones without epithelium too.
    assert len(saved["fold_assignment"]) == doc["data"]["patients"] + doc["data"]["no_pool_patches"]
    assert doc["cv"]["metrics"]["ci_low"] > 0.5
    assert "site_probe" in doc and doc["site_probe"]["n_sites"] >= 2
    from fpstore.store import open as open_store

    with open_store(store) as fs:
        rows = fs.sql(
            "SELECT count(*) AS n FROM predictions WHERE run_id = ?", [doc["run_id"]]
        ).rows()
    assert rows[0]["n"] == patients.num_rows


def test_same_groups_whatever_the_pool_or_method(store):
    a = classify(
        store,
        ClassifyConfig(marker="ER", cohort="train", encoder="enc", method="logreg", n_boot=200),
        progress=False,
        save=False,
    )
    b = classify(
        store,
        ClassifyConfig(
            marker="ER",
            cohort="train",
            encoder="enc",
            pool="epithelium",
            method="xgboost",
            n_boot=200,
        ),
        progress=False,
        save=False,
    )
    shared = set(b["fold_assignment"])
    assert {p: a["fold_assignment"][p] for p in shared} == b["fold_assignment"]


def test_external_validation_saves_external_predictions(store):
    doc = classify(
        store,
        ClassifyConfig(
            marker="ER", cohort="train", encoder="enc", method="logreg", external="ext", n_boot=200
        ),
        progress=False,
    )
    patients = pq.read_table(Path(doc["run_path"]) / "patients.parquet").to_pylist()
    external = [r for r in patients if r["role"] == "external"]
    assert (
        len(external) == doc["external_validation"]["metrics"]["n"] == 38
    )  # 40 - missing - no patches
    assert all(r["cohort"] == "ext" and r["fold"] is None for r in external)
    assert doc["external_validation"]["metrics"]["auc"] > 0.8


def test_clear_errors_for_missing_tissue_types_and_ambiguous_encoders(store):
    with pytest.raises(StoreError, match="tissue predict --cohort ext"):
        classify(store, ClassifyConfig(marker="ER", cohort="ext", pool="stroma"), save=False)
    with pytest.raises(
        StoreError, match=r"several encoders \(enc, enc2\); pick one with --encoder"
    ):
        classify(store, ClassifyConfig(marker="ER", cohort="train"), save=False)
    with pytest.raises(CohortError, match="no cohort 'nope'"):
        classify(store, ClassifyConfig(marker="ER", cohort="nope", encoder="enc"), save=False)


def test_cli_classify_json_and_table(store):
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "classify",
            "--store",
            str(store),
            "--marker",
            "PR",
            "--cohort",
            "ext",
            "--method",
            "logreg",
            "--n-boot",
            "200",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["config"]["marker"] == "PR" and len(doc["cv"]["folds"]) == 5
    assert (
        doc["cv"]["metrics"]["ci_low"] < 0.5 < doc["cv"]["metrics"]["ci_high"]
    )  # PR has no signal
    result = runner.invoke(
        cli,
        [
            "classify",
            "--store",
            str(store),
            "--marker",
            "ER",
            "--cohort",
            "ext",
            "--method",
            "logreg",
            "--n-boot",
            "200",
            "--folds",
            "4",
            "--permutations",
            "9",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "pooled" in result.output and "fold 3" in result.output and "site probe" in result.output
    assert "permutation test (9 label shuffles within site): null AUC" in result.output
    # ER has a planted signal: at most one of the 9 shuffles reaches its AUC (p <= 2/10).
    assert float(re.search(r", p = (\S+)\n", result.output).group(1)) <= 0.2
    bad = runner.invoke(
        cli,
        [
            "classify",
            "--store",
            str(store),
            "--marker",
            "ER",
            "--cohort",
            "ext",
            "--pool",
            "tumour",
        ],
    )
    assert bad.exit_code == 2 and "tumour" in bad.output and "Traceback" not in bad.output


def test_compare_table_on_identical_splits(store):
    cfg = CompareConfig(
        marker="ER",
        cohort="train",
        methods=("logreg", "logreg-tissue", "xgboost"),
        pools=("all", "fat"),
        n_boot=200,
    )
    doc = compare(store, cfg, progress=False)
    names = [r["name"] for r in doc["rows"]]
    # logreg-tissue only where a pool has several types; both encoders; first row is the reference.
    assert "logreg-tissue | enc | fat" not in names and "logreg-tissue | enc2 | all" in names
    assert names[0] == "logreg | enc | all" and "xgboost | enc2 | fat" in names
    assert doc["rows"][0]["p_vs_first"] is None and all(
        r["p_vs_first"] is not None for r in doc["rows"][1:]
    )
    assert all(r["ci_low"] <= r["auc"] <= r["ci_high"] for r in doc["rows"])
    assert set(doc["site_probe"]) == {"enc", "enc2"}
    compare_json = json.loads((store / "runs" / doc["compare_id"] / "compare.json").read_text())
    assert compare_json["rows"] == json.loads(json.dumps(doc["rows"]))
    first = pq.read_table(store / "runs" / doc["rows"][0]["run_id"] / "patients.parquet")
    last = pq.read_table(store / "runs" / doc["rows"][-1]["run_id"] / "patients.parquet")
    fold_a = dict(zip(first.column("patient_id").to_pylist(), first.column("fold").to_pylist()))
    fold_b = dict(zip(last.column("patient_id").to_pylist(), last.column("fold").to_pylist()))
    assert all(fold_a[p] == f for p, f in fold_b.items())


def test_site_probe_detects_site_signatures_and_not_their_absence():
    leaky, _ = make_bags(n_patients=150, n_patches=6, dim=8, n_sites=5, site_effect=1.5, seed=3)
    clean, _ = make_bags(n_patients=150, n_patches=6, dim=8, n_sites=5, site_effect=0.0, seed=3)
    hot, cold = site_probe(leaky), site_probe(clean)
    assert hot["balanced_accuracy"] > 0.5 and hot["macro_auc"] > 0.85  # chance: 0.2 and 0.5
    assert cold["balanced_accuracy"] < 0.4 and abs(cold["macro_auc"] - 0.5) < 0.1
    assert hot["chance_balanced_accuracy"] == pytest.approx(0.2)
