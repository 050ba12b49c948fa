"""TMA dearraying: every core found, numbered by block, row and column on the fitted
lattice, empty positions and orientation cores told apart, joined to the array map, cropped
at the requested microns per pixel and split into halves; on synthetic arrays made to be hard
(touching, tilted, bowed, missing, torn, folded) and on real array overviews."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from fpstore.cli.main import cli
from fpstore.errors import ConfigError, TmaError
from fpstore.slides.slide import open_slide
from fpstore.slides.tma import (
    TmaSpec,
    crop_core,
    dearray,
    detect,
    join_array_map,
    open_array_slide,
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


def test_a_single_core_is_a_one_by_one_block(tmp_path):
    truth = write_array(tmp_path / "a.tiff", rows=1, cols=1)
    with open_slide(tmp_path / "a.tiff") as slide:
        array = detect(slide)
    check_cores(array.found, truth)
    assert array.blocks == [{"block": 1, "rows": 1, "columns": 1, "cores": 1, "empty": 0}]


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
    assert document["n_cores"] == 5 and document["n_empty"] == 1
    assert [(b["rows"], b["columns"]) for b in document["blocks"]] == [(2, 3)]
    assert document["scale"]["source"] == "metadata" and document["scale"]["mpp"] == MPP
    assert [m["row"] for m in document["map_entries_without_core"]] == [2]
    with open(out / "cores.csv") as handle:
        table = list(csv.DictReader(handle))
    assert {(r["status"], r["block"], r["row"], r["column"]) for r in table} == {
        ("core" if key in truth else "empty", "1", str(key[0]), str(key[1]))
        for key in set(truth) | {(2, 3)}
    }
    rows = [r for r in table if r["status"] == "core"]
    assert all(0.8 <= float(r["confidence"]) <= 1 for r in rows)
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


# --- synthetic arrays made to be hard -------------------------------------------------------

HARD_MPP = 10.0  # um/px: an overview scan; cores of 60 px are 0.6 mm punches
HARD_DIAMETER = 60


def grid_spots(rows, cols, block=1, origin=(0.0, 0.0), missing=()):
    """(key, column step, row step) of a rows x cols block whose first position sits at
    ``origin`` (in pitches); key = (block, row, column)."""
    return [
        ((block, r, c), origin[0] + c - 1, origin[1] + r - 1)
        for r in range(1, rows + 1)
        for c in range(1, cols + 1)
        if (r, c) not in missing
    ]


def write_hard_array(
    path,
    spots,
    pitch,
    tilt_deg=0.0,
    bow=0.0,
    fragment=None,
    fold=None,
    seed=0,
    fmt="tiff",
    diameter=HARD_DIAMETER,
    mpp=HARD_MPP,
):
    """Irregular H&E-like cores at ``spots`` (see grid_spots) on glass, ``pitch`` px apart,
    the lattice turned by ``tilt_deg`` and its rows bowed by ``bow`` pitches at their ends.
    ``fragment``: the key of a core torn to a third of itself; ``fold``: the key of a core
    with a dark fold lapping over towards its right neighbour. Cores are ``diameter`` px
    across, the TIFF says ``mpp``. Returns {key: (x, y)} of the punch centres (a fragment's
    included)."""
    rng = np.random.default_rng(seed)
    steps = np.array([[s[1], s[2]] for s in spots], float)
    span = max(1.0, np.ptp(steps[:, 0]))
    middle = steps.min(axis=0) + np.ptp(steps, axis=0) / 2
    gx = (steps[:, 0] - middle[0]) * pitch
    gy = (steps[:, 1] - middle[1]) * pitch + bow * pitch * (
        2 * (steps[:, 0] - middle[0]) / span
    ) ** 2
    a = math.radians(tilt_deg)
    xy = np.stack([gx * math.cos(a) - gy * math.sin(a), gx * math.sin(a) + gy * math.cos(a)], 1)
    xy += rng.normal(0, 0.02 * pitch, xy.shape)
    margin = 1.5 * diameter
    xy += margin - xy.min(axis=0)
    width, height = (xy.max(axis=0) + margin).astype(int)
    img = np.full((height, width, 3), BACKGROUND, np.uint8)
    radius = diameter / 2
    truth = {}
    for (key, _, _), (x, y) in zip(spots, xy):
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        wobble = 1 + 0.04 * np.sin(3 * angles + rng.uniform(0, 6)) + rng.normal(0, 0.01, 48)
        outline = np.stack(
            [x + radius * wobble * np.cos(angles), y + radius * wobble * np.sin(angles)], 1
        )
        core = np.zeros((height, width), np.uint8)
        cv2.fillPoly(core, [np.round(outline).astype(np.int32)], 1)
        if key == fragment:  # only a wedge of the punch stayed on the glass
            cut = np.zeros_like(core)
            cv2.ellipse(cut, (round(x), round(y)), (round(radius) + 2,) * 2, 0, 200, 330, 1, -1)
            core &= cut
        pink = rng.integers((200, 120, 170), (235, 170, 215))
        img[core > 0] = pink
        ys, xs = np.nonzero(core)
        for k in rng.choice(len(xs), size=len(xs) // 12, replace=False):  # nuclei
            img[ys[k], xs[k]] = (90, 40, 130)
        for _ in range(3):  # pale fat vacuoles
            h = rng.normal(0, radius / 3, 2)
            if key != fragment:
                cv2.circle(img, (round(x + h[0]), round(y + h[1])), 4, (238, 232, 238), -1)
        if key == fold:  # a fold: a double layer, darker, lapping over the edge
            cv2.ellipse(
                img,
                (round(x + 0.55 * radius), round(y)),
                (round(0.7 * radius), 6),
                10,
                0,
                360,
                (150, 70, 150),
                -1,
            )
        truth[key] = (float(x), float(y))
    for _ in range(25):  # specks of debris
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        cv2.circle(img, centre, 1, (120, 60, 120), -1)
    if fmt == "tiff":
        tifffile.imwrite(
            path,
            img,
            tile=(128, 128),
            photometric="rgb",
            compression="zlib",
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
        )
    else:  # a plain image without any scale, as overview scans come
        cv2.imwrite(str(path), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return truth


def positions(array):
    """{(block, row, column): core} of a detected array's lattice positions."""
    return {(k.block, k.row, k.column): k for k in array.cores if k.status != "orientation"}


