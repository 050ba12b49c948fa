"""`fpstore export` and `fpstore import`: feature files other tools read, in and out."""

from __future__ import annotations

from pathlib import Path

import click

from fpstore.cli.common import (
    cohort_option,
    echo_json,
    echo_table,
    json_option,
    resolve_cohort,
    store_option,
)

# The library's lists (fpstore.extract.exchange), kept here so --help needs no numpy.
EXPORT_FORMATS = ("trident", "stamp", "h5ad")
IMPORT_FORMATS = ("auto", "trident", "stamp")


def _summary(summary, verb: str, as_json: bool) -> None:
    if as_json:
        echo_json(summary.to_dict())
        return
    click.echo(
        f"{verb} {summary.n_patches} patches of {summary.n_slides} slides "
        f"({summary.encoder}, {summary.dim}-D, {summary.format}) in {summary.seconds:.1f} s: "
        f"{summary.out}"
    )
    if summary.skipped:
        echo_table(summary.skipped, ["file", "reason"])


@click.command("export")
@cohort_option
@click.option("--encoder", help="The encoder whose fingerprints to export (default: the only one).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(EXPORT_FORMATS),
    default="trident",
    show_default=True,
    help="trident: <slide>.h5 with 'features' and level-0 'coords' (TRIDENT, CLAM); stamp: "
    "'feats' and micron 'coords' (STAMP); h5ad: one AnnData file, a row per patch.",
)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
@store_option
@json_option
def export(cohort, encoder, fmt, out, store_path, as_json):
    """Write a cohort's fingerprints as the feature files other tools read."""
    from fpstore.extract.exchange import export_features

    cohort = resolve_cohort(store_path, cohort)
    _summary(export_features(store_path, cohort, encoder, out, fmt), "exported", as_json)


@click.command("import")
@click.argument("folder", type=click.Path(path_type=Path, exists=True))
@cohort_option
@click.option(
    "--encoder-id",
    help="The id to store the features under (e.g. uni); an fpstore export keeps its own.",
)
@click.option(
    "--format", "fmt", type=click.Choice(IMPORT_FORMATS), default="auto", show_default=True
)
@click.option(
    "--patch-um",
    type=click.FloatRange(1.0, 10_000.0),
    help="The patches' side in microns, where the files do not say (default: from them).",
)
@click.option("--force", is_flag=True, help="Replace the encoder's fingerprints of the cohort.")
@store_option
@json_option
def import_(folder, cohort, encoder_id, fmt, patch_um, force, store_path, as_json):
    """Bring per-slide feature files (TRIDENT/CLAM, STAMP, fpstore exports) of a FOLDER into
    the store, matched to the cohort's slides by file name."""
    from fpstore.extract.exchange import import_features

    cohort = resolve_cohort(store_path, cohort)
    summary = import_features(store_path, cohort, folder, encoder_id, fmt, patch_um, force)
    _summary(summary, "imported", as_json)


commands = [export, import_]
