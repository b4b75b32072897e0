"""T10-style compute-shift for a decode step and a prefill (PAPER.md §8), on the crossbar-id GEMV
(GEMM) of :mod:`kernels.baselines` (``t10``). In the prefill x is the prompt's T x m
activations: the hand-over multicasts all of them, and the ring fits two T-row chunks
(:mod:`llm.strategies.prefill`).

Mapping: every GEMV is T10's: W's columns resident 1-D over row-major core ids (at most n
cores), x split in p chunks rotating around rings of p consecutive ids, p the fewest shifts
whose buffers fit a core (:func:`kernels.baselines.t10_ring`; at decode scale x whole mostly
fits, so p = 1 and nothing rotates, but W_down's longer input can need a few: p = 3 for
LLaMA3-8B on 360²). The ring fits one operator's W in a core, not the region's other resident
layers beside it. Before each GEMV its input must reach every ring (each ring holds
all of x): T10 plans this exchange between operators as one step of its crossbar, addressing
cores by id. On the mesh it becomes a one-to-all multicast from the first core on hardware
routes (T10 handles R: no software relays), down column 0 over the used rows and then along
each of them: long paths (the rows' and columns' lengths), but a tree, not a chain.

Choices the paper leaves open: the ring size as above; the hand-over as above; the attention
runs WaferLLM's way (:mod:`llm.strategies.base`).

Pays: L — the hand-over's paths of up to (used rows − 1) + (C − 1) hops per GEMV and, where
rings rotate, the wrap edges; P — at most n cores per GEMV, the partition coarser than the mesh; M — handled by
the ring choice; R — a few pass-through routes per core.
"""
from __future__ import annotations

import numpy as np

from kernels import baselines
from meshmpi import host


def hand_over(mesh, plan, whole, name: str) -> None:
    """``whole`` from core (0, 0) to every used core: a multicast down column 0 over the used
    rows, then one along each used row, on pass-through routes (module docstring)."""
    fabric = mesh.fabric
    if plan.used_rows > 1:
        fabric.multicast(f"{name}.down", "y", 0, hi=plan.used_rows).start(whole, lines=[0]).wait()
    if plan.cols > 1:
        fabric.multicast(f"{name}.across", "x", 0).start(whole, lines=list(range(plan.used_rows))).wait()
    mesh.step("hand-over")


class T10:
    """Every GEMV T10's compute-shift, its input first broadcast to every ring."""
    name = "t10"

    def gemv(self, mesh, kind: str, m: int, n: int, x_vec, w_mat, name: str, tokens: int | None = None):
        """y = x @ W, or with ``tokens`` the GEMM of a ``tokens x m`` x (the prefill's)."""
        plan = baselines.Plan(mesh.rows, mesh.cols, m, n)
        rows = () if tokens is None else (tokens,)
        ring = baselines.t10_ring(plan, mesh.hardware, tokens or 1)
        chunk = -(-m // ring)
        x_tiles, w_tiles = (None, None) if x_vec is None else baselines.t10_tiles(plan, ring, x_vec, w_mat)
        with mesh.phase(f"{name}.hand_over"):
            whole = mesh.alloc(f"{name}.x.whole", rows + (m,), np.float32, charge=False)
            hand_over(mesh, plan, whole, name)
            whole.free()
        x = host.scatter_tiles(mesh, f"{name}.x", x_tiles, rows + (chunk,), np.float32)
        w = host.scatter_tiles(mesh, f"{name}.w", w_tiles, (ring, chunk, plan.width), np.float32, charge=False)
        y = baselines.t10(mesh, plan, x, w, ring, name)
        result = None if mesh.dry_run else plan.read_columns(host.gather_tiles(mesh, y), plan.row_major())
        for arr in (x, w, y):
            arr.free()
        return result

    def weight_elements(self, mesh, kind: str, m: int, n: int, tokens: int | None = None) -> np.ndarray:
        """W's elements resident on each core of this rank's block: its w columns of the ring's
        padded m (ring x chunk rows) on the used cores."""
        plan = baselines.Plan(mesh.rows, mesh.cols, m, n)
        ring = baselines.t10_ring(plan, mesh.hardware, tokens or 1)
        return np.where(baselines.used_mask(mesh, plan), ring * -(-m // ring) * plan.width, 0)
