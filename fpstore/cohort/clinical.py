"""Clinical tables: the TCGA BCR Biotab patient table and generic CSV/TSV tables.

Both parsers return a :class:`ClinicalTable`: one :class:`PatientRecord` per patient with
the ER/PR/Her2 status as 1 / 0 / None and the value exactly as written, so that a
missing status is always reported by its raw value and never silently mapped.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fpstore.config import MARKERS
from fpstore.errors import CohortError

# TCGA vocabulary (case as written by the BCR): only these two carry a status.
TCGA_STATUS = {"Positive": 1, "Negative": 0}
# Values that mean "no status" in the TCGA and common spreadsheets; reported as missing.
# Anything else is also missing, but flagged "unrecognised" so a typo or a new code shows up.
KNOWN_MISSING = {
    "",
    "equivocal",
    "indeterminate",
    "[not evaluated]",
    "[not available]",
    "[unknown]",
    "[not applicable]",
    "[discrepancy]",
    "not performed",
    "not evaluated",
    "not available",
    "unknown",
    "na",
    "n/a",
    "nan",
    "none",
    "null",
}
# Generic tables: accepted spellings, compared case-insensitively.
CSV_STATUS = {
    "positive": 1,
    "pos": 1,
    "1": 1,
    "+": 1,
    "1.0": 1,
    "negative": 0,
    "neg": 0,
    "0": 0,
    "-": 0,
    "0.0": 0,
}

TCGA_PATIENT_COLUMN = "bcr_patient_barcode"
TCGA_MARKER_COLUMNS = {
    "ER": "er_status_by_ihc",
    "PR": "pr_status_by_ihc",
    "Her2": "her2_status_by_ihc",
}
TCGA_HER2_FISH_COLUMN = "her2_fish_status"
TCGA_BARCODE = re.compile(r"^(TCGA-([A-Z0-9]{2})-[A-Z0-9]{4})", re.IGNORECASE)

# Generic tables: the logical columns and the header names recognised without a mapping.
CSV_KEYS = ("patient_id", "slide", "site") + MARKERS
CSV_DEFAULT_NAMES = {
    "patient_id": ("patient_id", "patient", "patientid", "case_id", "case", "subject_id"),
    "slide": ("slide", "slide_id", "slide_path", "path", "file", "filename", "image"),
    "site": ("site", "center", "centre", "institution"),
    "ER": ("er", "er_status", "er_status_by_ihc"),
    "PR": ("pr", "pr_status", "pr_status_by_ihc"),
    "Her2": ("her2", "her2_status", "her2_status_by_ihc", "erbb2"),
}


@dataclass
class PatientRecord:
    patient_id: str
    site: str | None = None
    status: dict[str, int | None] = field(default_factory=dict)  # marker -> 1 / 0 / None
    raw: dict[str, str] = field(default_factory=dict)  # marker -> value as written
    slides: list[str] = field(default_factory=list)  # slide paths or ids named by the table


@dataclass
class ClinicalTable:
    path: Path
    fmt: str
    patients: dict[str, PatientRecord]
    unrecognised: dict[
        str, Counter
    ]  # marker -> raw value -> count, values outside both vocabularies


def tcga_patient(name: str) -> tuple[str, str] | None:
    """(12-character patient barcode, tissue source site) of a TCGA name, else None."""
    match = TCGA_BARCODE.match(name)
    if not match:
        return None
    return match.group(1).upper(), match.group(2).upper()


def map_status(value: str | None, vocabulary: dict[str, int], case_sensitive: bool) -> int | None:
    if value is None:
        return None
    key = value.strip() if case_sensitive else value.strip().lower()
    return vocabulary.get(key)


def _is_unrecognised(value: str, vocabulary: dict[str, int], case_sensitive: bool) -> bool:
    if map_status(value, vocabulary, case_sensitive) is not None:
        return False
    return value.strip().lower() not in KNOWN_MISSING


def _sniff_delimiter(path: Path, first_line: str) -> str:
    if path.suffix.lower() in (".tsv", ".txt") or first_line.count("\t") > first_line.count(","):
        return "\t"
    return ","


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a delimited text file, every cell a stripped string."""
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"clinical table {str(path)!r} does not exist; pass --clinical FILE")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    lines = text.splitlines()
    if not lines:
        raise CohortError(f"clinical table {str(path)!r} is empty")
    if "\x00" in text:  # a NUL would end up in patient ids, file names and Parquet strings
        line = text[: text.index("\x00")].count("\n") + 1
        raise CohortError(
            f"clinical table {str(path)!r} line {line} holds a NUL byte: it is not a text "
            "table; export it again as CSV or TSV"
        )
    reader = csv.reader(lines, delimiter=_sniff_delimiter(path, lines[0]))
    try:
        rows = [[cell.strip() for cell in row] for row in reader]
    except csv.Error as error:
        raise CohortError(
            f"clinical table {str(path)!r} line {reader.line_num}: {error}; check the "
            "quoting and the delimiter of that line"
        ) from None
    header, body = rows[0], [r for r in rows[1:] if any(r)]
    return header, body


