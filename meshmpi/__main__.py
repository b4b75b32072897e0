"""``python -m meshmpi``: info about the installation, trace analysis, sweep collection, design-space sweeps."""
from __future__ import annotations

import platform
import sys

from . import __version__, cli, collect, compare, export, mpi_library_version, outputs, plots, sweep
from .errors import UsageError
from .hardware import BUILTIN, load_hardware
from .summary import AGGREGATES, format_summary, summarize
from .trace import read_trace

EXAMPLES = """\
  python -m meshmpi info
  mpiexec -n 4 python -m meshmpi info --json
  python -m meshmpi trace summary results/run/generate.h5
  python -m meshmpi trace plot results/run/generate.h5 -o results/run/plots
  python -m meshmpi trace compare meshgemm.h5 cannon.h5
  python -m meshmpi trace export results/run/generate.h5 -o generate.json
  python -m meshmpi results collect results/slurm/sweep-42 -o sweep.csv
  python -m meshmpi sweep --grid sram_bytes_per_core=24K,48K --out /tmp/sweep -- kernels gemv --mesh 8x8 --m 256 --n 256
"""


def info(args) -> int:
    from mpi4py import MPI
    import h5py
    import mpi4py
    import numpy
    doc = {
        "meshmpi": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
        "mpi4py": mpi4py.__version__, "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
        "mpi_library": mpi_library_version(), "mpi_world_size": MPI.COMM_WORLD.Get_size(),
        "profiles": {name: load_hardware(name).values() for name in BUILTIN},
    }
    if args.json:
        cli.print_json(doc)
        return 0
    lines = [f"meshmpi {doc['meshmpi']} (python {doc['python']}, numpy {doc['numpy']}, mpi4py {doc['mpi4py']}, "
             f"h5py {doc['h5py']} / HDF5 {doc['hdf5']})",
             f"MPI: {doc['mpi_library']}, world size {doc['mpi_world_size']}", "hardware profiles:"]
    for name in BUILTIN:
        hw = load_hardware(name)
        lines.append(f"  {name}: {hw.mesh_rows}x{hw.mesh_cols} cores, {hw.sram_bytes_per_core} B SRAM/core, "
                     f"{hw.clock_hz / 1e9:g} GHz, alpha {hw.alpha_cycles_per_hop:g}, beta {hw.beta_cycles_per_relay:g}, "
                     f"{hw.flops_per_cycle:g} FLOP/cycle, {hw.routes_per_core} routes/core "
                     f"(guessed: {', '.join(hw.guessed)})")
    cli.say("\n".join(lines))
    return 0


def trace_summary(args) -> int:
    if args.depth is not None and args.depth < 1:
        raise UsageError(f"--depth must be at least 1, got {args.depth}")
    summary = summarize(read_trace(args.file), args.aggregate, args.depth, args.phase)
    if args.json:
        cli.print_json(summary)
    else:
        cli.say(format_summary(summary))
    return 0


def build_parser():
    p = cli.parser("python -m meshmpi", "The meshmpi emulator runtime: installation info and traces.",
                   EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="versions, MPI library, hardware profiles")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=info)
    t = sub.add_parser("trace", help="look at HDF5 traces").add_subparsers(dest="trace_command", required=True)
    s = t.add_parser("summary", help="totals and per-phase table of one trace")
    s.add_argument("file")
    s.add_argument("--depth", type=int, metavar="N", help="only phases nested less than N deep (1: the top level)")
    s.add_argument("--phase", metavar="GLOB", help="only phases whose name matches, e.g. 'decode.layer0*'")
    s.add_argument("--aggregate", choices=AGGREGATES, default="kind",
                   help="group repeated phases: kind (default; layer numbers as *, all layers in one row), "
                        "name (one row per name, e.g. per layer), none (every instance)")
    s.add_argument("--json", action="store_true",
                   help="print the totals, the phases and their groups as one JSON object")
    s.set_defaults(func=trace_summary)
    for command in (plots, compare, export):
        command.register(t)
    collect.register(sub)
    sweep.register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "trace":
        inputs = getattr(args, "files", None) or [args.file]
        line = outputs.leftovers_line([p for path in inputs for p in outputs.leftovers(path)])
        if line:
            cli.say(line, file=sys.stderr)
    try:
        return args.func(args)
    except ValueError as exc:  # the collector's bad-input errors
        if args.command == "results":
            raise UsageError(str(exc)) from None
        raise


if __name__ == "__main__":
    cli.run(main)
