"""Where the fingerprint network's training cores come from, as users have them.

Two sources, alone or together (together they are the paper's "large" training set of Table 2):

* **Tissue microarrays described by a table** (``--tma TABLE``, a CSV; or a folder holding
  ``sections.csv``). One row per section:

  ========== ==================================================================================
  file       the section's slide, or a folder that ``fpstore tma dearray`` wrote
  array      the array it was cut from (the same physical core in every section of an array)
  site       where it was stained and scanned (the stain invariance and the matching game use it)
  array_map  CSV of row, column, core_index, patient_id (may be empty for a dearray folder,
             which has joined its map already)
  role       optional: ``train`` (default) or ``test`` (the matching game's array)
  section    optional: a name for the section (default: the file's name without extension)
  mpp        optional: microns per pixel, for a slide whose metadata lacks it
  ========== ==================================================================================

  Relative paths are read from the table's folder. ``fpstore synth`` writes
  ``tma/sections.csv`` in this form, so its arrays are one case of it.

* **Whole slides of a store cohort** (``--cohort NAME``): pseudo-cores, squares of the core
  crop's side placed on tissue by the cohort's tissue masks (most tissue first, not
  overlapping, each at least ``min_tissue`` tissue), a few per slide; one class per patient;
  each square's site is its slide's site in the cohort (TCGA: the tissue-source site).

Both give a ``CoreSet`` (left and right halves, cached memory-mapped, see
``fpstore.fingerprint.data``). Sites come from the table or the cohort, never from a
synthetic manifest.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from fpstore.errors import ConfigError, FpstoreError, TrainingError
from fpstore.fingerprint.data import (
    CoreSet,
    load_coreset,
    read_meta,
    tissue_grid,
    write_index,
)
from fpstore.store.io import clean_staging, staged_folder

TABLE_NAME = "sections.csv"  # what a --tma folder must hold
TABLE_COLUMNS = ("file", "array", "site", "array_map")
OPTIONAL_COLUMNS = ("role", "section", "mpp")
ROLES = ("train", "test")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".dcm")


@dataclass(frozen=True)
class TmaSection:
    """One row of a TMA table."""

    file: Path  # a slide, or a folder written by `fpstore tma dearray`
    array: str
    site: str
    array_map: Path | None
    role: str  # train | test
    name: str  # unique within its role
    mpp: float | None
    line: int  # the table's line (the header is line 1), for messages

    @property
    def is_dearrayed(self) -> bool:
        return self.file.is_dir()


def table_path(tma: Path) -> Path:
    """The TMA table: ``tma`` itself, or ``tma/sections.csv`` for a folder."""
    tma = Path(tma)
    if tma.is_dir():
        path = tma / TABLE_NAME
        if not path.is_file():
            raise ConfigError(
                f"--tma {tma}: the folder has no {TABLE_NAME}; give a CSV with columns "
                f"{', '.join(TABLE_COLUMNS)} (one row per section), or the tma/ folder of "
                "`fpstore synth`"
            )
        return path
    if not tma.is_file():
        raise ConfigError(f"--tma {tma} does not exist; give the TMA table (a CSV) or its folder")
    return tma


def read_tma_table(tma: Path) -> list[TmaSection]:
    """The sections of a TMA table, checked: every column present, every file there."""
    path = table_path(tma)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        rows = list(reader)
    missing = [c for c in TABLE_COLUMNS if c not in fields]
    if missing:
        raise ConfigError(
            f"TMA table {path}, line 1 (the header): no column "
            f"{', '.join(repr(c) for c in missing)}; "
            f"it needs {', '.join(TABLE_COLUMNS)} (found: {', '.join(fields) or 'nothing'})"
        )
    if not rows:
        raise ConfigError(f"TMA table {path} has a header but no sections; add one row per section")
    sections, names, roles = [], set(), {}
    for line, raw in enumerate(rows, start=2):
        row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        section = _section(path, line, row)
        if (section.role, section.name) in names:
            raise ConfigError(
                f"TMA table {path}, line {line}, column 'section': {section.name!r} names two "
                f"{section.role} sections; give them distinct names in a 'section' column"
            )
        names.add((section.role, section.name))
        if roles.setdefault(section.array, section.role) != section.role:
            raise ConfigError(
                f"TMA table {path}, line {line}, column 'role': array {section.array!r} is both "
                "train and test; an array's sections share one role"
            )
        sections.append(section)
    return sections


def _section(path: Path, line: int, row: dict) -> TmaSection:
    def where(column: str) -> str:
        return f"TMA table {path}, line {line}, column {column!r}"

    for column in ("file", "array", "site"):
        if not row.get(column):
            raise ConfigError(f"{where(column)}: empty; every section needs its {column}")
    file = _resolve(path, row["file"])
    if not file.exists():
        raise ConfigError(f"{where('file')}: {file} does not exist")
    if file.is_dir() and not (file / "cores.json").is_file():
        raise ConfigError(
            f"{where('file')}: {file} is a folder without cores.json; give a slide or a folder "
            "that `fpstore tma dearray` wrote"
        )
    array_map = _resolve(path, row["array_map"]) if row.get("array_map") else None
    if array_map is None and not file.is_dir():
        raise ConfigError(
            f"{where('array_map')}: empty; a slide needs its array map (row, column, core_index, "
            "patient_id), or give a folder that `fpstore tma dearray --array-map` wrote"
        )
    if array_map is not None and not array_map.is_file():
        raise ConfigError(f"{where('array_map')}: {array_map} does not exist")
    role = row.get("role") or "train"
    if role not in ROLES:
        raise ConfigError(f"{where('role')}: {role!r}; give train or test")
    mpp = None
    if row.get("mpp"):
        try:
            mpp = float(row["mpp"])
        except ValueError:
            mpp = -1.0
        if not 0 < mpp < 100:
            raise ConfigError(f"{where('mpp')}: {row['mpp']!r} is not a positive number of um/px")
    name = row.get("section") or file.name.split(".")[0]
    return TmaSection(file, row["array"], row["site"], array_map, role, name, mpp, line)


def _resolve(table: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (table.parent / p)


# --- TMA sections -> cached cores --------------------------------------------------------------


def _signature(sections: list[TmaSection], mpp: float, size: int) -> dict:
    files = []
    for s in sections:
        for p in [s.file / "cores.json" if s.is_dearrayed else s.file, s.array_map]:
            if p is not None:
                files.append([str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns])
    rows = [[s.name, s.array, s.site, s.role, s.mpp] for s in sections]
    return {"mpp": mpp, "size": size, "files": files, "sections": rows}


def _slide_cores(section: TmaSection) -> list[tuple]:
    """[(core, crop)] of a section: dearrayed now (a slide; crop None) or read from a folder
    `fpstore tma dearray` wrote (crop: the folder's cores.json and the core's crop name)."""
    from fpstore.slides.tma import Core, dearray, join_array_map, read_array_map

    if section.is_dearrayed:
        doc = json.loads((section.file / "cores.json").read_text())
        names = {f.name for f in fields(Core)}
        entries = [c for c in doc["cores"] if c.get("status", "core") == "core"]
        cores = [
            Core(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items() if k in names})
            for c in entries  # not the empty positions or orientation cores
        ]
        if section.array_map is not None:
            join_array_map(cores, read_array_map(section.array_map), str(section.file))
        return [(core, (doc, c["name"])) for core, c in zip(cores, entries)]
    from fpstore.slides.slide import open_slide

    slide = open_slide(section.file, mpp=section.mpp)
    try:
        return [(core, None) for core in dearray(slide, section.array_map)]
    finally:
        slide.close()


def _dearrayed_halves(section: TmaSection, doc: dict, name: str, mpp: float, size: int):
    """The left and right halves of a core that `fpstore tma dearray` cropped, resampled to
    ``size`` px at ``mpp`` (its crop must cover that much tissue)."""
    import cv2

    from fpstore.slides.slide import resize_image

    crop_mpp, crop_px = float(doc["crop_mpp"]), int(doc["crop_px"])
    wanted = size * mpp / crop_mpp  # side in the crop's pixels
    if wanted > crop_px + 1:
        raise TrainingError(
            f"{section.file}: its crops are {crop_px * crop_mpp:.0f} um wide, smaller than the "
            f"{size * mpp:.0f} um asked for; dearray again with a larger --crop-px, or train "
            f"with --crop-px {int(crop_px * crop_mpp / mpp)}"
        )
    image = cv2.imread(str(section.file / "crops" / f"{name}.png"), cv2.IMREAD_COLOR)
    if image is None:
        raise TrainingError(f"cannot read the crop of core {name} in {section.file}/crops")
    image = image[..., ::-1]
    start = int(round((crop_px - wanted) / 2))
    side = int(round(wanted))
    square = np.ascontiguousarray(image[start : start + side, start : start + side])
    from fpstore.slides.tma import split_halves

    return split_halves(resize_image(square, size, size))


def prepare_sections(
    sections: list[TmaSection],
    folder: Path,
    mpp: float = 0.5,
    size: int = 1600,
    force: bool = False,
    progress: bool = True,
) -> CoreSet:
    """Crop every core of ``sections`` (``size`` px at ``mpp``), split it into halves and
    cache them in ``folder``; a cache made from the same files and settings is reused."""
    signature = _signature(sections, mpp, size)
    folder = Path(folder)
    clean_staging(folder.parent)  # what a killed cache write left, even when it is reused
    if not force and (folder / "cores.json").is_file():
        meta = read_meta(folder)
        if meta.get("source") == signature:
            return load_coreset(folder)
    found, skipped = _mapped_cores(sections)  # dearray first: the cache size must be known
    with staged_folder(folder) as tmp:
        half = (size, size // 2, 3)
        left = np.lib.format.open_memmap(tmp / "left.npy", "w+", np.uint8, (len(found), *half))
        right = np.lib.format.open_memmap(tmp / "right.npy", "w+", np.uint8, (len(found), *half))
        items = _crop_halves(found, left, right, mpp, size, progress)
        np.save(tmp / "tissue_left.npy", tissue_grid(left))
        np.save(tmp / "tissue_right.npy", tissue_grid(right))
        left.flush(), right.flush()
        del left, right
        write_index(tmp, items, mpp, {"source": signature, "skipped": skipped, "size": size})
    return load_coreset(folder)


def _mapped_cores(sections: list[TmaSection]) -> tuple[list[tuple], list[dict]]:
    """([(section, crop, core)] of the cores in their array maps, [the cores left out, and
    why]); a section without a single core, or sections without a mapped one, are refused."""
    found, skipped = [], []
    for section in sections:
        cores = _slide_cores(section)
        if not cores:
            raise TrainingError(
                f"no cores found in {section.file} (TMA table line {section.line}); is it a "
                "tissue microarray section?"
            )
        for core, crop in cores:
            if core.core_index is None:
                skipped.append(
                    {"section": section.name, "core": core.name, "why": "not in the array map"}
                )
            else:
                found.append((section, crop, core))
    if not found:
        names = ", ".join(s.name for s in sections)
        raise TrainingError(f"no core of the sections {names} matched their array maps")
    return found, skipped


def _crop_halves(found: list[tuple], left, right, mpp: float, size: int, progress: bool):
    """Fill ``left[j]`` and ``right[j]`` with the halves of the j-th core of ``found`` (from
    its `fpstore tma dearray` crop, or cut from its slide, opened once per run of its cores);
    returns the cores' index entries."""
    from tqdm import tqdm

    from fpstore.slides.slide import open_slide
    from fpstore.slides.tma import crop_core, split_halves

    items, slide, open_file = [], None, None
    try:
        for j, (section, crop, core) in enumerate(
            tqdm(found, desc="crop cores", unit="core", disable=not progress)
        ):
            if crop is not None:
                left[j], right[j] = _dearrayed_halves(section, *crop, mpp, size)
            else:
                if section.file != open_file:
                    if slide is not None:
                        slide.close()
                    slide, open_file = open_slide(section.file, mpp=section.mpp), section.file
                left[j], right[j] = split_halves(crop_core(slide, core, mpp=mpp, size=size))
            items.append(
                {
                    "key": f"{section.array}:{core.core_index}",
                    "patient_id": str(core.patient_id),
                    "section": section.name,
                    "site": section.site,
                    "core_index": int(core.core_index),
                }
            )
    finally:
        if slide is not None:
            slide.close()
    return items


