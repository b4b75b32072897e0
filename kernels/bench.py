"""``python -m kernels bench``: the paper's kernel microbenchmarks on the emulated wafer.

- ``gemm``: GEMM 2K and 8K on square meshes 16² .. 720² (dry runs): modeled cycles split into
  compute and communication, efficiency, routes and memory per core, for MeshGEMM, Cannon and
  SUMMA (relayed broadcasts; direct multicasts under ``--routes warn`` as the optimistic bound).
- ``gemv``: GEMV 2K .. 32K against the mesh size for MeshGEMV (K-tree), pipeline and ring.
- ``groups``: MeshGEMV 16K on 360² against the number of K-tree groups.
- ``calibrate``: the (flops_per_cycle, beta) that reproduce the paper's two WSE-2 GEMV latencies
  on 512² and on 256², each fit checked against the figures it was not fitted to, and the
  sensitivity of the headline numbers to beta.
- ``speed``: the emulator's own speed: numeric MeshGEMM 2048³ on 16x16 against the tile-product
  floor measured in the same run, and dry-run MeshGEMM and MeshGEMV wall times on 360² and
  720², each on 1 and 2 ranks (child runs; ``--meshes`` sets the dry-run sides, ``--size`` the
  numeric size).
- ``baselines``: MeshGEMV against the Megatron-LM, Ladder and T10 style GEMVs at paper scale
  (kernels/bench_baselines.py).
- ``defects``: MeshGEMM 2K on 180² and MeshGEMV 16K on 360², on wafers with dead cores,
  remapped, against the defect rate (``--rates``, ``--seeds`` draws each; kernels/bench_defects.py).
- ``all``: everything above.

Rank 0 writes <out>/<bench>.csv and <out>/<bench>.png, the CSV rewritten as each row completes
(an interrupted bench keeps the rows it finished). --out defaults to a new folder
results/runs/<time>; --out results refreshes the committed tables and figures. The sweeps run
on the ranks of the job (dry runs: modeled numbers do not depend on the rank split).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from pathlib import Path


from meshmpi import cli
from meshmpi.errors import UsageError
from meshmpi.benchtools import (DEFECT_RATES, CsvTable, _is_root, add_out_options, figure, mesh_axis, out_dir,
                                parse_rates, parse_sides, progress, read_csv, save_figure, write_csv)
from meshmpi.hardware import load_hardware
from meshmpi.mesh import Mesh

from . import bench_defects, speed
from .run import GEMV_ALGOS, run_gemm, run_gemv

BENCHES = ("gemm", "gemv", "groups", "calibrate", "speed", "baselines", "defects")
GEMM_SIZES = (2048, 8192)
GEMM_MESHES = (16, 32, 64, 90, 180, 360, 720)
GEMM_VARIANTS = (("meshgemm", None), ("cannon", None), ("summa", "relay"), ("summa", "direct"))
GEMV_SIZES = (2048, 4096, 8192, 16384, 32768)
GEMV_MESHES = (64, 128, 180, 256, 360, 540, 720)
GROUP_MESH, GROUP_SIZE = 360, 16384
GROUP_COUNTS = (1, 2, 3, 4, 6, 9, 12, 15, 19, 24, 30, 40, 60, 90, 180, 360)
# The paper's WSE-2 GEMV latencies (PAPER.md §3), fitted on the largest square mesh it scales to.
PAPER_GEMV_CYCLES = {16384: 1320.0, 32768: 2233.0}
CALIBRATION_SIDES = (512, 256)   # sides that divide 16K and 32K (PAPER.md §3)
GEMM_CHECK_SIDE = 720            # where the paper states the GEMM efficiencies
SENSITIVITY_BETAS = (0.0, 4.0, 16.0, 64.0)

EXAMPLES = """\
  python -m kernels bench all --out results
  python -m kernels bench gemm --meshes 16,32,64 --out /tmp/bench
  python -m kernels bench gemv --hardware results/calibration/wse2_calibrated_256.json --out /tmp/bench
  mpiexec -n 2 python -m kernels bench groups --out results
