"""The encoder registry: ``create_encoder(name, **kw)``, ``list_encoders()``.

Factories register themselves where they are defined (``@register_encoder``); the built-in
modules are imported on first use, so importing the registry costs nothing.

Names:
    fingerprint           a checkpoint fpstore trained (checkpoint=PATH)
    imagenet-resnet34     torchvision ResNet34, ImageNet weights from weights=PATH or the
                          torchvision cache (never downloaded)
    random-resnet34       seeded random weights (seed=0), for tests and the demo
    torchvision:<arch>    any torchvision classification backbone, weights=PATH or the cache
    timm:<arch>           any timm backbone, weights=PATH
    uni, uni2-h, virchow, virchow2, h-optimus-0, h-optimus-1, h0-mini, gigapath
                          pathology foundation models (fpstore.encoders.foundation): timm
                          with each model card's arguments, weights=FILE_OR_FOLDER, the local
                          Hugging Face cache, or download=True
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from fpstore.errors import EncoderError, unknown_name

_BUILTIN_MODULES = (
    "fpstore.encoders.fingerprint",
    "fpstore.encoders.torchvision_models",
    "fpstore.encoders.timm_models",
    "fpstore.encoders.foundation",
)
# Options that act once and are not how to build the encoder again: a download lands the
# weights in the Hugging Face cache, where a later build finds them offline.
_ONE_OFF_OPTIONS = ("download",)
_NAMES: dict = {}
_PREFIXES: dict = {}
_loaded = False


def register_encoder(name: str, prefix: bool = False):
    """Decorator: ``factory(**kw) -> Encoder`` under ``name`` (``prefix``: ``name:<arch>``,
    the factory taking ``arch`` first). Names are unique."""

    def register(factory):
        table = _PREFIXES if prefix else _NAMES
        if name in _NAMES or name in _PREFIXES or ":" in name:
            raise EncoderError(f"encoder name {name!r} is taken or contains ':'; choose another")
        table[name] = factory
        return factory

    return register


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def list_encoders() -> list[str]:
    """The registered names; ``torchvision:<arch>`` and ``timm:<arch>`` take any backbone."""
    _load_builtins()
    return sorted(_NAMES) + [f"{p}:<arch>" for p in sorted(_PREFIXES)]


def create_encoder(name: str, **kw):
    """Build the encoder ``name`` on the CPU in fp32 (see ``Encoder.prepare``)."""
    _load_builtins()
    prefix, sep, arch = name.partition(":")
    if sep and prefix in _PREFIXES and arch:
        factory, args = _PREFIXES[prefix], (arch,)
    elif name in _NAMES:
        factory, args = _NAMES[name], ()
    else:
        raise unknown_name("encoder", name, list_encoders())
    try:
        inspect.signature(factory).bind(*args, **kw)
    except TypeError as error:
        params = [p for p in inspect.signature(factory).parameters if p != "arch"]
        raise EncoderError(f"encoder {name!r} takes options {params}, got {sorted(kw)}") from error
    encoder = factory(*args, **kw)
    options = {k: _portable(v) for k, v in kw.items() if k not in _ONE_OFF_OPTIONS}
    encoder.spec = {"name": name, "options": options}
    return encoder


def _portable(value):
    """An option as JSON: paths absolute (a file named relative to one folder is found from
    any other)."""
    if isinstance(value, Path):
        return str(value.resolve())
    return value
