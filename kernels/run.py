"""Run one kernel end to end: place inputs (host), run on the wafer (timed), check, report."""
from __future__ import annotations

import time

import numpy as np

from meshmpi import energy, host
from meshmpi.check import check_product
from meshmpi.errors import CheckError, UsageError

from . import baselines, gemm, gemv, summa

GEMM_ALGOS = ("meshgemm", "cannon", "summa") + baselines.STRATEGIES
GEMV_ALGOS = {"meshgemv": "ktree", "pipeline": "pipeline", "ring": "ring"}
BASELINE_ALGOS = baselines.STRATEGIES     # the systems WaferLLM is compared with (PAPER.md §8)


def _inputs(seed: int, dtype, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for shape in shapes]


def _checked(what: str, result, a, b, dtype) -> tuple[float | None, str | None]:
    """(max |error|, None) when ``result`` is within the bound of ``a @ b``, else
    (max |error| or None, the failure message)."""
    try:
        return check_product(what, result, a, b, dtype), None
    except CheckError as exc:
        with np.errstate(invalid="ignore"):
            error = float(np.nanmax(np.abs(np.asarray(result, np.float64) - np.asarray(a, np.float64) @ b)))
        return error, str(exc)


def _report(mesh, algo: str, sizes: dict, wall: float, error: float | None,
            failure: str | None = None) -> dict:
    hw = mesh.hardware
    cycles = mesh.modeled_cycles()
    compute = mesh.busy_cycles()
    counters = mesh.counters
    return {
        "algo": algo, "mesh": f"{mesh.rows}x{mesh.cols}", **sizes, "dry_run": mesh.dry_run,
        "hardware": hw.name, "ranks": mesh.size,
        "modeled_cycles": cycles, "modeled_seconds": hw.cycles_to_seconds(cycles),
        "compute_cycles": compute, "comm_cycles": cycles - compute,
        "efficiency": compute / cycles if cycles else 0.0,
        "max_hops_per_step": int(mesh.max_over_ranks(mesh.max_hops)),
        "routes_per_core_max": int(mesh.max_over_ranks(int(mesh.routes.peak.max(initial=0)))),
        "peak_bytes_per_core": int(mesh.max_over_ranks(int(mesh.memory.peak.max(initial=0)))),
        "messages": int(mesh.sum_over_ranks(int(counters["messages_sent"].sum()))),
        "bytes_moved": int(mesh.sum_over_ranks(int(counters["bytes_sent"].sum()))),
        "relays": int(mesh.sum_over_ranks(int(counters["relays"].sum()))),
        **energy.run_summary(mesh),
        "wall_seconds": wall, "max_abs_err": error,
        "check": None if mesh.dry_run else ("failed" if failure else "passed"),
        "check_failure": failure,
        "defects": None if mesh.defects is None else mesh.defects.stats(),
    }


def _timed(mesh, fn):
    """``fn()`` and its wall time, the slowest rank's; the compiled loops are loaded first."""
    gemm.warm_up()
    mesh.barrier()
    t0 = time.perf_counter()
    out = fn()
    return out, mesh.max_over_ranks(time.perf_counter() - t0)


def run_gemm(mesh, algo: str, m: int, k: int, n: int, dtype=np.float32, seed: int = 0,
             broadcast: str = "relay", **options) -> dict:
    """C = A @ B with A (m x k) and B (k x n) drawn from ``seed``; checked against numpy.
    ``broadcast`` (SUMMA only): ``relay`` (software chain) or ``direct`` (a route per root).
    The compared systems' algos (:data:`BASELINE_ALGOS`) run :func:`run_baseline` with
    ``options`` (routing, ring)."""
    if algo in BASELINE_ALGOS:
        return run_baseline(mesh, algo, k, n, dtype, seed, tokens=m, **options)
    kernel = gemm.MeshGemm(mesh, m, k, n, algo="cannon" if algo == "cannon" else "meshgemm", name=algo)
    plan = kernel.plan
    b_layout = plan.b_natural_layout() if algo == "summa" else kernel.b_layout
    a_mat = b_mat = None
    if not mesh.dry_run:
        a_mat, b_mat = _inputs(seed, dtype, (m, k), (k, n))
    a = host.scatter(mesh, f"{algo}.a", a_mat, kernel.a_layout, dtype)
    b = host.scatter(mesh, f"{algo}.b", b_mat, b_layout, dtype)
    if algo == "summa":
        c, wall = _timed(mesh, lambda: summa.summa(mesh, plan, a, b, name=algo, broadcast=broadcast))
    else:
        c, wall = _timed(mesh, lambda: kernel(a, b))
    error = failure = None
    if not mesh.dry_run:
        error, failure = _checked(f"{algo} C", host.gather(c), a_mat, b_mat, dtype)
    report = _report(mesh, algo, {"m": m, "k": k, "n": n}, wall, error, failure)
    report["broadcast"] = broadcast if algo == "summa" else None
    return report


