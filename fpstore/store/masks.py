"""Remembered tissue masks: one small file per slide file and mask settings.

Derived data under ``cache/`` (``StoreLayout.tissue_mask_file``): a packed boolean mask and
a JSON document (the slide's geometry, the mask's scale), written atomically. A file that
cannot be read counts as absent: the mask is computed again and the file replaced.
"""

from __future__ import annotations

import io
import json

import numpy as np

from fpstore.store.io import write_npz_atomic
from fpstore.store.layout import StoreLayout


def read_mask(store, settings: str, slide: str) -> tuple[np.ndarray, dict] | None:
    """(boolean mask, document) stored for ``slide`` under ``settings``; None if absent or
    unreadable."""
    path = StoreLayout.of(store).tissue_mask_file(settings, slide)
    try:
        if not path.is_file():
            return None
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as found:
            shape = tuple(int(v) for v in found["shape"])
            bits = np.unpackbits(found["bits"], count=int(np.prod(shape)))
            document = json.loads(found["document"].tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError):  # damaged or half-written by old code
        return None
    return bits.reshape(shape).astype(bool), document


def write_mask(store, settings: str, slide: str, mask: np.ndarray, document: dict):
    """Store a boolean mask and its document (atomic: temp name + rename, or one PUT)."""
    mask = np.asarray(mask, bool)
    arrays = {
        "shape": np.asarray(mask.shape, np.int64),
        "bits": np.packbits(mask.ravel()),
        "document": np.frombuffer(json.dumps(document, sort_keys=True).encode(), np.uint8),
    }
    return write_npz_atomic(arrays, StoreLayout.of(store).tissue_mask_file(settings, slide))
