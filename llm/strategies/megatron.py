"""Megatron-LM tensor parallelism for a decode step and a prefill (PAPER.md §8), on the 1-D snake
mapping of :mod:`kernels.baselines` (``megatron``). The prefill's GEMMs pair up as the GEMVs do
below, x being the prompt's T x m activations (:mod:`llm.strategies.prefill`).

Mapping: the GEMVs of a layer pair up as Megatron-LM pairs them. Fused q/k/v and gate/up are
*column-parallel*: x arrives whole on the snake's first core and is broadcast down the snake
by a streaming software chain; core k holds W's columns k·w..(k+1)·w and computes them. W_O and
W_down are *row-parallel*: core k (snake order over the cores of W's input dimension) holds x's
share k·w..(k+1)·w and those rows of W, computes a partial y of all n outputs, and the partials
are summed by a reduce chain up the snake to its first core — where the next column-parallel
GEMV's broadcast starts. So each pair costs one broadcast and one reduce chain over the used
cores: Megatron-LM's all-reduce after a row-parallel GEMV, on a mesh's best 1-D order. The LM
head is column-parallel; the logits leave the wafer partitioned.

Choices the paper leaves open: the snake order (kernels/baselines.py); the reduce chain is timed
as the broadcast chain's mirror image (same stages, hops, relays and payload), its one add per
element riding the stream (PAPER.md §3's streaming chains; on WSE-2 the link's serialisation is
the slower); the attention between q/k/v and W_O runs WaferLLM's way (:mod:`llm.strategies.base`).

Pays: L — two chains of (used − 1)·(α + β) per GEMV pair, and the used cores are thousands at
paper scale; P — a GEMV uses at most n (column-) or m (row-parallel) cores, the rest of the
region idles; M — x whole on every core of a column-parallel GEMV; R — 1-hop routes only.
"""
from __future__ import annotations

import numpy as np

from kernels import baselines
from meshmpi import host

ROW_PARALLEL = ("o", "down")


def _rows(tokens) -> tuple:
    return () if tokens is None else (tokens,)


def column_parallel(mesh, m: int, n: int, x_vec, w_mat, name: str, tokens: int | None = None):
    """y = x @ W with W's columns over the snake, x broadcast from its first core (a GEMM's
    x: ``tokens`` rows, broadcast whole)."""
    plan = baselines.Plan(mesh.rows, mesh.cols, m, n)
    x_tiles = w_tiles = None
    if x_vec is not None:
        x_tiles = np.zeros((mesh.rows, mesh.cols) + x_vec.shape, np.float32)
        x_tiles[0, 0] = x_vec
        w_tiles = plan.column_tiles(w_mat, plan.snake(), m)
    x = host.scatter_tiles(mesh, f"{name}.x", x_tiles, _rows(tokens) + (m,), np.float32)
    w = host.scatter_tiles(mesh, f"{name}.w", w_tiles, (m, plan.width), np.float32, charge=False)
    y = baselines.megatron(mesh, plan, x, w, name)
    result = None if mesh.dry_run else plan.read_columns(host.gather_tiles(mesh, y), plan.snake())
    for arr in (x, w, y):
        arr.free()
    return result


def row_parallel(mesh, m: int, n: int, x_vec, w_mat, name: str, tokens: int | None = None):
    """y = x @ W with W's rows (and x's matching shares) over the snake, partial sums reduced
    up the snake to its first core (a GEMM's x: ``tokens`` rows, split by columns alike)."""
    plan = baselines.Plan(mesh.rows, mesh.cols, n, m)      # W's transpose, column-parallel
    order = plan.snake()
    rows = _rows(tokens)
    x_tiles = w_tiles = None
    if x_vec is not None:
        x_tiles = plan.column_tiles(np.atleast_2d(x_vec), order, tokens or 1)
        x_tiles = x_tiles if tokens is not None else x_tiles[:, :, 0]
        w_tiles = plan.column_tiles(np.ascontiguousarray(w_mat.T), order, n)
    x = host.scatter_tiles(mesh, f"{name}.x", x_tiles, rows + (plan.width,), np.float32)
    w = host.scatter_tiles(mesh, f"{name}.w", w_tiles, (n, plan.width), np.float32, charge=False)
    partial = mesh.alloc(f"{name}.partial", rows + (n,), np.float32)
    with mesh.phase(f"{name}.local"):
        if not mesh.dry_run:
            partial.data[...] = np.einsum("abnw,ab...w->ab...n", w.data, x.data)
        mesh.compute(2 * (tokens or 1) * plan.width * n, where=baselines.used_mask(mesh, plan),
                     ops=baselines.vector_ops(plan.width, n))
    with mesh.phase(f"{name}.reduce"):     # timed as the broadcast's mirror, on a buffer of its size
        stream = mesh.alloc(f"{name}.stream", rows + (n,), np.float32, charge=False)
        baselines.megatron_broadcast(mesh, plan, stream)
        stream.free()
    result = None if mesh.dry_run else host.gather_tiles(mesh, partial).sum(axis=(0, 1))
    for arr in (x, w, partial):
        arr.free()
    return result


class Megatron:
    """Column-parallel q/k/v, gate/up and LM head; row-parallel W_O and W_down."""
    name = "megatron"

    def gemv(self, mesh, kind: str, m: int, n: int, x_vec, w_mat, name: str, tokens: int | None = None):
        """y = x @ W, or with ``tokens`` the GEMM of a ``tokens x m`` x (the prefill's)."""
        return (row_parallel if kind in ROW_PARALLEL else column_parallel)(mesh, m, n, x_vec, w_mat, name, tokens)

    def weight_elements(self, mesh, kind: str, m: int, n: int, tokens: int | None = None) -> np.ndarray:
        """W's elements resident on each core of this rank's block: m·w (its columns) on the
        used cores of a column-parallel GEMV, n·w (its rows) on those of a row-parallel one."""
        plan = baselines.Plan(mesh.rows, mesh.cols, *((n, m) if kind in ROW_PARALLEL else (m, n)))
        return np.where(baselines.used_mask(mesh, plan), plan.m * plan.width, 0)
