"""The host plane: placing data into tiles and collecting results (not modeled as wafer time).

:func:`scatter` and :func:`gather` move a global array to and from the mesh by its
:class:`~meshmpi.layout.Layout`; :func:`scatter_tiles` and :func:`gather_tiles` take the
tiles themselves, for layouts made by hand. These helpers may use any MPI collective; kernels
call them only outside their timed regions.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .array import MeshArray
from .errors import LayoutError
from .layout import Layout


def pad_to(matrix: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Zero-pad a 2-D array up to ``rows x cols``."""
    out = np.zeros((rows, cols), matrix.dtype)
    out[: matrix.shape[0], : matrix.shape[1]] = matrix
    return out


def scatter(mesh, name: str, array: np.ndarray | None, layout: Layout, dtype=None,
            root: int | None = None, charge: bool = True) -> MeshArray:
    """The global ``array`` placed on the mesh as ``layout`` says; the mesh array carries the
    layout. Each rank cuts its own cores' tiles. With ``root=None`` every rank passes the same
    array; otherwise only ``root`` passes it and it is broadcast. In a dry run ``array`` may be
    None (give ``dtype``; float32 by default)."""
    if root is not None and not mesh.dry_run:
        array = mesh.cart.bcast(array if mesh.rank == root else None, root=root)
    if (layout.rows, layout.cols) != (mesh.rows, mesh.cols):
        raise LayoutError(f"{name}: layout {layout} is for another mesh than {mesh.rows}x{mesh.cols}")
    block = None
    if array is not None and not mesh.dry_run:
        block = layout.tiles(array, mesh.global_rows(), mesh.global_cols())
        dtype = block.dtype
    arr = place_block(mesh, name, block, layout.tile_shape, dtype or np.float32, charge)
    arr.layout = layout
    return arr


def gather(arr: MeshArray, root: int | None = None) -> np.ndarray | None:
    """The global array of ``arr`` (which must carry its layout) on every rank (``root=None``)
    or on ``root`` only."""
    if arr.layout is None:
        raise LayoutError(f"{arr.name}: an array without a layout cannot be gathered as a whole")
    mesh = arr.mesh
    pieces = _pieces(mesh, arr, root, _one_copy(arr.layout))
    return None if pieces is None else arr.layout.assemble(pieces, arr.dtype)


def _one_copy(layout: Layout) -> tuple:
    """The part of a block that holds one copy of its tiles: a layout that splits no dimension
    along an axis (nor skews one) holds the same tiles on every core of that axis's lines, so
    one core of each line is enough (a decode's logits: one row of the mesh, not all of it)."""
    plain = all(d.held is None for d in layout.dims)
    alongs = {d.along for d in layout.dims}
    return (slice(0, 1) if plain and "y" not in alongs else slice(None),
            slice(0, 1) if plain and "x" not in alongs else slice(None))


def scatter_tiles(mesh, name: str, tiles: np.ndarray | None, tile_shape=None, dtype=None,
                  root: int | None = None, charge: bool = True) -> MeshArray:
    """A mesh array whose core (r, c) holds ``tiles[r, c]`` (a layout made by hand).

    ``tiles`` has shape ``(rows, cols, *tile)``. With ``root=None`` every rank passes the same
    array (e.g. from the same seed); otherwise only ``root`` passes it and it is broadcast.
    In a dry run ``tiles`` may be None: give ``tile_shape`` and ``dtype``.
    """
    if root is not None and not mesh.dry_run:  # every rank joins the broadcast, or none does
        tiles = mesh.cart.bcast(tiles if mesh.rank == root else None, root=root)
    block = None if tiles is None else tiles[mesh.row_start:mesh.row_stop, mesh.col_start:mesh.col_stop]
    return place_block(mesh, name, block, tile_shape, dtype, charge)


def place_block(mesh, name: str, block: np.ndarray | None, tile_shape=None, dtype=None,
                charge: bool = True, adopt: bool = False) -> MeshArray:
    """A mesh array holding ``block``: this rank's ``(block_rows, block_cols, *tile)`` tiles,
    which each rank makes for itself. In a dry run ``block`` may be None: give ``tile_shape``
    and ``dtype``. ``adopt``: the caller hands ``block`` over (it keeps no reference), so an
    array that owns its contiguous data becomes the payload without a copy."""
    if block is not None:
        tile_shape, dtype = block.shape[2:], block.dtype
    arr = mesh.alloc(name, tile_shape, dtype, fill=None, charge=charge)
    if not mesh.dry_run:
        if adopt and block.flags.owndata and block.flags.c_contiguous and block.shape == arr.data.shape:
            arr.data = block
        else:
            arr.data[...] = block
    return arr


def _pieces(mesh, arr: MeshArray, root: int | None, part: tuple = (slice(None), slice(None))):
    if arr.data is None:
        raise ValueError(f"{arr.name}: a dry-run array has no payload to gather")
    piece = (mesh.row_start, mesh.col_start, arr.data[part])
    return mesh.cart.allgather(piece) if root is None else mesh.cart.gather(piece, root=root)


def gather_tiles(mesh, arr: MeshArray, root: int | None = None) -> np.ndarray | None:
    """The full ``(rows, cols, *tile)`` array of tiles on every rank (``root=None``) or on
    ``root`` only."""
    pieces = _pieces(mesh, arr, root)
    if pieces is None:
        return None
    full = np.empty((mesh.rows, mesh.cols) + arr.tile_shape, arr.dtype)
    for r0, c0, block in pieces:
        full[r0:r0 + block.shape[0], c0:c0 + block.shape[1]] = block
    return full


def gather_block_arrays(mesh, arrays: dict, root: int = 0) -> dict | None:
    """Assemble per-core ``[rows, cols]`` arrays (counters) on ``root``."""
    pieces = mesh.cart.gather((mesh.row_start, mesh.col_start, arrays), root=root)
    if pieces is None:
        return None
    out = {name: np.empty((mesh.rows, mesh.cols), a.dtype) for name, a in arrays.items()}
    for r0, c0, block in pieces:
        for name, a in block.items():
            out[name][r0:r0 + a.shape[0], c0:c0 + a.shape[1]] = a
    return out


def agree(mesh, error: str | None, root: int = 0) -> str | None:
    """Share one rank's error message (or None) with every rank."""
    return mesh.cart.bcast(error, root=root)


def world_share():
    """(rank, size, allgather) of the whole job, for host-plane work shared out over the ranks
    before any mesh exists (``allgather(value)``: every rank's value, in rank order)."""
    comm = MPI.COMM_WORLD
    return comm.Get_rank(), comm.Get_size(), comm.allgather
