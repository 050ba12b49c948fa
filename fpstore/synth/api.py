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
from fpstore.config import TISSUE_TYPES
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
        return {"out": str(self.out), "preset": self.preset, "seed": self.seed,
                "signal": self.signal, "cohorts": self.cohorts, "files": self.files,
                "bytes": self.bytes, "seconds": round(self.seconds, 2), "defects": self.defects}


@dataclass
class Patient:
    patient_id: str
    cohort: str
    recorded: Recorded
    truth: dict
    morph: Morphology

    def describe(self) -> dict:
        return {"patient_id": self.patient_id, "recorded": self.recorded.as_dict(),
                "truth": self.truth, "morphology": self.morph.as_dict()}


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
            raise ConfigError(f"output folder {out} is not empty; pass --force to replace "
                              f"what fpstore synth writes there ({', '.join(OWNED)})")
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
    morph = draw_morphology(rng, truth if signal else decoy, cfg.effect,
                            seed_of(seed, "tissue", pid) % 2**40)
    return Patient(pid, cohort, recorded, {"ER": truth.er, "PR": truth.pr, "Her2": truth.her2},
                    morph)


def _wsi_scene(seed: int, name: str, morph: Morphology, size: tuple[int, int]) -> Scene:
    w, h = size
    wum, hum = w * 0.25, h * 0.25
    rng = np.random.default_rng(seed_of(seed, "placement", name))
    region = Region(morph=morph, bbox=(0.0, 0.0, wum, hum),
                    section_seed=seed_of(seed, "section", name), centre=(wum / 2, hum / 2),
                    radius=math.hypot(wum, hum) / 2, core=False,
                    offset=(float(rng.uniform(0, 2e4)), float(rng.uniform(0, 2e4))),
                    outline_seed=seed_of(seed, "outline", name) % 2**40)
    return Scene(w, h, [region], seed=seed_of(seed, "cells", name) % 2**40)


def _chunks(job: _Job) -> int:
    return chunks(job.scene.width, job.scene.height, chunk_px(job.render_mpp))


def _run(out: Path, job: _Job) -> dict:
    renderer = TileRenderer(job.scene, get_site(job.site), job.render_mpp, chunk_px(job.render_mpp))
    extra = {"Site": job.site, "Patient": job.info.get("patient_id", "array"),
             "Synthetic": f"fpstore {fpstore.__version__}"}
    written = write_slide(out / job.path, renderer, out / job.truth, extra)
    return {**job.info, "path": job.path.as_posix(), "site": job.site,
            "width": written.width, "height": written.height, "mpp": written.mpp,
            "level_dimensions": [list(d) for d in written.level_dimensions],
            "truth": job.truth.as_posix()}


def _cohort_row(name: str, patients: list[Patient], slides: int) -> dict:
    row = {"cohort": name, "patients": len(patients), "slides": slides}
    for marker in ("ER", "PR", "Her2"):
        p = prevalence([x.recorded for x in patients], marker)
        row[f"{marker}+"] = None if p is None else round(p, 3)
    return row


