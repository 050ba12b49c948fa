"""Truth masks: label images of tissue types, and the true type of each stored patch.

A truth mask is a PNG per slide, named by the slide's file stem, with pixel values
0 background, 1 epithelium, 2 stroma, 3 fat (``TISSUE_TYPES`` order) at some downsample of
level 0. The downsample comes from ``truth.json`` in the same folder (``fpstore synth``
writes it) or from ``--downsample`` for a user's masks.

A patch's true type: background when more than ``background_above`` of its square is
background, else the most frequent tissue label inside the square.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fpstore.config import TISSUE_TYPES, check_range
from fpstore.errors import ConfigError


@dataclass(frozen=True)
class TruthMask:
    path: Path
    downsample: float  # level-0 pixels per mask pixel

    def __post_init__(self):
        check_range("TruthMask", "downsample", self.downsample, 1e-3, 1e6)

    def read(self) -> np.ndarray:
        """The label image as uint8 (H, W); values outside 0-3 are an error."""
        from PIL import Image

        with Image.open(self.path) as image:
            mask = np.asarray(image)
        if mask.ndim == 3:  # a grey PNG saved as RGB(A): all channels hold the label
            mask = mask[..., 0]
        bad = np.setdiff1d(np.unique(mask), np.arange(len(TISSUE_TYPES)))
        if len(bad):
            raise ConfigError(
                f"truth mask {str(self.path)!r} holds values {bad.tolist()[:10]}; a mask holds "
                + ", ".join(f"{i} {name}" for i, name in enumerate(TISSUE_TYPES))
            )
        return mask.astype(np.uint8)


def load_truth(truth: Path, downsample: float | None = None) -> dict[str, TruthMask]:
    """{slide file stem: TruthMask} from a folder of PNGs (or its truth.json).

    Downsamples come from ``truth.json`` when it lists the slide, else from ``downsample``.
    """
    truth = Path(truth)
    folder = truth.parent if truth.suffix == ".json" else truth
    if not folder.is_dir():
        raise ConfigError(f"--truth {str(truth)!r} is not a folder of mask PNGs or a truth.json")
    listed = _truth_json(folder / "truth.json")
    masks = {}
    for path in sorted(folder.glob("*.png")):
        factor = listed.get(path.stem, downsample)
        if factor is None:
            raise ConfigError(
                f"no downsample for truth mask {str(path)!r}: {folder}/truth.json does not list "
                "it; pass --downsample (level-0 pixels per mask pixel)"
            )
        masks[path.stem] = TruthMask(path, float(factor))
    if not masks:
        raise ConfigError(f"no truth masks (*.png) in {str(folder)!r}")
    return masks


def _truth_json(path: Path) -> dict[str, float]:
    """{mask stem: downsample} from truth.json, in either of its layouts."""
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"cannot parse {str(path)!r}: {error}") from error
    entries = document.get("slides", document) if isinstance(document, dict) else {}
    found = {}
    for key, entry in entries.items():
        if isinstance(entry, dict) and "downsample" in entry:
            stem = Path(entry.get("mask", key)).stem if entry.get("mask") else key
            found[stem] = float(entry["downsample"])
    return found


def find_mask(
    masks: dict[str, TruthMask], slide_id: str, slide_path: str | None
) -> TruthMask | None:
    """The mask of a slide: by the stem of its file, else by its slide id."""
    candidates = [slide_id]
    if slide_path:
        name = Path(slide_path).name
        candidates = [Path(slide_path).stem, name.split(".")[0], slide_id]
    return next((masks[c] for c in candidates if c in masks), None)


def patch_truth(
    mask: np.ndarray,
    downsample: float,
    x: np.ndarray,
    y: np.ndarray,
    size_px: np.ndarray,
    background_above: float = 0.5,
) -> np.ndarray:
    """True type index per patch (level-0 squares x, y, size_px) from a label image.

    Counts every label inside each square with per-label integral images, so that a
    slide's patches cost O(mask + patches), not O(patches * square).
    """
    n_types = len(TISSUE_TYPES)
    height, width = mask.shape
    integral = np.zeros((n_types, height + 1, width + 1), dtype=np.int64)
    for label in range(n_types):
        integral[label, 1:, 1:] = np.cumsum(np.cumsum(mask == label, 0), 1)

    def edge(v, limit):
        return np.clip(np.round(np.asarray(v, dtype=np.float64) / downsample), 0, limit).astype(int)

    x0, x1 = edge(x, width), edge(np.asarray(x) + size_px, width)
    y0, y1 = edge(y, height), edge(np.asarray(y) + size_px, height)
    # A square smaller than a mask pixel still reads the pixel it falls in.
    x1, y1 = np.maximum(x1, np.minimum(x0 + 1, width)), np.maximum(y1, np.minimum(y0 + 1, height))
    counts = (
        integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]
    ).T  # (N, n_types)
    total = counts.sum(axis=1)
    labels = 1 + counts[:, 1:].argmax(axis=1)
    background = counts[:, 0] > background_above * np.maximum(total, 1)
    labels[background | (total == 0)] = 0
    return labels


# --- truth as a list of patches (hand-labelled real images) --------------------------------

PATCH_TRUTH_COLUMNS = ("image", "mpp", "x", "y", "size_px", "tissue_type", "drawn")


@dataclass(frozen=True)
class TruthPatch:
    """One labelled square: ``size_px`` level-0 pixels at (x, y) of ``image`` read at ``mpp``."""

    image: Path  # resolved against the truth file's folder
    mpp: float
    x: int
    y: int
    size_px: int
    tissue_type: str
    drawn: str  # how the label was drawn: "grid cell", "rectangle", "whole tile", ...


def read_patch_truth(path: Path) -> list[TruthPatch]:
    """A CSV of labelled patches (``PATCH_TRUTH_COLUMNS``), image paths relative to the file.

    Every row is checked: a known tissue type, a positive mpp and size, a file that exists.
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"patch truth file {str(path)!r} does not exist")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in PATCH_TRUTH_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(
                f"patch truth file {str(path)!r} lacks columns {', '.join(missing)}; a patch "
                f"truth CSV has the columns {', '.join(PATCH_TRUTH_COLUMNS)}"
            )
        patches = [_truth_row(path, n, row) for n, row in enumerate(reader, start=2)]
    if not patches:
        raise ConfigError(f"patch truth file {str(path)!r} has no rows")
    return patches


def _truth_row(path: Path, line: int, row: dict) -> TruthPatch:
    where = f"{path}:{line}"
    if row["tissue_type"] not in TISSUE_TYPES:
        raise ConfigError(
            f"{where}: tissue_type {row['tissue_type']!r} is not one of {', '.join(TISSUE_TYPES)}"
        )
    try:
        mpp, x, y, size = float(row["mpp"]), int(row["x"]), int(row["y"]), int(row["size_px"])
    except ValueError as error:
        raise ConfigError(f"{where}: mpp, x, y and size_px must be numbers ({error})") from error
    if mpp <= 0 or size <= 0 or x < 0 or y < 0:
        raise ConfigError(f"{where}: mpp and size_px must be > 0 and x, y >= 0; got {row}")
    image = (path.parent / row["image"]).resolve()
    if not image.is_file():
        raise ConfigError(f"{where}: image {row['image']!r} not found next to {path.name}")
    return TruthPatch(image, mpp, x, y, size, row["tissue_type"], row["drawn"])
