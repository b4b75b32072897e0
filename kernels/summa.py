"""SUMMA (a baseline of PAPER.md §2): panel owners broadcast along rows and columns.

K is split into ``L = lcm(R, C)`` panels in natural order. At step k the column owning A's
panel k broadcasts it along every row and the row owning B's panel k broadcasts it along
every column; every core accumulates ``A_panel @ B_panel``. Panels are double-buffered so
the next step's broadcasts overlap this step's multiply, as a careful implementation would.

Two ways to broadcast (``broadcast=``):

- ``"direct"``: a multicast on a pass-through route per root. Each root needs its own route
  on every router of its line: R + C routes per core, more than a wafer router has at scale
  (a :class:`meshmpi.RoutingError` in strict mode).
- ``"relay"``: what SUMMA must do when it cannot have N routes: the panel is forwarded hop by
  hop in software (a chain; every core on the way pays beta), O(1) routes shared by all roots,
  and a critical path of O((alpha + beta) N) per step.
"""
from __future__ import annotations

import numpy as np

from meshmpi.layout import expect

from .gemm import GemmPlan, _pick_chunk


BROADCASTS = ("relay", "direct")


def summa(mesh, plan: GemmPlan, a, b, name: str = "summa", broadcast: str = "relay"):
    """C = A @ B with A and B in their natural layouts (:meth:`GemmPlan.a_layout`,
    :meth:`GemmPlan.b_natural_layout`); returns C (natural layout)."""
    if broadcast not in BROADCASTS:
        raise ValueError(f"broadcast must be one of {BROADCASTS}, not {broadcast!r}")
    relay = broadcast == "relay"
    R, C, L = plan.rows, plan.cols, plan.chunks
    tm, tn, s = plan.m_pad // R, plan.n_pad // C, plan.chunk
    per_col, per_row = L // C, L // R
    dtype = a.dtype
    expect(a, plan.a_layout(), f"{name} A")
    expect(b, plan.b_natural_layout(), f"{name} B")
    c = mesh.alloc(f"{name}.c", (tm, tn), dtype)
    c.layout = plan.c_layout()
    panels = [(mesh.alloc(f"{name}.a.panel{i}", (tm, s), dtype),
               mesh.alloc(f"{name}.b.panel{i}", (s, tn), dtype)) for i in range(2)]
    send_a = a if per_col == 1 else mesh.alloc(f"{name}.a.send", (tm, s), dtype)
    send_b = b if per_row == 1 else mesh.alloc(f"{name}.b.send", (s, tn), dtype)
    cols, rows = mesh.global_cols(), mesh.global_rows()

    def start(k, into):
        root_col, root_row = k // per_col, k // per_row
        if not mesh.dry_run:
            if send_a is not a:
                send_a.data[...] = _pick_chunk(a.data, np.full(mesh.block_shape, k % per_col), 3, per_col)
            if send_b is not b:
                send_b.data[...] = _pick_chunk(b.data, np.full(mesh.block_shape, k % per_row), 2, per_row)
            # the roots keep their own panel
            into[0].data[:, cols == root_col] = send_a.data[:, cols == root_col]
            into[1].data[rows == root_row] = send_b.data[rows == root_row]
        # a relay chain's 1-hop routes serve every root; a direct multicast's route serves one
        pa = mesh.fabric.multicast(f"{name}.a.root{root_col}", "x", root_col, relay=relay,
                                   group=f"{name}.a.chain" if relay else None)
        pb = mesh.fabric.multicast(f"{name}.b.root{root_row}", "y", root_row, relay=relay,
                                   group=f"{name}.b.chain" if relay else None)
        return [t for t in (pa.start(send_a, into[0]) if C > 1 else None,
                            pb.start(send_b, into[1]) if R > 1 else None) if t is not None]

    with mesh.phase(f"{name}.broadcast_multiply"):
        pending = start(0, panels[0])
        for k in range(L):
            for transfer in pending:
                transfer.wait()
            current = panels[k % 2]
            pending = start(k + 1, panels[(k + 1) % 2]) if k + 1 < L else []
            if not mesh.dry_run:
                c.data += np.matmul(current[0].data, current[1].data)
            mesh.compute(2 * tm * s * tn, ops=s)
            mesh.step(f"step {k}")
    for pa, pb in panels:
        pa.free()
        pb.free()
    for extra, base in ((send_a, a), (send_b, b)):
        if extra is not base:
            extra.free()
    return c
