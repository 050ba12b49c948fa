"""The store's promises under a second process, kill -9, --force, cohort changes, bad input.

Each test reproduces a finding of issue 15 on real slides (copies of CMU-1-Small-Region) with
a one-conv encoder slowed down per batch, so that runs overlap and can be killed mid-way.
"""

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

import fpstore.store
from fpstore.cli.main import cli
from fpstore.cohort.cohorts import add_cohort
from fpstore.errors import CohortError, ConfigError, SlideError, StoreError
from fpstore.extract.run import extract
from fpstore.slides.slide import load_mpp_overrides, open_slide
from fpstore.store.fingerprints import partition_settings
from fpstore.store.schema import read_metadata
from tests._extraction import CMU, SLIDES, config, make_store, start_extraction


def files(store, encoder="tiny"):
    return sorted((store / "fingerprints" / f"encoder={encoder}" / "cohort=c").glob("*.parquet"))


def summary_of(proc, timeout=300) -> tuple[int, dict]:
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert lines, err
    return proc.returncode, json.loads(lines[-1])


def wait_for_files(store, n, proc, limit=120):
    deadline = time.time() + limit
    while len(files(store)) < n and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)


def stored_seed(store, slide):
    return read_metadata(pq.read_schema(files_by_slide(store)[slide]))["seed"]


def files_by_slide(store):
    return {p.stem: p for p in files(store)}


def test_two_runs_with_different_settings_never_count_the_other_settings_as_done(tmp_path):
    store, _ = make_store(tmp_path)
    # Interleaved for sure: both runs plan before either writes (each holds its first batch
    # at the gate until both are there), so each writes some of the slides with its own seed.
    gate = tmp_path / "gate"
    procs = [
        start_extraction(tmp_path, store, f"seed{s}", seed=s, patches=8, batch_size=8, gate=gate)
        for s in (0, 1)
    ]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("gate.*"))) < 2 and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    gate.touch()
    results = [summary_of(p) for p in procs]
    for seed, (_, summary) in enumerate(results):
        for row in summary["slides"]:
            if row["status"] in ("ok", "skipped", "elsewhere"):
                assert stored_seed(store, row["slide_id"]) == str(seed), row
    assert len(files(store)) == len(SLIDES)
    assert {stored_seed(store, s) for s in files_by_slide(store)} == {"0", "1"}
    # Each run found the other's slides and says so; readers refuse the mix.
    assert all(code != 0 for code, _ in results)
    with pytest.raises(StoreError, match="2 sets of settings.*--force"):
        fpstore.store.open(store)
    assert not list(store.rglob("*.tmp"))


@pytest.mark.parametrize("attempt", range(3))
def test_a_survivor_takes_over_the_slides_of_a_run_killed_at_a_random_moment(tmp_path, attempt):
    store, _ = make_store(tmp_path)
    victim = start_extraction(tmp_path, store, "victim")
    survivor = start_extraction(tmp_path, store, "survivor")
    wait_for_files(store, 1, victim)
    time.sleep(random.Random(attempt).uniform(0.0, 1.5))
    victim.kill()
    victim.wait()
    code, summary = summary_of(survivor)
    assert code == 0, summary
    status = {row["slide_id"]: row["status"] for row in summary["slides"]}
    assert set(status.values()) <= {"ok", "elsewhere"}
    assert sorted(files_by_slide(store)) == SLIDES  # nothing the dead run claimed is missing
    for path in files(store):  # every file whole, one per slide
        table = pq.read_table(path)
        assert table.num_rows == int(read_metadata(table.schema)["n_patches"]) > 0
    assert not list(store.rglob("*.tmp"))


