"""Plausible scales: microns per pixel that a microscope scan can have, and slide sizes."""

from __future__ import annotations

import math

from fpstore.errors import ConfigError, SlideError

# Scans run from ~0.1 (100x) to a few um/px (overviews); 72/96/300 dpi written by image
# software (352.8/264.6/84.7 um/px) must not pass for a scale, nor must a typo.
PLAUSIBLE_MPP = (0.05, 20.0)
# A glass slide is 75 x 25 mm (whole-mount 75 x 50): anything far larger has a wrong mpp.
MAX_SLIDE_MM = 300.0
# ... and at most as much glass as a 300 x 25 mm strip or a 100 x 75 mm whole mount: a header
# that declares 10^6 x 10^6 px at 0.25 um/px (250 x 250 mm) would otherwise pass the length
# check and have extraction plan, mask and allocate for 62,500 mm^2 of nothing.
MAX_SLIDE_AREA_MM2 = 7_500.0


def check_mpp(mpp: float, where: str) -> float:
    """``mpp`` if it is a plausible microscope scale, else a ConfigError naming the range."""
    low, high = PLAUSIBLE_MPP
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and low <= mpp <= high):
        raise ConfigError(
            f"mpp={mpp!r} for {where} is outside the plausible range {low:g}-{high:g} um/px "
            "(0.25 at 40x, 0.5 at 20x); fix the override (--mpp, or the --mpp-overrides CSV)"
        )
    return float(mpp)


def check_extent(path, width: int, height: int, mpp: float, source: str) -> None:
    """SlideError when a slide at ``mpp`` would be larger than any glass slide."""
    longest_mm = max(width, height) * mpp / 1000.0
    if longest_mm > MAX_SLIDE_MM:
        raise SlideError(
            f"slide {path} at {mpp:g} um/px ({source}) would be {longest_mm:,.0f} mm long, "
            f"larger than any glass slide (limit {MAX_SLIDE_MM:g} mm): its mpp is wrong; "
            "give the right one with --mpp or --mpp-overrides"
        )
    area_mm2 = width * height * (mpp / 1000.0) ** 2
    if area_mm2 > MAX_SLIDE_AREA_MM2:
        raise SlideError(
            f"slide {path} at {mpp:g} um/px ({source}) would cover {area_mm2:,.0f} mm^2 "
            f"({width} x {height} px), more than any glass slide holds (limit "
            f"{MAX_SLIDE_AREA_MM2:,.0f} mm^2): its mpp or its header is wrong; give the right "
            "mpp with --mpp or --mpp-overrides"
        )
