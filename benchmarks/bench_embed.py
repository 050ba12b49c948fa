"""Fingerprint maps at the paper's scale: 120 patches x 1,000 patients of 512-D fingerprints.

Measures, on the same synthetic fingerprints in the same run:
  * ours: PCA to 50 dims + openTSNE (FFT-accelerated t-SNE), the default of `fpstore embed`;
  * UMAP (`fpstore embed --method umap`) on the same PCA output;
  * the baseline: scikit-learn's Barnes-Hut t-SNE on the same PCA output (n_jobs as ours);
  * k-means cluster selection on the 2-D map.
and prints seconds, the ratio to the baseline, and how well each map keeps the planted
structure (share of points whose nearest 2-D neighbour comes from the same planted cluster,
on a subsample). The issue's bar: the whole map in minutes on 2 cores.

    python benchmarks/bench_embed.py                       # 120,000 x 512, all three
    python benchmarks/bench_embed.py --n 20000 --methods tsne,sklearn   # a smoke run
Pin the cores with e.g. `taskset -c 0,1` to measure "2 cores" on a bigger machine.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def planted_fingerprints(
    n: int, dim: int, n_clusters: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors from a mixture of Gaussians with unequal spreads (fingerprint-like, 512-D)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)).astype(np.float32) * 1.5
    spread = rng.uniform(0.6, 1.4, n_clusters).astype(np.float32)
    labels = rng.integers(0, n_clusters, n)
    vectors = centres[labels] + rng.normal(size=(n, dim)).astype(np.float32) * spread[labels, None]
    return vectors, labels


def neighbour_agreement(
    xy: np.ndarray, labels: np.ndarray, sample: int = 5000, seed: int = 0
) -> float:
    from sklearn.neighbors import NearestNeighbors

    idx = np.random.default_rng(seed).choice(len(xy), min(sample, len(xy)), replace=False)
    nn = NearestNeighbors(n_neighbors=2).fit(xy)
    _, neighbours = nn.kneighbors(xy[idx])
    return float((labels[neighbours[:, 1]] == labels[idx]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=120_000, help="patches (default 120 x 1,000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=40, help="planted clusters")
    parser.add_argument("--methods", default="tsne,umap,sklearn", help="any of tsne, umap, sklearn")
    parser.add_argument("--jobs", type=int, default=2, help="threads for every method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from fpstore.report.embed import ClusterConfig, EmbedConfig, _pca, embed_points, select_clusters

    print(f"cores visible: {len(os.sched_getaffinity(0))}, threads asked: {args.jobs}")
    vectors, labels = planted_fingerprints(args.n, args.dim, args.clusters, args.seed)
    print(f"data: {args.n} x {args.dim} float32, {args.clusters} planted clusters")

    start = time.perf_counter()
    reduced = _pca(vectors, 50, args.seed)
    pca_s = time.perf_counter() - start
    print(f"PCA to 50 dims: {pca_s:.1f} s")

    results = {}
    for method in args.methods.split(","):
        start = time.perf_counter()
        if method == "sklearn":
            from sklearn.manifold import TSNE

            xy = TSNE(n_jobs=args.jobs, random_state=args.seed, init="pca").fit_transform(reduced)
        else:
            # pca_dims = 50 on 50-D input: embed_points skips a second PCA and only centres.
            xy = embed_points(reduced, EmbedConfig(method=method, n_jobs=args.jobs, seed=args.seed))
        seconds = time.perf_counter() - start
        results[method] = seconds
        print(
            f"{method:8s} embed {seconds:7.1f} s  total with PCA {seconds + pca_s:7.1f} s  "
            f"{args.n / seconds:8.0f} points/s  "
            f"neighbour agreement {neighbour_agreement(xy, labels):.3f}",
            flush=True,
        )
        if method == "tsne":
            start = time.perf_counter()
            scores = np.tanh(np.sin(labels * 1.7))  # a score per planted cluster
            _, clusters = select_clusters(
                xy, scores, labels % 1000, ClusterConfig(), seed=args.seed
            )
            print(
                f"cluster selection (k-means, 30 clusters): {time.perf_counter() - start:.1f} s, "
                f"{len(clusters)} clusters selected"
            )

    if "sklearn" in results:
        baseline = results["sklearn"]
        for method, seconds in results.items():
            if method != "sklearn":
                print(f"ratio sklearn Barnes-Hut / {method}: {baseline / seconds:.1f}x faster")


if __name__ == "__main__":
    main()
