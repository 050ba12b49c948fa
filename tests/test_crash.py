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
ENCODER = ["--encoder", "random-resnet34", "--device", "cpu", "--workers", "0"]
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


def state(store: Path, classify_check: str | None = None) -> dict:
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
    per_slide = (
        "SELECT 'fingerprints:' || encoder || '/' || slide_id AS k, count(*) AS n FROM fingerprints"
        " GROUP BY ALL UNION ALL SELECT 'tissue:' || slide_id, count(*) FROM tissue GROUP BY ALL"
    )
    rows = invoke(["--store", store, "sql", per_slide, "--format", "json"])
    assert rows.exit_code == 0, rows.output
    out.update({row["k"]: row["n"] for row in json.loads(rows.output)})
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
    for kind in set(out["runs"]):
        out[f"runs:{kind}"] = out["runs"].count(kind)
    predicted = invoke(
        ["--store", store, "sql", "SELECT DISTINCT run_id FROM predictions", "--format", "csv"]
    )
    # The predictions view holds whole runs only: every run id in it has its run.json.
    assert all((runs / r / "run.json").is_file() for r in predicted.output.splitlines()[1:])
    if classify_check is not None:  # the cohort to classify from its stored fingerprints
        from fpstore.classify.pipeline import ClassifyConfig, classify

        cfg = ClassifyConfig(
            marker="ER", cohort=classify_check, method="logreg", folds=3, n_boot=100
        )
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
    classify_check: str | None = None,
    strict: bool = True,
):
    """Kill ``args`` at each of its durable steps on a fresh copy of the store ``base``.

    ``args(store)`` and ``rerun_args(store)`` give the command lines; ``check(store, before,
    after, now)`` may add command-specific checks; ``strict=False`` for the commands whose
    unit of work is a slide or a run (extract, tissue predict, compare), where ``check``
    looks per unit. Returns the number of steps."""
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
        if strict:
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


def test_without_an_atomic_exchange_a_swap_cut_between_its_renames_is_put_back(
    tmp_path, monkeypatch
):
    """Where renameat2 cannot exchange (NFS, other systems) the swap takes two renames; a
    fault between them leaves the old cohort hidden, and the next reader puts it back."""
    import fpstore.store.io as store_io

    monkeypatch.setattr(store_io, "_exchange", lambda a, b: False)
    store = tmp_path / "store"
    assert invoke(_cohort_add(_labels(tmp_path, 3))(store)).exit_code == 0
    monkeypatch.setenv(FAULT_LOG, str(tmp_path / "count"))
    assert invoke(_cohort_add(_labels(tmp_path, 2), True)(store)).exit_code == 0
    lines = (tmp_path / "count").read_text().splitlines()
    between = next(n for n, line in enumerate(lines, 1) if line.split()[2] == "exchange") + 1
    monkeypatch.setenv(FAULT_LOG, str(tmp_path / "steps"))
    monkeypatch.setenv(FAULT_AT, str(between))
    monkeypatch.setenv(FAULT_MODE, "raise")
    with pytest.raises(OSError, match="injected fault"):
        invoke(_cohort_add(_labels(tmp_path, 3), True)(store))
    assert not (store / "cohorts" / "c").exists()  # cut between the two renames
    monkeypatch.delenv(FAULT_AT)
    assert state(store)["cohorts"] == [("c", 2)]  # the readers put the old one back
    assert sorted(p.name for p in (store / "cohorts").iterdir()) == ["c"]


@pytest.mark.slow
def test_an_extract_killed_between_a_slides_file_and_its_status_redoes_that_slide(tmp_path):
    """Killed after a slide's fingerprint file and before its status file, the landed code's
    rerun counted the slide done: no status ever, the status's temporary file never cleared."""
    store = tmp_path / "store"
    assert invoke(_cohort_add(_labels(tmp_path, 2))(store)).exit_code == 0
    shutil.copytree(store, tmp_path / "counted")
    options = ["extract", "--cohort", "c", *ENCODER, "--patches", "2"]
    steps = count_steps(["--store", tmp_path / "counted", *options], tmp_path, "extract")
    first_status = next(n for n, line in enumerate(steps, 1) if "/status/" in line)
    killed = run_cli(["--store", store, *options], fault_at=first_status, log=tmp_path / "steps")
    assert killed.returncode == -signal.SIGKILL
    assert invoke(["--store", store, *options]).exit_code == 0
    status = store / "status" / "encoder=random-resnet34" / "cohort=c"
    assert sorted(p.name for p in status.glob("*.json")) == ["S0.json", "S1.json"]
    assert not leftovers(store)


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
    from fpstore.cohort.cohorts import CohortSummary
    from tests._classify_store import add_cohort

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


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


