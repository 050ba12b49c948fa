"""Coordinate-hashed noise: the same value at the same place, whatever the tile.

Every random field of the renderer is a pure function of (seed, coordinates), so
that a slide can be rendered tile by tile, in any order, without seams and with
the same bytes every time.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 arithmetic wraps, as intended)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def seed_of(*parts) -> int:
    """A 40-bit seed from ints and strings (stable across runs, unlike hash()).

    40 bits leave room to add small salts (seed + 7) without leaving uint64.
    """
    h = np.array([0x2545F4914F6CDD1D], dtype=np.uint64)
    for part in parts:
        if isinstance(part, str):
            for byte in part.encode():
                h = _mix(h ^ np.uint64(byte) + _GOLD)
        else:
            h = _mix(h ^ np.array([int(part) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLD)
    return int(h[0]) >> 24


def hash_uniform(ix: np.ndarray, iy: np.ndarray, seed) -> np.ndarray:
    """Uniform [0, 1) per integer lattice point (float32); ``seed`` may be an array."""
    a = np.ascontiguousarray(ix, np.int64).view(np.uint64)
    b = np.ascontiguousarray(iy, np.int64).view(np.uint64)
    s = np.asarray(seed, np.uint64) if np.ndim(seed) else np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    h = b + s
    h *= _M1
    h ^= a * _GOLD
    h ^= h >> np.uint64(31)
    h *= _M2
    h ^= h >> np.uint64(29)
    h *= _M1
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


def _value_noise(x: np.ndarray, y: np.ndarray, seed) -> np.ndarray:
    """Value noise in [-1, 1] at lattice coordinates (unit cells); seed broadcasts."""
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx = (x - x0).astype(np.float32)
    fy = (y - y0).astype(np.float32)
    sx = fx * fx * (3 - 2 * fx)
    sy = fy * fy * (3 - 2 * fy)
    ix = x0.astype(np.int64)
    iy = y0.astype(np.int64)
    # The four corners in one hash call: per-call overhead dominates on small grids.
    cx = np.stack((ix, ix + 1, ix, ix + 1))
    cy = np.stack((iy, iy, iy + 1, iy + 1))
    c00, c10, c01, c11 = hash_uniform(cx, cy, seed)
    top = c00 + (c10 - c00) * sx
    bottom = c01 + (c11 - c01) * sx
    return (top + (bottom - top) * sy) * 2 - 1


def value_noise(u: np.ndarray, v: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Smooth noise in [-1, 1] with features of about ``scale`` (same units as u, v)."""
    return _value_noise(np.asarray(u, np.float64) / scale, np.asarray(v, np.float64) / scale, seed)


def fbm_many(u: np.ndarray, v: np.ndarray, specs) -> list[np.ndarray]:
    """Several fractal noises at the same points in one batch.

    ``specs`` is a list of (scale, seed, octaves); each result has unit standard
    deviation. Same values as fbm() one by one.
    """
    u = np.asarray(u, np.float64)
    v = np.asarray(v, np.float64)
    scales, seeds, weights, owner = [], [], [], []
    for k, (scale, seed, octaves) in enumerate(specs):
        norm = np.sqrt(sum(0.25**o for o in range(octaves)))
        for o in range(octaves):
            scales.append(scale / 2**o)
            seeds.append((seed + 7919 * o) & 0xFFFFFFFFFFFFFFFF)
            weights.append(0.5**o / (_VALUE_NOISE_STD * norm))
            owner.append(k)
    shape = (len(scales),) + (1,) * u.ndim
    inv = (1.0 / np.asarray(scales)).reshape(shape)
    layers = _value_noise(u[None] * inv, v[None] * inv, np.asarray(seeds, np.uint64).reshape(shape))
    layers *= np.asarray(weights, np.float32).reshape(shape)
    out = [np.zeros(u.shape, np.float32) for _ in specs]
    for k, layer in zip(owner, layers):
        out[k] += layer
    return out


def fbm(u: np.ndarray, v: np.ndarray, scale: float, seed: int, octaves: int = 3) -> np.ndarray:
    """Fractal sum of value noise, normalised to unit standard deviation."""
    return fbm_many(u, v, [(scale, seed, octaves)])[0]


# Standard deviation of value_noise over the plane (smoothstep-interpolated uniform
# lattice values in [-1, 1]), measured once: see noise_quantile().
_VALUE_NOISE_STD = 0.4267


@lru_cache(maxsize=8)
def _fbm_sample(octaves: int) -> np.ndarray:
    rng = np.random.default_rng(12345)
    u = rng.uniform(-1e5, 1e5, 200_000)
    v = rng.uniform(-1e5, 1e5, 200_000)
    return np.sort(fbm(u, v, 10.0, 99, octaves))


def noise_quantile(p, octaves: int = 3):
    """Threshold t with P(fbm < t) = p: turns a wanted area fraction into a level set."""
    return np.quantile(_fbm_sample(octaves), np.clip(p, 0.0, 1.0))


BANK = 1024  # period (px) of the precomputed noise textures


@lru_cache(maxsize=1)
def _white_bank() -> np.ndarray:
    return np.random.default_rng(20200416).uniform(-1, 1, (BANK, BANK)).astype(np.float32)


