"""What the tissue methods read: stored patches and fingerprints, patch pixels, labelled tiles.

Stored patches are the rows of ``fingerprints/encoder=<id>/cohort=<c>/<slide_id>.parquet``
(coordinates are shared by every encoder); pixels are re-read from the cohort's slides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from fpstore.config import TISSUE_TYPES
from fpstore.errors import ConfigError

KEY_COLUMNS = ["slide_id", "patch_id", "x", "y", "size_px", "out_px"]
TILE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}

# Folder names of public tissue-type datasets, mapped onto the four types. Kather's
# NCT-CRC-HE (ADI, BACK, STR, TUM, NORM, ...), BACH and similar layouts; anything else
# needs an explicit ``--map FOLDER=TYPE`` (or ``FOLDER=skip``).
FOLDER_ALIASES = {
    "background": "background",
    "back": "background",
    "bg": "background",
    "empty": "background",
    "epithelium": "epithelium",
    "epi": "epithelium",
    "epithelial": "epithelium",
    "tum": "epithelium",
    "tumor": "epithelium",
    "tumour": "epithelium",
    "norm": "epithelium",
    "stroma": "stroma",
    "str": "stroma",
    "stromal": "stroma",
    "fat": "fat",
    "adi": "fat",
    "adipose": "fat",
    "adipocytes": "fat",
}


@dataclass
class SlidePatches:
    """One slide's stored patches: keys and coordinates, and fingerprints when asked for."""

    slide_id: str
    keys: pa.Table  # KEY_COLUMNS
    fingerprints: np.ndarray | None  # (N, dim) float32
    metadata: dict


def stored_slide_files(store, cohort: str, encoder: str | None) -> tuple[str, list]:
    """(encoder, the cohort's per-slide fingerprint files) for ``encoder`` or the only one."""
    from fpstore.store.fingerprints import partition_settings, resolve_encoder
    from fpstore.store.layout import StoreLayout, visible_files

    layout = StoreLayout.of(store)
    encoder = resolve_encoder(layout, cohort, encoder)
    partition_settings(layout, encoder, cohort)  # one set of settings, nothing corrupt
    return encoder, visible_files(layout.fingerprint_dir(encoder, cohort))


def read_slide_patches(path, with_fingerprints: bool) -> SlidePatches:
    """Read one per-slide fingerprint file (keys, and the vectors as a numpy view)."""
    from fpstore.store.fingerprints import read_slide_file

    keys, vectors, metadata = read_slide_file(path, with_fingerprints)
    slide_id = path.stem if keys.num_rows == 0 else keys.column("slide_id")[0].as_py()
    return SlidePatches(slide_id, keys, vectors, metadata)


def cohort_slides(store, cohort: str) -> dict:
    """{slide_id: CohortSlide} of the cohort (its file and mpp override)."""
    from fpstore.store.cohorts import read_cohort

    return {s.slide_id: s for s in read_cohort(store, cohort).slide_records()}


def slide_path(slides: dict, slide_id: str) -> str | None:
    return slides[slide_id].path if slide_id in slides else None


def iter_patch_pixels(slide, keys: pa.Table, batch: int = 64):
    """Yield uint8 (n, out_px, out_px, 3) batches of a slide's stored patches, in row order."""
    xy = np.stack([keys.column("x").to_numpy(), keys.column("y").to_numpy()], axis=1)
    size_px = keys.column("size_px").to_numpy()
    out_px = keys.column("out_px").to_numpy()
    for start in range(0, len(xy), batch):
        stop = min(start + batch, len(xy))
        # One slide's patches share size and output size (one PatchSpec per extraction).
        yield slide.read_patches(xy[start:stop], float(size_px[start]), int(out_px[start]))


STAIN_SAMPLE = 32  # patches, evenly spaced over a slide, that its stains are estimated from


def slide_pixel_features(slide, keys: pa.Table, batch: int = 64) -> tuple[np.ndarray, dict]:
    """Pixel features of a slide's stored patches against the slide's own stains:
    (float32 (N, len(FEATURE_NAMES)), the stains as a dict). The stains are estimated from
    ``STAIN_SAMPLE`` evenly spaced patches first (read twice; a few percent of the work)."""
    from fpstore.tissue.features import FEATURE_NAMES, estimate_slide_stains, pixel_features

    if keys.num_rows == 0:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32), {}
    sample = np.unique(np.linspace(0, keys.num_rows - 1, STAIN_SAMPLE).round().astype(int))
    images = np.concatenate(list(iter_patch_pixels(slide, keys.take(sample), batch)))
    stains = estimate_slide_stains(images)
    parts = [pixel_features(images, stains) for images in iter_patch_pixels(slide, keys, batch)]
    return np.concatenate(parts), stains.to_dict()


def tile_folders(tiles: Path, mapping: dict[str, str] | None = None) -> dict[Path, str]:
    """{class folder: tissue type} of a folder of labelled tiles (one folder per class)."""
    tiles = Path(tiles)
    if not tiles.is_dir():
        raise ConfigError(f"--tiles {str(tiles)!r} is not a folder of class folders")
    mapping = {k.lower(): v for k, v in (mapping or {}).items()}
    for folder, kind in mapping.items():
        if kind not in TISSUE_TYPES + ("skip",):
            raise ConfigError(
                f"--map {folder}={kind}: the type must be one of {', '.join(TISSUE_TYPES)} or skip"
            )
    found, unknown = {}, []
    for folder in sorted(p for p in tiles.iterdir() if p.is_dir()):
        kind = mapping.get(folder.name.lower()) or FOLDER_ALIASES.get(folder.name.lower())
        if kind is None:
            unknown.append(folder.name)
        elif kind != "skip":
            found[folder] = kind
    if unknown:
        raise ConfigError(
            f"tile folders {', '.join(unknown)} in {str(tiles)!r} name no tissue type; name them "
            f"{', '.join(TISSUE_TYPES)} (or a known alias) or pass --map FOLDER=TYPE "
            "(TYPE one of the four, or skip)"
        )
    if not found:
        raise ConfigError(f"no class folders in {str(tiles)!r}; expected e.g. {tiles}/stroma/*.png")
    return found


def read_tiles(
    tiles: Path,
    mapping: dict[str, str] | None = None,
    size: int = 224,
    max_per_class: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled tiles as (uint8 (N, size, size, 3), int labels in TISSUE_TYPES order)."""
    from PIL import Image, UnidentifiedImageError

    from fpstore.tissue.features import resize_area

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for folder, kind in tile_folders(tiles, mapping).items():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in TILE_SUFFIXES)
        if max_per_class and len(files) > max_per_class:
            files = [files[i] for i in sorted(rng.choice(len(files), max_per_class, replace=False))]
        for path in files:
            try:
                with Image.open(path) as image:
                    rgb = np.asarray(image.convert("RGB"))
            except (UnidentifiedImageError, OSError) as error:
                raise ConfigError(f"cannot read tile {str(path)!r}: {error}") from error
            images.append(resize_area(rgb[None], size)[0])
            labels.append(TISSUE_TYPES.index(kind))
    if not images:
        raise ConfigError(
            f"no image tiles ({', '.join(sorted(TILE_SUFFIXES))}) under {str(tiles)!r}"
        )
    return np.stack(images), np.array(labels, dtype=np.int64)
