"""Label-free pixel features of H&E patches, read in H&E terms against the slide's own stains.

Every patch is first resized to ``WORK_PX`` pixels a side (area averaging), so that a
112 um patch is seen at about 1 um/px whatever its stored size: the constants here and the
thresholds in ``fpstore.tissue.rules`` are in these units.

Stains: Beer-Lambert optical density ``OD = -ln(I / 255)`` per channel, unmixed into
hematoxylin and eosin concentrations with a stain matrix. ``estimate_slide_stains`` fits the
slide's own matrix (Macenko, ``fpstore.slides.stain``) to a sample of the slide's patches and
measures two levels on it, so that every threshold below is relative to the slide:

- ``nucleus_h``: the 99th percentile of hematoxylin over stained pixels, a nucleus's level;
  hematoxylin is read in these units (1 = as dark as the slide's darkest nuclei);
- ``cytoplasm_h``: the Otsu cut of the *background* hematoxylin (hematoxylin of the
  non-nuclear tissue around each pixel). Epithelial cytoplasm takes up some hematoxylin,
  collagen almost none: the slide's non-nuclear tissue splits in two modes, and the cut
  between them moves with the site's staining.

Per pixel, then per patch (shares of the patch's area):

- white: glass, lumen or fat vacuole (OD sum < ``WHITE_OD`` or grey); a white region is a
  fat *vacuole* when thin membranes make at least ``VACUOLE_MEMBRANE`` of the tissue around
  it, or when it is a fat cell at a lobule's edge: enclosed (``SEPTUM_ENCLOSED``), rimmed
  mostly by the stroma it borders but sharing a septum (thin membrane within ``SEPTUM_PX``
  of another vacuole) with the fat cell beside it; a white region enclosed by epithelium
  (``LUMEN_RIM``, ``LUMEN_ENCLOSED``, no larger than ``LUMEN_MAX``) is a gland's *lumen*,
  part of the gland as a pathologist draws it; other white is glass;
- epithelium: tissue whose background hematoxylin is above ``cytoplasm_h``, opened by
  ``EPITHELIUM_OPEN_PX`` so that isolated stromal nuclei do not count, and its lumens;
- fat: vacuoles and the thin membranes; stroma: the other tissue.

``pixel_features(images)`` without slide stains uses ``DEFAULT_STAINS`` (the Macenko
reference vectors and typical levels), so a lone tile's features do not depend on its company.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from fpstore.errors import ConfigError
from fpstore.slides.stain import REFERENCE_STAINS, macenko_matrix, optical_density

WORK_PX = 112

# Pixel-level constants (see the module docstring).
WHITE_OD = 0.15  # log10 OD sum below this: glass, empty lumen, fat vacuole
CHROMA_MIN = 12  # RGB max - min below this (uint8): grey glass, pen or dust, not stained tissue
NUCLEUS_H = 0.35  # relative hematoxylin above which a pixel is nucleus
BACKGROUND_PX = 9  # window (~9 um) over which a pixel's non-nuclear hematoxylin is averaged
BACKGROUND_CLIP = 0.4  # relative background hematoxylin is clipped here before the Otsu cut
EPITHELIUM_OPEN_PX = 2  # an epithelial area is at least ~5 um across
MEMBRANE_SHARE = 0.2  # a work pixel is tissue when this share of its full-resolution pixels is
THIN_OPEN_PX = 2  # tissue an opening of this radius removes (< ~5 um wide): membranes, fibres
MIN_COMPARTMENT = 0.01  # a white region counts as a vacuole above 1% of the patch
VACUOLE_MEMBRANE = 0.3  # a white region whose tissue rim is this much membrane is a vacuole
VACUOLE_RIM = 0.3  # ... and whose rim runs along this share of a same-area disc's circumference
# A fat cell at a lobule's edge: rim membrane within SEPTUM_PX of another vacuole is a septum
# shared with it; the cell shares at least SEPTUM_MIN_PX of it, is rimmed by membrane along
# SEPTUM_RIM of its rim at least, and is enclosed: its rim runs along SEPTUM_ENCLOSED of a
# same-area disc's circumference (glass beyond a lobule's outer wall opens onto the square).
SEPTUM_PX, SEPTUM_MIN_PX, SEPTUM_RIM, SEPTUM_ENCLOSED = 4, 4, 0.1, 0.8
# A gland's lumen: a white region whose rim is LUMEN_RIM epithelium (within LUMEN_REACH_PX of
# it: the mask's opening leaves a thin gap), enclosed as above (LUMEN_ENCLOSED), and no more
# than LUMEN_MAX of the square (glass beside an epithelial edge is larger and open).
LUMEN_RIM, LUMEN_REACH_PX, LUMEN_ENCLOSED, LUMEN_MAX = 0.6, 3, 0.8, 0.25
MAX_VACUOLE = 0.5  # a white region over half the square is glass or a lumen, not one fat cell
MIN_SPLIT = 0.05  # cytoplasm and stroma modes closer than this (relative H): no split, default
FIT_PIXELS = 200_000  # at most this many stained pixels fit a slide's stains
MIN_FIT_PIXELS = 2_000  # fewer stained pixels than this: the default stains are used


@dataclass(frozen=True)
class SlideStains:
    """A slide's stain matrix (rows H, E: unit OD vectors) and its levels (module docstring)."""

    hematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    nucleus_h: float  # OD units (natural log)
    nucleus_e: float  # 99th percentile of eosin, OD units
    cytoplasm_h: float  # relative to nucleus_h
    fitted: bool = True  # False: too little tissue, the defaults were used

    @property
    def unmix(self) -> np.ndarray:
        """(3, 2) float32: OD @ unmix = (H, E) concentrations in OD units."""
        matrix = np.array([self.hematoxylin, self.eosin], dtype=np.float64)
        return np.linalg.pinv(matrix).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)


