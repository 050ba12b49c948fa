"""Whole-slide heatmaps from stored patch scores and tissue types (the paper's Fig. 6c).

No pixels are re-read except the thumbnail: patch scores are rasterised onto a grid with
one cell per patch (numpy fancy indexing, no drawing loop), and the grid is upsampled to the
thumbnail with nearest-neighbour index arithmetic. The prediction map is shaded black (the
low end of the score range, -1 for the MIL head) through grey to white (the high end, +1);
squares without a patch are drawn in NO_DATA so that "no patch" never reads as "score 0".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fpstore.errors import ConfigError, StoreError
from fpstore.report.colors import NO_DATA, TISSUE_COLORS, TISSUE_NO_DATA, UNKNOWN_TISSUE


@dataclass(frozen=True)
class PatchGrid:
    """Where each patch falls on a grid of patch-sized cells (level-0 geometry)."""

    rows: np.ndarray  # (N,) int
    cols: np.ndarray  # (N,) int
    origin: tuple[float, float]  # level-0 (x, y) of cell (0, 0)'s top-left corner
    step: float  # level-0 px per cell
    shape: tuple[int, int]  # (n_rows, n_cols)


def patch_grid(x, y, size_px, level0_shape: tuple[int, int]) -> PatchGrid:
    """Cells of side ``size_px`` (the patches' side; they tile without overlap).

    ``level0_shape`` is the slide's (height, width) at level 0, so that the grid covers it.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    size = np.asarray(size_px, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise StoreError(
            f"patch coordinates must be two equal, non-empty 1-D arrays; got {x.shape}, {y.shape}"
        )
    step = float(np.median(size)) if size.ndim else float(size)
    if not step > 0:
        raise StoreError(f"patch size must be positive; got {step}")
    # Anchor the grid on the patches themselves: grids need not start at (0, 0).
    ox, oy = x.min() % step, y.min() % step
    cols = np.rint((x - ox) / step).astype(np.int64)
    rows = np.rint((y - oy) / step).astype(np.int64)
    height, width = level0_shape
    n_rows = max(int(np.ceil((height - oy) / step)), int(rows.max()) + 1)
    n_cols = max(int(np.ceil((width - ox) / step)), int(cols.max()) + 1)
    return PatchGrid(rows, cols, (float(ox), float(oy)), step, (n_rows, n_cols))


def paint(
    grid: PatchGrid, colors: np.ndarray, out_shape: tuple[int, int], downsample: float, fill=NO_DATA
) -> np.ndarray:
    """An (h, w, 3) uint8 image at ``downsample`` with each patch's colour over its square.

    One pixel per patch on the cell grid, then each output pixel takes the cell under its
    centre: exact to the output pixel, whatever the number of patches.
    """
    colors = np.asarray(colors, np.uint8)
    if colors.shape != (len(grid.rows), 3):
        raise ConfigError(
            f"need one RGB colour per patch ({len(grid.rows)}, 3); got {colors.shape}"
        )
    cells = np.empty(grid.shape + (3,), np.uint8)
    cells[:] = fill
    cells[grid.rows, grid.cols] = colors
    h, w = out_shape
    centre_x = (np.arange(w) + 0.5) * downsample
    centre_y = (np.arange(h) + 0.5) * downsample
    col = np.floor((centre_x - grid.origin[0]) / grid.step).astype(np.int64)
    row = np.floor((centre_y - grid.origin[1]) / grid.step).astype(np.int64)
    col_ok = (col >= 0) & (col < grid.shape[1])
    row_ok = (row >= 0) & (row < grid.shape[0])
    out = cells[
        np.clip(row, 0, grid.shape[0] - 1)[:, None], np.clip(col, 0, grid.shape[1] - 1)[None, :]
    ]
    out[~(row_ok[:, None] & col_ok[None, :])] = fill
    return out


