"""HDF5 traces: one file per run, schema in TRACE_SCHEMA.md (version ``SCHEMA_VERSION``).

Counters are gathered to rank 0, which writes a temporary file beside the target and renames
it into place, so a crash never leaves a half-written trace under the final name.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from . import energy
from .errors import UsageError
from .hardware import from_document
from .host import agree, gather_block_arrays
from .outputs import is_temporary, write_atomic

SCHEMA_VERSION = 4
# v2 added the phases' resident_bytes and peak_bytes; v3 the phases' label, /meta modeled_cycles,
# stable LLM phase names and the prefill and relayout phases of a generate run; v4 the
# byte_hops and energy_joules counters and the profile's energy constants
READABLE_VERSIONS = (1, 2, 3, 4)
COUNTER_DOCS = {
    "bytes_sent": "bytes the core sent (at the profile's element size)",
    "bytes_recv": "bytes delivered to the core",
    "messages_sent": "messages the core sent",
    "hops": "links used by the messages the core sent",
    "byte_hops": "bytes times links crossed, over the messages the core sent",
    "relays": "messages the core forwarded in software",
    "flops": "floating-point operations the core did",
    "peak_bytes": "most bytes resident at once",
    "resident_bytes": "bytes resident at the end of the run",
    "routes_peak": "most routes configured at once on the core's router",
    "busy_cycles": "modeled cycles spent computing",
    "clock_cycles": "the core's modeled clock at the end of the run",
    "energy_joules": "joules of the core's counted events and static power over the mesh's modeled time",
}
# counters a trace may lack: added after schema 3, or (energy) absent when the profile has no
# energy constants
OPTIONAL_COUNTERS = ("byte_hops", "energy_joules")
PHASE_DTYPE = np.dtype([("name", h5py.string_dtype()), ("label", h5py.string_dtype()), ("parent", "i4"), ("depth", "i4"),
                        ("start_cycles", "f8"), ("end_cycles", "f8"), ("wall_seconds", "f8"),
                        ("messages", "i8"), ("bytes", "i8"), ("flops", "i8"), ("max_hops", "i8"),
                        ("resident_bytes", "i8"), ("peak_bytes", "i8")])
STEP_DTYPE = np.dtype([("phase", "i4"), ("step", "i4"), ("label", h5py.string_dtype()),
                       ("end_cycles", "f8"), ("messages", "i8"), ("bytes", "i8"), ("flops", "i8"),
                       ("max_hops", "i8")])


def mesh_counters(mesh) -> dict:
    """This block's per-core counters, by dataset name."""
    counters = {name: mesh.counters[name] for name in
                ("bytes_sent", "bytes_recv", "messages_sent", "hops", "byte_hops", "relays", "flops")}
    counters.update(peak_bytes=mesh.memory.peak, resident_bytes=mesh.memory.resident,
                    routes_peak=mesh.routes.peak, busy_cycles=mesh.busy, clock_cycles=mesh.clock)
    if mesh.hardware.has_energy:     # collective: every rank has the same profile
        counters["energy_joules"] = energy.per_core(mesh, mesh.hardware.cycles_to_seconds(mesh.modeled_cycles()))
    return counters


def _records(rows: list[dict], dtype: np.dtype) -> np.ndarray:
    out = np.zeros(len(rows), dtype)
    for i, row in enumerate(rows):
        for name in dtype.names:
            out[i][name] = row[name]
    return out


def concat_timelines(parts) -> tuple[list[dict], list[dict]]:
    """One timeline of several run one after the other (e.g. a prefill region's, then the decode
    region's): ``parts`` are ``(phases, steps)`` pairs, each with its own clock from 0; every part
    is shifted to begin where the previous one ended, and its rows renumbered."""
    phases, steps, offset = [], [], 0.0
    for part_phases, part_steps in parts:
        base = len(phases)
        for p in part_phases:
            phases.append(dict(p, start_cycles=p["start_cycles"] + offset, end_cycles=p["end_cycles"] + offset,
                               parent=p["parent"] + base if p["parent"] >= 0 else -1))
        for s in part_steps:
            steps.append(dict(s, phase=s["phase"] + base, end_cycles=s["end_cycles"] + offset))
        offset = max([offset] + [p["end_cycles"] for p in phases])
    return phases, steps


