"""`fpstore sql` and `fpstore similar`: queries over the store."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import click

from fpstore.cli.common import echo_json, echo_table, json_option, store_option, store_url_option


@click.command("sql")
@click.argument("query")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@store_url_option
def sql(query, fmt, store_path):
    """Run a SQL QUERY over the store's views.

    Views: fingerprints (FLOAT[dim]), patches, slides, labels, tissue, predictions,
    patch_predictions, patch_attention. Example:

      fpstore sql "SELECT site, count(*) FROM patches GROUP BY site" --format csv
    """
    import fpstore.store

    with fpstore.store.open(store_path, read_only=True) as store:
        rows = store.sql(query).rows()
    if fmt == "json":
        echo_json(rows)
    elif fmt == "csv":
        if rows:
            writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    else:
        echo_table(rows)


@click.command("similar")
@click.option("--patch", "patch_id", required=True, help="Patch id, '<slide_id>/<x>_<y>_<size>'.")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--cohort", help="Search this cohort only (default: every cohort).")
@click.option("--encoder", help="Encoder whose fingerprints to compare (default: the only one).")
@click.option(
    "--montage",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("similar.png"),
    show_default=True,
    help="PNG of the query and its hits.",
)
@click.option("--no-montage", is_flag=True, help="Skip the PNG (no slide reading).")
@store_option
@json_option
def similar(patch_id, k, cohort, encoder, montage, no_montage, store_path, as_json):
    """Nearest patches to one patch by cosine similarity of fingerprints (histologic search)."""
    import fpstore.store
    from fpstore.report.montage import similar_montage

    with fpstore.store.open(store_path) as store:
        result = similar_montage(
            store, patch_id, k, encoder, cohort, None if no_montage else montage
        )
    if as_json:
        echo_json(result.to_dict())
        return
    echo_table(result.hits, ["rank", "similarity", "cohort", "patient_id", "slide_id", "patch_id"])
    if result.montage:
        click.echo(f"\nmontage: {result.montage}")


commands = [sql, similar]
