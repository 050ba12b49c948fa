"""A tiny hand-made store for the classify tests, written with pyarrow and the store's schemas."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fpstore.store.schema import LABELS, SLIDES, TISSUE, file_metadata, fingerprint_schema, patch_id
from tests._classify_bags import make_bags

DIM = 8


def _write(table, path: Path, name: str, **metadata):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(file_metadata(name, **metadata)), path)


def add_cohort(
    store: Path,
    cohort: str,
    n: int,
    seed: int,
    tissue: bool,
    encoders=("enc",),
    metadata: dict | None = None,
    labelled: bool = True,
    her2: bool = False,
    slide_path: str | None = None,
    slide_y: int = 0,
    dims: dict | None = None,
):
    """n patients (one slide each, 8 patches); ER planted in epithelium, PR without signal.

    Patient 0 has no ER label (missing), patient 1 no fingerprints, patient 2 no epithelium.
    ``metadata``: extraction settings the fingerprint files carry (encoder_hash, precision,
    ...); ``labelled=False``: no status for any patient; ``her2``: Her2 labels as ER's;
    ``slide_path``: a real slide every slide points at (patches in the row at ``slide_y`` px).
    ``dims``: encoder -> dimension, the DIM-d features sent there by a fixed random projection
    (the same for every cohort), as a foundation model's wider vectors would carry them.
    """
    bags, y = make_bags(n_patients=n, n_patches=8, dim=DIM, seed=seed, n_sites=6)
    _, y_null = make_bags(n_patients=n, n_patches=8, dim=DIM, seed=seed + 100, signal=False)
    ids = np.array([f"{cohort}-{p}" for p in bags.patient_ids])
    tissue_types = bags.tissue.copy()
    tissue_types[bags.bag_index == 2] = "stroma"
    folder = store / "cohorts" / cohort
    slides = [
        {
            "slide_id": f"{p}-S",
            "patient_id": p,
            "path": slide_path or f"/nowhere/{p}.svs",
            "site": s,
            "mpp_override": None,
        }
        for p, s in zip(ids, bags.sites)
    ]
    _write(pa.Table.from_pylist(slides, schema=SLIDES), folder / "slides.parquet", "slides")
    labels = []
    for i, (p, s) in enumerate(zip(ids, bags.sites)):
        labels.append(
            {
                "patient_id": p,
                "marker": "ER",
                "status": None if i == 0 or not labelled else int(y[i]),
                "raw_value": "x",
                "site": s,
            }
        )
        if her2:
            labels.append({**labels[-1], "marker": "Her2"})
        labels.append(
            {
                "patient_id": p,
                "marker": "PR",
                "status": int(y_null[i]) if labelled else None,
                "raw_value": "x",
                "site": s,
            }
        )
    _write(pa.Table.from_pylist(labels, schema=LABELS), folder / "labels.parquet", "labels")
    (folder / "cohort.json").write_text(json.dumps({"name": cohort}))
    for e, encoder in enumerate(encoders):
        dim = (dims or {}).get(encoder, DIM)
        schema = fingerprint_schema(dim)
        projection = np.random.default_rng(dim).normal(size=(DIM, dim)) if dim != DIM else None
        for i, p in enumerate(ids):
            if i == 1:
                continue
            rows = np.flatnonzero(bags.bag_index == i)
            slide = f"{p}-S"
            pids = [patch_id(slide, 224 * k, slide_y, 224) for k in range(len(rows))]
            columns = {
                "patient_id": [p] * len(rows),
                "slide_id": [slide] * len(rows),
                "patch_id": pids,
                "site": [bags.sites[i]] * len(rows),
                "x": [224 * k for k in range(len(rows))],
                "y": [slide_y] * len(rows),
                "size_px": [224.0] * len(rows),
                "x_um": [112.0 * k for k in range(len(rows))],
                "y_um": [slide_y / 2.0] * len(rows),
                "patch_um": [112.0] * len(rows),
                "out_px": [224] * len(rows),
                "tissue_fraction": [1.0] * len(rows),
            }
            vectors = bags.features[rows] * (1 + e)
            if projection is not None:
                vectors = (vectors @ projection).astype(np.float32)
            columns["fingerprint"] = pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.ravel()), dim
            )
            _write(
                pa.table(columns, schema=schema),
                store
                / "fingerprints"
                / f"encoder={encoder}"
                / f"cohort={cohort}"
                / f"{slide}.parquet",
                "fingerprints",
                **(metadata or {}),
            )
            if tissue and e == 0:
                t = tissue_types[rows]
                table = pa.table(
                    {
                        "slide_id": [slide] * len(rows),
                        "patch_id": pids,
                        "tissue_type": t,
                        **{
                            f"p_{k}": [0.25] * len(rows)
                            for k in ("background", "epithelium", "stroma", "fat")
                        },
                        "method": ["rules"] * len(rows),
                    },
                    schema=TISSUE,
                )
                _write(table, store / "tissue" / f"cohort={cohort}" / f"{slide}.parquet", "tissue")
