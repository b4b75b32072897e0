"""``python -m meshmpi trace compare A.h5 B.h5 ...``: runs side by side, ratios against A.

Totals are those of ``trace summary``. Phases are matched by name; a phase that
occurs several times (one per token or layer) is summed over its occurrences. When all files
are of the same kind and each file's phases share one leading name component that differs
between files (``meshgemm.compute_shift`` vs ``cannon.compute_shift``: the algorithm), the
phases are matched on the rest of the name (``compute_shift``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .summary import summarize

TOTALS = (  # (key in summarize()["totals"], label, format)
    ("modeled_cycles", "modeled cycles", "{:,.0f}"),
    ("modeled_seconds", "modeled time (s)", "us"),        # the value in seconds; the table shows us
    ("busy_cycles_max", "busiest core, compute cycles", "{:,.0f}"),
    ("messages", "messages", "{:,}"),
    ("bytes_moved", "bytes moved", "{:,}"),
    ("flops", "FLOPs", "{:,}"),
    ("relays", "relays", "{:,}"),
    ("peak_bytes_per_core", "peak memory per core (B)", "{:,}"),
    ("routes_per_core_max", "routes per router (max)", "{:,}"),
    ("wall_seconds", "wall time (s)", "{:.3f}"),
)
INFO = ("kind", "mesh", "hardware", "ranks", "dry_run")


def _prefix(name: str) -> str:
    return name.split(".", 1)[0]


def phase_prefixes(traces: list[dict]) -> list[str] | None:
    """Each file's common leading name component when phases should be matched without it
    (see the module docstring), else None."""
    if len({t["meta"]["kind"] for t in traces}) != 1:
        return None
    prefixes = []
    for t in traces:
        heads = {_prefix(p["name"]) for p in t["phases"] if "." in p["name"]}
        if len(heads) != 1 or any("." not in p["name"] for p in t["phases"]):
            return None
        prefixes.append(heads.pop())
    return prefixes if len(set(prefixes)) > 1 else None


def phase_cycles(trace: dict, prefix: str | None) -> dict:
    """``key -> {"cycles", "count", "depth"}`` in first-seen order."""
    out = {}
    for p in trace["phases"]:
        key = p["name"].split(".", 1)[1] if prefix else p["name"]
        row = out.setdefault(key, {"cycles": 0.0, "count": 0, "depth": p["depth"]})
        row["cycles"] += p["end_cycles"] - p["start_cycles"]
        row["count"] += 1
        row["depth"] = min(row["depth"], p["depth"])
    return out


def _ratio(value, base):
    if value is None or base is None or base == 0:
        return None
    return value / base


def compare(traces: list[dict], files: list[str]) -> dict:
    """The comparison as plain data (what ``--json`` prints)."""
    summaries = [summarize(t) for t in traces]
    totals = []
    for key, label, _ in TOTALS:
        values = [s["totals"][key] for s in summaries]
        totals.append({"metric": key, "label": label, "values": values,
                       "ratios": [_ratio(v, values[0]) for v in values]})
    prefixes = phase_prefixes(traces)
    per_file = [phase_cycles(t, prefixes[i] if prefixes else None) for i, t in enumerate(traces)]
    keys = list(dict.fromkeys(k for table in per_file for k in table))
    phases = []
    for key in keys:
        rows = [table.get(key) for table in per_file]
        cycles = [r["cycles"] if r else None for r in rows]
        phases.append({"phase": key, "depth": min(r["depth"] for r in rows if r),
                       "cycles": cycles, "count": [r["count"] if r else 0 for r in rows],
                       "ratios": [_ratio(c, cycles[0]) for c in cycles]})
    return {
        "files": files,
        "info": [{k: s["totals"][k] for k in INFO} for s in summaries],
        "phase_prefixes": prefixes,
        "totals": totals,
        "phases": phases,
    }


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "us":
        return f"{value * 1e6:,.3f}"
    return fmt.format(value)


def format_compare(doc: dict) -> str:
    n = len(doc["files"])
    letters = [chr(ord("A") + i) if i < 26 else f"F{i}" for i in range(n)]
    lines = [f"  {letter} = {path}" for letter, path in zip(letters, doc["files"])]
    header = [""] + [letters[0]] + sum(([letters[i], f"{letters[i]}/{letters[0]}"] for i in range(1, n)), [])
    table = [header]

    def add(label, values, ratios, fmt):
        row = [label, _cell(values[0], fmt)]
        for i in range(1, n):
            row += [_cell(values[i], fmt), "-" if ratios[i] is None else f"{ratios[i]:.3f}"]
        table.append(row)

    for key in INFO:
        values = [str(info[key]) for info in doc["info"]]
        table.append([key] + sum(([v] if i == 0 else [v, ""] for i, v in enumerate(values)), []))
    for t in doc["totals"]:
        fmt = next(f for k, _, f in TOTALS if k == t["metric"])
        add(t["label"].replace("(s)", "(us)") if fmt == "us" else t["label"], t["values"], t["ratios"], fmt)
    if doc["phases"]:
        table.append(None)
        note = (" (matched without the prefix " + " / ".join(doc["phase_prefixes"]) + ")"
                if doc["phase_prefixes"] else "")
        table.append([f"phase, modeled cycles{note}"])
        for p in doc["phases"]:
            counts = {c for c in p["count"] if c}
            label = "  " * (p["depth"] + 1) + p["phase"] + (f" (x{counts.pop()})" if len(counts) == 1
                                                              and max(p["count"]) > 1 else "")
            add(label, p["cycles"], p["ratios"], "{:,.0f}")
    widths = [max(len(r[i]) for r in table if r and len(r) > 1) for i in range(len(header))]
    for row in table:
        if row is None:
            lines.append("")
        elif len(row) == 1:
            lines.append(row[0])
        else:
            lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
    return "\n".join(lines[:n] + [""] + lines[n:])


def run(args) -> int:
    from . import cli
    from .trace import read_trace

    traces = [read_trace(path) for path in args.files]
    doc = compare(traces, [str(Path(p)) for p in args.files])
    if args.json:
        cli.print_json(doc)
    else:
        cli.say(format_compare(doc))
    return 0


def register(trace_commands) -> None:
    """Add ``trace compare`` to the ``trace`` subparsers."""
    from . import cli
    p = trace_commands.add_parser(
        "compare", help="several traces side by side, ratios against the first",
        description=cli.help_text("\n\n".join(__doc__.split("\n\n")[:2])),
        epilog="examples:\n  python -m meshmpi trace compare meshgemm.h5 cannon.h5 summa.h5\n"
               "  python -m meshmpi trace compare wse2.h5 wse3.h5 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help="HDF5 traces (the first is the reference)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
