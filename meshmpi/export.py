"""``python -m meshmpi trace export``: a trace as Chrome / Perfetto trace-event JSON.

One track per core of a rectangle of the mesh (one process per mesh row, so a viewer groups
the tracks row by row). Each track holds nested complete ("X") slices: a ``run`` slice whose
arguments are that core's counters, the phases under it (nested as recorded) and each
phase's steps under the phase. The trace records phases and steps for the whole mesh (the
latest clock of any core), so every track shows the same slice times; what differs per core
is in the ``run`` slice's arguments.

Messages are drawn as flow arrows ("s"/"f" events), but the trace has no per-message
table: the arrows are a *reconstruction*. For every step that moved bytes, one arrow goes
from a core to each adjacent core of the rectangle when, over the whole run, the first sent
bytes and the second received bytes. Read an arrow as "this link may have carried data in
this step", not as a recorded message.

Times are modeled cycles converted to microseconds at the profile's clock (``--clock
modeled``), or wall seconds (``--clock wall``). The trace keeps each phase's wall duration but
not its wall start, so with ``--clock wall`` phases are laid end to end in recorded order
(children from their parent's start) and a leaf phase's steps are placed in proportion to
their modeled cycles; steps of phases that also have child phases are left out.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .errors import UsageError
from .outputs import write_atomic

DEFAULT_FILTER = 8  # cores per side shown when --cores is not given
MAX_FLOWS = 20_000  # arrows beyond this are dropped (and the output says so)
COUNTERS_IN_ARGS = ("busy_cycles", "clock_cycles", "flops", "bytes_sent", "bytes_recv",
                    "messages_sent", "hops", "relays", "peak_bytes", "routes_peak")


# ---------------------------------------------------------------------- phase structure
def phase_paths(phases: list[dict]) -> list[str]:
    """Each phase's dotted path from the root, whether names are full paths or relative.

    A child named with its parent's full path keeps its name (``decode.layer3.attention``
    under ``decode.layer3``); otherwise the parent's path is put in front, without the
    components the two names share: ``layer0.qkv.local`` under ``decode.pos3`` >
    ``layer0`` is ``decode.pos3.layer0.qkv.local``, ``prefill.layer3.h2.softmax`` under
    ``prefill.layer3.attention`` is ``prefill.layer3.attention.h2.softmax``.
    """
    paths = []
    for p in phases:
        child = p["name"].split(".")
        if p["parent"] < 0:
            paths.append(p["name"])
            continue
        parent = paths[p["parent"]].split(".")
        if child[:len(parent)] == parent:
            paths.append(p["name"])
            continue
        overlap = next((k for k in range(min(len(parent), len(child)), 0, -1)
                        if parent[-k:] == child[:k]), 0)
        if not overlap:
            overlap = next((j for j in range(min(len(parent), len(child)), 0, -1)
                            if parent[:j] == child[:j]), 0)
        paths.append(".".join(parent + child[overlap:]))
    return paths


def children_of(phases: list[dict]) -> list[list[int]]:
    kids = [[] for _ in phases]
    for i, p in enumerate(phases):
        if p["parent"] >= 0:
            kids[p["parent"]].append(i)
    return kids


def step_spans(trace: dict) -> list[tuple[float, float]]:
    """``(start, end)`` modeled cycles of every step (in table order).

    A step ends at its recorded ``end_cycles`` and starts where the previous step of the same
    phase ended, or where the phase started. Child phases that ran in between lie inside the
    step (its counters include them), so steps and phases nest.
    """
    phases = trace["phases"]
    last_end = {}
    spans = []
    for s in trace["steps"]:
        end = s["end_cycles"]
        start = min(last_end.get(s["phase"], phases[s["phase"]]["start_cycles"]), end)
        spans.append((start, end))
        last_end[s["phase"]] = end
    return spans


# ---------------------------------------------------------------------- core filter
def parse_cores(text: str | None, rows: int, cols: int) -> tuple[int, int, int, int]:
    """``R0:R1,C0:C1`` (half-open, like Python slices; an empty bound means the mesh edge)
    -> ``(r0, r1, c0, c1)``. Default: the whole mesh, or its first 8x8 cores if larger."""
    if text is None:
        return 0, min(rows, DEFAULT_FILTER), 0, min(cols, DEFAULT_FILTER)
    usage = f"--cores expects R0:R1,C0:C1 (half-open core ranges, e.g. 0:8,0:8), got {text!r}"
    parts = text.replace(" ", "").split(",")
    if len(parts) != 2:
        raise UsageError(usage)
    bounds = []
    for part, length, what in ((parts[0], rows, "rows"), (parts[1], cols, "cols")):
        lo_hi = part.split(":")
        if len(lo_hi) != 2:
            raise UsageError(usage)
        try:
            lo = int(lo_hi[0]) if lo_hi[0] else 0
            hi = int(lo_hi[1]) if lo_hi[1] else length
        except ValueError:
            raise UsageError(usage) from None
        if not 0 <= lo < hi <= length:
            raise UsageError(f"--cores {text}: {what} {lo}:{hi} is empty or outside the "
                             f"{rows}x{cols} mesh (0:{length})")
        bounds += [lo, hi]
    return tuple(bounds)


# ---------------------------------------------------------------------- time bases
class _Clock:
    """Maps modeled cycles (and, for wall time, phases) to microseconds."""

    def __init__(self, trace: dict, mode: str):
        self.mode = mode
        self.clock_hz = float(trace["meta"]["hardware"]["clock_hz"]["value"])
        phases = trace["phases"]
        self.kids = children_of(phases)
        if mode == "wall":
            self.wall = self._lay_out_wall(phases)

    def us(self, cycles: float) -> float:
        return round(cycles / self.clock_hz * 1e6, 6)

    def _lay_out_wall(self, phases) -> list[tuple[float, float]]:
        spans = [None] * len(phases)
        cursor = {-1: 0.0}
        for i, p in enumerate(phases):  # parents come before their children
            parent = p["parent"]
            start = cursor[parent]
            end = start + max(p["wall_seconds"], 0.0)
            if parent >= 0:  # children laid end to end never run past their parent
                start, end = min(start, spans[parent][1]), min(end, spans[parent][1])
            spans[i] = (start, end)
            cursor[parent] = end
            cursor[i] = start
        return [(round(a * 1e6, 6), round(b * 1e6, 6)) for a, b in spans]

    def phase(self, index: int, p: dict) -> tuple[float, float]:
        if self.mode == "wall":
            return self.wall[index]
        return self.us(p["start_cycles"]), self.us(p["end_cycles"])

    def step(self, p_index: int, p: dict, start: float, end: float):
        """The step's span in microseconds, or None when it cannot be placed."""
        if self.mode == "modeled":
            return self.us(start), self.us(end)
        if self.kids[p_index]:
            return None
        w0, w1 = self.wall[p_index]
        c0, length = p["start_cycles"], p["end_cycles"] - p["start_cycles"]
        if length <= 0:
            return w0, w0
        place = lambda c: round(w0 + (c - c0) / length * (w1 - w0), 6)  # noqa: E731
        return place(start), place(end)


