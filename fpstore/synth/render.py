"""Render one tile of a scene: structure fields -> tissue classes -> stain densities -> RGB.

Coarse-to-fine: smooth structure fields come from an 8 um grid, gland and adipocyte
fields from a 2 um grid, both bilinearly upsampled; cells (epithelial nuclei,
lymphocytes, fibroblasts, necrotic debris) are points of jittered grids keyed by
global coordinates, kept or dropped by the fields at their centre, and drawn with
OpenCV; collagen is a periodic fibre texture steered by the local fibre direction.
Every random value is a function of (slide seed, coordinates), and the grids are
aligned to global multiples of their step, so the upsampled fields (hence every
cell decision) agree between neighbouring tiles: tiles are independent, seamless
and reproducible.
"""

from __future__ import annotations

import cv2
import numpy as np

from fpstore.synth.noise import fibres, hash_uniform, jitter_points, white
from fpstore.synth.scene import (
    CELLS,
    CELLS_FAR,
    SMOOTH,
    Scene,
    fat_fields,
    gland_fields,
    smooth_fields,
)
from fpstore.synth.sites import Site

BACKGROUND, EPITHELIUM, STROMA, FAT = 0, 1, 2, 3
TRUTH_DOWNSAMPLE = 16  # truth images are at 1/16 of level 0 (4 um/px)
SMOOTH_UM = 8.0  # grid step of the smooth structure fields
CELL_UM = 2.0  # grid step of the gland / adipocyte fields
MAX_CELL_UM = 11.0  # largest reach of a cell from its centre (nuclei are clipped to it)
FIBRE_LENGTHS_UM = (6.0, 10.0, 15.0)  # collagen texture banks (a patient picks the nearest)
RENDER_MPPS = (0.25, 0.5, 1.0)


def chunk_px(render_mpp: float) -> int:
    """Level-0 size of the square chunks the renderer draws at once (whole TIFF tiles):
    large enough to amortise per-call overhead, small enough to stay light in memory."""
    return 512 if render_mpp < 0.5 else 1024


FIBRE_WEIGHTS = ("w0", "w45", "w90", "w135")  # how much each fibre texture shows, per pixel
_FIELDS = SMOOTH + FIBRE_WEIGHTS + CELLS
_I = {name: i for i, name in enumerate(_FIELDS)}


def _upsample(coarse: np.ndarray, n: int) -> np.ndarray:
    """Bilinear upsampling of a square [h, h, c] stack to [n, n, c] (cv2: <= 4 channels)."""
    out = np.empty((n, n, coarse.shape[-1]), np.float32)
    for c0 in range(0, coarse.shape[-1], 4):
        up = cv2.resize(
            np.ascontiguousarray(coarse[..., c0 : c0 + 4]), (n, n), interpolation=cv2.INTER_LINEAR
        )
        out[..., c0 : c0 + 4] = up.reshape(n, n, -1)
    return out


def classify(g) -> dict[str, np.ndarray]:
    """Tissue compartments from structure fields (works on images and on point lists)."""
    tissue = g[..., _I["outline"]] > 0
    epi_region = tissue & (g[..., _I["epi"]] > 0)
    fat = tissue & ~epi_region & (g[..., _I["fat"]] > 0)
    gland = epi_region & (g[..., _I["gland"]] > 0)
    solid = epi_region & ~gland & (g[..., _I["solid"]] > 0)
    nest = epi_region & ~gland & ~solid
    gdist = g[..., _I["gdist"]]
    epithelium = solid | (gland & (gdist < 1)) | (nest & (gdist < 1.2))
    lumen = gland & (g[..., _I["lumen"]] > 0)
    necrotic = solid & (g[..., _I["necrosis"]] > 0)
    return {
        "tissue": tissue,
        "epithelium": epithelium,
        "lumen": lumen,
        "necrotic": necrotic,
        "stroma": tissue & ~fat & ~epithelium,
        "fat": fat,
    }


