"""Pixel backends behind :class:`fpstore.slides.slide.Slide`.

Three backends share one small interface (``level_dims``, ``level_downsamples``,
``mpp``, ``mpp_note``, ``vendor``, ``read_region(level, x, y, w, h)`` in the
level's own pixel coordinates, ``close()``):

- ``TiffBackend``: the fast path for tiled TIFF pyramids (Aperio SVS, generic
  tiled TIFF, OME-TIFF RGB). tifffile finds the tiles, ``os.pread`` fetches the
  bytes (no shared file position, so threads may read at once), imagecodecs
  decodes only the tiles a region touches, and a small LRU keeps decoded tiles
  for neighbouring patches.
- ``ImageBackend``: plain images (JPEG, PNG, BMP, flat TIFF) held in memory.
- ``TiaBackend``: tiatoolbox's ``WSIReader`` for every other format (NDPI, MRXS,
  DICOM, SCN, ...). tiatoolbox is imported only here: it takes ~10 s to import.

Regions that extend past the image are padded with white (glass).
"""

from __future__ import annotations

import os
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fpstore.slides.scale import PLAUSIBLE_MPP

PAD_VALUE = 255
_UM_PER_UNIT = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
_NOT_A_TIFF = "tifffile cannot parse it"
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")


class UnsupportedByBackend(Exception):
    """This backend does not handle the file; the next one may (not a user error)."""


def _plausible(mpp: float | None, where: str) -> tuple[float | None, str]:
    """(mpp, note): mpp when plausible, else None and a note saying what was found."""
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        return None, ""
    low, high = PLAUSIBLE_MPP
    if low <= mpp <= high:
        return float(mpp), ""
    return None, (
        f"{where} say {mpp:.4g} um/px, outside the plausible range {low}-{high} um/px "
        "(a screen DPI written by image software, not a scan resolution)"
    )


def _tiff_resolution_mpp(page) -> tuple[float | None, str]:
    """Microns per pixel from the TIFF XResolution/ResolutionUnit tags."""
    tag, unit_tag = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if tag is None or unit_tag is None:
        return None, ""
    um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(int(unit_tag.value))  # inch, cm
    num, den = tag.value
    if um_per_unit is None or not num or not den:
        return None, ""
    return _plausible(um_per_unit * den / num, "the TIFF resolution tags")


def _ome_mpp(xml: str) -> tuple[float | None, str]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, ""
    for element in root.iter():
        if element.tag.endswith("Pixels") and "PhysicalSizeX" in element.attrib:
            unit = element.attrib.get("PhysicalSizeXUnit", "µm")
            if unit not in _UM_PER_UNIT:
                return None, f"the OME-XML PhysicalSizeXUnit {unit!r} is not a length unit"
            size = float(element.attrib["PhysicalSizeX"]) * _UM_PER_UNIT[unit]
            return _plausible(size, "the OME-XML PhysicalSizeX")
    return None, ""


def _to_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB from gray (H, W[, 1]), RGB or RGBA (alpha dropped)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[2] == 1:
        return np.repeat(pixels, 3, axis=2)
    return pixels[..., :3]