# ---------------------------------------------------------------------- the export
def chrome_trace(trace: dict, cores: tuple[int, int, int, int], clock: str = "modeled",
                 source: str = "") -> dict:
    """The trace-event JSON object (``{"traceEvents": [...], ...}``) for the cores
    ``rows r0:r1, cols c0:c1``."""
    meta, counters, phases, steps = trace["meta"], trace["counters"], trace["phases"], trace["steps"]
    r0, r1, c0, c1 = cores
    cols = int(meta["mesh_cols"])
    time = _Clock(trace, clock)
    paths = phase_paths(phases)
    spans = step_spans(trace)

    # One template slice list (times and names), stamped on every track.
    template = []
    for i, p in enumerate(phases):
        ts, end = time.phase(i, p)
        template.append(dict(name=p["name"], cat="phase", ts=ts, dur=round(end - ts, 6), args={
            "path": paths[i], "depth": p["depth"], "modeled_cycles": p["end_cycles"] - p["start_cycles"],
            "wall_seconds": p["wall_seconds"], "messages": p["messages"], "bytes": p["bytes"],
            "flops": p["flops"], "max_hops": p["max_hops"]}))
    step_slices = []
    for s, (start, end) in zip(steps, spans):
        placed = time.step(s["phase"], phases[s["phase"]], start, end)
        if placed is None:
            continue
        ts, stop = placed
        label = s["label"] or f"step {s['step']}"
        step_slices.append(dict(name=label, cat="step", ts=ts, dur=round(stop - ts, 6), args={
            "phase": paths[s["phase"]], "step": s["step"], "modeled_cycles": end - start,
            "messages": s["messages"], "bytes": s["bytes"], "flops": s["flops"],
            "max_hops": s["max_hops"]}))
    template += step_slices
    if clock == "modeled":
        run_end = time.us(float(counters["clock_cycles"].max()))
    else:
        run_end = max((time.wall[i][1] for i, p in enumerate(phases) if p["parent"] < 0), default=0.0)
    run_end = round(max([run_end] + [e["ts"] + e["dur"] for e in template]), 6)

    events = []
    for r in range(r0, r1):
        events.append(dict(ph="M", name="process_name", pid=r, tid=0, args={"name": f"mesh row {r}"}))
        events.append(dict(ph="M", name="process_sort_index", pid=r, tid=0, args={"sort_index": r}))
    for r in range(r0, r1):
        for c in range(c0, c1):
            tid = r * cols + c
            events.append(dict(ph="M", name="thread_name", pid=r, tid=tid, args={"name": f"core ({r}, {c})"}))
            events.append(dict(ph="M", name="thread_sort_index", pid=r, tid=tid, args={"sort_index": c}))
            args = {name: _scalar(counters[name][r, c]) for name in COUNTERS_IN_ARGS if name in counters}
            events.append(dict(ph="X", name="run", cat="run", pid=r, tid=tid, ts=0.0, dur=run_end,
                               args={"core": [r, c], **args}))
            events.extend(dict(e, ph="X", pid=r, tid=tid) for e in template)

    flows, dropped = _flows(counters, cores, cols, step_slices)
    events += flows
    return {
        "traceEvents": events,
        "displayTimeUnit": "ns",
        "otherData": {
            "source": source, "kind": meta["kind"], "mesh": f"{meta['mesh_rows']}x{meta['mesh_cols']}",
            "hardware": meta["hardware_name"], "clock_hz": time.clock_hz, "clock": clock,
            "cores": f"{r0}:{r1},{c0}:{c1}", "slice_times": "whole-mesh phase and step times",
            "flows": "reconstructed: one arrow per step that moved bytes, between adjacent cores "
                     "of the rectangle where the sender sent and the receiver received bytes in "
                     "the run; the trace has no per-message table",
            "flows_dropped": dropped,
        },
    }


