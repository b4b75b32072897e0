"""``python -m kernels bench defects``: MeshGEMM and MeshGEMV on wafers with dead cores, remapped
(meshmpi/defects.py), against the defect rate, as dry runs.

Cases: MeshGEMM 2K on a 180² logical mesh and MeshGEMV 16K on 360² (LLaMA3-8B's decode
region, PAPER.md §7), or both on each ``--meshes`` side, at each rate of ``--rates``
(default 0-10%) and ``--seeds`` draws of the dead cores. Each row
gives the map (dead cores, spares, share of logical links stretched, the longest logical
link in physical hops), the longest message of any step in physical hops against the
defect-free wafer's (MeshGEMM's 2-hop bound, PAPER.md §2: its interleaved ring keeps every
step within 2 logical hops), the modeled cycles and the slowdown against the defect-free
wafer (rate 0 on the same mesh).
"""
from __future__ import annotations

from pathlib import Path

from meshmpi.benchtools import figure, plot_over_rates, save_figure
from meshmpi.defects import remap_for
from meshmpi.errors import UsageError

from .run import run_gemm, run_gemv

CASES = (("meshgemm", 2048, 180), ("meshgemv", 16384, 360))
FIELDS = ("modeled_cycles", "compute_cycles", "comm_cycles", "efficiency", "max_hops_per_step",
          "messages", "wall_seconds")


def bench_defects(args, hardware, out: Path, tools) -> list[dict]:
    """``tools``: the bench plumbing of kernels/bench.py (CsvTable, progress, parse_sides, _dry)."""
    sides = tools.parse_sides(args, None)
    rates, seeds = args.rate_list, range(args.seeds)
    jobs = [(algo, size, side, rate, seed) for algo, size, default in CASES for side in (sides or (default,))
            for rate in rates for seed in (seeds if rate else (0,))]
    table = tools.CsvTable(out / "defects.csv")
    perfect = {}
    with tools.progress(len(jobs), "defects") as bar:
        for algo, size, side, rate, seed in jobs:
            bar.set_postfix_str(f"{algo} {side}x{side} rate {rate:g} seed {seed}")
            row = {"algo": algo, "size": size, "mesh": side, "rate": rate, "seed": seed}
            try:
                remap = remap_for(rate, seed, side, side)
            except UsageError as exc:            # this draw has too many defects for the spares
                table.add({**row, "error": str(exc)})
                bar.update()
                continue
            stats = remap.stats()
            report = tools._dry(side, hardware, lambda mesh: run_gemm(mesh, algo, size, size, size)
                                if algo == "meshgemm" else run_gemv(mesh, algo, size, size), defects=remap)
            base = perfect.setdefault((algo, size, side), report) if rate == 0 else perfect.get((algo, size, side))
            row.update(dead_cores=stats["dead_cores"], spare_rows=stats["spare_rows"], spare_cols=stats["spare_cols"],
                       stretched_share=stats["stretched_share"], worst_stretch=stats["worst_stretch"],
                       **{k: report[k] for k in FIELDS},
                       defect_free_max_hops=base["max_hops_per_step"] if base else "",
                       extra_cycles=report["modeled_cycles"] - base["modeled_cycles"] if base else "",
                       slowdown=report["modeled_cycles"] / base["modeled_cycles"] if base else "", error="")
            table.add(row)
            bar.update()
    rows = table.close()
    if tools._is_root():
        plot_defects(rows, out / "defects.png", hardware.name)
    return rows


def plot_defects(rows: list[dict], path: Path, hardware_name: str) -> None:
    """Slowdown and the longest message per step against the defect rate, one line per kernel
    and mesh (the mean over the seeds, the seeds as dots)."""
    plt, fig, axes = figure(2, width=4.6)
    slow, hops = axes[0]
    good = [r for r in rows if not r.get("error") and r.get("slowdown") != ""]
    for ax, field in ((slow, "slowdown"), (hops, "max_hops_per_step")):
        plot_over_rates(ax, good, lambda r: (r["algo"], int(r["size"]), r["mesh"]), field,
                        lambda key: f"{key[0]} {key[1] // 1024}K on {key[2]}²")
    slow.set(ylabel="modeled cycles / defect-free", title=f"slowdown on a remapped wafer ({hardware_name})")
    hops.set(ylabel="physical hops", title="longest message of any step")
    hops.axhline(2, color="grey", linestyle=":", label="MeshGEMM's 2-hop bound")
    for ax in (slow, hops):
        ax.legend(fontsize=7)
    save_figure(plt, fig, path)