def test_a_killed_force_run_leaves_a_mix_that_readers_refuse_until_repaired(tmp_path):
    store, _ = make_store(tmp_path)
    assert not extract(store, "c", config(patches=8), progress=False).failed
    # One slide per batch and a slow encoder: seconds pass between two slides' writes.
    forced = start_extraction(
        tmp_path, store, "forced", delay=1.5, patches=4, force=True, batch_size=4
    )
    deadline = time.time() + 120
    mixed = False
    while time.time() < deadline and forced.poll() is None and not mixed:
        mixed = {read_metadata(pq.read_schema(p))["patches"] for p in files(store)} == {"4", "8"}
        time.sleep(0.05)
    forced.kill()
    forced.wait()
    assert mixed, "the forced run never left old and new files side by side"
    with pytest.raises(StoreError, match=r"slide\(s\) with patches=4.*--force") as info:
        fpstore.store.open(store)
    assert "patches=8" in str(info.value)
    result = CliRunner().invoke(cli, ["sql", "--store", str(store), "SELECT 1"])
    assert result.exit_code != 0 and "sets of settings" in result.output
    repaired = extract(store, "c", config(patches=4, force=True), progress=False)
    assert not repaired.failed
    assert partition_settings(store, "tiny", "c")["patches"] == "4"


def test_cohort_add_force_waits_for_no_one_and_removes_what_dropped_slides_left(tmp_path):
    store, labels = make_store(tmp_path)
    running = start_extraction(tmp_path, store, "running", delay=0.3)
    wait_for_files(store, 1, running)
    with pytest.raises(CohortError, match="being extracted"):
        add_cohort(store, "c", clinical=labels, fmt="csv", force=True)
    assert summary_of(running)[0] == 0
    # Re-added with two of its six slides: their fingerprints and status stay, the rest go.
    kept = SLIDES[:2]
    fewer = tmp_path / "fewer.csv"
    fewer.write_text("".join(labels.read_text().splitlines(True)[: len(kept) + 1]))
    summary = add_cohort(store, "c", clinical=fewer, fmt="csv", force=True)
    assert summary.removed["fingerprints"] == len(SLIDES) - len(kept)
    assert sorted(files_by_slide(store)) == kept
    with fpstore.store.open(store) as fs:
        rows = fs.sql("SELECT DISTINCT slide_id FROM patches ORDER BY 1").rows()
        assert [r["slide_id"] for r in rows] == kept
        statuses = fs.sql("SELECT slide_id FROM slides WHERE status IS NOT NULL").rows()
        assert sorted(r["slide_id"] for r in statuses) == kept


@pytest.mark.parametrize(
    "statement",
    [
        "COPY (SELECT 1) TO '{outside}/x.csv'",
        "COPY (SELECT * FROM patches) TO '{store}/fingerprints/encoder=tiny/cohort=c/z.parquet'",
        "ATTACH '{outside}/x.db'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "CREATE TABLE t AS SELECT 1",
        "SELECT 1; DROP VIEW patches",
    ],
)
def test_sql_refuses_every_statement_that_writes(tmp_path, statement):
    store, _ = make_store(tmp_path, SLIDES[:1])
    outside = tmp_path / "outside"
    outside.mkdir()
    text = statement.format(outside=outside, store=store)
    result = CliRunner().invoke(cli, ["sql", "--store", str(store), text])
    assert result.exit_code == 1 and "not allowed" in result.output, result.output
    assert not list(outside.iterdir())
    assert not (store / "fingerprints").exists()


def test_sql_reads_the_store_only(tmp_path):
    store, labels = make_store(tmp_path, SLIDES[:1])
    runner = CliRunner()
    outside = runner.invoke(cli, ["sql", "--store", str(store), f"SELECT * FROM '{labels}'"])
    assert outside.exit_code == 1 and "Permission" in outside.output
    inside = runner.invoke(
        cli,
        ["sql", "--store", str(store), f"SELECT count(*) AS n FROM '{store}/cohorts/c/*.parquet'"],
    )
    assert inside.exit_code == 0, inside.output


def test_a_truncated_fingerprint_file_is_named_by_readers_and_repaired_by_extract(tmp_path):
    store, _ = make_store(tmp_path, SLIDES[:3])
    extract(store, "c", config(patches=8), progress=False)
    broken = files(store)[1]
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(StoreError, match=f"corrupt.*{broken.name}"):
        fpstore.store.open(store)
    result = CliRunner().invoke(
        cli, ["classify", "--store", str(store), "--marker", "ER", "--cohort", "c"]
    )
    assert result.exit_code != 0 and "corrupt" in result.output
    assert "Traceback" not in result.output
    repaired = extract(store, "c", config(patches=8), progress=False)  # no --force needed
    assert {r.slide_id: r.status for r in repaired.slides}[broken.stem] == "ok"
    assert pq.read_table(broken).num_rows > 0


