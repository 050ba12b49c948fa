"""The extraction loop: a cohort's slides -> one fingerprint Parquet file per slide.

    plan     open each pending slide, tissue mask, patch grid, sample n patches per patient
    claim    an exclusive flock per slide (``status/.../.<slide>.lock``): two processes on one
             store never encode the same slide; the kernel drops the lock if a process dies
    read     DataLoader workers pull (slide, coordinates) chunks from a task queue and return
             uint8 pixels in shared memory, while the main process runs the model
    encode   fixed-size batches that mix slides; uint8 to the device, normalised there;
             channels_last; optional bf16/fp16 autocast and torch.compile
    write    when a slide's last patch is encoded: its Parquet file (temp name, fsync, rename)
             and its status JSON, then the lock is released

Resume: a slide whose file exists with the same extraction metadata (``resume_key``) is
skipped; a file with other metadata is refused unless ``force``. A slide that fails is
recorded (status ``failed`` + error) and the run goes on.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue as queue_module
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fpstore.config import PatchSpec, check_choice, check_range
from fpstore.encoders.base import PRECISIONS
from fpstore.errors import ConfigError, FpstoreError, StoreError
from fpstore.store.featurestore import check_partition_value, fingerprint_path, status_path
from fpstore.store.io import write_json_atomic, write_parquet_atomic
from fpstore.store.remote import is_remote, store_root
from fpstore.store.schema import (
    SCHEMA_VERSION,
    file_metadata,
    fingerprint_schema,
    patch_id,
    read_metadata,
)

# int8: activation ranges come from this many tissue patches of the cohort (half of them
# check the agreement with fp32), taken from up to CALIBRATION_SLIDES slides.
CALIBRATION_PATCHES, CALIBRATION_SLIDES = 64, 8
# Parquet options for fingerprint files: zstd over byte-stream-split floats stores ReLU
# features in ~70% of their raw size (benchmarks/bench_storage.py).
PARQUET_OPTIONS = dict(
    compression="zstd",
    use_dictionary=["patient_id", "slide_id", "site"],
    column_encoding={"fingerprint.list.element": "BYTE_STREAM_SPLIT"},
)


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract and how. ``patches=None`` means every tissue patch."""

    encoder: str = "fingerprint"
    encoder_options: dict = field(default_factory=dict)  # checkpoint=PATH, weights=PATH, seed=...
    patches: int | None = 120
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 0  # 0: 32 on CPU, 256 on CUDA
    num_workers: int = -1  # -1: 1 on a machine of <= 4 cores, else cores - 2 (max 16)
    chunk_size: int = 32  # patches per read task
    min_tissue: float = 0.5
    seed: int = 0
    force: bool = False
    compile: bool = False
    channels_last: bool = True

    def __post_init__(self):
        if self.patches is not None:
            check_range("ExtractConfig", "patches", self.patches, 1)
        check_choice("ExtractConfig", "device", self.device, ("auto", "cpu", "cuda"))
        check_choice("ExtractConfig", "precision", self.precision, PRECISIONS)
        check_range("ExtractConfig", "batch_size", self.batch_size, 0, 65536)
        check_range("ExtractConfig", "num_workers", self.num_workers, -1, 256)
        check_range("ExtractConfig", "chunk_size", self.chunk_size, 1, 4096)
        check_range("ExtractConfig", "min_tissue", self.min_tissue, 0.0, 1.0)

    def resolved_batch_size(self, device: str) -> int:
        return self.batch_size or (256 if device == "cuda" else 32)

    def resolved_workers(self) -> int:
        if self.num_workers >= 0:
            return self.num_workers
        cores = os.cpu_count() or 1
        return 1 if cores <= 4 else min(16, cores - 2)


@dataclass
class SlideResult:
    slide_id: str
    status: str  # ok, skipped (already done), elsewhere (another process did it), failed
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""


