"""`fpstore classify` and `fpstore compare`: ER/PR/Her2 from fingerprints, the paper's protocol."""

from __future__ import annotations

import json

import click

from fpstore.classify.methods import SAVE_MODELS, compare_methods, method_names, method_spec
from fpstore.classify.settings import FOLDS_RANGE, PERMUTATIONS_RANGE
from fpstore.cli.common import (
    echo_json,
    echo_table,
    json_option,
    n_boot_option,
    resolve_cohort,
    seed_option,
    store_option,
)
from fpstore.config import MARKERS, POOLS, SPLITS

# The registries above are light (no numpy, no torch): `fpstore --help` stays fast.
POOLS_HELP = f"{' | '.join(POOLS)} (any '+'-joined tissue types)"
METHODS_HELP = "; ".join(f"{m}: {method_spec(m).summary}" for m in method_names())


def _settings(values) -> dict:
    """KEY=VALUE pairs; values parsed as JSON where they can be (numbers, true, null)."""
    out = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--set")
        try:
            out[key] = json.loads(item)
        except json.JSONDecodeError:
            out[key] = item
    return out


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


common_options = [
    click.option("--marker", type=click.Choice(MARKERS), required=True, help="The receptor."),
    click.option(
        "--cohort", help="The training cohort, cross-validated (default: the store's only one)."
    ),
    click.option("--external", help="Train on the whole --cohort, test once on this cohort."),
    click.option(
        "--folds",
        type=click.IntRange(*FOLDS_RANGE),
        default=5,
        show_default=True,
        help="Patient groups: each fold trains on k-2, early-stops on 1, tests on 1.",
    ),
    click.option(
        "--split",
        type=click.Choice(SPLITS),
        default="patient",
        show_default=True,
        help="site: groups are whole sites (TCGA tissue-source sites).",
    ),
    n_boot_option(),
    click.option(
        "--patches",
        type=click.IntRange(1),
        help="Patches per patient, a seeded random draw from the stored ones (the paper: "
        "120); default: every stored patch. On an all-patch store it draws what "
        "`extract --patches N --seed SEED` would have extracted.",
    ),
]


def _with(options):
    def wrap(f):
        for option in reversed(options):
            f = option(f)
        return f

    return wrap


def _auc_cell(m: dict) -> str:
    return f"{m['auc']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


@click.command("classify")
@_with(common_options)
@click.option(
    "--pool",
    default="all",
    show_default=True,
    help=f"Patches a patient's score averages: {POOLS_HELP}.",
)
@click.option(
    "--method",
    type=click.Choice(method_names()),
    default="mil",
    show_default=True,
    help=METHODS_HELP + ".",
)
@click.option(
    "--encoder", help="Fingerprints of this encoder (default: the only one in the store)."
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="A classifier setting, e.g. --set max_epochs=50 (mil), --set arch=resnet34 (patch-cnn).",
)
@click.option("--no-site-probe", is_flag=True, help="Skip the site-leakage probe.")
@click.option(
    "--permutations",
    type=click.IntRange(*PERMUTATIONS_RANGE),
    default=0,
    show_default=True,
    help="Rerun the CV on labels shuffled within sites N times: the AUC's null "
    "distribution and a p-value (e.g. 200).",
)
@click.option(
    "--save-models",
    type=click.Choice(SAVE_MODELS),
    default="final",
    show_default=True,
    help="final: the model trained on the whole cohort, for `fpstore predict`; all: the "
    "fold models too; none.",
)
@seed_option
@store_option
@json_option
def classify_command(
    marker,
    cohort,
    external,
    folds,
    split,
    n_boot,
    patches,
    pool,
    method,
    encoder,
    settings,
    no_site_probe,
    permutations,
    save_models,
    seed,
    store_path,
    as_json,
):
    """Predict a receptor per patient with the paper's cross-validation protocol.

    \b
    fpstore classify --marker ER --cohort tcga --patches 120
    fpstore classify --marker Her2 --cohort tcga --pool epithelium --split site
    fpstore classify --marker ER --cohort tcga --permutations 200   # null AUC and p-value
    fpstore classify --marker ER --cohort tcga --external abctb --json
    Predictions and the run's config go to STORE/runs/<run_id>/, the final model (trained on
    the whole cohort) to STORE/models/classify/<run_id>/ for `fpstore predict`.
    """
    from fpstore.classify.pipeline import ClassifyConfig, classify

    cfg = ClassifyConfig(
        marker=marker,
        cohort=resolve_cohort(store_path, cohort),
        pool=pool,
        method=method,
        encoder=encoder,
        external=external,
        folds=folds,
        split=split,
        seed=seed,
        n_boot=n_boot,
        site_probe=not no_site_probe,
        permutations=permutations,
        classifier=_settings(settings),
        patches=patches,
        save_models=save_models,
    )
    document = classify(store_path, cfg, progress=not as_json)
    if as_json:
        echo_json(document)
        return
    _print_classify(document, cfg)