def _require(header: list[str], column: str, path: Path, hint: str) -> int:
    if column not in header:
        raise CohortError(
            f"clinical table {str(path)!r} has no column {column!r} ({hint}); "
            f"columns are: {', '.join(header[:20])}{' ...' if len(header) > 20 else ''}"
        )
    return header.index(column)


def read_tcga_clinical(
    path: Path, site_column: str | None = None, her2_fish_resolves_equivocal: bool = False
) -> ClinicalTable:
    """Parse a TCGA BCR Biotab patient table (``nationwidechildrens.org_clinical_patient_*.txt``).

    The file has three header rows: names, names again, CDE ids; the two extra rows are
    recognised and skipped. Only Positive/Negative carry a status. The site is the tissue
    source site of the barcode (characters 6-7) unless ``site_column`` names a column.
    With ``her2_fish_resolves_equivocal`` an IHC "Equivocal" takes the FISH result when that
    is Positive or Negative (the clinical rule); off by default.
    """
    path = Path(path)
    header, body = _read_rows(path)
    # Biotab's 2nd row repeats or renames the columns; its 3rd starts with "CDE_ID:".
    while body and (body[0][:1] == [header[0]] or body[0][0].startswith("CDE_ID")):
        body = body[1:]
    hint = "is this a TCGA BCR Biotab patient table? for other tables pass --format csv"
    pid = _require(header, TCGA_PATIENT_COLUMN, path, hint)
    marker_idx = {m: _require(header, c, path, hint) for m, c in TCGA_MARKER_COLUMNS.items()}
    site_idx = _require(header, site_column, path, "from --site-column") if site_column else None
    fish_idx = None
    if her2_fish_resolves_equivocal:
        fish_idx = _require(
            header, TCGA_HER2_FISH_COLUMN, path, "needed by --her2-fish-resolves-equivocal"
        )

    patients: dict[str, PatientRecord] = {}
    unrecognised = {m: Counter() for m in MARKERS}
    for line_no, row in enumerate(body, start=4):
        row = row + [""] * (len(header) - len(row))
        barcode = tcga_patient(row[pid])
        if barcode is None:
            raise CohortError(
                f"{path.name} line {line_no}: {row[pid]!r} in {TCGA_PATIENT_COLUMN} is not a TCGA "
                "patient barcode (TCGA-XX-XXXX)"
            )
        patient_id, tss = barcode
        if patient_id in patients:
            raise CohortError(f"{path.name} line {line_no}: patient {patient_id} appears twice")
        record = PatientRecord(patient_id, site=row[site_idx] if site_idx is not None else tss)
        for marker, idx in marker_idx.items():
            raw = row[idx]
            status = map_status(raw, TCGA_STATUS, case_sensitive=True)
            if marker == "Her2" and fish_idx is not None and raw == "Equivocal":
                fish = map_status(row[fish_idx], TCGA_STATUS, case_sensitive=True)
                if fish is not None:
                    status, raw = fish, f"Equivocal (FISH {row[fish_idx]})"
            if _is_unrecognised(raw, TCGA_STATUS, case_sensitive=True) and status is None:
                unrecognised[marker][raw] += 1
            record.status[marker], record.raw[marker] = status, raw
        patients[patient_id] = record
    return ClinicalTable(path, "tcga", patients, unrecognised)