@dataclass
class ExtractSummary:
    cohort: str
    encoder: str
    encoder_hash: str
    device: str
    precision: str
    slides: list[SlideResult]
    seconds: float
    loop_seconds: float = 0.0  # claim-read-encode-write only (no model build, no planning)
    int8_agreement: dict | None = None  # int8: cosine with fp32 on held-out calibration patches

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.slides)

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.slides if r.status == "ok")

    @property
    def patches_per_s(self) -> float:
        return self.n_patches / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.slides if r.status == "failed"]

    def to_dict(self) -> dict:
        return {
            "cohort": self.cohort,
            "encoder": self.encoder,
            "encoder_hash": self.encoder_hash,
            "device": self.device,
            "precision": self.precision,
            "ok": self.count("ok"),
            "skipped": self.count("skipped"),
            "elsewhere": self.count("elsewhere"),
            "failed": self.count("failed"),
            "patches": self.n_patches,
            "seconds": round(self.seconds, 3),
            "patches_per_s": round(self.patches_per_s, 2),
            "loop_seconds": round(self.loop_seconds, 3),
            "loop_patches_per_s": round(self.n_patches / self.loop_seconds, 2)
            if self.loop_seconds
            else 0.0,
            "int8_agreement": self.int8_agreement,
            "slides": [asdict(r) for r in self.slides],
        }


# ---------------------------------------------------------------- metadata and resume


def resume_key(encoder, config: ExtractConfig) -> dict[str, str]:
    """The file metadata that must match for a stored slide to count as done (int8 runs add
    their calibration digest)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "encoder": encoder.id,
        "encoder_hash": encoder.hash,
        "dim": str(encoder.dim),
        "patches": "all" if config.patches is None else str(config.patches),
        "seed": str(config.seed),
        "min_tissue": str(config.min_tissue),
        "precision": config.precision,
    }


def calibration_set(slides: list[dict], spec: PatchSpec) -> tuple[list, str]:
    """The int8 calibration patches of a cohort: [(row, grid rows)], and their digest.

    Evenly spread over the cohort's slides in slide_id order and over each slide's tissue
    squares, so that a resumed run (or another process) calibrates on the same patches and
    gets the same quantized model. The digest joins the resume key: a cohort that gained
    slides calibrates differently, and its stored int8 files are then refused, not mixed.
    """

    def spread(n: int, k: int) -> np.ndarray:  # k indices evenly over range(n)
        return (
            np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))
            if n
            else np.zeros(0, int)
        )

    rows = sorted((r for r in slides if r["patient_id"] is not None), key=lambda r: r["slide_id"])
    picked = [rows[i] for i in spread(len(rows), CALIBRATION_SLIDES)]
    per_slide = -(-CALIBRATION_PATCHES // max(1, len(picked)))
    chosen, ids = [], []
    for row in picked:
        _, grid, error = grid_or_error(row, spec)
        if error or not len(grid):
            continue
        sub = grid.take(spread(len(grid), per_slide))
        chosen.append((row, sub))
        ids += [
            f"{row['slide_id']}:{x}:{y}"
            for x, y in zip(sub.column("x").to_pylist(), sub.column("y").to_pylist())
        ]
    return chosen, hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def read_calibration(chosen: list, spec: PatchSpec) -> torch.Tensor:
    from fpstore.slides.slide import open_slide

    parts = []
    for row, grid in chosen:
        xy = np.stack([grid.column("x").to_numpy(), grid.column("y").to_numpy()], 1)
        with open_slide(row["path"], mpp=row.get("mpp_override")) as slide:
            parts.append(
                slide.read_patches(xy, float(grid.column("size_px")[0].as_py()), spec.out_px)
            )
    return (
        torch.from_numpy(np.concatenate(parts))
        if parts
        else torch.empty((0, spec.out_px, spec.out_px, 3), dtype=torch.uint8)
    )


def stored_mismatch(path: Path, key: dict[str, str]) -> dict[str, tuple[str, str]] | None:
    """None if ``path`` is missing; else {name: (stored, wanted)} of the keys that differ."""
    if not path.is_file():
        return None
    try:
        stored = read_metadata(pq.read_schema(path))
    except Exception as error:  # an unreadable file is a mismatch, not a crash
        return {"file": (f"unreadable: {error}", "a valid Parquet file")}
    return {k: (stored.get(k, "?"), v) for k, v in key.items() if stored.get(k) != v}


def _explain_mismatch(store: Path, mismatched: dict[str, dict]) -> str:
    first, diff = next(iter(mismatched.items()))
    detail = ", ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
    return (
        f"{len(mismatched)} slide(s) already have fingerprints in {str(store)!r} made with other "
        f"settings (e.g. {first}: {detail}); refusing to mix them. Pass --force to re-extract "
        "them, or rerun with the settings they were made with."
    )


# ---------------------------------------------------------------- claims


class SlideClaim:
    """An exclusive, non-blocking flock on ``.<slide>.lock``; released on close or death."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.uname().nodename} {os.getpid()}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def claim_path(store: Path, encoder: str, cohort: str, slide_id: str) -> Path:
    return status_path(store, encoder, cohort, slide_id).with_name(f".{slide_id}.lock")


