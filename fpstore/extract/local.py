"""The local engine: this process runs the model, forked reader processes plan and read.

claim    per slide (``fpstore.extract.claims``): two processes on one store never encode
         the same slide; one that finds a slide claimed defers it to the end of its run
plan     as a patient's slides are claimed, a reader plans them (``plan_patient``: tissue
         masks remembered in the store, grids, the patient's sample), so the first patch is
         encoded after one patient's planning, not the whole cohort's
read     readers turn (slide, coordinates) chunks into uint8 pixels in shared memory, or, on
         a GPU that decodes JPEG (``fpstore.extract.decode``), into the compressed tiles
         that the main process decodes in batches on the GPU
encode   fixed-size batches that mix slides; uint8 to the device (from pinned buffers that
         stay pinned), normalised there; channels_last; bf16/fp16 autocast, int8, compile
write    when a slide's last patch is encoded: its Parquet file (temp name, fsync, rename)
         and its status JSON, then the claim is released

Tasks go to the readers through one queue per reader, in turn: the DataLoader asks its
workers in turn and yields their results in that order, so the k-th task put is the k-th
result received. The main process can therefore hold back any task (plans only as far
ahead as the reading needs) without a reader waiting on an empty queue for a result the
main process waits on.
"""

from __future__ import annotations

import os
import queue as queue_module
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, replace

import numpy as np
import torch

from fpstore.encoders.base import PrecisionChoice, resolve_device, resolve_precision
from fpstore.errors import StoreError
from fpstore.extract.claims import Claims
from fpstore.extract.config import ExtractConfig, SlideResult
from fpstore.extract.job import ExtractJob
from fpstore.extract.plan import SlidePlan, SlideWork, plan_patient
from fpstore.extract.write import record_failure, write_slide
from fpstore.store.locks import FileLock


class LocalEngine:
    """Extraction in this process (see the module docstring); the Ray engine's peer."""

    def __init__(self):
        self.first_encoded: float | None = None  # perf_counter() when a first batch was out
        self.decode = ""  # where the last run decoded JPEG tiles, and why

    def check_store(self, layout) -> None:
        if layout.is_remote:
            raise StoreError(
                f"store {str(layout)!r}: the local engine's per-slide locks need a local "
                "folder; extract to object storage with --engine ray"
            )

    def device(self, config: ExtractConfig) -> str:
        return resolve_device(config.device)

    def precision(self, config: ExtractConfig) -> PrecisionChoice:
        return resolve_precision(config.precision, self.device(config))

    def prepare(self, encoder, config: ExtractConfig, calibration=None) -> None:
        """Move the model to its device and precision once per run (int8: calibrate)."""
        encoder.prepare(self.device(config), config.precision, config.channels_last, config.compile)
        if calibration is not None:
            encoder.calibrate(calibration)

    def run(
        self, job: ExtractJob, work: list[SlideWork], claims: Claims
    ) -> tuple[dict[str, SlideResult], dict | None]:
        """Plan, encode and write the slides of ``work`` this run can claim: (results,
        int8 agreement)."""
        from fpstore.extract.decode import choose_decoder

        device = self.device(job.config)
        decoder, why = choose_decoder(device, job.config.decode)
        if job.progress:
            print(why, file=sys.stderr, flush=True)
        loop = _Loop(self, job, device, claims, decoder)
        results = loop.run(work)
        self.decode = why + loop.decode_note()
        return results, job.encoder.calibration


