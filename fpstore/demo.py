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


def whole_core_px(preset: str) -> int:
    """The side at 0.5 um/px of a square holding one whole TMA core of the synthetic
    ``preset``: how the matching game cuts the test array's cores, as the paper cuts each core
    (training crops are 800 px so that pseudo-cores fit the 0.8 mm slides; on the dev seed's
    world whole cores matched 2-5 more of 24 patients than 800 px squares with the same
    networks: docs/results.md, issue 22)."""
    from fpstore.synth.presets import PRESETS

    return int(round(PRESETS[preset].core_um / 0.5))


def control_precision() -> str:
    """The random-weight control's extraction precision: int8 on a CPU-only machine without
    native bf16, where the fp32 ResNet34 would set the demo's pace (int8 runs it ~2x faster,
    every fingerprint within cosine 0.9995 of fp32: benchmarks/README.md); else auto."""
    import torch

    from fpstore.encoders.base import native_bf16_flags

    return "auto" if torch.cuda.is_available() or native_bf16_flags() else "int8"


@dataclass(frozen=True)
class DemoSettings:
    """How the demo trains and extracts; the defaults are the best setting of each encoder that
    docs/results.md measured (stain invariance in training, normalisation at extraction).

    ``evidence`` adds what that comparison needs: every encoder extracted both plain and
    normalised (``norm``) and, unless ``invariance`` is False, a second network trained without
    stain invariance; ``patch_cnn`` adds the direct patch CNN (a ResNet34 trained on the
    labelled patches; slow on CPUs).
    """

    stain: str = "hed"  # the network's stain invariance (train-fingerprint --stain)
    fingerprint_norm: str | None = None  # extract --stain-norm for the fingerprints
    control_norm: str | None = "macenko"  # extract --stain-norm for the control
    crop_px: int = 800  # cores and pseudo-cores: 400 um squares (the demo slides are 0.8 mm high)
    steps: int | None = None  # training steps (None: the demo configuration's)
    evidence: bool = False
    invariance: bool = True  # evidence: also a network without stain invariance
    norm: str = "macenko"  # the normalisation the evidence compares against none
    patch_cnn: bool = False

    def __post_init__(self):
        from fpstore.fingerprint.stain import check_stain
        from fpstore.slides.stain import STAIN_METHODS

        check_stain(self.stain)
        for name in ("fingerprint_norm", "control_norm", "norm"):
            value = getattr(self, name)
            if value is not None and value not in STAIN_METHODS:
                raise ConfigError(
                    f"DemoSettings.{name}={value!r}; choose one of {', '.join(STAIN_METHODS)}"
                )

    def networks(self) -> dict[str, str]:
        """{encoder id: stain invariance} of the networks to train."""
        nets = {"fingerprint-" + self.stain: self.stain}
        if self.evidence and self.invariance and self.stain != "none":
            nets["fingerprint-none"] = "none"
        return nets

    def settings(self, best: str | None) -> tuple[str | None, ...]:
        """The extraction settings of an encoder whose best is ``best``."""
        return (None, self.norm) if self.evidence else (best,)


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
        """One row per marker, method, encoder and pool (only ``pools`` when given), with
        DeLong's p against the first encoder: the table the report opens with."""
        from fpstore.report.results import results_rows

        return results_rows(self.compare.values(), pools)

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


def run_demo(
    out: Path,
    seed: int = 0,
    force: bool = False,
    quiet: bool = False,
    settings: DemoSettings | None = None,
) -> DemoResult:
    """Run the whole pipeline into ``out`` and return what it measured."""
    from fpstore.encoders.base import stain_normalised_id
    from fpstore.extract.run import extract
    from fpstore.store.io import write_json_atomic
    from fpstore.synth import synthesize

    settings = settings or DemoSettings()
    out = Path(out)
    _prepare(out, force)
    data, store = out / "synth", out / "store"
    (out / "model").mkdir(parents=True, exist_ok=True)
    progress = not quiet
    result = DemoResult(out=out)
    networks = settings.networks()
    n_extractions = len(networks) * len(settings.settings(settings.fingerprint_norm)) + len(
        settings.settings(settings.control_norm)
    )
    steps = _Steps(result, total=7 + 2 * len(networks) + n_extractions + len(MARKERS), quiet=quiet)

    steps.run(
        "synthesise the demo cohorts",
        synthesize,
        "demo",
        data,
        seed=seed,
        workers=min(4, os.cpu_count() or 1),
        progress=progress,
    )
    register_cohorts(steps, data, store)
    extractions = _train_networks(steps, settings, out, seed, progress)
    extractions += [
        control_extraction(seed, norm) for norm in settings.settings(settings.control_norm)
    ]
    for config in extractions:
        steps.run(
            f"extract {config.encoder_id or config.build_encoder().id}: tcga + external",
            lambda c=config: [
                extract(store, cohort, c, progress) for cohort in ("tcga", "external")
            ],
        )
    main_encoder = stain_normalised_id("fingerprint-" + settings.stain, settings.fingerprint_norm)
    # The evidence compares encoders and settings on all tissue pooled; the plain demo also
    # compares each tissue type (in the report and the store's runs/).
    pools = ("all",) if settings.evidence else None
    analyse(store, out / "report", seed, steps, progress, main_encoder, settings.patch_cnn, pools)
    write_json_atomic(result.to_dict(), out / "demo.json")
    return result