# ---------------------------------------------------------------- planning


@dataclass
class SlidePlan:
    slide_id: str
    patient_id: str
    site: str | None
    path: str
    mpp: float
    size_px: float
    keys: pa.Table  # x, y, tissue_fraction of the sampled patches


def _grid(row: dict, spec: PatchSpec):
    """(slide info, grid table) of one cohort slide; raises FpstoreError on a bad slide."""
    from fpstore.slides.grid import patch_grid
    from fpstore.slides.slide import open_slide
    from fpstore.slides.tissue_mask import tissue_mask

    with open_slide(row["path"], mpp=row.get("mpp_override")) as slide:
        return slide.info, patch_grid(slide, spec, tissue_mask(slide))


def grid_or_error(row: dict, spec: PatchSpec):
    """(slide info, grid, "") of one cohort slide, or (None, None, the error) for a bad one."""
    try:
        return (*_grid(row, spec), "")
    except FpstoreError as error:
        return None, None, str(error)


def plan_slides(
    rows: list[dict],
    spec: PatchSpec,
    n: int | None,
    seed: int,
    failed: dict[str, str],
    progress: bool = True,
    map_fn=map,
) -> dict[str, SlidePlan]:
    """Tissue patches of each slide, n sampled per patient (pooled over its slides).

    ``map_fn(grid_or_error, rows, specs)`` yields one grid per row in order: the builtin map
    here, Ray tasks in fpstore.extract.ray.
    """
    from tqdm import tqdm

    from fpstore.slides.grid import sample_patches

    infos, grids = {}, {}
    mapped = map_fn(grid_or_error, rows, [spec] * len(rows))
    for row, (info, grid, error) in tqdm(
        zip(rows, mapped),
        total=len(rows),
        desc="planning",
        unit="slide",
        disable=not progress,
        leave=False,
    ):
        if error:
            failed[row["slide_id"]] = error
        else:
            infos[row["slide_id"]], grids[row["slide_id"]] = info, grid
    patients = {r["slide_id"]: r["patient_id"] for r in rows}
    sampled = sample_patches(grids, n, seed, patients=patients)
    by_id = {r["slide_id"]: r for r in rows}
    plans = {}
    for slide_id, table in sampled.items():
        info, row = infos[slide_id], by_id[slide_id]
        size = float(table.column("size_px")[0].as_py()) if len(table) else spec.patch_um / info.mpp
        plans[slide_id] = SlidePlan(
            slide_id, row["patient_id"], row.get("site"), row["path"], info.mpp, size, table
        )
    return plans


def slide_table(
    plan: SlidePlan, spec: PatchSpec, encoder, key: dict, cohort: str, vectors: np.ndarray
) -> tuple[pa.Table, dict]:
    """(table, file metadata) of one slide's fingerprint file; ``encoder`` needs only id, dim,
    weights_hash and preprocessing (the Ray writers get a light copy without the model)."""
    if not np.isfinite(vectors).all():
        raise StoreError(f"slide {plan.slide_id}: the encoder returned NaN or inf values")
    keys = _keys_table(plan, spec)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), encoder.dim)
    table = keys.append_column(fingerprint_schema(encoder.dim).field("fingerprint"), column)
    metadata = file_metadata(
        "fingerprints",
        **key,
        cohort=cohort,
        slide_id=plan.slide_id,
        weights_hash=encoder.weights_hash,
        patch_um=spec.patch_um,
        out_px=spec.out_px,
        n_patches=len(plan.keys),
        preprocessing=json.dumps(encoder.preprocessing.to_dict()),
    )
    return table, metadata


