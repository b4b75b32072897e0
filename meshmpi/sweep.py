"""``python -m meshmpi sweep``: one command at every point of a grid over the hardware profile
(PAPER.md §9: "better core design? better interconnect designs?").

    python -m meshmpi sweep --grid sram_bytes_per_core=24K,48K link_bytes_per_cycle=4,8 \\
        --out results/runs/sram -- kernels gemv --algo meshgemv --mesh 8x8 --m 256 --n 256 --dry-run

Each ``--grid KEY=V1,V2,...`` names a profile parameter (``python -m meshmpi info``; whole
numbers take K, M and G suffixes, 1024-based) or ``mesh`` (the command's ``--mesh``). The
command after ``--`` (``kernels gemm|gemv ...`` or ``llm generate ...``) runs once per point of
the grid's product, as its own process (``--ranks N``: under ``mpiexec -n N``) with
``--hardware`` and one ``--set`` per swept parameter, and prints its JSON result. The points'
values and the flattened results make ``<out>/sweep.csv`` (a failed point keeps its row, with
the first line of its error); ``<out>/sweep.png`` plots against each swept value the decode
tokens/s and the decode energy per token (``llm generate``) or the modeled time and the energy
(kernels), one line per combination of the other swept values.

On a cluster, ``--slurm TABLE`` writes the points as a table for ``slurm/submit_sweep.sh``
instead of running them; once the array job has run, the same command with ``--from
results/slurm/sweep-<id>`` builds the table and the plot from its tasks' JSON files.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from mpi4py import MPI

from . import cli, outputs
from .benchtools import add_out_options, figure, out_dir, progress, read_csv, save_figure
from .collect import flatten, write_csv
from .errors import UsageError
from .hardware import SCHEMA, load_hardware
from .mesh import parse_grid

COMMANDS = (("kernels", "gemm"), ("kernels", "gemv"), ("llm", "generate"))
OWN_OPTIONS = {"--hardware": "give the base profile to the sweep's own --hardware",
               "--json": "the sweep adds it to every point",
               "--trace": "every point would write the same file"}
LAUNCHER_STATE = ("PMI_", "PMIX_", "HYDRA_", "MPIR_", "MPICH_", "SLURM_", "OMPI_")
METRICS = {  # command -> (column, axis label) of the two plotted metrics
    "llm": (("modeled_decode_tokens_per_s", "decode tokens/s per request"),
            ("energy_decode_joules_per_token", "decode energy per token (J)")),
    "kernels": (("modeled_seconds", "modeled seconds"), ("energy_joules", "energy (J)")),
}


def parse_axes(items, hardware) -> list[tuple[str, list[str], list]]:
    """``KEY=V1,V2`` items as (key, texts, values), each value checked as ``--set`` checks it."""
    axes = []
    for item in items:
        key, sep, raw = item.partition("=")
        texts = [t.strip() for t in raw.split(",")] if sep else []
        if not sep or not all(texts):
            raise UsageError(f"--grid expects KEY=V1,V2,... got {item!r}")
        if key == "mesh":
            values = [parse_grid(t) for t in texts]
            values = [rows * cols for rows, cols in values]
        elif key in SCHEMA:
            values = [getattr(hardware.with_overrides([f"{key}={t}"]), key) for t in texts]
        else:
            raise UsageError(f"--grid {key}: not a profile parameter ({', '.join(SCHEMA)}) nor mesh")
        if key in (a[0] for a in axes):
            raise UsageError(f"--grid {key} is given twice")
        axes.append((key, texts, values))
    if not axes:
        raise UsageError("give at least one --grid KEY=V1,V2,...")
    return axes


def check_command(command: list[str]) -> list[str]:
    if command and command[0] == "--":
        command = command[1:]
    if tuple(command[:2]) not in COMMANDS:
        raise UsageError("after --, give the command to sweep: kernels gemm|gemv ... or llm generate ... "
                         f"(got {shlex.join(command[:2]) or 'nothing'})")
    for option, reason in OWN_OPTIONS.items():
        if any(word == option or word.startswith(option + "=") for word in command):
            raise UsageError(f"the swept command may not set {option}: {reason}")
    return command


def point_commands(axes, command, hardware: str) -> list[tuple[dict, list[str]]]:
    """Every point of the grid: (its values by key, the command's words after ``python -m``)."""
    points = []
    for combination in itertools.product(*(range(len(texts)) for _, texts, _ in axes)):
        words, values = list(command), {}
        for (key, texts, parsed), index in zip(axes, combination):
            values[f"grid.{key}"] = parsed[index]
            if key == "mesh":
                words = _replace_mesh(words, texts[index])
            else:
                words += ["--set", f"{key}={texts[index]}"]
        points.append((values, words + ["--hardware", hardware]))
    return points


def _replace_mesh(words: list[str], mesh: str) -> list[str]:
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word == "--mesh":
            skip = True
        elif not word.startswith("--mesh="):
            out.append(word)
    return out + ["--mesh", mesh]


def launcher(ranks: int) -> list[str]:
    """How a point is started: this Python, under ``mpiexec -n ranks`` when ranks > 1."""
    if ranks == 1:
        return [sys.executable]
    mpiexec = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                            os.environ.get("PATH", "")]))
    if mpiexec is None:
        raise UsageError("--ranks needs mpiexec on PATH or beside this Python")
    return [mpiexec, "-n", str(ranks), sys.executable]


