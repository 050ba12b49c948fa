"""Per-patch stain normalisation of a whole batch (``StainNormConfig(per="patch")``).

Each patch is normalised on its own against the target fitted once, with the estimate of
``StainNormalizer``'s per-patch numpy code (the same tissue pixels, the same subsamples, the
same percentiles), in one of two forms.

On the CPU (``_normalise_cpu``), patch by patch through OpenCV's and numpy's SIMD kernels,
the small per-patch steps (3 x 3 eigenproblems, pseudo-inverses, the maps) of 8 patches in
one numpy call each, with the arithmetic rearranged so that little is done per pixel:

    tissue     the three 8-bit planes' maximum against the brightest 8-bit value whose OD
               reaches ``min_od``; the tissue pixels gathered as 32-bit RGBA words (one
               gather, not three) and their OD read from the 256-entry table (no logarithm)
    Macenko    the 3 x 3 OD Gram matrix from six dot products, eigh, the two in-plane
               coordinates by one 2 x 3 product; the stain angle atan2(y, x) orders pixels as
               y / x does, so its percentiles are taken of y / x and only the values each
               needs go through atan
    Vahadane   its 30 alternating rounds on the <= 20,000-pixel subsample, in float32: per
               round one 2 x 4 product (the sparsity offset folded in as a row of ones), two
               multiply-adds clamped at zero, and one 2 x 6 product for every sum the stain
               update needs
    Reinhard   OpenCV's 8-bit Lab, the tissue's mean and std (``cv2.meanStdDev`` under the
               tissue mask), three 256-entry tables, back to RGB; the two Lab conversions are
               two thirds of its cost
    percentile exact (numpy's linear interpolation) without sorting: thresholds from every
               32nd value cut a little more than the tails that hold the wanted ranks
               (checked; where a cut keeps too little, all values are partitioned), and only
               those tails, gathered at once, are partitioned
    mapping    C = OD pinv(M_s), C *= max_t / max_s, OD' = C M_t collapse into one 3 x 3 map,
               so a pixel's output is exp(ln 255 - OD @ map), rounded: the OD table, one 3 x 4
               ``cv2.transform`` (ln 255 as its fourth column), ``cv2.exp`` and one saturating
               conversion to uint8

BLAS is held to one thread meanwhile (its products here are skinny; see _one_blas_thread).
benchmarks/bench_stain.py times it against the per-patch numpy code.

On another device (a GPU; ``_normalise``), the batch goes through each step together in
torch, the colour channels as planes [N, 3, H*W]: the same tissue mask and OD table, batched
Gram matrices and ``torch.linalg.eigh``, percentiles from a subsample's threshold, and the
mapped pixels, with no Python loop over patches; Vahadane's rounds run on every patch's
subsample at once.

Both reproduce the numpy estimate to within float32 rounding: a few pixels move by one 8-bit
level (tests/test_stain_batch.py measures it on real patches, for both forms).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fpstore.config import full_float32_matmul

_VAHADANE_PIXELS = 20_000  # vahadane_matrix's max_pixels (the per-patch default)
_VAHADANE_ROUNDS = 30  # vahadane_matrix's iterations
_CHUNK = 8  # patches at once: bounds the float32 planes (8 x 224 px: 5 MB each)
_SUBSAMPLE = 8  # a percentile's threshold is drawn from every 8th pixel (torch)
_SUBSAMPLE_CPU = 32  # and from every 32nd value on the CPU
_CHUNK_CPU = 8  # patches whose small steps share numpy calls on the CPU (8 measured best)
_LN255 = float(np.log(255.0))


def normalise_batch(batch: torch.Tensor, normaliser) -> torch.Tensor:
    """uint8 [N, H, W, 3] (any device) normalised patch by patch by a fitted
    ``StainNormalizer`` (its config and target); patches with too little tissue are kept."""
    if batch.device.type == "cpu":
        return torch.from_numpy(_normalise_cpu(np.ascontiguousarray(batch.numpy()), normaliser))
    with full_float32_matmul():
        return torch.cat([_normalise(part, normaliser) for part in batch.split(_CHUNK)])


def _brightest(min_od: float) -> int:
    """Every channel's OD >= ``min_od`` is every channel's 8-bit value <= this."""
    from fpstore.slides.colour import OD_TABLE

    return int(np.flatnonzero(min_od <= OD_TABLE).max())  # OD(0) = 5.5 > any min_od


# ----------------------------------------------------------------------------- the CPU


_blas = None  # threadpoolctl's controller, found once


def _one_blas_thread():
    """A context holding BLAS to one thread: the products here are a few rows by a patch's
    pixels, and where other processes share the cores a second thread mostly waits (as the
    torch form's threads did, benchmarks/README.md)."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def _normalise_cpu(batch: np.ndarray, normaliser) -> np.ndarray:
    """uint8 [N, H, W, 3] numpy, C-contiguous: every patch normalised on its own, the small
    per-patch steps (3 x 3 eigenproblems, pseudo-inverses, maps) of _CHUNK_CPU patches in one
    numpy call each."""
    out = np.empty_like(batch)
    fit = _reinhard_cpu if normaliser.config.method == "reinhard" else _stains_cpu
    with _one_blas_thread():
        for start in range(0, len(batch), _CHUNK_CPU):
            part = slice(start, start + _CHUNK_CPU)
            fit(batch[part], out[part], normaliser)
    return out


def _stains_cpu(batch: np.ndarray, out: np.ndarray, normaliser) -> None:
    """Macenko or Vahadane of uint8 patches [N, H, W, 3], written to ``out``."""
    cfg, target = normaliser.config, normaliser.target_
    rows, fits = _tissue_od(batch, out, cfg)
    if not rows:
        return
    if cfg.method == "macenko":
        unmix = _pinv(_macenko_cpu(fits, cfg.percentile))  # [M, 3, 2] float64
    else:
        unmix = _pinv(_vahadane_cpu(fits, cfg.sparsity))
    maxima = np.empty((len(rows), 2), np.float32)
    for i, od in enumerate(fits):
        conc = unmix[i].T.astype(np.float32) @ od  # [2, P]
        maxima[i] = [_percentiles(row, (cfg.percentile / 100.0,))[0] for row in conc]
    maxima = np.maximum(maxima, np.float32(1e-3))
    # C = OD @ pinv(M_s); C *= max_t / max_s; OD' = C @ M_t: one 3 x 3 map per patch
    _map_cpu(batch, out, rows, unmix @ ((target.maxima / maxima)[:, :, None] * target.matrix))


def _tissue_od(batch: np.ndarray, out: np.ndarray, cfg) -> tuple[list, list]:
    """The patches of ``batch`` with enough tissue to estimate from (the others are copied
    to ``out``), and for each the OD [3, P] float32 of its tissue pixels (_estimate's even
    subsample of them)."""
    import cv2

    from fpstore.slides.colour import FIT_PIXELS, OD_TABLE

    n, h, w, _ = batch.shape
    image = batch.reshape(n * h, w, 3)
    planes = cv2.split(image)  # three uint8 [N * H, W]
    peak = cv2.max(cv2.max(planes[0], planes[1]), planes[2])
    tissue = cv2.threshold(peak, _brightest(cfg.min_od), 1, cv2.THRESH_BINARY_INV)[1]
    counts = [cv2.countNonZero(tissue[i * h : (i + 1) * h]) for i in range(n)]
    rows = [i for i in range(n) if counts[i] >= cfg.min_tissue_px]
    for i in sorted(set(range(n)) - set(rows)):
        out[i] = batch[i]
    # the tissue pixels gathered as 32-bit RGBA words (one gather, not three), and their OD
    # from the 256-entry table
    words = cv2.cvtColor(image, cv2.COLOR_RGB2RGBA).view(np.uint32)
    fits = []
    for i in rows:
        part = slice(i * h, (i + 1) * h)
        index = np.flatnonzero(tissue[part].view(bool).ravel())
        pixels = np.take(words[part].ravel(), index[:: max(1, counts[i] // FIT_PIXELS)])
        pixels = pixels.view(np.uint8).reshape(-1, 1, 4)
        od = np.empty((3, len(pixels)), np.float32)
        for channel, values in zip(od, cv2.split(pixels)):
            cv2.LUT(values, OD_TABLE, dst=channel.reshape(-1, 1))
        fits.append(od)
    return rows, fits


def _map_cpu(batch: np.ndarray, out: np.ndarray, rows: list, od_maps: np.ndarray) -> None:
    """``out[row] = 255 exp(-OD(batch[row]) @ od_map)``, rounded, for each row and 3 x 3 map:
    exp(ln 255 - OD @ map), the offset as the fourth column of one ``cv2.transform``."""
    import cv2

    from fpstore.slides.colour import OD_TABLE

    affine = np.empty((len(rows), 3, 4), np.float32)
    affine[:, :, :3] = -od_maps.transpose(0, 2, 1)
    affine[:, :, 3] = _LN255
    od = np.empty(batch.shape[1:], np.float32)
    mapped = np.empty(batch.shape[1:], np.float32)
    for i, row in enumerate(rows):
        cv2.LUT(batch[row], OD_TABLE, dst=od)
        cv2.transform(od, affine[i], dst=mapped)
        cv2.exp(mapped, dst=mapped)
        cv2.convertScaleAbs(mapped, dst=out[row])  # rounded, saturated at 255


def _pinv(matrices: np.ndarray) -> np.ndarray:
    """Pseudo-inverses [M, 3, 2] of full-rank 2 x 3 stain matrices, in float64."""
    m = np.asarray(matrices, np.float64)
    mt = m.transpose(0, 2, 1)
    return mt @ np.linalg.inv(m @ mt)


def _h_first_rows(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """[M, 2, 3] float32 rows (H, E), unit length: stain._h_first of each pair of rows."""
    swap = (v1[:, 0] < v2[:, 0])[:, None]
    matrix = np.stack([np.where(swap, v2, v1), np.where(swap, v1, v2)], axis=1)
    return (matrix / np.linalg.norm(matrix, axis=2, keepdims=True)).astype(np.float32)


def _gram(od: np.ndarray) -> np.ndarray:
    """OD [3, P] -> its 3 x 3 Gram matrix (float64), by six dot products."""
    gram = np.empty((3, 3))
    for i in range(3):
        for j in range(i, 3):
            gram[i, j] = gram[j, i] = np.dot(od[i], od[j])
    return gram


def _macenko_cpu(fits: list, percentile: float) -> np.ndarray:
    """``macenko_matrix`` of each OD [3, P] float32 in ``fits`` -> [M, 2, 3] float32."""
    import cv2

    _, vectors = np.linalg.eigh(np.stack([_gram(od) for od in fits]))
    planes = vectors[:, :, [2, 1]]  # [M, 3, 2]
    planes *= np.where(planes.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)  # positive octant
    q = percentile / 100.0
    angles = np.empty((len(fits), 2))
    for i, od in enumerate(fits):
        xy = planes[i].T.astype(np.float32) @ od  # [2, P]
        # atan2(y, x) orders pixels as y / x does: x > 0 (positive OD, positive leading
        # eigenvector), or x = y = 0 at zero OD, where cv2.divide gives 0 = atan2(0, 0)
        ratio = cv2.divide(xy[1:], xy[:1]).ravel()
        angles[i] = _percentiles(ratio, (1.0 - q, q), math.atan)
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # [M, 2, 2]
    vectors = planes @ directions  # [M, 3, 2]: the two extreme stain directions
    return _h_first_rows(vectors[:, :, 0], vectors[:, :, 1])


def _vahadane_cpu(fits: list, sparsity: float) -> np.ndarray:
    """``vahadane_matrix`` (30 rounds) of each OD [3, P] float32 in ``fits`` -> [M, 2, 3]
    float32, its rounds in float32 (numpy's are float64; the mapped pixels stay within one
    8-bit level)."""
    tables = []
    for od in fits:
        x = od[:, :: max(1, od.shape[1] // _VAHADANE_PIXELS)]
        # rows 0-2: the pixels' OD; 3: ones (for the sparsity); 4-5: the concentrations
        table = np.empty((6, x.shape[1]), np.float32)
        table[:3] = x
        table[3] = 1.0
        tables.append(table)
    start = np.maximum(_macenko_cpu([t[:3] for t in tables], 99.0).astype(np.float64), 1e-6)
    unmix = _pinv(start)
    stains = np.empty((len(fits), 2, 3))
    for i, table in enumerate(tables):
        np.maximum(unmix[i].T.astype(np.float32) @ table[:3], 0.0, out=table[4:])
        stains[i] = _vahadane_rounds(table, start[i], sparsity)
    return _h_first_rows(stains[:, 0], stains[:, 1])


def _vahadane_rounds(table: np.ndarray, w: np.ndarray, sparsity: float) -> list:
    """vahadane_matrix's alternating rounds on one patch's ``table`` (see _vahadane_cpu), from
    the stains ``w`` [2, 3]: each stain's concentrations given the other's, then each stain's
    unit vector given the concentrations. Per round one 2 x 4 product (x w - sparsity), two
    multiply-adds clamped at zero, and one 2 x 6 product for every sum the stains need: about
    twenty passes over the pixels' rows, which bound its cost (they stream from the cache)."""
    import cv2

    c0, c1 = table[4:5], table[5:]  # [1, P] views: OpenCV writes them in place
    weights = np.empty((2, 4), np.float32)
    weights[:, 3] = -sparsity
    h, e = w.tolist()
    for _ in range(_VAHADANE_ROUNDS):
        weights[0, :3], weights[1, :3] = h, e
        xw = weights @ table[:4]  # x w - sparsity
        cross = h[0] * e[0] + h[1] * e[1] + h[2] * e[2]
        cv2.scaleAdd(c1, -cross, xw[:1], dst=c0)
        cv2.threshold(c0, 0.0, 0.0, cv2.THRESH_TOZERO, dst=c0)
        cv2.scaleAdd(c0, -cross, xw[1:], dst=c1)
        cv2.threshold(c1, 0.0, 0.0, cv2.THRESH_TOZERO, dst=c1)
        sums = (table[4:] @ table.T).tolist()  # [2, 6]: c x, c 1, c c
        hh = [max(sums[0][j] - sums[0][5] * e[j], 1e-9) for j in range(3)]
        norm = math.sqrt(hh[0] * hh[0] + hh[1] * hh[1] + hh[2] * hh[2])
        h = [v / norm for v in hh]
        ee = [max(sums[1][j] - sums[1][4] * h[j], 1e-9) for j in range(3)]
        norm = math.sqrt(ee[0] * ee[0] + ee[1] * ee[1] + ee[2] * ee[2])
        e = [v / norm for v in ee]
    return [h, e]


def _percentiles(values: np.ndarray, qs: tuple, of=None) -> list:
    """numpy's ``percentile(of(values), 100 q)`` (linear interpolation) of a 1-D float32
    array for each q, for an increasing ``of`` (None: the values, float32; else float64)."""
    n = len(values)
    plans = []
    for q in qs:
        index = (n - 1) * q
        below = math.floor(index)
        plans.append((below, min(below + 1, n - 1), index - below))
    order = _order(values, sorted({p for plan in plans for p in plan[:2]}))
    out = []
    for below, above, frac in plans:
        a, b = order[below], order[above]
        if of is None:
            frac = np.float32(frac)
        else:
            a, b = of(float(a)), of(float(b))
        # numpy's _lerp: a + (b - a) t, from b's side when t >= 0.5
        out.append(b - (b - a) * (1 - frac) if frac >= 0.5 else a + (b - a) * frac)
    return out


def _order(values: np.ndarray, positions: list) -> dict:
    """{p: the value at ascending position p} of a 1-D array, exactly. Only the tails that
    hold the positions are partitioned (one gather for both): each is cut at a threshold
    from every 32nd value that keeps about twice the tail (checked; where a cut keeps too
    little, all values are partitioned)."""
    n = len(values)
    step = _SUBSAMPLE_CPU
    low = [p for p in positions if p < n // 2]
    high = [p for p in positions if p >= n // 2]
    if n >= 64 * step:
        size = -(-n // step)
        cuts = [min(size - 1, 2 * (max(low) + 1) // step + 16)] if low else []
        if high:
            cuts.append(max(0, size - 1 - (2 * (n - min(high)) // step + 16)))
        sub = np.partition(values[::step], cuts)
        keep = values >= sub[cuts[-1]] if high else np.zeros(n, bool)
        if low:
            keep |= values <= sub[cuts[0]]
        tail = values[keep]  # the low tail, the high tail: in place below and above the rest
        below = np.count_nonzero(tail <= sub[cuts[0]]) if low else 0
        skip = n - len(tail)  # the values between the tails
        if (not low or below > max(low)) and (not high or len(tail) - below >= n - min(high)):
            at = [p if p < n // 2 else p - skip for p in positions]
            ordered = np.partition(tail, at)
            return {p: ordered[a] for p, a in zip(positions, at)}
    ordered = np.partition(values, positions)  # small, or a cut misjudged its tail
    return {p: ordered[p] for p in positions}


def _reinhard_cpu(batch: np.ndarray, out: np.ndarray, normaliser) -> None:
    """Each patch's 8-bit Lab moved to the target's tissue mean and std, channel by channel,
    by its own three 256-entry tables (OpenCV's Lab both ways: most of the cost)."""
    import cv2

    cfg, target = normaliser.config, normaliser.target_
    n, h, w, _ = batch.shape
    planes = cv2.split(batch.reshape(n * h, w, 3))
    peak = cv2.max(cv2.max(planes[0], planes[1]), planes[2])
    tissue = cv2.threshold(peak, _brightest(cfg.min_od), 1, cv2.THRESH_BINARY_INV)[1]
    levels = np.arange(256, dtype=np.float64)[:, None]
    for i, (image, dst) in enumerate(zip(batch, out)):
        mask = tissue[i * h : (i + 1) * h]
        if cv2.countNonZero(mask) < cfg.min_tissue_px:
            dst[...] = image
            continue
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
        mean, std = cv2.meanStdDev(lab, mask=mask)  # float64, of the tissue pixels
        std = np.maximum(std[:, 0], 1e-3)
        table = (levels - mean[:, 0]) * (target.std / std) + target.mean
        table = np.clip(table + 0.5, 0, 255).astype(np.uint8).T  # [3, 256]
        channels = [cv2.LUT(c, t) for c, t in zip(cv2.split(lab), table)]
        cv2.cvtColor(cv2.merge(channels), cv2.COLOR_LAB2RGB, dst=dst)


# ----------------------------------------------------------------------- other devices


def _normalise(batch: torch.Tensor, normaliser) -> torch.Tensor:
    from fpstore.slides.colour import FIT_PIXELS, OD_TABLE

    cfg, target = normaliser.config, normaliser.target_
    n, h, w, _ = batch.shape
    out = batch.clone()
    if n == 0:
        return out
    planes = batch.reshape(n, h * w, 3).transpose(1, 2).contiguous()  # [N, 3, P] uint8
    tissue = planes.amax(dim=1) <= _brightest(cfg.min_od)
    ok = tissue.count_nonzero(dim=1) >= cfg.min_tissue_px
    if not bool(ok.any()):
        return out
    if cfg.method == "reinhard":
        return _reinhard(batch, tissue, ok, target)
    rows = ok.nonzero().squeeze(1)  # the patches that can be estimated
    if len(rows) < n:
        planes, tissue = planes[rows], tissue[rows]
    od = _lookup(OD_TABLE, planes)  # [M, 3, P] float32
    fit = _every(tissue, FIT_PIXELS)  # _estimate's even subsample of the tissue pixels
    if cfg.method == "macenko":
        matrix = _macenko(od, fit, cfg.percentile)
    else:
        matrix = _vahadane(od, _every(fit, _VAHADANE_PIXELS), cfg.sparsity)
    matrix = matrix.float()
    unmix = torch.linalg.pinv(matrix)  # [M, 3, 2]
    conc = _mix(unmix.transpose(1, 2), od)  # [M, 2, P]
    q = cfg.percentile / 100.0
    maxima = torch.stack([_quantile(conc[:, k], fit, q) for k in range(2)], dim=1)
    maxima = maxima.float().clamp_min(1e-3)
    t_matrix = torch.as_tensor(target.matrix, device=batch.device)
    t_maxima = torch.as_tensor(target.maxima, device=batch.device)
    # C = OD @ pinv(M_s); C *= max_t / max_s; OD' = C @ M_t: one 3 x 3 map per patch.
    od_map = unmix @ ((t_maxima / maxima).unsqueeze(-1) * t_matrix)  # [M, 3, 3]
    # 255 exp(-OD') + 0.5 as exp(ln 255 - OD') + 0.5: the product and the offset in one step
    bright = torch.full((1, 1, 1), float(np.log(255.0)), device=od.device)
    mapped = torch.baddbmm(bright, -od_map.transpose(1, 2), od).exp_().add_(0.5)
    pixels = mapped.clamp_max_(255.0).to(torch.uint8).transpose(1, 2)  # [M, P, 3]
    pixels = pixels.reshape(-1, h, w, 3)
    return pixels.contiguous() if len(rows) == n else out.index_copy_(0, rows, pixels)


def _lookup(table: np.ndarray, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for uint8 ``index`` (numpy's take on the CPU: several times torch's)."""
    if index.device.type == "cpu":
        return torch.from_numpy(np.take(table, index.numpy()))
    return torch.from_numpy(table).to(index.device)[index.long()]


def _mix(matrix: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """[M, J, I] matrices applied to [M, I, P] planes: [M, J, P]."""
    return torch.einsum("mji,mip->mjp", matrix, planes)


def _every(mask: torch.Tensor, most: int) -> torch.Tensor:
    """Per row, the numpy subsample ``pixels[mask][:: max(1, count // most)]`` as a mask."""
    step = (mask.count_nonzero(dim=1).unsqueeze(1) // most).clamp_min(1)
    if int(step.max()) == 1:
        return mask
    rank = mask.cumsum(dim=1) - 1
    return mask & (rank % step == 0)


def _quantile(values: torch.Tensor, mask: torch.Tensor, q: float, of=None) -> torch.Tensor:
    """Per row of [M, P], numpy's ``percentile(of(values[mask]), 100 q)`` (linear
    interpolation) for an increasing ``of`` (None: the values). Every row needs a masked
    value."""
    if q < 0.5:  # the lower tail is the upper tail of -values
        return _upper_quantile(-values, mask, 1.0 - q, lambda v: _apply(of, -v))
    return _upper_quantile(values, mask, q, lambda v: _apply(of, v))


def _apply(of, values: torch.Tensor) -> torch.Tensor:
    return values if of is None else of(values)


def _upper_quantile(values: torch.Tensor, mask: torch.Tensor, q: float, of) -> torch.Tensor:
    count = mask.count_nonzero(dim=1)
    index = (count - 1).double() * q
    below = index.floor().long()
    frac = (index - below).to(values.dtype)
    # ascending positions below and below + 1, counted from the top (0 = the largest)
    lower_rank = count - 1 - below
    upper_rank = (lower_rank - 1).clamp_min(0)
    need = lower_rank + 1  # the row's largest `need` values hold both
    sub = values[:, ::_SUBSAMPLE].masked_fill(~mask[:, ::_SUBSAMPLE], float("-inf"))
    k_sub = (2 * need // _SUBSAMPLE + 8).clamp(max=sub.shape[1])
    tops = sub.topk(int(k_sub.max()), dim=1).values
    threshold = tops.gather(1, (k_sub - 1).unsqueeze(1))
    kept = mask & (values >= threshold)
    kept_count = kept.count_nonzero(dim=1)
    short = kept_count < need
    if bool(short.any()):  # the subsample misjudged the tail: these rows keep all pixels
        kept[short] = mask[short]
        kept_count = kept.count_nonzero(dim=1)
    tail = values.masked_select(kept)
    rows = torch.repeat_interleave(torch.arange(len(values), device=values.device), kept_count)
    # descending within each row: sort by value, then (stably) by row
    by_value = tail.argsort(descending=True, stable=True)
    tail, rows = tail[by_value], rows[by_value]
    tail = tail[rows.argsort(stable=True)]
    start = kept_count.cumsum(dim=0) - kept_count
    a, b = of(tail[start + lower_rank]), of(tail[start + upper_rank])
    # numpy's _lerp: a + (b - a) t, from b's side when t >= 0.5
    return torch.where(frac >= 0.5, b - (b - a) * (1 - frac), a + (b - a) * frac)


def _h_first(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """[M, 2, 3] rows (H, E), unit length: hematoxylin absorbs more red than eosin does."""
    swap = (v1[:, 0] < v2[:, 0]).view(-1, 1)
    h, e = torch.where(swap, v2, v1), torch.where(swap, v1, v2)
    matrix = torch.stack([h, e], dim=1)
    return matrix / matrix.norm(dim=-1, keepdim=True)


def _macenko(od: torch.Tensor, mask: torch.Tensor, percentile: float) -> torch.Tensor:
    """``macenko_matrix`` of each row's masked pixels: OD [M, 3, P] -> [M, 2, 3] (float64)."""
    masked = od.masked_fill(~mask.unsqueeze(1), 0.0)
    gram = torch.bmm(masked, masked.transpose(1, 2)).double()
    _, vectors = torch.linalg.eigh(gram)
    plane = vectors[..., [2, 1]]  # [M, 3, 2]
    plane = plane * torch.where(plane.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    xy = _mix(plane.transpose(1, 2).float(), od)  # [M, 2, P]
    # The stain angle atan2(y, x) orders pixels as y / x does: x >= 0 (OD and the leading
    # eigenvector are non-negative), and x = 0 only where y = 0 too, at zero OD. So the
    # percentiles are taken of y / x, and only the two values each needs go through atan.
    ratio = xy[:, 1] / xy[:, 0].clamp_min(torch.finfo(xy.dtype).tiny)
    low = _quantile(ratio, mask, 1.0 - percentile / 100.0, torch.atan).double()
    high = _quantile(ratio, mask, percentile / 100.0, torch.atan).double()
    v1 = (plane @ torch.stack([low.cos(), low.sin()], dim=1).unsqueeze(-1)).squeeze(-1)
    v2 = (plane @ torch.stack([high.cos(), high.sin()], dim=1).unsqueeze(-1)).squeeze(-1)
    return _h_first(v1, v2)


def _vahadane(od: torch.Tensor, mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``vahadane_matrix`` (30 rounds) of each row's masked pixels, all rows at once:
    OD [M, 3, P] -> [M, 2, 3]. In float32 (numpy's is float64): half the memory traffic,
    and the mapped pixels still within one 8-bit level of numpy's."""
    m = od.shape[0]
    count = mask.sum(dim=1)
    width = int(count.max())
    rows, cols = mask.nonzero(as_tuple=True)
    slot = (mask.cumsum(dim=1) - 1)[rows, cols]
    x = od.new_zeros(m, 3, width)  # each row's pixels, packed
    x[rows, :, slot] = od[rows, :, cols]
    valid = torch.arange(width, device=od.device).unsqueeze(0) < count.unsqueeze(1)
    w = _macenko(x, valid, 99.0).float().clamp_min(1e-6)  # [M, 2, 3]
    c = torch.bmm(torch.linalg.pinv(w).transpose(1, 2), x).clamp_min(0.0) * valid.unsqueeze(1)
    for _ in range(_VAHADANE_ROUNDS):
        xw = torch.bmm(w, x)  # [M, 2, W]
        cross = (w[:, 0] * w[:, 1]).sum(dim=1, keepdim=True)
        c0 = (xw[:, 0] - cross * c[:, 1] - sparsity).clamp_min(0.0) * valid
        c1 = (xw[:, 1] - cross * c0 - sparsity).clamp_min(0.0) * valid
        c = torch.stack([c0, c1], dim=1)  # [M, 2, W]
        gram = c @ c.transpose(1, 2)  # [M, 2, 2]
        cx = c @ x.transpose(1, 2)  # [M, 2, 3]
        w = w.clone()
        for k, other in ((0, 1), (1, 0)):
            row = (cx[:, k] - gram[:, k, other].unsqueeze(1) * w[:, other]).clamp_min(1e-9)
            w[:, k] = row / row.norm(dim=1, keepdim=True)
    return _h_first(w[:, 0], w[:, 1])


def _reinhard(batch: torch.Tensor, tissue: torch.Tensor, ok: torch.Tensor, target) -> torch.Tensor:
    """Each patch's 8-bit Lab moved to the target's tissue mean and std, channel by channel,
    by its own three 256-entry tables (OpenCV's Lab, so on the CPU). The tissue's mean and
    std come from exact per-patch histograms of the 8-bit values."""
    import cv2

    from fpstore.slides.colour import from_lab, to_lab

    n, h, w, _ = batch.shape
    lab = to_lab(batch.cpu().numpy())  # [N, H, W, 3] uint8
    planes = torch.from_numpy(lab).reshape(n, h * w, 3).transpose(1, 2)  # [N, 3, P]
    tissue = tissue.cpu()
    # bin (patch, channel, value); non-tissue pixels go to one spare bin at the end
    base = (torch.arange(n * 3).view(n, 3, 1) * 256).expand(n, 3, h * w)
    index = torch.where(tissue.unsqueeze(1), base + planes.long(), n * 3 * 256)
    hist = torch.bincount(index.reshape(-1), minlength=n * 3 * 256 + 1)[:-1]
    hist = hist.view(n, 3, 256).double()
    levels = torch.arange(256, dtype=torch.float64)
    count = hist.sum(dim=2).clamp_min(1.0)
    mean = (hist * levels).sum(dim=2) / count
    var = (hist * (levels - mean.unsqueeze(-1)) ** 2).sum(dim=2) / count
    std = var.sqrt().clamp_min(1e-3)
    t_mean = torch.as_tensor(target.mean).view(1, 3, 1)
    t_std = torch.as_tensor(target.std).view(1, 3, 1)
    table = (levels.view(1, 1, 256) - mean.unsqueeze(-1)) * (t_std / std.unsqueeze(-1)) + t_mean
    tables = (table + 0.5).clamp(0, 255).to(torch.uint8).transpose(1, 2).numpy()  # [N, 256, 3]
    keep = ~ok.cpu().numpy()
    for i in np.flatnonzero(~keep):
        lab[i] = cv2.LUT(lab[i], np.ascontiguousarray(tables[i])[None])
    out = from_lab(lab)
    out[keep] = batch.cpu().numpy()[keep]
    return torch.from_numpy(out).to(batch.device)
