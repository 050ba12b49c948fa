"""The fingerprint network: `fpstore train-fingerprint`, `fpstore match`,
`fpstore fingerprint-experiment` (the paper's Table 2) and `fpstore core-maps`."""

from __future__ import annotations

from pathlib import Path

import click

from fpstore.cli.common import echo_json, echo_table, json_option, seed_option

STAINS = ("none", "macenko", "reinhard", "vahadane", "cyclegan")  # fpstore.fingerprint.stain.STAINS

tma_option = click.option(
    "--tma",
    "tma_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    required=True,
    help="The tma/ folder of `fpstore synth` (train/ and test/ arrays with section*.tiff + array_map.csv).",
)
cache_option = click.option(
    "--cache",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the cropped core halves are cached (default: TMA/cores).",
)
crop_option = click.option(
    "--crop-px",
    type=click.IntRange(64, 8192),
    default=1600,
    show_default=True,
    help="Side of each core crop at 0.5 um/px (the paper: 1600; smaller for arrays of small cores).",
)
device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)


# The train_options parameters and the TrainConfig fields they override.
TRAIN_FIELDS = {
    "steps": "max_steps",
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
                "--arch",
                type=click.Choice(["resnet18", "resnet34"]),
                help="Backbone (default per config).",
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
                "--workers", type=click.IntRange(0, 64), help="DataLoader worker processes."
            ),
            click.option(
                "--eval-every",
                type=click.IntRange(1),
                help="Steps between right-half evaluations (demo 40, full 500).",
            ),
            click.option(
                "--patience",
                type=click.IntRange(1),
                help="Evaluations without improvement before stopping (demo 3, full 6).",
            ),
            device_option,
            click.option(
                "--precision",
                type=click.Choice(["auto", "fp32", "bf16"]),
                help="auto (default): bf16 autocast on GPUs with bf16 units and on CPUs with "
                "native bf16 (AMX, AVX-512 BF16), fp32 elsewhere; printed and kept in the "
                "checkpoint.",
            ),
            seed_option,
        ]
    ):
        f = option(f)
    return f


@click.command("train-fingerprint")
@tma_option
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Checkpoint file to write.",
)
@click.option(
    "--stain",
    type=click.Choice(STAINS),
    default="none",
    show_default=True,
    help="Stain invariance: restyled copies of every core + the pair loss.",
)
@click.option(
    "--section", "sections", multiple=True, help="Train on these sections only (default: all)."
)
@train_options
@cache_option
@crop_option
@json_option
def train_fingerprint(tma_dir, out, stain, sections, config_name, cache, crop_px, as_json, **train):
    """Train the fingerprint network on the training array's left core halves.

    \b
    fpstore train-fingerprint --tma demo/tma --out fingerprint.pt --stain cyclegan
    fpstore train-fingerprint --tma demo/tma --out long.pt --steps 1200 --eval-every 100 --patience 4
    """
    from fpstore.fingerprint.experiment import train_fingerprint as run

    summary = run(
        tma_dir,
        out,
        config=config_name,
        stain=stain,
        cache=cache,
        sections=sections or None,
        crop_px=crop_px,
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
@tma_option
@click.option("--left-section", help="Section giving the left halves (default: the first).")
@click.option(
    "--right-section", help="Section giving the right halves (default: the first at another site)."
)
@click.option(
    "--misses", type=click.IntRange(0), default=10, show_default=True, help="Misses to list."
)
@device_option
@cache_option
@crop_option
@json_option
def match(
    model_path, tma_dir, left_section, right_section, misses, device, cache, crop_px, as_json
):
    """The matching game: left halves of one test section against right halves of another.

    \b
    fpstore match --model fingerprint.pt --tma demo/tma
    """
    from fpstore.fingerprint.experiment import match as run

    result = run(
        model_path,
        tma_dir,
        cache,
        left_section,
        right_section,
        device=device,
        crop_px=crop_px,
        progress=not as_json,
    )
    if as_json:
        echo_json(result)
        return
    s = result["sections"]
    click.echo(
        f"left halves: {s['left']} (site {s['left_site']}); right halves: {s['right']} (site {s['right_site']})"
    )
    echo_table(
        [
            {
                "level": "core",
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
        f"true right half: median rank {result['median_rank']:g} of {round(1 / result['chance_core'])}, "
        f"top-5 accuracy {result['top5_accuracy']:.3f} (chance {min(1.0, 5 * result['chance_core']):.3f})"
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
@tma_option
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for the four checkpoints and table2.json.",
)
@click.option(
    "--extra-slides",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Whole slides of other patients for the large training set (default: TMA/../tcga/slides).",
)
@click.option(
    "--per-slide",
    type=click.IntRange(1, 100),
    default=2,
    show_default=True,
    help="Pseudo-cores cut from each extra slide.",
)
@train_options
@cache_option
@crop_option
@json_option
def fingerprint_experiment(
    tma_dir, out, extra_slides, per_slide, config_name, cache, crop_px, as_json, **train
):
    """The paper's Table 2: small vs large training set, without vs with style transfer.

    \b
    fpstore fingerprint-experiment --tma demo/tma --out table2/
    """
    from fpstore.fingerprint.experiment import run_table2

    result = run_table2(
        tma_dir,
        out,
        config=config_name,
        extra_slides=extra_slides,
        per_slide=per_slide,
        cache=cache,
        crop_px=crop_px,
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
@tma_option
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
@device_option
@cache_option
@crop_option
@json_option
def core_maps(model_path, tma_dir, out, n_cores, device, cache, crop_px, as_json):
    """Heat maps of recognised regions on training cores and similarity maps of test pairs.

    \b
    fpstore core-maps --model fingerprint.pt --tma demo/tma --out maps/
    """
    from fpstore.fingerprint.maps import core_maps as run

    result = run(
        model_path,
        tma_dir,
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
