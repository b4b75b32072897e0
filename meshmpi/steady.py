"""Advance a dry run over the repeats of one unit of work (a decoder layer) once they are steady.

A unit that runs the same program every time is a max-plus map of the mesh's time state:
every core's clock and every link's free time come out of ``max`` and ``+`` of the values
the unit found and of fixed costs (the payloads' sizes, the cores' work), and nothing in a
dry run depends on anything else. So if one repeat leaves the whole time state shifted by
one number ``c`` from where the repeat before left it, S' = S + c, every later repeat
shifts it by ``c`` again, since F(S + c) = F(S) + c, and adds the same counts (messages,
bytes, FLOPs, busy cycles: they do not depend on time at all).

From then on a repeat is advanced, not run: the events it recorded (phases, steps, memory
charges and releases) are replayed under its own names, later by ``c`` per repeat, on the
mesh's own timeline and memory ledger (a core that would run out of memory does so, as in
a run); then the clocks and link free times move by ``c`` and the counters add what the
last repeat run added. The steady state is checked, never assumed: the shift (one number for
the whole mesh) must hold on every core and link, the counts and the recorded events must
equal those of the repeat before, and no repeat may have warned. Equal means up to float64
rounding (:data:`ROUNDING`): repeats that are the same in exact arithmetic differ in the
last bits of their clocks, and an advanced run's cycles differ from those of a run of every
repeat in the same way (by 1.4e-13 of them on llama3-8b's 32 layers); every count is equal,
and no number depends on the split over ranks.

Anything that moves the clocks between repeats (a pipeline's hand-off to the next region)
ends the steady state and starts a segment of repeats. The segment that last ran is kept:
the time state it started from, each repeat it ran (its events, the time state it left, its
counts) and its steady repeat. A segment that starts from that time state shifted by one
number (a hand-off leaves every clock equal and every link idle, as the first region found
them) replays the kept one, shifted by that number, for the same reason; any other segment
runs until it is steady. A numeric run runs every repeat: its payloads must be computed.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .timeline import SNAPSHOT_TOTALS


class SteadyState:
    """Runs the repeats of a unit of work (``run(prefix, unit)``) on ``mesh``, advancing them
    once steady (see the module docstring). ``enabled`` False, or a numeric mesh, runs
    every repeat. ``advanced`` counts the repeats advanced without running."""

    def __init__(self, mesh, enabled: bool = True):
        self.mesh = mesh
        self.enabled = bool(enabled) and mesh.dry_run
        self.advanced = 0
        self._last = None      # the last repeat run: (prefix, structure, counts)
        self._steady = None    # what an advance replays: (prefix, events, shift, counts)
        self._end = None       # the time state the last repeat left (clocks, links)
        self._offset = None    # per advance: cycles and totals added to the recorded snapshots
        # The repeats since the clocks last moved between two of them make a segment. The last
        # segment that ran is kept: the time state and totals it started from, each repeat it
        # ran and its steady repeat. A segment that starts where it did, shifted, replays it.
        self._kept = None
        self._recording = False
        self._replay, self._replay_offset, self._replay_steady = [], None, None

    def run(self, prefix: str, unit):
        """Run ``unit()`` (a repeat whose buffers and phases are named ``prefix`` or
        ``prefix.…``) and return its result, or advance over it and return None."""
        if not self.enabled:
            return unit()
        if self._end is None or not self._where_left():
            self._new_segment()
        if self._replay:
            self._replay_next(prefix)
            return None
        if self._steady is not None:
            self._advance(prefix)
            return None
        mesh = self.mesh
        before = self._state()
        warned = self._warnings()
        events: list = []
        mesh.timeline.tape = mesh.memory.tape = events
        try:
            result = unit()
        finally:
            mesh.timeline.tape = mesh.memory.tape = None
        after = self._state()
        # one shift and one rounding scale for the whole mesh, whatever its split over ranks
        shift, scale, busy_scale = _agreed_max(mesh, (after["clock"] - before["clock"]).max(initial=-np.inf),
                                               np.abs(after["clock"]).max(initial=1.0),
                                               np.abs(after["busy"]).max(initial=1.0))
        counts = _counts_added(before, after)
        structure = [(kind, _renamed(what, prefix, "")) for kind, what, _, _ in events]
        last = self._last
        quiet = mesh.cart.allreduce(warned == self._warnings(), op=MPI.LAND)    # a warning may be one rank's
        steady = (quiet and last is not None and last[1] == structure
                  and _shifted_by(before, after, shift, ROUNDING * scale)
                  and _same_counts(last[2], counts, ROUNDING * busy_scale))
        if self._recording:
            if quiet:
                self._kept["runs"].append((prefix, events, (after["clock"], after["links"]), counts, structure))
            else:        # a repeat that warned is not replayed
                self._recording = False
                self._kept["runs"].clear()
        if mesh.cart.allreduce(steady, op=MPI.LAND):
            self._steady = (prefix, events, shift, counts)
            self._offset = (0.0, 0, 0, 0)
            if self._recording:
                self._kept["steady"] = self._steady
        self._last = (prefix, structure, counts)
        self._end = (after["clock"].copy(), [f.copy() for f in after["links"]])
        return result

    # ------------------------------------------------------------------ the time state
    def _state(self) -> dict:
        mesh = self.mesh
        return dict(clock=mesh.clock.copy(), busy=mesh.busy.copy(), links=[f.copy() for f in self._links()],
                    counters={name: c.copy() for name, c in mesh.counters.items()}, totals=dict(mesh.totals))

    def _links(self) -> list:
        """The mesh's link free time arrays, in a fixed order."""
        return [f for axis in ("x", "y") for f in self.mesh.fabric.link_free(axis).values()]

    def _where_left(self) -> bool:
        """Whether every clock and link free time is where the last repeat left it (agreed)."""
        mesh = self.mesh
        clock, links = self._end
        here = np.array_equal(mesh.clock, clock) and all(
            np.array_equal(now, then) for now, then in zip(self._links(), links))
        return bool(mesh.cart.allreduce(here, op=MPI.LAND))

    def _warnings(self) -> int:
        return len(self.mesh.memory.warnings) + len(self.mesh.routes.warnings)

    # ------------------------------------------------------------------ segments
    def _new_segment(self) -> None:
        """The clocks moved between repeats (or none ran yet): the steady state ends. If the
        time state is the kept segment's start shifted by one number (agreed over the mesh),
        this segment replays the kept one's repeats, then advances as it did; else it runs and
        is kept."""
        mesh = self.mesh
        self._last = self._steady = None
        now = dict(clock=mesh.clock.copy(), links=[f.copy() for f in self._links()])
        kept = self._kept
        if kept is not None and kept["runs"]:
            shift, scale = _agreed_max(mesh, (now["clock"] - kept["clock"]).max(initial=-np.inf),
                                       np.abs(now["clock"]).max(initial=1.0))
            if mesh.cart.allreduce(_shifted_by(kept, now, shift, ROUNDING * scale), op=MPI.LAND):
                self._replay = list(kept["runs"])
                self._replay_offset = (shift, *(mesh.totals[name] - kept["totals"][name] for name in SNAPSHOT_TOTALS))
                self._replay_steady = kept["steady"]
                self._recording = False
                return
        self._replay = []
        self._kept = dict(now, totals=dict(mesh.totals), runs=[], steady=None)
        self._recording = True

    def _replay_next(self, prefix: str) -> None:
        """The next repeat of the kept segment, replayed shifted: its events, the time state it
        left, its counts."""
        mesh = self.mesh
        recorded, events, (clock, links), counts, structure = self._replay.pop(0)
        offset = self._replay_offset
        self._play(events, recorded, prefix, offset)
        _move((mesh.clock, self._links()), offset[0], start=(clock, links))
        self._add_counts(counts)
        self._end = (mesh.clock.copy(), [f.copy() for f in self._links()])
        self._last = (prefix, structure, counts)
        self.advanced += 1
        if not self._replay and self._replay_steady is not None:
            self._steady, self._offset = self._replay_steady, offset

    # ------------------------------------------------------------------ advancing
    def _advance(self, prefix: str) -> None:
        """One repeat, advanced: the steady repeat's events replayed under ``prefix`` and
        ``c`` later than the last, then the time state shifted and the counts added."""
        mesh = self.mesh
        recorded, events, shift, counts = self._steady
        cycles, *moved = self._offset
        added = [counts[2][name] for name in SNAPSHOT_TOTALS]
        self._offset = offset = (cycles + shift, *(c + a for c, a in zip(moved, added)))
        self._play(events, recorded, prefix, offset)
        _move((mesh.clock, self._links()), shift)
        _move(self._end, shift)
        self._add_counts(counts)
        self.advanced += 1

    def _play(self, events: list, recorded: str, prefix: str, offset: tuple) -> None:
        """Recorded ``events`` again, named ``prefix`` for ``recorded``, their snapshots'
        clock and totals moved by ``offset``, on the mesh's own timeline and memory ledger."""
        timeline, memory = self.mesh.timeline, self.mesh.memory

        def moved(snapshot):
            return tuple(value + by for value, by in zip(snapshot, offset))

        for kind, what, snapshot, extra in events:
            if kind == "charge":
                memory.charge(_renamed(what, recorded, prefix)[0], extra)
            elif kind == "release":
                memory.release(_renamed(what, recorded, prefix)[0])
            elif kind == "begin":
                name, label = _renamed(what, recorded, prefix)
                timeline.begin_at(name, label, moved(snapshot))
            elif kind == "end":
                timeline.end_at(moved(snapshot))
            elif kind == "step":
                timeline.step_at(what[0], moved(snapshot))
            elif kind == "steps":
                added_steps, hops, clocks = extra
                timeline.record_steps_at(what[0], added_steps, hops,
                                         None if clocks is None else clocks + offset[0], moved(snapshot))
            elif kind == "hops":
                timeline.note_transfer(what[0])

    def _add_counts(self, counts: tuple) -> None:
        mesh = self.mesh
        busy, counters, totals = counts
        mesh.busy += busy
        for name, c in mesh.counters.items():
            c += counters[name]
        for name, value in totals.items():
            mesh.totals[name] += value


