"""The fingerprint network's pieces: loss against a hand computation, fingerprint shapes and
L2 normalisation, augmentation that keeps pairs aligned, checkpoints that describe themselves."""

import math

import pytest
import torch

from fpstore.encoders.checkpoint import load_checkpoint, save_checkpoint, weights_hash
from fpstore.encoders.fingerprint_net import FingerprintNet, to_input
from fpstore.errors import ConfigError, EncoderError
from fpstore.fingerprint.augment import AugmentConfig, augment_pair, dihedral
from fpstore.fingerprint.losses import fingerprint_distance, fingerprint_loss


def _ce(logits, label):
    return -math.log(math.exp(logits[label]) / sum(math.exp(v) for v in logits))


def test_loss_matches_hand_computation():
    logits1 = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    logits2 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    y = torch.tensor([0, 1])
    fp1 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # normalised: (0.6, 0.8), (1, 0)
    fp2 = torch.tensor([[0.0, 2.0], [0.0, 5.0]])  # normalised: (0, 1), (0, 1)
    ce1 = (_ce([2, 0, -1], 0) + _ce([0.5, 0.5, 0], 1)) / 2
    ce2 = (_ce([1, 1, 0], 0) + _ce([0, 3, 0], 1)) / 2
    se = ((0.6 - 0) ** 2 + (0.8 - 1) ** 2 + (1 - 0) ** 2 + (0 - 1) ** 2) / 2
    parts = fingerprint_loss(logits1, y, logits2, fp1, fp2, gamma=0.5)
    assert parts.ce1.item() == pytest.approx(ce1, rel=1e-6)
    assert parts.ce2.item() == pytest.approx(ce2, rel=1e-6)
    assert parts.se.item() == pytest.approx(se, rel=1e-6)
    assert parts.total.item() == pytest.approx(ce1 + ce2 + 0.5 * se, rel=1e-6)
    # Without a restyled twin the loss is the cross entropy alone (experiments 1 and 2).
    assert fingerprint_loss(logits1, y).total.item() == pytest.approx(ce1, rel=1e-6)


def test_label_smoothing_spreads_the_target_over_the_classes():
    logits, y, e = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0]), 0.1
    log_p = [-_ce([2, 0, -1], k) for k in range(3)]  # log softmax
    smoothed = -((1 - e) * log_p[0] + e * sum(log_p) / 3)
    assert fingerprint_loss(logits, y, smoothing=e).total.item() == pytest.approx(smoothed, 1e-6)
    assert fingerprint_loss(logits, y, smoothing=e).total > fingerprint_loss(logits, y).total


def test_fingerprint_distance_ignores_scale():
    a = torch.randn(4, 512)
    assert fingerprint_distance(a, 7.5 * a).item() == pytest.approx(0.0, abs=1e-6)
    assert fingerprint_distance(a, -a).item() == pytest.approx(4.0, rel=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet10-slim"])
def test_shapes_and_input_normalisation(arch):
    torch.manual_seed(0)
    model = FingerprintNet(5, arch).eval()
    batch = torch.randint(0, 256, (3, 48, 48, 3), dtype=torch.uint8)
    x = to_input(batch, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), out_px=32)
    assert x.shape == (3, 3, 32, 32)
    with torch.no_grad():
        fp, logits = model.forward_both(x)
        assert fp.shape == (3, 512) and logits.shape == (3, 5)
        assert torch.allclose(model.features(x), fp) and torch.allclose(model(x), logits)
    assert torch.nn.functional.normalize(fp, dim=1).norm(dim=1).sub(1).abs().max() < 1e-5
    flat = to_input(
        torch.full((1, 8, 8, 3), 128, dtype=torch.uint8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    )
    assert torch.allclose(flat, torch.full_like(flat, (128 / 255 - 0.5) / 0.25), atol=1e-6)
    with pytest.raises(ConfigError, match="resnet18"):
        FingerprintNet(3, "resnet50")


def test_dihedral_codes_and_pairs_share_geometry():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    codes = torch.tensor([1, 4])
    out = dihedral(x, codes)
    assert torch.equal(out[0], torch.rot90(x[0], 1, (-2, -1)))
    assert torch.equal(out[1], x[1].flip(-1))
    # A pair made of the same pixels stays pixel-identical without colour changes.
    cfg = AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0, grayscale_p=0)
    img = torch.rand(8, 3, 16, 16)
    a, b = augment_pair(img, img.clone(), cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, img)


