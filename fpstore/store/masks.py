"""Remembered tissue masks: one small file per slide file and mask settings.

Derived data under ``cache/`` (``StoreLayout.tissue_mask_file``): named boolean arrays
(the mask, and any other per-pixel layer the mask carries), each packed to bits, and a JSON
document (the slide's geometry, the mask's scale), written atomically. A file that cannot be
read counts as absent: the mask is computed again and the file replaced.
"""

from __future__ import annotations

import io
import json

import numpy as np

from fpstore.store.io import write_npz_atomic
from fpstore.store.layout import StoreLayout


def read_mask(store, settings: str, slide: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """({name: boolean array}, document) stored for ``slide`` under ``settings``; None if
    absent or unreadable."""
    path = StoreLayout.of(store).tissue_mask_file(settings, slide)
    try:
        if not path.is_file():
            return None
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as found:
            document = json.loads(found["document"].tobytes().decode())
            arrays = {}
            for name in document["arrays"]:
                shape = tuple(int(v) for v in found[f"{name}.shape"])
                bits = np.unpackbits(found[f"{name}.bits"], count=int(np.prod(shape)))
                arrays[name] = bits.reshape(shape).astype(bool)
    except (OSError, ValueError, KeyError, EOFError):  # damaged, or written by other code
        return None
    return arrays, document


def write_mask(store, settings: str, slide: str, arrays: dict[str, np.ndarray], document: dict):
    """Store boolean arrays and a document (atomic: temp name + rename, or one PUT)."""
    packed = {
        "document": np.frombuffer(
            json.dumps({**document, "arrays": sorted(arrays)}, sort_keys=True).encode(), np.uint8
        )
    }
    for name, array in arrays.items():
        array = np.asarray(array, bool)
        packed[f"{name}.shape"] = np.asarray(array.shape, np.int64)
        packed[f"{name}.bits"] = np.packbits(array.ravel())
    return write_npz_atomic(packed, StoreLayout.of(store).tissue_mask_file(settings, slide))
