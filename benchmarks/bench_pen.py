"""Pen and ink rejection (issue 16 part 2): what it removes, what it keeps, and what it costs.

Claims: marker strokes (blue, green, black) and an ink blot are removed from the tissue mask
and so from the 112 um patch grid; tissue inside the loops and away from the pen is kept;
the mask of a 5000 x 4000 image at 8 um/px stays cheap.

On the real pen-marked files in tests/data/pen (three MSKCC thumbnails read as whole slides
at 20 um/px, the HistoPrep needle-core strip at 2 um/px), against the same mask without pen
removal (``TissueMaskSpec(pen=None)``), it prints per slide:

    strokes removed   share of the hand-traced stroke cores that is not tissue
    inside kept       share of the tissue inside the loops (label PNGs x the mask without pen
                      removal) that stays tissue
    far kept          share of the tissue more than 1 mm from any stroke that stays tissue
    pen share         ``TissueMask.pen_fraction``: would-be tissue removed as pen or ink
    patches           the 112 um grid (min_tissue 0.5) without and with pen removal, and its
                      squares at least 25% on a stroke core

Then times ``detect_tissue_and_pen`` on 00019 tiled to 5000 x 4000 and 2500 x 2000 (as if at
8 um/px; pen covers about a fifth of it, a worst case), with and without pen removal.

    python benchmarks/bench_pen.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from fpstore.config import PatchSpec
from fpstore.slides.grid import patch_grid
from fpstore.slides.slide import open_slide
from fpstore.slides.tissue_mask import (
    TissueMask,
    TissueMaskSpec,
    detect_tissue_and_pen,
    tissue_mask,
)

PEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "pen"
SLIDES = [
    ("00035", "pen_he_msk_thumbnail_00035.jpg", 20.0, "pen_he_msk_strokes_00035.png"),
    ("00019", "pen_he_msk_thumbnail_00019.jpg", 20.0, "pen_he_msk_strokes_00019.png"),
    ("00004", "pen_he_msk_thumbnail_00004.jpg", 20.0, "pen_he_msk_strokes_00004.png"),
    ("strip", "pen_he_histoprep_slide_with_ink.jpeg", 2.0, "pen_he_histoprep_ink_blot.png"),
]


def quality() -> None:
    header = "slide   strokes removed  inside kept  far kept  pen share  patches (on strokes)"
    print(header)
    for name, file, mpp, strokes_file in SLIDES:
        with open_slide(PEN / file, mpp=mpp) as slide:
            mask, plain = tissue_mask(slide), tissue_mask(slide, TissueMaskSpec(pen=None))
            full = cv2.imread(str(PEN / strokes_file), cv2.IMREAD_GRAYSCALE) > 0
            height, width = mask.mask.shape
            strokes = cv2.resize(full.view(np.uint8), (width, height), cv2.INTER_AREA) > 0
            away = cv2.distanceTransform((~strokes).view(np.uint8), cv2.DIST_L2, 3)
            far = plain.mask & (away * mask.downsample * mpp > 1000)
            inside = "-"
            if name != "strip":
                labels = cv2.imread(str(PEN / f"pen_he_msk_labels_rs_{name}.png"))[..., 0]
                loops = cv2.resize(255 - labels, (width, height), cv2.INTER_NEAREST) > 127
                inside = f"{mask.mask[loops & plain.mask].mean():.3f}"
            patches = []
            for m in (plain, mask):
                grid = patch_grid(slide, PatchSpec(), m)
                x, y = grid.column("x").to_numpy(), grid.column("y").to_numpy()
                size = float(grid.column("size_px").to_numpy()[0])
                on = TissueMask(full, 1.0).fraction_in(x, y, size)
                patches.append(f"{grid.num_rows} ({int((on >= 0.25).sum())})")
        print(
            f"{name:7s} {1 - mask.mask[strokes].mean():15.3f}  {inside:>11s}  "
            f"{mask.mask[far].mean():8.4f}  {mask.pen_fraction:9.3f}  "
            f"{patches[0]} -> {patches[1]}"
        )


def timing(repeat: int) -> None:
    tile = cv2.cvtColor(cv2.imread(str(PEN / SLIDES[1][1])), cv2.COLOR_BGR2RGB)
    for width, height in ((5000, 4000), (2500, 2000)):
        reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
        image = np.ascontiguousarray(np.tile(tile, reps)[:height, :width])
        row = []
        for label, spec in (
            ("without pen", TissueMaskSpec(pen=None)),
            ("with pen", TissueMaskSpec()),
        ):
            detect_tissue_and_pen(image, 8.0, spec)
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                detect_tissue_and_pen(image, 8.0, spec)
                times.append(time.perf_counter() - start)
            row.append(
                f"{label} min {1000 * min(times):.0f} ms, median {1000 * np.median(times):.0f} ms"
            )
        print(f"{width} x {height} mask: " + "; ".join(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per size")
    args = parser.parse_args()
    quality()
    timing(args.repeat)


if __name__ == "__main__":
    main()
