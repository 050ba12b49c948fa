"""The whole pipeline on the built-in demo cohort, in one call.

synthesise -> register cohorts -> train a small fingerprint network -> matching game ->
extract (fingerprints and a random-weights control encoder) -> tissue types ->
compare ER/PR/Her2 methods with external validation -> classify ER -> HTML report.

Every step is an ordinary library call that the CLI also exposes, so the folder it
leaves behind (store, model, report) can be explored with the other commands.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fpstore.config import MARKERS
from fpstore.errors import ConfigError

CONTROL_ENCODER = (
    "random-resnet34"  # stands in for ImageNet weights, which the demo may not download
)


@dataclass
class DemoResult:
    out: Path
    steps: list[dict] = field(default_factory=list)
    match: dict = field(default_factory=dict)
    compare: dict = field(default_factory=dict)  # marker -> compare document
    classify: dict = field(default_factory=dict)  # the cross-validated ER run, in brief
    notes: list[str] = field(default_factory=list)  # what the demo adapted or skipped, and why
    run_id: str = ""
    report: str = ""

    def results_rows(self, pools: tuple[str, ...] | None = None) -> list[dict]:
        """One row per marker, method, encoder and pool (only ``pools`` when given)."""
        rows = []
        for marker, document in self.compare.items():
            for row in document["rows"]:
                if pools and row.get("pool") not in pools:
                    continue
                rows.append(
                    {
                        "marker": marker,
                        **{
                            k: row.get(k)
                            for k in ("method", "encoder", "pool", "auc", "ci_low", "ci_high", "n")
                        },
                    }
                )
        return rows

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "steps": self.steps,
            "match": self.match,
            "results": self.results_rows(),
            "classify": self.classify,
            "notes": self.notes,
            "run_id": self.run_id,
            "report": self.report,
        }


class _Steps:
    """Times each step and prints one line per step to stderr."""

    def __init__(self, result: DemoResult, total: int, quiet: bool):
        self.result, self.total, self.quiet, self.n = result, total, quiet, 0

    def run(self, name: str, fn, *args, **kwargs):
        self.n += 1
        if not self.quiet:
            print(f"[{self.n}/{self.total}] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        self.result.steps.append({"step": name, "seconds": round(seconds, 1)})
        if not self.quiet:
            print(f"[{self.n}/{self.total}] {name}: {seconds:.0f} s", file=sys.stderr, flush=True)
        return value


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"demo folder {str(out)!r} is not empty; pass --force to replace it")
        if not (out / "demo.json").exists() and not (out / "synth").exists():
            raise ConfigError(
                f"{str(out)!r} does not look like an fpstore demo folder; "
                "refusing to delete it even with --force: choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run_demo(out: Path, seed: int = 0, force: bool = False, quiet: bool = False) -> DemoResult:
    """Run the whole pipeline into ``out`` and return what it measured."""
    from fpstore.cohort.cohorts import add_cohort
    from fpstore.extract.config import ExtractConfig
    from fpstore.extract.run import extract
    from fpstore.fingerprint.experiment import match, train_fingerprint
    from fpstore.store.io import write_json_atomic
    from fpstore.synth import synthesize

    out = Path(out)
    _prepare(out, force)
    data, store, model = out / "synth", out / "store", out / "model" / "fingerprint.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    progress = not quiet
    result = DemoResult(out=out)
    steps = _Steps(result, total=11 + len(MARKERS), quiet=quiet)

    steps.run(
        "synthesise the demo cohorts",
        synthesize,
        "demo",
        data,
        seed=seed,
        workers=min(4, os.cpu_count() or 1),
        progress=progress,
    )
    tcga = data / "tcga"
    steps.run(
        "register cohort tcga",
        add_cohort,
        store,
        "tcga",
        slides=str(tcga / "slides"),
        clinical=tcga / "nationwidechildrens.org_clinical_patient_brca.txt",
        fmt="tcga",
    )
    steps.run(
        "register cohort external",
        add_cohort,
        store,
        "external",
        slides=str(data / "external" / "slides"),
        clinical=data / "external" / "labels.csv",
        fmt="csv",
    )
    steps.run(
        "train the fingerprint network",
        train_fingerprint,
        data / "tma",
        model,
        config="demo",
        stain="none",
        cache=out / "cores",
        progress=progress,
        seed=seed,
    )
    result.match = steps.run(
        "matching game on the test array",
        match,
        model,
        data / "tma",
        cache=out / "cores",
        progress=progress,
    )
    fingerprint = ExtractConfig(
        encoder="fingerprint", encoder_options={"checkpoint": str(model)}, patches=None, seed=seed
    )
    control = ExtractConfig(
        encoder=CONTROL_ENCODER, encoder_options={"seed": seed}, patches=None, seed=seed
    )
    for cohort in ("tcga", "external"):
        steps.run(f"extract fingerprints: {cohort}", extract, store, cohort, fingerprint, progress)
    steps.run(
        "extract control features (random ResNet34): tcga + external",
        lambda: [extract(store, c, control, progress) for c in ("tcga", "external")],
    )
    analyse(store, out / "report", seed, steps, progress)
    write_json_atomic(result.to_dict(), out / "demo.json")
    return result


def _folds(store: Path, marker: str, wanted: int = 5) -> tuple[int, int, int]:
    """(groups, positive, negative): the paper's 5 groups, fewer when a class has fewer
    patients with fingerprints than that (every group needs one of each)."""
    from fpstore.classify.data import load_dataset

    y = load_dataset(store, "tcga", marker, "fingerprint", "all").y
    positive = int(y.sum())
    return min(wanted, positive, len(y) - positive), positive, len(y) - positive


def analyse(store: Path, report_dir: Path, seed: int, steps: _Steps, progress: bool) -> None:
    """The steps after extraction: tissue types, compare, classify ER, the report."""
    from fpstore.classify.pipeline import ClassifyConfig, CompareConfig, classify, compare
    from fpstore.report.html import build_report
    from fpstore.tissue.predict import predict_tissue

    result = steps.result
    for cohort in ("tcga", "external"):
        # Both encoders share the patch grid, so one typing serves both.
        steps.run(
            f"tissue types: {cohort}",
            predict_tissue,
            store,
            cohort,
            "rules",
            encoder="fingerprint",
            progress=progress,
        )
    for marker in MARKERS:
        folds, positive, negative = _folds(store, marker)
        if folds < 3:
            result.notes.append(
                f"{marker}: skipped, {positive} positive and {negative} negative "
                "TCGA-like patients are too few for 3 groups"
            )
            continue
        if folds < 5:
            result.notes.append(
                f"{marker}: {folds} groups instead of 5, since only "
                f"{min(positive, negative)} TCGA-like patients are "
                f"{'positive' if positive < negative else 'negative'}"
            )
        result.compare[marker] = steps.run(
            f"compare methods for {marker}",
            compare,
            store,
            CompareConfig(
                marker=marker,
                cohort="tcga",
                external="external",
                seed=seed,
                folds=folds,
                methods=("mil", "logreg", "xgboost"),
            ),
            progress=progress,
        )
    run = steps.run(
        "classify ER (MIL head, fingerprints, 5-fold CV, 50 permutations)",
        classify,
        store,
        ClassifyConfig(
            marker="ER", cohort="tcga", encoder="fingerprint", seed=seed, permutations=50
        ),
        progress=progress,
    )
    result.run_id = run["run_id"]
    m, perm = run["cv"]["metrics"], run["permutation"]
    result.classify = {
        "marker": "ER",
        "auc": m["auc"],
        "ci_low": m["ci_low"],
        "ci_high": m["ci_high"],
        "n": m["n"],
        "permutation_p": perm["p_value"],
        "null_mean": perm["null_mean"],
        "site_probe_balanced_accuracy": run["site_probe"].get("balanced_accuracy"),
    }
    report = steps.run("HTML report", build_report, store, result.run_id, report_dir)
    result.report = str(report.index)
