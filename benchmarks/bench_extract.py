"""Extraction end to end (patches/s) beside the model-only rate and TIAToolbox, same run.

    python benchmarks/bench_extract.py                     # 2-core CPU: real-texture slide
    python benchmarks/bench_extract.py --quick             # smoke: a 2x2 tiling, few patches
    python benchmarks/bench_extract.py --device cuda --compile --synthetic 40000x30000

Slides: a real-texture slide (tests/data/slides/CMU-1-Small-Region.svs tiled 4x4 into a
pyramidal JPEG TIFF at 0.499 um/px: 758 squares of 112 um pass fpstore's tissue test, 1,301
TIAToolbox's looser mask) and, with --synthetic WxH, one streamed synthetic 40x slide
(bench_synth.py). The encoder is ResNet34 with random weights: the same arithmetic as ImageNet
weights, which are never downloaded. Prints a table of patches/s and the
ratios end-to-end / model-only and ours / TIAToolbox, plus the per-patch cosine agreement of
bf16 (CUDA, or --bf16) and int8 (CPU) fingerprints with fp32.

Imports only torch, torchvision, numpy, pyarrow, tifffile + imagecodecs, opencv, click, tqdm
(no duckdb, lmdb or tiatoolbox unless --tiatoolbox), so it runs on a bare GPU image with the
imagecodecs wheel carried.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CMU = ROOT / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"


def tiled_real_slide(out: Path, repeat: int) -> Path:
    """CMU-1-Small-Region tiled repeat x repeat, pyramidal JPEG TIFF, 0.499 um/px."""
    import tifffile

    from fpstore.slides.slide import open_slide, resize_image

    with open_slide(CMU) as slide:
        base = slide.read_region(0, 0, 0, slide.info.width, slide.info.height)
    image = np.tile(base, (repeat, repeat, 1))
    res = 1e4 / 0.499  # pixels per cm
    with tifffile.TiffWriter(out, bigtiff=True) as tw:
        level, sub = image, 1
        while True:
            options = dict(
                tile=(256, 256),
                compression="jpeg",
                photometric="rgb",
                resolution=(res / sub, res / sub),
                resolutionunit="CENTIMETER",
            )
            tw.write(level, subfiletype=0 if sub == 1 else 1, **options)
            if max(level.shape[:2]) < 2048:
                break
            sub *= 4
            level = resize_image(image, image.shape[1] // sub, image.shape[0] // sub)
    return out


def add_cohort_for(store: Path, slide: Path, name: str, copies: int = 1) -> None:
    """A cohort of ``copies`` patients, each one link to ``slide`` (enough work for a GPU)."""
    from fpstore.cohort.cohorts import add_cohort

    folder = store.parent / f"{name}-slides"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(copies):
        link = folder / f"{name}{i:03d}{slide.suffix}"
        if not link.exists():
            link.symlink_to(slide)
        lines.append(f"P-{name}{i:03d},{link},Positive,Negative,Negative\n")
    labels = store.parent / f"{name}.csv"
    labels.write_text("patient_id,slide,ER,PR,Her2\n" + "".join(lines))
    add_cohort(store, name, clinical=labels, fmt="csv", force=True)  # a rerun replaces it


def model_only(device: str, batch: int, seconds: float, variants) -> dict[str, float]:
    """Forward passes of ResNet34 on a resident uint8 batch (normalisation included)."""
    import torch

    from fpstore.encoders.registry import create_encoder

    rates = {}
    pixels = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=device)
    for name, precision, channels_last, compile_ in variants:
        enc = create_encoder("random-resnet34").prepare(device, precision, channels_last, compile_)
        if not channels_last:
            enc.backbone.to(memory_format=torch.contiguous_format)
        if precision == "int8":  # the speed does not depend on which pixels set the ranges
            enc.calibrate(pixels)
        for _ in range(3 if device == "cuda" else 1):
            enc.encode(pixels)
        if device == "cuda":
            torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            enc.encode(pixels).sum().item()  # one sync per batch: the launch queue stays bounded
            n += batch
        rates[name] = n / (time.perf_counter() - t0)
        print(f"  model only {name}: {rates[name]:.1f} patches/s", flush=True)
    return rates


def end_to_end(
    store: Path,
    cohort: str,
    device: str,
    precision: str,
    patches,
    compile_: bool,
    workers: int,
    batch: int,
) -> tuple[float, object]:
    import shutil

    from fpstore.extract.config import ExtractConfig
    from fpstore.extract.run import extract

    for table in ("fingerprints", "status"):  # time a full extraction, not a resume
        shutil.rmtree(
            store / table / "encoder=random-resnet34" / f"cohort={cohort}", ignore_errors=True
        )
    config = ExtractConfig(
        encoder="random-resnet34",
        patches=patches,
        device=device,
        precision=precision,
        compile=compile_,
        num_workers=workers,
        batch_size=batch,
        force=True,
    )
    t0 = time.perf_counter()
    summary = extract(store, cohort, config, progress=False)
    wall = time.perf_counter() - t0
    if summary.failed:
        raise SystemExit(f"extraction failed: {summary.failed}")
    print(
        f"  {cohort} {precision}: {summary.n_patches} patches, wall {wall:.1f} s "
        f"({summary.n_patches / wall:.1f}/s), loop {summary.loop_seconds:.1f} s "
        f"({summary.n_patches / max(summary.loop_seconds, 1e-9):.1f}/s)"
        + (f", int8 calibration {summary.int8_agreement}" if summary.int8_agreement else ""),
        flush=True,
    )
    return summary.n_patches / summary.loop_seconds, summary


def read_vectors(store: Path, cohort: str) -> np.ndarray:
    import pyarrow.parquet as pq

    from fpstore.store.featurestore import column_to_numpy

    files = sorted(
        (store / "fingerprints" / "encoder=random-resnet34" / f"cohort={cohort}").glob("*.parquet")
    )
    return np.concatenate([column_to_numpy(pq.read_table(f).column("fingerprint")) for f in files])


def tiatoolbox_rate(slide: Path, device: str, tmp: Path, workers: int) -> float | None:
    """TIAToolbox 2.1 DeepFeatureExtractor, ResNet34 (random weights, no download), 224 px at
    0.5 um/px on its own tissue mask, same slide: whole-run patches/s including its mask."""
    try:
        import zarr
        from tiatoolbox.models.architecture.vanilla import CNNBackbone
        from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor
        from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
    except ImportError as error:
        print(f"TIAToolbox not measured: {error}")
        return None
    io = IOPatchPredictorConfig(
        input_resolutions=[{"units": "mpp", "resolution": 0.5}],
        patch_input_shape=(224, 224),
        stride_shape=(224, 224),
    )
    extractor = DeepFeatureExtractor(
        model=CNNBackbone("resnet34"),
        batch_size=32,
        num_workers=workers,
        device=device,
        verbose=False,
    )
    t0 = time.perf_counter()
    out = extractor.run(
        [slide],
        patch_mode=False,
        ioconfig=io,
        save_dir=tmp / "tia",
        overwrite=True,
        output_type="zarr",
        auto_get_mask=True,
    )
    wall = time.perf_counter() - t0
    group = zarr.open(str(next(iter(out.values()))), mode="r")
    n = max(
        group[k].shape[0]
        for k in group.array_keys()
        if group[k].ndim == 2 and group[k].shape[1] == 512
    )
    print(f"TIAToolbox: {n} patches in {wall:.1f} s ({n / wall:.1f}/s), {workers} loader workers")
    return n / wall


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2x2 tiling, 64 patches")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA)")
    parser.add_argument("--synthetic", help="also a synthetic 40x slide of WxH level-0 pixels")
    parser.add_argument("--tiatoolbox", action="store_true", help="also time TIAToolbox (slow)")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also bf16 on a CPU (on by default on CUDA; emulated and ~8x slower on AVX2 CPUs)",
    )
    parser.add_argument(
        "--copies", type=int, default=1, help="slides per cohort (links to one file)"
    )
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=10.0, help="per model-only variant")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp one)")
    args = parser.parse_args(argv)

    import torch

    from fpstore.encoders.base import resolve_device

    device = resolve_device(args.device)
    batch = args.batch or (256 if device == "cuda" else 32)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    print(
        f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else os.cpu_count()} "
        f"{'' if device == 'cuda' else 'cores'}), torch {torch.__version__}, batch {batch}, work {work}"
    )

    t0 = time.perf_counter()
    slide = tiled_real_slide(work / "cmu-tiled.tiff", 2 if args.quick else 4)
    print(f"real-texture slide written in {time.perf_counter() - t0:.1f} s: {slide}")
    add_cohort_for(store, slide, "real", args.copies)
    cohorts = {"real": slide}
    if args.synthetic:
        from bench_synth import child_slide  # one streamed slide, as bench_synth.py times it

        w, h = (int(v) for v in args.synthetic.lower().split("x"))
        synth = work / "bench.svs"
        if not synth.is_file():
            t0 = time.perf_counter()
            child_slide(w, h, 0.5, work)
            print(
                f"synthetic 40x slide {w}x{h} written in {time.perf_counter() - t0:.1f} s: {synth}"
            )
        add_cohort_for(store, synth, "synth", args.copies)
        cohorts["synth"] = synth

    patches = 64 if args.quick else None
    use_bf16 = device == "cuda" or args.bf16
    variants = [("fp32", "fp32", False, False), ("fp32 channels_last", "fp32", True, False)]
    if use_bf16:
        variants.append(("bf16 channels_last", "bf16", True, False))
    if device == "cpu":
        variants.append(("int8 (static, x86)", "int8", True, False))
    if device == "cuda" and args.compile:
        variants.append(("bf16 channels_last compiled", "bf16", True, True))
    rates = model_only(device, batch, 3.0 if args.quick else args.seconds, variants)

    e2e = {}
    precisions = ["fp32"] + (["bf16"] if use_bf16 else []) + (["int8"] if device == "cpu" else [])
    for name in cohorts:
        for precision in precisions:
            compile_ = device == "cuda" and args.compile and precision == "bf16"
            rate, summary = end_to_end(
                store, name, device, precision, patches, compile_, args.workers, batch
            )
            e2e[(name, precision)] = (rate, summary.n_patches)
            vectors = read_vectors(store, name)
            if precision == "fp32":
                reference = vectors
            else:
                cos = np.sum(vectors * reference, 1) / (
                    np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
                )
                print(
                    f"{name}: {precision} vs fp32 fingerprints cosine min {cos.min():.5f}, "
                    f"median {np.median(cos):.5f} over {len(cos)} patches"
                )
    tia = (
        tiatoolbox_rate(cohorts["real"], device, work, max(args.workers, 0) or os.cpu_count())
        if args.tiatoolbox
        else None
    )

    print("\nmodel only (ResNet34 forward, uint8 batch resident on the device):")
    for name, r in rates.items():
        print(f"  {name:32s} {r:10.1f} patches/s")
    print(
        "\nend to end (fpstore extract loop: claim + read + decode + resize + model + Parquet;"
        " the model build and tissue planning are printed above as 'wall'):"
    )
    for (name, precision), (rate, n) in e2e.items():
        best_model = rates[
            {"bf16": "bf16 channels_last", "int8": "int8 (static, x86)"}.get(
                precision, "fp32 channels_last"
            )
        ]
        line = (
            f"  {name:6s} {precision:5s} {n:6d} patches {rate:10.1f} patches/s  "
            f"= {rate / best_model:.2f} x model-only"
        )
        if tia:
            line += f"  = {rate / tia:.2f} x TIAToolbox ({tia:.1f}/s)"
        print(line)


if __name__ == "__main__":
    main()
