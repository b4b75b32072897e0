"""LLaMA prefill of a whole prompt on a square N x N mesh (PAPER.md section 4).

Layout. Activations are ``[tokens, features]`` matrices in MeshGEMM's natural layout: core
(i, j) holds token block i and feature block j. The prompt of T tokens is zero-padded to
``N * ceil(T / N)`` tokens; padded tokens are masked out of attention and dropped from the
outputs. Feature sizes that do not divide N (hidden, intermediate, head dims) are padded with
zero columns, which stay zero through every operator.

Heads. The host orders the output columns of W_q, W_k, W_v (and the rows of W_o) by
(column block j, head h, slot o): every core holds, for every head, ``2 * pc`` of that head's
dims, where ``pc = ceil(head_dim / 2 / N)``. Slots come in pairs (d, d + head_dim/2), the
pairs that ``rotate_half`` mixes, so RoPE is local; the same permutation of Q's and K's dims
leaves Q.K^T unchanged, and W_o's rows undo it. Per-head matrices are then column slices of
each core's tile. The query heads of one GQA group are stacked along the rows of a core's tile
(rows inside a tile are local), and the kv groups along a leading head axis, so attention is
one batched GEMM-T and one batched MeshGEMM for all heads.

One layer (all on the wafer, charged to the modeled clocks):

1. RMSNorm: local sum of squares, K-tree allreduce-sum along the row (x), scale.
2. Q|K|V = Xn . [W_q|W_k|W_v]: one MeshGEMM over the three weights (columns interleaved by
   block on the host), so Xn is aligned once for the three.
3. RoPE on Q and K: local.
4. K and V are skewed on the wafer (column j rotates backward by pos_x(j) along the y ring)
   into the pre-skewed layout MeshGEMM's and GEMM-T's B operands expect.
5. All kv groups at once (a head axis in the tiles): S = Q.K^T by GEMM-T; causal + padding
   mask and 1/sqrt(head_dim); softmax with a row allreduce-max and a row allreduce-sum along
   x; O = P.V by MeshGEMM.
6. O.W_o by MeshGEMM, residual; RMSNorm; [gate|up] by one MeshGEMM; SiLU(gate)*up local;
   down by MeshGEMM; residual.

Host plane (outside the modeled time): the embedding lookup and first scatter, the weights'
placement (each layer's weights are scattered at its start and released at its end), and the
final gather of the last hidden state and of the K/V caches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kernels.allreduce import allreduce
from kernels.gemm import GemmPlan, place_b_skewed, ring_gemm, ring_gemm_t, rotate_lines
from meshmpi import host

from .config import LlamaConfig
from .errors import ModelError
from .reference import rope_inv_freq

# Modeled FLOPs per element of the local elementwise operators (calibration constants).
FLOPS_RMS_SUMSQ = 2        # square and add
FLOPS_RMS_SCALE = 2        # times 1/rms, times weight
FLOPS_RMS_ROW = 4          # per row: mean, add eps, sqrt, reciprocal
FLOPS_ROPE_PAIR = 6        # 4 multiplies, 2 adds per (d, d + head_dim/2) pair
FLOPS_MASK_SCALE = 2       # scale and select
FLOPS_SOFTMAX = 5          # max, subtract, exp, add, divide
FLOPS_SILU_MUL = 5         # negate, exp, add, divide, multiply
FLOPS_ADD = 1              # residual


@dataclass
class PrefillResult:
    """What a prefill leaves: see :func:`prefill`."""

    last_hidden: np.ndarray | None      # [hidden], final-normed hidden of the last prompt token
    k_cache: list | None                # per layer [kv_heads, T, head_dim] post-RoPE keys
    v_cache: list | None                # per layer [kv_heads, T, head_dim]
    modeled_cycles: float               # critical path of the simulated layers (+ final norm)
    cycles_per_layer: float             # modeled cycles of layer 0
    tokens: int                         # prompt length T
    layers: int                         # layers simulated


class PrefillLayout:
    """Tile sizes and host-side column orders of a config on an N x N mesh for T tokens."""

    def __init__(self, config: LlamaConfig, n: int, tokens: int):
        c = config
        self.config, self.n, self.tokens = c, n, tokens
        self.tb = -(-tokens // n)                          # tokens per row block
        self.t_pad = self.tb * n
        self.hb = -(-c.hidden_size // n)                   # hidden per column block
        self.fb = -(-c.intermediate_size // n)             # intermediate per column block
        self.half = c.head_dim // 2
        self.pc = -(-self.half // n)                       # rotate_half pairs per core per head
        self.dc = 2 * self.pc                              # head dims per core per head
        self.nq, self.nkv, self.group = c.num_attention_heads, c.num_key_value_heads, c.kv_group_size
        self.qkv_cols = (self.nq + 2 * self.nkv) * self.dc  # per core

    # ----------------------------------------------------------------- host column maps
    def head_slots(self, heads: int) -> np.ndarray:
        """[n, heads, dc]: original column (h * head_dim + d) of each slot, -1 for padding."""
        j = np.arange(self.n)[:, None, None]
        h = np.arange(heads)[None, :, None]
        o = np.arange(self.dc)[None, None, :]
        pair = j * self.pc + o // 2
        dim = pair + (o % 2) * self.half
        return np.where(pair < self.half, h * self.config.head_dim + dim, -1)

    @staticmethod
    def take_cols(w: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Columns ``index`` of w (zero where index is -1)."""
        out = w[:, np.maximum(index, 0)]
        out[:, index < 0] = 0
        return out

    def qkv_weight(self, layer) -> np.ndarray:
        """[hidden, n * qkv_cols]: block j = (Q slots of j | K slots of j | V slots of j)."""
        q = self.head_slots(self.nq).reshape(self.n, -1)
        kv = self.head_slots(self.nkv).reshape(self.n, -1)
        parts = [self.take_cols(layer.q_proj, q.ravel()).reshape(-1, self.n, q.shape[1]),
                 self.take_cols(layer.k_proj, kv.ravel()).reshape(-1, self.n, kv.shape[1]),
                 self.take_cols(layer.v_proj, kv.ravel()).reshape(-1, self.n, kv.shape[1])]
        return np.concatenate(parts, axis=2).reshape(layer.q_proj.shape[0], -1)

    def o_weight(self, layer) -> np.ndarray:
        """[n * nq * dc, hidden]: W_o's rows in the order of the attention output's columns."""
        q = self.head_slots(self.nq).ravel()
        return self.take_cols(layer.o_proj.T, q).T

    def gate_up_weight(self, layer) -> np.ndarray:
        """[hidden, n * 2 fb]: block j = (gate block j | up block j), zero-padded."""
        f, n, fb = self.config.intermediate_size, self.n, self.fb
        index = np.arange(n * fb).reshape(n, fb)
        index = np.where(index < f, index, -1).ravel()
        gate = self.take_cols(layer.gate_proj, index).reshape(-1, n, fb)
        up = self.take_cols(layer.up_proj, index).reshape(-1, n, fb)
        return np.concatenate([gate, up], axis=2).reshape(layer.gate_proj.shape[0], -1)

    def norm_tiles(self, weight: np.ndarray) -> np.ndarray:
        """[n, n, hb]: column block j of a norm weight on every core of column j."""
        w = np.zeros(self.n * self.hb, np.float32)
        w[: weight.size] = weight
        return np.broadcast_to(w.reshape(1, self.n, self.hb), (self.n, self.n, self.hb)).copy()

    def rope_tiles(self) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [n, n, tb, pc]: token block i's positions, column block j's pairs."""
        inv = np.zeros(self.n * self.pc)
        inv[: self.half] = rope_inv_freq(self.config)
        angles = np.outer(np.arange(self.t_pad, dtype=np.float64), inv)        # [t_pad, n*pc]
        tiles = angles.reshape(self.n, self.tb, self.n, self.pc).transpose(0, 2, 1, 3)
        return np.cos(tiles).astype(np.float32), np.sin(tiles).astype(np.float32)

    def unpermute_heads(self, cols: np.ndarray, heads: int) -> np.ndarray:
        """[T_pad, n * heads * dc] in slot order -> [heads, T, head_dim] (padding dropped)."""
        slots = self.head_slots(heads).ravel()
        out = np.zeros((cols.shape[0], heads * self.config.head_dim), cols.dtype)
        keep = slots >= 0
        out[:, slots[keep]] = cols[:, keep]
        out = out[: self.tokens]
        return out.reshape(self.tokens, heads, self.config.head_dim).transpose(1, 0, 2).copy()


def _check_mesh(mesh) -> int:
    if mesh.rows != mesh.cols:
        raise ModelError(f"prefill needs a square mesh (PAPER.md section 4), got "
                         f"{mesh.rows}x{mesh.cols}; choose an N x N prefill region")
    return mesh.rows


class _Prefill:
    def __init__(self, mesh, config: LlamaConfig, weights, tokens: int, forwarding: str = "stream"):
        self.mesh, self.config, self.weights, self.forwarding = mesh, config, weights, forwarding
        self.n = _check_mesh(mesh)
        self.lay = PrefillLayout(config, self.n, tokens)
        self.numeric = not mesh.dry_run
        self.rows = mesh.global_rows()
        self.cols = mesh.global_cols()

    # ------------------------------------------------------------------ host plane
    def scatter(self, name, tiles_fn, tile_shape):
        tiles = tiles_fn() if self.numeric else None
        return host.scatter(self.mesh, name, tiles, tile_shape, np.float32)

    def place_weight(self, name, plan, matrix_fn):
        shape = ((plan.chunks // plan.rows) * plan.chunk, plan.n_pad // plan.cols)
        return self.scatter(name, lambda: place_b_skewed(plan, np.asarray(matrix_fn(), np.float32)), shape)

    # ------------------------------------------------------------------ wafer operators
    def rms_norm(self, x, weight_tiles, name):
        """x / rms(x) * w, the mean over the row via an allreduce-sum along x."""
        mesh = self.mesh
        tb, hb = x.tile_shape
        ss = mesh.alloc(f"{name}.ss", (tb,), np.float32)
        w = self.scatter(f"{name}.w", lambda: weight_tiles, (hb,))
        with mesh.phase(name):
            if self.numeric:
                ss.data[...] = np.einsum("abij,abij->abi", x.data, x.data)
            mesh.compute(FLOPS_RMS_SUMSQ * tb * hb)
            with mesh.fabric.scope():
                allreduce(mesh, ss, "x", "sum", name=f"{name}.allreduce", forwarding=self.forwarding)
            out = mesh.alloc(f"{name}.out", x.tile_shape, np.float32)
            if self.numeric:
                inv = 1.0 / np.sqrt(ss.data / np.float32(self.config.hidden_size)
                                    + np.float32(self.config.rms_norm_eps))
                out.data[...] = x.data * inv[..., None] * w.data[:, :, None, :]
            mesh.compute(FLOPS_RMS_ROW * tb + FLOPS_RMS_SCALE * tb * hb, scalars=tb)   # a reciprocal root per row
        ss.free()
        w.free()
        return out

    def gemm(self, plan, a, b, name):
        """MeshGEMM; its inputs are consumed (shifted on the wafer) and released."""
        with self.mesh.fabric.scope():
            c = ring_gemm(self.mesh, plan, a, b, name=name)
        a.free()
        b.free()
        return c

    def add_into(self, x, y):
        if self.numeric:
            x.data += y.data
        self.mesh.compute(FLOPS_ADD * y.tile_elements)
        y.free()

    def rope(self, qkv, cos, sin):
        """Rotate the Q and K slots of every core's tile in place (pairs are adjacent)."""
        lay = self.lay
        heads = lay.nq + lay.nkv
        if self.numeric:
            d = qkv.data
            qk = d[..., : heads * lay.dc].reshape(d.shape[:3] + (heads, lay.pc, 2))
            c, s = cos.data[:, :, :, None, :], sin.data[:, :, :, None, :]
            even, odd = qk[..., 0].copy(), qk[..., 1].copy()
            qk[..., 0] = even * c - odd * s
            qk[..., 1] = odd * c + even * s
            d[..., : heads * lay.dc] = qk.reshape(d.shape[:3] + (heads * lay.dc,))
        self.mesh.compute(FLOPS_ROPE_PAIR * lay.tb * heads * lay.pc)

    def split_heads(self, cols: np.ndarray) -> np.ndarray:
        """[R, C, tb, nkv * dc] -> [R, C, nkv, tb, dc]: a head axis in front of the tile."""
        lay = self.lay
        return cols.reshape(cols.shape[:3] + (lay.nkv, lay.dc)).transpose(0, 1, 3, 2, 4)

    def softmax(self, s, name):
        """Masked, scaled softmax over the keys of each row (tile: kv head x (query head in
        group, token) x key)."""
        mesh, lay = self.mesh, self.lay
        row_shape, keys_t = s.tile_shape[:-1], s.tile_shape[-1]
        rows_t = math.prod(row_shape)
        if self.numeric:
            token = np.tile(np.arange(lay.tb), lay.group)                          # row -> token
            query = self.rows[:, None, None, None] * lay.tb + token[None, None, :, None]
            key = self.cols[None, :, None, None] * lay.tb + np.arange(lay.tb)[None, None, None, :]
            visible = ((key <= query) & (key < lay.tokens))[:, :, None]   # same for every kv head
            scale = np.float32(1.0 / math.sqrt(self.config.head_dim))
            s.data[...] = np.where(visible, s.data * scale, -np.inf)
        mesh.compute(FLOPS_MASK_SCALE * rows_t * keys_t)
        m = mesh.alloc(f"{name}.max", row_shape, np.float32)
        if self.numeric:
            m.data[...] = s.data.max(axis=-1)
        mesh.compute(rows_t * keys_t)
        with mesh.fabric.scope():
            allreduce(mesh, m, "x", "max", name=f"{name}.max", forwarding=self.forwarding)
        l = mesh.alloc(f"{name}.sum", row_shape, np.float32)
        if self.numeric:
            s.data[...] = np.exp(s.data - m.data[..., None])
            l.data[...] = s.data.sum(axis=-1)
        mesh.compute(3 * rows_t * keys_t)
        with mesh.fabric.scope():
            allreduce(mesh, l, "x", "sum", name=f"{name}.sum", forwarding=self.forwarding)
        if self.numeric:
            s.data /= l.data[..., None]
        mesh.compute((FLOPS_SOFTMAX - 4) * rows_t * keys_t)
        m.free()
        l.free()

    # ------------------------------------------------------------------ one layer
    def layer(self, index, x, cos, sin):
        mesh, lay, n = self.mesh, self.lay, self.n
        p = f"prefill.layer{index}"
        w = self.weights.layers[index] if self.numeric else None
        tb, dc, nq, nkv, g = lay.tb, lay.dc, lay.nq, lay.nkv, lay.group
        plan_qkv = GemmPlan.build("meshgemm", n, n, lay.t_pad, self.config.hidden_size, n * lay.qkv_cols)
        plan_o = GemmPlan.build("meshgemm", n, n, lay.t_pad, n * nq * dc, self.config.hidden_size)
        plan_gu = GemmPlan.build("meshgemm", n, n, lay.t_pad, self.config.hidden_size, n * 2 * lay.fb)
        plan_down = GemmPlan.build("meshgemm", n, n, lay.t_pad, n * lay.fb, self.config.hidden_size)
        plan_t = GemmPlan.build("meshgemm", n, n, g * lay.t_pad, lay.t_pad, n * dc)     # S = Q K^T
        plan_pv = GemmPlan.build("meshgemm", n, n, g * lay.t_pad, lay.t_pad, n * dc)    # O = P V

        with mesh.phase(f"{p}.attention"):
            xn = self.rms_norm(x, lay.norm_tiles(w.input_layernorm) if w else None, f"{p}.input_norm")
            w_qkv = self.place_weight(f"{p}.w_qkv", plan_qkv, lambda: lay.qkv_weight(w))
            qkv = self.gemm(plan_qkv, xn, w_qkv, f"{p}.qkv")
            with mesh.phase(f"{p}.rope"):
                self.rope(qkv, cos, sin)
            kv_cols = None
            if self.numeric:
                full = host.untile_matrix(host.gather(mesh, qkv))      # host plane: the caches
                kv_cols = full.reshape(lay.t_pad, n, lay.qkv_cols)[:, :, nq * dc:]
            # K and V into the pre-skewed layout of a B operand, on the wafer.
            kv = mesh.alloc(f"{p}.kv", (tb, 2 * nkv * dc), np.float32)
            if self.numeric:
                kv.data[...] = qkv.data[..., nq * dc:]
            with mesh.phase(f"{p}.kv_skew"), mesh.fabric.scope():
                rotate_lines(mesh, kv, "y", plan_t.ring_y, plan_t.ring_x.position, f"{p}.kv.skew")
            # Every kv group's kernels at once: a head axis in the tiles (one message per step
            # carries all groups' tiles), so the operators are those of one group, batched.
            q = mesh.alloc(f"{p}.q", (nkv, g * tb, dc), np.float32)
            k = mesh.alloc(f"{p}.k", (nkv, tb, dc), np.float32)
            if self.numeric:
                heads = qkv.data[..., : nq * dc].reshape(qkv.data.shape[:3] + (nkv, g, dc))
                q.data[...] = heads.transpose(0, 1, 3, 4, 2, 5).reshape(q.data.shape)
                k.data[...] = self.split_heads(kv.data[..., : nkv * dc])
            with mesh.fabric.scope():
                s = ring_gemm_t(mesh, plan_t, q, k, name=f"{p}.qk")
            q.free()
            k.free()
            with mesh.phase(f"{p}.softmax"):
                self.softmax(s, f"{p}.softmax")
            v = mesh.alloc(f"{p}.v", (nkv, tb, dc), np.float32)
            if self.numeric:
                v.data[...] = self.split_heads(kv.data[..., nkv * dc:])
            o = self.gemm(plan_pv, s, v, f"{p}.pv")
            out = mesh.alloc(f"{p}.attn", (tb, nq * dc), np.float32)
            if self.numeric:
                heads = o.data.reshape(o.data.shape[:2] + (nkv, g, tb, dc))
                out.data[...] = heads.transpose(0, 1, 4, 2, 3, 5).reshape(out.data.shape)
            o.free()
            kv.free()
            qkv.free()
            w_o = self.place_weight(f"{p}.w_o", plan_o, lambda: lay.o_weight(w))
            self.add_into(x, self.gemm(plan_o, out, w_o, f"{p}.o"))

        with mesh.phase(f"{p}.mlp"):
            xn = self.rms_norm(x, lay.norm_tiles(w.post_attention_layernorm) if w else None,
                               f"{p}.post_norm")
            w_gu = self.place_weight(f"{p}.w_gate_up", plan_gu, lambda: lay.gate_up_weight(w))
            gu = self.gemm(plan_gu, xn, w_gu, f"{p}.gate_up")
            act = mesh.alloc(f"{p}.act", (tb, lay.fb), np.float32)
            if self.numeric:
                gate, up = gu.data[..., : lay.fb], gu.data[..., lay.fb:]
                act.data[...] = gate / (1.0 + np.exp(-gate)) * up
            mesh.compute(FLOPS_SILU_MUL * tb * lay.fb)
            gu.free()
            w_down = self.place_weight(f"{p}.w_down", plan_down,
                                       lambda: np.pad(w.down_proj, ((0, n * lay.fb - w.down_proj.shape[0]), (0, 0))))
            self.add_into(x, self.gemm(plan_down, act, w_down, f"{p}.down"))
        if kv_cols is None:
            return None, None
        k_cache = lay.unpermute_heads(kv_cols[:, :, : nkv * dc].reshape(lay.t_pad, -1), nkv)
        v_cache = lay.unpermute_heads(kv_cols[:, :, nkv * dc:].reshape(lay.t_pad, -1), nkv)
        return k_cache, v_cache


