"""``python -m kernels bench speed``: how fast the emulator itself runs.

- numeric MeshGEMM (default 2048³ on 16x16) on 1 and 2 ranks, one BLAS thread each, against
  the least the ranks must compute: each rank's share of the batched tile products, timed in
  the same run on as many processes at once, one thread each (the floor), that share with
  each step's copy of every A tile (the least that emulating the ring's moves adds, B's tiles
  being read where they started: the moves floor), and against ``numpy.matmul`` on as many
  threads;
- dry runs of MeshGEMM 2K and MeshGEMV 16K at paper-scale meshes (default 360² and 720²) on
  1 and 2 ranks: the kernel's wall time and the speed-up of 2 ranks over 1.

- with ``--llm`` instead (``speed_llm.csv``), the emulator on whole models (issue 13's
  table): a SmolLM2-135M-shaped model
  (30 layers, hidden 576, 9 and 3 kv heads, random BF16 weights) numeric on its smallest square
  region, 39x39, for a 32-token prompt: seconds to the first token (load, set-up, prefill) and
  per decoded token; the same model as a dry run on 360x360 with every layer simulated, and
  llama3-8b likewise on 420x420, each for the same prompt and one decode token: seconds to the
  first token (the prefill of every layer), for the decode token (every layer) and for the
  whole run, the prefill's steady layers advanced (:mod:`meshmpi.steady`) and each layer run
  (``--run-every-layer``); each on 1 and 2 ranks.

Each figure is the best of a few runs, alternated with its comparison so that both see the
same machine load; the 1-minute load average is recorded beside it, and so is this machine's
pace at the time (``reference_seconds``: 50,000 small numpy calls on one thread), since the
same code's wall times here vary by up to 2x from hour to hour. Every child run's
modeled cycles are written too (they must not depend on the rank count).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from meshmpi import cli
from meshmpi.errors import UsageError

NUMERIC = dict(mesh=16, size=2048, repeats=3)
DRY = dict(gemm_size=2048, gemv_size=16384, sides=(360, 720), repeats=1)
RANKS = (1, 2)
# SmolLM2-135M-Instruct's shapes (its config.json); random weights time the same as trained ones.
SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
PROMPT = 32
# (what, model (None: the SmolLM2-shaped checkpoint), mesh, dry run, new tokens, more options)
EVERY_LAYER = ("--run-every-layer",)
LLM = (("numeric smollm2-135m", None, "39x39", False, 4, ()),
       ("dry smollm2-135m all layers", None, "360x360", True, 2, ()),
       ("dry smollm2-135m all layers, each run", None, "360x360", True, 2, EVERY_LAYER),
       ("dry llama3-8b all layers", "llama3-8b", "420x420", True, 2, ()),
       ("dry llama3-8b all layers, each run", "llama3-8b", "420x420", True, 2, EVERY_LAYER))

_NUMPY_TIMER = """
import json, sys, time
import numpy as np
from kernels.run import _inputs
size, repeats = int(sys.argv[1]), int(sys.argv[2])
a, b = _inputs(0, np.float32, (size, size), (size, size))
np.matmul(a, b)
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    np.matmul(a, b)
    times.append(time.perf_counter() - t0)
print(json.dumps(min(times)))
"""

# This machine's pace at the emulator's kind of work, timed beside each row so that rows taken in
# different hours compare: small numpy calls and Python steps, one thread.
_REFERENCE_TIMER = """
import json, time
import numpy as np
x, y = np.ones((39, 20)), np.empty((39, 20))
times = []
for _ in range(3):
    t0 = time.perf_counter()
    for i in range(50000):
        np.add(x, i, out=y)
    times.append(time.perf_counter() - t0)
print(json.dumps(min(times)))
"""

# The least the ranks must compute, every rank at once as in the run they bound (they share the
# machine's cores, caches and memory): each rank's share of the block's batched tile products,
# one per step; and, second, the same with the least an emulator of the shifts must also do:
# every A tile of its share copied once per step (the ring's move along x), at this machine's
# memory speed; the products read B's tiles where they started (``kernels.gemm._b_read_in_place``).
# Each figure is the slowest rank's, the best of ``repeats``.
_FLOOR_TIMER = """
import json, sys, time
import numpy as np
from meshmpi import Mesh
side, size, repeats = (int(v) for v in sys.argv[1:4])
mesh = Mesh(side, side, memory="warn")       # the ranks, as the kernel's run lays them out
tile = size // side
rng = np.random.default_rng(mesh.rank)
a = rng.standard_normal(mesh.block_shape + (tile, tile)).astype(np.float32)
b = rng.standard_normal(mesh.block_shape + (tile, tile)).astype(np.float32)
c = np.zeros_like(a)
a_next = np.empty_like(a)
products, moves = [], []
for _ in range(repeats):
    mesh.barrier()
    t0 = time.perf_counter()
    for step in range(side):
        c += np.matmul(a, b)
    products.append(mesh.max_over_ranks(time.perf_counter() - t0))
    mesh.barrier()
    t0 = time.perf_counter()
    for step in range(side):
        c += np.matmul(a, b)
        np.copyto(a_next, a)
    moves.append(mesh.max_over_ranks(time.perf_counter() - t0))
