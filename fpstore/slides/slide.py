"""Slides: open any supported format, know its scale, read patches at a target resolution.

``open_slide`` picks a backend (see ``fpstore.slides.readers``): a fast tile
reader for tiled TIFF/SVS/OME-TIFF, tiatoolbox for every other whole-slide format,
an in-memory reader for plain images. All give the same pixels for the same
region; they differ only in speed.

Scale: microns per pixel (mpp) come from the slide's metadata, or from an
override (``mpp=`` here, ``--mpp`` / ``--mpp-overrides`` on the command line),
which wins. A slide with neither is refused with ``MppMissingError``.

Patches: a square of ``size_px`` level-0 pixels is read at the pyramid level
nearest above the target resolution (the coarsest level still at least as fine
as ``size_px / out_px`` level-0 pixels per output pixel, with a 2% tolerance) and
resized to ``out_px`` with ``resize_patch`` (``fpstore.config.RESAMPLING``).

Workers: a ``Slide`` pickles as its path and ``SlideInfo`` only; the file is
reopened lazily in each process (the pid is checked on every read), so a Slide
can be handed to DataLoader workers under fork or spawn. One Slide may be read
from several threads.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fpstore.errors import ConfigError, MppMissingError, SlideError
from fpstore.slides.scale import check_extent, check_mpp

# A level up to 2% coarser than the target still counts as the target: nominal
# 40x scanners sit at 0.252-0.2527 um/px, and reading the 4x larger level below
# for a ~1% gain in resolution would quadruple the decoding work.
LEVEL_TOLERANCE = 0.02
# Multi-part extensions first; a TCGA name keeps its dotted UUID (only these are stripped).
SLIDE_SUFFIXES = (
    ".ome.tiff",
    ".ome.tif",
    ".svs",
    ".tiff",
    ".tif",
    ".btf",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".bif",
    ".vms",
    ".vmu",
    ".svslide",
    ".dcm",
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
)
# Reading a whole level (thumbnails, tissue masks) goes in bands of at most this many pixels.
_BAND_PIXELS = 32 << 20


def resize_patch(img: np.ndarray, out_px: int) -> np.ndarray:
    """Resize an RGB image to ``out_px`` x ``out_px`` with the one fpstore method.

    Area averaging when shrinking (no aliasing of nuclei), bilinear when enlarging
    (``fpstore.config.RESAMPLING``). An image already at size is returned as is.
    """
    return resize_image(img, out_px, out_px)


def resize_image(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """``resize_patch`` for any output shape (thumbnails, masks of RGB images)."""
    import cv2

    if img.shape[1] == width and img.shape[0] == height:
        return img
    shrinking = img.shape[1] >= width and img.shape[0] >= height
    method = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(img, (int(width), int(height)), interpolation=method)


def slide_id_from_path(path: str | Path) -> str:
    """The file name without its slide extension(s); a folder (DICOM) keeps its name.

    ``TCGA-A1-A0SB-01Z-00-DX1.B34C267B-....svs`` -> ``TCGA-A1-A0SB-01Z-00-DX1.B34C267B-...``.
    """
    name = Path(path).name
    lowered = name.lower()
    for suffix in SLIDE_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def load_mpp_overrides(path: str | Path) -> dict[str, float]:
    """Read an mpp override CSV with columns ``slide`` and ``mpp``.

    ``slide`` may be a slide id, a file name or a path; keys of the result are
    slide ids (``slide_id_from_path``), so any of them matches.
    """
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
            columns = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(
            f"cannot read the mpp overrides file {path} as a CSV (columns slide,mpp): "
            f"{' '.join(str(error).split())[:200]}"
        ) from None
    if not {"slide", "mpp"} <= set(columns):
        raise ConfigError(
            f"mpp overrides file {path} needs the columns 'slide' and 'mpp'; "
            f"it has {sorted(columns)}"
        )
    overrides = {}
    for line, row in enumerate(rows, start=2):
        try:
            mpp = float(row["mpp"])
        except (TypeError, ValueError):
            mpp = float("nan")
        check_mpp(mpp, f"slide {row['slide']!r} ({path} line {line})")
        overrides[slide_id_from_path(row["slide"].strip())] = mpp
    return overrides


@dataclass(frozen=True)
class SlideInfo:
    """What fpstore knows about a slide once it is open."""

    slide_id: str
    path: str
    mpp: float
    mpp_source: str  # "metadata" or "override"
    width: int
    height: int
    level_count: int
    level_downsamples: tuple[float, ...]
    vendor: str
    backend: str  # "tifffile", "tiatoolbox" or "image"
    level_dimensions: tuple[tuple[int, int], ...] = field(default=())

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def open_slide(path: str | Path, mpp: float | None = None, tile_cache_mb: int = 96) -> Slide:
    """Open a slide and check that its pixels can be read.

    ``mpp`` overrides the metadata. Raises ``SlideError`` naming the file when it
    cannot be opened or read, ``MppMissingError`` when no scale is known.
    ``tile_cache_mb`` bounds the decoded-tile cache of the fast TIFF reader.
    """
    from fpstore.slides.readers import open_backend

    path = Path(path)
    if mpp is not None:
        check_mpp(mpp, f"slide {path}")
    if not path.exists():
        raise SlideError(f"slide {path} does not exist")
    if not (path.is_file() or path.is_dir()):  # a FIFO blocks the reader, /dev/zero never ends
        raise SlideError(
            f"slide {path} is not a regular file (a FIFO or device); give the slide file itself"
        )
    try:
        backend = open_backend(path, tile_cache_mb << 20)
    except Exception as error:  # every reader fails in its own way; all mean "cannot open"
        raise SlideError(f"cannot open slide {path}: {error}") from error
    try:
        # Decode one tile of the smallest level: a slide whose pixels are corrupt
        # fails here, before a long run, rather than deep inside it.
        backend.read_region(len(backend.level_dims) - 1, 0, 0, 1, 1)
    except Exception as error:
        backend.close()
        raise SlideError(
            f"cannot read the pixels of slide {path}: {type(error).__name__}: {error}"
        ) from error
    slide_id = slide_id_from_path(path)
    if mpp is None and backend.mpp is None:
        backend.close()
        found = f" ({backend.mpp_note})" if backend.mpp_note else ""
        raise MppMissingError(
            f"slide {slide_id!r} ({path}) has no microns per pixel in its metadata{found}; "
            f"give it with --mpp X for one slide, or --mpp-overrides CSV (columns slide,mpp) "
            f"for a cohort"
        )
    width, height = backend.level_dims[0]
    try:
        check_extent(path, width, height, mpp or backend.mpp, "override" if mpp else "metadata")
    except SlideError:
        backend.close()
        raise
    info = SlideInfo(
        slide_id=slide_id,
        path=str(path),
        mpp=float(mpp if mpp is not None else backend.mpp),
        mpp_source="override" if mpp is not None else "metadata",
        width=int(width),
        height=int(height),
        level_count=len(backend.level_dims),
        level_downsamples=tuple(backend.level_downsamples),
        vendor=backend.vendor,
        backend=backend.kind,
        level_dimensions=tuple(tuple(d) for d in backend.level_dims),
    )
    return Slide(info, tile_cache_mb, _backend=backend)


@dataclass
class JpegTiles:
    """The compressed JPEG tiles under a set of patches, to be decoded elsewhere (a GPU).

    Patch i is the ``side`` x ``side`` window at ``origin[i]`` (x, y) in the mosaic of the
    tiles ``tiles[i]`` (ky x kx indices into the streams; -1 is glass: outside the level,
    never scanned, or not under the window). Window columns outside ``inside[i][0:2]`` and
    rows outside ``inside[i][2:4]`` lie outside the level and are glass (255), as
    ``read_patch`` pads them. The window is then resized to ``out_px`` (``resize_patch``).
    """

    data: np.ndarray  # uint8: the tiles' complete JPEG streams, back to back
    offsets: np.ndarray  # int64 [T + 1]: stream t is data[offsets[t]:offsets[t + 1]]
    tile_px: tuple[int, int]  # (height, width) of a decoded tile
    tiles: np.ndarray  # int64 [N, ky, kx]
    origin: np.ndarray  # int64 [N, 2]
    inside: np.ndarray  # int64 [N, 4]: x0, x1, y0, y1 of the window inside the level
    side: int
    out_px: int


class Slide:
    """An open slide. Coordinates are level-0 pixels unless a name says otherwise."""

    def __init__(self, info: SlideInfo, tile_cache_mb: int = 96, _backend=None):
        self.info = info
        self._tile_cache_mb = tile_cache_mb
        self._backend = _backend
        self._pid = os.getpid() if _backend is not None else None

    # -- process safety: reopen in each process, pickle without handles --
    def __getstate__(self):
        return {"info": self.info, "tile_cache_mb": self._tile_cache_mb}

    def __setstate__(self, state):
        self.__init__(state["info"], state["tile_cache_mb"])

    @property
    def _reader(self):
        if self._backend is None or self._pid != os.getpid():
            from fpstore.slides.readers import open_backend

            # After fork the parent's handles are shared: leave them, open our own.
            try:
                self._backend = open_backend(Path(self.info.path), self._tile_cache_mb << 20)
            except Exception as error:
                raise SlideError(f"cannot reopen slide {self.info.path}: {error}") from error
            self._pid = os.getpid()
        return self._backend

    def close(self) -> None:
        if self._backend is not None and self._pid == os.getpid():
            self._backend.close()
        self._backend = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"Slide({i.slide_id!r}, {i.width}x{i.height}, mpp={i.mpp:.4g} [{i.mpp_source}], {i.backend})"

    # -- geometry --
    def level_for(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (2% tolerance)."""
        limit = downsample * (1 + LEVEL_TOLERANCE)
        best = 0
        for level, level_ds in enumerate(self.info.level_downsamples):
            if level_ds <= limit and level_ds > self.info.level_downsamples[best]:
                best = level
        return best

    def patch_size_px(self, patch_um: float) -> float:
        """Side of a ``patch_um`` square in level-0 pixels."""
        return patch_um / self.info.mpp

    # -- pixels --
    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Raw pixels of ``level`` at that level's own coordinates (white outside the slide)."""
        try:
            return self._reader.read_region(level, int(x), int(y), int(width), int(height))
        except SlideError:
            raise
        except Exception as error:
            raise SlideError(
                f"cannot read slide {self.info.path} at level {level}, "
                f"x={x} y={y} size {width}x{height}: {type(error).__name__}: {error}"
            ) from error

    def read_patch(self, x: int, y: int, size_px: float, out_px: int) -> np.ndarray:
        """The level-0 square (x, y, size_px) as an ``out_px`` x ``out_px`` RGB uint8 array."""
        level = self.level_for(size_px / out_px)
        downsample = self.info.level_downsamples[level]
        side = max(1, int(round(size_px / downsample)))
        region = self.read_region(
            level, int(round(x / downsample)), int(round(y / downsample)), side, side
        )
        return resize_patch(region, out_px)

    def read_patches(self, xy: np.ndarray, size_px: float, out_px: int) -> np.ndarray:
        """``read_patch`` for each row of ``xy`` (N, 2); returns (N, out_px, out_px, 3) uint8.

        Patches are read in raster order so neighbours reuse decoded tiles; the
        result keeps the order of ``xy``.
        """
        xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
        out = np.empty((len(xy), out_px, out_px, 3), np.uint8)
        for i in np.lexsort((xy[:, 0], xy[:, 1])):
            out[i] = self.read_patch(xy[i, 0], xy[i, 1], size_px, out_px)
        return out

    def _jpeg_level(self, size_px: float, out_px: int):
        """(backend, level, its jpeg_grid) that ``read_patch`` reads for these sizes."""
        from fpstore.slides.readers import UnsupportedByBackend

        reader = self._reader
        level = self.level_for(size_px / out_px)
        if not hasattr(reader, "jpeg_grid"):
            raise SlideError(
                f"slide {self.info.path} is read by {self.info.backend}, which has no JPEG "
                "tiles to hand over; read it with read_patches"
            )
        try:
            return reader, level, reader.jpeg_grid(level)
        except UnsupportedByBackend as error:
            raise SlideError(
                f"slide {self.info.path}: {error}; read it with read_patches"
            ) from None

    def jpeg_tiles(self, xy: np.ndarray, size_px: float, out_px: int) -> JpegTiles:
        """The undecoded tiles under the patches ``xy`` (``read_patches``'s arguments), with
        where each patch lies in them; decoding them gives ``read_patches``'s pixels up to
        the decoder's rounding. SlideError when the slide is not a JPEG-tiled TIFF."""
        reader, level, (tile_h, tile_w, across, down) = self._jpeg_level(size_px, out_px)
        downsample = self.info.level_downsamples[level]
        level_w, level_h = self.info.level_dimensions[level]
        side = max(1, int(round(size_px / downsample)))
        xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
        # As read_patch rounds: Python's round and numpy's both round half to even.
        rx = np.round(xy[:, 0] / downsample).astype(np.int64)
        ry = np.round(xy[:, 1] / downsample).astype(np.int64)
        kx, ky = -(-(tile_w - 1 + side) // tile_w), -(-(tile_h - 1 + side) // tile_h)
        tx0, ty0 = rx // tile_w, ry // tile_h
        gx = tx0[:, None] + np.arange(kx)  # [N, kx] tile columns of each mosaic
        gy = ty0[:, None] + np.arange(ky)
        used_x = (gx >= 0) & (gx < across) & (gx * tile_w < (rx + side)[:, None])
        used_x &= (gx + 1) * tile_w > rx[:, None]
        used_y = (gy >= 0) & (gy < down) & (gy * tile_h < (ry + side)[:, None])
        used_y &= (gy + 1) * tile_h > ry[:, None]
        index = np.where(
            used_y[:, :, None] & used_x[:, None, :], gy[:, :, None] * across + gx[:, None, :], -1
        )
        wanted = np.unique(index[index >= 0])
        streams, position = [], np.full(len(wanted), -1, np.int64)
        for i, tile in enumerate(wanted):
            stream = reader.jpeg_stream(level, int(tile))
            if stream is not None:  # sparse tiles stay -1: glass
                position[i] = len(streams)
                streams.append(stream)
        tiles = np.full(index.shape, -1, np.int64)
        found = index >= 0
        tiles[found] = position[np.searchsorted(wanted, index[found])]
        lengths = np.fromiter((len(b) for b in streams), np.int64, len(streams))
        return JpegTiles(
            data=np.frombuffer(bytearray(b"".join(streams)), np.uint8),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            tile_px=(tile_h, tile_w),
            tiles=tiles,
            origin=np.stack([rx - tx0 * tile_w, ry - ty0 * tile_h], 1),
            inside=np.stack(
                [
                    np.clip(-rx, 0, side),
                    np.clip(level_w - rx, 0, side),
                    np.clip(-ry, 0, side),
                    np.clip(level_h - ry, 0, side),
                ],
                1,
            ),
            side=side,
            out_px=int(out_px),
        )

    def jpeg_sample(self, size_px: float, out_px: int) -> tuple[bytes, np.ndarray] | None:
        """(JPEG stream, this reader's decoding of it) of the first scanned tile of the level
        ``jpeg_tiles`` reads: a check that another decoder reads the slide's tiles alike.
        None when that level has no scanned tile; SlideError as ``jpeg_tiles``."""
        reader, level, (_, _, across, down) = self._jpeg_level(size_px, out_px)
        for index in range(across * down):
            stream = reader.jpeg_stream(level, index)
            if stream is not None:
                return stream, reader.decoded_tile(level, index)
        return None

    def read_downsampled(self, downsample: float) -> np.ndarray:
        """The whole slide at ``downsample`` (level-0 px per output px), RGB uint8.

        Read from the coarsest level fine enough, in bands, so that a slide
        without a pyramid does not need its full level 0 in memory at once.
        """
        width = max(1, int(round(self.info.width / downsample)))
        height = max(1, int(round(self.info.height / downsample)))
        level = self.level_for(downsample)
        level_w, level_h = self.info.level_dimensions[level]
        out = np.empty((height, width, 3), np.uint8)
        rows_per_band = max(1, _BAND_PIXELS // max(1, level_w) * height // max(1, level_h))
        for r0 in range(0, height, rows_per_band):
            r1 = min(height, r0 + rows_per_band)
            y0 = int(math.floor(r0 * level_h / height))
            y1 = max(y0 + 1, int(math.ceil(r1 * level_h / height)))
            band = self.read_region(level, 0, y0, level_w, y1 - y0)
            out[r0:r1] = resize_image(band, width, r1 - r0)
        return out

    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, float]:
        """(RGB uint8 image whose longer side is ``max_px``, downsample vs level 0)."""
        # Never enlarge: a slide smaller than max_px comes back at level 0.
        downsample = max(1.0, max(self.info.width, self.info.height) / max_px)
        return self.read_downsampled(downsample), downsample