def _flows(counters, cores, cols, step_slices) -> tuple[list[dict], int]:
    r0, r1, c0, c1 = cores
    sent = counters["bytes_sent"][r0:r1, c0:c1] > 0
    recv = counters["bytes_recv"][r0:r1, c0:c1] > 0
    pairs = []
    for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        src_r, src_c = np.nonzero(sent)
        dst_r, dst_c = src_r + dr, src_c + dc
        ok = (dst_r >= 0) & (dst_r < r1 - r0) & (dst_c >= 0) & (dst_c < c1 - c0)
        src_r, src_c, dst_r, dst_c = src_r[ok], src_c[ok], dst_r[ok], dst_c[ok]
        ok = recv[dst_r, dst_c]
        pairs += zip((src_r[ok] + r0).tolist(), (src_c[ok] + c0).tolist(),
                     (dst_r[ok] + r0).tolist(), (dst_c[ok] + c0).tolist())
    events, flow_id, dropped = [], 0, 0
    for step in step_slices:
        if step["args"]["bytes"] <= 0:
            continue
        for sr, sc, dr, dc in pairs:
            if flow_id >= MAX_FLOWS:
                dropped += 1
                continue
            flow_id += 1
            common = dict(name="message", cat="flow", id=flow_id)
            events.append(dict(common, ph="s", pid=sr, tid=sr * cols + sc, ts=step["ts"]))
            events.append(dict(common, ph="f", bp="e", pid=dr, tid=dr * cols + dc,
                               ts=round(step["ts"] + step["dur"] / 2, 6)))
    return events, dropped