def run_point(launch: list[str], words: list[str]) -> dict:
    """One point's flattened JSON result, or ``{"error": ...}``."""
    # a fresh job: none of this process's MPI launcher state (it may run under mpiexec -n 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_STATE)}
    done = subprocess.run(launch + ["-m", *words, "--json"], capture_output=True, text=True, env=env)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error")]
    if done.returncode:
        return {"error": lines[0] if lines else f"exit status {done.returncode}"}
    try:
        return flatten(json.loads(done.stdout.strip().splitlines()[-1]))
    except (IndexError, json.JSONDecodeError):
        return {"error": "the command printed no JSON result"}


def read_point(directory: Path, index: int) -> dict:
    """Task ``index``'s result of a SLURM array job (``slurm/sweep.sbatch`` writes <index>.json)."""
    path = directory / f"{index}.json"
    try:
        return flatten(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError):
        return {"error": f"no JSON result in {path}"}


def write_table(path: Path, rows: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            write_csv(rows, f)
    outputs.write_atomic(path, write)


def write_slurm_table(path: Path, points, ranks: int) -> None:
    """The points as rows of ``slurm/sweep.tsv``'s format (ranks, command, mesh, variant, options)."""
    lines = ["#ranks\tcommand\tmesh\tvariant\toptions"]
    for _, words in points:
        lines.append("\t".join([str(ranks), " ".join(words[:2]), "-", "-", shlex.join(words[2:])]))
    outputs.write_atomic(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def plot(rows: list[dict], keys: list[str], family: str, path: Path) -> None:
    """Each metric (rows) against each swept key (columns), a line per other combination."""
    plt, fig, axes = figure(len(keys), 2)
    for column, key in enumerate(keys):
        others = [k for k in keys if k != key]
        groups: dict = {}
        for row in rows:
            groups.setdefault(tuple(row[k] for k in others), []).append(row)
        for line, members in groups.items():
            members = sorted(members, key=lambda r: r[key])
            label = ", ".join(f"{k.removeprefix('grid.')}={v}" for k, v in zip(others, line)) or None
            for plot_row, (metric, _) in enumerate(METRICS[family]):
                points = [(r[key], r[metric]) for r in members if _number(r.get(metric))]
                if points:
                    axes[plot_row][column].plot(*zip(*points), marker="o", label=label)
        for plot_row, (_, title) in enumerate(METRICS[family]):
            ax = axes[plot_row][column]
            ax.set_xlabel("cores (mesh)" if key == "grid.mesh" else key.removeprefix("grid."))
            ax.set_ylabel(title)
            if ax.get_legend_handles_labels()[0] and others:
                ax.legend(fontsize=6)
    save_figure(plt, fig, path)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run(args) -> int:
    if MPI.COMM_WORLD.Get_size() > 1:
        raise UsageError("run sweep without mpiexec: it starts every point itself (--ranks N for MPI)")
    if args.ranks < 1:
        raise UsageError(f"--ranks must be at least 1, got {args.ranks}")
    command = check_command(args.command)
    axes = parse_axes(args.grid, load_hardware(args.hardware))
    keys = [f"grid.{key}" for key, _, _ in axes]
    points = point_commands(axes, command, args.hardware)
    if args.slurm:
        write_slurm_table(Path(args.slurm), points, args.ranks)
        cli.say(f"wrote {args.slurm} ({len(points)} points); submit it with: slurm/submit_sweep.sh {args.slurm}; "
                "then rerun this command with --from results/slurm/sweep-<job id> instead of --slurm",
                file=sys.stderr)
        return 0
    out = out_dir(args)
    table = out / "sweep.csv"
    if args.replot:
        rows = read_csv(table)
    else:
        rows = []
        launch = launcher(args.ranks)
        with progress(len(points), "sweep") as bar:
            for index, (values, words) in enumerate(points):
                result = read_point(Path(args.source), index) if args.source else run_point(launch, words)
                rows.append({**values, "command": shlex.join(words), **result})
                write_table(table, rows)
                bar.update()
        cli.say(f"wrote {table}", file=sys.stderr)
    plot(rows, keys, command[0], out / "sweep.png")
    failed = [row for row in rows if row.get("error")]
    if failed:
        cli.say(f"warning: {len(failed)} of {len(rows)} points failed, the first: {failed[0]['error']}",
                file=sys.stderr)
    return 0


EXAMPLES = """\
  python -m meshmpi sweep --grid sram_bytes_per_core=24K,48K link_bytes_per_cycle=4,8 --out /tmp/sweep \\
      -- kernels gemv --algo meshgemv --mesh 8x8 --m 256 --n 256 --dry-run
  python -m meshmpi sweep --hardware wse3 --grid sram_bytes_per_core=48K,96K mesh=360x360,420x420 \\
      -- llm generate --model llama3-8b --dry-run --prompt-len 4096 --max-new-tokens 4 --layers 1
  python -m meshmpi sweep --grid beta_cycles_per_relay=8,16 --slurm sweep.tsv -- kernels gemv --mesh 64x64 --m 4096 --n 4096
"""


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a command at every point of a grid of profile overrides",
                       description=cli.help_text(__doc__), epilog="examples:\n" + EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", nargs="+", action="extend", required=True, metavar="KEY=V1,V2",
                   help="swept values of a profile parameter or of mesh (repeat or list several)")
    p.add_argument("--hardware", default="wse2", metavar="NAME|PATH", help="the base profile (default wse2)")
    p.add_argument("--ranks", type=int, default=1, help="MPI ranks per point (default 1)")
    add_out_options(p, "sweep.png", "sweep.csv")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--slurm", metavar="TABLE", help="write the points as a slurm/submit_sweep.sh table, run nothing")
    where.add_argument("--from", dest="source", metavar="DIR",
                       help="take each point's result from DIR/<point>.json (a finished --slurm array job)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command after python -m")
    p.set_defaults(func=run)
