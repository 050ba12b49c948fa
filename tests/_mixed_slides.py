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


def mixed_cohort(tmp_path, corrupt=False):
    """One slide per patient: CMU itself (Aperio, R,G,B JPEG tiles), a YCbCr JPEG copy, a
    deflate copy (never GPU-decoded) and, with ``corrupt``, a JPEG copy with a zeroed tile."""
    from fpstore.cohort.cohorts import add_cohort

    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "APERIO.svs").symlink_to(CMU)
    paths = [
        folder / "APERIO.svs",
        rewrite_cmu(folder / "YCBCR.tiff", "jpeg"),
        rewrite_cmu(folder / "DEFLATE.tiff", "zlib"),
    ]
    if corrupt:
        paths.append(rewrite_cmu(folder / "BADTILE.tiff", "jpeg"))
        corrupt_a_tile(paths[-1])
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "patient_id,slide,ER,PR,Her2\n"
        + "".join(f"P{i},{p},Positive,Negative,Negative\n" for i, p in enumerate(paths))
    )
    store = tmp_path / "store"
    add_cohort(store, "c", clinical=labels, fmt="csv")
    return store
