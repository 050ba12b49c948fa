"""Slide lists: a glob, a folder, a single slide, or a GDC download manifest.

Every listed slide becomes a :class:`SlideEntry`; a slide that is listed but not usable
(not downloaded, empty, unreadable) carries a ``problem`` instead of being dropped, so
that the cohort report can name it.
"""

from __future__ import annotations

import csv
import glob
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fpstore.errors import CohortError
from fpstore.slides.slide import slide_id_from_path as slide_id_of

# Single-file whole-slide formats that openslide / tiatoolbox open. DICOM-WSI is a folder of
# .dcm files and is not picked up by a folder scan; name one of its files instead.
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
    ".jp2",
)
GDC_MANIFEST_HEADER = ("id", "filename")
NOT_DOWNLOADED = "listed, not downloaded"


@dataclass
class SlideEntry:
    slide_id: str
    path: Path
    source: str  # what listed it: the glob, folder, manifest or clinical table
    problem: str | None = None


def is_gdc_manifest(path: Path) -> bool:
    if not path.is_file() or path.suffix.lower() in SLIDE_SUFFIXES:
        return False
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline().rstrip("\r\n").split("\t")
    return tuple(first[:2]) == GDC_MANIFEST_HEADER


def not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be a slide file before it is opened: missing, or not a regular file
    (a FIFO would block the reader, /dev/zero never ends, a folder is not a scan)."""
    if not path.exists():
        return "file not found"
    if not path.is_file():
        kind = (
            "a folder"
            if path.is_dir()
            else "a FIFO"
            if stat.S_ISFIFO(path.stat().st_mode)
            else "a device or special file"
        )
        return f"not a regular file ({kind}); give the slide file itself"
    return None


def _check_file(entry: SlideEntry) -> SlideEntry:
    """Cheap checks that need no slide reader: exists, readable, not empty."""
    path = entry.path
    if not path.exists():
        entry.problem = entry.problem or "file not found"
    elif not path.is_file():
        entry.problem = not_a_file(path)
    elif not os.access(path, os.R_OK):
        entry.problem = "no permission to read the file"
    elif path.stat().st_size == 0:
        entry.problem = "empty file (0 bytes)"
    return entry


def read_gdc_manifest(manifest: Path, slides_dir: Path | None = None) -> list[SlideEntry]:
    """Entries of a GDC manifest (id, filename, md5, size, state).

    Files are looked for where gdc-client puts them (``DIR/<id>/<filename>``) and flat
    (``DIR/<filename>``); DIR is ``slides_dir`` or the manifest's folder. A file in
    neither place is reported as "listed, not downloaded".
    """
    root = Path(slides_dir) if slides_dir else manifest.parent
    if slides_dir and not root.is_dir():
        raise CohortError(f"--slides-dir {str(root)!r} is not a folder")
    with open(manifest, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    entries = []
    for row in rows:
        name = (row.get("filename") or "").strip()
        if not name:
            raise CohortError(f"GDC manifest {str(manifest)!r}: a row without a filename: {row}")
        candidates = [root / (row.get("id") or "").strip() / name, root / name]
        found = next((c for c in candidates if c.is_file()), None)
        entry = SlideEntry(slide_id_of(name), found or candidates[0], f"manifest {manifest.name}")
        if found is None:
            entry.problem = NOT_DOWNLOADED
        entries.append(entry)
    return entries


def _scan_folder(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file()
    )


def list_slides(sources, slides_dir: Path | None = None) -> list[SlideEntry]:
    """Expand each source (glob, folder, slide file or GDC manifest) into slide entries.

    A source that matches nothing is an error (a typo must not yield an empty cohort).
    The same file listed twice is kept once; two files with the same slide id are refused.
    """
    entries: list[SlideEntry] = []
    for source in sources:
        text = str(source)
        path = Path(text).expanduser()
        if any(ch in text for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise CohortError(f"--slides {text!r} matched no files")
            entries += [SlideEntry(slide_id_of(p), p, text) for p in matches]
        elif path.is_dir():
            found = _scan_folder(path)
            if not found:
                raise CohortError(
                    f"--slides folder {text!r} holds no slide files ({', '.join(SLIDE_SUFFIXES)})"
                )
            entries += [SlideEntry(slide_id_of(p), p, text) for p in found]
        elif is_gdc_manifest(path):
            entries += read_gdc_manifest(path, slides_dir)
        elif path.exists():
            entries.append(SlideEntry(slide_id_of(path), path, text))
        else:
            raise CohortError(
                f"--slides {text!r} does not exist; pass a glob ('slides/*.svs'), a folder, "
                "a slide file or a GDC manifest"
            )
    return dedupe([_check_file(e) if e.problem is None else e for e in entries])


def dedupe(entries: list[SlideEntry]) -> list[SlideEntry]:
    by_id: dict[str, SlideEntry] = {}
    for entry in entries:
        seen = by_id.get(entry.slide_id)
        if seen is None:
            by_id[entry.slide_id] = entry
        elif os.path.abspath(seen.path) != os.path.abspath(entry.path):
            raise CohortError(
                f"two slides share the id {entry.slide_id!r}: {str(seen.path)!r} and "
                f"{str(entry.path)!r}; rename one or list only one of them"
            )
    return list(by_id.values())
