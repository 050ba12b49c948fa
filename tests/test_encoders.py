"""The encoder registry: names, weights from files only, preprocessing on the device."""

import pytest
import torch

from fpstore.encoders.base import IMAGENET_MEAN, IMAGENET_STD, state_dict_hash
from fpstore.encoders.registry import create_encoder, list_encoders
from fpstore.errors import ConfigError, EncoderError


def test_unknown_encoder_lists_the_valid_names():
    with pytest.raises(ConfigError, match="random-resnet34") as info:
        create_encoder("resnet-35")
    assert "imagenet-resnet34" in str(info.value) and "torchvision:<arch>" in str(info.value)
    assert {"fingerprint", "imagenet-resnet34", "random-resnet34"} <= set(list_encoders())


@pytest.fixture(scope="module")
def r34():
    return create_encoder("random-resnet34")


def test_random_resnet34_is_seeded_and_hash_tracks_weights_and_preprocessing(r34):
    a, b = r34, create_encoder("random-resnet34")
    assert a.dim == 512 and a.hash == b.hash and a.weights_hash == b.weights_hash
    other_seed = create_encoder("random-resnet34", seed=1)
    assert other_seed.weights_hash != a.weights_hash
    other_size = create_encoder("random-resnet34", patch_um=56.0)
    assert other_size.weights_hash == a.weights_hash and other_size.hash != a.hash


def test_encode_normalises_uint8_on_the_device_like_the_reference(r34):
    enc = r34.prepare("cpu")
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    out = enc.encode(pixels)
    assert out.shape == (3, 512) and out.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    reference = (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(enc.normalise(pixels), reference, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(out, enc.backbone(reference), rtol=1e-4, atol=1e-4)
    with pytest.raises(EncoderError, match="uint8"):
        enc.encode(pixels.float())


def test_imagenet_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(EncoderError, match="weights=PATH") as info:
        create_encoder("imagenet-resnet34")
    assert str(tmp_path / "hub" / "checkpoints") in str(info.value)
    assert not (tmp_path / "hub").exists()


def test_torchvision_backbone_from_a_local_weights_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    enc = create_encoder("torchvision:resnet18", weights=path)
    assert enc.id == "torchvision-resnet18" and enc.dim == 512
    assert enc.weights_hash == state_dict_hash(model)
    out = enc.prepare("cpu").encode(torch.zeros((1, 32, 32, 3), dtype=torch.uint8))
    assert out.shape == (1, 512)
    # The same file under the cache name is what imagenet-resnet34 would read: a wrong
    # architecture is refused with the keys that do not fit.
    with pytest.raises(EncoderError, match="do not fit resnet34"):
        create_encoder("imagenet-resnet34", weights=path)
    with pytest.raises(EncoderError, match="does not exist"):
        create_encoder("torchvision:resnet18", weights=tmp_path / "missing.pth")


def test_bad_options_and_precision_are_errors(r34):
    with pytest.raises(EncoderError, match="takes options"):
        create_encoder("random-resnet34", checkpoint="x.pt")
    with pytest.raises(EncoderError, match="needs checkpoint"):
        create_encoder("fingerprint")
    enc = r34
    with pytest.raises(ConfigError, match="precision"):
        enc.prepare("cpu", "int4")
    with pytest.raises(EncoderError, match="CUDA"):
        enc.prepare("cpu", "fp16")
    with pytest.raises(EncoderError, match="CPU path"):
        enc.prepare("cpu", "int8", compile=True)


def test_bf16_autocast_agrees_with_fp32(r34):
    enc = r34.prepare("cpu")
    pixels = torch.randint(
        0, 256, (2, 48, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    reference = enc.encode(pixels)
    low = enc.prepare("cpu", "bf16").encode(pixels)
    assert low.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(low, reference).min() > 0.99


def test_int8_needs_calibration_and_agrees_with_fp32_on_unseen_patches():
    enc = create_encoder("random-resnet34", patch_um=56.0, out_px=64)
    gen = torch.Generator().manual_seed(0)
    # Smooth, H&E-like pixels: a pink base with blobs, not white noise.
    base = torch.tensor([200, 120, 180], dtype=torch.float32)
    blobs = torch.nn.functional.interpolate(
        torch.rand(24, 3, 8, 8, generator=gen), size=64, mode="bilinear"
    )
    pixels = (
        (base.view(1, 3, 1, 1) - 120 * blobs)
        .clamp(0, 255)
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .contiguous()
    )
    reference = enc.prepare("cpu").encode(pixels)
    enc.prepare("cpu", "int8")
    with pytest.raises(EncoderError, match="calibrate"):
        enc.encode(pixels)
    agreement = enc.calibrate(pixels[:16])
    assert agreement["n_fit"] == 8 and agreement["n_check"] == 8
    assert agreement["min_cosine"] > 0.99
    low = enc.encode(pixels[16:])  # patches the calibration never saw
    assert low.dtype == torch.float32 and low.shape == (8, 512)
    assert torch.nn.functional.cosine_similarity(low, reference[16:]).min() > 0.99
    with pytest.raises(EncoderError, match="at least 4"):
        enc.prepare("cpu", "int8").calibrate(pixels[:2])


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 {extra}\nbugs\t\t: spectre\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    from fpstore.encoders.base import native_bf16_flags

    assert native_bf16_flags(CPUINFO.format(extra="avx512f")) == []
    assert native_bf16_flags(CPUINFO.format(extra="avx512_bf16 amx_bf16")) == [
        "amx_bf16",
        "avx512_bf16",
    ]
    assert native_bf16_flags("") == []


def test_auto_precision_is_bf16_only_where_the_cpu_has_it_and_explicit_choices_stay(monkeypatch):
    import fpstore.encoders.base as base

    monkeypatch.setattr(base, "native_bf16_flags", lambda: [])
    choice = base.resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and "no native bf16" in choice.reason
    monkeypatch.setattr(base, "native_bf16_flags", lambda: ["amx_bf16"])
    choice = base.resolve_precision("auto", "cpu")
    assert choice.precision == "bf16" and "amx_bf16" in choice.reason
    # int8 is never chosen for the user, and an explicit choice is kept as it is.
    assert base.resolve_precision("int8", "cpu") == base.PrecisionChoice("int8", "asked for")
    assert base.resolve_precision("fp32", "cpu").precision == "fp32"
    with pytest.raises(ConfigError, match="precision"):
        base.resolve_precision("fp8", "cpu")


def test_auto_precision_on_a_gpu_follows_its_bf16_units(monkeypatch):
    import fpstore.encoders.base as base

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert base.resolve_precision("auto", "cuda") == base.PrecisionChoice(
        "bf16", "auto: Test GPU has bf16 units"
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert base.resolve_precision("auto", "cuda").precision == "fp32"


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_backbone_gets_its_input_in_the_layout_prepare_chose(channels_last):
    """A channels_last input makes the convolutions channels_last whatever the weights'
    layout, so an encoder prepared without it is fed contiguous input."""
    encoder = create_encoder("random-resnet34").prepare("cpu", "fp32", channels_last)
    layouts = []
    encoder.backbone.register_forward_pre_hook(
        lambda module, args: layouts.append(
            (
                args[0].is_contiguous(memory_format=torch.channels_last),
                args[0].is_contiguous(),
                module.conv1.weight.is_contiguous(memory_format=torch.channels_last),
            )
        )
    )
    encoder.encode(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    want = (True, False, True) if channels_last else (False, True, False)
    assert layouts == [want]
