"""`fpstore sql` and `fpstore similar`: queries over the store."""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import click

from fpstore.cli.common import (
    echo_json,
    echo_table,
    echo_table_rows,
    json_option,
    jsonable,
    store_option,
    store_url_option,
)


@click.command("sql")
@click.argument("query")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@click.option(
    "--memory-limit",
    metavar="SIZE",
    help="DuckDB memory for the query, e.g. 8GB (default: a quarter of the RAM); "
    "twice as much may spill to a private temporary folder.",
)
@click.option(
    "--threads",
    type=click.IntRange(1, None),
    help="DuckDB threads (default: half the cores).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0, None, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds before the query, output included, is stopped.",
)
@store_url_option
def sql(query, fmt, memory_limit, threads, timeout, store_path):
    """Run a SQL QUERY over the store's views (SELECT only; rows are streamed out).

    Views: fingerprints (FLOAT[dim]), patches, slides, labels, tissue, predictions,
    patch_predictions, patch_attention. Example:

      fpstore sql "SELECT site, count(*) FROM patches GROUP BY site" --format csv
    """
    import fpstore.store
    from fpstore.store.sql import SqlLimits

    limits = SqlLimits.for_machine(memory_limit, threads, timeout)
    with fpstore.store.open(store_path, read_only=True, limits=limits) as store:
        {"csv": _write_csv, "json": _write_json, "table": _write_table}[fmt](store.stream(query))


def _write_csv(batches) -> None:
    writer = None
    for names, rows in batches:
        if rows and writer is None:
            writer = csv.DictWriter(sys.stdout, fieldnames=names, lineterminator="\n")
            writer.writeheader()
        if rows:
            writer.writerows(rows)


def _write_json(batches) -> None:
    """The rows as one JSON list, written row by row."""
    first = True
    for _, rows in batches:
        for row in rows:
            item = textwrap.indent(json.dumps(row, indent=2, default=jsonable), "  ")
            sys.stdout.write(("[\n" if first else ",\n") + item)
            first = False
    sys.stdout.write("[]\n" if first else "\n]\n")


def _write_table(batches) -> None:
    """Aligned to the widths of the first rows (later batches print without waiting for all)."""
    widths: list[int] = []
    for names, rows in batches:
        if rows and not widths:
            widths = echo_table(rows, names)
        elif rows:
            echo_table_rows(rows, names, widths)
    if not widths:
        echo_table([])


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
