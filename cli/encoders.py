"""`fpstore encoders list|show`: every encoder, its dimension, scale, weights and licence."""

from __future__ import annotations

import click

from fpstore.cli.common import echo_json, echo_table, json_option


@click.group("encoders")
def encoders():
    """The encoders `fpstore extract --encoder` takes, and whether their weights are here."""


@encoders.command("list")
@json_option
def list_(as_json):
    """Every encoder: dimension, scale, weights on this machine (found where, or missing)
    and licence. Looks in the local Hugging Face cache only; nothing is downloaded."""
    from fpstore.encoders.catalog import encoder_rows

    rows = encoder_rows()
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        if row.get("patch_um") is not None:
            row["scale"] = f"{row['patch_um']:g} um -> {row['out_px']} px ({row['mpp']:g} um/px)"
        if row["weights"] == "missing" and row.get("fetch"):
            row["weights"] = f"missing: {row['fetch']}"
        elif row["weights"] == "cache":
            row["weights"] = f"cache: {row['weights_path']}"
    echo_table(rows, ["name", "dim", "scale", "weights", "licence"])


@encoders.command("show")
@click.argument("name")
@json_option
def show(name, as_json):
    """One encoder in full: for a foundation model its Hugging Face repository, timm
    architecture and arguments, pooling, normalisation and where its weights are."""
    from fpstore.encoders.catalog import encoder_details

    details = encoder_details(name)
    if as_json:
        echo_json(details)
        return
    for key, value in details.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        click.echo(f"{key:>12}: {'' if value is None else value}")


commands = [encoders]
