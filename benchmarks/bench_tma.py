"""TMA dearraying on real array overviews: what is found against the truth, and how long it
takes.

For each real image in tests/data/tma (see tests/data/PROVENANCE.md) it runs ``detect`` (the
lattice fit, no crops) and prints: cores, empty positions and orientation cores found, the
blocks (rows x columns), the scale --core-um 600 gives, and where a truth file exists the
true cores found within half their radius (recall) and the cores found near no true one
(invented). Orientation cores count as found cores; empty positions do not. It also times
``detect`` on a synthetic 1000 x 800 overview of 12 x 16 touching cores, the size the issue
names. Times are the median of --reps runs after one warm-up, wall and CPU seconds, with the
load average printed first (the build machine is shared).

    python benchmarks/bench_tma.py
    python benchmarks/bench_tma.py --reps 5 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "tma"
IMAGES = (
    "tma_ihc_dense_158867.jpg",
    "tma_ihc_tilted_ABC_107_1_010_1.jpg",
    "tma_he_histoprep_tma_spots.jpeg",
)


def score(array, truth_path: Path) -> dict:
    truth = json.loads(truth_path.read_text())
    t = np.array([[c["x"], c["y"]] for c in truth])
    radius = np.array([c["radius"] for c in truth])
    found = np.array([k.centre for k in array.cores if k.status != "empty"])
    near = np.hypot(*(t[:, None, :] - found[None, :, :]).transpose(2, 0, 1)) < 0.5 * radius[:, None]
    hits = int(near.any(axis=1).sum())
    return {
        "truth": len(truth),
        "found": hits,
        "recall": round(hits / len(truth), 3),
        "invented": int((~near.any(axis=0)).sum()),
    }


def timed(function, reps: int) -> tuple[object, float, float]:
    """(result, median wall s, median CPU s of this process): on a shared machine the CPU
    time is what the run costs, the wall time what it took beside the others."""
    result = function()  # warm-up: imports, caches
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return result, statistics.median(wall), statistics.median(cpu)


def synthetic_overview(path: Path) -> None:
    """1000 x 800 px: 12 x 16 pink textured cores, 50 px across, 55 px apart, tilted 4 deg."""
    import cv2

    rng = np.random.default_rng(0)
    img = np.full((800, 1000, 3), 244, np.uint8)
    t = math.radians(4)
    for r in range(12):
        for c in range(16):
            gx, gy = (c - 7.5) * 55, (r - 5.5) * 55
            x = 500 + gx * math.cos(t) - gy * math.sin(t)
            y = 400 + gx * math.sin(t) + gy * math.cos(t)
            colour = tuple(int(v) for v in rng.integers((150, 60, 150), (220, 140, 210)))
            cv2.circle(img, (round(x), round(y)), 25, colour, -1)
            for _ in range(6):
                h = rng.normal(0, 7, 2)
                cv2.circle(img, (round(x + h[0]), round(y + h[1])), 2, (70, 30, 110), -1)
    cv2.imwrite(str(path), img[..., ::-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from fpstore.slides.tma import TmaSpec, array_scale, detect, open_array_slide

    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = []
    for name in IMAGES:
        slide, provisional = open_array_slide(DATA / name)
        with slide:
            array, seconds, cpu = timed(lambda s=slide: detect(s), args.reps)
            scale = array_scale(slide, array, TmaSpec(core_um=600), provisional)
        statuses = [k.status for k in array.cores]
        row = {
            "image": name,
            "size": f"{slide.info.width}x{slide.info.height}",
            "cores": statuses.count("core"),
            "empty": statuses.count("empty"),
            "orientation": statuses.count("orientation"),
            "blocks": " ".join(f"{b['rows']}x{b['columns']}" for b in array.blocks),
            "tilt_deg": round(array.tilt_deg, 1),
            "um_per_px_at_600um": round(scale["mpp"], 2),
            "detect_s": round(seconds, 2),
            "cpu_s": round(cpu, 2),
        }
        truth = DATA / (name.split(".")[0] + ".truth.json")
        if truth.is_file():
            row.update(score(array, truth))
        rows.append(row)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "overview.png"
        synthetic_overview(path)
        slide, _ = open_array_slide(path)
        with slide:
            array, seconds, cpu = timed(lambda: detect(slide), args.reps)
        rows.append(
            {
                "image": "synthetic 12x16 touching, 4 deg",
                "size": "1000x800",
                "cores": len(array.found),
                "blocks": " ".join(f"{b['rows']}x{b['columns']}" for b in array.blocks),
                "detect_s": round(seconds, 2),
                "cpu_s": round(cpu, 2),
            }
        )

    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