class PatchTasks(torch.utils.data.IterableDataset):
    """Tasks in, results out, one queue per reader (``queues[worker id]``); in process
    (no readers) the one queue.

    ``("plan", seq, patient slides, wanted ids, spec, n, seed, store)`` yields
    ``{"seq", "plans", "failed"}``: the wanted slides' plans and the errors of those that
    cannot be read. ``("read", seq, slot, path, mpp, xy, size_px, out_px, start, tiles)``
    yields ``{"seq", "slot", "start", "error"}`` with ``pixels`` (uint8 NHWC in shared
    memory) or, when ``tiles``, the compressed tiles (``decode.tiles_payload``). A reading
    error comes back as ``error`` so that one bad slide does not stop the loader.
    ``None`` ends a reader.
    """

    def __init__(self, queues):
        super().__init__()
        self.queues = queues
        self._slides: dict = {}

    def _open(self, path: str, mpp: float):
        from fpstore.slides.slide import open_slide

        if path not in self._slides:
            if len(self._slides) >= 4:  # a few slides stay open: chunks of one slide cluster
                self._slides.pop(next(iter(self._slides))).close()
            self._slides[path] = open_slide(path, mpp=mpp)
        return self._slides[path]

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        tasks = self.queues[worker.id if worker is not None else 0]
        while True:
            task = tasks.get()
            if task is None:
                return
            yield self._plan(*task[1:]) if task[0] == "plan" else self._read(*task[1:])

    def _plan(self, seq, slides, wanted, spec, n, seed, store) -> dict:
        try:
            plans, failed = plan_patient(slides, wanted, spec, n, seed, store)
        except Exception as exc:  # any failure to plan fails the patient's slides, not the run
            plans, failed = [], {s: f"{type(exc).__name__}: {exc}" for s in wanted}
        return {"seq": seq, "plans": plans, "failed": failed}

    def _read(self, seq, slot, path, mpp, xy, size_px, out_px, start, tiles) -> dict:
        from fpstore.extract.decode import tiles_payload

        try:
            slide = self._open(path, mpp)
            if tiles:
                payload = tiles_payload(slide.jpeg_tiles(xy, size_px, out_px))
            else:
                payload = {"pixels": torch.from_numpy(slide.read_patches(xy, size_px, out_px))}
            error = ""
        except Exception as exc:  # any reader failure marks this slide failed, not the run
            payload, error = {}, f"{type(exc).__name__}: {exc}"
        return {"seq": seq, "slot": slot, "start": start, "error": error, **payload}


# Results each reader works ahead of the model (the DataLoader's prefetch_factor).
_PREFETCH = 2


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
    tiles: bool  # read as compressed tiles, decoded here on the GPU
    decode: str = ""  # with a GPU decoder: "gpu", or why the readers decode this slide
    error: str = ""


class PinnedBatches:
    """Batches bound for a GPU gathered in page-locked host buffers that stay pinned.

    ``torch.cat`` of pinned chunks returns pageable memory, from which an asynchronous copy
    to the GPU is neither asynchronous nor as fast. Batches are gathered instead into a ring
    of ``depth`` pinned buffers; a buffer is reused only once the copy that read it has
    finished (``done`` records an event after each batch is queued on the GPU).
    """

    def __init__(self, shape: tuple, depth: int = 3, pin: bool = True):
        self.buffers = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin) for _ in range(depth)]
        self.events: list = [None] * depth
        self.turn = 0

    def gather(self, parts: list[torch.Tensor], size: int) -> torch.Tensor:
        """The parts one after another in the next free buffer, zero-padded to ``size``."""
        event = self.events[self.turn]
        if event is not None:
            event.synchronize()
        out = self.buffers[self.turn][:size]
        n = sum(len(p) for p in parts)
        torch.cat(parts, out=out[:n])
        out[n:].zero_()
        return out

    def done(self) -> None:
        """The batch from the current buffer is queued on the GPU: mark when it is read."""
        if self.buffers[self.turn].is_pinned():
            event = torch.cuda.Event()
            event.record()
            self.events[self.turn] = event
        self.turn = (self.turn + 1) % len(self.buffers)


