"""TMA dearraying: find the round cores of a tissue microarray, order them into rows and
columns, join the array map, and crop each core the paper's way (0.5 um/px, 1600 x 1600 px,
split into left and right halves).

Detection works on a thumbnail: a foreground mask (anything darker than the glass, so the
faint septa of fat count), resampled so that a core is ~64 px wide, a closing sized to the
cores (fragments of one core join), connected components measured by their convex hull;
touching cores are split by a watershed on the distance transform. The grid is found by
de-rotating the
centres (median nearest-neighbour angle) and clustering y into rows and x into columns, so
missing cores and a slight tilt do not shift the numbering. Rows and columns count from 1 at
the first row/column that has a core.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fpstore.config import check_range
from fpstore.errors import ConfigError, SlideError


@dataclass(frozen=True)
class TmaSpec:
    """Dearraying settings. The defaults follow the paper (0.5 um/px, 1600 px squares)."""

    thumbnail_px: int = 2048  # longest side of the detection thumbnail
    crop_mpp: float = 0.5
    crop_px: int = 1600
    min_area: float = 0.3  # blobs below this fraction of the typical core area are debris
    max_area: float = 3.0  # blobs above it (after splitting) are not cores: labels, pen marks

    def __post_init__(self):
        check_range("TmaSpec", "thumbnail_px", self.thumbnail_px, 128, 16384)
        check_range("TmaSpec", "crop_mpp", self.crop_mpp, 0.05, 20.0)
        check_range("TmaSpec", "crop_px", self.crop_px, 16, 8192)
        check_range("TmaSpec", "min_area", self.min_area, 0.0, 1.0)
        check_range("TmaSpec", "max_area", self.max_area, 1.0, 100.0)


@dataclass
class Core:
    row: int  # 1-based
    column: int  # 1-based
    centre: tuple[float, float]  # (x, y) at level 0, pixels
    diameter_px: float  # equivalent diameter at level 0
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) at level 0, exclusive end
    core_index: int | None = None  # from the array map
    patient_id: str | None = None

    @property
    def name(self) -> str:
        index = f"_core{self.core_index:03d}" if self.core_index is not None else ""
        return f"r{self.row:02d}_c{self.column:02d}{index}"

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


# --- detection on the thumbnail -------------------------------------------------------------


def foreground_mask(rgb: np.ndarray) -> np.ndarray:
    """Everything that is not glass on an RGB uint8 image.

    Darkness = 255 - min channel is high for haematoxylin and eosin alike. Glass is the
    commonest darkness; a pixel a few noise widths above it is tissue, so that the faint
    septa of fat count too (Otsu would cut fatty cores into pieces); Otsu's threshold
    caps it on slides where glass is noisy.
    """
    from skimage.filters import threshold_otsu

    darkness = 255 - rgb[..., :3].min(axis=2)
    if int(darkness.max()) - int(darkness.min()) < 10:
        return np.zeros(darkness.shape, bool)
    glass = int(np.bincount(darkness.ravel(), minlength=256).argmax())
    near = darkness[np.abs(darkness.astype(int) - glass) <= 20].astype(float)
    noise = 1.4826 * float(np.median(np.abs(near - glass)))
    threshold = min(glass + max(6.0, 4.0 * noise), float(threshold_otsu(darkness)))
    return darkness > threshold


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value at the median of the cumulative weight: many specks of debris or one big
    artefact barely move it, unlike a plain median or mean."""
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def _typical_area(mask: np.ndarray) -> float:
    """Area of a typical core in a hole-filled mask (weighted by area: specks barely count;
    touching cores would inflate it, but arrays space their cores)."""
    from scipy import ndimage as ndi

    areas = np.bincount(ndi.label(mask)[0].ravel())[1:].astype(float)
    return _weighted_median(areas, areas) if areas.size else 0.0


# Detection runs where a core's radius is about this many pixels: morphology stays cheap
# and the closing below is the same size relative to a core on every slide.
WORK_RADIUS_PX = 32


