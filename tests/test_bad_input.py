"""Every bad input is one line (issue 23, item 4): damaged model files, a clinical table with a
50 MB field or a NUL byte, a store that is a file, a FIFO or /dev/zero given as a slide, a
cohort with no usable slide, ``--store file:///abs/path``, and garbage in each file argument."""

import os
import re
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fpstore.cli.main import cli
from fpstore.errors import StoreError
from fpstore.tissue.trained import TissueModel, TissueTrainConfig, fit_tissue_model


def one_line_error(args, code=1):
    """Run ``fpstore ARGS``; its one line on stderr besides progress bars (no traceback, no
    bare "Aborted!")."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    progress = re.compile(r"\d+%\|")  # tqdm's bars share stderr
    lines = [x for x in re.split(r"[\r\n]+", result.stderr) if x.strip() and not progress.search(x)]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.stderr and "Aborted" not in result.stderr, result.stderr
    assert result.exit_code == code and len(lines) == 1, (result.exit_code, result.stderr)
    return lines[0]


def damage(path: Path, how: str) -> None:
    """Damage an npz file: cut in half, emptied, an array dropped, an array reshaped."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        key = next(k for k in sorted(arrays) if k != "meta" and arrays[k].ndim >= 1)
        if how == "missing":
            arrays.pop(key)
        else:
            arrays[key] = arrays[key].reshape(-1)[: max(1, arrays[key].size // 2)]
        path.unlink()
        np.savez(path, **arrays)


def huge_header_tiff(path, size=1_000_000, tile=4096, mpp=None):
    """A tiled RGB TIFF whose header declares size x size px, every tile the same few kB of
    deflated glass (all tile offsets point at one copy): a few MB on disk."""
    across = -(-size // tile)
    n = across * across
    data = zlib.compress(np.full((tile, tile, 3), 242, np.uint8).tobytes(), 9)
    entries = []  # (tag, type, count, value bytes)
    SHORT, LONG, RATIONAL = 3, 4, 5

    def add(tag, typ, values):
        fmt = {SHORT: "H", LONG: "I"}.get(typ)
        raw = (
            struct.pack(f"<{len(values)}{fmt}", *values)
            if fmt
            else b"".join(struct.pack("<II", *v) for v in values)
        )
        entries.append((tag, typ, len(values), raw))

    add(256, LONG, [size])
    add(257, LONG, [size])
    add(258, SHORT, [8, 8, 8])
    add(259, SHORT, [8])
    add(262, SHORT, [2])
    add(277, SHORT, [3])
    add(284, SHORT, [1])
    if mpp:
        add(282, RATIONAL, [(int(1e4 / mpp), 1)])
        add(283, RATIONAL, [(int(1e4 / mpp), 1)])
        add(296, SHORT, [3])
    add(322, LONG, [tile])
    add(323, LONG, [tile])
    data_at = 8
    add(324, LONG, [data_at] * n)
    add(325, LONG, [len(data)] * n)
    entries.sort()
    ifd_at = data_at + len(data) + (len(data) % 2)
    extra_at = ifd_at + 2 + 12 * len(entries) + 4
    ifd, extra = struct.pack("<H", len(entries)), b""
    for tag, typ, count, raw in entries:
        if len(raw) <= 4:
            ifd += struct.pack("<HHI", tag, typ, count) + raw.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, typ, count, extra_at + len(extra))
            extra += raw + (b"\0" if len(raw) % 2 else b"")
    ifd += struct.pack("<I", 0)
    with open(path, "wb") as f:
        f.write(b"II*\0" + struct.pack("<I", ifd_at) + data + b"\0" * (len(data) % 2) + ifd + extra)
    return path


DAMAGE = ["truncated", "empty", "missing", "reshaped"]


@pytest.fixture(scope="module")
def classify_model(tmp_path_factory):
    """A store with a cohort and a MIL model trained on it (3 folds, early stopped)."""
    from fpstore.classify.pipeline import ClassifyConfig, classify
    from tests._classify_store import add_cohort
    from tests.test_classify_predict import FAST, META

    store = tmp_path_factory.mktemp("bad-model")
    add_cohort(store, "train", 40, seed=1, tissue=False, metadata=META)
    cfg = ClassifyConfig(
        marker="ER", cohort="train", encoder="enc", n_boot=100, classifier=FAST, folds=3
    )
    document = classify(store, cfg, progress=False)
    return store, store / "models" / "classify" / document["model"]["model_id"]


@pytest.mark.parametrize("how", DAMAGE)
def test_predict_with_a_damaged_model_file_is_one_line(classify_model, tmp_path, how):
    store, folder = classify_model
    copy = shutil.copytree(folder, tmp_path / "model")
    damage(copy / "final.npz", how)
    line = one_line_error(["predict", "--store", store, "--model", copy, "--cohort", "train"])
    assert "final" in line and str(copy) in line


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("method", ["fingerprint-logreg", "fingerprint-knn"])
def test_a_damaged_tissue_model_is_refused_on_load_in_one_line(tmp_path, how, method):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 8)).astype(np.float32), np.repeat([1, 2], 30)
    path = fit_tissue_model(X, y, TissueTrainConfig(method=method, pca_dim=4, k=3)).save(
        tmp_path / "m.npz"
    )
    TissueModel.load(path)
    damage(path, how)
    with pytest.raises(StoreError, match="m.npz") as error:
        TissueModel.load(path)
    assert "\n" not in str(error.value)
    line = one_line_error(
        ["tissue", "predict", "--store", tmp_path / "s", "--model", path, "--method", method]
    )
    assert "m.npz" in line or "store" in line


