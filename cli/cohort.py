"""`fpstore cohort add|list|show`: clinical tables and slide lists, kept in the store."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fpstore.cli.common import echo_json, echo_table, json_option, store_url_option
from fpstore.config import CLINICAL_FORMATS

# Long lists (1000 patients without slides) are cut in the text view; --json has them all.
SHOW_AT_MOST = 20


@click.group("cohort")
def cohort():
    """Cohorts: slides joined to clinical ER/PR/Her2 status."""


@cohort.command("add")
@click.argument("name")
@click.option(
    "--slides",
    "slides",
    multiple=True,
    help="Glob ('slides/*.svs'), folder, slide file or GDC manifest; repeatable.",
)
@click.option(
    "--clinical",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Clinical table: TCGA BCR Biotab patient file, or a CSV/TSV with --format csv. "
    "Without it the cohort is unlabelled: each slide its own patient (for `fpstore predict`).",
)
@click.option(
    "--format", "fmt", type=click.Choice(CLINICAL_FORMATS), default="tcga", show_default=True
)
@click.option(
    "--slides-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where a GDC manifest's files were downloaded (default: the manifest's folder).",
)
@click.option(
    "--mpp-overrides",
    type=click.Path(path_type=Path, dir_okay=False),
    help="CSV with columns slide,mpp for slides whose metadata lacks or misstates the mpp.",
)
@click.option(
    "--site-column", help="Clinical column holding the site (TCGA default: the barcode's TSS)."
)
@click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="KEY=COLUMN",
    help="CSV column mapping, e.g. --column patient_id=Case --column ER='ER status'; "
    "keys: patient_id, slide, site, ER, PR, Her2.",
)
@click.option(
    "--her2-fish-resolves-equivocal",
    is_flag=True,
    help="TCGA: an IHC 'Equivocal' Her2 takes the FISH result when there is one.",
)
@click.option(
    "--slide-types",
    default="DX",
    show_default=True,
    metavar="TYPES",
    help="TCGA slides to keep by the slide part of their name, comma-separated: DX "
    "(diagnostic, FFPE), TS/BS/MS (frozen section: top/bottom/middle), or 'all'. "
    "Names that are not TCGA barcodes are always kept.",
)
@click.option(
    "--sample-types",
    default="01",
    show_default=True,
    metavar="CODES",
    help="TCGA slides to keep by sample type (barcode characters 14-15), comma-separated: "
    "01 primary tumour, 06 metastatic, 11 solid tissue normal, ..., or 'all'.",
)
@click.option(
    "--validate", is_flag=True, help="Open every slide and read a patch; report unreadable ones."
)
@click.option("--force", is_flag=True, help="Replace a cohort of the same name.")
@store_url_option
@json_option
def add(
    name,
    slides,
    clinical,
    fmt,
    slides_dir,
    mpp_overrides,
    site_column,
    columns,
    her2_fish_resolves_equivocal,
    slide_types,
    sample_types,
    validate,
    force,
    store_path,
    as_json,
):
    """Add cohort NAME to the store; exits 1 when some listed slides are not usable.

    TCGA slides other than diagnostic slides of primary tumours (frozen sections, normal
    tissue, metastases) are left out unless --slide-types / --sample-types ask for them;
    the summary counts them.

    \b
    fpstore cohort add tcga-brca --slides gdc_manifest.txt --slides-dir gdc/ \\
        --clinical nationwidechildrens.org_clinical_patient_brca.txt
    fpstore cohort add ext --format csv --clinical labels.csv --slides 'scans/*.tiff'
    fpstore cohort add hospital --slides 'scans/*.svs'       # unlabelled
    """
    from fpstore.cohort.clinical import parse_column_mapping
    from fpstore.cohort.cohorts import CohortSource, add_cohort
    from fpstore.cohort.slide_types import TypeChoice

    source = CohortSource(
        slides=tuple(slides),
        clinical=clinical,
        fmt=fmt,
        slides_dir=slides_dir,
        mpp_overrides=mpp_overrides,
        site_column=site_column,
        columns=parse_column_mapping(columns),
        her2_fish_resolves_equivocal=her2_fish_resolves_equivocal,
        types=TypeChoice.parse(slide_types, sample_types),
    )
    summary = add_cohort(store_path, name, source, validate=validate, force=force)
    _print_summary(summary, as_json)
    if summary.problems:
        click.echo(
            f"{len(summary.problems)} listed slide(s) not usable; see above. "
            "The cohort was written without them.",
            err=True,
        )
        sys.exit(1)


@cohort.command("list")
@store_url_option
@json_option
def list_(store_path, as_json):
    """The cohorts of the store."""
    from fpstore.cohort.cohorts import list_cohorts

    rows = list_cohorts(store_path)
    echo_json(rows) if as_json else echo_table(rows)


@cohort.command("show")
@click.argument("name")
@store_url_option
@json_option
def show(name, store_path, as_json):
    """Per marker positives/negatives/missing, and what could not be matched and why."""
    from fpstore.cohort.cohorts import cohort_summary

    _print_summary(cohort_summary(store_path, name), as_json)


def _print_summary(summary, as_json: bool) -> None:
    if as_json:
        echo_json(summary.to_dict())
        return
    click.echo(
        f"cohort {summary.name} ({summary.fmt}): {summary.n_patients} patients "
        + (f"in {Path(summary.clinical).name}" if summary.clinical else "(one per slide)")
        + f", {summary.n_patients_with_slides} with slides, "
        f"{summary.n_slides} usable slides"
    )
    rows = []
    for marker, c in summary.markers.items():
        s = summary.markers_with_slides[marker]
        rows.append(
            {
                "marker": marker,
                "positive": c.positive,
                "negative": c.negative,
                "missing": c.missing,
                "missing values": ", ".join(
                    f"{v or '(blank)'}: {n}" for v, n in c.missing_values.items()
                ),
                "with slides +/-/?": f"{s.positive}/{s.negative}/{s.missing}",
            }
        )
    echo_table(rows)
    for marker, c in summary.markers.items():
        if c.unrecognised_values:
            values = ", ".join(f"{v!r}: {n}" for v, n in c.unrecognised_values.items())
            click.echo(f"{marker}: values that are not a status (counted as missing): {values}")
    _print_types(summary)
    only_left_out = set(summary.patients_without_slides) & {
        s["patient_id"] for s in summary.left_out_by_type
    }
    _print_list(
        "patients without slides",
        summary.patients_without_slides,
        f" ({len(only_left_out)} with slides left out by type only)" if only_left_out else "",
    )
    _print_list(
        "slides without patients",
        [f"{s['slide_id']}: {s['reason']}" for s in summary.slides_without_patients],
    )
    _print_list(
        "listed slides not usable",
        [f"{p['slide_id']}: {p['problem']} ({p['path']})" for p in summary.problems],
    )
    if summary.unused_mpp_overrides:
        _print_list("mpp overrides naming no slide of the cohort", summary.unused_mpp_overrides)
    if any(summary.removed.values()):
        removed = ", ".join(f"{n} {what} file(s)" for what, n in summary.removed.items() if n)
        click.echo(f"removed what belonged only to slides the cohort no longer has: {removed}")


def _print_types(summary) -> None:
    """Which TCGA slides the cohort keeps, and those it left out, counted by reason."""
    left_out = summary.left_out_by_type
    if summary.fmt != "tcga" and not left_out and not summary.untyped:
        return  # a cohort of plain slide names: types do not apply
    click.echo(
        f"TCGA slides kept: {summary.type_choice.describe()}; "
        f"{len(left_out)} left out by type (--slide-types, --sample-types keep others)"
    )
    for reason, n in summary.left_out_counts().items():
        click.echo(f"  {reason}: {n}")
    if left_out:
        _print_list(
            "slides left out by type",
            [f"{s['slide_id']}: {'; '.join(s['reasons'])}" for s in left_out],
        )
    if summary.untyped:
        _print_list("TCGA slides kept whose name does not say their type", summary.untyped)


def _print_list(title: str, items: list[str], note: str = "") -> None:
    click.echo(f"{title}: {len(items)}{note}")
    for item in items[:SHOW_AT_MOST]:
        click.echo(f"  {item}")
    if len(items) > SHOW_AT_MOST:
        click.echo(f"  ... and {len(items) - SHOW_AT_MOST} more (--json lists all)")


commands = [cohort]
