"""`fpstore sql` can only read and cannot exhaust (issue 23, item 3): statements nested in
EXPLAIN are checked, DuckDB's temporary folder is private, memory, threads and time are bounded,
and rows are streamed out. Each test reproduces a finding on a store of real slides."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fpstore.cli.main import cli
from fpstore.extract.run import extract
from fpstore.store.sql import SqlLimits, machine_cores, machine_memory
from tests.test_extract import config
from tests.test_store_promises import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Two real slides, 8 patches each, extracted with the one-conv encoder."""
    root = tmp_path_factory.mktemp("sqlstore")
    store, _ = make_store(root, ["S0", "S1"])
    extract(store, "c", config(patches=8), progress=False)
    card = store / "models" / "classify" / "m1" / "card.json"
    card.parent.mkdir(parents=True)
    card.write_text('{"model_id": "m1"}')
    return store


PROBE = """
import json, resource, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
lines, head, tail = 0, b"", b""
for chunk in iter(lambda: p.stdout.read(1 << 16), b""):
    lines += chunk.count(b"\\n")
    head = (head + chunk)[:2000] if len(head) < 2000 else head
    tail = (tail + chunk)[-2000:]
sys.stderr.write(p.stderr.read().decode())
p.wait()
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
print(json.dumps({"lines": lines, "head": head.decode(), "tail": tail.decode(), "peak": peak}))
sys.exit(p.returncode)
"""


def fpstore_cli(*args, timeout=120):
    """``fpstore ARGS`` in a child process, its output counted as it comes: (exit code, stderr
    lines, {lines, head, tail of stdout, peak: its peak RSS in MB})."""
    fpstore = [sys.executable, "-m", "fpstore.cli.main"]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *fpstore, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.returncode, result.stderr.splitlines(), json.loads(result.stdout)


def fingerprint_file(store: Path) -> Path:
    return sorted(store.glob("fingerprints/encoder=tiny/cohort=c/*.parquet"))[0]


@pytest.mark.parametrize(
    "statement",
    [
        "EXPLAIN ANALYZE COPY (SELECT 1 AS junk) TO '{target}' (FORMAT parquet)",
        "explain analyse copy (select 1 as junk) to '{target}' (format parquet)",
        "EXPLAIN (ANALYZE) COPY (SELECT 1 AS junk) TO '{target}' (FORMAT parquet)",
        "EXPLAIN (FORMAT json, ANALYZE true) COPY (SELECT 1 AS junk) TO '{target}'",
        "/* c */ EXPLAIN /* c */ ANALYZE COPY (SELECT 1 AS junk) TO '{target}'",
        "SELECT 1; EXPLAIN ANALYZE COPY (SELECT 1 AS junk) TO '{target}'",
        "EXPLAIN COPY (SELECT 1 AS junk) TO '{target}'",
    ],
)
@pytest.mark.parametrize("target", ["fingerprint", "card"])
def test_sql_refuses_what_explain_wraps_unless_it_only_reads(store, statement, target):
    path = (
        fingerprint_file(store)
        if target == "fingerprint"
        else store / "models/classify/m1/card.json"
    )
    before = path.read_bytes()
    text = statement.format(target=path)
    result = CliRunner().invoke(cli, ["sql", "--store", str(store), text])
    assert result.exit_code == 1 and "not allowed" in result.output, result.output
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "statement", ["EXPLAIN SELECT count(*) FROM patches", "EXPLAIN (FORMAT json) SELECT 1"]
)
def test_sql_still_explains_a_select(store, statement):
    result = CliRunner().invoke(cli, ["sql", "--store", str(store), statement, "--format", "csv"])
    assert result.exit_code == 0 and "physical_plan" in result.output, result.output


@pytest.mark.parametrize(
    "query", ["SELECT content FROM read_text('.tmp/secret.txt')", "SELECT * FROM glob('.tmp/*')"]
)
def test_sql_cannot_read_the_current_folders_tmp(store, tmp_path, monkeypatch, query):
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.txt").write_text("the secret")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["sql", "--store", str(store), query, "--format", "csv"])
    assert result.exit_code == 1 and "Permission" in result.output, result.output
    assert "secret" not in result.output.replace(".tmp/secret.txt", "")


