"""``python -m llm bench --defects``: one decode step of a preset on wafers with dead cores,
remapped (meshmpi/defects.py), against the defect rate, as dry runs.

For each model (default llama3-8b) and decode region (default 360², PAPER.md §7) the decode
step at a ``--prompt-len`` context is simulated with one layer (the others extrapolated, as
in ``generate --layers 1``) on the logical region laid over a physical wafer with dead cores
drawn at each rate (``--seeds`` draws each). Only the decode region is simulated: no prefill,
the cache placed as the prefill leaves it. Each row gives the map (dead cores, spares, the
share of logical links stretched, the longest one in physical hops), the cycles of the layer
and of the whole step, decode tokens/s, and the extra cycles per token and the slowdown against
the defect-free region (rate 0, run first).
"""
from __future__ import annotations

from pathlib import Path

from meshmpi.benchtools import figure, mean_over_seeds, plot_over_rates, save_figure
from meshmpi.defects import remap_for
from meshmpi.mesh import Mesh

from .decode import Decoder
from .plan import kv_rows
from .presets import preset

MESHES = (360,)
MODELS = "llama3-8b"
CSV_NAME = "llm_defects"


def decode_step(args, hardware, model: str, side: int, prompt: int, remap) -> dict:
    """The modeled figures of one decode step at context ``prompt`` on a remapped region."""
    config = preset(model)
    mesh = Mesh(side, side, hardware, dry_run=True, memory=args.memory, routes=args.routes, defects=remap)
    try:
        decoder = Decoder(mesh, config, None, "shift", 1, kv_rows("shift", prompt + 2, side))
        decoder.load_prompt_cache(None, None, prompt)
        _, cycles = decoder.step(None, prompt)
        total = cycles.total(config.num_hidden_layers)
        return {"modeled_cycles_per_layer": cycles.layers[0], "modeled_decode_cycles_per_token": total,
                "modeled_decode_tokens_per_s": hardware.clock_hz / total,
                "max_hops_per_step": int(mesh.max_over_ranks(mesh.max_hops))}
    finally:
        mesh.free()


def jobs(args, hardware, models: list[str], sides, rates: list[float]) -> list:
    """``(label, row(), error row)`` for :func:`llm.bench._run_rows`; each row's slowdown is
    against the rate-0 row of its model and region run before it."""
    perfect = {}

    def row(model, side, rate, seed):
        remap = remap_for(rate, seed, side, side)
        got = decode_step(args, hardware, model, side, args.prompt_len, remap)
        base = perfect.setdefault((model, side), got) if rate == 0 else perfect.get((model, side))
        stats = remap.stats()
        return {"model": model, "mesh": side, "prompt_tokens": args.prompt_len, "rate": rate, "seed": seed,
                "dead_cores": stats["dead_cores"], "spare_rows": stats["spare_rows"],
                "spare_cols": stats["spare_cols"], "stretched_share": stats["stretched_share"],
                "worst_stretch": stats["worst_stretch"], **got,
                "extra_cycles_per_token": got["modeled_decode_cycles_per_token"] - base["modeled_decode_cycles_per_token"]
                if base else "",
                "slowdown": got["modeled_decode_cycles_per_token"] / base["modeled_decode_cycles_per_token"]
                if base else "", "error": ""}
    return [(f"{model} {side}x{side} rate {rate:g} seed {seed}",
             lambda m=model, n=side, r=rate, s=seed: row(m, n, r, s),
             {"model": model, "mesh": side, "prompt_tokens": args.prompt_len, "rate": rate, "seed": seed})
            for model in models for side in sides for rate in rates
            for seed in (range(args.seeds) if rate else (0,))]


def markdown(rows: list[dict]) -> str:
    """The table of results/README.md: the mean over the seeds at each rate."""
    head = "| model | region | dead cores | links stretched | longest link | cycles/layer | decode tokens/s | slowdown |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    good = [r for r in rows if not r.get("error") and r.get("slowdown") != ""]
    for model, side in dict.fromkeys((r["model"], r["mesh"]) for r in good):
        mine = [r for r in good if (r["model"], r["mesh"]) == (model, side)]
        fields = ("stretched_share", "modeled_cycles_per_layer", "modeled_decode_tokens_per_s", "slowdown")
        means = zip(*(mean_over_seeds(mine, field) for field in fields))
        for (rate, share), (_, cycles), (_, tokens), (_, slowdown) in means:
            longest = max(int(r["worst_stretch"]) for r in mine if float(r["rate"]) == rate)
            lines.append(f"| {model} | {side}² | {100 * rate:g}% | {share:.1%} | {longest} hops | {cycles:,.0f} "
                         f"| {tokens:,.0f} | {slowdown:.2f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, hardware: str) -> None:
    """Decode tokens/s and the slowdown against the defect rate (seeds as dots, their mean as
    a line), one line per model and region."""
    plt, fig, axes = figure(2, width=4.6)
    rate_ax, slow_ax = axes[0]
    good = [r for r in rows if not r.get("error") and r.get("slowdown") != ""]
    for ax, field in ((rate_ax, "modeled_decode_tokens_per_s"), (slow_ax, "slowdown")):
        plot_over_rates(ax, good, lambda r: (r["model"], r["mesh"]), field, lambda key: f"{key[0]} on {key[1]}²")
        ax.legend(fontsize=7)
    prompt = good[0]["prompt_tokens"] if good else "?"
    rate_ax.set(ylabel="decode tokens/s per request", title=f"decode step, {prompt}-token context ({hardware})")
    slow_ax.set(ylabel="cycles per token / defect-free", title="slowdown on a remapped wafer")
    save_figure(plt, fig, path)
