"""`fpstore evidence`: do trained fingerprints beat the random-weight control, with power?

The demo's 48 external patients give AUC intervals of about +-0.12, too wide to see a
difference of a few points between encoders. This runs the demo's comparison on the
``evidence`` synthetic preset (the demo's world, sites and arrays; 200 TCGA-like and 150
external patients) at several seeds:

1. per seed: synthesise, register, train the fingerprint network as the demo does, play the
   matching game, extract the fingerprints and the random-weight control each plain and with
   ``--stain-norm`` (``norm``);
2. per seed, marker and encoder: the extraction setting with the higher 5-fold CV AUC of the
   MIL head on the TCGA-like cohort (the training cohort only: the external cohort never
   chooses anything);
3. per seed, marker and method (MIL head, logistic regression): both encoders' final models
   scored on the external cohort, AUCs and the paired DeLong test of their difference;
4. across seeds, per marker and method: the fixed-effect (inverse-variance) pooled difference
   of AUCs with its 95% CI, and the pooled AUC of each encoder with its CI.

Seeds are independent worlds (new patients, arrays, networks), so their DeLong variances add
as independent estimates.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import norm as normal

from fpstore.config import MARKERS
from fpstore.demo import (
    CONTROL_ENCODER,
    DemoResult,
    _folds,
    _prepare,
    _Steps,
    control_extraction,
    fingerprint_extraction,
    register_cohorts,
    whole_core_px,
)
from fpstore.errors import ConfigError

FINGERPRINT = "fingerprint-hed"
Z95 = float(normal.ppf(0.975))


@dataclass(frozen=True)
class EvidenceSettings:
    seeds: tuple[int, ...] = (0, 1, 2)
    preset: str = "evidence"
    markers: tuple[str, ...] = MARKERS
    methods: tuple[str, ...] = ("mil", "logreg")
    norm: str = "macenko"  # the extraction setting each encoder may take instead of plain
    steps: int | None = None  # training steps (None: the demo configuration's)
    crop_px: int = 800

    def __post_init__(self):
        from fpstore.slides.stain import STAIN_METHODS
        from fpstore.synth.presets import PRESETS

        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"evidence seeds {list(self.seeds)}: give distinct seeds")
        if self.preset not in PRESETS:
            raise ConfigError(
                f"evidence preset {self.preset!r}; choose one of {', '.join(PRESETS)}"
            )
        bad = [m for m in self.markers if m not in MARKERS]
        if bad:
            raise ConfigError(f"markers {bad}; choose from {', '.join(MARKERS)}")
        if self.norm not in STAIN_METHODS:
            raise ConfigError(
                f"evidence norm {self.norm!r}; choose one of {', '.join(STAIN_METHODS)}"
            )


def _extract_all(steps: _Steps, store: Path, model: Path, seed: int, norm: str) -> dict:
    """{base encoder: [its encoder id plain, normalised]} after extracting all four."""
    from fpstore.extract.run import extract

    ids: dict[str, list[str]] = {FINGERPRINT: [], CONTROL_ENCODER: []}
    for setting in (None, norm):
        for base, config in (
            (FINGERPRINT, fingerprint_extraction(model, FINGERPRINT, seed, setting)),
            (CONTROL_ENCODER, control_extraction(seed, setting)),
        ):
            encoder_id = config.encoder_id or config.build_encoder().id
            steps.run(
                f"extract {encoder_id}: tcga + external",
                lambda c=config: [
                    extract(store, cohort, c, False) for cohort in ("tcga", "external")
                ],
            )
            ids[base].append(encoder_id)
    return ids


def _chosen_settings(store: Path, marker: str, ids: dict, folds: int, seed: int) -> dict:
    """{base encoder: (encoder id, CV AUC)} with the higher MIL CV AUC on tcga alone."""
    from fpstore.classify.pipeline import CompareConfig, compare

    document = compare(
        store,
        CompareConfig(
            marker=marker,
            cohort="tcga",
            methods=("mil",),
            encoders=tuple(i for pair in ids.values() for i in pair),
            pools=("all",),
            folds=folds,
            seed=seed,
        ),
        progress=False,
        save=False,
    )
    cv = {row["encoder"]: row["auc"] for row in document["rows"]}
    return {base: max(((i, cv[i]) for i in pair), key=lambda t: t[1]) for base, pair in ids.items()}


def _paired(store: Path, run_a: str, run_b: str) -> dict:
    """AUCs, their difference and DeLong variances of two external runs on shared patients."""
    from fpstore.classify.metrics import delong_cov
    from fpstore.store.runs import load_run

    a = load_run(store, run_a).patients.to_pandas().set_index("patient_id")
    b = load_run(store, run_b).patients.to_pandas().set_index("patient_id")
    shared = a.index.intersection(b.index)
    shared = shared[a.loc[shared, "label"].notna().to_numpy()]
    y = a.loc[shared, "label"].to_numpy(int)
    aucs, cov = delong_cov(y, np.vstack([a.loc[shared, "score"], b.loc[shared, "score"]]))
    var_diff = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    z = diff / np.sqrt(var_diff) if var_diff > 1e-15 else 0.0
    return {
        "n": int(len(y)),
        "positives": int(y.sum()),
        "auc_fingerprint": float(aucs[0]),
        "var_fingerprint": float(cov[0, 0]),
        "auc_control": float(aucs[1]),
        "var_control": float(cov[1, 1]),
        "diff": diff,
        "var_diff": var_diff,
        "p": float(2 * normal.sf(abs(z))),
    }


def _external(store: Path, marker: str, chosen: dict, methods, folds: int, seed: int) -> list:
    from fpstore.classify.pipeline import CompareConfig, compare

    fp_id, ctrl_id = chosen[FINGERPRINT][0], chosen[CONTROL_ENCODER][0]
    document = compare(
        store,
        CompareConfig(
            marker=marker,
            cohort="tcga",
            external="external",
            methods=tuple(methods),
            encoders=(fp_id, ctrl_id),
            pools=("all",),
            folds=folds,
            seed=seed,
        ),
        progress=False,
    )
    runs = {(row["method"], row["encoder"]): row["run_id"] for row in document["rows"]}
    rows = []
    for method in methods:
        rows.append(
            {
                "marker": marker,
                "method": method,
                "fingerprint_setting": fp_id,
                "control_setting": ctrl_id,
                "cv_auc_fingerprint": chosen[FINGERPRINT][1],
                "cv_auc_control": chosen[CONTROL_ENCODER][1],
                **_paired(store, runs[(method, fp_id)], runs[(method, ctrl_id)]),
            }
        )
    return rows


def run_seed(out: Path, seed: int, settings: EvidenceSettings, quiet: bool = False) -> dict:
    """One seed's world: train, match, extract, choose settings on tcga, test externally."""
    from fpstore.fingerprint.experiment import Sources, match, train_fingerprint
    from fpstore.synth import synthesize

    data, store, model = out / "synth", out / "store", out / "model" / f"{FINGERPRINT}.pt"
    log = DemoResult(out=out)
    steps = _Steps(log, total=9 + 2 * len(settings.markers), quiet=quiet)
    steps.run(
        f"synthesise the {settings.preset} cohorts (seed {seed})",
        synthesize,
        settings.preset,
        data,
        seed=seed,
        workers=min(4, os.cpu_count() or 1),
        progress=not quiet,
    )
    register_cohorts(steps, data, store)
    sources = Sources(
        tma=data / "tma", store=store, cohort="tcga", crop_px=settings.crop_px, cache=out / "cores"
    )
    overrides = {"seed": seed} | ({} if settings.steps is None else {"max_steps": settings.steps})
    trained = steps.run(
        "train the fingerprint network (stain invariance: hed)",
        train_fingerprint,
        model,
        sources,
        config="demo",
        stain="hed",
        progress=not quiet,
        **overrides,
    )
    game = steps.run(
        "matching game on the test array",
        match,
        model,
        sources,
        progress=False,
        game_px=whole_core_px(settings.preset),
    )
    ids = _extract_all(steps, store, model, seed, settings.norm)
    rows = []
    for marker in settings.markers:
        folds = _folds(store, marker, ids[FINGERPRINT][0])[0]
        if folds < 3:
            continue
        chosen = steps.run(
            f"{marker}: choose each encoder's setting on tcga (CV)",
            _chosen_settings,
            store,
            marker,
            ids,
            folds,
            seed,
        )
        rows += steps.run(
            f"{marker}: external validation",
            _external,
            store,
            marker,
            chosen,
            settings.methods,
            folds,
            seed,
        )
    return {
        "seed": seed,
        "rows": [{"seed": seed, **r} for r in rows],
        "match": {
            k: game[k]
            for k in ("core_accuracy", "patient_accuracy", "n_cores", "n_patients", "crop_px")
        },
        "training": {k: trained[k] for k in ("steps", "seconds", "images_per_s", "n_classes")},
        "steps": log.steps,
    }


