"""What the network recognises, as PNG figures.

- Recognition maps (the paper's Fig. 4): overlapping patches of a core (80% linear
  overlap), each scored by the softmax probability of its true patient (core probabilities
  summed per patient), shaded blue (0) to red (1) beside the H&E.
- Similarity maps (Fig. 3b): per patch of one half, the cosine similarity of its
  fingerprint to the mean fingerprint of the other half (the matching game's half
  fingerprint), on a colour range fitted to the pair.
Patches with less tissue than the matching game's crops need are left grey.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fpstore.encoders.fingerprint_net import to_input
from fpstore.errors import ConfigError
from fpstore.fingerprint.data import crop_origins, on_tissue, tissue_grid

OVERLAP = 0.8


def patch_grid(h: int, w: int, patch_px: int, overlap: float = OVERLAP) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of overlapping patches covering an h x w image."""
    stride = max(1, int(round(patch_px * (1 - overlap))))

    def starts(n):
        s = list(range(0, n - patch_px + 1, stride))
        if s[-1] != n - patch_px:
            s.append(n - patch_px)
        return s

    return [(y, x) for y in starts(h) for x in starts(w)]


@torch.no_grad()
def _run(model, pre, image, corners, patch_px, device, batch_size=64, what="logits"):
    outs = []
    device = torch.device(device)
    model = model.to(device).eval()
    for start in range(0, len(corners), batch_size):
        chunk = corners[start : start + batch_size]
        crops = np.stack([image[y : y + patch_px, x : x + patch_px] for y, x in chunk])
        x = to_input(torch.from_numpy(crops).to(device), pre["mean"], pre["std"], pre["out_px"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x) if what == "logits" else model.features(x)
        outs.append(out.float().cpu())
    return torch.cat(outs)


def paint(shape, corners, patch_px, values) -> np.ndarray:
    """Average of the values of every patch covering each pixel, NaN values left out (NaN where
    no other patch covers it)."""
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.float64)
    for (y, x), v in zip(corners, values):
        if np.isnan(v):
            continue
        total[y : y + patch_px, x : x + patch_px] += v
        count[y : y + patch_px, x : x + patch_px] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def glass_patches(image: np.ndarray, corners, patch_px: int) -> np.ndarray:
    """Per patch, True where the matching game would not crop (too little tissue)."""
    return ~on_tissue(crop_origins(tissue_grid(image[None]), image.shape[:2], patch_px)[0], corners)


def patient_probabilities(
    logits: torch.Tensor, class_patients: list[str], patient: str
) -> np.ndarray:
    """Per patch, the summed softmax probability of the classes (cores) of ``patient``."""
    probs = torch.softmax(logits, dim=1).numpy()
    mine = np.array([p == patient for p in class_patients])
    return probs[:, mine].sum(axis=1)


def recognition_map(
    model,
    meta: dict,
    image: np.ndarray,
    patient: str,
    mpp: float,
    device="cpu",
    overlap: float = OVERLAP,
) -> np.ndarray:
    """[H, W] probability of ``patient`` for a core image (uint8 [H, W, 3] at ``mpp``)."""
    pre = meta["preprocessing"]
    patch_px = int(round(pre["patch_um"] / mpp))
    corners = patch_grid(image.shape[0], image.shape[1], patch_px, overlap)
    logits = _run(model, pre, image, corners, patch_px, device)
    probs = patient_probabilities(logits, meta["data"]["class_patients"], patient)
    probs[glass_patches(image, corners, patch_px)] = np.nan
    return paint(image.shape[:2], corners, patch_px, probs)


def similarity_map(
    model,
    meta: dict,
    reference: np.ndarray,
    image: np.ndarray,
    mpp: float,
    device="cpu",
    overlap: float = OVERLAP,
) -> np.ndarray:
    """[H, W] cosine similarity of ``image``'s patches to the fingerprint of the half ``reference``
    (as the matching game computes it)."""
    from fpstore.fingerprint.matching import half_fingerprints

    pre = meta["preprocessing"]
    patch_px = int(round(pre["patch_um"] / mpp))
    mean = half_fingerprints(
        model, pre, reference[None], tissue_grid(reference[None]), mpp, device
    )[0]
    corners = patch_grid(image.shape[0], image.shape[1], patch_px, overlap)
    fps = torch.nn.functional.normalize(
        _run(model, pre, image, corners, patch_px, device, what="fp"), dim=1
    )
    sims = fps.numpy() @ mean
    sims[glass_patches(image, corners, patch_px)] = np.nan
    return paint(image.shape[:2], corners, patch_px, sims)


