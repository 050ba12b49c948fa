"""Training the fingerprint network on tiny in-memory cores, CycleGAN, the crop stream and
the commands end to end on the synthetic arrays."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fpstore.encoders.checkpoint import load_checkpoint, save_checkpoint
from fpstore.encoders.fingerprint_net import FingerprintNet, to_input
from fpstore.errors import ConfigError, TrainingError
from fpstore.fingerprint.augment import dihedral
from fpstore.fingerprint.cyclegan import CycleGANConfig, restyle, train_cyclegan
from fpstore.fingerprint.data import (
    CoreSet,
    CropStream,
    SetStream,
    crop_origins,
    fixed_crops,
    gather,
)
from fpstore.fingerprint.losses import Margin, fingerprint_loss, set_contrast
from fpstore.fingerprint.train import TrainConfig, _lr_factor, get_config, train_network

COLOURS = np.array([[200, 60, 60], [60, 160, 60], [70, 70, 200], [190, 170, 40]], np.uint8)


def _cores(n_classes=4, sections=1, size=64, seed=0, restyled=False) -> CoreSet:
    """Cores whose class is a colour with a class-specific stripe texture (both halves alike)."""
    rng = np.random.default_rng(seed)
    imgs, keys, sects = [], [], []
    yy, xx = np.mgrid[0:size, 0:size]
    for s in range(sections):
        for c in range(n_classes):
            stripes = ((xx * (c + 1) + yy * (3 - c)) // 6 % 2)[..., None] * 40
            img = np.clip(
                COLOURS[c].astype(int) - stripes + rng.integers(-15, 15, (size, size, 3)), 0, 255
            )
            imgs.append(img.astype(np.uint8))
            keys.append(f"t:{c}")
            sects.append(f"section{s + 1}")
    imgs = np.stack(imgs)
    n = len(imgs)
    cores = CoreSet(
        left=imgs[:, :, : size // 2],
        right=imgs[:, :, size // 2 :],
        key=np.array(keys, object),
        patient_id=np.array([f"p{int(k[2:]) // 2}" for k in keys], object),
        section=np.array(sects, object),
        site=np.array(["A"] * n, object),
        core_index=np.arange(n),
    )
    if restyled:
        cores.restyled["swap"] = np.stack([cores.left[:, :, :, ::-1], cores.left], axis=1).copy()
    return cores


def _tiny(**kw) -> TrainConfig:
    base = dict(
        arch="resnet18",
        patch_px=24,
        out_px=24,
        batch_size=16,
        max_steps=12,
        eval_every=4,
        patience=5,
        warmup_steps=2,
        lr=2e-3,
        eval_per_half=4,
        num_workers=0,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def _mean_ce(model, pre, cores, patch_px):
    crops = fixed_crops(cores.tissue_right, cores.half_shape, patch_px, 4, seed=5)
    x = to_input(
        torch.from_numpy(gather(cores.right, crops, patch_px)),
        pre["mean"],
        pre["std"],
        pre["out_px"],
    )
    y = torch.tensor([int(cores.key[i][2:]) for i, _, _ in crops])
    with torch.no_grad():
        logits = model.eval()(x)
        if model.head_kind == "cosine":  # cosines: the loss's scale makes them logits
            logits = logits * TrainConfig().scale
        return torch.nn.functional.cross_entropy(logits, y).item()


def test_tiny_training_reduces_the_loss_on_unseen_right_halves():
    torch.manual_seed(0)
    cores = _cores()
    result = train_network(cores, _tiny(), progress=False)
    assert result.classes == ["t:0", "t:1", "t:2", "t:3"]
    assert result.class_patients == ["p0", "p0", "p1", "p1"]
    assert _mean_ce(result.model, result.preprocessing, cores, 24) < 0.8 * math.log(4)
    assert result.best_accuracy > 0.25  # chance is 1/4
    assert [h["step"] for h in result.history] == [4, 8, 12]
    pre = result.preprocessing
    assert pre["patch_um"] == 12.0 and pre["out_px"] == 24 and pre["mpp"] == 0.5
    assert 0.1 < pre["mean"][0] < 0.9 and all(s > 0 for s in pre["std"])


def test_pair_loss_training_uses_the_restyled_twins():
    cores = _cores(restyled=True)
    result = train_network(cores, _tiny(max_steps=2, eval_every=1), style="swap", progress=False)
    # Both restylings went through the network: their fingerprints differ (se > 0) and the
    # objective adds the twin's cross-entropy and the pair term to the first image's.
    assert all(h["se"] > 0 and h["loss"] > h["ce"] for h in result.history)
    with pytest.raises(TrainingError, match="no restyled copies 'cyclegan'"):
        train_network(cores, _tiny(), style="cyclegan", progress=False)


def test_hed_stain_jitter_pairs_two_stainings_of_each_crop(monkeypatch):
    from fpstore.fingerprint import train as train_module
    from fpstore.slides.stain import StainAugmentConfig

    seen = []

    def spy(x, cfg, generator):
        out = stain_jitter(x, cfg, generator)
        seen.append((x.shape, float((out - x).abs().mean())))
        return out

    stain_jitter = train_module.stain_jitter
    monkeypatch.setattr(train_module, "stain_jitter", spy)
    jitter = StainAugmentConfig(scale=0.3, shift=0.05, vector=0.08)
    result = train_network(
        _cores(), _tiny(max_steps=2, eval_every=1, stain_jitter=jitter), progress=False
    )
    assert all(h["se"] > 0 and h["loss"] > h["ce"] for h in result.history)  # pairs trained
    assert len(seen) == 4 and all(shape[0] == 16 and change > 0 for shape, change in seen)


def test_precision_auto_trains_in_bf16_where_the_cpu_has_bf16_units(monkeypatch):
    import fpstore.encoders.base as base

    monkeypatch.setattr(base, "native_bf16_flags", lambda: ["amx_bf16"])
    result = train_network(_cores(), _tiny(max_steps=2, eval_every=1), progress=False)
    assert result.precision.precision == "bf16" and result.summary()["precision"] == "bf16"
    assert "amx_bf16" in result.summary()["precision_reason"]
    assert all(math.isfinite(h["loss"]) for h in result.history)
    monkeypatch.setattr(base, "native_bf16_flags", lambda: [])
    result = train_network(_cores(), _tiny(max_steps=1, eval_every=1), progress=False)
    assert result.summary()["precision"] == "fp32"
    with pytest.raises(ConfigError, match="precision"):
        _tiny(precision="fp8")


def test_training_refuses_bad_settings():
    with pytest.raises(TrainingError, match="at least 2 cores"):
        train_network(_cores(n_classes=1), _tiny(), progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        _tiny(batch_size=1)
    with pytest.raises(ConfigError, match="device"):
        _tiny(device="tpu")
    with pytest.raises(ConfigError, match="does not fit"):
        train_network(_cores(), _tiny(patch_px=48), progress=False)


def test_crops_come_from_tissue():
    half = np.full((1, 128, 64, 3), 245, np.uint8)
    half[0, 64:] = 120  # tissue only in the lower half
    cores = CoreSet(
        left=half,
        right=half.copy(),
        key=np.array(["a"], object),
        patient_id=np.array(["p"], object),
        section=np.array(["s"], object),
        site=np.array(["A"], object),
        core_index=np.array([1]),
    )
    origins = crop_origins(cores.tissue_left, cores.half_shape, 32)[0]
    assert origins[:, 0].min() >= 48  # at least half of every 32 px crop is tissue
    batch = next(
        iter(CropStream(cores.left, np.array([0]), np.array([3]), cores.tissue_left, 32, 8, seed=1))
    )
    assert batch["x1"].shape == (8, 32, 32, 3) and batch["x1"].dtype == torch.uint8
    assert batch["y"].tolist() == [3] * 8
    tissue_share = (batch["x1"].numpy().min(axis=3) < 220).mean(axis=(1, 2))
    assert (tissue_share >= 0.5).all()


def test_cyclegan_learns_a_colour_mapping():
    rng = np.random.default_rng(0)
    base = rng.integers(40, 220, (16, 16, 16, 3)).astype(np.uint8)
    base = np.repeat(np.repeat(base, 2, 1), 2, 2)  # 32 px, blocky texture
    site_b = base[..., ::-1].copy()  # site B: red and blue swapped

    def stream(images):
        r = np.random.default_rng(1)
        while True:
            yield torch.from_numpy(images[r.integers(0, len(images), 2)])

    cfg = CycleGANConfig(
        ngf=8, ndf=8, n_blocks=1, crop_px=32, batch_size=2, steps=40, lr=2e-3, pool_size=4
    )
    gan = train_cyclegan(stream(base), stream(site_b), cfg, device="cpu", progress=False)
    assert gan.history[-1]["cycle"] < gan.history[0]["cycle"]
    out = restyle(gan.g_ab, base[:3, :30, :30])  # sides not a multiple of 4 are padded
    assert out.shape == (3, 30, 30, 3) and out.dtype == np.uint8


def test_every_training_option_sets_a_config_field():
    from dataclasses import fields

    from fpstore.cli.fingerprint import TRAIN_FIELDS
    from fpstore.fingerprint.train import TrainConfig

    assert set(TRAIN_FIELDS.values()) <= {f.name for f in fields(TrainConfig)}


def test_commands_explain_a_bad_tma_folder(tmp_path):
    from fpstore.cli.main import cli

    (tmp_path / "train").mkdir()
    result = CliRunner().invoke(
        cli, ["train-fingerprint", "--tma", str(tmp_path), "--out", str(tmp_path / "m.pt")]
    )
    assert result.exit_code == 2 and "has no sections.csv" in result.output
    result = CliRunner().invoke(
        cli,
        [
            "train-fingerprint",
            "--tma",
            str(tmp_path),
            "--out",
            str(tmp_path / "m.pt"),
            "--stain",
            "sepia",
        ],
    )
    assert result.exit_code == 2 and "sepia" in result.output
    assert not (tmp_path / "m.pt").exists()
    kept = tmp_path / "store" / "models" / "fingerprint" / "none.pt"  # the default --out
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"a network trained before")
    store = ["--store", str(tmp_path / "store")]
    result = CliRunner().invoke(cli, ["train-fingerprint", "--tma", str(tmp_path), *store])
    assert result.exit_code == 2 and "holds a trained network already: give --out" in result.output
    assert kept.read_bytes() == b"a network trained before"


@pytest.mark.slow
def test_train_match_and_maps_on_the_synthetic_arrays(synth_small, tmp_path):
    from fpstore.cli.main import cli

    tma, cache, model = synth_small / "tma", tmp_path / "cache", tmp_path / "fp.pt"
    common = ["--tma", str(tma), "--cache", str(cache), "--crop-px", "512"]
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "train-fingerprint",
            *common,
            "--out",
            str(model),
            "--stain",
            "reinhard",
            "--steps",
            "6",
            "--patch-px",
            "64",
            "--out-px",
            "32",
            "--batch-size",
            "8",
            "--pair-weight",
            "0.25",
            "--label-smoothing",
            "0.1",
            "--bn-neck",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert (
        summary["train_cores"] == 18
        and summary["n_classes"] == 6
        and summary["stain"] == "reinhard"
    )
    trained_with = load_checkpoint(model)[1]["train_config"]
    assert trained_with["gamma"] == 0.25 and trained_with["label_smoothing"] == 0.1
    assert trained_with["bn_neck"] and load_checkpoint(model)[1]["neck"]
    assert (cache / "tma" / "train" / "restyled" / "reinhard" / "left.npy").is_file()

    result = runner.invoke(
        cli, ["match", "--model", str(model), *common, "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    game = json.loads(result.output[result.output.index("{") :])
    assert game["n_cores"] == 5 and game["sections"]["left_site"] != game["sections"]["right_site"]
    assert 0 <= game["core_accuracy"] <= 1 and game["chance_core"] == pytest.approx(0.2)
    assert 1 <= game["median_rank"] <= 5 and game["top5_accuracy"] == 1.0  # only 5 right halves
    table = runner.invoke(cli, ["match", "--model", str(model), *common, "--device", "cpu"]).output
    assert (
        "x_chance" in table
        and "median rank" in table
        and "top-5 accuracy 1.000 (chance 1.000)" in table
    )

    result = runner.invoke(
        cli,
        [
            "core-maps",
            "--model",
            str(model),
            *common,
            "--out",
            str(tmp_path / "maps"),
            "--cores",
            "1",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    files = json.loads(result.output[result.output.index("{") :])["files"]
    assert len(files) == 2 and all(f.endswith(".png") for f in files)


def test_the_cli_offers_the_stain_methods_training_knows():
    from fpstore.cli.fingerprint import STAINS as offered
    from fpstore.fingerprint.stain import STAINS

    assert offered == STAINS


# --- objectives, augmentation, the probe ---------------------------------------------------


def test_the_cosine_head_scores_cosines_and_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = FingerprintNet(5, "resnet18", head="cosine").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fp, cosines = model.forward_both(x)
        direct = (
            torch.nn.functional.normalize(fp, dim=1)
            @ torch.nn.functional.normalize(model.head.weight, dim=1).T
        )
    assert cosines.shape == (3, 5) and cosines.abs().max() <= 1 + 1e-5
    assert torch.allclose(cosines, direct, atol=1e-5)
    meta = save_checkpoint(tmp_path / "c.pt", model, {"preprocessing": {}})
    assert meta["head"] == "cosine"
    loaded, meta = load_checkpoint(tmp_path / "c.pt")
    assert loaded.head_kind == "cosine"
    with torch.no_grad():
        assert torch.allclose(loaded(x), cosines, atol=1e-5)


def test_a_checkpoint_without_a_head_entry_loads_the_papers_linear_head(tmp_path):
    model = FingerprintNet(3, "resnet18")
    save_checkpoint(tmp_path / "old.pt", model, {"preprocessing": {}})
    blob = torch.load(tmp_path / "old.pt", weights_only=True)
    del blob["meta"]["head"]  # as written before the cosine head existed
    torch.save(blob, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(tmp_path / "old.pt")
    assert loaded.head_kind == "linear" and isinstance(loaded.head, torch.nn.Linear)


def test_the_margin_is_taken_from_the_true_class_only():
    cosines = torch.tensor([[0.5, 0.4, -0.1], [0.0, 0.9, 0.2]])
    y = torch.tensor([0, 1])
    logits = Margin(scale=10.0, margin=0.2).logits(cosines, y)
    expected = 10.0 * torch.tensor([[0.3, 0.4, -0.1], [0.0, 0.7, 0.2]])
    assert torch.allclose(logits, expected)
    plain = fingerprint_loss(cosines, y).total
    margined = fingerprint_loss(cosines, y, margin=Margin(1.0, 0.2)).total
    assert margined > plain  # the margin makes the true class harder to win


def test_objectives_are_named_and_checked():
    assert TrainConfig().objective == "paper" and TrainConfig().head == "linear"
    assert TrainConfig().loss_margin is None
    cosface = TrainConfig(objective="cosface")
    assert cosface.head == "cosine" and cosface.loss_margin == Margin(16.0, 0.2)
    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(objective="triplet")
    with pytest.raises(ConfigError, match="margin"):
        TrainConfig(margin=2.0)


@pytest.mark.parametrize("objective", ["paper", "cosface", "sets"])
def test_every_objective_learns_the_tiny_cores(objective):
    torch.manual_seed(0)
    batch = 8 if objective == "sets" else 16  # sets: 2 classes of the 2 patients a batch
    result = train_network(
        _cores(),
        _tiny(objective=objective, max_steps=16, eval_every=8, batch_size=batch),
        progress=False,
    )
    assert result.model.head_kind == TrainConfig(objective=objective).head
    assert result.best_accuracy > 0.5  # chance is 1/4
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_set_batches_hold_two_regions_of_each_class_from_distinct_patients():
    cores = _cores(n_classes=4, sections=2, size=96)
    cores.patient_id = np.array([f"p{i % 4}" for i in range(8)], object)  # a patient a class
    rows = np.arange(8)
    labels = np.array([int(k[2:]) for k in cores.key])
    stream = SetStream(cores.left, rows, labels, cores.tissue_left, 24, 8, cores.patient_id, seed=3)
    batch = next(iter(stream))
    assert batch["x1"].shape == (8, 24, 24, 3) and "x2" not in batch
    rng = np.random.default_rng(0)
    for _ in range(5):
        picks, crops = stream._draw(rng)
        sets = labels[picks].reshape(2, 2, 2)  # [class][region][crop]
        assert (sets == sets[:, :1, :1]).all() and sets[0, 0, 0] != sets[1, 0, 0]
        # corners on the 16-px grid up to the middle (36) start the upper region, jittered
        # by up to 15 px; the lower region's start at 48
        corners = np.array([y for _, y, _ in crops]).reshape(2, 2, 2)
        assert (corners[:, 0] < 48).all() and (corners[:, 1] >= 48).all()
        sections = np.array([cores.section[r] for r, _, _ in crops]).reshape(2, 2, 2)
        assert (sections[:, 0] != sections[:, 1]).all()  # the other region: another section
    # with restyled copies, each crop is the original or its restyled copy (no twins)
    cores.restyled["dark"] = (cores.left[:, None] // 2).copy()
    mixed = SetStream(
        cores.left,
        rows,
        labels,
        cores.tissue_left,
        24,
        8,
        cores.patient_id,
        seed=3,
        restyled=cores.restyled["dark"],
    )
    draws = iter(mixed)
    means = torch.cat([next(draws)["x1"] for _ in range(4)]).float().mean(dim=(1, 2, 3))
    reference = torch.from_numpy(cores.left).float().mean()
    assert (means < 0.6 * reference).any() and (means > 0.8 * reference).any()
    with pytest.raises(TrainingError, match="at most 16"):
        SetStream(cores.left, rows, labels, cores.tissue_left, 24, 20, cores.patient_id)
    with pytest.raises(ConfigError, match="divisible by 4"):
        SetStream(cores.left, rows, labels, cores.tissue_left, 24, 6, cores.patient_id)
    with pytest.raises(ConfigError, match="multiple of 4"):
        TrainConfig(objective="sets", batch_size=30)


def test_the_set_contrast_rewards_regions_that_find_their_class():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(6, 32), dim=1)
    noise = 0.05 * torch.randn(6, 2, 2, 32)
    matched = (centres[:, None, None] + noise).reshape(-1, 32)
    swapped = torch.cat([centres[:, None], centres.roll(1, 0)[:, None]], dim=1)
    swapped = (swapped[:, :, None] + noise).reshape(-1, 32)
    assert set_contrast(matched, 2, 0.1) < 0.05
    assert set_contrast(swapped, 2, 0.1) > math.log(6)


def test_dihedral_applies_each_samples_own_turn_and_flip():
    x = torch.arange(2 * 8 * 3 * 4 * 4, dtype=torch.float32).view(16, 3, 4, 4)
    codes = torch.arange(16) % 8
    out = dihedral(x, codes)
    for i, code in enumerate(codes.tolist()):
        expected = x[i].flip(-1) if code & 4 else x[i]
        expected = torch.rot90(expected, k=code & 3, dims=(-2, -1))
        assert torch.equal(out[i], expected), code


def test_the_probe_joins_each_evaluation_and_does_not_count_as_training():
    calls = []

    def probe(model, pre):
        calls.append(model.training)
        assert pre["out_px"] == 24
        return {"match_core": 0.5}

    result = train_network(_cores(), _tiny(max_steps=4, eval_every=2), progress=False, probe=probe)
    assert [h["match_core"] for h in result.history] == [0.5, 0.5]
    assert calls == [False, False]  # the probe sees the network in eval mode
    seconds = [h["train_seconds"] for h in result.history]
    assert 0 < seconds[0] <= seconds[1] and result.seconds == pytest.approx(seconds[1], abs=0.1)


def test_a_time_budget_ends_the_run_on_the_schedules_full_course():
    """max_minutes stops a run whose steps would last longer, after the learning rate has
    decayed to zero, and evaluates its last step; the schedule follows the time spent."""
    result = train_network(
        _cores(), _tiny(max_steps=100_000, eval_every=100_000, max_minutes=0.01), progress=False
    )
    assert result.stopped == "max_minutes" and 1 < result.steps < 100_000
    assert result.history[-1]["step"] == result.steps and result.history[-1]["lr"] == 0.0
    cfg = _tiny(max_steps=1000, warmup_steps=0)
    assert _lr_factor(10, cfg, time_used=0.5) == pytest.approx(0.5)
    assert _lr_factor(999, cfg, time_used=0.0) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ConfigError, match="max_minutes"):
        _tiny(max_minutes=0.0)
    # the demo's budget, unless steps are asked for without minutes
    assert get_config("demo").max_minutes == 5.0
    assert get_config("demo", max_steps=5000).max_minutes is None
    assert get_config("demo", max_steps=5000, max_minutes=30.0).max_minutes == 30.0