def _pool(estimates: list[float], variances: list[float]) -> dict:
    """Fixed-effect inverse-variance pooled estimate with its 95% CI."""
    weights = 1.0 / np.maximum(np.asarray(variances, float), 1e-8)
    mean = float((weights * np.asarray(estimates, float)).sum() / weights.sum())
    se = float(np.sqrt(1.0 / weights.sum()))
    return {
        "estimate": mean,
        "ci_low": mean - Z95 * se,
        "ci_high": mean + Z95 * se,
        "p": float(2 * normal.sf(abs(mean / se))),
    }


def pooled(rows: list[dict]) -> list[dict]:
    """Per marker and method across seeds: the pooled difference and each encoder's AUC."""
    out = []
    for key in dict.fromkeys((r["marker"], r["method"]) for r in rows):
        group = [r for r in rows if (r["marker"], r["method"]) == key]
        out.append(
            {
                "marker": key[0],
                "method": key[1],
                "seeds": [r["seed"] for r in group],
                "diff": _pool([r["diff"] for r in group], [r["var_diff"] for r in group]),
                "fingerprint": _pool(
                    [r["auc_fingerprint"] for r in group], [r["var_fingerprint"] for r in group]
                ),
                "control": _pool(
                    [r["auc_control"] for r in group], [r["var_control"] for r in group]
                ),
                "fingerprint_behind": [r["seed"] for r in group if r["diff"] < 0],
            }
        )
    return out


