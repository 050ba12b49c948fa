"""Per-patch stain normalisation of a whole batch at once, in torch (CPU or GPU).

Each patch is still normalised on its own against the target fitted once (the semantics of
``StainNormConfig(per="patch")``), but the batch goes through each step together, with the
colour channels as planes [N, 3, H*W]: the tissue mask from the 8-bit pixels, the optical
density, the 3 x 3 OD Gram matrices (one batched matrix product) and their
eigendecompositions (``torch.linalg.eigh`` on [N, 3, 3]), the percentiles of every patch's
stain angles and concentrations, and the mapped pixels, with no Python loop over patches.
Vahadane's alternating updates run on every patch's pixel subsample at once.

A percentile is exact (numpy's linear interpolation) without sorting a patch's pixels: a
threshold from every 8th pixel keeps a little more than the tail that holds it (checked;
a patch where it would not falls back to all its pixels), and only that tail is sorted.

It reproduces ``StainNormalizer``'s per-patch numpy estimate (the same tissue pixels, the
same subsamples, the same percentiles); float32 arithmetic where numpy uses float64 moves a
few pixels by one 8-bit level (tests/test_stain_batch.py measures it on real patches).
"""

from __future__ import annotations

import numpy as np
import torch

_VAHADANE_PIXELS = 20_000  # vahadane_matrix's max_pixels (the per-patch default)
_CHUNK = 8  # patches at once: bounds the float32 planes (8 x 224 px: 5 MB each)
_SUBSAMPLE = 8  # a percentile's threshold is drawn from every 8th pixel


def normalise_batch(batch: torch.Tensor, normaliser) -> torch.Tensor:
    """uint8 [N, H, W, 3] (any device) normalised patch by patch by a fitted
    ``StainNormalizer`` (its config and target); patches with too little tissue are kept."""
    if batch.device.type != "cpu":
        return torch.cat([_normalise(part, normaliser) for part in batch.split(_CHUNK)])
    # On the CPU, one thread: dozens of small steps per chunk, each a parallel region whose
    # threads wait for each other; where other processes share the cores (the readers, other
    # jobs) those waits cost more than the second thread gives (13x slower at load 28 on 2
    # cores, benchmarks/README.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.cat([_normalise(part, normaliser) for part in batch.split(_CHUNK)])
    finally:
        torch.set_num_threads(threads)


def _normalise(batch: torch.Tensor, normaliser) -> torch.Tensor:
    from fpstore.slides.colour import FIT_PIXELS, OD_TABLE

    cfg, target = normaliser.config, normaliser.target_
    n, h, w, _ = batch.shape
    out = batch.clone()
    if n == 0:
        return out
    planes = batch.reshape(n, h * w, 3).transpose(1, 2).contiguous()  # [N, 3, P] uint8
    # Every channel's OD >= min_od is every channel's 8-bit value <= the brightest such.
    brightest = int(np.flatnonzero(cfg.min_od <= OD_TABLE).max())  # OD(0) = 5.5 > any min_od
    tissue = planes.amax(dim=1) <= brightest
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
    for _ in range(30):
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
