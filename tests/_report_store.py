"""A tiny hand-made store for the report tests, written with pyarrow and the store's schemas.

Sixteen patients, one slide each; every slide points at the real CMU-1-Small-Region.svs
(tests/data/slides, 2220 x 2967 px at 0.499 um/px), so thumbnails and montage pixels are real.
Slide S00 has a score for every 224-px square: score = -1 at the left column rising linearly
to +1 at the right one; its tissue type cycles by row. Fingerprints (dim 16) come from four
planted clusters; run "mil-run" scores cluster 0 at +0.8 and cluster 1 at -0.8.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fpstore.store.schema import (
    LABELS,
    PATCH_PREDICTIONS,
    PATIENT_PREDICTIONS,
    SLIDES,
    TISSUE,
    file_metadata,
    fingerprint_schema,
    patch_id,
)

SLIDE = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"
WIDTH, HEIGHT, MPP = 2220, 2967, 0.499
STEP = 224  # 112 um at 0.499 um/px, rounded
N_COLS, N_ROWS = WIDTH // STEP, HEIGHT // STEP  # 9 x 13 whole squares
COHORT, ENCODER, DIM = "toy", "toy-enc", 16
TYPES = ("epithelium", "stroma", "fat", "background")
N_PATIENTS, FP_PER_SLIDE = 16, 25
CLUSTER_SCORE = {0: 0.8, 1: -0.8, 2: 0.0, 3: 0.05}


def grid_xy():
    cols, rows = np.meshgrid(np.arange(N_COLS), np.arange(N_ROWS))
    return cols.ravel() * STEP, rows.ravel() * STEP, cols.ravel(), rows.ravel()


def s00_score(col):
    return -1.0 + 2.0 * col / (N_COLS - 1)


def s00_type(row):
    return TYPES[row % len(TYPES)]


def _write(table: pa.Table, path: Path, name: str, **meta) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_all = dict(table.schema.metadata or {})
    meta_all.update(file_metadata(name, **meta))
    pq.write_table(table.replace_schema_metadata(meta_all), path)


def build_store(root: Path, dim: int = DIM) -> Path:
    """``dim``: the fingerprints' width (the DIM-d clusters sent there by a fixed random
    projection, as a foundation model's 1536 or 2560 dimensions would carry them)."""
    rng = np.random.default_rng(7)
    store = Path(root)
    patients = [f"P{i:02d}" for i in range(N_PATIENTS)]
    slides = [f"S{i:02d}" for i in range(N_PATIENTS)]
    sites = ["A" if i % 2 else "B" for i in range(N_PATIENTS)]
    status = [1 if i % 3 else 0 for i in range(N_PATIENTS)]  # 10 positive, 6 negative

    cohort_dir = store / "cohorts" / COHORT
    cohort_dir.mkdir(parents=True)
    (cohort_dir / "cohort.json").write_text(json.dumps({"name": COHORT}))
    _write(
        pa.Table.from_pylist(
            [
                {
                    "slide_id": s,
                    "patient_id": p,
                    "path": str(SLIDE),
                    "site": site,
                    "mpp_override": None,
                }
                for s, p, site in zip(slides, patients, sites)
            ],
            schema=SLIDES,
        ),
        cohort_dir / "slides.parquet",
        "slides",
    )
    labels = [
        {
            "patient_id": p,
            "marker": m,
            "status": st if m == "ER" else None,
            "raw_value": "x",
            "site": site,
        }
        for p, st, site in zip(patients, status, sites)
        for m in ("ER", "PR")
    ]
    _write(pa.Table.from_pylist(labels, schema=LABELS), cohort_dir / "labels.parquet", "labels")

    x_all, y_all, col_all, row_all = grid_xy()
    centres = rng.normal(size=(4, DIM)) * 6
    fp_rows, vectors, patch_rows = [], [], []
    for slide, patient, site in zip(slides, patients, sites):
        pick = rng.choice(len(x_all), FP_PER_SLIDE, replace=False)
        for j in pick:
            k = int(rng.integers(0, 4))
            pid = patch_id(slide, x_all[j], y_all[j], STEP)
            fp_rows.append(
                {
                    "patient_id": patient,
                    "slide_id": slide,
                    "patch_id": pid,
                    "site": site,
                    "x": int(x_all[j]),
                    "y": int(y_all[j]),
                    "size_px": float(STEP),
                    "x_um": x_all[j] * MPP,
                    "y_um": y_all[j] * MPP,
                    "patch_um": 112.0,
                    "out_px": 224,
                    "tissue_fraction": 1.0,
                }
            )
            vectors.append(centres[k] + rng.normal(size=DIM))
            if slide != "S00":
                patch_rows.append((slide, pid, CLUSTER_SCORE[k] + rng.normal() * 0.05))
    if dim != DIM:
        vectors = list(np.asarray(vectors) @ np.random.default_rng(dim).normal(size=(DIM, dim)))
    schema = fingerprint_schema(dim)
    for slide in slides:
        keep = [n for n, r in enumerate(fp_rows) if r["slide_id"] == slide]
        columns = {
            f.name: [fp_rows[n][f.name] for n in keep] for f in schema if f.name != "fingerprint"
        }
        flat = pa.array(np.asarray([vectors[n] for n in keep], np.float32).ravel())
        columns["fingerprint"] = pa.FixedSizeListArray.from_arrays(flat, dim)
        _write(
            pa.table(columns, schema=schema),
            store / "fingerprints" / f"encoder={ENCODER}" / f"cohort={COHORT}" / f"{slide}.parquet",
            "fingerprints",
            encoder=ENCODER,
        )
    # Slide S00: every square scored, for the heatmap.
    for x, y, col in zip(x_all, y_all, col_all):
        patch_rows.append(("S00", patch_id("S00", x, y, STEP), s00_score(col)))
    tissue = [
        {
            "slide_id": "S00",
            "patch_id": patch_id("S00", x, y, STEP),
            "tissue_type": s00_type(row),
            "p_background": 0.1,
            "p_epithelium": 0.6,
            "p_stroma": 0.2,
            "p_fat": 0.1,
            "method": "rules",
        }
        for x, y, row in zip(x_all, y_all, row_all)
    ]
    _write(
        pa.Table.from_pylist(tissue, schema=TISSUE),
        store / "tissue" / f"cohort={COHORT}" / "S00.parquet",
        "tissue",
    )

    for run_id, method, noise in (("mil-run", "mil", 1.0), ("logreg-run", "logreg", 1.5)):
        folder = store / "runs" / run_id
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(
            json.dumps(
                {
                    "run_id": run_id,
                    "kind": "classify",
                    "config": {
                        "cohort": COHORT,
                        "marker": "ER",
                        "method": method,
                        "encoder": ENCODER,
                        "pool": "all",
                    },
                    "score_range": [-1.0, 1.0] if method == "mil" else [0.0, 1.0],
                }
            )
        )
        signed = np.array(status) * 2 - 1
        score = np.tanh(0.6 * signed + rng.normal(size=N_PATIENTS) * noise)
        if method != "mil":
            score = (score + 1) / 2
        _write(
            pa.Table.from_pylist(
                [
                    {
                        "run_id": run_id,
                        "cohort": COHORT,
                        "patient_id": p,
                        "fold": i % 4,
                        "role": "test",
                        "label": st,
                        "score": float(s),
                        "n_patches": FP_PER_SLIDE,
                    }
                    for i, (p, st, s) in enumerate(zip(patients, status, score))
                ],
                schema=PATIENT_PREDICTIONS,
            ),
            folder / "patients.parquet",
            "patients",
        )
        if method == "mil":
            _write(
                pa.Table.from_pylist(
                    [
                        {
                            "run_id": run_id,
                            "cohort": COHORT,
                            "slide_id": s,
                            "patch_id": pid,
                            "fold": 0,
                            "score": float(v),
                        }
                        for s, pid, v in patch_rows
                    ],
                    schema=PATCH_PREDICTIONS,
                ),
                folder / "patches.parquet",
                "patches",
            )
    return store