class _TileLRU:
    """Decoded tiles keyed by (level, tile index), bounded in bytes; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._tiles: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key, tile: np.ndarray) -> None:
        with self._lock:
            if key in self._tiles or tile.nbytes > self.max_bytes:
                return
            self._tiles[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._tiles.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._tiles.clear()
            self._bytes = 0


class _TiffLevel:
    def __init__(self, page):
        self.page = page
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.tiles_x = -(-self.width // self.tile_w)
        self.offsets = page.dataoffsets
        self.bytecounts = page.databytecounts
        self.jpegtables = getattr(page, "jpegtables", None)
        self.decode = page.decode


class TiffBackend:
    """Tiled TIFF pyramids through tifffile + imagecodecs, decoding only touched tiles."""

    kind = "tifffile"

    def __init__(self, path: Path, tile_cache_bytes: int = 96 << 20):
        import tifffile

        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as error:  # tifffile raises several types for non-TIFF input
            raise UnsupportedByBackend(f"{_NOT_A_TIFF}: {type(error).__name__}: {error}") from error
        try:
            self._init_levels()
        except UnsupportedByBackend:
            self._tif.close()
            raise
        self._fd = os.open(path, os.O_RDONLY)
        self._cache = _TileLRU(tile_cache_bytes)

    def _init_levels(self) -> None:
        tif = self._tif
        flavours = ("is_ndpi", "is_philips", "is_scn", "is_bif", "is_qpi", "is_lsm", "is_stk")
        if any(getattr(tif, name, False) for name in flavours) or not tif.series:
            raise UnsupportedByBackend("a vendor TIFF flavour better read by tiatoolbox")
        series = tif.series[0]
        if series.axes not in ("YXS", "YX"):
            raise UnsupportedByBackend(f"series axes {series.axes!r} are not one RGB plane")
        if tif.is_svs:
            # As OpenSlide reads Aperio: every tiled page is a level, the others are
            # associated images (tifffile assumes page 1 is a thumbnail, not always true).
            pages = [page for page in tif.pages if page.is_tiled]
            pages = [
                p for i, p in enumerate(pages) if i == 0 or p.imagewidth < pages[i - 1].imagewidth
            ]
        else:
            pages = [level.keyframe for level in series.levels]
        for page in pages:
            rgb = page.photometric == 2 or (page.photometric == 6 and page.compression == 7)
            if not (
                page.is_tiled
                and page.dtype == np.uint8
                and (rgb or page.photometric == 1)
                and (page.samplesperpixel == 1 or page.planarconfig == 1)
            ):
                raise UnsupportedByBackend("not a tiled 8-bit RGB/gray pyramid")
        self.levels = [_TiffLevel(page) for page in pages]
        base = self.levels[0]
        self.level_dims = [(lv.width, lv.height) for lv in self.levels]
        # Same convention as OpenSlide: the mean of the two axes' ratios.
        self.level_downsamples = [
            (base.width / lv.width + base.height / lv.height) / 2 for lv in self.levels
        ]
        if tif.is_svs:
            self.vendor = "aperio"
            found = _APERIO_MPP.search(base.page.description or "")
            self.mpp, self.mpp_note = _plausible(
                float(found.group(1)) if found else None, "the Aperio description"
            )
        elif tif.is_ome:
            self.vendor = "ome"
            self.mpp, self.mpp_note = _ome_mpp(tif.ome_metadata or "")
        else:
            self.vendor = "generic-tiff"
            self.mpp, self.mpp_note = _tiff_resolution_mpp(base.page)

    def _tile(self, level_index: int, index: int) -> np.ndarray:
        key = (level_index, index)
        tile = self._cache.get(key)
        if tile is None:
            level = self.levels[level_index]
            count = level.bytecounts[index]
            if count == 0:  # sparse tile (never scanned): glass
                tile = np.full((level.tile_h, level.tile_w, 3), PAD_VALUE, np.uint8)
            else:
                data = os.pread(self._fd, count, level.offsets[index])
                decoded = level.decode(data, index, jpegtables=level.jpegtables)[0]
                tile = _to_rgb(decoded.reshape(decoded.shape[-3:]))
            self._cache.put(key, tile)
        return tile

    def read_region(self, level_index: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        level = self.levels[level_index]
        out = np.full((h, w, 3), PAD_VALUE, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, level.width), min(y + h, level.height)
        if x0 >= x1 or y0 >= y1:
            return out
        tw, th = level.tile_w, level.tile_h
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(level_index, ty * level.tiles_x + tx)
                # The part of this tile inside the requested window, in slide coordinates.
                sx0, sy0 = max(x0, tx * tw), max(y0, ty * th)
                sx1, sy1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[
                    sy0 - ty * th : sy1 - ty * th, sx0 - tx * tw : sx1 - tx * tw
                ]
        return out

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()
        os.close(self._fd)


class ImageBackend:
    """A plain image (JPEG, PNG, BMP, flat TIFF) held in memory as one level."""

    kind = "image"
    SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

    def __init__(self, path: Path):
        self.mpp, self.mpp_note = None, ""
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                if page.is_tiled or page.dtype != np.uint8:
                    raise UnsupportedByBackend("not a flat 8-bit TIFF")
                self.mpp, self.mpp_note = _tiff_resolution_mpp(page)
                pixels = page.asarray()
            self.vendor = "flat-tiff"
        else:
            import cv2

            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise UnsupportedByBackend("OpenCV cannot decode it as an image")
            pixels = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            self.vendor = "image"
        self._pixels = np.ascontiguousarray(_to_rgb(pixels))
        height, width = self._pixels.shape[:2]
        self.level_dims = [(width, height)]
        self.level_downsamples = [1.0]

    def read_region(self, level_index: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), PAD_VALUE, np.uint8)
        width, height = self.level_dims[0]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x0 < x1 and y0 < y1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._pixels[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._pixels = None


class TiaBackend:
    """Any format tiatoolbox's WSIReader opens (OpenSlide formats, DICOM folders, ...)."""

    kind = "tiatoolbox"

    def __init__(self, path: Path):
        from tiatoolbox.wsicore.wsireader import DICOMWSIReader, WSIReader

        # WSIReader.open needs a file suffix; a folder is a DICOM series.
        self._reader = DICOMWSIReader(path) if path.is_dir() else WSIReader.open(path)
        info = self._reader.info
        self.level_dims = [tuple(int(v) for v in dims) for dims in info.level_dimensions]
        self.level_downsamples = [float(d) for d in info.level_downsamples]
        self.vendor = str(info.vendor or type(self._reader).__name__)
        mpp = None if info.mpp is None else float(np.asarray(info.mpp).ravel()[0])
        self.mpp, self.mpp_note = _plausible(mpp, "the slide metadata")

    def read_region(self, level_index: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        downsample = self.level_downsamples[level_index]
        pixels = self._reader.read_rect(
            (int(round(x * downsample)), int(round(y * downsample))),
            (int(w), int(h)),
            resolution=level_index,
            units="level",
            pad_mode="constant",
            pad_constant_values=PAD_VALUE,
        )
        return np.ascontiguousarray(_to_rgb(np.asarray(pixels, dtype=np.uint8)))

    def close(self) -> None:
        close = getattr(self._reader, "close", None)
        if close is not None:
            close()


def open_backend(path: Path, tile_cache_bytes: int):
    """The first backend that handles ``path``; raises with each backend's reason."""
    reasons = []
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".svs", ".tif", ".tiff", ".btf", ".tf8"):
        try:
            return TiffBackend(path, tile_cache_bytes)
        except UnsupportedByBackend as error:
            reasons.append(str(error))
            if not error.args[0].startswith(_NOT_A_TIFF):
                try:
                    return ImageBackend(path)
                except UnsupportedByBackend as flat_error:
                    reasons.append(str(flat_error))
    if path.is_file() and suffix in ImageBackend.SUFFIXES:
        return ImageBackend(path)
    try:
        return TiaBackend(path)
    except Exception as error:  # tiatoolbox/OpenSlide/wsidicom raise many unrelated types
        reasons.append(f"tiatoolbox: {type(error).__name__}: {error}")
        raise OSError("; ".join(reasons)) from error