class TileRenderer:
    """Renders square level-0 chunks ("tiles" of ``tile`` px) of one scene seen by one site."""

    def __init__(self, scene: Scene, site: Site, render_mpp: float = 0.5, tile: int = 1024):
        self.scene = scene
        self.site = site
        self.rmpp = render_mpp
        self.factor = int(round(render_mpp / scene.mpp))  # level-0 px per render px
        self.tile = tile
        self.t = tile // self.factor  # render px per tile
        self.ks = int(round(SMOOTH_UM / render_mpp))  # render px per smooth-grid step
        self.kc = int(round(CELL_UM / render_mpp))
        # Two smooth-grid steps around the tile: upsampled fields are exact (tile-independent)
        # from half a step inside the canvas edge, which leaves 1.5 steps (12 um) for cells
        # centred outside the tile to reach into it, and room for blur.
        self.m = 2 * self.ks
        self.n = self.t + 2 * self.m
        self.reach = self.m - self.ks // 2 - 1  # px beyond the tile where cells are decided

    def _origin(self, tx: int, ty: int) -> tuple[int, int]:
        return tx * self.t - self.m, ty * self.t - self.m

    def _box(self, x0: int, y0: int):
        um = self.rmpp
        return (x0 * um, y0 * um, (x0 + self.n) * um, (y0 + self.n) * um)

    def _grid(self, x0: int, y0: int, k: int):
        """Slide-micron centres of the k-px grid cells over the tile (+margin)."""
        nc = self.n // k
        centres = (np.arange(nc) * k + (k - 1) / 2 + 0.5) * self.rmpp
        xs = (x0 * self.rmpp + centres)[None, :].repeat(nc, 0)
        ys = (y0 * self.rmpp + centres)[:, None].repeat(nc, 1)
        return xs, ys

    def _fields(self, x0: int, y0: int):
        """Structure channels upsampled to the tile (+margin) and the region index map."""
        n = self.n
        regions = self.scene.regions_in(*self._box(x0, y0))
        if not regions:
            return None, None
        xs, ys = self._grid(x0, y0, self.ks)
        smooth = np.zeros(xs.shape + (len(SMOOTH),), np.float32)
        smooth[..., 0] = -10.0
        rid = np.full(xs.shape, -1, np.int32)
        for i, region in regions:
            f = smooth_fields(region, xs, ys)
            better = f[..., 0] > smooth[..., 0]
            smooth[better] = f[better]
            rid[better] = i
        if smooth[..., 0].max() <= -1.0:  # no tissue within a grid step of the tile
            return None, None
        xc, yc = self._grid(x0, y0, self.kc)
        rid_c = cv2.resize(rid, xc.shape[::-1], interpolation=cv2.INTER_NEAREST)
        # Glands and adipocytes only where epithelium or fat may be (the 2 um grid is
        # the costly part); the test reads the same upsampled values in every tile.
        near = _upsample(smooth[..., :3], xc.shape[0])
        tissue = near[..., 0] > -0.5
        want_gland = tissue & (near[..., 1] > -0.3)
        want_fat = tissue & (near[..., 2] > -0.3) & (near[..., 1] < 0.3)
        cells = np.empty(xc.shape + (len(CELLS),), np.float32)
        cells[:] = CELLS_FAR
        for i, region in regions:
            mine = rid_c == i
            sel = mine & want_gland
            if sel.any():
                cells[sel, :2] = gland_fields(region, xc[sel], yc[sel])
            sel = mine & want_fat
            if sel.any():
                cells[sel, 2:] = fat_fields(region, xc[sel], yc[sel])
        # Fibre texture weights follow the (smooth) fibre direction: cheaper on the grid.
        cos2, sin2 = smooth[..., SMOOTH.index("cos2")], smooth[..., SMOOTH.index("sin2")]
        weights = np.stack(
            [
                np.maximum(0, cos2 * np.cos(k * np.pi / 2) + sin2 * np.sin(k * np.pi / 2)) ** 2
                for k in range(4)
            ],
            axis=-1,
        )
        fine = np.concatenate(
            (_upsample(smooth, n), _upsample(weights, n), _upsample(cells, n)), axis=-1
        )
        return fine, cv2.resize(rid, (n, n), interpolation=cv2.INTER_NEAREST)

    # -- rendering ------------------------------------------------------------------
    def render(self, tx: int, ty: int):
        """Level-0 RGB tile (tile x tile x 3 uint8) and its truth block, or None if empty."""
        x0, y0 = self._origin(tx, ty)
        fine, rid = self._fields(x0, y0)
        if fine is None:
            return None
        n, um, seed = self.n, self.rmpp, self.scene.seed
        masks = classify(fine)
        tissue, epithelium, stroma, fat = (
            masks[k] for k in ("tissue", "epithelium", "stroma", "fat")
        )
        lumen, necrotic = masks["lumen"], masks["necrotic"]
        g = {name: fine[..., i] for i, name in enumerate(_FIELDS)}
        morphs = [r.morph for r in self.scene.regions]
        rid_lut = np.where(rid >= 0, rid, len(morphs))

        def lut(attr):
            return np.array([getattr(m, attr) for m in morphs] + [0], np.float32)[rid_lut]

        # Stroma: collagen fibres along the local direction, bundles and looser areas.
        main = morphs[int(np.bincount(rid[rid >= 0]).argmax())] if (rid >= 0).any() else morphs[0]
        length_um = min(FIBRE_LENGTHS_UM, key=lambda L: abs(L - main.fibre_um))
        tex = fibres(x0, y0, n, seed + 101, int(round(length_um / um)))
        fib = g["w0"] * tex[0]
        for k, name in enumerate(FIBRE_WEIGHTS[1:], start=1):
            fib += g[name] * tex[k]
        fib = np.clip(0.5 + 0.25 * fib, 0, 1)
        e = np.where(stroma, lut("stroma") * (0.35 + 0.8 * fib), 0).astype(np.float32)
        h = np.where(stroma, 0.03, 0).astype(np.float32)
        # Fat: thin eosinophilic membranes between empty adipocytes.
        membrane = np.clip((2.6 - g["membrane"]) / 1.6, 0, 1)
        # Fat lobules end in a membrane too: the outer wall of the cells at the tissue edge.
        inner = cv2.erode(tissue.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
        membrane[tissue & ~inner] = 1.0
        e = np.where(fat, 0.7 * membrane, e)
        # Epithelium: cytoplasm; lumens nearly empty; necrosis pink and granular.
        grain = white(x0, y0, n, seed + 103)
        e = np.where(epithelium, lut("cytoplasm") * (0.9 + 0.1 * grain), e)
        h = np.where(epithelium, 0.2 + 0.03 * grain, h)
        e = np.where(lumen, 0.05, e)
        h = np.where(lumen, 0.0, h)
        e = np.where(necrotic, 0.5 + 0.1 * grain, e)
        h = np.where(necrotic, 0.2 + 0.08 * grain, h)

        nuc = np.zeros((n, n), np.float32)
        self._cells(nuc, x0, y0, masks, g, rid)
        inside = nuc > 0
        chroma = cv2.GaussianBlur(white(x0, y0, n, seed + 107), (0, 0), 0.6)
        h = np.where(inside, nuc * (1 + 0.6 * chroma), h)
        e = np.where(inside, e * 0.4, e)
        thick = g["thickness"]
        rgb = self.site.to_rgb(h * thick, e * thick)
        rgb = self.site.optics(rgb, um, white(x0, y0, n, seed + 109))

        m, f = self.m, self.factor
        if f > 1:
            rgb = cv2.resize(rgb, (n * f, n * f), interpolation=cv2.INTER_LINEAR)
        rgb = rgb[m * f : m * f + self.tile, m * f : m * f + self.tile]
        classes = np.zeros((n, n), np.uint8)
        classes[epithelium] = EPITHELIUM
        classes[stroma] = STROMA
        classes[fat] = FAT
        ds = TRUTH_DOWNSAMPLE // f
        truth = classes[m + ds // 2 : m + self.t : ds, m + ds // 2 : m + self.t : ds]
        return np.ascontiguousarray(rgb), np.ascontiguousarray(truth)

    # -- cells ----------------------------------------------------------------------
    def _candidates(self, x0, y0, cell_um, salt):
        """Jittered-grid points whose centre lies within ``reach`` of the tile (canvas px)."""
        um, lo, hi = self.rmpp, self.m - self.reach, self.m + self.t + self.reach
        px, py, gx, gy = jitter_points(
            (x0 + lo) * um,
            (y0 + lo) * um,
            (x0 + hi) * um,
            (y0 + hi) * um,
            cell_um,
            self.scene.seed + salt,
        )
        cx = px / um - x0 - 0.5
        cy = py / um - y0 - 0.5
        inside = (cx >= lo) & (cy >= lo) & (cx < hi) & (cy < hi)
        return cx[inside], cy[inside], gx[inside], gy[inside]

    def _attr(self, gx, gy, salt):
        return hash_uniform(gx, gy, self.scene.seed + salt)

    def _cells(self, canvas, x0, y0, masks, g, rid) -> None:
        """Draw the nuclei of every cell kept by the fields at its centre (hematoxylin)."""
        um, s = self.rmpp, 16  # cv2 fixed point: 4 fractional bits
        tissue, epithelium, stroma = masks["tissue"], masks["epithelium"], masks["stroma"]
        lumen, necrotic, fat = masks["lumen"], masks["necrotic"], masks["fat"]

        cx, cy, gx, gy = self._candidates(x0, y0, 7.0, 300)
        i, j = cy.astype(int), cx.astype(int)
        p = g["lymph"][i, j] * np.where(epithelium[i, j], 0.25, 1.0)
        keep = tissue[i, j] & ~fat[i, j] & ~lumen[i, j] & ~necrotic[i, j]
        keep &= self._attr(gx, gy, 301) < p
        radius = (2.2 + 0.6 * self._attr(gx[keep], gy[keep], 302)) / um * s
        for x, y, r in zip(cx[keep] * s, cy[keep] * s, radius):
            cv2.circle(canvas, (int(x), int(y)), int(r), 1.55, -1, cv2.LINE_8, 4)

        cx, cy, gx, gy = self._candidates(x0, y0, 16.0, 400)
        i, j = cy.astype(int), cx.astype(int)
        keep = stroma[i, j] & (self._attr(gx, gy, 401) < 0.45)
        angle = 0.5 * np.degrees(np.arctan2(g["sin2"][i, j], g["cos2"][i, j]))[keep]
        length = (3.5 + 2.5 * self._attr(gx[keep], gy[keep], 402)) / um * s
        width = int(1.0 / um * s)
        for x, y, L, a in zip(cx[keep] * s, cy[keep] * s, length, angle):
            cv2.ellipse(
                canvas, (int(x), int(y)), (int(L), width), float(a), 0, 360, 1.15, -1, cv2.LINE_8, 4
            )

        if necrotic.any():
            cx, cy, gx, gy = self._candidates(x0, y0, 5.0, 500)
            i, j = cy.astype(int), cx.astype(int)
            keep = necrotic[i, j] & (self._attr(gx, gy, 501) < 0.4)
            radius = (0.6 + 1.0 * self._attr(gx[keep], gy[keep], 502)) / um * s
            for x, y, r in zip(cx[keep] * s, cy[keep] * s, radius):
                cv2.circle(canvas, (int(x), int(y)), max(1, int(r)), 1.4, -1, cv2.LINE_8, 4)

        ok = epithelium & ~lumen & ~necrotic
        if not ok.any():
            return
        for index in np.unique(rid[ok]):
            morph = self.scene.regions[index].morph
            cx, cy, gx, gy = self._candidates(x0, y0, 2.7 * morph.nucleus_um, 200)
            i, j = cy.astype(int), cx.astype(int)
            keep = ok[i, j] & (rid[i, j] == index) & (self._attr(gx, gy, 201) < morph.cellularity)
            self._nuclei(canvas, morph, cx[keep] * s, cy[keep] * s, gx[keep], gy[keep])

    def _nuclei(self, canvas, morph, X, Y, gx, gy):
        um, s = self.rmpp, 16
        a = [self._attr(gx, gy, 203 + j) for j in range(5)]
        size = morph.nucleus_um * np.exp(morph.pleomorphism * 1.7 * (2 * a[0] - 1))
        aspect = 1.1 + 2.2 * morph.pleomorphism * a[1]
        major = np.minimum(size * np.sqrt(aspect), MAX_CELL_UM) / um * s
        minor = size / np.sqrt(aspect) / um * s
        angle = a[2] * 180
        dens = morph.chromatin * (0.8 + 0.4 * a[3])
        nucleolus = a[4] < morph.nucleoli
        dot = max(1, int(0.75 / um * s))
        for x, y, r1, r2, ang, d, nl in zip(X, Y, major, minor, angle, dens, nucleolus):
            centre = (int(x), int(y))
            axes = (max(1, int(r1)), max(1, int(r2)))
            cv2.ellipse(canvas, centre, axes, float(ang), 0, 360, float(d), -1, cv2.LINE_8, 4)
            cv2.ellipse(canvas, centre, axes, float(ang), 0, 360, float(d * 1.3), 1, cv2.LINE_8, 4)
            if nl:
                cv2.circle(canvas, centre, dot, float(d * 1.6), -1, cv2.LINE_8, 4)
