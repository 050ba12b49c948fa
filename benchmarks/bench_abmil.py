"""5-fold CV time of the ABMIL head against the paper's MIL head, same data, same run.

    python benchmarks/bench_abmil.py                           # 1,000 x 120 x 512, the claim
    python benchmarks/bench_abmil.py --patients 200 --patches 30   # smoke run

The synthetic fingerprints of bench_classify.py (made first, not timed); each method runs the
paper's protocol end to end as `fpstore classify` runs it (groups, 5 folds of train /
early-stop / test, scoring, pooled AUC with a 2,000-resample bootstrap CI), with the methods'
default settings and threads. Printed: wall and CPU seconds (CPU time is the fairer figure on
a shared machine), epochs per fold, CV AUC, and ABMIL / MIL.
The methods alternate over --rounds, so a busy machine's load falls on both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from bench_classify import make_data, run_cv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--patches", type=int, default=120)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    t = time.perf_counter()
    bags, y = make_data(args.patients, args.patches, args.dim)
    print(
        f"data: {args.patients} patients x {args.patches} patches x {args.dim} "
        f"({time.perf_counter() - t:.1f} s, not timed)"
    )
    times: dict[str, list[float]] = {"mil": [], "abmil": []}
    for _ in range(args.rounds):
        for method in times:
            cpu = time.process_time()
            seconds, result = run_cv(bags, y, method, None)
            cpu = time.process_time() - cpu
            times[method].append(seconds)
            epochs = [f["best_epoch"] for f in result.folds]
            print(
                f"{method:6s} {seconds:7.1f} s ({cpu:.1f} s CPU)  best epochs {epochs}  "
                f"CV AUC {result.metrics['auc']:.3f}",
                flush=True,
            )
    best = {m: min(v) for m, v in times.items()}
    print(f"abmil / mil (best of {args.rounds}): {best['abmil'] / best['mil']:.2f}")


if __name__ == "__main__":
    main()
