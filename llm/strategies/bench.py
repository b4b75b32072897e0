"""``python -m llm bench --strategies``: the prefill and decode of WaferLLM and of the systems it
is compared with (PAPER.md §8) on one region, hardware and cost model, as dry runs.

For each preset, region side and strategy, one decode step at a ``--prompt-len`` context (one
layer simulated, the others extrapolated, as ``llm bench``), on a region planned as WaferLLM
plans it. Where its cycles go is measured by rerunning the step with parts of the cost model
switched off: ``hop_cycles`` is what α (cycles per hop) adds, ``relay_cycles`` what β (a
software stage) adds, ``compute_cycles`` the step with the network free (α = β = transfer
starts = 0, links 10⁹ B/cycle), ``other_cycles`` the rest (transfer starts, serialisation on
links, waits behind other messages). The counts (messages, relays, bytes) are those of the
simulated step (one layer and the LM head). Memory runs under the warn policy so every
strategy gets a figure; ``fits_sram`` says whether the step's buffers fit a core beside the
region's resident weights and KV cache.

The prefill of a ``--prompt-len`` prompt runs on the same side² region (one layer simulated,
the others extrapolated with the region plan's hand-offs, as ``llm bench``), once, with the full
cost model (``prefill_*`` columns: tokens/s of the whole model's prefill, the simulated layer's
messages, relays, bytes, longest hop, routes and peak memory); its cycles are not split by part.

Writes <out>/llm_strategies.csv and <out>/llm_strategies.png (tokens/s per strategy, and the
cycles of a token by part).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from meshmpi import Mesh, cli
from meshmpi.benchtools import CsvTable, figure, progress, save_figure

from ..plan import kv_rows
from ..presets import preset
from ..prefill import prefill
from . import STRATEGIES, decoder_class, prefill_runner

CSV_NAME = "llm_strategies"
FREE_NETWORK = dict(alpha_cycles_per_hop=0.0, beta_cycles_per_relay=0.0, transfer_start_cycles=0.0,
                    link_bytes_per_cycle=1e9)
VARIANTS = {"base": {}, "no_hops": {"alpha_cycles_per_hop": 0.0}, "no_relays": {"beta_cycles_per_relay": 0.0},
            "compute": FREE_NETWORK}


def parse_strategies(text: str) -> list[str]:
    from meshmpi.errors import UsageError
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(s not in STRATEGIES for s in names):
        raise UsageError(f"--strategies takes {', '.join(STRATEGIES)}, got {text!r}")
    return names


def decode_step(model: str, side: int, strategy: str, hardware, context: int) -> dict:
    """One dry-run decode step at ``context``: cycles per token and the step's counts."""
    config = preset(model)
    mesh = Mesh(side, side, hardware, dry_run=True, memory="warn", routes="strict")
    try:
        decoder = decoder_class(strategy)(mesh, config, None, layers=1,
                                          capacity_tokens=kv_rows("shift", context + 1, side))
        decoder.seek(context, context)
        before = _totals(mesh)
        _, cycles = decoder.step(None, context)
        return {"cycles_per_token": cycles.total(config.num_hidden_layers),
                "cycles_per_layer": cycles.layers[0], "lm_head_cycles": cycles.head,
                **_fabric_counts(mesh, before)}
    finally:
        mesh.free()


def _totals(mesh) -> dict:
    """The whole mesh's counters so far (every rank gets the same sums)."""
    return {k: mesh.sum_over_ranks(int(v.sum())) for k, v in mesh.counters.items()}


def _fabric_counts(mesh, before: dict | None = None) -> dict:
    """Messages, relays and bytes since ``before`` (default: the start), the longest hop, and
    the most routes and bytes any core held."""
    now, before = _totals(mesh), before or {}
    since = lambda name: now[name] - before.get(name, 0)  # noqa: E731
    return {"messages": since("messages_sent"), "relays": since("relays"), "bytes_moved": since("bytes_sent"),
            "max_hops": int(mesh.max_over_ranks(mesh.max_hops)),
            "routes_per_core_max": int(mesh.max_over_ranks(int(mesh.routes.peak.max(initial=0)))),
            "peak_bytes_per_core": int(mesh.max_over_ranks(int(mesh.memory.peak.max(initial=0))))}


def prefill_run(model: str, side: int, strategy: str, hardware, prompt: int) -> dict:
    """One dry-run prefill of ``prompt`` tokens on a side² region (one layer simulated, the
    others extrapolated as ``llm bench`` does): the whole model's prefill tokens/s and the
    simulated layer's counts."""
    config = preset(model)
    mesh = Mesh(side, side, hardware, dry_run=True, memory="warn", routes="strict")
    try:
        result = prefill(mesh, config, None, prompt, layers=1, runner=prefill_runner(strategy))
        cycles = result.cycles(config.num_hidden_layers)
        return {"prefill_tokens_per_s": prompt * hardware.clock_hz / cycles, "prefill_cycles": cycles,
                "prefill_cycles_per_layer": result.cycles_per_layer,
                **{f"prefill_{key}": value for key, value in _fabric_counts(mesh).items()}}
    finally:
        mesh.free()


def row(model: str, side: int, strategy: str, hardware, context: int) -> dict:
    """The table's row: the step under each cost-model variant (module docstring)."""
    t0 = time.perf_counter()
    runs = {name: decode_step(model, side, strategy, dataclasses.replace(hardware, **change), context)
            for name, change in VARIANTS.items()}
    base = runs["base"]
    total = base["cycles_per_token"]
    parts = {"compute_cycles": runs["compute"]["cycles_per_token"],
             "hop_cycles": total - runs["no_hops"]["cycles_per_token"],
             "relay_cycles": total - runs["no_relays"]["cycles_per_token"]}
    parts["other_cycles"] = total - sum(parts.values())
    return {"model": model, "mesh": side, "strategy": strategy, "context": context,
            "decode_tokens_per_s": hardware.clock_hz / total, **base, **parts,
            **prefill_run(model, side, strategy, hardware, context),
            "relays_per_message": base["relays"] / base["messages"] if base["messages"] else 0.0,
            "fits_sram": base["peak_bytes_per_core"] <= hardware.sram_bytes_per_core,
            "wall_seconds": time.perf_counter() - t0, "error": ""}


