"""Streaming writer of pyramidal, JPEG-tiled TIFF slides in Aperio (SVS) layout.

Layout that openslide ("aperio" vendor) and tiatoolbox (OpenSlideWSIReader for .svs,
TIFFWSIReader for .tiff, both via tifffile's SVS series) read with the right mpp and
levels: IFD 0 = level 0, tiled, with the "Aperio Image Library ... |AppMag = 40|MPP = 0.25"
description; IFD 1 = a stripped thumbnail; then the 4x-downsampled tiled levels.
Tiles are JPEG-encoded here (YCbCr 4:2:0) and handed to tifffile as bytes, so empty
glass tiles are encoded once, and level 0 is never held in memory: it is rendered,
encoded and written tile by tile, while a 1/16-size copy (level 1) is kept to build
the smaller levels and the thumbnail.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import tifffile

from fpstore.synth.render import TRUTH_DOWNSAMPLE, TileRenderer

TILE = 512
DOWNSAMPLE = 4
MIN_LEVEL_PX = 128  # stop the pyramid when the next level would be smaller than this
THUMBNAIL_PX = 768
LEVEL1_IN_MEMORY = 64 * 2**20  # bytes; larger level-1 buffers go to a temporary file
APERIO = "Aperio Image Library v12.0.15"


@dataclass(frozen=True)
class SlideFile:
    """What was written: for the manifest and the tests."""

    path: Path
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    mpp: float
    truth_shape: tuple[int, int]


def level_dimensions(width: int, height: int) -> list[tuple[int, int]]:
    dims = [(width, height)]
    while max(dims[-1]) // DOWNSAMPLE >= MIN_LEVEL_PX and min(dims[-1]) >= DOWNSAMPLE:
        w, h = dims[-1]
        dims.append((w // DOWNSAMPLE, h // DOWNSAMPLE))
    return dims


def chunks(width: int, height: int, chunk: int) -> int:
    """How many render chunks a slide takes (progress bars)."""
    return math.ceil(width / chunk) * math.ceil(height / chunk)


def _level1_buffer(scratch: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Level 1 (1/16 of level 0) is kept to build the smaller levels; when that is large
    (a 40,000 x 30,000 slide: 225 MB) it lives in a scratch file next to the output."""
    if np.prod(shape) <= LEVEL1_IN_MEMORY:
        return np.empty(shape, np.uint8)
    return np.memmap(scratch / "level1.raw", np.uint8, "w+", shape=shape)


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    return imagecodecs.jpeg8_encode(
        tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling="420"
    )


def _tiles_of(image: np.ndarray, fill: np.ndarray, quality: int):
    """JPEG tiles of an in-memory level, row by row, padded with glass colour."""
    h, w = image.shape[:2]
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            block = image[y : y + TILE, x : x + TILE]
            if block.shape[:2] != (TILE, TILE):
                pad = np.empty((TILE, TILE, 3), np.uint8)
                pad[:] = fill
                pad[: block.shape[0], : block.shape[1]] = block
                block = pad
            yield _jpeg(np.ascontiguousarray(block), quality)


def _description(width, height, level_wh, quality, mpp, extra: dict) -> str:
    w, h = level_wh
    if (w, h) == (width, height):
        head = (
            f"{APERIO} \r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) "
            f"JPEG/RGB Q={quality}"
        )
    else:
        head = f"{APERIO} \r\n{width}x{height} -> {w}x{h} - "
    fields = {"AppMag": 40, "MPP": mpp, **extra}
    return head + "|" + "|".join(f"{k} = {v}" for k, v in fields.items())


