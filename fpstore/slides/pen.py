"""Pen and ink on a slide: marker strokes (blue, green, black, red) and ink blots.

Works in optical density (OD = -ln((I + 1) / 256) per channel) on the
low-resolution image the tissue mask is made from. Hematoxylin and eosin both
absorb green the most, so H&E keeps OD_R / OD_G below ~0.8 and, unless very
red, OD_B / OD_G below ~0.9. Marker ink breaks that: blue and green ink absorb
red at least as much as green (OD_R / OD_G >= ~1), black absorbs the three
alike and is dark, red absorbs blue as much as green but hardly any red.

A stroke over tissue mixes with the stain: blue over pink reads purple, like
hematoxylin. So pixels are taken in steps. Seeds are unambiguous ink (mostly
where a stroke crosses glass, which is where pen is drawn). Near the seeds,
weaker pen colour is added when it is connected to them: a red/green ratio
still above tissue's, or an OD direction off the slide's own H&E plane (the
plane through the OD of the slide's tissue away from the pen, fitted per slide
because stain hues differ between labs; H&E mixtures lie on it, ink over stain
does not). Red marker is too close to red blood cells to trust colour alone: a
red component counts only when it is shaped like a stroke, long and thin.

Colours are classified once per quantised colour (6 bits per channel) instead
of per pixel, and pen is looked for at 16 um/px: on a 5000 x 4000 mask at
8 um/px that costs about 0.3 s on two cores (benchmarks/bench_pen.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fpstore.config import check_range

_SHIFT = 2  # 8-bit channel -> 6-bit colour-table index
_SIDE = 256 >> _SHIFT


@dataclass(frozen=True)
class PenSpec:
    """Thresholds of pen detection: OD summed over R, G and B, and the ratios OD_R / OD_G and
    OD_B / OD_G (optical densities, natural log)."""

    min_od: float = 0.3  # summed OD below which a pixel is too pale to judge its colour
    # Seed: OD_R / OD_G at least this (blue, green, cyan ink). Pure hematoxylin reaches
    # ~0.93 (Ruifrok's vector); tissue at 16 um/px mixes in eosin and stays below ~0.85.
    seed_red: float = 1.0
    dark_od: float = 2.4  # seed: black marker, summed OD at least this...
    dark_ratios: tuple[float, float] = (0.75, 0.7)  # ...with OD_R / OD_G and OD_B / OD_G this high
    black_od: float = 4.8  # seed: anything this dark (channels <= ~50 of 255) is ink or debris
    grow_red: float = 0.8  # near seeds: OD_R / OD_G at least this is pen connected to them
    off_plane: float = 0.08  # near seeds: sine of the angle to the slide's H&E plane, at least
    near_um: float = 300.0  # how far from a seed a stroke's weaker part is looked for
    red_ratios: tuple[float, float] = (
        0.2,
        0.6,
    )  # red ink: OD_R / OD_G at most, OD_B / OD_G at least
    red_od: float = 1.0  # red ink: summed OD at least this
    red_elongation: float = 4.0  # red component's length / width at least this
    min_um2: float = 5_000.0  # ink components under ~70 x 70 um are specks, not strokes
    # Looked for at this resolution or finer (um/px): strokes are >= ~300 um wide, and
    # 16 um/px has a quarter of the pixels of the 8 um/px tissue mask.
    mpp: float = 16.0

    def __post_init__(self):
        for name in ("min_od", "dark_od", "black_od", "red_od"):
            check_range("PenSpec", name, getattr(self, name), 0.0, 20.0)
        check_range("PenSpec", "seed_red", self.seed_red, 0.0, 10.0)
        check_range("PenSpec", "grow_red", self.grow_red, 0.0, self.seed_red)
        for name in ("dark_ratios", "red_ratios"):
            for i, value in enumerate(getattr(self, name)):
                check_range("PenSpec", f"{name}[{i}]", value, 0.0, 10.0)
        check_range("PenSpec", "off_plane", self.off_plane, 0.0, 1.0)
        check_range("PenSpec", "near_um", self.near_um, 0.0)
        check_range("PenSpec", "red_elongation", self.red_elongation, 1.0)
        check_range("PenSpec", "min_um2", self.min_um2, 0.0)
        check_range("PenSpec", "mpp", self.mpp, 0.1, 200.0)


_STAINED, _SEED, _GROW, _RED = 1, 2, 4, 8  # bits of the colour table


@lru_cache(maxsize=1)
def _colour_od() -> np.ndarray:
    """OD (float32, [64**3, 3]) of each quantised colour's centre, in ``_colour_index`` order."""
    centre = (np.arange(_SIDE, dtype=np.float32) + 0.5) * (1 << _SHIFT) - 0.5
    od = -np.log((centre + 1.0) / 256.0)
    b, g, r = np.meshgrid(od, od, od, indexing="ij")
    return np.stack([r.ravel(), g.ravel(), b.ravel()], axis=1)


@lru_cache(maxsize=8)
def _colour_classes(spec: PenSpec) -> np.ndarray:
    """Per quantised colour, uint8 bits: stained, seed, grow, red ink."""
    od = _colour_od()
    total = od.sum(axis=1)
    green = np.maximum(od[:, 1], 1e-3)
    red, blue = od[:, 0] / green, od[:, 2] / green
    stained = total >= spec.min_od
    dark = (total >= spec.dark_od) & (red >= spec.dark_ratios[0]) & (blue >= spec.dark_ratios[1])
    seed = stained & (red >= spec.seed_red) | dark | (total >= spec.black_od)
    grow = stained & (red >= spec.grow_red)
    red_ink = (total >= spec.red_od) & (red <= spec.red_ratios[0]) & (blue >= spec.red_ratios[1])
    bits = stained * _STAINED + seed * _SEED + grow * _GROW + red_ink * _RED
    return bits.astype(np.uint8)