"""


def register(sub) -> None:
    p = sub.add_parser("bench", help="the paper's kernel benchmarks (CSV + PNG)",
                       description=cli.help_text(__doc__), epilog="examples:\n" + EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=BENCHES + ("all",), help="which benchmark")
    add_out_options(p, "PNGs", "CSVs")
    p.add_argument("--json", action="store_true", help="print the rows of each bench as one JSON object")
    p.add_argument("--meshes", metavar="N,N,...", help="square mesh sides (overrides the defaults)")
    p.add_argument("--hardware", default="wse2", metavar="NAME|PATH", help="profile (default wse2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one profile value (repeatable)")
    p.add_argument("--size", type=int, metavar="N", help="speed: the numeric MeshGEMM's M = K = N (default 2048)")
    p.add_argument("--rates", default=DEFECT_RATES, metavar="R,R,...",
                   help=f"defects: the dead-core rates (default {DEFECT_RATES})")
    p.add_argument("--seeds", type=int, default=3, metavar="K", help="defects: draws of the dead cores per rate (default 3)")
    p.add_argument("--llm", action="store_true",
                   help="speed: whole models instead, into speed_llm.csv (SmolLM2-135M-shaped numeric and dry, "
                        "llama3-8b dry; long)")
    p.set_defaults(func=run_bench)


# ---------------------------------------------------------------------------- plumbing
def _quiet():
    """Route-limit and memory warnings of the warn-policy runs go to the CSV, not the terminal."""
    return contextlib.redirect_stderr(io.StringIO())


def _dry(side: int, hardware, fn, *, routes: str = "strict", defects=None):
    mesh = Mesh(side, side, hardware, dry_run=True, memory="warn", routes=routes, defects=defects)
    try:
        with _quiet():
            return fn(mesh)
    finally:
        mesh.free()


def _fits(report: dict, hardware) -> dict:
    return {"fits_sram": report["peak_bytes_per_core"] <= hardware.sram_bytes_per_core,
            "fits_routes": report["routes_per_core_max"] <= hardware.routes_per_core}


def _label(algo: str, broadcast) -> str:
    return f"{algo} ({broadcast})" if broadcast else algo


KEEP = ("modeled_cycles", "compute_cycles", "comm_cycles", "efficiency", "max_hops_per_step",
        "routes_per_core_max", "peak_bytes_per_core", "messages", "bytes_moved", "relays", "wall_seconds")


# ---------------------------------------------------------------------------- GEMM
def bench_gemm(args, hardware, out: Path) -> list[dict]:
    sides = parse_sides(args, GEMM_MESHES)
    jobs = [(size, side, algo, bc) for size in GEMM_SIZES for side in sides for algo, bc in GEMM_VARIANTS]
    rows = CsvTable(out / "gemm.csv")
    with progress(len(jobs), "gemm") as bar:
        for size, side, algo, broadcast in jobs:
            bar.set_postfix_str(f"{size} {side}x{side} {_label(algo, broadcast)}")
            routes = "warn" if broadcast == "direct" else "strict"
            report = _dry(side, hardware, lambda mesh: run_gemm(
                mesh, algo, size, size, size, broadcast=broadcast or "relay"), routes=routes)
            rows.add({"size": size, "mesh": side, "algo": algo, "broadcast": broadcast or "",
                      **{k: report[k] for k in KEEP}, **_fits(report, hardware)})
            bar.update()
    rows = rows.close()
    if _is_root():
        plot_gemm(rows, out / "gemm.png", hardware.name)
    return rows


def plot_gemm(rows: list[dict], path: Path, hardware_name: str) -> None:
    plt, fig, axes = figure(len(GEMM_SIZES), 2)
    for col, size in enumerate(GEMM_SIZES):
        for index, (algo, broadcast) in enumerate(GEMM_VARIANTS):
            sel = [r for r in rows if r["size"] == size and r["algo"] == algo
                   and r["broadcast"] == (broadcast or "")]
            x = [r["mesh"] for r in sel]
            style = dict(marker="o", color=f"C{index}", linestyle="--" if broadcast == "direct" else "-")
            axes[0, col].plot(x, [r["modeled_cycles"] for r in sel], label=_label(algo, broadcast), **style)
            axes[1, col].plot(x, [100 * r["efficiency"] for r in sel], label=_label(algo, broadcast), **style)
        axes[0, col].set(yscale="log", title=f"GEMM {size // 1024}K ({hardware_name})",
                         xlabel="cores per side", ylabel="modeled cycles")
        axes[1, col].set(ylim=(0, 100), xlabel="cores per side",
                         ylabel="compute efficiency %")
        for ax in axes[:, col]:
            mesh_axis(ax, [r["mesh"] for r in rows])
        axes[0, col].legend(fontsize=7)
        axes[1, col].axhline(70, color="grey", linewidth=0.5)
        axes[1, col].axhline(50, color="grey", linewidth=0.5)
    save_figure(plt, fig, path)


# ---------------------------------------------------------------------------- GEMV
def bench_gemv(args, hardware, out: Path) -> list[dict]:
    sides = parse_sides(args, GEMV_MESHES)
    jobs = [(size, side, algo) for size in GEMV_SIZES for side in sides for algo in GEMV_ALGOS]
    rows = CsvTable(out / "gemv.csv")
    with progress(len(jobs), "gemv") as bar:
        for size, side, algo in jobs:
            bar.set_postfix_str(f"{size} {side}x{side} {algo}")
            report = _dry(side, hardware, lambda mesh: run_gemv(mesh, algo, size, size))
            rows.add({"size": size, "mesh": side, "algo": algo, **{k: report[k] for k in KEEP},
                         **_fits(report, hardware)})
            bar.update()
    rows = rows.close()
    if _is_root():
        plot_gemv(rows, out / "gemv.png", hardware.name)
    return rows


def plot_gemv(rows: list[dict], path: Path, hardware_name: str) -> None:
    sizes = sorted({r["size"] for r in rows})
    plt, fig, axes = figure(len(sizes), width=3.4)
    for col, size in enumerate(sizes):
        ax = axes[0, col]
        for algo in GEMV_ALGOS:
            sel = [r for r in rows if r["size"] == size and r["algo"] == algo]
            ax.plot([r["mesh"] for r in sel], [r["modeled_cycles"] for r in sel], marker="o", label=algo)
        ax.set(yscale="log", title=f"GEMV {size // 1024}K", xlabel="cores per side")
        mesh_axis(ax, [r["mesh"] for r in rows])
        if size in PAPER_GEMV_CYCLES:
            ax.axhline(PAPER_GEMV_CYCLES[size], color="grey", linestyle=":", label="paper (WSE-2)")
    axes[0, 0].set_ylabel(f"modeled cycles ({hardware_name})")
    axes[0, -1].legend(fontsize=7)
    save_figure(plt, fig, path)


def bench_groups(args, hardware, out: Path) -> list[dict]:
    side = parse_sides(args, (GROUP_MESH,))[0]
    counts = [g for g in GROUP_COUNTS if g <= side]
    rows = CsvTable(out / "groups.csv")
    with progress(len(counts), "groups") as bar:
        for groups in counts:
            report = _dry(side, hardware, lambda mesh: run_gemv(mesh, "meshgemv", GROUP_SIZE, GROUP_SIZE, groups))
            rows.add({"size": GROUP_SIZE, "mesh": side, "groups": groups, "group_size": side / groups,
                         **{k: report[k] for k in KEEP}})
            bar.update()
    rows = rows.close()
    if _is_root():
        plot_groups(rows, out / "groups.png", hardware.name)
    return rows


def plot_groups(rows: list[dict], path: Path, hardware_name: str) -> None:
    side = rows[0]["mesh"]
    plt, fig, axes = figure(1, width=5)
    ax = axes[0, 0]
    ax.plot([r["groups"] for r in rows], [r["modeled_cycles"] for r in rows], marker="o", label="modeled")
    ax.plot([r["groups"] for r in rows], [r["comm_cycles"] for r in rows], marker=".", label="communication")
    ax.axvline(math.sqrt(side), color="grey", linestyle=":", label="G = sqrt(N)")
    ax.set(xscale="log", xlabel="K-tree groups G per column", ylabel="cycles",
           title=f"MeshGEMV {GROUP_SIZE // 1024}K on {side}x{side} ({hardware_name})")
    ax.legend(fontsize=7)
    save_figure(plt, fig, path)


PLOTS = {"gemm": plot_gemm, "gemv": plot_gemv, "groups": plot_groups, "defects": bench_defects.plot_defects}


def replot(which, hardware, out: Path) -> None:
    """Redraw the PNGs from the CSVs already in ``out`` (no runs)."""
    for name in which:
        path = out / f"{name}.csv"
        if name in PLOTS and path.is_file() and _is_root():
            PLOTS[name](read_csv(path), out / f"{name}.png", hardware.name)


# ---------------------------------------------------------------------------- calibration
def bench_calibrate(args, hardware, out: Path) -> list[dict]:
    """Fit (flops_per_cycle, beta) to the paper's GEMV 16K and 32K latencies on each mesh side
    the hardware could have run them on (PAPER.md §3: the side divides the vector, so 512 or
    256), every other constant as the profile has it; then check each fit against the figures
    it was not fitted to: MeshGEMV over the pipeline allreduce (4-8x) and the GEMM efficiency
    claims at 720² (MeshGEMM > 70%, Cannon and SUMMA < 50%). Writes into ``<out>/calibration``."""
    sides = parse_sides(args, CALIBRATION_SIDES)
    out = out / "calibration"
    table = CsvTable(out / "calibration.csv")
    with progress(len(sides), "calibrate") as bar:
        for side in sides:
            table.add(_calibrate_side(hardware, side))
            bar.update()
    rows = table.close()
    if _is_root():
        for row in rows:
            doc = json.loads(hardware.to_json())
            source = (f"calibration: fitted so that MeshGEMV 16K and 32K on {row['mesh']}x{row['mesh']} take the "
                      f"paper's WSE-2 latencies (1,320 and 2,233 cycles), other constants as {hardware.name}; "
                      f"see results/README.md")
            for key in ("flops_per_cycle", "beta_cycles_per_relay"):
                doc[key] = {"value": row[key], "source": source, "guessed": True}
            doc["name"] = f"{hardware.name}-calibrated-{row['mesh']}"
            doc["description"] = doc.get("description", "") + f" Calibrated on the paper's GEMV latencies, {row['mesh']}²."
            (out / f"{hardware.name}_calibrated_{row['mesh']}.json").write_text(json.dumps(doc, indent=2) + "\n")
            cli.say(f"{row['mesh']}²: flops_per_cycle={row['flops_per_cycle']:.3g} beta={row['beta_cycles_per_relay']:.3g} "
                    f"-> 16K {row['gemv16k_cycles']:.0f}, 32K {row['gemv32k_cycles']:.0f} cycles; MeshGEMV over "
                    f"pipeline {row['pipeline_ratio_16k']:.1f}x / {row['pipeline_ratio_32k']:.1f}x; GEMM 2K at "
                    f"720²: MeshGEMM {row['meshgemm_eff_720']:.0%}, Cannon {row['cannon_eff_720']:.0%}, "
                    f"SUMMA {row['summa_eff_720']:.0%}", file=sys.stderr)
    best = min(rows, key=lambda r: abs(r["gemv16k_cycles"] - PAPER_GEMV_CYCLES[16384])
               + abs(r["gemv32k_cycles"] - PAPER_GEMV_CYCLES[32768]))
    write_csv(out / "sensitivity.csv", sensitivity(hardware, best, best["gemm_check_mesh"]))
    return rows


def _gemv_latencies(hardware, side: int, inverse_rate: float, beta: float) -> list[float]:
    hw = hardware.with_overrides([f"flops_per_cycle={1 / inverse_rate}", f"beta_cycles_per_relay={beta}"])
    return [_dry(side, hw, lambda mesh: run_gemv(mesh, "meshgemv", size, size))["modeled_cycles"]
            for size in PAPER_GEMV_CYCLES]


def _calibrate_side(hardware, side: int, iterations: int = 8) -> dict:
    """Newton steps on (1/flops_per_cycle, beta), in which the modeled latencies are piecewise
    linear, with finite-difference slopes; beta is kept >= 0 (where the data would want it
    below, the fit is the best rate at beta = 0)."""
    target = list(PAPER_GEMV_CYCLES.values())
    u = [1 / hardware.flops_per_cycle, hardware.beta_cycles_per_relay]
    steps = (0.01, 1.0)
    got = _gemv_latencies(hardware, side, *u)
    for _ in range(iterations):
        residual = [g - t for g, t in zip(got, target)]
        if max(abs(r) for r in residual) < 0.5:
            break
        columns = []
        for k, h in enumerate(steps):
            probe = list(u)
            probe[k] += h
            columns.append([(p - g) / h for p, g in zip(_gemv_latencies(hardware, side, *probe), got)])
        (a, c), (b, d) = columns        # J = [[a, b], [c, d]]
        det = a * d - b * c
        if abs(det) < 1e-12:
            break
        du = (d * residual[0] - b * residual[1]) / det
        db = (-c * residual[0] + a * residual[1]) / det
        u = [min(max(u[0] - du, 1 / 64), 1.0), max(u[1] - db, 0.0)]
        got = _gemv_latencies(hardware, side, *u)
    hw = hardware.with_overrides([f"flops_per_cycle={1 / u[0]}", f"beta_cycles_per_relay={u[1]}"])
    row = {"mesh": side, "flops_per_cycle": 1 / u[0], "beta_cycles_per_relay": u[1],
           "alpha_cycles_per_hop": hw.alpha_cycles_per_hop, "vector_op_cycles": hw.vector_op_cycles,
           "transfer_start_cycles": hw.transfer_start_cycles}
    for size, cycles in zip(PAPER_GEMV_CYCLES, got):
        row[f"gemv{size // 1024}k_cycles"] = cycles
        row[f"gemv{size // 1024}k_residual"] = cycles - PAPER_GEMV_CYCLES[size]
    for size in PAPER_GEMV_CYCLES:
        pipeline = _dry(side, hw, lambda mesh: run_gemv(mesh, "pipeline", size, size))["modeled_cycles"]
        row[f"pipeline_ratio_{size // 1024}k"] = pipeline / row[f"gemv{size // 1024}k_cycles"]
    check = GEMM_CHECK_SIDE if side >= 256 else side      # small sides (tests) check on themselves
    row["gemm_check_mesh"] = check
    for algo in ("meshgemm", "cannon", "summa"):
        row[f"{algo}_eff_720"] = _dry(check, hw, lambda mesh: run_gemm(mesh, algo, 2048, 2048, 2048))["efficiency"]
    return row


def sensitivity(hardware, best: dict, side: int) -> list[dict]:
    """GEMM 2K and GEMV 16K on ``side``² at several betas (shipped compute rate) and at the fit."""
    settings = [(f"beta={b:g}", [f"beta_cycles_per_relay={b}"]) for b in SENSITIVITY_BETAS]
    settings.append(("calibrated", [f"beta_cycles_per_relay={best['beta_cycles_per_relay']}",
                                    f"flops_per_cycle={best['flops_per_cycle']}"]))
    kernels = [("gemm", "meshgemm"), ("gemm", "cannon"), ("gemm", "summa"),
               ("gemv", "meshgemv"), ("gemv", "pipeline")]
    rows = []
    with progress(len(settings) * len(kernels), "sensitivity") as bar:
        for label, overrides in settings:
            hw = hardware.with_overrides(overrides)
            for kind, algo in kernels:
                if kind == "gemm":
                    report = _dry(side, hw, lambda mesh: run_gemm(mesh, algo, 2048, 2048, 2048))
                else:
                    report = _dry(side, hw, lambda mesh: run_gemv(mesh, algo, 16384, 16384))
                rows.append({"setting": label, "beta_cycles_per_relay": hw.beta_cycles_per_relay,
                             "flops_per_cycle": hw.flops_per_cycle, "kernel": kind, "algo": algo,
                             "size": 2048 if kind == "gemm" else 16384, "mesh": side,
                             **{k: report[k] for k in ("modeled_cycles", "compute_cycles", "comm_cycles",
                                                       "efficiency")}})
                bar.update()
    return rows


# ---------------------------------------------------------------------------- entry
def bench_speed(args, hardware, out: Path) -> list[dict]:
    return speed.bench_speed(args, parse_sides(args, speed.DRY["sides"]), out, CsvTable, progress)


def bench_baselines(args, hardware, out: Path) -> list[dict]:
    from . import bench_baselines as baselines
    return baselines.bench_baselines(args, hardware, out, sys.modules[__name__])


def run_defects(args, hardware, out: Path) -> list[dict]:
    if args.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    args.rate_list = parse_rates(args.rates, "--rates")
    return bench_defects.bench_defects(args, hardware, out, sys.modules[__name__])


RUNNERS = {"gemm": bench_gemm, "gemv": bench_gemv, "groups": bench_groups,
           "calibrate": bench_calibrate, "speed": bench_speed, "baselines": bench_baselines,
           "defects": run_defects}


def run_bench(args, argv=None) -> int:
    hardware = load_hardware(args.hardware, args.set)
    out = out_dir(args)
    if _is_root():
        out.mkdir(parents=True, exist_ok=True)
    which = BENCHES if args.which == "all" else (args.which,)
    if args.replot:
        replot(which, hardware, out)
        return 0
    done = {}
    for name in which:
        t0 = time.perf_counter()
        done[name] = RUNNERS[name](args, hardware, out)
        cli.say(f"bench {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.json:
        cli.print_json({"out": str(out), "benches": done})
    return 0
