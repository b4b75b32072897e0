"""What every strategy's decode step shares, and the hook where each puts its GEMVs.

A :class:`StrategyDecoder` is WaferLLM's decoder (:mod:`llm.decode`) with the five GEMVs of a
step (fused q/k/v, W_O, fused gate/up, W_down, the LM head) replaced by a strategy's own
(``mapping.gemv``, built from :mod:`kernels.baselines`) on the same region, hardware and cost
model. The norms, RoPE, the attention over the KV cache (and its shift), SiLU and the residuals
run WaferLLM's way, so the comparison isolates what the strategies differ in: the GEMVs and the
collectives between them (PAPER.md §8 compares whole systems; the GEMVs are where its decode
gaps come from, §3).

A strategy's GEMV takes and returns vectors in natural order (fused outputs as ``[q | k | v]``
and ``[gate | up]``); between it and the shared part the vector changes layout through the
host, untimed, and what follows starts when the last core of the GEMV is done (the vector
is whole only then). Each mapping times the collectives its own system needs around its GEMVs (its
module docstring says which); the untimed changes of layout favour the strategies, so their
gap to WaferLLM measured here is a lower bound. The region plan and capacity stay WaferLLM's,
so every strategy decodes the same tokens on the same region; the region's resident weights are
charged the way the strategy places them (:meth:`StrategyDecoder.resident_weight_bytes`: each
mapping's ``weight_elements``, its 1-D shares of every matrix of the region's layers, and of the
LM head where the region holds it), beside WaferLLM's norm weights and KV cache, so a step's
peak memory per core is the strategy's own.
"""
from __future__ import annotations

import functools

import numpy as np

from kernels.gemv import vector_layout
from meshmpi import host

from ..checkpoint import select
from ..decode import Decoder

KINDS = ("qkv", "o", "gate_up", "down", "lm_head")


def gemv_shapes(config) -> dict:
    """(m, n) of each GEMV of a step, y (n) = x (m) @ W (m x n), fused ones in natural order."""
    d, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {"qkv": (d, q + 2 * kv), "o": (q, d), "gate_up": (d, 2 * config.intermediate_size),
            "down": (config.intermediate_size, d), "lm_head": (d, config.vocab_size)}


def _whole(*parts) -> np.ndarray:
    """float32 ``[in, out]`` matrices (arrays or stored tensors) side by side."""
    return np.concatenate([select(p, np.arange(p.shape[0])) if p.ndim == 2 else np.asarray(p, np.float32)
                           for p in parts], axis=1).astype(np.float32)