def register_cohorts(steps: _Steps, data: Path, store: Path) -> None:
    """The synthetic TCGA-like cohort (Biotab table) and the external one (CSV)."""
    from fpstore.cohort.cohorts import CohortSource, add_cohort

    tcga = data / "tcga"
    sources = {
        "tcga": CohortSource(
            slides=(str(tcga / "slides"),),
            clinical=tcga / "nationwidechildrens.org_clinical_patient_brca.txt",
            fmt="tcga",
        ),
        "external": CohortSource(
            slides=(str(data / "external" / "slides"),),
            clinical=data / "external" / "labels.csv",
            fmt="csv",
        ),
    }
    for name, source in sources.items():
        steps.run(f"register cohort {name}", add_cohort, store, name, source)


def _train_networks(steps: _Steps, settings: DemoSettings, out: Path, seed: int, progress: bool):
    """Train each fingerprint network and play the matching game with it; returns the
    extractions of its fingerprints (one per stain-normalisation setting)."""
    from fpstore.fingerprint.experiment import Sources, match, train_fingerprint

    # The large training set: the training array's cores and pseudo-cores of the TCGA-like
    # slides (no labels are read); the matching game is played on the test array.
    data, store = out / "synth", out / "store"
    sources = Sources(
        tma=data / "tma", store=store, cohort="tcga", crop_px=settings.crop_px, cache=out / "cores"
    )
    overrides = (
        {"seed": seed} if settings.steps is None else {"seed": seed, "max_steps": settings.steps}
    )
    extractions = []
    for base, stain in settings.networks().items():
        model = out / "model" / f"{base}.pt"
        steps.run(
            f"train the fingerprint network (stain invariance: {stain})",
            train_fingerprint,
            model,
            sources,
            config="demo",
            stain=stain,
            progress=progress,
            **overrides,
        )
        steps.result.match[base] = steps.run(
            f"matching game on the test array ({base})",
            match,
            model,
            sources,
            progress=progress,
            game_px=whole_core_px("demo"),
        )
        extractions += [
            fingerprint_extraction(model, base, seed, norm)
            for norm in settings.settings(settings.fingerprint_norm)
        ]
    return extractions


def fingerprint_extraction(model: Path, base: str, seed: int, norm):
    """The extraction of a trained network's fingerprints, under its own encoder id ``base``
    (``+norm`` when normalised)."""
    from fpstore.encoders.base import stain_normalised_id
    from fpstore.extract.config import ExtractConfig

    return ExtractConfig(
        encoder="fingerprint",
        encoder_options={"checkpoint": str(model)},
        encoder_id=stain_normalised_id(base, norm),
        stain_norm=norm,
        patches=None,
        seed=seed,
    )


def control_extraction(seed: int, norm):
    """The control encoder's extraction (random weights, seeded) with stain setting ``norm``."""
    from fpstore.extract.config import ExtractConfig

    return ExtractConfig(
        encoder=CONTROL_ENCODER,
        encoder_options={"seed": seed},
        stain_norm=norm,
        patches=None,
        seed=seed,
        precision=control_precision(),
    )


def _folds(store: Path, marker: str, encoder: str, wanted: int = 5) -> tuple[int, int, int]:
    """(groups, positive, negative): the paper's 5 groups, fewer when a class has fewer
    patients with fingerprints than that (every group needs one of each)."""
    from fpstore.classify.data import load_dataset

    y = load_dataset(store, "tcga", marker, encoder, "all").y
    positive = int(y.sum())
    return min(wanted, positive, len(y) - positive), positive, len(y) - positive


def _compare_config(store: Path, marker: str, encoder: str, seed: int, notes: list, pools, methods):
    """The demo's comparison for ``marker`` (tcga cross-validated, tested on external), with
    fewer than 5 groups where a class is small (said in ``notes``); None where too small."""
    from fpstore.classify.pipeline import CompareConfig

    folds, positive, negative = _folds(store, marker, encoder)
    if folds < 3:
        notes.append(
            f"{marker}: skipped, {positive} positive and {negative} negative "
            "TCGA-like patients are too few for 3 groups"
        )
        return None
    if folds < 5:
        notes.append(
            f"{marker}: {folds} groups instead of 5, since only "
            f"{min(positive, negative)} TCGA-like patients are "
            f"{'positive' if positive < negative else 'negative'}"
        )
    return CompareConfig(
        marker=marker,
        cohort="tcga",
        external="external",
        seed=seed,
        folds=folds,
        pools=pools,
        methods=methods,
        classifier={"patch-cnn": {"arch": "resnet34"}},
    )


def analyse(
    store: Path,
    report_dir: Path,
    seed: int,
    steps: _Steps,
    progress: bool,
    encoder: str,
    patch_cnn: bool = False,
    pools: tuple[str, ...] | None = None,
) -> None:
    """The steps after extraction: tissue types, compare (``pools``; None: all tissue and each
    tissue type), classify ER with ``encoder``'s fingerprints, the report."""
    from fpstore.classify.pipeline import ClassifyConfig, classify, compare
    from fpstore.report.html import build_report
    from fpstore.tissue.type_patches import predict_tissue

    result = steps.result
    for cohort in ("tcga", "external"):
        # Every encoder shares the patch grid, so one typing serves all.
        steps.run(
            f"tissue types: {cohort}",
            predict_tissue,
            store,
            cohort,
            "rules",
            encoder=encoder,
            progress=progress,
        )
    methods = ("mil", "abmil", "logreg", "xgboost") + (("patch-cnn",) if patch_cnn else ())
    for marker in MARKERS:
        config = _compare_config(store, marker, encoder, seed, result.notes, pools, methods)
        if config is None:
            continue
        result.compare[marker] = steps.run(
            f"compare methods for {marker}", compare, store, config, progress=progress
        )
    run = steps.run(
        "classify ER (MIL head, fingerprints, 5-fold CV, 50 permutations)",
        classify,
        store,
        ClassifyConfig(marker="ER", cohort="tcga", encoder=encoder, seed=seed, permutations=50),
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
