"""What every command shares: options, launch checks, one-line errors on every rank."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback

from mpi4py import MPI

from . import outputs
from .errors import MeshmpiError, UsageError
from .hardware import load_hardware
from .mesh import Mesh, choose_rank_grid, parse_grid
from .text import article, plural
from .threads import share_cores


def world_rank() -> int:
    return MPI.COMM_WORLD.Get_rank()


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (one line, rank 0) instead of printing on every rank."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")

    def _print_message(self, message, file=None):
        if world_rank() == 0:
            super()._print_message(message, file)


def parser(prog: str, description: str, examples: str = "") -> Parser:
    from . import __version__
    p = Parser(prog=prog, description=description,
               epilog=("examples:\n" + examples) if examples else None,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s (meshmpi {__version__})")
    return p


def help_text(doc: str) -> str:
    """A docstring as --help shows it: no reStructuredText markup (double backquotes, roles)."""
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc).replace("``", "")


def add_hardware_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hardware")
    g.add_argument("--hardware", default="wse2", metavar="NAME|PATH",
                   help="profile: wse2, wse3 or a JSON file (default wse2)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one profile value, e.g. --set beta_cycles_per_relay=8 (repeatable)")
    g.add_argument("--memory", choices=("strict", "warn"), default="strict",
                   help="over-full core memory: raise (strict) or record and go on (warn)")
    g.add_argument("--routes", choices=("strict", "warn"), default="strict",
                   help="routes over the router limit: raise (strict) or record and go on (warn)")


def add_defect_options(p: argparse.ArgumentParser) -> None:
    from .defects import MAX_RATE, parse_spec
    g = p.add_argument_group("defects")
    g.add_argument("--defects", type=parse_spec, metavar="FILE|RATE",
                   help=f"run on a wafer with dead cores, remapped around them (meshmpi/defects.py): a "
                        f"defect-map JSON file, or a rate in [0, {MAX_RATE}] of dead cores drawn at random")
    g.add_argument("--defect-seed", type=int, default=0, metavar="S", help="seed of the --defects RATE draw (default 0)")


def defects_text(stats: dict) -> str:
    """One line of a human report on the defect map."""
    return (f"{stats['dead_cores']:,} dead of a {stats['physical']} wafer ({stats['source']}; "
            f"{stats['spare_rows']} spare rows, {stats['spare_cols']} spare columns): "
            f"{stats['stretched_share']:.1%} of logical links stretched, the longest {stats['worst_stretch']} hops")


def add_run_options(p: argparse.ArgumentParser, dry_run: bool = True) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--rank-grid", metavar="RYxRX", help="how ranks tile the mesh (default: automatic)")
    if dry_run:
        g.add_argument("--dry-run", action="store_true",
                       help="payload-free run: every message, route, allocation and clock, no arithmetic")
    g.add_argument("--trace", metavar="FILE", help="write an HDF5 trace of the run")
    g.add_argument("--force", action="store_true",
                   help="overwrite an existing output file (--trace, --save-logits); without it that is an error")
    g.add_argument("--json", action="store_true", help="print one JSON object (rank 0) instead of text")


def check_outputs(args, *more) -> None:
    """Before the run: every output file (``--trace`` and ``more`` (path, option) pairs) can be
    written, and exists only with ``--force``; else the same one-line error on every rank."""
    outputs.check([(getattr(args, "trace", None), "--trace"), *more], force=getattr(args, "force", False))


def fresh_run_dir(base: str = "results/runs") -> str:
    """A new folder name ``base/<local time>`` (a suffix if it exists), the same on every rank."""
    name = None
    if world_rank() == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name, n = os.path.join(base, stamp), 1
        while os.path.exists(name):
            n += 1
            name = os.path.join(base, f"{stamp}-{n}")
    return MPI.COMM_WORLD.bcast(name, root=0)


def check_fits(args, region: tuple[int, int], label: str) -> None:
    """The job's ranks can be laid over ``region`` (named ``label`` in the error); with
    ``--rank-grid`` the mesh itself checks the grid given."""
    if getattr(args, "rank_grid", None):
        return
    size, shape = MPI.COMM_WORLD.Get_size(), f"{region[0]}x{region[1]}"
    try:
        choose_rank_grid(size, *region)
    except UsageError:
        raise UsageError(f"{plural(size, 'rank')} cannot be laid over {article(shape)} {shape} mesh, {label}: "
                         "a rank needs at least one core along each axis; use fewer ranks or a larger region") from None


def warn_summary(warnings) -> None:
    """One line (rank 0, stderr) for the limits a ``--memory warn`` / ``--routes warn`` run went over."""
    if warnings:
        say(f"warning: {plural(len(warnings), 'limit')} exceeded under --memory/--routes warn, the first: "
            f"{warnings[0]} (all in the JSON result's and the trace's \"warnings\")", file=sys.stderr)


def hardware_from_args(args):
    return load_hardware(args.hardware, args.set)


def mesh_from_args(args, rows: int, cols: int, hardware=None) -> Mesh:
    from .defects import remap_for
    grid = parse_grid(args.rank_grid, "rank-grid") if getattr(args, "rank_grid", None) else None
    defects = remap_for(getattr(args, "defects", None), getattr(args, "defect_seed", 0), rows, cols)
    return Mesh(rows, cols, hardware or hardware_from_args(args), rank_grid=grid,
                dry_run=getattr(args, "dry_run", False), memory=args.memory, routes=args.routes,
                defects=defects)


def print_json(obj) -> None:
    if world_rank() == 0:
        print(json.dumps(obj, indent=None, sort_keys=False, default=_json_default), flush=True)


def _json_default(value):
    import numpy as np
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def say(*parts, file=None, end="\n") -> None:
    """print on rank 0 only."""
    if world_rank() == 0:
        print(*parts, file=file or sys.stdout, end=end, flush=True)


def check_launch() -> None:
    """Refuse to run as N copies of a 1-rank job (SLURM started tasks, MPI found no PMI)."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS")
    if tasks and tasks.isdigit() and int(tasks) > 1 and MPI.COMM_WORLD.Get_size() == 1:
        raise UsageError(
            f"SLURM started {tasks} tasks but MPI sees a world of size 1: the MPI library did not "
            "find SLURM's PMI. Launch with 'srun --mpi=pmi2' (see 'srun --mpi=list') and an mpi4py "
            "built against an MPI that supports it")


