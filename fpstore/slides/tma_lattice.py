"""The lattice of a tissue microarray: from candidate core centres to blocks of numbered
positions.

Geometry only (points in pixels, no image). The steps:

1. ``lattice_vectors``: the two steps of the grid, ``a`` along a row (pointing right) and
   ``b`` along a column (pointing down), as the medians of the nearest-neighbour vectors
   after the tilt is read from them (angles taken modulo 90 degrees). They need not be
   orthogonal nor of one length.
2. ``link``: candidates one lattice step apart (``±a``, ``±b`` or a diagonal, within
   ``tol`` of a pitch) are joined, the best-fitting links first (a spanning forest), and
   integer coordinates (i, j) are walked along the links. Each tree is one group; a gap
   that is not a whole number of steps (between the blocks of an array, around a fold)
   links nothing, so blocks come apart by themselves.
3. ``fit_block``: per group, a least-squares map (i, j) -> (x, y), affine or quadratic
   (bowed rows and columns) as the group's size allows, refit without outliers; the
   candidates are re-indexed by inverting it, so one bad link cannot shift a subtree.
4. ``attach``: a group cut off from a bigger one by a wholly empty row or column still sits
   on its lattice to a small fraction of a pitch, and fills a fair share of the positions it
   adds; then it joins it.
5. ``warped_positions``: the nodes of a block, moved by the misfits of the cores around
   them, for the warp a quadratic misses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The lattice steps a link may take, in (i, j); the opposite steps are tried as well.
STEPS = ((1, 0), (0, 1), (1, 1), (1, -1))
# Share of the positions a group adds to a block's rectangle that it must fill to join it.
MIN_NEW_FILLED = 0.2


def lattice_vectors(points: np.ndarray, fallback_pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): the row step (x mostly positive) and the column step (y mostly positive) of
    the grid of ``points`` (N, 2 as x, y). With too few neighbours to tell, an axis-aligned
    grid of ``fallback_pitch``."""
    from scipy.spatial import cKDTree

    default = np.array([fallback_pitch, 0.0]), np.array([0.0, fallback_pitch])
    if len(points) < 2:
        return default
    k = min(5, len(points))
    dist, index = cKDTree(points).query(points, k)
    nearest = float(np.median(dist[:, 1]))
    vectors = (points[index[:, 1:]] - points[:, None, :]).reshape(-1, 2)
    length = np.hypot(vectors[:, 0], vectors[:, 1])
    # First and second neighbours along the axes; diagonals (1.41 pitches) and beyond drop out.
    vectors = vectors[(length > 0.6 * nearest) & (length < 1.3 * nearest)]
    if not len(vectors):
        return default
    angle = np.arctan2(vectors[:, 1], vectors[:, 0])
    tilt = float(np.angle(np.exp(4j * angle).mean()) / 4)  # the four axis directions agree mod 90
    relative = np.angle(np.exp(1j * (angle - tilt)))
    along_row = np.abs(np.cos(relative)) >= np.abs(np.sin(relative))
    row_steps = vectors[along_row] * np.sign(np.cos(relative[along_row]))[:, None]
    column_steps = vectors[~along_row] * np.sign(np.sin(relative[~along_row]))[:, None]
    a = np.median(row_steps, axis=0) if len(row_steps) else None
    b = np.median(column_steps, axis=0) if len(column_steps) else None
    if a is None:  # one column of cores: the row step is the column step turned by 90 degrees
        a = np.array([b[1], -b[0]])
    if b is None:
        b = np.array([-a[1], a[0]])
    return a, b


def pitch_of(a: np.ndarray, b: np.ndarray) -> float:
    """The shorter of the two steps: the unit of every tolerance here."""
    return float(min(np.hypot(*a), np.hypot(*b)))


