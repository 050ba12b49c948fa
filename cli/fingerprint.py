"""The fingerprint network: `fpstore train-fingerprint`, `fpstore match`,
`fpstore fingerprint-experiment` (the paper's Table 2) and `fpstore core-maps`."""

from __future__ import annotations

from pathlib import Path

import click

from fpstore.cli.common import (
    device_option,
    echo_json,
    echo_table,
    json_option,
    precision_option,
    seed_option,
    store_option,
)
from fpstore.config import FINGERPRINT_ARCHS, TRAIN_PRECISIONS
from fpstore.slides.stain import STAIN_METHODS

# fpstore.fingerprint.stain.STAINS, spelled out here so that the CLI starts without torch
STAINS = ("none", "hed", *STAIN_METHODS, "cyclegan")


def sources_options(f):
    """--tma, --cohort/--store and the core settings: where the cores come from."""
    for option in reversed(
        [
            click.option(
                "--tma",
                type=click.Path(path_type=Path, exists=True),
                help="TMA table: a CSV with columns file, array, site, array_map (optional role "
                "train|test, section, mpp), or a folder holding sections.csv (what "
                "`fpstore synth` writes in tma/); file may be a folder `fpstore tma dearray` "
                "wrote.",
            ),
            click.option(
                "--cohort",
                help="A store cohort whose whole slides give pseudo-cores (one class per patient).",
            ),
            store_option,
            click.option(
                "--per-slide",
                type=click.IntRange(1, 1000),
                default=4,
                show_default=True,
                help="--cohort: pseudo-cores cut from each slide (most tissue first).",
            ),
            click.option(
                "--min-tissue",
                type=click.FloatRange(0.0, 1.0),
                default=0.6,
                show_default=True,
                help="--cohort: tissue share a pseudo-core needs (by the slide's tissue mask).",
            ),
            click.option(
                "--holdout",
                type=click.IntRange(0),
                help="--cohort: patients kept out of training for the matching game (default: "
                "none when the table has a test array, else a fifth, at least 2).",
            ),
            click.option(
                "--cache",
                type=click.Path(path_type=Path, file_okay=False),
                help="Where cropped cores are cached (default: TMA/cores and the store's "
                "cache/fingerprint-cores).",
            ),
            click.option(
                "--crop-px",
                type=click.IntRange(64, 8192),
                default=1600,
                show_default=True,
                help="Side of each core and pseudo-core at 0.5 um/px (the paper: 1600).",
            ),
        ]
    ):
        f = option(f)
    return f


def _sources(tma, cohort, store_path, per_slide, min_tissue, holdout, cache, crop_px, sections=()):
    from fpstore.fingerprint.experiment import Sources

    return Sources(
        tma=tma,
        store=store_path if cohort else None,
        cohort=cohort,
        crop_px=crop_px,
        per_slide=per_slide,
        min_tissue=min_tissue,
        sections=tuple(sections) or None,
        holdout=holdout,
        cache=cache,
    )


# The train_options parameters and the TrainConfig fields they override.
TRAIN_FIELDS = {
    "steps": "max_steps",
    "max_minutes": "max_minutes",
    "arch": "arch",
    "patch_px": "patch_px",
    "out_px": "out_px",
    "batch_size": "batch_size",
    "workers": "num_workers",
    "eval_every": "eval_every",
    "patience": "patience",
    "device": "device",
    "precision": "precision",
    "seed": "seed",
    "objective": "objective",
    "pair_weight": "gamma",
    "label_smoothing": "label_smoothing",
    "bn_neck": "bn_neck",
}


def _train_overrides(train: dict) -> dict:
    return {TRAIN_FIELDS[name]: value for name, value in train.items()}


