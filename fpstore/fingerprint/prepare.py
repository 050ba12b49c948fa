"""Prepare TMA cores once: dearray every section, crop each core at 0.5 um/px to a
1600 px square, split it into halves, and cache them (``fpstore.fingerprint.data``) so that
training and matching read memory-mapped arrays instead of slides.

Input layout (``fpstore synth``): ``TMA/<array>/section<k>.tiff`` + ``TMA/<array>/array_map.csv``
for the arrays ``train`` and ``test``. Sites per section come from the synthetic manifest
(``TMA/../manifest.json``) when it names them, else from the paper's Table 1 layout
(train: A, B, B; test: A, B), else the section name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fpstore.errors import ConfigError, SlideError
from fpstore.fingerprint.data import (
    CoreSet,
    commit_folder,
    load_coreset,
    new_folder,
    read_meta,
    tissue_grid,
)

ARRAYS = ("train", "test")
_TABLE1_SITES = {"train": ("A", "B", "B"), "test": ("A", "B")}
SECTION_SUFFIXES = (".tiff", ".tif", ".svs")


def section_files(array_dir: Path) -> list[Path]:
    files = sorted(
        p for p in Path(array_dir).glob("section*") if p.suffix.lower() in SECTION_SUFFIXES
    )
    if not files:
        raise ConfigError(
            f"no section*.tiff slides in {array_dir}; expected the layout of `fpstore synth`"
        )
    return files


def _manifest_sites(tma_dir: Path, array: str) -> dict[str, str]:
    """section stem -> site from the synthetic manifest, where it records one."""
    path = Path(tma_dir).parent / "manifest.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    sites = {}
    for entry in doc.get("files", []) if isinstance(doc.get("files"), list) else []:
        if (
            isinstance(entry, dict)
            and entry.get("site")
            and f"tma/{array}/" in str(entry.get("path", ""))
        ):
            sites[Path(entry["path"]).name.split(".")[0]] = str(entry["site"])
    return sites


def section_sites(tma_dir: Path, array: str, sections: list[Path]) -> list[str]:
    found = _manifest_sites(tma_dir, array)
    table1 = _TABLE1_SITES.get(array, ())
    sites = []
    for k, path in enumerate(sections):
        stem = path.name.split(".")[0]
        sites.append(found.get(stem) or (table1[k] if k < len(table1) else stem))
    return sites


def _signature(files: list[Path], mpp: float, size: int) -> dict:
    return {
        "mpp": mpp,
        "size": size,
        "files": {str(p.resolve()): [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
    }


def prepare_array(
    tma_dir: Path, array: str, out: Path, mpp: float = 0.5, size: int = 1600, force: bool = False
) -> dict:
    """Cache the cores of one array (all its sections) in ``out/<array>``; reuse a cache made
    from the same files with the same settings."""
    from fpstore.slides.slide import open_slide
    from fpstore.slides.tma import crop_core, dearray, split_halves

    array_dir = Path(tma_dir) / array
    array_map = array_dir / "array_map.csv"
    if not array_map.is_file():
        raise ConfigError(f"{array_map} is missing; each TMA array folder needs its array_map.csv")
    sections = section_files(array_dir)
    signature = _signature(sections + [array_map], mpp, size)
    folder = Path(out) / array
    if not force and (folder / "cores.json").is_file():
        meta = read_meta(folder)
        if meta.get("source") == signature:
            return {
                "array": array,
                "cached": True,
                "n": len(meta["items"]),
                "folder": str(folder),
                "skipped": meta.get("skipped", []),
            }
    sites = section_sites(tma_dir, array, sections)
    found, skipped = [], []
    for path, site in zip(sections, sites):  # dearray first: the cache size must be known
        section = path.name.split(".")[0]
        slide = open_slide(path)
        try:
            cores = dearray(slide, array_map)
        finally:
            slide.close()
        if not cores:
            raise SlideError(f"no cores found in {path}; is it a tissue microarray section?")
        for core in cores:
            if core.core_index is None:
                skipped.append(
                    {"section": section, "core": core.name, "why": "not in the array map"}
                )
            else:
                found.append((path, section, site, core))
    if not found:
        raise SlideError(f"no core of {array_dir} matched {array_map}")
    tmp = new_folder(folder)
    half = (size, size // 2, 3)
    left = np.lib.format.open_memmap(tmp / "left.npy", "w+", np.uint8, (len(found), *half))
    right = np.lib.format.open_memmap(tmp / "right.npy", "w+", np.uint8, (len(found), *half))
    items, slide, open_path = [], None, None
    try:
        for j, (path, section, site, core) in enumerate(
            tqdm(found, desc=f"crop {array}", unit="core")
        ):
            if path != open_path:
                if slide is not None:
                    slide.close()
                slide, open_path = open_slide(path), path
            left[j], right[j] = split_halves(crop_core(slide, core, mpp=mpp, size=size))
            items.append(
                {
                    "key": f"{array}:{core.core_index}",
                    "patient_id": core.patient_id,
                    "section": section,
                    "site": site,
                    "core_index": core.core_index,
                }
            )
    finally:
        if slide is not None:
            slide.close()
    np.save(tmp / "tissue_left.npy", tissue_grid(left))
    np.save(tmp / "tissue_right.npy", tissue_grid(right))
    left.flush(), right.flush()
    del left, right
    commit_folder(tmp, folder, items, mpp, {"source": signature, "skipped": skipped, "size": size})
    return {
        "array": array,
        "cached": False,
        "n": len(items),
        "folder": str(folder),
        "skipped": skipped,
    }


def prepare_cores(
    tma_dir: Path,
    out: Path | None = None,
    mpp: float = 0.5,
    size: int = 1600,
    force: bool = False,
    arrays=ARRAYS,
) -> dict[str, CoreSet]:
    """Dearray, crop and cache the ``train`` and ``test`` arrays of ``tma_dir``.

    The cache goes to ``out`` (default ``TMA/cores``); returns the memory-mapped CoreSets.
    """
    tma_dir = Path(tma_dir)
    if not tma_dir.is_dir():
        raise ConfigError(
            f"--tma {tma_dir} is not a folder; give the tma/ folder that `fpstore synth` wrote"
        )
    out = Path(out) if out is not None else tma_dir / "cores"
    result = {}
    for array in arrays:
        summary = prepare_array(tma_dir, array, out, mpp=mpp, size=size, force=force)
        result[array] = load_coreset(Path(summary["folder"]))
    return result