def _wrapped(array: np.ndarray, start: int, n: int, axis: int) -> np.ndarray:
    """n consecutive entries from ``start`` along ``axis``, wrapping around (a view if it can)."""
    start %= array.shape[axis]
    parts, index = [], [slice(None)] * array.ndim
    while n > 0:
        take = min(n, array.shape[axis] - start)
        index[axis] = slice(start, start + take)
        parts.append(array[tuple(index)])
        n -= take
        start = 0
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def _bank_window(bank: np.ndarray, x0: int, y0: int, n: int, seed: int) -> np.ndarray:
    # A periodic texture read at global pixel coordinates (+ a per-seed shift): hashing
    # every pixel would cost far more, and the 1024 px period is invisible under the
    # structure that modulates it.
    rows = _wrapped(bank, y0 + (seed >> 10), n, bank.ndim - 2)
    return _wrapped(rows, x0 + seed, n, bank.ndim - 1)


def white(x0: int, y0: int, n: int, seed: int) -> np.ndarray:
    """White noise in [-1, 1] over the n x n pixels from (x0, y0), keyed by global position."""
    return _bank_window(_white_bank(), x0, y0, n, seed)


def _line_kernel(length: int, phi: float) -> np.ndarray:
    import cv2

    size = length | 1
    img = np.zeros((size * 8, size * 8), np.float32)
    c = size * 4
    dx, dy = np.cos(phi) * length * 4, np.sin(phi) * length * 4
    cv2.line(img, (int(c - dx), int(c - dy)), (int(c + dx), int(c + dy)), 1.0, 8)
    kernel = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return kernel / kernel.sum()


@lru_cache(maxsize=4)
def fibre_bank(length: int) -> np.ndarray:
    """Four periodic collagen textures (0, 45, 90, 135 degrees), unit std, [4, BANK, BANK].

    Blurred white noise (fibre width) smeared along a line of ``length`` px, by FFT so
    that the texture wraps around without a seam.
    """
    import cv2

    noise = np.random.default_rng(length).standard_normal((BANK, BANK)).astype(np.float32)
    spectrum = np.fft.rfft2(noise)
    out = np.empty((4, BANK, BANK), np.float32)
    for k in range(4):
        kernel = np.pad(_line_kernel(length, k * np.pi / 4), 4)
        kernel = cv2.GaussianBlur(kernel, (0, 0), 1.0, borderType=cv2.BORDER_CONSTANT)
        padded = np.zeros((BANK, BANK), np.float32)
        h, w = kernel.shape
        padded[:h, :w] = kernel
        padded = np.roll(padded, (-(h // 2), -(w // 2)), axis=(0, 1))
        tex = np.fft.irfft2(spectrum * np.fft.rfft2(padded), s=(BANK, BANK)).astype(np.float32)
        out[k] = tex / tex.std()
    return out


def fibres(x0: int, y0: int, n: int, seed: int, length: int) -> np.ndarray:
    """The four oriented fibre textures over an n x n window, [4, n, n]."""
    return _bank_window(fibre_bank(length), x0, y0, n, seed)


def jitter_points(
    x0: float, y0: float, x1: float, y1: float, cell: float, seed: int, jitter: float = 0.8
):
    """One candidate point per grid cell overlapping the box, jittered inside its cell.

    Returns (x, y, ix, iy, r) with r a per-point uniform draw for keep/size decisions;
    every value depends only on the cell, so neighbouring tiles agree.
    """
    ix = np.arange(int(np.floor(x0 / cell)), int(np.floor(x1 / cell)) + 1)
    iy = np.arange(int(np.floor(y0 / cell)), int(np.floor(y1 / cell)) + 1)
    gx, gy = np.meshgrid(ix, iy)
    gx = gx.ravel()
    gy = gy.ravel()
    off = (1 - jitter) / 2
    px = (gx + off + jitter * hash_uniform(gx, gy, seed)) * cell
    py = (gy + off + jitter * hash_uniform(gx, gy, seed + 1)) * cell
    return px, py, gx, gy


def nearest_two(u: np.ndarray, v: np.ndarray, cell: float, seed: int, jitter: float = 0.8):
    """Distances to the nearest and second-nearest jittered-grid point (Voronoi/Worley).

    Also returns the hashed id (uniform [0,1)) of the nearest point's cell, for per-cell
    properties such as gland radius.
    """
    u = np.asarray(u, np.float64)
    v = np.asarray(v, np.float64)
    gx = np.floor(u / cell).astype(np.int64)
    gy = np.floor(v / cell).astype(np.int64)
    base = (1 - jitter) / 2
    d1 = np.full(u.shape, np.inf, np.float32)
    d2 = np.full(u.shape, np.inf, np.float32)
    n1x, n1y = gx.copy(), gy.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            cx, cy = gx + dx, gy + dy
            seeds = np.array([seed, seed + 1], np.uint64).reshape((2,) + (1,) * u.ndim)
            h = hash_uniform(np.stack((cx, cx)), np.stack((cy, cy)), seeds)
            d = np.hypot(
                u - (cx + base + jitter * h[0]) * cell, v - (cy + base + jitter * h[1]) * cell
            ).astype(np.float32)
            closer = d < d1
            d2 = np.minimum(d2, np.maximum(d1, d))
            d1 = np.minimum(d1, d)
            n1x = np.where(closer, cx, n1x)
            n1y = np.where(closer, cy, n1y)
    return d1, d2, hash_uniform(n1x, n1y, seed + 2)
