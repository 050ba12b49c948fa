"""Writing one slide's result: its fingerprint file, then its status JSON (both engines)."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass

import numpy as np

from fpstore.config import PatchSpec
from fpstore.encoders.base import Preprocessing
from fpstore.errors import FpstoreError
from fpstore.extract.config import SlideResult
from fpstore.extract.plan import SlidePlan
from fpstore.store.fingerprints import (
    fingerprint_table,
    patch_keys_table,
    write_fingerprints,
    write_status,
)
from fpstore.store.schema import file_metadata


@dataclass(frozen=True)
class EncoderInfo:
    """What the writers need of an encoder, without its model (cheap to ship to workers)."""

    id: str
    hash: str
    weights_hash: str
    dim: int
    preprocessing: Preprocessing
    spec: str = "{}"  # JSON: how to build the encoder again (Encoder.spec)

    @classmethod
    def of(cls, encoder) -> EncoderInfo:
        return cls(
            encoder.id,
            encoder.hash,
            encoder.weights_hash,
            encoder.dim,
            encoder.preprocessing,
            json.dumps(encoder.spec, sort_keys=True),
        )


def slide_file(
    plan: SlidePlan, spec: PatchSpec, encoder: EncoderInfo, key: dict, cohort: str, vectors
):
    """(table, file metadata) of one slide's fingerprint file."""
    keys = plan.keys
    table = fingerprint_table(
        patch_keys_table(
            plan.slide.patient_id,
            plan.slide_id,
            plan.slide.site,
            keys.column("x").to_numpy(),
            keys.column("y").to_numpy(),
            plan.size_px,
            plan.mpp,
            spec.patch_um,
            spec.out_px,
            keys.column("tissue_fraction").to_numpy(),
        ),
        vectors,
        encoder.dim,
    )
    metadata = file_metadata(
        "fingerprints",
        **key,
        cohort=cohort,
        slide_id=plan.slide_id,
        weights_hash=encoder.weights_hash,
        patch_um=spec.patch_um,
        out_px=spec.out_px,
        n_patches=len(keys),
        preprocessing=json.dumps(encoder.preprocessing.to_dict()),
        encoder_spec=encoder.spec,
    )
    return table, metadata


def write_slide(
    store,
    cohort: str,
    plan: SlidePlan,
    spec: PatchSpec,
    encoder: EncoderInfo,
    key: dict,
    vectors: np.ndarray,
    started: float,
) -> SlideResult:
    """Write the slide's file and status; a failure to write fails the slide, not the run
    (a full disk fails every slide after it, each named)."""
    try:
        table, metadata = slide_file(plan, spec, encoder, key, cohort, vectors)
        write_fingerprints(store, encoder.id, cohort, plan.slide_id, table, metadata)
        seconds = max(0.0, time.time() - started)
        n = len(plan.keys)
        write_status(store, encoder.id, encoder.hash, cohort, plan.slide_id, "ok", "", n, seconds)
        return SlideResult(plan.slide_id, "ok", n, round(seconds, 3))
    except (FpstoreError, OSError) as error:
        return record_failure(store, cohort, encoder, plan.slide_id, _one_line(error))


def record_failure(store, cohort: str, encoder: EncoderInfo, slide_id: str, error: str):
    """A failed slide's result, and its status when the status can still be written."""
    with contextlib.suppress(OSError):  # the disk that failed the slide may refuse it too
        write_status(store, encoder.id, encoder.hash, cohort, slide_id, "failed", error)
    return SlideResult(slide_id, "failed", error=error)


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f" writing {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)