@pytest.mark.parametrize(
    "tilt_deg, bow, spacing",
    [
        (7.0, 0.25, 1.02),  # tilted, rows bowed a quarter pitch, neighbours touching
        (-10.0, 0.0, 0.97),  # tilted the other way, cores pressed into each other
        (5.0, -0.3, 1.3),  # spaced cores, rows bowed the other way
    ],
)
def test_hard_arrays_every_position_numbered(tmp_path, tilt_deg, bow, spacing):
    missing = {(1, 4), (3, 3), (5, 7), (7, 1)}
    spots = grid_spots(7, 9, missing=missing)
    pitch = spacing * HARD_DIAMETER
    truth = write_hard_array(
        tmp_path / "a.tiff",
        spots,
        pitch,
        tilt_deg=tilt_deg,
        bow=bow,
        fragment=(1, 4, 5),
        fold=(1, 2, 6),
    )
    with open_slide(tmp_path / "a.tiff") as slide:
        array = detect(slide)
    found = positions(array)
    assert array.blocks == [{"block": 1, "rows": 7, "columns": 9, "cores": 59, "empty": 4}]
    assert {key for key, k in found.items() if k.status == "empty"} == {(1, *m) for m in missing}
    for key, (x, y) in truth.items():
        core = found[key]
        assert core.status == "core", key
        assert math.hypot(core.centre[0] - x, core.centre[1] - y) < 0.15 * pitch, key
    # the fragment (a third of a core) is the least sure of all
    confidence = sorted(k.confidence for k in array.found)
    assert found[(1, 4, 5)].confidence == confidence[0] < 0.5 * np.median(confidence)
    assert np.median(confidence) > 0.6
    assert abs(array.tilt_deg - tilt_deg) < 2
    assert not [k for k in array.cores if k.status == "orientation"]


def test_the_issue_array_6_by_4_nearly_touching_with_two_empty_positions(tmp_path):
    # As reported: 6 columns x 4 rows of cores ~250 px across at ~4 um/px, neighbours nearly
    # touching, two empty positions; the old dearrayer found 8 of 22.
    missing = {(2, 3), (4, 6)}
    spots = grid_spots(4, 6, missing=missing)
    truth = write_hard_array(tmp_path / "a.tiff", spots, 258, tilt_deg=1.5, diameter=250, mpp=4)
    with open_slide(tmp_path / "a.tiff") as slide:
        array = detect(slide, TmaSpec(core_um=1000))
    found = positions(array)
    assert array.blocks == [{"block": 1, "rows": 4, "columns": 6, "cores": 22, "empty": 2}]
    for key, (x, y) in truth.items():
        assert found[key].status == "core"
        assert math.hypot(found[key].centre[0] - x, found[key].centre[1] - y) < 0.05 * 258
    assert {k for k, c in found.items() if c.status == "empty"} == {(1, *m) for m in missing}


