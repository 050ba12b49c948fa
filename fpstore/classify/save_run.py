"""Saving classifier runs: ``store/runs/<run_id>/{patients.parquet, patches.parquet, run.json}``.

A run folder appears whole, in one rename, with its saved model written just before it
(``fpstore.store.runs.write_run``). run.json carries the config (one shape for every kind of run,
see ``fpstore.store.runs``), the score range, the metrics, the per-fold table, the ROC points
and the fold assignment of every patient.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

import fpstore
from fpstore.classify.protocol import NO_LABEL, Predictions
from fpstore.errors import ClassifyError
from fpstore.store.runs import write_run
from fpstore.store.schema import PATCH_ATTENTION, PATCH_PREDICTIONS, PATIENT_PREDICTIONS


def new_run_id(config: dict) -> str:
    """<UTC time>-<marker>-<method>-<hash of the config>: sortable, readable, unique per config."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{stamp}-{config.get('marker', 'run')}-{config.get('method', 'model')}-{digest}"


def patient_table(run_id: str, cohort: str, role: str, p: Predictions) -> pa.Table:
    folds = [None if f < 0 else int(f) for f in p.folds]
    n = len(p.patient_ids)
    return pa.table(
        {
            "run_id": [run_id] * n,
            "cohort": [cohort] * n,
            "patient_id": p.patient_ids.tolist(),
            "fold": pa.array(folds, pa.int16()),
            "role": [role] * n,
            "label": pa.array(p.labels.astype(np.int8), mask=p.labels == NO_LABEL),
            "score": pa.array(p.scores.astype(np.float32)),
            "n_patches": pa.array(p.n_patches.astype(np.int32)),
        },
        schema=PATIENT_PREDICTIONS,
    )


def _per_patch(run_id: str, cohort: str, p: Predictions, folds, column: str, values, schema):
    """One row per patch: its keys, its fold (-1: null) and ``values`` as ``column``."""
    n = len(values)
    folds = [None if f < 0 else int(f) for f in folds]
    return pa.table(
        {
            "run_id": [run_id] * n,
            "cohort": [cohort] * n,
            "slide_id": pa.array(p.slide_ids, pa.string()),
            "patch_id": pa.array(p.patch_ids, pa.string()),
            "fold": pa.array(folds, pa.int16()),
            column: pa.array(values.astype(np.float32)),
        },
        schema=schema,
    )


def patch_table(run_id: str, cohort: str, p: Predictions) -> pa.Table | None:
    if p.patch_scores is None:
        return None
    if p.patch_folds is None:
        raise ClassifyError("predictions with patch scores need patch_folds (-1: no fold)")
    return _per_patch(run_id, cohort, p, p.patch_folds, "score", p.patch_scores, PATCH_PREDICTIONS)


def attention_table(run_id: str, cohort: str, p: Predictions) -> pa.Table | None:
    if p.patch_attention is None or p.patch_folds is None:
        return None
    return _per_patch(
        run_id, cohort, p, p.patch_folds, "attention", p.patch_attention, PATCH_ATTENTION
    )


def save_run(
    store,
    run_id: str,
    document: dict,
    predictions: list[tuple[str, str, Predictions]],
    model: Callable[[], object] | None = None,
) -> Path:
    """Write one run; ``predictions`` lists (cohort, role, Predictions) blocks (test, external,
    predict); ``model`` saves the run's model, before the run's commit."""
    patients = pa.concat_tables(patient_table(run_id, c, role, p) for c, role, p in predictions)
    patches = [t for c, _, p in predictions if (t := patch_table(run_id, c, p)) is not None]
    attention = [t for c, _, p in predictions if (t := attention_table(run_id, c, p)) is not None]
    document = {
        **document,
        "run_id": run_id,
        "fpstore_version": fpstore.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return write_run(
        store,
        run_id,
        document,
        patients,
        pa.concat_tables(patches) if patches else None,
        pa.concat_tables(attention) if attention else None,
        model,
    )