def prepare_tma(
    tma: Path,
    cache: Path | None = None,
    mpp: float = 0.5,
    size: int = 1600,
    force: bool = False,
    roles: tuple[str, ...] = ROLES,
    progress: bool = True,
) -> dict[str, CoreSet]:
    """The cores of a TMA table by role (``train``, ``test``), cached in ``cache`` (default:
    ``cores/`` beside the table) as ``<role>/``. A role without sections is left out."""
    sections = read_tma_table(tma)
    folder = Path(cache) if cache is not None else table_path(tma).parent / "cores"
    out = {}
    for role in roles:
        chosen = [s for s in sections if s.role == role]
        if chosen:
            out[role] = prepare_sections(chosen, folder / role, mpp, size, force, progress)
    return out


# --- cohort pseudo-cores ---------------------------------------------------------------------


def place_squares(
    mask: np.ndarray, downsample: float, side: float, n: int, min_tissue: float
) -> list[tuple[int, int, float]]:
    """Up to ``n`` non-overlapping squares of ``side`` level-0 px on a tissue mask (bool,
    ``downsample`` level-0 px per mask px), most tissue first, each with at least
    ``min_tissue`` of its area on tissue: [(x0, y0, tissue fraction)] at level 0."""
    win = max(1, int(round(side / downsample)))
    h, w = mask.shape
    if win > h or win > w:
        return []
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    frac = (
        integral[win:, win:]
        - integral[:-win, win:]
        - integral[win:, :-win]
        + integral[:-win, :-win]
    ) / float(win * win)
    out = []
    for _ in range(n):
        y, x = np.unravel_index(int(np.argmax(frac)), frac.shape)
        if frac[y, x] < min_tissue:
            break
        out.append((int(round(x * downsample)), int(round(y * downsample)), float(frac[y, x])))
        frac[max(0, y - win + 1) : y + win, max(0, x - win + 1) : x + win] = -1.0
    return out


