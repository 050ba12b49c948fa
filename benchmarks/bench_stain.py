"""The cost of stain normalisation and stain augmentation beside the model's (issue 19).

Claim: ``--stain-norm`` costs little per patch beside the encoder's forward pass, and stain
augmentation little beside a training step.

On 64 real patches of the CMU slide (112 um read at 224 px), with torch and OpenCV on the
same cores, it times in one run:

    normalisers   fpstore's Macenko, Vahadane and Reinhard, per slide (the slide's stains
                  fitted once on the batch, then a fixed transform per batch) and per patch
                  (``extract --stain-norm``): the batch normaliser (fpstore.slides.stain_batch;
                  on the CPU its OpenCV and numpy kernels) against the same estimate one patch
                  at a time in numpy (before issue 28), both with ``--threads`` threads
                  (torch, OpenCV and BLAS), timed alternately in one run: the best of each
                  and their ratio, by the wall clock and by this process's CPU time; and
                  tiatoolbox's normalisers (per patch: its only mode)
    encoder       a ResNet34 forward pass (random weights, fp32) on the same 64 x 224 px
    augmentation  ``StainAugment`` on 64 patches of 224 and of 112 px, against a ResNet18
                  forward + backward (the training step's model work) on the same batch

and prints ms per batch of 64, ms per patch and the ratio to the model's time, with the
machine's load average beside the per-patch comparison.

    python benchmarks/bench_stain.py
    python benchmarks/bench_stain.py --repeat 3 --tiatoolbox-patches 8   # a quicker run
    taskset -c 1 python benchmarks/bench_stain.py   # issue 28's figures: one core, 1 thread
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fpstore.config import PatchSpec
from fpstore.errors import StainError
from fpstore.slides.grid import patch_grid
from fpstore.slides.slide import open_slide
from fpstore.slides.stain import (
    STAIN_METHODS,
    StainAugment,
    StainAugmentConfig,
    StainNormalizer,
    StainNormConfig,
    default_target_path,
    read_rgb,
)

CMU = Path(__file__).resolve().parents[1] / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"
BATCH = 64


def real_patches(out_px: int) -> np.ndarray:
    """64 tissue patches of the CMU slide, 112 um at ``out_px`` (repeated if fewer)."""
    with open_slide(CMU) as slide:
        grid = patch_grid(slide, PatchSpec(min_tissue=0.25))
        xy = np.stack([grid.column("x").to_numpy(), grid.column("y").to_numpy()], 1)
        patches = slide.read_patches(xy, slide.patch_size_px(112.0), out_px)
    return patches[np.arange(BATCH) % len(patches)]


def cpu_name() -> str:
    """The CPU's model name and its bf16 / AVX-512 flags (Linux), for the figures' record."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if "flags" in ln), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({' '.join(wanted)})"


def one_at_a_time(norm: StainNormalizer, patches: np.ndarray) -> np.ndarray:
    """Per-patch normalisation the numpy way: each patch fitted alone, then mapped."""
    out = []
    for patch in patches:
        try:
            out.append(norm.transform(patch, norm.fit_source(patch)))
        except StainError:
            out.append(patch)
    return np.stack(out)


