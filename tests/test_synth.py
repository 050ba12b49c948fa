"""fpstore synth: files that slide readers open as declared, truth that matches the pixels,
labels with TCGA-like shares, determinism, serial sections, and refusals of bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
from click.testing import CliRunner

from fpstore.cli.main import cli
from fpstore.errors import ConfigError
from fpstore.synth import PRESETS, get_preset, synthesize
from fpstore.synth.api import draw_patient, wsi_scene
from fpstore.synth.labels import NEGATIVE, POSITIVE, draw_truth, prevalence, record
from fpstore.synth.render import TRUTH_DOWNSAMPLE, TileRenderer
from fpstore.synth.sites import SITES
from fpstore.synth.wsi import write_slide

GDC_NAME = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-01Z-00-DX1\.[0-9A-F-]{36}\.svs$")


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _slides(out: Path) -> list[dict]:
    return [f for f in _manifest(out)["files"] if f["kind"] in ("wsi", "tma")]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the files ------------------------------------------------------------------------------


def test_every_slide_opens_in_openslide_and_tiatoolbox_with_declared_mpp_and_levels(synth_small):
    from tiatoolbox.wsicore.wsireader import WSIReader

    slides = _slides(synth_small)
    assert {Path(f["path"]).suffix for f in slides} == {".svs", ".tiff"}
    for f in slides:
        path = synth_small / f["path"]
        with openslide.OpenSlide(str(path)) as s:
            assert s.properties["openslide.vendor"] == "aperio"
            assert float(s.properties["openslide.mpp-x"]) == 0.25
            assert float(s.properties["openslide.objective-power"]) == 40
            assert [list(d) for d in s.level_dimensions] == f["level_dimensions"]
            assert s.level_count >= 3, "tests need a pyramid"
            assert np.allclose(
                s.level_downsamples, [4.0**k for k in range(s.level_count)], rtol=0.02
            )
        info = WSIReader.open(path).info.as_dict()
        assert tuple(float(m) for m in info["mpp"]) == (0.25, 0.25), f["path"]
        assert [list(d) for d in info["level_dimensions"]] == f["level_dimensions"], f["path"]


def test_layout_names_and_tables_follow_the_contract(synth_small):
    import pandas as pd

    names = [p.name for p in (synth_small / "tcga" / "slides").iterdir()]
    assert names and all(GDC_NAME.match(n) for n in names), names
    biotab = synth_small / "tcga" / "nationwidechildrens.org_clinical_patient_brca.txt"
    real = Path(__file__).parent / "data" / "clinical" / biotab.name
    ours_head = biotab.read_text().splitlines()[:3]
    assert ours_head == real.read_text().splitlines()[:3]  # the three GDC header rows
    table = pd.read_csv(biotab, sep="\t", skiprows=[1, 2])
    allowed = {
        "Positive",
        "Negative",
        "Equivocal",
        "Indeterminate",
        "[Not Evaluated]",
        "[Not Available]",
    }
    for column in ("er_status_by_ihc", "pr_status_by_ihc", "her2_status_by_ihc"):
        assert set(table[column]) <= allowed
    assert table["bcr_patient_barcode"].str.match(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}$").all()

    labels = pd.read_csv(synth_small / "external" / "labels.csv")
    assert list(labels.columns) == ["patient_id", "slide", "ER", "PR", "Her2", "site"]
    for slide in labels["slide"]:
        assert (synth_small / "external" / "slides" / slide).is_file()
    assert set(labels["site"]).isdisjoint(table["bcr_patient_barcode"].str[5:7])

    for array, sections in (("train", 3), ("test", 2)):
        folder = synth_small / "tma" / array
        assert sorted(p.name for p in folder.glob("section*.tiff")) == [
            f"section{i}.tiff" for i in range(1, sections + 1)
        ]
        with open(folder / "array_map.csv") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["row", "column", "core_index", "patient_id"]
        per_patient = {}
        for r in rows:
            per_patient[r["patient_id"]] = per_patient.get(r["patient_id"], 0) + 1
        assert set(per_patient.values()) <= {1, 2}

    def patients(array: str) -> set[str]:
        with open(synth_small / "tma" / array / "array_map.csv") as handle:
            return {r["patient_id"] for r in csv.DictReader(handle)}

    train, test = patients("train"), patients("test")
    assert train.isdisjoint(test)
    sites = {
        s["path"]: s["site"]
        for a in ("train", "test")
        for s in _manifest(synth_small)["tma"][a]["sections"]
    }
    assert [sites[f"tma/train/section{i}.tiff"] for i in (1, 2, 3)] == ["A", "B", "B"]
    assert [sites[f"tma/test/section{i}.tiff"] for i in (1, 2)] == ["A", "B"]


def test_tcga_cohort_has_the_documented_defects(synth_small):
    import pandas as pd

    defects = _manifest(synth_small)["defects"]["tcga"]
    table = pd.read_csv(
        synth_small / "tcga" / "nationwidechildrens.org_clinical_patient_brca.txt",
        sep="\t",
        skiprows=[1, 2],
    )
    barcodes = set(table["bcr_patient_barcode"])
    slide_patients = {n[:12] for n in (p.name for p in (synth_small / "tcga/slides").iterdir())}
    assert defects["patient_without_slide"] in barcodes - slide_patients
    assert barcodes - slide_patients == {defects["patient_without_slide"]}
    assert slide_patients - barcodes == {defects["slide_without_patient_barcode"]}
    assert (synth_small / "tcga" / "slides" / defects["slide_without_patient"]).is_file()


# -- truth ----------------------------------------------------------------------------------


def _pixel_tissue(path: Path, shape) -> np.ndarray:
    """A plain tissue mask from the pixels: stained (not glass-coloured) at 1/16 of level 0."""
    with openslide.OpenSlide(str(path)) as s:
        level = s.get_best_level_for_downsample(TRUTH_DOWNSAMPLE + 0.1)
        assert round(s.level_downsamples[level]) == TRUTH_DOWNSAMPLE
        rgb = np.asarray(s.read_region((0, 0), level, s.level_dimensions[level]).convert("RGB"))
    rgb = rgb[: shape[0], : shape[1]].astype(np.int16)
    return (rgb.max(axis=2) - rgb.min(axis=2) > 18) | (rgb.min(axis=2) < 200)


def test_truth_masks_align_with_the_pixels(synth_small):
    truth = json.loads((synth_small / "truth" / "truth.json").read_text())
    assert len(truth) == len(_slides(synth_small))
    for key, entry in truth.items():
        assert entry["downsample"] == TRUTH_DOWNSAMPLE
        mask = cv2.imread(str(synth_small / entry["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (-(-entry["height"] // 16), -(-entry["width"] // 16)), key
        assert set(np.unique(mask)) <= {0, 1, 2, 3}
        pixels = _pixel_tissue(synth_small / entry["slide"], mask.shape)
        kernel = np.ones((3, 3), np.uint8)
        solid = cv2.erode(np.isin(mask, (1, 2)).astype(np.uint8), kernel).astype(bool)
        glass = cv2.erode((mask == 0).astype(np.uint8), kernel).astype(bool)
        assert solid.sum() > 100 and glass.sum() > 100, key
        assert pixels[solid].mean() > 0.9, key  # epithelium and stroma are stained
        assert pixels[glass].mean() < 0.03, key  # background is glass
    for f in _slides(synth_small):
        if f["kind"] == "wsi":
            mask = cv2.imread(str(synth_small / f["truth"]), cv2.IMREAD_UNCHANGED)
            counts = np.bincount(mask.ravel(), minlength=4)
            assert (counts[1:] > 0).sum() >= 2, f["path"]


def test_tma_core_centres_are_tissue_and_serial_sections_show_the_same_tissue(synth_small):
    truth = json.loads((synth_small / "truth" / "truth.json").read_text())
    sections = [truth[f"tma-train-section{i}"] for i in (1, 2, 3)]
    masks = [cv2.imread(str(synth_small / s["mask"]), cv2.IMREAD_UNCHANGED) for s in sections]

    def core_patch(mask, core, r):
        x, y = int(core["x"] / 16), int(core["y"] / 16)
        return mask[y - r : y + r, x - r : x + r]

    r = int(sections[0]["cores"][0]["diameter_px"] / 16 * 0.3)
    same, other = [], []
    for i, core in enumerate(sections[0]["cores"]):
        for m, s in zip(masks, sections):
            assert core_patch(m, s["cores"][i], 2).min() > 0  # a core centre is tissue
        a = core_patch(masks[0], core, r)
        same.append((a == core_patch(masks[1], sections[1]["cores"][i], r)).mean())
        j = (i + 1) % len(sections[0]["cores"])
        other.append((a == core_patch(masks[1], sections[1]["cores"][j], r)).mean())
    assert np.mean(same) > 0.75 and np.mean(same) > np.mean(other) + 0.2, (same, other)


# -- rendering ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene():
    patient = draw_patient(7, "P-1", "tcga", get_preset("small"), signal=True)
    return wsi_scene(7, "s.svs", patient.morph, (2048, 2048))


def test_chunks_are_seamless_whatever_their_size(scene):
    """Streaming needs tile independence: a 1024 px chunk equals its four 512 px tiles."""
    big = TileRenderer(scene, SITES["A2"], 1.0, 1024).render(0, 0)[0]
    small = TileRenderer(scene, SITES["A2"], 1.0, 512)
    for ty in (0, 1):
        for tx in (0, 1):
            tile = small.render(tx, ty)[0]
            part = big[ty * 512 : (ty + 1) * 512, tx * 512 : (tx + 1) * 512]
            assert np.abs(tile.astype(int) - part).max() <= 1


def test_stain_vectors_are_recovered_by_macenko(scene):
    """Beer-Lambert rendering: colour deconvolution finds each site's H and E vectors."""
    from tiatoolbox.tools.stainextract import MacenkoExtractor

    for name in ("A2", "X1", "B"):
        site = SITES[name]
        rgb = TileRenderer(scene, site, 1.0, 512).render(0, 0)[0]
        h, e = MacenkoExtractor().get_stain_matrix(rgb)
        assert np.dot(h, site.hematoxylin) > 0.98 and np.dot(e, site.eosin) > 0.97, name