def run_gemv(mesh, algo: str, m: int, n: int, groups: int | None = None, dtype=np.float32,
             seed: int = 0, forwarding: str = "stream") -> dict:
    """y = x @ W with x (1 x m) and W (m x n), reduced along the columns; checked against numpy."""
    kernel = gemv.MeshGemv(mesh, m, n, "y", algo=GEMV_ALGOS[algo], groups=groups, forwarding=forwarding, name=algo)
    x_vec = w_mat = None
    if not mesh.dry_run:
        x_vec, w_mat = _inputs(seed, dtype, (m,), (m, n))
    x = host.scatter(mesh, "gemv.x", x_vec, kernel.x_layout, dtype)
    w = host.scatter(mesh, "gemv.w", w_mat, kernel.w_layout, dtype)
    y, wall = _timed(mesh, lambda: kernel(x, w))
    error = failure = None
    if not mesh.dry_run:
        error, failure = _checked(f"{algo} y", host.gather(y), x_vec, w_mat, dtype)
    report = _report(mesh, algo, {"m": m, "k": None, "n": n}, wall, error, failure)
    report["groups"] = groups
    report["forwarding"] = forwarding
    return report


def run_baseline(mesh, algo: str, m: int, n: int, dtype=np.float32, seed: int = 0,
                 routing: str = "relay", ring: int | None = None, tokens: int | None = None) -> dict:
    """y = x @ W mapped as Megatron-LM, Ladder or T10 would (kernels/baselines.py); checked
    against numpy. ``routing`` (ladder): relayed or direct long-range fetches; ``ring`` (t10):
    the compute-shift ring size (default T10's own choice). With ``tokens``, the GEMM
    C = A @ B of A (tokens x m) and B (m x n) instead (the report names them m, k, n)."""
    plan = baselines.Plan(mesh.rows, mesh.cols, m, n)
    rows_of_x = () if tokens is None else (tokens,)
    if algo == "t10":
        sizes = baselines.ring_sizes(plan)
        ring = baselines.t10_ring(plan, mesh.hardware, tokens or 1) if ring is None else ring
        if ring not in sizes:
            raise UsageError(f"--ring {ring}: a T10 ring must tile the {plan.used_rows}x{plan.cols} "
                             f"cores it uses (one of {', '.join(map(str, sizes))})")
    x_vec = w_mat = None
    if not mesh.dry_run:
        x_vec, w_mat = _inputs(seed, dtype, rows_of_x + (m,), (m, n))
    with mesh.fabric.scope():
        if algo == "megatron":
            x_tiles = w_tiles = None
            if x_vec is not None:
                x_tiles = np.zeros((mesh.rows, mesh.cols) + x_vec.shape, dtype)
                x_tiles[0, 0] = x_vec
                w_tiles = plan.column_tiles(w_mat, plan.snake(), m)
            x = host.scatter_tiles(mesh, "megatron.x", x_tiles, rows_of_x + (m,), dtype)
            w = host.scatter_tiles(mesh, "megatron.w", w_tiles, (m, plan.width), dtype)
            y, wall = _timed(mesh, lambda: baselines.megatron(mesh, plan, x, w))
            order = plan.snake()
        elif algo == "ladder":
            h = -(-m // plan.used)
            tiles = None if x_vec is None else baselines.ladder_stored(plan, x_vec, w_mat)
            stored = host.scatter_tiles(mesh, "ladder.stored", tiles, ((tokens or 1) * h + h * plan.n_pad,), dtype)
            y, wall = _timed(mesh, lambda: baselines.ladder(mesh, plan, stored, routing=routing, tokens=tokens or 0))
            order = plan.row_major()
        else:
            chunk = -(-m // ring)
            x_tiles, w_tiles = (None, None) if x_vec is None else baselines.t10_tiles(plan, ring, x_vec, w_mat)
            x = host.scatter_tiles(mesh, "t10.x", x_tiles, rows_of_x + (chunk,), dtype)
            w = host.scatter_tiles(mesh, "t10.w", w_tiles, (ring, chunk, plan.width), dtype)
            y, wall = _timed(mesh, lambda: baselines.t10(mesh, plan, x, w, ring))
            order = plan.row_major()
    error = failure = None
    if not mesh.dry_run:
        result = plan.read_columns(host.gather_tiles(mesh, y), order)
        error, failure = _checked(f"{algo} {'C' if tokens else 'y'}", result, x_vec, w_mat, dtype)
    sizes = {"m": m, "k": None, "n": n} if tokens is None else {"m": tokens, "k": m, "n": n}
    report = _report(mesh, algo, sizes, wall, error, failure)
    report.update(cores_used=plan.used, columns_per_core=plan.width,
                  routing=routing if algo == "ladder" else None, ring=ring if algo == "t10" else None)
    return report
