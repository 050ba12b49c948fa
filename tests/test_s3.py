"""Stores on object storage, against a real S3 server on loopback (moto's server mode) with
the real clients (s3fs, boto3, pyarrow, DuckDB through the registered filesystem)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import fpstore.store
from fpstore.cohort.cohorts import add_cohort, list_cohorts, load_cohort
from fpstore.errors import StoreError
from fpstore.extract.config import ExtractConfig
from fpstore.extract.run import extract
from fpstore.store.io import _replace_atomically, write_parquet_atomic
from fpstore.store.remote import RemotePath, copy_tree, is_remote, store_root
from tests._s3server import BUCKET, s3_server

pytest.importorskip("moto.server", reason="needs moto's S3 server: pip install 'fpstore[test]'")
boto3 = pytest.importorskip("boto3")

CMU = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"
CONFIG = ExtractConfig(
    encoder="random-resnet34",
    encoder_options={"out_px": 32},
    patches=12,
    device="cpu",
    num_workers=0,
    batch_size=16,
)


@pytest.fixture
def s3(monkeypatch):
    with s3_server(monkeypatch) as url:
        yield url


def keys(prefix: str = "") -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def csv_cohort(tmp_path: Path) -> Path:
    """labels.csv for 3 slides (copies of one real slide), two of them for patient P1."""
    folder = tmp_path / "slides"
    folder.mkdir()
    rows = [("P1", "S1"), ("P1", "S2"), ("P2", "S3")]
    for _, name in rows:
        (folder / f"{name}.svs").symlink_to(CMU)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "patient_id,slide,ER,PR,Her2,site\n"
        + "".join(f"{p},{folder / s}.svs,Positive,Negative,Negative,A\n" for p, s in rows)
    )
    return labels


def test_urls_become_remote_paths_and_folders_stay_paths(tmp_path):
    assert store_root(tmp_path) == tmp_path
    assert store_root(f"file://{tmp_path}") == tmp_path
    remote = store_root("memory://bucket/store/")
    assert isinstance(remote, RemotePath) and is_remote(remote) and not is_remote(str(tmp_path))
    child = remote / "fingerprints" / "encoder=x" / "S1.parquet"
    assert str(child).startswith("memory://")
    assert str(child).endswith("bucket/store/fingerprints/encoder=x/S1.parquet")
    assert (child.name, child.stem, child.parent.name) == ("S1.parquet", "S1", "encoder=x")
    with pytest.raises(StoreError, match="nosuchscheme"):
        store_root("nosuchscheme://bucket/store")


def test_a_write_is_published_whole_or_not_at_all(s3):
    path = store_root(f"{s3}/store") / "t" / "a.parquet"
    table = pa.table({"x": pa.array([1, 2, 3], pa.int64())})
    write_parquet_atomic(table, path, {"fpstore.k": "v"})
    body = boto3.client("s3").get_object(Bucket=BUCKET, Key="store/t/a.parquet")["Body"].read()
    read = pq.read_table(io.BytesIO(body))
    assert read.column("x").to_pylist() == [1, 2, 3] and read.schema.metadata[b"fpstore.k"] == b"v"

    def half_then_crash(handle):
        handle.write(b"PAR1 half a file")
        raise OSError("disk gone")

    with pytest.raises(OSError):
        _replace_atomically(store_root(f"{s3}/store") / "t" / "b.parquet", half_then_crash)
    assert keys("store/") == ["store/t/a.parquet"]  # no partial object, no temporary key


def test_cohort_add_list_and_load_on_s3(s3, tmp_path):
    labels = csv_cohort(tmp_path)
    local = add_cohort(tmp_path / "store", "c", clinical=labels, fmt="csv")
    remote = add_cohort(f"{s3}/store", "c", clinical=labels, fmt="csv")
    assert remote.n_slides == local.n_slides == 3
    assert keys("store/cohorts/") == [
        f"store/cohorts/c/{n}" for n in ("cohort.json", "labels.parquet", "slides.parquet")
    ]
    assert [row["name"] for row in list_cohorts(f"{s3}/store")] == ["c"]
    assert load_cohort(f"{s3}/store", "c").slides.equals(
        load_cohort(tmp_path / "store", "c").slides
    )


def test_queries_on_an_s3_store_equal_the_local_ones(s3, tmp_path):
    from fpstore.cli.main import cli

    store = tmp_path / "store"
    add_cohort(store, "c", clinical=csv_cohort(tmp_path), fmt="csv")
    assert extract(store, "c", CONFIG, progress=False).count("ok") == 3
    # Every file but the local engine's hidden per-slide lock files.
    files = [p for p in store.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert copy_tree(store, f"{s3}/store") == len(files) and not keys(
        "store/status/encoder=random-resnet34/cohort=c/."
    )

    query = (
        "SELECT slide_id, count(*) AS n, sum(fingerprint[1]) AS s FROM fingerprints "
        "GROUP BY slide_id ORDER BY slide_id"
    )
    with fpstore.store.open(store) as here, fpstore.store.open(f"{s3}/store") as there:
        assert there.sql(query).rows() == here.sql(query).rows()
        assert there.sql("SELECT slide_id, status FROM slides ORDER BY slide_id").rows() == [
            {"slide_id": s, "status": "ok"} for s in ("S1", "S2", "S3")
        ]
        want, got = here.fingerprints("random-resnet34"), there.fingerprints("random-resnet34")
        np.testing.assert_array_equal(got.vectors, want.vectors)
        assert got.keys.equals(want.keys)

    result = CliRunner().invoke(
        cli,
        ["sql", "SELECT count(*) AS n FROM patches", "--format", "csv", "--store", f"{s3}/store"],
    )
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["n", str(len(want.vectors))]


def test_the_local_engine_and_local_only_commands_refuse_s3_clearly(s3, tmp_path):
    from fpstore.cli.main import cli

    add_cohort(f"{s3}/store", "c", clinical=csv_cohort(tmp_path), fmt="csv")
    with pytest.raises(StoreError, match="--engine ray"):
        extract(f"{s3}/store", "c", CONFIG, progress=False)
    assert keys("store/fingerprints/") == []
    result = CliRunner().invoke(cli, ["similar", "--patch", "S1/0_0_448", "--store", f"{s3}/store"])
    assert result.exit_code != 0 and "needs a local store folder" in result.output
    assert not Path("s3:").exists()
