"""The cost of stain normalisation and stain augmentation beside the model's (issue 19).

Claim: ``--stain-norm`` costs little per patch beside the encoder's forward pass, and stain
augmentation little beside a training step.

On 64 real patches of the CMU slide (112 um read at 224 px), with torch and OpenCV on the
same cores, it times in one run:

    normalisers   fpstore's Macenko, Vahadane and Reinhard, per slide (the slide's stains
                  fitted once on the batch, then a fixed transform per batch) and per patch
                  (``extract --stain-norm``): the whole batch at once in torch against the
                  same estimate one patch at a time in numpy (before issue 28), and
                  tiatoolbox's normalisers (per patch: its only mode)
    encoder       a ResNet34 forward pass (random weights, fp32) on the same 64 x 224 px
    augmentation  ``StainAugment`` on 64 patches of 224 and of 112 px, against a ResNet18
                  forward + backward (the training step's model work) on the same batch

and prints ms per batch of 64, ms per patch and the ratio to the model's time.

    python benchmarks/bench_stain.py
    python benchmarks/bench_stain.py --repeat 3 --tiatoolbox-patches 8   # a quicker run
"""

from __future__ import annotations

import argparse
import logging
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


def row(name: str, seconds: float, n: int, model: float) -> None:
    print(
        f"  {name:34s} {1000 * seconds:9.1f} ms/batch {1000 * seconds / n:8.2f} ms/patch "
        f"{seconds / model:7.3f}x the model"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each (best kept)")
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
        # per patch: each patch's stains fitted on itself, one patch at a time in numpy (the
        # normaliser before issue 28), against the whole batch at once in torch (today's)
        one_by_one = best(lambda n=slide_norm: one_at_a_time(n, patches), 1)
        row(f"{method} per patch, numpy one by one", one_by_one, BATCH, model)
        patch_norm = StainNormalizer(StainNormConfig(method, per="patch"))
        batched = best(lambda n=patch_norm: n.transform(patches), args.repeat)
        row(f"{method} per patch, batched (torch)", batched, BATCH, model)
        print(f"  {method} per patch: batched is {one_by_one / batched:.1f}x cheaper")

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


if __name__ == "__main__":
    main()