def labels_csv(path: Path, rows: str) -> Path:
    path.write_text("patient_id,slide,ER\n" + rows)
    return path


def test_a_clinical_table_with_a_50mb_field_is_one_line(tmp_path):
    table = labels_csv(tmp_path / "big.csv", "P1,a.svs," + "x" * 50_000_000 + "\n")
    args = ["cohort", "add", "c", "--store", tmp_path / "s", "--format", "csv"]
    line = one_line_error(args + ["--clinical", table])
    assert "big.csv' line 2" in line and "field" in line
    assert not (tmp_path / "s" / "cohorts").exists()


def test_a_nul_byte_in_a_patient_id_is_refused(tmp_path):
    table = labels_csv(tmp_path / "nul.csv", "P1,a.svs,Positive\nP\x002,b.svs,Negative\n")
    args = ["cohort", "add", "c", "--store", tmp_path / "s", "--format", "csv"]
    line = one_line_error(args + ["--clinical", table])
    assert "nul.csv' line 3 holds a NUL byte" in line


def test_a_store_that_is_a_regular_file_is_one_line(tmp_path):
    regular = tmp_path / "store"
    regular.write_text("not a store")
    table = labels_csv(tmp_path / "t.csv", "P1,a.svs,Positive\n")
    for args in (
        ["cohort", "add", "c", "--store", regular, "--format", "csv", "--clinical", table],
        ["cohort", "list", "--store", regular],
        ["sql", "--store", regular, "SELECT 1"],
    ):
        assert "is a file, not a folder" in one_line_error(args)
    assert regular.read_text() == "not a store"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_or_dev_zero_as_a_slide_is_named_as_such_and_nothing_is_written(tmp_path):
    from fpstore.cohort.cohorts import add_cohort
    from fpstore.errors import CohortError, SlideError
    from fpstore.slides.slide import open_slide

    fifo = tmp_path / "fifo.svs"
    os.mkfifo(fifo)
    with pytest.raises(SlideError, match="not a regular file"):
        open_slide(fifo, mpp=0.5)  # opening it would block forever
    table = labels_csv(tmp_path / "t.csv", f"P1,{fifo},Positive\nP2,/dev/zero,Negative\n")
    with pytest.raises(CohortError, match=r"none of the 2 listed slide\(s\).*FIFO") as error:
        add_cohort(tmp_path / "s", "c", clinical=table, fmt="csv")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "s" / "cohorts" / "c").exists()  # a corrected rerun needs no --force