def _colour_index(rgb: np.ndarray) -> np.ndarray:
    """Index (uint32) of each pixel's colour, 6 bits per channel, in the 64**3 colour tables."""
    import cv2

    # One 32-bit word per pixel (R in the low byte), then three shifted masks: the
    # cheapest way found to pack the index of a 20-megapixel image.
    word = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2RGBA)
    word = word.view(np.uint32).reshape(rgb.shape[:2])
    index = np.right_shift(word, _SHIFT)
    index &= 0x3F
    part = np.right_shift(word, 2 * _SHIFT)
    part &= 0x3F << 6
    index |= part
    np.right_shift(word, 3 * _SHIFT, out=part)
    part &= 0x3F << 12
    index |= part
    return index


def detect_pen(rgb: np.ndarray, pixel_um: float, spec: PenSpec = PenSpec()) -> np.ndarray:
    """Boolean mask of pen and ink in an RGB uint8 image whose pixels are ``pixel_um`` wide.

    Looked for at ``spec.mpp`` or finer (a whole multiple of ``pixel_um``) and brought back to
    the image's size.
    """
    import cv2

    step = max(1, int(spec.mpp // pixel_um))
    rgb = np.ascontiguousarray(rgb[..., :3])
    height, width = rgb.shape[:2]
    # Averaging tames JPEG chroma noise before colours are judged: a 3 x 3 mean, or the
    # area-averaging of the downsampling itself.
    if step == 1:
        return _detect_pen(cv2.blur(rgb, (3, 3)), pixel_um, spec)
    small = cv2.resize(
        rgb, (max(1, width // step), max(1, height // step)), interpolation=cv2.INTER_AREA
    )
    pen = _detect_pen(small, pixel_um * width / small.shape[1], spec)
    pen = cv2.resize(pen.view(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return pen.view(bool)


def _detect_pen(rgb: np.ndarray, pixel_um: float, spec: PenSpec) -> np.ndarray:
    import cv2

    index = _colour_index(rgb)
    bits = _colour_classes(spec)[index]
    min_px = spec.min_um2 / (pixel_um * pixel_um)
    seeds = (bits & _SEED).astype(bool)
    seeds &= ~_specks(seeds, min_px)
    seeds |= _strokes((bits & _RED).astype(bool), min_px, spec.red_elongation)
    if not seeds.any():
        return seeds
    away = cv2.distanceTransform((~seeds).view(np.uint8), cv2.DIST_L2, 3)
    near = away <= spec.near_um / pixel_um
    stained = (bits & _STAINED).view(bool)
    weak = (bits & _GROW).astype(bool)
    plane = _stain_plane(index[stained & ~near])
    if plane is not None:
        od = _colour_od()
        off = np.abs(od @ plane) >= spec.off_plane * np.linalg.norm(od, axis=1)
        weak |= off[index] & stained
    return _touching(seeds | (weak & near), seeds)


def _stain_plane(index: np.ndarray, max_samples: int = 200_000) -> np.ndarray | None:
    """Unit normal of the plane through the origin that best fits these colours' OD (the H&E
    plane of Macenko et al. 2009), or None with too few pixels to fit one."""
    if index.size < 1000:
        return None
    sample = index[:: max(1, index.size // max_samples)]
    counts = np.bincount(sample, minlength=_SIDE**3).astype(np.float64)
    used = np.flatnonzero(counts)
    od = _colour_od()[used].astype(np.float64)
    scatter = (od * counts[used, None]).T @ od
    return np.linalg.eigh(scatter)[1][:, 0].astype(np.float32)  # smallest eigenvalue's vector


def _specks(mask: np.ndarray, max_px: float) -> np.ndarray:
    """The 4-connected components of ``mask`` of at most ``max_px`` pixels."""
    import cv2

    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] <= max_px
    small[0] = False
    return small[labels]


def _touching(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The 8-connected components of ``mask`` that hold a pixel of ``seeds``."""
    import cv2

    count, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=8)
    keep = np.bincount(labels[seeds], minlength=count) > 0
    keep[0] = False
    return keep[labels]


def _strokes(mask: np.ndarray, min_px: float, elongation: float) -> np.ndarray:
    """Components of ``mask`` shaped like a stroke: at least ``min_px`` pixels and length / width
    at least ``elongation``.

    A stroke of length L and width w has area L * w and half-width w / 2 (its largest
    distance to the edge), so L / w = area / (2 * half-width) ** 2.
    """
    import cv2

    out = np.zeros_like(mask)
    if not mask.any():
        return out
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    for label in np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= max(min_px, 1)):
        if label == 0:
            continue
        x, y, w, h, area = stats[label]
        box = labels[y : y + h, x : x + w] == label
        inside = np.pad(box, 1).view(np.uint8)
        half_width = cv2.distanceTransform(inside, cv2.DIST_L2, 3).max()
        if area >= elongation * (2 * max(float(half_width), 0.5)) ** 2:
            out[y : y + h, x : x + w] |= box
    return out
