"""Options and helpers shared by the command modules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

DEFAULT_STORE = "fpstore-store"

store_option = click.option(
    "--store",
    "store_path",
    type=click.Path(path_type=Path, file_okay=False),
    default=lambda: os.environ.get("FPSTORE_STORE", DEFAULT_STORE),
    show_default=f"$FPSTORE_STORE or ./{DEFAULT_STORE}",
    help="The fpstore store folder.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")


def echo_json(document) -> None:
    """Print a JSON document (numpy scalars and paths converted)."""
    click.echo(json.dumps(document, indent=2, default=_jsonable))


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def echo_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print rows as an aligned text table."""
    if not rows:
        click.echo("(no rows)")
        return
    columns = columns or list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    click.echo("  ".join("-" * w for w in widths))
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
