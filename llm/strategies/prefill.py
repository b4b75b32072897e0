"""LLaMA prefill with the GEMMs of the systems WaferLLM is compared with (PAPER.md §8).

A :class:`StrategyPrefill` is WaferLLM's prefill (:mod:`llm.prefill`) with the four weight
GEMMs of a layer (fused q/k/v, W_O, fused gate/up, W_down) replaced by a strategy's own
(``mapping.gemv`` with ``tokens``: the GEMM operators of :mod:`kernels.baselines`) on the same
N x N region, hardware and cost model. The norms, RoPE, the K|V gather and skew, the attention
(Q.K^T by GEMM-T and P.V by MeshGEMM, with head cells) and the residuals run WaferLLM's way:
they favour the compared systems, whose own attention would pay their mapping's costs too, so
the prefill gaps measured here are lower bounds (as the decode's, :mod:`llm.strategies.base`).

Each strategy's GEMM takes A (the prompt's T real rows, real features, in natural order) and
returns C likewise; it works on the real sizes (no head-cell or block padding), so it is charged
only the real product's FLOPs plus its own partition's padding. Between it and the shared part
the matrices change layout through the host, untimed (favouring the strategies), and what
follows starts when the GEMM's last core is done. The region's resident weights are charged
the way the strategy places them (:meth:`StrategyPrefill.layer_weight_bytes`: each mapping's
``weight_elements``, its 1-D shares of the four matrices, T10's ring sized for the prompt's
rows), beside WaferLLM's norm weights; a region holds as many layers as fit its fullest core
(one, at paper scale, for every compared strategy). Megatron-LM's
column-parallel GEMMs broadcast the whole of A to every used core (T x hidden values), which at
paper scale is far over a core's 48 KB: its dry runs need ``--memory warn``.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

from meshmpi import host

from ..layout import take_cols
from ..prefill import _Prefill
from .base import _whole, gemv_shapes

OPS = ("qkv", "o", "gate_up", "down")


class StrategyPrefill(_Prefill):
    """:class:`llm.prefill._Prefill` whose weight GEMMs are ``mapping``'s (module docstring)."""

    def __init__(self, mapping, mesh, config, weights, tokens: int, *args, **kwargs):
        self.mapping = mapping
        super().__init__(mesh, config, weights, tokens, *args, **kwargs)
        self.shapes = gemv_shapes(config)
        self.matrices: dict = {}

    def layer_weight_bytes(self) -> np.ndarray:
        """Bytes per core of one layer's resident weights as the strategy places them: its
        shares of the four matrices and WaferLLM's two norm weights."""
        mesh, tokens = self.mesh, self.lay.tokens
        shares = sum(self.mapping.weight_elements(mesh, op, *self.shapes[op], tokens=tokens) for op in OPS)
        return (shares + len(self.NORMS) * self.lay.hb) * mesh.hardware.element_bytes

    def gemm(self, op, a, b, name, resident_b=False):
        """The strategy's GEMM for a weight ``op``; the attention's stay MeshGEMM's."""
        if op not in OPS:
            return super().gemm(op, a, b, name, resident_b)
        mesh, tokens = self.mesh, self.lay.tokens
        m, n = self.shapes[op]
        layer = int(name.split(".")[1].removeprefix("layer"))
        x = None if mesh.dry_run else self._natural_input(op, a)
        with mesh.phase(f"{name}.{self.mapping.name}"), mesh.fabric.scope():
            c = self.mapping.gemv(mesh, op, m, n, x, self._matrix(layer, op), name, tokens=tokens)
        # C is whole when its last part is: what follows waits for it
        np.maximum(mesh.clock, mesh.modeled_cycles(), out=mesh.clock)
        a.free()
        if not resident_b:
            b.free()
        return self._waferllm_output(op, c, name)

    def _matrix(self, layer: int, op: str):
        """The natural ``[in, out]`` float32 weight of ``op`` (None in a dry run)."""
        if self.weights is None:
            return None
        if layer not in self.matrices:          # one layer's at a time
            lw = self.weights.layers[layer]
            self.matrices = {layer: {"qkv": _whole(lw.q_proj, lw.k_proj, lw.v_proj), "o": _whole(lw.o_proj),
                                     "gate_up": _whole(lw.gate_proj, lw.up_proj), "down": _whole(lw.down_proj)}}
        return self.matrices[layer][op]

    # ------------------------------------------------------------------ layouts (host, untimed)
    def _natural_input(self, op: str, a) -> np.ndarray:
        """A's T real rows and real features in natural order, from WaferLLM's tiles."""
        lay, config = self.lay, self.config
        full = host.gather(a)                        # T x features, by the A operand's layout
        if op in ("qkv", "gate_up"):
            return np.ascontiguousarray(full[:, : config.hidden_size])
        if op == "down":
            return np.ascontiguousarray(full[:, : config.intermediate_size])
        slots = lay.q_slots().ravel()                 # W_O: the attention output's Q slots
        out = np.zeros((lay.tokens, config.num_attention_heads * config.head_dim), np.float32)
        out[:, slots[slots >= 0]] = full[:, slots >= 0]
        return out

    def _waferllm_output(self, op: str, c, name: str):
        """C in the layout WaferLLM's MeshGEMM leaves it (natural, columns arranged as the
        layer's weights arrange them)."""
        lay, config, kernel = self.lay, self.config, self.kernels[op]
        if c is not None:
            if op in ("qkv", "gate_up"):
                q, kv, f = (config.num_attention_heads * config.head_dim,
                            config.num_key_value_heads * config.head_dim, config.intermediate_size)
                parts = (dict(q_proj=c[:, :q], k_proj=c[:, q:q + kv], v_proj=c[:, q + kv:]) if op == "qkv"
                         else dict(gate_proj=c[:, :f], up_proj=c[:, f:]))
                arranged = getattr(lay, f"{op}_weight")(SimpleNamespace(**parts))
                c = take_cols(np.concatenate(arranged.parts, axis=1), arranged.cols)
        return host.scatter(self.mesh, f"{name}.c", c, kernel.c_layout, np.float32)


def bind(mapping):
    """A prefill runner class (:func:`llm.prefill.prefill`'s ``runner``) for ``mapping``."""
    return functools.partial(StrategyPrefill, mapping)