def test_dihedral_gathers_on_the_cpu_as_the_device_path_selects():
    from fpstore.fingerprint.augment import _dihedral_where

    x = torch.rand(40, 3, 8, 8)
    codes = torch.arange(40) % 8  # every code, five times
    assert torch.equal(dihedral(x, codes), _dihedral_where(x, codes))


def test_photometric_augmentation_stays_in_range_and_varies():
    cfg = AugmentConfig(grayscale_p=1.0)
    img = torch.rand(4, 3, 8, 8)
    out, _ = augment_pair(img, None, cfg, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(
        out[:, 1], out[:, 2]
    )  # grayscale
    with pytest.raises(ConfigError, match="grayscale_p"):
        AugmentConfig(grayscale_p=1.5)


def _meta():
    return {
        "preprocessing": {
            "mean": [0.8, 0.6, 0.7],
            "std": [0.1, 0.2, 0.1],
            "patch_um": 112.0,
            "out_px": 224,
            "mpp": 0.5,
        },
        "data": {"classes": ["t:1", "t:2", "t:3"], "class_patients": ["p1", "p1", "p2"]},
    }


@pytest.mark.parametrize(
    "arch, neck", [("resnet18", False), ("resnet10-slim", False), ("resnet10-slim", True)]
)
def test_checkpoint_round_trip_and_encoder(tmp_path, arch, neck):
    torch.manual_seed(0)
    model = FingerprintNet(3, arch, neck=neck)
    with torch.no_grad():  # batch statistics move the neck's running mean and variance
        model.train()(torch.randn(4, 3, 32, 32) + 1.0)
    path = tmp_path / "fp.pt"
    meta = save_checkpoint(path, model, _meta())
    assert meta["arch"] == arch and meta["dim"] == 512 and meta["n_classes"] == 3
    assert meta["neck"] is neck
    assert meta["content_hash"] == weights_hash(model.state_dict())
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta["preprocessing"]["patch_um"] == 112.0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval().features(x), loaded.features(x))

    from fpstore.encoders.registry import create_encoder

    encoder = create_encoder("fingerprint", checkpoint=path)
    assert encoder.dim == 512 and encoder.weights_hash == meta["content_hash"]
    assert encoder.preprocessing.mean == (0.8, 0.6, 0.7)


def test_the_neck_standardises_the_fingerprint_and_the_pair_loss_sees_the_vector_before_it():
    torch.manual_seed(0)
    model = FingerprintNet(3, "resnet10-slim", neck=True)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before, logits = model.forward_both(x)
        assert torch.allclose(before, model.backbone(x))
        assert torch.allclose(model.features(x), model.neck(before))
        assert not torch.allclose(model.features(x), before)
        assert torch.allclose(logits, model.head(model.features(x)))
    assert not model.neck.bias.requires_grad and model.neck.weight.requires_grad
    plain = FingerprintNet(3, "resnet10-slim")
    assert not plain.has_neck and set(plain.state_dict()) < set(model.state_dict())


def test_damaged_or_foreign_checkpoints_are_refused(tmp_path):
    model = FingerprintNet(2, "resnet18")
    path = tmp_path / "fp.pt"
    save_checkpoint(path, model, _meta())
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["head.bias"] += 1.0
    torch.save(blob, tmp_path / "edited.pt")
    with pytest.raises(EncoderError, match="content hash"):
        load_checkpoint(tmp_path / "edited.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(EncoderError, match="not an fpstore fingerprint checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(EncoderError, match="cannot read"):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(EncoderError, match="train-fingerprint"):
        load_checkpoint(tmp_path / "missing.pt")
