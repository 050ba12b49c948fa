"""A fault at every write point (issue 23): each command that writes, killed at each of its
durable steps in turn (``FPSTORE_FAULT_AT``, ``fpstore.store.io.durable_step``), leaves a
store that every reader opens, that shows the state before or after the command, never a
mixture, and that a rerun completes without a temporary file left.

The quick commands run by default; the sweeps of the heavy ones (extract, tissue predict,
classify, compare, predict, report, train-fingerprint, tma dearray) are ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fpstore.cli.main import cli
from fpstore.store.io import FAULT_AT, FAULT_LOG, FAULT_MODE

ROOT = Path(__file__).parents[1]
CMU = ROOT / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"
CLI = "import sys; from fpstore.cli.main import cli; cli(sys.argv[1:], prog_name='fpstore')"


def run_cli(args: list[str], fault_at: int | None = None, log: Path | None = None, cwd=None):
    """The command in a fresh interpreter, with the fault-injection variables when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPSTORE_FAULT")}
    env["PYTHONPATH"] = str(ROOT)
    if log is not None:
        env[FAULT_LOG] = str(log)
    if fault_at is not None:
        env[FAULT_AT], env[FAULT_MODE] = str(fault_at), "kill"
    return subprocess.run(
        [sys.executable, "-c", CLI, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )


def invoke(args: list[str]):
    """A command in this process (readers and reruns: no fault variables here)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def leftovers(*folders: Path) -> list[str]:
    """Temporary files and folders anywhere under ``folders`` (what a rerun must not leave)."""
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            name = path.name
            temporary = name.endswith(".tmp") or ".tmp" in name or ".old-" in name
            if temporary or name == ".staging":
                found.append(str(path.relative_to(folder)))
    return found


def state(store: Path, classify_check: bool = False) -> dict:
    """What every reader shows of the store (and fails if one cannot open it)."""
    out: dict = {}
    listed = invoke(["--store", store, "cohort", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    cohorts = json.loads(listed.output)
    for row in cohorts:
        shown = invoke(["--store", store, "cohort", "show", row["name"], "--json"])
        assert shown.exit_code == 0, shown.output
    out["cohorts"] = sorted((row["name"], row["slides"]) for row in cohorts)
    models = invoke(["--store", store, "models", "list", "--json"])
    assert models.exit_code == 0, models.output
    ids = [row["model"] for row in json.loads(models.output)]
    for model in ids:
        shown = invoke(["--store", store, "models", "show", model, "--json"])
        assert shown.exit_code == 0, shown.output
        assert (store / "runs" / model / "run.json").is_file()  # a model's run exists
    out["models"] = len(ids)
    views = ("fingerprints", "cohort_slides", "labels", "tissue", "predictions", "slides")
    query = "SELECT " + ", ".join(f"(SELECT count(*) FROM {v}) AS {v}" for v in views)
    rows = invoke(["--store", store, "sql", query, "--format", "json"])
    assert rows.exit_code == 0, rows.output
    out.update(json.loads(rows.output)[0])
    runs = store / "runs"
    out["runs"] = (
        sorted(
            json.loads((p / "run.json").read_text())["kind"]
            for p in runs.glob("*")
            if (p / "run.json").is_file()
        )
        if runs.is_dir()
        else []
    )
    predicted = invoke(
        ["--store", store, "sql", "SELECT DISTINCT run_id FROM predictions", "--format", "csv"]
    )
    # The predictions view holds whole runs only: every run id in it has its run.json.
    assert all((runs / r / "run.json").is_file() for r in predicted.output.splitlines()[1:])
    if classify_check and out["fingerprints"]:
        from fpstore.classify.pipeline import ClassifyConfig, classify

        cohort = out["cohorts"][0][0]
        cfg = ClassifyConfig(marker="ER", cohort=cohort, method="logreg", folds=3, n_boot=100)
        classify(store, cfg, progress=False, save=False)
    return out


def count_steps(args: list[str], tmp_path: Path, name: str) -> list[str]:
    """Run the command once, numbering its durable steps; returns their log lines."""
    log = tmp_path / f"{name}.steps"
    done = run_cli(args, log=log)
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines() if log.exists() else []


def kill_sweep(
    tmp_path: Path,
    base: Path,
    args,
    rerun_args=None,
    check=None,
    min_steps: int = 1,
    classify_check: bool = False,
):
    """Kill ``args`` at each of its durable steps on a fresh copy of the store ``base``.

    ``args(store)`` and ``rerun_args(store)`` give the command lines; ``check(store, before,
    after, now)`` may add command-specific checks. Returns the number of steps."""
    rerun_args = rerun_args or args
    store = tmp_path / "count" / "store"
    shutil.copytree(base, store, symlinks=True)
    before = state(store, classify_check)
    steps = count_steps(args(store), tmp_path, "count")
    after = state(store, classify_check)
    assert len(steps) >= min_steps, steps  # the command's writes pass the hook
    for n in range(1, len(steps) + 1):
        work = tmp_path / f"kill-{n}"
        store = work / "store"
        shutil.copytree(base, store, symlinks=True)
        killed = run_cli(args(store), fault_at=n, log=work / "steps")
        assert killed.returncode == -signal.SIGKILL, (n, steps[n - 1], killed.stderr[-2000:])
        now = state(store, classify_check)
        assert now in (before, after), (n, steps[n - 1], now, before, after)
        if check is not None:
            check(store, before, after, now)
        again = invoke(rerun_args(store))
        assert again.exit_code == 0, (n, steps[n - 1], again.output)
        assert not leftovers(work), (n, steps[n - 1], leftovers(work))
        state(store, classify_check)
        shutil.rmtree(work)
    return len(steps)


# -- the quick commands ---------------------------------------------------------------------


def _labels(tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        if not (folder / f"S{i}.svs").exists():
            (folder / f"S{i}.svs").symlink_to(CMU)
    labels = tmp_path / f"labels-{n}.csv"
    labels.write_text(
        "patient_id,slide,ER,site\n"
        + "".join(
            f"P{i},{folder}/S{i}.svs,{'Positive' if i % 2 else 'Negative'},A\n" for i in range(n)
        )
    )
    return labels


def _cohort_add(labels: Path, force: bool = False):
    extra = ["--force"] if force else []
    return lambda store: [
        "--store",
        store,
        "cohort",
        "add",
        "c",
        "--format",
        "csv",
        "--clinical",
        labels,
        *extra,
    ]


def test_cohort_add_killed_at_every_write_point(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    labels = _labels(tmp_path, 3)
    steps = kill_sweep(
        tmp_path / "sweep",
        base,
        _cohort_add(labels),
        rerun_args=_cohort_add(labels, True),
        min_steps=3,
    )
    assert steps >= 3


def test_cohort_add_force_killed_at_every_write_point_keeps_a_cohort(tmp_path):
    base = tmp_path / "base"
    assert invoke(_cohort_add(_labels(tmp_path, 3))(base)).exit_code == 0
    replacement = _labels(tmp_path, 2)  # the new cohort has fewer slides: never a mixture

    def cohort_always_there(store, before, after, now):
        assert [c for c, _ in now["cohorts"]] == ["c"]  # the "no cohort" never happens

    kill_sweep(
        tmp_path / "sweep",
        base,
        _cohort_add(replacement, True),
        check=cohort_always_there,
        min_steps=3,
    )


def test_a_swap_interrupted_between_two_renames_is_put_back_by_the_readers(tmp_path):
    """What `cohort add --force` left when killed between its two renames (kill at the 4th
    rename, issue 23): the old folder hidden, no cohort. Readers put it back."""
    store = tmp_path / "store"
    assert invoke(_cohort_add(_labels(tmp_path, 3))(store)).exit_code == 0
    os.replace(store / "cohorts" / "c", store / "cohorts" / ".c.old-4242")
    shown = invoke(["--store", store, "cohort", "show", "c"])
    assert shown.exit_code == 0, shown.output
    assert state(store)["cohorts"] == [("c", 3)]
    assert sorted(p.name for p in (store / "cohorts").iterdir()) == ["c"]


def test_models_operations_write_nothing(tmp_path):
    store = _classify_store(tmp_path)
    assert invoke(_classify(store)).exit_code == 0
    (model,) = json.loads(invoke(["--store", store, "models", "list", "--json"]).output)
    for command in (["models", "list"], ["models", "show", model["model"]]):
        assert count_steps(["--store", store, *command], tmp_path, command[-1]) == []


def _classify(store):
    options = "--marker ER --method logreg --n-boot 100 --no-site-probe --folds 3"
    return ["--store", store, "classify", *options.split()]


def _classify_store(tmp_path: Path) -> Path:
    from tests._classify_store import add_cohort

    from fpstore.cohort.cohorts import CohortSummary

    base = tmp_path / "base"
    add_cohort(base, "tcga", 24, seed=3, tissue=False)
    # The hand-made cohort.json holds a name only: the summary `cohort list/show` read.
    summary = CohortSummary("tcga", "csv", "", 24, 24, 24, {}, {}, [], [], [])
    (base / "cohorts" / "tcga" / "cohort.json").write_text(json.dumps(summary.to_dict()))
    return base


def test_a_classify_killed_before_its_run_commit_leaves_neither_model_nor_rows(tmp_path):
    """The landed code wrote the model's card before the run's files: a model listed whose
    run did not exist, and the run's rows in `predictions` before its run.json."""
    base = _classify_store(tmp_path)
    before = state(base)
    shutil.copytree(base, tmp_path / "counted")
    steps = count_steps(_classify(tmp_path / "counted"), tmp_path, "classify")
    commit = next(
        i for i, line in enumerate(steps, 1) if line.split()[2] == "rename" and "/runs/2" in line
    )
    assert any("/models/classify/" in line for line in steps[: commit - 1])  # model first
    store = tmp_path / "store"
    shutil.copytree(base, store)
    killed = run_cli(_classify(store), fault_at=commit, log=tmp_path / "steps")
    assert killed.returncode == -signal.SIGKILL
    assert state(store) == before  # no model listed, no rows in predictions, no run
    assert invoke(_classify(store)).exit_code == 0
    after = state(store)
    assert (after["models"], after["runs"]) == (1, ["classify"])
    assert not leftovers(store)  # the killed run's model and staging folder are gone
    assert len(list((store / "models" / "classify").iterdir())) == 1


def test_a_model_whose_run_never_came_is_not_listed_and_the_next_classify_removes_it(tmp_path):
    store = _classify_store(tmp_path)
    assert invoke(_classify(store)).exit_code == 0
    (run,) = (store / "runs").iterdir()
    orphan = store / "models" / "classify" / "20000101T000000000000-ER-logreg-deadbeef"
    shutil.copytree(store / "models" / "classify" / run.name, orphan)
    assert len(json.loads(invoke(["--store", store, "models", "list", "--json"]).output)) == 1
    assert invoke(["--store", store, "models", "show", orphan.name]).exit_code != 0
    assert invoke(_classify(store)).exit_code == 0
    assert not orphan.exists()
    assert state(store)["models"] == 2


@pytest.mark.slow
def test_classify_killed_at_every_write_point(tmp_path):
    def one_model_per_classify_run(store, before, after, now):
        assert now["models"] == now["runs"].count("classify")

    base = _classify_store(tmp_path)
    kill_sweep(tmp_path / "sweep", base, _classify, check=one_model_per_classify_run, min_steps=6)
