"""TCGA sample and slide types, read from slide file names, and the choice of which to keep.

A GDC slide file is named by its barcode: ``TCGA-A2-A0T2-01Z-00-DX1.<uuid>.svs`` is
project-TSS-participant, sample (type ``01`` + vial), portion, slide (type ``DX`` + order).
A patient usually has a diagnostic slide (DX: formalin-fixed, paraffin-embedded) and frozen
sections (TS/BS/MS: top, bottom, middle of the frozen block), of the tumour (sample type 01)
and sometimes of normal tissue (11). Receptor status from H&E is predicted on diagnostic
slides of the primary tumour, so that is what ``cohort add`` keeps unless told otherwise.
Names that are not TCGA barcodes are never judged here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fpstore.errors import CohortError

SLIDE_TYPES = {
    "DX": "diagnostic slide, FFPE",
    "TS": "frozen section, top of the block",
    "BS": "frozen section, bottom of the block",
    "MS": "frozen section, middle of the block",
}
# The GDC's sample type codes (https://gdc.cancer.gov/resources-tcga-users/tcga-code-tables).
SAMPLE_TYPES = {
    "01": "primary solid tumour",
    "02": "recurrent solid tumour",
    "03": "primary blood-derived cancer, peripheral blood",
    "04": "recurrent blood-derived cancer, bone marrow",
    "05": "additional new primary",
    "06": "metastatic",
    "07": "additional metastatic",
    "08": "human tumour original cells",
    "09": "primary blood-derived cancer, bone marrow",
    "10": "blood-derived normal",
    "11": "solid tissue normal",
    "12": "buccal cell normal",
    "13": "EBV-immortalised normal",
    "14": "bone marrow normal",
    "20": "control analyte",
    "40": "recurrent blood-derived cancer, peripheral blood",
    "50": "cell lines",
    "60": "primary xenograft tissue",
    "61": "cell line derived xenograft tissue",
}
ALL = "all"
# TCGA-TSS-PPPP[-SSV[-PP[-XXN]]]; the parts after the patient are optional (renamed files).
_BARCODE = re.compile(
    r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}"
    r"(?:-(?P<sample>\d{2})[A-Z]?(?:-\d{2}[A-Z]?(?:-(?P<slide>[A-Z]{2})[A-Z0-9]*)?)?)?"
    r"(?=$|[.\-_ ])",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TcgaName:
    """The sample and slide type a TCGA slide name carries (None: the name does not say)."""

    sample_type: str | None
    slide_type: str | None


def tcga_name(name: str) -> TcgaName | None:
    """The types of a TCGA slide name, or None for a name that is not a TCGA barcode."""
    match = _BARCODE.match(name)
    if match is None:
        return None
    slide = (match.group("slide") or "").upper() or None
    return TcgaName(match.group("sample"), slide if slide in SLIDE_TYPES else None)


def describe_slide_type(code: str) -> str:
    return f"slide type {code} ({SLIDE_TYPES[code]})"


def describe_sample_type(code: str) -> str:
    return f"sample type {code} ({SAMPLE_TYPES.get(code, 'not a GDC sample type code')})"


def _codes(text: str | None) -> tuple[str, ...] | None:
    """'DX,ts' -> ('DX', 'TS'); 'all' -> None (keep every type)."""
    if text is None or text.strip().lower() == ALL:
        return None
    return tuple(dict.fromkeys(c.strip().upper() for c in text.split(",") if c.strip()))


@dataclass(frozen=True)
class TypeChoice:
    """Which TCGA slides a cohort keeps: slide types and sample types, None meaning all.

    The default is the paper's: diagnostic slides (DX) of primary tumour samples (01).
    """

    slide_types: tuple[str, ...] | None = ("DX",)
    sample_types: tuple[str, ...] | None = ("01",)

    def __post_init__(self):
        if self.slide_types is not None:
            unknown = [c for c in self.slide_types if c not in SLIDE_TYPES]
            if unknown or not self.slide_types:
                raise CohortError(
                    f"--slide-types {','.join(self.slide_types)!r}: "
                    f"{'unknown ' + ', '.join(unknown) if unknown else 'no type given'}; give a "
                    "comma-separated list of "
                    + ", ".join(f"{c} ({d})" for c, d in SLIDE_TYPES.items())
                    + ", or 'all'"
                )
        if self.sample_types is not None:
            bad = [c for c in self.sample_types if not re.fullmatch(r"\d{2}", c)]
            if bad or not self.sample_types:
                raise CohortError(
                    f"--sample-types {','.join(self.sample_types)!r}: "
                    f"{'not a two-digit code: ' + ', '.join(bad) if bad else 'no type given'}; "
                    "give a comma-separated list such as 01 (primary solid tumour), "
                    "06 (metastatic), 11 (solid tissue normal), or 'all'"
                )

    @classmethod
    def parse(cls, slide_types: str | None, sample_types: str | None) -> TypeChoice:
        """From the command line's comma-separated lists ('DX,TS', '01', 'all')."""
        return cls(_codes(slide_types), _codes(sample_types))

    def left_out_because(self, name: str) -> list[str]:
        """Why a slide of this name is left out ([] keeps it). Names that are not TCGA
        barcodes, and parts a name does not carry, are never a reason."""
        parsed = tcga_name(name)
        if parsed is None:
            return []
        reasons = []
        if self.sample_types is not None and parsed.sample_type not in (None, *self.sample_types):
            reasons.append(describe_sample_type(parsed.sample_type))
        if self.slide_types is not None and parsed.slide_type not in (None, *self.slide_types):
            reasons.append(describe_slide_type(parsed.slide_type))
        return reasons

    def cannot_tell(self, name: str) -> bool:
        """A TCGA name that lacks a part this choice is about (a file renamed to the patient
        barcode, say): kept, since nothing says to leave it out, and counted as such."""
        parsed = tcga_name(name)
        return parsed is not None and (
            (self.sample_types is not None and parsed.sample_type is None)
            or (self.slide_types is not None and parsed.slide_type is None)
        )

    def describe(self) -> str:
        """'DX slides, sample type 01', as the cohort summary prints it."""
        slides = (
            "any slide type" if self.slide_types is None else "/".join(self.slide_types) + " slides"
        )
        samples = (
            "any sample type"
            if self.sample_types is None
            else "sample type " + "/".join(self.sample_types)
        )
        return f"{slides}, {samples}"
