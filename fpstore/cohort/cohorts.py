"""Cohorts: a clinical table joined to a slide list, kept in the store.

``add_cohort`` writes ``store/cohorts/<name>/{slides,labels}.parquet`` (schemas SLIDES,
LABELS) and ``cohort.json`` (the summary below). Nothing is dropped silently: patients
without slides, slides without patients, slides listed but not usable and status values
that are not a status are all counted and named in the summary. TCGA slides of other
types than the cohort keeps (frozen sections, normal tissue: see ``slide_types``) are left
out, and counted and named too.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from fpstore.cohort.clinical import (
    ClinicalTable,
    PatientRecord,
    read_csv_clinical,
    read_tcga_clinical,
    tcga_patient,
)
from fpstore.cohort.slide_list import (
    NOT_DOWNLOADED,
    SlideEntry,
    list_slides,
    not_a_file,
    slide_id_of,
)
from fpstore.cohort.slide_types import TypeChoice
from fpstore.config import CLINICAL_FORMATS, MARKERS
from fpstore.errors import CohortError, SlideError
from fpstore.slides.slide import Slide, load_mpp_overrides, open_slide
from fpstore.store.cohorts import (
    CohortSlide,
    cohort_lock,
    cohort_names,
    read_cohort,
    read_cohort_document,
    write_cohort,
)
from fpstore.store.layout import StoreLayout
from fpstore.store.schema import LABELS, SCHEMA_VERSION, SLIDES

COHORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Characters that may follow a patient id in a slide's file name ("P01_a.tiff", "P01-2.svs").
_ID_SEPARATORS = "-_. "


@dataclass
class MarkerCounts:
    positive: int = 0
    negative: int = 0
    missing: int = 0
    missing_values: dict[str, int] = field(default_factory=dict)  # raw value -> count
    unrecognised_values: dict[str, int] = field(default_factory=dict)  # outside the vocabulary


@dataclass
class CohortSummary:
    name: str
    fmt: str
    clinical: str
    n_patients: int
    n_slides: int  # usable slides, the rows of slides.parquet
    n_patients_with_slides: int
    markers: dict[str, MarkerCounts]  # over every patient of the clinical table
    markers_with_slides: dict[str, MarkerCounts]  # over the patients that have a usable slide
    patients_without_slides: list[str]
    slides_without_patients: list[dict]  # slide_id, path, reason
    problems: list[dict]  # slide_id, path, patient_id, problem: listed but not usable
    unused_mpp_overrides: list[str] = field(default_factory=list)
    # Files of slides the cohort no longer has, removed when it was re-added: {what: count}.
    removed: dict[str, int] = field(default_factory=dict)
    # The TCGA slide and sample types kept (None: every type; so for cohorts added before
    # fpstore chose types, which kept them all), and the TCGA slides of other types, left out:
    # slide_id, path, patient_id, reasons.
    slide_types: list[str] | None = None
    sample_types: list[str] | None = None
    left_out_by_type: list[dict] = field(default_factory=list)
    # Kept TCGA slides whose name does not carry the type chosen on (renamed files).
    untyped: list[str] = field(default_factory=list)

    @property
    def type_choice(self) -> TypeChoice:
        return TypeChoice(
            None if self.slide_types is None else tuple(self.slide_types),
            None if self.sample_types is None else tuple(self.sample_types),
        )

    def left_out_counts(self) -> dict[str, int]:
        """Slides left out per reason ("slide type TS (...)": 12); a slide left out for two
        reasons counts under both."""
        counts = Counter(r for s in self.left_out_by_type for r in s["reasons"])
        return dict(counts.most_common())

    def to_dict(self) -> dict:
        return {**asdict(self), "left_out_by_type_counts": self.left_out_counts()}

    @classmethod
    def from_dict(cls, data: dict) -> CohortSummary:
        data = dict(data)
        for key in ("markers", "markers_with_slides"):
            data[key] = {m: MarkerCounts(**c) for m, c in data[key].items()}
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class Cohort:
    name: str
    slides: pa.Table
    labels: pa.Table
    summary: CohortSummary


def check_name(name: str) -> str:
    if not COHORT_NAME.match(name or ""):
        raise CohortError(
            f"cohort name {name!r} is not allowed; use letters, digits, '_', '-', '.' "
            "(it becomes a folder and a partition value)"
        )
    return name


def _read_clinical(clinical, fmt, site_column, columns, her2_fish) -> ClinicalTable:
    if fmt not in CLINICAL_FORMATS:
        raise CohortError(f"--format {fmt!r} is unknown; use one of: {', '.join(CLINICAL_FORMATS)}")
    if fmt == "tcga":
        if columns:
            raise CohortError("--column mappings apply to --format csv only")
        return read_tcga_clinical(clinical, site_column, her2_fish)
    if her2_fish:
        raise CohortError("--her2-fish-resolves-equivocal applies to --format tcga only")
    return read_csv_clinical(clinical, columns, site_column)


def _match_tcga(table: ClinicalTable, entries: list[SlideEntry]):
    """slide -> patient by the 12-character barcode at the start of the file name."""
    owners: dict[str, str | None] = {}
    orphans = []
    for entry in entries:
        barcode = tcga_patient(entry.slide_id)
        if barcode is None:
            reason = "no TCGA barcode (TCGA-XX-XXXX) at the start of the file name"
        elif barcode[0] not in table.patients:
            reason = f"patient {barcode[0]} is not in the clinical table"
        else:
            owners[entry.slide_id] = barcode[0]
            continue
        owners[entry.slide_id] = None
        orphans.append((entry, reason))
    return entries, owners, orphans


def _match_named(table: ClinicalTable, entries: list[SlideEntry] | None):
    """slide -> patient by the table's slide column (a path, a file name or a slide id)."""
    base = table.path.parent
    index: dict[str, SlideEntry] = {}
    for entry in entries or []:
        for key in (os.path.abspath(entry.path), entry.path.name, entry.slide_id):
            index.setdefault(key, entry)
    owners: dict[str, str | None] = {}
    matched: list[SlideEntry] = []
    for patient in table.patients.values():
        for value in patient.slides:
            path = Path(value) if Path(value).is_absolute() else base / value
            if entries is None:
                entry = SlideEntry(slide_id_of(value), path, f"clinical table {table.path.name}")
                if not_a_file(path):
                    entry.problem = f"named in the clinical table, {not_a_file(path)}"
            else:
                entry = (
                    index.get(os.path.abspath(path))
                    or index.get(Path(value).name)
                    or index.get(value)
                )
                if entry is None:
                    entry = SlideEntry(
                        slide_id_of(value),
                        path,
                        f"clinical table {table.path.name}",
                        problem="named in the clinical table, not among --slides",
                    )
            previous = owners.get(entry.slide_id)
            if previous not in (None, patient.patient_id):
                raise CohortError(
                    f"slide {value!r} is named for two patients, {previous} and "
                    f"{patient.patient_id}; "
                    f"fix the slide column of {table.path.name}"
                )
            if entry.slide_id not in owners:
                matched.append(entry)
            owners[entry.slide_id] = patient.patient_id
    orphans = [
        (e, f"not named in the slide column of {table.path.name}")
        for e in entries or []
        if e.slide_id not in owners
    ]
    for entry, _ in orphans:
        owners[entry.slide_id] = None
    return matched + [e for e, _ in orphans], owners, orphans


