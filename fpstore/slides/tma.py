"""TMA dearraying: find the round cores of a tissue microarray, fit the array's lattice,
number every position, join the array map, and crop each core the paper's way (0.5 um/px,
1600 x 1600 px, split into left and right halves).

By job: detection (cores, lattice, numbering) in ``fpstore.slides.tma_detect``, array maps
in ``tma_map``, the checking overlay in ``tma_overlay``; here the slide's scale, the crops
and the export of a dearrayed slide (``export_cores``). The names callers use are all
importable from here.
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path

import numpy as np

from fpstore.errors import ConfigError, MppMissingError, SlideError
from fpstore.slides.tma_detect import DEFAULT_CORE_UM, Core, TmaArray, TmaSpec, detect
from fpstore.slides.tma_map import join_array_map, read_array_map
from fpstore.slides.tma_overlay import draw_overlay
from fpstore.store.io import remove_dead_temporaries_in, write_text_atomic

__all__ = [
    "Core",
    "TmaArray",
    "TmaSpec",
    "array_scale",
    "crop_core",
    "dearray",
    "detect",
    "draw_overlay",
    "export_cores",
    "join_array_map",
    "open_array_slide",
    "read_array_map",
    "split_halves",
]


def dearray(slide, array_map: Path | None = None, spec: TmaSpec = TmaSpec()) -> list[Core]:
    """The cores of an array slide (empty positions and orientation cores left out),
    ordered by block, row and column, joined to ``array_map``."""
    array = detect(slide, spec)
    if array_map is not None:
        join_array_map(array.cores, read_array_map(array_map), slide.info.path)
    return array.found


def crop_core(slide, core: Core, mpp: float = 0.5, size: int = 1600) -> np.ndarray:
    """A ``size`` x ``size`` RGB square at ``mpp`` um/px centred on the core."""
    slide_mpp = slide.info.mpp
    if not slide_mpp:
        raise SlideError(f"slide {slide.info.path} has no mpp; pass --mpp")
    side = size * mpp / slide_mpp  # level-0 pixels
    x0 = int(round(core.centre[0] - side / 2))
    y0 = int(round(core.centre[1] - side / 2))
    return slide.read_patch(x0, y0, side, size)


def split_halves(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right halves (the paper trains on left halves, tests on right ones)."""
    half = img.shape[1] // 2
    return img[:, :half], img[:, half:]


# --- the slide's scale ----------------------------------------------------------------------


def open_array_slide(path: Path, mpp: float | None = None):
    """(slide, provisional): an array image without an mpp opens at 1 um/px until its cores
    give the scale (``array_scale``)."""
    from fpstore.slides.slide import open_slide

    try:
        return open_slide(path, mpp=mpp), False
    except MppMissingError:
        return open_slide(path, mpp=1.0), True


def array_scale(slide, array: TmaArray, spec: TmaSpec, provisional: bool) -> dict:
    """The slide's um/px and where it comes from: its metadata or --mpp; else --core-um over
    the measured core diameter; else that diameter taken for a DEFAULT_CORE_UM punch. A
    scale that no glass slide can have (an image over 80 mm across where a slide is 75 mm
    long, or finer than 0.1 um/px) is refused."""
    diameter = array.core_diameter_px
    if not provisional:
        mpp, source = slide.info.mpp, slide.info.mpp_source
        how = "--mpp" if source == "override" else "the slide's metadata"
        text = (
            f"{mpp:.4g} um/px from {how}; cores measure {diameter:.1f} px ({diameter * mpp:.0f} um)"
        )
    elif spec.core_um is not None:
        mpp, source = spec.core_um / diameter, "core_um"
        text = (
            f"{mpp:.4g} um/px from --core-um {spec.core_um:g} over the measured core diameter "
            f"of {diameter:.1f} px (the image has no mpp)"
        )
    else:
        mpp, source = DEFAULT_CORE_UM / diameter, "assumed"
        text = (
            f"{mpp:.4g} um/px assumed: the image has no mpp and no --core-um was given, so "
            f"its measured core diameter of {diameter:.1f} px is taken for a "
            f"{DEFAULT_CORE_UM:g} um punch; pass --core-um or --mpp to set the scale"
        )
    extent_mm = max(slide.info.width, slide.info.height) * mpp / 1000
    if provisional and not (mpp >= 0.1 and extent_mm <= 80):
        given = (
            f"--core-um {spec.core_um:g}"
            if spec.core_um is not None
            else f"a {DEFAULT_CORE_UM:g} um punch"
        )
        raise ConfigError(
            f"{given} makes {slide.info.path} {mpp:.4g} um/px ({extent_mm:.0f} mm across): "
            f"no glass slide is like that; its cores measure {diameter:.1f} px, so give "
            f"their diameter in microns with --core-um (0.6 mm punch: --core-um 600) or "
            f"the image's scale with --mpp"
        )
    return {
        "mpp": mpp,
        "source": source,
        "core_diameter_px": round(diameter, 1),
        "core_um": round(diameter * mpp, 1),
        "text": text,
    }