SAVE = """
import sys
from fpstore.encoders.checkpoint import save_checkpoint
from fpstore.encoders.fingerprint_net import FingerprintNet
save_checkpoint(sys.argv[1], FingerprintNet(3, "resnet18"), {"preprocessing": {}})
"""


def test_a_checkpoint_save_removes_the_temporaries_of_dead_writers_only(tmp_path):
    """The landed code left <name>.pt.tmpNNNN beside the checkpoint, visible, never cleaned."""
    from fpstore.encoders.checkpoint import save_checkpoint
    from fpstore.encoders.fingerprint_net import FingerprintNet

    dead = tmp_path / f".fp.pt.{_dead_pid()}.y2.tmp"  # what a killed save left
    live = tmp_path / f".fp.pt.{os.getpid()}.x1.tmp"  # a save still running: kept
    for path in (dead, live):
        path.write_bytes(b"")
    save_checkpoint(tmp_path / "fp.pt", FingerprintNet(3, "resnet18"), {"preprocessing": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "fp.pt"])


@pytest.mark.slow
def test_a_killed_checkpoint_save_leaves_a_hidden_temporary_the_next_save_removes(tmp_path):
    path = tmp_path / "fp.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), FAULT_AT: "2"}  # 1: fsync, 2: the rename
    killed = subprocess.run([sys.executable, "-c", SAVE, str(path)], env=env)
    assert killed.returncode == -signal.SIGKILL
    (left,) = [p.name for p in tmp_path.iterdir()]
    assert left.startswith(".fp.pt.") and left.endswith(".tmp")  # hidden
    done = subprocess.run([sys.executable, "-c", SAVE, str(path)], env={**env, FAULT_AT: ""})
    assert done.returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["fp.pt"]


def _cores(n: int = 2):
    import numpy as np

    from fpstore.fingerprint.data import CoreSet

    def pixels():
        return np.zeros((n, 8, 4, 3), np.uint8)

    return CoreSet(
        left=pixels(),
        right=pixels(),
        key=np.array([f"a:{i}" for i in range(n)]),
        patient_id=np.array([f"p{i}" for i in range(n)]),
        section=np.array(["x"] * n),
        site=np.array(["A"] * n),
        core_index=np.arange(n),
        tissue_left=np.ones((n, 1, 1), bool),
        tissue_right=np.ones((n, 1, 1), bool),
    )


def test_a_failed_cache_write_leaves_the_old_cache_whole_and_no_temporary_folder(
    tmp_path, monkeypatch
):
    """The landed code filled <cache>.tmpNNNN beside the cache folder (visible, never cleaned)
    and replaced an old cache by removing it first. A fault raised at each durable step."""
    from fpstore.fingerprint.data import read_meta, write_coreset

    cache = tmp_path / "cache" / "train"
    write_coreset(_cores(), cache, {"source": "old"})
    monkeypatch.setenv(FAULT_LOG, str(tmp_path / "count"))
    write_coreset(_cores(), cache, {"source": "old"})
    steps = len((tmp_path / "count").read_text().splitlines())
    assert steps >= 3
    monkeypatch.setenv(FAULT_MODE, "raise")
    for n in range(1, steps + 1):
        monkeypatch.setenv(FAULT_LOG, str(tmp_path / f"steps-{n}"))
        monkeypatch.setenv(FAULT_AT, str(n))
        with pytest.raises(OSError, match="injected fault"):
            write_coreset(_cores(3), cache, {"source": "new"})
        assert sorted(p.name for p in cache.parent.iterdir()) == ["train"]
        meta = read_meta(cache)
        assert (meta["source"], len(meta["items"])) in (("old", 2), ("new", 3))


