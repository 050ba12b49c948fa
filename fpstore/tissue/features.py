"""Label-free pixel features of H&E patches: stain densities, white fraction, texture, fat.

Every patch is first resized to ``WORK_PX`` pixels a side (area averaging), so that a
112 um patch is seen at about 1 um/px whatever its stored size: the thresholds in
``fpstore.tissue.rules`` are in these units.

Colour deconvolution (Ruifrok & Johnston 2001, the fixed H&E(-DAB) vectors that
scikit-image and QuPath ship): Beer-Lambert optical density ``OD = -log10((I + 1) / 256)``
per channel, then ``OD = c_H * h + c_E * e + c_R * r`` solved for the densities
(c_H, c_E, c_R) with the inverse stain matrix. Fixed vectors, not per-slide Macenko
estimates, so that a patch's features do not depend on the rest of its slide and
background or fat patches (with too little stain to fit vectors to) stay stable.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fpstore.errors import ConfigError

WORK_PX = 112

# Rows: hematoxylin, eosin, residual (DAB) stain vectors in OD space (Ruifrok & Johnston).
STAIN_VECTORS = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
STAIN_VECTORS /= np.linalg.norm(STAIN_VECTORS, axis=1, keepdims=True)
_UNMIX = np.linalg.inv(STAIN_VECTORS).astype(np.float32)
# Beer-Lambert optical density of each uint8 intensity, looked up rather than computed.
_OD_LUT = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)

# Pixel-level thresholds (OD units, see the module docstring).
WHITE_OD = 0.15  # sum of the three channel ODs below this: glass, empty lumen, fat vacuole
CHROMA_MIN = 12  # RGB max - min below this (uint8): grey glass, pen or dust, not stained tissue
# A nucleus pixel: H above the midpoint between the patch tissue's 25th percentile (stroma,
# cytoplasm) and its 95th (nuclei), and at least NUCLEUS_MIN_CONTRAST above the 25th. Relative,
# so that a site's weaker or stronger hematoxylin does not move every patch across a threshold.
NUCLEUS_MIN_CONTRAST = 0.05
MEMBRANE_SHARE = 0.2  # a work pixel is tissue when this share of its full-resolution pixels is
THIN_OPEN_PX = 1  # tissue an opening of this radius removes (< ~3 um wide): membranes, fibres
MIN_COMPARTMENT = 0.01  # a white region counts as a vacuole above 1% of the patch

FEATURE_NAMES = (
    "white_fraction",  # fraction of empty pixels: OD sum < WHITE_OD or chroma < CHROMA_MIN
    "h_mean",  # mean hematoxylin density over tissue pixels
    "h_p90",  # 90th percentile of hematoxylin density over tissue pixels
    "e_mean",  # mean eosin density over tissue pixels
    "e_p90",
    "nuclear_fraction",  # fraction of tissue pixels that are nuclei (relative H threshold)
    "h_e_ratio",  # h_mean / (h_mean + e_mean): purple vs pink
    "od_mean",  # mean OD sum over tissue pixels: how dark the tissue is
    "gradient_energy",  # mean |gradient| of the OD sum over tissue pixels: texture
    "local_variance",  # mean 5x5 local variance of the OD sum over tissue pixels
    "membrane_density",  # share of the patch in thin lines (THIN_OPEN_PX): fat cell membranes
    "compartments",  # white regions above MIN_COMPARTMENT: fat vacuoles split white in many
    "largest_white_share",  # largest white region / all white: 1 for glass, low for fat
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


def stain_densities(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(OD sum, hematoxylin, eosin) densities per pixel of a uint8 (N, H, W, 3) batch."""
    od = _OD_LUT[images]
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    # The 3x3 unmixing written out: a matmul with an inner size of 3 is slower in numpy.
    hem = r * _UNMIX[0, 0] + g * _UNMIX[1, 0] + b * _UNMIX[2, 0]
    eos = r * _UNMIX[0, 1] + g * _UNMIX[1, 1] + b * _UNMIX[2, 1]
    return r + g + b, np.maximum(hem, 0, out=hem), np.maximum(eos, 0, out=eos)


def pixel_features(images) -> np.ndarray:
    """Features per patch, columns named by ``FEATURE_NAMES``: float32 (N, len(FEATURE_NAMES)).

    ``images``: uint8 RGB patches (N, H, W, 3) or one (H, W, 3) patch, any size. The whole
    batch is processed at once (the filters' structures never reach across patches).
    """
    full = as_rgb_batch(images)
    batch = resize_area(full)
    n = len(batch)
    od_sum, hem, eos = stain_densities(batch)
    # Empty vs tissue at full resolution, then pooled: thin fat membranes would fade into
    # white if the colours were averaged first.
    tissue = resize_area(_is_tissue(full).astype(np.float32)) > MEMBRANE_SHARE
    white = ~tissue
    n_tissue = tissue.sum(axis=(1, 2)).astype(np.float64)
    per_tissue = np.maximum(n_tissue, 1.0)

    def tissue_mean(values):
        return (values * tissue).sum(axis=(1, 2)) / per_tissue

    h_mean, e_mean = tissue_mean(hem), tissue_mean(eos)
    gy, gx = np.gradient(od_sum, axis=(1, 2))
    local_mean = ndimage.uniform_filter(od_sum, (1, 5, 5))
    variance = ndimage.uniform_filter(od_sum * od_sum, (1, 5, 5)) - local_mean * local_mean
    opened = ndimage.binary_opening(tissue, _IN_PLANE, iterations=THIN_OPEN_PX)
    compartments, largest_share = _white_regions(white)
    features = np.stack(
        [
            1.0 - n_tissue / white[0].size,
            h_mean,
            _tissue_percentile(hem, tissue, n_tissue, 90),
            e_mean,
            _tissue_percentile(eos, tissue, n_tissue, 90),
            tissue_mean(hem > _nucleus_threshold(hem, tissue, n_tissue)[:, None, None]),
            h_mean / (h_mean + e_mean + 1e-6),
            tissue_mean(od_sum),
            tissue_mean(np.hypot(gx, gy)),
            tissue_mean(variance),
            (tissue & ~opened).mean(axis=(1, 2)),
            compartments,
            largest_share,
        ],
        axis=1,
    )
    # Glass with a few stray pixels: stain and texture measures are noise, report none.
    empty = n_tissue < 0.002 * white[0].size
    features[empty, 1:11] = 0.0
    return features.astype(np.float32).reshape(n, len(FEATURE_NAMES))


def _is_tissue(images: np.ndarray) -> np.ndarray:
    """Stained pixels: OD sum >= WHITE_OD and chroma >= CHROMA_MIN; (N, H, W) bool."""
    od = _OD_LUT[images].sum(-1)
    chroma = images.max(-1).astype(np.int16) - images.min(-1)
    return (od >= WHITE_OD) & (chroma >= CHROMA_MIN)


def _nucleus_threshold(hem, tissue, n_tissue) -> np.ndarray:
    """Per patch, the H level above which a tissue pixel counts as nucleus (see NUCLEUS_*)."""
    low = _tissue_percentile(hem, tissue, n_tissue, 25)
    high = _tissue_percentile(hem, tissue, n_tissue, 95)
    return low + np.maximum(0.5 * (high - low), NUCLEUS_MIN_CONTRAST)


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


def _white_regions(white: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per patch: (white regions above MIN_COMPARTMENT, largest white region's share of white)."""
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
    return big, np.where(total_white > 0, largest / np.maximum(total_white, 1), 0.0)
