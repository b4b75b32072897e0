"""Merge the per-job outputs of a sweep into one CSV table.

    python -m meshmpi results collect results/slurm/sweep-1234 -o sweep.csv

Every ``*.json`` file under DIR that holds one JSON object becomes a row (nested
dicts flattened to dotted keys). A ``*.h5`` trace becomes a row only when it has
no JSON twin (same name, ``.json``): the JSON a command prints already says what
the run was, the trace is the fallback for jobs run without ``--json``. From a
trace we read the attributes of ``/meta`` (``*_json`` ones opened up into dotted
columns) and, per dataset under ``/counters``, its sum and max over cores. The
command's result (``/meta result_json``) gives the same columns as its JSON
(``modeled_cycles``, not ``result.modeled_cycles``), so one metric is one column
whichever file a row came from; where a ``/meta`` attribute has the name of a
result key, the result's value is kept.
Columns are the union over all rows; ``source`` is the file's path relative to DIR.

This is host-side post-processing: serial, no MPI.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from . import outputs
from .outputs import is_temporary, leftovers_line
from .text import plural


def flatten(obj: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept whole (one cell)."""
    flat = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _plain(value):
    """An HDF5 attribute (numpy scalar, bytes, array) as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _meta_columns(key: str, value) -> dict:
    """One ``/meta`` attribute as columns: ``result_json='{"cycles": 9}'`` -> ``result.cycles``.

    Traces store nested metadata (the result, the hardware profile) as JSON text; opened
    up, it lines up with the columns of the JSON a command prints.
    """
    if key.endswith("_json") and isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return flatten(parsed, "" if key == "result_json" else key[: -len("_json")] + ".")
    return {key: value}


def read_json(path: Path) -> dict | None:
    """The flattened object in ``path``, or None (with a warning) if it holds none.

    A failed array task leaves an empty or partial file behind; skipping it keeps
    the rest of the sweep usable, and the warning says which task to look at.
    """
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        print(f"collect: skipping {path}: not valid JSON ({err})", file=sys.stderr)
        return None
    if not isinstance(obj, dict):
        print(f"collect: skipping {path}: not a JSON object", file=sys.stderr)
        return None
    return flatten(obj)


def read_trace(path: Path) -> dict | None:
    """``/meta`` attributes and ``/counters`` totals of one HDF5 trace, or None."""
    import h5py  # only needed when there are traces

    try:
        with h5py.File(path, "r") as trace:
            row, result = {}, {}
            if "meta" in trace:
                for key, value in trace["meta"].attrs.items():
                    (result if key == "result_json" else row).update(_meta_columns(key, _plain(value)))
            row.update(result)
            if isinstance(trace.get("counters"), h5py.Group):
                def add_totals(name, node):
                    if isinstance(node, h5py.Dataset) and node.size and node.dtype.kind in "biuf":
                        data = node[()]
                        row[f"counters.{name}.sum"] = _plain(data.sum())
                        row[f"counters.{name}.max"] = _plain(data.max())
                trace["counters"].visititems(add_totals)
            return row
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:  # h5py's ways to say "damaged"
        print(f"collect: skipping {path}: not a readable HDF5 file ({_first_line(err)})", file=sys.stderr)
        return None


def _first_line(err: Exception) -> str:
    text = str(err).strip().strip("'\"")
    return text.splitlines()[0] if text else type(err).__name__


def collect(directory: str | Path) -> list[dict]:
    """One row per result file under ``directory`` (recursively, sorted by path)."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"results directory not found: {root}")
    rows, temporaries = [], []
    for path in sorted(root.rglob("*")):
        if is_temporary(path):
            temporaries.append(path.relative_to(root))
            continue
        if path.suffix == ".json":
            row = read_json(path)
        elif path.suffix == ".h5" and not path.with_suffix(".json").exists():
            row = read_trace(path)
        else:
            continue
        if row is not None:
            rows.append({"source": str(path.relative_to(root)), **row})
    line = leftovers_line(temporaries, f" under {root}")
    if line:
        print(f"collect: {line}", file=sys.stderr)
    if not rows:
        raise ValueError(f"no result files (*.json or *.h5) with data under {root}")
    return rows


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return json.dumps(value)
    return value


def write_csv(rows: list[dict], out) -> None:
    """Write rows with the union of their columns, in order of first appearance."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(value) for key, value in row.items()})


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``results collect`` to an argparse subparsers object."""
    results = subparsers.add_parser("results", help="work with the outputs of many runs")
    commands = results.add_subparsers(dest="results_command", required=True)
    parser = commands.add_parser(
        "collect",
        help="merge per-job JSON/HDF5 outputs into one CSV",
        description=__doc__.split("\n\n")[0],
        epilog="example: python -m meshmpi results collect results/slurm/sweep-1234 -o sweep.csv",
    )
    parser.add_argument("directory", metavar="DIR", help="directory with *.json / *.h5 results")
    parser.add_argument("-o", "--output", default="-", help="CSV file to write (default: stdout)")
    parser.set_defaults(func=run)
    return results


def run(args) -> int:
    if args.output != "-":
        found = outputs.problem(args.output, "-o")
        if found:
            raise ValueError(found)
    rows = collect(args.directory)
    if args.output == "-":
        write_csv(rows, sys.stdout)
    else:
        def write(tmp):
            with open(tmp, "w", newline="") as out:
                write_csv(rows, out)
        try:
            outputs.write_atomic(args.output, write)
        except OSError as exc:
            raise ValueError(f"cannot write -o {args.output}: {exc.strerror or exc}") from None
        print(f"collect: {plural(len(rows), 'row')} -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # usable before it is wired into `python -m meshmpi`
    top = argparse.ArgumentParser(prog="python -m meshmpi.collect")
    register(top.add_subparsers(dest="command", required=True))
    parsed = top.parse_args()
    try:
        sys.exit(parsed.func(parsed))
    except ValueError as err:
        sys.exit(f"error: {err}")