def test_sites_change_colour_but_not_the_tissue(scene):
    a = TileRenderer(scene, SITES["A"], 1.0, 512).render(0, 0)
    b = TileRenderer(scene, SITES["B"], 1.0, 512).render(0, 0)
    assert np.array_equal(a[1], b[1])
    assert np.abs(a[0].astype(int) - b[0]).mean() > 3


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, scene):
    paths = []
    for run, seed in enumerate((7, 7, 8)):
        patient = draw_patient(seed, "P-1", "tcga", get_preset("small"), signal=True)
        sc = wsi_scene(seed, "s.svs", patient.morph, (1536, 1024))
        path = tmp_path / f"run{run}.svs"
        write_slide(path, TileRenderer(sc, SITES["BH"], 1.0, 1024), tmp_path / f"t{run}.png", {})
        paths.append(path)
    assert _sha(paths[0]) == _sha(paths[1])
    assert _sha(paths[0]) != _sha(paths[2])


def test_large_slides_keep_level1_on_disk_with_the_same_bytes(tmp_path, scene, monkeypatch):
    import fpstore.synth.wsi as wsi

    renderer = TileRenderer(scene, SITES["E2"], 1.0, 1024)
    write_slide(tmp_path / "memory.svs", renderer, tmp_path / "m.png", {})
    monkeypatch.setattr(wsi, "LEVEL1_IN_MEMORY", 0)  # as for a 40,000 x 30,000 px slide
    write_slide(tmp_path / "disk.svs", renderer, tmp_path / "d.png", {})
    assert _sha(tmp_path / "memory.svs") == _sha(tmp_path / "disk.svs")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "d.png",
        "disk.svs",
        "m.png",
        "memory.svs",
    ]


