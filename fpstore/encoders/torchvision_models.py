"""torchvision backbones: any classification model by name, ImageNet ResNet34, random ResNet34.

Weights come from a file the user gives or from the torchvision cache; never downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fpstore.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    Preprocessing,
    load_weights,
    state_dict_hash,
)
from fpstore.encoders.registry import register_encoder
from fpstore.errors import EncoderError, unknown_name


def _strip_head(model: torch.nn.Module, arch: str) -> int:
    """Replace the classification layer with Identity; return the feature dimension."""
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, torch.nn.Linear):
            setattr(model, attr, torch.nn.Identity())
            return head.in_features
        if isinstance(head, torch.nn.Sequential):
            linears = [i for i, m in enumerate(head) if isinstance(m, torch.nn.Linear)]
            if linears:
                dim = head[linears[-1]].in_features
                head[linears[-1]] = torch.nn.Identity()
                return dim
    raise EncoderError(
        f"torchvision:{arch}: no classification head found to remove; "
        "use a classification backbone (resnet*, densenet*, efficientnet_*, ...)"
    )


def torchvision_cache_file(arch: str) -> Path | None:
    """Where torchvision keeps the default ImageNet weights of ``arch``, if it has any."""
    import torchvision

    try:
        url = torchvision.models.get_model_weights(arch).DEFAULT.url
    except (ValueError, AttributeError):
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


@register_encoder("torchvision", prefix=True)
def torchvision_backbone(
    arch: str,
    weights: str | Path | None = None,
    *,
    encoder_id: str | None = None,
    patch_um: float = 112.0,
    out_px: int = 224,
) -> Encoder:
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise unknown_name(
            "torchvision classification model",
            arch,
            torchvision.models.list_models(module=torchvision.models),
        )
    if weights is None:
        weights = torchvision_cache_file(arch)
        if weights is None or not weights.is_file():
            raise EncoderError(
                f"no local weights for torchvision:{arch}: pass weights=PATH, or put the "
                f"ImageNet file at {weights} (fpstore never downloads weights)"
            )
    weights = Path(weights)
    model = torchvision.models.get_model(arch, weights=None)
    load_weights(model, weights, arch)
    digest = state_dict_hash(model)
    dim = _strip_head(model, arch)
    return Encoder(
        encoder_id or f"torchvision-{arch}",
        model,
        dim,
        Preprocessing(IMAGENET_MEAN, IMAGENET_STD, patch_um, out_px),
        digest,
        f"torchvision {arch}, ImageNet weights from {weights}",
    )


@register_encoder("imagenet-resnet34")
def imagenet_resnet34(weights: str | Path | None = None, **kw) -> Encoder:
    return torchvision_backbone("resnet34", weights, encoder_id="imagenet-resnet34", **kw)


@register_encoder("random-resnet34")
def random_resnet34(seed: int = 0, patch_um: float = 112.0, out_px: int = 224) -> Encoder:
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.resnet34(weights=None)
    model.fc = torch.nn.Identity()
    return Encoder(
        "random-resnet34",
        model,
        512,
        Preprocessing(IMAGENET_MEAN, IMAGENET_STD, patch_um, out_px),
        state_dict_hash(model),
        f"ResNet34 with random weights (seed {seed})",
    )
