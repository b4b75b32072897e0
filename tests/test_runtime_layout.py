"""Layouts (meshmpi/layout.py): the tiles they cut, against slicing by hand; scatter and gather
by layout on every rank split; the layouts MeshGEMM's operands carry before and after a run."""
from __future__ import annotations

import numpy as np
import pytest

from kernels import gemm
from meshmpi import host
from meshmpi.errors import LayoutError
from meshmpi.layout import Dim, Layout, blocked, vector
from meshes import make_mesh, ring_order


def test_a_blocked_layout_cuts_the_tiles_slicing_does():
    """Dimension 0 over the 3 rows, dimension 1 over the 4 columns, zero padding at the ends."""
    a = np.arange(7 * 10, dtype=np.float64).reshape(7, 10) + 1
    lay = blocked(3, 4, a.shape, ("y", "x"))
    tiles = lay.tiles(a, np.arange(3), np.arange(4))
    assert tiles.shape == (3, 4, 3, 3) and lay.tile_shape == (3, 3)
    padded = np.zeros((9, 12))
    padded[:7, :10] = a
    for i in range(3):
        for j in range(4):
            assert np.array_equal(tiles[i, j], padded[3 * i:3 * i + 3, 3 * j:3 * j + 3])
    pieces = [(0, 0, tiles[:2, :1]), (0, 1, tiles[:2, 1:]), (2, 0, tiles[2:])]
    assert np.array_equal(lay.assemble(pieces, a.dtype), a)


def test_a_vector_is_replicated_along_the_other_axis():
    v = np.arange(1, 11, dtype=np.float32)
    tiles = vector(3, 2, 10, "x").tiles(v, np.arange(3), np.arange(2))
    assert tiles.shape == (3, 2, 5)
    for i in range(3):
        assert np.array_equal(tiles[i, 0], v[:5]) and np.array_equal(tiles[i, 1], v[5:])


def test_a_permuted_dimension_holds_the_ordered_elements():
    """``order``: tile position p of the padded dimension holds element order[p]; -1 a hole."""
    v = np.arange(10, 16, dtype=np.float64)                 # 6 elements
    order = np.array([5, 0, -1, 3, 1, -1, 2, 4])             # 8 slots over 2 columns
    lay = Layout(1, 2, (Dim(6, "x", 2, order=order),))
    tiles = lay.tiles(v, np.arange(1), np.arange(2))
    assert np.array_equal(tiles[0, 0], [15, 10, 0, 13]) and np.array_equal(tiles[0, 1], [11, 0, 12, 14])
    assert np.array_equal(lay.assemble([(0, 0, tiles)], v.dtype), v)


def test_layouts_compare_by_where_the_data_is():
    a = blocked(2, 2, (4, 6), ("y", "x"))
    assert a == blocked(2, 2, (4, 6), ("y", "x"))
    assert a != blocked(2, 2, (4, 6), ("x", "y")) and a != blocked(2, 2, (4, 7), ("y", "x"))
    skewed = a.with_dim(1, held=np.array([[[1], [0]], [[0], [1]]]))
    assert skewed != a and skewed == a.with_dim(1, held=np.array([[[1], [0]], [[0], [1]]]))
    assert str(skewed) == "[4 y/2, 6 x/2 skewed] on 2x2"
    with pytest.raises(LayoutError, match="does not match"):
        a.tiles(np.zeros((4, 5)), np.arange(2), np.arange(2))


def test_meshgemm_b_layout_is_the_papers_pre_skew():
    """Square N x N (PAPER.md §2): core (i, j) holds K block ring[(pos(i) + pos(j)) mod N] of B,
    with ring the interleaved order and pos its inverse, worked out here from the ring alone."""
    n, k, cols = 5, 10, 7
    order = ring_order(n)
    pos = {c: p for p, c in enumerate(order)}
    b = np.random.default_rng(0).standard_normal((k, cols))
    plan = gemm.GemmPlan.build("meshgemm", n, n, 3, k, cols)
    tiles = plan.b_layout().tiles(b, np.arange(n), np.arange(n))
    bk, bn = 2, 2                                            # 10 / 5 rows, ceil(7 / 5) columns
    padded = np.zeros((k, n * bn))
    padded[:, :cols] = b
    for i in range(n):
        for j in range(n):
            blk = order[(pos[i] + pos[j]) % n]
            assert np.array_equal(tiles[i, j], padded[blk * bk:(blk + 1) * bk, j * bn:(j + 1) * bn])


