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
    from fpstore.cohort.cohorts import open_cohort_slide
    from fpstore.store.cohorts import read_cohort

    by_slide = defaultdict(list)
    for i, row in enumerate(rows):
        by_slide[row["slide_id"]].append(i)
    images: list[np.ndarray | None] = [None] * len(rows)
    registered = read_cohort(store, cohort)
    for slide_id, indices in by_slide.items():
        slide = open_cohort_slide(registered.slide(slide_id))
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


def similar_montage(
    store, patch_id: str, k: int, encoder: str | None, cohort: str | None, out: Path | None
):
    """``fpstore similar``: the nearest patches (``fpstore.store.similarity.similar``) and, with
    ``out``, a PNG of the query (red frame) then the hits, captioned with rank and similarity."""
    from fpstore.store.similarity import similar

    result = similar(store, patch_id, k, encoder, cohort)
    if out is not None:
        result.montage = str(_similar_sheet(store, result.query, result.hits, Path(out)))
    return result


def _similar_sheet(store, query: dict, hits: list[dict], out: Path, tile_px: int = 160) -> Path:
    from PIL import Image, ImageDraw

    from fpstore.cohort.cohorts import open_cohort_slide
    from fpstore.store.cohorts import read_cohort

    items = [(query, "query")] + [(h, f"#{h['rank']} {h['similarity']:.3f}") for h in hits]
    columns = min(6, len(items))
    rows = -(-len(items) // columns)
    caption = 14
    sheet = Image.new("RGB", (columns * tile_px, rows * (tile_px + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    cohorts, opened = {}, {}
    try:
        for i, (patch, label) in enumerate(items):
            if patch["cohort"] not in cohorts:
                cohorts[patch["cohort"]] = read_cohort(store.layout, patch["cohort"])
            key = (patch["cohort"], patch["slide_id"])
            if key not in opened:
                record = cohorts[patch["cohort"]].slide(patch["slide_id"])
                opened[key] = open_cohort_slide(record)
            pixels = opened[key].read_patch(patch["x"], patch["y"], patch["size_px"], tile_px)
            x0, y0 = (i % columns) * tile_px, (i // columns) * (tile_px + caption)
            sheet.paste(Image.fromarray(pixels), (x0, y0))
            if i == 0:
                draw.rectangle([x0, y0, x0 + tile_px - 1, y0 + tile_px - 1], outline="red", width=3)
            draw.text((x0 + 2, y0 + tile_px), label, fill="black")
    finally:
        for slide in opened.values():
            slide.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