def _agreed_max(mesh, *values) -> tuple:
    """Each of ``values`` at its largest over the ranks."""
    maxima = np.array(values, np.float64)
    mesh.cart.Allreduce(MPI.IN_PLACE, maxima, op=MPI.MAX)
    return tuple(float(v) for v in maxima)


def _move(time_state: tuple, by: float, start: tuple | None = None) -> None:
    """The time state (clocks, link free times) ``time_state`` becomes ``start`` (default:
    itself) plus ``by``, in place."""
    clock, links = time_state
    then_clock, then_links = start if start is not None else time_state
    np.add(then_clock, by, out=clock)
    for live, then in zip(links, then_links):
        np.add(then, by, out=live)


def _renamed(what: tuple, old: str, new: str) -> tuple:
    """An event's name (its first field) with the prefix ``old`` made ``new``."""
    if not what or not isinstance(what[0], str):
        return what
    name = what[0]
    if name == old or name.startswith(old + "."):
        name = new + name[len(old):]
    return (name,) + what[1:]


# Float64 rounding: a repeat's clocks and counts come out of thousands of additions, so two
# repeats that are the same in exact arithmetic differ by a few units in the last place of the
# largest clock (2**-52 of it). Differences within 2**-40 of it (4096 such units) are taken as
# rounding; a repeat that is not steady differs by a fraction of a cycle or more.
ROUNDING = 2.0 ** -40