def parse_column_mapping(pairs) -> dict[str, str]:
    """``["patient_id=Case", "ER=ER status"]`` -> dict; keys checked against CSV_KEYS."""
    mapping = {}
    for pair in pairs or ():
        key, sep, column = pair.partition("=")
        if not sep or not column:
            raise CohortError(
                f"column mapping {pair!r} must look like KEY=COLUMN, e.g. patient_id=Case"
            )
        if key not in CSV_KEYS:
            raise CohortError(
                f"column mapping key {key!r} is unknown; use one of: {', '.join(CSV_KEYS)}"
            )
        mapping[key] = column
    return mapping


def _resolve_columns(header: list[str], mapping: dict[str, str], path: Path) -> dict[str, int]:
    lowered = {h.lower(): i for i, h in enumerate(header)}
    found: dict[str, int] = {}
    for key in CSV_KEYS:
        if key in mapping:
            found[key] = _require(header, mapping[key], path, f"mapped by --column {key}=...")
            continue
        for name in CSV_DEFAULT_NAMES[key]:
            if name in lowered:
                found[key] = lowered[name]
                break
    if "patient_id" not in found:
        raise CohortError(
            f"clinical table {str(path)!r} has no patient column; name it with "
            f"--column patient_id=COLUMN (columns are: {', '.join(header)})"
        )
    if not any(m in found for m in MARKERS):
        raise CohortError(
            f"clinical table {str(path)!r} has no ER, PR or Her2 column; map them with "
            f"--column ER=COLUMN (columns are: {', '.join(header)})"
        )
    return found


def _disagree(first: str, second: str) -> bool:
    """Two values of one patient contradict: different statuses, or different unknowns."""
    a, b = (map_status(v, CSV_STATUS, case_sensitive=False) for v in (first, second))
    return a != b or (a is None and first.strip().lower() != second.strip().lower())


def _add_statuses(record: PatientRecord, row: list[str], idx: dict, where: str) -> None:
    """A row's raw marker values into its patient's record (a patient on several rows must
    not contradict itself; a blank adds nothing)."""
    for marker in MARKERS:
        raw = row[idx[marker]] if marker in idx else ""
        if not raw:  # a blank on a later row of the patient adds nothing
            record.raw.setdefault(marker, "")
            continue
        if record.raw.get(marker) and _disagree(record.raw[marker], raw):
            raise CohortError(
                f"{where}: patient {record.patient_id} has {marker} {raw!r} "
                f"here but {record.raw[marker]!r} on an earlier row; make the rows agree"
            )
        record.raw[marker] = raw


def read_csv_clinical(
    path: Path, columns: dict[str, str] | None = None, site_column: str | None = None
) -> ClinicalTable:
    """Parse a generic table: one row per slide (or per patient), comma or tab separated.

    Logical columns: patient_id, slide (path or id, optional), ER, PR, Her2, site (optional);
    header names are matched case-insensitively to common spellings, or given by ``columns``
    (``{"ER": "ER status"}``). Status values Positive/Negative/pos/neg/1/0/+/- (any case);
    others are missing, with their value. A patient on several rows must not contradict
    itself; blanks on its other rows are fine.
    """
    path = Path(path)
    mapping = dict(columns or {})
    if site_column:
        mapping["site"] = site_column
    header, body = _read_rows(path)
    idx = _resolve_columns(header, mapping, path)
    patients: dict[str, PatientRecord] = {}
    for line_no, row in enumerate(body, start=2):
        row = row + [""] * (len(header) - len(row))
        patient_id = row[idx["patient_id"]]
        if not patient_id:
            raise CohortError(f"{path.name} line {line_no}: empty patient id")
        record = patients.setdefault(patient_id, PatientRecord(patient_id))
        if "site" in idx and row[idx["site"]]:
            record.site = record.site or row[idx["site"]]
        _add_statuses(record, row, idx, f"{path.name} line {line_no}")
        if "slide" in idx and row[idx["slide"]]:
            record.slides.append(row[idx["slide"]])
    if not patients:
        raise CohortError(f"clinical table {str(path)!r} has a header but no rows")
    unrecognised = {m: Counter() for m in MARKERS}
    for record in patients.values():
        for marker in MARKERS:
            raw = record.raw[marker]
            record.status[marker] = map_status(raw, CSV_STATUS, case_sensitive=False)
            if record.status[marker] is None and _is_unrecognised(raw, CSV_STATUS, False):
                unrecognised[marker][raw] += 1
    return ClinicalTable(path, "csv", patients, unrecognised)
