"""One request on the emulated wafer, as a Python API: what ``python -m llm generate`` runs.

    from llm.session import Session
    from meshmpi import Mesh, load_hardware

    hw = load_hardware("wse2")
    session = Session(config, weights, lambda rows, cols: Mesh(rows, cols, hw), mesh=(8, 8),
                      new_tokens=24)
    session.prefill(ids)                      # token ids, or a prompt length in a dry run
    tokens = session.decode(lambda logits: int(logits.argmax()))
    report = session.report()
    session.close()

The prompt is prefilled on a square region (PAPER.md §4), its KV cache moved into the decode
region's layout on the fabric (§5), and the new tokens decoded one at a time (§5–6); a dry run
simulates the decode at sampled context lengths and integrates the rest (:mod:`llm.e2e`). The
report holds the modeled figures of every part and the end-to-end tokens/s (§7).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from meshmpi import energy, progress
from meshmpi.errors import MeshmpiError
from meshmpi.check import require_finite

from . import e2e
from .decode import POLICIES
from .plan import Planner, hint_on_failure, kv_rows
from .prefill import prefill
from .strategies import decoder_class, prefill_runner


@dataclass
class Options:
    """How the request runs: the KV policy, the allreduces, the layers simulated (None: all;
    fewer are extrapolated), the decode contexts a dry run simulates, progress on stderr, and
    the prefill's and decode's mapping (:mod:`llm.strategies`: WaferLLM's or a system it is compared with)."""
    kv: str = "shift"
    allreduce: str = "ktree"
    groups: int | None = None
    forwarding: str = "stream"
    layers: int | None = None
    decode_samples: int = 16
    progress: bool = False
    strategy: str = "waferllm"
    run_every_layer: bool = False      # a dry run's steady layers run too, none advanced (meshmpi.steady)


class Session:
    """Prefill, re-layout and decode of one request; see the module docstring.

    ``make_mesh(rows, cols)`` makes a region's mesh (its hardware, rank grid, dry run and
    memory/route policies); ``mesh`` is the decode region, ``prefill_side`` the square prefill
    region (default the largest square in ``mesh``); ``new_tokens`` sizes the KV buffers."""

    def __init__(self, config, weights, make_mesh, mesh: tuple[int, int], new_tokens: int,
                 prefill_side: int | None = None, options: Options | None = None):
        self.config, self.weights, self.make_mesh = config, weights, make_mesh
        self.rows, self.cols = mesh
        self.side = prefill_side or min(mesh)
        self.new_tokens, self.options = new_tokens, options or Options()
        self.sim_layers = self.options.layers or config.num_hidden_layers
        self.started = time.perf_counter()
        self.mesh = self.decoder = self.pre = self.prefill_timeline = None
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ prefill
    def prefill(self, ids, keep_timeline: bool = False) -> None:
        """Prefill ``ids`` (or, in a dry run, a prompt of that many tokens), then place the
        decode weights and move the cache into the decode region's layout on the fabric."""
        o, config = self.options, self.config
        self.prompt = len(ids) if not isinstance(ids, (int, np.integer)) else int(ids)
        pmesh = self.make_mesh(self.side, self.side)
        try:
            self.planner = Planner(config, pmesh.hardware, self.prompt, self.new_tokens, o.kv, o.allreduce,
                                   o.forwarding)
            with hint_on_failure(self.planner), progress.Progress(
                    self.sim_layers, f"prefill of {self.prompt} tokens", "layers", o.progress) as bar:
                self.pre = prefill(pmesh, config, self.weights, ids, layers=self.sim_layers,
                                   forwarding=o.forwarding, on_layer=bar.update, runner=prefill_runner(o.strategy),
                                   run_every_layer=o.run_every_layer)
            self.mesh = mesh = self.make_mesh(self.rows, self.cols)
            capacity = kv_rows(o.kv, self.prompt + self.new_tokens, self.rows)
            progress.stage(f"placing {self.sim_layers} decode layers on {self.rows}x{self.cols}", o.progress)
            with hint_on_failure(self.planner):
                self.decoder = decoder_class(o.strategy)(mesh, config, self.weights, o.kv, self.sim_layers, capacity, o.allreduce,
                                       o.groups, forwarding=o.forwarding, run_every_layer=o.run_every_layer)
            self.decoder.load_prompt_cache(self.pre.k_cache, self.pre.v_cache, self.prompt,
                                           prefill_side=self.side, prefill_mesh=pmesh)
            # the simulated prefill layers' events, scaled to the model's; the re-layout's
            self.prefill_events = energy.combine((config.num_hidden_layers / self.pre.layers,
                                                  energy.mesh_events(pmesh)))
            self.relayout_events = energy.mesh_events(mesh)
            self.warnings = [f"prefill {w}" for w in pmesh.memory.warnings + pmesh.routes.warnings]
            self.prefill_timeline = pmesh.timeline.collect() if keep_timeline else None
        except MeshmpiError as exc:
            if exc.collective:      # every rank is here: the regions can be freed together
                self.close()
                pmesh.free()
            raise
        pmesh.free()

    # ------------------------------------------------------------------ decode
    def decode(self, choose, on_token=None, stop=()) -> list[int]:
        """Decode up to ``new_tokens`` tokens: ``choose(logits)`` picks each (logits None in a
        dry run, where the token is 0), ``on_token(token)`` sees it, a token in ``stop`` ends
        the request. Decode steps run at positions P..P+G-2 (the first new token comes from the
        prefill's last hidden vector); a dry run simulates ``decode_samples`` of them."""
        mesh, decoder, config, o = self.mesh, self.decoder, self.config, self.options
        prompt = self.prompt
        steps_at = e2e.sample_positions(prompt, prompt + self.new_tokens - 2,
                                        o.decode_samples if mesh.dry_run else self.new_tokens)
        simulate = set(steps_at)
        self.tokens, self.logits, self.step_cycles = [], [], []
        self.layer_cycles = self.last_parts = None
        # Phase "decode" once per token, labelled with the position it reads.
        mesh.timeline.label_next(f"position {prompt - 1}")
        start = mesh.modeled_cycles()
        with mesh.phase("decode"):
            logits = decoder.logits_from(self.pre.last_hidden)
        self.first_head_cycles = mesh.modeled_cycles() - start
        self.first_head_events = energy.combine((1, energy.mesh_events(mesh)), (-1, self.relayout_events))
        self.step_events = []
        for index in range(self.new_tokens):
            if logits is not None:  # a NaN would otherwise pass as token 0
                require_finite(f"the logits of new token {index}", logits)
                self.logits.append(logits.astype(np.float32))
            token = choose(logits) if logits is not None else 0
            self.tokens.append(token)
            if on_token is not None:
                on_token(token)
            if (token in stop and logits is not None) or index == self.new_tokens - 1:
                break
            position = prompt + index
            if position not in simulate:
                continue
            if mesh.dry_run:
                decoder.seek(position, prompt)
            embedding = None if self.weights is None else self.weights.embed[token]
            mesh.timeline.label_next(f"position {position}")
            logits, cycles = decoder.step(embedding, position)
            self.layer_cycles = self.layer_cycles or cycles.layers
            total = cycles.total(config.num_hidden_layers)
            self.step_cycles.append(total)
            self.step_events.append(cycles.events(config.num_hidden_layers))
            self.last_parts = {"kv_shift": cycles.kv_shift, "hand_offs": cycles.hand_offs, "lm_head": cycles.head,
                               "layers": total - cycles.kv_shift - cycles.hand_offs - cycles.head}
        self.simulated = steps_at[: len(self.step_cycles)]
        self.last_step = prompt + len(self.tokens) - 2
        self.decode_cycles = e2e.integrate(self.simulated, self.step_cycles, prompt, self.last_step)
        return self.tokens

    # ------------------------------------------------------------------ energy
    def energy_report(self) -> dict:
        """Joules of the request (PAPER.md §9, :mod:`meshmpi.energy`): the prefill (its region's
        events scaled to every layer, static power on every prefill region) with the KV
        re-layout, and the decode (the first token's LM head, then every step: the sampled
        steps' joules integrated like their cycles, static power on every decode region)."""
        hw, config = self.mesh.hardware, self.config
        if not hw.has_energy:
            return dict.fromkeys(("energy_joules", "energy_split_joules", "average_watts", "energy_joules_per_token",
                                  "energy_prefill_joules", "energy_decode_joules_per_token",
                                  "energy_decode_split_joules_per_token"))
        seconds = hw.cycles_to_seconds
        decode_cores = self.decoder.plan.regions * self.rows * self.cols
        prefill = energy.joules(hw, self.prefill_events, self.pre.regions * self.side ** 2
                                * seconds(self.pre.cycles(config.num_hidden_layers)))
        relayout = energy.joules(hw, self.relayout_events, decode_cores * seconds(self.decoder.relayout_cycles))
        head = energy.joules(hw, self.first_head_events, decode_cores * seconds(self.first_head_cycles))
        steps = [energy.joules(hw, events, decode_cores * seconds(cycles))
                 for events, cycles in zip(self.step_events, self.step_cycles)]
        split = {part: prefill[part] + relayout[part] + head[part]
                 + e2e.integrate(self.simulated, [step[part] for step in steps], self.prompt, self.last_step)
                 for part in energy.PARTS + ("total",)}
        generated = len(self.tokens)
        decode = {part: (split[part] - prefill[part] - relayout[part] - head[part]) / (generated - 1)
                  for part in energy.PARTS + ("total",)} if generated > 1 else None
        return {**energy.summary(split, seconds(self.e2e_cycles())),
                "energy_joules_per_token": split["total"] / generated,
                "energy_prefill_joules": prefill["total"] + relayout["total"],
                "energy_decode_joules_per_token": decode["total"] if decode else None,
                "energy_decode_split_joules_per_token": {part: decode[part] for part in energy.PARTS} if decode else None}

    def e2e_cycles(self) -> float:
        """The request's modeled cycles: prefill, re-layout, the first LM head and the decode."""
        return (self.pre.cycles(self.config.num_hidden_layers) + self.decoder.relayout_cycles
                + self.first_head_cycles + self.decode_cycles)

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        """The modeled figures of the request (every rank)."""
        mesh, decoder, pre, config, o = self.mesh, self.decoder, self.pre, self.config, self.options
        hardware, plan, rows, cols, side = mesh.hardware, decoder.plan, self.rows, self.cols, self.side
        clock, tokens = hardware.clock_hz, self.tokens
        prefill_cycles, relayout_cycles = pre.cycles(config.num_hidden_layers), decoder.relayout_cycles
        per_token = self.decode_cycles / (len(tokens) - 1) if len(tokens) > 1 else None
        e2e_cycles = self.e2e_cycles()
        return {
            "mesh": f"{rows}x{cols}", "prefill_mesh": f"{side}x{side}",
            "dry_run": bool(mesh.dry_run), "hardware": hardware.name, "ranks": mesh.size,
            "tokens": tokens if self.weights is not None else [],
            "prompt_tokens": self.prompt, "new_tokens": len(tokens), "kv_policy": o.kv, "strategy": o.strategy,
            "modeled_prefill_seconds": (prefill_cycles + relayout_cycles) / clock,
            "modeled_prefill_cycles": prefill_cycles, "modeled_relayout_cycles": relayout_cycles,
            "prefill_flops_charged": pre.flops_charged, "prefill_flops_real": pre.flops_real,
            "modeled_decode_cycles_per_token": per_token,
            "modeled_decode_tokens_per_s": clock / per_token if per_token else None,
            "modeled_cycles_per_layer": self.layer_cycles[0] if self.layer_cycles else None,
            "modeled_first_token_head_cycles": self.first_head_cycles,
            "decode_step_parts": self.last_parts,
            "modeled_decode_cycles": self.decode_cycles,
            "modeled_decode_seconds": self.decode_cycles / clock,
            "modeled_e2e_seconds": e2e_cycles / clock,
            "modeled_e2e_tokens_per_s": len(tokens) * clock / e2e_cycles,
            "e2e_prefill_share": (prefill_cycles + relayout_cycles) / e2e_cycles,
            "decode_integration": e2e.summary(self.simulated, self.prompt, self.last_step),
            "decode_reduction_payloads": decoder.reduction_payloads,
            "decode_kv_layout": decoder.layout.summary(),
            "prefill_layers_per_region": pre.layers_per_region, "prefill_regions": pre.regions,
            "layers_simulated": self.sim_layers, "prefill_layers_advanced": pre.layers_advanced,
            "decode_layers_advanced": decoder.layers_advanced,
            "layers_per_region": plan.layers_per_region,
            "regions": plan.regions, "last_region_layers": plan.last_region_layers,
            "cores_used": plan.regions * rows * cols,
            "wafers": plan.regions * rows * cols / (hardware.mesh_rows * hardware.mesh_cols),
            "kv_capacity_tokens": plan.capacity(o.kv, rows, self.prompt),
            "kv_capacity_by_policy": {policy: plan.capacity(policy, rows, self.prompt) for policy in POLICIES},
            "kv_tokens_per_row": decoder.kv.counts.tolist(),
            "peak_bytes_per_core": int(mesh.max_over_ranks(int(mesh.memory.peak.max(initial=0)))),
            "routes_per_core_max": int(mesh.max_over_ranks(int(mesh.routes.peak.max(initial=0)))),
            "wall_seconds": time.perf_counter() - self.started,
            **self.energy_report(),
            "warnings": self.warnings + mesh.memory.warnings + mesh.routes.warnings,
            "defects": None if mesh.defects is None else mesh.defects.stats(),
        }

    def close(self) -> None:
        if self.mesh is not None:
            self.mesh.free()
            self.mesh = None