# --- writing a dearrayed slide --------------------------------------------------------------


def _write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(
        str(path), np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ):
        raise SlideError(f"could not write {path}; check the --out folder is writable")


CSV_COLUMNS = (
    "name",
    "block",
    "row",
    "column",
    "status",
    "confidence",
    "core_index",
    "patient_id",
    "x",
    "y",
    "diameter_px",
    "x0",
    "y0",
    "x1",
    "y1",
)


def export_cores(
    slide_path: Path,
    out: Path,
    array_map: Path | None = None,
    mpp: float | None = None,
    spec: TmaSpec = TmaSpec(),
    force: bool = False,
) -> dict:
    """Dearray a slide into ``out``: cores.csv and cores.json (every lattice position with
    its block, row, column, status core/empty, confidence, centre, diameter, bbox, core index
    and patient; the orientation cores after them), overlay.png, and per found core
    ``crops/<name>.png`` with its ``_left``/``_right`` halves. Returns the cores.json
    document, whose ``scale`` says which um/px the crops used and where it came from."""
    import json

    from tqdm import tqdm

    out = Path(out)
    remove_dead_temporaries_in(out)  # what a killed dearray left
    if (out / "cores.json").exists() and not force:
        raise ConfigError(
            f"{out} already holds a dearrayed slide (cores.json); pass --force to overwrite"
        )
    table = read_array_map(array_map) if array_map is not None else None
    slide, provisional = open_array_slide(slide_path, mpp)
    try:
        # Without an mpp the core_um cannot predict a size in pixels; it sets the scale instead.
        array = detect(slide, replace(spec, core_um=None) if provisional else spec)
        scale = array_scale(slide, array, spec, provisional)
        if provisional:
            slide.info = replace(slide.info, mpp=scale["mpp"], mpp_source=scale["source"])
        unmatched = join_array_map(array.cores, table, str(slide_path)) if table else []
        (out / "crops").mkdir(parents=True, exist_ok=True)
        _write_png(out / "overlay.png", draw_overlay(array))
        for core in tqdm(array.found, desc="crop cores", unit="core"):
            crop = crop_core(slide, core, spec.crop_mpp, spec.crop_px)
            left, right = split_halves(crop)
            _write_png(out / "crops" / f"{core.name}.png", crop)
            _write_png(out / "crops" / f"{core.name}_left.png", left)
            _write_png(out / "crops" / f"{core.name}_right.png", right)
    finally:
        slide.close()
    statuses = [k.status for k in array.cores]
    document = {
        "slide": str(Path(slide_path).resolve()),
        "scale": scale,
        "crop_mpp": spec.crop_mpp,
        "crop_px": spec.crop_px,
        "n_cores": statuses.count("core"),
        "n_empty": statuses.count("empty"),
        "n_orientation": statuses.count("orientation"),
        "blocks": array.blocks,
        "pitch_px": round(array.pitch_px, 1),
        "tilt_deg": round(array.tilt_deg, 2),
        "array_map": str(array_map) if array_map is not None else None,
        "cores_not_in_map": [
            k.name for k in array.found if table is not None and k.core_index is None
        ],
        "map_entries_without_core": unmatched,
        "cores": [k.to_dict() for k in array.cores],
    }
    table_text = io.StringIO()
    writer = csv.writer(table_text)
    writer.writerow(CSV_COLUMNS)
    for k in array.cores:
        writer.writerow(
            [
                k.name,
                k.block,
                k.row,
                k.column,
                k.status,
                k.confidence,
                k.core_index,
                k.patient_id,
                round(k.centre[0], 1),
                round(k.centre[1], 1),
                round(k.diameter_px, 1),
                *k.bbox,
            ]
        )
    # cores.json says "dearrayed": written last, so that it never names a missing table.
    write_text_atomic(table_text.getvalue(), out / "cores.csv")
    write_text_atomic(json.dumps(document, indent=2), out / "cores.json")
    return document
