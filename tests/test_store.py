"""The feature store: atomic Parquet, schema round trip (pyarrow, DuckDB), views, docs, search."""

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fpstore.store
from fpstore.errors import StoreError
from fpstore.store.fingerprints import PARQUET_OPTIONS
from fpstore.store.io import write_parquet_atomic
from fpstore.store.layout import StoreLayout
from fpstore.store.schema import (
    LABELS,
    SLIDES,
    TISSUE,
    file_metadata,
    fingerprint_schema,
    patch_id,
    read_metadata,
)
from fpstore.store.similarity import similar, vector_index

DOCS = Path(__file__).parents[1] / "docs" / "queries.md"
DIM = 8


def fingerprint_table(slide, patient, vectors, site="A"):
    n = len(vectors)
    xs = np.arange(n, dtype=np.int64) * 224
    return pa.table(
        {
            "patient_id": [patient] * n,
            "slide_id": [slide] * n,
            "patch_id": [patch_id(slide, x, 0, 224) for x in xs],
            "site": [site] * n,
            "x": xs,
            "y": np.zeros(n, np.int64),
            "size_px": np.full(n, 224, np.float32),
            "x_um": xs * 0.5,
            "y_um": np.zeros(n),
            "patch_um": np.full(n, 112, np.float32),
            "out_px": np.full(n, 224, np.int32),
            "tissue_fraction": np.ones(n, np.float32),
            "fingerprint": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
        },
        schema=fingerprint_schema(DIM),
    )


@pytest.fixture
def store(tmp_path):
    """Cohort c: P1 (ER+, slides S1 S2), P2 (ER-, slide S3); fingerprints, tissue types."""
    root = tmp_path / "store"
    rng = np.random.default_rng(0)
    slides = {"S1": "P1", "S2": "P1", "S3": "P2"}
    vectors = {s: rng.normal(size=(4, DIM)).astype(np.float32) for s in slides}
    for s, p in slides.items():
        write_parquet_atomic(
            fingerprint_table(s, p, vectors[s], "A" if p == "P1" else "B"),
            StoreLayout(root).fingerprint_file("fingerprint", "c", s),
            file_metadata("fingerprints", encoder="fingerprint"),
            **PARQUET_OPTIONS,
        )
        types = ["epithelium", "stroma", "epithelium", "fat"]
        ids = [patch_id(s, x * 224, 0, 224) for x in range(4)]
        probs = np.full(4, 0.25, np.float32)
        write_parquet_atomic(
            pa.table(
                {
                    "slide_id": [s] * 4,
                    "patch_id": ids,
                    "tissue_type": types,
                    "p_background": probs,
                    "p_epithelium": probs,
                    "p_stroma": probs,
                    "p_fat": probs,
                    "method": ["rules"] * 4,
                },
                schema=TISSUE,
            ),
            root / "tissue" / "cohort=c" / f"{s}.parquet",
            file_metadata("tissue"),
        )
    write_parquet_atomic(
        pa.table(
            {
                # S4 has no fingerprints yet: a test adds them.
                "slide_id": [*slides, "S4"],
                "patient_id": [*slides.values(), "P2"],
                "path": [f"/x/{s}.svs" for s in [*slides, "S4"]],
                "site": ["A", "A", "B", "B"],
                "mpp_override": [None] * 4,
            },
            schema=SLIDES,
        ),
        root / "cohorts" / "c" / "slides.parquet",
        file_metadata("slides"),
    )
    (root / "cohorts" / "c" / "cohort.json").write_text('{"name": "c"}')
    write_parquet_atomic(
        pa.table(
            {
                "patient_id": ["P1", "P2"],
                "marker": ["ER", "ER"],
                "status": pa.array([1, 0], pa.int8()),
                "raw_value": ["Positive", "Negative"],
                "site": ["A", "B"],
            },
            schema=LABELS,
        ),
        root / "cohorts" / "c" / "labels.parquet",
        file_metadata("labels"),
    )
    return root, slides, vectors


def test_schema_round_trip_through_pyarrow_and_duckdb(store):
    root, slides, vectors = store
    path = StoreLayout(root).fingerprint_file("fingerprint", "c", "S1")
    table = pq.read_table(path)
    assert table.schema.remove_metadata() == fingerprint_schema(DIM)
    assert read_metadata(table.schema)["encoder"] == "fingerprint"
    np.testing.assert_array_equal(
        np.stack(table.column("fingerprint").to_pylist()).astype(np.float32), vectors["S1"]
    )
    with fpstore.store.open(root) as fs:
        described = {
            r["column_name"]: r["column_type"] for r in fs.sql("DESCRIBE fingerprints").rows()
        }
        assert described["fingerprint"] == f"FLOAT[{DIM}]" and described["x"] == "BIGINT"
        got = fs.table("fingerprints", ["fingerprint"], slide_id="S1").to_numpy()["fingerprint"]
        np.testing.assert_array_equal(got, vectors["S1"])
        cos = fs.sql(
            "SELECT array_cosine_similarity(fingerprint, fingerprint) AS c FROM fingerprints"
        ).to_numpy()
        np.testing.assert_allclose(cos["c"], 1.0, rtol=1e-6)
        fp = fs.fingerprints("fingerprint", "c")
        assert fp.vectors.shape == (12, DIM) and fp.vectors.dtype == np.float32


