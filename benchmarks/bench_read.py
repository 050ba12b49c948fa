"""Patch reading throughput against the JPEG decode ceiling of the same file.

Builds (or reuses) a 40x-size synthetic slide: CMU-1-Small-Region.svs pixels tiled
into a pyramidal JPEG TIFF labelled 0.25 um/px, so a 112 um patch is 448 level-0
pixels resized to 224. On one core (OpenCV limited to one thread) it measures:

- ceiling: raw JPEG decode of the slide's level-0 tiles with imagecodecs, no
  region assembly or resizing, as level-0 pixels/s turned into patches/s
  (each tile decoded once: the best grid order can do), and for random order
  the decode of exactly the tiles each patch touches (no reuse possible);
- fpstore: ``Slide.read_patches`` in grid order and in random order;
- tiatoolbox: ``WSIReader.read_rect`` at 0.5 um/px for the same grid patches.

    python benchmarks/bench_read.py                    # 44,400 x 47,472 px slide, 600 patches
    python benchmarks/bench_read.py --reps 4 4 --n 200 # quick smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiled_slide import make_tiled_slide  # noqa: E402

PATCH_UM, OUT_PX, MPP = 112.0, 224, 0.25


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def decode_ceiling(path: Path, n_tiles: int, rng) -> tuple[float, float]:
    """(tiles/s, level-0 px/s) of raw JPEG decoding of random level-0 tiles."""
    import imagecodecs
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
        tile_px = page.tilewidth * page.tilelength
        tables = page.jpegtables
    fd = os.open(path, os.O_RDONLY)
    try:
        picks = rng.choice(len(offsets), size=min(n_tiles, len(offsets)), replace=False)
        start = time.perf_counter()
        for i in picks:
            imagecodecs.jpeg8_decode(os.pread(fd, counts[i], offsets[i]), tables=tables)
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    return _rate(len(picks), seconds), _rate(len(picks) * tile_px, seconds)


def touched_tiles(xy: np.ndarray, size_px: int, tile: int) -> int:
    """Tiles a set of patches touches when each is read on its own (no tile reuse)."""
    first, last = xy // tile, (xy + size_px - 1) // tile
    return int(((last - first + 1).prod(axis=1)).sum())


def time_fpstore(path: Path, xy: np.ndarray, size_px: float) -> float:
    from fpstore.slides.slide import open_slide

    with open_slide(path) as slide:  # fresh slide: cold tile cache
        start = time.perf_counter()
        for chunk in np.array_split(xy, max(1, len(xy) // 64)):
            slide.read_patches(chunk, size_px, OUT_PX)
        return time.perf_counter() - start


def time_tiatoolbox(path: Path, xy: np.ndarray, size_px: float) -> float:
    from tiatoolbox.wsicore.wsireader import WSIReader

    reader = WSIReader.open(path)
    start = time.perf_counter()
    for x, y in xy:
        reader.read_rect(
            (int(x), int(y)), (OUT_PX, OUT_PX), resolution=PATCH_UM / OUT_PX, units="mpp"
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reps",
        type=int,
        nargs=2,
        default=(20, 16),
        metavar=("COLS", "ROWS"),
        help="copies of CMU-1-Small-Region across and down",
    )
    parser.add_argument("--n", type=int, default=600, help="patches per measurement")
    parser.add_argument(
        "--n-tia", type=int, default=150, help="patches for the tiatoolbox baseline"
    )
    parser.add_argument("--slide", type=Path, help="reuse this slide instead of building one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import cv2

    cv2.setNumThreads(1)  # per-core figures
    from fpstore.slides.grid import grid_squares

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.slide
        if path is None:
            start = time.perf_counter()
            path = make_tiled_slide(Path(tmp) / "bench40x.svs", tuple(args.reps), mpp=MPP)
            print(
                f"built {path.name}: {path.stat().st_size / 2**20:.0f} MiB "
                f"in {time.perf_counter() - start:.0f} s"
            )
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            width, height, tile = page.imagewidth, page.imagelength, page.tilewidth
        size_px = PATCH_UM / MPP
        xs, ys = grid_squares(width, height, size_px)
        grid = np.stack([xs, ys], axis=1)
        start_row = rng.integers(0, max(1, len(grid) - args.n))
        grid_xy = grid[start_row : start_row + args.n]
        random_xy = grid[rng.choice(len(grid), size=min(args.n, len(grid)), replace=False)]
        print(
            f"slide {width} x {height} px at {MPP} um/px, {tile} px JPEG tiles; "
            f"{PATCH_UM:g} um patches = {size_px:.0f} px -> {OUT_PX} px; one core"
        )

        tiles_s, px_s = decode_ceiling(path, 3 * args.n, rng)
        ceiling_grid = px_s / size_px**2
        n_touched = touched_tiles(random_xy, int(round(size_px)), tile)
        ceiling_random = _rate(len(random_xy), n_touched / tiles_s)
        ours_grid = _rate(len(grid_xy), time_fpstore(path, grid_xy, size_px))
        ours_random = _rate(len(random_xy), time_fpstore(path, random_xy, size_px))
        tia_xy = grid_xy[: args.n_tia]
        tia = _rate(len(tia_xy), time_tiatoolbox(path, tia_xy, size_px))

    rows = [
        ("JPEG decode ceiling, grid (pixel rate)", ceiling_grid, None),
        ("JPEG decode ceiling, random (touched tiles)", ceiling_random, None),
        ("fpstore read_patches, grid order", ours_grid, ours_grid / ceiling_grid),
        ("fpstore read_patches, random order", ours_random, ours_random / ceiling_random),
        ("tiatoolbox read_rect at 0.5 um/px, grid", tia, tia / ceiling_grid),
    ]
    print(
        f"raw decode: {tiles_s:.0f} tiles/s = {px_s / 1e6:.1f} Mpx/s; "
        f"random patches touch {n_touched / len(random_xy):.2f} tiles each"
    )
    print(f"{'':46s} {'patches/s':>10s} {'of ceiling':>10s}")
    for name, rate, ratio in rows:
        print(f"{name:46s} {rate:10.1f} {'' if ratio is None else f'{100 * ratio:9.0f}%':>10s}")
    print(f"fpstore vs tiatoolbox, grid order: {ours_grid / tia:.1f}x")


if __name__ == "__main__":
    main()
