"""Training sources as users have them: a TMA table over renamed files, a store cohort's whole
slides (pseudo-cores), both together, and the errors for bad input."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from fpstore.errors import ConfigError, TrainingError
from fpstore.fingerprint.sources import place_squares, read_tma_table

HEADER = "file,array,site,array_map,role\n"


def _table(tmp_path, text: str, name: str = "arrays.csv"):
    (tmp_path / "s1.tiff").write_bytes(b"not read by the table parser")
    (tmp_path / "map.csv").write_text("row,column,core_index,patient_id\n1,1,1,P1\n")
    path = tmp_path / name
    path.write_text(text)
    return path


def test_table_names_the_row_and_the_column_of_a_bad_entry(tmp_path):
    path = _table(tmp_path, "file,array,array_map\ns1.tiff,BR1,map.csv\n")
    with pytest.raises(ConfigError, match=r"line 1 \(the header\): no column 'site'"):
        read_tma_table(path)
    path = _table(tmp_path, HEADER + "s1.tiff,BR1,USC,map.csv,train\ngone.svs,BR1,USC,map.csv,\n")
    with pytest.raises(ConfigError, match=r"line 3, column 'file': .*gone.svs does not exist"):
        read_tma_table(path)
    path = _table(tmp_path, HEADER + "s1.tiff,BR1,,map.csv,train\n")
    with pytest.raises(ConfigError, match=r"line 2, column 'site': empty"):
        read_tma_table(path)
    path = _table(tmp_path, HEADER + "s1.tiff,BR1,USC,nomap.csv,train\n")
    with pytest.raises(ConfigError, match=r"line 2, column 'array_map': .*nomap.csv does not"):
        read_tma_table(path)
    path = _table(tmp_path, HEADER + "s1.tiff,BR1,USC,,train\n")
    with pytest.raises(ConfigError, match=r"line 2, column 'array_map': empty"):
        read_tma_table(path)
    path = _table(tmp_path, HEADER + "s1.tiff,BR1,USC,map.csv,validation\n")
    with pytest.raises(ConfigError, match=r"line 2, column 'role': 'validation'"):
        read_tma_table(path)
    path = _table(tmp_path, HEADER + "s1.tiff,BR1,USC,map.csv,train\ns1.tiff,BR2,BM,map.csv,\n")
    with pytest.raises(ConfigError, match=r"line 3, column 'section': 's1' names two train"):
        read_tma_table(path)


def test_table_reads_paths_relative_to_itself_and_defaults(tmp_path):
    path = _table(
        tmp_path, "File, Array ,SITE,array_map\ns1.tiff,BR1,USC,map.csv\n", "sections.csv"
    )
    (section,) = read_tma_table(tmp_path)  # the folder: sections.csv is looked for
    assert section.file == tmp_path / "s1.tiff" and section.array_map == tmp_path / "map.csv"
    assert (section.role, section.name, section.site, section.line) == ("train", "s1", "USC", 2)
    assert path.exists()


def test_a_folder_without_a_table_says_what_it_needs(tmp_path):
    with pytest.raises(ConfigError, match="has no sections.csv; give a CSV with columns file"):
        read_tma_table(tmp_path)


def test_squares_go_where_the_tissue_is_and_never_overlap():
    mask = np.zeros((40, 60), bool)
    mask[5:25, 5:25] = True  # a 20 x 20 block of tissue
    mask[10:30, 40:55] = True  # a 20 x 15 block
    squares = place_squares(mask, downsample=4.0, side=40.0, n=10, min_tissue=0.9)
    cells = [(x // 4, y // 4) for x, y, _ in squares]
    assert all(f >= 0.9 for *_, f in squares) and len(squares) == 6  # 2 x 2 + 2 x 1
    for i, (x, y) in enumerate(cells):  # 10 x 10 mask px each, fully on tissue
        assert mask[y : y + 10, x : x + 10].all()
        for x2, y2 in cells[i + 1 :]:
            assert abs(x - x2) >= 10 or abs(y - y2) >= 10
    assert place_squares(mask, 4.0, 400.0, 3, 0.5) == []  # larger than the slide


def _renamed_arrays(synth, tmp_path):
    """The small preset's arrays as a user keeps them: other names, other folders, a table."""
    tma = synth / "tma"
    user = tmp_path / "scans"
    names = {}
    for array, new in (("train", "BR20823"), ("test", "BR20819")):
        (user / new).mkdir(parents=True)
        shutil.copy(tma / array / "array_map.csv", user / new / f"{new}_map.csv")
        for k, path in enumerate(sorted((tma / array).glob("section*.tiff")), start=1):
            target = user / new / f"{new}_slide{k}_{'BM' if k == 1 else 'USC'}.tiff"
            shutil.copy(path, target)
            names[target.name] = (new, "Biomax" if k == 1 else "USC")
    lines = ["file,array,site,array_map,role"]
    for name, (array, site) in sorted(names.items()):
        role = "test" if array == "BR20819" else "train"
        lines.append(f"{array}/{name},{array},{site},{array}/{array}_map.csv,{role}")
    (user / "arrays.csv").write_text("\n".join(lines) + "\n")
    return user / "arrays.csv"


