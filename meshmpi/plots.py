"""``python -m meshmpi trace plot FILE -o DIR``: PNG charts of one trace (matplotlib, Agg).

- ``core_<counter>.png``: one heatmap over the mesh per per-core counter. Peak memory is
  coloured up to the profile's SRAM and routes up to the route limit (cores over a limit are
  red). Meshes wider than ``MAX_CELLS`` cores are shown as the maximum over small square
  blocks of cores (one image, no per-core drawing), so a 720x720 mesh renders in a second.
- ``phases.png``: modeled cycles of each phase, split into compute and communication.
  Nested phases are shown by their own (self) cycles — the time not inside a child phase —
  so bars add up to the run; repeated phases (one per token, per layer) are summed under one
  name with layer numbers replaced by ``*`` (``decode.layer*.attention``).
- ``layers.png`` (when phase names carry ``layer<N>``): the same split per layer, and the
  cycles of each layer by sub-phase.
- ``steps.png`` (when the trace has steps): the steps' cycles on the critical path (without
  the nested phases that ran inside them, which have steps of their own), grouped by phase and
  step label as ``trace summary`` groups phases (mean and total per group); with
  ``aggregate="none"`` each step and the running total.

Compute cycles are estimated as FLOPs / cores / the profile's FLOPs per cycle (work spread
evenly over the cores), capped at the phase's modeled cycles; the rest of the modeled cycles
is communication (transfers and waiting for them). Cycle axes carry a second axis in seconds
at the profile's clock.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from .errors import UsageError
from .export import children_of, phase_paths, step_spans
from .summary import AGGREGATES, phase_kind

MAX_CELLS = 400  # most cells drawn along a heatmap axis; larger meshes are max-pooled
MAX_BARS = 40  # most phase rows in phases.png; the rest are summed into "other"
COMPUTE, COMMUNICATION, LIMIT = "#3b75af", "#ef8636", "#d62728"
THOUSANDS = "{x:,.0f}"  # tick format of count axes
HEATMAPS = (  # counter, title, unit
    ("busy_cycles", "compute (busy) cycles per core", "cycles"),
    ("clock_cycles", "modeled clock per core at the end of the run", "cycles"),
    ("bytes_recv", "bytes in per core", "bytes"),
    ("bytes_sent", "bytes out per core", "bytes"),
    ("hops", "hops of the messages each core sent", "links"),
    ("relays", "software relays per core", "relays"),
    ("peak_bytes", "peak memory per core", "bytes"),
    ("routes_peak", "routes used per router", "routes"),
    ("energy_joules", "energy per core", "nJ"),
)
SCALES = {"energy_joules": 1e9}  # counter -> factor into the heatmap's unit (joules to nJ)


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("trace plot needs matplotlib: pip install 'meshmpi[plot]'") from None
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure
    return matplotlib, Figure


class _Profile:
    def __init__(self, meta: dict):
        hw = meta["hardware"]
        self.name = meta["hardware_name"]
        self.clock_hz = float(hw["clock_hz"]["value"])
        self.flops_per_cycle = float(hw["flops_per_cycle"]["value"])
        self.sram = int(hw["sram_bytes_per_core"]["value"])
        self.routes = int(hw["routes_per_core"]["value"])
        self.cores = int(meta["mesh_rows"]) * int(meta["mesh_cols"])

    def compute_cycles(self, flops, cycles):
        """FLOPs spread evenly over the cores, capped at the modeled cycles."""
        return np.minimum(np.asarray(flops, float) / self.cores / self.flops_per_cycle,
                          np.asarray(cycles, float))

    def seconds_axis(self, ax, which: str = "y") -> None:
        """A second axis in seconds (SI-prefixed) beside a cycles axis."""
        scale, unit = _time_unit(self._top(ax, which) / self.clock_hz)
        f = self.clock_hz * scale  # cycles per displayed time unit
        if which == "y":
            sec = ax.secondary_yaxis("right", functions=(lambda c: c / f, lambda s: s * f))
            sec.set_ylabel(f"{unit} at {self.clock_hz / 1e9:g} GHz")
        else:
            sec = ax.secondary_xaxis("top", functions=(lambda c: c / f, lambda s: s * f))
            sec.set_xlabel(f"{unit} at {self.clock_hz / 1e9:g} GHz")

    @staticmethod
    def _top(ax, which):
        lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
        return max(abs(lo), abs(hi), 1e-30)


def _time_unit(seconds: float) -> tuple[float, str]:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")):
        if seconds >= scale:
            return scale, unit
    return 1e-9, "ns"


def _title(meta: dict) -> str:
    dry = ", dry run" if meta["dry_run"] else ""
    return f"{meta['kind']} on {meta['mesh_rows']}x{meta['mesh_cols']} ({meta['hardware_name']}{dry})"


# ---------------------------------------------------------------------- heatmaps
def pool_max(values: np.ndarray, limit: int = MAX_CELLS) -> tuple[np.ndarray, int]:
    """Max over ``k x k`` blocks so no axis has more than ``limit`` cells; returns (image, k)."""
    k = max(1, -(-max(values.shape) // limit))
    if k == 1:
        return values.astype(float), 1
    rows, cols = values.shape
    padded = np.full((-(-rows // k) * k, -(-cols // k) * k), -np.inf)
    padded[:rows, :cols] = values
    pooled = padded.reshape(padded.shape[0] // k, k, padded.shape[1] // k, k).max(axis=(1, 3))
    return pooled, k


def _heatmap(Figure, trace, profile, counter, title, unit, out: Path) -> Path:
    meta = trace["meta"]
    values = np.asarray(trace["counters"][counter]) * SCALES.get(counter, 1)
    rows, cols = values.shape
    image, k = pool_max(values)
    import matplotlib.ticker
    cmap = matplotlib.colormaps["viridis"]
    limit = {"peak_bytes": (profile.sram, "SRAM"), "routes_peak": (profile.routes, "route limit")}.get(counter)
    peak = float(values.max()) if values.size else 0.0
    low = float(values.min()) if values.size else 0.0
    if limit:  # the scale ends at the limit: how full each core is
        vmin, vmax = 0.0, float(limit[0])
        cmap = cmap.with_extremes(over=LIMIT)
    else:  # the scale spans the values: imbalance shows even when it is small
        vmin, vmax = (low, peak) if low < peak else (0.0, peak or 1.0)
    aspect = rows / cols
    fig = Figure(figsize=(7.2, max(3.0, min(9.0, 6.0 * aspect + 1.4))), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", origin="upper",
                   extent=(-0.5, cols - 0.5, rows - 0.5, -0.5), aspect="equal")
    ax.set_xlabel("core column (x)")
    ax.set_ylabel("core row (y)")
    for axis in (ax.xaxis, ax.yaxis):
        axis.get_major_locator().set_params(integer=True)
    cbar = fig.colorbar(im, ax=ax, extend="max" if limit else "neither", shrink=0.9)
    cbar.set_label(unit)
    whole = counter not in SCALES       # counts: whole-number ticks; energies: real numbers
    if whole:
        cbar.ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        cbar.ax.yaxis.set_major_formatter(THOUSANDS)
    shown = "{:,.0f}" if whole else "{:.4g}"
    details = [f"min {shown.format(low)}, mean {shown.format(float(values.mean()))}, "
               f"max {shown.format(peak)} {unit}"]
    if counter == "energy_joules":
        details[0] += f", {float(values.sum()) / 1e9:.4g} J in all"
    if counter in ("busy_cycles", "clock_cycles"):
        scale, tunit = _time_unit(peak / profile.clock_hz or 1e-9)
        details[0] += f" = {peak / profile.clock_hz / scale:.4g} {tunit} at {profile.clock_hz / 1e9:g} GHz"
        f = profile.clock_hz * scale
        sec = cbar.ax.secondary_yaxis("left", functions=(lambda c: c / f, lambda s: s * f))
        sec.set_ylabel(tunit)
    if limit:
        over = int((values > limit[0]).sum())
        cbar.ax.axhline(limit[0], color=LIMIT, linewidth=2)
        details.append(f"{limit[1]} {limit[0]:,} per core, {peak / limit[0]:.0%} used at most"
                       + (f", {over:,} cores over it (red)" if over else ""))
        cbar.set_label(f"{unit} (scale ends at the {limit[1]}: {limit[0]:,})")
    if k > 1:
        details.append(f"each cell: the max over {k}x{k} cores")
    ax.set_title("\n".join([f"{title}, {_title(meta)}"] + details), fontsize=9)
    fig.savefig(out)
    return out


# ---------------------------------------------------------------------- phases
def self_costs(trace: dict) -> list[dict]:
    """Per phase: path, own (self) cycles and FLOPs, i.e. not inside one of its children."""
    phases = trace["phases"]
    kids = children_of(phases)
    paths = phase_paths(phases)
    out = []
    for i, p in enumerate(phases):
        cycles = (p["end_cycles"] - p["start_cycles"]) - sum(
            phases[k]["end_cycles"] - phases[k]["start_cycles"] for k in kids[i])
        flops = p["flops"] - sum(phases[k]["flops"] for k in kids[i])
        out.append({"path": paths[i], "kind": phase_kind(paths[i]) + (" (self)" if kids[i] else ""),
                    "cycles": max(cycles, 0.0), "flops": max(flops, 0)})
    return out


def _phase_chart(Figure, trace, profile, out: Path) -> Path:
    groups: dict[str, list] = {}
    for row in self_costs(trace):
        g = groups.setdefault(row["kind"], [0.0, 0, 0])
        g[0] += row["cycles"]
        g[1] += row["flops"]
        g[2] += 1
    if len(groups) > MAX_BARS:
        ranked = sorted(groups, key=lambda k: -groups[k][0])
        other = [0.0, 0, 0]
        for name in ranked[MAX_BARS - 1:]:
            other = [a + b for a, b in zip(other, groups.pop(name))]
        groups[f"other ({len(ranked) - MAX_BARS + 1} phases)"] = other
    names = list(groups)
    cycles = np.array([groups[n][0] for n in names])
    compute = profile.compute_cycles([groups[n][1] for n in names], cycles)
    labels = [n + (f"  x{groups[n][2]}" if groups[n][2] > 1 else "") for n in names]
    fig = Figure(figsize=(9, 1.6 + 0.32 * len(names)), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, compute, color=COMPUTE, label="compute (FLOPs / cores / rate)")
    ax.barh(y, cycles - compute, left=compute, color=COMMUNICATION, label="communication and waiting")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("modeled cycles")
    ax.xaxis.set_major_formatter(THOUSANDS)
    total = cycles.sum()
    for yi, c in zip(y, cycles):
        if total:
            ax.text(c, yi, f" {c / total:.0%}", va="center", fontsize=7)
    ax.set_xlim(0, max(float(cycles.max()) if cycles.size else 1.0, 1.0) * 1.1)
    profile.seconds_axis(ax, "x")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    ax.set_title(f"modeled cycles per phase ({_title(trace['meta'])}); "
                 f"nested phases: own cycles only", fontsize=9)
    fig.savefig(out)
    return out


_LAYER = re.compile(r"(?:^|\.)layer(\d+)(?:\.|$)")


def _layer_chart(Figure, trace, profile, out: Path) -> Path | None:
    rows = [r for r in self_costs(trace) if _LAYER.search(r["path"])]
    if not rows:
        return None
    layers = sorted({int(_LAYER.search(r["path"]).group(1)) for r in rows})
    index = {n: i for i, n in enumerate(layers)}
    cycles, flops = np.zeros(len(layers)), np.zeros(len(layers))
    parts: dict[str, np.ndarray] = {}
    for r in rows:
        match = _LAYER.search(r["path"])
        i = index[int(match.group(1))]
        cycles[i] += r["cycles"]
        flops[i] += r["flops"]
        part = r["path"][match.end():].strip(".").split(".")[0] or "(layer itself)"
        parts.setdefault(phase_kind(part), np.zeros(len(layers)))[i] += r["cycles"]
    compute = profile.compute_cycles(flops, cycles)
    fig = Figure(figsize=(max(7.0, 0.25 * len(layers) + 3), 7.5), dpi=110, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.array(layers)
    top.bar(x, compute, color=COMPUTE, label="compute (FLOPs / cores / rate)")
    top.bar(x, cycles - compute, bottom=compute, color=COMMUNICATION, label="communication and waiting")
    top.set_ylabel("modeled cycles")
    top.legend(fontsize=8, loc="lower right")
    top.set_title(f"modeled cycles per layer, summed over all occurrences ({_title(trace['meta'])})",
                  fontsize=9)
    base = np.zeros(len(layers))
    import matplotlib
    colours = matplotlib.colormaps["Set2" if len(parts) <= 8 else "tab20"]
    for j, (name, values) in enumerate(parts.items()):
        bottom.bar(x, values, bottom=base, color=colours(j % colours.N), label=name)
        base += values
    bottom.set_ylabel("modeled cycles")
    bottom.set_xlabel("layer")
    bottom.legend(fontsize=7, ncols=min(5, len(parts)))
    bottom.set_title("by sub-phase", fontsize=9)
    for ax in (top, bottom):
        ax.yaxis.set_major_formatter(THOUSANDS)
        profile.seconds_axis(ax, "y")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.savefig(out)
    return out


def step_self_costs(trace: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per step: modeled cycles and FLOPs of its own, without the child phases that ran
    inside it (a step of a phase spans the child phases begun since its previous step)."""
    phases, steps = trace["phases"], trace["steps"]
    spans = step_spans(trace)
    cycles = np.array([end - start for start, end in spans], float)
    flops = np.array([s["flops"] for s in steps], float)
    by_phase: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        by_phase.setdefault(s["phase"], []).append(i)
    for parent, kids in enumerate(children_of(phases)):
        for k in kids:
            child = phases[k]
            for i in by_phase.get(parent, ()):  # the first step that encloses the child
                if spans[i][0] <= child["start_cycles"] and child["end_cycles"] <= spans[i][1]:
                    cycles[i] -= child["end_cycles"] - child["start_cycles"]
                    flops[i] -= child["flops"]
                    break
    return np.maximum(cycles, 0.0), np.maximum(flops, 0.0)


