"""Synthetic slide generation: speed and peak memory of streaming a full-size slide.

For one whole-slide image of --slide-size (default 40,000 x 30,000 px at 0.25 um/px,
a 10 x 7.5 mm section) it measures, in a fresh child process each:

- fpstore: ``write_slide`` rendering + encoding + writing the pyramid tile by tile;
  wall time, level-0 megapixels/s, file size, and peak resident memory against the
  raw level-0 image (W x H x 3 bytes: what holding the slide in memory would take)
  and against the child's resident memory before rendering (Python + imports);
- ceiling: JPEG-encoding the same number of level-0 tiles (no rendering, no TIFF),
  the least any writer of this file must spend; ours / ceiling is the cost of drawing.

With --presets it also times whole presets (``synthesize``) as the CLI runs them.

    python benchmarks/bench_synth.py                                # 40000x30000, render 0.5 um/px
    python benchmarks/bench_synth.py --slide-size 4096x3072 --presets small   # smoke run
    python benchmarks/bench_synth.py --presets small,demo --workers 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    """Peak resident set size of this process so far (MB; Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    """Resident set size now (MB), from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_slide(width: int, height: int, render_mpp: float, out: Path) -> dict:
    from fpstore.synth.api import draw_patient, wsi_scene
    from fpstore.synth.presets import get_preset
    from fpstore.synth.render import TileRenderer, chunk_px
    from fpstore.synth.sites import SITES
    from fpstore.synth.wsi import write_slide

    patient = draw_patient(0, "TCGA-A2-BNCH", "tcga", get_preset("demo"), signal=True)
    scene = wsi_scene(0, "bench.svs", patient.morph, (width, height))
    renderer = TileRenderer(scene, SITES["A2"], render_mpp, chunk_px(render_mpp))
    renderer.render(0, 0)  # texture banks built once, as in any real run
    before = _current_rss_mb()
    start = time.perf_counter()
    written = write_slide(out / "bench.svs", renderer, out / "bench.png", {})
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_rss_mb": _rss_mb(),
        "rss_before_mb": before,
        "bytes": (out / "bench.svs").stat().st_size,
        "levels": len(written.level_dimensions),
    }


def child_encode(width: int, height: int, quality: int) -> dict:
    """JPEG-encode as many 512 px tiles as the slide has, from one realistic tile."""
    import math

    import numpy as np

    from fpstore.synth.wsi import TILE, _jpeg

    rng = np.random.default_rng(0)
    tile = np.clip(rng.normal(200, 30, (TILE, TILE, 3)), 0, 255).astype(np.uint8)
    n = math.ceil(width / TILE) * math.ceil(height / TILE)
    start = time.perf_counter()
    for _ in range(n):
        _jpeg(tile, quality)
    return {"seconds": time.perf_counter() - start, "tiles": n}


def child_preset(name: str, workers: int, out: Path) -> dict:
    from fpstore.synth import synthesize

    start = time.perf_counter()
    summary = synthesize(name, out / name, seed=0, workers=workers, progress=False)
    return {
        "seconds": time.perf_counter() - start,
        "bytes": summary.bytes,
        "files": summary.files,
        "peak_rss_mb": _rss_mb(),
    }


def _in_child(*args: str) -> dict:
    """Run this script's --child mode in a fresh interpreter; its last line is JSON."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide-size", default="40000x30000", help="WxH level-0 px")
    parser.add_argument("--render-mpp", type=float, default=0.5, choices=(0.25, 0.5, 1.0))
    parser.add_argument("--presets", default="", help="comma-separated presets to time too")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "slide":
            result = child_slide(int(rest[0]), int(rest[1]), float(rest[2]), Path(rest[3]))
        elif kind == "encode":
            result = child_encode(int(rest[0]), int(rest[1]), int(rest[2]))
        else:
            result = child_preset(rest[0], int(rest[1]), Path(rest[2]))
        print(json.dumps(result))
        return

    width, height = (int(v) for v in args.slide_size.lower().split("x"))
    mpix = width * height / 1e6
    raw_mb = width * height * 3 / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        ours = _in_child("slide", str(width), str(height), str(args.render_mpp), tmp)
        ceiling = _in_child("encode", str(width), str(height), "80")
        print(
            f"slide {width}x{height} px (level 0, 0.25 um/px), tissue drawn at "
            f"{args.render_mpp} um/px, {ours['levels']} levels, {ours['bytes'] / 2**20:.1f} MB"
        )
        print(
            f"  fpstore write_slide : {ours['seconds']:8.1f} s  {mpix / ours['seconds']:7.2f} Mpx/s"
        )
        print(
            f"  JPEG-encode ceiling : {ceiling['seconds']:8.1f} s  "
            f"{mpix / ceiling['seconds']:7.2f} Mpx/s   ours/ceiling speed = "
            f"{ceiling['seconds'] / ours['seconds']:.3f}"
        )
        grown = ours["peak_rss_mb"] - ours["rss_before_mb"]
        print(
            f"  peak RSS {ours['peak_rss_mb']:.0f} MB = {ours['rss_before_mb']:.0f} MB before "
            f"writing (Python, imports, texture banks) + {grown:.0f} MB while writing"
        )
        print(
            f"  raw level 0 would be {raw_mb:.0f} MB: "
            f"peak/raw = {ours['peak_rss_mb'] / raw_mb:.3f}, growth/raw = {grown / raw_mb:.3f}"
        )
        for name in filter(None, args.presets.split(",")):
            r = _in_child("preset", name, str(args.workers), tmp)
            print(
                f"preset {name:6s}: {r['seconds']:7.1f} s with {args.workers} worker(s), "
                f"{r['files']} files, {r['bytes'] / 2**20:.0f} MB, parent peak RSS "
                f"{r['peak_rss_mb']:.0f} MB"
            )


if __name__ == "__main__":
    main()
