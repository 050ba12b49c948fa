"""TMA dearraying: find the round cores of a tissue microarray, fit the array's lattice,
number every position, join the array map, and crop each core the paper's way (0.5 um/px,
1600 x 1600 px, split into left and right halves).

Detection works on a thumbnail, resampled so that a core is about 32 px across:

1. Core size: a foreground mask (anything darker than the glass, so the faint septa of fat
   count), closed and hole-filled at the core's scale; the radius is the typical largest
   inscribed radius of its pieces, which cores pressed together keep (their area would not).
   With ``core_um`` and the slide's mpp the size is known and the measurement only checks it.
2. Candidates: the share of tissue in a core-sized disc peaks at each core's centre, also
   where neighbours touch (the disc over the gap between two touching cores is a quarter
   empty); peaks at least ``min_fill`` full are candidates.
3. Lattice (``fpstore.slides.tma_lattice``): the row and column steps from the candidates'
   neighbours, candidates one step apart linked into groups, a least-squares lattice per
   group (affine, or quadratic for bowed rows), groups split off by an empty row or column
   joined back. Big groups are blocks; a handful of cores away from every block are
   orientation cores; anything else off the lattice is debris.
4. Positions: every node of a block's bounding rectangle is a core when a candidate sits on
   it or when at least ``min_tissue`` of the disc there is tissue (fragments, faint
   cores), else empty. Each core is measured on its watershed region (touching neighbours
   cut apart); its confidence is the product of how well it sits on its node (1 on it, 0 at
   ``MAX_MISFIT``), how complete it is (its tissue over a core's area) and how round (the
   short over the long axis of its hull).

Numbering: blocks count from 1 in reading order (top to bottom by bands of blocks, then left
to right); rows and columns from 1 at the first row and column of each block's rectangle.
Blocks of one array are not on one lattice (the gaps between them are not whole steps), so
one global grid would have to invent positions between them; a block index with its own rows
and columns keeps every number a real position, and an array map can list a ``block``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from fpstore.config import check_range
from fpstore.errors import ConfigError, MppMissingError, SlideError, TmaError
from fpstore.store.io import remove_dead_temporaries_in, write_text_atomic

# Detection runs where a core's radius is about this many pixels: morphology stays cheap
# and every size below is the same fraction of a core on every slide.
WORK_RADIUS_PX = 16
# The punch assumed when an image has neither mpp nor --core-um: 0.6 mm is the commonest.
DEFAULT_CORE_UM = 600.0
# A core's centre that lies further than this from its node (in pitches) is not on it.
MAX_MISFIT = 0.35


@dataclass(frozen=True)
class TmaSpec:
    """Dearraying settings. The crop defaults follow the paper (0.5 um/px, 1600 px squares).

    ``core_um`` is the punch diameter in microns: with the slide's mpp it fixes the expected
    core size, without an mpp it sets the slide's scale from the measured core diameter.
    """

    thumbnail_px: int = 2048  # longest side of the detection thumbnail
    crop_mpp: float = 0.5
    crop_px: int = 1600
    core_um: float | None = None
    min_fill: float = 0.6  # a candidate's disc is at least this full of tissue
    min_tissue: float = 0.1  # a lattice position with less tissue in its disc is empty
    max_orientation: int = 6  # at most this many cores away from the blocks are orientation

    def __post_init__(self):
        check_range("TmaSpec", "thumbnail_px", self.thumbnail_px, 128, 16384)
        check_range("TmaSpec", "crop_mpp", self.crop_mpp, 0.05, 20.0)
        check_range("TmaSpec", "crop_px", self.crop_px, 16, 8192)
        check_range("TmaSpec", "min_fill", self.min_fill, 0.2, 1.0)
        check_range("TmaSpec", "min_tissue", self.min_tissue, 0.0, 1.0)
        check_range("TmaSpec", "max_orientation", self.max_orientation, 0, 100)
        if self.core_um is not None and not (
            isinstance(self.core_um, int | float) and 100 <= self.core_um <= 5000
        ):
            raise ConfigError(
                f"core_um={self.core_um!r} is not a TMA punch diameter; give it in microns "
                f"between 100 and 5000 (a 0.6 mm punch is --core-um 600)"
            )


@dataclass
class Core:
    """One position of the array: a core on the lattice, an empty lattice position, or an
    orientation core off the lattice (block 0, row 0, column = its number)."""

    row: int  # 1-based within the block
    column: int  # 1-based within the block
    centre: tuple[float, float]  # (x, y) at level 0, pixels; the lattice node when empty
    diameter_px: float  # equivalent diameter of the convex hull at level 0 (typical if empty)
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) at level 0, exclusive end
    core_index: int | None = None  # from the array map
    patient_id: str | None = None
    block: int = 1  # 1-based, reading order
    status: str = "core"  # "core", "empty" or "orientation"
    confidence: float = 1.0  # 0-1: on its node x complete x round (core), clear glass (empty)

    @property
    def name(self) -> str:
        if self.status == "orientation":
            return f"orientation{self.column:02d}"
        index = f"_core{self.core_index:03d}" if self.core_index is not None else ""
        return f"b{self.block}_r{self.row:02d}_c{self.column:02d}{index}"

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


@dataclass
class TmaArray:
    """A dearrayed slide: every lattice position of every block (core or empty), then the
    orientation cores, with what the overlay needs."""

    cores: list[Core]
    blocks: list[dict]  # per block: block, rows, columns, cores, empty
    nodes: list[np.ndarray]  # per block, (rows, columns, 2) node positions at level 0
    core_diameter_px: float  # typical, level 0
    pitch_px: float  # the shorter lattice step, level 0
    tilt_deg: float  # of the row step, clockwise on the image
    thumbnail: np.ndarray = field(repr=False)
    downsample: float = 1.0

    @property
    def found(self) -> list[Core]:
        return [k for k in self.cores if k.status == "core"]


# --- masks and sizes ------------------------------------------------------------------------


def foreground_mask(rgb: np.ndarray) -> np.ndarray:
    """Everything that is not glass on an RGB uint8 image.

    Darkness = 255 - min channel is high for haematoxylin, eosin and DAB alike. Glass is the
    commonest darkness; a pixel a few noise widths above it is tissue, so that the faint
    septa of fat count too (Otsu would cut fatty cores into pieces); Otsu's threshold
    caps it on slides where glass is noisy. Darkness is smoothed over a pixel first: the
    speckle of JPEG noise on a faint smear on the glass would otherwise pass as tissue.
    """
    import cv2
    from skimage.filters import threshold_otsu

    darkness = cv2.GaussianBlur((255 - rgb[..., :3].min(axis=2)).astype(np.float32), (0, 0), 1.0)
    darkness = np.round(darkness).astype(np.uint8)
    if int(darkness.max()) - int(darkness.min()) < 10:
        return np.zeros(darkness.shape, bool)
    glass = int(np.bincount(darkness.ravel(), minlength=256).argmax())
    near = darkness[np.abs(darkness.astype(int) - glass) <= 20].astype(float)
    noise = 1.4826 * float(np.median(np.abs(near - glass)))
    threshold = min(glass + max(6.0, 4.0 * noise), float(threshold_otsu(darkness)))
    return darkness > threshold


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value at the median of the cumulative weight."""
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def _clean(mask: np.ndarray, radius: float) -> np.ndarray:
    """Close cracks of a twelfth of a core (torn tissue, fat septa) and fill holes up to 2%
    of a core's area (vacuoles); the glass between cores pressed together can be as small
    as 3% and must stay open, or a packed array becomes one blob."""
    import cv2
    from scipy import ndimage as ndi

    size = 2 * max(1, int(round(0.08 * radius))) + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    padded = np.pad(mask, size).astype(np.uint8)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)[size:-size, size:-size] > 0
    holes, n = ndi.label(~closed)
    small = np.bincount(holes.ravel(), minlength=n + 1) <= math.pi * (0.15 * radius) ** 2
    small[0] = False
    return closed | small[holes]


