"""``python -m llm bench``: dry-run predictions for the paper's models on the paper's meshes.

Every (preset, square mesh) pair runs the whole ``generate`` command as a dry run: a prefill of
``--prompt-len`` tokens on the region, the prefill->decode re-layout, and ``--new-tokens``
decode steps at that context. One layer is simulated and the others extrapolated (every layer
has the same shapes). Rank 0 writes <out>/llm_presets.csv (rewritten as each run completes,
so an interrupted bench keeps the rows it finished) and <out>/llm_presets.png, and prints the
table as Markdown. --out defaults to a new folder results/runs/<time>; --out results refreshes
the committed table and figure.

KV capacity is given for both policies from the same region plan (the same weights resident,
the same free memory per core): ``shift`` fills every row, ``concat`` only the last one.

``--e2e IN/OUT,...`` runs the end-to-end table instead (<out>/llm_e2e.csv): for each model and
each (input, output) pair, a prefill of IN tokens on the ``--prefill-side`` square and OUT new
tokens decoded on each ``--meshes`` region (default 360², PAPER.md §7's LLaMA3-8B decode region),
the decode integrated over sampled contexts (``generate --decode-samples``).

``--defects [RATES]`` runs the defect table instead (<out>/llm_defects.csv and .png): one
decode step of each model (default llama3-8b) on each region (default 360²) at the
``--prompt-len`` context, on wafers with dead cores at each rate, remapped (llm/bench_defects.py).

``--strategies NAME,...`` runs the strategies' table instead (<out>/llm_strategies.csv and .png):
the decode of WaferLLM and of the systems it is compared with, where each one's cycles go
(:mod:`llm.strategies.bench`); the region defaults to 360² (PAPER.md §7).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from meshmpi.benchtools import (DEFECT_RATES, CsvTable, add_out_options, figure, mesh_axis, out_dir, parse_rates,
                                parse_sides, progress, read_csv, save_figure)
from meshmpi import Mesh, cli
from meshmpi.errors import MeshmpiError, UsageError

from . import bench_defects, e2e
from .plan import regions_text
from .presets import PRESET_NAMES, preset
from .session import Options, Session
from .strategies import STRATEGIES, bench as strategies_bench

MESHES = (360, 375, 420, 540, 660, 720)   # PAPER.md §7: end-to-end (360², 375²) and scaling regions
PROMPT_LEN, NEW_TOKENS = 4096, 4
CSV_NAME = "llm_presets"
E2E_PAIRS, E2E_PREFILL_SIDE, E2E_MESHES = "2048/128,4096/128,2048/2048,4096/4096", 660, (360,)
STRATEGY_MESHES = (360,)   # PAPER.md §7: LLaMA3-8B's decode region

EXAMPLES = """\
  mpiexec -n 2 python -m llm bench --out results
  python -m llm bench --models llama3-8b --meshes 360,420 --prompt-len 1024 --out /tmp/bench
  python -m llm bench --models llama3-8b --e2e 2048/128,4096/4096 --prefill-side 660 --meshes 360
  python -m llm bench --defects 0,0.01,0.07 --seeds 2 --out /tmp/bench
  python -m llm bench --strategies --models llama3-8b --out results
