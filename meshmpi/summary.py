"""``python -m meshmpi trace summary``: the totals and the per-phase table of a trace."""
from __future__ import annotations

from .text import article, plural


def summarize(trace: dict) -> dict:
    meta, counters = trace["meta"], trace["counters"]
    hw = meta["hardware"]
    clock = hw["clock_hz"]["value"]
    cycles = float(counters["clock_cycles"].max())
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
        "name": p["name"], "depth": p["depth"], "modeled_cycles": p["end_cycles"] - p["start_cycles"],
        "start_cycles": p["start_cycles"], "end_cycles": p["end_cycles"],
        "wall_seconds": p["wall_seconds"], "messages": p["messages"], "bytes": p["bytes"],
        "flops": p["flops"], "max_hops": p["max_hops"],
        "peak_bytes": p.get("peak_bytes"),          # schema 2; None in a version-1 trace
        "steps": sum(1 for s in trace["steps"] if s["phase"] == i),
    } for i, p in enumerate(trace["phases"])]
    return {"totals": totals, "phases": phases, "warnings": meta["warnings"], "result": meta["result"]}


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
    if summary["phases"]:
        lines.append("")
        header = (f"  {'phase':<36} {'cycles':>14} {'steps':>6} {'messages':>12} {'bytes':>14} {'hops':>5} "
                  f"{'peak B/core':>12} {'wall s':>9}")
        lines.append(header)
        for p in summary["phases"]:
            name = "  " * p["depth"] + p["name"]
            peak = "" if p["peak_bytes"] is None else f"{p['peak_bytes']:,}"
            lines.append(f"  {name:<36} {p['modeled_cycles']:>14,.0f} {p['steps']:>6} {p['messages']:>12,} "
                         f"{p['bytes']:>14,} {p['max_hops']:>5} {peak:>12} {p['wall_seconds']:>9.3f}")
    return "\n".join(lines)