def markdown(result: dict) -> str:
    """The evidence table as Markdown: per seed, then pooled."""
    lines = [
        "| seed | marker | method | setting chosen on tcga (fingerprint / control) | "
        "external n (pos) | fingerprints | control | difference | DeLong p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        fp = r["fingerprint_setting"].removeprefix(FINGERPRINT).lstrip("+") or "plain"
        ctrl = r["control_setting"].removeprefix(CONTROL_ENCODER).lstrip("+") or "plain"
        lines.append(
            f"| {r['seed']} | {r['marker']} | {r['method']} | {fp} / {ctrl} | "
            f"{r['n']} ({r['positives']}) | {r['auc_fingerprint']:.3f} | {r['auc_control']:.3f} | "
            f"{r['diff']:+.3f} | {r['p']:.3g} |"
        )
    lines += [
        "",
        "| marker | method | seeds | fingerprints, pooled AUC [95% CI] | control, pooled AUC "
        "[95% CI] | difference, pooled [95% CI] | p | seeds where the fingerprints trail |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ci(d):
        return f"{d['estimate']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"

    for p in result["pooled"]:
        behind = ", ".join(map(str, p["fingerprint_behind"])) or "none"
        lines.append(
            f"| {p['marker']} | {p['method']} | {len(p['seeds'])} | {ci(p['fingerprint'])} | "
            f"{ci(p['control'])} | {p['diff']['estimate']:+.3f} [{p['diff']['ci_low']:+.3f}, "
            f"{p['diff']['ci_high']:+.3f}] | {p['diff']['p']:.2g} | {behind} |"
        )
    games = "; ".join(
        f"seed {s['seed']}: {s['match']['core_accuracy']:.2f} of cores, "
        f"{s['match']['patient_accuracy']:.2f} of patients"
        for s in result["seeds"]
    )
    sizes = sorted({s["match"].get("crop_px") for s in result["seeds"]} - {None})
    cut = f" (cores cut as {', '.join(map(str, sizes))} px squares)" if sizes else ""
    lines += ["", f"Matching game on each seed's test array{cut}: {games}."]
    return "\n".join(lines) + "\n"


def run_evidence(
    out: Path, settings: EvidenceSettings, force: bool = False, quiet: bool = False
) -> dict:
    """Every seed of ``settings`` into ``out``/seed-N, then the pooled table
    (``out``/evidence.json and evidence.md). A seed whose folder holds a finished
    ``seed.json`` is read back, not rerun, so an interrupted run resumes."""
    from fpstore.store.io import write_json_atomic, write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = []
    for seed in settings.seeds:
        folder = out / f"seed-{seed}"
        done = folder / "seed.json"
        if done.is_file() and not force:
            seeds.append(json.loads(done.read_text()))
            continue
        _prepare(folder, force=True)
        seeds.append(run_seed(folder, seed, settings, quiet))
        write_json_atomic(seeds[-1], done)
    rows = [r for s in seeds for r in s["rows"]]
    result = {"settings": asdict(settings), "seeds": seeds, "rows": rows, "pooled": pooled(rows)}
    write_json_atomic(result, out / "evidence.json")
    write_text_atomic(markdown(result), out / "evidence.md")
    return result


START, END = "<!-- evidence:start -->", "<!-- evidence:end -->"


def write_section(path: Path, table: str) -> None:
    """Replace the text between the evidence markers of a Markdown file with ``table``."""
    from fpstore.store.io import write_text_atomic

    text = Path(path).read_text()
    if START not in text or END not in text:
        raise ConfigError(
            f"{path} has no '{START}' ... '{END}' lines; add them where the table belongs"
        )
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    write_text_atomic(f"{head}{START}\n{table}{END}{tail}", Path(path))
