"""Foundation-model encoders by name: each built without its weights, the pooling, weights from
a file, a folder or the Hugging Face cache (never the network unless asked), refusals."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from fpstore.encoders import foundation as F
from fpstore.encoders.base import check_state_dict, load_weights
from fpstore.encoders.registry import create_encoder, list_encoders
from fpstore.errors import EncoderError

# The dimension and parameter count each model card or paper states (millions): checked
# against the network the entry's timm arguments build, so a wrong argument shows.
DOCUMENTED = {
    "uni": (1024, 303),
    "uni2-h": (1536, 681),
    "virchow": (2560, 631),
    "virchow2": (2560, 631),
    "h-optimus-0": (1536, 1134),
    "h-optimus-1": (1536, 1134),
    "h0-mini": (768, 86),
    "gigapath": (1536, 1134),
}

# A tiny ViT shaped like Virchow2 / UNI2-h (registers, SwiGLU, layer scale) that tests can
# afford to build with real memory: 32 px patches read from 112 um squares.
TINY = F.FoundationModel(
    name="test-tiny-vit",
    repo="fpstore-tests/tiny-vit",
    arch="vit_tiny_patch16_224",
    kwargs={
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "init_values": 1e-5,
        "reg_tokens": 2,
        "no_embed_class": True,
        "num_classes": 0,
        "mlp_layer": "SwiGLUPacked",
        "act_layer": "SiLU",
    },
    pooling="cls+mean",
    dim=64,
    licence="test",
    out_px=32,
    mpp=3.5,
)
if TINY.name not in list_encoders():
    F.register_foundation(TINY)


def tiny_state(seed=0, model=TINY):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return F.build_model(model, "cpu").state_dict()


def test_every_foundation_entry_is_registered_and_documented():
    names = {m.name for m in F.FOUNDATION_MODELS}
    assert names == set(DOCUMENTED) and names <= set(list_encoders())


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_each_foundation_preset_builds_on_meta_with_its_documented_dimension(name):
    dim, millions = DOCUMENTED[name]
    model = F.FOUNDATION[name]
    net = F.build_model(model, "meta")
    params = sum(p.numel() for p in net.parameters()) / 1e6
    assert abs(params - millions) / millions < 0.01, params
    with torch.device("meta"):
        out = F.TokenPool(net, model.pooling)(torch.empty(2, 3, model.out_px, model.out_px))
    assert tuple(out.shape) == (2, dim) == (2, model.dim)
    assert model.patch_um == 112.0 and model.preprocessing.out_px == 224


def test_virchow2_pooling_is_the_class_token_and_the_mean_of_the_patch_tokens():
    """On a tiny ViT with Virchow2's layout (1 class token, 4 registers, SwiGLU): the vector
    is tokens[0] then the mean of tokens[5:], as Paige's model card computes it."""
    small = {**F.FOUNDATION["virchow2"].kwargs, "img_size": 28, "patch_size": 14}
    small |= {"embed_dim": 32, "depth": 1, "num_heads": 2}
    model = F.FoundationModel("v2-tiny", "x/y", "vit_huge_patch14_224", small, "cls+mean", 64, "-")
    torch.manual_seed(0)
    vit = F.build_model(model, "cpu").eval()
    x = torch.randn(3, 3, 28, 28)
    with torch.inference_mode():
        tokens = vit(x)  # global_pool "": every normalised token, as the card's model(image)
        pooled = F.TokenPool(vit, "cls+mean")(x)
    assert tokens.shape == (3, 1 + 4 + 4, 32) and vit.num_prefix_tokens == 5
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
    torch.testing.assert_close(pooled, expected)
    assert not torch.allclose(pooled[:, 32:], tokens[:, 1:].mean(1))  # registers left out


