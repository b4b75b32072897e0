"""The host plane: tiling helpers, scatter and gather, on every rank split."""
from __future__ import annotations

import numpy as np
import pytest

from meshmpi.host import gather_tiles, pad_to, scatter_tiles

GRIDS = {"auto": lambda p: None, "1xP": lambda p: (1, p), "Px1": lambda p: (p, 1)}


def test_pad_to_pads_with_zeros():
    matrix = np.random.default_rng(0).standard_normal((5, 10))
    padded = pad_to(matrix, 6, 12)
    assert padded.shape == (6, 12) and np.array_equal(padded[:5, :10], matrix)
    assert not padded[5:].any() and not padded[:, 10:].any()


@pytest.mark.mpi
@pytest.mark.parametrize("grid", list(GRIDS))
def test_scatter_gather_round_trip(new_mesh, world, grid):
    mesh = new_mesh(5, 7, rank_grid=GRIDS[grid](world.size))
    full = np.arange(5 * 7 * 4, dtype=np.float32).reshape(5, 7, 2, 2)
    arr = scatter_tiles(mesh, "x", full)
    assert arr.data.shape == mesh.block_shape + (2, 2) and arr.dtype == np.float32
    for r in range(mesh.block_shape[0]):
        for c in range(mesh.block_shape[1]):
            assert np.array_equal(arr.data[r, c], full[mesh.row_start + r, mesh.col_start + c])
    assert np.array_equal(gather_tiles(mesh, arr), full)
    on_root = gather_tiles(mesh, arr, root=0)
    if mesh.rank == 0:
        assert np.array_equal(on_root, full)
    else:
        assert on_root is None


@pytest.mark.mpi
def test_scatter_from_one_root(new_mesh, world):
    mesh = new_mesh(4, 6)
    root = world.size - 1
    full = np.random.default_rng(1).standard_normal((4, 6, 3))
    arr = scatter_tiles(mesh, "x", full if mesh.rank == root else None, root=root)
    assert np.array_equal(gather_tiles(mesh, arr), full)


@pytest.mark.mpi
def test_dry_run_scatter_from_a_root_sends_nothing(new_mesh, world):
    """In a dry run there is no payload to broadcast, whether or not the root passes one."""
    mesh = new_mesh(4, 6, dry_run=True)
    full = np.zeros((4, 6, 3), np.float16)
    arr = scatter_tiles(mesh, "x", full if mesh.rank == 0 else None, (3,), np.float16, root=0)
    assert arr.data is None and arr.tile_shape == (3,) and arr.dtype == np.float16
    # The next broadcast from rank 0 must receive its own message, not a stray one.
    assert mesh.cart.bcast("next" if mesh.rank == 0 else None, root=0) == "next"
    with pytest.raises(ValueError, match="dry-run"):
        gather_tiles(mesh, arr)
