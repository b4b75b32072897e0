"""MeshGEMV, y = x @ W (PAPER.md §3): local GEMV per core, then an allreduce along one axis.

Layouts are stated as data: a vector is ``indexed`` along one axis (chunk i on line i) and
replicated along the other. With ``reduce_axis="y"`` the input x is row-indexed (chunk i on
every core of row i), W's tile (i, j) is W[block i, block j], and y comes out column-indexed
(chunk j on every core of column j) — the transpose of the input layout, so consecutive
GEMVs alternate their reduction axis and no vector is ever transposed.
"""
from __future__ import annotations

import numpy as np

from meshmpi import host

from .allreduce import allreduce


def other(axis: str) -> str:
    return "x" if axis == "y" else "y"


def place_vector(vector: np.ndarray, rows: int, cols: int, indexed_along: str) -> np.ndarray:
    """Tiles of a vector split over the lines of ``indexed_along`` ('y': chunk i on row i) and
    replicated along the other axis; zero-padded to a whole number of chunks."""
    parts = rows if indexed_along == "y" else cols
    chunk = -(-vector.size // parts)
    padded = np.zeros(parts * chunk, vector.dtype)
    padded[: vector.size] = vector
    chunks = padded.reshape(parts, chunk)
    if indexed_along == "y":
        return np.broadcast_to(chunks[:, None, :], (rows, cols, chunk)).copy()
    return np.broadcast_to(chunks[None, :, :], (rows, cols, chunk)).copy()


def place_matrix(w: np.ndarray, rows: int, cols: int, reduce_axis: str) -> np.ndarray:
    """W (in x out) so that the GEMV reduces along ``reduce_axis``: for 'y' tile (i, j) is
    W[in block i, out block j]; for 'x' (the transposed placement) it is W[in block j, out block i]."""
    in_parts, out_parts = (rows, cols) if reduce_axis == "y" else (cols, rows)
    w = host.pad_to(w, -(-w.shape[0] // in_parts) * in_parts, -(-w.shape[1] // out_parts) * out_parts)
    tiles = host.tile_matrix(w, in_parts, out_parts)
    return tiles if reduce_axis == "y" else tiles.swapaxes(0, 1).copy()


def read_vector(tiles: np.ndarray, indexed_along: str, length: int) -> np.ndarray:
    """The vector back from replicated tiles (one line's copy)."""
    chunks = tiles[:, 0] if indexed_along == "y" else tiles[0, :]
    return chunks.reshape(-1)[:length]


def meshgemv(mesh, x, w, reduce_axis: str = "y", algo: str = "ktree", groups: int | None = None,
             name: str = "gemv", out=None, forwarding: str = "stream"):
    """y = x @ W on every core, indexed along the other axis. ``x`` tiles: (in_chunk,);
    ``w`` tiles: (in_chunk, out_chunk). Returns the output mesh array (allocated unless ``out``)."""
    in_chunk, out_chunk = w.tile_shape
    if x.tile_shape != (in_chunk,):
        raise ValueError(f"{name}: x chunk {x.tile_shape} does not match W tile {w.tile_shape}")
    y = out or mesh.alloc(f"{name}.y", (out_chunk,), x.dtype)
    with mesh.phase(f"{name}.local"):
        if not mesh.dry_run:
            y.data[...] = np.matmul(x.data[:, :, None, :], w.data)[:, :, 0, :]
        mesh.compute(2 * in_chunk * out_chunk, ops=in_chunk)    # one multiply-add vector op per x element
    allreduce(mesh, y, reduce_axis, "sum", algo, groups, name=f"{name}.allreduce", forwarding=forwarding)
    return y
