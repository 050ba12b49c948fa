"""5-fold MIL cross-validation on P patients x K patches of D-dim fingerprints (target: < 60 s).

    python benchmarks/bench_classify.py                        # 1,000 x 120 x 512, the claim
    python benchmarks/bench_classify.py --patients 200 --patches 30   # smoke run

Synthetic fingerprints (ReLU-like, a marker planted in 20% of the patches) are made first and
not timed. Then the paper's protocol runs end to end exactly as `fpstore classify` runs it
(groups, 5 folds of train/early-stop/test, scoring, pooled AUC with a 2,000-resample bootstrap
CI), with 2 threads and with 1. Printed beside it:

    matmul floor   the forward + backward passes of the 512 x 8 layer over the training
                   patches, for the same number of epochs, with nothing else: what an epoch
                   cannot go below; "ours / floor" says how much the rest (batching, Adam,
                   early-stopping evaluation, copies) adds
    logreg         the pooled-mean logistic-regression baseline on the same splits
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_data(patients: int, patches: int, dim: int, seed: int = 0):
    from fpstore.classify.bags import Bags

    rng = np.random.default_rng(seed)
    y = (rng.random(patients) < 0.7).astype(np.int8)
    index = np.repeat(np.arange(patients), patches)
    x = np.maximum(rng.normal(size=(len(index), dim)).astype(np.float32), 0)
    carrier = rng.random(len(index)) < 0.2
    x[carrier, :16] += np.where(y[index[carrier]] == 1, 0.15, -0.15)[:, None].astype(np.float32)
    return Bags([f"P{i:05d}" for i in range(patients)], x, index), y


def run_cv(bags, y, method: str, threads: int | None):
    from fpstore.classify.methods import create_classifier
    from fpstore.classify.protocol import cross_validate

    estimator = create_classifier(method, **({"threads": threads} if threads is not None else {}))
    start = time.perf_counter()
    result = cross_validate(bags, y, estimator, progress=False)
    return time.perf_counter() - start, result


def matmul_floor(bags, epochs: int, threads: int) -> float:
    """Forward + backward of Linear(dim, 8)-ReLU-Linear(8, 1)-tanh over 3/5 of the patches."""
    import torch

    from fpstore.classify.mil import MILNet

    torch.set_num_threads(threads)
    n_train = int(len(bags.bag_index) * 3 / 5)
    x = torch.from_numpy(bags.features[:n_train])
    net = MILNet(bags.dim)
    start = time.perf_counter()
    for _ in range(epochs):
        for lo in range(0, n_train, 32 * 120):
            net(x[lo : lo + 32 * 120]).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--patches", type=int, default=120)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", default="2,1", help="torch thread counts to time, e.g. 1")
    args = parser.parse_args()

    t = time.perf_counter()
    bags, y = make_data(args.patients, args.patches, args.dim)
    print(
        f"data: {args.patients} patients x {args.patches} patches x {args.dim} "
        f"({bags.features.nbytes / 1e6:.0f} MB float32), made in {time.perf_counter() - t:.1f} s"
    )
    import torch  # imported before timing: the first import costs seconds

    torch.set_num_threads(2)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        seconds, result = run_cv(bags, y, "mil", threads)
        rows.append((threads, seconds, result))
        print(
            f"MIL 5-fold CV, {threads} thread(s): {seconds:6.1f} s   pooled AUC "
            f"{result.metrics['auc']:.3f} [{result.metrics['ci_low']:.3f}, {result.metrics['ci_high']:.3f}]"
            f"   best epochs per fold {[f['best_epoch'] for f in result.folds]}"
        )
    best_threads, best_seconds, best = min(rows, key=lambda r: r[1])
    # Early stopping ran (best epoch + patience) epochs per fold, or max_epochs.
    from fpstore.classify.mil import MILConfig

    cfg = MILConfig()
    epochs = sum(min(f["best_epoch"] + cfg.patience, cfg.max_epochs) for f in best.folds)
    floor = matmul_floor(bags, epochs, best_threads)
    t = time.perf_counter()
    from fpstore.classify.metrics import bootstrap_ci

    bootstrap_ci(best.predictions.labels, best.predictions.scores, n_boot=2000)
    boot = time.perf_counter() - t
    logreg_seconds, logreg = run_cv(bags, y, "logreg", None)
    print(
        f"  epochs trained in all folds: {epochs}; matmul floor for them: {floor:.1f} s "
        f"({floor / epochs * 1000:.0f} ms/epoch); ours / floor = {best_seconds / floor:.2f}"
    )
    print(
        f"  bootstrap CI (2000 resamples over {len(best.predictions.labels)} patients): {boot:.2f} s"
    )
    print(
        f"logreg on pooled means, same splits: {logreg_seconds:.1f} s, AUC {logreg.metrics['auc']:.3f}"
    )
    print(
        f"target 60 s: ours / target = {best_seconds / 60:.2f} ({'met' if best_seconds < 60 else 'NOT met'}); "
        + ("; ".join(f"{r[0]} thread(s) {r[1]:.1f} s" for r in rows))
    )


if __name__ == "__main__":
    main()
