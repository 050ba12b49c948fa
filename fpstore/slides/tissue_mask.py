"""Tissue detection on a low-resolution image of the slide.

The slide is read whole at ``TissueMaskSpec.mpp`` (8 um/px: a 112 um patch is
14 x 14 mask pixels). A pixel is tissue when it is saturated enough to be stain:
glass is bright and grey, so the threshold is Otsu's on the HSV saturation,
clamped to a range so that a slide with almost no glass (where Otsu would split
pale from dark tissue) keeps its pale stroma. Pen and ink (blue, green, black
and red marker, on glass and over tissue; ``fpstore.slides.pen``) are removed,
enclosed holes up to ``max_hole_um2`` filled (gaps, small lumens), and specks
smaller than ``min_object_um2`` dropped. The mask keeps what it removed as pen,
so that the share of the would-be tissue lost to pen is reported per slide.

Components and morphology use OpenCV: a 5000 x 4000 mask spent most of its
time in scipy's labelling before.

Known limit: large areas of fat with little stain (adipocyte membranes vanish
at 8 um/px) read as glass unless tissue encloses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from fpstore.config import check_range
from fpstore.slides.pen import PenSpec, detect_pen


@dataclass(frozen=True)
class TissueMaskSpec:
    """Settings of tissue detection; defaults fit H&E at any scan resolution."""

    mpp: float = 8.0  # resolution of the mask, um/px
    # Clamp of the Otsu threshold on saturation (0-255): glass sits at 1-7, pale
    # stroma at 25-40; without glass Otsu would split pale from dark tissue.
    min_saturation: int = 10
    max_saturation: int = 25
    pen: PenSpec | None = PenSpec()  # pen and ink to exclude; None keeps them as tissue
    min_object_um2: float = 10_000.0  # drop specks smaller than ~100 x 100 um
    max_hole_um2: float = 20_000.0  # fill holes up to ~140 x 140 um (gaps, small lumens)

    def __post_init__(self):
        check_range("TissueMaskSpec", "mpp", self.mpp, 0.1, 200.0)
        check_range("TissueMaskSpec", "min_saturation", self.min_saturation, 0, 255)
        check_range(
            "TissueMaskSpec", "max_saturation", self.max_saturation, self.min_saturation, 255
        )
        check_range("TissueMaskSpec", "min_object_um2", self.min_object_um2, 0.0)
        check_range("TissueMaskSpec", "max_hole_um2", self.max_hole_um2, 0.0)

    @property
    def digest(self) -> str:
        """A short hash of every setting: extraction's resume key carries it, so a slide
        stored with another tissue mask (and so another patch grid) is not counted as done."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class TissueMask:
    """A boolean tissue mask; one mask pixel covers ``downsample`` x ``downsample`` level-0 px.

    ``pen``: the stained pixels removed from it as pen or ink (same shape), if known.
    """

    mask: np.ndarray
    downsample: float
    pen: np.ndarray | None = None

    @property
    def pen_fraction(self) -> float:
        """Share of the would-be tissue (tissue + removed pen) that was removed as pen or ink."""
        if self.pen is None:
            return 0.0
        removed = int(self.pen.sum())
        total = removed + int(self.mask.sum())
        return removed / total if total else 0.0

    def _summed_area(self) -> np.ndarray:
        # Built once per mask: a grid asks for it band by band.
        if getattr(self, "_table", None) is None:
            table = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.float64)
            table[1:, 1:] = self.mask.astype(np.float64).cumsum(0).cumsum(1)
            self._table = table
        return self._table

    @property
    def fraction(self) -> float:
        """Share of the slide that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction_in(self, x, y, size_px: float) -> np.ndarray:
        """Tissue fraction of level-0 squares (x, y, size_px), area-weighted and vectorised.

        The summed-area table of a piecewise-constant mask is bilinear inside each
        pixel, so interpolating it gives the exact covered area even when square
        edges cut mask pixels.
        """
        table = self._summed_area()
        x0 = np.asarray(x, np.float64) / self.downsample
        y0 = np.asarray(y, np.float64) / self.downsample
        side = size_px / self.downsample
        x1, y1 = x0 + side, y0 + side
        area = (
            _sample(table, x1, y1)
            - _sample(table, x0, y1)
            - _sample(table, x1, y0)
            + _sample(table, x0, y0)
        )
        return np.clip(area / (side * side), 0.0, 1.0)


def _sample(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a summed-area table at fractional (x, y), clamped to it."""
    x = np.clip(x, 0, table.shape[1] - 1)
    y = np.clip(y, 0, table.shape[0] - 1)
    xi = np.minimum(x.astype(np.int64), table.shape[1] - 2)
    yi = np.minimum(y.astype(np.int64), table.shape[0] - 2)
    fx, fy = x - xi, y - yi
    top = table[yi, xi] * (1 - fx) + table[yi, xi + 1] * fx
    bottom = table[yi + 1, xi] * (1 - fx) + table[yi + 1, xi + 1] * fx
    return top * (1 - fy) + bottom * fy