WRITE_CORES = """
import sys
from tests.test_crash import _cores
from fpstore.fingerprint.data import write_coreset
write_coreset(_cores(int(sys.argv[2])), sys.argv[1], {"source": sys.argv[2]})
"""


@pytest.mark.slow
def test_a_killed_cache_write_leaves_no_visible_folder_and_the_next_write_cleans_up(tmp_path):
    from fpstore.fingerprint.data import read_meta, write_coreset

    cache = tmp_path / "cache" / "train"
    write_coreset(_cores(), cache, {"source": "2"})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "steps"
    write = [sys.executable, "-c", WRITE_CORES, str(cache), "3"]
    assert subprocess.run(write, env={**env, FAULT_LOG: str(log)}).returncode == 0
    steps = len(log.read_text().splitlines())
    for n in range(1, steps + 1):
        write_coreset(_cores(), cache, {"source": "2"})
        killed = subprocess.run(write, env={**env, FAULT_AT: str(n)})
        assert killed.returncode == -signal.SIGKILL
        visible = [p.name for p in cache.parent.iterdir() if not p.name.startswith(".")]
        assert visible == ["train"]  # the old cache, whole, or the new one: never a temp folder
        assert len(read_meta(cache)["items"]) == int(read_meta(cache)["source"])
        write_coreset(_cores(), cache, {"source": "2"})
        assert sorted(p.name for p in cache.parent.iterdir()) == ["train"]  # .staging cleared


# -- the heavy commands, on the `small` synthetic set (slow) ---------------------------------


def _extract(cohort: str):
    return lambda store: (
        ["--store", store, "extract", "--cohort", cohort, *ENCODER]
        + [
            "--patches",
            "6",
        ]
    )


@pytest.fixture(scope="module")
def pipeline(synth_small, tmp_path_factory):
    """A store with cohort tcga (9 slides) extracted, tissue types, a classify run and its
    model; and cohort t3 (3 of its slides), not extracted."""
    root = tmp_path_factory.mktemp("pipeline")
    store = root / "store"
    slides = sorted((synth_small / "tcga" / "slides").iterdir())
    # The preset's table has no ER-negative patient: label the slides here, half and half.
    rows = [
        f"{p.name[:12]},{p},{'Negative' if i % 2 else 'Positive'},{p.name[5:7]}"
        for i, p in enumerate(slides)
    ]
    for name, chosen in (("tcga", rows), ("t3", rows[:3])):
        labels = root / f"{name}.csv"
        labels.write_text("patient_id,slide,ER,site\n" + "\n".join(chosen) + "\n")
        options = ["--format", "csv", "--clinical", labels]
        added = invoke(["--store", store, "cohort", "add", name, *options])
        assert added.exit_code == 0, added.output
    assert invoke(_extract("tcga")(store)).exit_code == 0
    tissue = invoke(
        ["--store", store, "tissue", "predict", "--cohort", "tcga", "--encoder", "random-resnet34"]
    )
    assert tissue.exit_code == 0, tissue.output
    classified = invoke(_classify_tcga(store))
    assert classified.exit_code == 0, classified.output
    return store


def _classify_tcga(store):
    options = "--marker ER --cohort tcga --method logreg --n-boot 100 --no-site-probe --folds 3"
    return ["--store", store, "classify", *options.split()]


def _per_item(store, before, after, now):
    """Commands that write one whole file per slide or per run: each count lies between."""
    for key in set(before) | set(after) | set(now):
        low, high = sorted((before.get(key, 0), after.get(key, 0)))
        value = now.get(key, 0)
        if isinstance(value, list):
            continue  # run kinds: counted under runs:<kind>
        assert low <= value <= high, (key, value, before.get(key), after.get(key))


def _model_id(store) -> str:
    return json.loads(invoke(["--store", store, "models", "list", "--json"]).output)[0]["model"]


@pytest.mark.slow
def test_extract_killed_at_every_write_point(pipeline, tmp_path):
    steps = kill_sweep(
        tmp_path, pipeline, _extract("t3"), check=_per_item, strict=False, min_steps=6
    )
    assert steps >= 6


