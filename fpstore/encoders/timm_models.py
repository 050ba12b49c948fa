"""timm backbones by name, weights from a local file."""

from __future__ import annotations

from pathlib import Path

from fpstore.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    Preprocessing,
    load_weights,
    state_dict_hash,
)
from fpstore.encoders.registry import register_encoder
from fpstore.errors import EncoderError


@register_encoder("timm", prefix=True)
def timm_backbone(arch: str, weights: str | Path | None = None) -> Encoder:
    try:
        import timm
    except ImportError as error:
        raise EncoderError(f"timm:{arch} needs the timm package: pip install timm") from error
    if weights is None:
        raise EncoderError(f"timm:{arch} needs weights=PATH (fpstore never downloads weights)")
    try:
        model = timm.create_model(arch, pretrained=False)
    except RuntimeError as error:  # timm's unknown-model error
        raise EncoderError(f"timm: {error}") from error
    load_weights(model, Path(weights), arch)
    digest = state_dict_hash(model)
    model.reset_classifier(0)
    cfg = model.pretrained_cfg or {}
    pre = Preprocessing(
        cfg.get("mean", IMAGENET_MEAN),
        cfg.get("std", IMAGENET_STD),
        112.0,
        int(cfg.get("input_size", (3, 224, 224))[-1]),
    )
    return Encoder(
        f"timm-{arch}",
        model,
        model.num_features,
        pre,
        digest,
        f"timm {arch}, weights from {weights}",
    )
