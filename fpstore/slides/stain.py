"""Stain operations on H&E patches: optical density, stain matrices, concentrations,
normalisation to a target, and augmentation in H&E optical-density space.

Beer-Lambert: a pixel's optical density (OD = -ln(I / 255) per channel) is the sum of
each stain's concentration times its unit OD vector. A stain matrix holds the
hematoxylin and eosin vectors as rows (2 x 3, H first); concentrations are the least-
squares solution of OD = C @ M.

Normalisation (``StainNormalizer``; Macenko 2009, Vahadane 2016, Reinhard 2001) is
fitted once to a target image, then applied to batches of uint8 patches [N, H, W, 3]:

    norm = StainNormalizer(StainNormConfig("macenko"))   # default target: tiatoolbox's
    source = norm.fit_source(sample)                       # per slide: a sample of its patches
    patches = norm.transform(patches, source)              # every batch of that slide
    norm.digest                                            # for the extraction's resume key

Per slide (the default) is recommended: the slide's own stains are estimated once from
a sample of its tissue patches, so every patch of a slide gets the same transform (for
Macenko and Vahadane a fixed 3 x 3 map in OD space, for Reinhard a fixed affine map per
Lab channel), which keeps a slide consistent and costs a few milliseconds per patch. The
sample should be chosen deterministically (its choice belongs in the resume key). Per patch
(``per="patch"``) estimates each patch's stains from its own pixels: simpler, but a
patch with little hematoxylin or eosin gets a poor estimate and two neighbouring patches
of one slide can come out in different colours; patches with too little tissue to
estimate keep their pixels. Per patch runs a whole batch at once (``transform_tensor``;
fpstore.slides.stain_batch), with the same estimate: OpenCV and numpy kernels on the CPU,
torch on a GPU.

Augmentation (``StainAugment``, ``stain_jitter``; Tellez et al. 2019): after colour
deconvolution each stain's concentration is scaled by alpha ~ U(1 - scale, 1 + scale)
and shifted by beta ~ U(-shift, shift), per patch, optionally with the stain vectors
themselves perturbed; the residual (third) component is kept, so zero settings give
back the input.

Why not tiatoolbox throughout: its normalisers re-estimate the source stains on every
call (no per-slide mode), its Macenko takes ~30 ms per 224 px patch, and its Vahadane
(scikit-learn dictionary learning) returns a second "stain" with negative OD components
on its own target image and warns that it is unstable. Macenko and Vahadane are written
here in numpy (Vahadane's sparse non-negative factorisation by projected gradient,
deterministic); tiatoolbox provides the default target image, from its installed package
data (tiatoolbox/data/target_image.png, BSD-3-Clause), so nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fpstore.config import check_choice, check_range
from fpstore.errors import ConfigError, StainError
from fpstore.slides.colour import FIT_PIXELS, OD_TABLE, from_lab, to_lab

STAIN_METHODS = ("macenko", "vahadane", "reinhard")
PER = ("slide", "patch")
# Macenko et al.'s reference H&E vectors (OD per unit concentration, R G B).
REFERENCE_STAINS = ((0.5626, 0.7201, 0.4062), (0.2159, 0.8012, 0.5581))


# ----------------------------------------------------------------------------- OD basics


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """OD (float32, same shape) of uint8 RGB: -ln(I / 255), with 0 read as 1."""
    return OD_TABLE[np.asarray(rgb, np.uint8)]


def rgb_from_od(od: np.ndarray) -> np.ndarray:
    """uint8 RGB of OD (inverse of ``optical_density``; negative OD clips to 255)."""
    return np.clip(255.0 * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)


def tissue_pixels(od: np.ndarray, min_od: float = 0.15) -> np.ndarray:
    """Pixels stained enough to estimate stains from: every channel's OD >= ``min_od``."""
    return od.min(axis=-1) >= min_od