def colourise(values: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Blue (low) -> red (high) RGB uint8; NaN (no patch) is grey."""
    import matplotlib

    t = np.clip((values - low) / max(1e-9, high - low), 0, 1)
    rgb = matplotlib.colormaps["coolwarm"](np.nan_to_num(t))[..., :3]
    rgb[np.isnan(values)] = 0.5
    return (rgb * 255).round().astype(np.uint8)


def save_panel(
    path: Path,
    panels: list[tuple[str, np.ndarray]],
    colourbar: tuple[str, float, float] | None = None,
    title: str = "",
) -> Path:
    """Images side by side with titles (and a blue-red colour bar) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4.2), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels):
        ax.imshow(img)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if colourbar:
        label, low, high = colourbar
        mappable = plt.cm.ScalarMappable(cmap="coolwarm", norm=plt.Normalize(low, high))
        fig.colorbar(mappable, ax=axes[0].tolist(), fraction=0.03, label=label)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def core_maps(
    model_path: Path,
    tma: Path,
    out: Path,
    n_cores: int = 4,
    cache: Path | None = None,
    device: str = "auto",
    crop_px: int = 1600,
    progress: bool = True,
) -> dict:
    """Recognition maps of ``n_cores`` training cores (a section the network saw, whole core:
    the left half it trained on and the right half it did not) and similarity maps of
    ``n_cores`` test-array left/right pairs across sites. Writes PNGs to ``out``."""
    from tqdm import tqdm

    from fpstore.encoders.checkpoint import load_checkpoint
    from fpstore.fingerprint.matching import default_sections
    from fpstore.fingerprint.sources import prepare_tma
    from fpstore.fingerprint.train import resolve_device

    model, meta = load_checkpoint(model_path)
    dev = resolve_device(device)
    prepared = prepare_tma(tma, cache, size=crop_px, progress=progress)
    if set(prepared) != {"train", "test"}:
        raise ConfigError(
            f"core-maps needs train and test arrays in the TMA table {tma}; it has "
            f"{', '.join(prepared) or 'none'} (column 'role')"
        )
    train, test = prepared["train"], prepared["test"]
    out = Path(out)
    written = []
    trained = set(meta["data"]["sections"])
    rows = [i for i in range(len(train)) if train.section[i] in trained][:n_cores]
    for i in tqdm(rows, desc="recognition maps", unit="core", disable=not progress):
        image = np.concatenate([train.left[i], train.right[i]], axis=1)
        probs = recognition_map(model, meta, image, str(train.patient_id[i]), train.mpp, dev)
        name = f"recognition_{train.section[i]}_core{int(train.core_index[i]):03d}.png"
        written.append(
            str(
                save_panel(
                    out / name,
                    [("H&E (left half trained on)", image), ("p(true patient)", colourise(probs))],
                    ("probability of the true patient", 0, 1),
                    f"{train.key[i]} patient {train.patient_id[i]}: mean p over tissue = "
                    f"{np.nanmean(probs):.2f}",
                )
            )
        )
    left_section, right_section = default_sections(test)
    keys = [
        k
        for k in dict.fromkeys(test.key[test.section == left_section].tolist())
        if k in set(test.key[test.section == right_section].tolist())
    ][:n_cores]
    for key in tqdm(keys, desc="similarity maps", unit="pair", disable=not progress):
        li = int(np.flatnonzero((test.key == key) & (test.section == left_section))[0])
        ri = int(np.flatnonzero((test.key == key) & (test.section == right_section))[0])
        sims = similarity_map(
            model, meta, np.asarray(test.left[li]), np.asarray(test.right[ri]), test.mpp, dev
        )
        # Fingerprints are non-negative (ReLU), so cosines crowd into the upper range: fit the colours.
        low, high = (
            (float(v) for v in np.nanpercentile(sims, [2, 98]))
            if np.isfinite(sims).any()
            else (0.0, 1.0)
        )
        name = f"similarity_{key.replace(':', '_')}.png"
        written.append(
            str(
                save_panel(
                    out / name,
                    [
                        (f"left half, {left_section}", np.asarray(test.left[li])),
                        ("similarity to left half", colourise(sims, low, high)),
                        (f"right half, {right_section}", np.asarray(test.right[ri])),
                    ],
                    ("cosine similarity", low, high),
                    f"{key}",
                )
            )
        )
    return {"out": str(out), "files": written}
