"""Options and helpers shared by the command modules."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import click
from click.core import ParameterSource

from fpstore.classify.settings import N_BOOT_RANGE
from fpstore.config import DEVICES

DEFAULT_STORE = "fpstore-store"
# Where a command's --store comes from, first found wins: the command's own --store
# (`fpstore sql Q --store S`), the one given before the command (`fpstore --store S sql Q`,
# kept by cli/main.py in ctx.obj), $FPSTORE_STORE, ./fpstore-store.
GLOBAL_STORE_KEY = "store"

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def _store_before_command(ctx, param, value):
    """The --store given before the command, where the command's own was not given."""
    given = (ctx.find_root().obj or {}).get(GLOBAL_STORE_KEY)
    if given is None or ctx.get_parameter_source(param.name) is not ParameterSource.DEFAULT:
        return value
    return param.type.convert(given, param, ctx)


def _local_store(ctx, param, value):
    from fpstore.store.remote import local_path

    value = _store_before_command(ctx, param, value)
    # click.Path has already folded "s3://b/p" into "s3:/b/p": catch it before a folder "s3:" is made.
    if value is not None and _URL.match(str(value)) and not str(value).startswith("file:"):
        raise click.BadParameter(
            f"{value}: this command needs a local store folder; object "
            "storage URLs work with `cohort`, `extract --engine ray` and `sql`"
        )
    return None if value is None else local_path(value)


def _any_store(ctx, param, value):
    from fpstore.store.remote import is_remote, local_path

    value = _store_before_command(ctx, param, value)
    return value if is_remote(value) else local_path(value)


store_option = click.option(
    "--store",
    "store_path",
    type=click.Path(path_type=Path, file_okay=False),
    default=lambda: os.environ.get("FPSTORE_STORE", DEFAULT_STORE),
    show_default=f"fpstore --store, $FPSTORE_STORE or ./{DEFAULT_STORE}",
    callback=_local_store,
    help="The fpstore store folder (here or before the command: fpstore --store DIR ...).",
)
# For the commands that also work on object storage (see fpstore/store/remote.py).
store_url_option = click.option(
    "--store",
    "store_path",
    default=lambda: os.environ.get("FPSTORE_STORE", DEFAULT_STORE),
    show_default=f"fpstore --store, $FPSTORE_STORE or ./{DEFAULT_STORE}",
    callback=_any_store,
    help="The fpstore store: a folder, or an object-storage URL such as s3://bucket/prefix "
    "(here or before the command: fpstore --store S ...).",
)
# For the commands that work without a store and use one when given (fpstore patches).
optional_store_option = click.option(
    "--store",
    "store_path",
    type=click.Path(path_type=Path, file_okay=False),
    default=lambda: os.environ.get("FPSTORE_STORE"),
    show_default="fpstore --store or $FPSTORE_STORE, if given",
    callback=_local_store,
    help="A store whose remembered tissue mask of this slide file to reuse (or to remember "
    "this one in for `fpstore extract`); without one the mask is computed and not kept.",
)
cohort_option = click.option(
    "--cohort",
    help="The cohort (see `fpstore cohort list`); default: the store's only cohort.",
)


def resolve_cohort(store_path, cohort: str | None) -> str:
    """The cohort given, or the store's only one (one line naming them otherwise)."""
    from fpstore.store.cohorts import resolve_cohort as resolve

    return resolve(store_path, cohort)


def device_option(help: str = "Where the network runs; auto: CUDA when one is visible."):
    """--device, the library's list (``fpstore.config.DEVICES``)."""
    return click.option(
        "--device", type=click.Choice(DEVICES), default="auto", show_default=True, help=help
    )


def precision_option(precisions, help: str, default: str | None = "auto"):
    """--precision: "auto" or one of ``precisions``, the library's list for this use
    (``fpstore.config.PRECISIONS`` to run an encoder, ``TRAIN_PRECISIONS`` to train)."""
    return click.option(
        "--precision",
        type=click.Choice(("auto", *precisions)),
        default=default,
        show_default=default is not None,
        help=help,
    )


def n_boot_option(help: str = "Bootstrap resamples for the 95% CI."):
    """--n-boot, in the range every CI of the library accepts."""
    return click.option(
        "--n-boot", type=click.IntRange(*N_BOOT_RANGE), default=2000, show_default=True, help=help
    )


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")


def echo_json(document) -> None:
    """Print a JSON document (numpy scalars and paths converted)."""
    click.echo(json.dumps(document, indent=2, default=jsonable))


def jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def echo_table(rows: list[dict], columns: list[str] | None = None) -> list[int]:
    """Print rows as an aligned text table; returns the column widths (for echo_table_rows)."""
    if not rows:
        click.echo("(no rows)")
        return []
    columns = columns or list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    click.echo("  ".join("-" * w for w in widths))
    echo_table_rows(rows, columns, widths)
    return widths


def echo_table_rows(rows: list[dict], columns: list[str], widths: list[int]) -> None:
    """More rows of a table echo_table started, in its widths."""
    for row in rows:
        click.echo("  ".join(_cell(row.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
