"""Phases and steps of a run: modeled start/end cycles, wall time and traffic.

Each rank records its own block's values locally (no messages inside a kernel); ``collect``
reduces them once at the end (max of clocks and wall times, sum of traffic), so the recorded
numbers are those of the whole mesh whatever the rank split.
"""
from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

PHASE_FIELDS = ("start_cycles", "end_cycles", "wall_seconds", "messages", "bytes", "flops", "max_hops",
                "resident_bytes", "peak_bytes")
_INTEGER_FIELDS = ("messages", "bytes", "flops", "max_hops", "resident_bytes", "peak_bytes")
STEP_FIELDS = ("end_cycles", "messages", "bytes", "flops", "max_hops")
SNAPSHOT_TOTALS = ("messages_sent", "bytes_sent", "flops")    # the totals a snapshot holds after its clock


class Timeline:
    def __init__(self, mesh):
        self.mesh = mesh
        self.phases: list[dict] = []
        self.steps: list[dict] = []
        self._open: list[int] = []
        self._step_count: dict[int, int] = {}
        self._outer_marks: list[tuple] = []  # the enclosing phase's step mark, per open phase
        self._step_mark = None
        self._hops_since_step = 0
        self._next_label = ""
        # The events of a stretch being recorded (kind, what they did, the clock and totals
        # they were taken at, their own clocks) for :mod:`meshmpi.steady`; None: not recording.
        self.tape: list | None = None

    def label_next(self, label: str) -> None:
        """Give the next phase begun this label (e.g. ``position 7``): what tells repeats of one
        phase name apart, kept out of the name so that names stay the same from run to run."""
        self._next_label = label

    def _snapshot(self) -> tuple:
        """The block's latest clock, then its :data:`SNAPSHOT_TOTALS`."""
        totals = self.mesh.totals
        clock = float(self.mesh.clock.max()) if self.mesh.clock.size else 0.0
        return (clock, *(totals[name] for name in SNAPSHOT_TOTALS))

    def begin(self, name: str) -> None:
        label, self._next_label = self._next_label, ""
        self.begin_at(name, label, self._snapshot())

    def begin_at(self, name: str, label: str, snapshot: tuple) -> None:
        """:meth:`begin` at the clock and totals ``snapshot`` (:meth:`_snapshot`)."""
        if self.tape is not None:
            self.tape.append(("begin", (name, label), snapshot, None))
        clock, messages, nbytes, flops = snapshot
        parent = self._open[-1] if self._open else -1
        self.phases.append(dict(name=name, label=label, parent=parent, depth=len(self._open), start_cycles=clock,
                                wall_start=time.perf_counter(), start_counts=(messages, nbytes, flops),
                                max_hops=0))
        self._open.append(len(self.phases) - 1)
        self._outer_marks.append((self._step_mark, self._hops_since_step, self.mesh.memory.high_water))
        self.mesh.memory.high_water = self.mesh.memory.most_resident()
        self._step_mark = (clock, messages, nbytes, flops)
        self._hops_since_step = 0

    def end(self) -> None:
        self.end_at(self._snapshot())

    def end_at(self, snapshot: tuple) -> None:
        if self.tape is not None:
            self.tape.append(("end", (), snapshot, None))
        index = self._open.pop()
        phase = self.phases[index]
        clock, messages, nbytes, flops = snapshot
        m0, b0, f0 = phase.pop("start_counts")
        memory = self.mesh.memory
        phase.update(end_cycles=clock, wall_seconds=time.perf_counter() - phase.pop("wall_start"),
                     messages=messages - m0, bytes=nbytes - b0, flops=flops - f0,
                     resident_bytes=memory.most_resident(), peak_bytes=memory.high_water)
        # The enclosing phase's current step goes on from its own mark, the inner phase included.
        self._step_mark, hops, outer_high = self._outer_marks.pop()
        memory.high_water = max(outer_high, memory.high_water)
        self._hops_since_step = max(hops, phase["max_hops"])
        if self._open:
            outer = self.phases[self._open[-1]]
            outer["max_hops"] = max(outer["max_hops"], phase["max_hops"])

    def note_transfer(self, hops: int) -> None:
        if self.tape is not None:
            self.tape.append(("hops", (hops,), None, None))
        if self._open:
            phase = self.phases[self._open[-1]]
            phase["max_hops"] = max(phase["max_hops"], hops)
        self._hops_since_step = max(self._hops_since_step, hops)

    def step(self, label: str = "") -> None:
        """Close one step of the innermost open phase."""
        if self._open:
            self.step_at(label, self._snapshot())

    def step_at(self, label: str, snapshot: tuple) -> None:
        if self.tape is not None:
            self.tape.append(("step", (label,), snapshot, None))
        self._close_step(label, *snapshot)

    def record_steps(self, labels, added: np.ndarray, hops: np.ndarray, clocks: np.ndarray | None = None) -> None:
        """Close one step of the innermost open phase per label, for a stretch timed on a
        schedule of its own (a streamed chain's stages, in which no clock moves; a rotation's
        rounds, timed in one compiled pass), before the caller adds the stretch to the mesh's totals: step i
        adds ``added[i]`` = (messages, bytes, FLOPs), its longest transfer crosses ``hops[i]``
        links and it ends at this block's latest clock ``clocks[i]`` (None: the clocks as
        they are). The rows of a :meth:`note_transfer` and a :meth:`step` per stage."""
        if self._open:
            self.record_steps_at(labels, added, hops, clocks, self._snapshot())

    def record_steps_at(self, labels, added: np.ndarray, hops: np.ndarray, clocks, snapshot: tuple) -> None:
        if self.tape is not None:
            self.tape.append(("steps", (tuple(labels), added.tobytes(), hops.tobytes()), snapshot,
                              (added.copy(), hops.copy(), None if clocks is None else np.array(clocks))))
        phase = self.phases[self._open[-1]]
        phase["max_hops"] = max(phase["max_hops"], int(hops.max(initial=0)))
        clock, *counts = snapshot
        ends = [clock] * len(labels) if clocks is None else clocks.tolist()
        for label, step_added, longest, end in zip(labels, added.tolist(), hops.tolist(), ends):
            counts = [c + a for c, a in zip(counts, step_added)]
            self._hops_since_step = max(self._hops_since_step, longest)
            self._close_step(label, end, *counts)

    def _close_step(self, label: str, clock: float, messages: int, nbytes: int, flops: int) -> None:
        _, m0, b0, f0 = self._step_mark
        phase = self._open[-1]
        index = self._step_count.get(phase, 0)
        self._step_count[phase] = index + 1
        self.steps.append(dict(phase=phase, step=index, label=label, end_cycles=clock,
                               messages=messages - m0, bytes=nbytes - b0, flops=flops - f0,
                               max_hops=self._hops_since_step))
        self._step_mark = (clock, messages, nbytes, flops)
        self._hops_since_step = 0

    def collect(self) -> tuple[list[dict], list[dict]]:
        """Whole-mesh phases and steps, identical on every rank."""
        cart = self.mesh.cart
        counts = cart.allreduce((len(self.phases), len(self.steps)), op=MPI.MAX)
        if counts != (len(self.phases), len(self.steps)) or self._open:
            raise RuntimeError("ranks recorded different phases; a phase was left open")
        phases = [dict(p) for p in self.phases]
        steps = [dict(s) for s in self.steps]
        for rows, fields in ((phases, PHASE_FIELDS), (steps, STEP_FIELDS)):
            if not rows:
                continue
            table = np.array([[row[f] for f in fields] for row in rows], np.float64)
            maxed = np.empty_like(table)
            summed = np.empty_like(table)
            cart.Allreduce(table, maxed, op=MPI.MAX)
            cart.Allreduce(table, summed, op=MPI.SUM)
            for i, row in enumerate(rows):
                for j, f in enumerate(fields):
                    value = summed[i, j] if f in ("messages", "bytes", "flops") else maxed[i, j]
                    row[f] = int(value) if f in _INTEGER_FIELDS else float(value)
        return phases, steps
