"""The fingerprint network as an encoder: a checkpoint that ``fpstore train-fingerprint`` wrote.

Each checkpoint gets its own encoder id, so that several trained networks live side by side in
one store: ``fingerprint-<file name>-<first 8 hex digits of the weights' hash>`` (the same
weights under the same name always get the same id; two networks never share one).
``fpstore extract --encoder-id`` names it otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fpstore.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    Preprocessing,
    state_dict_hash,
)
from fpstore.encoders.registry import register_encoder
from fpstore.errors import EncoderError


class _FeaturesOnly(torch.nn.Module):
    """The fingerprint network's penultimate layer (its 512-d fingerprint)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


def checkpoint_encoder_id(checkpoint: str | Path, content_hash: str) -> str:
    """``fingerprint-<file stem>-<hash[:8]>``, the stem reduced to letters, digits, ``_.-``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(checkpoint).stem).strip("-.") or "model"
    return f"fingerprint-{stem}-{content_hash[:8]}"


@register_encoder("fingerprint")
def fingerprint(checkpoint: str | Path | None = None) -> Encoder:
    if checkpoint is None:
        raise EncoderError(
            "encoder 'fingerprint' needs checkpoint=PATH "
            "(a file written by `fpstore train-fingerprint`)"
        )
    from fpstore.encoders.checkpoint import load_checkpoint

    model, meta = load_checkpoint(Path(checkpoint))
    pre = meta.get("preprocessing") or {}
    preprocessing = Preprocessing(
        pre.get("mean", IMAGENET_MEAN),
        pre.get("std", IMAGENET_STD),
        pre.get("patch_um", 112.0),
        pre.get("out_px", 224),
    )
    digest = meta.get("content_hash") or meta.get("hash") or state_dict_hash(model)
    dim = int(meta.get("dim", getattr(model, "feature_dim", 512)))
    return Encoder(
        checkpoint_encoder_id(checkpoint, str(digest)),
        _FeaturesOnly(model),
        dim,
        preprocessing,
        str(digest),
        f"fingerprint network from {checkpoint}",
    )