def _keys_table(plan: SlidePlan, spec: PatchSpec) -> pa.Table:
    x = plan.keys.column("x").to_numpy().astype(np.int64)
    y = plan.keys.column("y").to_numpy().astype(np.int64)
    n = len(x)
    return pa.table(
        {
            "patient_id": pa.array([plan.patient_id] * n, pa.string()),
            "slide_id": pa.array([plan.slide_id] * n, pa.string()),
            "patch_id": pa.array(
                [patch_id(plan.slide_id, a, b, plan.size_px) for a, b in zip(x, y)], pa.string()
            ),
            "site": pa.array([plan.site] * n, pa.string()),
            "x": x,
            "y": y,
            "size_px": pa.array(np.full(n, plan.size_px, np.float32)),
            "x_um": x * plan.mpp,
            "y_um": y * plan.mpp,
            "patch_um": pa.array(np.full(n, spec.patch_um, np.float32)),
            "out_px": pa.array(np.full(n, spec.out_px, np.int32)),
            "tissue_fraction": pa.array(
                plan.keys.column("tissue_fraction").to_numpy().astype(np.float32)
            ),
        }
    )


# ---------------------------------------------------------------- reading (workers)


class PatchTasks(torch.utils.data.IterableDataset):
    """An iterable dataset over a task queue: each task is one chunk of one slide.

    The main process puts ``(slot, path, mpp, xy, size_px, out_px, start)`` tuples and one
    ``None`` per worker at the end; each worker yields ``{"slot", "start", "pixels", "error"}``
    with the pixels as a uint8 tensor (shared memory between processes). Reading errors
    come back as ``error`` so that one bad slide does not stop the loader.
    """

    def __init__(self, tasks):
        super().__init__()
        self.tasks = tasks
        self._slides: dict = {}

    def _open(self, path: str, mpp: float):
        from fpstore.slides.slide import open_slide

        if path not in self._slides:
            if len(self._slides) >= 4:  # a few slides stay open: chunks of one slide cluster
                self._slides.pop(next(iter(self._slides))).close()
            self._slides[path] = open_slide(path, mpp=mpp)
        return self._slides[path]

    def __iter__(self):
        while True:
            task = self.tasks.get()
            if task is None:
                return
            slot, path, mpp, xy, size_px, out_px, start = task
            try:
                pixels = torch.from_numpy(self._open(path, mpp).read_patches(xy, size_px, out_px))
                error = ""
            except Exception as exc:  # any reader failure marks this slide failed, not the run
                pixels, error = (
                    torch.empty((0, out_px, out_px, 3), dtype=torch.uint8),
                    f"{type(exc).__name__}: {exc}",
                )
            yield {"slot": slot, "start": start, "pixels": pixels, "error": error}


def _worker_init(_):
    # Readers decode and resize; the cores belong to the model. (OpenCV's threads are set
    # to one in the parent before the fork: cv2.setNumThreads in a forked child can hang.)
    torch.set_num_threads(1)


# ---------------------------------------------------------------- the loop


@dataclass
class _Slot:
    plan: SlidePlan
    claim: SlideClaim
    vectors: np.ndarray
    remaining: int
    started: float
    error: str = ""