if mesh.rank == 0:
    print(json.dumps([min(products), min(moves)]))
"""


def child_env(threads: int) -> dict:
    """The environment of a child run: no MPI launcher state, ``threads`` BLAS threads, this
    source tree first on the path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPIR_", "MPICH_", "SLURM_", "OMPI_"))}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launcher(ranks: int) -> list[str]:
    """``mpiexec -n ranks`` (the environment's own), or nothing for one rank."""
    return [] if ranks == 1 else [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)]


def kernel_command(ranks: int, kernel: str, algo: str, side: int, size: int, dry_run: bool,
                   hardware: tuple = ()) -> list[str]:
    """``[mpiexec -n ranks] python -m kernels gemm|gemv ... --json`` (``hardware``: extra
    ``--hardware``/``--set`` options)."""
    launcher = _launcher(ranks)
    shape = ["--m", str(size), "--k", str(size), "--n", str(size)] if kernel == "gemm" else \
        ["--m", str(size), "--n", str(size)]
    return launcher + [sys.executable, "-m", "kernels", kernel, "--algo", algo, "--mesh", f"{side}x{side}",
                       *shape, "--memory", "warn", *hardware, "--json"] + (["--dry-run"] if dry_run else [])


def _child_json(cmd, threads: int = 1):
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads), timeout=3600)
    if done.returncode:
        raise UsageError(f"speed: {' '.join(Path(c).name for c in cmd[:8])} ... failed: "
                         f"{done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shown(cmd) -> str:
    return " ".join(Path(c).name if i in (0, 3) and "/" in c else c for i, c in enumerate(cmd))


def reference_seconds() -> float:
    """This machine's pace now: 50,000 small numpy calls on one thread (:data:`_REFERENCE_TIMER`)."""
    return _child_json([sys.executable, "-c", _REFERENCE_TIMER])


def _row(what, side, size, ranks, seconds, report, cmd, **extra) -> dict:
    return {"what": what, "mesh": f"{side}x{side}", "size": size, "ranks": ranks, "wall_seconds": seconds,
            "floor_seconds": extra.get("floor"), "ratio_to_floor": extra.get("ratio"),
            "moves_floor_seconds": extra.get("moves"),
            "ratio_to_moves_floor": seconds / extra["moves"] if extra.get("moves") else None,
            "numpy_seconds": extra.get("numpy"), "speedup_over_1_rank": extra.get("speedup"),
            "modeled_cycles": report["modeled_cycles"], "layers_advanced": report.get("prefill_layers_advanced"),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(), "reference_seconds": extra.get("reference"), "command": _shown(cmd)}


def numeric_rows(mesh: int, size: int, repeats: int, bar, hardware: tuple = ()) -> list[dict]:
    """Numeric MeshGEMM on 1 and 2 ranks against the tile-product floor of each."""
    rows = []
    numpy_seconds = min(_child_json([sys.executable, "-c", _NUMPY_TIMER, str(size), "3"], max(RANKS))
                        for _ in range(repeats))
    for ranks in RANKS:
        cmd = kernel_command(ranks, "gemm", "meshgemm", mesh, size, dry_run=False, hardware=hardware)
        floor_cmd = _launcher(ranks) + [sys.executable, "-c", _FLOOR_TIMER, str(mesh), str(size), "2"]
        wall, floor, moves, report = float("inf"), float("inf"), float("inf"), None
        for _ in range(repeats):
            report = _child_json(cmd)
            wall = min(wall, report["wall_seconds"])
            products, with_moves = _child_json(floor_cmd)
            floor, moves = min(floor, products), min(moves, with_moves)
            bar.update()
        rows.append(_row("numeric meshgemm", mesh, size, ranks, wall, report, cmd, floor=floor,
                         ratio=wall / floor, moves=moves, numpy=numpy_seconds, reference=reference_seconds()))
    return rows


def dry_rows(sides, gemm_size: int, gemv_size: int, repeats: int, bar, hardware: tuple = ()) -> list[dict]:
    """Dry-run MeshGEMM and MeshGEMV on each side, on 1 and 2 ranks."""
    rows = []
    for kernel, algo, size in (("gemm", "meshgemm", gemm_size), ("gemv", "meshgemv", gemv_size)):
        for side in sides:
            one = None
            for ranks in RANKS:
                cmd = kernel_command(ranks, kernel, algo, side, size, dry_run=True, hardware=hardware)
                reports = []
                for _ in range(repeats):
                    reports.append(_child_json(cmd))
                    bar.update()
                wall = min(r["wall_seconds"] for r in reports)
                one = wall if ranks == 1 else one
                rows.append(_row(f"dry {algo}", side, size, ranks, wall, reports[0], cmd,
                                 speedup=one / wall if ranks > 1 else None, reference=reference_seconds()))
    return rows


def generate_command(ranks: int, model: str, mesh: str, dry_run: bool, new_tokens: int, prompt: int,
                     hardware: tuple = ()) -> list[str]:
    """``[mpiexec -n ranks] python -m llm generate ... --layers all --json --quiet``."""
    launcher = _launcher(ranks)
    shape = ["--prompt-len", str(prompt), "--dry-run"] if dry_run else \
        ["--prompt-ids", ",".join(str(1 + i) for i in range(prompt)), "--ignore-eos"]
    return launcher + [sys.executable, "-m", "llm", "generate", "--model", model, "--mesh", mesh, *shape,
                       "--max-new-tokens", str(new_tokens), "--layers", "all", *hardware, "--json", "--quiet"]


def write_smol(directory: Path, config: dict = SMOL) -> str:
    """A checkpoint of ``config``'s shapes with random BF16 weights in ``directory``."""
    from llm.checkpoint import random_weights, save_checkpoint
    from llm.config import LlamaConfig
    shapes = LlamaConfig(**config)
    save_checkpoint(directory, shapes, random_weights(shapes, seed=0), dtype="bfloat16")
    return str(directory)


def llm_rows(runs, smol: str, prompt: int, bar, hardware: tuple = ()):
    """Each of ``runs`` (see :data:`LLM`) on 1 and 2 ranks: a numeric run gives the seconds to
    the first token and per decoded token, a dry run its whole wall time too (rows yielded as
    each run ends)."""
    for what, model, mesh, dry_run, new_tokens, options in runs:
        side = int(mesh.split("x")[0])
        one = {}
        for ranks in RANKS:
            cmd = generate_command(ranks, model or smol, mesh, dry_run, new_tokens, prompt, hardware + options)
            report = _child_json(cmd)
            reference = reference_seconds()
            bar.update()
            report["modeled_cycles"] = report["modeled_prefill_cycles"] + report["modeled_decode_cycles"]
            parts = [(", first token", report["wall_first_token_seconds"]),
                     (", per decoded token", report["wall_decode_seconds_per_token"])]
            if dry_run:
                parts.append((", whole run", report["wall_seconds"]))
            for part, seconds in parts:
                one.setdefault(part, seconds)
                shown = [c if c != smol else "<smollm2-135m-shaped>" for c in cmd]    # a temporary folder
                yield _row(what + part, side, prompt, ranks, seconds, report, shown,
                           speedup=one[part] / seconds if ranks > 1 else None, reference=reference)


def bench_speed(args, sides, out: Path, table_class, progress) -> list[dict]:
    """Write <out>/speed.csv (rank 0 runs every child): dry runs on ``sides``, the numeric
    MeshGEMM of ``--size``; with ``--llm`` <out>/speed_llm.csv, the whole models instead.
    ``--hardware`` and ``--set`` are passed to every child."""
    if cli.world_rank() != 0:
        return []
    size = args.size or NUMERIC["size"]
    if size < 1:
        raise UsageError("--size must be positive")
    hardware = ("--hardware", args.hardware) + tuple(a for kv in args.set for a in ("--set", kv))
    table = table_class(out / ("speed_llm.csv" if args.llm else "speed.csv"))
    runs = len(RANKS) * (len(LLM) if args.llm else NUMERIC["repeats"] + 2 * len(sides) * DRY["repeats"])
    with progress(runs, "speed") as bar:
        if args.llm:
            with tempfile.TemporaryDirectory() as smol:
                for row in llm_rows(LLM, write_smol(Path(smol)), PROMPT, bar, hardware):
                    table.add(row)
        else:
            for row in numeric_rows(NUMERIC["mesh"], size, NUMERIC["repeats"], bar, hardware):
                table.add(row)
            for row in dry_rows(sides, DRY["gemm_size"], DRY["gemv_size"], DRY["repeats"], bar, hardware):
                table.add(row)
    rows = table.close()
    for r in rows:
        extra = (f", {r['ratio_to_floor']:.2f}x the tile-product floor, {r['ratio_to_moves_floor']:.2f}x with "
                 f"the tiles' moves" if r["ratio_to_floor"] else "") + \
                (f", {r['speedup_over_1_rank']:.2f}x over 1 rank" if r["speedup_over_1_rank"] else "")
        cli.say(f"speed: {r['what']} {r['size']} on {r['mesh']}, {r['ranks']} rank(s): "
                f"{r['wall_seconds']:.3f} s{extra}", file=sys.stderr)
    return rows