def _distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each tissue pixel to the nearest glass (OpenCV's is ~10x
    faster than scipy's and exact enough with the 5 x 5 mask)."""
    import cv2

    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)


def _inscribed_radius(mask: np.ndarray) -> float | None:
    """Typical largest inscribed radius of the mask's pieces, each weighted by its square
    (area-like: specks of debris barely count). Touching cores keep theirs."""
    import cv2

    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return None
    distance = _distance(mask)
    inside = labels > 0
    radii = np.zeros(n, np.float32)
    np.maximum.at(radii, labels[inside], distance[inside])
    radii = radii[1:].astype(float)
    return _weighted_median(radii, radii**2)


def core_radius(mask: np.ndarray) -> float | None:
    """A core's radius in the mask's pixels (None without any tissue): measured on the raw
    mask, then again once the mask is cleaned at that size (holes shrink the first guess).
    Cleaning only fills holes, which moves the radius by a fraction; a far bigger radius
    means it joined packed cores into one mass, and the raw measure stands."""
    raw = _inscribed_radius(mask)
    if raw is None or raw < 1:
        return raw
    cleaned = _inscribed_radius(_clean(mask, raw))
    return cleaned if cleaned <= 1.4 * raw else raw


def _resize_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """The mask at ``scale``; a new pixel is tissue when a third of it is (thin septa stay)."""
    import cv2

    if scale >= 1:
        return mask
    size = (max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale)))
    return cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.3


