"""Typing stored patches: fingerprint classifiers vs the read ceiling vs the pixel rules.

Claim (issue 6): typing 1,000,000 stored patches from their fingerprints takes seconds.

Builds a temporary store of ``--slides`` x ``--per-slide`` patches with 512-d fingerprints
(four noisy clusters, the per-slide Parquet layout the extraction writes), fits
fingerprint-logreg and fingerprint-knn on 20,000 of them, then times on the same machine:

    ceiling      reading every fingerprint file into numpy (what any fingerprint method must do)
    logreg/knn   ``predict_tissue``: read + classify + write the tissue table
    rules        the label-free pixel path on real patches of the CMU slide (read + features),
                 extrapolated to the same number of patches

    python benchmarks/bench_tissue.py                      # 1,000,000 patches (2 GB on disk)
    python benchmarks/bench_tissue.py --slides 50 --per-slide 1000   # a quick smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _cohort import register_cohort

from fpstore.config import TISSUE_TYPES
from fpstore.store.io import write_parquet_atomic
from fpstore.store.schema import file_metadata, fingerprint_schema
from fpstore.tissue.trained import TissueTrainConfig, fit_tissue_model
from fpstore.tissue.type_patches import predict_tissue

DIM = 512
CMU = Path(__file__).resolve().parents[1] / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"


def build_store(root: Path, slides: int, per_slide: int, seed: int = 0):
    """Stored fingerprints in four clusters; returns (centres, a labelled training sample)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(TISSUE_TYPES), DIM)).astype(np.float32)
    folder = root / "fingerprints" / "encoder=bench" / "cohort=bench"
    schema = fingerprint_schema(DIM)
    metadata = file_metadata("fingerprints", encoder="bench", encoder_hash="h")
    register_cohort(root, "bench", {f"slide-{s:05d}": f"P{s}" for s in range(slides)})
    grid = int(np.ceil(np.sqrt(per_slide)))
    xy = np.stack(np.divmod(np.arange(per_slide), grid), axis=1)[:, ::-1] * 224
    sample_X, sample_y = [], []
    for s in range(slides):
        slide_id = f"slide-{s:05d}"
        y = rng.integers(0, len(TISSUE_TYPES), per_slide)
        vectors = centres[y] + rng.normal(scale=1.0, size=(per_slide, DIM)).astype(np.float32)
        if len(sample_y) * per_slide < 20_000:
            sample_X.append(vectors)
            sample_y.append(y)
        n = per_slide
        table = pa.table(
            {
                "patient_id": [f"P{s}"] * n,
                "slide_id": [slide_id] * n,
                "patch_id": [f"{slide_id}/{x}_{yy}_224" for x, yy in xy],
                "site": ["A"] * n,
                "x": xy[:, 0],
                "y": xy[:, 1],
                "size_px": np.full(n, 224, np.float32),
                "x_um": xy[:, 0] * 0.5,
                "y_um": xy[:, 1] * 0.5,
                "patch_um": np.full(n, 112, np.float32),
                "out_px": np.full(n, 224, np.int32),
                "tissue_fraction": np.ones(n, np.float32),
                "fingerprint": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
            },
            schema=schema,
        )
        write_parquet_atomic(table, folder / f"{slide_id}.parquet", metadata)
    return folder, np.concatenate(sample_X), np.concatenate(sample_y)


def read_ceiling(folder: Path) -> float:
    """Seconds to read every file's patch ids and vectors into numpy, two files at a time
    (predict reads ahead on a second thread too)."""
    from concurrent.futures import ThreadPoolExecutor

    def read(path):
        table = pq.read_table(path, columns=["patch_id", "fingerprint"])
        return table.column("fingerprint").combine_chunks().values.to_numpy().reshape(-1, DIM)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in pool.map(read, sorted(folder.glob("*.parquet"))):
            pass
    return time.perf_counter() - start


def rules_rate(n_patches: int = 117) -> float:
    """Patches per second of the pixel rules (read + the slide's stains + features + rules) on
    the real CMU slide, as ``predict_tissue`` types a slide."""
    from fpstore.slides.slide import open_slide
    from fpstore.tissue.data import slide_pixel_features
    from fpstore.tissue.rules import rule_probabilities

    side = int(np.sqrt(n_patches))
    xy = np.stack(np.divmod(np.arange(side * side), side), axis=1) * 224
    keys = pa.table(
        {"x": xy[:, 0], "y": xy[:, 1], "size_px": [224.0] * len(xy), "out_px": [224] * len(xy)}
    )
    with open_slide(CMU) as slide:
        slide.read_patches(xy[:4], 224, 224)  # warm the reader
        start = time.perf_counter()
        features, _ = slide_pixel_features(slide, keys)
        rule_probabilities(features)
        return len(xy) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=1000)
    parser.add_argument("--per-slide", type=int, default=1000)
    parser.add_argument("--dir", type=Path, help="Where to build the store (default: a temp dir).")
    args = parser.parse_args()
    n = args.slides * args.per_slide
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = Path(tmp)
        start = time.perf_counter()
        folder, X, y = build_store(store, args.slides, args.per_slide)
        size_gb = sum(p.stat().st_size for p in folder.glob("*.parquet")) / 1e9
        print(
            f"store: {n:,} patches x {DIM}-d in {args.slides} files, {size_gb:.2f} GB, "
            f"built in {time.perf_counter() - start:.0f} s"
        )
        models = {}
        for method in ("fingerprint-logreg", "fingerprint-knn"):
            start = time.perf_counter()
            model = fit_tissue_model(
                X,
                y,
                TissueTrainConfig(method=method),
                {"encoder": {"id": "bench", "hash": "h", "dim": DIM}},
            )
            models[method] = model.save(store / f"{method}.npz")
            print(f"fit {method} on {len(y):,} patches: {time.perf_counter() - start:.1f} s")
        ceiling = read_ceiling(folder)
        print(f"\nceiling (read all fingerprints): {ceiling:.2f} s, {n / ceiling:,.0f} patches/s")
        rates = {}
        for method, path in models.items():
            summary = predict_tissue(store, "bench", method, model=path, progress=False)
            assert summary.n_patches == n and not summary.failed
            rates[method] = n / summary.seconds
            print(
                f"{method:19s} predict + write: {summary.seconds:.2f} s, "
                f"{n / summary.seconds:,.0f} patches/s, {summary.seconds / ceiling:.2f}x the read "
                f"ceiling; {1e6 / (n / summary.seconds):.1f} s per 1,000,000 patches"
            )
        rate = rules_rate()
        print(
            f"{'rules (pixels)':19s} read + features: {rate:,.0f} patches/s on the real CMU slide; "
            f"{1e6 / rate / 3600:.1f} h per 1,000,000 patches"
        )
        for method, fast in rates.items():
            print(f"ratio {method} / rules: {fast / rate:,.0f}x faster")


if __name__ == "__main__":
    main()