def synthesize(preset: str, out: Path, seed: int = 0, signal: bool = True, force: bool = False,
               slide_size: tuple[int, int] | None = None, workers: int = 1,
               progress: bool = True) -> SynthSummary:
    """Write the synthetic cohorts of ``preset`` into ``out`` (see docs/ARCHITECTURE.md).

    The same arguments give the same bytes (``workers`` only changes speed).
    ``signal=False`` draws the morphology from a decoy status independent of the
    recorded labels: a negative control. Refuses a non-empty ``out`` unless ``force``.
    """
    started = time.perf_counter()
    cfg = get_preset(preset, slide_size)
    if workers < 1:
        raise ConfigError(f"workers={workers!r}; give 1 or more")
    out = Path(out)
    _prepare(out, force)
    rmpp = cfg.render_mpp

    # -- tcga-like cohort: Biotab table + GDC-named diagnostic slides, with two defects.
    rng = np.random.default_rng(seed_of(seed, "tcga"))
    barcodes: list[str] = []
    while len(barcodes) < cfg.tcga_patients + 2:
        tss = cfg.tcga_sites[len(barcodes) % len(cfg.tcga_sites)]
        code = clinical.tcga_barcode(tss, rng)
        if code not in barcodes:
            barcodes.append(code)
    tcga = [draw_patient(seed, b, "tcga", cfg, signal) for b in barcodes]
    no_slide, no_record = tcga[-2], tcga[-1]
    jobs: list[_Job] = []
    slide_of: dict[str, str] = {}
    for p in tcga:
        if p is no_slide:
            continue
        name = clinical.dx_slide_name(p.patient_id, rng)
        slide_of[p.patient_id] = name
        tss = p.patient_id.split("-")[1]
        jobs.append(_Job(Path("tcga/slides") / name, _wsi_scene(seed, name, p.morph, cfg.slide_size),
                         tss, Path("truth") / (Path(name).stem + ".png"), rmpp,
                         {"kind": "wsi", "cohort": "tcga", "patient_id": p.patient_id}))
    tables = [out / "tcga" / clinical.BIOTAB_NAME, out / "external" / "labels.csv"]
    (out / "tcga").mkdir(parents=True, exist_ok=True)
    clinical.write_biotab(tables[0], [clinical.biotab_row(p.patient_id, p.recorded, rng)
                                      for p in tcga if p is not no_record])

    # -- external cohort: other sites, plain CSV labels.
    external = [draw_patient(seed, f"EXT-{i + 1:04d}", "external", cfg, signal)
                for i in range(cfg.external_patients)]
    rows = []
    for i, p in enumerate(external):
        site = cfg.external_sites[i % len(cfg.external_sites)]
        name = f"{p.patient_id}.tiff"
        jobs.append(_Job(Path("external/slides") / name,
                         _wsi_scene(seed, name, p.morph, cfg.slide_size), site,
                         Path("truth") / f"{p.patient_id}.png", rmpp,
                         {"kind": "wsi", "cohort": "external", "patient_id": p.patient_id}))
        rows.append({"patient_id": p.patient_id, "slide": name, **p.recorded.as_dict(),
                     "site": site})
    (out / "external").mkdir(parents=True, exist_ok=True)
    clinical.write_csv(tables[1], rows, ["patient_id", "slide", "ER", "PR", "Her2", "site"])

    # -- tissue microarrays: train (3 sections: A, B, B) and test (2: A, B), other patients.
    tma_patients: dict[str, list[Patient]] = {}
    layouts = {}
    for array, (n_patients, n_cores) in (("train", cfg.tma_train), ("test", cfg.tma_test)):
        patients = [draw_patient(seed, f"{array.upper()}-{i + 1:03d}", f"tma-{array}", cfg, signal)
                    for i in range(n_patients)]
        tma_patients[array] = patients
        layout = layout_array(array, [p.patient_id for p in patients], n_cores, cfg.core_um,
                              np.random.default_rng(seed_of(seed, "array", array)))
        layouts[array] = layout
        morphs = {p.patient_id: p.morph for p in patients}
        for s, site in enumerate(TMA_SECTIONS[array], start=1):
            scene = section_scene(layout, morphs, s, seed)
            jobs.append(_Job(Path(f"tma/{array}/section{s}.tiff"), scene, site,
                             Path(f"truth/tma-{array}-section{s}.png"), rmpp,
                             {"kind": "tma", "cohort": f"tma-{array}", "section": s,
                              "cores": scene.cores}))
        (out / "tma" / array).mkdir(parents=True, exist_ok=True)
        map_path = out / "tma" / array / "array_map.csv"
        clinical.write_csv(map_path, [s.__dict__ for s in layout.spots],
                           ["row", "column", "core_index", "patient_id"])
        tables.append(map_path)

    # -- render every slide (tile by tile), in parallel when asked.
    slides = _render_all(out, jobs, workers, progress)

    truth_doc = {}
    for s in slides:
        key = Path(s["truth"]).stem
        truth_doc[key] = {"slide": s["path"], "mask": s["truth"], "downsample": TRUTH_DOWNSAMPLE,
                          "width": s["width"], "height": s["height"],
                          "classes": list(TISSUE_TYPES), "cores": s.get("cores", [])}
    _write_json(out / "truth" / "truth.json", truth_doc)

    defects = {
        "tcga": {
            "patient_without_slide": no_slide.patient_id,
            "slide_without_patient": slide_of[no_record.patient_id],
            "slide_without_patient_barcode": no_record.patient_id,
        }
    }
    cohort_rows = [
        _cohort_row("tcga", [p for p in tcga if p is not no_record], len(tcga) - 1),
        _cohort_row("external", external, len(external)),
        _cohort_row("tma-train", tma_patients["train"], len(TMA_SECTIONS["train"])),
        _cohort_row("tma-test", tma_patients["test"], len(TMA_SECTIONS["test"])),
    ]
    files = [{k: v for k, v in s.items() if k != "cores"} for s in slides]
    files += [{"path": t.relative_to(out).as_posix(), "kind": "table"} for t in tables]
    manifest = {
        "fpstore_version": fpstore.__version__,
        "preset": cfg.name,
        "seed": seed,
        "signal": signal,
        "config": cfg.as_dict(),
        "mpp": 0.25,
        "truth_downsample": TRUTH_DOWNSAMPLE,
        "tissue_types": list(TISSUE_TYPES),
        "counts": {row["cohort"]: {"patients": row["patients"], "slides": row["slides"]}
                   for row in cohort_rows},
        "cohorts": {
            "tcga": {"clinical": tables[0].relative_to(out).as_posix(),
                     "patients": [dict(p.describe(), slide=slide_of.get(p.patient_id),
                                       in_table=p is not no_record) for p in tcga]},
            "external": {"clinical": "external/labels.csv",
                         "patients": [dict(p.describe(), slide=f"{p.patient_id}.tiff")
                                      for p in external]},
        },
        "tma": {
            array: {"array_map": f"tma/{array}/array_map.csv", "core_um": cfg.core_um,
                    "core_diameter_px": cfg.core_um / 0.25, "rows": layouts[array].rows,
                    "columns": layouts[array].columns, "cores": len(layouts[array].spots),
                    "sections": [{"path": f"tma/{array}/section{i}.tiff", "site": site}
                                 for i, site in enumerate(TMA_SECTIONS[array], start=1)],
                    "patients": [p.describe() for p in tma_patients[array]]}
            for array in ("train", "test")
        },
        "defects": defects,
        "sites": {name: SITES[name].describe() for name in sorted({j.site for j in jobs})},
        "files": files,
    }
    _write_json(out / "manifest.json", manifest)
    n_files = len(files) + 2 + len(slides)  # + manifest, truth.json, truth images
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return SynthSummary(out, cfg.name, seed, signal, cohort_rows, n_files, size,
                        time.perf_counter() - started, defects)


def _render_all(out: Path, jobs: list[_Job], workers: int, progress: bool) -> list[dict]:
    from tqdm import tqdm

    bar = tqdm(total=sum(_chunks(j) for j in jobs), unit="chunk", desc="synth",
               disable=not progress)
    try:
        if workers == 1:
            results = []
            for job in jobs:
                results.append(_run(out, job))
                bar.update(_chunks(job))
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