@dataclass(frozen=True)
class PseudoCoreSpec:
    """How pseudo-cores are cut from whole slides: ``size`` px squares at ``mpp`` (the paper's
    cores: 1600 px at 0.5 um/px), up to ``per_slide`` per slide, each at least ``min_tissue``
    tissue by the slide's tissue mask."""

    size: int = 1600
    mpp: float = 0.5
    per_slide: int = 4
    min_tissue: float = 0.6

    def __post_init__(self):
        from fpstore.config import check_range

        check_range("PseudoCoreSpec", "size", self.size, 32, 8192)
        check_range("PseudoCoreSpec", "mpp", self.mpp, 0.05, 20.0)
        check_range("PseudoCoreSpec", "per_slide", self.per_slide, 1, 1000)
        check_range("PseudoCoreSpec", "min_tissue", self.min_tissue, 0.0, 1.0)


def cohort_cores(
    store,
    cohort: str,
    spec: PseudoCoreSpec = PseudoCoreSpec(),
    cache: Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[CoreSet, dict]:
    """Pseudo-cores of a store cohort's slides, cached (default: the store's
    ``cache/fingerprint-cores/<cohort>/``); returns (cores, summary). Class = patient."""
    from fpstore.store.cohorts import read_cohort
    from fpstore.store.layout import StoreLayout

    layout = StoreLayout.of(store)
    slides = [s for s in read_cohort(layout, cohort).slide_records() if s.patient_id is not None]
    if not slides:
        raise TrainingError(f"cohort {cohort!r} has no slide with a patient to train on")
    if cache is None:
        if layout.is_remote:
            raise ConfigError(
                f"cohort {cohort!r} is in an object-storage store; give a local --cache folder "
                "for its pseudo-cores"
            )
        cache = layout.pseudo_cores_dir(cohort)
    folder = Path(cache) / f"{spec.size}px-{spec.mpp:g}mpp-{spec.per_slide}x-{spec.min_tissue:g}"
    signature = {
        "spec": [spec.size, spec.mpp, spec.per_slide, spec.min_tissue],
        "slides": hashlib.sha256(
            json.dumps(
                [[s.slide_id, s.patient_id, s.path, s.site, s.mpp_override] for s in slides]
            ).encode()
        ).hexdigest(),
    }
    clean_staging(folder.parent)  # what a killed cache write left, even when it is reused
    if not force and (folder / "cores.json").is_file():
        meta = read_meta(folder)
        if meta.get("source") == signature:
            return load_coreset(folder), meta["summary"]
    placed, failed = _place_on_slides(slides, spec, progress)
    patients = {s.patient_id for s in slides}
    found = {record.patient_id for record, squares, _ in placed if squares}
    if len(found) < 2:
        raise TrainingError(
            f"cohort {cohort!r}: {len(found)} of {len(patients)} patients have a square of "
            f"{spec.size * spec.mpp:g} um with at least {spec.min_tissue:.0%} tissue for a "
            "pseudo-core; training needs 2 or more. Give a smaller --crop-px or more slides"
        )
    summary = {
        "cohort": cohort,
        "slides": len(slides),
        "patients": len(patients),
        "patients_with_cores": len(found),
        "cores": sum(len(squares) for _, squares, _ in placed),
        "square_um": spec.size * spec.mpp,
        "failed_slides": failed,
    }
    cores = _cut(placed, cohort, spec, folder, signature, summary, progress)
    return cores, summary


def _place_on_slides(slides, spec: PseudoCoreSpec, progress: bool):
    """[(slide, squares, slide mpp)], {slide_id: error} for the slides that failed."""
    from tqdm import tqdm

    from fpstore.cohort.cohorts import open_cohort_slide
    from fpstore.slides.tissue_mask import tissue_mask

    placed, failed = [], {}
    for record in tqdm(slides, desc="place pseudo-cores", unit="slide", disable=not progress):
        try:
            with open_cohort_slide(record) as slide:
                found = tissue_mask(slide)
                side = spec.size * spec.mpp / slide.info.mpp  # level-0 px
                squares = place_squares(
                    found.mask, found.downsample, side, spec.per_slide, spec.min_tissue
                )
                placed.append((record, squares, slide.info.mpp))
        except FpstoreError as error:  # one bad slide is reported and skipped
            failed[record.slide_id] = str(error)
    return placed, failed


def _cut(placed, cohort, spec: PseudoCoreSpec, folder: Path, signature, summary, progress):
    from tqdm import tqdm

    from fpstore.cohort.cohorts import open_cohort_slide
    from fpstore.slides.tma import split_halves

    n = summary["cores"]
    with staged_folder(folder) as tmp:
        half = (spec.size, spec.size // 2, 3)
        left = np.lib.format.open_memmap(tmp / "left.npy", "w+", np.uint8, (n, *half))
        right = np.lib.format.open_memmap(tmp / "right.npy", "w+", np.uint8, (n, *half))
        items, j = [], 0
        for record, squares, mpp in tqdm(placed, desc="cut pseudo-cores", disable=not progress):
            if not squares:
                continue
            side = spec.size * spec.mpp / mpp
            with open_cohort_slide(record) as slide:
                for k, (x0, y0, fraction) in enumerate(squares):
                    left[j], right[j] = split_halves(slide.read_patch(x0, y0, side, spec.size))
                    items.append(
                        {
                            "key": f"{cohort}:{record.patient_id}",
                            "patient_id": record.patient_id,
                            "section": record.slide_id,
                            "site": record.site or cohort,
                            "core_index": k,
                            "x": x0,
                            "y": y0,
                            "tissue_fraction": round(fraction, 3),
                        }
                    )
                    j += 1
        np.save(tmp / "tissue_left.npy", tissue_grid(left))
        np.save(tmp / "tissue_right.npy", tissue_grid(right))
        left.flush(), right.flush()
        del left, right
        write_index(
            tmp, items, spec.mpp, {"source": signature, "summary": summary, "size": spec.size}
        )
    return load_coreset(folder)