# Typical levels: the medians over the 48 slides of the development cohort (seed 10's six
# TCGA-like sites), rounded. Used only when a caller has no slide (a lone tile).
DEFAULT_STAINS = SlideStains(REFERENCE_STAINS[0], REFERENCE_STAINS[1], 1.8, 0.8, 0.11, fitted=False)

FEATURE_NAMES = (
    "white_fraction",  # fraction of empty pixels: OD sum < WHITE_OD or chroma < CHROMA_MIN
    "h_mean",  # mean relative hematoxylin over tissue pixels
    "h_p90",  # 90th percentile of relative hematoxylin over tissue pixels
    "e_mean",  # mean relative eosin over tissue pixels
    "e_p90",
    "nuclear_fraction",  # fraction of tissue pixels that are nuclei (relative H > NUCLEUS_H)
    "h_e_ratio",  # h_mean / (h_mean + e_mean): purple vs pink
    "od_mean",  # mean OD sum over tissue pixels: how dark the tissue is
    "gradient_energy",  # mean |gradient| of the OD sum over tissue pixels: texture
    "local_variance",  # mean 5x5 local variance of the OD sum over tissue pixels
    "membrane_density",  # share of the patch in thin lines (THIN_OPEN_PX): fat cell membranes
    "compartments",  # white regions above MIN_COMPARTMENT: fat vacuoles split white in many
    "largest_white_share",  # largest white region / all white: 1 for glass, low for fat
    "background_h",  # mean background hematoxylin over tissue / the slide's cytoplasm cut
    "epithelium_share",  # share of the patch that is epithelium (background H > cut)
    "stroma_share",  # share of the patch that is other thick tissue
    "fat_share",  # share of the patch in fat vacuoles and membranes
    "glass_share",  # share of the patch that is white but no vacuole
)


