"""LLaMA prefill of a whole prompt on a square N x N mesh (PAPER.md section 4).

Layout. Activations are ``[tokens, features]`` matrices in MeshGEMM's natural layout: core
(i, j) holds token block i and feature block j. The prompt of T tokens is zero-padded to
``N * ceil(T / N)`` tokens; padded tokens are masked out of attention and dropped from the
outputs. Feature sizes that do not divide N (hidden, intermediate, head dims) are padded with
zero columns, which stay zero through every operator (and are not charged: uneven tiles).

Heads (:class:`PrefillLayout`; PAPER.md section 4, "group the heads, then run the same
operators per group"). Each kv head owns a segment of columns and its query heads split the
segment, so every column holds a few rotate-half pairs (d, d + head_dim/2, side by side: RoPE
is local) of one query head and the same pairs of its kv head; no column holds only padding
once the model has more pairs than the mesh has columns. The host orders the output columns of
W_q, W_k, W_v (and the rows of W_o) by these slots; the same permutation of Q's and K's dims
leaves Q.K^T unchanged, and W_o's rows undo it. Q.K^T of a head needs a reduction over that
head's columns only: GEMM-T's partial scores carry every head along X and each column adds its
own head's product (:class:`kernels.gemm.CellMap`); P.V likewise reads each column's head out
of the travelling P and leaves O in the column order of Q.

Uneven tiles. The fabric moves tiles of one shape (the padded one: ``tb`` tokens, ``hb``
hidden, ``fb`` intermediate, ``cells`` x ``2p`` head dims), but a core does, and is charged,
only the work of its real token rows, keys, K rows, columns and head pairs
(:class:`kernels.gemm.RealWork` for the MeshGEMMs; the local operators alike), so padding
costs no FLOPs (:meth:`PrefillLayout.charged_flops` = :func:`real_flops` plus the
distribution's row scalars and allreduce adds). This rather than choosing, per kv group, a
column count that its pairs divide: PAPER.md §4 groups the heads and runs the same operators
per group over the whole square, and tokens (any prompt length) and feature sizes would be
left padded anyway. The modeled time still follows the fullest cores: a MeshGEMM step waits
for its neighbours, so the columns holding the most pairs and the row blocks holding ``tb``
real tokens set the critical path (the imbalance of the division, not padding).

One layer (all on the wafer, charged to the modeled clocks):

1. RMSNorm: local sum of squares, K-tree allreduce-sum along the row (x), scale.
2. Q|K|V = Xn . [W_q|W_k|W_v]: one MeshGEMM over the three weights (columns interleaved by
   block on the host), so Xn is aligned once for the three. Each K and V value is made once,
   on one column of its block.
3. RoPE on the Q cells and the K pairs: local; then each block gathers its K and V along its
   interleaved ring (2-hop steps along x).
4. K and V are skewed on the wafer (column j rotates backward by pos_x(j) along the y ring)
   into the pre-skewed layout MeshGEMM's and GEMM-T's B operands expect.
5. S = Q.K^T by GEMM-T with head cells; causal + padding mask and 1/sqrt(head_dim); softmax
   with a row allreduce-max and a row allreduce-sum along x; O = P.V by MeshGEMM with cells.
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
from kernels.gemm import CellMap, MeshGemm, RealWork, rotate_lines
from kernels.ring import interleaved_ring
from meshmpi import costs, host
from meshmpi.layout import blocked
from meshmpi.mesh import block_offsets
from meshmpi.steady import SteadyState

from . import flops
from .config import LlamaConfig
from .errors import ModelError
from .layout import Gathered, TileIndex, take_cols
from .reference import rope_inv_freq

# Modeled FLOPs per element of the local elementwise operators (calibration constants).


@dataclass
class PrefillResult:
    """What a prefill leaves: see :func:`prefill`."""

    last_hidden: np.ndarray | None      # [hidden], final-normed hidden of the last prompt token
    k_cache: list | None                # per layer [kv_heads, T, head_dim] post-RoPE keys
    v_cache: list | None                # per layer [kv_heads, T, head_dim]
    modeled_cycles: float               # critical path of the simulated layers (+ hand-offs, final norm)
    cycles_per_layer: float             # modeled cycles of layer 0
    tokens: int                         # prompt length T
    layers: int                         # layers simulated
    flops_charged: int                  # FLOPs the mesh charged (real work + distribution), all cores
    flops_real: int                     # FLOPs of the unpadded model for the same layers
    layers_per_region: int = 1          # layers a prefill region holds resident (weights + K|V)
    regions: int = 1                    # prefill regions the whole model needs (a pipeline)
    hand_off_cycles: float = 0.0        # one hand-off of the activations to the next region
    layers_advanced: int = 0            # layers of a dry run advanced in a steady state, not run

    def cycles(self, layers: int) -> float:
        """The prefill of ``layers`` layers (the model's): as simulated when every layer ran, else
        the first layer's cycles for each layer not run and the hand-offs not simulated."""
        simulated_hand_offs = (self.layers - 1) // self.layers_per_region
        return (self.modeled_cycles + (layers - self.layers) * self.cycles_per_layer
                + (self.regions - 1 - simulated_hand_offs) * self.hand_off_cycles)


class PrefillLayout:
    """Tile sizes and host-side column maps of a config on an N x N mesh for T tokens.

    Attention cells (PAPER.md section 4, "group the heads, then run the same operators per
    group"). Each column holds ``kpc`` kv slots of ``p`` rotate-half pairs and, per slot, ``hq``
    query-head cells over the same pairs (``cells = kpc * hq``):

    - N <= kv heads: column j holds ``kpc = ceil(kv_heads / N)`` whole kv groups (every pair of
      the kv head and of its ``group`` query heads).
    - N > kv heads: kv head k owns the column segment ``block_offsets(N, kv_heads)[k:k+2]``,
      cut into blocks of ``sb`` adjacent columns; block x holds pairs ``[x p, (x+1) p)`` and
      its column r the query heads ``r hq .. r hq + hq - 1`` of the group, so the segment's
      ``width`` columns share the group's ``group * head_dim / 2`` pairs. ``hq = ceil(group /
      width)``, ``sb = ceil(group / hq)``, ``blocks = width // sb``, ``p = ceil(half / blocks)``
      with ``width`` the narrowest segment. Columns past the last full block are empty.

    Every column of a block needs the block's K and V; the Q|K|V MeshGEMM makes each once: the
    block's ``4 p`` K|V values per token are cut into ``sb`` shares of ``share`` values, one per
    column (K pair i in share ``i mod sb``, whole, first; V values fill the rest), rotated (the
    K pairs) where they are made, then gathered along the block's interleaved ring.
    """

    def __init__(self, config: LlamaConfig, n: int, tokens: int):
        c = config
        self.config, self.n, self.tokens = c, n, tokens
        self.tb = -(-tokens // n)                          # tokens per row block
        self.t_pad = self.tb * n
        self.hb = -(-c.hidden_size // n)                   # hidden per column block
        self.fb = -(-c.intermediate_size // n)             # intermediate per column block
        self.half = c.head_dim // 2
        self.nq, self.nkv, self.group = c.num_attention_heads, c.num_key_value_heads, c.kv_group_size
        if self.nkv >= n:
            self.kpc, self.width = -(-self.nkv // n), 0
            self.hq, self.sb, self.blocks, self.p = self.group, 1, 1, self.half
        else:
            self.kpc, self.width = 1, n // self.nkv
            self.hq = -(-self.group // self.width)
            self.sb = -(-self.group // self.hq)
            self.blocks = self.width // self.sb
            self.p = -(-self.half // self.blocks)
        self.cells = self.kpc * self.hq
        # K|V values a column makes per slot: a fair share, and room for its whole K pairs
        self.share = max(-(-4 * self.p // self.sb), 2 * -(-self.p // self.sb))
        self.qkv_cols = self.cells * 2 * self.p + self.kpc * self.share   # per core

    # ----------------------------------------------------------------- host column maps
    def slots(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """kv head, pair block [n, kpc] (kv head -1: no real pair) and block position [n]."""
        n, j = self.n, np.arange(self.n)
        if self.nkv >= n:
            k = j[:, None] * self.kpc + np.arange(self.kpc)[None, :]
            return np.where(k < self.nkv, k, -1), np.zeros_like(k), np.zeros(n, np.int64)
        bounds = block_offsets(n, self.nkv)
        k = np.searchsorted(bounds, j, side="right") - 1
        x, r = (j - bounds[k]) // self.sb, (j - bounds[k]) % self.sb
        k = np.where((x < self.blocks) & (x * self.p < self.half), k, -1)
        return k[:, None], x[:, None], r

    def _dims(self, x: np.ndarray, o: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Head dim of slot offset o (pairs side by side) in pair block x, and whether it is real."""
        pair = x * self.p + o // 2
        return pair + (o % 2) * self.half, (pair < self.half) & (o < 2 * self.p) & (o >= 0)

    def q_slots(self) -> np.ndarray:
        """[n, cells, 2p]: column of W_q (head * head_dim + d) of each Q slot, -1 for padding."""
        k, x, r = self.slots()
        u = np.arange(self.hq)
        within = r[:, None, None] * self.hq + u[None, None, :]                     # [n, 1, hq]
        head = k[:, :, None] * self.group + within                               # [n, kpc, hq]
        real = (k[:, :, None] >= 0) & (within < self.group)
        d, ok = self._dims(x[:, :, None, None], np.arange(2 * self.p)[None, None, None, :])
        index = np.where(real[..., None] & ok, head[..., None] * self.config.head_dim + d, -1)
        return index.reshape(self.n, self.cells, 2 * self.p)

    def share_map(self) -> tuple[np.ndarray, np.ndarray]:
        """[sb, share]: whether each value of block position r's share is V (else K, or padding
        where the offset is -1), and its offset in the block's 2p K (or V) slots."""
        is_v = np.zeros((self.sb, self.share), bool)
        offset = np.full((self.sb, self.share), -1)
        pair = np.arange(self.p)
        r, m = pair % self.sb, pair // self.sb
        for o in (0, 1):
            offset[r, 2 * m + o] = 2 * pair + o
        free = np.flatnonzero(offset.ravel() < 0)[: 2 * self.p]
        is_v.ravel()[free] = True
        offset.ravel()[free] = np.arange(2 * self.p)
        return is_v, offset

    def k_pairs(self) -> np.ndarray:
        """[n]: real K pairs each column rotates in its share (pair i of a block in share
        ``i mod sb``; pairs past head_dim/2 in a block are padding)."""
        k, x, r = self.slots()
        pair = np.arange(self.p)
        mine = (pair[None, None, :] % self.sb == r[:, None, None]) & (x[:, :, None] * self.p + pair < self.half)
        return ((k >= 0)[:, :, None] & mine).sum(axis=(1, 2))

    def q_dims(self) -> np.ndarray:
        """[n]: real query dims of each column's cells (twice its real Q pairs)."""
        return (self.q_slots() >= 0).sum(axis=(1, 2))

    def work(self) -> dict[str, RealWork]:
        """The real extents of each MeshGEMM's blocks (uneven tiles: see the module docstring):
        tokens by row block, then K-chunks and columns as each product lays them out."""
        n, c = self.n, self.config
        tokens = RealWork.blocks(self.tokens, n, self.tb)
        hidden = RealWork.blocks(c.hidden_size, n, self.hb)
        inter = RealWork.blocks(c.intermediate_size, n, self.fb)
        q_dims, one = self.q_dims(), np.ones(n, np.int64)
        kv_made = (self.kv_slots() >= 0).sum(axis=(1, 2))
        q_cells = (self.q_slots() >= 0).any(axis=2).sum(axis=1)
        return {"qkv": RealWork(tokens, hidden, q_dims + kv_made, one),
                "qk": RealWork(tokens, tokens, q_dims, q_cells),     # GEMM-T: k is the keys
                "pv": RealWork(tokens, tokens, q_dims, q_cells),
                "o": RealWork(tokens, q_dims, hidden, one),
                "gate_up": RealWork(tokens, hidden, 2 * inter, one),
                "down": RealWork(tokens, inter, hidden, one)}

    def kv_slots(self) -> np.ndarray:
        """[n, kpc, share]: column of [W_k | W_v] each column's K|V share makes, -1 for padding."""
        k, x, r = self.slots()
        is_v, offset = (a[r][:, None, :] for a in self.share_map())             # [n, 1, share]
        d, ok = self._dims(x[:, :, None], offset)
        kv_dim = self.nkv * self.config.head_dim
        index = k[:, :, None] * self.config.head_dim + d + np.where(is_v, kv_dim, 0)
        return np.where((k[:, :, None] >= 0) & ok, index, -1)

    def attn_kv_slots(self) -> np.ndarray:
        """[n, kpc, 2p]: kv dim (kv head * head_dim + d) of each gathered K (and V) slot."""
        k, x, _ = self.slots()
        d, ok = self._dims(x[:, :, None], np.arange(2 * self.p)[None, None, :])
        return np.where((k[:, :, None] >= 0) & ok, k[:, :, None] * self.config.head_dim + d, -1)

    def kv_columns(self) -> np.ndarray:
        """[kv_heads * head_dim]: the column whose share makes each K dim."""
        slots = self.kv_slots().reshape(self.n, -1)
        where = np.full(self.nkv * self.config.head_dim, -1)
        column, index = np.nonzero((slots >= 0) & (slots < where.size))
        where[slots[column, index]] = column
        return where

    def cell_map(self) -> CellMap:
        """The query head of each cell, as the attention kernels read it."""
        heads = self.q_slots().max(axis=2)
        return CellMap(np.where(heads >= 0, heads // self.config.head_dim, -1), self.hq, self.nq)

    def gather_dest(self) -> tuple[np.ndarray, np.ndarray]:
        """[n]: the next column of each column's block ring (-1: none), and [n, sb-1]: the
        block position whose share reaches each column at each step of the gather."""
        k, _, r = self.slots()
        ring = interleaved_ring(self.sb)
        start = np.arange(self.n) - r
        dest = np.where(k[:, 0] >= 0, start + ring.send()[r], -1)
        steps = np.arange(1, self.sb)[None, :]
        origin = ring.order[(ring.position[r][:, None] - steps) % self.sb]
        return dest, origin

    def qkv_weight(self, layer) -> Gathered:
        """[hidden, n * qkv_cols]: block j = (Q cells of j | K|V share of j)."""
        def arrange(wq, wk, wv):
            q = take_cols(wq, self.q_slots().ravel()).reshape(-1, self.n, self.cells * 2 * self.p)
            kv = take_cols(np.concatenate([wk, wv], axis=1), self.kv_slots().ravel())
            return np.concatenate([q, kv.reshape(-1, self.n, self.kpc * self.share)], axis=2).reshape(wq.shape[0], -1)
        return Gathered.of((layer.q_proj, layer.k_proj, layer.v_proj), arrange)

    def o_weight(self, layer) -> Gathered:
        """[n * cells * 2p, hidden]: W_o's rows in the order of the attention output's columns."""
        return Gathered.of((layer.o_proj,), arrange_rows=lambda wo: take_cols(wo.T, self.q_slots().ravel()).T)

    def gate_up_weight(self, layer) -> Gathered:
        """[hidden, n * 2 fb]: block j = (gate block j | up block j), zero-padded."""
        f, n, fb = self.config.intermediate_size, self.n, self.fb
        index = np.arange(n * fb).reshape(n, fb)
        index = np.where(index < f, index, -1).ravel()

        def arrange(wg, wu):
            gate = take_cols(wg, index).reshape(-1, n, fb)
            up = take_cols(wu, index).reshape(-1, n, fb)
            return np.concatenate([gate, up], axis=2).reshape(wg.shape[0], -1)
        return Gathered.of((layer.gate_proj, layer.up_proj), arrange)

    def down_weight(self, layer) -> Gathered:
        """[n * fb, hidden]: W_down, its rows zero-padded."""
        return Gathered.of((layer.down_proj,))

    def norm_tiles(self, weight: np.ndarray) -> np.ndarray:
        """[n, n, hb]: column block j of a norm weight on every core of column j."""
        w = np.zeros(self.n * self.hb, np.float32)
        w[: weight.size] = weight
        return np.broadcast_to(w.reshape(1, self.n, self.hb), (self.n, self.n, self.hb)).copy()

    def rope_tiles(self) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [n, n, tb, kpc * p]: token block i's positions, column j's pairs."""
        _, x, _ = self.slots()
        pair = x[:, :, None] * self.p + np.arange(self.p)[None, None, :]             # [n, kpc, p]
        inv = np.where(pair < self.half, rope_inv_freq(self.config)[np.minimum(pair, self.half - 1)], 0.0)
        angles = np.arange(self.t_pad, dtype=np.float64)[:, None] * inv.reshape(1, -1)   # [t_pad, n*kpc*p]
        tiles = angles.reshape(self.n, self.tb, self.n, self.kpc * self.p).transpose(0, 2, 1, 3)
        return np.cos(tiles).astype(np.float32), np.sin(tiles).astype(np.float32)

    def unpermute_kv(self, cols: np.ndarray) -> np.ndarray:
        """[T_pad, n, kpc, 2p] gathered K (or V) slots -> [kv_heads, T, head_dim]."""
        slots = self.attn_kv_slots().ravel()
        cols = cols.reshape(cols.shape[0], -1)
        out = np.zeros((cols.shape[0], self.nkv * self.config.head_dim), cols.dtype)
        keep = slots >= 0
        out[:, slots[keep]] = cols[:, keep]          # the columns of a block hold equal copies
        out = out[: self.tokens]
        return out.reshape(self.tokens, self.nkv, self.config.head_dim).transpose(1, 0, 2).copy()

    # ----------------------------------------------------------------- FLOPs
    def charged_flops(self) -> dict:
        """FLOPs the mesh charges for one layer, by operator, summed over the N x N cores
        (``final_norm`` once per prefill): each core's real work (:meth:`work`; token rows,
        hidden and intermediate columns as :class:`RealWork` blocks), and the distribution's
        own: every core of a row computes the row's 1/rms, and an allreduce along x adds
        N - 1 deliveries of each line's (padded) tile."""
        n, tb, t = self.n, self.tb, self.tokens
        h, f = self.config.hidden_size, self.config.intermediate_size
        line = n * (n - 1)          # an allreduce adds N - 1 deliveries per line, N lines
        norm = (flops.RMS_SUMSQ + flops.RMS_SCALE) * t * h + flops.RMS_ROW * t * n + line * tb
        work = {op: w.total() for op, w in self.work().items()}
        return {"input_norm": norm, "qkv": work["qkv"],
                "rope": flops.ROPE_PAIR * t * (int(self.q_dims().sum()) // 2 + int(self.k_pairs().sum())),
                "qk": work["qk"], "softmax": flops.SOFTMAX_ALL * self.nq * t * t + 2 * line * self.nq * tb,
                "pv": work["pv"], "o": work["o"], "o_residual": flops.ADD * t * h, "post_norm": norm,
                "gate_up": work["gate_up"], "silu": flops.SILU_MUL * t * f, "down": work["down"],
                "down_residual": flops.ADD * t * h, "final_norm": norm}


def real_flops(config: LlamaConfig, tokens: int) -> dict:
    """FLOPs of one layer of the unpadded model on ``tokens`` tokens, by operator, with the
    per-element costs the mesh charges (``final_norm`` once per prefill). Attention counts the
    whole ``tokens x tokens`` score matrix, as the reference computes it before masking."""
    t, h, f, d = tokens, config.hidden_size, config.intermediate_size, config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    norm = (flops.RMS_SUMSQ + flops.RMS_SCALE) * t * h + flops.RMS_ROW * t
    return {"input_norm": norm, "qkv": 2 * t * h * (heads + 2 * kv_heads) * d,
            "rope": flops.ROPE_PAIR * t * (heads + kv_heads) * d // 2,
            "qk": 2 * heads * t * t * d, "softmax": flops.SOFTMAX_ALL * heads * t * t,
            "pv": 2 * heads * t * t * d, "o": 2 * t * heads * d * h, "o_residual": flops.ADD * t * h,
            "post_norm": norm, "gate_up": 2 * t * h * 2 * f, "silu": flops.SILU_MUL * t * f,
            "down": 2 * t * f * h, "down_residual": flops.ADD * t * h, "final_norm": norm}


def prefill_flops(per_layer: dict, layers: int) -> int:
    """A prefill's total from per-operator FLOPs of one layer (and its one final norm)."""
    return layers * sum(v for k, v in per_layer.items() if k != "final_norm") + per_layer["final_norm"]


def _check_mesh(mesh) -> int:
    if mesh.rows != mesh.cols:
        raise ModelError(f"prefill needs a square mesh (PAPER.md section 4), got "
                         f"{mesh.rows}x{mesh.cols}; choose an N x N prefill region")
    return mesh.rows


def _rotate(pairs, cos, sin) -> None:
    """RoPE on [..., 2] pairs in place."""
    even, odd = pairs[..., 0].copy(), pairs[..., 1].copy()
    pairs[..., 0] = even * cos - odd * sin
    pairs[..., 1] = odd * cos + even * sin


class _Prefill:
    def __init__(self, mesh, config: LlamaConfig, weights, tokens: int, forwarding: str = "stream"):
        self.mesh, self.config, self.weights, self.forwarding = mesh, config, weights, forwarding
        self.n = _check_mesh(mesh)
        self.lay = PrefillLayout(config, self.n, tokens)
        self.numeric = not mesh.dry_run
        self.rows = mesh.global_rows()
        self.cols = mesh.global_cols()
        lay, n, hidden = self.lay, self.n, config.hidden_size
        work, heads = lay.work(), lay.cell_map()
        # The run's MeshGEMMs, each charged its real work (uneven tiles)
        self.kernels = {op: MeshGemm(mesh, m, k, cols, work=work[op], **extra)
                        for op, (m, k, cols, extra) in {
                            "qkv": (tokens, hidden, n * lay.qkv_cols, {}),
                            "o": (tokens, n * lay.cells * 2 * lay.p, hidden, {}),
                            "gate_up": (tokens, hidden, n * 2 * lay.fb, {}),
                            "down": (tokens, n * lay.fb, hidden, {}),
                            "qk": (lay.t_pad, lay.t_pad, n * 2 * lay.p, dict(transposed=True, cells=heads)),
                            "pv": (lay.t_pad, lay.t_pad, n * 2 * lay.p, dict(cells=heads))}.items()}
        # each core's real token rows, keys (the columns of S), hidden and intermediate columns
        tokens = RealWork.blocks(tokens, n, lay.tb)
        self.real_rows, self.real_keys = tokens[self.rows][:, None], tokens[self.cols][None, :]
        self.real_hidden = RealWork.blocks(hidden, n, lay.hb)[self.cols][None, :]
        self.real_inter = RealWork.blocks(config.intermediate_size, n, lay.fb)[self.cols][None, :]
        self._b_tile_index = {}

    # ------------------------------------------------------------------ host plane
    def scatter(self, name, tiles_fn, tile_shape):
        tiles = tiles_fn() if self.numeric else None
        return host.scatter_tiles(self.mesh, name, tiles, tile_shape, np.float32)

    MATRICES = {"w_qkv": ("qkv", "qkv_weight"), "w_o": ("o", "o_weight"),
                "w_gate_up": ("gate_up", "gate_up_weight"), "w_down": ("down", "down_weight")}
    NORMS = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm"}

    def place_layer(self, index) -> dict:
        """Layer ``index``'s weights on the mesh (host plane, before the wafer phases): the four
        matrices pre-skewed as MeshGEMM's B operands, the two norm weights by column block.
        Charged as one resident block by :func:`prefill`, not one by one."""
        p, w = f"prefill.layer{index}", self.weights.layers[index] if self.numeric else None
        placed = {name: self.place_weight(f"{p}.{name}", self.kernels[op], lambda m=method: getattr(self.lay, m)(w),
                                          charge=False)
                  for name, (op, method) in self.MATRICES.items()}
        for name, field in self.NORMS.items():
            placed[name] = host.scatter_tiles(self.mesh, f"{p}.{name}", self.lay.norm_tiles(getattr(w, field)) if w else None,
                                        (self.lay.hb,), np.float32, charge=False)
        return placed

    def layer_weight_bytes(self) -> int:
        """Bytes per core of one layer's resident weights (:meth:`place_layer`)."""
        elements = sum(int(np.prod(self.kernels[op].plan.b_tile_shape)) for op, _ in self.MATRICES.values())
        return (elements + len(self.NORMS) * self.lay.hb) * self.mesh.hardware.element_bytes

    def kv_bytes(self) -> int:
        """Bytes per core of one layer's K|V (the cache a region keeps for the re-layout)."""
        return 2 * self.lay.tb * self.lay.kpc * 2 * self.lay.p * self.mesh.hardware.element_bytes

    def place_weight(self, name, kernel, matrix_fn, charge: bool = True):
        """A B operand pre-skewed on load, as ``kernel``'s B layout says
        (:meth:`kernels.gemm.GemmPlan.b_layout`); each rank reads only its cores' rows and
        columns of the :class:`Gathered` ``matrix_fn()``."""
        layout, index = self._b_tiles(kernel)
        block = index.tiles(matrix_fn()) if self.numeric else None
        arr = host.place_block(self.mesh, name, block, layout.tile_shape, np.float32, charge=charge, adopt=True)
        arr.layout = layout
        return arr

    def _b_tiles(self, kernel) -> tuple:
        """``kernel``'s B layout and, in a numeric run, where this block's tiles come from in
        its matrices (the same for every layer's: worked out once)."""
        got = self._b_tile_index.get(kernel)
        if got is None:
            layout, index = kernel.b_layout, None
            if self.numeric:
                past_end = [np.where(at < 0, dim.length, at)        # padding: past the matrix's end
                            for dim in layout.dims for at in [dim.index(self.rows, self.cols)]]
                index = TileIndex.of(*past_end)
            got = self._b_tile_index[kernel] = (layout, index)
        return got

    def flops_so_far(self) -> int:
        return int(self.mesh.sum_over_ranks(int(self.mesh.counters["flops"].sum())))

    # ------------------------------------------------------------------ wafer operators
    def rms_norm(self, x, w, name):
        """x / rms(x) * w (``w`` placed by column block), the mean over the row via an
        allreduce-sum along x."""
        mesh = self.mesh
        tb, hb = x.tile_shape
        ss = mesh.alloc(f"{name}.ss", (tb,), np.float32)
        with mesh.phase(name):
            mesh.local(flops.RMS_SUMSQ * self.real_rows * self.real_hidden,
                       lambda: np.einsum("abij,abij->abi", x.data, x.data), ss)
            with mesh.fabric.scope():
                allreduce(mesh, ss, "x", "sum", name=f"{name}.allreduce", forwarding=self.forwarding)
            out = mesh.alloc(f"{name}.out", x.tile_shape, np.float32)
            out.layout = x.layout                        # a norm keeps its input's layout

            def scale():
                inv = 1.0 / np.sqrt(ss.data / np.float32(self.config.hidden_size)
                                    + np.float32(self.config.rms_norm_eps))
                return x.data * inv[..., None] * w.data[:, :, None, :]
            rows = np.broadcast_to(self.real_rows, mesh.block_shape)
            mesh.local(flops.RMS_ROW * rows + flops.RMS_SCALE * rows * self.real_hidden, scale, out,
                       scalars=rows)   # a reciprocal root per row
        ss.free()
        return out

    def gemm(self, op, a, b, name, resident_b=False):
        """MeshGEMM ``op`` (the run's plan, charged its real work); A is consumed (shifted on
        the wafer) and released, and so is B unless it is a resident weight (left one ring step
        short of home: the schedule is cyclic)."""
        with self.mesh.fabric.scope():
            c = self.kernels[op](a, b, name)
        a.free()
        if not resident_b:
            b.free()
        return c

    def add_into(self, x, y):
        self.mesh.local(flops.ADD * self.real_rows * self.real_hidden, lambda: np.add(x.data, y.data, out=x.data))
        y.free()

    def kv_share(self, qkv, name):
        """[tb, kpc * share]: this column's share of its block's K|V values, out of the Q|K|V tile."""
        share = self.mesh.alloc(f"{name}.kv.share", (self.lay.tb, self.lay.kpc * self.lay.share), np.float32)
        if self.numeric:
            share.data[...] = qkv.data[..., self.lay.cells * 2 * self.lay.p:]
        return share

    def rope(self, q, share, cos, sin):
        """Rotate the Q cells and the K pairs of the share in place (pairs are adjacent; a slot's
        cells share its angles; K pair i of a block sits at ``i // sb`` in share ``i mod sb``)."""
        lay, mesh = self.lay, self.mesh

        def rotate():
            shape = q.data.shape[:2]
            c = cos.data.reshape(shape + (lay.tb, lay.kpc, lay.p))
            s = sin.data.reshape(c.shape)
            cells = q.data.reshape(shape + (lay.kpc, lay.hq, lay.tb, lay.p, 2))
            angles = c.transpose(0, 1, 3, 2, 4)[:, :, :, None], s.transpose(0, 1, 3, 2, 4)[:, :, :, None]
            _rotate(cells, *angles)
            q.data[...] = cells.reshape(q.data.shape)
            _, _, position = lay.slots()
            m = np.arange(-(-lay.p // lay.sb))
            pair = position[self.cols][:, None] + lay.sb * m[None, :]                # [block cols, m]
            real = pair < lay.p
            keys = share.data.reshape(shape + (lay.tb, lay.kpc, lay.share))[..., : 2 * m.size]
            keys = keys.reshape(keys.shape[:-1] + (m.size, 2))
            index = np.minimum(pair, lay.p - 1)[None, :, None, None, :]
            pick = lambda a, other: np.where(real[None, :, None, None, :],  # noqa: E731
                                             np.take_along_axis(a, index, axis=4), other)
            _rotate(keys, pick(c, 1), pick(s, 0))     # V values past a share's K pairs stay
            share.data.reshape(shape + (lay.tb, lay.kpc, lay.share))[..., : 2 * m.size] = keys.reshape(keys.shape[:-2] + (-1,))
        pairs = lay.q_dims()[self.cols] // 2 + lay.k_pairs()[self.cols]
        mesh.local(flops.ROPE_PAIR * self.real_rows * pairs[None, :], rotate)

    def gather_kv(self, share, name):
        """K and V of every column's block: each column's share of the block's K|V values goes
        round the block's interleaved ring (sb - 1 steps); returns [tb, K slots | V slots]."""
        mesh, lay = self.mesh, self.lay
        tb, width = lay.tb, lay.kpc * lay.share
        cols = np.arange(mesh.block_shape[1])
        dest, origin = lay.gather_dest()
        _, _, position = lay.slots()
        blocks = mesh.alloc(f"{name}.kv.blocks", (lay.sb, tb, width), np.float32)
        if self.numeric:
            blocks.data[:, cols, position[self.cols]] = share.data
        if lay.sb > 1:
            with mesh.phase(f"{name}.kv_gather"), mesh.fabric.scope():
                spare = mesh.alloc(f"{name}.kv.share.next", (tb, width), np.float32)
                pattern = mesh.fabric.permutation(f"{name}.kv.gather", "x", dest)
                for step in range(lay.sb - 1):
                    pattern.start(share, spare).wait()
                    share.swap_payload(spare)
                    if self.numeric:
                        blocks.data[:, cols, origin[self.cols, step]] = share.data
                    mesh.step(f"step {step}")
                spare.free()
        share.free()
        kv = mesh.alloc(f"{name}.kv", (tb, 2 * lay.kpc * 2 * lay.p), np.float32)
        if self.numeric:
            is_v, offset = lay.share_map()
            flat = np.flatnonzero(offset.ravel() >= 0)
            order = np.empty((2, 2 * lay.p), np.int64)               # [K|V, offset] -> flat index
            order[is_v.ravel()[flat].astype(int), offset.ravel()[flat]] = flat
            full = blocks.data.reshape(blocks.data.shape[:3] + (tb, lay.kpc, lay.share))
            full = full.transpose(0, 1, 3, 4, 2, 5).reshape(full.shape[:2] + (tb, lay.kpc, -1))
            kv.data[...] = full[..., order].transpose(0, 1, 2, 4, 3, 5).reshape(kv.data.shape)
        blocks.free()
        return kv

    def slots_of(self, kv, part: int, name: str):
        """[kpc, tb, 2p]: the K (part 0) or V (part 1) slots of the kv tile, a slot axis in front."""
        lay = self.lay
        out = self.mesh.alloc(name, (lay.kpc, lay.tb, 2 * lay.p), np.float32)
        if self.numeric:
            width = lay.kpc * 2 * lay.p
            cols = kv.data[..., part * width:(part + 1) * width]
            out.data[...] = cols.reshape(cols.shape[:3] + (lay.kpc, 2 * lay.p)).transpose(0, 1, 3, 2, 4)
        return out

    def softmax(self, s, name):
        """Masked, scaled softmax over the keys of each row (tile: query head x token x key)."""
        mesh, lay = self.mesh, self.lay
        row_shape = s.tile_shape[:-1]
        scores = row_shape[0] * self.real_rows * self.real_keys      # each core's real ones

        def scale_mask():
            query = self.rows[:, None, None, None] * lay.tb + np.arange(lay.tb)[None, None, :, None]
            key = self.cols[None, :, None, None] * lay.tb + np.arange(lay.tb)[None, None, None, :]
            visible = ((key <= query) & (key < lay.tokens))[:, :, None]   # same for every head
            scale = np.float32(1.0 / math.sqrt(self.config.head_dim))
            return np.where(visible, s.data * scale, -np.inf)
        mesh.local(flops.SCORE_SCALE_MASK * scores, scale_mask, s)
        m = mesh.alloc(f"{name}.max", row_shape, np.float32)
        mesh.local(flops.SOFTMAX_MAX * scores, lambda: s.data.max(axis=-1), m)
        with mesh.fabric.scope():
            allreduce(mesh, m, "x", "max", name=f"{name}.max", forwarding=self.forwarding)
        l = mesh.alloc(f"{name}.sum", row_shape, np.float32)

        def exp_sum():
            np.exp(s.data - m.data[..., None], out=s.data)
            return s.data.sum(axis=-1)
        mesh.local(flops.SOFTMAX_EXP_SUM * scores, exp_sum, l)
        with mesh.fabric.scope():
            allreduce(mesh, l, "x", "sum", name=f"{name}.sum", forwarding=self.forwarding)
        mesh.local(flops.SOFTMAX_DIVIDE * scores, lambda: np.divide(s.data, l.data[..., None], out=s.data))
        m.free()
        l.free()

    # ------------------------------------------------------------------ one layer
    def layer(self, index, x, cos, sin, w):
        """One decoder layer (PAPER.md §4) on resident weights ``w`` (:meth:`place_layer`)."""
        mesh, lay = self.mesh, self.lay
        p = f"prefill.layer{index}"
        tb, p2, cells = lay.tb, 2 * lay.p, lay.cells
        plan_t = self.kernels["qk"].plan

        with mesh.phase(f"{p}.attention"):
            xn = self.rms_norm(x, w["norm1"], f"{p}.input_norm")
            qkv = self.gemm("qkv", xn, w["w_qkv"], f"{p}.qkv", resident_b=True)
            q = mesh.alloc(f"{p}.q", (cells, tb, p2), np.float32)
            if self.numeric:
                q.data[...] = qkv.data[..., : cells * p2].reshape(qkv.data.shape[:3] + (cells, p2)).transpose(0, 1, 3, 2, 4)
            share = self.kv_share(qkv, p)
            qkv.free()
            with mesh.phase(f"{p}.rope"):
                self.rope(q, share, cos, sin)
            kv = self.gather_kv(share, p)
            # The layer's K|V stays on the cores (the cache the re-layout moves; charged with the
            # region's kv_cache block): kept before the skew moves the working copy.
            kept = mesh.alloc(f"{p}.kv.kept", kv.tile_shape, np.float32, fill=None, charge=False)
            kept.layout = blocked(self.n, self.n, (lay.t_pad, self.n * kv.tile_shape[-1]), ("y", "x"))
            if self.numeric:
                kept.data[...] = kv.data
            # K and V into the pre-skewed layout of a B operand, on the wafer.
            with mesh.phase(f"{p}.kv_skew"), mesh.fabric.scope():
                rotate_lines(mesh, kv, "y", plan_t.ring_y, plan_t.ring_x.position, f"{p}.kv.skew")
            # Each core multiplies its own cells; the tiles that travel along X (the partial
            # scores, then P) carry every head, so every head's reduction stays on its columns.
            k = self.slots_of(kv, 0, f"{p}.k")
            with mesh.fabric.scope():
                s = self.kernels["qk"](q, k, f"{p}.qk")
            q.free()
            k.free()
            with mesh.phase(f"{p}.softmax"):
                self.softmax(s, f"{p}.softmax")
            v = self.slots_of(kv, 1, f"{p}.v")
            o = self.gemm("pv", s, v, f"{p}.pv")
            out = mesh.alloc(f"{p}.attn", (tb, cells * p2), np.float32)
            out.layout = self.kernels["o"].a_layout          # every head's output, in Q's slot order
            if self.numeric:
                out.data[...] = o.data.transpose(0, 1, 3, 2, 4).reshape(out.data.shape)
            o.free()
            kv.free()
            self.add_into(x, self.gemm("o", out, w["w_o"], f"{p}.o", resident_b=True))

        with mesh.phase(f"{p}.mlp"):
            xn = self.rms_norm(x, w["norm2"], f"{p}.post_norm")
            gu = self.gemm("gate_up", xn, w["w_gate_up"], f"{p}.gate_up", resident_b=True)
            act = mesh.alloc(f"{p}.act", (tb, lay.fb), np.float32)
            act.layout = self.kernels["down"].a_layout


            def silu_mul():
                gate, up = gu.data[..., : lay.fb], gu.data[..., lay.fb:]
                return gate / (1.0 + np.exp(-gate)) * up
            mesh.local(flops.SILU_MUL * self.real_rows * self.real_inter, silu_mul, act)
            gu.free()
            self.add_into(x, self.gemm("down", act, w["w_down"], f"{p}.down", resident_b=True))
        return kept

    def read_cache(self, kept) -> tuple[np.ndarray, np.ndarray]:
        """Host plane, after the prefill: a layer's kept K|V as [kv_heads, T, head_dim] each."""
        lay = self.lay
        cols = host.gather(kept).reshape(lay.t_pad, self.n, 2, lay.kpc, 2 * lay.p)
        return lay.unpermute_kv(cols[:, :, 0]), lay.unpermute_kv(cols[:, :, 1])


def prefill(mesh, config: LlamaConfig, weights, tokens, layers: int | None = None,
            forwarding: str = "stream", on_layer=None, runner=None, run_every_layer: bool = False) -> PrefillResult:
    """Run the prompt through ``layers`` decoder layers (default all) and the final norm.

    ``tokens``: token ids (numeric run) or just the prompt length (dry run). ``weights`` may
    be None only when ``mesh.dry_run``. ``forwarding``: how the allreduce chains forward
    (:mod:`kernels.allreduce`); ``on_layer()`` is called after each layer (progress). Returns a
    :class:`PrefillResult`; ``last_hidden`` and the caches
    are None in a dry run. The mesh must be square. ``runner``: the class that runs the layers
    (default WaferLLM's; :mod:`llm.strategies` swaps its GEMMs). A dry run advances the layers
    once they are in a steady state (:mod:`meshmpi.steady`: the same results as running them);
    ``run_every_layer`` runs every one.
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
    run = (runner or _Prefill)(mesh, config, weights, length, forwarding)
    lay = run.lay

    activations = blocked(n, n, (length, config.hidden_size), ("y", "x"))    # token block i, feature block j
    x = host.scatter(mesh, "prefill.x", weights.embed[ids].astype(np.float32) if run.numeric else None,
                     activations, np.float32)
    cos_sin = lay.rope_tiles() if run.numeric else (None, None)
    cos = run.scatter("prefill.rope.cos", lambda: cos_sin[0], (lay.tb, lay.kpc * lay.p))
    sin = run.scatter("prefill.rope.sin", lambda: cos_sin[1], (lay.tb, lay.kpc * lay.p))
    final_w = run.scatter("prefill.final_norm.w", lambda: lay.norm_tiles(weights.norm), (lay.hb,))
    resident = [run.place_layer(index) for index in range(count)]
    weight_bytes, kv_bytes = run.layer_weight_bytes(), run.kv_bytes()
    hand_off = costs.line_stream(mesh.hardware, n, n, lay.tb * lay.hb * mesh.hardware.element_bytes)

    start = mesh.modeled_cycles()
    flops_before = run.flops_so_far()
    kept = []
    steady = SteadyState(mesh, enabled=not run_every_layer)
    per_layer, per_region, in_region = 0.0, 1, 0
    # Layer 0 runs with its own weights resident; the region then holds as many layers as fit
    # beside the working buffers it needed (weights and the kept K|V of each layer).
    mesh.memory.charge("prefill.weights", weight_bytes)
    with mesh.phase("prefill"):
        for index in range(count):
            if index and index % per_region == 0:      # the next region of the pipeline
                with mesh.phase("prefill.hand_off"):
                    mesh.clock[...] = mesh.modeled_cycles() + hand_off
                    mesh.fabric.forget_idle_links()
                mesh.memory.charge("prefill.kv_cache", 0)
                in_region = 0
            name = f"prefill.layer{index}"
            with mesh.phase(name):
                kept.append(steady.run(name, lambda: run.layer(index, x, cos, sin, resident[index])))
            if index == 0:
                per_layer = mesh.modeled_cycles() - start
                # weights per core may differ between cores (a compared strategy's 1-D shares):
                # the working buffers beside them and the most a core holds of them
                working = mesh.max_over_ranks(int((mesh.memory.peak - weight_bytes).max(initial=0)))
                most = mesh.max_over_ranks(int(np.max(weight_bytes)))
                fit = (mesh.memory.sram_bytes - working) // (most + kv_bytes)
                per_region = max(1, min(config.num_hidden_layers, int(fit)))
                mesh.memory.charge("prefill.weights", per_region * weight_bytes)
            in_region += 1
            mesh.memory.charge("prefill.kv_cache", in_region * kv_bytes)
            if on_layer is not None:
                on_layer()
        final = run.rms_norm(x, final_w, "prefill.final_norm")
    total = mesh.modeled_cycles() - start
    charged = run.flops_so_far() - flops_before
    last = k_cache = v_cache = None
    if run.numeric:          # host plane: the last hidden vector and the caches
        last = host.gather(final)[length - 1].copy()
        k_cache, v_cache = (list(c) for c in zip(*(run.read_cache(layer) for layer in kept)))
    for arr in (final, x, cos, sin, final_w, *kept, *(w for layer in resident for w in layer.values())):
        if arr is not None:     # an advanced layer's K|V: none
            arr.free()
    for block in ("prefill.weights", "prefill.kv_cache"):
        mesh.memory.release(block)
    regions = -(-config.num_hidden_layers // per_region)
    return PrefillResult(last_hidden=last, k_cache=k_cache, v_cache=v_cache, modeled_cycles=total,
                         cycles_per_layer=per_layer, tokens=length, layers=count, flops_charged=charged,
                         layers_per_region=per_region, regions=regions, hand_off_cycles=hand_off,
                         flops_real=prefill_flops(real_flops(config, length), count),
                         layers_advanced=steady.advanced)
