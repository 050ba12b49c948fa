"""Several trained networks in one store: each checkpoint under its own encoder id, chosen by
`classify`, `compare` and `tissue`."""

import json

import pytest
import torch
from click.testing import CliRunner

from fpstore.encoders.checkpoint import save_checkpoint
from fpstore.encoders.fingerprint import checkpoint_encoder_id
from fpstore.encoders.fingerprint_net import FingerprintNet

META = {
    "preprocessing": {
        "mean": [0.8, 0.6, 0.7],
        "std": [0.1, 0.2, 0.1],
        "patch_um": 112.0,
        "out_px": 32,
        "mpp": 3.5,
    }
}


def _checkpoint(path, seed):
    torch.manual_seed(seed)
    return save_checkpoint(path, FingerprintNet(3, "resnet18"), META)["content_hash"]


def test_encoder_id_comes_from_the_file_name_and_the_weights():
    assert (
        checkpoint_encoder_id("runs/fp v2 (hed).pt", "ab12cd34ef")
        == "fingerprint-fp-v2-hed-ab12cd34"
    )
    assert checkpoint_encoder_id("/x/(( )).pt", "0123456789") == "fingerprint-model-01234567"


@pytest.mark.slow
def test_two_checkpoints_side_by_side_in_one_store(synth_small, tmp_path):
    from fpstore.cli.main import cli
    from fpstore.cohort.cohorts import add_cohort

    # the small preset's own table has no ER-negative patient: labels that alternate instead
    slides = sorted((synth_small / "tcga" / "slides").glob("*.svs"))
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "patient_id,slide,ER,PR,Her2,site\n"
        + "".join(
            f"{s.name[:12]},{s},{'Positive' if i % 2 else 'Negative'},Negative,Negative,"
            f"{s.name[5:7]}\n"
            for i, s in enumerate(slides)
        )
    )
    store = tmp_path / "store"
    add_cohort(store, "tcga", clinical=labels, fmt="csv")
    runner = CliRunner()

    def extract(checkpoint) -> dict:
        args = ["extract", "--store", str(store), "--cohort", "tcga", "--encoder", "fingerprint"]
        result = runner.invoke(
            cli, [*args, "--checkpoint", str(checkpoint), "--patches", "3", "--json"]
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.output[result.output.index("{") :])

    ids = []
    for name, seed in (("plain", 0), ("hed", 1)):
        digest = _checkpoint(tmp_path / f"{name}.pt", seed)
        summary = extract(tmp_path / f"{name}.pt")
        assert summary["encoder"] == f"fingerprint-{name}-{digest[:8]}"
        assert summary["ok"] == len(slides)
        ids.append(summary["encoder"])
    # the second network neither overwrote nor was refused by the first
    assert extract(tmp_path / "plain.pt")["skipped"] == len(slides)
    common = ["--store", str(store), "--cohort", "tcga", "--marker", "ER", "--folds", "3"]
    ambiguous = runner.invoke(cli, ["classify", *common])
    assert ambiguous.exit_code != 0 and all(i in ambiguous.output for i in ids)
    for encoder in ids:
        result = runner.invoke(cli, ["classify", *common, "--encoder", encoder, "--json"])
        assert result.exit_code == 0, result.output
        document = json.loads(result.output[result.output.index("{") :])
        assert document["config"]["encoder"] == encoder
    result = runner.invoke(
        cli, ["compare", *common, "--methods", "logreg", "--pools", "all", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output[result.output.index("{") :])["rows"]
    assert sorted(r["encoder"] for r in rows) == sorted(ids)
    result = runner.invoke(
        cli,
        ["tissue", "predict", "--store", str(store), "--cohort", "tcga", "--encoder", ids[1]],
    )
    assert result.exit_code == 0, result.output


def test_the_stores_only_trained_network_is_the_default_checkpoint(tmp_path):
    from fpstore.cli.main import cli
    from fpstore.store.layout import StoreLayout
    from tests._extraction import make_store

    store, _ = make_store(tmp_path, slides=["S0"])
    models = StoreLayout(store).fingerprint_models_dir
    args = ["extract", "--store", str(store), "--encoder", "fingerprint", "--patches", "2"]
    runner = CliRunner()
    result = runner.invoke(cli, args)
    assert result.exit_code != 0 and "holds no trained network" in result.output
    assert "fpstore train-fingerprint" in result.output
    digest = _checkpoint(models / "hed.pt", 0)
    result = runner.invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["encoder"] == f"fingerprint-hed-{digest[:8]}" and summary["ok"] == 1
    _checkpoint(models / "plain.pt", 1)
    result = runner.invoke(cli, args)
    assert result.exit_code != 0
    assert "2 trained fingerprint networks (hed.pt, plain.pt): name one with" in result.output
