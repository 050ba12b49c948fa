"""Self-describing checkpoints of the fingerprint network.

One torch file holds the weights and ``meta``: arch, dim, n_classes, preprocessing
(mean, std, patch_um, out_px, mpp), the training config, a data summary (classes and
their patients, sections, sites, stain method), the training history, and
``content_hash``: the sha256 of the weights' bytes (names, dtypes, shapes, values in key
order), which the feature store records so fingerprints of different weights never mix.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

import fpstore
from fpstore.encoders.fingerprint_net import FingerprintNet
from fpstore.errors import EncoderError
from fpstore.store.io import remove_dead_temporaries, write_atomic

FORMAT = "fpstore-fingerprint/1"
REQUIRED_META = ("arch", "n_classes", "dim", "preprocessing")


def weights_hash(state_dict: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(
            tensor.numpy().tobytes()
            if tensor.dtype != torch.bfloat16
            else tensor.view(torch.int16).numpy().tobytes()
        )
    return digest.hexdigest()


def save_checkpoint(path: Path, model: FingerprintNet, meta: dict) -> dict:
    """Write ``model`` with ``meta`` (completed with arch, dim, n_classes, content_hash) to
    ``path`` atomically; returns the full meta."""
    missing = [k for k in ("preprocessing",) if k not in meta]
    if missing:
        raise EncoderError(f"checkpoint meta lacks {missing}; the encoder needs them to extract")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    full = {
        **meta,
        "arch": model.arch,
        "dim": model.dim,
        "n_classes": model.n_classes,
        "head": model.head_kind,
        "neck": model.has_neck,
        "content_hash": weights_hash(state),
        "fpstore_version": fpstore.__version__,
    }
    path = Path(path)
    remove_dead_temporaries(path)  # what a killed training left (hidden: .<name>.<pid>.*.tmp)
    write_atomic(
        path,
        lambda handle: torch.save({"format": FORMAT, "state_dict": state, "meta": full}, handle),
    )
    return full


def load_checkpoint(
    path: Path, map_location="cpu", verify: bool = True
) -> tuple[FingerprintNet, dict]:
    """(FingerprintNet in eval mode, meta) from a file written by ``save_checkpoint``."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(
            f"fingerprint checkpoint {path} does not exist; train one with "
            f"`fpstore train-fingerprint --out {path}`"
        )
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Weights only load failed" in reason:  # torch's advice to unpickle is not for us
            reason = "not a torch file of tensors (fpstore never unpickles objects)"
        raise EncoderError(f"cannot read {path} as a fingerprint checkpoint: {reason}") from error
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise EncoderError(
            f"{path} is not an fpstore fingerprint checkpoint (format {FORMAT} expected)"
        )
    meta = blob["meta"]
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise EncoderError(f"{path}: checkpoint meta lacks {missing}")
    if verify and weights_hash(blob["state_dict"]) != meta.get("content_hash"):
        raise EncoderError(f"{path}: weights do not match their content hash; the file is damaged")
    # checkpoints from before the cosine head have a linear one, from before the neck none
    model = FingerprintNet(
        int(meta["n_classes"]),
        arch=meta["arch"],
        head=meta.get("head", "linear"),
        neck=bool(meta.get("neck", False)),
    )
    model.load_state_dict(blob["state_dict"])
    return model.eval(), meta
