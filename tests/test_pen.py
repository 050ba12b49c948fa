"""Pen and ink excluded from the tissue mask, checked on real pen-marked slides.

The MSKCC thumbnails carry green, blue and black marker loops; their label PNGs mark the
region inside each loop (tissue there must stay tissue). The stroke PNGs are the stroke
cores traced by hand for fpstore (tests/data/PROVENANCE.md). The HistoPrep needle-core strip
has one blue ink blot at the tissue edge. The thumbnails stand for whole slides at 20 um/px,
the strip for a scan at 2 um/px.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from fpstore.cli.main import cli
from fpstore.config import PatchSpec
from fpstore.errors import ConfigError
from fpstore.slides.grid import patch_grid
from fpstore.slides.pen import PenSpec, detect_pen
from fpstore.slides.slide import open_slide
from fpstore.slides.tissue_mask import (
    TissueMask,
    TissueMaskSpec,
    detect_tissue_and_pen,
    tissue_mask,
)

DATA = Path(__file__).parent / "data"
PEN = DATA / "pen"
MSK_MPP = 20.0
STRIP = PEN / "pen_he_histoprep_slide_with_ink.jpeg"
STRIP_MPP = 2.0
PLAIN = TissueMaskSpec(pen=None)


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def at_mask(path: Path, mask: TissueMask) -> np.ndarray:
    """A full-size boolean PNG (nonzero = set) brought to the mask's grid."""
    height, width = mask.mask.shape
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA) > 127


def inside_loops(number: str, mask: TissueMask) -> np.ndarray:
    labels = cv2.imread(str(PEN / f"pen_he_msk_labels_rs_{number}.png"))
    height, width = mask.mask.shape
    inside = cv2.resize(255 - labels[..., 0], (width, height), interpolation=cv2.INTER_NEAREST)
    return inside > 127


@pytest.fixture(scope="module", params=["00035", "00019", "00004"])
def msk(request):
    """(number, slide, mask, mask without pen removal) of one MSKCC thumbnail."""
    number = request.param
    with open_slide(PEN / f"pen_he_msk_thumbnail_{number}.jpg", mpp=MSK_MPP) as slide:
        yield number, slide, tissue_mask(slide), tissue_mask(slide, PLAIN)


def test_marker_strokes_are_removed_and_tissue_inside_the_loops_kept(msk):
    number, _, mask, plain = msk
    strokes = at_mask(PEN / f"pen_he_msk_strokes_{number}.png", mask)
    # Without pen removal the strokes read as tissue, so the fixture does test something.
    assert plain.mask[strokes].mean() > 0.95
    assert mask.mask[strokes].mean() < 0.01
    inside = inside_loops(number, mask) & plain.mask
    assert mask.mask[inside].mean() > 0.95
    # Tissue more than 1 mm from any stroke is untouched.
    far = cv2.distanceTransform((~strokes).view(np.uint8), cv2.DIST_L2, 3) > 1000 / MSK_MPP
    assert mask.mask[far & plain.mask].mean() > 0.98


def test_pen_share_is_reported_per_slide(msk):
    number, _, mask, plain = msk
    assert plain.pen_fraction == 0.0
    # Each loop covers a sixth to a third of what would otherwise count as tissue.
    assert 0.1 < mask.pen_fraction < 0.45, number
    removed, kept = int(mask.pen.sum()), int(mask.mask.sum())
    assert mask.pen_fraction == pytest.approx(removed / (removed + kept))
    assert not (mask.pen & mask.mask).any()


def test_no_patch_of_the_grid_sits_on_a_stroke(msk):
    number, slide, mask, plain = msk
    strokes = TissueMask(cv2.imread(str(PEN / f"pen_he_msk_strokes_{number}.png"), 0) > 0, 1.0)
    counts = []
    for m in (plain, mask):
        grid = patch_grid(slide, PatchSpec(), m)
        x, y = grid.column("x").to_numpy(), grid.column("y").to_numpy()
        on = strokes.fraction_in(x, y, float(grid.column("size_px").to_numpy()[0]))
        counts.append(int((on >= 0.25).sum()))
    assert counts[0] > 500 and counts[1] == 0, counts


