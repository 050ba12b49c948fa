"""The library calls behind the commands: train a fingerprint network from a user's own
slides (a TMA table, a store cohort, or both), play the matching game with a checkpoint, and
run the Table 2 experiment.

Training sources (``fpstore.fingerprint.sources``): the ``train`` arrays of a TMA table (one
class per physical core, as in the paper) and pseudo-cores of a cohort's whole slides (one
class per patient); together they are the paper's "large" training set.

The matching game (``match``): on the ``test`` arrays of the table when it has them (left
halves of one section against right halves of a section stained at another site); otherwise on
the cohort patients held out of training: their left halves against right halves from another
site where the patient has slides at two sites, else against right halves restyled to another
site's stains (Macenko, to that site's target core). The result says which.

Table 2 on the synthetic arrays: the small training set is the paper's (sections 1 and 2 of
the training array: one section per site); the large one adds the pseudo-cores of a cohort's
whole slides, as the paper added 13,000 images from other sources. Each setting is trained
without and with CycleGAN style transfer, then scored by the right-half accuracy on the
training cores ("CV acc."), and the matching game on the test array (core and pooled patient
accuracy).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from fpstore.encoders.checkpoint import load_checkpoint, save_checkpoint
from fpstore.errors import ConfigError, TrainingError
from fpstore.fingerprint.augment import AugmentConfig
from fpstore.fingerprint.data import CoreSet, load_coreset, read_meta, write_coreset
from fpstore.fingerprint.sources import PseudoCoreSpec, cohort_cores, prepare_tma, table_path
from fpstore.fingerprint.stain import (
    CLASSICAL,
    add_restyled,
    check_stain,
    cyclegan_config,
    fit_site_cyclegan,
    site_targets,
)
from fpstore.fingerprint.train import TrainConfig, get_config, resolve_device, train_network
from fpstore.slides.stain import StainAugmentConfig

HOLDOUT_SHARE = 0.2  # cohort patients held out for the matching game when no test array exists
# --stain hed: concentrations x U(0.85, 1.15) + U(-0.025, 0.025), stain vectors + N(0, 0.04) per
# OD component (a few degrees off). Twice this (beyond Tellez's "HED strong", to span real
# sites' differences) also washed out the stain densities that tell patients apart: on the
# demo's arrays half of it matched 14-16 of 24 patients across sites where the double matched
# 9-11 (docs/results.md, "The H&E jitter's strength"); the pair loss still pulls the two
# stainings of a crop together.
HED_JITTER = StainAugmentConfig(scale=0.15, shift=0.025, vector=0.04)
# With H&E jitter the colour jitter goes: on top of it, brightness, saturation, hue and grey
# copies wash out the stain densities that tell patients apart (on the demo's arrays, dropping
# them doubled the right-half accuracy at 200-240 steps: docs/results.md).
HED_AUGMENT = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0)


@dataclass(frozen=True)
class Sources:
    """What ``train-fingerprint`` reads: a TMA table (``tma``), a store cohort (``store`` and
    ``cohort``), or both. ``crop_px`` is the side of the cores and pseudo-cores at 0.5 um/px;
    ``holdout`` cohort patients are kept out of training for the matching game (None: none
    when the table has a test array, else a fifth of the patients, at least 2)."""

    tma: Path | None = None
    store: str | Path | None = None
    cohort: str | None = None
    crop_px: int = 1600
    per_slide: int = 4
    min_tissue: float = 0.6
    sections: tuple[str, ...] | None = None
    holdout: int | None = None
    cache: Path | None = None

    def __post_init__(self):
        if self.tma is None and self.cohort is None:
            raise ConfigError(
                "train-fingerprint needs training data: --tma TABLE (tissue microarrays), "
                "--cohort NAME (a store cohort's whole slides), or both"
            )
        if self.cohort is not None and self.store is None:
            raise ConfigError(f"--cohort {self.cohort}: give the store that holds it (--store)")
        if self.holdout is not None and self.holdout < 0:
            raise ConfigError(f"--holdout {self.holdout}: give 0 or more patients")
        PseudoCoreSpec(self.crop_px, 0.5, self.per_slide, self.min_tissue)

    @property
    def spec(self) -> PseudoCoreSpec:
        return PseudoCoreSpec(self.crop_px, 0.5, self.per_slide, self.min_tissue)

    def tma_cache(self) -> Path:
        return Path(self.cache) / "tma" if self.cache else table_path(self.tma).parent / "cores"

    def cohort_cache(self) -> Path | None:
        return Path(self.cache) / "cohort" if self.cache else None


@dataclass
class TrainingSet:
    cores: CoreSet  # every core of the sources (memory-mapped from ``folder``)
    rows: np.ndarray  # the ones to train on
    folder: Path  # where restyled copies are cached
    test: CoreSet | None  # the TMA table's test arrays
    holdout: list[str]  # cohort patients kept out of training
    description: dict


def _rows_for(cores: CoreSet, sections) -> np.ndarray:
    if not sections:
        return np.arange(len(cores))
    known = sorted(set(cores.section.tolist()))
    bad = [s for s in sections if s not in known]
    if bad:
        raise ConfigError(
            f"training section(s) {bad} not in the training arrays; sections: {', '.join(known)}"
        )
    return np.flatnonzero(np.isin(cores.section, list(sections)))


def _holdout(patients: list[str], n: int, seed: int) -> list[str]:
    order = np.random.default_rng(seed).permutation(len(patients))
    return sorted(patients[i] for i in order[:n])


def training_set(sources: Sources, seed: int = 0, progress: bool = True) -> TrainingSet:
    """The cores of ``sources``, the training rows and the held-out cohort patients."""
    parts, description, test = [], {}, None
    if sources.tma is not None:
        prepared = prepare_tma(
            sources.tma, sources.tma_cache(), size=sources.crop_px, progress=progress
        )
        test = prepared.get("test")
        description["tma"] = {
            "table": str(table_path(sources.tma)),
            "train_cores": len(prepared["train"]) if "train" in prepared else 0,
            "test_cores": len(test) if test is not None else 0,
        }
        if "train" in prepared:
            parts.append(("tma", prepared["train"]))
    holdout: list[str] = []
    if sources.cohort is not None:
        pseudo, summary = cohort_cores(
            sources.store,
            sources.cohort,
            sources.spec,
            sources.cohort_cache(),
            progress=progress,
        )
        patients = sorted(set(pseudo.patient_id.tolist()))
        n_out = sources.holdout
        if n_out is None:
            n_out = 0 if test is not None else max(2, round(HOLDOUT_SHARE * len(patients)))
        if len(patients) - n_out < 2:
            raise TrainingError(
                f"cohort {sources.cohort!r}: {len(patients)} patients have pseudo-cores; "
                f"holding out {n_out} for the matching game leaves fewer than 2 to train on. "
                "Lower --holdout, or add a TMA table with a test array (--tma)"
            )
        holdout = _holdout(patients, n_out, seed)
        description["cohort"] = {**summary, "holdout_patients": len(holdout)}
        parts.append(("cohort", pseudo))
    if not parts:
        raise TrainingError(
            f"nothing to train on: the TMA table {sources.tma} has only test sections; "
            "mark some train (column 'role') or add --cohort"
        )
    if len(parts) == 1:
        cores = parts[0][1]
        folder = _folder_of(cores)
    else:
        cores, folder = _combined(parts, sources)
    rows = np.arange(len(cores))
    if sources.sections:
        rows = np.intersect1d(rows, _rows_for(cores, sources.sections))
    if holdout:
        rows = rows[~np.isin(cores.patient_id[rows], holdout)]
    if len(rows) == 0:
        raise TrainingError("no training cores left after --section and --holdout")
    description["train_cores"] = int(len(rows))
    return TrainingSet(cores, rows, folder, test, holdout, description)


def _folder_of(cores: CoreSet) -> Path:
    return Path(cores.left.filename).parent


def _combined(parts, sources: Sources) -> tuple[CoreSet, Path]:
    """TMA cores and cohort pseudo-cores as one cached CoreSet (the large training set)."""
    digest = hashlib.sha256(
        json.dumps([read_meta(_folder_of(c))["source"] for _, c in parts]).encode()
    ).hexdigest()[:16]
    folder = sources.tma_cache() / f"train+{sources.cohort}"
    if not (folder / "cores.json").is_file() or read_meta(folder).get("source") != digest:
        write_coreset(CoreSet.concat([c for _, c in parts]), folder, {"source": digest})
    return load_coreset(folder), folder


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
    if stain in ("none", "hed"):  # hed: drawn on the fly by the trainer, nothing to cache
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
    info["cyclegan_sites"] = list(gan.sites)
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
    out: Path,
    sources: Sources,
    config: str = "demo",
    stain: str = "none",
    progress: bool = True,
    **overrides,
) -> dict:
    """Prepare the cores of ``sources``, make restyled copies for ``stain``, train, and save a
    self-describing checkpoint to ``out``. ``overrides`` are TrainConfig fields
    (max_steps, arch, device, seed, ...). Returns a summary."""
    check_stain(stain)
    cfg = get_config(config, **overrides)
    if stain == "hed":
        cfg = replace(cfg, stain_jitter=HED_JITTER, augment=HED_AUGMENT)
    device = resolve_device(cfg.device)
    data = training_set(sources, seed=cfg.seed, progress=progress)
    style, info, _ = restyle_for(
        data.folder, data.cores, data.rows, stain, config, device, progress
    )
    result = train_network(data.cores, cfg, data.rows, style=style, progress=progress)
    extra = {"sources": {**_source_args(sources), **data.description}, "holdout": data.holdout}
    meta = save_checkpoint(
        out, result.model, _checkpoint_meta(result, cfg, data.cores, data.rows, stain, extra)
    )
    return {
        "checkpoint": str(out),
        "content_hash": meta["content_hash"],
        "arch": cfg.arch,
        "stain": stain,
        "device": str(device),
        **result.summary(),
        "train_cores": int(len(data.rows)),
        "holdout_patients": len(data.holdout),
        "sources": data.description,
        "restyle": info,
    }


def _source_args(sources: Sources) -> dict:
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(sources).items()}
    args.pop("cache")
    args["store"] = None if sources.store is None else str(sources.store)
    return args


def match(
    model_path: Path,
    sources: Sources,
    left_section: str | None = None,
    right_section: str | None = None,
    device: str = "auto",
    progress: bool = True,
    game_px: int | None = None,
) -> dict:
    """The matching game of a checkpoint: on the TMA table's test arrays when ``sources``
    has them, else on the cohort patients the checkpoint held out of training.

    ``game_px``: the side the test array's cores are cut at for the game, when it is not the
    training crops' ``sources.crop_px`` (the paper cuts each whole core; the demo trains on
    smaller squares so that pseudo-cores fit its slides), cached beside them."""
    from fpstore.fingerprint.matching import cohort_game, play

    model, meta = load_checkpoint(model_path)
    dev = resolve_device(device)
    test = None
    size = game_px or sources.crop_px
    if sources.tma is not None:
        cache = sources.tma_cache()
        test = prepare_tma(
            sources.tma,
            cache if size == sources.crop_px else cache / f"game-{size}px",
            size=size,
            roles=("test",),
            progress=progress,
        ).get("test")
    if test is not None:
        result = play(
            model,
            meta["preprocessing"],
            test,
            left_section,
            right_section,
            device=dev,
            progress=progress,
        )
        return {
            "checkpoint": str(model_path),
            "game": "tma test array",
            "crop_px": size,
            **result.to_dict(),
        }
    if sources.cohort is None:
        raise ConfigError(
            f"the TMA table {sources.tma} has no test array (column 'role'); mark one "
            "test, or play on the held-out patients of a cohort with --cohort"
        )
    held = meta.get("data", {}).get("holdout", [])
    # the checkpoint's sources describe the cohort it was trained on: {"cohort": name, ...}
    trained_on = ((meta.get("data", {}).get("sources") or {}).get("cohort") or {}).get("cohort")
    if not held or trained_on != sources.cohort:
        raise ConfigError(
            f"{model_path} holds no patient of cohort {sources.cohort!r} out of training, so "
            "it has none to match; train with --cohort and --holdout N, or match on a TMA "
            "table's test array (--tma)"
        )
    pseudo, _ = cohort_cores(
        sources.store, sources.cohort, sources.spec, sources.cohort_cache(), progress=progress
    )
    result = cohort_game(model, meta["preprocessing"], pseudo, held, device=dev, progress=progress)
    return {
        "checkpoint": str(model_path),
        "game": f"held-out patients of {sources.cohort}",
        **result.to_dict(),
    }


# --- Table 2 -----------------------------------------------------------------------------------


def _small_sections(train: CoreSet) -> list[str]:
    return list(dict.fromkeys(train.section.tolist()))[:2]  # the paper's slides 1 and 2


def run_table2(
    sources: Sources,
    out: Path,
    config: str = "demo",
    progress: bool = True,
    **overrides,
) -> dict:
    """Train the four Table 2 networks (small = the TMA's first two training sections, large =
    those plus the cohort's pseudo-cores; each without and with CycleGAN) and play the matching
    game on the TMA test array with each; writes ``out``/table2.json."""
    from fpstore.fingerprint.matching import play

    if sources.tma is None:
        raise ConfigError("the Table 2 experiment needs a TMA table with train and test arrays")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_config(config, **overrides)
    device = resolve_device(cfg.device)
    small = training_set(replace(sources, cohort=None), cfg.seed, progress)
    if small.test is None:
        raise ConfigError(f"the TMA table {sources.tma} has no test array for the matching game")
    sets = {
        "small": (small.folder, small.cores, _rows_for(small.cores, _small_sections(small.cores)))
    }
    if sources.cohort is not None:
        large = training_set(replace(sources, holdout=0), cfg.seed, progress)
        tma_rows = np.flatnonzero(
            np.isin(large.cores.section, _small_sections(small.cores))
            | ~np.isin(large.cores.section, small.cores.section)
        )
        sets["large"] = (large.folder, large.cores, tma_rows)
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
        game = play(
            result.model, result.preprocessing, small.test, device=device, progress=progress
        )
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
    if "large" not in sets:
        rows_out.append({"note": "no --cohort given: the large training set was left out"})
    return {"out": str(out), "rows": rows_out}