@pytest.mark.slow
def test_tissue_predict_killed_at_every_write_point(pipeline, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(pipeline, base, symlinks=True)
    shutil.rmtree(base / "tissue")

    def tissue(store):
        return [
            "--store",
            store,
            "tissue",
            "predict",
            "--cohort",
            "tcga",
            "--encoder",
            "random-resnet34",
        ]

    kill_sweep(tmp_path / "sweep", base, tissue, check=_per_item, strict=False, min_steps=3)


@pytest.mark.slow
def test_classify_on_a_real_store_killed_at_every_write_point(pipeline, tmp_path):
    kill_sweep(tmp_path, pipeline, _classify_tcga, min_steps=6, classify_check="tcga")


@pytest.mark.slow
def test_compare_killed_at_every_write_point(pipeline, tmp_path):
    def compare(store):
        options = "--marker ER --cohort tcga --methods logreg,xgboost --pools all --n-boot 100"
        return ["--store", store, "compare", *options.split(), "--folds", "3"]

    kill_sweep(tmp_path, pipeline, compare, check=_per_item, strict=False, min_steps=6)


@pytest.mark.slow
def test_predict_killed_at_every_write_point(pipeline, tmp_path):
    model = _model_id(pipeline)

    def predict(store):
        return [
            "--store",
            store,
            "predict",
            "--model",
            model,
            "--cohort",
            "tcga",
            "--n-boot",
            "100",
        ]

    kill_sweep(tmp_path, pipeline, predict, min_steps=3)


@pytest.mark.slow
def test_report_killed_at_every_write_point(pipeline, tmp_path):
    run = _model_id(pipeline)  # the classify run's id

    def report(store):
        out = store.parent / "report"
        options = ["--heatmaps", "1", "--embed-method", "none", "--bootstrap", "100"]
        return ["--store", store, "report", "--run", run, "--out", out, *options]

    def index_whole(store, before, after, now):
        index = store.parent / "report" / "index.html"
        assert not index.exists() or index.read_text().rstrip().endswith("</html>")

    kill_sweep(tmp_path, pipeline, report, check=index_whole, min_steps=3)


@pytest.mark.slow
def test_train_fingerprint_killed_at_every_write_point(synth_small, pipeline, tmp_path):
    """The landed code left <name>.pt.tmpNNNN files and *.tmpNNNN cache folders, visible
    and never cleaned; now they are hidden and the next run removes them."""

    def train(store):
        out = store.parent
        return ["--store", store, "train-fingerprint", "--tma", synth_small / "tma"] + [
            "--cache",
            out / "cache",
            "--out",
            out / "fp.pt",
            "--crop-px",
            "512",
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--patch-px",
            "64",
            "--out-px",
            "32",
            "--batch-size",
            "8",
            "--device",
            "cpu",
        ]

    def checkpoint_whole(store, before, after, now):
        from fpstore.encoders.checkpoint import load_checkpoint

        out = store.parent
        visible = [p.name for p in out.rglob("*") if "tmp" in p.name and not p.name.startswith(".")]
        assert not visible, visible  # a killed run's temporaries are hidden
        if (out / "fp.pt").exists():
            load_checkpoint(out / "fp.pt")
        for halves in (out / "cache").rglob("right.npy"):  # a cache folder that is there...
            if not any(part.startswith(".") for part in halves.relative_to(out).parts):
                assert (halves.parent / "cores.json").is_file()  # ...is whole

    kill_sweep(tmp_path, pipeline, train, check=checkpoint_whole, min_steps=3)


@pytest.mark.slow
def test_tma_dearray_killed_at_every_write_point(synth_small, pipeline, tmp_path):
    section = synth_small / "tma" / "train"

    def dearray(store):
        out = store.parent / "dearray"
        return [
            "tma",
            "dearray",
            section / "section1.tiff",
            "--array-map",
            section / "array_map.csv",
        ] + [
            "--out",
            out,
            "--crop-px",
            "256",
            "--force",
        ]

    def tables_whole(store, before, after, now):
        out = store.parent / "dearray"
        if (out / "cores.json").exists():  # "dearrayed": its table is there and whole
            document = json.loads((out / "cores.json").read_text())
            rows = (out / "cores.csv").read_text().splitlines()
            assert len(rows) == len(document["cores"]) + 1

    kill_sweep(tmp_path, pipeline, dearray, check=tables_whole, min_steps=4)
