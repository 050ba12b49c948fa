"""Preview one slide before a long run: tissue mask and patch grid over the thumbnail.

``preview_patches`` writes ``<slide_id>.patches.png`` (thumbnail, non-tissue
tinted blue, pen and ink removed from the tissue tinted orange, kept squares
outlined green) and ``<slide_id>.patches.csv`` (the
patch list, level-0 pixels) and returns the summary the ``fpstore patches``
command prints.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from fpstore.config import PatchSpec
from fpstore.errors import ConfigError
from fpstore.slides.slide import SlideInfo, open_slide

_GLASS_TINT = np.array([70, 110, 255], np.float32)  # blue over what is not tissue
_PEN_TINT = np.array([255, 140, 0], np.float32)  # orange over pen and ink removed from it
_SQUARE_COLOUR = (0, 200, 0)


@dataclass
class PatchPreview:
    info: SlideInfo
    spec: PatchSpec
    level: int  # pyramid level the patches are read from
    level_downsample: float
    read_px: int  # side of a patch in pixels of that level, before resizing to out_px
    tissue_fraction: float  # share of the slide that is tissue
    pen_fraction: float  # share of the would-be tissue removed as pen or ink
    grid: pa.Table  # x, y, size_px, tissue_fraction
    image: Path
    patches_csv: Path
    no_patch_reason: str = ""  # why the grid is empty (no tissue found...); "" when it is not

    @property
    def patch_count(self) -> int:
        return self.grid.num_rows

    def to_dict(self, with_patches: bool = True) -> dict:
        summary = {
            "slide_id": self.info.slide_id,
            "path": self.info.path,
            "mpp": self.info.mpp,
            "mpp_source": self.info.mpp_source,
            "vendor": self.info.vendor,
            "reader": self.info.backend,
            "width": self.info.width,
            "height": self.info.height,
            "level_count": self.info.level_count,
            "patch_um": self.spec.patch_um,
            "out_px": self.spec.out_px,
            "min_tissue": self.spec.min_tissue,
            "size_px": self.spec.patch_um / self.info.mpp,
            "level_read": self.level,
            "level_downsample": self.level_downsample,
            "read_px": self.read_px,
            "patch_count": self.patch_count,
            "tissue_fraction": self.tissue_fraction,
            "pen_fraction": self.pen_fraction,
            "image": str(self.image),
            "patches_csv": str(self.patches_csv),
            "no_patch_reason": self.no_patch_reason,
        }
        if with_patches:
            summary["patches"] = self.grid.to_pylist()
        return summary


def draw_preview(thumb: np.ndarray, downsample: float, mask, grid: pa.Table) -> np.ndarray:
    """The thumbnail with non-tissue and removed pen tinted and each grid square outlined."""
    import cv2

    height, width = thumb.shape[:2]

    def at_thumb(layer: np.ndarray) -> np.ndarray:
        size = (width, height)
        return cv2.resize(layer.view(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0

    image = thumb.astype(np.float32)
    glass = ~at_thumb(mask.mask)
    image[glass] = image[glass] * 0.55 + _GLASS_TINT * 0.45
    if mask.pen is not None:
        pen = at_thumb(mask.pen)
        image[pen] = image[pen] * 0.4 + _PEN_TINT * 0.6
    image = np.ascontiguousarray(image.astype(np.uint8))
    for x, y, size in zip(
        grid.column("x").to_numpy(), grid.column("y").to_numpy(), grid.column("size_px").to_numpy()
    ):
        x0, y0 = int(round(x / downsample)), int(round(y / downsample))
        x1, y1 = int(round((x + size) / downsample)) - 1, int(round((y + size) / downsample)) - 1
        cv2.rectangle(image, (x0, y0), (max(x0, x1), max(y0, y1)), _SQUARE_COLOUR, 1)
    return image


def preview_patches(
    path: str | Path,
    spec: PatchSpec = PatchSpec(),
    mpp: float | None = None,
    out: str | Path = ".",
    max_px: int = 2048,
) -> PatchPreview:
    """Open a slide, find its tissue and patch grid, and write the preview PNG and CSV."""
    import cv2

    from fpstore.slides.grid import no_patch_reason, patch_grid
    from fpstore.slides.tissue_mask import tissue_mask

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(path, mpp=mpp) as slide:
        mask = tissue_mask(slide)
        grid = patch_grid(slide, spec, mask)
        reason = "" if grid.num_rows else no_patch_reason(slide, spec, mask)
        size_px = slide.patch_size_px(spec.patch_um)
        level = slide.level_for(size_px / spec.out_px)
        level_downsample = slide.info.level_downsamples[level]
        thumb, downsample = slide.thumbnail(max_px)
        info = slide.info
    image_path = out / f"{info.slide_id}.patches.png"
    picture = draw_preview(thumb, downsample, mask, grid)
    if not cv2.imwrite(str(image_path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise ConfigError(f"cannot write the preview {image_path}; choose a writable --out folder")
    csv_path = out / f"{info.slide_id}.patches.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(grid.column_names)
        writer.writerows(zip(*(grid.column(c).to_pylist() for c in grid.column_names)))
    return PatchPreview(
        info=info,
        spec=spec,
        level=level,
        level_downsample=float(level_downsample),
        read_px=max(1, int(round(size_px / level_downsample))),
        tissue_fraction=mask.fraction,
        pen_fraction=mask.pen_fraction,
        grid=grid,
        image=image_path,
        patches_csv=csv_path,
        no_patch_reason=reason,
    )
