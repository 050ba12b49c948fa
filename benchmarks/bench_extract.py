"""Extraction as users wait for it (whole runs) beside the loop, model-only and TIAToolbox.

    python benchmarks/bench_extract.py --tiatoolbox          # 2-core CPU: real-texture slide
    python benchmarks/bench_extract.py --quick               # smoke: a 2x2 tiling, few patches
    python benchmarks/bench_extract.py --tiatoolbox --rounds 3
    python benchmarks/bench_extract.py --tiatoolbox --runs default,int8    # fewer fpstore runs
    python benchmarks/bench_extract.py --device cuda --compile --synthetic 40000x30000 --copies 16

Slides: a real-texture slide (tests/data/slides/CMU-1-Small-Region.svs tiled 4x4 into a
pyramidal JPEG TIFF at 0.499 um/px: 758 squares of 112 um pass fpstore's tissue test, 1,301
TIAToolbox's looser mask) and, with --synthetic WxH, one streamed synthetic 40x slide
(bench_synth.py). The encoder is ResNet34 with random weights: the same arithmetic as ImageNet
weights, which are never downloaded.

Every extraction runs in a fresh process, fpstore's and TIAToolbox's alike, and is timed two
ways: the whole run, from the moment the process is started to its last file written
(interpreter, imports, model build, tissue masks and planning included: what a user waits
for), and the loop (fpstore: from the first claim to the last file; TIAToolbox: its
``run()`` call, its tissue mask included). fpstore runs with its default settings
(``--precision auto``: bf16 where the device has bf16 units, else fp32) and with fp32, int8
(CPU) and, with --bf16, bf16 explicitly. With --rounds N the runs are interleaved (the order
rotates each round) and the ratios are taken within each round, then their median: on a
shared machine ratios hold where absolute rates do not. Prints a table of patches/s, the
ratios to model-only and to TIAToolbox, and the per-patch cosine agreement with fp32;
``--json FILE`` writes every figure.

Imports only torch, torchvision, numpy, pyarrow, tifffile + imagecodecs, opencv, click, tqdm
(no duckdb, lmdb or tiatoolbox unless --tiatoolbox), so it runs on a bare GPU image with the
imagecodecs wheel carried.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
        # Not channels_last: contiguous weights and input (Encoder.encode), not just weights.
        enc = create_encoder("random-resnet34").prepare(device, precision, channels_last, compile_)
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


def child(argv: list[str]) -> None:
    """In a fresh process: one extraction or one TIAToolbox run; prints one JSON line whose
    ``t_end`` is the wall-clock time its last file was written."""
    kind, document = argv[0], json.loads(argv[1])
    if kind == "fpstore":
        from fpstore.extract.config import ExtractConfig
        from fpstore.extract.run import extract

        summary = extract(
            document["store"], document["cohort"], ExtractConfig(**document["config"]), False
        )
        t_end = time.time()
        print(json.dumps({"summary": summary.to_dict(), "t_end": t_end}))
    else:
        print(json.dumps(tiatoolbox_run(**document)))


def run_child(kind: str, document: dict) -> tuple[dict, float]:
    """(the child's JSON, whole-run seconds from process start to its last file)."""
    # The repository first, the caller's path after it (gpu_check.sh installs into a folder).
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *([path] if path else [])])}
    t_start = time.time()
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(document)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result, result["t_end"] - t_start


def fpstore_run(store: Path, cohort: str, config: dict) -> dict:
    """A whole extraction in a fresh process: patches, whole and loop rates, its summary."""
    import shutil

    for table in ("fingerprints", "status"):  # time a full extraction, not a resume
        shutil.rmtree(
            store / table / "encoder=random-resnet34" / f"cohort={cohort}", ignore_errors=True
        )
    shutil.rmtree(store / "cache", ignore_errors=True)  # and plan it from scratch
    result, whole = run_child("fpstore", {"store": str(store), "cohort": cohort, "config": config})
    summary = result["summary"]
    if summary["failed"]:
        raise SystemExit(f"extraction failed: {summary['slides']}")
    n = summary["patches"]
    return {
        "patches": n,
        "whole_s": whole,
        "whole": n / whole,
        "loop": n / summary["loop_seconds"],
        "first_patch_s": summary["first_patch_seconds"],
        "precision": summary["precision"],
        "precision_reason": summary["precision_reason"],
        "decode": summary["decode"],
        "decode_fallbacks": summary["decode_fallbacks"],
        "int8_agreement": summary["int8_agreement"],
    }


def read_vectors(store: Path, cohort: str) -> np.ndarray:
    import pyarrow.parquet as pq

    from fpstore.store.featurestore import column_to_numpy

    files = sorted(
        (store / "fingerprints" / "encoder=random-resnet34" / f"cohort={cohort}").glob("*.parquet")
    )
    return np.concatenate([column_to_numpy(pq.read_table(f).column("fingerprint")) for f in files])


