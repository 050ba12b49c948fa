"""`fpstore patches`: preview one slide's tissue mask and patch grid before a long run."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fpstore.cli.common import echo_json, echo_table, json_option

_SHOWN = 10  # patches listed in the text summary; --json and the CSV hold them all


@click.command("patches")
@click.argument("slide", type=click.Path(path_type=Path, exists=True))
@click.option("--mpp", type=float, help="Microns per pixel; overrides the slide's metadata.")
@click.option(
    "--patch-um", type=float, default=112.0, show_default=True, help="Side of a patch in microns."
)
@click.option(
    "--out-px",
    type=int,
    default=224,
    show_default=True,
    help="Side of a patch after resizing, in pixels.",
)
@click.option(
    "--min-tissue",
    type=click.FloatRange(0.0, 1.0),
    default=0.5,
    show_default=True,
    help="Keep squares with at least this tissue fraction (as `fpstore extract --min-tissue`).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("."),
    show_default=True,
    help="Folder for <slide_id>.patches.png and .patches.csv.",
)
@click.option(
    "--max-px", type=int, default=2048, show_default=True, help="Longest side of the preview image."
)
@json_option
def patches(slide, mpp, patch_um, out_px, min_tissue, out, max_px, as_json):
    """Find the tissue of SLIDE and the patches an extraction would read from it: write the
    thumbnail with the tissue mask, the pen and ink removed from it, and the patch grid drawn
    over it (PNG), the patch list (CSV, level-0 pixels), and print the mpp used and where it
    came from, the pyramid level read, the patch count and the share removed as pen or ink.
    Exits 1 when the slide has no patch (no tissue found: a blank or a fluorescence scan),
    as extraction would fail it; the preview is still written, to show why.

    \b
    fpstore patches slides/CMU-1-Small-Region.svs --out preview/
    fpstore patches overview.jpg --mpp 2.0 --patch-um 112 --json
    """
    from fpstore.config import PatchSpec
    from fpstore.slides.preview import preview_patches

    if max_px < 64:
        raise click.BadParameter(
            f"{max_px} is too small for a preview; use 64 or more", param_hint="--max-px"
        )
    spec = PatchSpec(patch_um=patch_um, out_px=out_px, min_tissue=min_tissue)
    preview = preview_patches(slide, spec, mpp=mpp, out=out, max_px=max_px)
    document = preview.to_dict()
    if as_json:
        echo_json(document)
        _exit_without_patches(preview)
        return
    shown = document["patches"][:_SHOWN]
    if shown:
        echo_table(shown, ["x", "y", "size_px", "tissue_fraction"])
    if preview.patch_count > _SHOWN:
        click.echo(f"... {preview.patch_count - _SHOWN} more in {preview.patches_csv}")
    d = document
    click.echo(
        f"{d['slide_id']}: {d['width']}x{d['height']} px, mpp {d['mpp']:.4g} ({d['mpp_source']}), "
        f"{d['vendor']} via {d['reader']}\n"
        f"{d['patch_count']} patches of {d['patch_um']:g} um = {d['size_px']:.1f} level-0 px, "
        f"read at level {d['level_read']} (downsample {d['level_downsample']:.3g}, "
        f"{d['read_px']} px) and resized to {d['out_px']} px; "
        f"tissue {100 * d['tissue_fraction']:.1f}% of the slide, "
        f"{100 * d['pen_fraction']:.1f}% of the would-be tissue removed as pen or ink\n"
        f"preview {d['image']}, patch list {d['patches_csv']}"
    )
    _exit_without_patches(preview)


def _exit_without_patches(preview) -> None:
    if preview.no_patch_reason:
        click.echo(f"error: {preview.info.slide_id}: {preview.no_patch_reason}", err=True)
        sys.exit(1)


commands = [patches]
