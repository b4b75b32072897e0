"""LLaMA decode on an ``R x C`` region with MeshGEMV and a KV cache on the cores (PAPER.md §5-6).

One token at a time. The hidden vector is row-indexed; every GEMV alternates its reduction
axis (q/k/v fused and gate/up fused reduce along Y, W_O and W_down along X), so there are ten
allreduces per layer and no transposes. The attention's reductions carry only what a core's
columns need: the scores of a kv head are reduced over its own segment of columns
(:class:`llm.layout.DecodeLayout`), for its ``group`` query heads only, and the softmax max and
sum along Y carry one value per such head. The KV cache keeps tokens on rows and dims on columns:

- ``shift`` (PAPER.md §6): rows stay balanced (counts within one) and in time order; when a
  token arrives, the rows below the one that grows pass their oldest token one row up over
  1-hop vertical links, and the last row takes the new token.
- ``concat`` (the GPU-style baseline): the new token goes to the last row, which fills first.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernels.allreduce import allreduce
from kernels.gemv import MeshGemv, vector_layout
from meshmpi import costs, energy, host
from meshmpi.errors import UsageError
from meshmpi.marks import Marks
from meshmpi.mesh import block_offsets
from meshmpi.steady import SteadyState

from . import flops
from .layout import DecodeLayout, Gathered, vector_block
from .relayout import relayout_kv

POLICIES = ("shift", "concat")


@dataclass
class RegionPlan:
    """How the model spreads over regions of this mesh's size, and the KV capacity.

    The last region holds the LM head and as many layers as fit beside it
    (``last_region_layers``); the other regions share the rest, up to ``layers_per_region``
    each. ``weight_bytes_per_core`` and
    ``kv_bytes_per_token_per_core`` are those of the simulated region (a layer region, or the
    only region); ``per_row_capacity`` is the tightest over all regions."""
    layers_per_region: int
    regions: int
    weight_bytes_per_core: int
    kv_bytes_per_token_per_core: int
    per_row_capacity: int
    last_region_layers: int

    def region_starts(self, layers: int) -> list[int]:
        """The layers (of ``layers`` in all) that begin a new region: the first regions take
        ``layers_per_region`` each, the last the final ``last_region_layers``. With no layer
        on the last region, ``layers`` itself is listed: the LM head's region starts there."""
        body = layers - self.last_region_layers
        starts = list(range(self.layers_per_region, body, self.layers_per_region))
        return starts + [body] if self.regions > 1 else []

    def capacity(self, policy: str, rows: int, prompt_tokens: int) -> int:
        if policy == "shift":
            return rows * self.per_row_capacity
        first_rows = -(-prompt_tokens // rows) if prompt_tokens else 0
        return prompt_tokens + max(self.per_row_capacity - first_rows, 0)


def plan_regions(layout: DecodeLayout, config, hardware, reserve_bytes: int,
                 tokens_per_row: int = 1) -> RegionPlan:
    """Layers per region (PAPER.md §5: a model too big for one region runs as a pipeline of
    layer groups): as many as fit beside the working buffers and ``tokens_per_row`` tokens of
    KV per layer (the context the run needs on its fullest row). The LM head lives on the
    last region only, with as many layers as fit beside it (possibly none)."""
    eb, layers = hardware.element_bytes, config.num_hidden_layers
    per_layer = layout.layer_weight_elements() * eb
    head = layout.head_elements() * eb
    kv_token = 2 * layout.s * eb
    free = hardware.sram_bytes_per_core - reserve_bytes
    need = per_layer + kv_token * max(tokens_per_row, 1)
    where = f"on a {layout.rows}x{layout.cols} region: use a larger --mesh or a shorter context"
    if free - head < 0:
        raise UsageError(f"the LM head needs {head:,} B per core beside {reserve_bytes:,} B of working "
                         f"buffers {where}")
    last = min(layers, (free - head) // need)
    if last == layers:                                   # everything in one region
        lpr, regions, weights = layers, 1, per_layer * layers + head
        per_row = (free - weights) // (kv_token * layers)
    else:
        lpr = min(layers, free // need)
        if lpr < 1:
            raise UsageError(f"one layer with {tokens_per_row:,} tokens of KV per row needs {need:,} B "
                             f"per core but only {max(free, 0):,} B are free {where}")
        regions = 1 + -(-(layers - last) // lpr)
        weights = per_layer * lpr
        per_row = (free - weights) // (kv_token * lpr)
        if last:
            per_row = min(per_row, (free - head - per_layer * last) // (kv_token * last))
    return RegionPlan(int(lpr), int(regions), int(weights), int(kv_token * lpr), int(per_row), int(last))


@dataclass
class StepCycles:
    """Modeled cycles of one decode step, by part. ``total(layers)`` extrapolates the simulated
    layers' cycles to ``layers`` layers (equal to the simulated sum when every layer ran)."""
    kv_shift: float = 0.0
    layers: list = field(default_factory=list)
    hand_offs: float = 0.0
    head: float = 0.0

    layer_events: dict = field(default_factory=dict)   # counted events of the simulated layers
    other_events: dict = field(default_factory=dict)   # of the rest of the step (hand-offs extrapolated)

    def total(self, layers: int) -> float:
        return self.kv_shift + sum(self.layers) * layers / len(self.layers) + self.hand_offs + self.head

    def events(self, layers: int) -> dict:
        """The step's counted events (:mod:`meshmpi.energy`), its layers' extrapolated as in :meth:`total`."""
        return energy.combine((1, self.other_events), (layers / len(self.layers), self.layer_events))


@dataclass
class KVState:
    """Token counts per row (the same on every rank) and, numerically, the cached tiles."""
    counts: np.ndarray
    k: list = field(default_factory=list)   # per simulated layer: (br, bc, capacity, s)
    v: list = field(default_factory=list)


class Decoder:
    """Runs decode steps of a model on a mesh. ``layers`` simulated (others extrapolated)."""

    def __init__(self, mesh, config, weights, policy: str = "shift", layers: int | None = None,
                 capacity_tokens: int = 64, allreduce_algo: str = "ktree", groups: int | None = None,
                 plan_tokens: int | None = None, forwarding: str = "stream", run_every_layer: bool = False):
        if policy not in POLICIES:
            raise UsageError(f"--kv must be one of {POLICIES}, not {policy!r}")
        self.mesh, self.config, self.policy = mesh, config, policy
        self.reduce = dict(algo=allreduce_algo, groups=groups, forwarding=forwarding)
        self.layout = lay = DecodeLayout.for_config(config, mesh.rows, mesh.cols)
        self.sim_layers = layers or config.num_hidden_layers
        self.run_every_layer = run_every_layer     # else a dry step advances its steady layers
        self.layers_advanced = 0                    # by the last step (meshmpi.steady)
        self.relayout_cycles = 0.0
        self.reduction_payloads = {}     # the last step's, elements per core (see _note_payload)
        eb = mesh.hardware.element_bytes
        reserve = self._scratch_elements(capacity_tokens) * eb
        # Layers per region leave room for plan_tokens (default: the buffers' capacity) per row.
        self.plan = plan_regions(lay, config, mesh.hardware, reserve,
                                 capacity_tokens if plan_tokens is None else plan_tokens)
        self.capacity_rows = capacity_tokens
        c, g, s = mesh.cols, lay.group, lay.s
        # The step's MeshGEMVs over the layout's arranged matrices (PAPER.md §5: the reduction
        # axes alternate, so no vector is transposed)
        self.gemvs = {kind: MeshGemv(mesh, m, n, axis, **self.reduce, name=kind) for kind, (m, n, axis) in {
            "qkv": (config.hidden_size, c * (g + 2) * s, "y"), "o": (c * g * s, config.hidden_size, "x"),
            "gate_up": (config.hidden_size, c * 2 * lay.ffn_chunk, "y"),
            "down": (config.intermediate_size, config.hidden_size, "x"),
            "lm_head": (config.hidden_size, config.vocab_size, "y")}.items()}
        self._load_weights(weights)
        self.kv = KVState(np.zeros(mesh.rows, np.int64))
        if not mesh.dry_run:
            shape = mesh.block_shape + (capacity_tokens, lay.s)
            self.kv.k = [np.zeros(shape, np.float32) for _ in range(self.sim_layers)]
            self.kv.v = [np.zeros(shape, np.float32) for _ in range(self.sim_layers)]

    def _scratch_elements(self, tokens: int) -> int:
        """Working buffers of one decode step per core (scores, vectors, receive buffers)."""
        lay = self.layout
        return (3 * lay.score_elements(tokens) + 6 * (lay.group + 2) * lay.s + 6 * lay.hidden_chunk
                + 6 * lay.ffn_chunk + 3 * lay.vocab_chunk)

    # ---------------------------------------------------------------- weights
    def _load_weights(self, weights) -> None:
        """Each rank reads and places only its block's tiles of every weight."""
        mesh, lay = self.mesh, self.layout
        shapes = lay.tile_shapes()
        # The region holds layers_per_region layers: they are charged below as one block,
        # not tile by tile (a numeric run may simulate more layers than one region holds).
        self.layers = []
        for index in range(self.sim_layers):
            tiles = self._layer_tiles(weights.layers[index]) if weights is not None else {}
            placed = {name: host.place_block(mesh, f"w{index}.{name}", tiles.get(name), shape, np.float32,
                                             charge=False, adopt=True) for name, shape in shapes.items()}
            for kind in ("qkv", "o", "gate_up", "down"):       # the arranged matrices' natural blocks
                placed[kind].layout = self.gemvs[kind].w_layout
            self.layers.append(placed)
        head = {}
        if weights is not None:
            head = {"norm": self._vector_tiles(weights.norm),
                    "lm_head": lay.place(Gathered.of((weights.lm_head,)), "y", mesh.global_rows(), mesh.global_cols())}
        self.norm = host.place_block(mesh, "w.norm", head.get("norm"), (lay.hidden_chunk,), np.float32,
                                     charge=False)
        self.lm_head = host.place_block(mesh, "w.lm_head", head.get("lm_head"),
                                        (lay.hidden_chunk, lay.vocab_chunk), np.float32, charge=False, adopt=True)
        self.lm_head.layout = self.gemvs["lm_head"].w_layout
        mesh.memory.charge("weights", self.resident_weight_bytes())

    def resident_weight_bytes(self):
        """Bytes per core of the simulated region's resident weights (its plan's)."""
        return self.plan.weight_bytes_per_core

    def _layer_tiles(self, w) -> dict:
        """This rank's block of one layer's weight tiles."""
        lay, rows, cols = self.layout, self.mesh.global_rows(), self.mesh.global_cols()
        matrices = lay.layer_matrices(w)
        return {"norm1": self._vector_tiles(w.input_layernorm),
                "qkv": lay.place(matrices["qkv"], "y", rows, cols),
                "o": lay.place(matrices["o"], "x", rows, cols),
                "norm2": self._vector_tiles(w.post_attention_layernorm),
                "gate_up": lay.place(matrices["gate_up"], "y", rows, cols),
                "down": lay.place(matrices["down"], "x", rows, cols)}

    def _vector_tiles(self, vector) -> np.ndarray:
        """This rank's block of a row-indexed vector (chunk i on every core of row i)."""
        mesh = self.mesh
        chunks = vector_block(vector, mesh.rows, mesh.global_rows())
        return np.broadcast_to(chunks[:, None], mesh.block_shape + chunks.shape[1:])

    # ---------------------------------------------------------------- KV cache
    def load_prompt_cache(self, k_cache, v_cache, tokens: int, prefill_side: int | None = None,
                          prefill_mesh=None) -> None:
        """Place a prefilled cache (per layer [kv_heads, T, head_dim]) with rows balanced. With
        ``prefill_side``, the move from the prefill square's layout is timed on the fabric
        (:mod:`llm.relayout`) of the larger region (``prefill_mesh`` when the prefill square
        holds the decode region); its cycles are ``self.relayout_cycles``."""
        mesh, lay = self.mesh, self.layout
        if prefill_side and tokens:
            from .prefill import PrefillLayout
            fabric = prefill_mesh if prefill_side > min(mesh.rows, mesh.cols) else mesh
            start = fabric.modeled_cycles()
            relayout_kv(fabric, PrefillLayout(self.config, prefill_side, tokens), lay, tokens,
                        self.plan.layers_per_region)
            self.relayout_cycles = fabric.modeled_cycles() - start
        bounds = block_offsets(tokens, mesh.rows)     # balanced; rows beyond the tokens stay empty
        self.kv.counts = np.diff(bounds).astype(np.int64)
        if tokens and self.kv.counts.max() > self.capacity_rows:
            raise UsageError("prompt does not fit the decode buffers")
        if not mesh.dry_run and k_cache is not None:
            slots = lay.kv_index().reshape(lay.cols, lay.s)
            for layer in range(self.sim_layers):
                for cache, store in ((k_cache[layer], self.kv.k[layer]), (v_cache[layer], self.kv.v[layer])):
                    flat = cache.transpose(1, 0, 2).reshape(tokens, -1)          # [T, kv_dim]
                    for r_local, r in enumerate(mesh.global_rows()):
                        rows_tokens = flat[bounds[r]:bounds[r + 1]]
                        for c_local, c in enumerate(mesh.global_cols()):
                            idx = slots[c]
                            store[r_local, c_local, :rows_tokens.shape[0]] = np.where(
                                idx >= 0, rows_tokens[:, np.maximum(idx, 0)], 0.0)
        self._charge_kv()

    def seek(self, tokens: int, prompt_tokens: int) -> None:
        """Dry runs only: set the cache to the token counts it has after ``tokens`` tokens
        (``prompt_tokens`` of them placed by the prefill), as if every step in between had
        run: balanced rows under shift (:meth:`_append` grows row ``total mod rows``), the
        prompt's balanced rows plus the rest on the last row under concat."""
        if not self.mesh.dry_run:
            raise ValueError("a numeric decode runs every step: seek is for dry runs")
        rows = self.mesh.rows
        counts = np.diff(block_offsets(prompt_tokens if self.policy == "concat" else tokens, rows))
        if self.policy == "concat":
            counts[rows - 1] += tokens - prompt_tokens
        if counts.max() > self.capacity_rows:
            raise UsageError("decode buffers exhausted: raise the capacity (--max-new-tokens sizes it)")
        self.kv.counts = counts.astype(np.int64)
        self._charge_kv()

    def _charge_kv(self) -> None:
        mesh = self.mesh
        per_core = self.kv.counts[mesh.row_start:mesh.row_stop, None] * self.plan.kv_bytes_per_token_per_core
        mesh.memory.charge("kv_cache", np.broadcast_to(per_core, mesh.block_shape))

    def _append(self) -> int:
        """Make room for a new token under the policy; returns the row its k, v go to.

        ``shift``: the row ``total mod rows`` grows. While the last row is still empty (fewer
        tokens than rows) that row simply takes the new token; once every row holds a token,
        the rows below it pass their oldest token one row up and the last row takes the new
        one, so rows stay balanced and in time order. ``concat``: the last row takes it."""
        counts, rows = self.kv.counts, self.mesh.rows
        total = int(counts.sum())
        newest = rows - 1
        if self.policy == "shift" and rows > 1:
            grow = total % rows                  # the row that gains a token
            if counts[rows - 1] == 0:            # rows below ``grow`` are empty: nothing moves
                newest = grow
            elif grow < rows - 1:
                self._pass_oldest_up(grow)
            counts[grow] += 1
        else:
            counts[newest] += 1
        if counts.max() > self.capacity_rows:
            raise UsageError("decode buffers exhausted: raise the capacity (--max-new-tokens sizes it)")
        self._charge_kv()
        return newest

    def _pass_oldest_up(self, grow: int) -> None:
        """Rows below ``grow`` hand their oldest token to the row above (1 hop, all in parallel)."""
        mesh, lay, counts = self.mesh, self.layout, self.kv.counts
        layers = max(self.plan.layers_per_region, self.sim_layers)
        out = mesh.alloc("kv.shift.out", (layers, 2, lay.s), np.float32)
        inc = mesh.alloc("kv.shift.in", out.tile_shape, np.float32)
        rows = mesh.global_rows()
        movers = rows > grow
        if not mesh.dry_run:
            for layer in range(self.sim_layers):
                out.data[:, :, layer, 0] = self.kv.k[layer][:, :, 0]
                out.data[:, :, layer, 1] = self.kv.v[layer][:, :, 0]
        mesh.fabric.shift("kv.shift", "y", -1, lo=grow, hi=mesh.rows).run(out, inc)
        if not mesh.dry_run:
            for layer in range(self.sim_layers):
                for store, which in ((self.kv.k[layer], 0), (self.kv.v[layer], 1)):
                    store[movers, :, :-1] = store[movers, :, 1:]
                    for r_local, r in enumerate(rows):
                        if grow <= r < mesh.rows - 1:   # receives the next row's oldest
                            slot = counts[r] - (1 if r > grow else 0)
                            store[r_local, :, slot] = inc.data[r_local, :, layer, which]
        out.free()
        inc.free()

    # ---------------------------------------------------------------- one token
    def _rope(self, position: int):
        """cos/sin per kv slot of this block's columns: shape (block_cols, s)."""
        from .reference import rope_inv_freq
        lay, mesh = self.layout, self.mesh
        angle = position * rope_inv_freq(self.config).astype(np.float64)[lay.slot_freq]
        angle = angle.reshape(lay.cols, lay.s)[mesh.col_start:mesh.col_stop]
        return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)

    @staticmethod
    def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """RoPE on side-by-side pairs (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
        first, second = x[..., 0::2], x[..., 1::2]
        c, s = cos[..., 0::2], sin[..., 0::2]
        out = np.empty_like(x)
        out[..., 0::2] = first * c - second * s
        out[..., 1::2] = second * c + first * s
        return out

    def _rms_norm(self, x, weight, name: str):
        """RMSNorm of a row-indexed vector: local sum of squares, allreduce along Y, scale."""
        mesh, eps = self.mesh, self.config.rms_norm_eps
        total = mesh.alloc(f"{name}.ss", (1,), np.float32)
        mesh.local(flops.RMS_SUMSQ * x.tile_elements, lambda: np.einsum("rci,rci->rc", x.data, x.data)[..., None],
                   total)
        self._allreduce(total, "y", "sum", f"{name}.allreduce")
        out = mesh.alloc(f"{name}.out", x.tile_shape, np.float32)
        out.layout = x.layout                            # a norm keeps its input's layout

        def scale():
            inverse_rms = 1.0 / np.sqrt(total.data / np.float32(self.config.hidden_size) + np.float32(eps))
            return x.data * inverse_rms * weight.data
        mesh.local(flops.RMS_ROW + flops.RMS_SCALE * x.tile_elements, scale, out, scalars=1)   # one reciprocal root
        total.free()
        return out

    def _layer(self, index: int, x, position: int):
        """RMSNorm, the fused q/k/v MeshGEMV (reduce Y) and local RoPE (PAPER.md §5 table):
        returns this block's q, k, v tiles (None in a dry run)."""
        mesh, lay, w = self.mesh, self.layout, self.layers[index]
        g, s = lay.group, lay.s
        tag = f"decode.layer{index}"
        xn = self._rms_norm(x, w["norm1"], f"{tag}.norm1")
        qkv = self._meshgemv(xn, w["qkv"], f"{tag}.qkv")
        xn.free()

        def rope():
            cos, sin = self._rope(position)
            parts = qkv.data.reshape(mesh.block_shape + (g + 2, s))
            return (self._rotate(parts[:, :, :g], cos[None, :, None, :], sin[None, :, None, :]),
                    self._rotate(parts[:, :, g], cos[None], sin[None]), parts[:, :, g + 1].copy())
        q_k_v = mesh.local(flops.ROPE_PAIR * (g + 1) * s // 2, rope)   # q's g heads and k, s // 2 pairs each
        qkv.free()
        return q_k_v or (None, None, None)

    def _attend(self, index: int, q, x, position: int):
        """Scores against the cache (allreduce X over each kv head's segment of columns), softmax
        (allreduce Y twice, the column's heads only), p·V (allreduce Y), then W_O (reduce X),
        residual; then the FFN with its two GEMVs."""
        mesh, lay, w = self.mesh, self.layout, self.layers[index]
        g, s, local_heads = lay.group, lay.s, lay.heads_per_column
        tag = f"decode.layer{index}"
        cap = int(self.kv.counts.max())
        counts = self.kv.counts[mesh.row_start:mesh.row_stop]
        scores = mesh.alloc(f"{tag}.scores", (lay.score_elements(cap),), np.float32)
        cols = slice(mesh.col_start * s, mesh.col_stop * s)
        slot_local = lay.slot_local[cols].reshape(-1, s)                   # (bc, s)

        def partial_scores():
            onehot = (slot_local[:, :, None] == np.arange(local_heads)).astype(np.float32)  # (bc, s, lh)
            keys = self.kv.k[index][:, :, :cap]
            return np.einsum("rcts,rcas,csh->rctha", keys, q, onehot, optimize=True).reshape(scores.data.shape)
        mesh.local(2 * cap * g * s, partial_scores, scores)
        self._allreduce(scores, "x", "sum", f"{tag}.scores", segments=lay.segments)
        valid = np.arange(cap)[None, :] < counts[:, None]                  # (br, cap)
        by_token = mesh.block_shape + (cap, local_heads * g)
        peak = mesh.alloc(f"{tag}.max", (local_heads * g,), np.float32)
        total = mesh.alloc(f"{tag}.sum", (local_heads * g,), np.float32)

        def scale_mask_max():          # the scores scaled and masked in place; their row maxima
            sc = scores.data.reshape(by_token) / np.float32(np.sqrt(lay.head_dim))
            sc = np.where(valid[:, None, :, None], sc, np.float32(-np.inf))
            scores.data[...] = sc.reshape(scores.data.shape)
            return np.where(valid.any(1)[:, None, None], sc.max(axis=2), np.float32(-3e38))
        mesh.local((flops.SCORE_SCALE_MASK + flops.SOFTMAX_MAX) * lay.score_elements(cap), scale_mask_max, peak)
        self._allreduce(peak, "y", "max", f"{tag}.softmax_max")

        def exp_sum():                 # the exponentials in place; their sums
            sc = scores.data.reshape(by_token)
            e = np.where(valid[:, None, :, None], np.exp(sc - peak.data[:, :, None, :]), np.float32(0))
            scores.data[...] = e.reshape(scores.data.shape)
            return e.sum(axis=2)
        mesh.local(flops.SOFTMAX_EXP_SUM * lay.score_elements(cap), exp_sum, total)
        self._allreduce(total, "y", "sum", f"{tag}.softmax_sum")
        o = mesh.alloc(f"{tag}.o", (g * s,), np.float32)

        def divide_pv():
            e = scores.data.reshape(by_token)
            p = (e / total.data[:, :, None, :]).reshape(mesh.block_shape + (cap, local_heads, g))
            # p_slot[r, c, t, a, slot]: the probability of query head a of the slot's kv head
            index_of = np.broadcast_to(np.maximum(slot_local, 0)[None, :, None, :, None],
                                       p.shape[:3] + (s, g))
            p_slot = np.take_along_axis(p, index_of, axis=3).swapaxes(3, 4)
            values = self.kv.v[index][:, :, :cap]
            return np.einsum("rcts,rctas->rcas", values, p_slot * (slot_local >= 0)[None, :, None, None, :]
                             ).reshape(o.data.shape)
        mesh.local(flops.SOFTMAX_DIVIDE * lay.score_elements(cap) + 2 * cap * g * s, divide_pv, o)
        self._allreduce(o, "y", "sum", f"{tag}.pv")
        for buf in (scores, peak, total):
            buf.free()
        attn = self._meshgemv(o, w["o"], f"{tag}.o_proj")
        o.free()
        self._add_into(x, attn)
        attn.free()
        xn = self._rms_norm(x, w["norm2"], f"{tag}.norm2")
        gate_up = self._meshgemv(xn, w["gate_up"], f"{tag}.gate_up")
        xn.free()
        f = lay.ffn_chunk
        act = mesh.alloc(f"{tag}.act", (f,), np.float32)

        def silu_mul():
            gate, up = gate_up.data[..., :f], gate_up.data[..., f:]
            return gate / (1.0 + np.exp(-gate)) * up
        mesh.local(flops.SILU_MUL * f, silu_mul, act)
        gate_up.free()
        down = self._meshgemv(act, w["down"], f"{tag}.down")
        act.free()
        self._add_into(x, down)
        down.free()

    def _allreduce(self, acc, axis: str, op: str, name: str, segments=None) -> None:
        """An allreduce of the step, its payload per core noted in ``reduction_payloads``."""
        self._note_payload(name, acc.tile_elements)
        allreduce(self.mesh, acc, axis, op, **self.reduce, name=name, segments=segments)

    def _meshgemv(self, x, w, name: str):
        """A MeshGEMV of the step with weight ``w`` (the run's plan for its kind: ``w0.qkv`` is
        a ``qkv``); its allreduce carries the output chunk."""
        self._note_payload(name, w.tile_shape[1])
        return self.gemvs[w.name.split(".")[-1]](x, w, name)

    def _note_payload(self, name: str, elements: int) -> None:
        """Elements per core of a reduction, by its name inside a layer (``scores``, ``pv``, ...;
        ``norm1`` for ``decode.layer0.norm1.allreduce``) or in the LM head (``final_norm``)."""
        parts = name.removesuffix(".allreduce").split(".")
        self.reduction_payloads[parts[-1]] = int(elements)

    def _add_into(self, x, y) -> None:
        self.mesh.local(flops.ADD * x.tile_elements, lambda: np.add(x.data, y.data, out=x.data))

    @property
    def every_layer(self) -> bool:
        """Every layer of the model is simulated, so every region and hand-off is too."""
        return self.sim_layers == self.config.num_hidden_layers

    def step(self, embedding: np.ndarray | None, position: int):
        """Decode one token: returns (logits on the host or None in a dry run, :class:`StepCycles`).

        The KV cache makes room for the token first (``decode.kv_shift``: once per token, every
        region shifting its own layers' caches at once), then the layers run. With every layer
        simulated, the hidden vector is handed to the next region where the plan starts one
        (:meth:`RegionPlan.region_starts`), and those hand-offs are the ones counted. With fewer
        layers, one hand-off is simulated and counted once per region boundary."""
        mesh = self.mesh
        x = self._hidden(embedding)
        starts = set(self.plan.region_starts(self.config.num_hidden_layers)) if self.every_layer else set()
        cycles = StepCycles()
        marks = Marks(mesh)         # the step's readings, reduced over the ranks at its end
        begin = marks.mark()
        layer_marks = []
        with mesh.phase("decode"):
            with mesh.phase("decode.kv_shift"):
                newest_row = self._append()     # the new token attends to itself: its row first
            kv_shifted = marks.mark()
            steady = SteadyState(mesh, enabled=not self.run_every_layer)
            for index in range(self.sim_layers):
                if index in starts:
                    cycles.hand_offs += self.hand_off(x)
                before = marks.mark()
                name = f"decode.layer{index}"
                with mesh.phase(name):
                    steady.run(name, lambda: self._decoder_layer(index, x, position, newest_row))
                layer_marks.append((before, marks.mark()))
            self.layers_advanced = steady.advanced
            unsimulated = energy.combine()      # the hand-offs counted but not simulated
            if self.sim_layers in starts:               # the LM head's region holds no layer
                cycles.hand_offs += self.hand_off(x)
            elif not self.every_layer and self.plan.regions > 1:
                before = energy.mesh_events(mesh)
                cycles.hand_offs = (self.plan.regions - 1) * self.hand_off(x)
                unsimulated = energy.combine((self.plan.regions - 2, energy.mesh_events(mesh)),
                                             (2 - self.plan.regions, before))
            head_start = marks.mark()
            with mesh.phase("decode.lm_head"):
                xn = self._rms_norm(x, self.norm, "decode.final_norm")
                logits = self._meshgemv(xn, self.lm_head, "decode.lm_head")
                xn.free()
            head_end = marks.mark()
        clocks, events = marks.reduce()
        cycles.kv_shift = clocks[kv_shifted] - clocks[begin]
        cycles.layers = [clocks[end] - clocks[start] for start, end in layer_marks]
        cycles.head = clocks[head_end] - clocks[head_start]
        layer_events = energy.combine(*[term for start, end in layer_marks for term in ((1, events[end]),
                                                                                          (-1, events[start]))])
        cycles.layer_events = layer_events
        cycles.other_events = energy.combine((1, events[head_end]), (-1, events[begin]), (-1, layer_events),
                                             (1, unsimulated))
        x.free()
        result = None
        if not mesh.dry_run:
            result = host.gather(logits)
        logits.free()
        return result, cycles

    def _decoder_layer(self, index: int, x, position: int, newest_row: int) -> None:
        """Layer ``index`` of a step: its projections, the new token's K and V into the cache
        row ``newest_row``, attention and the MLP, ``x`` updated in place."""
        q, k_new, v_new = self._layer(index, x, position)
        self._store_new(index, k_new, v_new, newest_row)
        self._attend(index, q, x, position)

    def _hidden(self, vector: np.ndarray | None):
        """A hidden vector on the mesh, row-indexed (the layout the first GEMV reads)."""
        mesh = self.mesh
        return host.scatter(mesh, "hidden", None if vector is None else np.asarray(vector, np.float32),
                            vector_layout(mesh.rows, mesh.cols, self.config.hidden_size, "y"), np.float32)

    def _store_new(self, index: int, k_new, v_new, row: int) -> None:
        """Write layer ``index``'s new k, v into ``row``'s newest slot (k, v are column-indexed,
        so every row has them: the store is local)."""
        mesh = self.mesh
        if mesh.dry_run or not (mesh.row_start <= row < mesh.row_stop):
            return
        r, slot = row - mesh.row_start, self.kv.counts[row] - 1
        self.kv.k[index][r, :, slot] = k_new[r]
        self.kv.v[index][r, :, slot] = v_new[r]

    # ---------------------------------------------------------------- around the steps
    def logits_from(self, hidden: np.ndarray | None):
        """Logits of an already final-normed hidden vector (the prefill's last token): the LM head GEMV."""
        mesh = self.mesh
        x = self._hidden(hidden)
        with mesh.phase("decode.lm_head"):
            logits = self.gemvs["lm_head"](x, self.lm_head, "decode.lm_head")
        x.free()
        result = None if mesh.dry_run else host.gather(logits)
        logits.free()
        return result

    def hand_off(self, x) -> float:
        """Hand the hidden vector to the next region of layers (PAPER.md §5: regions run as a
        pipeline): the previous region's last column sends each row's chunk one hop across the
        boundary (a free link: :func:`meshmpi.costs.arrival`), and this region's first column
        multicasts it along its row on the fabric. Returns the cycles it took."""
        mesh, hw = self.mesh, self.mesh.hardware
        start = mesh.modeled_cycles()
        crossing = costs.transfer_start(hw) + costs.arrival(hw, 0.0, 1, 0, x.tile_bytes)
        with mesh.phase("hand_off"), mesh.fabric.scope():
            arrive = mesh.clock + crossing
            mesh.fabric.multicast("hand_off", "x", 0).start(x, depart=arrive).wait()
            mesh.step("hand-off")
        return mesh.modeled_cycles() - start
