"""`fpstore heatmap`, `fpstore embed`, `fpstore report`: figures from a store's stored results."""

from __future__ import annotations

from pathlib import Path

import click

from fpstore.cli.common import (
    cohort_option,
    echo_json,
    echo_table,
    json_option,
    resolve_cohort,
    seed_option,
    store_option,
)


@click.command()
@click.option("--run", "run_id", required=True, help="Run id (a folder under STORE/runs).")
@click.option(
    "--slide",
    "slide_ids",
    multiple=True,
    help="Slide id (repeatable); default: every slide the run scored patch by patch.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Output folder [default: STORE/figures/heatmaps/RUN].",
)
@click.option(
    "--max-px", type=int, default=1024, show_default=True, help="Longer side of the thumbnail."
)
@click.option("--no-geojson", is_flag=True, help="Skip the GeoJSON (QuPath) export.")
@store_option
@json_option
def heatmap(run_id, slide_ids, out, max_px, no_geojson, store_path, as_json):
    """Thumbnail, tissue-type map and prediction map of slides, plus GeoJSON for QuPath.

    Drawn from the run's stored patch scores and coordinates, without re-reading patches:
    a full map needs the slide extracted with `--patches all`.

    Example: fpstore heatmap --run er-mil --slide TCGA-A1-A0SB-01Z-00-DX1
    """
    from fpstore.report.heatmap import slide_heatmaps

    if max_px < 16:
        raise click.BadParameter(f"{max_px} is too small; use at least 16", param_hint="--max-px")
    out = out or store_path / "figures" / "heatmaps" / run_id
    results = slide_heatmaps(store_path, run_id, slide_ids, out, max_px, not no_geojson)
    if as_json:
        echo_json([r.to_dict() for r in results])
        return
    echo_table(
        [
            {
                "slide": r.slide_id,
                "patches": r.n_patches,
                "seconds": r.seconds,
                "figure": str(r.figure),
                "geojson": str(r.geojson or ""),
            }
            for r in results
        ]
    )
    for note in {n for r in results for n in r.notes}:
        click.echo(f"note: {note}", err=True)


@click.command()
@cohort_option
@click.option(
    "--encoder", default=None, help="Encoder id [default: the run's, or the only one stored]."
)
@click.option("--method", type=click.Choice(["tsne", "umap"]), default="tsne", show_default=True)
@click.option(
    "--run", "run_id", default=None, help="Run whose patch scores colour the map and pick clusters."
)
@click.option(
    "--color-by",
    "color_by",
    multiple=True,
    type=click.Choice(["prediction", "label", "patient", "site"]),
    help="Colourings to draw (repeatable) [default: prediction, label, site].",
)
@click.option(
    "--marker",
    type=click.Choice(["ER", "PR", "Her2"]),
    default=None,
    help="Marker for --color-by label [default: the run's].",
)
@click.option(
    "--max-points",
    type=int,
    default=None,
    help="Embed a seeded random subset of this many patches.",
)
@click.option(
    "--clusters",
    "n_clusters",
    type=int,
    default=30,
    show_default=True,
    help="k-means clusters on the map.",
)
@click.option("--jobs", type=int, default=2, show_default=True, help="Threads for the embedding.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Output folder [default: STORE/figures/embed/COHORT-ENCODER-METHOD].",
)
@seed_option
@store_option
@json_option
def embed(
    cohort,
    encoder,
    method,
    run_id,
    color_by,
    marker,
    max_points,
    n_clusters,
    jobs,
    out,
    seed,
    store_path,
    as_json,
):
    """A 2-D map (t-SNE or UMAP) of a cohort's fingerprints, with cluster montages.

    Clusters whose patches a run scores strongly positive or negative are picked
    automatically; each gets a montage of the 5 patches nearest its centre, one per patient.

    Example: fpstore embed --cohort tcga --run er-mil --method tsne
    """
    from fpstore.report.embed import ClusterConfig, EmbedConfig, embed_cohort

    cohort = resolve_cohort(store_path, cohort)
    config = EmbedConfig(method=method, n_jobs=jobs, seed=seed, max_points=max_points)
    clusters = ClusterConfig(n_clusters=n_clusters)
    out = out or store_path / "figures" / "embed" / (
        f"{cohort}-{method}" + (f"-{encoder}" if encoder else "")
    )
    result = embed_cohort(
        store_path,
        cohort,
        out,
        encoder=encoder,
        run_id=run_id,
        marker=marker,
        color_by=color_by or ("prediction", "label", "site"),
        config=config,
        clusters=clusters,
    )
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(
        f"{result.n_points} patches of {result.n_patients} patients, encoder {result.encoder}, "
        f"{result.method} in {result.seconds['embed']:.1f} s -> {result.table}"
    )
    echo_table(
        [
            {
                "cluster": c.number,
                "sign": c.sign,
                "mean score": c.mean_score,
                "patches": c.size,
                "montage": str(m),
            }
            for c, m in zip(result.clusters, result.montages)
        ]
    )
    for name, path in result.figures.items():
        click.echo(f"map ({name}): {path}")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)


@click.command()
@click.option("--run", "run_id", required=True, help="Run id (a folder under STORE/runs).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for index.html and its figures.",
)
@click.option(
    "--heatmaps",
    "n_heatmaps",
    type=click.IntRange(0, 100),
    default=4,
    show_default=True,
    help="Example slides (most confident TP, TN, FP, FN first).",
)
@click.option(
    "--embed-method", type=click.Choice(["tsne", "umap", "none"]), default="tsne", show_default=True
)
@click.option(
    "--max-embed-points",
    type=click.IntRange(10, None),
    default=20_000,
    show_default=True,
    help="Patches in the report's map (a seeded random subset).",
)
@click.option(
    "--bootstrap",
    "n_boot",
    type=click.IntRange(10, None),
    default=1000,
    show_default=True,
    help="Bootstrap resamples for the CIs and ROC bands.",
)
@seed_option
@store_option
@json_option
def report(
    run_id, out, n_heatmaps, embed_method, max_embed_points, n_boot, seed, store_path, as_json
):
    """One static HTML page for a run: cohort, compare table, ROC, heatmaps, fingerprint map.

    Open OUT/index.html in a browser; no server is needed.

    Example: fpstore report --run er-mil --out report/
    """
    from fpstore.report.embed import EmbedConfig
    from fpstore.report.html import build_report

    embed_config = (
        None
        if embed_method == "none"
        else EmbedConfig(method=embed_method, seed=seed, max_points=max_embed_points)
    )
    result = build_report(
        store_path, run_id, out, n_heatmaps=n_heatmaps, embed=embed_config, n_boot=n_boot
    )
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(
        f"wrote {result.index} ({result.n_figures} figures, heatmaps of "
        f"{', '.join(result.heatmaps) or 'no slide'}) in {sum(result.seconds.values()):.1f} s"
    )
    for note in result.notes:
        click.echo(f"note: {note}", err=True)


commands = [heatmap, embed, report]
