"""Copies of the real CMU-1-Small-Region slide in the formats a cohort mixes: YCbCr JPEG
tiles (as scanners and fpstore synth write them; the GPU decodes them), deflate tiles (only
the readers decode them), and a JPEG copy with one corrupt tile. Pyramidal (a quarter-size
level), 0.499 um/px, as CMU."""

from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data" / "slides"
CMU = DATA / "CMU-1-Small-Region.svs"


def cmu_pixels() -> np.ndarray:
    from fpstore.slides.slide import open_slide

    with open_slide(CMU) as slide:
        return slide.read_region(0, 0, 0, slide.info.width, slide.info.height)


def rewrite_cmu(path: Path, compression: str) -> Path:
    """CMU as a tiled pyramidal TIFF with ``compression`` ("jpeg": YCbCr tiles; "zlib")."""
    import tifffile

    from fpstore.slides.slide import resize_image

    image = cmu_pixels()
    res = 1e4 / 0.499  # pixels per cm
    with tifffile.TiffWriter(path) as tw:
        for sub in (1, 4):
            level = (
                image if sub == 1 else resize_image(image, image.shape[1] // 4, image.shape[0] // 4)
            )
            tw.write(
                level,
                subfiletype=0 if sub == 1 else 1,
                tile=(256, 256),
                compression=compression,
                photometric="rgb",
                resolution=(res / sub, res / sub),
                resolutionunit="CENTIMETER",
            )
    return path


def corrupt_a_tile(path: Path) -> int:
    """Zero the bytes of one full-resolution tile amid the tissue, in place; its index."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        down = -(-page.imagelength // page.tilelength)
        index = (down // 2) * across + across // 2
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(count))
    return index
