"""The label-free tissue rules' speed beside an encoder's, in one run on the same patches.

Claim (issue 26): typing a slide's patches with the rules (per-slide stain estimate, pixel
features, rules) costs less than encoding them, so ``--pool epithelium`` typing on the fly
does not dominate an extraction. Times, on the real CMU slide's 112 um grid (117 patches
of 224 px, read once into memory so that both sides time compute, not the reader):

    rules     ``slide_pixel_features`` + ``rule_probabilities`` (the stains' sample included)
    encoder   ``Encoder.encode`` of the same patches (random-resnet34 by default, CPU)

    python benchmarks/bench_tissue_rules.py
    python benchmarks/bench_tissue_rules.py --encoder random-resnet34 --precision bf16 --repeat 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

CMU = Path(__file__).resolve().parents[1] / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"


class InMemorySlide:
    """The read patches standing in for the slide, so that the rules time compute only."""

    def __init__(self, patches: np.ndarray, xy: np.ndarray):
        self.index = {(int(x), int(y)): i for i, (x, y) in enumerate(xy)}
        self.patches = patches

    def read_patches(self, xy, size_px, out_px):
        return self.patches[[self.index[(int(x), int(y))] for x, y in xy]]


def main():
    from fpstore.encoders.registry import create_encoder
    from fpstore.slides.slide import open_slide
    from fpstore.tissue.data import slide_pixel_features
    from fpstore.tissue.rules import rule_probabilities

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="random-resnet34")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    with open_slide(CMU) as slide:
        cols, rows = slide.info.width // 224, slide.info.height // 224
        xy = np.array([(c * 224, r * 224) for r in range(rows) for c in range(cols)])
        patches = slide.read_patches(xy, 224, 224)
    n = len(patches)
    keys = pa.table({"x": xy[:, 0], "y": xy[:, 1], "size_px": [224.0] * n, "out_px": [224] * n})
    memory = InMemorySlide(patches, xy)
    encoder = create_encoder(args.encoder).prepare("cpu", args.precision)
    batch = torch.from_numpy(patches[: args.batch])
    encoder.encode(batch)  # warm-up
    rules_s, encoder_s = [], []
    for _ in range(args.repeat):  # alternated, so that a busy spell hits both
        start = time.perf_counter()
        features, _ = slide_pixel_features(memory, keys, args.batch)
        rule_probabilities(features)
        rules_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, n, args.batch):
            encoder.encode(torch.from_numpy(patches[i : i + args.batch]))
        encoder_s.append(time.perf_counter() - start)
    rules_rate, encoder_rate = n / min(rules_s), n / min(encoder_s)
    print(
        f"{n} patches of the CMU slide (224 px, 112 um), best of {args.repeat}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"rules   : {rules_rate:8.1f} patches/s (stains + features + rules)")
    print(f"encoder : {encoder_rate:8.1f} patches/s ({args.encoder}, {args.precision})")
    print(f"rules / encoder: {rules_rate / encoder_rate:.2f}x")


if __name__ == "__main__":
    main()
