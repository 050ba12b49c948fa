"""Tissue masks remembered in the store, so that each slide is planned once.

A slide's mask (``tissue_mask``) costs a read of the whole slide at 8 um/px and the
morphology on it: about a second per slide, on every rerun, before the first patch. It is
stored once per slide file and mask settings (``fpstore.store.masks``), keyed by

    slide     the file's absolute path, size and modification time, and the mpp override
    settings  the fields of TissueMaskSpec and a digest of the code that computes the mask
              (tissue_mask.py, Slide.read_downsampled, resize_image): a changed algorithm
              computes new masks instead of reusing old ones

with the slide's geometry (SlideInfo) beside it, so that a rerun plans a slide without
opening it. Patch grids are derived from the mask in milliseconds and are not stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from fpstore.slides.slide import Slide, SlideInfo, open_slide, resize_image
from fpstore.slides.tissue_mask import TissueMask, TissueMaskSpec, tissue_mask


@lru_cache(maxsize=8)
def settings_digest(spec: TissueMaskSpec) -> str:
    """The mask settings and the code that applies them, as one short digest."""
    from fpstore.slides import pen, tissue_mask

    code = "".join(
        inspect.getsource(part) for part in (tissue_mask, pen, Slide.read_downsampled, resize_image)
    )
    text = json.dumps({"spec": dataclasses.asdict(spec), "code": code}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def slide_digest(path: str | Path, mpp: float | None) -> str | None:
    """The identity of a slide file (path, size, mtime) and its mpp override; None when the
    file cannot be stat'ed (opening it will then say why)."""
    path = os.path.abspath(path)
    try:
        stat = os.stat(path)
    except OSError:
        return None
    text = json.dumps([path, stat.st_size, stat.st_mtime_ns, mpp])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def remembered_mask(
    path: str | Path,
    mpp: float | None = None,
    store=None,
    spec: TissueMaskSpec | None = None,
    slide: Slide | None = None,
) -> tuple[SlideInfo, TissueMask]:
    """(SlideInfo, TissueMask) of the slide file at ``path`` with mpp override ``mpp``.

    Read from ``store`` when it holds the mask of this file with these settings; otherwise
    computed (on ``slide`` when an open one is given, else the file is opened here) and
    stored. ``store=None`` computes it and stores nothing; ``spec=None``: the default
    TissueMaskSpec. Raises SlideError for a slide that cannot be read, as ``open_slide`` does.
    """
    from fpstore.store.masks import read_mask, write_mask

    spec = spec or TissueMaskSpec()
    settings = settings_digest(spec)
    key = slide_digest(path, mpp) if store is not None else None
    if key is not None:
        found = read_mask(store, settings, key)
        if found is not None:
            arrays, document = found
            return _info(document["info"], path), TissueMask(**arrays, **document["fields"])
    if slide is None:
        with open_slide(path, mpp=mpp) as opened:
            info, mask = opened.info, tissue_mask(opened, spec)
    else:
        info, mask = slide.info, tissue_mask(slide, spec)
    if key is not None:
        # Remembering is an optimisation: a store that refuses the write (read-only, full)
        # costs the next run this mask again, not this run its slide.
        with contextlib.suppress(OSError):
            arrays, fields = _split(mask)
            write_mask(store, settings, key, arrays, {"info": info.to_dict(), "fields": fields})
    return info, mask


def _split(mask: TissueMask) -> tuple[dict, dict]:
    """A TissueMask's fields: (its per-pixel boolean layers, the rest), whatever they are."""
    arrays, fields = {}, {}
    for field in dataclasses.fields(mask):
        value = getattr(mask, field.name)
        if isinstance(value, np.ndarray):
            arrays[field.name] = value
        else:
            fields[field.name] = value
    return arrays, fields


def _info(document: dict, path) -> SlideInfo:
    return SlideInfo(
        **{
            **document,
            "path": str(path),
            "level_downsamples": tuple(float(v) for v in document["level_downsamples"]),
            "level_dimensions": tuple(
                tuple(int(v) for v in d) for d in document["level_dimensions"]
            ),
        }
    )