def extract(
    store: Path,
    cohort: str,
    config: ExtractConfig = ExtractConfig(),
    progress: bool = True,
    engine=None,
) -> ExtractSummary:
    """Extract the fingerprints of every slide of ``cohort`` not yet in the store.

    ``engine``: None runs the loop below in this process; a ``RayEngine``
    (fpstore.extract.ray) plans and extracts on a Ray cluster with the same resume
    rules, writers and status files.
    """
    from fpstore.cohort.cohorts import load_cohort
    from fpstore.encoders.base import resolve_device
    from fpstore.encoders.registry import create_encoder

    started = time.perf_counter()
    store = store_root(store)
    if engine is None and is_remote(store):
        raise StoreError(
            f"store {str(store)!r}: the local engine's per-slide locks need a local "
            "folder; extract to object storage with --engine ray"
        )
    slides = load_cohort(store, cohort).slides.to_pylist()
    device = engine.device(config) if engine else resolve_device(config.device)
    encoder = create_encoder(config.encoder, **config.encoder_options)
    check_partition_value("encoder id", encoder.id)
    key = resume_key(encoder, config)
    spec = PatchSpec(
        encoder.preprocessing.patch_um, encoder.preprocessing.out_px, config.min_tissue
    )
    if config.precision == "int8":
        if str(device) != "cpu" or config.compile:
            raise ConfigError(
                f"--precision int8 is a CPU path without --compile (encoders on {device}, "
                f"compile {config.compile}); add --device cpu and drop --compile, or use "
                "--precision bf16 on GPUs"
            )
        calibration, key["calibration"] = calibration_set(slides, spec)

    results: dict[str, SlideResult] = {}
    pending, mismatched = [], {}
    for row in slides:
        if row["patient_id"] is None:
            results[row["slide_id"]] = SlideResult(
                row["slide_id"],
                "failed",
                error=(
                    "no patient for this slide in the clinical table; fix the cohort "
                    "(`fpstore cohort add ... --force`)"
                ),
            )
            continue
        diff = stored_mismatch(fingerprint_path(store, encoder.id, cohort, row["slide_id"]), key)
        if diff is None or (diff and config.force):
            pending.append(row)
        elif diff:
            mismatched[row["slide_id"]] = diff
        else:
            results[row["slide_id"]] = SlideResult(row["slide_id"], "skipped")
    if mismatched:
        raise StoreError(_explain_mismatch(store, mismatched))

    # Sampling pools a patient's slides: plan every slide of each patient with work to do.
    todo_patients = {r["patient_id"] for r in pending}
    plan_rows = [r for r in slides if r["patient_id"] in todo_patients]
    failed: dict[str, str] = {}
    plans = (
        plan_slides(
            plan_rows,
            spec,
            config.patches,
            config.seed,
            failed,
            progress,
            engine.map if engine else map,
        )
        if plan_rows
        else {}
    )
    pending_ids = {r["slide_id"] for r in pending}
    for slide_id, error in failed.items():
        if slide_id in pending_ids:
            results[slide_id] = SlideResult(slide_id, "failed", error=error)
            _write_status(store, encoder, cohort, slide_id, "failed", error)
    order = [plans[r["slide_id"]] for r in pending if r["slide_id"] in plans]

    loop_seconds, agreement = 0.0, None
    if order:
        loop_started = time.perf_counter()
        pixels = read_calibration(calibration, spec) if config.precision == "int8" else None
        if engine is not None:
            ray_results, agreement = engine.run(
                store, cohort, encoder, key, spec, config, order, progress, calibration=pixels
            )
            results.update(ray_results)
        else:
            encoder.prepare(device, config.precision, config.channels_last, config.compile)
            if pixels is not None:
                agreement = encoder.calibrate(pixels)
            loop = _Loop(store, cohort, encoder, key, spec, config, device, progress)
            loop_started = time.perf_counter()
            results.update(loop.run(order))
        loop_seconds = time.perf_counter() - loop_started
    ordered = [results[r["slide_id"]] for r in slides if r["slide_id"] in results]
    return ExtractSummary(
        cohort,
        encoder.id,
        encoder.hash,
        device,
        config.precision,
        ordered,
        time.perf_counter() - started,
        loop_seconds,
        agreement,
    )


