"""Scaling of extraction on Ray with 1, 2, 4 workers on one machine; Ray's own overheads.

    python benchmarks/bench_scaling.py --quick                 # smoke: 2 slides, tiny patches
    python benchmarks/bench_scaling.py                         # 2-core CPU: 1, 2, 4 workers
    python benchmarks/bench_scaling.py --device cuda --workers 1,2,4,8 --copies 32

A "worker" is one CPU of a fresh Ray instance (``ray.init(num_cpus=W)``): W encoder actors
of half a CPU each (one torch thread) and reader tasks on the other half. On a GPU machine
(--device cuda) the encoders are one actor per GPU and W counts the reader CPUs. Every run
extracts the same cohort (``--copies`` links to one tiled real-texture slide, see
bench_extract.py) into a fresh store. Printed per W: patches/s of the extraction loop and end
to end (planning included), the efficiency ratio rate(W) / (W x rate(1)), and the local
engine's rate on the same machine. Then the figures the 10,000-slide plan (docs/scaling.md)
rests on: Ray's no-op task rate and its object-store put+get bandwidth for one chunk of
pixels. Timings are noisy on a shared machine: rerun quietly before quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def ray_overheads(ray, chunk_patches: int, out_px: int) -> dict:
    """No-op tasks per second and put+get GB/s of one read chunk on the running instance."""

    @ray.remote(num_cpus=0)
    def noop():
        return None

    ray.get([noop.remote() for _ in range(50)])  # warm the worker pool
    n = 1000
    t = time.perf_counter()
    ray.get([noop.remote() for _ in range(n)])
    tasks_per_s = n / (time.perf_counter() - t)
    pixels = np.random.default_rng(0).integers(0, 255, (chunk_patches, out_px, out_px, 3), np.uint8)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        ray.get(ray.put(pixels))
    gbps = reps * pixels.nbytes / (time.perf_counter() - t) / 1e9
    return {
        "noop_tasks_per_s": round(tasks_per_s, 1),
        "chunk_mb": round(pixels.nbytes / 1e6, 1),
        "object_store_put_get_gb_per_s": round(gbps, 2),
    }


def run_ray(store: Path, cohort: str, workers: int, config, device: str) -> tuple[dict, dict]:
    import ray

    from fpstore.extract.ray import RayConfig, extract_on_ray

    gpu = device == "cuda"
    start_ray(ray, workers)
    try:
        rc = RayConfig(
            encoders=0 if gpu else workers,
            encoder_cpus=0 if gpu else 0.5,
            reader_cpus=1.0 if gpu else 0.5,
        )
        summary = extract_on_ray(store, cohort, config, rc, progress=False).to_dict()
        overheads = ray_overheads(ray, rc.read_chunk, config_out_px(config))
    finally:
        ray.shutdown()
    return summary, overheads


def per_core_costs(slide: Path, patches: int, out_px: int) -> dict:
    """One core: planning (tissue mask + grid) seconds per slide, read+decode patches/s."""
    from fpstore.config import PatchSpec
    from fpstore.extract.plan import grid_or_error
    from fpstore.slides.slide import open_slide
    from fpstore.store.cohorts import CohortSlide

    record = CohortSlide(slide.stem, "bench", str(slide), None, None)
    t = time.perf_counter()
    _, grid, _ = grid_or_error(record, PatchSpec(112.0, out_px))
    plan_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    take = rng.choice(len(grid), min(patches, len(grid)), replace=False)
    xy = np.stack([grid.column("x").to_numpy()[take], grid.column("y").to_numpy()[take]], 1)
    size = float(grid.column("size_px")[0].as_py())
    with open_slide(slide) as handle:
        handle.read_patches(xy[:4], size, out_px)  # warm the tile cache and the decoder
        t = time.perf_counter()
        handle.read_patches(xy, size, out_px)
        read_rate = len(xy) / (time.perf_counter() - t)
    return {
        "plan_seconds_per_slide": round(plan_s, 2),
        "read_patches_per_s_per_core": round(read_rate, 1),
        "tissue_patches_in_slide": len(grid),
    }


def start_ray(ray, cpus: int) -> None:
    """A throwaway local instance: no auth token file, and the minimal dashboard agent (no
    metrics), which starts in half the time; a full agent can miss the raylet's 15 s window
    on a busy 2-core machine. Neither changes how tasks and actors run."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray._private.utils as ray_utils

    if hasattr(ray_utils, "get_dashboard_dependency_error"):
        ray_utils.get_dashboard_dependency_error = lambda: ImportError("benchmark: minimal agent")
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)