TINY = ["--steps", "4", "--eval-every", "2", "--patch-px", "64", "--out-px", "32"]
TINY += ["--batch-size", "8", "--device", "cpu", "--json"]


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])


@pytest.mark.slow
def test_train_from_a_table_of_renamed_arrays_and_match(synth_small, tmp_path):
    from fpstore.cli.main import cli
    from fpstore.demo import whole_core_px
    from fpstore.encoders.checkpoint import load_checkpoint
    from fpstore.fingerprint.data import load_coreset
    from fpstore.fingerprint.experiment import Sources, match

    table = _renamed_arrays(synth_small, tmp_path)
    model = tmp_path / "fp.pt"
    common = ["--tma", str(table), "--crop-px", "512"]
    runner = CliRunner()
    summary = _json(runner.invoke(cli, ["train-fingerprint", *common, "--out", str(model), *TINY]))
    assert summary["train_cores"] == 18 and summary["n_classes"] == 6
    _, meta = load_checkpoint(model)
    assert meta["data"]["sites"] == ["Biomax", "USC"]  # from the table, not from a manifest
    assert (table.parent / "cores" / "train" / "cores.json").is_file()
    game = _json(runner.invoke(cli, ["match", "--model", str(model), *common, "--json"]))
    assert game["game"] == "tma test array" and game["n_cores"] == 5 and game["crop_px"] == 512
    assert {game["sections"]["left_site"], game["sections"]["right_site"]} == {"Biomax", "USC"}
    # whole cores for the game (the small preset's 320-um cores), cached beside the crops
    whole = match(
        model, Sources(tma=table, crop_px=512), progress=False, game_px=whole_core_px("small")
    )
    assert whole["crop_px"] == 640 and whole["n_cores"] == 5
    assert (table.parent / "cores" / "game-640px" / "test" / "cores.json").is_file()
    assert load_coreset(table.parent / "cores" / "test").half_shape == (512, 256)


def _small_store(synth, tmp_path):
    from fpstore.cohort.cohorts import add_cohort

    store = tmp_path / "store"
    tcga = synth / "tcga"
    add_cohort(
        store,
        "tcga",
        slides=str(tcga / "slides"),
        clinical=tcga / "nationwidechildrens.org_clinical_patient_brca.txt",
    )
    return store


