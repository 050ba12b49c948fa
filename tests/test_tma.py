"""TMA dearraying: every core found, numbered by row and column, joined to the array map,
cropped at the requested microns per pixel and split into halves."""

from __future__ import annotations

import csv
import json
import math

import cv2
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from fpstore.cli.main import cli
from fpstore.errors import ConfigError
from fpstore.slides.slide import open_slide
from fpstore.slides.tma import (
    TmaSpec,
    assign_grid,
    crop_core,
    dearray,
    read_array_map,
    split_halves,
)

MPP = 2.0  # um/px of the test arrays: small files, cores of 150 px
PITCH, DIAMETER, MARGIN = 200, 150, 150
BACKGROUND = 244


def write_array(path, rows=4, cols=5, missing=(), tilt_deg=0.0, seed=0, extra=None):
    """A tiled TIFF array of textured pink cores on glass; returns {(row, col): (x, y)}."""
    rng = np.random.default_rng(seed)
    height, width = 2 * MARGIN + PITCH * (rows - 1), 2 * MARGIN + PITCH * (cols - 1)
    img = np.full((height, width, 3), BACKGROUND, np.uint8)
    a = math.radians(tilt_deg)
    truth = {}
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            if (r, c) in missing:
                continue
            dx, dy = MARGIN + (c - 1) * PITCH - width / 2, MARGIN + (r - 1) * PITCH - height / 2
            x = width / 2 + dx * math.cos(a) - dy * math.sin(a) + rng.normal(0, 3)
            y = height / 2 + dx * math.sin(a) + dy * math.cos(a) + rng.normal(0, 3)
            colour = tuple(int(v) for v in rng.integers((150, 60, 150), (220, 140, 210)))
            cv2.circle(img, (round(x), round(y)), DIAMETER // 2, colour, -1)
            for _ in range(4):  # pale fat vacuoles and dark nuclei inside the core
                hx, hy = rng.normal(0, DIAMETER / 7, 2)
                cv2.circle(img, (round(x + hx), round(y + hy)), 8, (238, 236, 238), -1)
                cv2.circle(img, (round(x - hx), round(y - hy)), 3, (70, 30, 110), -1)
            truth[(r, c)] = (x, y)
    if extra:
        extra(img, truth)
    tifffile.imwrite(
        path,
        img,
        tile=(128, 128),
        photometric="rgb",
        compression="zlib",
        resolution=(1e4 / MPP, 1e4 / MPP),
        resolutionunit="CENTIMETER",
    )
    return truth


def write_map(path, keys, letters=False):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "column", "core_index", "patient_id"])
        for i, (r, c) in enumerate(sorted(keys), start=1):
            writer.writerow([chr(64 + r) if letters else r, c, i, f"P{(i + 1) // 2:03d}"])


def check_cores(cores, truth):
    found = {(k.row, k.column): k for k in cores}
    assert set(found) == set(truth)
    for key, (x, y) in truth.items():
        core = found[key]
        assert math.hypot(core.centre[0] - x, core.centre[1] - y) < 0.05 * PITCH
        assert abs(core.diameter_px - DIAMETER) < 0.15 * DIAMETER
        x0, y0, x1, y1 = core.bbox
        assert x0 <= x <= x1 and y0 <= y <= y1


def test_every_core_found_in_its_row_and_column_with_missing_cores_and_tilt(tmp_path):
    missing = {(1, 1), (2, 3), (4, 5), (3, 1)}
    truth = write_array(tmp_path / "a.tiff", rows=5, cols=6, missing=missing, tilt_deg=2.5)
    with open_slide(tmp_path / "a.tiff") as slide:
        check_cores(dearray(slide), truth)


def test_an_empty_column_does_not_shift_the_numbering(tmp_path):
    truth = write_array(tmp_path / "a.tiff", missing={(r, 3) for r in range(1, 5)})
    with open_slide(tmp_path / "a.tiff") as slide:
        check_cores(dearray(slide), truth)


