"""A cohort registered for benchmark stores that write fingerprints by hand: the store
reads fingerprints only of a cohort it has (slides and labels tables)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def register_cohort(root: Path, name: str, slide_patients: dict[str, str]) -> None:
    """Write cohort ``name`` of the slides ``{slide_id: patient_id}`` into the store at
    ``root`` (paths that do not exist: benchmarks never read these slides' pixels)."""
    from fpstore.store.cohorts import write_cohort
    from fpstore.store.schema import LABELS, SLIDES

    slides = pa.table(
        {
            "slide_id": list(slide_patients),
            "patient_id": list(slide_patients.values()),
            "path": [f"/nowhere/{s}.svs" for s in slide_patients],
            "site": ["A"] * len(slide_patients),
            "mpp_override": [None] * len(slide_patients),
        },
        schema=SLIDES,
    )
    patients = sorted(set(slide_patients.values()))
    labels = pa.table(
        {
            "patient_id": patients,
            "marker": ["ER"] * len(patients),
            "status": [i % 2 for i in range(len(patients))],
            "raw_value": ["x"] * len(patients),
            "site": ["A"] * len(patients),
        },
        schema=LABELS,
    )
    write_cohort(root, name, slides, labels, {"name": name})
