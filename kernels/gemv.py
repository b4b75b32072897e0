"""MeshGEMV, y = x @ W (PAPER.md §3): local GEMV per core, then an allreduce along one axis.

Layouts are stated as data (:mod:`meshmpi.layout`): a vector is ``indexed`` along one axis
(chunk i on line i) and replicated along the other. With ``reduce_axis="y"`` the input x is row-indexed (chunk i on
every core of row i), W's tile (i, j) is W[block i, block j], and y comes out column-indexed
(chunk j on every core of column j) — the transpose of the input layout, so consecutive
GEMVs alternate their reduction axis and no vector is ever transposed.
"""
from __future__ import annotations

import numpy as np

from meshmpi import layout
from meshmpi.layout import Layout

from .allreduce import allreduce


def other(axis: str) -> str:
    return "x" if axis == "y" else "y"


def vector_layout(rows: int, cols: int, length: int, indexed_along: str) -> Layout:
    """A vector split over the lines of ``indexed_along`` ('y': chunk i on every core of row i)
    and replicated along the other axis; zero-padded to a whole number of chunks."""
    return layout.vector(rows, cols, length, indexed_along)


def matrix_layout(rows: int, cols: int, m: int, n: int, reduce_axis: str) -> Layout:
    """W (m in x n out) so that the GEMV reduces along ``reduce_axis``: for 'y' tile (i, j) is
    W[in block i, out block j]; for 'x' (the transposed placement) it is W[in block j, out block i]."""
    return layout.blocked(rows, cols, (m, n), (reduce_axis, other(reduce_axis)))


def meshgemv(mesh, x, w, reduce_axis: str = "y", algo: str = "ktree", groups: int | None = None,
             name: str = "gemv", out=None, forwarding: str = "stream"):
    """y = x @ W on every core, indexed along the other axis. ``x`` tiles: (in_chunk,);
    ``w`` tiles: (in_chunk, out_chunk). When W carries its layout (:func:`matrix_layout`), x
    must be laid out as W's input (:func:`vector_layout` along ``reduce_axis``) and y carries
    its own. Returns the output mesh array (allocated unless ``out``)."""
    in_chunk, out_chunk = w.tile_shape
    if w.layout is not None:
        m, n = w.layout.shape
        layout.expect(w, matrix_layout(mesh.rows, mesh.cols, m, n, reduce_axis), f"{name} W")
        layout.expect(x, vector_layout(mesh.rows, mesh.cols, m, reduce_axis), f"{name} x")
    if x.tile_shape != (in_chunk,):
        raise ValueError(f"{name}: x chunk {x.tile_shape} does not match W tile {w.tile_shape}")
    y = out or mesh.alloc(f"{name}.y", (out_chunk,), x.dtype)
    if w.layout is not None:
        y.layout = vector_layout(mesh.rows, mesh.cols, n, other(reduce_axis))
    with mesh.phase(f"{name}.local"):
        mesh.local(2 * in_chunk * out_chunk, lambda: np.matmul(x.data[:, :, None, :], w.data)[:, :, 0, :], y,
                   ops=in_chunk)    # one multiply-add vector op per x element
    allreduce(mesh, y, reduce_axis, "sum", algo, groups, name=f"{name}.allreduce", forwarding=forwarding)
    return y


class MeshGemv:
    """MeshGEMV as a plan (PAPER.md §3): y = x @ W for one W shape (m x n) and reduction axis,
    with its allreduce's algorithm, groups and forwarding, built once and called for every
    (x, W) pair of that shape (decode holds one per weight). Its layouts are
    :func:`vector_layout` along ``reduce_axis`` for x, :func:`matrix_layout` for W and the
    other axis for y."""

    def __init__(self, mesh, m: int, n: int, reduce_axis: str = "y", *, algo: str = "ktree",
                 groups: int | None = None, forwarding: str = "stream", name: str = "gemv"):
        self.mesh, self.m, self.n, self.reduce_axis, self.name = mesh, m, n, reduce_axis, name
        self.reduce = dict(algo=algo, groups=groups, forwarding=forwarding)

    @property
    def x_layout(self) -> Layout:
        return vector_layout(self.mesh.rows, self.mesh.cols, self.m, self.reduce_axis)

    @property
    def w_layout(self) -> Layout:
        return matrix_layout(self.mesh.rows, self.mesh.cols, self.m, self.n, self.reduce_axis)

    @property
    def y_layout(self) -> Layout:
        return vector_layout(self.mesh.rows, self.mesh.cols, self.n, other(self.reduce_axis))

    def __call__(self, x, w, name: str | None = None, out=None):
        return meshgemv(self.mesh, x, w, self.reduce_axis, name=name or self.name, out=out, **self.reduce)