def tiatoolbox_run(slide: str, device: str, tmp: str, workers: int) -> dict:
    """TIAToolbox 2.1 DeepFeatureExtractor, ResNet34 (random weights, no download), 224 px at
    0.5 um/px on its own tissue mask, same slide; its ``run()`` is the loop."""
    import zarr
    from tiatoolbox.models.architecture.vanilla import CNNBackbone
    from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor
    from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig

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
        [Path(slide)],
        patch_mode=False,
        ioconfig=io,
        save_dir=Path(tmp) / "tia",
        overwrite=True,
        output_type="zarr",
        auto_get_mask=True,
    )
    loop = time.perf_counter() - t0
    t_end = time.time()
    group = zarr.open(str(next(iter(out.values()))), mode="r")
    n = max(
        group[k].shape[0]
        for k in group.array_keys()
        if group[k].ndim == 2 and group[k].shape[1] == 512
    )
    return {"patches": int(n), "loop_s": loop, "t_end": t_end}


def tiatoolbox_whole(slide: Path, device: str, tmp: Path, workers: int) -> dict | None:
    try:
        import tiatoolbox  # noqa: F401
    except ImportError as error:
        print(f"TIAToolbox not measured: {error}")
        return None
    document = {"slide": str(slide), "device": device, "tmp": str(tmp), "workers": workers}
    result, whole = run_child("tiatoolbox", document)
    n = result["patches"]
    return {"patches": n, "whole_s": whole, "whole": n / whole, "loop": n / result["loop_s"]}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2x2 tiling, 64 patches")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA)")
    parser.add_argument("--synthetic", help="also a synthetic 40x slide of WxH level-0 pixels")
    parser.add_argument("--tiatoolbox", action="store_true", help="also time TIAToolbox (slow)")
    parser.add_argument("--bf16", action="store_true", help="also bf16 explicitly")
    parser.add_argument(
        "--copies", type=int, default=1, help="slides per cohort (links to one file)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions")
    parser.add_argument(
        "--runs",
        default="default,fp32,int8",
        help="fpstore runs to time, of default, fp32, bf16, int8 (CPU), default-compiled (CUDA "
        "with --compile); cosines need fp32",
    )
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=10.0, help="per model-only variant")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp one)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)

    import torch

    from fpstore.encoders.base import resolve_device, resolve_precision

    device = resolve_device(args.device)
    auto = resolve_precision("auto", device)
    batch = args.batch or (256 if device == "cuda" else 32)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(
        f"device {device} ({machine}), torch {torch.__version__}, batch {batch}, "
        f"precision auto = {auto.describe()}, work {work}"
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
    # name -> ExtractConfig fields; "default" is what `fpstore extract` does unasked.
    known = {
        "default": {},
        "fp32": {"precision": "fp32"},
        "bf16": {"precision": "bf16"},
        "int8": {"precision": "int8"},
        "default-compiled": {"compile": True},
    }
    wanted = [name.strip() for name in args.runs.split(",")]
    if args.bf16:
        wanted.append("bf16")
    if device == "cuda" and args.compile:
        wanted.append("default-compiled")
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {sorted(known)}")
    skip = {"int8"} if device == "cuda" else {"default-compiled"}
    runs = {name: known[name] for name in dict.fromkeys(wanted) if name not in skip}
    variants = [("fp32", "fp32", False, False), ("fp32 channels_last", "fp32", True, False)]
    if auto.precision == "bf16" or "bf16" in runs:
        variants.append(("bf16 channels_last", "bf16", True, False))
    if "int8" in runs:
        variants.append(("int8 (static, x86)", "int8", True, False))
    if "default-compiled" in runs:
        variants.append(("bf16 channels_last compiled", "bf16", True, True))
    rates = model_only(device, batch, 3.0 if args.quick else args.seconds, variants)
    measured: list[dict] = []  # every fpstore run as it ends: figures written at once

    def save(**more) -> None:
        """--json: what is measured so far (a run cut short by a time limit keeps it)."""
        if args.json:
            document = {
                "device": device,
                "machine": machine,
                "precision_auto": auto.describe(),
                "model_only": rates,
                "measured": measured,
                "rounds": args.rounds,
                **more,
            }
            part = args.json.with_name(args.json.name + ".part")  # whole or not at all
            part.write_text(json.dumps(document, indent=2, default=str))
            part.replace(args.json)

    save()
    model_of = {
        "fp32": "fp32 channels_last",
        "bf16": "bf16 channels_last",
        "int8": "int8 (static, x86)",
    }

    common = {
        "encoder": "random-resnet34",
        "patches": patches,
        "device": device,
        "num_workers": args.workers,
        "batch_size": args.batch,
    }
    tia_workers = max(args.workers, 0) or os.cpu_count()
    rounds = []  # per round: {(cohort, run): figures}, {"tiatoolbox": figures}
    for r in range(args.rounds):
        order = [(c, name) for c in cohorts for name in runs]
        if args.tiatoolbox:
            order.append(("real", "tiatoolbox"))
        shift = r % len(order)
        order = order[shift:] + order[:shift]
        found, vectors = {}, {}
        for cohort, name in order:
            if name == "tiatoolbox":
                found[(cohort, name)] = tiatoolbox_whole(cohorts[cohort], device, work, tia_workers)
                continue
            figures = fpstore_run(store, cohort, {**common, **runs[name]})
            vectors[(cohort, name)] = read_vectors(store, cohort)
            found[(cohort, name)] = figures
            model = rates[model_of[figures["precision"]]]
            measured.append(
                {
                    "round": r + 1,
                    "cohort": cohort,
                    "run": name,
                    **figures,
                    "loop_vs_model": figures["loop"] / model,
                }
            )
            save()
            print(
                f"  round {r + 1} {cohort} {name} ({figures['precision']}): {figures['patches']} "
                f"patches, whole {figures['whole_s']:.1f} s = {figures['whole']:.1f}/s, loop "
                f"{figures['loop']:.1f}/s, first patch {figures['first_patch_s']:.1f} s into "
                "the run",
                flush=True,
            )
        for (cohort, name), v in vectors.items():  # agreement with this round's fp32 run
            ref = vectors.get((cohort, "fp32"))
            if ref is None or name == "fp32":
                found[(cohort, name)]["cosine_min"] = None
                continue
            cos = np.sum(v * ref, 1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref, axis=1))
            found[(cohort, name)]["cosine_min"] = float(cos.min())
        rounds.append(found)

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    tia = [f.get(("real", "tiatoolbox")) for f in rounds] if args.tiatoolbox else []
    if any(t is None for t in tia):
        tia = []
    print("\nmodel only (ResNet34 forward, uint8 batch resident on the device):")
    for name, rate in rates.items():
        print(f"  {name:32s} {rate:10.1f} patches/s")
    print(
        f"\nwhole run = process start to last file; loop = first claim to last file "
        f"(medians over {args.rounds} round(s); ratios within each round, then their median):"
    )
    table = []
    for cohort in cohorts:
        for name in runs:
            figures = [f[(cohort, name)] for f in rounds]
            precision = figures[0]["precision"]
            row = {
                "cohort": cohort,
                "run": name,
                "precision": precision,
                "patches": figures[0]["patches"],
                "whole": median(f["whole"] for f in figures),
                "loop": median(f["loop"] for f in figures),
                "first_patch_s": median(f["first_patch_s"] for f in figures),
                "whole_vs_model": median(f["whole"] for f in figures) / rates[model_of[precision]],
                "loop_vs_model": median(f["loop"] for f in figures) / rates[model_of[precision]],
                "cosine_min": median(f.get("cosine_min") for f in figures),
                "decode": figures[0]["decode"],
                "decode_fallbacks": figures[0]["decode_fallbacks"],
                "int8_agreement": figures[0]["int8_agreement"],
            }
            if tia and cohort == "real":
                row["whole_vs_tiatoolbox"] = median(
                    f[(cohort, name)]["whole"] / t["whole"] for f, t in zip(rounds, tia)
                )
                row["loop_vs_tiatoolbox_loop"] = median(
                    f[(cohort, name)]["loop"] / t["loop"] for f, t in zip(rounds, tia)
                )
            table.append(row)
            line = (
                f"  {cohort:6s} {name:17s} {precision:5s} {row['patches']:6d} patches  whole "
                f"{row['whole']:8.1f}/s  loop {row['loop']:8.1f}/s  = {row['loop_vs_model']:.2f}x "
                f"model-only (whole {row['whole_vs_model']:.2f}x)"
            )
            if "whole_vs_tiatoolbox" in row:
                line += (
                    f"  = {row['whole_vs_tiatoolbox']:.2f}x TIAToolbox whole "
                    f"({row['loop_vs_tiatoolbox_loop']:.2f}x loop to loop)"
                )
            if row["cosine_min"] is not None:
                line += f"  cosine to fp32 min {row['cosine_min']:.5f}"
            print(line)
    if tia:
        whole = median(t["whole"] for t in tia)
        loop = median(t["loop"] for t in tia)
        print(
            f"  real   TIAToolbox        fp32  {tia[0]['patches']:6d} patches  whole "
            f"{whole:8.1f}/s  loop {loop:8.1f}/s ({tia_workers} loader workers)"
        )
    save(runs=table, tiatoolbox=tia)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
