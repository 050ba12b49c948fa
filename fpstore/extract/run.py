"""``extract``: a cohort's slides -> one fingerprint Parquet file per slide and encoder.

The run, whatever the engine: read the cohort, resolve the precision ('auto': what this
device runs fastest at fp32's fingerprints, printed and stored with each file), build the
encoder and the settings a stored file must carry (``resume_key``), sort the slides into
done / to do / made with other settings (refused unless ``force``), hand the slides to do to
the engine (``LocalEngine`` in this process, ``RayEngine`` on a cluster), which claims, plans
(tissue masks remembered in the store), encodes and writes them, then wait for the slides
other processes held and take over those they left unfinished. A slide that fails is
recorded (status ``failed`` + error) and the run goes on; the summary names every slide the
run could not confirm.

An engine has ``check_store(layout)``, ``device(config)``, ``precision(config)``,
``prepare(encoder, config, calibration)``, ``run(job, work, claims) -> (results, int8
agreement)`` (``job``: the run's settings, an ``ExtractJob``) and the attributes
``first_encoded`` (perf_counter time of the first encoded batch, or None) and ``decode``.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from fpstore.config import PatchSpec
from fpstore.errors import ConfigError, StoreError
from fpstore.extract.claims import Claims
from fpstore.extract.config import ExtractConfig, ExtractSummary, SlideResult
from fpstore.extract.job import ExtractJob
from fpstore.extract.plan import SlideWork, calibration_set, read_calibration, resume_key
from fpstore.extract.write import EncoderInfo
from fpstore.store.cohorts import cohort_lock, read_cohort
from fpstore.store.fingerprints import stored_state
from fpstore.store.layout import StoreLayout, check_partition_value


def extract(
    store,
    cohort: str,
    config: ExtractConfig = ExtractConfig(),
    progress: bool = True,
    engine=None,
    encoder=None,
) -> ExtractSummary:
    """Extract the fingerprints of every slide of ``cohort`` not yet in the store.

    ``engine``: None runs in this process (``LocalEngine``); a ``RayEngine``
    (fpstore.extract.ray) plans and extracts on a Ray cluster with the same rules.
    ``encoder``: the encoder ``config`` names, already built (``fpstore predict`` builds it
    to check its hash first); None builds it here.
    """
    from fpstore.extract.local import LocalEngine

    started = time.perf_counter()
    layout = StoreLayout.of(store)
    engine = engine or LocalEngine()
    engine.check_store(layout)
    with cohort_lock(layout, cohort) as lock:
        # Shared: runs of one cohort share it; `cohort add --force` waits for none of them.
        if not lock.acquire(shared=True):
            raise StoreError(
                f"cohort {cohort!r} is being re-added (`fpstore cohort add --force`) by "
                f"{lock.holder() or 'another process'}; rerun when it has finished"
            )
        return _extract(layout, cohort, config, progress, engine, encoder, started)


def _extract(layout, cohort, config, progress, engine, encoder, started) -> ExtractSummary:
    slides = read_cohort(layout, cohort).slide_records()
    device = engine.device(config)
    choice = engine.precision(config)
    config = dataclasses.replace(config, precision=choice.precision)  # what runs and resumes
    if progress:
        print(f"precision {choice.describe()}", file=sys.stderr, flush=True)
    if encoder is None:
        encoder = config.build_encoder()
    check_partition_value("encoder id", encoder.id)
    key = resume_key(encoder, config)
    spec = PatchSpec(
        encoder.preprocessing.patch_um, encoder.preprocessing.out_px, config.min_tissue
    )
    calibration = None
    if config.precision == "int8":
        _check_int8_settings(device, config)
        calibration, key["calibration"] = calibration_set(slides, spec, layout)
    notes = []
    stored = _stored_states(layout, encoder.id, cohort, slides, key)
    if config.patches is not None and _all_patches_stored(stored.values()):
        # One all-patch extraction serves every sample size: classify draws its own.
        config = dataclasses.replace(config, patches=None)
        key["patches"] = "all"
        stored = _stored_states(layout, encoder.id, cohort, slides, key)
        notes.append(
            "the store holds every tissue patch of this cohort and encoder: reusing them "
            "(`classify --patches N` draws N per patient); missing slides get all patches too"
        )
    info = EncoderInfo.of(encoder, choice.reason)
    job = ExtractJob(layout, cohort, encoder, info, key, spec, config, progress)
    results, pending = _sort_slides(job, slides, stored)
    done, loop_seconds, agreement = _run_engine(
        engine, job, _slide_work(slides, pending), calibration
    )
    results.update(done)
    ordered = [results[s.slide_id] for s in slides if s.slide_id in results]
    return ExtractSummary(
        cohort,
        encoder.id,
        encoder.hash,
        device,
        config.precision,
        ordered,
        time.perf_counter() - started,
        loop_seconds=loop_seconds,
        int8_agreement=agreement,
        notes=notes,
        precision_reason=choice.reason,
        decode=engine.decode,
        first_patch_seconds=None
        if engine.first_encoded is None
        else engine.first_encoded - started,
    )


def _check_int8_settings(device, config: ExtractConfig) -> None:
    if str(device) != "cpu" or config.compile:
        raise ConfigError(
            f"--precision int8 is a CPU path without --compile (encoders on {device}, "
            f"compile {config.compile}); add --device cpu and drop --compile, or use "
            "--precision bf16 on GPUs"
        )


def _sort_slides(job: ExtractJob, slides, stored: dict) -> tuple[dict[str, SlideResult], list]:
    """(the results of the slides settled without extracting them, the slides to extract);
    refuses a store whose files of these slides were made with other settings (no --force)."""
    layout, encoder, cohort = job.layout, job.info.id, job.cohort
    results: dict[str, SlideResult] = {}
    pending, mismatched = [], {}
    for slide in slides:
        if slide.patient_id is None:
            results[slide.slide_id] = SlideResult(slide.slide_id, "no-patient")
            continue
        state = stored[slide.slide_id]
        if (
            state.state in ("missing", "corrupt")
            or (state.state == "other-settings" and job.config.force)
            or (state.state == "match" and not _has_status(layout, encoder, cohort, slide))
        ):
            pending.append(slide)
        elif state.state == "other-settings":
            mismatched[slide.slide_id] = state
        elif state.state == "foreign":
            path = layout.fingerprint_file(encoder, cohort, slide.slide_id)
            results[slide.slide_id] = SlideResult(
                slide.slide_id, "failed", error=f"{path}: {state.describe()}; move it away"
            )
        else:
            results[slide.slide_id] = SlideResult(slide.slide_id, "skipped")
    if mismatched:
        raise StoreError(_explain_mismatch(layout, mismatched))
    return results, pending


def _slide_work(slides, pending) -> list[SlideWork]:
    """Sampling pools a patient's slides: each slide to do travels with all of its patient's."""
    patients: dict[str, list] = {}
    for slide in slides:
        patients.setdefault(slide.patient_id, []).append(slide)
    return [SlideWork(s, tuple(patients[s.patient_id])) for s in pending]


def _run_engine(engine, job: ExtractJob, work: list[SlideWork], calibration):
    """Hand the work to the engine until no slide is left deferred: (results, seconds from
    the first claim to the last file, int8 agreement)."""
    if not work:
        return {}, 0.0, None
    config = job.config
    pixels = read_calibration(calibration, job.spec) if config.precision == "int8" else None
    engine.prepare(job.encoder, config, pixels)
    claims = Claims(job.layout, job.info.id, job.cohort, job.key, config.force)
    results: dict[str, SlideResult] = {}
    loop_started = time.perf_counter()
    while work:
        done, agreement = engine.run(job, work, claims)
        results.update(done)
        # Slides another process held: once free, done there, or ours to take over.
        work = claims.wait_for_deferred(job.progress) if claims.deferred else []
    results.update(claims.decided)
    return results, time.perf_counter() - loop_started, agreement


def _has_status(layout, encoder: str, cohort: str, slide) -> bool:
    """A slide is done once its status is written too: a writer killed between the two
    left a whole file but no status (and maybe its temporary file): the slide is redone."""
    return layout.status_file(encoder, cohort, slide.slide_id).is_file()


def _stored_states(layout, encoder: str, cohort: str, slides, key: dict) -> dict:
    return {
        s.slide_id: stored_state(layout.fingerprint_file(encoder, cohort, s.slide_id), key)
        for s in slides
        if s.patient_id is not None
    }


def _all_patches_stored(states) -> bool:
    """True when some slides are stored, and every stored one differs from the wanted
    settings only in holding all its patches."""
    stored = [s for s in states if s.state != "missing"]
    return bool(stored) and all(
        s.state == "other-settings" and set(s.diff) == {"patches"} and s.diff["patches"][0] == "all"
        for s in stored
    )


def _explain_mismatch(layout: StoreLayout, mismatched: dict) -> str:
    first, stored = next(iter(mismatched.items()))
    return (
        f"{len(mismatched)} slide(s) already have fingerprints in {str(layout)!r} made with "
        f"other settings (e.g. {first}: {stored.describe()}); refusing to mix them. Pass "
        "--force to re-extract them, or rerun with the settings they were made with."
    )
