"""Extraction on a real local Ray cluster (loopback only): equal to the local engine row for
row, resumable by either engine, bad slides recorded, a killed encoder worker loses and
duplicates nothing. Ray takes ~30 s to start on 2 busy cores; these reliability tests run by
default (make test), int8 on every actor is marked slow."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fpstore.cohort.cohorts import add_cohort
from fpstore.errors import ConfigError
from fpstore.extract.config import ExtractConfig
from fpstore.extract.ray import RayConfig
from fpstore.extract.run import extract
from fpstore.store.featurestore import column_to_numpy
from fpstore.store.remote import copy_tree
from fpstore.store.schema import read_metadata

BROKEN = Path(__file__).parent / "data" / "slides" / "histolab-broken.svs"
# A registry encoder (workers build nothing: the driver ships the model), small inputs so that
# the scheduling, not the model, is what runs.
CONFIG = ExtractConfig(
    encoder="random-resnet34",
    encoder_options={"out_px": 32},
    patches=20,
    device="cpu",
    num_workers=0,
    batch_size=16,
)


def tcga_store(synth: Path, store: Path) -> Path:
    add_cohort(
        store,
        "tcga",
        slides=str(synth / "tcga" / "slides"),
        fmt="tcga",
        clinical=synth / "tcga" / "nationwidechildrens.org_clinical_patient_brca.txt",
    )
    return store


def contents(store: Path) -> dict:
    """{relative file: (key rows, vectors, metadata)} of every fingerprint file."""
    out = {}
    for path in sorted((store / "fingerprints").glob("encoder=*/cohort=*/*")):
        table = pq.read_table(path)
        out[str(path.relative_to(store))] = (
            table.drop(["fingerprint"]).to_pylist(),
            column_to_numpy(table.column("fingerprint")),
            read_metadata(table.schema),
        )
    return out


def assert_same_store(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, (rows, vectors, metadata) in want.items():
        assert got[name][0] == rows, name  # keys and coordinates, row for row
        np.testing.assert_allclose(got[name][1], vectors, rtol=1e-4, atol=1e-5, err_msg=name)
        assert got[name][2] == metadata, name


def test_ray_config_is_validated():
    with pytest.raises(ConfigError, match="read_chunk"):
        RayConfig(read_chunk=0)
    with pytest.raises(ConfigError, match="num_cpus"):
        RayConfig(address="auto", num_cpus=2)


def test_address_without_the_ray_engine_is_refused(tmp_path):
    from fpstore.cli.main import cli

    result = CliRunner().invoke(
        cli, ["extract", "--cohort", "c", "--address", "auto", "--store", str(tmp_path)]
    )
    assert result.exit_code != 0
    assert "--engine ray" in result.output


# ---------------------------------------------------------------- on a real cluster


@pytest.fixture(scope="module")
def reference(synth_small, tmp_path_factory):
    """The local engine's store of the synthetic TCGA cohort."""
    store = tcga_store(synth_small, tmp_path_factory.mktemp("local") / "store")
    summary = extract(store, "tcga", CONFIG, progress=False)
    # The synthetic set has one slide without a patient in the clinical table, on purpose.
    assert summary.count("ok") >= 4 and summary.count("no-patient") == 1 and not summary.failed
    return store, contents(store)


def ray_extract(store, config=CONFIG, **ray_config):
    from fpstore.extract.ray import extract_on_ray

    return extract_on_ray(store, "tcga", config, RayConfig(**ray_config), progress=False)


def test_ray_store_equals_the_local_engine_and_either_engine_resumes_it(
    ray_cluster, reference, synth_small, tmp_path
):
    store = tcga_store(synth_small, tmp_path / "store")
    summary = ray_extract(store, read_chunk=8)  # several chunks per slide, spread over actors
    n_ok = len(reference[1])
    assert summary.count("ok") == n_ok and summary.count("no-patient") == 1 and not summary.failed
    assert_same_store(contents(store), reference[1])
    statuses = list((store / "status").rglob("*.json"))
    assert len(statuses) == n_ok
    assert not [p for p in store.rglob("*") if p.name.endswith(".tmp")]
    assert ray_cluster.is_initialized()  # the engine left a cluster it did not start running

    # Same resume keys: the local engine sees nothing to do, and neither does Ray.
    assert extract(store, "tcga", CONFIG, progress=False).count("skipped") == n_ok
    assert ray_extract(store).count("skipped") == n_ok


def test_bad_slide_is_recorded_failed_and_the_others_are_written(
    ray_cluster, synth_small, tmp_path
):
    slides = sorted((synth_small / "external" / "slides").iterdir())[:2]
    labels = tmp_path / "labels.csv"
    rows = [(f"P{i}", s) for i, s in enumerate(slides)] + [("PBAD", BROKEN)]
    labels.write_text(
        "patient_id,slide,ER,PR,Her2,site\n"
        + "".join(f"{p},{s},Positive,Negative,Negative,A\n" for p, s in rows)
    )
    store = tmp_path / "store"
    add_cohort(store, "tcga", clinical=labels, fmt="csv")
    summary = ray_extract(store)
    status = {r.slide_id: r for r in summary.slides}
    assert status["histolab-broken"].status == "failed" and status["histolab-broken"].error
    assert summary.count("ok") == 2
    folder = store / "fingerprints" / "encoder=random-resnet34" / "cohort=tcga"
    assert sorted(p.stem for p in folder.glob("*.parquet")) == sorted(s.stem for s in slides)
    recorded = store / "status" / "encoder=random-resnet34" / "cohort=tcga" / "histolab-broken.json"
    assert '"failed"' in recorded.read_text()