def score_colors(scores, score_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Grey levels: the low end of ``score_range`` black, the high end white, clipped."""
    lo, hi = score_range
    if not hi > lo:
        raise ConfigError(f"score_range must be (low, high) with low < high; got {score_range}")
    t = np.clip((np.asarray(scores, np.float64) - lo) / (hi - lo), 0.0, 1.0)
    grey = np.rint(t * 255).astype(np.uint8)
    return np.repeat(grey[:, None], 3, axis=1)


def tissue_colors(types) -> np.ndarray:
    """RGB per patch from its tissue type (UNKNOWN_TISSUE for a missing or unknown type)."""
    types = np.asarray(types, dtype=object)
    out = np.empty((len(types), 3), np.uint8)
    out[:] = UNKNOWN_TISSUE
    for name, rgb in TISSUE_COLORS.items():
        out[types == name] = rgb
    return out


def attention_colors(attention) -> np.ndarray:
    """Viridis per patch, from 0 to the slide's largest attention (NaN: no attention, grey).

    Attention sums to 1 per patient, so its scale depends on the patient's patch count: the
    map shows where on this slide the head looked most, not a value comparable across slides.
    """
    from matplotlib import colormaps

    a = np.asarray(attention, np.float64)
    known = np.isfinite(a)
    top = a[known].max() if known.any() else 1.0
    t = np.where(known, a, 0.0) / (top if top > 0 else 1.0)
    out = np.rint(colormaps["viridis"](t)[:, :3] * 255).astype(np.uint8)
    out[~known] = UNKNOWN_TISSUE
    return out


@dataclass
class HeatmapPanels:
    thumbnail: np.ndarray
    tissue: np.ndarray
    prediction: np.ndarray
    attention: np.ndarray | None = None  # where an attention head looked (abmil)


def heatmap_panels(  # noqa: PLR0913  the panels' inputs: one array each, as the store reads them
    thumbnail: np.ndarray,
    downsample: float,
    level0_shape: tuple[int, int],
    x,
    y,
    size_px,
    scores,
    tissue_types=None,
    score_range: tuple[float, float] = (-1.0, 1.0),
    attention=None,
) -> HeatmapPanels:
    """The three panels of Fig. 6c, each the thumbnail's size (and the attention map, for a
    method with attention)."""
    grid = patch_grid(x, y, size_px, level0_shape)
    shape = thumbnail.shape[:2]
    prediction = paint(grid, score_colors(scores, score_range), shape, downsample)
    types = tissue_types if tissue_types is not None else [None] * len(grid.rows)
    tissue = paint(grid, tissue_colors(types), shape, downsample, fill=TISSUE_NO_DATA)
    attended = (
        None if attention is None else paint(grid, attention_colors(attention), shape, downsample)
    )
    return HeatmapPanels(thumbnail, tissue, prediction, attended)


def heatmap_figure(
    panels: HeatmapPanels,
    path: Path,
    title: str = "",
    score_range: tuple[float, float] = (-1.0, 1.0),
    dpi: int = 100,
    typed_by: str = "",
) -> Path:
    """Thumbnail, tissue-type map and prediction map side by side, with legends (and the
    attention map after them where the panels have one); ``typed_by`` names the
    tissue-typing method under the map's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import Patch

    h, w = panels.thumbnail.shape[:2]
    panel_in, top_in, bottom_in = 4.0, 0.6, 0.8
    height = panel_in * h / w + top_in + bottom_in
    n = 3 if panels.attention is None else 4
    fig, axes = plt.subplots(1, n, figsize=(n * panel_in + 0.4, height), dpi=dpi)
    fig.subplots_adjust(
        left=0.01, right=0.99, wspace=0.05, top=1 - top_in / height, bottom=bottom_in / height
    )
    grey = LinearSegmentedColormap.from_list("score", ["black", "white"])
    for ax, image, name in zip(
        axes,
        (panels.thumbnail, panels.tissue, panels.prediction, panels.attention),
        (
            "H&E thumbnail",
            f"tissue type ({typed_by})" if typed_by else "tissue type",
            "prediction",
            "attention",
        ),
    ):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    handles = [Patch(color=np.array(rgb) / 255, label=name) for name, rgb in TISSUE_COLORS.items()]
    handles.append(Patch(facecolor="white", edgecolor="0.5", label="no patch"))
    axes[1].legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.01),
        ncol=3,
        fontsize=7,
        frameon=False,
    )
    # The colour bar sits in an inset below the map, so the map keeps the thumbnail's size.
    mappable = plt.cm.ScalarMappable(cmap=grey, norm=plt.Normalize(*score_range))
    bar = fig.colorbar(
        mappable, cax=axes[2].inset_axes([0.1, -0.07, 0.8, 0.035]), orientation="horizontal"
    )
    bar.ax.tick_params(labelsize=7)
    axes[2].legend(
        handles=[Patch(color=np.array(NO_DATA) / 255, label="no patch")],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        fontsize=7,
        frameon=False,
    )
    if panels.attention is not None:
        bar = fig.colorbar(
            plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, 1)),
            cax=axes[3].inset_axes([0.1, -0.07, 0.8, 0.035]),
            orientation="horizontal",
        )
        bar.set_ticks([0, 1], labels=["0", "slide max"])
        bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


