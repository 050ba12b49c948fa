"""Extraction on a Ray cluster: ``fpstore extract --engine ray [--address ADDR]``.

The driver (the process that runs ``extract``) keeps the local engine's rules: the same
cohort, resume keys, patient-pooled sampling, per-slide claims (local stores), Parquet writer
and status files (``fpstore.extract.run``). Ray replaces the process-local loop:

    plan      one Ray task per slide (tissue mask, remembered in the store, + patch grid, CPU);
              sampling on the driver
    read      ``_read_chunk`` tasks (CPU): up to ``read_chunk`` patches of one slide -> uint8
              pixels in Ray's object store (shared memory on a node, no copy for numpy)
    encode    ``_Encoder`` actors, one per GPU (or CPU actors): the model is built once by the
              driver, shipped through the object store (worker nodes need no checkpoint file),
              and fed one chunk per call; batches of ``batch_size`` on the device
    write     ``_write_slide`` task (CPU): the slide's vectors -> its Parquet file, written by
              exactly one task (temp + rename locally, one published PUT on object storage),
              then its status JSON

Why Ray Core and not Ray Data: the unit of commit, failure and resume is a slide (one file,
one status), so a per-slide task graph maps one to one; Ray Data's streaming blocks would have
to be regrouped by slide before writing. Fault tolerance: a task whose worker dies is re-run
(``max_retries``), a dead encoder actor is restarted and its calls retried; a slide whose
retries run out, or whose reader raises (a bad slide: no retry), is recorded ``failed`` and
the run goes on. Every write goes to the slide's one deterministic key, so a retried slide
replaces its own file and can never appear twice.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from fpstore.config import check_range
from fpstore.encoders.base import PrecisionChoice, resolve_precision
from fpstore.errors import ConfigError, EncoderError, FpstoreError
from fpstore.extract.claims import Claims
from fpstore.extract.config import ExtractConfig, SlideResult
from fpstore.extract.job import ExtractJob
from fpstore.extract.plan import SlidePlan, SlideWork, plan_slides
from fpstore.extract.write import EncoderInfo, record_failure, write_slide


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide to run. ``address``: None starts a Ray instance on this machine (and
    stops it at the end); "auto" joins the cluster ``ray start`` made here; "HOST:PORT" or
    "ray://HOST:10001" joins a remote one."""

    address: str | None = None
    encoders: int = 0  # encoder actors; 0: one per GPU of the cluster, or 1 without GPUs
    encoder_cpus: float = 1.0  # CPUs each encoder actor holds (its torch threads on CPU)
    reader_cpus: float = 1.0  # CPUs each read task holds
    read_chunk: int = 256  # patches per read task (and per encoder call)
    max_retries: int = 2  # re-runs of a task whose worker died; restarts of an encoder actor
    slides_in_flight: int = 0  # 0: 2 per CPU of the cluster (bounds object-store memory)
    num_cpus: int | None = None  # a new local instance only: CPUs it may use (None: all)
    num_gpus: int | None = None

    def __post_init__(self):
        check_range("RayConfig", "encoders", self.encoders, 0, 4096)
        check_range("RayConfig", "encoder_cpus", self.encoder_cpus, 0.0, 1024.0)
        check_range("RayConfig", "reader_cpus", self.reader_cpus, 0.01, 1024.0)
        check_range("RayConfig", "read_chunk", self.read_chunk, 1, 65536)
        check_range("RayConfig", "max_retries", self.max_retries, 0, 100)
        check_range("RayConfig", "slides_in_flight", self.slides_in_flight, 0, 100000)
        if self.address is None:
            return
        if not self.address.strip():
            raise ConfigError(
                "RayConfig.address is empty; give 'auto', HOST:PORT or "
                "ray://HOST:10001, or leave it out to start Ray here"
            )
        if self.num_cpus is not None or self.num_gpus is not None:
            raise ConfigError(
                f"RayConfig: num_cpus/num_gpus size a new local Ray instance; the "
                f"cluster at {self.address!r} has its own resources"
            )


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise FpstoreError("--engine ray needs Ray: pip install 'fpstore[ray]'") from error
    return ray


