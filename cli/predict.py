"""`fpstore predict`: score a cohort, or new slides, with a model `fpstore classify` saved."""

from __future__ import annotations

from pathlib import Path

import click

from fpstore.cli.common import (
    device_option,
    echo_json,
    echo_table,
    json_option,
    n_boot_option,
    seed_option,
    store_option,
)


def _patches(value: str) -> int | str:
    if value in ("model", "all"):
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(
            f"{value!r}: give a number of patches per patient, 'all' or 'model'",
            param_hint="--patches",
        )
    return n


@click.command("predict")
@click.option(
    "--model",
    "model",
    required=True,
    help="A model id of the store (`fpstore models list`) or the path of a model folder.",
)
@click.option(
    "--cohort",
    help="The cohort to score; with --slides, the name to register the slides under.",
)
@click.option(
    "--slides",
    multiple=True,
    help="Glob ('scans/*.svs'), folder or slide file, repeatable: registered as an unlabelled "
    "cohort (each slide its own patient) and extracted with the model's encoder.",
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path, dir_okay=False),
    help="--slides: the fingerprint checkpoint, where it is not at the path the card names.",
)
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    help="--slides: the encoder's weights file (or a foundation model's folder), where it is "
    "not at the path the card names.",
)
@click.option(
    "--patches",
    default="model",
    show_default=True,
    help="Patches per patient: 'model' (as the model was trained), 'all', or a number.",
)
@click.option(
    "--fold",
    type=click.IntRange(0, 19),
    help="Score with this fold's model (saved with "
    "`classify --save-models all`) instead of the final one.",
)
@n_boot_option(help="Bootstrap resamples for the 95% CI (labelled cohorts).")
@device_option(help="--slides: where the encoder runs; auto: CUDA when one is visible.")
@seed_option
@store_option
@json_option
def predict_command(
    model,
    cohort,
    slides,
    checkpoint,
    weights,
    patches,
    fold,
    n_boot,
    device,
    seed,
    store_path,
    as_json,
):
    """Score every patient of a cohort (labelled or not) with a saved model.

    \b
    fpstore predict --model 20261130T...-ER-mil-1a2b3c4d --cohort abctb
    fpstore predict --model shipped/ER-model --slides 'scans/*.svs' --checkpoint fp.pt
    Predictions go to STORE/runs/<run_id>/ like a classify run's (heatmaps and `fpstore
    report` read them); with labels, the AUC [95% CI] and DeLong's test against the other
    runs that scored the same patients.
    """
    from fpstore.classify.predict import PredictConfig, predict

    options = {}
    if checkpoint:
        options["checkpoint"] = checkpoint
    if weights:
        options["weights"] = weights
    if options and not slides:
        raise click.BadParameter(
            "--checkpoint and --weights build the encoder for --slides", param_hint="--slides"
        )
    cfg = PredictConfig(
        model=model,
        cohort=cohort,
        slides=tuple(slides),
        fold=fold,
        patches=_patches(patches),
        seed=seed,
        n_boot=n_boot,
        encoder_options=options,
        device=device,
    )
    document = predict(store_path, cfg, progress=not as_json)
    if as_json:
        echo_json(document)
        return
    c, data = document["config"], document["data"]
    click.echo(
        f"{c['marker']} | {c['method']} | {c['encoder'] or 'pixels'} | pool {c['pool']} | "
        f"model {c['model']} ({c['which']}, trained on {c['trained_on']}) | cohort {c['cohort']}: "
        f"{data['patients']} patients ({data['labelled']} labelled), {data['patches']} patches"
    )
    m = document["predict"]["metrics"]
    if m:
        click.echo(
            f"AUC {m['auc']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}] on {m['n']} labelled "
            f"patients ({m['n_pos']} positive); 95% CI by patient bootstrap"
        )
    else:
        click.echo("no AUC: the cohort's labelled patients are not of both classes")
    if document["delong"]:
        echo_table(
            [
                {
                    "other run": r["run"],
                    "method": r["method"],
                    "role": r["role"],
                    "shared": r["n_shared"],
                    "AUC here": f"{r['auc_this']:.3f}",
                    "AUC there": f"{r['auc_other']:.3f}",
                    "DeLong p": f"{r['p']:.3g}",
                }
                for r in document["delong"]
            ]
        )
    for note in document.get("notes", []):
        click.echo(f"note: {note}")
    if "run_path" in document:
        click.echo(
            f"saved {document['run_path']}; heatmaps and report: "
            f"`fpstore report --run {document['run_id']}`"
        )


commands = [predict_command]
