"""The command line as a user meets it: help, version, one-line errors, `--store` before the
command (as with git) or after it."""

import json
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

import fpstore
from fpstore.cli.main import cli
from fpstore.errors import ConfigError, unknown_name


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert fpstore.__version__ in result.output


def test_help_lists_the_pipeline_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("synth", "demo", "cohort", "patches", "extract", "sql", "classify", "report"):
        assert command in result.output, command


def test_help_does_not_import_torch():
    # `fpstore --help` must stay fast: command modules import heavy libraries lazily.
    code = "import sys; from fpstore.cli.main import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fpstore_error_prints_one_line_and_exits_nonzero():
    result = CliRunner().invoke(cli, ["synth", "--preset", "nonsense", "--out", "x"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "nonsense" in result.output


def test_unknown_name_lists_valid_choices():
    error = unknown_name("preset", "huge", ["demo", "small"])
    assert isinstance(error, ConfigError)
    assert "'huge'" in str(error) and "demo, small" in str(error)


CMU = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"


def _leaves(command, path=()):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _leaves(sub, (*path, name))
    else:
        yield path, command


def test_every_store_command_takes_the_store_given_before_the_command(tmp_path):
    before = tmp_path / "before"
    store_commands = 0
    for path, command in _leaves(cli):
        param = next((p for p in command.params if p.name == "store_path"), None)
        if param is None:
            continue
        store_commands += 1
        root = click.Context(cli, obj={"store": str(before)})
        value, _ = param.handle_parse_result(click.Context(command, parent=root), {}, [])
        assert str(value) == str(before), path
        own = {"store_path": str(tmp_path / "own")}  # `<command> --store S` wins
        value, _ = param.handle_parse_result(click.Context(command, parent=root), own, [])
        assert str(value) == str(tmp_path / "own"), path
    assert store_commands >= 12


def test_store_before_and_after_the_command_on_a_small_store(tmp_path, blank_tiff):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "S1.svs").symlink_to(CMU)
    (folder / "stray.svs").symlink_to(CMU)  # a slide without a patient
    blank_tiff.rename(folder / "blank.tiff")  # a scan of bare glass
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,slide,ER\nP1,S1.svs,Positive\nP2,blank.tiff,Negative\n")
    store = str(tmp_path / "store")
    run = CliRunner().invoke

    added = run(
        cli,
        ["--store", store, "cohort", "add", "c", "--format", "csv", "--clinical", str(labels)]
        + ["--slides", str(folder)],
    )
    assert added.exit_code == 0, added.output
    assert (
        "slides without patients: 1" in run(cli, ["--store", store, "cohort", "show", "c"]).output
    )
    extracted = run(
        cli,
        ["--store", store, "extract", "--cohort", "c", "--encoder", "random-resnet34"]
        + ["--patches", "3", "--min-tissue", "0.5", "--device", "cpu", "--workers", "0", "--json"],
    )
    assert extracted.exit_code == 1  # the blank slide, and only it
    summary = json.loads(extracted.stdout)
    assert (summary["ok"], summary["no_patient"], summary["failed"]) == (1, 1, 1)
    failed = next(r for r in summary["slides"] if r["status"] == "failed")
    assert failed["slide_id"] == "blank" and "no tissue found" in failed["error"]
    assert "--min-tissue" in failed["error"]
    query = "SELECT slide_id, status FROM slides ORDER BY slide_id"
    expected = ["slide_id,status", "S1,ok", "blank,failed", "stray,"]
    rows = run(cli, ["--store", store, "sql", query, "--format", "csv"])
    assert rows.exit_code == 0 and rows.output.splitlines() == expected
    wrong = str(tmp_path / "elsewhere")
    after = run(cli, ["--store", wrong, "sql", query, "--format", "csv", "--store", store])
    assert after.output.splitlines() == expected  # the command's own --store wins
    over_env = run(cli, ["--store", store, "sql", query], env={"FPSTORE_STORE": wrong})
    assert over_env.exit_code == 0 and "blank" in over_env.output
    from_env = run(cli, ["sql", query], env={"FPSTORE_STORE": store})
    assert from_env.exit_code == 0 and "blank" in from_env.output
    url = run(cli, ["--store", "s3://bucket/fp", "similar", "--patch", "S1/0_0_224"])
    assert url.exit_code == 2 and "needs a local store folder" in url.output
    # Commands that keep no store accept it and ignore it, as they ignore $FPSTORE_STORE.
    preview = run(cli, ["--store", store, "patches", str(CMU), "--out", str(tmp_path / "p")])
    assert preview.exit_code == 0, preview.output


def _one_cohort_store(tmp_path, tissue: bool):
    from tests._classify_store import add_cohort

    store = tmp_path / "store"
    add_cohort(store, "tcga", 40, seed=3, tissue=tissue, her2=True)
    return store


def test_classify_as_the_design_card_types_it_in_a_store_of_one_cohort(tmp_path):
    store = _one_cohort_store(tmp_path, tissue=True)
    args = ["--store", str(store), "classify", "--marker", "Her2", "--pool", "epithelium"]
    result = CliRunner().invoke(cli, args + ["--n-boot", "200", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["config"]["cohort"] == "tcga"


def test_a_pool_without_tissue_types_names_tissue_predict_in_one_line(tmp_path):
    store = _one_cohort_store(tmp_path, tissue=False)
    args = ["--store", str(store), "classify", "--marker", "ER", "--pool", "epithelium"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(
        "error: cohort 'tcga' has no tissue types for this pool and the label-free rules typed "
        "none of its slides ("
    )
    assert lines[-1].endswith("run `fpstore tissue predict --cohort tcga`, or use --pool all")


def test_the_design_card_command_types_tissue_with_the_rules_when_the_store_has_none(tmp_path):
    from fpstore.store.tissue import read_tissue_types
    from tests._classify_store import add_cohort

    store = tmp_path / "store"
    slide = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"
    add_cohort(
        store, "tcga", 40, seed=3, tissue=False, her2=True, slide_path=str(slide), slide_y=1344
    )
    args = ["--store", str(store), "classify", "--marker", "Her2", "--pool", "epithelium"]
    result = CliRunner().invoke(cli, args + ["--n-boot", "200", "--json"])
    assert result.exit_code == 0, result.output
    assert "typing its patches with the label-free rules" in result.stderr
    types = read_tissue_types(store, "tcga")
    assert types is not None and types.num_rows == 39 * 8
    notes = json.loads(result.stdout)["notes"]
    assert notes == [
        "typed the tissue of cohort 'tcga' with the label-free rules (312 patches of 39 slides)"
    ]


def test_a_stored_fingerprint_tissue_model_types_the_cohort_when_a_pool_needs_it(tmp_path):
    import numpy as np

    from fpstore.store.layout import StoreLayout
    from fpstore.store.tissue import read_tissue_types
    from fpstore.tissue.trained import TissueTrainConfig, fit_tissue_model

    store = _one_cohort_store(tmp_path, tissue=False)
    rng = np.random.default_rng(0)
    model = fit_tissue_model(
        rng.normal(size=(80, 8)),
        np.repeat([1, 2], 40),
        TissueTrainConfig(),
        {"encoder": {"id": "enc"}},
    )
    model.save(StoreLayout(store).tissue_model_file("fingerprint-logreg"))
    args = ["--store", str(store), "classify", "--marker", "ER", "--pool", "epithelium"]
    result = CliRunner().invoke(cli, args + ["--n-boot", "200"])
    assert result.exit_code == 0, result.output
    assert "note: typed the tissue of cohort 'tcga' with the stored fingerprint-logreg" in (
        result.output
    )
    assert read_tissue_types(store, "tcga").num_rows > 0


def test_a_store_of_several_cohorts_asks_which_one(tmp_path):
    from tests._classify_store import add_cohort

    store = _one_cohort_store(tmp_path, tissue=True)
    add_cohort(store, "abctb", 12, seed=4, tissue=True)
    result = CliRunner().invoke(cli, ["--store", str(store), "classify", "--marker", "ER"])
    assert result.exit_code == 1
    assert "pass --cohort" in result.output and "abctb, tcga" in result.output


def test_compare_with_a_tissue_pool_types_tissue_with_the_rules_when_the_store_has_none(tmp_path):
    from tests._classify_store import add_cohort

    store = tmp_path / "store"
    slide = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"
    add_cohort(store, "tcga", 40, seed=3, tissue=False, slide_path=str(slide), slide_y=1344)
    args = ["--store", str(store), "compare", "--marker", "ER", "--pools", "all,epithelium"]
    result = CliRunner().invoke(cli, args + ["--methods", "logreg", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [r["pool"] for r in document["rows"]] == ["all", "epithelium"]
    assert document["notes"][0].startswith("typed the tissue of cohort 'tcga' with the label-free")