def _write_status(store, encoder, cohort, slide_id, status, error="", n_patches=0, seconds=0.0):
    write_json_atomic(
        {
            "slide_id": slide_id,
            "status": status,
            "error": error,
            "n_patches": n_patches,
            "seconds": round(seconds, 3),
            "encoder_hash": encoder.hash,
            "pid": os.getpid(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        status_path(store, encoder.id, cohort, slide_id),
    )


class _Loop:
    """One pass over the planned slides: claim, read, encode, write."""

    def __init__(self, store, cohort, encoder, key, spec, config, device, progress):
        self.store, self.cohort, self.encoder, self.key = store, cohort, encoder, key
        self.spec, self.config, self.device, self.progress = spec, config, device, progress
        self.batch_size = config.resolved_batch_size(device)
        self.workers = config.resolved_workers()
        self.slots: dict[int, _Slot] = {}
        self.results: dict[str, SlideResult] = {}

    def run(self, plans: list[SlidePlan]) -> dict[str, SlideResult]:
        import multiprocessing

        import cv2
        from tqdm import tqdm

        if self.device == "cpu" and self.workers:
            # The readers are light; leave the model all but one core only when it has many.
            torch.set_num_threads(
                max(1, (os.cpu_count() or 1) - (1 if (os.cpu_count() or 1) > 4 else 0))
            )
        context = multiprocessing.get_context("fork" if self.workers else None)
        tasks = context.Queue() if self.workers else queue_module.Queue()
        prefetch = 2
        loader = torch.utils.data.DataLoader(
            PatchTasks(tasks),
            batch_size=None,
            num_workers=self.workers,
            worker_init_fn=_worker_init if self.workers else None,
            prefetch_factor=prefetch if self.workers else None,
            pin_memory=self.device == "cuda",
            multiprocessing_context=context if self.workers else None,
        )
        # Enough queued tasks that no worker waits on an empty queue while the main process
        # waits on that worker (the loader returns results in request order).
        in_flight_target = prefetch * max(1, self.workers) + 2
        todo = deque(plans)
        put = received = 0
        next_slot = 0
        self.bar = tqdm(
            total=len(plans),
            desc=f"extract {self.encoder.id}",
            unit="slide",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        self.encoded = 0
        self.t0 = time.perf_counter()
        batch: deque = deque()  # (slot, start, pixels) waiting for the model
        queued = 0
        pending_out = None
        closed = False
        cv2_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # inherited by the forked readers (see _worker_init)
        iterator = iter(loader)
        try:
            while True:
                while put - received < in_flight_target and todo:
                    plan = todo.popleft()
                    slot = self._claim(plan, next_slot)
                    if slot is None:
                        continue
                    next_slot += 1
                    xy = np.stack(
                        [plan.keys.column("x").to_numpy(), plan.keys.column("y").to_numpy()], 1
                    )
                    for start in range(0, len(xy), self.config.chunk_size):
                        tasks.put(
                            (
                                slot,
                                plan.path,
                                plan.mpp,
                                xy[start : start + self.config.chunk_size],
                                plan.size_px,
                                self.spec.out_px,
                                start,
                            )
                        )
                        put += 1
                    if len(xy) == 0:
                        self._finish(slot)
                if not todo and not closed:
                    for _ in range(max(1, self.workers)):
                        tasks.put(None)
                    closed = True
                if put == received:
                    break
                item = next(iterator)
                received += 1
                slot = self.slots.get(item["slot"])
                if slot is None or slot.error:
                    continue
                if item["error"]:
                    self._fail(item["slot"], item["error"])
                    continue
                batch.append((item["slot"], item["start"], item["pixels"]))
                queued += len(item["pixels"])
                while queued >= self.batch_size or (queued and put == received):
                    rows, pixels = self._take(batch, min(self.batch_size, queued))
                    queued -= len(pixels)
                    out = self._encode(pixels)
                    if pending_out is not None:
                        self._scatter(*pending_out)
                    pending_out = (rows, out)
                if pending_out is not None and put == received:
                    self._scatter(*pending_out)
                    pending_out = None
            if pending_out is not None:
                self._scatter(*pending_out)
        finally:
            if not closed:  # an interrupted run: let the workers end instead of waiting
                for _ in range(max(1, self.workers)):
                    tasks.put(None)
            for slot_id in list(self.slots):
                self.slots.pop(slot_id).claim.release()
            del iterator
            cv2.setNumThreads(cv2_threads)
            self.bar.close()
        return self.results

    def _claim(self, plan: SlidePlan, slot_id: int) -> int | None:
        claim = SlideClaim(claim_path(self.store, self.encoder.id, self.cohort, plan.slide_id))
        if not claim.acquire():
            self.results[plan.slide_id] = SlideResult(plan.slide_id, "elsewhere")
            self.bar.update(1)
            return None
        # Another process may have written it since we planned: the file tells.
        diff = stored_mismatch(
            fingerprint_path(self.store, self.encoder.id, self.cohort, plan.slide_id), self.key
        )
        if diff == {} or (diff and not self.config.force):
            claim.release()
            self.results[plan.slide_id] = SlideResult(plan.slide_id, "elsewhere")
            self.bar.update(1)
            return None
        n = len(plan.keys)
        self.slots[slot_id] = _Slot(
            plan, claim, np.zeros((n, self.encoder.dim), np.float32), n, time.perf_counter()
        )
        return slot_id

    def _take(self, batch: deque, n: int):
        """Pop exactly n patches off the chunk queue: [(slot, start, count)], pixels."""
        rows, parts, need = [], [], n
        while need:
            slot, start, pixels = batch[0]
            if len(pixels) <= need:
                batch.popleft()
                part = pixels
            else:
                part, batch[0] = pixels[:need], (slot, start + need, pixels[need:])
            rows.append((slot, start, len(part)))
            parts.append(part)
            need -= len(part)
        return rows, parts[0] if len(parts) == 1 else torch.cat(parts)

    def _encode(self, pixels):
        """Start the model on one batch; returns a handle whose result _scatter waits for."""
        n = len(pixels)
        if self.config.compile and n < self.batch_size:  # one shape: no recompilation
            pad = torch.zeros((self.batch_size - n, *pixels.shape[1:]), dtype=pixels.dtype)
            pixels = torch.cat([pixels, pad])
        out = self.encoder.encode(pixels)[:n]
        if out.device.type == "cuda":
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return host, event
        return out, None

    def _scatter(self, rows, handle) -> None:
        out, event = handle
        if event is not None:
            event.synchronize()
        vectors = out.numpy()
        offset = 0
        for slot_id, start, count in rows:
            slot = self.slots.get(slot_id)
            if slot is not None and not slot.error:
                slot.vectors[start : start + count] = vectors[offset : offset + count]
                slot.remaining -= count
                if slot.remaining == 0:
                    self._finish(slot_id)
            offset += count
        self.encoded += offset
        rate = self.encoded / max(1e-9, time.perf_counter() - self.t0)
        self.bar.set_postfix_str(f"{self.encoded} patches, {rate:.1f} patches/s", refresh=False)

    def _finish(self, slot_id: int) -> None:
        slot = self.slots.pop(slot_id)
        plan = slot.plan
        try:
            table, metadata = slide_table(
                plan, self.spec, self.encoder, self.key, self.cohort, slot.vectors
            )
            seconds = time.perf_counter() - slot.started
            write_parquet_atomic(
                table,
                fingerprint_path(self.store, self.encoder.id, self.cohort, plan.slide_id),
                metadata,
                **PARQUET_OPTIONS,
            )
            _write_status(
                self.store,
                self.encoder,
                self.cohort,
                plan.slide_id,
                "ok",
                n_patches=len(plan.keys),
                seconds=seconds,
            )
            self.results[plan.slide_id] = SlideResult(
                plan.slide_id, "ok", len(plan.keys), round(seconds, 3)
            )
        except (FpstoreError, OSError) as error:
            self.results[plan.slide_id] = SlideResult(plan.slide_id, "failed", error=str(error))
            _write_status(
                self.store, self.encoder, self.cohort, plan.slide_id, "failed", str(error)
            )
        finally:
            slot.claim.release()
            self.bar.update(1)

    def _fail(self, slot_id: int, error: str) -> None:
        slot = self.slots.pop(slot_id)
        slot.error = error
        self.results[slot.plan.slide_id] = SlideResult(slot.plan.slide_id, "failed", error=error)
        _write_status(self.store, self.encoder, self.cohort, slot.plan.slide_id, "failed", error)
        slot.claim.release()
        self.bar.update(1)
