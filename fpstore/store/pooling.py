"""Pooling rows of a fingerprint matrix by group, without copying them."""

from __future__ import annotations

import numpy as np


def segment_mean(
    vectors: np.ndarray, index: np.ndarray, n: int, scale: np.ndarray | None = None
) -> np.ndarray:
    """Mean of the rows of ``vectors`` (times ``scale`` per row, if given) grouped by ``index``
    (0..n-1), without copying them."""
    from scipy.sparse import csr_matrix

    counts = np.bincount(index, minlength=n).astype(np.float32)
    # A sparse (n, N) matrix of scale/count: one pass over the vectors, whatever their order.
    weights = (1.0 if scale is None else np.asarray(scale, np.float32)) / counts[index]
    pool = csr_matrix((weights, (index, np.arange(len(index)))), shape=(n, len(index)))
    return np.asarray(pool @ vectors, dtype=np.float32)