@pytest.mark.mpi
@pytest.mark.parametrize("grid", [None, (1, 2), (2, 1)])
def test_scatter_and_gather_by_layout_on_any_rank_split(new_mesh, world, grid):
    if grid is not None and world.size not in (2,):
        grid = None
    mesh = new_mesh(5, 7, rank_grid=grid)
    a = np.random.default_rng(1).standard_normal((3, 11, 13))
    lay = blocked(5, 7, (11, 13), ("x", "y")).batched(3)
    arr = host.scatter(mesh, "a", a, lay)
    assert arr.layout == lay and arr.tile_shape == (3, 2, 3)
    expected = lay.tiles(a, np.arange(5), np.arange(7))[mesh.row_start:mesh.row_stop, mesh.col_start:mesh.col_stop]
    assert np.array_equal(arr.data, expected)
    assert np.array_equal(host.gather(arr), a)
    on_root = host.gather(arr, root=0)
    assert (on_root is None) == (mesh.rank != 0)
    with pytest.raises(LayoutError, match="another mesh"):
        host.scatter(mesh, "b", a[0], blocked(4, 7, (11, 13), ("y", "x")))
    bare = mesh.alloc("bare", (2,))
    with pytest.raises(LayoutError, match="without a layout"):
        host.gather(bare)


@pytest.mark.mpi
@pytest.mark.parametrize("rows,cols", [(3, 3), (4, 4), (2, 3), (3, 5), (1, 4)])
@pytest.mark.parametrize("algo", ["meshgemm", "cannon"])
def test_gemm_operands_say_where_their_tiles_went(algo, rows, cols):
    """After MeshGEMM, A (aligned, then stepped) and B (stepped) are no longer where they were
    placed; their layouts record it, so gathering them gives back A and B. GEMM-T leaves A
    in place. An operand in another layout is refused before any step."""
    m, k, n = 2 * rows + 1, 3 * cols + 1, cols + 2
    rng = np.random.default_rng(rows * 10 + cols)
    a_mat, b_mat = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    mesh = make_mesh(rows, cols)
    plan = gemm.GemmPlan.build(algo, rows, cols, m, k, n)
    a = host.scatter(mesh, "a", a_mat, plan.a_layout())
    b = host.scatter(mesh, "b", b_mat, plan.b_layout())
    with mesh.fabric.scope():
        c = gemm.ring_gemm(mesh, plan, a, b)
    assert c.layout == plan.c_layout()
    np.testing.assert_allclose(host.gather(c), a_mat @ b_mat, atol=1e-12 * k * 10)
    assert np.array_equal(host.gather(a), a_mat) and np.array_equal(host.gather(b), b_mat)
    if rows > 1:
        assert b.layout != plan.b_layout()
    with pytest.raises(LayoutError, match="gemm B: bn is laid out as"):
        bn = host.scatter(mesh, "bn", b_mat, plan.b_natural_layout())
        gemm.ring_gemm(mesh, plan, host.scatter(mesh, "a2", a_mat, plan.a_layout()), bn)
    plan_t = gemm.GemmPlan.build(algo, rows, cols, m, n, k)
    at = host.scatter(mesh, "at", a_mat, plan_t.t_a_layout())
    bt = host.scatter(mesh, "bt", b_mat.T, plan_t.b_layout())
    with mesh.fabric.scope():
        ct = gemm.ring_gemm_t(mesh, plan_t, at, bt)
    assert at.layout == plan_t.t_a_layout() and ct.layout == plan_t.t_c_layout()
    np.testing.assert_allclose(host.gather(ct), a_mat @ b_mat, atol=1e-12 * k * 10)
    assert np.array_equal(host.gather(bt), b_mat.T)
    mesh.free()