def test_weights_from_a_file_or_a_folder_and_the_encoder_they_make(tmp_path):
    state = tiny_state()
    save_file(state, tmp_path / "model.safetensors")
    torch.save({"model": state}, tmp_path / "tiny.pth")
    a = create_encoder(TINY.name, weights=tmp_path / "model.safetensors")
    b = create_encoder(TINY.name, weights=tmp_path / "tiny.pth")
    c = create_encoder(TINY.name, weights=tmp_path)  # a folder, as `hf download --local-dir`
    assert a.weights_hash == b.weights_hash == c.weights_hash and a.dim == 64
    assert a.preprocessing.patch_um == 112.0 and a.preprocessing.out_px == 32
    pixels = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    out = a.prepare("cpu").encode(pixels)
    assert out.shape == (4, 64) and torch.isfinite(out).all()
    reference = F.build_model(TINY, "cpu").eval()
    reference.load_state_dict(state)
    with torch.inference_mode():
        expected = F.TokenPool(reference, "cls+mean")(a.normalise(pixels))
    torch.testing.assert_close(out, expected)
    assert create_encoder(TINY.name, weights=tmp_path, download=True).spec == {
        "name": TINY.name,
        "options": {"weights": str(tmp_path.resolve())},  # --download is not how to rebuild
    }
    other = create_encoder(TINY.name, weights=_saved(tmp_path / "o.pth", tiny_state(seed=1)))
    assert other.weights_hash != a.weights_hash


def _saved(path, state):
    torch.save(state, path)
    return path


def test_a_state_dict_of_another_architecture_is_refused_before_loading(tmp_path):
    deeper = F.FoundationModel(**{**TINY.__dict__, "kwargs": {**TINY.kwargs, "depth": 3}})
    wider = F.FoundationModel(**{**TINY.__dict__, "kwargs": {**TINY.kwargs, "embed_dim": 48}})
    for model, kind in ((deeper, "unexpected"), (wider, "shape")):
        path = _saved(tmp_path / f"{kind}.pth", tiny_state(model=model))
        with pytest.raises(EncoderError) as info:
            create_encoder(TINY.name, weights=path)
        message = str(info.value)
        assert "\n" not in message and kind in message and "do not fit" in message
        assert "fpstore-tests/tiny-vit" in message and "--weights" in message
    (tmp_path / "notes.pth").write_text("not weights\n" * 3)
    with pytest.raises(EncoderError) as info:
        create_encoder(TINY.name, weights=tmp_path / "notes.pth")
    assert "\n" not in str(info.value) and "fpstore-tests/tiny-vit" in str(info.value)
    with pytest.raises(EncoderError, match="missing"):
        create_encoder(
            TINY.name, weights=_saved(tmp_path / "part.pth", dict(list(tiny_state().items())[:5]))
        )
    # load_weights (timm:, torchvision:) checks first too: a refused file changes nothing.
    net = F.build_model(TINY, "cpu")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = tiny_state(seed=3)
    bad["blocks.1.mlp.fc2.weight"] = torch.zeros(7, 7)
    with pytest.raises(EncoderError, match="shape 1"):
        load_weights(net, _saved(tmp_path / "bad.pth", bad), "tiny")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    check_state_dict(net, before, "x", "y")  # the exact names and shapes pass


def _fake_cache(root, model, state):
    """The layout `hf download` leaves: refs/main names a snapshot holding the file."""
    folder = root / f"models--{model.repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file(state, folder / "snapshots" / "0123abcd" / "model.safetensors")