def link(
    points: np.ndarray, a: np.ndarray, b: np.ndarray, tol: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Group id and integer (i, j) of each point: points one lattice step apart (within
    ``tol`` pitches) are linked, best-fitting links first, and (i, j) are walked along the
    links from each group's first point."""
    from scipy.spatial import cKDTree

    n = len(points)
    pitch = pitch_of(a, b)
    reach = 1.3 * max(np.hypot(*(a + b)), np.hypot(*(a - b)))
    pairs = cKDTree(points).query_pairs(reach, output_type="ndarray") if n > 1 else np.zeros((0, 2))
    pairs = pairs.astype(int)
    delta = points[pairs[:, 1]] - points[pairs[:, 0]]
    links = []  # (misfit, p, q, di, dj)
    for di, dj in STEPS:
        for sign in (1, -1):
            step = sign * (di * a + dj * b)
            misfit = np.hypot(*(delta - step).T) / pitch
            for (p, q), m in zip(pairs[misfit < tol], misfit[misfit < tol], strict=True):
                links.append((float(m), int(p), int(q), sign * di, sign * dj))
    links.sort()
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    tree: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    for _, p, q, di, dj in links:
        rp, rq = root(p), root(q)
        if rp != rq:
            parent[rp] = rq
            tree[p].append((q, di, dj))
            tree[q].append((p, -di, -dj))
    group, ij = _walk(tree)
    return np.unique(group, return_inverse=True)[1], ij


def _walk(tree: list[list[tuple[int, int, int]]]) -> tuple[np.ndarray, np.ndarray]:
    """(group, (i, j)) of each point, walked along the links of ``tree`` from each group's
    first point (its group id)."""
    n = len(tree)
    group = np.full(n, -1)
    ij = np.zeros((n, 2), int)
    for start in range(n):
        if group[start] >= 0:
            continue
        group[start] = start
        stack = [start]
        while stack:
            p = stack.pop()
            for q, di, dj in tree[p]:
                if group[q] < 0:
                    group[q] = start
                    ij[q] = ij[p] + (di, dj)
                    stack.append(q)
    return group, ij


def _design(ij: np.ndarray, degree: int) -> np.ndarray:
    i, j = ij[:, 0].astype(float), ij[:, 1].astype(float)
    columns = [np.ones_like(i), i, j]
    if degree == 2:
        columns += [i * i, i * j, j * j]
    return np.stack(columns, axis=1)


@dataclass
class Block:
    """A fitted lattice: (i, j) -> (x, y) by ``coef`` (3 rows: affine, 6: quadratic)."""

    coef: np.ndarray
    scatter: float  # robust spread of the fitted points about their nodes, in pitches

    @property
    def degree(self) -> int:
        return 2 if len(self.coef) == 6 else 1

    def position(self, ij: np.ndarray) -> np.ndarray:
        """Node positions (N, 2) of integer or fractional (i, j) (N, 2)."""
        return _design(np.atleast_2d(ij), self.degree) @ self.coef

    def steps(self, ij: np.ndarray) -> np.ndarray:
        """The local (a, b) at (i, j), as the columns of a 2 x 2 matrix (the Jacobian)."""
        i, j = float(ij[0]), float(ij[1])
        c = self.coef
        a, b = c[1].copy(), c[2].copy()
        if self.degree == 2:
            a += 2 * i * c[3] + j * c[4]
            b += i * c[4] + 2 * j * c[5]
        return np.stack([a, b], axis=1)

    def index(self, points: np.ndarray) -> np.ndarray:
        """Fractional (i, j) of each point (N, 2): the fit inverted by Newton steps (one
        Jacobian, at the points' mean, serves all: the warp is mild)."""
        inverse = np.linalg.inv(self.steps(np.zeros(2)))
        ij = (points - self.coef[0]) @ inverse.T
        for _ in range(6 if self.degree == 2 else 1):
            inverse_local = np.linalg.inv(self.steps(ij.mean(axis=0)))
            ij = ij + (points - self.position(ij)) @ inverse_local.T
        return ij


def fit_block(ij: np.ndarray, xy: np.ndarray, a: np.ndarray, b: np.ndarray) -> Block:
    """Least-squares lattice of points ``xy`` at integer ``ij``: quadratic when the group
    spans 3 x 3 positions with 12 cores or more (enough to see rows bow), affine from 2 x 2
    with 4 cores, else the global steps ``a``, ``b`` moved to fit. Points more than three
    robust spreads off are left out of the refit."""
    pitch = pitch_of(a, b)
    span = np.ptp(ij, axis=0) + 1 if len(ij) else np.zeros(2)
    if len(ij) >= 12 and min(span) >= 3:
        degree = 2
    elif len(ij) >= 4 and min(span) >= 2:
        degree = 1
    else:
        degree = 0
    # Cores along one diagonal span both axes but cannot tell the two steps apart.
    while degree and np.linalg.matrix_rank(_design(ij, degree)) < (3 if degree == 1 else 6):
        degree -= 1
    if degree == 0:
        origin = np.median(xy - ij[:, :1] * a - ij[:, 1:] * b, axis=0)
        block = Block(np.stack([origin, a, b]), 0.0)
    else:
        design = _design(ij, degree)
        keep = np.ones(len(ij), bool)
        for _ in range(3):
            coef = np.linalg.lstsq(design[keep], xy[keep], rcond=None)[0]
            misfit = np.hypot(*(design @ coef - xy).T)
            spread = max(1.4826 * float(np.median(misfit[keep])), 0.01 * pitch)
            keep = misfit < 3 * spread
            if keep.sum() < design.shape[1] + 2:
                break
        block = Block(coef, 0.0)
    misfit = np.hypot(*(block.position(ij) - xy).T) / pitch
    block.scatter = 1.4826 * float(np.median(misfit)) if len(misfit) else 0.0
    return block


def reindex(
    xy: np.ndarray, ij: np.ndarray, a: np.ndarray, b: np.ndarray, rounds: int = 3
) -> tuple[Block, np.ndarray]:
    """Fit, round each point to its nearest node, refit: a wrong link in the walk moves a
    point's (i, j) but not where the fit, made from all the others, says it belongs."""
    block = fit_block(ij, xy, a, b)
    for _ in range(rounds):
        new = np.round(block.index(xy)).astype(int)
        if np.array_equal(new, ij):
            break
        ij = new
        block = fit_block(ij, xy, a, b)
    return block, ij


def misfit_of(block: Block, xy: np.ndarray, ij: np.ndarray, pitch: float) -> np.ndarray:
    """Distance of each point from its node, in pitches."""
    return np.hypot(*(block.position(ij) - xy).T) / pitch


def attach(
    block: Block,
    block_ij: np.ndarray,
    block_xy: np.ndarray,
    xy: np.ndarray,
    pitch: float,
    reach: float = 2.5,
) -> np.ndarray | None:
    """(i, j) in ``block`` for a smaller group ``xy``, or None when it does not belong. The
    group's points are taken nearest first; each must lie within ``reach`` pitches of the
    block's cores (or of the points already taken) and on a free node of the block's local
    lattice, read at that nearest point so that bowing far away does not matter, to within a
    few times the block's own scatter."""
    tolerance = min(0.15, max(0.05, 3 * block.scatter))
    known_xy, known_ij = list(block_xy), list(block_ij)
    taken = {tuple(k) for k in block_ij.tolist()}
    found: dict[int, tuple[int, int]] = {}
    while len(found) < len(xy):
        best = None
        for p in range(len(xy)):
            if p not in found:
                dist = np.hypot(*(np.asarray(known_xy) - xy[p]).T)
                q = int(dist.argmin())
                if best is None or dist[q] < best[0]:
                    best = (float(dist[q]), p, q)
        dist, p, q = best
        if dist > reach * pitch:
            return None
        steps = block.steps(known_ij[q])
        offset = np.linalg.solve(steps, xy[p] - known_xy[q])
        whole = np.round(offset)
        if math.hypot(*(steps @ (offset - whole))) / pitch > tolerance:
            return None
        node = tuple(int(v) for v in known_ij[q] + whole)
        if node in taken:
            return None
        taken.add(node)
        found[p] = node
        known_xy.append(xy[p])
        known_ij.append(np.array(node))
    nodes = np.array([found[p] for p in range(len(xy))], int)
    # A group that stretches the block's rectangle must fill a fair share of what it adds:
    # a few cores beside a block (orientation cores) leave most of their new rows empty.
    lo, hi = block_ij.min(axis=0), block_ij.max(axis=0)
    new_lo, new_hi = np.minimum(lo, nodes.min(axis=0)), np.maximum(hi, nodes.max(axis=0))
    added = np.prod(new_hi - new_lo + 1) - np.prod(hi - lo + 1)
    outside = np.any((nodes < lo) | (nodes > hi), axis=1).sum()
    if added and outside < MIN_NEW_FILLED * added:
        return None
    return nodes


def warped_positions(
    block: Block,
    core_ij: np.ndarray,
    core_xy: np.ndarray,
    ij: np.ndarray,
    reach: float = 1.5,
    max_misfit: float = 0.35,
) -> np.ndarray:
    """Node positions at ``ij`` that follow warp the fit misses (a sagging corner, a row
    pushed aside): the fit plus the Gaussian-weighted mean misfit of the cores around
    (``reach`` steps), shrunk toward the fit where few cores are near. A core's own misfit
    is left out, so that its node says where the others put it."""
    misfit = core_xy - block.position(core_ij)
    # Points far off their node (debris, a piece pushed aside) say nothing of the warp.
    on = np.hypot(*misfit.T) <= max_misfit * pitch_of(block.coef[1], block.coef[2])
    misfit, core_ij = misfit[on], core_ij[on]
    d2 = ((ij[:, None, :] - core_ij[None, :, :]) ** 2).sum(axis=2)
    weight = np.where(d2 > 0, np.exp(-d2 / (2 * reach**2)), 0.0)
    return block.position(ij) + (weight @ misfit) / (0.5 + weight.sum(axis=1))[:, None]