def test_a_cohort_with_some_usable_slides_is_still_written(tmp_path):
    from fpstore.cohort.cohorts import add_cohort
    from tests.test_extract import CMU

    table = labels_csv(tmp_path / "t.csv", f"P1,{CMU},Positive\nP2,/dev/zero,Negative\n")
    summary = add_cohort(tmp_path / "s", "c", clinical=table, fmt="csv")
    assert summary.n_slides == 1 and "device" in summary.problems[0]["problem"]


def test_store_as_a_file_url_is_the_absolute_path(tmp_path):
    from tests.test_extract import CMU

    table = labels_csv(tmp_path / "t.csv", f"P1,{CMU},Positive\n")
    url = f"file://{tmp_path}/s"
    runner = CliRunner()
    added = runner.invoke(
        cli, ["cohort", "add", "c", "--store", url, "--format", "csv", "--clinical", str(table)]
    )
    assert added.exit_code == 0, added.output
    assert (tmp_path / "s" / "cohorts" / "c").is_dir()
    assert not Path("file:").exists()
    for args in (["cohort", "list"], ["models", "list"], ["sql", "SELECT count(*) FROM labels"]):
        result = runner.invoke(cli, args + ["--store", url])
        assert result.exit_code == 0 and "file:" not in result.output, result.output
    assert "c" in runner.invoke(cli, ["cohort", "list", "--store", url]).output


@pytest.mark.parametrize("override", [True, False])
def test_a_tiff_declaring_a_million_pixels_square_is_refused_by_its_area(tmp_path, override):
    """250 x 250 mm at 0.25 um/px passes the length check (300 mm); no slide has that much
    glass. ``cohort add --validate`` refuses it, and extract fails it in seconds."""
    from fpstore.errors import SlideError
    from fpstore.extract.run import extract
    from fpstore.slides.slide import open_slide
    from tests.test_extract import config

    slide = huge_header_tiff(tmp_path / "huge.tiff", mpp=None if override else 0.25)
    assert slide.stat().st_size < 2_000_000
    with pytest.raises(SlideError, match="62,500 mm\\^2"):
        open_slide(slide, mpp=0.25 if override else None)
    table = labels_csv(tmp_path / "t.csv", f"P1,{slide},Positive\n")
    overrides = tmp_path / "mpp.csv"
    overrides.write_text("slide,mpp\nhuge,0.25\n")
    args = ["cohort", "add", "c", "--store", tmp_path / "s", "--format", "csv"]
    args += ["--clinical", table] + (["--mpp-overrides", overrides] if override else [])
    assert "62,500 mm^2" in one_line_error(args + ["--validate"])
    assert CliRunner().invoke(cli, [str(a) for a in args]).exit_code == 0
    start = time.monotonic()
    summary = extract(tmp_path / "s", "c", config(patches=8), progress=False)
    assert "62,500 mm^2" in summary.failed[0].error
    assert time.monotonic() - start < 60


def test_a_failed_predict_slides_leaves_no_cohort_registered(classify_model, tmp_path):
    from fpstore.store.cohorts import cohort_names

    store, folder = classify_model
    before = cohort_names(store)
    scan = tmp_path / "new.svs"
    scan.write_bytes(b"not a slide" * 100)
    line = one_line_error(["predict", "--store", store, "--model", folder, "--slides", scan])
    assert "does not say how to build encoder" in line
    assert cohort_names(store) == before


