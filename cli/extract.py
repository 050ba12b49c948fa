"""`fpstore extract`: a cohort's slides -> fingerprints in the store."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fpstore.cli.common import (
    cohort_option,
    device_option,
    echo_json,
    echo_table,
    json_option,
    precision_option,
    resolve_cohort,
    seed_option,
    store_url_option,
)
from fpstore.config import PRECISIONS
from fpstore.slides.stain import STAIN_METHODS


def _patches(value: str) -> int | None:
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(
            f"{value!r}: give a number of patches per patient (e.g. 120) or 'all'"
        )
    return n


@click.command("extract")
@cohort_option
@click.option(
    "--encoder",
    default="fingerprint",
    show_default=True,
    help="Encoder: fingerprint, imagenet-resnet34, random-resnet34, torchvision:ARCH, timm:ARCH, "
    "or a foundation model (uni, uni2-h, virchow2, h-optimus-0, ...: `fpstore encoders list`).",
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Fingerprint checkpoint (encoder fingerprint; default: the store's only trained "
    "network, STORE/models/fingerprint/*.pt).",
)
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    help="Local weights file (imagenet-resnet34, torchvision:ARCH, timm:ARCH), or a file or "
    "folder (a Hugging Face snapshot) for a foundation model; default: the torchvision or "
    "the local Hugging Face cache. Never downloaded without --download.",
)
@click.option(
    "--download",
    is_flag=True,
    help="Foundation models: fetch missing weights from Hugging Face with your own token "
    "(`hf auth login`; gated models need their terms accepted), into its cache.",
)
@click.option(
    "--encoder-id",
    help="Store the fingerprints under this id (default: the encoder's name; a fingerprint "
    "checkpoint gets fingerprint-<file name>-<hash>), so several networks share one store.",
)
@click.option(
    "--stain-norm",
    type=click.Choice(STAIN_METHODS),
    help="Normalise each patch's stains to --stain-target before the encoder (fpstore.slides."
    "stain, fitted once to the target, applied per patch). The encoder id gains +METHOD, so "
    "both settings can share a store; the resume key records it.",
)
@click.option(
    "--stain-target",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="H&E image the normaliser is fitted to (default: tiatoolbox's target image).",
)
@click.option(
    "--patches",
    default="120",
    show_default=True,
    help="Patches per patient, pooled over its slides (the paper: 120), or 'all'.",
)
@click.option(
    "--min-tissue",
    type=click.FloatRange(0.0, 1.0),
    default=0.5,
    show_default=True,
    help="Keep squares with at least this tissue fraction (preview with `fpstore patches`); "
    "a slide with none fails with its tissue fraction.",
)
@device_option()
@precision_option(
    PRECISIONS,
    help="auto: bf16 on GPUs with bf16 units and on CPUs with native bf16 (AMX, AVX-512 "
    "BF16), about 2x fp32 with fingerprints at cosine >= 0.9999 to fp32; fp32 elsewhere "
    "(the choice and why are printed and stored in each file). int8 (CPU): static "
    "quantization calibrated on 64 of the cohort's patches, 2-4x fp32; the run reports its "
    "cosine agreement with fp32. Resume treats each precision as a different setting, and "
    "what auto chose as that precision.",
)
@click.option(
    "--batch-size", type=int, default=0, help="Patches per model batch (0: 32 CPU, 256 CUDA)."
)
@click.option(
    "--workers",
    "num_workers",
    type=int,
    default=-1,
    help="Patch-reading processes (-1: 1 on <= 4 cores, else cores - 2).",
)
@click.option(
    "--compile", "compile_", is_flag=True, help="torch.compile the model (pays off on CUDA)."
)
@click.option(
    "--decode",
    type=click.Choice(["auto", "cpu"]),
    default="auto",
    show_default=True,
    help="JPEG tiles: auto decodes them on the GPU (nvJPEG) when the device is CUDA, slide "
    "by slide where the GPU reads them as the CPU does; cpu: always in the reader processes.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Re-extract slides whose stored fingerprints were made with other settings.",
)
@seed_option
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process and its readers; ray: a Ray cluster (pip install "
    "'fpstore[ray]'), needed for object-storage stores. See docs/scaling.md.",
)
@click.option(
    "--address",
    help="--engine ray: the cluster to join ('auto', HOST:PORT, "
    "ray://HOST:10001); default: start Ray on this machine.",
)
@store_url_option
@json_option
def extract(
    cohort,
    encoder,
    checkpoint,
    weights,
    download,
    encoder_id,
    stain_norm,
    stain_target,
    patches,
    min_tissue,
    device,
    precision,
    batch_size,
    num_workers,
    compile_,
    decode,
    force,
    engine,
    address,
    seed,
    store_path,
    as_json,
):
    """Encode the tissue patches of a cohort's slides into fingerprints.

    One Parquet file per slide under STORE/fingerprints/encoder=ID/cohort=NAME/. Reruns skip
    finished slides; a slide that fails is recorded and skipped, and the command then exits
    non-zero. Example: fpstore extract --cohort tcga --encoder fingerprint --checkpoint fp.pt
    """
    from fpstore.extract.config import ExtractConfig
    from fpstore.extract.run import extract as run_extract

    if address and engine != "ray":
        raise click.BadParameter(
            "--address joins a Ray cluster: add --engine ray", param_hint="--address"
        )
    cohort = resolve_cohort(store_path, cohort)

    options = {}
    if encoder == "fingerprint" and not checkpoint:
        from fpstore.store.models import stored_fingerprint_checkpoint

        checkpoint = stored_fingerprint_checkpoint(store_path)
    if checkpoint:
        options["checkpoint"] = checkpoint
    if weights:
        options["weights"] = weights
    if download:
        options["download"] = True
    config = ExtractConfig(
        encoder=encoder,
        encoder_options=options,
        encoder_id=encoder_id,
        stain_norm=stain_norm,
        stain_target=str(stain_target) if stain_target else None,
        patches=_patches(patches),
        min_tissue=min_tissue,
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=num_workers,
        compile=compile_,
        decode=decode,
        force=force,
        seed=seed,
    )
    if engine == "ray":
        from fpstore.extract.ray import RayConfig, extract_on_ray

        summary = extract_on_ray(
            store_path, cohort, config, RayConfig(address=address), progress=not as_json
        )
    else:
        summary = run_extract(store_path, cohort, config, progress=not as_json)
    if as_json:
        echo_json(summary.to_dict())
    else:
        _echo_summary(summary, cohort)
    if summary.failed:
        click.echo(
            f"{len(summary.failed)} slide(s) not extracted or not confirmed: "
            + ", ".join(r.slide_id for r in summary.failed[:10])
            + (" ..." if len(summary.failed) > 10 else "")
            + "; fix them (errors above) and rerun to extract only those",
            err=True,
        )
        sys.exit(1)


def _echo_summary(summary, cohort: str) -> None:
    """The run's table, its one-line summary, where tiles were decoded and the int8 check."""
    for note in summary.notes:
        click.echo(f"note: {note}")
    rows = [r for r in summary.to_dict()["slides"] if r["status"] != "skipped"]
    if rows:
        echo_table(rows, ["slide_id", "status", "n_patches", "seconds", "error"])
    d = summary.to_dict()
    click.echo(
        f"\n{summary.encoder} on {cohort} ({summary.device}, {summary.precision}: "
        f"{summary.precision_reason}): "
        f"{d['ok']} ok, {d['skipped']} already done, {d['elsewhere']} done by another "
        f"process, {d['no_patient']} without a patient (skipped), {d['failed']} failed; "
        f"{d['patches']} patches in {d['seconds']:.1f} s "
        f"({d['patches_per_s']:.1f} patches/s)"
    )
    if summary.device == "cuda":  # where JPEG tiles were decoded, and why
        click.echo(summary.decode)
    for r in summary.decode_fallbacks:
        click.echo(f"  {r.slide_id}: decoded by the readers, not the GPU: {r.decode}")
    if d["int8_agreement"]:
        a = d["int8_agreement"]
        click.echo(
            f"int8 vs fp32 on {a['n_check']} held-out calibration patches: cosine min "
            f"{a['min_cosine']:.4f}, median {a['median_cosine']:.4f}"
        )


commands = [extract]