def _shifted_by(before: dict, after: dict, shift: float, tolerance: float) -> bool:
    """Whether ``before + shift`` is ``after`` within ``tolerance`` for every clock and link
    free time (an unused link stays at minus infinity)."""
    for then, now in zip([before["clock"], *before["links"]], [after["clock"], *after["links"]]):
        moved = then + shift
        finite = np.isfinite(now)
        if not np.array_equal(finite, np.isfinite(moved)) or not np.array_equal(moved[~finite], now[~finite]):
            return False
        if finite.any() and float(np.abs(moved[finite] - now[finite]).max()) > tolerance:
            return False
    return True


def _counts_added(before: dict, after: dict) -> tuple:
    """What a repeat added to the busy cycles, counters and totals."""
    busy = after["busy"] - before["busy"]
    counters = {name: after["counters"][name] - c for name, c in before["counters"].items()}
    totals = {name: after["totals"][name] - v for name, v in before["totals"].items()}
    return busy, counters, totals


def _same_counts(a, b, tolerance: float) -> bool:
    """Two repeats' counts the same (busy cycles within ``tolerance``)."""
    return (float(np.abs(a[0] - b[0]).max(initial=0.0)) <= tolerance and a[2] == b[2]
            and all(np.array_equal(a[1][name], b[1][name]) for name in a[1]))