def best(fn, repeat: int) -> float:
    """Least wall-clock seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def alternated(fns: list, repeat: int) -> list:
    """Per function, the least (wall, CPU) seconds of ``repeat`` calls after one warm-up call
    each, the functions taking turns so that a change in the machine's load falls on all."""
    for fn in fns:
        fn()
    best_wall, best_cpu = [float("inf")] * len(fns), [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            best_wall[i] = min(best_wall[i], time.perf_counter() - wall)
            best_cpu[i] = min(best_cpu[i], time.process_time() - cpu)
    return list(zip(best_wall, best_cpu))


def row(name: str, seconds: float, n: int, model: float) -> None:
    print(
        f"  {name:34s} {1000 * seconds:9.1f} ms/batch {1000 * seconds / n:8.2f} ms/patch "
        f"{seconds / model:7.3f}x the model"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each (best kept)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch, OpenCV and BLAS threads for the per-patch comparison, both sides",
    )
    parser.add_argument(
        "--tiatoolbox-patches",
        type=int,
        default=16,
        help="patches timed through tiatoolbox's per-patch normalisers (scaled to 64)",
    )
    args = parser.parse_args()
    import torchvision

    cpu = platform.processor() or platform.machine()
    print(f"{cpu_name() or cpu}, torch threads {torch.get_num_threads()}, batch {BATCH} patches")
    patches = real_patches(224)
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float().div(255)
    resnet34 = torchvision.models.resnet34(weights=None).eval()
    with torch.inference_mode():
        model = best(lambda: resnet34(x), args.repeat)
    per_patch = 1000 * model / BATCH
    print(f"ResNet34 forward, 64 x 224 px: {1000 * model:.0f} ms ({per_patch:.1f} ms/patch)")

    print("stain normalisation of 64 x 224 px patches:")
    for method in STAIN_METHODS:
        slide_norm = StainNormalizer(StainNormConfig(method))
        fit = best(lambda n=slide_norm: n.fit_source(patches), 1)
        source = slide_norm.fit_source(patches)
        apply = best(lambda n=slide_norm, s=source: n.transform(patches, s), args.repeat)
        row(f"{method} per slide: transform", apply, BATCH, model)
        row(f"{method} per slide: fit (once a slide)", fit, BATCH, model)
    per_patch_comparison(patches, model, args)

    from tiatoolbox.tools.stainnorm import get_normalizer

    logging.getLogger("tiatoolbox").setLevel(logging.ERROR)  # Vahadane's stability warning
    tia_target = read_rgb(default_target_path())
    some = patches[: args.tiatoolbox_patches]
    for method in STAIN_METHODS:
        norm = get_normalizer(method)
        norm.fit(tia_target)
        seconds = best(lambda n=norm: [n.transform(p.copy()) for p in some], 1)
        row(f"tiatoolbox {method} per patch", seconds * BATCH / len(some), BATCH, model)

    print("stain augmentation beside a ResNet18 forward + backward:")
    resnet18 = torchvision.models.resnet18(weights=None, num_classes=100).train()
    loss_fn = torch.nn.CrossEntropyLoss()
    labels = torch.zeros(BATCH, dtype=torch.long)
    for px in (224, 112):
        batch = patches if px == 224 else real_patches(112)
        xb = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255)

        def step(xb=xb):
            resnet18.zero_grad()
            loss_fn(resnet18(xb), labels).backward()

        train = best(step, max(1, args.repeat // 2))
        augment = StainAugment(StainAugmentConfig(scale=0.2, shift=0.05, vector=0.02), seed=0)
        tensor = torch.from_numpy(batch)
        aug = best(lambda a=augment, t=tensor: a(t), args.repeat)
        print(f"  ResNet18 forward + backward, 64 x {px} px: {1000 * train:.0f} ms")
        row(f"StainAugment 64 x {px} px", aug, BATCH, train)


def per_patch_comparison(patches: np.ndarray, model: float, args) -> None:
    """Per patch: each patch's stains fitted on itself, one patch at a time in numpy (the
    normaliser before issue 28) against the batch normaliser, same threads, alternated."""
    import cv2
    from threadpoolctl import threadpool_limits

    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    load = os.getloadavg()[0]
    print(
        f"per patch, numpy one by one vs batched: {args.threads} thread(s) each (torch, "
        f"OpenCV, BLAS), alternated, best of {args.repeat}; load average {load:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    try:
        with threadpool_limits(args.threads, user_api="blas"):
            for method in STAIN_METHODS:
                slide_norm = StainNormalizer(StainNormConfig(method))
                patch_norm = StainNormalizer(StainNormConfig(method, per="patch"))
                (one_wall, one_cpu), (batch_wall, batch_cpu) = alternated(
                    [
                        lambda n=slide_norm: one_at_a_time(n, patches),
                        lambda n=patch_norm: n.transform(patches),
                    ],
                    args.repeat,
                )
                row(f"{method} per patch, numpy one by one", one_wall, BATCH, model)
                row(f"{method} per patch, batched", batch_wall, BATCH, model)
                print(
                    f"  {method} per patch: batched is {one_wall / batch_wall:.1f}x cheaper by "
                    f"the wall clock, {one_cpu / batch_cpu:.1f}x by CPU time "
                    f"({1000 * one_cpu / BATCH:.2f} vs {1000 * batch_cpu / BATCH:.3f} ms/patch)"
                )
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)
    print(f"  load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