class RayEngine:
    """Plans and extracts on Ray; pass it to ``extract(..., engine=RayEngine())``.

    Use as a context manager (or call ``close``): a Ray instance it started is stopped.
    """

    def __init__(self, config: RayConfig = RayConfig()):
        self.config = config
        self.ray = _import_ray()
        self._started = False
        self.calibration = None
        self.first_encoded = None  # the driver sees slides finish, not batches
        self.decode = "JPEG tiles decoded by the Ray read tasks (CPU)"
        if not self.ray.is_initialized():
            kwargs = {
                "include_dashboard": False,
                "configure_logging": True,
                "logging_level": "warning",
                "log_to_driver": False,
            }
            if config.address is None:
                kwargs.update(num_cpus=config.num_cpus, num_gpus=config.num_gpus)
            try:
                self.ray.init(address=config.address, **kwargs)
            except ConnectionError as error:
                raise FpstoreError(
                    f"cannot join the Ray cluster at {config.address!r}: {error}; "
                    "start it with `ray start --head` or leave --address out to "
                    "run on this machine"
                ) from error
            except Exception as error:  # Ray raises a bare Exception when its node times out
                if config.address is not None or "timed out during startup" not in str(error):
                    raise
                raise FpstoreError(
                    f"Ray could not start on this machine ({error}). On a busy machine its "
                    "dashboard agent can miss the raylet's 15 s start-up window: retry when the "
                    "machine is quieter, or start Ray yourself (`ray start --head`) and pass "
                    "--address auto"
                ) from error
            self._started = True
        resources = self.ray.cluster_resources()
        self.cpus, self.gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the engine interface extract() calls (LocalEngine is the peer) --
    def check_store(self, layout) -> None:
        """Any store: local folders (with per-slide claims) and object storage."""

    def device(self, config: ExtractConfig) -> str:
        """The encoders' device: a cluster with GPUs encodes on them unless --device cpu."""
        if config.device == "cuda" and not self.gpus:
            raise EncoderError(
                "--device cuda: the Ray cluster has no GPU; use --device cpu or "
                "auto, or add GPU nodes"
            )
        return "cuda" if self.gpus and config.device != "cpu" else "cpu"

    def precision(self, config: ExtractConfig) -> PrecisionChoice:
        """The precision resolved where the encoders run: on a GPU of the cluster, or on a
        CPU node for CPU actors (the driver may be neither)."""
        device = self.device(config)
        probe = self.ray.remote(resolve_precision).options(
            num_gpus=1 if device == "cuda" else 0, num_cpus=self.config.reader_cpus
        )
        return self.ray.get(probe.remote(config.precision, device))

    def map(self, fn, *iterables):
        """``map(fn, ...)`` as Ray tasks, results in order (the planning of every slide)."""
        task = self.ray.remote(_call).options(
            num_cpus=self.config.reader_cpus, max_retries=self.config.max_retries
        )
        refs = [task.remote(fn, *args) for args in zip(*iterables)]
        return (self.ray.get(ref) for ref in refs)

    def prepare(self, encoder, config: ExtractConfig, calibration=None) -> None:
        """The actors prepare their own copies; int8 actors calibrate on ``calibration``
        (uint8 NHWC), the same patches for every actor, so that all build one quantized
        model."""
        self.calibration = calibration

    def run(
        self, job: ExtractJob, work: list[SlideWork], claims: Claims
    ) -> tuple[dict[str, SlideResult], dict | None]:
        """Plan the slides of ``work`` (one task per slide of their patients), then extract
        them on the cluster: (one SlideResult per slide, the int8 agreement with fp32)."""
        slides = list({s.slide_id: s for w in work for s in w.patient_slides}.values())
        failed: dict[str, str] = {}
        config, store = job.config, str(job.layout)
        plans = plan_slides(
            slides, job.spec, config.patches, config.seed, failed, store, job.progress, self.map
        )
        results = {}
        for item in work:
            if item.slide_id in failed:
                error = failed[item.slide_id]
                results[item.slide_id] = record_failure(
                    job.layout, job.cohort, job.info, item.slide_id, error
                )
        todo = [(item, plans[item.slide_id]) for item in work if item.slide_id in plans]
        run = _Run(self, job, claims)
        results.update(run.run(todo))
        return results, run.agreement


