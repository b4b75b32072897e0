"""``python -m kernels bench baselines``: MeshGEMV against the Megatron-LM, Ladder and T10 style
GEMVs (PAPER.md §8) at the paper's decode scale, as dry runs on one cost model.

Cases: GEMV 16K and 32K on 512² (where the paper's GEMV latencies were measured, §3) and the
LLaMA3-8B up/gate shape 4096 x 14336 on its 360² decode region (§5, §7). Runs go over the
profile's memory (Megatron and Ladder duplicate x, Ladder the fetched W too) under the warn
policy, so every strategy gets a figure; ``fits_sram`` says whether it could run on the chip.
Routes stay strict: each strategy relays where the routes run out (kernels/baselines.py).
Each row gives the modeled cycles, the ratio to MeshGEMV, the busiest core's compute, the
longest message, relays, routes and memory per core, and the modeled cycles of each phase.
"""
from __future__ import annotations

from pathlib import Path

from .run import BASELINE_ALGOS, run_baseline, run_gemv

CASES = ((16384, 16384, 512), (32768, 32768, 512), (4096, 14336, 360))
ALGOS = ("meshgemv",) + BASELINE_ALGOS
FIELDS = ("modeled_cycles", "compute_cycles", "comm_cycles", "max_hops_per_step", "relays",
          "routes_per_core_max", "peak_bytes_per_core", "messages", "bytes_moved", "wall_seconds")


def _phases(mesh) -> str:
    """``name=cycles`` of each top-level phase, in order."""
    phases, _ = mesh.timeline.collect()
    return ";".join(f"{p['name']}={p['end_cycles'] - p['start_cycles']:.0f}" for p in phases if p["depth"] == 0)


def bench_baselines(args, hardware, out: Path, tools) -> list[dict]:
    """``tools``: the bench plumbing of kernels/bench.py (CsvTable, progress, parse_sides, _dry, _fits)."""
    sides = tools.parse_sides(args, None)
    cases = CASES if sides is None else [(m, n, side) for m, n, _ in CASES for side in sides]
    rows = tools.CsvTable(out / "baselines.csv")
    with tools.progress(len(cases) * len(ALGOS), "baselines") as bar:
        for m, n, side in cases:
            reference = None
            for algo in ALGOS:
                bar.set_postfix_str(f"{m}x{n} {side}x{side} {algo}")

                def one(mesh):
                    report = run_gemv(mesh, algo, m, n) if algo == "meshgemv" else run_baseline(mesh, algo, m, n)
                    return report, _phases(mesh)
                report, phases = tools._dry(side, hardware, one)
                reference = reference or report["modeled_cycles"]
                rows.add({"m": m, "n": n, "mesh": side, "algo": algo,
                          "vs_meshgemv": report["modeled_cycles"] / reference,
                          **{k: report[k] for k in FIELDS},
                          "cores_used": report.get("cores_used", side * side),
                          "ring": report.get("ring") or "", **tools._fits(report, hardware),
                          "phases": phases})
                bar.update()
    return rows.close()