def write_slide(
    path: Path, renderer: TileRenderer, truth_path: Path, extra: dict, progress=None
) -> SlideFile:
    """Render ``renderer.scene`` chunk by chunk into a pyramidal TIFF and its truth PNG.

    ``extra`` goes into the Aperio description (site, patient, ...). ``progress`` is
    called with 1 for each chunk rendered (see chunks()), for a progress bar. The file
    appears under its name only when complete.
    """
    scene, site = renderer.scene, renderer.site
    width, height, mpp = scene.width, scene.height, scene.mpp
    quality = site.jpeg_quality
    dims = level_dimensions(width, height)
    ntx, nty = math.ceil(width / TILE), math.ceil(height / TILE)
    per = renderer.tile // TILE  # the renderer draws square chunks of whole TIFF tiles
    glass = np.clip(np.asarray(site.light) + 0.5, 0, 255).astype(np.uint8)
    blank = np.empty((TILE, TILE, 3), np.uint8)
    blank[:] = glass
    blank_jpeg = _jpeg(blank, quality)
    small, tq = TILE // DOWNSAMPLE, TILE // TRUTH_DOWNSAMPLE
    truth = np.zeros((nty * tq, ntx * tq), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".synth-") as scratch:
        level1 = _level1_buffer(Path(scratch), (nty * small, ntx * small, 3))
        level1[:] = glass

        def level0():
            # TIFF wants tiles row by row: render a row of chunks, keep its encoded tiles.
            for cy in range(math.ceil(nty / per)):
                encoded = {}
                for cx in range(math.ceil(ntx / per)):
                    out = renderer.render(cx, cy)
                    if progress:
                        progress(1)
                    if out is None:
                        continue
                    rgb, block = out
                    for a, b in np.ndindex(per, per):
                        ty, tx = cy * per + a, cx * per + b
                        if ty >= nty or tx >= ntx:
                            continue
                        tile = np.ascontiguousarray(
                            rgb[a * TILE : (a + 1) * TILE, b * TILE : (b + 1) * TILE]
                        )
                        level1[ty * small : (ty + 1) * small, tx * small : (tx + 1) * small] = (
                            cv2.resize(tile, (small, small), interpolation=cv2.INTER_AREA)
                        )
                        truth[ty * tq : (ty + 1) * tq, tx * tq : (tx + 1) * tq] = block[
                            a * tq : (a + 1) * tq, b * tq : (b + 1) * tq
                        ]
                        encoded[ty, tx] = _jpeg(tile, quality)
                for ty in range(cy * per, min(nty, (cy + 1) * per)):
                    for tx in range(ntx):
                        yield encoded.get((ty, tx), blank_jpeg)

        part = path.with_name(path.name + ".part")
        _write_pyramid(part, level0(), level1, dims, glass, quality, mpp, extra)
        part.replace(path)
    truth = truth[: math.ceil(height / TRUTH_DOWNSAMPLE), : math.ceil(width / TRUTH_DOWNSAMPLE)]
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(truth_path), truth)
    return SlideFile(path, width, height, tuple(dims), mpp, truth.shape)


def _write_pyramid(
    path: Path, level0, level1: np.ndarray, dims, glass, quality: int, mpp: float, extra: dict
) -> None:
    """SVS order: level 0 (streamed), thumbnail, then levels 1.. built from level 1."""
    width, height = dims[0]
    options = dict(
        dtype=np.uint8,
        tile=(TILE, TILE),
        compression="jpeg",
        photometric="ycbcr",
        subsampling=(2, 2),
        metadata=None,
        software=False,
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
    )
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tw:
        tw.write(
            level0,
            shape=(height, width, 3),
            description=_description(width, height, dims[0], quality, mpp, extra),
            **options,
        )
        levels = [level1[: dims[1][1], : dims[1][0]]] if len(dims) > 1 else []
        source = levels[0] if levels else level1
        scale = min(1.0, THUMBNAIL_PX / max(source.shape[:2]))
        thumb = cv2.resize(
            source,
            (max(1, round(source.shape[1] * scale)), max(1, round(source.shape[0] * scale))),
            interpolation=cv2.INTER_AREA,
        )
        tw.write(
            thumb,
            photometric="rgb",
            compression="jpeg",
            metadata=None,
            software=False,
            description=_description(width, height, thumb.shape[1::-1], quality, mpp, {}),
        )
        for w, h in dims[2:]:
            levels.append(cv2.resize(levels[-1], (w, h), interpolation=cv2.INTER_AREA))
        for (w, h), image in zip(dims[1:], levels):
            tw.write(
                _tiles_of(image, glass, quality),
                shape=(h, w, 3),
                description=_description(width, height, (w, h), quality, mpp, {}),
                **options,
            )
