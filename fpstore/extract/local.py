"""The local engine: this process runs the model, forked reader processes decode patches.

claim    per slide (``fpstore.extract.claims``): two processes on one store never encode
         the same slide; one that finds a slide claimed defers it to the end of its run
read     DataLoader workers pull (slide, coordinates) chunks from a task queue and return
         uint8 pixels in shared memory, while the main process runs the model
encode   fixed-size batches that mix slides; uint8 to the device, normalised there;
         channels_last; optional bf16/fp16 autocast and torch.compile
write    when a slide's last patch is encoded: its Parquet file (temp name, fsync, rename)
         and its status JSON, then the claim is released
"""

from __future__ import annotations

import os
import queue as queue_module
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from fpstore.encoders.base import resolve_device
from fpstore.errors import StoreError
from fpstore.extract.config import ExtractConfig, SlideResult
from fpstore.extract.plan import SlidePlan
from fpstore.extract.write import EncoderInfo, record_failure, write_slide
from fpstore.store.locks import FileLock


class LocalEngine:
    """Extraction in this process (see the module docstring); the Ray engine's peer."""

    def check_store(self, layout) -> None:
        if layout.is_remote:
            raise StoreError(
                f"store {str(layout)!r}: the local engine's per-slide locks need a local "
                "folder; extract to object storage with --engine ray"
            )

    def device(self, config: ExtractConfig) -> str:
        return resolve_device(config.device)

    def map(self, fn, *iterables):
        return map(fn, *iterables)

    def prepare(self, encoder, config: ExtractConfig, calibration=None) -> None:
        """Move the model to its device and precision once per run (int8: calibrate)."""
        encoder.prepare(self.device(config), config.precision, config.channels_last, config.compile)
        if calibration is not None:
            encoder.calibrate(calibration)

    def run(
        self,
        store,
        cohort: str,
        encoder,
        key: dict,
        spec,
        config: ExtractConfig,
        plans: list[SlidePlan],
        claims,
        progress: bool = True,
    ) -> tuple[dict[str, SlideResult], dict | None]:
        """Encode the planned slides this run can claim: (results, int8 agreement)."""
        device = self.device(config)
        loop = _Loop(store, cohort, encoder, key, spec, config, device, progress, claims)
        return loop.run(plans), encoder.calibration


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


@dataclass
class _Slot:
    plan: SlidePlan
    claim: FileLock
    vectors: np.ndarray
    remaining: int
    started: float
    error: str = ""


class _Loop:
    """One pass over the planned slides: claim, read, encode, write."""

    def __init__(self, store, cohort, encoder, key, spec, config, device, progress, claims):
        self.store, self.cohort, self.encoder, self.key = store, cohort, encoder, key
        self.spec, self.config, self.device, self.progress = spec, config, device, progress
        self.claims = claims
        self.info = EncoderInfo.of(encoder)
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
                                plan.slide.path,
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
        claim = self.claims.take(plan)
        if claim is None:  # deferred, or settled without us (Claims.decided)
            self.bar.update(1)
            return None
        n = len(plan.keys)
        self.slots[slot_id] = _Slot(
            plan, claim, np.zeros((n, self.encoder.dim), np.float32), n, time.time()
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
        try:
            self.results[slot.plan.slide_id] = write_slide(
                self.store,
                self.cohort,
                slot.plan,
                self.spec,
                self.info,
                self.key,
                slot.vectors,
                slot.started,
            )
        finally:
            slot.claim.release()
            self.bar.update(1)

    def _fail(self, slot_id: int, error: str) -> None:
        slot = self.slots.pop(slot_id)
        slot.error = error
        slide_id = slot.plan.slide_id
        self.results[slide_id] = record_failure(self.store, self.cohort, self.info, slide_id, error)
        slot.claim.release()
        self.bar.update(1)