@dataclass
class SlideHeatmap:
    """What ``slide_heatmap`` wrote for one slide."""

    slide_id: str
    run_id: str
    n_patches: int
    score_range: tuple[float, float]
    figure: Path
    prediction_png: Path
    tissue_png: Path
    geojson: Path | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    attention_png: Path | None = None

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def slide_heatmap(
    store: Path, run_id: str, slide_id: str, out: Path, max_px: int = 1024, geojson: bool = True
) -> SlideHeatmap:
    """Heatmaps (and GeoJSON) of one slide from a run's stored patch scores.

    Needs the run's patch predictions for the slide (classify on a cohort extracted with
    ``--patches all`` gives one per tissue square); reads only the slide's thumbnail.
    """
    from fpstore.report.figure_data import open_run_slide, slide_patches
    from fpstore.report.geojson import patches_geojson, write_geojson
    from fpstore.store.runs import load_run
    from fpstore.store.tissue import read_tissue_types

    start = time.perf_counter()
    if max_px < 16:
        raise ConfigError(f"max_px={max_px} is too small for a heatmap; use at least 16")
    run = load_run(store, run_id)
    patches = slide_patches(store, run, slide_id)
    notes = (
        []
        if patches.has_tissue
        else [f"no tissue types stored for {slide_id}; run `fpstore tissue predict`"]
    )
    slide = open_run_slide(store, run.cohort, slide_id)
    try:
        thumbnail, downsample = slide.thumbnail(max_px)
        level0 = (slide.info.height, slide.info.width)
    finally:
        slide.close()
    panels = heatmap_panels(
        thumbnail,
        downsample,
        level0,
        patches.x,
        patches.y,
        patches.size_px,
        patches.scores,
        patches.tissue_types,
        run.score_range,
        patches.attention,
    )
    out = Path(out)
    title = f"{slide_id}  {run.marker or ''} run {run_id}  ({len(patches.x)} patches)"
    typed = read_tissue_types(store, run.cohort, [slide_id], columns=("method",))
    typed_by = ", ".join(sorted(set(typed.column("method").to_pylist()))) if typed else ""
    figure = heatmap_figure(
        panels, out / f"{slide_id}.png", title, run.score_range, typed_by=typed_by
    )
    pred_png = save_png(panels.prediction, out / f"{slide_id}.prediction.png")
    tissue_png = save_png(panels.tissue, out / f"{slide_id}.tissue.png")
    attention_png = (
        None
        if panels.attention is None
        else save_png(panels.attention, out / f"{slide_id}.attention.png")
    )
    geo_path = None
    if geojson:
        doc = patches_geojson(
            patches.x,
            patches.y,
            patches.size_px,
            patches.scores,
            patches.tissue_types,
            patch_ids=patches.patch_ids,
        )
        geo_path = write_geojson(doc, out / f"{slide_id}.geojson")
    return SlideHeatmap(
        slide_id,
        run_id,
        len(patches.x),
        run.score_range,
        figure,
        pred_png,
        tissue_png,
        geo_path,
        time.perf_counter() - start,
        notes,
        attention_png,
    )


def slide_heatmaps(
    store: Path, run_id: str, slide_ids, out: Path, max_px: int = 1024, geojson: bool = True
) -> list[SlideHeatmap]:
    """``slide_heatmap`` per slide (every slide with patch scores when ``slide_ids`` is empty)."""
    from tqdm import tqdm

    from fpstore.store.runs import load_run

    slide_ids = list(slide_ids) or load_run(store, run_id).slides_with_patch_scores()
    return [
        slide_heatmap(store, run_id, s, out, max_px, geojson)
        for s in tqdm(slide_ids, desc="heatmaps", unit="slide", disable=len(slide_ids) < 2)
    ]