def as_rgb_batch(images) -> np.ndarray:
    """Check and convert patches to a uint8 ``(N, H, W, 3)`` array (RGBA: alpha dropped)."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (3, 4):
        raise ConfigError(f"patches must be an (N, H, W, 3) RGB array; got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ConfigError(f"patches must be uint8 RGB; got dtype {array.dtype}")
    return array[..., :3]


def resize_area(images: np.ndarray, size: int = WORK_PX) -> np.ndarray:
    """Resize an (N, H, W[, C]) batch to ``size`` px a side, area-averaging when shrinking."""
    import cv2

    h, w = images.shape[1:3]
    if h == size and w == size:
        return images
    interp = cv2.INTER_AREA if h >= size and w >= size else cv2.INTER_LINEAR
    return np.stack([cv2.resize(img, (size, size), interpolation=interp) for img in images])


def stain_densities(images: np.ndarray, stains: SlideStains = DEFAULT_STAINS):
    """(OD sum, relative hematoxylin, relative eosin) per pixel of a uint8 (N, H, W, 3) batch.

    The OD sum is in log10 units (``WHITE_OD``); H and E are divided by the slide's levels.
    """
    unmix = stains.unmix
    od = optical_density(images)
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    # The 3x2 unmixing written out: a matmul with an inner size of 3 is slower in numpy.
    hem = (r * unmix[0, 0] + g * unmix[1, 0] + b * unmix[2, 0]) / np.float32(stains.nucleus_h)
    eos = (r * unmix[0, 1] + g * unmix[1, 1] + b * unmix[2, 1]) / np.float32(stains.nucleus_e)
    od_sum = (r + g + b) * np.float32(1 / np.log(10))
    return od_sum, np.maximum(hem, 0, out=hem), np.maximum(eos, 0, out=eos)


def estimate_slide_stains(images) -> SlideStains:
    """A slide's stains and levels from a sample of its patches (uint8 (N, H, W, 3), any size).

    Macenko's matrix on the sample's stained pixels (evenly subsampled to ``FIT_PIXELS``),
    the 99th percentiles of H and E, and the Otsu cut of the relative background
    hematoxylin over the sample's tissue. Too little tissue: ``DEFAULT_STAINS``.
    """
    from skimage.filters import threshold_otsu

    batch = resize_area(as_rgb_batch(images))
    od = optical_density(batch).reshape(-1, 3)
    stained = od.min(axis=1) >= 0.15
    if stained.sum() < MIN_FIT_PIXELS:
        return DEFAULT_STAINS
    fit = od[stained][:: max(1, int(stained.sum()) // FIT_PIXELS)]
    matrix = macenko_matrix(fit)
    concentrations = fit @ np.linalg.pinv(matrix.astype(np.float64))
    h99, e99 = np.percentile(concentrations, 99, axis=0)
    if not (h99 > 0 and e99 > 0):
        return DEFAULT_STAINS
    levels = SlideStains(
        tuple(float(v) for v in matrix[0]),
        tuple(float(v) for v in matrix[1]),
        float(h99),
        float(e99),
        DEFAULT_STAINS.cytoplasm_h,
    )
    _, hem, _ = stain_densities(batch, levels)
    tissue = _tissue_mask(batch)
    values = np.clip(_background_h(hem, tissue)[tissue], 0.0, BACKGROUND_CLIP)
    if values.size < MIN_FIT_PIXELS or values.min() == values.max():
        return levels
    cut = float(threshold_otsu(values))
    # One mode only (all stroma, or all epithelium): Otsu would split it; keep the default.
    if np.median(values[values >= cut]) - np.median(values[values < cut]) < MIN_SPLIT:
        return levels
    return SlideStains(levels.hematoxylin, levels.eosin, levels.nucleus_h, levels.nucleus_e, cut)


def pixel_features(images, stains: SlideStains = DEFAULT_STAINS) -> np.ndarray:
    """Features per patch, columns named by ``FEATURE_NAMES``: float32 (N, len(FEATURE_NAMES)).

    ``images``: uint8 RGB patches (N, H, W, 3) or one (H, W, 3) patch, any size; ``stains``:
    the slide's (``estimate_slide_stains``). The batch is processed at once (the filters'
    structures never reach across patches), so features do not depend on batch company.
    """
    full = as_rgb_batch(images)
    batch = resize_area(full)
    n = len(batch)
    od_sum, hem, eos = stain_densities(batch, stains)
    tissue = _tissue_mask(full)
    white = ~tissue
    area = white[0].size
    n_tissue = tissue.sum(axis=(1, 2)).astype(np.float64)
    per_tissue = np.maximum(n_tissue, 1.0)

    def tissue_mean(values):
        return (values * tissue).sum(axis=(1, 2)) / per_tissue

    def share(mask):
        return mask.sum(axis=(1, 2)) / area

    h_mean, e_mean = tissue_mean(hem), tissue_mean(eos)
    gy, gx = np.gradient(od_sum, axis=(1, 2))
    local_mean = ndimage.uniform_filter(od_sum, (1, 5, 5))
    variance = ndimage.uniform_filter(od_sum * od_sum, (1, 5, 5)) - local_mean * local_mean
    opened = ndimage.binary_opening(tissue, _IN_PLANE, iterations=THIN_OPEN_PX)
    membrane = tissue & ~opened
    background = _background_h(hem, tissue)
    epithelium = ndimage.binary_opening(
        (background > stains.cytoplasm_h) & opened, _IN_PLANE, iterations=EPITHELIUM_OPEN_PX
    )
    compartments, largest_share, vacuoles, lumens = _white_regions(white, membrane, epithelium)
    epithelium = epithelium | lumens
    features = np.stack(
        [
            1.0 - n_tissue / area,
            h_mean,
            _tissue_percentile(hem, tissue, n_tissue, 90),
            e_mean,
            _tissue_percentile(eos, tissue, n_tissue, 90),
            tissue_mean(hem > NUCLEUS_H),
            h_mean / (h_mean + e_mean + 1e-6),
            tissue_mean(od_sum),
            tissue_mean(np.hypot(gx, gy)),
            tissue_mean(variance),
            share(membrane),
            compartments,
            largest_share,
            tissue_mean(background) / stains.cytoplasm_h,
            share(epithelium),
            share(opened & ~epithelium),
            share(vacuoles | membrane),
            share(white & ~vacuoles & ~lumens),
        ],
        axis=1,
    )
    # Glass with a few stray pixels: stain and texture measures are noise, report none.
    empty = n_tissue < 0.002 * area
    features[empty, 1:11] = 0.0
    features[empty, 13] = 0.0
    return features.astype(np.float32).reshape(n, len(FEATURE_NAMES))


def _tissue_mask(full: np.ndarray) -> np.ndarray:
    """Tissue at WORK_PX: decided at full resolution, then pooled, so that thin fat membranes
    do not fade into white as averaged colours would."""
    return resize_area(_is_tissue(full).astype(np.float32)) > MEMBRANE_SHARE


def _background_h(hem: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Per pixel, the mean relative hematoxylin of the non-nuclear tissue around it
    (normalised convolution over ``BACKGROUND_PX``): cytoplasm vs collagen, nuclei left out."""
    around = (tissue & (hem < NUCLEUS_H)).astype(np.float32)
    window = (1, BACKGROUND_PX, BACKGROUND_PX)
    weight = ndimage.uniform_filter(around, window)
    return ndimage.uniform_filter(hem * around, window) / np.maximum(weight, 1e-3)