def _abort(comm, code: int) -> None:
    """End the whole job. MPI_Abort can return on the calling rank (MPICH under hydra): then
    leave at once, skipping Python's exit handlers (MPI_Finalize would wait for the others).
    The short pause lets the launcher forward what this rank just wrote before it tears the
    job down (under load, hydra could drop a rank's last lines)."""
    time.sleep(0.25)
    comm.Abort(code)
    os._exit(code)


def run(main, argv=None) -> None:
    """Run a command's ``main(argv) -> int`` and exit; errors end the job on every rank.

    A collective error (bad input, memory or route limit: raised on every rank) is printed
    once by rank 0 and every rank exits 2. Any other exception is printed by the rank that
    raised it, which then aborts the whole MPI job, so nothing hangs.
    """
    comm = MPI.COMM_WORLD
    try:
        check_launch()
        share_cores()
        code = main(argv)
    except MeshmpiError as exc:
        if exc.collective:
            if comm.Get_rank() == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
        print(f"error (rank {comm.Get_rank()}): {exc}", file=sys.stderr, flush=True)
        _abort(comm, 2)
    except KeyboardInterrupt:
        _abort(comm, 130)
    except BrokenPipeError:
        # the reader went away (``... | head``): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except SystemExit:
        raise
    except BaseException:
        # one write, so the launcher cannot kill the job between the headline and the traceback
        report = f"error (rank {comm.Get_rank()}): unexpected failure, ending the job\n" + traceback.format_exc()
        sys.stderr.flush()
        os.write(2, report.encode())
        _abort(comm, 1)
    sys.exit(code or 0)
