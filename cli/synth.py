"""`fpstore synth`: synthetic H&E cohorts, tissue microarrays, clinical tables and truth."""

from __future__ import annotations

import os
from pathlib import Path

import click

from fpstore.cli.common import echo_json, echo_table, json_option, seed_option
from fpstore.config import SYNTH_PARTS


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: give WIDTHxHEIGHT in level-0 pixels, e.g. 40000x30000"
        ) from None
    if not (512 <= w <= 200_000 and 512 <= h <= 200_000):
        raise click.BadParameter(f"{value!r}: each side must be within 512..200000 px")
    return w, h


@click.command("synth")
@click.option(
    "--preset",
    default="demo",
    show_default=True,
    help="small (tests, seconds), demo (about 2 min), paper (the paper's scale, hours).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Output folder (refused when not empty, unless --force).",
)
@seed_option
@click.option(
    "--no-signal",
    is_flag=True,
    help="Draw morphology independently of the labels (a negative control).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace what an earlier synth wrote in --out (other files are kept).",
)
@click.option(
    "--slide-size",
    callback=_size,
    metavar="WxH",
    help="Whole-slide size in level-0 px (0.25 um/px), e.g. 40000x30000.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Slides rendered in parallel [default: CPU count, at most 4].",
)
@click.option(
    "--only",
    multiple=True,
    type=click.Choice(SYNTH_PARTS),
    help="Write only these parts (repeatable), e.g. the paper preset's TMAs without "
    "its hours of whole slides [default: all].",
)
@json_option
def synth(preset, out, seed, no_signal, force, slide_size, workers, only, as_json):
    """Write synthetic H&E whole-slide cohorts (tcga-like, external), TMAs and truth masks.

    \b
    Example:
      fpstore synth --preset demo --out fpstore-demo/synth
      fpstore synth --preset small --out /tmp/s --no-signal --json
      fpstore synth --preset paper --only tma --out paper   # the matching game's arrays
    """
    from fpstore.synth import synthesize

    workers = workers or min(4, os.cpu_count() or 1)
    summary = synthesize(
        preset,
        out,
        seed=seed,
        signal=not no_signal,
        force=force,
        slide_size=slide_size,
        workers=workers,
        progress=not as_json,
        only=only or SYNTH_PARTS,
    )
    if as_json:
        echo_json(summary.to_dict())
        return
    echo_table(summary.cohorts, ["cohort", "patients", "slides", "ER+", "PR+", "Her2+"])
    defects = summary.defects.get("tcga")
    if defects:
        click.echo(
            f"\ntcga defects: patient without slide {defects['patient_without_slide']}, "
            f"slide without patient {defects['slide_without_patient_barcode']}"
        )
    click.echo(
        f"{summary.files} files, {summary.bytes / 1e6:.1f} MB in {summary.out} "
        f"({summary.seconds:.1f} s, preset {summary.preset}, seed {summary.seed}, "
        f"{'signal' if summary.signal else 'no signal'})"
    )


commands = [synth]
