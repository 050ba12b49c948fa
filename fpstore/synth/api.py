"""``synthesize()``: write the synthetic cohorts, TMAs, tables and truth of a preset."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import fpstore
from fpstore.config import SYNTH_PARTS, TISSUE_TYPES
from fpstore.errors import ConfigError
from fpstore.synth import clinical
from fpstore.synth.labels import Recorded, draw_truth, prevalence, record
from fpstore.synth.morphology import Morphology, draw_morphology
from fpstore.synth.noise import seed_of
from fpstore.synth.presets import SynthPreset, get_preset
from fpstore.synth.render import TRUTH_DOWNSAMPLE, TileRenderer, chunk_px
from fpstore.synth.scene import Region, Scene
from fpstore.synth.sites import SITES, get_site
from fpstore.synth.tma import layout_array, section_scene
from fpstore.synth.wsi import chunks, write_slide

OWNED = ("manifest.json", "tcga", "external", "tma", "truth")  # what --force may replace
TMA_SECTIONS = {"train": ("A", "B", "B"), "test": ("A", "B")}  # the paper's Table 1


@dataclass
class SynthSummary:
    """What synthesize() wrote, for the CLI table and --json."""

    out: Path
    preset: str
    seed: int
    signal: bool
    cohorts: list[dict]
    files: int
    bytes: int
    seconds: float
    defects: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "preset": self.preset,
            "seed": self.seed,
            "signal": self.signal,
            "cohorts": self.cohorts,
            "files": self.files,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 2),
            "defects": self.defects,
        }


@dataclass
class Patient:
    patient_id: str
    cohort: str
    recorded: Recorded
    truth: dict
    morph: Morphology

    def describe(self) -> dict:
        return {
            "patient_id": self.patient_id,
            "recorded": self.recorded.as_dict(),
            "truth": self.truth,
            "morphology": self.morph.as_dict(),
        }


@dataclass
class _Job:
    path: Path  # relative to out
    scene: Scene
    site: str
    truth: Path  # relative to out
    render_mpp: float
    info: dict  # cohort, patient_id, kind, ...


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file; give a folder for --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(
                f"output folder {out} is not empty; pass --force to replace "
                f"what fpstore synth writes there ({', '.join(OWNED)})"
            )
        for name in OWNED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def draw_patient(seed: int, pid: str, cohort: str, cfg: SynthPreset, signal: bool) -> Patient:
    """A patient: true and recorded status, and the morphology they shape (unless not signal)."""
    rng = np.random.default_rng(seed_of(seed, "patient", pid))
    truth = draw_truth(rng)
    decoy = draw_truth(rng)  # shapes the tissue instead of the truth under --no-signal
    recorded = record(truth, rng, cfg.label_noise, complete=cohort != "tcga")
    morph = draw_morphology(
        rng, truth if signal else decoy, cfg.effect, seed_of(seed, "tissue", pid)
    )
    return Patient(
        pid, cohort, recorded, {"ER": truth.er, "PR": truth.pr, "Her2": truth.her2}, morph
    )


def wsi_scene(seed: int, name: str, morph: Morphology, size: tuple[int, int]) -> Scene:
    """One tissue section filling a whole slide of ``size`` level-0 px, keyed by slide name."""
    w, h = size
    wum, hum = w * 0.25, h * 0.25
    rng = np.random.default_rng(seed_of(seed, "placement", name))
    region = Region(
        morph=morph,
        bbox=(0.0, 0.0, wum, hum),
        section_seed=seed_of(seed, "section", name),
        centre=(wum / 2, hum / 2),
        radius=math.hypot(wum, hum) / 2,
        core=False,
        offset=(float(rng.uniform(0, 2e4)), float(rng.uniform(0, 2e4))),
        outline_seed=seed_of(seed, "outline", name),
    )
    return Scene(w, h, [region], seed=seed_of(seed, "cells", name))


def _chunks(job: _Job) -> int:
    return chunks(job.scene.width, job.scene.height, chunk_px(job.render_mpp))


def _run(out: Path, job: _Job, progress=None) -> dict:
    renderer = TileRenderer(job.scene, get_site(job.site), job.render_mpp, chunk_px(job.render_mpp))
    extra = {
        "Site": job.site,
        "Patient": job.info.get("patient_id", "array"),
        "Synthetic": f"fpstore {fpstore.__version__}",
    }
    written = write_slide(out / job.path, renderer, out / job.truth, extra, progress)
    return {
        **job.info,
        "path": job.path.as_posix(),
        "site": job.site,
        "width": written.width,
        "height": written.height,
        "mpp": written.mpp,
        "level_dimensions": [list(d) for d in written.level_dimensions],
        "truth": job.truth.as_posix(),
    }


def _cohort_row(name: str, patients: list[Patient], slides: int) -> dict:
    row = {"cohort": name, "patients": len(patients), "slides": slides}
    for marker in ("ER", "PR", "Her2"):
        p = prevalence([x.recorded for x in patients], marker)
        row[f"{marker}+"] = None if p is None else round(p, 3)
    return row


@dataclass
class _Part:
    """One cohort or array: slides to render, tables written, its manifest entry."""

    jobs: list[_Job]
    tables: list[Path]  # relative to out
    row: dict  # summary row
    doc: dict  # manifest entry
    defects: dict = field(default_factory=dict)


def _tcga(out: Path, cfg: SynthPreset, seed: int, signal: bool) -> _Part:
    """Biotab table + GDC-named diagnostic slides, with two defects users meet: a patient
    without a slide and a slide whose patient is not in the table."""
    rng = np.random.default_rng(seed_of(seed, "tcga"))
    barcodes: list[str] = []
    while len(barcodes) < cfg.tcga_patients + 2:
        code = clinical.tcga_barcode(cfg.tcga_sites[len(barcodes) % len(cfg.tcga_sites)], rng)
        if code not in barcodes:
            barcodes.append(code)
    patients = [draw_patient(seed, b, "tcga", cfg, signal) for b in barcodes]
    no_slide, no_record = patients[-2], patients[-1]
    jobs, slide_of = [], {}
    for p in patients:
        if p is no_slide:
            continue
        name = clinical.dx_slide_name(p.patient_id, rng)
        slide_of[p.patient_id] = name
        tss = p.patient_id.split("-")[1]  # the site code is the barcode's second field
        jobs.append(
            _Job(
                Path("tcga/slides") / name,
                wsi_scene(seed, name, p.morph, cfg.slide_size),
                tss,
                Path("truth") / (Path(name).stem + ".png"),
                cfg.render_mpp,
                {"kind": "wsi", "cohort": "tcga", "patient_id": p.patient_id},
            )
        )
    table = Path("tcga") / clinical.BIOTAB_NAME
    (out / "tcga").mkdir(parents=True, exist_ok=True)
    clinical.write_biotab(
        out / table,
        [
            clinical.biotab_row(p.patient_id, p.recorded, rng)
            for p in patients
            if p is not no_record
        ],
    )
    in_table = [p for p in patients if p is not no_record]
    doc = {
        "clinical": table.as_posix(),
        "patients": [
            dict(p.describe(), slide=slide_of.get(p.patient_id), in_table=p is not no_record)
            for p in patients
        ],
    }
    defects = {
        "patient_without_slide": no_slide.patient_id,
        "slide_without_patient": slide_of[no_record.patient_id],
        "slide_without_patient_barcode": no_record.patient_id,
    }
    return _Part(jobs, [table], _cohort_row("tcga", in_table, len(jobs)), doc, defects)


def _external(out: Path, cfg: SynthPreset, seed: int, signal: bool) -> _Part:
    """Other sites, plain CSV labels (patient_id, slide, ER, PR, Her2, site)."""
    patients = [
        draw_patient(seed, f"EXT-{i + 1:04d}", "external", cfg, signal)
        for i in range(cfg.external_patients)
    ]
    jobs, rows = [], []
    for i, p in enumerate(patients):
        site = cfg.external_sites[i % len(cfg.external_sites)]
        name = f"{p.patient_id}.tiff"
        jobs.append(
            _Job(
                Path("external/slides") / name,
                wsi_scene(seed, name, p.morph, cfg.slide_size),
                site,
                Path("truth") / f"{p.patient_id}.png",
                cfg.render_mpp,
                {"kind": "wsi", "cohort": "external", "patient_id": p.patient_id},
            )
        )
        rows.append(
            {"patient_id": p.patient_id, "slide": name, **p.recorded.as_dict(), "site": site}
        )
    table = Path("external/labels.csv")
    (out / "external").mkdir(parents=True, exist_ok=True)
    clinical.write_csv(out / table, rows, ["patient_id", "slide", "ER", "PR", "Her2", "site"])
    doc = {
        "clinical": table.as_posix(),
        "patients": [dict(p.describe(), slide=f"{p.patient_id}.tiff") for p in patients],
    }
    return _Part(jobs, [table], _cohort_row("external", patients, len(jobs)), doc)


def _tma(out: Path, cfg: SynthPreset, seed: int, signal: bool, array: str) -> _Part:
    """A tissue microarray (own patients) cut in serial sections stained at TMA_SECTIONS."""
    n_patients, n_cores = cfg.tma_train if array == "train" else cfg.tma_test
    patients = [
        draw_patient(seed, f"{array.upper()}-{i + 1:03d}", f"tma-{array}", cfg, signal)
        for i in range(n_patients)
    ]
    layout = layout_array(
        array,
        [p.patient_id for p in patients],
        n_cores,
        cfg.core_um,
        np.random.default_rng(seed_of(seed, "array", array)),
    )
    morphs = {p.patient_id: p.morph for p in patients}
    jobs = []
    for s, site in enumerate(TMA_SECTIONS[array], start=1):
        scene = section_scene(layout, morphs, s, seed)
        jobs.append(
            _Job(
                Path(f"tma/{array}/section{s}.tiff"),
                scene,
                site,
                Path(f"truth/tma-{array}-section{s}.png"),
                cfg.render_mpp,
                {"kind": "tma", "cohort": f"tma-{array}", "section": s, "cores": scene.cores},
            )
        )
    table = Path(f"tma/{array}/array_map.csv")
    (out / table).parent.mkdir(parents=True, exist_ok=True)
    clinical.write_csv(
        out / table,
        [spot.__dict__ for spot in layout.spots],
        ["row", "column", "core_index", "patient_id"],
    )
    doc = {
        "array_map": table.as_posix(),
        "core_um": cfg.core_um,
        "core_diameter_px": cfg.core_um / 0.25,
        "rows": layout.rows,
        "columns": layout.columns,
        "cores": len(layout.spots),
        "sections": [{"path": j.path.as_posix(), "site": j.site} for j in jobs],
        "patients": [p.describe() for p in patients],
    }
    return _Part(jobs, [table], _cohort_row(f"tma-{array}", patients, len(jobs)), doc)


def _tma_table(out: Path, *arrays: _Part) -> Path:
    """``tma/sections.csv``: the arrays' sections as a user's TMA table (file, array, site,
    array map, role; paths relative to the table), which ``train-fingerprint --tma`` reads."""
    table = Path("tma/sections.csv")
    rows = []
    for part in arrays:
        array = part.doc["array_map"].split("/")[1]
        for job in part.jobs:
            rows.append(
                {
                    "file": job.path.relative_to("tma").as_posix(),
                    "array": array,
                    "site": job.site,
                    "array_map": Path(part.doc["array_map"]).relative_to("tma").as_posix(),
                    "role": array,
                }
            )
    clinical.write_csv(out / table, rows, ["file", "array", "site", "array_map", "role"])
    return table


def synthesize(
    preset: str,
    out: Path,
    seed: int = 0,
    signal: bool = True,
    force: bool = False,
    slide_size: tuple[int, int] | None = None,
    workers: int = 1,
    progress: bool = True,
    only: tuple[str, ...] = SYNTH_PARTS,
) -> SynthSummary:
    """Write the synthetic cohorts of ``preset`` into ``out`` (see docs/ARCHITECTURE.md).

    The same arguments give the same bytes (``workers`` only changes speed), and each part
    in ``only`` is the same whichever other parts are written beside it.
    ``signal=False`` draws the morphology from a decoy status independent of the
    recorded labels: a negative control. Refuses a non-empty ``out`` unless ``force``.
    """
    started = time.perf_counter()
    cfg = get_preset(preset, slide_size)
    if workers < 1:
        raise ConfigError(f"workers={workers!r}; give 1 or more")
    if not only or not set(only) <= set(SYNTH_PARTS):
        raise ConfigError(f"only={list(only)!r}: choose one or more of {', '.join(SYNTH_PARTS)}")
    out = Path(out)
    _prepare(out, force)
    parts = {}
    if "tcga" in only:
        parts["tcga"] = _tcga(out, cfg, seed, signal)
    if "external" in only:
        parts["external"] = _external(out, cfg, seed, signal)
    if "tma" in only:
        parts["train"] = _tma(out, cfg, seed, signal, "train")
        parts["test"] = _tma(out, cfg, seed, signal, "test")
        parts["test"].tables.append(_tma_table(out, parts["train"], parts["test"]))
    jobs = [job for part in parts.values() for job in part.jobs]
    slides = _render_all(out, jobs, workers, progress)

    truth = {
        Path(s["truth"]).stem: {
            "slide": s["path"],
            "mask": s["truth"],
            "downsample": TRUTH_DOWNSAMPLE,
            "width": s["width"],
            "height": s["height"],
            "classes": list(TISSUE_TYPES),
            "cores": s.get("cores", []),
        }
        for s in slides
    }
    _write_json(out / "truth" / "truth.json", truth)
    rows = [part.row for part in parts.values()]
    defects = {"tcga": parts["tcga"].defects} if "tcga" in parts else {}
    files = [{k: v for k, v in s.items() if k != "cores"} for s in slides]
    files += [
        {"path": t.as_posix(), "kind": "table"} for part in parts.values() for t in part.tables
    ]
    _write_json(
        out / "manifest.json",
        {
            "fpstore_version": fpstore.__version__,
            "preset": cfg.name,
            "seed": seed,
            "signal": signal,
            "parts": [name for name in SYNTH_PARTS if name in only],
            "config": cfg.as_dict(),
            "mpp": 0.25,
            "truth_downsample": TRUTH_DOWNSAMPLE,
            "tissue_types": list(TISSUE_TYPES),
            "counts": {
                r["cohort"]: {"patients": r["patients"], "slides": r["slides"]} for r in rows
            },
            "cohorts": {name: parts[name].doc for name in ("tcga", "external") if name in parts},
            "tma": {name: parts[name].doc for name in ("train", "test") if name in parts},
            "defects": defects,
            "sites": {name: SITES[name].describe() for name in sorted({j.site for j in jobs})},
            "files": files,
        },
    )
    written = [f["path"] for f in files] + [s["truth"] for s in slides]
    written += ["manifest.json", "truth/truth.json"]
    size = sum((out / p).stat().st_size for p in written)
    return SynthSummary(
        out,
        cfg.name,
        seed,
        signal,
        rows,
        len(written),
        size,
        time.perf_counter() - started,
        defects,
    )


def _render_all(out: Path, jobs: list[_Job], workers: int, progress: bool) -> list[dict]:
    from tqdm import tqdm

    bar = tqdm(
        total=sum(_chunks(j) for j in jobs), unit="chunk", desc="synth", disable=not progress
    )
    try:
        if workers == 1:
            results = []
            for job in jobs:
                results.append(_run(out, job, bar.update))
            return results
        with ProcessPoolExecutor(max_workers=min(workers, os.cpu_count() or 1)) as pool:
            futures = [pool.submit(_run, out, job) for job in jobs]
            results = []
            for job, future in zip(jobs, futures):
                results.append(future.result())
                bar.update(_chunks(job))
            return results
    finally:
        bar.close()


def _write_json(path: Path, document) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, sort_keys=True, default=_plain) + "\n")


def _plain(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"not JSON serialisable: {value!r}")