def test_blue_ink_blot_on_a_needle_core_is_removed():
    with open_slide(STRIP, mpp=STRIP_MPP) as slide:
        mask, plain = tissue_mask(slide), tissue_mask(slide, PLAIN)
    blot = at_mask(PEN / "pen_he_histoprep_ink_blot.png", mask)
    assert plain.mask[blot].mean() > 0.95 and mask.mask[blot].mean() < 0.02
    # The blot sits at x 3690-3970 of 5600; the core's tissue elsewhere is all kept.
    elsewhere = np.ones_like(blot)
    elsewhere[:, 3500 // 4 : 4100 // 4] = False
    assert (mask.mask[elsewhere] == plain.mask[elsewhere]).mean() > 0.999
    assert 0.01 < mask.pen_fraction < 0.08


@pytest.mark.parametrize("colour", [(200, 40, 50), (230, 110, 110)])
def test_red_marker_is_removed_and_red_blood_kept(colour):
    # No real red-marker slide is at hand: a 0.5 mm red loop with soft edges is drawn across
    # real tissue and glass. The real haemorrhage of slide 00019 must stay tissue.
    rgb = cv2.GaussianBlur(read_rgb(PEN / "pen_he_msk_thumbnail_00004.jpg"), (0, 0), 1.5)
    inked = rgb.copy()
    cv2.ellipse(inked, (880, 420), (90, 200), 0, 0, 360, colour, 25)
    inked = cv2.GaussianBlur(inked, (0, 0), 1.0)
    core = np.zeros(rgb.shape[:2], np.uint8)
    cv2.ellipse(core, (880, 420), (90, 200), 0, 0, 360, 1, 15)
    before, _ = detect_tissue_and_pen(rgb, MSK_MPP)
    tissue, pen = detect_tissue_and_pen(inked, MSK_MPP)
    core = core.view(bool)
    assert before[core].mean() > 0.3  # the loop crosses tissue
    assert not tissue[core].any()
    blood = read_rgb(PEN / "pen_he_msk_thumbnail_00019.jpg")[490:700, 170:520]
    assert detect_pen(blood, MSK_MPP).mean() < 0.01


def test_pen_free_slides_lose_nothing_to_pen():
    with open_slide(DATA / "slides" / "CMU-1-Small-Region.svs") as slide:
        assert tissue_mask(slide).pen_fraction < 0.005
    target = read_rgb(DATA / "patches" / "tiatoolbox-target_image.png")
    tissue, pen = detect_tissue_and_pen(target, 0.5)
    assert tissue.mean() > 0.95 and not pen.any()


def test_patches_command_reports_the_pen_share(tmp_path):
    path = PEN / "pen_he_msk_thumbnail_00004.jpg"
    args = ["patches", str(path), "--mpp", str(MSK_MPP), "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert 0.1 < doc["pen_fraction"] < 0.3
    text = CliRunner().invoke(cli, args).output
    assert f"{100 * doc['pen_fraction']:.1f}% of the would-be tissue removed as pen or ink" in text
    preview = read_rgb(Path(doc["image"])).astype(int)
    orange = (preview[..., 0] > 150) & (preview[..., 2] < 100) & (preview[..., 1] > 60)
    assert orange.mean() > 0.03  # the black loop, tinted


def test_pen_settings_are_validated():
    with pytest.raises(ConfigError, match="grow_red"):
        PenSpec(seed_red=0.9, grow_red=1.2)
    with pytest.raises(ConfigError, match="off_plane"):
        PenSpec(off_plane=2.0)
    with pytest.raises(ConfigError, match=r"red_ratios\[1\]"):
        PenSpec(red_ratios=(0.2, -1.0))
