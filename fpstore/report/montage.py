"""Montages of patch pixels: the patches nearest each selected cluster's centre (Fig. 7, right).

Pixels are re-read from the slides (a handful per cluster), each slide opened once.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from fpstore.errors import ConfigError

SIGN_COLORS = {"negative": (31, 63, 255), "positive": (255, 42, 26)}  # the embedding's blue and red


def montage_image(images: list[np.ndarray], pad: int = 4, color=(255, 255, 255)) -> np.ndarray:
    """Equal-sized RGB images in one row, separated and framed by ``pad`` pixels of ``color``."""
    if not images:
        raise ConfigError("a montage needs at least one image")
    h, w = images[0].shape[:2]
    if any(im.shape != images[0].shape for im in images):
        raise ConfigError(f"montage images must share one shape; got {[im.shape for im in images]}")
    out = np.empty((h + 2 * pad, len(images) * (w + pad) + pad, 3), np.uint8)
    out[:] = color
    for i, image in enumerate(images):
        x0 = pad + i * (w + pad)
        out[pad : pad + h, x0 : x0 + w] = image
    return out


def read_patch_images(store: Path, cohort: str, rows: list[dict], out_px: int) -> list[np.ndarray]:
    """Pixels of patches given as dicts with slide_id, x, y, size_px; in the order given."""
    from fpstore.report.runs import open_cohort_slide

    by_slide = defaultdict(list)
    for i, row in enumerate(rows):
        by_slide[row["slide_id"]].append(i)
    images: list[np.ndarray | None] = [None] * len(rows)
    for slide_id, indices in by_slide.items():
        slide = open_cohort_slide(store, cohort, slide_id)
        try:
            for i in indices:
                r = rows[i]
                images[i] = slide.read_patch(int(r["x"]), int(r["y"]), float(r["size_px"]), out_px)
        finally:
            slide.close()
    return images


def cluster_montages(
    store: Path, cohort: str, keys, clusters, out: Path, out_px: int = 112
) -> list[Path]:
    """One PNG per cluster (``montage_<number>.png``), framed in the cluster's sign colour."""
    from PIL import Image

    columns = ["slide_id", "x", "y", "size_px"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for cluster in clusters:
        rows = keys.take(cluster.members).select(columns).to_pylist()
        image = montage_image(
            read_patch_images(store, cohort, rows, out_px), color=SIGN_COLORS[cluster.sign]
        )
        path = out / f"montage_{cluster.number}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths
