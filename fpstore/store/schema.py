"""The explicit, versioned Arrow schemas of the store.

Every Parquet file fpstore writes uses one of these schemas and carries
key-value metadata (``file_metadata``): the schema version, the fpstore version,
and per table the encoder id and the hash of its weights and preprocessing.
Bump SCHEMA_VERSION on any change to a column; readers refuse other versions.

Layout of a store folder (readable by DuckDB or any Parquet reader without fpstore):

    cohorts/<cohort>/slides.parquet        SLIDES: one row per slide of the cohort
    cohorts/<cohort>/labels.parquet        LABELS: one row per patient and marker
    fingerprints/encoder=<id>/cohort=<cohort>/<slide_id>.parquet   FINGERPRINTS
    tissue/cohort=<cohort>/<slide_id>.parquet                       TISSUE
    status/encoder=<id>/cohort=<cohort>/<slide_id>.json             per-slide extraction status
    runs/<run_id>/run.json, patients.parquet, patches.parquet       classifier runs
    runs/<run_id>/attention.parquet                                 attention per patch (abmil)
    models/classify/<model_id>/card.json, *.npz                     saved classifiers
"""

from __future__ import annotations

import pyarrow as pa

import fpstore

SCHEMA_VERSION = "1"
METADATA_PREFIX = "fpstore."

# Patch keys and coordinates, shared by every encoder. ``patch_id`` is
# "<slide_id>/<x>_<y>_<size_px>" so that the same square has the same id in every table.
PATCH_KEY_FIELDS = [
    pa.field("patient_id", pa.string(), nullable=False),
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("patch_id", pa.string(), nullable=False),
    pa.field("site", pa.string()),
    pa.field("x", pa.int64(), nullable=False),  # level-0 pixels, top-left
    pa.field("y", pa.int64(), nullable=False),
    pa.field("size_px", pa.float32(), nullable=False),  # side in level-0 pixels
    pa.field("x_um", pa.float64(), nullable=False),  # microns from the slide's origin
    pa.field("y_um", pa.float64(), nullable=False),
    pa.field("patch_um", pa.float32(), nullable=False),
    pa.field("out_px", pa.int32(), nullable=False),
    pa.field("tissue_fraction", pa.float32(), nullable=False),
]


KEY_COLUMNS = [f.name for f in PATCH_KEY_FIELDS]


def patch_id(slide_id: str, x: int, y: int, size_px: float) -> str:
    return f"{slide_id}/{int(x)}_{int(y)}_{int(round(size_px))}"


def fingerprint_schema(dim: int) -> pa.Schema:
    """One row per patch: keys, coordinates and the fingerprint vector."""
    return pa.schema(
        PATCH_KEY_FIELDS + [pa.field("fingerprint", pa.list_(pa.float32(), dim), nullable=False)]
    )


SLIDES = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string()),  # null: a slide without a patient in the table
        pa.field("path", pa.string(), nullable=False),
        pa.field("site", pa.string()),
        pa.field("mpp_override", pa.float64()),
    ]
)

LABELS = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("marker", pa.string(), nullable=False),  # ER, PR, Her2
        pa.field("status", pa.int8()),  # 1 positive, 0 negative, null missing
        pa.field("raw_value", pa.string()),  # the value as written in the clinical table
        pa.field("site", pa.string()),
    ]
)

TISSUE = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("patch_id", pa.string(), nullable=False),
        pa.field("tissue_type", pa.string(), nullable=False),
        pa.field("p_background", pa.float32(), nullable=False),
        pa.field("p_epithelium", pa.float32(), nullable=False),
        pa.field("p_stroma", pa.float32(), nullable=False),
        pa.field("p_fat", pa.float32(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
    ]
)

PATIENT_PREDICTIONS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("cohort", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("fold", pa.int16()),  # null for an external test
        pa.field("role", pa.string(), nullable=False),  # test, external, predict
        pa.field("label", pa.int8()),  # null: a predicted patient without a clinical label
        pa.field("score", pa.float32(), nullable=False),
        pa.field("n_patches", pa.int32(), nullable=False),
    ]
)

PATCH_PREDICTIONS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("cohort", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("patch_id", pa.string(), nullable=False),
        pa.field("fold", pa.int16()),
        pa.field("score", pa.float32(), nullable=False),
    ]
)


# Where an attention head looked, per patch (methods with ``patch_attention``): each
# patient's attention sums to 1 within a fold's model. Its own file beside patches.parquet, so
# PATCH_PREDICTIONS (and the runs other methods wrote) keep their columns.
PATCH_ATTENTION = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("cohort", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("patch_id", pa.string(), nullable=False),
        pa.field("fold", pa.int16()),
        pa.field("attention", pa.float32(), nullable=False),
    ]
)


def file_metadata(table: str, **extra: str) -> dict[bytes, bytes]:
    """Key-value metadata every fpstore Parquet file carries."""
    values = {
        "table": table,
        "schema_version": SCHEMA_VERSION,
        "fpstore_version": fpstore.__version__,
    }
    values.update({k: str(v) for k, v in extra.items()})
    return {(METADATA_PREFIX + k).encode(): v.encode() for k, v in values.items()}


def read_metadata(schema: pa.Schema) -> dict[str, str]:
    """The fpstore.* metadata of a Parquet schema, prefix stripped."""
    raw = schema.metadata or {}
    return {
        k.decode()[len(METADATA_PREFIX) :]: v.decode()
        for k, v in raw.items()
        if k.decode().startswith(METADATA_PREFIX)
    }
