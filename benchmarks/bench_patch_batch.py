"""The patch CNN's batch preparation: turned and flipped as uint8, normalised in one
multiply-add (``PatchCNN._batch``), against the float32 path it replaced (float first, then
turned, flipped, normalised in two passes), on the same pixels and the same draws.

    python benchmarks/bench_patch_batch.py                  # 32 x 224 px, 2 threads, CPU
    python benchmarks/bench_patch_batch.py --device cuda    # on a GPU (pinned upload)

Prints patches/s of both and their ratio (same run, interleaved), and the largest
difference between their outputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpstore.classify.patchcnn import PatchCNN, PatchCNNConfig  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def float_first(array: np.ndarray, augment: np.random.Generator, device) -> torch.Tensor:
    """The replaced path: float32 on the host, turned there, copied from pageable memory."""
    x = torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255)
    x = torch.rot90(x, int(augment.integers(4)), dims=(2, 3))
    if augment.random() < 0.5:
        x = x.flip(3)
    return ((x - MEAN) / STD).to(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20, help="batches per round and path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    array = np.random.default_rng(0).integers(
        0, 256, (args.batch, args.px, args.px, 3), dtype=np.uint8
    )
    model = PatchCNN(PatchCNNConfig(device=args.device), images=lambda ids: array)
    ids = np.arange(args.batch)
    new = model._batch(ids, np.random.default_rng(1)).cpu()
    old = float_first(array, np.random.default_rng(1), device).cpu()
    difference = float((new - old).abs().max())

    def rate(fn) -> float:
        rng = np.random.default_rng(2)
        fn(rng)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn(rng)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.repeats * args.batch / (time.perf_counter() - t0)

    ratios, rates = [], []
    for _ in range(args.rounds):
        r_old = rate(lambda rng: float_first(array, rng, device))
        r_new = rate(lambda rng: model._batch(ids, rng))
        rates.append((r_old, r_new))
        ratios.append(r_new / r_old)
    r_old, r_new = np.median(rates, axis=0)
    print(
        f"{args.batch} x {args.px} px on {args.device} ({args.threads} threads): float first "
        f"{r_old:,.0f} patches/s, uint8 first {r_new:,.0f} patches/s, ratio "
        f"{np.median(ratios):.2f}x (median of {args.rounds}); max |difference| {difference:.2e}"
    )


if __name__ == "__main__":
    main()
