"""Stain invariance for training: the second image of each pair for the paper's pair loss.

``hed``: two independent H&E stain jitters of each crop, drawn on the fly by the trainer
(``fpstore.slides.stain.stain_jitter``; Tellez et al. 2019), nothing cached. The others are
restyled copies of every core's left half, made once, offline: classical normalisation
(Macenko, Reinhard, Vahadane; ``fpstore.slides.stain``) to a target core of each site, or a
CycleGAN between the reference site and the other sites (``fit_site_cyclegan``). A core of
site A thus has [A-styled, B-styled, ...] copies, like the paper's "original, virtual USC stain
and virtual Biomax stain". Training pairs each crop with the same crop of a random copy and
adds the fingerprint-distance term of the loss, so the network learns invariance; matching
sees the original pixels (``extract --stain-norm`` normalises at extraction, separately).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fpstore.errors import StainError, TrainingError, unknown_name
from fpstore.fingerprint.cyclegan import (
    CYCLEGAN_CONFIGS,
    CycleGAN,
    CycleGANConfig,
    restyle,
    train_cyclegan,
)
from fpstore.fingerprint.data import CoreSet, CropStream, save_restyled
from fpstore.slides.stain import STAIN_METHODS, StainNormalizer, StainNormConfig

CLASSICAL = STAIN_METHODS
STAINS = ("none", "hed", *CLASSICAL, "cyclegan")


def check_stain(name: str) -> str:
    if name not in STAINS:
        raise unknown_name("stain method", name, STAINS)
    return name


def site_order(cores: CoreSet, rows: np.ndarray) -> list[str]:
    """Sites of the selected rows, most cores first (ties by name)."""
    counts = Counter(cores.site[rows].tolist())
    return sorted(counts, key=lambda s: (-counts[s], s))


def site_targets(cores: CoreSet, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per site, the central square of the left half with the most tissue: the target style."""
    h, w = cores.half_shape
    side = min(h, w) // 2 * 2
    y0, x0 = (h - side) // 2, (w - side) // 2
    targets = {}
    for site in sorted(set(cores.site[rows].tolist())):
        candidates = rows[cores.site[rows] == site]
        best = candidates[np.argmax(cores.tissue_left[candidates].sum(axis=(1, 2)))]
        targets[site] = np.ascontiguousarray(cores.left[best, y0 : y0 + side, x0 : x0 + side])
    return targets


def fitted_normaliser(method: str, target: np.ndarray):
    """A normaliser (macenko, reinhard, vahadane; ``fpstore.slides.stain``) fitted to
    ``target``, applied with ``normalise_image``."""
    return StainNormalizer(StainNormConfig(method), target=target)


def normalise_image(norm, image: np.ndarray) -> tuple[np.ndarray, bool]:
    """(``image`` in the normaliser's target style, True), or (``image``, False) when its
    stains cannot be estimated (too little tissue)."""
    image = np.ascontiguousarray(image)
    try:
        source = norm.fit_source(image[None])
    except StainError:
        return image, False
    return norm.transform(image, source), True


def classical_copies(
    cores: CoreSet, method: str, targets: dict[str, np.ndarray], progress: bool = True
) -> tuple[np.ndarray, int]:
    """([n, n_sites, H, W, 3] copies normalised to each site's target, failures).

    A half whose stains cannot be estimated (too little tissue) keeps its pixels in that copy.
    """
    normalisers = [fitted_normaliser(method, targets[site]) for site in sorted(targets)]
    out = np.empty((len(cores), len(normalisers), *cores.left.shape[1:]), np.uint8)
    failures = 0
    for i in tqdm(range(len(cores)), desc=f"{method} normalise", unit="core", disable=not progress):
        for k, norm in enumerate(normalisers):
            out[i, k], ok = normalise_image(norm, cores.left[i])
            failures += not ok
    return out, failures


