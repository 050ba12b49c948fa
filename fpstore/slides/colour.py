"""Colour primitives shared by the per-patch stain code (``fpstore.slides.stain``) and its
batched form (``fpstore.slides.stain_batch``): the 8-bit optical-density table, the fitting
subsample size, and OpenCV's 8-bit Lab."""

from __future__ import annotations

import numpy as np

FIT_PIXELS = 200_000  # stains are fitted on an even subsample of at most this many pixels
# OD = -ln(I / 255) of every 8-bit value, with 0 read as 1
OD_TABLE = -np.log(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0).astype(np.float32)


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """8-bit Lab (OpenCV: L x 2.55, a + 128, b + 128) of uint8 RGB [..., H, W, 3]."""
    import cv2

    flat = cv2.cvtColor(np.ascontiguousarray(rgb).reshape(-1, rgb.shape[-2], 3), cv2.COLOR_RGB2LAB)
    return flat.reshape(rgb.shape)


def from_lab(lab_pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB of 8-bit Lab [..., H, W, 3]."""
    import cv2

    flat = cv2.cvtColor(lab_pixels.reshape(-1, lab_pixels.shape[-2], 3), cv2.COLOR_LAB2RGB)
    return flat.reshape(lab_pixels.shape)
