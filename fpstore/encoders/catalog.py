"""Every registered encoder with its dimension, scale, weights on this machine and licence:
what ``fpstore encoders list`` and ``show`` print. Offline: weights are looked for, never
fetched."""

from __future__ import annotations

from pathlib import Path

from fpstore.encoders.registry import list_encoders
from fpstore.errors import unknown_name

# The encoders that are not foundation models (their factories live beside them).
_BUILTIN = {
    "fingerprint": {
        "dim": 512,
        "weights": "a network `fpstore fingerprint train` saved (--checkpoint, default: the "
        "store's models/fingerprint/*.pt)",
        "licence": "yours (trained by fpstore on your arrays)",
    },
    "imagenet-resnet34": {
        "dim": 512,
        "licence": "BSD-3-Clause (torchvision's ImageNet weights)",
    },
    "random-resnet34": {
        "dim": 512,
        "weights": "none: seeded random weights (tests, the demo)",
        "licence": "-",
    },
    "timm:<arch>": {
        "dim": None,
        "weights": "--weights PATH (a state dict of that architecture)",
        "licence": "that of the weights you pass",
    },
    "torchvision:<arch>": {
        "dim": None,
        "weights": "--weights PATH, or torchvision's cache",
        "licence": "that of the weights you pass",
    },
}


def _builtin_row(name: str) -> dict:
    row = {
        "name": name,
        "kind": "built-in",
        "dim": _BUILTIN[name]["dim"],
        "patch_um": 112.0,
        "out_px": 224,
        "mpp": 0.5,
        "repo": None,
        "licence": _BUILTIN[name]["licence"],
    }
    if name == "imagenet-resnet34":
        from fpstore.encoders.torchvision_models import torchvision_cache_file

        path = torchvision_cache_file("resnet34")
        found = path is not None and Path(path).is_file()
        row["weights"] = "cache" if found else "missing"
        row["weights_path"] = str(path) if found else None
        row["fetch"] = None if found else f"put torchvision's ImageNet resnet34 file at {path}"
    else:
        row["weights"] = _BUILTIN[name]["weights"]
        row["weights_path"] = None
        row["fetch"] = None
    return row


def _foundation_row(model, cache_dir) -> dict:
    from fpstore.encoders.foundation import weights_status

    status = weights_status(model, cache_dir)
    return {
        "name": model.name,
        "kind": "foundation",
        "dim": model.dim,
        "patch_um": model.patch_um,
        "out_px": model.out_px,
        "mpp": model.mpp,
        "repo": model.repo,
        "licence": model.licence,
        "weights": status["status"],
        "weights_path": status["path"],
        "fetch": status["fetch"],
    }


def encoder_rows(cache_dir: str | Path | None = None) -> list[dict]:
    """One row per registered encoder (foundation models: weights looked up in the Hugging
    Face cache, ``cache_dir`` or its usual place)."""
    from fpstore.encoders.foundation import FOUNDATION

    rows = []
    for name in list_encoders():
        if name in FOUNDATION:
            rows.append(_foundation_row(FOUNDATION[name], cache_dir))
        elif name in _BUILTIN:
            rows.append(_builtin_row(name))
        else:  # registered by a plugin or a test: known by name only
            rows.append({"name": name, "kind": "registered", "dim": None, "weights": "?"})
    return rows


def encoder_details(name: str, cache_dir: str | Path | None = None) -> dict:
    """``name``'s row, and for a foundation model everything its entry holds (timm
    arguments, pooling, normalisation, sources)."""
    from fpstore.encoders.foundation import FOUNDATION

    rows = {row["name"]: row for row in encoder_rows(cache_dir)}
    if name not in rows:
        raise unknown_name("encoder", name, list(rows))
    if name in FOUNDATION:
        return {**FOUNDATION[name].describe(), **rows[name]}
    return rows[name]