def fit_site_cyclegan(
    cores: CoreSet, rows: np.ndarray, cfg: CycleGANConfig, device="cpu", progress: bool = True
) -> CycleGAN:
    """A CycleGAN between the reference site (the one with most cores among ``rows``) and all
    other sites pooled (left halves' crops).

    With two sites this is the paper's pairing. With many (a TCGA cohort has dozens of
    tissue-source sites) one generator pair is trained, not one per site: a CycleGAN per
    site pair grows with the square of the sites and one per site with their number, each
    minutes of CPU, while the pair loss only needs every core in a style other than its own.
    Each core thus gets a reference-styled and an other-styled copy.
    """
    sites = site_order(cores, rows)
    if len(sites) < 2:
        raise TrainingError(
            "CycleGAN needs cores from two sites; the training cores are all from site "
            f"{sites[0]!r}"
        )
    streams = []
    reference = cores.site[rows] == sites[0]
    for sel in (rows[reference], rows[~reference]):
        stream = CropStream(
            cores.left,
            sel,
            np.zeros(len(sel)),
            cores.tissue_left[sel],
            cfg.crop_px,
            cfg.batch_size,
            seed=cfg.seed + len(streams),
        )
        streams.append(b["x1"] for b in stream)
    others = sites[1] if len(sites) == 2 else f"{len(sites) - 1} other sites"
    return train_cyclegan(
        streams[0], streams[1], cfg, sites=(sites[0], others), device=device, progress=progress
    )


def cyclegan_copies(
    cores: CoreSet, gan: CycleGAN, device="cpu", progress: bool = True
) -> np.ndarray:
    """[n, 2, H, W, 3]: each left half in the reference style (g_ba) and the other sites'
    style (g_ab)."""
    out = np.empty((len(cores), 2, *cores.left.shape[1:]), np.uint8)
    batch = 4
    for start in tqdm(
        range(0, len(cores), batch), desc="cyclegan restyle", unit="batch", disable=not progress
    ):
        images = np.asarray(cores.left[start : start + batch])
        out[start : start + batch, 0] = restyle(gan.g_ba, images, device)
        out[start : start + batch, 1] = restyle(gan.g_ab, images, device)
    return out


def add_restyled(
    folder: Path,
    cores: CoreSet,
    method: str,
    *,
    targets=None,
    gan: CycleGAN | None = None,
    device="cpu",
    progress: bool = True,
) -> dict:
    """Compute and cache the copies ``method`` for a cached CoreSet (reused when the same
    targets or generator made them before); returns a summary."""
    check_stain(method)
    folder = Path(folder)
    if method == "cyclegan":
        if gan is None:
            raise TrainingError("cyclegan copies need a trained CycleGAN")
        from fpstore.encoders.checkpoint import weights_hash

        signature = {
            "method": method,
            "g_ab": weights_hash(gan.g_ab.state_dict()),
            "g_ba": weights_hash(gan.g_ba.state_dict()),
            "n": len(cores),
        }
    else:
        digest = [int(np.asarray(t, np.int64).sum()) for _, t in sorted(targets.items())]
        signature = {
            "method": method,
            "targets": sorted(targets),
            "target_sums": digest,
            "n": len(cores),
        }
    meta_path = folder / "restyled" / method / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("signature") == signature:
        return {
            "method": method,
            "cached": True,
            "failures": json.loads(meta_path.read_text()).get("failures", 0),
        }
    failures = 0
    if method == "cyclegan":
        copies = cyclegan_copies(cores, gan, device, progress)
    else:
        copies, failures = classical_copies(cores, method, targets, progress)
    save_restyled(folder, method, copies)
    meta_path.write_text(json.dumps({"signature": signature, "failures": failures}))
    cores.restyled[method] = np.load(folder / "restyled" / method / "left.npy", mmap_mode="r")
    return {"method": method, "cached": False, "failures": failures}


def cyclegan_config(name: str, **overrides) -> CycleGANConfig:
    from dataclasses import replace

    if name not in CYCLEGAN_CONFIGS:
        raise unknown_name("cyclegan config", name, CYCLEGAN_CONFIGS)
    return replace(CYCLEGAN_CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None})