def _call(fn, *args):
    return fn(*args)


def _cause(error) -> str:
    """A Ray error as the one line the local engine would record."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}"


# ---------------------------------------------------------------- worker side

_OPEN: dict = {}  # a few open slides per worker process: chunks of one slide come together


def _read_chunk(path: str, mpp: float, xy: np.ndarray, size_px: float, out_px: int) -> np.ndarray:
    import cv2

    from fpstore.slides.slide import open_slide

    cv2.setNumThreads(1)  # one task per CPU: the task is the unit of parallelism
    if path not in _OPEN:
        if len(_OPEN) >= 4:
            _OPEN.pop(next(iter(_OPEN))).close()
        _OPEN[path] = open_slide(path, mpp=mpp)
    return _OPEN[path].read_patches(xy, size_px, out_px)


class _Encoder:
    """One model on one device; ``encode(uint8 [N, H, W, 3]) -> float32 [N, dim]``."""

    def __init__(self, encoder, device: str, config: ExtractConfig, threads: int, calibration=None):
        import torch

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.encoder = encoder.prepare(
            device, config.precision, config.channels_last, config.compile
        )
        if calibration is not None:
            self.encoder.calibrate(torch.from_numpy(np.array(calibration)))
        self.batch_size = config.resolved_batch_size(device)
        self.pad = config.compile  # one shape: a compiled model recompiles for a new one

    def agreement(self) -> dict | None:
        return self.encoder.calibration

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        out = np.empty((len(pixels), self.encoder.dim), np.float32)
        for start in range(0, len(pixels), self.batch_size):
            part = pixels[start : start + self.batch_size]
            n = len(part)
            # Object-store arrays are read-only: copy the batch once into a writable tensor,
            # zero-padded to the batch size when compiled, as the local engine does.
            if self.pad:
                batch = np.zeros((self.batch_size, *part.shape[1:]), part.dtype)
                batch[:n] = part
            else:
                batch = np.array(part)
            out[start : start + n] = self.encoder.encode(torch.from_numpy(batch))[:n].cpu().numpy()
        return out

    def pid(self) -> int:
        return os.getpid()


def _write_slide(
    store: str,
    cohort: str,
    plan: SlidePlan,
    spec,
    info: EncoderInfo,
    key: dict,
    submitted: float,
    *vectors: np.ndarray,
) -> SlideResult:
    stack = np.concatenate(vectors) if vectors else np.zeros((0, info.dim), np.float32)
    return write_slide(store, cohort, plan, spec, info, key, stack, submitted)


# ---------------------------------------------------------------- driver side


class _Run:
    def __init__(self, engine: RayEngine, job: ExtractJob, claims: Claims):
        self.engine, self.ray, self.rc = engine, engine.ray, engine.config
        self.job, self.claims = job, claims
        self.results: dict[str, SlideResult] = {}
        calibration = engine.calibration
        self.calibration = None if calibration is None else calibration.numpy()
        self.agreement = None

    def _actors(self) -> list:
        device = self.engine.device(self.job.config)
        n = self.rc.encoders or (int(self.engine.gpus) if device == "cuda" else 1)
        if n * self.rc.encoder_cpus + self.rc.reader_cpus > self.engine.cpus:
            # Actors hold their CPUs for the whole run: readers would wait for ever.
            raise ConfigError(
                f"{n} encoder actor(s) of {self.rc.encoder_cpus} CPU each leave less than "
                f"{self.rc.reader_cpus} CPU for the readers on a cluster of {self.engine.cpus:g} "
                "CPUs; lower RayConfig.encoders or encoder_cpus, or add CPUs"
            )
        actor = self.ray.remote(_Encoder).options(
            num_gpus=1 if device == "cuda" else 0,
            num_cpus=self.rc.encoder_cpus,
            max_restarts=self.rc.max_retries,
            max_task_retries=self.rc.max_retries,
        )
        # Once, whatever the number of actors; kept referenced so that a restart can rebuild.
        self.model = self.ray.put(self.job.encoder)
        self.pixels = None if self.calibration is None else self.ray.put(self.calibration)
        threads = max(1, int(self.rc.encoder_cpus))
        return [
            actor.remote(self.model, device, self.job.config, threads, self.pixels)
            for _ in range(n)
        ]

    def run(self, plans: list[tuple[SlideWork, SlidePlan]]) -> dict[str, SlideResult]:
        """Extract the planned slides this run can claim (claims defer the work items)."""
        from tqdm import tqdm

        read = self.ray.remote(_read_chunk).options(
            num_cpus=self.rc.reader_cpus, max_retries=self.rc.max_retries
        )
        write = self.ray.remote(_write_slide).options(num_cpus=0, max_retries=self.rc.max_retries)
        in_flight = self.rc.slides_in_flight or max(4, int(2 * self.engine.cpus))
        actors = self._actors()
        load = [0] * len(actors)  # chunks queued per actor: the least loaded gets the next
        running: dict = {}  # write ref -> (plan, claim, [actor index per chunk])
        todo = deque(plans)
        bar = tqdm(
            total=len(plans),
            desc=f"extract {self.job.info.id} (ray)",
            unit="slide",
            disable=not self.job.progress,
            dynamic_ncols=True,
        )
        encoded, t0 = 0, time.perf_counter()
        try:
            if (
                self.calibration is not None
            ):  # inside the try: a failed calibration still frees the actors
                self.agreement = self.ray.get(actors[0].agreement.remote())
            while todo or running:
                while todo and len(running) < in_flight:
                    item, plan = todo.popleft()
                    claim = self.claims.take(item)
                    if claim is None:  # deferred, or settled without us (Claims.decided)
                        bar.update(1)
                        continue
                    chunks, used = [], []
                    xy = np.stack(
                        [plan.keys.column("x").to_numpy(), plan.keys.column("y").to_numpy()], 1
                    )
                    for start in range(0, len(xy), self.rc.read_chunk):
                        pixels = read.remote(
                            plan.slide.path,
                            plan.mpp,
                            xy[start : start + self.rc.read_chunk],
                            plan.size_px,
                            self.job.spec.out_px,
                        )
                        a = load.index(min(load))
                        load[a] += 1
                        used.append(a)
                        chunks.append(actors[a].encode.remote(pixels))
                    ref = write.remote(
                        str(self.job.layout),
                        self.job.cohort,
                        plan,
                        self.job.spec,
                        self.job.info,
                        self.job.key,
                        time.time(),
                        *chunks,
                    )
                    running[ref] = (plan, claim, used)
                done, _ = self.ray.wait(list(running), num_returns=1)
                for ref in done:
                    plan, claim, used = running.pop(ref)
                    for a in used:
                        load[a] -= 1
                    result = self._collect(ref, plan, claim)
                    encoded += result.n_patches
                    bar.update(1)
                    rate = encoded / max(1e-9, time.perf_counter() - t0)
                    bar.set_postfix_str(f"{encoded} patches, {rate:.1f} patches/s", refresh=False)
        finally:
            for ref, (_, claim, _) in running.items():  # interrupted: stop the work, free claims
                self.ray.cancel(ref, force=True)
                claim.release()
            for actor in actors:
                self.ray.kill(actor)
            bar.close()
        return self.results

    def _collect(self, ref, plan: SlidePlan, claim) -> SlideResult:
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayError as error:
            result = record_failure(
                self.job.layout, self.job.cohort, self.job.info, plan.slide_id, _cause(error)
            )
        finally:
            claim.release()
        self.results[plan.slide_id] = result
        return result


def extract_on_ray(
    store,
    cohort: str,
    config: ExtractConfig = ExtractConfig(),
    ray_config: RayConfig = RayConfig(),
    progress: bool = True,
):
    """``extract`` with a RayEngine that lives for this one run."""
    from fpstore.extract.run import extract

    with RayEngine(ray_config) as engine:
        return extract(store, cohort, config, progress, engine=engine)
