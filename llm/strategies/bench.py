"""``python -m llm bench --strategies``: the prefill and decode of WaferLLM and of the systems it
is compared with (PAPER.md §8) on one region, hardware and cost model, as dry runs.

For each preset, region side and strategy, one decode step at a ``--prompt-len`` context (one
layer simulated, the others extrapolated, as ``llm bench``), on a region planned as WaferLLM
plans it, and the prefill of a ``--prompt-len`` prompt on the same side² region (one layer
simulated, the others extrapolated with the region plan's hand-offs). Memory runs under the warn
policy so every strategy gets a figure; ``fits_sram`` (``prefill_fits_sram``) says whether the
step's (the prefill's) buffers fit a core beside the region's resident weights — each
strategy's own shares (:mod:`llm.strategies.base`, :mod:`llm.strategies.prefill`) — and KV
cache.

Where the cycles go is measured the same way for both (:func:`split`): the run is repeated
with parts of the cost model switched off. ``hop_cycles`` is what α (cycles per hop) adds,
``relay_cycles`` what β (a software stage) adds, ``compute_cycles`` the run with the network
free (α = β = transfer starts = 0, links 10⁹ B/cycle), ``other_cycles`` the rest (transfer
starts, serialisation on links, waits behind other messages), so the four parts add up to the
whole by construction; α and β are not exactly additive, so a share can be off by a percent.
The prefill's repeats are of its one simulated layer (with the extrapolation's hand-offs and the
final norm) and its parts are prefixed ``prefill_``. The counts (messages, the links they
crossed, relays, bytes) are those of the simulated step (one layer and the LM head) and of the
prefill's simulated layer.

The prefill, four runs of a layer per strategy, is most of the bench's time: every decode row is
measured first, then each preset's prefills, and the CSV is rewritten after every run, so an
interrupted bench leaves every decode and the presets' prefills it finished.

Writes <out>/llm_strategies.csv and <out>/llm_strategies.png (tokens/s per strategy, and the
cycles of a token and of a prefill by part).
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
PARTS = ("compute", "hop", "relay", "other")


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
    """Messages, the links they crossed (hops), relays and bytes since ``before`` (default: the
    start), the longest message in hops, and the most routes and bytes any core held."""
    now, before = _totals(mesh), before or {}
    since = lambda name: now[name] - before.get(name, 0)  # noqa: E731
    return {"messages": since("messages_sent"), "hops": since("hops"), "relays": since("relays"),
            "bytes_moved": since("bytes_sent"),
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


def split(measure, hardware, key: str) -> tuple[dict, dict]:
    """``measure(hw)`` under each cost-model variant (module docstring): its result on
    ``hardware`` and the parts of its ``key`` cycles, compute, hops, relays and other."""
    runs = {name: measure(dataclasses.replace(hardware, **change)) for name, change in VARIANTS.items()}
    total = runs["base"][key]
    parts = {"compute_cycles": runs["compute"][key], "hop_cycles": total - runs["no_hops"][key],
             "relay_cycles": total - runs["no_relays"][key]}
    parts["other_cycles"] = total - sum(parts.values())
    return runs["base"], parts


def decode_row(model: str, side: int, strategy: str, hardware, context: int) -> dict:
    """The table's row without its prefill: the step, and its cycles by part."""
    t0 = time.perf_counter()
    base, parts = split(lambda hw: decode_step(model, side, strategy, hw, context), hardware, "cycles_per_token")
    return {"model": model, "mesh": side, "strategy": strategy, "context": context,
            "decode_tokens_per_s": hardware.clock_hz / base["cycles_per_token"], **base, **parts,
            "relays_per_message": base["relays"] / base["messages"] if base["messages"] else 0.0,
            "fits_sram": base["peak_bytes_per_core"] <= hardware.sram_bytes_per_core,
            "wall_seconds": time.perf_counter() - t0, "error": ""}


def prefill_columns(model: str, side: int, strategy: str, hardware, prompt: int) -> dict:
    """The row's prefill columns: the prefill, and its cycles by part."""
    t0 = time.perf_counter()
    base, parts = split(lambda hw: prefill_run(model, side, strategy, hw, prompt), hardware, "prefill_cycles")
    return {**base, **{f"prefill_{key}": value for key, value in parts.items()},
            "prefill_fits_sram": base["prefill_peak_bytes_per_core"] <= hardware.sram_bytes_per_core,
            "prefill_wall_seconds": time.perf_counter() - t0}


def run(args, models: list[str], sides: list[int], strategies: list[str], out: Path) -> list[dict]:
    hardware = cli.hardware_from_args(args)
    table = CsvTable(out / f"{CSV_NAME}.csv")
    jobs = [(m, s, st) for m in models for s in sides for st in strategies]
    with progress(2 * len(jobs), "strategies") as bar:
        for model, side, strategy in jobs:
            bar.set_postfix_str(f"decode {model} {side}x{side} {strategy}")
            table.add(decode_row(model, side, strategy, hardware, args.prompt_len))
            bar.update()
        for index, (model, side, strategy) in enumerate(jobs):
            bar.set_postfix_str(f"prefill {model} {side}x{side} {strategy}")
            table.update(index, prefill_columns(model, side, strategy, hardware, args.prompt_len))
            bar.update()
            if cli.world_rank() == 0 and (index + 1 == len(jobs) or jobs[index + 1][0] != model):
                plot(table.rows, out / f"{CSV_NAME}.png", hardware.name)
    return table.close()