def config_out_px(config) -> int:
    return int(config.encoder_options.get("out_px", 224))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--copies", type=int, default=8, help="slides in the cohort")
    parser.add_argument("--patches", type=int, default=120, help="patches per patient (slide)")
    parser.add_argument("--out-px", type=int, default=224, help="encoder input side (px)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 slides, 16 patches, 64 px"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.quick:
        args.copies, args.patches, args.out_px = 2, 16, 64
    counts = [int(w) for w in args.workers.split(",")]

    from bench_extract import add_cohort_for, tiled_real_slide

    from fpstore.extract.config import ExtractConfig
    from fpstore.extract.run import extract

    config = ExtractConfig(
        encoder="random-resnet34",
        encoder_options={"out_px": args.out_px},
        patches=args.patches,
        device=args.device,
    )
    rows, overheads = [], {}
    with tempfile.TemporaryDirectory(prefix="fpstore-bench-scaling-") as tmp:
        tmp = Path(tmp)
        slide = tiled_real_slide(tmp / "tiled.tiff", 2 if args.quick else 3)
        print(
            f"cohort: {args.copies} slides x {args.patches} patches of {args.out_px} px, "
            f"random-resnet34 on {args.device}",
            file=sys.stderr,
        )

        def fresh_store(name: str) -> Path:
            store = tmp / name
            add_cohort_for(store, slide, "c", copies=args.copies)
            return store

        t = time.perf_counter()
        local = extract(fresh_store("local"), "c", config, progress=False).to_dict()
        print(
            f"local engine: {local['loop_patches_per_s']} patches/s "
            f"({time.perf_counter() - t:.0f} s)",
            file=sys.stderr,
        )
        for workers in counts:
            t = time.perf_counter()
            summary, overheads[workers] = run_ray(
                fresh_store(f"ray{workers}"), "c", workers, config, args.device
            )
            if summary["failed"]:
                raise SystemExit(f"{summary['failed']} slide(s) failed: {summary['slides']}")
            rows.append(
                {
                    "workers": workers,
                    "patches": summary["patches"],
                    "loop_patches_per_s": summary["loop_patches_per_s"],
                    "end_to_end_patches_per_s": summary["patches_per_s"],
                    "seconds": summary["seconds"],
                }
            )
            print(
                f"ray {workers} worker(s): {summary['loop_patches_per_s']} patches/s "
                f"({time.perf_counter() - t:.0f} s with Ray start-up)",
                file=sys.stderr,
            )
        costs = per_core_costs(slide, 64 if args.quick else 256, args.out_px)
    base = rows[0]["loop_patches_per_s"] / rows[0]["workers"]
    for row in rows:
        row["efficiency"] = (
            round(row["loop_patches_per_s"] / (row["workers"] * base), 3) if base else 0.0
        )
        row["ray_vs_local"] = round(row["loop_patches_per_s"] / local["loop_patches_per_s"], 3)
    result = {
        "cpus": os.cpu_count(),
        "device": args.device,
        "local_engine_patches_per_s": local["loop_patches_per_s"],
        "runs": rows,
        "ray_overheads": overheads[counts[-1]],
        "per_core": costs,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"\n{args.copies} slides x {args.patches} patches, {args.out_px} px, {args.device}, "
        f"{os.cpu_count()} CPUs; local engine {local['loop_patches_per_s']} patches/s"
    )
    print(f"{'workers':>7}  {'loop p/s':>9}  {'e2e p/s':>8}  {'efficiency':>10}  {'ray/local':>9}")
    for row in rows:
        print(
            f"{row['workers']:>7}  {row['loop_patches_per_s']:>9.1f}  "
            f"{row['end_to_end_patches_per_s']:>8.1f}  {row['efficiency']:>10.3f}  "
            f"{row['ray_vs_local']:>9.3f}"
        )
    o = overheads[counts[-1]]
    print(
        f"Ray: {o['noop_tasks_per_s']} no-op tasks/s; object store put+get of a "
        f"{o['chunk_mb']} MB chunk: {o['object_store_put_get_gb_per_s']} GB/s"
    )
    print(
        f"one core: planning {costs['plan_seconds_per_slide']} s per slide "
        f"({costs['tissue_patches_in_slide']} tissue patches); read+decode+resize "
        f"{costs['read_patches_per_s_per_core']} patches/s"
    )


if __name__ == "__main__":
    main()