def detect_tissue(
    rgb: np.ndarray, pixel_um: float, spec: TissueMaskSpec = TissueMaskSpec()
) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image whose pixels are ``pixel_um`` wide."""
    return detect_tissue_and_pen(rgb, pixel_um, spec)[0]


def detect_tissue_and_pen(
    rgb: np.ndarray, pixel_um: float, spec: TissueMaskSpec = TissueMaskSpec()
) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, pen): boolean masks of the tissue and of the stained pixels removed from it as
    pen or ink."""
    import cv2

    rgb = np.ascontiguousarray(rgb[..., :3])
    saturation = cv2.medianBlur(
        np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]), 3
    )
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = float(np.clip(otsu, spec.min_saturation, spec.max_saturation))
    stained = saturation > threshold
    if spec.pen is None:
        reject = np.zeros_like(stained)
    else:
        # Widen pen by a pixel: its anti-aliased rim looks like stain.
        reject = _morph(cv2.MORPH_DILATE, detect_pen(rgb, pixel_um, spec.pen))
    tissue = _morph(cv2.MORPH_OPEN, stained & ~reject)
    pixel_area = pixel_um * pixel_um
    tissue |= _small_components(~tissue, spec.max_hole_um2 / pixel_area, enclosed=True)
    tissue &= ~reject
    tissue &= ~_small_components(tissue, spec.min_object_um2 / pixel_area)
    return tissue, stained & reject


def _morph(op: int, mask: np.ndarray) -> np.ndarray:
    """One step of a binary morphology with the 3 x 3 cross, glass beyond the border."""
    import cv2

    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    out = cv2.morphologyEx(
        mask.view(np.uint8), op, cross, borderType=cv2.BORDER_CONSTANT, borderValue=0
    )
    return out.view(bool)


def _small_components(mask: np.ndarray, max_px: float, enclosed: bool = False) -> np.ndarray:
    """The 4-connected components of ``mask`` of at most ``max_px`` pixels.

    ``enclosed``: only those not touching the image border (holes, not open glass).
    """
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(mask).view(np.uint8), connectivity=4
    )
    small = stats[:, cv2.CC_STAT_AREA] <= max_px
    small[0] = False
    if enclosed:
        x, y, w, h = (stats[:, k] for k in range(4))
        height, width = mask.shape
        small &= (x > 0) & (y > 0) & (x + w < width) & (y + h < height)
    return small[labels]


def tissue_mask(slide, spec: TissueMaskSpec = TissueMaskSpec()) -> TissueMask:
    """The tissue mask of an open slide at ``spec.mpp`` (never finer than level 0)."""
    downsample = max(1.0, spec.mpp / slide.info.mpp)
    rgb = slide.read_downsampled(downsample)
    tissue, pen = detect_tissue_and_pen(rgb, downsample * slide.info.mpp, spec)
    return TissueMask(tissue, downsample, pen)