def train_options(f):
    for option in reversed(
        [
            click.option(
                "--config",
                "config_name",
                type=click.Choice(["demo", "full"]),
                default="demo",
                show_default=True,
                help="demo: minutes on 2 CPU cores; full: the paper's setting, for a GPU.",
            ),
            click.option(
                "--steps",
                type=click.IntRange(1),
                help="Most training steps (stops earlier on a plateau).",
            ),
            click.option(
                "--max-minutes",
                type=click.FloatRange(0.01, 100_000.0),
                help="Most training minutes, evaluations excluded (demo 5): the learning rate "
                "decays over whichever of steps and minutes ends first, so a slower CPU trains "
                "fewer steps on the same schedule.",
            ),
            click.option(
                "--arch",
                type=click.Choice(FINGERPRINT_ARCHS),
                help="Backbone (default per config: demo resnet10-slim, full resnet34).",
            ),
            click.option(
                "--patch-px",
                type=click.IntRange(16, 1600),
                help="Crop side at 0.5 um/px (default 224 = 112 um).",
            ),
            click.option(
                "--out-px",
                type=click.IntRange(16, 1600),
                help="Network input side (demo 112, full 224).",
            ),
            click.option("--batch-size", type=click.IntRange(2, 4096)),
            click.option(
                "--objective",
                type=click.Choice(["cosface", "paper", "sets"]),
                help="paper (default): the paper's linear head and cross entropy; cosface: a "
                "cosine head with an additive margin, trained in the cosine space the matching "
                "game uses (both add the pair loss for stain invariance); sets: the paper's head "
                "and cross entropy on batches of classes x 2 regions x 2 crops, plus a contrast "
                "that makes the mean fingerprints of two regions of a patient find each other, "
                "as the matching game compares them.",
            ),
            click.option(
                "--pair-weight",
                type=click.FloatRange(0.0, 100.0),
                help="Weight of the pair loss (squared distance between the normalised "
                "fingerprints of a crop's two stainings) beside the two cross entropies "
                "(default: the paper's 0.5). 0.125 matched as many cores as 0.5 at the demo's "
                "reported seeds and lost external ER (docs/results.md).",
            ),
            click.option(
                "--label-smoothing",
                type=click.FloatRange(0.0, 0.5),
                help="Label smoothing of the cross entropies: the target puts 1 - e on the "
                "crop's class and spreads e over all classes (default 0: the paper's).",
            ),
            click.option(
                "--bn-neck/--no-bn-neck",
                default=None,
                help="A batch-norm neck between the fingerprint and the classifier (BNNeck, "
                "from person re-identification); the fingerprint is read after it. Default: "
                "the config's (demo: on; full: off, as the paper).",
            ),
            click.option(
                "--workers", type=click.IntRange(0, 64), help="DataLoader worker processes."
            ),
            click.option(
                "--eval-every",
                type=click.IntRange(1),
                help="Steps between right-half evaluations (demo 240, full 500).",
            ),
            click.option(
                "--patience",
                type=click.IntRange(1),
                help="Evaluations without improvement before stopping (demo 3, full 6).",
            ),
            device_option(),
            precision_option(
                TRAIN_PRECISIONS,
                default=None,
                help="auto (default): bf16 autocast on GPUs with bf16 units and on CPUs with "
                "native bf16 (AMX, AVX-512 BF16), fp32 elsewhere; printed and kept in the "
                "checkpoint.",
            ),
            seed_option,
        ]
    ):
        f = option(f)
    return f


def _stored_checkpoint(store_path, stain: str) -> Path:
    """STORE/models/fingerprint/<stain>.pt, never over a network already there."""
    from fpstore.store.layout import StoreLayout

    path = StoreLayout.of(store_path).fingerprint_model_file(stain)
    if path.exists():
        raise click.UsageError(
            f"{path} holds a trained network already: give --out NAME.pt to keep both, or remove it"
        )
    return path