# -- labels ---------------------------------------------------------------------------------


def test_label_shares_follow_tcga():
    rng = np.random.default_rng(0)
    truths = [draw_truth(rng) for _ in range(6000)]
    records = [record(t, rng, 0.05) for t in truths]
    assert 0.71 < prevalence(records, "ER") < 0.80
    assert 0.13 < prevalence(records, "Her2") < 0.22
    assert 0.12 < np.mean([r.Her2 == "Equivocal" for r in records]) < 0.22
    assert 0.02 < np.mean([r.ER == "[Not Evaluated]" for r in records]) < 0.07
    known = [r for r in records if r.PR in (POSITIVE, NEGATIVE)]
    er_pos = [r.PR == POSITIVE for r in known if r.ER == POSITIVE]
    er_neg = [r.PR == POSITIVE for r in known if r.ER == NEGATIVE]
    assert np.mean(er_pos) - np.mean(er_neg) > 0.5  # PR follows ER
    complete = [record(t, rng, 0.05, complete=True) for t in truths[:500]]
    assert all(r.ER in (POSITIVE, NEGATIVE) for r in complete)


def test_morphology_follows_er_only_with_signal():
    cfg = get_preset("small")

    def gap(signal):
        patients = [draw_patient(3, f"P{i}", "tcga", cfg, signal) for i in range(400)]
        size = {True: [], False: []}
        for p in patients:
            size[p.truth["ER"]].append(p.morph.nucleus_um)
        return np.mean(size[False]) - np.mean(size[True])

    assert gap(True) > 0.5  # ER-negative: larger nuclei
    assert abs(gap(False)) < 0.15  # --no-signal: none
    labels_with = [draw_patient(3, f"P{i}", "tcga", cfg, True).recorded for i in range(50)]
    labels_without = [draw_patient(3, f"P{i}", "tcga", cfg, False).recorded for i in range(50)]
    assert labels_with == labels_without  # the negative control keeps the labels