def prefill(mesh, config: LlamaConfig, weights, tokens, layers: int | None = None,
            forwarding: str = "stream") -> PrefillResult:
    """Run the prompt through ``layers`` decoder layers (default all) and the final norm.

    ``tokens``: token ids (numeric run) or just the prompt length (dry run). ``weights`` may
    be None only when ``mesh.dry_run``. ``forwarding``: how the allreduce chains forward
    (:mod:`kernels.allreduce`). Returns a :class:`PrefillResult`; ``last_hidden`` and the caches
    are None in a dry run. The mesh must be square.
    """
    n = _check_mesh(mesh)
    if isinstance(tokens, (int, np.integer)):
        ids, length = None, int(tokens)
    else:
        ids = np.asarray(tokens, np.int64).reshape(-1)
        length = int(ids.size)
    if length < 1:
        raise ModelError("prefill needs a prompt of at least one token")
    if not mesh.dry_run:
        if weights is None:
            raise ModelError("a numeric prefill needs weights (pass None only on a dry-run mesh)")
        if ids is None:
            raise ModelError("a numeric prefill needs token ids, not just a prompt length")
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise ModelError(f"token ids must be in [0, {config.vocab_size})")
    count = config.num_hidden_layers if layers is None else int(layers)
    if not 1 <= count <= config.num_hidden_layers:
        raise ModelError(f"layers must be in 1..{config.num_hidden_layers}, got {layers}")
    run = _Prefill(mesh, config, weights, length, forwarding)
    lay = run.lay

    def embedded():
        x = np.zeros((lay.t_pad, n * lay.hb), np.float32)
        x[:length, : config.hidden_size] = weights.embed[ids]
        return host.tile_matrix(x, n, n)

    x = run.scatter("prefill.x", embedded, (lay.tb, lay.hb))
    cos_sin = lay.rope_tiles() if run.numeric else (None, None)
    cos = run.scatter("prefill.rope.cos", lambda: cos_sin[0], (lay.tb, lay.pc))
    sin = run.scatter("prefill.rope.sin", lambda: cos_sin[1], (lay.tb, lay.pc))

    start = mesh.modeled_cycles()
    k_cache, v_cache = [], []
    per_layer = 0.0
    with mesh.phase("prefill"):
        for index in range(count):
            with mesh.phase(f"prefill.layer{index}"):
                k, v = run.layer(index, x, cos, sin)
            if index == 0:
                per_layer = mesh.modeled_cycles() - start
            k_cache.append(k)
            v_cache.append(v)
        final = run.rms_norm(x, lay.norm_tiles(weights.norm) if run.numeric else None, "prefill.final_norm")
    total = mesh.modeled_cycles() - start
    last = None
    if run.numeric:
        full = host.untile_matrix(host.gather(mesh, final))
        last = full[length - 1, : config.hidden_size].copy()
    for arr in (final, x, cos, sin):
        arr.free()
    return PrefillResult(last_hidden=last, k_cache=k_cache if run.numeric else None,
                         v_cache=v_cache if run.numeric else None, modeled_cycles=total,
                         cycles_per_layer=per_layer, tokens=length, layers=count)