@pytest.mark.slow  # quantizes ResNet34 in every actor: ~10 min on 2 cores
def test_int8_on_ray_calibrates_every_actor_alike_and_the_local_engine_resumes_it(
    ray_cluster, synth_small, tmp_path
):
    from dataclasses import replace

    int8 = replace(CONFIG, precision="int8", encoder_options={})  # 224 px, as users run it
    local = tcga_store(synth_small, tmp_path / "local")
    extract(local, "tcga", int8, progress=False)
    want = contents(local)
    store = tcga_store(synth_small, tmp_path / "ray")
    summary = ray_extract(
        store, int8, read_chunk=8, encoders=2, encoder_cpus=0.5
    )  # both actors encode
    assert summary.int8_agreement["min_cosine"] > 0.99
    got = contents(store)
    assert sorted(got) == sorted(want)
    for name, (rows, vectors, metadata) in want.items():
        assert got[name][0] == rows and got[name][2] == metadata, name  # same calibration digest
        cosine = (
            (vectors * got[name][1]).sum(1)
            / np.linalg.norm(vectors, axis=1)
            / np.linalg.norm(got[name][1], axis=1)
        )
        assert cosine.min() > 0.9999, name  # the actors quantized the same model as the local run
    assert extract(store, "tcga", int8, progress=False).count("skipped") == len(got)


def _encoder_actor_pids() -> list[int]:
    import psutil

    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::_Encoder"):
            pids.append(process.info["pid"])
    return pids


def test_a_killed_encoder_worker_loses_and_duplicates_no_slide(
    ray_cluster, reference, synth_small, tmp_path
):
    store = tcga_store(synth_small, tmp_path / "store")
    folder = store / "fingerprints" / "encoder=random-resnet34" / "cohort=tcga"
    outcome = {}
    # One slide at a time, so that the run is still going when the first file lands.
    run = threading.Thread(
        target=lambda: outcome.update(summary=ray_extract(store, slides_in_flight=1, max_retries=3))
    )
    run.start()
    killed, deadline = [], time.monotonic() + 300
    while run.is_alive() and not killed and time.monotonic() < deadline:
        pids = _encoder_actor_pids()
        if pids and list(folder.glob("*.parquet")):
            os.kill(pids[0], signal.SIGKILL)
            killed.append((pids[0], len(list(folder.glob("*.parquet")))))
        time.sleep(0.05)
    run.join(timeout=600)
    assert not run.is_alive()
    assert killed, "the run ended before the encoder worker could be killed"
    n_slides = len(reference[1])
    assert killed[0][1] < n_slides  # killed mid-run
    summary = outcome["summary"]
    assert summary.count("ok") == n_slides and summary.count("no-patient") == 1
    assert not summary.failed
    assert_same_store(contents(store), reference[1])  # nothing lost, nothing twice
    assert killed[0][0] not in _encoder_actor_pids()


def test_ray_extracts_into_an_s3_store_and_duckdb_queries_it(
    ray_cluster, s3_url, reference, synth_small, tmp_path
):
    if s3_url is None:
        pytest.skip("needs moto's S3 server: pip install 'fpstore[test]'")
    import fpstore.store

    store = tcga_store(synth_small, f"{s3_url}/ray-store")
    summary = ray_extract(store)
    assert summary.count("ok") == len(reference[1])
    copy_tree(store, tmp_path / "copy")  # every object, read back with the real client
    assert_same_store(contents(tmp_path / "copy"), reference[1])
    query = "SELECT slide_id, count(*) AS n FROM fingerprints GROUP BY slide_id ORDER BY slide_id"
    with fpstore.store.open(store) as there, fpstore.store.open(reference[0]) as here:
        assert there.sql(query).rows() == here.sql(query).rows()
    assert ray_extract(store).count("skipped") == len(reference[1])  # resumes from the objects


@pytest.mark.parametrize("compiled", [False, True])
def test_ray_encoders_pad_the_last_batch_when_compiled_as_the_local_engine_does(compiled):
    """A compiled model sees one batch shape (a new one recompiles it); padding rows never
    reach the results. The actor class runs here in process: no cluster needed."""
    from fpstore.extract.ray import _Encoder

    class Recording:
        dim, shapes = 2, []

        def prepare(self, device, precision, channels_last, compile_):
            return self

        def encode(self, batch):
            self.shapes.append(tuple(batch.shape))
            return batch.float().mean((1, 2, 3))[:, None].repeat(1, self.dim)

    pixels = np.repeat(np.arange(20, dtype=np.uint8), 4 * 4 * 3).reshape(20, 4, 4, 3)
    pixels.flags.writeable = False  # as object-store arrays come
    config = ExtractConfig(encoder="tiny", device="cpu", batch_size=8, compile=compiled)
    actor = _Encoder(Recording(), "cpu", config, threads=1)
    out = actor.encode(pixels)
    np.testing.assert_array_equal(out[:, 0], np.arange(20))
    last = 8 if compiled else 4
    assert Recording.shapes == [(8, 4, 4, 3)] * 2 + [(last, 4, 4, 3)]
