"""DuckDB over N stored fingerprints: pooling per patient, group-by tissue type, top-10 cosine.

    python benchmarks/bench_duckdb.py                 # N = 1,000,000 (about 2 GB of vectors)
    python benchmarks/bench_duckdb.py --n 20000       # smoke run

Writes a store of N fingerprints (512-d, ReLU-like, 1,000 patches per slide, 2 slides per
patient, a tissue type per patch) with fpstore's own writer, then times each query twice and
prints the better time, beside the numpy path fpstore uses where it is faster:

    mean per patient     DuckDB SQL (unnest, as in docs/queries.md)  vs  FeatureStore.mean_fingerprints
                         over the Parquet files  vs  over the materialised matrix (vector_index().pooled_means())
    group-by tissue      DuckDB join + count over patches and tissue
    top-10 cosine        DuckDB array_cosine_similarity brute force over the Parquet files
                         vs a materialised FLOAT[512] DuckDB table
                         vs fpstore similar: numpy on the memory-mapped normalised matrix
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIM = 512
PER_SLIDE = 1000


def build(root: Path, n: int) -> None:
    from _cohort import register_cohort

    from fpstore.store.fingerprints import PARQUET_OPTIONS
    from fpstore.store.io import write_parquet_atomic
    from fpstore.store.layout import StoreLayout
    from fpstore.store.schema import TISSUE, file_metadata, fingerprint_schema

    rng = np.random.default_rng(0)
    types = np.array(["epithelium", "stroma", "fat", "background"])
    n_slides = (n + PER_SLIDE - 1) // PER_SLIDE
    register_cohort(root, "c", {f"S{s:05d}": f"P{s // 2:05d}" for s in range(n_slides)})
    for s in range(n_slides):
        m = min(PER_SLIDE, n - s * PER_SLIDE)
        slide, patient = f"S{s:05d}", f"P{s // 2:05d}"
        xs = np.arange(m, dtype=np.int64) * 224
        ids = [f"{slide}/{x}_0_224" for x in xs]
        vectors = np.maximum(rng.normal(0.2, 0.5, (m, DIM)), 0).astype(np.float32)
        table = pa.table(
            {
                "patient_id": [patient] * m,
                "slide_id": [slide] * m,
                "patch_id": ids,
                "site": ["A"] * m,
                "x": xs,
                "y": np.zeros(m, np.int64),
                "size_px": np.full(m, 224, np.float32),
                "x_um": xs * 0.5,
                "y_um": np.zeros(m),
                "patch_um": np.full(m, 112, np.float32),
                "out_px": np.full(m, 224, np.int32),
                "tissue_fraction": np.ones(m, np.float32),
                "fingerprint": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
            },
            schema=fingerprint_schema(DIM),
        )
        write_parquet_atomic(
            table,
            StoreLayout(root).fingerprint_file("bench", "c", slide),
            file_metadata("fingerprints", encoder="bench"),
            **PARQUET_OPTIONS,
        )
        p = np.full(m, 0.25, np.float32)
        write_parquet_atomic(
            pa.table(
                {
                    "slide_id": [slide] * m,
                    "patch_id": ids,
                    "tissue_type": types[rng.integers(0, 4, m)],
                    "p_background": p,
                    "p_epithelium": p,
                    "p_stroma": p,
                    "p_fat": p,
                    "method": ["rules"] * m,
                },
                schema=TISSUE,
            ),
            root / "tissue" / "cohort=c" / f"{slide}.parquet",
            file_metadata("tissue"),
        )


def timed(fn, repeat=2):
    best, value = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=None, help="reuse a store built there")
    parser.add_argument(
        "--skip-sql-mean",
        action="store_true",
        help="skip DuckDB's unnest mean (about 4 minutes at 1,000,000)",
    )
    args = parser.parse_args(argv)

    import fpstore.store
    from fpstore.store.similarity import similar, vector_index

    scratch = None if args.out else tempfile.TemporaryDirectory(prefix="bench-duckdb-")
    root = args.out or Path(scratch.name)
    t0 = time.perf_counter()
    if not (root / "fingerprints").exists():
        build(root, args.n)
    print(f"{args.n} fingerprints in {root} (built in {time.perf_counter() - t0:.1f} s)")
    store = fpstore.store.open(root)
    query_id = "S00000/0_0_224"
    mean_sql = (
        "SELECT patient_id, list(v ORDER BY i) AS m FROM (SELECT patient_id, i, avg(fingerprint[i]) v "
        "FROM (SELECT patient_id, fingerprint, unnest(range(1, 513)) AS i FROM fingerprints) "
        "GROUP BY patient_id, i) GROUP BY patient_id"
    )
    group_sql = (
        "SELECT t.tissue_type, count(*) AS n FROM patches p JOIN tissue t USING (slide_id, patch_id) "
        "GROUP BY t.tissue_type"
    )
    top_sql = (
        "SELECT patch_id, array_cosine_similarity(fingerprint, (SELECT fingerprint FROM fingerprints "
        f"WHERE patch_id = '{query_id}')) AS s FROM fingerprints ORDER BY s DESC LIMIT 10"
    )
    runs = {}  # name -> (best seconds, value)
    if not args.skip_sql_mean:
        runs["mean per patient: DuckDB SQL (unnest)"] = timed(
            lambda: store.sql(mean_sql).to_arrow(), 1
        )
    runs["mean per patient: numpy over Parquet (mean_fingerprints)"] = timed(
        lambda: store.mean_fingerprints("bench")
    )
    runs["group-by tissue type: DuckDB"] = timed(lambda: store.sql(group_sql).rows())
    runs["top-10 cosine: DuckDB brute force over Parquet"] = timed(
        lambda: store.sql(top_sql).rows()
    )
    t_mat, _ = timed(
        lambda: store.connection.execute(
            "CREATE OR REPLACE TABLE fp_mat AS SELECT patch_id, fingerprint FROM fingerprints"
        ),
        1,
    )
    mat_sql = top_sql.replace("FROM fingerprints ORDER", "FROM fp_mat ORDER")
    runs["top-10 cosine: DuckDB materialised FLOAT[512] table"] = timed(
        lambda: store.sql(mat_sql).rows()
    )
    t_index, _ = timed(lambda: vector_index(store, "bench"), 1)  # first call builds the cache
    runs["top-10 cosine: numpy on the materialised matrix (similar)"] = timed(
        lambda: similar(store, query_id, k=10)
    )
    runs["mean per patient: numpy on the materialised matrix"] = timed(
        lambda: vector_index(store, "bench").pooled_means()
    )

    t = {name: seconds for name, (seconds, _) in runs.items()}
    duck_top = [r["patch_id"] for r in runs["top-10 cosine: DuckDB brute force over Parquet"][1]][
        1:
    ]
    ours = [
        h["patch_id"]
        for h in runs["top-10 cosine: numpy on the materialised matrix (similar)"][1].hits
    ]
    print(f"one-off: materialise DuckDB table {t_mat:.2f} s; build the numpy cache {t_index:.2f} s")
    print(f"top-10 agree (DuckDB vs numpy, query excluded): {duck_top == ours[: len(duck_top)]}\n")
    for name, seconds in t.items():
        print(f"  {name:60s} {seconds:8.3f} s")
    top, pool = (
        t["top-10 cosine: numpy on the materialised matrix (similar)"],
        t["mean per patient: numpy on the materialised matrix"],
    )
    print(
        "\n  ratios: top-10 numpy vs DuckDB brute force "
        f"{t['top-10 cosine: DuckDB brute force over Parquet'] / top:.1f}x, "
        "vs the materialised DuckDB table "
        f"{t['top-10 cosine: DuckDB materialised FLOAT[512] table'] / top:.1f}x; "
        f"mean pooling on the materialised matrix vs over Parquet "
        f"{t['mean per patient: numpy over Parquet (mean_fingerprints)'] / pool:.0f}x"
        + (
            f", vs DuckDB SQL {t['mean per patient: DuckDB SQL (unnest)'] / pool:.0f}x"
            if not args.skip_sql_mean
            else ""
        )
    )
    store.close()
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