@click.command("train-fingerprint")
@sources_options
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Checkpoint file to write (default: STORE/models/fingerprint/<stain>.pt, the "
    "network `fpstore extract --encoder fingerprint` then uses when it is the store's only one).",
)
@click.option(
    "--stain",
    type=click.Choice(STAINS),
    default="none",
    show_default=True,
    help="Stain invariance by the pair loss (CE + CE + 0.5 x squared distance of the "
    "fingerprints): hed pairs two H&E stain jitters of each crop (Tellez et al. 2019, drawn on "
    "the fly); macenko, reinhard, vahadane pair it with its copy normalised to another "
    "site's target; cyclegan with its copy restyled between the reference site and the "
    "other sites pooled.",
)
@click.option(
    "--section", "sections", multiple=True, help="Train on these TMA sections only (default: all)."
)
@train_options
@json_option
def train_fingerprint(
    tma,
    cohort,
    store_path,
    per_slide,
    min_tissue,
    holdout,
    cache,
    crop_px,
    out,
    stain,
    sections,
    config_name,
    as_json,
    **train,
):
    """Train the fingerprint network on left core halves: the train arrays of a TMA table,
    pseudo-cores of a store cohort's whole slides, or both (the paper's large set).

    \b
    fpstore train-fingerprint --tma arrays.csv --out fingerprint.pt --stain cyclegan
    fpstore train-fingerprint --cohort tcga --crop-px 800 --stain hed
    fpstore train-fingerprint --tma demo/tma --cohort tcga --out long.pt --steps 1200
    """
    from fpstore.fingerprint.experiment import train_fingerprint as run

    summary = run(
        out or _stored_checkpoint(store_path, stain),
        _sources(tma, cohort, store_path, per_slide, min_tissue, holdout, cache, crop_px, sections),
        config=config_name,
        stain=stain,
        progress=not as_json,
        **_train_overrides(train),
    )
    if as_json:
        echo_json(summary)
        return
    echo_table(
        [
            {
                k: summary[k]
                for k in (
                    "arch",
                    "stain",
                    "train_cores",
                    "n_classes",
                    "holdout_patients",
                    "steps",
                    "stopped",
                    "best_right_half_accuracy",
                    "images_per_s",
                    "seconds",
                )
            }
        ]
    )
    click.echo(f"checkpoint {summary['checkpoint']} (sha256 {summary['content_hash'][:12]})")


@click.command("match")
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
)
@sources_options
@click.option("--left-section", help="Test section giving the left halves (default: the first).")
@click.option(
    "--right-section",
    help="Test section giving the right halves (default: the first at another site).",
)
@click.option(
    "--misses", type=click.IntRange(0), default=10, show_default=True, help="Misses to list."
)
@device_option()
@json_option
def match(
    model_path,
    tma,
    cohort,
    store_path,
    per_slide,
    min_tissue,
    holdout,
    cache,
    crop_px,
    left_section,
    right_section,
    misses,
    device,
    as_json,
):
    """The matching game: left halves against right halves stained at another site, on the
    TMA table's test array, or else on the cohort patients the network was not trained on
    (their halves from two sites, or right halves restyled to another site's stains).

    \b
    fpstore match --model fingerprint.pt --tma demo/tma
    fpstore match --model fp.pt --cohort tcga --store store --crop-px 800
    """
    from fpstore.fingerprint.experiment import match as run

    result = run(
        model_path,
        _sources(tma, cohort, store_path, per_slide, min_tissue, holdout, cache, crop_px),
        left_section,
        right_section,
        device=device,
        progress=not as_json,
    )
    if as_json:
        echo_json(result)
        return
    s = result["sections"]
    click.echo(f"game: {result['game']}")
    click.echo(
        f"left halves: {s['left']} (site {s['left_site']}); right halves: {s['right']} "
        f"(site {s['right_site']})"
    )
    echo_table(
        [
            {
                "level": "core" if result["game"] == "tma test array" else "half (same patient)",
                "n": result["n_cores"],
                "correct": result["core_correct"],
                "accuracy": result["core_accuracy"],
                "chance": result["chance_core"],
                "x_chance": round(result["core_accuracy"] / result["chance_core"], 1),
            },
            {
                "level": "patient (pooled)",
                "n": result["n_patients"],
                "correct": result["patient_correct"],
                "accuracy": result["patient_accuracy"],
                "chance": result["chance_patient"],
                "x_chance": round(result["patient_accuracy"] / result["chance_patient"], 1),
            },
        ]
    )
    click.echo(
        f"true right half: median rank {result['median_rank']:g} of "
        f"{round(1 / result['chance_core'])}, top-5 accuracy {result['top5_accuracy']:.3f} "
        f"(chance {min(1.0, 5 * result['chance_core']):.3f})"
    )
    if result["misses"] and misses:
        click.echo(
            f"\n{len(result['misses'])} missed cores (first {min(misses, len(result['misses']))}):"
        )
        echo_table(
            result["misses"][:misses],
            [
                "left",
                "patient",
                "matched",
                "matched_patient",
                "same_patient",
                "rank_of_true",
                "credit",
            ],
        )


