"""Uneven blocks: a mesh whose sides do not divide by the rank grid still splits exactly."""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from meshmpi import Mesh, UsageError, load_hardware
from meshmpi.host import gather_tiles, scatter_tiles
from meshmpi.mesh import choose_rank_grid

GRIDS = {"auto": lambda p: None, "1xP": lambda p: (1, p), "Px1": lambda p: (p, 1)}


@pytest.mark.mpi
@pytest.mark.parametrize("grid", list(GRIDS))
def test_blocks_tile_the_mesh_and_differ_by_at_most_one(new_mesh, world, grid):
    mesh = new_mesh(5, 7, rank_grid=GRIDS[grid](world.size))
    ry, rx = mesh.rank_grid
    assert ry * rx == world.size
    blocks = world.allgather((mesh.coords, mesh.row_start, mesh.row_stop, mesh.col_start, mesh.col_stop))
    owner = np.full((5, 7), -1)
    heights, widths = {}, {}
    for rank, ((y, x), r0, r1, c0, c1) in enumerate(blocks):
        assert np.all(owner[r0:r1, c0:c1] == -1), "blocks overlap"
        owner[r0:r1, c0:c1] = rank
        heights.setdefault(y, set()).add(r1 - r0)
        widths.setdefault(x, set()).add(c1 - c0)
    assert np.all(owner >= 0), "blocks leave cores out"
    # One height per rank row, one width per rank column; they differ by at most one, and
    # the larger blocks come first.
    assert all(len(h) == 1 for h in heights.values()) and all(len(w) == 1 for w in widths.values())
    h = [heights[y].pop() for y in range(ry)]
    w = [widths[x].pop() for x in range(rx)]
    assert max(h) - min(h) <= 1 and max(w) - min(w) <= 1
    assert h == sorted(h, reverse=True) and w == sorted(w, reverse=True)
    assert sum(h) == 5 and sum(w) == 7
    assert mesh.block_shape == (h[mesh.coords[0]], w[mesh.coords[1]])
    assert mesh.clock.shape == mesh.block_shape
    assert all(v.shape == mesh.block_shape for v in mesh.counters.values())


@pytest.mark.mpi
@pytest.mark.parametrize("grid", list(GRIDS))
def test_uneven_results_equal_one_rank(new_mesh, world, gather_full, grid):
    """Data and clocks after shifts and multicasts across uneven block edges equal a 1-rank run."""

    def run(mesh):
        rng = np.random.default_rng(9)
        full = rng.standard_normal((5, 7, 3))
        a = scatter_tiles(mesh, "a", full)
        b = mesh.alloc("b", (3,), np.float64)
        with mesh.fabric.scope():
            for k in (1, -3, 6):
                mesh.fabric.shift(f"x{k}", "x", k).run(a)
            for k in (2, -4):
                mesh.fabric.shift(f"y{k}", "y", k, relay=True).run(a, b)
            mesh.fabric.multicast("mx", "x", 4).run(b)
            mesh.fabric.multicast("my", "y", 0, 0, 5).run(a)
        counters = gather_full(mesh, {"clock": mesh.clock, **mesh.counters})
        return gather_tiles(mesh, a), gather_tiles(mesh, b), counters

    mesh = new_mesh(5, 7, rank_grid=GRIDS[grid](world.size))
    got = run(mesh)
    alone = Mesh(5, 7, load_hardware("wse2"), comm=MPI.COMM_SELF)
    try:
        want = run(alone)
    finally:
        alone.free()
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    for name in want[2]:
        assert np.array_equal(got[2][name], want[2][name]), name


@pytest.mark.mpi(min_size=2)
def test_more_ranks_than_cores_along_an_axis_is_a_usage_error(world):
    size = world.size
    cases = [dict(rows=1, cols=size - 1, rank_grid=(1, size)),
             dict(rows=size - 1, cols=3, rank_grid=(size, 1)),
             dict(rows=1, cols=1, rank_grid=None)]
    for case in cases:
        if min(case["rows"], case["cols"]) < 1:
            continue
        try:
            Mesh(case["rows"], case["cols"], load_hardware("wse2"), rank_grid=case["rank_grid"])
            message = None
        except UsageError as exc:
            message = str(exc)
        messages = world.allgather(message)
        assert all(m is not None for m in messages), (case, messages)
        assert len(set(messages)) == 1 and "\n" not in messages[0]
        assert f"{case['rows']}x{case['cols']}" in messages[0]


@pytest.mark.mpi
def test_rank_grid_must_match_the_world(world):
    try:
        Mesh(8, 8, load_hardware("wse2"), rank_grid=(world.size + 1, 1))
        message = None
    except UsageError as exc:
        message = str(exc)
    assert message is not None and f"needs {world.size + 1} ranks" in message


def test_choose_rank_grid_brute_force():
    """The automatic grid fits the mesh and has the smallest block perimeter."""
    for size in (1, 2, 3, 4, 6, 8, 12):
        for rows in range(1, 9):
            for cols in range(1, 9):
                fits = [(ry, size // ry) for ry in range(1, size + 1)
                        if size % ry == 0 and ry <= rows and size // ry <= cols]
                if not fits:
                    with pytest.raises(UsageError):
                        choose_rank_grid(size, rows, cols)
                    continue
                ry, rx = choose_rank_grid(size, rows, cols)
                assert (ry, rx) in fits
                perimeter = lambda g: -(-rows // g[0]) + -(-cols // g[1])  # noqa: E731
                assert perimeter((ry, rx)) == min(perimeter(g) for g in fits)