def _scalar(value):
    value = np.asarray(value).item()
    return int(value) if float(value).is_integer() else float(value)


def write_json(doc: dict, path: Path) -> None:
    """Write atomically (temporary file beside the target, then rename)."""
    def write(tmp):
        with open(tmp, "w") as out:
            json.dump(doc, out, separators=(",", ":"))

    write_atomic(path, write)


# ---------------------------------------------------------------------- command line
def run(args) -> int:
    from . import cli
    from .trace import read_trace

    trace = read_trace(args.file)
    rows, cols = int(trace["meta"]["mesh_rows"]), int(trace["meta"]["mesh_cols"])
    cores = parse_cores(args.cores, rows, cols)
    if args.cores is None and (rows > DEFAULT_FILTER or cols > DEFAULT_FILTER):
        print(f"note: exporting the first {cores[1]}x{cores[3]} cores of the {rows}x{cols} mesh; "
              "choose others with --cores R0:R1,C0:C1", file=sys.stderr)
    doc = chrome_trace(trace, cores, args.clock, source=str(args.file))
    out = Path(args.output)
    try:
        write_json(doc, out)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    n_cores = (cores[1] - cores[0]) * (cores[3] - cores[2])
    events = doc["traceEvents"]
    slices = sum(1 for e in events if e["ph"] == "X")
    arrows = sum(1 for e in events if e["ph"] == "s")
    note = f" ({doc['otherData']['flows_dropped']} more not written)" if doc["otherData"]["flows_dropped"] else ""
    if args.json:
        cli.print_json({"output": str(out), "cores": {"rows": cores[:2], "cols": cores[2:]}, "slices": slices,
                        "arrows": arrows, "flows_dropped": doc["otherData"]["flows_dropped"], "clock": args.clock})
        return 0
    cli.say(f"{out}: {n_cores} cores (rows {cores[0]}:{cores[1]}, cols {cores[2]}:{cores[3]}), "
            f"{slices} slices, {arrows} reconstructed message arrows{note}, {args.clock} clock")
    return 0


def register(trace_commands) -> None:
    """Add ``trace export`` to the ``trace`` subparsers."""
    import argparse

    from . import cli
    p = trace_commands.add_parser(
        "export", help="Chrome/Perfetto trace-event JSON (one track per core)",
        description=cli.help_text(__doc__.split("\n\n")[0]) + " Open it in https://ui.perfetto.dev or chrome://tracing.",
        epilog="examples:\n  python -m meshmpi trace export run.h5 --format chrome -o run.json\n"
               "  python -m meshmpi trace export big.h5 -o big.json --cores 0:4,100:108 --clock wall\n\n"
               "Message arrows are reconstructed from the per-core counters and the steps (the "
               "trace has no per-message table); see TRACE_SCHEMA.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="HDF5 trace")
    p.add_argument("--format", choices=("chrome",), default="chrome",
                   help="output format (chrome: trace-event JSON, also read by Perfetto)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.json", help="file to write")
    p.add_argument("--cores", metavar="R0:R1,C0:C1",
                   help=f"rectangle of cores, half-open (default: the whole mesh up to its first "
                        f"{DEFAULT_FILTER}x{DEFAULT_FILTER} cores)")
    p.add_argument("--clock", choices=("modeled", "wall"), default="modeled",
                   help="slice times: modeled cycles at the profile's clock, or wall seconds")
    p.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    p.set_defaults(func=run)