class StrategyDecoder(Decoder):
    """:class:`llm.decode.Decoder` whose GEMVs are ``mapping``'s (module docstring)."""

    def __init__(self, mapping, mesh, config, weights, *args, **kwargs):
        self.mapping = mapping
        super().__init__(mesh, config, weights, *args, **kwargs)
        self.shapes = gemv_shapes(config)
        self.matrices = {}
        if weights is not None and not mesh.dry_run:
            for index in range(self.sim_layers):
                lw = weights.layers[index]
                self.matrices.update({(index, "qkv"): _whole(lw.q_proj, lw.k_proj, lw.v_proj),
                                      (index, "o"): _whole(lw.o_proj),
                                      (index, "gate_up"): _whole(lw.gate_proj, lw.up_proj),
                                      (index, "down"): _whole(lw.down_proj)})
            self.matrices[(None, "lm_head")] = _whole(weights.lm_head)

    def resident_weight_bytes(self) -> np.ndarray:
        """Bytes per core of the region's resident weights as the strategy places them: its
        shares of each layer's four matrices, times the region's layers, plus its share of the
        LM head where the region holds it (one region), with WaferLLM's norm weights."""
        mesh, lay, plan = self.mesh, self.layout, self.plan
        shapes = gemv_shapes(self.config)
        share = lambda kind: self.mapping.weight_elements(mesh, kind, *shapes[kind])  # noqa: E731
        elements = plan.layers_per_region * (sum(share(kind) for kind in KINDS[:4]) + 2 * lay.hidden_chunk)
        if plan.regions == 1:
            elements = elements + share("lm_head") + lay.hidden_chunk
        return elements * mesh.hardware.element_bytes

    # ------------------------------------------------------------------ the hook
    def _meshgemv(self, x, w, name: str):
        """The strategy's GEMV in place of MeshGEMV; ``w`` (WaferLLM's tiles, unused) names it."""
        mesh = self.mesh
        owner, kind = w.name.split(".")
        layer = int(owner[1:]) if owner != "w" else None
        m, n = self.shapes[kind]
        x_vec = None if mesh.dry_run else self._natural_input(kind, x)
        with mesh.phase(name), mesh.fabric.scope():
            y_vec = self.mapping.gemv(mesh, kind, m, n, x_vec, self.matrices.get((layer, kind)), name)
        # the output is whole when its last part is: what follows waits for it
        np.maximum(mesh.clock, mesh.modeled_cycles(), out=mesh.clock)
        return self._waferllm_output(kind, y_vec, w.tile_shape[1], name)

    def logits_from(self, hidden: np.ndarray | None):
        """The first token's LM head (the prefill's last hidden vector), the strategy's GEMV."""
        mesh = self.mesh
        x = self._hidden(hidden)
        with mesh.phase("decode.lm_head"):
            logits = self._meshgemv(x, self.lm_head, "decode.lm_head")
        x.free()
        result = None if mesh.dry_run else host.gather(logits)
        logits.free()
        return result

    # ------------------------------------------------------------------ layouts (host, untimed)
    def _natural_input(self, kind: str, x) -> np.ndarray:
        """The GEMV's input in natural order from WaferLLM's layout of it."""
        lay, tiles = self.layout, host.gather_tiles(self.mesh, x)
        if kind in ("qkv", "gate_up", "lm_head"):            # the row-indexed hidden vector
            return tiles[:, 0].reshape(-1)[:lay.hidden]
        if kind == "down":                                     # column-indexed SiLU output
            return tiles[0, :].reshape(-1)[:lay.ffn]
        slots, arranged = lay.q_index().ravel(), tiles[0].reshape(-1)     # W_O: q slots per column
        out = np.zeros(lay.heads * lay.head_dim, np.float32)
        out[slots[slots >= 0]] = arranged[slots >= 0]
        return out

    def _waferllm_output(self, kind: str, y_vec, chunk: int, name: str):
        """The GEMV's output as WaferLLM's layout has it (a mesh array of ``chunk`` per core)."""
        mesh, lay = self.mesh, self.layout
        if y_vec is not None:
            if kind == "qkv":
                q, kv = lay.heads * lay.head_dim, lay.kv_heads * lay.head_dim
                y_vec = lay.qkv_matrix(y_vec[None, :q], y_vec[None, q:q + kv], y_vec[None, q + kv:])[0]
            elif kind == "gate_up":
                y_vec = lay.gate_up_matrix(y_vec[None, :lay.ffn], y_vec[None, lay.ffn:])[0]
        axis = "y" if kind in ("o", "down") else "x"
        length = {"lm_head": lay.vocab, "o": lay.hidden, "down": lay.hidden}.get(kind, chunk * mesh.cols)
        out = host.scatter(mesh, f"{name}.y", y_vec, vector_layout(mesh.rows, mesh.cols, length, axis), np.float32)
        if out.tile_shape != (chunk,):
            raise ValueError(f"{name}: output chunk {out.tile_shape} is not WaferLLM's ({chunk},)")
        return out


def bind(mapping):
    """A decoder class (a callable with :class:`llm.decode.Decoder`'s arguments) for ``mapping``."""
    return functools.partial(StrategyDecoder, mapping)