def test_blocks_are_numbered_in_reading_order_and_orientation_cores_kept_apart(tmp_path):
    # Two blocks side by side, 1.6 pitches apart (no whole number of steps) and the right one
    # 0.4 pitch lower; a pair of orientation cores far to the left.
    left = grid_spots(4, 5, block=1, missing={(2, 2)})
    right = grid_spots(4, 4, block=2, origin=(5.6, 0.4), missing={(4, 4)})
    marks = [(("orientation", 1), -3.2, 0.7), (("orientation", 2), -3.2, 1.75)]
    truth = write_hard_array(
        tmp_path / "a.tiff", left + right + marks, 1.1 * HARD_DIAMETER, tilt_deg=4
    )
    with open_slide(tmp_path / "a.tiff") as slide:
        array = detect(slide)
    found = positions(array)
    assert [(b["rows"], b["columns"], b["empty"]) for b in array.blocks] == [(4, 5, 1), (4, 4, 1)]
    assert found[(1, 2, 2)].status == found[(2, 4, 4)].status == "empty"
    for key, (x, y) in truth.items():
        if key[0] != "orientation":
            assert math.hypot(found[key].centre[0] - x, found[key].centre[1] - y) < 8, key
    marks_found = [k for k in array.cores if k.status == "orientation"]
    assert [(k.block, k.row, k.column) for k in marks_found] == [(0, 0, 1), (0, 0, 2)]
    for core, key in zip(marks_found, [("orientation", 1), ("orientation", 2)]):
        assert math.hypot(core.centre[0] - truth[key][0], core.centre[1] - truth[key][1]) < 8
        assert core.name == f"orientation{key[1]:02d}"

    # The map names its blocks; one without a block column cannot be joined to two blocks.
    with open(tmp_path / "map.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["block", "row", "column", "core_index", "patient_id"])
        for i, (key, _, _) in enumerate(left + right, start=1):
            writer.writerow([*key, i, f"P{i}"])
    with open_slide(tmp_path / "a.tiff") as slide:
        cores = dearray(slide, array_map=tmp_path / "map.csv")
    assert {(k.block, k.row, k.column): k.core_index for k in cores} == {
        key: i for i, (key, _, _) in enumerate(left + right, start=1)
    }
    (tmp_path / "flat.csv").write_text("row,column,core_index,patient_id\n1,1,1,P1\n")
    with pytest.raises(ConfigError, match="block column"):
        join_array_map(array.cores, read_array_map(tmp_path / "flat.csv"))


def test_no_cores_and_nonsense_core_um_give_one_line_with_the_fix(tmp_path):
    blank = np.full((400, 500, 3), BACKGROUND, np.uint8)
    cv2.imwrite(str(tmp_path / "glass.png"), blank)
    with (
        open_slide(tmp_path / "glass.png", mpp=10) as slide,
        pytest.raises(TmaError, match="no cores"),
    ):
        dearray(slide)
    result = CliRunner().invoke(
        cli, ["tma", "dearray", str(tmp_path / "glass.png"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code != 0 and result.output.count("\n") == 1
    assert "no cores found" in result.output and "glass.png" in result.output

    spots = grid_spots(3, 4)
    write_hard_array(tmp_path / "a.tiff", spots, 1.2 * HARD_DIAMETER)
    write_hard_array(tmp_path / "a.jpg", spots, 1.2 * HARD_DIAMETER, fmt="jpg")
    for image, core_um, words in [
        ("a.tiff", "3000", "pass --core-um 6"),  # at the slide's 10 um/px the cores are 0.6 mm
        ("a.jpg", "50", "in microns"),  # millimetres where microns belong
        ("a.jpg", "8000", "between 100 and 5000"),  # no punch is 8 mm
        (REAL / "tma_ihc_dense_158867.jpg", "4000", "no glass slide"),  # 110 um/px: 113 mm wide
    ]:
        args = [
            "tma",
            "dearray",
            str(tmp_path / image),
            "--core-um",
            core_um,
            "--out",
            str(tmp_path / "o"),
        ]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, (image, core_um, result.output)
        assert result.output.count("\n") == 1 and words in result.output, result.output
        assert core_um in result.output


def test_an_image_without_mpp_takes_its_scale_from_core_um_or_says_it_assumed_one(tmp_path):
    spots = grid_spots(3, 4, missing={(2, 2)})
    truth = write_hard_array(tmp_path / "a.jpg", spots, 1.2 * HARD_DIAMETER, fmt="jpg")
    base = ["tma", "dearray", str(tmp_path / "a.jpg"), "--crop-px", "64", "--json"]
    result = CliRunner().invoke(cli, base + ["--core-um", "1200", "--out", str(tmp_path / "o1")])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    scale = document["scale"]
    assert scale["source"] == "core_um" and "--core-um 1200" in scale["text"]
    assert abs(scale["mpp"] - 1200 / HARD_DIAMETER) < 0.1 * 1200 / HARD_DIAMETER
    assert document["n_cores"] == len(truth) and document["n_empty"] == 1

    result = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "o2")])
    document = json.loads(result.stdout)
    scale = document["scale"]
    assert scale["source"] == "assumed" and "600 um punch" in scale["text"]
    assert abs(scale["mpp"] - 600 / HARD_DIAMETER) < 0.1 * 600 / HARD_DIAMETER

    # The overlay (at the image's own size here) draws the lattice: lines between neighbouring
    # positions, a green circle around each core, grey ones crossed at the empty position.
    overlay = cv2.imread(str(tmp_path / "o2" / "overlay.png"))[..., ::-1].astype(int)
    assert overlay.shape[:2] == cv2.imread(str(tmp_path / "a.jpg")).shape[:2]

    def colour_near(core, colour, radius):
        """Share of 72 directions from the centre in which ``colour`` lies within 2 px of
        ``radius``: ~1 for a circle of that colour drawn there."""
        x, y = core["centre"]
        hits = []
        for angle in np.linspace(0, 2 * np.pi, 72, endpoint=False):
            ray = [
                overlay[round(y + d * np.sin(angle)), round(x + d * np.cos(angle))]
                for d in np.arange(radius - 2, radius + 2.5, 0.5)
            ]
            hits.append(any(np.abs(p - colour).sum() < 30 for p in ray))
        return np.mean(hits)

    for core in document["cores"]:
        if core["status"] == "core":
            assert colour_near(core, (0, 160, 0), core["diameter_px"] / 2) > 0.8
        else:
            assert (core["block"], core["row"], core["column"]) == (1, 2, 2)
            assert colour_near(core, (150, 150, 150), core["diameter_px"] / 2) > 0.8
            assert colour_near(core, (0, 160, 0), core["diameter_px"] / 2) < 0.2


# --- real arrays ----------------------------------------------------------------------------

REAL = Path(__file__).parent / "data" / "tma"


def truth_score(array, truth_path):
    """(true cores found within half their radius, cores invented) of a detected array."""
    truth = json.loads(truth_path.read_text())
    t = np.array([[c["x"], c["y"]] for c in truth])
    radius = np.array([c["radius"] for c in truth])
    found = np.array([k.centre for k in array.cores if k.status != "empty"])
    near = np.hypot(*(t[:, None, :] - found[None, :, :]).transpose(2, 0, 1)) < 0.5 * radius[:, None]
    return int(near.any(axis=1).sum()), int((~near.any(axis=0)).sum()), len(truth)


def test_real_dense_ihc_array_three_blocks_of_packed_cores():
    slide, provisional = open_array_slide(REAL / "tma_ihc_dense_158867.jpg")
    with slide:
        array = detect(slide)
    assert provisional
    found, invented, total = truth_score(array, REAL / "tma_ihc_dense_158867.truth.json")
    assert total == 252 and found >= 0.97 * total and invented <= 3
    assert [(b["rows"], b["columns"]) for b in array.blocks] == [(13, 8), (13, 8), (13, 6)]
    assert sum(b["cores"] + b["empty"] for b in array.blocks) == 286


def test_real_tilted_ihc_array_fits_one_warped_block_and_four_orientation_cores():
    slide, _ = open_array_slide(REAL / "tma_ihc_tilted_ABC_107_1_010_1.jpg")
    with slide:
        array = detect(slide)
    found, invented, total = truth_score(array, REAL / "tma_ihc_tilted_ABC_107_1_010_1.truth.json")
    assert total == 180 and found >= 0.95 * total and invented <= 3
    assert [(b["rows"], b["columns"]) for b in array.blocks] == [(12, 15)]
    marks = [k for k in array.cores if k.status == "orientation"]
    assert len(marks) == 4 and all(k.centre[0] < 150 for k in marks)
    assert 5 < array.tilt_deg < 9


def test_real_he_array_94_cores_in_seven_blocks():
    slide, _ = open_array_slide(REAL / "tma_he_histoprep_tma_spots.jpeg")
    with slide:
        array = detect(slide)
    assert len(array.found) == 94
    assert [(b["rows"], b["columns"], b["cores"]) for b in array.blocks] == [
        (4, 1, 4),
        (4, 4, 16),
        (4, 4, 15),
        (4, 4, 16),
        (4, 4, 15),
        (4, 4, 16),
        (3, 4, 12),
    ]
