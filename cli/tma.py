"""`fpstore tma dearray`: find, number and crop the cores of a tissue microarray slide."""

from __future__ import annotations

from pathlib import Path

import click

from fpstore.cli.common import echo_json, echo_table, json_option


@click.group("tma")
def tma():
    """Tissue microarrays: dearray slides into per-core crops."""


@tma.command("dearray")
@click.argument("slide", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--array-map",
    type=click.Path(path_type=Path, dir_okay=False),
    help="CSV with row, column, core_index, patient_id (rows may be letters), and block "
    "for an array of several blocks.",
)
@click.option(
    "--mpp", type=float, help="The slide's microns per pixel, when its metadata lacks it."
)
@click.option(
    "--core-um",
    type=float,
    help="Punch diameter in microns (0.6 mm: 600). Without an mpp it sets the image's scale "
    "from the measured core diameter; with one it is checked against the cores.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for cores.csv/json, overlay.png and crops/.",
)
@click.option(
    "--crop-mpp", type=float, default=0.5, show_default=True, help="Crop resolution (um/px)."
)
@click.option("--crop-px", type=int, default=1600, show_default=True, help="Crop side (px).")
@click.option(
    "--thumbnail-px",
    type=int,
    default=2048,
    show_default=True,
    help="Longest side of the detection thumbnail; raise it for arrays of tiny cores.",
)
@click.option("--force", is_flag=True, help="Overwrite a previous dearray in --out.")
@json_option
def dearray(slide, array_map, mpp, core_um, out, crop_mpp, crop_px, thumbnail_px, force, as_json):
    """Find the cores of SLIDE, fit the array's lattice (blocks, rows, columns, tilt, warp),
    mark empty positions and orientation cores, join the array map, and write a crop of each
    core at --crop-mpp (default 0.5 um/px, 1600 px) with its left/right halves.

    Blocks count from 1 in reading order; rows and columns from 1 within each block. An
    array map with more than one block needs a block column.

    \b
    fpstore tma dearray array1.svs --array-map array_map.csv --out cores/array1
    fpstore tma dearray overview.jpg --core-um 600 --out cores/overview
    """
    from fpstore.slides.tma import TmaSpec, export_cores

    spec = TmaSpec(thumbnail_px=thumbnail_px, crop_mpp=crop_mpp, crop_px=crop_px, core_um=core_um)
    document = export_cores(slide, out, array_map=array_map, mpp=mpp, spec=spec, force=force)
    if as_json:
        echo_json(document)
        return
    echo_table(
        [
            {
                "name": c["name"],
                "block": c["block"],
                "row": c["row"],
                "column": c["column"],
                "status": c["status"],
                "confidence": c["confidence"],
                "core_index": c["core_index"],
                "patient_id": c["patient_id"],
                "x": c["centre"][0],
                "y": c["centre"][1],
                "diameter_px": c["diameter_px"],
            }
            for c in document["cores"]
        ]
    )
    shapes = ", ".join(f"{b['rows']}x{b['columns']}" for b in document["blocks"])
    click.echo(f"scale: {document['scale']['text']}")
    click.echo(
        f"{document['n_cores']} cores, {document['n_empty']} empty positions in "
        f"{len(document['blocks'])} block(s) of rows x columns {shapes}; "
        f"{document['n_orientation']} orientation cores; tilt {document['tilt_deg']:.1f} deg"
    )
    click.echo(f"crops, overlay.png and cores.csv in {out}")
    if document["map_entries_without_core"]:
        missing = ", ".join(
            f"{m['core_index']} (block {m['block']} row {m['row']} column {m['column']})"
            for m in document["map_entries_without_core"]
        )
        click.echo(f"array map cores not found on the slide: {missing}")
    if document["cores_not_in_map"]:
        click.echo(
            f"cores found but not in the array map: {', '.join(document['cores_not_in_map'])}"
        )


commands = [tma]