def _number(row: dict, key: str):
    """A column's value as a float, None where the row has none (its prefill not yet run)."""
    value = row.get(key, "")
    return None if value == "" else float(value)


def _per_message(row: dict, key: str, prefix: str = "") -> str:
    """``key``'s count per message, a table cell."""
    messages = int(row[f"{prefix}messages"])
    return f"{int(row[f'{prefix}{key}']) / messages if messages else 0:.2f}"


def _shares(row: dict, total_key: str, prefix: str = "") -> str:
    """The parts of ``total_key``'s cycles as percentages, table cells."""
    total = float(row[total_key])
    return " | ".join(f"{float(row[f'{prefix}{part}_cycles']) / total:.0%}" for part in PARTS)


def prefill_markdown(rows: list[dict]) -> str:
    """The prefill table of results/README.md: tokens/s, WaferLLM's lead, where the prefill's
    cycles go, the simulated layer's counts (rows whose prefill has run)."""
    head = ("| model | region | strategy | prefill tokens/s | WaferLLM × | compute | hops | relays | other "
            "| messages | hops / message | relays / message | bytes moved | max hops | routes | peak B/core |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    rows = [r for r in rows if _number(r, "prefill_tokens_per_s") is not None]
    ours = {(r["model"], r["mesh"]): float(r["prefill_tokens_per_s"]) for r in rows if r["strategy"] == "waferllm"}
    for r in rows:
        rate, messages = float(r["prefill_tokens_per_s"]), int(r["prefill_messages"])
        gap = ours.get((r["model"], r["mesh"]))
        lines.append(
            f"| {r['model']} | {r['mesh']}² | {r['strategy']} | {rate:,.1f} | {f'{gap / rate:,.1f}' if gap else '–'} "
            f"| {_shares(r, 'prefill_cycles', 'prefill_')} | {messages:,} | {_per_message(r, 'hops', 'prefill_')} "
            f"| {_per_message(r, 'relays', 'prefill_')} "
            f"| {int(r['prefill_bytes_moved']):,} | {r['prefill_max_hops']} | {r['prefill_routes_per_core_max']} "
            f"| {int(r['prefill_peak_bytes_per_core']):,} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """The table of results/README.md: tokens/s, the gap to WaferLLM, where a token's cycles go."""
    head = ("| model | region | strategy | decode tokens/s | WaferLLM × | compute | hops | relays | other "
            "| hops / message | relays / message | max hops | routes | peak B/core |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    ours = {(r["model"], r["mesh"]): float(r["decode_tokens_per_s"]) for r in rows if r["strategy"] == "waferllm"}
    for r in rows:
        gap = ours.get((r["model"], r["mesh"]))
        times = f"{gap / float(r['decode_tokens_per_s']):,.1f}" if gap else "–"
        lines.append(
            f"| {r['model']} | {r['mesh']}² | {r['strategy']} | {float(r['decode_tokens_per_s']):,.1f} | {times} "
            f"| {_shares(r, 'cycles_per_token')} | {_per_message(r, 'hops')} | {float(r['relays_per_message']):.2f} "
            f"| {r['max_hops']} "
            f"| {r['routes_per_core_max']} | {int(r['peak_bytes_per_core']):,} |")
    return "\n".join(lines)


def _rates(ax, rows, models, strategies, key: str, label: str) -> None:
    """Bars of ``key`` per preset, one per strategy, on a log axis (missing: no bar)."""
    width = 0.8 / len(strategies)
    for i, strategy in enumerate(strategies):
        mine = {f"{r['model']} {r['mesh']}²": _number(r, key) for r in rows if r["strategy"] == strategy}
        ax.bar([j + i * width for j in range(len(models))], [mine.get(m) or 0 for m in models], width, label=strategy)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, rotation=20, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(label)


def _parts(ax, rows, prefix: str, total_key: str, label: str) -> None:
    """Stacked shares of the cycles by part, one bar per strategy."""
    rows = [r for r in rows if _number(r, total_key) is not None]
    bottom = [0.0] * len(rows)
    for part in PARTS:
        values = [max(float(r[f"{prefix}{part}_cycles"]), 0.0) / float(r[total_key]) for r in rows]
        ax.bar([r["strategy"] for r in rows], values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel(label)
    ax.legend(fontsize=7)


def plot(rows: list[dict], path: Path, hardware: str) -> None:
    """Decode and prefill tokens/s per strategy and preset; the cycles of a token and of a
    prefill by part per strategy, on the first preset."""
    plt, fig, axes = figure(2, 2, width=5.5)
    (rate, prefill_rate), (parts, prefill_parts) = axes
    models = list(dict.fromkeys(f"{r['model']} {r['mesh']}²" for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    _rates(rate, rows, models, strategies, "decode_tokens_per_s", "decode tokens/s")
    rate.legend(fontsize=7)
    _rates(prefill_rate, rows, models, strategies, "prefill_tokens_per_s",
           f"prefill tokens/s ({rows[0]['context']}-token prompt)")
    first = [r for r in rows if f"{r['model']} {r['mesh']}²" == models[0]]
    _parts(parts, first, "", "cycles_per_token", "share of a token's cycles")
    _parts(prefill_parts, first, "prefill_", "prefill_cycles", "share of a prefill's cycles")
    for ax in (parts, prefill_parts):
        ax.set_title(models[0], fontsize=9)
    for ax in (rate, prefill_rate, parts, prefill_parts):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"prefill and decode per strategy, dry runs, {hardware}", fontsize=10)
    save_figure(plt, fig, path)