def test_only_tma_writes_the_same_arrays_as_a_full_synth_and_nothing_else(tmp_path, synth_small):
    out = tmp_path / "tma-only"
    result = CliRunner().invoke(
        cli, ["synth", "--preset", "small", "--only", "tma", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert not (out / "tcga").exists() and not (out / "external").exists()
    sections = sorted(p.relative_to(out) for p in (out / "tma").rglob("*") if p.is_file())
    assert len(sections) == 8  # 3 + 2 sections, two array maps and the table naming them
    for rel in sections:
        assert (out / rel).read_bytes() == (synth_small / rel).read_bytes(), rel
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parts"] == ["tma"] and manifest["cohorts"] == {}
    assert set(manifest["tma"]) == {"train", "test"}


# -- bad input ------------------------------------------------------------------------------


def test_non_empty_output_is_refused_without_force_and_loses_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--force"):
        synthesize("small", tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    result = CliRunner().invoke(cli, ["synth", "--preset", "small", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--force" in result.output


def test_unknown_part_is_refused_with_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="tcga, external, tma"):
        synthesize("small", tmp_path / "o", only=("slides",), progress=False)
    assert not (tmp_path / "o").exists()


def test_unknown_preset_lists_the_valid_ones(tmp_path):
    result = CliRunner().invoke(cli, ["synth", "--preset", "huge", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    for name in PRESETS:
        assert name in result.output
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(cli, ["synth", "--out", str(tmp_path), "--slide-size", "40000"])
    assert result.exit_code == 2 and "WIDTHxHEIGHT" in result.output


@pytest.mark.slow
def test_force_replaces_its_own_output_keeps_other_files_and_reproduces_bytes(
    tmp_path, synth_small
):
    out = tmp_path / "again"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "tma").mkdir()
    (out / "tma" / "stale.tiff").write_text("old")
    result = CliRunner().invoke(
        cli,
        ["synth", "--preset", "small", "--out", str(out), "--force", "--json", "--workers", "2"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["preset"] == "small" and summary["files"] > 20
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "tma" / "stale.tiff").exists()
    for f in _slides(synth_small):  # same seed, same bytes, whatever the worker count
        assert _sha(out / f["path"]) == _sha(synth_small / f["path"]), f["path"]