def _match_by_id(table: ClinicalTable, entries: list[SlideEntry]):
    """slide -> patient whose id is the slide id or its prefix ("P01" owns "P01_b.tiff")."""
    ids = sorted(table.patients, key=len, reverse=True)  # longest id wins: P1 vs P10
    owners, orphans = {}, []
    for entry in entries:
        owner = next(
            (
                p
                for p in ids
                if entry.slide_id == p
                or (entry.slide_id.startswith(p) and entry.slide_id[len(p)] in _ID_SEPARATORS)
            ),
            None,
        )
        owners[entry.slide_id] = owner
        if owner is None:
            orphans.append((entry, "no patient id of the clinical table starts its file name"))
    return entries, owners, orphans


def _choose_types(entries: list[SlideEntry], types: TypeChoice):
    """(the entries kept, {slide_id: (entry, reasons)} of the TCGA slides left out by type)."""
    kept, left_out = [], {}
    for entry in entries:
        reasons = types.left_out_because(entry.slide_id)
        if reasons:
            left_out[entry.slide_id] = (entry, reasons)
        else:
            kept.append(entry)
    return kept, left_out


def _validate(entries: list[SlideEntry], overrides: dict[str, float]) -> dict[str, dict]:
    """Open each usable slide and read one small patch; failures become the entry's problem."""
    from tqdm import tqdm

    from fpstore.slides.slide import open_slide

    info = {}
    for entry in tqdm(
        [e for e in entries if e.problem is None], desc="validate slides", unit="slide"
    ):
        try:
            slide = open_slide(entry.path, mpp=overrides.get(entry.slide_id))
            try:
                meta = slide.info
                side = int(min(64, meta.width, meta.height))
                slide.read_patch((meta.width - side) // 2, (meta.height - side) // 2, side, side)
            finally:
                slide.close()
        except SlideError as error:
            entry.problem = str(error)
            continue
        info[entry.slide_id] = {
            "mpp": meta.mpp,
            "mpp_source": meta.mpp_source,
            "width": meta.width,
            "height": meta.height,
            "vendor": meta.vendor,
        }
    return info


def _count(patients: list[PatientRecord], table: ClinicalTable) -> dict[str, MarkerCounts]:
    counts = {}
    for marker in MARKERS:
        c = MarkerCounts()
        missing = Counter()
        for p in patients:
            status = p.status.get(marker)
            if status == 1:
                c.positive += 1
            elif status == 0:
                c.negative += 1
            else:
                c.missing += 1
                missing[p.raw.get(marker, "")] += 1
        c.missing_values = dict(missing.most_common())
        c.unrecognised_values = {
            v: n for v, n in missing.most_common() if v in table.unrecognised[marker]
        }
        counts[marker] = c
    return counts


def _tables(table: ClinicalTable, usable: list[SlideEntry], owners, overrides):
    labels = {k: [] for k in LABELS.names}
    for patient in table.patients.values():
        for marker in MARKERS:
            labels["patient_id"].append(patient.patient_id)
            labels["marker"].append(marker)
            labels["status"].append(patient.status.get(marker))
            labels["raw_value"].append(patient.raw.get(marker, ""))
            labels["site"].append(patient.site)
    slides = {k: [] for k in SLIDES.names}
    for entry in usable:
        owner = owners.get(entry.slide_id)
        barcode = tcga_patient(entry.slide_id) if table.fmt == "tcga" else None
        slides["slide_id"].append(entry.slide_id)
        slides["patient_id"].append(owner)
        slides["path"].append(os.path.abspath(entry.path))
        slides["site"].append(
            table.patients[owner].site if owner else (barcode[1] if barcode else None)
        )
        slides["mpp_override"].append(overrides.get(entry.slide_id))
    return pa.table(slides, schema=SLIDES), pa.table(labels, schema=LABELS)


def _unlabelled_table(entries: list[SlideEntry]) -> ClinicalTable:
    """A clinical table with one unlabelled patient per slide, named after the slide."""
    return ClinicalTable(
        Path("."),
        "unlabelled",
        {e.slide_id: PatientRecord(e.slide_id) for e in entries},
        {m: Counter() for m in MARKERS},
    )


@dataclass(frozen=True)
class CohortSource:
    """Where a cohort comes from: its slides and clinical table, and how to read them.

    ``slides``: globs, folders, slide files or GDC manifests (a str or a sequence of them;
    ``slides_dir``: where a manifest's files are); for ``fmt="csv"`` it may be left out when
    the table's slide column holds paths. Without a ``clinical`` table the cohort is
    unlabelled: each slide is its own patient (patient id = slide id), with no status and no
    site (slides a saved model is to score). ``mpp_overrides``: a file of slide -> mpp.
    ``site_column``, ``columns`` (csv: field -> column) and ``her2_fish_resolves_equivocal``
    (tcga) read the clinical table. ``types``: the TCGA slide and sample types to keep
    (default: diagnostic slides of primary tumours); slides of other types are left out and
    listed in the summary. Slide names that are not TCGA barcodes are kept whatever
    ``types`` says.
    """

    slides: tuple = ()  # a str or Path alone is made a tuple of one
    clinical: Path | None = None
    fmt: str = "tcga"
    slides_dir: Path | None = None
    mpp_overrides: Path | None = None
    site_column: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    her2_fish_resolves_equivocal: bool = False
    types: TypeChoice = TypeChoice()

    def __post_init__(self):
        slides = self.slides
        as_tuple = (slides,) if isinstance(slides, (str, Path)) else tuple(slides or ())
        object.__setattr__(self, "slides", as_tuple)
        object.__setattr__(self, "columns", dict(self.columns or {}))
        if self.clinical is not None:
            return  # the table's own checks run as it is read (_read_clinical)
        if not self.slides:
            raise CohortError(
                "a cohort needs --clinical FILE, or --slides alone for an unlabelled cohort"
            )
        if self.site_column or self.columns or self.her2_fish_resolves_equivocal:
            raise CohortError(
                "--site-column, --column and --her2-fish-resolves-equivocal read a clinical "
                "table; pass --clinical FILE"
            )

    @property
    def table_format(self) -> str:
        """How slides meet patients: "tcga" or "csv", or "unlabelled" without a table."""
        return "unlabelled" if self.clinical is None else self.fmt

    def options(self) -> dict:
        """The cohort document's record of these settings (beside ``validated``)."""
        return {
            "slides": [str(s) for s in self.slides],
            "slides_dir": str(self.slides_dir) if self.slides_dir else None,
            "mpp_overrides": str(self.mpp_overrides) if self.mpp_overrides else None,
            "site_column": self.site_column,
            "columns": self.columns,
            "her2_fish_resolves_equivocal": self.her2_fish_resolves_equivocal,
        }


def add_cohort(
    store: Path,
    name: str,
    source: CohortSource | None = None,
    *,
    validate: bool = False,
    force: bool = False,
    **source_fields,
) -> CohortSummary:
    """Parse the clinical table, list and match the slides, and write the cohort to the store.

    ``source``: a ``CohortSource``, or its fields as keywords (``slides=..., clinical=...,
    fmt="csv"``) for a one-line call. ``validate`` opens every slide and reads a patch
    (unreadable ones become problems and are left out of slides.parquet). An existing
    cohort is replaced only with ``force``.
    """
    if source is None:
        source = CohortSource(**source_fields)
    elif source_fields:
        raise CohortError(f"pass a CohortSource or its fields, not both ({sorted(source_fields)})")
    check_name(name)
    if StoreLayout.of(store).cohort_dir(name).exists() and not force:
        raise CohortError(
            f"cohort {name!r} already exists in {str(store)!r}; pass --force to replace it"
        )
    with cohort_lock(store, name) as lock:
        if not lock.acquire():
            raise CohortError(
                f"cohort {name!r} is being extracted (or added) by another process; wait for "
                "it to finish or stop it, then rerun `fpstore cohort add`"
            )
        return _add_cohort(store, name, source, validate)


def _matched(source: CohortSource):
    """The clinical table and the slides matched to its patients: (table, entries, owners
    slide_id -> patient_id or None, orphans [(entry, reason)])."""
    entries = list_slides(list(source.slides), source.slides_dir) if source.slides else None
    fmt = source.table_format
    if fmt == "unlabelled":
        assert entries is not None  # CohortSource refuses neither slides nor a table
        table = _unlabelled_table(entries)
        return (table, *_match_by_id(table, entries))
    table = _read_clinical(
        source.clinical,
        fmt,
        source.site_column,
        source.columns,
        source.her2_fish_resolves_equivocal,
    )
    if fmt == "tcga":
        if entries is None:
            raise CohortError("a TCGA cohort needs its slides; pass --slides GLOB|FOLDER|MANIFEST")
        return (table, *_match_tcga(table, entries))
    if any(p.slides for p in table.patients.values()):
        return (table, *_match_named(table, entries))
    if entries is None:
        raise CohortError(
            f"{table.path.name} has no slide column; pass --slides, "
            "or map one with --column slide=COLUMN"
        )
    return (table, *_match_by_id(table, entries))


def _slide_rows(entries, owners, key: str = "problem") -> list[dict]:
    return [
        {
            "slide_id": e.slide_id,
            "path": os.path.abspath(e.path),
            "patient_id": owners.get(e.slide_id),
            key: value,
        }
        for e, value in entries
    ]


def _add_cohort(store, name: str, source: CohortSource, validate: bool) -> CohortSummary:
    table, entries, owners, orphans = _matched(source)
    types = source.types
    entries, left_out = _choose_types(entries, types)
    orphans = [(e, reason) for e, reason in orphans if e.slide_id not in left_out]

    overrides = load_mpp_overrides(source.mpp_overrides) if source.mpp_overrides else {}
    known = {e.slide_id for e in entries}
    unused = sorted(k for k in overrides if k not in known)
    slide_info = _validate(entries, overrides) if validate else {}

    usable = [e for e in entries if e.problem is None]
    # Written, a cohort of unusable slides only makes the corrected rerun need --force; a
    # manifest's slides not downloaded yet are a state that downloading changes, not an error.
    if entries and not usable and not any(e.problem == NOT_DOWNLOADED for e in entries):
        first = entries[0]
        raise CohortError(
            f"none of the {len(entries)} listed slide(s) of cohort {name!r} is usable, e.g. "
            f"{first.slide_id}: {first.problem}; nothing was written: fix the slides and rerun"
        )
    with_slides = {owners[e.slide_id] for e in usable if owners.get(e.slide_id)}
    summary = CohortSummary(
        name=name,
        fmt=source.table_format,
        clinical=os.path.abspath(table.path) if source.clinical is not None else "",
        n_patients=len(table.patients),
        n_slides=len(usable),
        n_patients_with_slides=len(with_slides),
        markers=_count(list(table.patients.values()), table),
        markers_with_slides=_count(
            [p for p in table.patients.values() if p.patient_id in with_slides], table
        ),
        patients_without_slides=sorted(set(table.patients) - with_slides),
        slides_without_patients=[
            {"slide_id": e.slide_id, "path": os.path.abspath(e.path), "reason": reason}
            for e, reason in orphans
        ],
        problems=_slide_rows([(e, e.problem) for e in entries if e.problem], owners),
        unused_mpp_overrides=unused,
        slide_types=None if types.slide_types is None else list(types.slide_types),
        sample_types=None if types.sample_types is None else list(types.sample_types),
        left_out_by_type=_slide_rows(list(left_out.values()), owners, "reasons"),
        untyped=sorted(e.slide_id for e in entries if types.cannot_tell(e.slide_id)),
    )
    slides_table, labels_table = _tables(table, usable, owners, overrides)
    document = {
        **summary.to_dict(),
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": {
            **source.options(),
            "validated": validate,
            "slide_types": summary.slide_types,
            "sample_types": summary.sample_types,
        },
        "slide_info": slide_info,
    }
    summary.removed = write_cohort(store, name, slides_table, labels_table, document)
    return summary


def list_cohorts(store) -> list[dict]:
    """One row per cohort of the store: name, format, patients, slides, created."""
    rows = []
    for name in cohort_names(store):
        doc = read_cohort_document(store, name)
        rows.append(
            {
                "name": doc["name"],
                "format": doc["fmt"],
                "patients": doc["n_patients"],
                "patients_with_slides": doc["n_patients_with_slides"],
                "slides": doc["n_slides"],
                "problems": len(doc["problems"]),
                "left_out_by_type": len(doc.get("left_out_by_type", [])),
                "created": doc.get("created"),
            }
        )
    return rows


def cohort_summary(store, name: str) -> CohortSummary:
    return CohortSummary.from_dict(read_cohort_document(store, name))


def load_cohort(store, name: str) -> Cohort:
    """The cohort's slides and labels tables (schemas SLIDES, LABELS) and its summary."""
    stored = read_cohort(store, name)
    return Cohort(name, stored.slides, stored.labels, CohortSummary.from_dict(stored.document))


def open_cohort_slide(slide: CohortSlide) -> Slide:
    """A cohort's slide as ``cohort add`` registered it: its file, with its mpp override."""
    return open_slide(slide.path, mpp=slide.mpp_override)