"""


def register(sub) -> None:
    p = sub.add_parser("bench", help="dry-run predictions for the presets on the paper's meshes",
                       description=cli.help_text(__doc__), epilog="examples:\n" + EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", metavar="NAME,...",
                   help=f"presets (default all: {', '.join(PRESET_NAMES)}; --defects: {bench_defects.MODELS})")
    p.add_argument("--meshes", metavar="N,N,...", help="square region sides (default 360,375,420,540,660,720; --defects: 360)")
    p.add_argument("--prompt-len", type=int, default=PROMPT_LEN, help=f"context tokens (default {PROMPT_LEN})")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                   help=f"decode steps to time at that context (default {NEW_TOKENS})")
    p.add_argument("--e2e", nargs="?", const=E2E_PAIRS, metavar="IN/OUT,...",
                   help=f"the end-to-end table for these input/output lengths (default {E2E_PAIRS})")
    p.add_argument("--prefill-side", type=int, default=E2E_PREFILL_SIDE,
                   help=f"--e2e: the square prefill region's side (default {E2E_PREFILL_SIDE})")
    p.add_argument("--strategies", nargs="?", const=",".join(STRATEGIES), metavar="NAME,...",
                   help="the decode of WaferLLM and the systems it is compared with, <out>/llm_strategies.csv "
                        f"(default all: {', '.join(STRATEGIES)}; meshes default {STRATEGY_MESHES[0]})")
    p.add_argument("--decode-samples", type=int, default=16, metavar="K",
                   help="--e2e: decode contexts simulated per run (default 16)")
    p.add_argument("--defects", nargs="?", const=DEFECT_RATES, metavar="R,R,...",
                   help=f"the defect table: a decode step against these dead-core rates (default {DEFECT_RATES})")
    p.add_argument("--seeds", type=int, default=3, metavar="K",
                   help="--defects: draws of the dead cores per rate (default 3)")
    add_out_options(p, "PNG", "CSV")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON object instead of the table")
    cli.add_hardware_options(p)
    p.set_defaults(func=run_bench)


def _models(text: str | None, default: str = ",".join(PRESET_NAMES)) -> list[str]:
    names = [m.strip() for m in (text or default).split(",") if m.strip()]
    unknown = [m for m in names if m not in PRESET_NAMES]
    if unknown or not names:
        raise UsageError(f"--models takes presets ({', '.join(PRESET_NAMES)}), got {text!r}")
    return names


def _request(args, model: str, side: int, prompt: int, new: int, prefill_side: int | None = None) -> dict:
    """A dry run of one request of ``model`` (one layer simulated and extrapolated) on a
    ``side``-square decode region: the :class:`llm.session.Session` report, as ``generate`` gives it."""
    hardware = cli.hardware_from_args(args)
    session = Session(preset(model), None, lambda rows, cols: Mesh(rows, cols, hardware, dry_run=True,
                                                                   memory=args.memory, routes=args.routes),
                      (side, side), new, prefill_side, Options(layers=1, decode_samples=args.decode_samples))
    try:
        session.prefill(prompt)
        session.decode(choose=None)
        return {"model": model, **session.report()}
    finally:
        session.close()


def _row(model: str, side: int, r: dict) -> dict:
    prompt = r["prompt_tokens"]
    shift, concat = r["kv_capacity_by_policy"]["shift"], r["kv_capacity_by_policy"]["concat"]
    return {
        "model": model, "mesh": side, "prompt_tokens": prompt, "new_tokens": r["new_tokens"],
        "modeled_prefill_ms": r["modeled_prefill_seconds"] * 1e3,
        "modeled_decode_tokens_per_s": r["modeled_decode_tokens_per_s"],
        "modeled_cycles_per_layer": r["modeled_cycles_per_layer"],
        "layers_per_region": r["layers_per_region"], "regions": r["regions"],
        "last_region_layers": r["last_region_layers"],
        "cores_used": r["cores_used"], "wafers": r["wafers"],
        "kv_capacity_shift": shift, "kv_capacity_concat": concat,
        "decode_room_shift": max(shift - prompt, 0), "decode_room_concat": max(concat - prompt, 0),
        "peak_bytes_per_core": r["peak_bytes_per_core"], "routes_per_core_max": r["routes_per_core_max"],
        "wall_seconds": r["wall_seconds"], "error": "",
    }


def _pairs(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in item.split("/")) for item in text.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise UsageError(f"--e2e expects input/output token pairs like 2048/128,4096/4096, got {text!r}")
    return pairs


def _e2e_row(model: str, side: int, r: dict) -> dict:
    d = r["decode_integration"]
    return {
        "model": model, "prefill_mesh": r["prefill_mesh"], "mesh": side,
        "prompt_tokens": r["prompt_tokens"], "new_tokens": r["new_tokens"],
        "modeled_prefill_ms": r["modeled_prefill_seconds"] * 1e3,
        "modeled_decode_ms": r["modeled_decode_seconds"] * 1e3,
        "modeled_decode_tokens_per_s": r["modeled_decode_tokens_per_s"],
        "modeled_e2e_ms": r["modeled_e2e_seconds"] * 1e3,
        "modeled_e2e_tokens_per_s": r["modeled_e2e_tokens_per_s"],
        "e2e_prefill_share": r["e2e_prefill_share"],
        "decode_steps": d["steps"], "decode_steps_simulated": d["simulated_steps"],
        "prefill_regions": r["prefill_regions"], "prefill_layers_per_region": r["prefill_layers_per_region"],
        "regions": r["regions"], "wall_seconds": r["wall_seconds"], "error": "",
    }


def run_e2e(args, out: Path) -> int:
    """The end-to-end table: see the module docstring."""
    e2e.check_samples(args.decode_samples)
    models, sides, pairs = _models(args.models), parse_sides(args, E2E_MESHES), _pairs(args.e2e)
    jobs = [(f"{model} {side}x{side} {prompt}/{new}",
             lambda m=model, n=side, p=prompt, g=new: _e2e_row(m, n, _request(args, m, n, p, g, args.prefill_side)),
             {"model": model, "mesh": side, "prompt_tokens": prompt, "new_tokens": new})
            for model in models for side in sides for prompt, new in pairs]
    _run_rows(args, out / "llm_e2e.csv", "end-to-end", jobs, e2e_markdown)
    return 0


def run_strategies(args, out: Path) -> int:
    """The strategies' table: see :mod:`llm.strategies.bench`."""
    models, sides = _models(args.models), parse_sides(args, STRATEGY_MESHES)
    if args.prompt_len < 1:
        raise UsageError("--prompt-len must be >= 1")
    t0 = time.perf_counter()
    rows = strategies_bench.run(args, models, sides, strategies_bench.parse_strategies(args.strategies), out)
    if args.json:
        cli.print_json({"out": str(out), "rows": rows})
    else:
        cli.say(strategies_bench.markdown(rows) + "\n\n" + strategies_bench.prefill_markdown(rows))
    cli.say(f"bench strategies: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


def _run_rows(args, path: Path, desc: str, jobs: list, to_markdown) -> list[dict]:
    """Run each ``(label, row(), error row)`` job into a CSV that is whole after every row; a
    failure every rank agrees on (a region too small for a layer) becomes that row's ``error``.
    Prints the rows as JSON or as the Markdown table."""
    table = CsvTable(path)
    t0 = time.perf_counter()
    with progress(len(jobs), desc) as bar:
        for label, row, error_row in jobs:
            bar.set_postfix_str(label)
            try:
                table.add(row())
            except MeshmpiError as exc:
                if not exc.collective:
                    raise
                table.add({**error_row, "error": str(exc)})
            bar.update()
    rows = table.close()
    if args.json:
        cli.print_json({"out": str(path.parent), "rows": rows})
    else:
        cli.say(to_markdown(rows))
    cli.say(f"bench {desc}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


def e2e_markdown(rows: list[dict]) -> str:
    head = ("| model | prefill / decode region | in / out | prefill ms | decode ms | decode tokens/s "
            "| end-to-end tokens/s | prefill share | decode steps simulated |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['mesh']}² | {r['prompt_tokens']} / {r['new_tokens']} "
                         f"| – | – | – | – | – | {r['error']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['prefill_mesh'].split('x')[0]}² / {r['mesh']}² | {r['prompt_tokens']} / {r['new_tokens']} "
            f"| {float(r['modeled_prefill_ms']):,.2f} | {float(r['modeled_decode_ms']):,.2f} "
            f"| {float(r['modeled_decode_tokens_per_s']):,.0f} | {float(r['modeled_e2e_tokens_per_s']):,.0f} "
            f"| {float(r['e2e_prefill_share']):.0%} | {r['decode_steps_simulated']} of {r['decode_steps']} |")
    return "\n".join(lines)


def run_bench(args) -> int:
    out = out_dir(args)
    if args.e2e is not None:
        return run_e2e(args, out)
    if args.defects is not None:
        return run_defects(args, out)
    if args.strategies is not None:
        return run_strategies(args, out)
    if args.replot:
        plot(read_csv(out / f"{CSV_NAME}.csv"), out / f"{CSV_NAME}.png", args.hardware)
        return 0
    models, sides = _models(args.models), parse_sides(args, MESHES)
    if args.prompt_len < 1 or args.new_tokens < 2:
        raise UsageError("--prompt-len must be >= 1 and --new-tokens >= 2 (one decode step to time)")
    jobs = [(f"{model} {side}x{side}",
             lambda m=model, n=side: _row(m, n, _request(args, m, n, args.prompt_len, args.new_tokens)),
             {"model": model, "mesh": side, "prompt_tokens": args.prompt_len})
            for model in models for side in sides]
    rows = _run_rows(args, out / f"{CSV_NAME}.csv", "presets", jobs, markdown)
    if cli.world_rank() == 0:
        plot(rows, out / f"{CSV_NAME}.png", args.hardware)
    return 0


def run_defects(args, out: Path) -> int:
    """The defect table: see the module docstring."""
    path = out / f"{bench_defects.CSV_NAME}.csv"
    if args.replot:
        bench_defects.plot(read_csv(path), path.with_suffix(".png"), args.hardware)
        return 0
    rates = parse_rates(args.defects, "--defects")
    if args.seeds < 1 or args.prompt_len < 1:
        raise UsageError("--seeds and --prompt-len must be at least 1")
    jobs = bench_defects.jobs(args, cli.hardware_from_args(args), _models(args.models, bench_defects.MODELS),
                              parse_sides(args, bench_defects.MESHES), rates)
    rows = _run_rows(args, path, "defects", jobs, bench_defects.markdown)
    if cli.world_rank() == 0:
        bench_defects.plot(rows, path.with_suffix(".png"), args.hardware)
    return 0


def markdown(rows: list[dict]) -> str:
    """The table of results/README.md."""
    head = ("| model | region | prefill ms | decode tokens/s | cycles/layer | regions "
            "| wafers | KV capacity shift | KV capacity concat | decode room shift / concat | peak B/core |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['mesh']}² | – | – | – | – | – | – | – | – | {r['error']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['mesh']}² | {float(r['modeled_prefill_ms']):,.0f} "
            f"| {float(r['modeled_decode_tokens_per_s']):,.0f} | {float(r['modeled_cycles_per_layer']):,.0f} "
            f"| {regions_text(r)} | {float(r['wafers']):.2f} "
            f"| {int(r['kv_capacity_shift']):,} | {int(r['kv_capacity_concat']):,} "
            f"| {int(r['decode_room_shift']):,} / {int(r['decode_room_concat']):,} "
            f"| {int(r['peak_bytes_per_core']):,} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, hardware: str) -> None:
    """Decode tokens/s and KV capacity against the region side, one line per model."""
    if cli.world_rank() != 0:
        return
    plt, fig, axes = figure(3, width=4.4)
    rate, cap, room = axes[0]
    good = [r for r in rows if not r.get("error")]
    sides = [int(r["mesh"]) for r in good]
    for model in dict.fromkeys(r["model"] for r in good):
        mine = [r for r in good if r["model"] == model]
        x = [int(r["mesh"]) for r in mine]
        rate.plot(x, [float(r["modeled_decode_tokens_per_s"]) for r in mine], "o-", label=model)
        line, = cap.plot(x, [int(r["kv_capacity_shift"]) for r in mine], "o-", label=f"{model} shift")
        cap.plot(x, [int(r["kv_capacity_concat"]) for r in mine], "x--", color=line.get_color(),
                 label=f"{model} concat")
        room.plot(x, [max(int(r["decode_room_shift"]), 1) / max(int(r["decode_room_concat"]), 1)
                      for r in mine], "o-", label=model)
    prompt = good[0]["prompt_tokens"] if good else "?"
    for ax, title in ((rate, f"decode tokens/s per request ({prompt}-token context)"),
                      (cap, "KV capacity (tokens)"), (room, "decode room: shift / concat")):
        mesh_axis(ax, sides or [1])
        ax.set_xlabel("region side N (N x N cores)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    cap.set_yscale("log")
    room.set_yscale("log")
    rate.legend(fontsize=7)
    cap.legend(fontsize=6, ncol=2)
    fig.suptitle(f"dry-run predictions, {hardware}", fontsize=10)
    save_figure(plt, fig, path)
