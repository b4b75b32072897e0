"""Ladder-style unified memory for a decode step and a prefill (PAPER.md §8), on the all-to-all
fetch GEMV (GEMM) of :mod:`kernels.baselines` (``ladder``); the prefill's x is the prompt's
T x m activations, every fetch carrying a holder's T·h of them (:mod:`llm.strategies.prefill`).

Mapping: every GEMV is Ladder's: x and W laid out contiguously over the used cores in
row-major order (x's share and W's matching rows together), the output columns partitioned 1-D,
and every consumer fetching its operands from every holder in one X-then-Y all-to-all issued at
once, as if every access were one hop. Long fetches relay hop by hop in software on shared
1-hop routes (``routing="relay"``, what a port must do); ``"direct"`` asks for a pass-through
route per fetch and raises under strict route limits.

Choices the paper leaves open: a GEMV's output stays where it was computed, contiguous in the
same 1-D order; the next GEMV's operand is the same tensor in unified memory, so the change of
chunk size between them (its own used cores) is not timed — it favours Ladder. The attention
runs WaferLLM's way (:mod:`llm.strategies.base`).

Pays: L — every GEMV moves all of W across the mesh, each hop of a relayed fetch α + β; R —
O(C) routes per router direct, else a relay on every intermediate core; M — the fetched
operands duplicated on every consumer; P — at most n cores per GEMV.
"""
from __future__ import annotations

import numpy as np

from kernels import baselines
from meshmpi import host


class Ladder:
    """Every GEMV an all-to-all fetch from the unified memory, then local columns."""
    name = "ladder"

    def __init__(self, routing: str = "relay"):
        self.routing = routing

    def gemv(self, mesh, kind: str, m: int, n: int, x_vec, w_mat, name: str, tokens: int | None = None):
        """y = x @ W, or with ``tokens`` the GEMM of a ``tokens x m`` x (the prefill's)."""
        plan = baselines.Plan(mesh.rows, mesh.cols, m, n)
        h = -(-m // plan.used)
        tiles = None if x_vec is None else baselines.ladder_stored(plan, x_vec, w_mat)
        stored = host.scatter_tiles(mesh, f"{name}.stored", tiles, ((tokens or 1) * h + h * plan.n_pad,), np.float32,
                                    charge=False)
        y = baselines.ladder(mesh, plan, stored, name, routing=self.routing, tokens=tokens or 0)
        result = None if mesh.dry_run else plan.read_columns(host.gather_tiles(mesh, y), plan.row_major())
        stored.free()
        y.free()
        return result

    def weight_elements(self, mesh, kind: str, m: int, n: int, tokens: int | None = None) -> np.ndarray:
        """W's elements resident on each core of this rank's block: h rows of n_pad on each of
        the first ceil(m / h) cores in row-major order (the unified layout), none elsewhere."""
        plan = baselines.Plan(mesh.rows, mesh.cols, m, n)
        h, _ = plan.ladder_holders()
        ids = mesh.global_rows()[:, None] * mesh.cols + mesh.global_cols()[None, :]
        return np.where(ids < -(-m // h), h * plan.n_pad, 0)