def test_sql_limits_come_from_the_machine_and_flags_raise_them(store):
    query = (
        "SELECT current_setting('threads') AS threads, current_setting('temp_directory') AS tmp, "
        "current_setting('max_temp_directory_size') AS spill"
    )
    result = CliRunner().invoke(cli, ["sql", "--store", str(store), query, "--format", "json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)[0]
    assert row["threads"] == max(1, machine_cores() // 2)
    assert not Path(row["tmp"]).resolve().is_relative_to(Path.cwd().resolve())
    assert not Path(row["tmp"]).exists()  # private to the query, removed after it
    assert SqlLimits.for_machine().memory_bytes == machine_memory() // 4
    raised = CliRunner().invoke(
        cli,
        ["sql", "--store", str(store), "--memory-limit", "3GB", "--threads", "3", "--format"]
        + ["json", "SELECT current_setting('threads') AS t, current_setting('memory_limit') AS m"],
    )
    assert json.loads(raised.output) == [{"t": 3, "m": "2.7 GiB"}], raised.output
    assert SqlLimits.for_machine("512MiB").memory_bytes == 512 * 2**20


def test_a_self_join_that_would_exhaust_memory_stops_at_the_memory_limit(store):
    query = (
        "SELECT a.slide_id, b.patch_id, c.patch_id, r.range, a.fingerprint, b.fingerprint "
        "FROM fingerprints a, fingerprints b, fingerprints c, range(1000) r ORDER BY random()"
    )
    start = time.monotonic()
    code, err, out = fpstore_cli(
        "sql", "--store", store, query, "--memory-limit", "64MB", "--format", "csv"
    )
    assert code == 1 and len(err) == 1, err
    assert "memory limit of 64 MB" in err[0] and "--memory-limit" in err[0]
    assert out["peak"] < 1000, f"{out['peak']} MB resident"
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_a_long_query_is_interrupted_at_the_time_limit_in_one_line(store, fmt):
    """Rows fetched before the limit are already out: the output is streamed."""
    query = "SELECT a.range AS a, b.range AS b FROM range(1000000) a, range(1000000) b"
    start = time.monotonic()
    code, err, out = fpstore_cli("sql", "--store", store, query, "--format", fmt, "--timeout", "2")
    assert code == 1 and err == [
        "error: query stopped after its time limit of 2 s; narrow it (WHERE, LIMIT) "
        "or raise --timeout"
    ]
    assert out["lines"] > 10_000
    assert time.monotonic() - start < 30


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_csv_and_json_rows_are_streamed_not_held(store, fmt):
    """40,000 rows of 5 kB would hold over 400 MB as Arrow and Python rows; streamed, the peak
    stays within 150 MB of a one-row query's."""
    baseline = fpstore_cli("sql", "--store", store, "SELECT 1", "--format", fmt)[2]["peak"]
    query = "SELECT range AS i, repeat('x', 5000) AS s FROM range(40000)"
    code, err, out = fpstore_cli("sql", "--store", store, query, "--format", fmt)
    assert code == 0, err
    assert out["lines"] == 40_000 * 4 + 2 if fmt == "json" else out["lines"] == 40_001
    assert out["tail"].endswith("}\n]\n" if fmt == "json" else "x\n")
    assert out["peak"] - baseline < 150, f"{out['peak']} MB resident vs {baseline} MB for one row"


def test_memory_limit_not_a_size_is_one_line(store):
    result = CliRunner().invoke(
        cli, ["sql", "--store", str(store), "SELECT 1", "--memory-limit", "lots"]
    )
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "'lots' is not a size" in result.output


def test_sql_never_leaves_its_temporary_folder(store, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    CliRunner().invoke(cli, ["sql", "--store", str(store), "SELECT 1"])
    assert os.listdir(tmp_path) == []
