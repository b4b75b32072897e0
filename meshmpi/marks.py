"""Readings of the mesh's critical path and counted events at several points of a run, reduced
over the ranks together at the end: one collective for all of them, where reading each point
(:meth:`meshmpi.mesh.Mesh.modeled_cycles`, :func:`meshmpi.energy.mesh_events`) is one or two
collectives, every rank waiting for the slowest at each."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .energy import EVENTS


class Marks:
    """``mark()`` records this rank's latest clock and its counted events now and returns the
    mark's number; ``reduce()`` (collective) returns, per mark, the mesh's latest clock (the
    critical path, as ``modeled_cycles``) and its events summed over the ranks (as
    ``mesh_events``)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.clocks, self.events = [], []

    def mark(self) -> int:
        mesh = self.mesh
        self.clocks.append(float(mesh.clock.max()) if mesh.clock.size else 0.0)
        self.events.append([mesh.totals[name] for name in EVENTS])
        return len(self.clocks) - 1

    def reduce(self) -> tuple[list[float], list[dict]]:
        cart = self.mesh.cart
        clocks = np.empty(len(self.clocks))
        cart.Allreduce(np.array(self.clocks, np.float64), clocks, op=MPI.MAX)
        events = np.empty((len(self.events), len(EVENTS)), np.int64)
        cart.Allreduce(np.array(self.events, np.int64).reshape(events.shape), events, op=MPI.SUM)
        return clocks.tolist(), [dict(zip(EVENTS, (int(v) for v in row))) for row in events]