def _is_tissue(images: np.ndarray) -> np.ndarray:
    """Stained pixels: OD sum >= WHITE_OD and chroma >= CHROMA_MIN; (N, H, W) bool.

    The OD sum test in integers: sum(-log10((I + 1) / 256)) >= WHITE_OD is
    prod(I + 1) <= 256^3 * 10^-WHITE_OD; channel by channel, not reduced over the last axis
    (both several times faster than the float look-up on full-resolution patches)."""
    r, g, b = (images[..., c] for c in range(3))
    product = (r.astype(np.int32) + 1) * (g.astype(np.int32) + 1) * (b.astype(np.int32) + 1)
    stained = product <= int(256**3 * 10**-WHITE_OD)
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return stained & (chroma >= CHROMA_MIN)


# 4-connectivity within each patch, none across the batch axis.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _tissue_percentile(values, tissue, n_tissue, q) -> np.ndarray:
    """Per patch, the q-th percentile of ``values`` over its tissue pixels (nearest rank)."""
    flat = np.where(tissue, values, -np.inf).reshape(len(values), -1)
    ordered = np.sort(flat, axis=1)
    first = flat.shape[1] - n_tissue.astype(np.int64)  # tissue values sit at the end
    rank = first + np.floor(q / 100 * np.maximum(n_tissue - 1, 0)).astype(np.int64)
    picked = ordered[np.arange(len(flat)), np.minimum(rank, flat.shape[1] - 1)]
    return np.where(n_tissue > 0, picked, 0.0)