def test_weights_are_found_in_the_hugging_face_cache_and_never_fetched_unasked(
    tmp_path, monkeypatch
):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(a))
    with pytest.raises(EncoderError) as info:
        create_encoder(TINY.name, cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and "fpstore-tests/tiny-vit" in message
    assert "hf download fpstore-tests/tiny-vit" in message and "--weights" in message
    assert "--download" in message and calls == []
    assert F.weights_status(TINY, tmp_path)["status"] == "missing"
    _fake_cache(tmp_path, TINY, tiny_state())
    enc = create_encoder(TINY.name, cache_dir=tmp_path)
    assert "(cache)" in enc.description and calls == []
    status = F.weights_status(TINY, tmp_path)
    assert status["status"] == "cache" and status["path"].endswith("model.safetensors")


def test_download_only_when_asked_and_a_gated_repository_is_one_line(tmp_path, monkeypatch):
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    source = tmp_path / "hub.safetensors"
    save_file(tiny_state(), source)
    calls = []

    def fetch(repo, name, cache_dir=None):
        calls.append((repo, name))
        return str(source)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    enc = create_encoder(TINY.name, cache_dir=tmp_path / "empty", download=True)
    assert calls == [("fpstore-tests/tiny-vit", "model.safetensors")]
    assert "(download)" in enc.description

    def gated(repo, name, cache_dir=None):
        request = httpx.Request("GET", f"https://huggingface.co/{repo}/resolve/main/{name}")
        raise GatedRepoError("401 gated", response=httpx.Response(401, request=request))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(EncoderError) as info:
        create_encoder(TINY.name, cache_dir=tmp_path / "empty", download=True)
    message = str(info.value)
    assert "\n" not in message and "gated" in message and "fpstore-tests/tiny-vit" in message
    assert "hf auth login" in message and "--weights" in message


def test_encoders_list_and_show_name_dimension_scale_weights_and_licence(tmp_path, monkeypatch):
    from fpstore.cli.main import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()
    result = runner.invoke(cli, ["encoders", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    for name, (dim, _) in DOCUMENTED.items():
        row = rows[name]
        assert row["dim"] == dim and row["patch_um"] == 112.0 and row["licence"]
        assert row["weights"] in ("cache", "missing") and row["repo"] == F.FOUNDATION[name].repo
    assert rows["virchow2"]["licence"].startswith("CC-BY-NC-ND-4.0")
    assert rows["random-resnet34"]["dim"] == 512
    text = runner.invoke(cli, ["encoders", "list"]).output
    assert "uni2-h" in text and "1536" in text and "hf download MahmoodLab/UNI2-h" in text
    shown = json.loads(runner.invoke(cli, ["encoders", "show", "uni2-h", "--json"]).output)
    assert shown["kwargs"]["reg_tokens"] == 8 and shown["kwargs"]["mlp_layer"] == "SwiGLUPacked"
    assert shown["arch"] == "vit_giant_patch14_224" and shown["pooling"] == "cls"
    missing = runner.invoke(cli, ["encoders", "show", "uni3"])
    assert missing.exit_code != 0 and "uni2-h" in missing.output


@pytest.mark.slow
def test_a_small_vit_preset_end_to_end_weights_extract_classify_predict(
    synth_small, tmp_path, monkeypatch
):
    """A weights file -> extract -> classify (MIL head) -> predict on new slides, where the
    saved model rebuilds the encoder from the same file."""
    from fpstore.cli.main import cli
    from fpstore.cohort.cohorts import add_cohort

    store = tmp_path / "store"
    slides = sorted((synth_small / "tcga" / "slides").glob("*.svs"))
    labels = tmp_path / "labels.csv"  # both classes, whatever the synthetic status
    labels.write_text(
        "patient_id,slide,ER,PR,Her2,site\n"
        + "".join(
            f"P{i},{s},{('Positive', 'Negative')[i % 2]},Negative,Negative,A\n"
            for i, s in enumerate(slides)
        )
    )
    add_cohort(store, "tcga", clinical=labels, fmt="csv")
    weights = tmp_path / "weights"
    weights.mkdir()
    save_file(tiny_state(), weights / "model.safetensors")
    runner = CliRunner()
    common = ["--store", str(store), "--json"]
    result = runner.invoke(
        cli,
        ["extract", "--cohort", "tcga", "--encoder", TINY.name, "--weights", str(weights)]
        + ["--patches", "16", "--device", "cpu", "--workers", "0", *common],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["failed"] == 0 and summary["patches"] > 0
    import fpstore.store

    with fpstore.store.open(store) as fs:
        vectors = fs.fingerprints(TINY.name, "tcga").vectors
        assert vectors.shape[1] == 64 and np.isfinite(vectors).all()
    result = runner.invoke(
        cli,
        ["classify", "--marker", "ER", "--cohort", "tcga", "--encoder", TINY.name]
        + ["--method", "mil", "--folds", "3", "--n-boot", "100", "--no-site-probe", *common],
    )
    assert result.exit_code == 0, result.output
    run = json.loads(result.output)
    model_id = run["model"]["model_id"]
    result = runner.invoke(
        cli,
        ["predict", "--model", model_id, "--slides", str(synth_small / "external" / "slides")]
        + ["--cohort", "new", "--patches", "16", "--device", "cpu", "--n-boot", "100", *common],
    )
    assert result.exit_code == 0, result.output
    scored = json.loads(result.output)
    assert scored["config"]["encoder"] == TINY.name and scored["extraction"]["failed"] == 0
    with fpstore.store.open(store) as fs:
        (n,) = (
            fs.sql(
                "SELECT count(DISTINCT patient_id) FROM predictions WHERE run_id = ?",
                [scored["run_id"]],
            )
            .to_arrow()[0]
            .to_pylist()
        )
    assert n == len(list((synth_small / "external" / "slides").glob("*.tiff")))