def step_groups(trace: dict, aggregate: str) -> list[dict]:
    """Steps grouped like ``trace summary`` groups phases: by their phase's path (``name``) or
    its kind (``kind``, layer numbers as ``*``) and their label, in first-seen order, with the
    number of steps and their own cycles and FLOPs summed."""
    paths = phase_paths(trace["phases"])
    cycles, flops = step_self_costs(trace)
    groups: dict = {}
    for i, s in enumerate(trace["steps"]):
        path = paths[s["phase"]]
        key = (phase_kind(path) if aggregate == "kind" else path, s["label"])
        g = groups.setdefault(key, {"phase": key[0], "label": key[1], "count": 0, "cycles": 0.0, "flops": 0.0})
        g["count"] += 1
        g["cycles"] += cycles[i]
        g["flops"] += flops[i]
    return list(groups.values())


def _step_group_chart(Figure, trace, profile, out: Path, aggregate: str) -> Path | None:
    groups = step_groups(trace, aggregate)
    if not groups:
        return None
    count = np.array([g["count"] for g in groups], float)
    total = np.array([g["cycles"] for g in groups])
    compute = profile.compute_cycles([g["flops"] for g in groups], total)
    x = np.arange(len(groups))
    fig = Figure(figsize=(max(8.0, min(20.0, 0.18 * len(groups) + 5)), 8.5), dpi=110, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax, scale, what in ((top, count, "mean per occurrence"), (bottom, 1.0, "total over occurrences")):
        ax.bar(x, compute / scale, width=0.85, color=COMPUTE, label="compute (FLOPs / cores / rate)")
        ax.bar(x, (total - compute) / scale, width=0.85, bottom=compute / scale, color=COMMUNICATION,
               label="communication and waiting")
        ax.set_ylabel(f"modeled cycles, {what}\n(without nested phases)")
        ax.yaxis.set_major_formatter(THOUSANDS)
        profile.seconds_axis(ax, "y")
    top.legend(fontsize=8, loc="upper left", framealpha=0.9)
    top.set_title(f"steps grouped by phase and label ({_title(trace['meta'])}; "
                  f"{len(trace['steps']):,} steps in {len(groups)} groups)", fontsize=9)
    if len(groups) <= 120:
        bottom.set_xticks(x, [f"{g['phase']}: {g['label']}  x{g['count']}" for g in groups],
                          rotation=90, fontsize=6)
    else:
        bottom.set_xlabel("step group (first-seen order)")
    fig.savefig(out)
    return out


def _step_chart(Figure, trace, profile, out: Path, aggregate: str = "kind") -> Path | None:
    steps = trace["steps"]
    if not steps:
        return None
    if aggregate != "none":
        return _step_group_chart(Figure, trace, profile, out, aggregate)
    durations, flops = step_self_costs(trace)
    compute = profile.compute_cycles(flops, durations)
    ends = np.array([s["end_cycles"] for s in steps], float)
    x = np.arange(len(steps))
    fig = Figure(figsize=(max(8.0, min(16.0, 0.12 * len(steps) + 6)), 7.5), dpi=110, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    if len(steps) <= 300:
        top.bar(x, compute, width=0.85, color=COMPUTE, label="compute (FLOPs / cores / rate)")
        top.bar(x, durations - compute, width=0.85, bottom=compute, color=COMMUNICATION,
                label="communication and waiting")
    else:  # many steps: two filled step curves instead of thousands of bars
        edges = np.arange(len(steps) + 1) - 0.5
        top.stairs(compute, edges, fill=True, color=COMPUTE, label="compute (FLOPs / cores / rate)")
        top.stairs(durations, edges, baseline=compute, fill=True, color=COMMUNICATION,
                   label="communication and waiting")
    top.set_ylabel("modeled cycles in the step\n(without nested phases)")
    top.legend(fontsize=8, loc="upper left", framealpha=0.9)
    top.set_title(f"critical path per step ({_title(trace['meta'])})", fontsize=9)
    bottom.plot(x, ends, marker="o" if len(steps) <= 100 else None, markersize=3, color="black")
    bottom.set_ylabel("modeled cycles at the step's end")
    bottom.set_xlabel("step (recorded order)")
    bottom.set_ylim(bottom=0)
    # Phase boundaries and names.
    paths = phase_paths(trace["phases"])
    first = {}
    for i, s in enumerate(steps):
        first.setdefault(s["phase"], i)
    boundaries = first.items() if len(first) <= 30 else ()  # only when few enough to read
    for phase, i in boundaries:
        for ax in (top, bottom):
            ax.axvline(i - 0.5, color="grey", linewidth=0.6, linestyle=":")
        bottom.text(i - 0.4, 0.98, paths[phase], transform=bottom.get_xaxis_transform(),
                    fontsize=7, rotation=90 if len(first) > 6 else 0, va="top", ha="left")
    for ax in (top, bottom):
        ax.yaxis.set_major_formatter(THOUSANDS)
        ax.xaxis.get_major_locator().set_params(integer=True)
        profile.seconds_axis(ax, "y")
    fig.savefig(out)
    return out


# ---------------------------------------------------------------------- the command
def plot_trace(trace: dict, out_dir, aggregate: str = "kind") -> list[Path]:
    """Write every chart of ``trace`` into ``out_dir``; returns the files written. ``aggregate``
    groups repeated steps in steps.png as ``trace summary`` groups phases (``none``: every step)."""
    _, Figure = _matplotlib()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    profile = _Profile(trace["meta"])
    written = []
    for counter, title, unit in HEATMAPS:
        if counter in trace["counters"]:
            written.append(_heatmap(Figure, trace, profile, counter, title, unit,
                                    out_dir / f"core_{counter}.png"))
    if trace["phases"]:
        written.append(_phase_chart(Figure, trace, profile, out_dir / "phases.png"))
    for path in (_layer_chart(Figure, trace, profile, out_dir / "layers.png"),
                 _step_chart(Figure, trace, profile, out_dir / "steps.png", aggregate)):
        if path:
            written.append(path)
    return written


def run(args) -> int:
    from . import cli
    from .trace import read_trace

    written = plot_trace(read_trace(args.file), args.output, args.aggregate)
    if args.json:
        cli.print_json({"files": [str(p) for p in written]})
    else:
        cli.say("\n".join(str(p) for p in written))
    return 0


PLOT_HELP = f"""\
PNG charts of one trace, written into DIR (their paths are printed).

  core_<counter>.png  a heatmap over the mesh per per-core counter; peak memory is coloured
                      up to the SRAM size and routes up to the route limit (red: over it).
                      Meshes wider than {MAX_CELLS} cores are drawn as the maximum over small
                      square blocks of cores.
  phases.png          modeled cycles of each phase, compute and communication; nested phases
                      count their own cycles only, repeats are summed (layer numbers as *).
  layers.png          the same per layer, and each layer's cycles by sub-phase.
  steps.png           the steps' own cycles grouped by phase and step label (see --aggregate).

Compute cycles are FLOPs / cores / the profile's FLOPs per cycle, capped at the phase's cycles;
the rest is communication and waiting."""


def register(trace_commands) -> None:
    """Add ``trace plot`` to the ``trace`` subparsers."""
    p = trace_commands.add_parser(
        "plot", help="PNG heatmaps over the mesh and per-phase / per-step charts",
        description=PLOT_HELP,
        epilog="example:\n  python -m meshmpi trace plot results/run/generate.h5 -o results/run/plots",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="HDF5 trace")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory for the PNGs")
    p.add_argument("--aggregate", choices=AGGREGATES, default="kind",
                   help="group repeated steps in steps.png: kind (default; layer numbers as *), "
                        "name (per phase name), none (every step in recorded order)")
    p.add_argument("--json", action="store_true", help="print the files written as one JSON object")
    p.set_defaults(func=run)
