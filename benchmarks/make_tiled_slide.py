"""Build a large test slide by tiling the real CMU-1-Small-Region.svs pixels.

Writes an Aperio-style pyramidal JPEG TIFF (YCbCr 4:2:0 tiles like a scanner's,
levels downsampled by 4 with area averaging, ``MPP`` in the description) that
both fpstore's fast reader and OpenSlide/tiatoolbox open.

    python benchmarks/make_tiled_slide.py OUT.svs                 # 4x4 at 0.499 um/px
    python benchmarks/make_tiled_slide.py OUT.svs --reps 20 16 --mpp 0.25   # a 40x-size slide

The 4x4 tiling at 0.499 um/px is the extraction benchmark's slide (about 1,270
tissue patches of 112 um). Level-0 tiles come from a generator, so a
slide of billions of pixels never sits in memory.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).resolve().parents[1] / "tests/data/slides/CMU-1-Small-Region.svs"


def _tiles(src: np.ndarray, width: int, height: int, tile: int):
    """Tiles of the plane that repeats ``src``, in row-major order (edge tiles padded)."""
    src_h, src_w = src.shape[:2]
    for y in range(0, height, tile):
        rows = np.arange(y, y + tile) % src_h
        band = src[rows]
        for x in range(0, width, tile):
            block = band[:, np.arange(x, x + tile) % src_w]
            # Past the image edge: glass, as a scanner pads its last tiles.
            block[max(0, height - y) :, :] = 255
            block[:, max(0, width - x) :] = 255
            yield block


def make_tiled_slide(
    out: str | Path,
    reps: tuple[int, int] = (4, 4),
    mpp: float = 0.499,
    tile: int = 256,
    quality: int = 80,
    source: str | Path = SOURCE,
) -> Path:
    """Write ``source`` tiled ``reps`` (columns, rows) times as a pyramidal SVS-like TIFF."""
    import cv2
    import tifffile

    out = Path(out)
    src = tifffile.imread(source)
    width, height = src.shape[1] * reps[0], src.shape[0] * reps[1]
    magnification = round(10 / mpp)
    levels = [1]
    while max(width, height) / (levels[-1] * 4) >= 2 * tile:
        levels.append(levels[-1] * 4)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(out, bigtiff=width * height * 3 > 2**31) as tif:
        for downsample in levels:
            w, h = math.ceil(width / downsample), math.ceil(height / downsample)
            level_src = (
                src
                if downsample == 1
                else cv2.resize(
                    src,
                    (round(src.shape[1] / downsample), round(src.shape[0] / downsample)),
                    interpolation=cv2.INTER_AREA,
                )
            )
            if downsample == 1:
                description = (
                    f"Aperio Image Library fpstore-bench\r\n{width}x{height} [0,0 {width}x{height}]"
                    f" ({tile}x{tile}) JPEG/YCbCr Q={quality}|AppMag = {magnification}|MPP = {mpp}"
                )
            else:
                description = f"Aperio Image Library fpstore-bench\r\n{width}x{height} -> {w}x{h}"
            tif.write(
                _tiles(level_src, w, h, tile),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",  # tifffile stores JPEG tiles as YCbCr 4:2:0 from RGB input
                compression="jpeg",
                compressionargs={"level": quality},
                description=description,
                metadata=None,
            )
            if downsample == 1:
                # Aperio's page 1 is a small stripped thumbnail; readers expect it there.
                scale = 768 / max(src.shape[:2])
                thumb = cv2.resize(src, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
                tif.write(
                    thumb,
                    photometric="rgb",
                    compression="jpeg",
                    metadata=None,
                    description="Aperio Image Library fpstore-bench\r\nthumbnail",
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--reps", type=int, nargs=2, default=(4, 4), metavar=("COLS", "ROWS"))
    parser.add_argument("--mpp", type=float, default=0.499)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--quality", type=int, default=80)
    args = parser.parse_args()
    path = make_tiled_slide(args.out, tuple(args.reps), args.mpp, args.tile, args.quality)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