def test_writer_refuses_nulls_and_leaves_nothing_readers_would_see(tmp_path):
    bad = pa.table(
        {
            "slide_id": ["S1", None],
            "patient_id": ["P1", None],
            "path": ["a", "b"],
            "site": [None, None],
            "mpp_override": [None, None],
        },
        schema=SLIDES,
    )
    target = tmp_path / "cohorts" / "c" / "slides.parquet"
    with pytest.raises(StoreError, match="'slide_id' has 1 null"):
        write_parquet_atomic(bad, target, {})
    assert not target.parent.exists()  # nothing written, not even a temp file
    # A temp file left by a killed writer is invisible to the views.
    (tmp_path / "fingerprints" / "encoder=e" / "cohort=c").mkdir(parents=True)
    (tmp_path / "fingerprints" / "encoder=e" / "cohort=c" / ".S1.parquet.x1y2.tmp").write_bytes(
        b"PAR1 half"
    )
    with fpstore.store.open(tmp_path) as fs:
        assert fs.sql("SELECT count(*) AS n FROM fingerprints").rows() == [{"n": 0}]
        assert fs.sql("SELECT count(*) AS n FROM slides").rows() == [{"n": 0}]


def test_views_and_parameterised_tables(store):
    root, _, _ = store
    with fpstore.store.open(root) as fs:
        assert fs.table("labels", marker="ER", patient_id=["P2"]).rows()[0]["status"] == 0
        with pytest.raises(StoreError, match="no column 'nope'"):
            fs.table("labels", nope=1)
        with pytest.raises(StoreError, match="no view"):
            fs.table("secrets")
        with pytest.raises(StoreError, match="query failed"):
            fs.sql("SELECT * FROM nowhere").to_arrow()
        ids, means = fs.mean_fingerprints("fingerprint")
        full = fs.fingerprints("fingerprint")
        p1 = full.keys.column("patient_id").to_numpy(zero_copy_only=False) == "P1"
        assert list(ids) == ["P1", "P2"]
        np.testing.assert_allclose(means[0], full.vectors[p1].mean(0), rtol=1e-5, atol=1e-6)
        cached_ids, cached = vector_index(fs, "fingerprint").pooled_means()
        assert list(cached_ids) == ["P1", "P2"]
        np.testing.assert_allclose(cached, means, rtol=1e-5, atol=1e-6)
        slide_ids, _ = vector_index(fs, "fingerprint").pooled_means("slide_id")
        assert len(slide_ids) == len(set(full.keys.column("slide_id").to_pylist()))
        with pytest.raises(StoreError, match="encoders with fingerprints: fingerprint"):
            fs.fingerprints("imagenet-resnet34")


def _doc_queries():
    return re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.S)


def test_the_documented_queries_return_what_they_say(store):
    root, slides, vectors = store
    mean_sql, counts_sql, epi_sql, nearest_sql = _doc_queries()[:4]  # the 5th: test_store_dims
    with fpstore.store.open(root) as fs:
        means = fs.sql(mean_sql).to_arrow().to_pylist()
        assert [m["patient_id"] for m in means] == ["P1", "P2"]
        np.testing.assert_allclose(
            means[0]["mean_fingerprint"],
            np.concatenate([vectors["S1"], vectors["S2"]]).mean(0),
            rtol=1e-5,
        )
        counts = {(r["tissue_type"], r["site"]): r["patches"] for r in fs.sql(counts_sql).rows()}
        assert counts == {
            ("epithelium", "A"): 4,
            ("epithelium", "B"): 2,
            ("fat", "A"): 2,
            ("fat", "B"): 1,
            ("stroma", "A"): 2,
            ("stroma", "B"): 1,
        }
        epi = fs.sql(epi_sql).to_numpy()
        assert list(epi["patch_id"]) == ["S3/0_0_224", "S3/448_0_224"]
        np.testing.assert_array_equal(epi["fingerprint"], vectors["S3"][[0, 2]])
        nearest = fs.sql(nearest_sql).rows()
        assert nearest[0]["patch_id"] == "S1/0_0_224" and nearest[0]["similarity"] == pytest.approx(
            1.0
        )


def test_similar_matches_brute_force_and_tracks_new_files(store):
    root, slides, vectors = store
    with fpstore.store.open(root) as fs:
        result = similar(fs, "S1/0_0_224", k=3)
        everything = np.concatenate([vectors[s] for s in ("S1", "S2", "S3")])
        names = [patch_id(s, x * 224, 0, 224) for s in ("S1", "S2", "S3") for x in range(4)]
        q = everything[0] / np.linalg.norm(everything[0])
        cos = everything @ q / np.linalg.norm(everything, axis=1)
        expected = [names[i] for i in np.argsort(-cos) if names[i] != "S1/0_0_224"][:3]
        assert [h["patch_id"] for h in result.hits] == expected
        assert result.hits[0]["similarity"] == pytest.approx(np.sort(cos)[-2], rel=1e-5)
        with pytest.raises(StoreError, match="no patch"):
            similar(fs, "S9/0_0_224")
        # A new slide whose patch equals the query must show up first: the cache is rebuilt.
        twin = np.repeat(vectors["S1"][:1] * 2, 2, axis=0)
        write_parquet_atomic(
            fingerprint_table("S4", "P2", twin),
            StoreLayout(root).fingerprint_file("fingerprint", "c", "S4"),
            file_metadata("fingerprints", encoder="fingerprint"),
        )
        assert similar(fs, "S1/0_0_224", k=1).hits[0]["slide_id"] == "S4"
        assert len(vector_index(fs, "fingerprint").vectors) == 14