def _white_regions(white: np.ndarray, membrane: np.ndarray, epithelium: np.ndarray):
    """Per patch: (white regions above MIN_COMPARTMENT, largest white region's share of white),
    and per pixel the white regions that are fat vacuoles (rimmed mostly by thin membrane, or
    fat cells at a lobule's edge) and those that are lumens (enclosed by ``epithelium``)."""
    n = len(white)
    labels, count = ndimage.label(white, _IN_PLANE)
    flat = labels.reshape(n, -1)
    sizes = np.bincount(flat.ravel(), minlength=count + 1)
    owner = np.zeros(count + 1, dtype=np.int64)
    owner[flat.ravel()] = np.repeat(np.arange(n), flat.shape[1])
    regions, region_sizes = owner[1:], sizes[1:]
    big = np.bincount(regions, weights=region_sizes >= MIN_COMPARTMENT * flat.shape[1], minlength=n)
    largest = np.zeros(n)
    np.maximum.at(largest, regions, region_sizes)
    total_white = white.reshape(n, -1).sum(axis=1)
    # The rim: tissue pixels next to a region, counted for the highest and the lowest
    # label around them (a membrane between two vacuoles rims both).
    rim = ~white
    high = ndimage.grey_dilation(labels, footprint=_IN_PLANE)
    low = -ndimage.grey_dilation(np.where(white, -labels, -(count + 1)), footprint=_IN_PLANE)
    rim_total = np.zeros(count + 2)
    rim_membrane = np.zeros(count + 2)
    rim_epithelium = np.zeros(count + 2)
    near_epithelium = ndimage.binary_dilation(epithelium, _IN_PLANE, iterations=LUMEN_REACH_PX)
    for side in (high, np.where(low != high, low, 0)):
        touched = rim & (side > 0) & (side <= count)
        rim_total += np.bincount(side[touched], minlength=count + 2)
        rim_membrane += np.bincount(side[touched & membrane], minlength=count + 2)
        rim_epithelium += np.bincount(side[touched & near_epithelium], minlength=count + 2)
    circumference = np.zeros(count + 2)
    circumference[: count + 1] = 2.0 * np.sqrt(np.pi * sizes)
    # Rimmed by membrane, and rimmed at all (one pen line across glass rims nothing), and
    # no larger than a fat cell (adipocytes are ~50-90 um across, the square 112 um): glass
    # beside a ragged tissue edge is rimmed by thin wisps too.
    small = np.zeros(count + 2, dtype=bool)
    small[: count + 1] = sizes <= MAX_VACUOLE * flat.shape[1]
    is_vacuole = (
        (rim_membrane >= VACUOLE_MEMBRANE * np.maximum(rim_total, 1.0))
        & (rim_total >= VACUOLE_RIM * circumference)
        & small
    )
    is_vacuole[[0, count + 1]] = False
    vacuoles = is_vacuole[: count + 1][labels]
    # A fat cell at a lobule's edge is rimmed mostly by the stroma it borders, but shares a
    # septum (a thin membrane) with the fat cell beside it.
    septum = membrane & ndimage.binary_dilation(vacuoles, _IN_PLANE, iterations=SEPTUM_PX)
    rim_septum = np.zeros(count + 2)
    for side in (high, np.where(low != high, low, 0)):
        touched = rim & (side > 0) & (side <= count) & septum
        rim_septum += np.bincount(side[touched], minlength=count + 2)
    edge_cell = (
        ~is_vacuole
        & small
        & (rim_septum >= SEPTUM_MIN_PX)
        & (rim_membrane >= SEPTUM_RIM * np.maximum(rim_total, 1.0))
        & (rim_total >= SEPTUM_ENCLOSED * circumference)
    )
    edge_cell[[0, count + 1]] = False
    is_vacuole = is_vacuole | edge_cell
    vacuoles = is_vacuole[: count + 1][labels]
    # A gland's lumen: enclosed by epithelium, and no larger than a lumen.
    is_lumen = (
        ~is_vacuole
        & (rim_epithelium >= LUMEN_RIM * np.maximum(rim_total, 1.0))
        & (rim_total >= LUMEN_ENCLOSED * circumference)
        & (np.append(sizes, 0) <= LUMEN_MAX * flat.shape[1])
    )
    is_lumen[[0, count + 1]] = False
    lumens = is_lumen[: count + 1][labels]
    largest_share = np.where(total_white > 0, largest / np.maximum(total_white, 1), 0.0)
    return big, largest_share, vacuoles, lumens
