"""Time to the first encoded patch for a cohort of many slides: planning up front vs as claimed.

    git archive BASE | tar -x -C /tmp/base                             # the code before
    python benchmarks/bench_first_patch.py --before /tmp/base          # 200 slides, 2 rounds
    python benchmarks/bench_first_patch.py --slides 20 --rounds 1      # smoke

A cohort of --slides patients, one slide each: links to --distinct real-texture slides
(CMU-1-Small-Region tiled --tiling x --tiling and up into pyramidal JPEG TIFFs, as
bench_extract.py makes them; each link is its own slide to plan: masks are remembered per
link). Each run is
`extract` with its default settings in a fresh process, stopped as soon as the first batch
has been encoded; the figure is the time from process start to then, which a user watches
with no progress.

    before   the code at --before (another fpstore source tree, e.g. this branch's base
             commit): every slide planned (tissue mask, grid) in the main process before
             the first patch
    cold     this checkout, nothing remembered: the readers plan each patient as it is
             claimed, so the first patch waits for one patient's planning
    warm     this checkout after a run that planned every slide: the masks come from the
             store (the rerun, `patches` and the next cohort on the same files)

Runs alternate within each round (--rounds); figures are medians. Also prints how long
planning every slide takes here, one after another (what `before` waits for).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Runs in the child: stop at the first encoded batch and say when that was.
CHILD = """
import json, os, sys, time
import fpstore
from fpstore.encoders.base import Encoder
from fpstore.extract.config import ExtractConfig
from fpstore.extract.run import extract

encode = Encoder.encode

def first(self, batch):
    out = encode(self, batch)
    print(json.dumps({"t_first": time.time(), "code": fpstore.__file__, "n": len(batch)}))
    sys.stdout.flush()
    os._exit(0)

Encoder.encode = first
extract(sys.argv[1], sys.argv[2], ExtractConfig(encoder="random-resnet34", device="cpu"), False)
print(json.dumps({"t_first": None}))
"""


def first_patch(code: Path, store: Path, cohort: str) -> tuple[float, str]:
    """(seconds from process start to the first encoded batch, the fpstore it imported).

    Runs this interpreter with ``code`` first on PYTHONPATH, from the store's folder (so
    that neither the current folder nor an editable install decides which fpstore runs:
    the child prints the one it imported)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    t_start = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(store), cohort],
        capture_output=True,
        text=True,
        env=env,
        cwd=store.parent,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines or json.loads(lines[-1])["t_first"] is None:
        raise SystemExit(f"run with {code} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1])
    return result["t_first"] - t_start, result["code"]


def reset(store: Path, cohort: str, masks: bool) -> None:
    """Forget the cohort's fingerprints (and the remembered masks when ``masks``)."""
    for table in ("fingerprints", "status"):
        shutil.rmtree(store / table / "encoder=random-resnet34" / f"cohort={cohort}", True)
    if masks:
        shutil.rmtree(store / "cache" / "tissue-masks", ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slides", type=int, default=200)
    parser.add_argument("--distinct", type=int, default=4, help="real-texture slide files")
    parser.add_argument(
        "--tiling",
        type=int,
        default=3,
        help="the first file is CMU tiled NxN (3: 6,660 x 8,900 px), the next (N+1)x(N+1)...; "
        "10 makes 22,200 x 29,670 px (11 x 15 mm at 0.5 um/px), a TCGA-sized section",
    )
    parser.add_argument("--before", type=Path, help="an fpstore source tree to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: temp)")
    args = parser.parse_args(argv)

    from bench_extract import tiled_real_slide

    from fpstore.cohort.cohorts import add_cohort
    from fpstore.config import PatchSpec
    from fpstore.extract.plan import slide_grid
    from fpstore.store.cohorts import read_cohort

    work = args.out or Path(tempfile.mkdtemp(prefix="bench-first-patch-"))
    (work / "slides").mkdir(parents=True, exist_ok=True)
    store = work / "store"
    files = [
        work / f"real{repeat}.tiff" for repeat in range(args.tiling, args.tiling + args.distinct)
    ]
    for repeat, path in zip(range(args.tiling, args.tiling + args.distinct), files):
        if not path.is_file():  # a rerun in the same --out folder keeps them
            tiled_real_slide(path, repeat)
    lines = []
    for i in range(args.slides):
        link = work / "slides" / f"S{i:04d}.tiff"
        if not link.exists():
            link.symlink_to(files[i % len(files)])
        lines.append(f"P{i:04d},{link},Positive,Negative,Negative\n")
    labels = work / "labels.csv"
    labels.write_text("patient_id,slide,ER,PR,Her2\n" + "".join(lines))
    add_cohort(store, "many", clinical=labels, fmt="csv", force=True)
    print(f"{args.slides} slides (links to {len(files)} files) in {store}; {os.cpu_count()} cores")

    runs = {"cold": ROOT, "warm": ROOT}
    if args.before:
        runs = {"before": args.before.resolve(), **runs}
    seconds = {name: [] for name in runs}
    serial = []
    for r in range(args.rounds):
        for name, code in runs.items():
            if name == "warm":  # plan every slide once, serially: that remembers the masks
                reset(store, "many", masks=True)
                t0 = time.perf_counter()
                for slide in read_cohort(store, "many").slide_records():
                    slide_grid(slide, PatchSpec(), store)
                serial.append(time.perf_counter() - t0)
                reset(store, "many", masks=False)
            else:
                reset(store, "many", masks=True)
            took, imported = first_patch(code, store, "many")
            seconds[name].append(took)
            print(f"  round {r + 1} {name:6s} first patch after {took:6.1f} s ({imported})")
    print(f"\ntime to the first encoded patch, {args.slides} slides, median of {args.rounds}:")
    for name, values in seconds.items():
        line = f"  {name:6s} {statistics.median(values):7.1f} s"
        if "before" in seconds and name != "before":
            ratio = statistics.median(b / v for b, v in zip(seconds["before"], values))
            line += f"   {ratio:5.1f}x sooner than before"
        print(line)
    print(
        f"  planning all {args.slides} slides one after another here: "
        f"{statistics.median(serial):.1f} s ({statistics.median(serial) / args.slides:.2f} s "
        "per slide)"
    )


if __name__ == "__main__":
    main()
