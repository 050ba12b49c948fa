"""`fpstore demo`: the whole pipeline on the built-in demo cohort."""

from __future__ import annotations

from pathlib import Path

import click

from fpstore.cli.common import echo_json, echo_table, json_option, seed_option


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default="fpstore-demo",
    show_default=True,
    help="Folder for the data, store, model and report.",
)
@click.option("--force", is_flag=True, help="Replace an earlier demo in --out.")
@click.option(
    "--evidence",
    is_flag=True,
    help="Also train a network without stain invariance and extract every encoder with and "
    "without --stain-norm macenko: the comparison of docs/results.md (about 3x longer).",
)
@click.option(
    "--patch-cnn",
    is_flag=True,
    help="Also compare the direct patch CNN (ResNet34 trained on the labelled patches; "
    "hours on 2 CPU cores).",
)
@click.option("--steps", type=click.IntRange(1), help="Training steps of each network.")
@seed_option
@json_option
def demo(out, force, evidence, patch_cnn, steps, seed, as_json):
    """Synthesise the demo cohort and run every stage on it (about 15 min on 2 cores).

    Leaves the synthetic slides, the store, the trained model and the HTML report in
    --out for exploring with the other commands (e.g. `fpstore sql --store OUT/store`).
    """
    from fpstore.demo import DemoSettings, run_demo

    settings = DemoSettings(evidence=evidence, patch_cnn=patch_cnn, steps=steps)
    result = run_demo(out, seed=seed, force=force, quiet=as_json, settings=settings)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo("\nsteps")
    echo_table(result.steps, ["step", "seconds"])
    for network, m in result.match.items():
        click.echo(
            f"\nmatching game ({network}, the test array's cores cut as {m['crop_px']} px "
            f"squares, left halves at site "
            f"{m['sections']['left_site']}, right at {m['sections']['right_site']}): core "
            f"accuracy {m['core_accuracy']:.2f} (chance {m['chance_core']:.3f}), patient "
            f"accuracy {m['patient_accuracy']:.2f} (chance {m['chance_patient']:.3f})"
        )
    click.echo(
        "\nresults on the external cohort, all tissue pooled (AUC with 95% CI; every pool "
        "is in the report and in `fpstore sql`)"
    )
    echo_table(result.results_rows(pools=("all",)))
    for note in result.notes:
        click.echo(f"note: {note}")
    c = result.classify
    click.echo(
        f"\n5-fold CV on tcga, ER, MIL head: AUC {c['auc']:.3f} [{c['ci_low']:.3f}, "
        f"{c['ci_high']:.3f}] over {c['n']} patients; permutation p = {c['permutation_p']:.2f} "
        f"(null mean {c['null_mean']:.2f}); the site probe's balanced accuracy "
        f"{c['site_probe_balanced_accuracy']:.2f}"
    )
    click.echo(f"\nstore:  {out / 'store'}\nmodels: {out / 'model'}\nreport: {result.report}")


commands = [demo]