def test_a_foreign_file_is_reported_as_foreign(tmp_path):
    store, _ = make_store(tmp_path, SLIDES[:2])
    extract(store, "c", config(patches=8), progress=False)
    foreign = files(store)[0]
    pq.write_table(pq.read_table(foreign).drop_columns(["fingerprint"]), foreign)
    with pytest.raises(StoreError, match="not fpstore's"):
        fpstore.store.open(store)
    summary = extract(store, "c", config(patches=8), progress=False)
    assert "without fpstore's fingerprint metadata" in summary.failed[0].error


@pytest.mark.parametrize("mpp", [1000, 0.001, 25.0, float("nan")])
def test_implausible_mpp_is_refused_in_one_line_naming_the_range(tmp_path, mpp):
    with pytest.raises(ConfigError, match=r"plausible range 0\.05-20 um/px"):
        open_slide(CMU, mpp=mpp)
    overrides = tmp_path / "mpp.csv"
    overrides.write_text(f"slide,mpp\nS0,{mpp}\n")
    with pytest.raises(ConfigError, match="mpp.csv line 2"):
        load_mpp_overrides(overrides)
    store_labels = make_store(tmp_path, SLIDES[:1])[1]
    result = CliRunner().invoke(
        cli,
        ["cohort", "add", "x", "--store", str(tmp_path / "s2"), "--format", "csv"]
        + ["--clinical", str(store_labels), "--mpp-overrides", str(overrides)],
    )
    assert result.exit_code != 0 and "plausible range" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_slide_larger_than_any_glass_slide_has_a_wrong_mpp(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (16000, 8), "white").save(strip)
    assert open_slide(strip, mpp=18.0).info.width == 16000  # 288 mm: a long whole mount
    with pytest.raises(SlideError, match="320 mm long, larger than any glass slide"):
        open_slide(strip, mpp=20.0)


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    return done.returncode == 0


def test_a_full_disk_ends_in_one_line_and_loses_nothing(tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "4m"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount)")
    try:
        store, labels = make_store(disk, SLIDES[:3])
        extract(store, "c", config(patches=8), progress=False)
        add_cohort(store, "d", clinical=labels, fmt="csv")
        before = {p.name: p.read_bytes() for p in files(store)}
        with open(disk / "filler", "wb") as filler:  # take every byte that is left
            try:
                while True:
                    filler.write(b"\0" * (1 << 16))
                    filler.flush()
            except OSError as error:
                assert error.errno == errno.ENOSPC
        result = subprocess.run(
            [sys.executable, "-m", "fpstore.cli.main", "extract", "--cohort", "d", "--store"]
            + [str(store), "--encoder", "random-resnet34", "--patches", "2", "--device", "cpu"]
            + ["--workers", "0", "--json"],
            capture_output=True,
            text=True,
        )
        assert result.returncode != 0
        assert "No space left on device" in result.stderr + result.stdout
        assert "Traceback" not in result.stderr, result.stderr
        assert {p.name: p.read_bytes() for p in files(store)} == before
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_slides_claim_holder_clears_what_a_killed_writer_left(tmp_path):
    store, _ = make_store(tmp_path, slides=["S0"])
    status = store / "status" / "encoder=tiny" / "cohort=c"
    fingerprints = store / "fingerprints" / "encoder=tiny" / "cohort=c"
    leftovers = [status / ".S0.json.k1ll3d.tmp", fingerprints / ".S0.parquet.k1ll3d.tmp"]
    unrelated = status / ".S10.json.k1ll3d.tmp"  # another slide's, whose claim we never took
    for path in [*leftovers, unrelated]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    (status / ".S0.lock").write_text("host 4242\n")  # its claim, as kill -9 leaves it
    assert not extract(store, "c", config(patches=4), progress=False).failed
    assert not any(p.exists() for p in leftovers) and unrelated.exists()