def run(args, models: list[str], sides: list[int], strategies: list[str], out: Path) -> list[dict]:
    hardware = cli.hardware_from_args(args)
    table = CsvTable(out / f"{CSV_NAME}.csv")
    jobs = [(m, s, st) for m in models for s in sides for st in strategies]
    with progress(len(jobs), "strategies") as bar:
        for model, side, strategy in jobs:
            bar.set_postfix_str(f"{model} {side}x{side} {strategy}")
            table.add(row(model, side, strategy, hardware, args.prompt_len))
            bar.update()
    rows = table.close()
    if cli.world_rank() == 0:
        plot(rows, out / f"{CSV_NAME}.png", hardware.name)
    return rows


def prefill_markdown(rows: list[dict]) -> str:
    """The prefill table of results/README.md: tokens/s, WaferLLM's lead, the simulated layer's
    counts."""
    head = ("| model | region | strategy | prefill tokens/s | WaferLLM × | messages | relays | relays / message "
            "| bytes moved | max hops | routes | peak B/core |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    ours = {(r["model"], r["mesh"]): float(r["prefill_tokens_per_s"]) for r in rows if r["strategy"] == "waferllm"}
    for r in rows:
        rate, messages = float(r["prefill_tokens_per_s"]), int(r["prefill_messages"])
        gap = ours.get((r["model"], r["mesh"]))
        lines.append(
            f"| {r['model']} | {r['mesh']}² | {r['strategy']} | {rate:,.1f} | {f'{gap / rate:,.1f}' if gap else '–'} "
            f"| {messages:,} | {int(r['prefill_relays']):,} | {int(r['prefill_relays']) / messages if messages else 0:.2f} "
            f"| {int(r['prefill_bytes_moved']):,} | {r['prefill_max_hops']} | {r['prefill_routes_per_core_max']} "
            f"| {int(r['prefill_peak_bytes_per_core']):,} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """The table of results/README.md: tokens/s, the gap to WaferLLM, where a token's cycles go."""
    head = ("| model | region | strategy | decode tokens/s | WaferLLM × | compute | hops | relays | other "
            "| relays / message | max hops | routes | peak B/core |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    ours = {(r["model"], r["mesh"]): float(r["decode_tokens_per_s"]) for r in rows if r["strategy"] == "waferllm"}
    for r in rows:
        total = float(r["cycles_per_token"])
        share = lambda key: f"{float(r[key]) / total:.0%}"  # noqa: E731
        gap = ours.get((r["model"], r["mesh"]))
        times = f"{gap / float(r['decode_tokens_per_s']):,.1f}" if gap else "–"
        lines.append(
            f"| {r['model']} | {r['mesh']}² | {r['strategy']} | {float(r['decode_tokens_per_s']):,.1f} | {times} "
            f"| {share('compute_cycles')} | {share('hop_cycles')} | {share('relay_cycles')} "
            f"| {share('other_cycles')} | {float(r['relays_per_message']):.2f} | {r['max_hops']} "
            f"| {r['routes_per_core_max']} | {int(r['peak_bytes_per_core']):,} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, hardware: str) -> None:
    """Decode tokens/s per strategy and preset; a token's cycles by part per strategy."""
    plt, fig, axes = figure(3, width=5.5)
    rate, prefill_rate, parts = axes[0]
    models = list(dict.fromkeys(f"{r['model']} {r['mesh']}²" for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    width = 0.8 / len(strategies)
    for i, strategy in enumerate(strategies):
        mine = {f"{r['model']} {r['mesh']}²": float(r["decode_tokens_per_s"]) for r in rows if r["strategy"] == strategy}
        rate.bar([j + i * width for j in range(len(models))], [mine.get(m, 0) for m in models], width, label=strategy)
    rate.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, rotation=20, fontsize=7)
    rate.set_yscale("log")
    rate.set_ylabel("decode tokens/s")
    rate.legend(fontsize=7)
    for i, strategy in enumerate(strategies):
        mine = {f"{r['model']} {r['mesh']}²": float(r["prefill_tokens_per_s"]) for r in rows if r["strategy"] == strategy}
        prefill_rate.bar([j + i * width for j in range(len(models))], [mine.get(m, 0) for m in models], width,
                         label=strategy)
    prefill_rate.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, rotation=20, fontsize=7)
    prefill_rate.set_yscale("log")
    prefill_rate.set_ylabel(f"prefill tokens/s ({rows[0]['context']}-token prompt)")
    first = [r for r in rows if f"{r['model']} {r['mesh']}²" == models[0]]
    bottom = [0.0] * len(first)
    for key in ("compute_cycles", "hop_cycles", "relay_cycles", "other_cycles"):
        values = [max(float(r[key]), 0.0) / float(r["cycles_per_token"]) for r in first]
        parts.bar([r["strategy"] for r in first], values, bottom=bottom, label=key.removesuffix("_cycles"))
        bottom = [b + v for b, v in zip(bottom, values)]
    parts.set_ylabel("share of a token's cycles")
    parts.set_title(models[0], fontsize=9)
    parts.legend(fontsize=7)
    for ax in (rate, prefill_rate, parts):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"prefill and decode per strategy, dry runs, {hardware}", fontsize=10)
    save_figure(plt, fig, path)