def _disc(radius: float) -> np.ndarray:
    import cv2

    n = int(math.ceil(radius))
    kernel = np.zeros((2 * n + 1, 2 * n + 1), np.float32)
    cv2.circle(kernel, (n, n), max(1, int(round(radius))), 1.0, -1)
    return kernel / kernel.sum()


def _candidates(clean: np.ndarray, radius: float, min_fill: float) -> np.ndarray:
    """Centres (N, 2 as x, y) of the discs of 0.9 core radius that are at least ``min_fill``
    tissue and fuller than any other within three quarters of a radius."""
    import cv2
    from skimage.feature import peak_local_max

    fill = cv2.filter2D(clean.astype(np.float32), -1, _disc(0.9 * radius), borderType=0)
    # A slight blur gives a full disc one peak at its centre instead of a plateau.
    fill = cv2.GaussianBlur(fill, (0, 0), 0.15 * radius)
    peaks = peak_local_max(
        fill, min_distance=max(1, int(0.75 * radius)), threshold_abs=min_fill, exclude_border=False
    )
    # The centre of the tissue under each peak's disc: a fraction of a pixel, not a pixel.
    return _tissue_in_disc(clean, peaks[:, ::-1].astype(float), 0.9 * radius)[1]


def _tissue_in_disc(clean: np.ndarray, xy: np.ndarray, radius: float):
    """(share, centre) per point: the share of tissue in a disc of ``radius`` there (outside
    the image is glass) and the centre of that tissue (the point itself where there is none)."""
    r = int(math.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = dx**2 + dy**2 <= radius**2
    padded = np.pad(clean, r)
    share, centre = np.zeros(len(xy)), np.array(xy, float).reshape(-1, 2)
    for k, (x, y) in enumerate(np.round(xy).astype(int)):
        window = padded[max(0, y) : y + 2 * r + 1, max(0, x) : x + 2 * r + 1]
        if window.shape != disc.shape:  # a node (partly) off the image: glass
            continue
        tissue = window & disc
        share[k] = tissue.sum() / disc.sum()
        if share[k] > 0:
            centre[k] = (x + dx[tissue].mean(), y + dy[tissue].mean())
    return share, centre


# --- the lattice ----------------------------------------------------------------------------


@dataclass
class _Group:
    xy: np.ndarray  # (N, 2) candidate centres, work px
    ij: np.ndarray  # (N, 2) lattice indices
    lattice: object = None  # tma_lattice.Block


def _groups(points: np.ndarray, radius: float) -> tuple[list[_Group], np.ndarray, np.ndarray]:
    """Candidates linked into lattice groups, biggest first, the small ones that sit on a
    bigger group's lattice joined to it; plus the row and column steps."""
    from fpstore.slides import tma_lattice as lat

    a, b = lat.lattice_vectors(points, fallback_pitch=2.5 * radius)
    pitch = lat.pitch_of(a, b)
    group, ij = lat.link(points, a, b)
    raw = sorted(
        (_Group(points[group == g], ij[group == g]) for g in np.unique(group)),
        key=lambda g: -len(g.xy),
    )
    merged: list[_Group] = []
    for g in raw:
        g.lattice, g.ij = lat.reindex(g.xy, g.ij, a, b)
        for big in merged:
            where = lat.attach(big.lattice, big.ij, big.xy, g.xy, pitch)
            if where is not None:
                big.xy = np.concatenate([big.xy, g.xy])
                big.ij = np.concatenate([big.ij, where])
                big.lattice, big.ij = lat.reindex(big.xy, big.ij, a, b)
                break
        else:
            merged.append(g)
    return merged, a, b


def _inside(group: _Group, big: _Group) -> bool:
    """Whether any of ``group``'s points falls within ``big``'s rectangle (half a step out),
    read on the local lattice at big's nearest core (a quadratic fit extrapolated far from
    its block is no guide)."""
    lo, hi = big.ij.min(axis=0) - 0.5, big.ij.max(axis=0) + 0.5
    for point in group.xy:
        q = int(np.argmin(np.hypot(*(big.xy - point).T)))
        ij = big.ij[q] + np.linalg.solve(big.lattice.steps(big.ij[q]), point - big.xy[q])
        if np.all((ij >= lo) & (ij <= hi)):
            return True
    return False


def _blocks_and_orientation(groups: list[_Group], spec: TmaSpec):
    """Blocks, and the points of the few cores away from every block (orientation cores
    when they pass ``_orientation_ok``): at most ``max_orientation`` of them, spanning fewer
    rows and fewer columns than the biggest block (a short column beside a block of as many
    rows is a block of its own). Groups within a block's rectangle that are off its lattice
    are dropped: folds, debris, a piece pushed aside."""
    blocks, orientation = [], []
    biggest = np.ptp(groups[0].ij, axis=0) + 1
    for g in groups:  # biggest first
        if any(_inside(g, big) for big in blocks):
            continue
        small = np.all(np.ptp(g.ij, axis=0) + 1 < biggest)
        if len(g.xy) <= spec.max_orientation and small:
            orientation.append(g.xy)
        else:
            blocks.append(g)
    return blocks, np.concatenate(orientation) if orientation else np.zeros((0, 2))


@dataclass
class _Position:
    block: int  # index into the blocks
    column: int  # 0-based within the block's rectangle
    row: int
    node: np.ndarray  # work px
    candidate: np.ndarray | None  # the candidate on the node, if any


def _positions(blocks: list[_Group], pitch: float) -> tuple[list[_Position], list[np.ndarray]]:
    """Every node of each block's rectangle, with the nearest candidate within MAX_MISFIT
    of it; and per block the (rows, columns, 2) grid of nodes."""
    from fpstore.slides import tma_lattice as lat

    positions, grids = [], []
    for k, g in enumerate(blocks):
        (i0, j0), (i1, j1) = g.ij.min(axis=0), g.ij.max(axis=0)
        ij = np.array([(i, j) for j in range(j0, j1 + 1) for i in range(i0, i1 + 1)])
        nodes = lat.warped_positions(g.lattice, g.ij, g.xy, ij, max_misfit=MAX_MISFIT)
        index = {(int(i), int(j)): n for n, (i, j) in enumerate(ij)}
        best: dict[int, tuple[float, np.ndarray]] = {}
        for point, (i, j) in zip(g.xy, g.ij, strict=True):
            n = index[(int(i), int(j))]
            misfit = math.hypot(*(point - nodes[n])) / pitch
            if misfit <= MAX_MISFIT and (n not in best or misfit < best[n][0]):
                best[n] = (misfit, point)
        for n, (i, j) in enumerate(ij):
            candidate = best[n][1] if n in best else None
            positions.append(_Position(k, int(i - i0), int(j - j0), nodes[n], candidate))
        grids.append(nodes.reshape(j1 - j0 + 1, i1 - i0 + 1, 2))
    return positions, grids


def _reading_order(boxes: list[tuple[float, float, float, float]]) -> list[int]:
    """Indices of boxes (x0, y0, x1, y1) top to bottom in bands, left to right in a band: a
    box whose centre lies within a band's height joins it."""
    order = sorted(range(len(boxes)), key=lambda k: boxes[k][1])
    bands: list[list[int]] = []
    for k in order:
        centre = (boxes[k][1] + boxes[k][3]) / 2
        if bands and centre <= max(boxes[m][3] for m in bands[-1]):
            bands[-1].append(k)
        else:
            bands.append([k])
    return [k for band in bands for k in sorted(band, key=lambda m: boxes[m][0])]


# --- measuring cores ------------------------------------------------------------------------


def _regions(clean: np.ndarray, centres: np.ndarray, radius: float) -> list[dict]:
    """Each core's own tissue: a watershed from its centre over the cleaned mask within 1.3
    radii, so that touching neighbours are cut apart at their waist. Per core: tissue area,
    convex hull area and bbox (work px)."""
    import cv2
    from skimage.measure import regionprops
    from skimage.segmentation import watershed

    markers = np.zeros(clean.shape, np.int32)
    reach = np.zeros(clean.shape, np.uint8)
    for k, (x, y) in enumerate(np.round(centres).astype(int), start=1):
        cv2.circle(reach, (int(x), int(y)), int(round(1.3 * radius)), 1, -1)
        cv2.circle(markers, (int(x), int(y)), max(1, int(round(0.2 * radius))), k, -1)
    region = (clean | (markers > 0)) & (reach > 0)
    labels = watershed(-_distance(region), markers, mask=region)
    empty = {"area": 0.0, "hull_area": 0.0, "hull_centre": None, "round": 0.0, "bbox": None}
    out = [dict(empty) for _ in centres]
    for props in regionprops(labels):
        tissue = clean[props.slice] & props.image
        if not tissue.any():
            continue
        y0, x0, y1, x1 = props.bbox
        hull_y, hull_x = np.nonzero(props.image_convex)
        # roundness: the short over the long axis of the hull, 1 for a disc, about 0.5 for
        # half a core, low for a sliver or two cores run together
        spread = np.linalg.eigvalsh(np.cov(np.stack([hull_x, hull_y])) + 1 / 12 * np.eye(2))
        out[props.label - 1] = {
            "area": float(tissue.sum()),
            "hull_area": float(props.area_convex),
            "hull_centre": np.array([x0 + hull_x.mean() + 0.5, y0 + hull_y.mean() + 0.5]),
            "round": float(np.sqrt(spread[0] / spread[1])),
            "bbox": (x0, y0, x1, y1),
        }
    return out


def _box(centre, region: dict, radius: float) -> tuple[float, float, float, float]:
    if region["bbox"] is not None:
        return region["bbox"]
    x, y = centre
    return (x - radius, y - radius, x + radius, y + radius)


def _orientation_ok(region: dict, core_area: float, shape: tuple[int, int]) -> bool:
    """Off the lattice only whole, round cores inside the image count: a streak of dust or
    the scan's edge is neither."""
    if region["bbox"] is None or not 0.75 <= region["area"] / core_area <= 1.5:
        return False
    x0, y0, x1, y1 = region["bbox"]
    inside = x0 > 0 and y0 > 0 and x1 < shape[1] and y1 < shape[0]
    return inside and region["area"] / region["hull_area"] >= 0.85


# --- the public steps -----------------------------------------------------------------------


def _check_size(measured: float | None, expected: float | None, slide, downsample, spec):
    """Refuse a slide without cores at the thumbnail's scale, and a core_um that disagrees
    with the cores on the slide."""
    if measured is None or measured < 3:
        raise TmaError(
            f"no cores found in {slide.info.path}: nothing on it is darker than the glass in "
            f"pieces over 6 px across at the {spec.thumbnail_px} px thumbnail; is it a tissue "
            f"microarray? (tiny cores: raise --thumbnail-px)"
        )
    if expected is not None and not 0.6 <= measured / expected <= 1.67:
        measured_um = 2 * measured * downsample * slide.info.mpp
        source = "--mpp" if slide.info.mpp_source == "override" else "its metadata"
        raise ConfigError(
            f"--core-um {spec.core_um:g} makes the cores of {slide.info.path} "
            f"{2 * expected * downsample:.0f} px across at {slide.info.mpp:.4g} um/px (from "
            f"{source}), but they measure about {2 * measured * downsample:.0f} px "
            f"({measured_um:.0f} um); pass --core-um {measured_um:.0f}, or check --mpp"
        )


def detect(slide, spec: TmaSpec = TmaSpec()) -> TmaArray:
    """Every lattice position and orientation core of a slide (no array map joined)."""
    from fpstore.slides import tma_lattice as lat

    longest = max(slide.info.width, slide.info.height)
    thumb, downsample = slide.thumbnail(min(spec.thumbnail_px, longest))  # never upsample
    mask = foreground_mask(thumb)
    # A first size on at most ~1 Mpx, then the measure at the working scale.
    quick = min(1.0, math.sqrt(1e6 / mask.size))
    rough = core_radius(_resize_mask(mask, quick))
    rough = rough / quick if rough is not None else None
    expected = None
    if spec.core_um is not None:
        expected = spec.core_um / slide.info.mpp / downsample / 2
    _check_size(rough, expected, slide, downsample, spec)
    scale = min(1.0, WORK_RADIUS_PX / (expected or rough))
    work = _resize_mask(mask, scale)
    radius = expected * scale if expected else core_radius(work)
    _check_size(radius / scale, expected, slide, downsample, spec)
    clean = _clean(work, radius)
    points = _candidates(clean, radius, spec.min_fill)
    if not len(points):
        raise TmaError(
            f"no cores found in {slide.info.path}: no round piece of tissue about "
            f"{2 * radius / scale * downsample:.0f} px across; is it a tissue microarray?"
        )
    groups, a, b = _groups(points, radius)
    pitch = lat.pitch_of(a, b)
    blocks, loose = _blocks_and_orientation(groups, spec)
    positions, grids = _positions(blocks, pitch)

    # A node without a candidate holds a core when enough of its disc is tissue (a fragment,
    # a faint or folded core); its centre is then the node's, where the punch was.
    nodes = np.array([p.node for p in positions]).reshape(-1, 2)
    share = _tissue_in_disc(clean, nodes, 0.8 * radius)[0]
    centres = [
        p.candidate if p.candidate is not None else (p.node if s >= spec.min_tissue else None)
        for p, s in zip(positions, share, strict=True)
    ]
    seeds = np.array([c for c in centres if c is not None] + list(loose)).reshape(-1, 2)
    regions = iter(_regions(clean, seeds, radius))
    core_area = math.pi * radius**2
    to_level0 = downsample / scale

    def level0(values) -> tuple:
        return tuple(float(v * to_level0) for v in values)

    cores_of_block: list[list[Core]] = [[] for _ in blocks]
    for p, centre, s in zip(positions, centres, share, strict=True):
        if centre is None:
            region = {"area": 0.0, "hull_area": core_area, "bbox": None}
            centre, status = p.node, "empty"
            confidence = 1 - s / spec.min_tissue if spec.min_tissue > 0 else 1.0
        else:
            region = next(regions)
            # A whole core is centred by its outline, which holes and fat do not move.
            if p.candidate is not None and 0.7 <= region["hull_area"] / core_area <= 1.4:
                centre = region["hull_centre"]
            misfit = math.hypot(*(centre - p.node)) / pitch
            # tissue of a fragment not joined to its node is in the disc, not the region
            complete = min(1.0, max(region["area"], 0.64 * s * core_area) / core_area)
            on_node = max(0.0, 1 - (misfit / MAX_MISFIT) ** 2)
            confidence = on_node * complete * region["round"]
            status = "core"
        cores_of_block[p.block].append(
            Core(
                row=p.row + 1,
                column=p.column + 1,
                centre=level0(centre),
                diameter_px=math.sqrt(4 * region["hull_area"] / math.pi) * to_level0,
                bbox=tuple(int(round(v)) for v in level0(_box(centre, region, radius))),
                status=status,
                confidence=round(float(confidence), 3),
            )
        )
    orientation = [
        Core(
            row=0,
            column=0,
            centre=level0(xy),
            diameter_px=math.sqrt(4 * region["hull_area"] / math.pi) * to_level0,
            bbox=tuple(int(round(v)) for v in level0(region["bbox"])),
            block=0,
            status="orientation",
            confidence=round(min(1.0, region["area"] / core_area) * region["round"], 3),
        )
        for xy, region in zip(loose, regions, strict=True)
        if _orientation_ok(region, core_area, clean.shape)
    ]
    orientation.sort(key=lambda c: (round(c.centre[1] / (pitch * to_level0)), c.centre[0]))
    for number, core in enumerate(orientation, start=1):
        core.column = number

    order = _reading_order(
        [(*grid.reshape(-1, 2).min(0), *grid.reshape(-1, 2).max(0)) for grid in grids]
    )
    cores = []
    for number, k in enumerate(order, start=1):
        for core in cores_of_block[k]:
            core.block = number
        cores += cores_of_block[k]
    summary = [
        {
            "block": number,
            "rows": grids[k].shape[0],
            "columns": grids[k].shape[1],
            "cores": sum(c.status == "core" for c in cores_of_block[k]),
            "empty": sum(c.status == "empty" for c in cores_of_block[k]),
        }
        for number, k in enumerate(order, start=1)
    ]
    diameters = [c.diameter_px for c in cores if c.status == "core" and c.confidence >= 0.5]
    return TmaArray(
        cores=cores + orientation,
        blocks=summary,
        nodes=[grids[k] * to_level0 for k in order],
        core_diameter_px=float(np.median(diameters)) if diameters else 2 * radius * to_level0,
        pitch_px=pitch * to_level0,
        tilt_deg=math.degrees(math.atan2(a[1], a[0])),
        thumbnail=thumb,
        downsample=downsample,
    )


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


def read_array_map(path: Path) -> dict[tuple[int, int, int], tuple[int, str]]:
    """(block, row, column) -> (core_index, patient_id) from a CSV with the columns row,
    column, core_index, patient_id and, for arrays of several blocks, block (else 1)."""
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
        block = row[header["block"]].strip() if "block" in header else "1"
        if not block.isdigit():
            raise ConfigError(f"{path.name} line {line_no}: block {block!r} is not a number")
        key = (
            int(block),
            _row_number(row[header["row"]], path, line_no),
            _row_number(row[header["column"]], path, line_no),
        )
        if key in table:
            raise ConfigError(
                f"{path.name} line {line_no}: block {key[0]} row {key[1]} column {key[2]} "
                f"appears twice"
            )
        index = row[header["core_index"]].strip()
        if not index.isdigit():
            raise ConfigError(
                f"{path.name} line {line_no}: core_index {index!r} is not a whole number"
            )
        table[key] = (int(index), row[header["patient_id"]].strip())
    return table


def join_array_map(cores: list[Core], table: dict, slide: str = "the slide") -> list[dict]:
    """Set core_index and patient_id of every lattice position from the map; return the map
    entries with no core found (their position empty or not on the lattice)."""
    grid = [k for k in cores if k.status != "orientation"]
    n_blocks = max((k.block for k in grid), default=1)
    if n_blocks > 1 and {key[0] for key in table} == {1}:
        raise ConfigError(
            f"{slide} has {n_blocks} blocks of cores but the array map names block 1 only; "
            f"add a block column (blocks count from 1 top to bottom, then left to right)"
        )
    for core in grid:
        core.core_index, core.patient_id = table.get(
            (core.block, core.row, core.column), (None, None)
        )
    found = {(k.block, k.row, k.column) for k in grid if k.status == "core"}
    return [
        {"block": b, "row": r, "column": c, "core_index": i, "patient_id": p}
        for (b, r, c), (i, p) in sorted(table.items())
        if (b, r, c) not in found
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


def draw_overlay(array: TmaArray) -> np.ndarray:
    """The thumbnail with the fitted lattice of each block (thin lines between neighbouring
    positions, the block number at its corner), each core circled and labelled (its core
    index, else row-column: green when sure, yellow below 0.5 confidence), each empty
    position circled thin and crossed in grey, each orientation core circled in magenta (O1,
    O2, ...)."""
    import cv2

    image = np.ascontiguousarray(array.thumbnail[..., :3]).copy()
    ds = array.downsample
    radius = max(2, int(round(array.core_diameter_px / ds / 2)))
    thin = max(1, radius // 16)

    def label(text, centre, colour, size=1.0):
        font = max(0.3, size * radius / (22.0 * max(2, len(text))))
        weight = max(1, int(round(font * 2)))
        (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, weight)
        origin = (int(centre[0] - w / 2), int(centre[1] + h / 2))
        cv2.putText(
            image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font, colour, weight, cv2.LINE_AA
        )

    for number, nodes in enumerate(array.nodes, start=1):
        grid = np.round(nodes / ds).astype(np.int32)
        for line in list(grid) + list(grid.transpose(1, 0, 2)):
            if len(line) > 1:
                cv2.polylines(
                    image,
                    [np.ascontiguousarray(line).reshape(-1, 1, 2)],
                    False,
                    (90, 150, 255),
                    thin,
                )
        # the block's number just above its first position
        label(f"B{number}", grid[0, 0] - (0, 1.6 * radius), (0, 90, 255), size=2.0)
    for core in array.cores:
        centre = (int(round(core.centre[0] / ds)), int(round(core.centre[1] / ds)))
        r = max(2, int(round(core.diameter_px / ds / 2)))
        if core.status == "empty":
            cv2.circle(image, centre, r, (150, 150, 150), thin)
            cv2.drawMarker(image, centre, (150, 150, 150), cv2.MARKER_TILTED_CROSS, r, thin)
            continue
        if core.status == "orientation":
            cv2.circle(image, centre, r, (220, 0, 220), 2 * thin)
            label(f"O{core.column}", centre, (220, 0, 220))
            continue
        colour = (0, 160, 0) if core.confidence >= 0.5 else (230, 180, 0)
        cv2.circle(image, centre, r, colour, 2 * thin)
        text = str(core.core_index) if core.core_index is not None else f"{core.row}-{core.column}"
        label(text, centre, (0, 0, 200))
    return image


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
