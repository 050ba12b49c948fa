"""The ``fpstore`` entry point.

Commands are discovered from the modules of this package: each module lists its
click commands in a module-level ``commands`` list. Errors that fpstore raises on
purpose print as one line and exit non-zero; ``--debug`` shows the traceback.

``--store`` may come before the command, as with git (``fpstore --store S sql Q``), or
after it (``fpstore sql Q --store S``); the command's own wins when both are given (see
``GLOBAL_STORE_KEY`` in common.py).
"""

from __future__ import annotations

import errno
import importlib
import pkgutil
import sys

import click

import fpstore
from fpstore.cli.common import DEFAULT_STORE, GLOBAL_STORE_KEY
from fpstore.errors import FpstoreError

_NOT_COMMAND_MODULES = {"main", "common"}
# Errors of the machine, not of fpstore: one line each, with what to do.
_FILESYSTEM_ERRORS = {
    errno.ENOSPC: "free some space and rerun (finished work is kept)",
    errno.EDQUOT: "the disk quota is full: free some space and rerun",
    errno.EACCES: "check the permissions of the store and the slides",
    errno.EPERM: "check the permissions of the store and the slides",
    errno.EROFS: "the file system is read-only: choose another --store",
}


class FpstoreGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FpstoreError as error:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except OSError as error:
            if ctx.obj and ctx.obj.get("debug") or error.errno not in _FILESYSTEM_ERRORS:
                raise
            where = f" ({error.filename})" if error.filename else ""
            click.echo(
                f"error: {error.strerror}{where}: {_FILESYSTEM_ERRORS[error.errno]}; "
                "files already written are whole (each is written aside and renamed)",
                err=True,
            )
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _discover(group: click.Group) -> None:
    package = importlib.import_module("fpstore.cli")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in _NOT_COMMAND_MODULES:
            continue
        module = importlib.import_module(f"fpstore.cli.{info.name}")
        for command in getattr(module, "commands", []):
            group.add_command(command)


@click.group(cls=FpstoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(fpstore.__version__, prog_name="fpstore")
@click.option(
    "--store",
    metavar="STORE",
    help="The store for the command that follows (a folder, or an object-storage URL where "
    "the command takes one); the same as the command's own --store, which wins if both are "
    f"given. Default: $FPSTORE_STORE or ./{DEFAULT_STORE}. Commands without a store "
    "(synth, demo, patches, tma, ...) ignore it, as they ignore $FPSTORE_STORE.",
)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx, store, debug):
    """fpstore: tissue fingerprints from H&E slides into a queryable store.

    A typical run: synth (or cohort add) -> train-fingerprint -> extract ->
    tissue predict -> classify -> report. `fpstore demo` runs it all.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj[GLOBAL_STORE_KEY] = store


_discover(cli)

if __name__ == "__main__":
    cli()
