"""``python -m meshmpi trace summary``: the totals and the per-phase table of a trace.

Repeated phases are grouped (``aggregate``): ``name`` puts the instances of one name together
(one row per layer, the tokens summed), ``kind`` also merges the layers
(``decode.layer*.qkv``: layer numbers as ``*``), ``none`` lists every instance. ``depth`` keeps the phases
nested less than ``depth`` deep, ``pattern`` (a shell glob) those whose name matches.
"""
from __future__ import annotations

import re
from fnmatch import fnmatchcase

from .text import article, plural

AGGREGATES = ("kind", "name", "none")


def phase_kind(name: str) -> str:
    """``decode.layer12.attention`` -> ``decode.layer*.attention`` (layer numbers merged)."""
    return ".".join(re.sub(r"^layer\d+$", "layer*", part) for part in name.split("."))


def summarize(trace: dict, aggregate: str = "kind", depth: int | None = None, pattern: str | None = None) -> dict:
    meta, counters = trace["meta"], trace["counters"]
    hw = meta["hardware"]
    clock = hw["clock_hz"]["value"]
    cycles = float(meta.get("modeled_cycles", counters["clock_cycles"].max()))
    totals = {
        "kind": meta["kind"], "mesh": f"{meta['mesh_rows']}x{meta['mesh_cols']}",
        "ranks": meta["mpi_world_size"], "hardware": meta["hardware_name"], "dry_run": bool(meta["dry_run"]),
        "modeled_cycles": cycles, "modeled_seconds": cycles / clock,
        "busy_cycles_max": float(counters["busy_cycles"].max()),
        "messages": int(counters["messages_sent"].sum()), "bytes_moved": int(counters["bytes_sent"].sum()),
        "flops": int(counters["flops"].sum()), "relays": int(counters["relays"].sum()),
        "peak_bytes_per_core": int(counters["peak_bytes"].max()),
        "sram_bytes_per_core": hw["sram_bytes_per_core"]["value"],
        "routes_per_core_max": int(counters["routes_peak"].max()),
        "route_limit": hw["routes_per_core"]["value"],
        "wall_seconds": float(sum(p["wall_seconds"] for p in trace["phases"] if p["depth"] == 0)),
    }
    phases = [{
        "name": p["name"], "label": p.get("label", ""), "depth": p["depth"], "modeled_cycles": p["end_cycles"] - p["start_cycles"],
        "start_cycles": p["start_cycles"], "end_cycles": p["end_cycles"],
        "wall_seconds": p["wall_seconds"], "messages": p["messages"], "bytes": p["bytes"],
        "flops": p["flops"], "max_hops": p["max_hops"],
        "peak_bytes": p.get("peak_bytes"),          # schema 2; None in a version-1 trace
        "steps": sum(1 for s in trace["steps"] if s["phase"] == i),
    } for i, p in enumerate(trace["phases"])]
    phases = [p for p in phases if (depth is None or p["depth"] < depth)
              and (pattern is None or fnmatchcase(p["name"], pattern))]
    return {"totals": totals, "aggregate": aggregate, "phases": phases,
            "phase_groups": group_phases(phases, aggregate),
            "warnings": meta["warnings"], "result": meta["result"]}


def group_phases(phases: list[dict], aggregate: str) -> list[dict]:
    """One row per group of repeated phases, in the order the groups first appear: ``count``,
    total and mean modeled cycles, summed traffic and wall time, the largest hops and peak."""
    groups: dict = {}
    for i, p in enumerate(phases):
        key = i if aggregate == "none" else phase_kind(p["name"]) if aggregate == "kind" else p["name"]
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"name": p["name"] if aggregate != "kind" else key, "depth": p["depth"],
                               "count": 0, "modeled_cycles": 0.0, "steps": 0, "messages": 0, "bytes": 0,
                               "flops": 0, "max_hops": 0, "peak_bytes": p["peak_bytes"], "wall_seconds": 0.0,
                               "label": p["label"] if aggregate == "none" else ""}
        g["count"] += 1
        g["depth"] = min(g["depth"], p["depth"])
        for field in ("modeled_cycles", "steps", "messages", "bytes", "flops", "wall_seconds"):
            g[field] += p[field]
        g["max_hops"] = max(g["max_hops"], p["max_hops"])
        if p["peak_bytes"] is not None:
            g["peak_bytes"] = max(g["peak_bytes"] or 0, p["peak_bytes"])
    for g in groups.values():
        g["mean_cycles"] = g["modeled_cycles"] / g["count"]
    return list(groups.values())


def format_summary(summary: dict) -> str:
    t = summary["totals"]
    lines = [
        f"{t['kind']} on {article(t['mesh'])} {t['mesh']} mesh ({t['hardware']}, {plural(t['ranks'], 'rank')}"
        f"{', dry run' if t['dry_run'] else ''})",
        f"  modeled time   {t['modeled_cycles']:,.0f} cycles = {t['modeled_seconds'] * 1e3:.6f} ms",
        f"  busiest core   {t['busy_cycles_max']:,.0f} compute cycles",
        f"  traffic        {t['messages']:,} messages, {t['bytes_moved']:,} bytes, {t['relays']:,} relays",
        f"  work           {t['flops']:,} FLOPs",
        f"  memory         peak {t['peak_bytes_per_core']:,} B per core of {t['sram_bytes_per_core']:,} B",
        f"  routes         peak {t['routes_per_core_max']} per router of {t['route_limit']}",
        f"  wall time      {t['wall_seconds']:.3f} s",
    ]
    for w in summary["warnings"]:
        lines.append(f"  warning        {w}")
    rows = summary["phase_groups"]
    if rows:
        lines.append("")
        every = summary["aggregate"] == "none"
        names = ["  " * p["depth"] + p["name"] + (f" [{p['label']}]" if p["label"] else "") for p in rows]
        width = max([36] + [len(n) for n in names])
        counts = "" if every else f" {'count':>6} {'mean cycles':>14}"
        lines.append(f"  {'phase':<{width}} {'cycles':>14}{counts} {'steps':>6} {'messages':>12} {'bytes':>14} "
                     f"{'hops':>5} {'peak B/core':>12} {'wall s':>9}")
        for name, p in zip(names, rows):
            peak = "" if p["peak_bytes"] is None else f"{p['peak_bytes']:,}"
            counts = "" if every else f" {p['count']:>6} {p['mean_cycles']:>14,.0f}"
            lines.append(f"  {name:<{width}} {p['modeled_cycles']:>14,.0f}{counts} {p['steps']:>6} "
                         f"{p['messages']:>12,} {p['bytes']:>14,} {p['max_hops']:>5} {peak:>12} "
                         f"{p['wall_seconds']:>9.3f}")
        if not every:
            lines.append(f"  ({plural(len(summary['phases']), 'phase')} in {plural(len(rows), 'row')}: repeats "
                         f"{'of a name' if summary['aggregate'] == 'name' else 'of a name, layer numbers as *'} "
                         "summed; --aggregate none lists each)")
    return "\n".join(lines)
