"""Extraction rate of a ViT-B-class foundation preset against the ResNet34 fingerprint network
(issue 24).

Claim: what a foundation encoder costs per patch on this CPU, as a ratio to the paper's
network, measured in one run. The preset is H0-mini (ViT-B/14 with 4 registers, SwiGLU MLP,
86M parameters, 261 tokens at 224 px), built from its registry entry exactly as `--encoder
h0-mini` builds it, with random weights (the real ones are gated; the arithmetic is the
same). The fingerprint network is a ResNet34 (``random-resnet34``: the same layers as
``fingerprint_net``'s backbone). Both run ``Encoder.encode`` on the same uint8 batches of 224
px (normalisation included), in fp32 and bf16, alternating A/B/A/B so that load drifts hit
both, and the median patches/s of the repeats is reported with the ratio.

    python benchmarks/bench_foundation.py
    python benchmarks/bench_foundation.py --preset uni --batch 16 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fpstore.encoders import foundation as F
from fpstore.encoders.base import Encoder, native_bf16_flags, state_dict_hash
from fpstore.encoders.registry import create_encoder


def preset_with_random_weights(name: str) -> Encoder:
    model = F.FOUNDATION[name]
    torch.manual_seed(0)
    net = F.build_model(model, "cpu").eval()
    return Encoder(
        name, F.TokenPool(net, model.pooling), model.dim, model.preprocessing, state_dict_hash(net)
    )


def rate(encoder: Encoder, pixels: torch.Tensor) -> float:
    start = time.perf_counter()
    out = encoder.encode(pixels)
    seconds = time.perf_counter() - start
    assert out.shape == (len(pixels), encoder.dim)
    return len(pixels) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="h0-mini", choices=sorted(F.FOUNDATION))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    vit = preset_with_random_weights(args.preset)
    resnet = create_encoder("random-resnet34")
    pixels = torch.randint(0, 256, (args.batch, 224, 224, 3), dtype=torch.uint8)
    params = sum(p.numel() for p in vit.backbone.parameters()) / 1e6
    print(
        f"{args.preset}: {params:.0f}M parameters, {vit.dim}-D; random-resnet34: 512-D; "
        f"batch {args.batch} x 224 px, {args.threads} threads, "
        f"native bf16: {', '.join(native_bf16_flags()) or 'no'}"
    )
    for precision in ("fp32", "bf16"):
        vit.prepare("cpu", precision)
        resnet.prepare("cpu", precision)
        rate(vit, pixels[:2]), rate(resnet, pixels[:2])  # warm-up
        a, b = [], []
        for _ in range(args.repeat):
            a.append(rate(vit, pixels))
            b.append(rate(resnet, pixels))
        va, vb = statistics.median(a), statistics.median(b)
        print(
            f"{precision}: {args.preset} {va:.1f} patches/s, resnet34 {vb:.1f} patches/s: "
            f"ratio {va / vb:.2f}x (median of {args.repeat}; per-repeat ratios "
            f"{', '.join(f'{x / y:.2f}' for x, y in zip(a, b))})"
        )


if __name__ == "__main__":
    main()
