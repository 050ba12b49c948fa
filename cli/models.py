"""`fpstore models list|show`: the classifiers `fpstore classify` saved, with their cards."""

from __future__ import annotations

import click

from fpstore.cli.common import echo_json, echo_table, json_option, store_option


@click.group("models")
def models():
    """Saved classifiers: their cards (marker, method, encoder, training cohort, CV AUC)."""


@models.command("list")
@store_option
@json_option
def list_(store_path, as_json):
    """The store's saved models, oldest first."""
    from fpstore.classify.saved_models import model_rows

    rows = model_rows(store_path)
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        if row["cv_auc"] is not None:
            row["cv AUC [95% CI]"] = (
                f"{row['cv_auc']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
            )
    echo_table(
        rows,
        [
            "model",
            "marker",
            "method",
            "encoder",
            "pool",
            "patches",
            "trained on",
            "patients",
            "cv AUC [95% CI]",
            "models",
        ],
    )


@models.command("show")
@click.argument("model")
@store_option
@json_option
def show(model, store_path, as_json):
    """A model's card: MODEL is a model id of the store or the path of a model folder."""
    from fpstore.classify.saved_models import card_page, load_model

    saved = load_model(store_path, model)
    if as_json:
        echo_json({**saved.card, "folder": str(saved.folder)})
        return
    click.echo(card_page(saved.card))
    click.echo(f"folder: {saved.folder}")


commands = [models]