@click.command("fingerprint-experiment")
@sources_options
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for the four checkpoints and table2.json.",
)
@train_options
@json_option
def fingerprint_experiment(
    tma,
    cohort,
    store_path,
    per_slide,
    min_tissue,
    holdout,
    cache,
    crop_px,
    out,
    config_name,
    as_json,
    **train,
):
    """The paper's Table 2: small vs large training set, without vs with style transfer.
    Small: the TMA table's first two training sections; large: those plus the pseudo-cores of
    --cohort. The matching game is played on the table's test array.

    \b
    fpstore fingerprint-experiment --tma demo/tma --cohort tcga --store store --out table2/
    """
    from fpstore.fingerprint.experiment import run_table2

    result = run_table2(
        _sources(tma, cohort, store_path, per_slide, min_tissue, holdout, cache, crop_px),
        out,
        config=config_name,
        progress=not as_json,
        **_train_overrides(train),
    )
    if as_json:
        echo_json(result)
        return
    echo_table(
        [r for r in result["rows"] if "experiment" in r],
        [
            "experiment",
            "training_set",
            "style_transfer",
            "network",
            "train_cores",
            "train_patients",
            "test_cores",
            "cv_accuracy",
            "core_accuracy",
            "patient_accuracy",
            "top5_accuracy",
            "chance_core",
        ],
    )
    for note in (r["note"] for r in result["rows"] if "note" in r):
        click.echo(f"note: {note}")
    click.echo(f"table and checkpoints in {result['out']}")


@click.command("core-maps")
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
)
@click.option(
    "--tma",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="TMA table (CSV, or a folder with sections.csv) with train and test arrays.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for the PNGs.",
)
@click.option(
    "--cores",
    "n_cores",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="Training cores to map, and test pairs to compare.",
)
@device_option()
@click.option(
    "--cache",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where cropped cores are cached (default: TMA/cores).",
)
@click.option(
    "--crop-px",
    type=click.IntRange(64, 8192),
    default=1600,
    show_default=True,
    help="Side of each core crop at 0.5 um/px (as the network was trained).",
)
@json_option
def core_maps(model_path, tma, out, n_cores, device, cache, crop_px, as_json):
    """Heat maps of recognised regions on training cores and similarity maps of test pairs.

    \b
    fpstore core-maps --model fingerprint.pt --tma demo/tma --out maps/
    """
    from fpstore.fingerprint.maps import core_maps as run

    result = run(
        model_path,
        tma,
        out,
        n_cores=n_cores,
        cache=cache,
        device=device,
        crop_px=crop_px,
        progress=not as_json,
    )
    if as_json:
        echo_json(result)
        return
    for path in result["files"]:
        click.echo(path)


commands = [train_fingerprint, match, fingerprint_experiment, core_maps]
