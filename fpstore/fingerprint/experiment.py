"""The library calls behind the commands: train a fingerprint network from a TMA folder,
play the matching game with a checkpoint, and run the Table 2 experiment.

Table 2 on the synthetic arrays: the small training set is the paper's (sections 1 and 2 of
the training array: one section per site); the large one adds pseudo-cores cut from the
whole slides of other patients (``extra_cores``), as the paper added 13,000 images from
other sources. Each setting is trained without and with CycleGAN style transfer, then
scored by the right-half accuracy on the training cores ("CV acc."), and the matching game
on the test array (core and pooled patient accuracy).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from fpstore.encoders.checkpoint import load_checkpoint, save_checkpoint
from fpstore.errors import ConfigError, TrainingError
from fpstore.fingerprint.data import CoreSet, load_coreset, tissue_grid, write_coreset
from fpstore.fingerprint.prepare import prepare_cores
from fpstore.fingerprint.stain import (
    CLASSICAL,
    add_restyled,
    check_stain,
    cyclegan_config,
    fit_site_cyclegan,
    site_targets,
)
from fpstore.fingerprint.train import TrainConfig, get_config, resolve_device, train_network


def _rows_for(cores: CoreSet, sections) -> np.ndarray:
    if not sections:
        return np.arange(len(cores))
    known = sorted(set(cores.section.tolist()))
    bad = [s for s in sections if s not in known]
    if bad:
        raise ConfigError(
            f"training section(s) {bad} not in the training array; sections: {', '.join(known)}"
        )
    return np.flatnonzero(np.isin(cores.section, list(sections)))


def restyle_for(
    folder: Path,
    cores: CoreSet,
    rows: np.ndarray,
    stain: str,
    config_name: str,
    device,
    progress: bool,
    gan=None,
):
    """Make the restyled copies ``stain`` of ``cores``; returns (style name or None, info, gan)."""
    check_stain(stain)
    if stain == "none":
        return None, {}, None
    if stain in CLASSICAL:
        info = add_restyled(
            folder, cores, stain, targets=site_targets(cores, rows), progress=progress
        )
        return stain, info, None
    if gan is None:
        gan_path = Path(folder) / "restyled" / "cyclegan.pt"
        cfg = cyclegan_config(config_name)
        gan = _cached_gan(gan_path, cfg, cores, rows)
        if gan is None:
            gan = fit_site_cyclegan(cores, rows, cfg, device=device, progress=progress)
            gan_path.parent.mkdir(parents=True, exist_ok=True)
            gan.save(gan_path)
            (gan_path.with_suffix(".json")).write_text(json.dumps(_gan_key(cfg, cores, rows)))
    info = add_restyled(folder, cores, "cyclegan", gan=gan, device=device, progress=progress)
    info["cyclegan_history"] = gan.history[-1:]
    return "cyclegan", info, gan


def _gan_key(cfg, cores, rows) -> dict:
    return {
        "config": cfg.to_dict(),
        "rows": cores.key[rows].astype(str).tolist(),
        "sections": cores.section[rows].astype(str).tolist(),
    }


def _cached_gan(path: Path, cfg, cores, rows):
    from fpstore.fingerprint.cyclegan import CycleGAN

    key_path = path.with_suffix(".json")
    if (
        path.is_file()
        and key_path.is_file()
        and json.loads(key_path.read_text()) == _gan_key(cfg, cores, rows)
    ):
        return CycleGAN.load(path)
    return None


def _checkpoint_meta(
    result, cfg: TrainConfig, cores: CoreSet, rows, stain: str, extra: dict
) -> dict:
    return {
        "preprocessing": result.preprocessing,
        "train_config": cfg.to_dict(),
        "data": {
            "n_cores": int(len(rows)),
            "n_classes": len(result.classes),
            "n_patients": int(len(set(cores.patient_id[rows].tolist()))),
            "sections": sorted(set(cores.section[rows].tolist())),
            "sites": sorted(set(cores.site[rows].tolist())),
            "stain": stain,
            "classes": result.classes,
            "class_patients": result.class_patients,
            **extra,
        },
        "training": result.summary(),
        "history": result.history,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def train_fingerprint(
    tma_dir: Path,
    out: Path,
    config: str = "demo",
    stain: str = "none",
    cache: Path | None = None,
    sections=None,
    crop_px: int = 1600,
    progress: bool = True,
    **overrides,
) -> dict:
    """Prepare the cores of ``tma_dir``, make restyled copies for ``stain``, train, and save a
    self-describing checkpoint to ``out``. ``overrides`` are TrainConfig fields
    (max_steps, arch, device, seed, ...). Returns a summary."""
    check_stain(stain)
    cfg = get_config(config, **overrides)
    device = resolve_device(cfg.device)
    cores_by_array = prepare_cores(tma_dir, cache, size=crop_px, arrays=("train",))
    train = cores_by_array["train"]
    folder = Path(cache) if cache else Path(tma_dir) / "cores"
    rows = _rows_for(train, sections)
    style, info, _ = restyle_for(folder / "train", train, rows, stain, config, device, progress)
    result = train_network(train, cfg, rows, style=style, progress=progress)
    meta = save_checkpoint(out, result.model, _checkpoint_meta(result, cfg, train, rows, stain, {}))
    return {
        "checkpoint": str(out),
        "content_hash": meta["content_hash"],
        "arch": cfg.arch,
        "stain": stain,
        "device": str(device),
        **result.summary(),
        "train_cores": int(len(rows)),
        "restyle": info,
    }


def match(
    model_path: Path,
    tma_dir: Path,
    cache: Path | None = None,
    left_section: str | None = None,
    right_section: str | None = None,
    device: str = "auto",
    crop_px: int = 1600,
    progress: bool = True,
) -> dict:
    """The matching game of a checkpoint on the test array of ``tma_dir``."""
    from fpstore.fingerprint.matching import play

    model, meta = load_checkpoint(model_path)
    test = prepare_cores(tma_dir, cache, size=crop_px, arrays=("test",))["test"]
    result = play(
        model,
        meta["preprocessing"],
        test,
        left_section,
        right_section,
        device=resolve_device(device),
        progress=progress,
    )
    return {"checkpoint": str(model_path), **result.to_dict()}


# --- Table 2 -----------------------------------------------------------------------------------


def extra_cores(
    slides: list[Path], size: int, mpp: float = 0.5, per_slide: int = 2, progress: bool = True
) -> CoreSet:
    """Pseudo-cores from whole slides of other patients: per slide, up to ``per_slide``
    non-overlapping ``size`` px squares at ``mpp`` centred on the most tissue. Each square is
    its own class (the paper's extra training images had one index each)."""
    import cv2
    from tqdm import tqdm

    from fpstore.slides.slide import open_slide
    from fpstore.slides.tissue_mask import tissue_mask
    from fpstore.slides.tma import split_halves

    lefts, rights, items = [], [], []
    for path in tqdm(slides, desc="extra cores", unit="slide", disable=not progress):
        slide = open_slide(path)
        try:
            found = tissue_mask(slide)
            down = found.downsample
            side = size * mpp / slide.info.mpp  # level-0 px
            win = max(1, int(round(side / down)))
            # Zero outside the slide, so the best window lies on it.
            density = cv2.blur(
                found.mask.astype(np.float32), (win, win), borderType=cv2.BORDER_CONSTANT
            )
            for k in range(per_slide):
                cy, cx = np.unravel_index(np.argmax(density), density.shape)
                if density[cy, cx] < 0.5:
                    break
                density[max(0, cy - win) : cy + win, max(0, cx - win) : cx + win] = 0
                x0, y0 = int(cx * down - side / 2), int(cy * down - side / 2)
                left, right = split_halves(slide.read_patch(x0, y0, side, size))
                lefts.append(left)
                rights.append(right)
                sid = slide.info.slide_id
                items.append(
                    {
                        "key": f"slide:{sid}:{k}",
                        "patient_id": sid[:12],
                        "section": sid,
                        "site": "other",
                    }
                )
        finally:
            slide.close()
    if not items:
        raise TrainingError(f"no tissue squares of {size} px found in {len(slides)} slides")
    left, right = np.stack(lefts), np.stack(rights)
    col = lambda name: np.array([i[name] for i in items], object)  # noqa: E731
    return CoreSet(
        left=left,
        right=right,
        key=col("key"),
        patient_id=col("patient_id"),
        section=col("section"),
        site=col("site"),
        core_index=np.arange(len(items)),
        mpp=mpp,
        tissue_left=tissue_grid(left),
        tissue_right=tissue_grid(right),
    )


def run_table2(
    tma_dir: Path,
    out: Path,
    config: str = "demo",
    extra_slides: Path | None = None,
    per_slide: int = 2,
    cache: Path | None = None,
    crop_px: int = 1600,
    progress: bool = True,
    **overrides,
) -> dict:
    """Prepare the arrays (and the large set's pseudo-cores), then ``table2_from_cache``."""
    prepared = prepare_cores(tma_dir, cache, size=crop_px)
    train = prepared["train"]
    folder = Path(cache) if cache else Path(tma_dir) / "cores"
    slides_dir = Path(extra_slides) if extra_slides else Path(tma_dir).parent / "tcga" / "slides"
    slides = sorted(
        p for p in slides_dir.glob("*") if p.suffix.lower() in (".svs", ".tiff", ".tif")
    )
    if slides and not (folder / "large" / "cores.json").is_file():
        small_rows = _rows_for(train, _small_sections(train))
        extra = extra_cores(slides, train.half_shape[0], train.mpp, per_slide, progress)
        write_coreset(CoreSet.concat([train.select(small_rows), extra]), folder / "large")
    result = table2_from_cache(folder, out, config, progress=progress, **overrides)
    if not slides:
        result["rows"].append(
            {"note": f"no whole slides in {slides_dir} for the large training set"}
        )
    return result


def _small_sections(train: CoreSet) -> list[str]:
    return list(dict.fromkeys(train.section.tolist()))[:2]  # the paper's slides 1 and 2


def table2_from_cache(
    folder: Path, out: Path, config: str = "demo", progress: bool = True, **overrides
) -> dict:
    """Train the four Table 2 networks from a prepared cache (``folder``/train, /test and,
    when present, /large) and play the matching game with each; writes ``out``/table2.json."""
    from fpstore.fingerprint.matching import play

    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_config(config, **overrides)
    device = resolve_device(cfg.device)
    train, test = load_coreset(folder / "train"), load_coreset(folder / "test")
    sets = {"small": (folder / "train", train, _rows_for(train, _small_sections(train)))}
    if (folder / "large" / "cores.json").is_file():
        large = load_coreset(folder / "large")
        sets["large"] = (folder / "large", large, np.arange(len(large)))
    gan, rows_out = None, []
    plan = [(size, style_on) for style_on in (False, True) for size in ("small", "large")]
    for number, (size, style_on) in enumerate(plan, 1):
        if size not in sets:
            continue
        set_folder, cores, rows = sets[size]
        stain = "cyclegan" if style_on else "none"
        style, _, trained = restyle_for(
            set_folder, cores, rows, stain, config, device, progress, gan=gan
        )
        gan = trained or gan  # one CycleGAN (trained on the small set's two sites) for both sets
        result = train_network(cores, cfg, rows, style=style, progress=progress)
        name = f"exp{number}-{size}-{'style' if style_on else 'nostyle'}"
        save_checkpoint(
            out / f"{name}.pt", result.model, _checkpoint_meta(result, cfg, cores, rows, stain, {})
        )
        game = play(result.model, result.preprocessing, test, device=device, progress=progress)
        rows_out.append(
            {
                "experiment": number,
                "training_set": size,
                "style_transfer": style_on,
                "network": cfg.arch,
                "train_cores": int(len(rows)),
                "train_patients": int(len(set(cores.patient_id[rows].tolist()))),
                "test_cores": game.n_cores,
                "cv_accuracy": result.best_accuracy,
                "core_accuracy": round(game.core_accuracy, 4),
                "patient_accuracy": round(game.patient_accuracy, 4),
                "top5_accuracy": round(game.top5_accuracy, 4),
                "median_rank": game.median_rank,
                "chance_core": round(game.chance_core, 5),
                "chance_patient": round(game.chance_patient, 5),
                "steps": result.steps,
                "seconds": round(result.seconds, 1),
                "images_per_s": round(result.images_per_s),
                "sections": game.sections,
                "checkpoint": str(out / f"{name}.pt"),
            }
        )
        (out / "table2.json").write_text(
            json.dumps({"config": cfg.to_dict(), "rows": rows_out}, indent=2)
        )
    return {"out": str(out), "rows": rows_out}