def concentrations(od: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations [..., 2] of OD [..., 3] for a 2 x 3 stain matrix."""
    return od @ np.linalg.pinv(np.asarray(matrix, np.float32)).astype(np.float32)


def reconstruct(conc: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """uint8 RGB of concentrations [..., 2] under a 2 x 3 stain matrix."""
    return rgb_from_od(conc @ np.asarray(matrix, np.float32))


def stain_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle in degrees between two stain vectors."""
    cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _h_first(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """Rows (H, E), unit length: hematoxylin absorbs more red than eosin does."""
    matrix = np.stack([v1, v2]) if v1[0] >= v2[0] else np.stack([v2, v1])
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------- stain matrices


def macenko_matrix(od: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Macenko et al. 2009: the H&E plane is spanned by the two leading singular vectors of
    the tissue pixels' OD [N, 3]; the stains are the robust extreme angles (``percentile``
    and 100 - ``percentile``) of the pixels within that plane."""
    od = np.asarray(od, np.float64).reshape(-1, 3)
    _, vectors = np.linalg.eigh(od.T @ od)
    plane = vectors[:, [2, 1]]
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # OD vectors point into the positive octant
    xy = od @ plane
    phi = np.arctan2(xy[:, 1], xy[:, 0])
    low, high = np.percentile(phi, [100.0 - percentile, percentile])
    v1 = plane @ np.array([np.cos(low), np.sin(low)])
    v2 = plane @ np.array([np.cos(high), np.sin(high)])
    return _h_first(v1, v2)


def vahadane_matrix(
    od: np.ndarray, sparsity: float = 0.1, iterations: int = 30, max_pixels: int = 20_000
) -> np.ndarray:
    """Vahadane et al. 2016: OD [N, 3] ~ C @ W with C, W >= 0, unit rows of W and an L1
    penalty ``sparsity`` on C (each pixel mostly one stain), on an even subsample of at most
    ``max_pixels`` pixels. Solved by exact alternating updates of one stain at a time (the
    objective falls at every step and settles within ~10 rounds), started from the Macenko
    estimate: deterministic, unlike dictionary learning with random restarts."""
    od = np.asarray(od, np.float64).reshape(-1, 3)
    x = od[:: max(1, len(od) // max_pixels)]
    w = np.maximum(macenko_matrix(x).astype(np.float64), 1e-6)
    c = np.maximum(x @ np.linalg.pinv(w), 0.0)
    for _ in range(iterations):
        # Each stain's concentrations given the other's (w rows have unit length), then each
        # stain's unit vector given the concentrations: the residual of the other stain is
        # x - c[:, other] w[other], written out so that no N x 3 array is formed.
        xw, cross = x @ w.T, float(w[0] @ w[1])
        c[:, 0] = np.maximum(xw[:, 0] - cross * c[:, 1] - sparsity, 0.0)
        c[:, 1] = np.maximum(xw[:, 1] - cross * c[:, 0] - sparsity, 0.0)
        gram = c.T @ c
        for k, other in ((0, 1), (1, 0)):
            row = np.maximum(c[:, k] @ x - gram[k, other] * w[other], 1e-9)
            w[k] = row / np.linalg.norm(row)
    return _h_first(w[0], w[1])


# ---------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class StainNormConfig:
    """How patches are normalised. ``target``: an image file of H&E tissue; None is
    tiatoolbox's stain-normalisation target."""

    method: str = "macenko"  # macenko | vahadane | reinhard
    per: str = "slide"  # slide: the slide's stains fitted once on a sample; patch: each alone
    target: str | None = None
    min_od: float = 0.15  # tissue pixels: every channel's OD at least this (Macenko's beta)
    percentile: float = 99.0  # robust extremes: stain angles, concentration maxima
    sparsity: float = 0.1  # Vahadane's L1 weight
    min_tissue_px: int = 1_000  # fewer tissue pixels than this cannot be estimated from

    def __post_init__(self):
        check_choice("StainNormConfig", "method", self.method, STAIN_METHODS)
        check_choice("StainNormConfig", "per", self.per, PER)
        check_range("StainNormConfig", "min_od", self.min_od, 0.0, 2.0)
        check_range("StainNormConfig", "percentile", self.percentile, 50.0, 100.0)
        check_range("StainNormConfig", "sparsity", self.sparsity, 0.0, 10.0)
        check_range("StainNormConfig", "min_tissue_px", self.min_tissue_px, 1)


@dataclass(frozen=True)
class SourceStains:
    """What is estimated of an image's stains: Macenko/Vahadane ``matrix`` (2 x 3) and the
    ``maxima`` (robust maximum concentration per stain); Reinhard ``mean`` and ``std`` of its
    tissue pixels in 8-bit Lab (OpenCV's: L x 2.55, a + 128, b + 128)."""

    matrix: np.ndarray | None = None
    maxima: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None


def default_target_path() -> Path:
    """tiatoolbox's stain-normalisation target image, from its installed package data."""
    spec = importlib.util.find_spec("tiatoolbox")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("tiatoolbox is not installed; give a target image with --stain-target")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "target_image.png"
    if not path.is_file():
        raise ConfigError(f"tiatoolbox's target image {path} is missing; give --stain-target")
    return path


def read_rgb(path: str | Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ConfigError(f"cannot read the stain target image {path}; give a PNG or JPEG file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class StainNormalizer:
    """Normalises uint8 RGB patches [N, H, W, 3] to the stains of one target image.

    Fitted to the target when built (a target without enough tissue raises ConfigError).
    ``describe()`` and ``digest`` name the settings and the target's pixels, for resume keys.
    """

    def __init__(
        self, config: StainNormConfig = StainNormConfig(), target: np.ndarray | None = None
    ):
        self.config = config
        if target is None:
            path = Path(config.target) if config.target is not None else default_target_path()
            target, self._target_name = read_rgb(path), str(path)
        else:
            self._target_name = "array"
        target = np.ascontiguousarray(np.asarray(target, np.uint8)[..., :3])
        self._target_hash = hashlib.sha256(
            np.asarray(target.shape).tobytes() + target.tobytes()
        ).hexdigest()
        try:
            self.target_ = self._estimate(target[None], what="target")
        except StainError as error:
            raise ConfigError(f"stain target {self._target_name}: {error}") from None

    def describe(self) -> dict:
        """The settings and the target, stable across runs and machines."""
        settings = asdict(self.config)
        settings.pop("target")  # the target's pixels count, not where the file lies
        if self.config.method != "vahadane":
            settings.pop("sparsity")
        if self.config.method == "reinhard":
            settings.pop("percentile")
        return {"stain_norm": settings, "target_sha256": self._target_hash}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def fit_source(self, patches: np.ndarray) -> SourceStains:
        """The stains of a slide, estimated once from a sample of its tissue patches
        [N, H, W, 3] (a few dozen is plenty). Raises StainError with too little tissue."""
        return self._estimate(_batch(patches), what="sample")

    def transform(self, patches: np.ndarray, source: SourceStains | None = None) -> np.ndarray:
        """Normalised copies of uint8 patches [N, H, W, 3] (or one [H, W, 3]).

        ``per="slide"`` needs the slide's ``source`` from ``fit_source``; ``per="patch"``
        estimates each patch alone (``source`` must be None).
        """
        single = np.asarray(patches).ndim == 3
        batch = _batch(patches)
        if self.config.per == "slide":
            if source is None:
                raise ConfigError(
                    "per-slide stain normalisation needs the slide's stains: "
                    "source = normalizer.fit_source(sample_patches)"
                )
            out = self._apply(batch, source)
        else:
            if source is not None:
                raise ConfigError("per-patch stain normalisation estimates each patch; drop source")
            out = self._per_patch(batch)
        return out[0] if single else out

    # -- internals ---------------------------------------------------------------------
    def _estimate(self, batch: np.ndarray, what: str) -> SourceStains:
        cfg = self.config
        od = optical_density(batch)
        tissue = tissue_pixels(od, cfg.min_od)
        found = int(tissue.sum())
        if found < cfg.min_tissue_px:
            raise StainError(
                f"the {what} has {found} stained pixels (every channel's OD >= {cfg.min_od}); "
                f"{cfg.method} needs at least {cfg.min_tissue_px}: choose an image with H&E tissue"
            )
        if cfg.method == "reinhard":
            lab = to_lab(batch)[tissue].astype(np.float64)
            return SourceStains(mean=lab.mean(axis=0), std=np.maximum(lab.std(axis=0), 1e-3))
        pixels = od[tissue]
        pixels = pixels[:: max(1, len(pixels) // FIT_PIXELS)]
        if cfg.method == "macenko":
            matrix = macenko_matrix(pixels, cfg.percentile)
        else:
            matrix = vahadane_matrix(pixels, cfg.sparsity)
        maxima = np.percentile(concentrations(pixels, matrix), cfg.percentile, axis=0)
        return SourceStains(matrix=matrix, maxima=np.maximum(maxima, 1e-3).astype(np.float32))

    def transform_tensor(self, patches):
        """Per-patch normalised copies of a uint8 torch batch [N, H, W, 3], on its device
        (``per="patch"``; fpstore.slides.stain_batch: OpenCV and numpy kernels on the CPU,
        torch on a GPU)."""
        from fpstore.slides.stain_batch import normalise_batch

        if self.config.per != "patch":
            raise ConfigError("transform_tensor is per-patch normalisation; use per='patch'")
        return normalise_batch(patches, self)

    def _per_patch(self, batch: np.ndarray) -> np.ndarray:
        import torch

        # Each patch estimated alone, the batch at once; too little tissue: kept as it is.
        return self.transform_tensor(torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    def _apply(self, batch: np.ndarray, source: SourceStains) -> np.ndarray:
        """Every patch mapped by one source's transform."""
        import cv2

        target = self.target_
        if self.config.method == "reinhard":
            # An affine map per Lab channel: three 256-entry tables on 8-bit Lab.
            values = np.arange(256, dtype=np.float64)[:, None]
            table = (values - source.mean) * (target.std / source.std) + target.mean
            table = np.clip(table + 0.5, 0, 255).astype(np.uint8)
            lab = to_lab(batch)
            flat = cv2.LUT(lab.reshape(-1, lab.shape[-2], 3), table[None])
            return from_lab(flat.reshape(lab.shape))
        # C = OD @ pinv(M_s); C *= max_t / max_s; OD' = C @ M_t: one 3 x 3 map.
        scale = np.diag(target.maxima / source.maxima)
        od_map = np.linalg.pinv(source.matrix) @ scale @ target.matrix
        return rgb_from_od(optical_density(batch) @ od_map.astype(np.float32))


def _batch(patches: np.ndarray) -> np.ndarray:
    batch = np.asarray(patches)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ConfigError(
            f"stain operations take uint8 RGB patches [N, H, W, 3]; got {batch.dtype} "
            f"of shape {tuple(batch.shape)}"
        )
    return batch


# ----------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class StainAugmentConfig:
    """Tellez et al. 2019 stain augmentation in H&E OD space, per patch.

    Their "HED light" is scale = shift = 0.05, "HED strong" 0.2; shifts are in OD units
    of a unit stain vector. The change is applied in proportion to how stained a pixel is
    (none below a summed OD of ``stained_od[0]``, all of it from ``stained_od[1]``), so
    that glass stays glass.
    """

    scale: float = 0.2  # sigma1: concentration x alpha, alpha ~ U(1 - scale, 1 + scale)
    shift: float = 0.05  # sigma2: concentration + beta, beta ~ U(-shift, shift)
    vector: float = 0.0  # stain vectors: each OD component + N(0, vector), then unit length
    matrix: tuple[tuple[float, float, float], tuple[float, float, float]] = REFERENCE_STAINS
    stained_od: tuple[float, float] = (0.2, 0.6)

    def __post_init__(self):
        check_range("StainAugmentConfig", "scale", self.scale, 0.0, 1.0)
        check_range("StainAugmentConfig", "shift", self.shift, 0.0, 1.0)
        check_range("StainAugmentConfig", "vector", self.vector, 0.0, 1.0)
        check_range("StainAugmentConfig", "stained_od[0]", self.stained_od[0], 0.0, 10.0)
        check_range(
            "StainAugmentConfig", "stained_od[1]", self.stained_od[1], self.stained_od[0] + 1e-3
        )
        if np.asarray(self.matrix, float).shape != (2, 3) or (np.asarray(self.matrix) < 0).any():
            raise ConfigError(
                f"StainAugmentConfig.matrix={self.matrix!r}; give two non-negative OD vectors "
                "(hematoxylin, eosin) of three components"
            )


def _basis(matrix):
    """3 x 3 float32 tensor: unit H, E, and their cross product (the residual direction)."""
    import torch

    m = torch.as_tensor(np.asarray(matrix, np.float32))
    m = m / m.norm(dim=-1, keepdim=True)
    residual = torch.linalg.cross(m[..., 0, :], m[..., 1, :])
    residual = residual / residual.norm(dim=-1, keepdim=True)
    return torch.cat([m, residual.unsqueeze(-2)], dim=-2)


def draw_stain_params(n: int, cfg: StainAugmentConfig, generator) -> dict:
    """Per-patch parameters: alpha [n, 2], beta [n, 2] and the stain matrices [n, 2, 3]."""
    import torch

    def uniform(spread):
        return (torch.rand(n, 2, generator=generator) * 2 - 1) * spread

    base = torch.as_tensor(np.asarray(cfg.matrix, np.float32)).expand(n, 2, 3)
    if cfg.vector:
        noise = torch.randn(n, 2, 3, generator=generator) * cfg.vector
        base = (base + noise).clamp_min(1e-3)
    return {
        "alpha": 1 + uniform(cfg.scale),
        "beta": uniform(cfg.shift),
        "matrix": base / base.norm(dim=-1, keepdim=True),
    }


def apply_stain_params(x, params: dict, cfg: StainAugmentConfig):
    """Augment float RGB [N, 3, H, W] in [0, 1] (any torch device) with drawn parameters."""
    import torch

    n = x.shape[0]
    device, dtype = x.device, torch.float32
    # The per-patch 3 x 3 maps are made on the CPU, where the parameters are drawn, and sent
    # in one copy: on a GPU, inverting there would make the host wait for its error check.
    basis = _basis(cfg.matrix)  # deconvolution with the configured stains
    new = torch.cat([params["matrix"].to(dtype), basis[2:].expand(n, 1, 3)], dim=1)
    alpha = torch.cat([params["alpha"].to(dtype), torch.ones(n, 1)], dim=1)
    # OD' = OD @ inv(B) @ diag(alpha) @ B' + beta @ B'[:2]: one 3 x 3 map and shift per patch.
    maps = torch.linalg.inv(basis) @ (alpha.unsqueeze(-1) * new)
    shift = (params["beta"].to(dtype).unsqueeze(-1) * new[:, :2]).sum(dim=1)
    packed = torch.cat([maps.reshape(n, 9), shift], dim=1)
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    maps, shift = packed[:, :9].view(n, 3, 3), packed[:, 9:]
    od = -torch.log(x.to(dtype).clamp(1.0 / 255.0, 1.0))
    low, high = cfg.stained_od
    weight = ((od.sum(dim=1, keepdim=True) - low) / (high - low)).clamp_(0.0, 1.0)
    change = torch.einsum("nchw,ncd->ndhw", od, maps) + shift.view(n, 3, 1, 1) - od
    return torch.exp(-(od + weight * change)).clamp_(0.0, 1.0).to(x.dtype)


def stain_jitter(x, cfg: StainAugmentConfig, generator):
    """Draw and apply per-patch stain augmentation to float RGB [N, 3, H, W] in [0, 1]."""
    return apply_stain_params(x, draw_stain_params(x.shape[0], cfg, generator), cfg)


class StainAugment:
    """Seeded stain augmentation of uint8 RGB patches [N, H, W, 3], numpy array or torch
    tensor (returned as the same type, on the same device)."""

    def __init__(self, config: StainAugmentConfig = StainAugmentConfig(), seed: int = 0):
        import torch

        self.config = config
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, patches):
        import torch

        is_numpy = isinstance(patches, np.ndarray)
        batch = torch.from_numpy(_batch(patches)) if is_numpy else patches
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ConfigError(
                f"StainAugment takes uint8 RGB patches [N, H, W, 3]; got {batch.dtype} "
                f"of shape {tuple(batch.shape)}"
            )
        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        y = stain_jitter(x, self.config, self.generator)
        out = y.mul_(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return out.contiguous().numpy() if is_numpy else out.contiguous()