def _print_classify(document: dict, cfg) -> None:
    """The run as text: notes, folds and pooled AUC, the data, the probe and the test."""
    marker, method, pool, split = cfg.marker, cfg.method, cfg.pool, cfg.split
    for note in document.get("notes", []):
        click.echo(f"note: {note}")
    cv = document["cv"]
    rows = [
        {
            "test": f"fold {f['fold']}",
            "patients": f["n_test"],
            "positive": f["n_test_pos"],
            "AUC": None if f["auc"] is None else f"{f['auc']:.3f}",
        }
        for f in cv["folds"]
    ]
    m = cv["metrics"]
    rows.append({"test": "pooled", "patients": m["n"], "positive": m["n_pos"], "AUC": _auc_cell(m)})
    if "external_validation" in document:
        e = document["external_validation"]["metrics"]
        rows.append(
            {
                "test": f"external {cfg.external}",
                "patients": e["n"],
                "positive": e["n_pos"],
                "AUC": _auc_cell(e),
            }
        )
    data = document["data"]
    click.echo(
        f"{marker} | {method} | {document['config']['encoder'] or 'pixels'} | pool {pool} | "
        f"split {split} | {data['patients']} patients, {data['patches']} patches "
        f"(excluded: {data.get('missing_label', 0)} without a label, "
        f"{data.get('no_patches', 0)} without patches, "
        f"{data.get('no_pool_patches', 0)} without {pool} patches)"
    )
    echo_table(rows, ["test", "patients", "positive", "AUC"])
    click.echo(
        f"mean fold AUC {m['mean_fold_auc']:.3f} (sd {m['sd_fold_auc']:.3f}); AUC [95% CI] "
        "by patient bootstrap"
    )
    probe = document.get("site_probe")
    if probe:
        click.echo(_probe_line(probe))
    if "permutation" in document:
        click.echo(_permutation_line(document["permutation"]))
    click.echo(f"saved {document.get('run_path')}")
    if "model" in document:
        click.echo(
            f"model {document['model']['model_id']} saved in {document['model']['path']}; "
            f"score other cohorts with `fpstore predict --model {document['model']['model_id']}`"
        )


def _probe_line(probe: dict) -> str:
    if "skipped" in probe:
        return f"site probe: skipped ({probe['skipped']})"
    return (
        f"site probe: fingerprints predict the site of {probe['n_patients']} patients "
        f"({probe['n_sites']} sites) with balanced accuracy {probe['balanced_accuracy']:.2f} "
        f"(chance {probe['chance_balanced_accuracy']:.2f}), macro AUC {probe['macro_auc']:.2f}"
    )


def _permutation_line(perm: dict) -> str:
    skipped = f", {perm['skipped']} skipped" if perm["skipped"] else ""
    return (
        f"permutation test ({perm['n_permutations']} label shuffles within "
        f"{perm['shuffled_within']}{skipped}): null AUC {perm['null_mean']:.3f} "
        f"[{perm['null_q025']:.3f}, {perm['null_q975']:.3f}], p = {perm['p_value']:.3g}"
    )


@click.command("compare")
@_with(common_options)
@click.option(
    "--methods",
    default=",".join(compare_methods()),
    show_default=True,
    help=f"Comma-separated, from: {', '.join(method_names())}.",
)
@click.option("--encoders", help="Comma-separated encoder ids (default: all with fingerprints).")
@click.option(
    "--pools",
    help="Comma-separated pools (default: all five if tissue types exist, else all). "
    f"{POOLS_HELP}.",
)
@seed_option
@store_option
@json_option
def compare_command(
    marker,
    cohort,
    external,
    folds,
    split,
    n_boot,
    patches,
    methods,
    encoders,
    pools,
    seed,
    store_path,
    as_json,
):
    """Methods x encoders x pools on identical splits, with CIs and DeLong p-values.

    \b
    fpstore compare --marker ER --cohort tcga
    fpstore compare --marker PR --cohort tcga --encoders fingerprint,imagenet-resnet34 \\
        --pools all,epithelium
    fpstore compare --marker ER --cohort tcga --external abctb
    p vs first: DeLong's paired test against the first row, on the patients both scored.
    """
    from fpstore.classify.pipeline import CompareConfig, compare

    for m in _csv(methods) or ():
        if m not in method_names():
            raise click.BadParameter(
                f"unknown method {m!r}; choose from {', '.join(method_names())}",
                param_hint="--methods",
            )
    cfg = CompareConfig(
        marker=marker,
        cohort=resolve_cohort(store_path, cohort),
        external=external,
        methods=_csv(methods) or (),
        encoders=_csv(encoders),
        pools=_csv(pools),
        folds=folds,
        split=split,
        seed=seed,
        n_boot=n_boot,
        patches=patches,
    )
    document = compare(store_path, cfg, progress=not as_json)
    if as_json:
        echo_json(document)
        return
    click.echo(f"{marker} on {document['evaluated_on']}; AUC [95% CI] by patient bootstrap")
    echo_table(
        [
            {
                "method": r["method"],
                "encoder": r["encoder"],
                "pool": r["pool"],
                "patients": r["n"],
                "AUC [95% CI]": _auc_cell(r),
                "p vs first": None if r["p_vs_first"] is None else f"{r['p_vs_first']:.3g}",
            }
            for r in document["rows"]
        ]
    )
    for s in document["skipped"]:
        click.echo(f"skipped {s['name']}: {s['reason']}")
    for note in document["notes"]:
        click.echo(f"note: {note}")
    for encoder, probe in document["site_probe"].items():
        click.echo(f"{encoder}: {_probe_line(probe)}")


commands = [classify_command, compare_command]
