"""`fpstore tissue predict|train|evaluate`: background, epithelium, stroma or fat per patch."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fpstore.cli.common import (
    cohort_option,
    echo_json,
    echo_table,
    json_option,
    resolve_cohort,
    seed_option,
    store_option,
)
from fpstore.config import TISSUE_TYPES as TYPES
from fpstore.tissue.methods import METHODS
from fpstore.tissue.methods import TRAINED_METHODS as TRAINED


def _pairs(values, flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key or not item:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint=flag)
        pairs[key] = item
    return pairs


def _thresholds(values):
    from fpstore.tissue.rules import RuleThresholds

    fields = RuleThresholds.__dataclass_fields__
    given = {}
    for key, value in _pairs(values, "--threshold").items():
        if key not in fields:
            raise click.BadParameter(
                f"unknown threshold {key!r}; thresholds: {', '.join(fields)}",
                param_hint="--threshold",
            )
        try:
            given[key] = float(value)
        except ValueError:
            raise click.BadParameter(
                f"{key}={value!r} is not a number", param_hint="--threshold"
            ) from None
    return RuleThresholds(**given)


threshold_option = click.option(
    "--threshold",
    "thresholds",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override a rule threshold, e.g. --threshold epithelium_margin=0.1 (repeatable; "
    "see fpstore/tissue/rules.py).",
)
encoder_option = click.option(
    "--encoder", help="Whose stored patches/fingerprints to use (default: the only one)."
)


@click.group("tissue")
def tissue():
    """Tissue types per patch: predict (write the tissue table), train, evaluate."""


@tissue.command("predict")
@cohort_option
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="rules",
    show_default=True,
    help="rules: label-free, reads pixels; fingerprint-*: trained, no pixels (fast).",
)
@click.option(
    "--model",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trained model (default: STORE/models/tissue/<method>.npz).",
)
@encoder_option
@threshold_option
@click.option(
    "--batch",
    type=click.IntRange(1, 4096),
    default=64,
    show_default=True,
    help="Patches read per batch (pixel methods).",
)
@store_option
@json_option
def predict(cohort, method, model, encoder, thresholds, batch, store_path, as_json):
    """Write a tissue type and class probabilities for every stored patch of a cohort.

    \b
    fpstore tissue predict --cohort tcga
    fpstore tissue predict --cohort tcga --method fingerprint-logreg
    Exits 1 when some slides could not be typed (the others are written).
    """
    from fpstore.tissue.type_patches import predict_tissue

    cohort = resolve_cohort(store_path, cohort)

    summary = predict_tissue(
        store_path,
        cohort,
        method,
        model,
        encoder,
        _thresholds(thresholds),
        batch,
        progress=not as_json,
    )
    if as_json:
        echo_json(summary.to_dict())
    else:
        click.echo(
            f"{summary.method}: {summary.n_patches} patches of {summary.n_slides} slides "
            f"in {summary.seconds:.1f} s -> {summary.out}"
        )
        echo_table([{"tissue_type": k, "patches": v} for k, v in summary.counts.items()])
        for failure in summary.failed:
            click.echo(f"failed {failure['slide_id']}: {failure['error']}", err=True)
    if summary.failed:
        sys.exit(1)


@tissue.command("train")
@click.option(
    "--method", type=click.Choice(TRAINED), default="fingerprint-logreg", show_default=True
)
@click.option(
    "--tiles",
    type=click.Path(path_type=Path, file_okay=False),
    help="Labelled tiles, one folder per class (background/epithelium/stroma/fat or "
    "aliases such as ADI, BACK, STR, TUM).",
)
@click.option(
    "--map",
    "mapping",
    multiple=True,
    metavar="FOLDER=TYPE",
    help="Tile folder name to tissue type (or 'skip'); repeatable.",
)
@click.option("--cohort", help="Train on a stored cohort's patches instead of tiles.")
@click.option(
    "--labels",
    type=click.Choice(["truth", "rules"]),
    help="Labels of the cohort's patches: truth masks (--truth) or the label-free rules.",
)
@click.option(
    "--truth", type=click.Path(path_type=Path), help="Folder of truth-mask PNGs (and truth.json)."
)
@click.option(
    "--downsample",
    type=click.FloatRange(min=1e-3),
    help="Level-0 pixels per truth-mask pixel, when truth.json does not say.",
)
@click.option(
    "--sample",
    type=click.IntRange(min=0),
    help="Train on at most this many patches of the cohort (default 20000; 0: all).",
)
@encoder_option
@click.option(
    "--encoder-option",
    "encoder_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Encoder options for --tiles, e.g. checkpoint=fingerprint.pt.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to save the model (default: STORE/models/tissue/<method>.npz).",
)
@click.option(
    "--C",
    "C",
    type=click.FloatRange(min=1e-6),
    default=1.0,
    show_default=True,
    help="Inverse L2 strength of the logistic regressions.",
)
@click.option(
    "--k",
    type=click.IntRange(1, 1000),
    default=15,
    show_default=True,
    help="Neighbours of fingerprint-knn.",
)
@threshold_option
@seed_option
@store_option
@json_option
def train(
    method,
    tiles,
    mapping,
    cohort,
    labels,
    truth,
    downsample,
    sample,
    encoder,
    encoder_options,
    out,
    C,
    k,
    thresholds,
    seed,
    store_path,
    as_json,
):
    """Fit a tissue classifier on labelled tiles or on a cohort's truth masks / rule labels.

    \b
    fpstore tissue train --tiles NCT-CRC-HE/ --encoder fingerprint \\
        --encoder-option checkpoint=fp.pt --map DEB=skip --map LYM=skip --map MUC=skip ...
    fpstore tissue train --cohort synth-tcga --labels truth --truth synth/truth
    fpstore tissue train --cohort tcga --labels rules --sample 20000
    """
    from fpstore.tissue.train import train_tissue
    from fpstore.tissue.trained import TissueTrainConfig

    if cohort and labels is None:
        labels = "truth" if truth else "rules"
    described = train_tissue(
        store_path,
        TissueTrainConfig(method=method, C=C, k=k, seed=seed),
        out=out,
        tiles=tiles,
        cohort=cohort,
        encoder=encoder,
        encoder_options=_pairs(encoder_options, "--encoder-option") or None,
        mapping=_pairs(mapping, "--map") or None,
        labels=labels,
        truth=truth,
        downsample=downsample,
        sample=sample,
        thresholds=_thresholds(thresholds) if thresholds else None,
        progress=not as_json,
    )
    if as_json:
        echo_json(described)
        return
    click.echo(
        f"{described['method']} ({described['source']}) trained on "
        f"{described['trained_on']['source']} -> {described['path']}"
    )
    echo_table(
        [{"tissue_type": t, "training patches": n} for t, n in described["train_counts"].items()]
    )
    for failure in described["trained_on"].get("failed", []):
        click.echo(f"skipped {failure['slide_id']}: {failure['error']}", err=True)


@tissue.command("evaluate")
@cohort_option
@click.option(
    "--truth",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder of truth-mask PNGs named by slide file stem (and truth.json), or a CSV of "
    "labelled patches on images (columns image,mpp,x,y,size_px,tissue_type,drawn; no store "
    "needed; e.g. tests/data/tissue_truth/real_tissue_truth.csv).",
)
@click.option(
    "--downsample",
    type=click.FloatRange(min=1e-3),
    help="Level-0 pixels per truth-mask pixel, when truth.json does not say.",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    type=click.Choice(METHODS),
    help="Compute and compare these methods (repeatable; nothing is written). "
    "Default: score the stored tissue table.",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="METHOD=PATH",
    help="Model file of a trained method (default: STORE/models/tissue/<method>.npz).",
)
@encoder_option
@threshold_option
@store_option
@json_option
def evaluate(cohort, truth, downsample, methods, models, encoder, thresholds, store_path, as_json):
    """Accuracy, per-class F1 and confusion matrix against truth masks.

    \b
    fpstore tissue evaluate --cohort synth-ext --truth synth/truth
    fpstore tissue evaluate --cohort synth-ext --truth synth/truth \\
        --method rules --method fingerprint-logreg --method pixel-logreg
    fpstore tissue evaluate --truth tests/data/tissue_truth/real_tissue_truth.csv
    """
    from fpstore.tissue.evaluate import evaluate_patch_truth, evaluate_tissue

    model_paths = {m: Path(p) for m, p in _pairs(models, "--model").items()}
    if truth.suffix.lower() == ".csv":
        report = evaluate_patch_truth(
            truth, list(methods) or None, model_paths, _thresholds(thresholds)
        )
    else:
        report = evaluate_tissue(
            store_path,
            resolve_cohort(store_path, cohort),
            truth,
            list(methods) or None,
            model_paths,
            encoder,
            downsample,
            _thresholds(thresholds),
            progress=not as_json,
        )
    if as_json:
        echo_json(report.to_dict())
        return
    click.echo(
        f"cohort {report.cohort}: {sum(report.truth_counts.values())} patches with truth "
        f"on {report.n_slides} slides ({len(report.slides_without_truth)} slides without "
        f"a mask); truth: " + ", ".join(f"{k} {v}" for k, v in report.truth_counts.items())
    )
    echo_table(
        [
            {
                "method": s.method,
                "accuracy": s.accuracy,
                "macro F1": s.macro_f1,
                **{f"F1 {t}": s.per_class[t]["f1"] for t in TYPES},
                "patches": s.n_patches,
                "seconds": s.seconds,
            }
            for s in report.methods
        ]
    )
    for s in report.methods:
        click.echo(f"\n{s.method}: confusion (rows true, columns predicted)")
        echo_table([{"true": t, **dict(zip(TYPES, row))} for t, row in zip(TYPES, s.confusion)])
        for failure in s.failed:
            click.echo(f"failed {failure['slide_id']}: {failure['error']}", err=True)


commands = [tissue]