# Every command that reads a file, with garbage in one file argument at a time; {g} is a file of
# random bytes with the suffix that argument expects, {store} a store with one real slide.
GARBAGE_CALLS = [
    ("cohort add c2 --store {store} --format csv --clinical {g}", ".csv"),
    ("cohort add c2 --store {store} --format tcga --clinical {g} --slides {g}", ".txt"),
    ("cohort add c2 --store {store} --slides {g} --validate", ".svs"),
    ("cohort add c2 --store {store} --format csv --clinical {labels} --mpp-overrides {g}", ".csv"),
    ("cohort add c2 --store {g} --format csv --clinical {labels}", ""),
    ("cohort list --store {g}", ""),
    ("cohort show c --store {g}", ""),
    ("extract --store {store} --cohort c --encoder fingerprint --checkpoint {g}", ".pt"),
    ("extract --store {store} --cohort c --encoder resnet18 --weights {g}", ".pth"),
    (
        "extract --store {store} --cohort c --encoder tiny --stain-norm macenko --stain-target {g}",
        ".png",
    ),
    ("extract --store {g} --cohort c", ""),
    ("classify --store {g} --marker ER", ""),
    ("compare --store {g} --marker ER", ""),
    ("match --model {g} --tma {tma}", ".pt"),
    ("core-maps --model {g} --tma {tma} --out {out}", ".pt"),
    ("models list --store {g}", ""),
    ("models show m1 --store {g}", ""),
    ("patches {g} --out {out}", ".svs"),
    ("patches {g} --out {out}", ".tiff"),
    ("patches {g} --out {out}", ".png"),
    ("predict --store {store} --model {g} --cohort c", ".npz"),
    ("predict --store {store} --model {gdir} --cohort c", ""),
    ("sql --store {g} SELECT\x001", ""),
    ("heatmap --store {g} --run r", ""),
    ("report --store {g} --run r --out {out}", ""),
    ("tissue predict --store {store} --cohort c --model {g}", ".npz"),
    ("tissue train --store {store} --cohort c --tiles {g} --truth {g}", ".png"),
    ("tissue evaluate --store {store} --cohort c --truth {g}", ".json"),
    ("tma dearray {g} --out {out}", ".svs"),
    ("tma dearray {g} --out {out}", ".png"),
    ("tma dearray {slide} --out {out} --array-map {g}", ".csv"),
]


@pytest.fixture(scope="module")
def garbage_store(tmp_path_factory):
    from tests.test_store_promises import make_store

    root = tmp_path_factory.mktemp("garbage")
    store, labels = make_store(root, ["S0"])
    return store, labels


@pytest.mark.parametrize(
    "call,suffix", GARBAGE_CALLS, ids=[c[0].split(" --")[0] + c[1] for c in GARBAGE_CALLS]
)
def test_every_command_says_garbage_in_one_line(garbage_store, tmp_path, call, suffix):
    from tests.test_extract import CMU

    store, labels = garbage_store
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    gdir = tmp_path / "model-folder"
    gdir.mkdir()
    (gdir / "card.json").write_bytes(np.random.default_rng(1).bytes(512))
    (gdir / "final.npz").write_bytes(np.random.default_rng(2).bytes(512))
    fields = {
        "g": garbage,
        "gdir": gdir,
        "store": store,
        "labels": labels,
        "tma": tmp_path / "no-tma",
        "out": tmp_path / "out",
        "slide": CMU,
    }
    args = [part.format(**fields) for part in call.replace("\x00", "\x01").split(" ")]
    args = [a.replace("\x01", " ") for a in args]
    result = CliRunner().invoke(cli, args)
    progress = re.compile(r"\d+%\|")
    lines = [x for x in re.split(r"[\r\n]+", result.stderr) if x.strip() and not progress.search(x)]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.stderr and "Aborted" not in result.stderr, result.stderr
    assert result.exit_code in (1, 2), (result.exit_code, result.output)
    errors = [x for x in lines if x.lower().startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # notes may come first
