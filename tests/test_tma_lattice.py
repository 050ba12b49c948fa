"""The TMA lattice on points alone: steps read from a tilted grid, blocks that come apart at
gaps of no whole step, bowed rows fitted, groups split off by an empty column joined back and
orientation cores left out, nodes that follow a local warp."""

from __future__ import annotations

import math

import numpy as np

from fpstore.slides import tma_lattice as lat


def grid(rows, cols, a, b, origin=(0.0, 0.0), missing=(), jitter=0.0, seed=0):
    """(xy, ij) of a rows x cols lattice with steps a, b; ij = (column, row) from 0."""
    rng = np.random.default_rng(seed)
    ij = np.array([(i, j) for j in range(rows) for i in range(cols) if (i, j) not in missing])
    xy = np.asarray(origin) + ij[:, :1] * np.asarray(a) + ij[:, 1:] * np.asarray(b)
    return xy + rng.normal(0, jitter, xy.shape), ij


def turn(v, degrees):
    t = math.radians(degrees)
    return np.array(
        [v[0] * math.cos(t) - v[1] * math.sin(t), v[0] * math.sin(t) + v[1] * math.cos(t)]
    )


def test_steps_of_a_tilted_grid_with_unequal_pitches():
    a, b = turn((30.0, 0.0), 8), turn((0.0, 34.0), 8)
    xy, _ = grid(6, 7, a, b, missing={(2, 2), (5, 0), (0, 4)}, jitter=0.5)
    found_a, found_b = lat.lattice_vectors(xy, fallback_pitch=99)
    assert np.hypot(*(found_a - a)) < 1 and np.hypot(*(found_b - b)) < 1
    # one core: an upright grid of the fallback pitch
    one_a, one_b = lat.lattice_vectors(xy[:1], fallback_pitch=40)
    assert one_a.tolist() == [40, 0] and one_b.tolist() == [0, 40]


def test_blocks_come_apart_where_the_gap_is_no_whole_step():
    a, b = np.array([30.0, 0.0]), np.array([0.0, 30.0])
    left, left_ij = grid(4, 4, a, b)
    right, right_ij = grid(4, 4, a, b, origin=(3 * 30 + 1.6 * 30, 9.0))
    group, ij = lat.link(np.concatenate([left, right]), a, b)
    assert len(set(group[:16])) == len(set(group[16:])) == 1 and group[0] != group[16]
    for part, truth in ((slice(0, 16), left_ij), (slice(16, 32), right_ij)):
        assert np.all(ij[part] - ij[part][0] == truth - truth[0])


def test_a_quadratic_lattice_follows_bowed_rows():
    a, b = np.array([30.0, 0.0]), np.array([0.0, 30.0])
    xy, ij = grid(6, 9, a, b)
    xy[:, 1] += 0.3 * 30 * ((ij[:, 0] - 4) / 4) ** 2  # rows sag 0.3 pitch at their ends
    block, found = lat.reindex(xy, ij, a, b)
    assert block.degree == 2 and np.array_equal(found, ij)
    assert lat.misfit_of(block, xy, ij, 30).max() < 0.01
    assert np.allclose(block.index(xy), ij, atol=0.01)


def test_a_group_cut_off_by_an_empty_column_joins_and_orientation_cores_do_not():
    a, b = np.array([30.0, 0.0]), np.array([0.0, 30.0])
    xy, ij = grid(10, 4, a, b, jitter=0.3)
    block = lat.fit_block(ij, xy, a, b)
    # two columns after one empty column: on the lattice, they join at columns 5 and 6
    beyond, beyond_ij = grid(10, 2, a, b, origin=(5 * 30, 0))
    joined = lat.attach(block, ij, xy, beyond, pitch=30)
    assert joined is not None and np.array_equal(joined, beyond_ij + (5, 0))
    # the same 1.85 steps away (between blocks of an array): not on the lattice
    assert lat.attach(block, ij, xy, beyond - (0.15 * 30, 0), pitch=30) is None
    # a 2 x 2 group beside the block past an empty column: on the lattice, but it would add
    # 30 positions and fill 4 of them; orientation cores, not part of the block
    marks, _ = grid(2, 2, a, b, origin=(-3 * 30, 4 * 30))
    assert lat.attach(block, ij, xy, marks, pitch=30) is None


def test_nodes_follow_a_sagging_corner_the_fit_misses():
    a, b = np.array([30.0, 0.0]), np.array([0.0, 30.0])
    xy, ij = grid(8, 8, a, b, missing={(0, 0)})
    corner = (ij[:, 0] <= 1) & (ij[:, 1] <= 1)
    xy[corner] += (0.0, 8.0)  # the corner's cores sit 8 px low
    block = lat.fit_block(ij, xy, a, b)
    plain = block.position(np.array([[0, 0]]))[0]
    warped = lat.warped_positions(block, ij, xy, np.array([[0, 0]]))[0]
    assert warped[1] - plain[1] > 3  # the empty corner node moves down with its neighbours
