"""Clinical and map tables: TCGA BCR Biotab patient table, external CSV labels, TMA array maps."""

from __future__ import annotations

import csv
import uuid
from pathlib import Path

import numpy as np

from fpstore.synth import _biotab_header as biotab
from fpstore.synth.labels import NOT_AVAILABLE, Recorded

BIOTAB_NAME = "nationwidechildrens.org_clinical_patient_brca.txt"
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def new_uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4)).upper()


def tcga_barcode(tss: str, rng: np.random.Generator) -> str:
    """TCGA-<tissue source site>-<4 alphanumerics>, the patient part of a TCGA barcode."""
    return f"TCGA-{tss}-" + "".join(_ALNUM[i] for i in rng.integers(0, len(_ALNUM), 4))


def dx_slide_name(barcode: str, rng: np.random.Generator) -> str:
    """A GDC diagnostic slide file name: <barcode>-01Z-00-DX1.<UUID>.svs."""
    return f"{barcode}-01Z-00-DX1.{new_uuid(rng)}.svs"


def _choice(rng, pairs):
    values, weights = zip(*pairs)
    return values[rng.choice(len(values), p=np.asarray(weights) / sum(weights))]


def biotab_row(barcode: str, recorded: Recorded, rng: np.random.Generator) -> dict[str, str]:
    """One patient of the Biotab table; columns the synthesis does not model are [Not Available]."""
    age = int(rng.normal(58, 13))
    row = {c: NOT_AVAILABLE for c in biotab.COLUMNS}
    row.update(
        {
            "bcr_patient_uuid": new_uuid(rng),
            "bcr_patient_barcode": barcode,
            "form_completion_date": f"20{rng.integers(10, 15)}-{rng.integers(1, 13)}-{rng.integers(1, 29)}",
            "prospective_collection": "NO",
            "retrospective_collection": "YES",
            "birth_days_to": str(-age * 365 - int(rng.integers(0, 365))),
            "gender": "FEMALE" if rng.random() > 0.011 else "MALE",
            "race": _choice(
                rng,
                [
                    ("WHITE", 758),
                    ("BLACK OR AFRICAN AMERICAN", 183),
                    (NOT_AVAILABLE, 93),
                    ("ASIAN", 61),
                ],
            ),
            "ethnicity": _choice(
                rng,
                [("NOT HISPANIC OR LATINO", 880), ("HISPANIC OR LATINO", 39), (NOT_AVAILABLE, 180)],
            ),
            "vital_status": "Dead" if rng.random() < 0.095 else "Alive",
            "age_at_diagnosis": str(age),
            "er_status_by_ihc": recorded.ER,
            "pr_status_by_ihc": recorded.PR,
            "her2_status_by_ihc": recorded.Her2,
        }
    )
    return row


def write_biotab(path: Path, rows: list[dict[str, str]]) -> None:
    """The patient table with GDC's three header rows (names, labels, CDE ids), tab-separated."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(biotab.COLUMNS)
        w.writerow(biotab.LABELS)
        w.writerow(biotab.CDE_IDS)
        for row in rows:
            w.writerow([row[c] for c in biotab.COLUMNS])


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({c: row[c] for c in columns})