def write_trace(mesh, path, *, kind: str, result: dict | None = None, argv=None, warnings=None,
                timeline=None) -> None:
    """Write the run's trace (collective: call on every rank). ``warnings`` (default: the
    mesh's) are the limits a ``--memory warn`` / ``--routes warn`` run went over. ``timeline``
    (default: the mesh's) is a ``(phases, steps)`` pair from :func:`concat_timelines` when the run
    used more than one mesh; the last part must be this mesh's, whose counters are written."""
    from . import __version__, mpi_library_version  # late: avoids an import cycle

    phases, steps = mesh.timeline.collect() if timeline is None else timeline
    counters = gather_block_arrays(mesh, mesh_counters(mesh))
    error = None
    if mesh.rank == 0:
        # the run's modeled time: this mesh's latest clock, or the end of the last part's phases
        modeled = max([float(counters["clock_cycles"].max(initial=0.0))] + [p["end_cycles"] for p in phases])
        meta = {
            "schema_version": SCHEMA_VERSION, "meshmpi_version": __version__, "kind": kind,
            "mpi_library": mpi_library_version(), "mpi_world_size": mesh.size,
            "modeled_cycles": modeled, "mesh_rows": mesh.rows, "mesh_cols": mesh.cols, "rank_grid": np.array(mesh.rank_grid),
            "hardware_name": mesh.hardware.name, "hardware_json": mesh.hardware.to_json(),
            "command_line": " ".join(argv if argv is not None else sys.argv),
            "dry_run": mesh.dry_run, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(), "host": platform.node(),
            "result_json": json.dumps(result or {}),
            "warnings": json.dumps(mesh.memory.warnings + mesh.routes.warnings if warnings is None else warnings),
        }
        try:
            _write_file(Path(path), meta, counters, phases, steps)
        except OSError as exc:
            error = f"cannot write trace {path}: {exc.strerror or exc}"
    error = agree(mesh, error)
    if error:
        raise UsageError(error)


def _write_file(path: Path, meta: dict, counters: dict, phases: list, steps: list) -> None:
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            group = f.create_group("meta")
            for key, value in meta.items():
                group.attrs[key] = value
            group = f.create_group("counters")
            for name, array in counters.items():
                ds = group.create_dataset(name, data=array, compression="gzip", compression_opts=1)
                ds.attrs["doc"] = COUNTER_DOCS[name]
            f.create_dataset("phases", data=_records(phases, PHASE_DTYPE))
            f.create_dataset("steps", data=_records(steps, STEP_DTYPE))

    write_atomic(path, write)


REQUIRED_META = ("schema_version", "kind", "mesh_rows", "mesh_cols", "mpi_world_size", "hardware_name",
                 "hardware_json", "result_json", "dry_run")


def read_trace(path) -> dict:
    """A trace as plain Python: ``meta`` (dict), ``counters`` (name -> array), ``phases`` and
    ``steps`` (lists of dicts)."""
    path = Path(path)
    if is_temporary(path):
        raise UsageError(f"{path} is a leftover temporary file of an interrupted write, not a trace")
    if not path.is_file():
        raise UsageError(f"no such trace file: {path}")
    try:
        with h5py.File(path, "r") as f:
            meta = {k: _plain(v) for k, v in f["meta"].attrs.items()}
            counters = {k: f["counters"][k][()] for k in f["counters"]}
            phases = [_row(r) for r in f["phases"][()]]
            steps = [_row(r) for r in f["steps"][()]]
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not a meshmpi trace ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    if meta.get("schema_version") not in READABLE_VERSIONS:
        raise UsageError(f"{path}: trace schema {meta.get('schema_version')} is not supported "
                         f"(this meshmpi reads {', '.join(map(str, READABLE_VERSIONS))})")
    missing = [name for name in COUNTER_DOCS if name not in counters and name not in OPTIONAL_COUNTERS]
    missing += [f"/meta {key}" for key in REQUIRED_META if key not in meta]
    if missing:
        raise UsageError(f"{path} is not a complete meshmpi trace: it has no {missing[0]}")
    for key in ("hardware_json", "result_json", "warnings"):
        try:
            value = json.loads(meta.pop(key) if key.endswith("_json") else meta.get(key, "[]"))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{path}: /meta {key} is not valid JSON ({exc})") from None
        meta[key.removesuffix("_json")] = value
    if not isinstance(meta["hardware"], dict):
        raise UsageError(f"{path}: /meta hardware_json is not a JSON object")
    from_document(meta["hardware"], f"{path} (/meta hardware_json)")   # the profile's own checks
    if "modeled_cycles" not in meta:       # before schema 3: one mesh, its latest clock
        meta["modeled_cycles"] = float(counters["clock_cycles"].max(initial=0.0))
    for p in phases:
        p.setdefault("label", "")          # before schema 3
    return {"meta": meta, "counters": counters, "phases": phases, "steps": steps}


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _row(record) -> dict:
    return {name: _plain(record[name]) for name in record.dtype.names}