@pytest.mark.slow
def test_train_from_a_cohort_and_from_both_then_match_held_out_patients(synth_small, tmp_path):
    from fpstore.cli.main import cli

    store = _small_store(synth_small, tmp_path)
    runner = CliRunner()
    cohort = ["--cohort", "tcga", "--store", str(store), "--crop-px", "400", "--holdout", "2"]
    model = tmp_path / "cohort.pt"
    summary = _json(runner.invoke(cli, ["train-fingerprint", *cohort, "--out", str(model), *TINY]))
    pseudo = summary["sources"]["cohort"]
    assert pseudo["square_um"] == 200 and pseudo["cores"] >= pseudo["patients_with_cores"] >= 6
    assert (
        summary["holdout_patients"] == 2
        and summary["n_classes"] == pseudo["patients_with_cores"] - 2
    )
    game = _json(runner.invoke(cli, ["match", "--model", str(model), *cohort, "--json"]))
    assert game["game"] == "held-out patients of tcga" and game["n_patients"] == 2
    # TCGA sites are the barcodes' tissue-source sites: one site per patient here, so the
    # right halves are restyled to another site's stains
    assert (
        game["sections"]["restyled"] == game["n_cores"]
        and game["sections"]["cross_site_pairs"] == 0
    )
    assert 0 < game["chance_core"] < 1

    both = tmp_path / "both.pt"
    summary = _json(
        runner.invoke(
            cli,
            [
                "train-fingerprint",
                "--tma",
                str(synth_small / "tma"),
                *cohort[:-2],
                "--out",
                str(both),
                *TINY,
            ],
        )
    )
    assert summary["sources"]["tma"]["train_cores"] == 18 and summary["holdout_patients"] == 0
    assert summary["n_classes"] == 6 + pseudo["patients_with_cores"]


@pytest.mark.slow
def test_cohort_errors_say_what_is_missing(synth_small, tmp_path):
    from fpstore.fingerprint.cyclegan import CYCLEGAN_CONFIGS
    from fpstore.fingerprint.experiment import Sources, training_set
    from fpstore.fingerprint.stain import fit_site_cyclegan

    store = _small_store(synth_small, tmp_path)
    with pytest.raises(TrainingError, match=r"0 of 8 patients have a square of 2000 um"):
        training_set(Sources(store=store, cohort="tcga", crop_px=4000))
    data = training_set(Sources(store=store, cohort="tcga", crop_px=400, holdout=0))
    one_site = data.rows[data.cores.site[data.rows] == data.cores.site[data.rows][0]]
    with pytest.raises(TrainingError, match=r"^CycleGAN needs cores from two sites"):
        fit_site_cyclegan(data.cores, one_site, CYCLEGAN_CONFIGS["demo"])


@pytest.mark.slow
def test_synth_writes_its_arrays_as_a_tma_table(synth_small):
    sections = read_tma_table(synth_small / "tma")
    rows = [(s.array, s.name, s.site, s.role) for s in sections]
    assert rows == [
        ("train", "section1", "A", "train"),
        ("train", "section2", "B", "train"),
        ("train", "section3", "B", "train"),
        ("test", "section1", "A", "test"),
        ("test", "section2", "B", "test"),
    ]
    assert all(s.file.is_file() and s.array_map.name == "array_map.csv" for s in sections)


@pytest.mark.slow
def test_a_folder_that_tma_dearray_wrote_is_a_section(synth_small, tmp_path):
    from fpstore.fingerprint.sources import prepare_tma
    from fpstore.slides.tma import TmaSpec, export_cores

    array = synth_small / "tma" / "test"
    export_cores(
        array / "section1.tiff",
        tmp_path / "dearrayed",
        array_map=array / "array_map.csv",
        spec=TmaSpec(crop_px=600),
    )
    table = tmp_path / "arrays.csv"
    table.write_text(
        "file,array,site,array_map,role\n"
        f"dearrayed,BR1,Biomax,,train\n{array / 'section1.tiff'},BR1b,Biomax,"
        f"{array / 'array_map.csv'},train\n"
    )
    cores = prepare_tma(table, tmp_path / "cache", size=512, progress=False)["train"]
    from_folder, from_slide = cores.section == "dearrayed", cores.section == "section1"
    assert from_folder.sum() == from_slide.sum() == 5
    assert sorted(cores.patient_id[from_folder]) == sorted(cores.patient_id[from_slide])
    # the folder's 600 px crops, centre-cropped to 512: the same pixels as cropping the slide
    a = cores.left[from_folder].astype(int)
    b = cores.left[from_slide].astype(int)
    order_a = np.argsort(cores.core_index[from_folder])
    order_b = np.argsort(cores.core_index[from_slide])
    assert np.abs(a[order_a] - b[order_b]).mean() < 3
