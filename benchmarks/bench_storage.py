"""Bytes on disk per fingerprint against the 2,048 raw bytes of 512 float32.

    python benchmarks/bench_storage.py                       # synthetic ReLU-like vectors
    python benchmarks/bench_storage.py --store STORE         # the fingerprint files of a store

For each fingerprint file: total bytes / rows, and the fingerprint column alone (its
compressed column chunks) / rows. The synthetic run also compares Parquet settings, so the
choice in fpstore.store.fingerprints.PARQUET_OPTIONS (zstd + BYTE_STREAM_SPLIT) is measured.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def column_bytes(meta: pq.FileMetaData, name: str) -> int:
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            if group.column(c).path_in_schema.startswith(name):
                total += group.column(c).total_compressed_size
    return total


def measure_store(store: Path) -> None:
    files = sorted(store.glob("fingerprints/encoder=*/cohort=*/*.parquet"))
    if not files:
        raise SystemExit(f"no fingerprint files under {store}")
    rows = total = vector = 0
    dim = pq.read_schema(files[0]).field("fingerprint").type.list_size
    for f in files:
        meta = pq.read_metadata(f)
        rows += meta.num_rows
        total += f.stat().st_size
        vector += column_bytes(meta, "fingerprint")
    raw = 4 * dim
    print(f"{len(files)} files, {rows} fingerprints of {dim} float32 ({raw} raw bytes each)")
    print(
        f"  whole file : {total / rows:8.1f} bytes per fingerprint = {total / rows / raw:.3f} x raw"
    )
    print(
        f"  vector only: {vector / rows:8.1f} bytes per fingerprint = {vector / rows / raw:.3f} x raw"
    )


def measure_settings(n: int) -> None:
    from fpstore.store.fingerprints import PARQUET_OPTIONS

    rng = np.random.default_rng(0)
    # Post-ReLU average-pooled features: non-negative, a quarter exactly zero.
    vectors = np.maximum(rng.normal(0.2, 0.5, (n, 512)), 0).astype(np.float32)
    table = pa.table(
        {"fingerprint": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 512)}
    )
    settings = {
        "none": dict(compression="none", use_dictionary=False),
        "snappy (pyarrow default)": dict(compression="snappy", use_dictionary=False),
        "zstd": dict(compression="zstd", use_dictionary=False),
        "zstd + byte_stream_split (fpstore)": dict(
            compression="zstd",
            use_dictionary=False,
            column_encoding=PARQUET_OPTIONS["column_encoding"],
        ),
    }
    print(f"{n} synthetic ReLU-like 512-d fingerprints, {(vectors == 0).mean():.0%} zeros:")
    for name, options in settings.items():
        buffer = io.BytesIO()
        pq.write_table(table, buffer, **options)
        per = len(buffer.getvalue()) / n
        print(f"  {name:38s} {per:8.1f} bytes per fingerprint = {per / 2048:.3f} x raw")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args(argv)
    if args.store:
        measure_store(args.store)
    else:
        measure_settings(args.n)


if __name__ == "__main__":
    main()