def test_touching_and_torn_cores_and_debris_are_handled(tmp_path):
    def damage(img, truth):
        x, y = truth[(2, 2)]  # a torn core: glass lines across it
        cv2.line(img, (round(x) - 80, round(y)), (round(x) + 80, round(y)), (BACKGROUND,) * 3, 3)
        cv2.line(img, (round(x), round(y) - 80), (round(x), round(y) + 80), (BACKGROUND,) * 3, 3)
        x, y = truth[(3, 4)]  # a core pushed against its left neighbour
        cv2.circle(img, (round(x), round(y)), DIAMETER // 2 + 2, (BACKGROUND,) * 3, -1)
        truth[(3, 4)] = (x - 45, y)
        cv2.circle(img, (round(x - 45), round(y)), DIAMETER // 2, (180, 90, 170), -1)
        rng = np.random.default_rng(1)
        for _ in range(30):  # specks of debris on the glass
            cv2.circle(
                img,
                (int(rng.integers(img.shape[1])), int(rng.integers(img.shape[0]))),
                2,
                (120, 60, 120),
                -1,
            )

    truth = write_array(tmp_path / "a.tiff", extra=damage)
    with open_slide(tmp_path / "a.tiff") as slide:
        check_cores(dearray(slide), truth)


def test_array_map_joins_core_index_and_patient(tmp_path):
    truth = write_array(tmp_path / "a.tiff", missing={(2, 2)})
    keys = set(truth) | {(2, 2)}  # the map lists a core that fell off the slide
    write_map(tmp_path / "map.csv", keys, letters=True)
    expected = {k: i for i, k in enumerate(sorted(keys), start=1)}
    with open_slide(tmp_path / "a.tiff") as slide:
        cores = dearray(slide, array_map=tmp_path / "map.csv")
    assert {(k.row, k.column): k.core_index for k in cores} == {k: expected[k] for k in truth}
    assert all(k.patient_id == f"P{(k.core_index + 1) // 2:03d}" for k in cores)


def test_crop_is_centred_at_the_requested_scale_and_halves_tile_it(tmp_path):
    write_array(tmp_path / "a.tiff", rows=2, cols=2)
    with open_slide(tmp_path / "a.tiff") as slide:
        core = dearray(slide)[0]
        crop = crop_core(slide, core, mpp=4.0, size=100)  # 400 um square, core is 300 um
    assert crop.shape == (100, 100, 3) and crop.dtype == np.uint8
    tissue = (255 - crop.min(axis=2)) > 40
    ys, xs = np.nonzero(tissue)
    # the core's width in crop pixels is its diameter in microns over the crop's um/px
    assert abs((xs.max() - xs.min() + 1) - DIAMETER * MPP / 4.0) <= 3
    assert abs(xs.mean() - 50) < 3 and abs(ys.mean() - 50) < 3
    left, right = split_halves(crop)
    assert left.shape == right.shape == (100, 50, 3)
    assert np.array_equal(np.concatenate([left, right], axis=1), crop)


def test_grid_of_a_single_core_and_of_nothing():
    rows, cols = assign_grid(np.array([[10.0, 20.0]]), np.array([5.0]))
    assert rows.tolist() == [1] and cols.tolist() == [1]
    rows, cols = assign_grid(np.zeros((0, 2)), np.zeros(0))
    assert rows.size == cols.size == 0


def test_bad_array_map_and_spec_are_refused_with_the_fix(tmp_path):
    (tmp_path / "map.csv").write_text("row,col,core_index,patient_id\n1,1,1,P1\n")
    with pytest.raises(ConfigError, match="column"):
        read_array_map(tmp_path / "map.csv")
    (tmp_path / "map.csv").write_text("row,column,core_index,patient_id\n1,1,1,P1\n1,1,2,P1\n")
    with pytest.raises(ConfigError, match="twice"):
        read_array_map(tmp_path / "map.csv")
    with pytest.raises(ConfigError, match="crop_mpp"):
        TmaSpec(crop_mpp=0)


def test_cli_dearray_writes_cores_overlay_crops_and_halves(tmp_path):
    truth = write_array(tmp_path / "a.tiff", rows=2, cols=3, missing={(2, 3)})
    write_map(tmp_path / "map.csv", set(truth) | {(2, 3)})
    out = tmp_path / "out"
    args = [
        "tma",
        "dearray",
        str(tmp_path / "a.tiff"),
        "--array-map",
        str(tmp_path / "map.csv"),
        "--out",
        str(out),
        "--crop-mpp",
        "4",
        "--crop-px",
        "64",
    ]
    result = CliRunner().invoke(cli, args + ["--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["n_cores"] == 5 and (document["n_rows"], document["n_columns"]) == (2, 3)
    assert [m["row"] for m in document["map_entries_without_core"]] == [2]
    with open(out / "cores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(int(r["row"]), int(r["column"])) for r in rows} == set(truth)
    overlay = cv2.imread(str(out / "overlay.png"))
    assert overlay is not None and overlay.shape[:2] == (2 * MARGIN + PITCH, 2 * MARGIN + 2 * PITCH)
    for row in rows:
        for suffix, width in (("", 64), ("_left", 32), ("_right", 32)):
            image = cv2.imread(str(out / "crops" / f"{row['name']}{suffix}.png"))
            assert image.shape == (64, width, 3)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "--force" in again.output
    assert CliRunner().invoke(cli, args + ["--force"]).exit_code == 0


def test_cli_dearray_of_an_unopenable_slide_names_the_file(tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide")
    result = CliRunner().invoke(cli, ["tma", "dearray", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "bad.svs" in result.output


def test_synthetic_arrays_every_core_found_where_the_truth_says(synth_small):
    truth = json.loads((synth_small / "truth" / "truth.json").read_text())
    sections = {k: v for k, v in truth.items() if k.startswith("tma-test")}
    assert sections
    for name, section in sections.items():
        slide_path = synth_small / section["slide"]
        with open_slide(slide_path) as slide:
            cores = dearray(slide, array_map=slide_path.parent / "array_map.csv")
            found = {k.core_index: k for k in cores}
            assert len(cores) == len(section["cores"]), name
            for expected in section["cores"]:
                core = found[expected["core_index"]]
                assert (core.row, core.column, core.patient_id) == (
                    expected["row"],
                    expected["column"],
                    expected["patient_id"],
                )
                error = math.hypot(core.centre[0] - expected["x"], core.centre[1] - expected["y"])
                assert error < 0.08 * expected["diameter_px"], (name, expected, core)
                # measured on the convex hull: ragged edges of a punch widen it a little
                assert abs(core.diameter_px / expected["diameter_px"] - 1) < 0.15
            crop = crop_core(slide, cores[0])  # the paper's crop: 0.5 um/px, 1600 px
    assert crop.shape == (1600, 1600, 3)
    # a 320 um core (320 px at 0.5 um/px) centred in the square, in a ring of glass that
    # reaches to its neighbours (pitch 1.3 core diameters)
    darkness = 255 - crop.min(axis=2).astype(float)
    yy, xx = np.mgrid[:1600, :1600]
    distance = np.hypot(xx - 800, yy - 800)
    ring = (distance > 345) & (distance < 470)
    assert darkness[distance < 300].mean() > 2.5 * darkness[ring].mean()
    assert darkness[ring].mean() < 25