class _Loop:
    """One pass over the work: claim, plan, read, encode, write."""

    def __init__(self, engine: LocalEngine, job: ExtractJob, device: str, claims: Claims, decoder):
        self.engine, self.job, self.device, self.claims = engine, job, device, claims
        self.decoder = decoder  # a TileDecoder when JPEG tiles are decoded on the GPU
        self.batch_size = job.config.resolved_batch_size(device)
        self.workers = job.config.resolved_workers()
        self.slots: dict[int, _Slot] = {}
        self.results: dict[str, SlideResult] = {}
        self.staging = None  # PinnedBatches, for CPU-decoded batches bound for a GPU
        self.decoded_on: Counter = Counter()  # slides per verdict: "gpu" or why the readers
        self._verdicts: dict[str, str] = {}  # slide path -> "gpu" or why the readers decode it

    # -- the run --
    def run(self, work: list[SlideWork]) -> dict[str, SlideResult]:
        import cv2

        loader = self._readers()
        self._begin(work)
        cv2_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # inherited by the forked readers (see _worker_init)
        iterator = iter(loader)
        try:
            self._pump(iterator)
        finally:
            if not self.closed:  # an interrupted run: let the workers end instead of waiting
                self._close_readers()
            for claims in self.planning.values():
                for claim in claims.values():
                    claim.release()
            for slot_id in list(self.slots):
                self.slots.pop(slot_id).claim.release()
            del iterator
            cv2.setNumThreads(cv2_threads)
            self.bar.close()
        return self.results

    def _readers(self):
        """The loader that yields the readers' results, and their task queues
        (``self.queues``); without reader processes it runs the tasks here, from one queue."""
        import multiprocessing

        if self.device == "cpu" and self.workers:
            # The readers are light; leave the model all but one core only when it has many.
            torch.set_num_threads(
                max(1, (os.cpu_count() or 1) - (1 if (os.cpu_count() or 1) > 4 else 0))
            )
        context = multiprocessing.get_context("fork" if self.workers else None)
        self.queues = [
            context.Queue() if self.workers else queue_module.Queue()
            for _ in range(max(1, self.workers))
        ]
        return torch.utils.data.DataLoader(
            PatchTasks(self.queues),
            batch_size=None,
            num_workers=self.workers,
            worker_init_fn=_worker_init if self.workers else None,
            prefetch_factor=_PREFETCH if self.workers else None,
            # Not pinned here: batches bound for a GPU are gathered into the pinned ring
            # (PinnedBatches) anyway, and pinning each chunk first would copy it twice.
            pin_memory=False,
            multiprocessing_context=context if self.workers else None,
            in_order=True,  # results in the order tasks were put (see the module docstring)
        )

    def _begin(self, work: list[SlideWork]) -> None:
        """The bookkeeping of one pass: what to plan and read next, what waits for the
        model, the progress bar."""
        from tqdm import tqdm

        if self.device == "cuda":
            shape = (self.batch_size, self.job.spec.out_px, self.job.spec.out_px, 3)
            self.staging = PinnedBatches(shape)
        # Chunks queued so that every reader has the next one while the model works; plans
        # run ahead only as far as that needs, one per reader at a time.
        self.target = _PREFETCH * max(1, self.workers) + 2
        self.chunk = max(self.job.config.chunk_size, self.batch_size if self.decoder else 0)
        self.groups = deque(_by_patient(work))
        self.planning: dict[int, dict[str, FileLock]] = {}  # plan seq -> claims it plans
        self.ready: deque = deque()  # [slot id, xy, next start] of planned slides
        self.put = self.received = self.next_slot = 0
        self.bar = tqdm(
            total=len(work),
            desc=f"extract {self.job.encoder.id}",
            unit="slide",
            disable=not self.job.progress,
            dynamic_ncols=True,
        )
        self.encoded = 0
        self.t0 = time.perf_counter()
        self.batch: deque = deque()  # (slot, start, pixels) waiting for the model
        self.queued = 0  # patches in self.batch
        self.pending_out = None  # (rows, handle) of the batch on the device, not yet scattered
        self.closed = False  # the readers were told to end

    def _pump(self, results) -> None:
        """Keep the readers busy and take their results in order until every task put has
        come back: plans become slots, pixels queue for the model, full batches are encoded."""
        while True:
            self._fill()
            if not self.closed and self._drained():
                self._close_readers()
            if self.put == self.received:
                break
            item = next(results)
            if item["seq"] != self.received:  # the in-order contract, checked
                raise RuntimeError(f"reader result {item['seq']} arrived as number {self.received}")
            self.received += 1
            if "plans" in item:
                self._planned(item)
            else:
                self.queued += self._arrived(item, self.batch)
            # Flush the last partial batch once nothing more can come, whatever came last.
            self._encode_queued(last=self._drained() and self.put == self.received)
        if self.pending_out is not None:
            self._scatter(*self.pending_out)

    def _close_readers(self) -> None:
        for q in self.queues:
            q.put(None)
        self.closed = True

    def decode_note(self) -> str:
        """Slides per decoder, when any slide fell back from the GPU to the readers."""
        fell_back = {k: v for k, v in self.decoded_on.items() if k != "gpu"}
        if not self.decoder or not fell_back:
            return ""
        parts = [
            f"{n} on the GPU" if k == "gpu" else f"{n} by the readers ({k})"
            for k, n in self.decoded_on.items()
        ]
        return "; slides: " + ", ".join(parts)

    def _arrived(self, item: dict, batch: deque) -> int:
        """Queue a read result for the model (decoded here when it is tiles); the number of
        patches queued (none for a slide that failed)."""
        slot = self.slots.get(item["slot"])
        if slot is None or slot.error:
            return 0
        if item["error"]:
            self._fail(item["slot"], item["error"])
            return 0
        if slot.tiles:
            try:
                pixels = self.decoder.decode(item)
            except Exception as exc:  # a corrupt tile fails its slide, as in the readers
                self._fail(item["slot"], f"GPU JPEG decoding: {_one_line(exc)}")
                return 0
        else:
            pixels = item["pixels"]
        batch.append((item["slot"], item["start"], pixels))
        return len(pixels)

    # -- what to ask the readers next --
    def _send(self, task: tuple) -> None:
        self.queues[self.put % len(self.queues)].put(task)
        self.put += 1

    def _drained(self) -> bool:
        """Nothing left to put: every patient planned and every chunk queued."""
        return not self.groups and not self.planning and not self.ready

    def _fill(self) -> None:
        while True:
            backlog = sum(len(xy) - start for _, xy, start in self.ready)
            if (
                self.groups
                and len(self.planning) < max(1, self.workers)
                and backlog < self.target * self.job.config.chunk_size
            ):
                self._plan(self.groups.popleft())
            elif self.put - self.received < self.target and self.ready:
                self._read_next()
            else:
                return

    def _plan(self, group: list[SlideWork]) -> None:
        """Claim the patient's slides to do; the readers plan those it got."""
        claimed = {}
        for work in group:
            claim = self.claims.take(work)
            if claim is None:  # deferred, or settled without us (Claims.decided)
                self.bar.update(1)
            else:
                claimed[work.slide_id] = claim
        if claimed:
            self.planning[self.put] = claimed
            spec, config = self.job.spec, self.job.config
            store = str(self.job.layout)
            self._send(
                (
                    "plan",
                    self.put,
                    group[0].patient_slides,
                    list(claimed),
                    spec,
                    config.patches,
                    config.seed,
                    store,
                )
            )

    def _planned(self, item: dict) -> None:
        claims = self.planning.pop(item["seq"])
        for slide_id, error in item["failed"].items():
            self.results[slide_id] = record_failure(
                self.job.layout, self.job.cohort, self.job.info, slide_id, error
            )
            claims.pop(slide_id).release()  # after the status: only a claim holder writes it
            self.bar.update(1)
        for plan in item["plans"]:
            slot_id = self.next_slot
            self.next_slot += 1
            n = len(plan.keys)
            verdict = self._decode_verdict(plan)
            self.slots[slot_id] = _Slot(
                plan,
                claims.pop(plan.slide_id),
                np.zeros((n, self.job.encoder.dim), np.float32),
                n,
                time.time(),
                tiles=verdict == "gpu",
                decode=verdict,
            )
            if n == 0:
                self._finish(slot_id)
            else:
                xy = np.stack(
                    [plan.keys.column("x").to_numpy(), plan.keys.column("y").to_numpy()], 1
                )
                self.ready.append([slot_id, xy, 0])

    def _read_next(self) -> None:
        entry = self.ready[0]
        slot_id, xy, start = entry
        slot = self.slots[slot_id]
        plan = slot.plan
        stop = start + self.chunk
        self._send(
            (
                "read",
                self.put,
                slot_id,
                plan.slide.path,
                plan.mpp,
                xy[start:stop],
                plan.size_px,
                self.job.spec.out_px,
                start,
                slot.tiles,
            )
        )
        if stop >= len(xy):
            self.ready.popleft()
        else:
            entry[2] = stop

    def _decode_verdict(self, plan: SlidePlan) -> str:
        """Who decodes this slide's tiles: "" without a GPU decoder; "gpu" for a JPEG-tiled
        TIFF whose first tile the GPU decodes as the reader does (checked once per file,
        here); else why the readers do."""
        from fpstore.errors import FpstoreError
        from fpstore.slides.slide import open_slide

        if self.decoder is None:
            return ""
        path = plan.slide.path
        if path not in self._verdicts:
            try:
                with open_slide(path, mpp=plan.mpp) as slide:
                    sample = slide.jpeg_sample(plan.size_px, self.job.spec.out_px)
                if sample is None:
                    verdict = "no scanned tile to check"
                else:
                    same, difference = self.decoder.agrees(*sample)
                    verdict = "gpu" if same else f"GPU decoding differs by {difference:.1f} levels"
            except FpstoreError as error:  # not a JPEG-tiled TIFF: the message says which
                verdict = str(error).split(";")[0]
            except Exception as error:  # the GPU decoder refused the sample tile
                verdict = f"GPU decoding failed on the sample tile: {_one_line(error)}"
            if verdict != "gpu" and self.job.progress:
                print(f"{plan.slide_id}: CPU decode: {verdict}", file=sys.stderr, flush=True)
            self._verdicts[path] = verdict
        verdict = self._verdicts[path]
        self.decoded_on[verdict] += 1
        return verdict

    # -- the model --
    def _encode_queued(self, last: bool) -> None:
        """Encode the queued patches in full batches (and the partial one when ``last``). A
        batch's vectors are scattered once the next batch is started, so that the device
        works while the host waits; the last one's at once."""
        while self.queued >= self.batch_size or (self.queued and last):
            n = min(self.batch_size, self.queued)
            rows, parts = self._take(self.batch, n)
            self.queued -= n
            out = self._encode(*self._join(parts, n), n)
            if self.pending_out is not None:
                self._scatter(*self.pending_out)
            self.pending_out = (rows, out)
        if self.pending_out is not None and last:
            self._scatter(*self.pending_out)
            self.pending_out = None

    def _take(self, batch: deque, n: int):
        """Pop exactly n patches off the chunk queue: [(slot, start, count)], [pixels]."""
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
        return rows, parts

    def _join(self, parts: list[torch.Tensor], n: int) -> tuple[torch.Tensor, bool]:
        """(one batch of the n patches in ``parts``, whether it used the pinned ring).

        CPU parts bound for a GPU go through the pinned ring (one copy: the loader pins
        nothing); a batch that mixes slides the GPU decoded with slides the readers decoded
        is joined on the GPU, the readers' parts uploaded from the ring in one copy; padded
        to the batch size when compiled (one shape)."""
        size = self.batch_size if self.job.config.compile else n
        on_host = [p for p in parts if p.device.type == "cpu"]
        if on_host and len(on_host) < len(parts):
            device = next(p.device for p in parts if p.device.type != "cpu")
            count = sum(len(p) for p in on_host)
            staged = self.staging is not None
            host = self.staging.gather(on_host, count) if staged else torch.cat(on_host)
            uploaded = iter(host.to(device, non_blocking=staged).split([len(p) for p in on_host]))
            parts = [next(uploaded) if p.device.type == "cpu" else p for p in parts]
            return _cat_padded(parts, size), staged
        if on_host and self.staging is not None:
            return self.staging.gather(parts, size), True
        if len(parts) == 1 and size == n:
            return parts[0], False
        return _cat_padded(parts, size), False

    def _encode(self, pixels, staged: bool, n: int):
        """Start the model on one batch; returns a handle whose result _scatter waits for."""
        out = self.job.encoder.encode(pixels)[:n]
        if staged:
            self.staging.done()
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
        if self.engine.first_encoded is None:
            self.engine.first_encoded = time.perf_counter()
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

    # -- the slides --
    def _finish(self, slot_id: int) -> None:
        slot = self.slots.pop(slot_id)
        try:
            result = write_slide(
                self.job.layout,
                self.job.cohort,
                slot.plan,
                self.job.spec,
                self.job.info,
                self.job.key,
                slot.vectors,
                slot.started,
            )
            self.results[slot.plan.slide_id] = replace(result, decode=slot.decode)
        finally:
            slot.claim.release()
            self.bar.update(1)

    def _fail(self, slot_id: int, error: str) -> None:
        slot = self.slots.pop(slot_id)
        slot.error = error
        slide_id = slot.plan.slide_id
        result = record_failure(self.job.layout, self.job.cohort, self.job.info, slide_id, error)
        self.results[slide_id] = replace(result, decode=slot.decode)
        slot.claim.release()
        self.bar.update(1)
        self.ready = deque(entry for entry in self.ready if entry[0] != slot_id)


def _cat_padded(parts: list[torch.Tensor], size: int) -> torch.Tensor:
    """The parts (on one device) one after another, zero-padded to ``size`` patches."""
    n = sum(len(p) for p in parts)
    if size > n:
        pad = torch.zeros(
            (size - n, *parts[0].shape[1:]), dtype=parts[0].dtype, device=parts[0].device
        )
        parts = [*parts, pad]
    return torch.cat(parts)


def _one_line(error: BaseException) -> str:
    """``Type: message`` on one line (nvJPEG's messages span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _by_patient(work: list[SlideWork]) -> list[list[SlideWork]]:
    """The work grouped by patient (a patient is planned at once), in first-seen order."""
    groups: dict[str, list[SlideWork]] = {}
    for item in work:
        groups.setdefault(item.slide.patient_id, []).append(item)
    return list(groups.values())
