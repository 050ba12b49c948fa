"""The fingerprint network: model, training, style transfer, the matching game, core maps.

``load_checkpoint``, ``save_checkpoint`` and ``FingerprintNet`` are importable from here;
torch is imported only when one of them is first used.
"""

_LAZY = {
    "load_checkpoint": "fpstore.fingerprint.checkpoint",
    "save_checkpoint": "fpstore.fingerprint.checkpoint",
    "FingerprintNet": "fpstore.fingerprint.model",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fpstore.fingerprint' has no attribute {name!r}")