def find_blobs(mask: np.ndarray, spec: TmaSpec = TmaSpec()) -> list[dict]:
    """Cores in a foreground mask: centre (x, y), equivalent diameter and bbox, in the
    mask's pixels. Fragments of a core (torn tissue, fat) are closed into one and measured
    by their convex hull; touching cores are split by a watershed."""
    import cv2
    from scipy import ndimage as ndi

    filled = ndi.binary_fill_holes(mask)
    typical = _typical_area(filled)
    if typical < 4:
        return []
    scale = min(1.0, WORK_RADIUS_PX / math.sqrt(typical / math.pi))
    shape = (max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale)))
    # A working pixel is foreground when a fifth of it is: thin septa of fat survive.
    small = cv2.resize(mask.astype(np.float32), shape, interpolation=cv2.INTER_AREA) > 0.2
    radius = max(1.0, math.sqrt(_typical_area(ndi.binary_fill_holes(small)) / math.pi))
    size = 2 * int(round(0.2 * radius)) + 1  # closes gaps of ~40% of a radius
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    pad = size
    closed = cv2.morphologyEx(np.pad(small, pad).astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    closed = ndi.binary_fill_holes(closed[pad:-pad, pad:-pad])
    labels = _split_touching(closed, math.pi * radius**2, radius)
    return _measure(labels, math.pi * radius**2, spec, scale)


def _split_touching(mask: np.ndarray, typical: float, radius: float) -> np.ndarray:
    """Label the mask; blobs of well over one core's area are split at the saddles of
    their distance transform (two cores pushed together)."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.measure import label, regionprops
    from skimage.segmentation import watershed

    labels = label(mask)
    for region in regionprops(labels):
        if region.area <= 1.6 * typical:
            continue
        sub = labels[region.slice] == region.label
        distance = ndi.distance_transform_edt(sub)
        peaks = peak_local_max(
            distance,
            min_distance=max(1, int(0.7 * radius)),
            threshold_abs=0.5 * radius,
            labels=sub.astype(int),
        )
        if len(peaks) > 1:
            markers = np.zeros(sub.shape, int)
            markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
            split = watershed(-distance, markers, mask=sub)
            view = labels[region.slice]
            view[sub] = np.where(split[sub] > 1, split[sub] + labels.max(), region.label)
    return labels


def _measure(labels: np.ndarray, typical: float, spec: TmaSpec, scale: float) -> list[dict]:
    """Centre, diameter and bbox of each core-sized blob's convex hull, in mask pixels."""
    from skimage.measure import regionprops

    blobs = []
    for region in regionprops(labels):
        if not spec.min_area * typical <= region.area_convex <= spec.max_area * typical:
            continue
        hull = region.image_convex
        ys, xs = np.nonzero(hull)
        y0, x0, y1, x1 = region.bbox
        blobs.append(
            {
                "centre": ((x0 + xs.mean() + 0.5) / scale, (y0 + ys.mean() + 0.5) / scale),
                "diameter": math.sqrt(4 * hull.sum() / math.pi) / scale,
                "bbox": (x0 / scale, y0 / scale, x1 / scale, y1 / scale),
            }
        )
    return blobs


def _tilt(points: np.ndarray) -> float:
    """Array tilt (radians): median angle from each core to its nearest, more horizontal than
    vertical, neighbour."""
    if len(points) < 2:
        return 0.0
    delta = points[None, :, :] - points[:, None, :]
    dist = np.hypot(delta[..., 0], delta[..., 1])
    horizontal = np.abs(delta[..., 0]) > np.abs(delta[..., 1])
    dist = np.where(horizontal & (dist > 0), dist, np.inf)
    nearest = dist.argmin(axis=1)
    ok = np.isfinite(dist[np.arange(len(points)), nearest])
    if not ok.any():
        return 0.0
    d = delta[np.arange(len(points)), nearest][ok]
    d = d * np.sign(d[:, :1])  # point right, so that the angle lies in (-45, 45) degrees
    return float(np.median(np.arctan2(d[:, 1], d[:, 0])))


def _grid_index(values: np.ndarray, gap: float) -> np.ndarray:
    """1-based row (or column) of each value: clusters split where sorted values jump by more
    than ``gap``; a jump of k pitches skips k - 1 indices (rows without any core)."""
    order = np.argsort(values)
    sorted_values = values[order]
    cluster = np.concatenate([[0], np.cumsum(np.diff(sorted_values) > gap)])
    means = np.array([sorted_values[cluster == c].mean() for c in range(cluster[-1] + 1)])
    steps = np.diff(means)
    if steps.size:
        pitch = float(np.median(steps))
        pitch = float(np.median(steps / np.maximum(1, np.round(steps / pitch))))
        index_of_cluster = np.concatenate([[0], np.cumsum(np.maximum(1, np.round(steps / pitch)))])
    else:
        index_of_cluster = np.zeros(1)
    index = np.empty(len(values), int)
    index[order] = index_of_cluster[cluster].astype(int) + 1
    return index


def assign_grid(centres: np.ndarray, diameters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns (1-based) of core centres (N, 2 as x, y)."""
    if len(centres) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    angle = _tilt(centres)
    c, s = math.cos(-angle), math.sin(-angle)
    straight = (centres - centres.mean(axis=0)) @ np.array([[c, s], [-s, c]])
    # Cores of one row differ in y by far less than a core radius; rows by a diameter or more.
    gap = 0.5 * float(np.median(diameters))
    return _grid_index(straight[:, 1], gap), _grid_index(straight[:, 0], gap)


# --- array map ------------------------------------------------------------------------------


def _row_number(value: str, path: Path, line_no: int) -> int:
    value = value.strip()
    if value.isdigit():
        return int(value)
    if value.isalpha():  # A, B, ..., Z, AA: the letters many array maps use for rows
        return sum((ord(ch) - 64) * 26**i for i, ch in enumerate(reversed(value.upper())))
    raise ConfigError(
        f"{path.name} line {line_no}: row/column {value!r} is neither a number nor letters"
    )


def read_array_map(path: Path) -> dict[tuple[int, int], tuple[int, str]]:
    """(row, column) -> (core_index, patient_id) from a CSV with those four columns."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"array map {str(path)!r} does not exist; pass --array-map CSV")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    header = {h.strip().lower(): h for h in (rows[0] if rows else {})}
    needed = ("row", "column", "core_index", "patient_id")
    missing = [c for c in needed if c not in header]
    if missing:
        raise ConfigError(
            f"array map {str(path)!r} lacks the column(s) {', '.join(missing)}; "
            f"it needs {', '.join(needed)} (found: {', '.join(header.values()) or 'no rows'})"
        )
    table = {}
    for line_no, row in enumerate(rows, start=2):
        key = (
            _row_number(row[header["row"]], path, line_no),
            _row_number(row[header["column"]], path, line_no),
        )
        if key in table:
            raise ConfigError(
                f"{path.name} line {line_no}: row {key[0]} column {key[1]} appears twice"
            )
        index = row[header["core_index"]].strip()
        if not index.isdigit():
            raise ConfigError(
                f"{path.name} line {line_no}: core_index {index!r} is not a whole number"
            )
        table[key] = (int(index), row[header["patient_id"]].strip())
    return table


# --- the public steps -----------------------------------------------------------------------


def detect(slide, spec: TmaSpec = TmaSpec()) -> tuple[list[Core], np.ndarray, float]:
    """Cores of a slide (unjoined), plus the thumbnail and its downsample (for overlays)."""
    longest = max(slide.info.width, slide.info.height)
    thumb, downsample = slide.thumbnail(min(spec.thumbnail_px, longest))  # never upsample
    blobs = find_blobs(foreground_mask(thumb), spec)
    if not blobs:
        return [], thumb, downsample
    centres = np.array([b["centre"] for b in blobs], float)
    diameters = np.array([b["diameter"] for b in blobs], float)
    rows, cols = assign_grid(centres, diameters)
    cores = [
        Core(
            row=int(r),
            column=int(c),
            centre=(float(b["centre"][0] * downsample), float(b["centre"][1] * downsample)),
            diameter_px=float(b["diameter"] * downsample),
            bbox=tuple(int(round(v * downsample)) for v in b["bbox"]),
        )
        for b, r, c in zip(blobs, rows, cols, strict=True)
    ]
    return sorted(cores, key=lambda k: (k.row, k.column)), thumb, downsample


def join_array_map(cores: list[Core], table: dict) -> list[dict]:
    """Set core_index and patient_id from the map; return the map entries with no core found."""
    for core in cores:
        core.core_index, core.patient_id = table.get((core.row, core.column), (None, None))
    found = {(k.row, k.column) for k in cores}
    return [
        {"row": r, "column": c, "core_index": i, "patient_id": p}
        for (r, c), (i, p) in sorted(table.items())
        if (r, c) not in found
    ]


def dearray(slide, array_map: Path | None = None, spec: TmaSpec = TmaSpec()) -> list[Core]:
    """The cores of an array slide ordered by row and column, joined to ``array_map``."""
    cores, _, _ = detect(slide, spec)
    if array_map is not None:
        join_array_map(cores, read_array_map(array_map))
    return cores


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


# --- writing a dearrayed slide --------------------------------------------------------------


def draw_overlay(thumb: np.ndarray, downsample: float, cores: list[Core]) -> np.ndarray:
    """The thumbnail with each core circled and numbered (core index, else row-column);
    green: in the array map, orange: not in it."""
    import cv2

    image = np.ascontiguousarray(thumb[..., :3]).copy()
    for core in cores:
        centre = (int(round(core.centre[0] / downsample)), int(round(core.centre[1] / downsample)))
        radius = max(2, int(round(core.diameter_px / downsample / 2)))
        colour = (0, 160, 0) if core.core_index is not None else (255, 140, 0)
        text = str(core.core_index) if core.core_index is not None else f"{core.row}-{core.column}"
        # text about half a core wide, whatever the thumbnail's scale
        font = max(0.3, radius / (22.0 * max(2, len(text))))
        thickness = max(1, int(round(font * 2)))
        (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, thickness)
        cv2.circle(image, centre, radius, colour, max(1, radius // 40))
        origin = (centre[0] - w // 2, centre[1] + h // 2)
        cv2.putText(
            image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 200), thickness, cv2.LINE_AA
        )
    return image


def _write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(
        str(path), np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ):
        raise SlideError(f"could not write {path}; check the --out folder is writable")


def export_cores(
    slide_path: Path,
    out: Path,
    array_map: Path | None = None,
    mpp: float | None = None,
    spec: TmaSpec = TmaSpec(),
    force: bool = False,
) -> dict:
    """Dearray a slide into ``out``: cores.csv and cores.json (row, column, centre, diameter,
    bbox, core index, patient), overlay.png, and per core ``crops/<name>.png`` with its
    ``_left``/``_right`` halves. Returns the cores.json document."""
    import json

    from tqdm import tqdm

    from fpstore.slides.slide import open_slide

    out = Path(out)
    if (out / "cores.json").exists() and not force:
        raise ConfigError(
            f"{out} already holds a dearrayed slide (cores.json); pass --force to overwrite"
        )
    table = read_array_map(array_map) if array_map is not None else None
    slide = open_slide(slide_path, mpp=mpp)
    try:
        cores, thumb, downsample = detect(slide, spec)
        unmatched = join_array_map(cores, table) if table is not None else []
        (out / "crops").mkdir(parents=True, exist_ok=True)
        _write_png(out / "overlay.png", draw_overlay(thumb, downsample, cores))
        for core in tqdm(cores, desc="crop cores", unit="core"):
            crop = crop_core(slide, core, spec.crop_mpp, spec.crop_px)
            left, right = split_halves(crop)
            _write_png(out / "crops" / f"{core.name}.png", crop)
            _write_png(out / "crops" / f"{core.name}_left.png", left)
            _write_png(out / "crops" / f"{core.name}_right.png", right)
        info = slide.info
    finally:
        slide.close()
    document = {
        "slide": str(Path(slide_path).resolve()),
        "slide_mpp": info.mpp,
        "crop_mpp": spec.crop_mpp,
        "crop_px": spec.crop_px,
        "n_cores": len(cores),
        "n_rows": max((k.row for k in cores), default=0),
        "n_columns": max((k.column for k in cores), default=0),
        "array_map": str(array_map) if array_map is not None else None,
        "cores_not_in_map": [k.name for k in cores if table is not None and k.core_index is None],
        "map_entries_without_core": unmatched,
        "cores": [k.to_dict() for k in cores],
    }
    (out / "cores.json").write_text(json.dumps(document, indent=2))
    columns = [
        "name",
        "row",
        "column",
        "core_index",
        "patient_id",
        "x",
        "y",
        "diameter_px",
        "x0",
        "y0",
        "x1",
        "y1",
    ]
    with open(out / "cores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for k in cores:
            writer.writerow(
                [
                    k.name,
                    k.row,
                    k.column,
                    k.core_index,
                    k.patient_id,
                    round(k.centre[0], 1),
                    round(k.centre[1], 1),
                    round(k.diameter_px, 1),
                    *k.bbox,
                ]
            )
    return document
