"""Whole-slide heatmaps and their GeoJSON: pixels follow the stored scores, tissue and geometry."""

import json

import numpy as np
import pytest
from _report_store import N_COLS, N_ROWS, STEP, build_store, s00_score, s00_type
from click.testing import CliRunner
from PIL import Image

from fpstore.cli.main import cli
from fpstore.errors import ConfigError, StoreError
from fpstore.report.colors import NO_DATA, TISSUE_COLORS
from fpstore.report.geojson import patches_geojson
from fpstore.report.heatmap import (
    paint,
    patch_grid,
    score_colors,
    slide_heatmap,
    tissue_colors,
)

MAX_PX = 256


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("report-heatmap") / "store")


@pytest.fixture(scope="module")
def s00(store, tmp_path_factory):
    return slide_heatmap(store, "mil-run", "S00", tmp_path_factory.mktemp("heat"), max_px=MAX_PX)


def test_paint_puts_each_patch_colour_over_its_square_and_no_data_elsewhere():
    # Three patches of 10 px on a grid that starts at (5, 5), not at the origin.
    x, y = np.array([5, 15, 25]), np.array([5, 5, 15])
    grid = patch_grid(x, y, 10.0, level0_shape=(40, 40))
    colors = np.array([[10, 10, 10], [20, 20, 20], [30, 30, 30]], np.uint8)
    image = paint(grid, colors, out_shape=(20, 20), downsample=2.0)
    assert image.shape == (20, 20, 3)
    # Output pixel (row, col) covers level-0 [2col, 2col+2): patch 0 spans px 5..15 -> out 3..6.
    assert (image[3:7, 3:7] == 10).all()
    assert (image[3:7, 8:12] == 20).all()
    assert (image[8:12, 13:17] == 30).all()
    assert (image[0:2, :] == NO_DATA).all()  # above every patch
    assert (image[8:12, 3:7] == NO_DATA).all()  # a square with no patch


def test_score_colors_run_from_black_to_white_and_clip():
    grey = score_colors([-1.0, -0.5, 0.0, 0.5, 1.0, 3.0], (-1.0, 1.0))[:, 0]
    assert grey.tolist() == [0, 64, 128, 191, 255, 255]
    assert score_colors([0.0, 1.0], (0.0, 1.0))[:, 0].tolist() == [0, 255]
    with pytest.raises(ConfigError, match="score_range"):
        score_colors([0.0], (1.0, 1.0))


def test_tissue_colors_follow_the_palette():
    colors = tissue_colors(["fat", "epithelium", None, "mystery"])
    assert colors[0].tolist() == list(TISSUE_COLORS["fat"])
    assert colors[1].tolist() == list(TISSUE_COLORS["epithelium"])
    assert colors[2].tolist() == colors[3].tolist() != list(TISSUE_COLORS["background"])


def _centre(col, row, downsample):
    """Output pixel (row, col) at the centre of grid square (col, row)."""
    return int((row + 0.5) * STEP / downsample), int((col + 0.5) * STEP / downsample)


def test_prediction_map_greys_follow_the_stored_scores(s00):
    pred = np.asarray(Image.open(s00.prediction_png))
    # CMU-1-Small-Region is 2220 x 2967: the thumbnail keeps its aspect, longer side MAX_PX.
    assert pred.shape == (MAX_PX, round(2220 / (2967 / MAX_PX)), 3)
    downsample = 2967 / MAX_PX
    greys = []
    for col in range(N_COLS):
        r, c = _centre(col, N_ROWS // 2, downsample)
        rgb = pred[r, c]
        assert rgb[0] == rgb[1] == rgb[2], "a scored square is grey"
        expected = (s00_score(col) + 1) / 2 * 255
        assert abs(int(rgb[0]) - expected) <= 1
        greys.append(int(rgb[0]))
    assert greys == sorted(greys) and greys[0] == 0 and greys[-1] == 255
    # Right of the last whole square (x > 9 * 224 = 2016 px) nothing was scored.
    assert (pred[:, int(2100 / downsample) :] == NO_DATA).all()


def test_tissue_map_colours_follow_the_stored_types(s00):
    tissue = np.asarray(Image.open(s00.tissue_png))
    downsample = 2967 / MAX_PX
    for row in range(N_ROWS):
        r, c = _centre(3, row, downsample)
        assert tissue[r, c].tolist() == list(TISSUE_COLORS[s00_type(row)])


def test_the_figure_shows_three_panels_and_is_not_blank(s00):
    figure = np.asarray(Image.open(s00.figure).convert("RGB"))
    assert figure.shape[1] == 1240  # (3 x 4 in + 0.4 in) at 100 dpi
    assert figure.shape[0] > 400
    assert figure.std() > 30
    # The prediction map's extremes and the tissue palette are in the figure.
    flat = figure.reshape(-1, 3)
    for rgb in ((0, 0, 0), TISSUE_COLORS["epithelium"], NO_DATA):
        assert (flat == rgb).all(axis=1).sum() > 100, rgb
    assert s00.n_patches == N_COLS * N_ROWS


def test_geojson_has_one_square_per_patch_in_level0_pixels_with_qupath_properties(s00):
    doc = json.loads(s00.geojson.read_text())
    assert doc["type"] == "FeatureCollection"
    assert len(doc["features"]) == N_COLS * N_ROWS
    by_id = {f["id"]: f for f in doc["features"]}
    feature = by_id[f"S00/{2 * STEP}_{STEP}_{STEP}"]  # column 2, row 1
    ring = feature["geometry"]["coordinates"][0]
    assert feature["geometry"]["type"] == "Polygon"
    assert ring[0] == ring[-1] == [2 * STEP, STEP]
    assert ring[2] == [3 * STEP, 2 * STEP]
    props = feature["properties"]
    assert props["objectType"] == "annotation"
    assert props["score"] == pytest.approx(s00_score(2), abs=1e-6)
    assert props["measurements"]["score"] == props["score"]
    assert props["tissue_type"] == s00_type(1)
    assert props["classification"] == {
        "name": s00_type(1).capitalize(),
        "color": list(TISSUE_COLORS[s00_type(1)]),
    }


def test_geojson_without_tissue_types_has_no_classification():
    doc = patches_geojson([0], [0], 10.0, [0.5])
    assert "classification" not in doc["features"][0]["properties"]
    with pytest.raises(ConfigError, match="object_type"):
        patches_geojson([0], [0], 10.0, [0.5], object_type="cell")


def test_missing_run_or_slide_scores_explain_the_fix(store, tmp_path):
    with pytest.raises(StoreError, match="mil-run"):
        slide_heatmap(store, "nope", "S00", tmp_path)
    with pytest.raises(StoreError, match="--patches all"):
        slide_heatmap(store, "mil-run", "S99", tmp_path)
    with pytest.raises(StoreError, match="no patch predictions"):
        slide_heatmap(store, "logreg-run", "S00", tmp_path)


def test_cli_heatmap_writes_figures_and_prints_json(store, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "heatmap",
            "--store",
            str(store),
            "--run",
            "mil-run",
            "--slide",
            "S00",
            "--max-px",
            "128",
            "--out",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)
    assert row["slide_id"] == "S00" and row["n_patches"] == N_COLS * N_ROWS
    assert (tmp_path / "S00.png").is_file() and (tmp_path / "S00.geojson").is_file()
    bad = CliRunner().invoke(cli, ["heatmap", "--store", str(store), "--run", "nope"])
    assert bad.exit_code != 0 and "mil-run" in bad.output
