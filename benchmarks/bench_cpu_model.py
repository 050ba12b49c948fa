"""The ResNet34 model step on a CPU, fp32 and what may speed it up (issue 28, item 4).

Claim examined: on a CPU without native bf16 the fp32 ResNet34 sets extraction's pace;
which of channels_last, oneDNN fusion (a traced, frozen graph: convolution + batch norm +
ReLU folded into one oneDNN primitive), torch.compile (inductor's C++ kernels) and int8
(fpstore's static x86 quantization, ``--precision int8``) make it cheaper, and whether int8
keeps every fingerprint within cosine 0.9995 of fp32.

On real patches of the CMU slide (112 um at 224 px), random weights (seed 0), it times a
forward pass of ``--batch`` patches for each variant, in ``--rounds`` interleaved rounds (the
best round kept: a shared machine disturbs some), and prints patches/s and the ratio to the
eager contiguous fp32 model in the same run, with the CPU's name, its flags and
``ONEDNN_MAX_CPU_ISA``. To emulate a CPU with AVX2 only on an AVX-512 machine:

    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_cpu_model.py
    python benchmarks/bench_cpu_model.py --batch 4 --rounds 1 --no-compile --calibrate 8  # smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_stain import cpu_name, real_patches  # noqa: E402

from fpstore.encoders.registry import create_encoder  # noqa: E402


def rate(fn, x: torch.Tensor) -> float:
    """Patches/s of one call (after one warm-up call)."""
    with torch.inference_mode():
        fn(x)
        start = time.perf_counter()
        fn(x)
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--calibrate", type=int, default=64, help="int8 calibration patches")
    args = parser.parse_args()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "unset (the CPU's best)")
    print(f"{cpu_name()}; ONEDNN_MAX_CPU_ISA {isa}; torch {torch.__version__}, ", end="")
    print(f"{torch.get_num_threads()} threads; batch {args.batch}")

    pixels = torch.from_numpy(real_patches(224))
    pixels = pixels[torch.arange(args.batch) % len(pixels)]
    encoder = create_encoder("random-resnet34", seed=0).prepare("cpu", "fp32", channels_last=False)
    with torch.inference_mode():
        x = encoder.normalise(pixels).contiguous()
        reference = encoder.backbone(x).flatten(1)
    contiguous = encoder.backbone
    channels_last = create_encoder("random-resnet34", seed=0).prepare("cpu", "fp32").backbone
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        frozen = torch.jit.freeze(torch.jit.trace(channels_last, x_cl[:1]))
    variants = {
        "fp32 eager, contiguous": (contiguous, x),
        "fp32 eager, channels_last": (channels_last, x_cl),
        "fp32 oneDNN fusion (traced, frozen), channels_last": (frozen, x_cl),
    }
    if not args.no_compile:
        compiled = torch.compile(channels_last)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(x_cl)
        print(f"torch.compile: first call (compilation) {time.perf_counter() - start:.0f} s")
        variants["fp32 torch.compile (inductor), channels_last"] = (compiled, x_cl)
    int8 = create_encoder("random-resnet34", seed=0).prepare("cpu", "int8")
    agreement = int8.calibrate(torch.from_numpy(real_patches(224))[: args.calibrate])
    variants["int8 (x86 static quantization)"] = (int8._forward, x)
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(int8._forward(x).flatten(1), reference)
    for name, (fn, _) in variants.items():
        if name.startswith("fp32"):
            with torch.inference_mode():
                same = torch.nn.functional.cosine_similarity(fn(_).flatten(1), reference)
            assert float(same.min()) > 0.99999, f"{name} changed the fingerprints"

    best = {name: 0.0 for name in variants}
    for _ in range(args.rounds):
        for name, (fn, inputs) in variants.items():
            best[name] = max(best[name], rate(fn, inputs))
    base = best["fp32 eager, contiguous"]
    for name, value in best.items():
        print(f"  {name:52s} {value:7.2f} patches/s  {value / base:5.2f}x")
    print(
        f"int8 vs fp32 fingerprints on these {len(x)} patches: min cosine "
        f"{float(cosine.min()):.5f}, median {float(np.median(cosine.numpy())):.5f}; "
        f"calibration hold-out min {agreement['min_cosine']}"
    )


if __name__ == "__main__":
    main()
