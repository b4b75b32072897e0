"""Where a LLaMA model's numbers live on an ``R x C`` decode region (PAPER.md §5).

"row-indexed" vectors: chunk i on every core of row i; "column-indexed": chunk j on every
core of column j. Consecutive MeshGEMVs alternate the reduction axis, so no vector is ever
transposed; W_O and W_down use the transposed placement.

Attention dims are laid out per column: column j holds up to ``s`` key/value dims
(``(kv head, offset)`` pairs) and, for each of the ``group`` query heads sharing a kv head,
the query dims at the same offsets; so q·k and p·V need no data from other columns.
Inside each head the dims are reordered so RoPE's rotate-half pairs (o, o + head_dim/2) sit
side by side and never straddle two cores.

The kv heads own disjoint *segments* of columns, so a head's partial scores are reduced only
over the columns that hold its dims (:func:`kernels.allreduce.allreduce` with ``segments``):

- ``cols >= kv_heads``: kv head a owns a contiguous segment of the balanced split of the
  columns (``cols // kv_heads`` or one more), at most ``head_dim / 2`` columns (one rotate-half
  pair each); its pairs are split evenly over the segment. The segments fill every column
  unless ``cols > kv_heads * head_dim / 2``: then each segment has ``head_dim / 2`` columns and
  the last ``cols - kv_heads * head_dim / 2`` columns hold padding only. Inside a column, slots
  are padding where the segment's pair counts differ (``head_dim / 2`` not a multiple of the
  segment's width): ``s = 2 * ceil(head_dim / 2 / (cols // kv_heads))``.
- ``cols < kv_heads``: column c holds whole kv heads (the balanced split of the heads), up to
  ``heads_per_column = ceil(kv_heads / cols)`` of them, ``s = heads_per_column * head_dim``;
  every segment is one column and the scores need no reduction along X.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from meshmpi.mesh import block_offsets

from .checkpoint import bf16_bits, select


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Gathered:
    """A weight matrix as a layout arranges it, never built whole: element (a, b) is row
    ``rows[a]``, column ``cols[b]`` of ``parts`` side by side (``[in, out]`` arrays or stored
    tensors); 0 where an index is -1 or past the end (padding)."""
    parts: tuple
    rows: np.ndarray
    cols: np.ndarray

    @classmethod
    def of(cls, parts, arrange_cols=None, arrange_rows=None) -> "Gathered":
        """The matrix the layout's ``arrange_cols`` (``arrange_rows``) makes of ``parts``: it
        is run on one-row (one-column) matrices of source indices + 1, which it only moves
        and pads; None keeps the order."""
        widths = np.cumsum([0] + [p.shape[1] for p in parts])
        rows, cols = np.arange(parts[0].shape[0]), np.arange(widths[-1])
        if arrange_cols is not None:
            cols = arrange_cols(*(np.arange(lo, hi)[None, :] + 1 for lo, hi in zip(widths[:-1], widths[1:])))[0] - 1
        if arrange_rows is not None:
            rows = arrange_rows(*(rows[:, None] + 1 for _ in parts))[:, 0] - 1
        return cls(tuple(parts), rows, cols)

    def read(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """float32 ``[len(rows), len(cols)]``: only these rows and columns of the parts are read."""
        out = np.zeros((1, 1, rows.size, cols.size), np.float32)
        self.tiles_into(rows, cols, np.arange(rows.size)[None, None], np.arange(cols.size)[None, None], out)
        return out[0, 0]

    def tiles_into(self, rows: np.ndarray, cols: np.ndarray, row_at: np.ndarray, col_at: np.ndarray,
                   out: np.ndarray) -> None:
        """``out[r, c, a, b]`` = element (``rows[row_at[r, c, a]]``, ``cols[col_at[r, c, b]]``)
        of the matrix, read part by part straight into the tiles: only these rows and columns
        are read; padding elements are left as they are (zero in a new ``out``)."""
        src_rows, src_cols = _lookup(self.rows, rows), _lookup(self.cols, cols)
        valid = np.flatnonzero(src_rows >= 0)
        used_rows, row_pos = np.unique(src_rows[valid], return_inverse=True)
        read_row = np.full(rows.size, -1, np.int64)          # per distinct row: its row in a part's read
        read_row[valid] = row_pos.reshape(-1)
        start = 0
        for part in self.parts:
            width = part.shape[1]
            inside = np.flatnonzero((src_cols >= start) & (src_cols < start + width))
            used_cols, col_pos = np.unique(src_cols[inside] - start, return_inverse=True)
            if used_rows.size and used_cols.size:
                read_col = np.full(cols.size, -1, np.int64)  # per distinct column: its column there
                read_col[inside] = col_pos.reshape(-1)
                bits = bf16_bits(part)      # widened on the way into the tiles, not in a pass of its own
                read = part.select(used_rows, used_cols, widen=False) if bits else select(part, used_rows, used_cols)
                tiles = (read, read_row, read_col, row_at, col_at, out, out.view(np.uint32))
                if read.strides[0] < read.strides[1]:     # laid out by columns (stored transposed):
                    tiles = _transposed(*tiles)            # walk it in its own order
                _gather_tiles(*tiles, bits)
            start += width


def _transposed(read, read_row, read_col, row_at, col_at, out, out_bits):
    """:func:`_gather_tiles`' arguments for the transposed matrix and tiles: the same elements
    land in the same places, with ``read``'s rows now the ones laid out contiguously."""
    flip = lambda tiles: tiles.swapaxes(2, 3)    # noqa: E731
    return read.T, read_col, read_row, col_at, row_at, flip(out), flip(out_bits)


@numba.njit(cache=True, nogil=True)
def _gather_tiles(read, read_row, read_col, row_at, col_at, out, out_bits, bf16):
    """``out[r, c, a, b] = read[read_row[row_at[r, c, a]], read_col[col_at[r, c, b]]]`` where
    both are >= 0, in one pass, a tile row at a time; with ``bf16``, ``read`` holds bfloat16
    bits, widened into the float32 bits of ``out`` (``out_bits``, the same memory)."""
    br, bc, th = row_at.shape
    tw = col_at.shape[2]
    at_col = np.empty(tw, np.int64)
    for r in range(br):
        for c in range(bc):
            for b in range(tw):
                at_col[b] = read_col[col_at[r, c, b]]
            for a in range(th):
                i = read_row[row_at[r, c, a]]
                if i < 0:
                    continue
                for b in range(tw):
                    j = at_col[b]
                    if j < 0:
                        continue
                    if bf16:
                        out_bits[r, c, a, b] = np.uint32(read[i, j]) << np.uint32(16)
                    else:
                        out[r, c, a, b] = read[i, j]


def _lookup(index: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``index[at]``, -1 where ``at`` is past the end."""
    return np.where(at < index.size, index[np.minimum(at, index.size - 1)], -1)


def take_cols(w: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Columns ``index`` of w (zero where index is -1): a layout's host permutation."""
    out = w[:, np.maximum(index, 0)]
    out[:, index < 0] = 0
    return out


@dataclass(frozen=True)
class TileIndex:
    """Where a block's tiles come from in a matrix: core (r, c) holds rows ``row_of[r, c]``
    and columns ``col_of[r, c]`` (logical indices), as the distinct rows and columns read
    and each tile element's place among them. Worked out once for every matrix of a layout."""
    rows: np.ndarray
    row_at: np.ndarray
    cols: np.ndarray
    col_at: np.ndarray

    @classmethod
    def of(cls, row_of: np.ndarray, col_of: np.ndarray) -> "TileIndex":
        return cls(*_unique(row_of), *_unique(col_of))

    def tiles(self, matrix: Gathered) -> np.ndarray:
        """``[br, bc, th, tw]``: the block's tiles of ``matrix``, its rows and columns read once,
        straight into the tiles."""
        out = np.zeros(self.row_at.shape + self.col_at.shape[2:], np.float32)
        matrix.tiles_into(self.rows, self.cols, self.row_at, self.col_at, out)
        return out


def block_tiles(matrix: Gathered, row_of: np.ndarray, col_of: np.ndarray) -> np.ndarray:
    """``[br, bc, th, tw]``: core (r, c) of a block holds ``matrix[row_of[r, c]][:, col_of[r, c]]``
    (:class:`TileIndex`)."""
    return TileIndex.of(row_of, col_of).tiles(matrix)


def _unique(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct values of ``index`` and where each entry is among them (shaped as
    ``index``); the axes a broadcast repeats are looked at once."""
    base = index[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in index.strides)]
    values, at = np.unique(base, return_inverse=True)
    return values, np.ascontiguousarray(np.broadcast_to(at.reshape(base.shape), index.shape))


def vector_block(vector, parts: int, part_range: np.ndarray) -> np.ndarray:
    """``[len(part_range), chunk]``: chunks ``part_range`` of ``vector`` cut into ``parts``
    zero-padded chunks (:func:`kernels.gemv.vector_layout`'s), only those read."""
    chunk = ceil_div(vector.shape[0], parts)
    index = part_range[:, None] * chunk + np.arange(chunk)[None, :]
    out = np.zeros(index.shape, np.float32)
    real = index < vector.shape[0]
    out[real] = select(vector, index[real])
    return out


@dataclass
class DecodeLayout:
    rows: int
    cols: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def for_config(cls, config, rows: int, cols: int) -> "DecodeLayout":
        return cls(rows, cols, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, config.head_dim, config.intermediate_size,
                   config.vocab_size)

    def __post_init__(self):
        self.group = self.heads // self.kv_heads
        self.hidden_chunk = ceil_div(self.hidden, self.rows)     # row-indexed hidden
        self.ffn_chunk = ceil_div(self.ffn, self.cols)
        self.vocab_chunk = ceil_div(self.vocab, self.cols)
        half = self.head_dim // 2
        columns, self.segments, self.heads_per_column = self._kv_columns()
        self.s = max(len(column) for column in columns)          # kv slots per column, even
        maps = np.full((3, self.cols, self.s), -1)
        for c, column in enumerate(columns):
            if column:
                maps[:, c, :len(column)] = np.array(column).T
        # kv slot t (over all columns) -> (kv head, offset in head, head within its column), -1: padding
        self.slot_head, self.slot_offset, self.slot_local = (m.ravel() for m in maps)
        # rotary frequency index of each slot (pairs share one)
        self.slot_freq = np.where(self.slot_offset >= 0, self.slot_offset % half, 0)
        self.padding_columns = self.cols - len(columns)

    def _kv_columns(self):
        """Per used column, its (kv head, offset in head, head within the column) slots; the
        segments of columns; the most kv heads one column holds (see the module docstring)."""
        half = self.head_dim // 2
        pair_order = np.stack([np.arange(half), np.arange(half) + half], 1).ravel()
        if self.cols < self.kv_heads:                          # whole heads on each column
            bounds = block_offsets(self.kv_heads, self.cols)
            columns = [[(head, o, head - lo) for head in range(lo, hi) for o in pair_order]
                       for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
            return columns, [(c, c + 1) for c in range(self.cols)], int(np.diff(bounds).max())
        widths = np.minimum(np.diff(block_offsets(self.cols, self.kv_heads)), half)
        columns = []
        for head, width in enumerate(widths.tolist()):          # one head over each segment
            pairs = block_offsets(half, width)
            columns += [[(head, o, 0) for o in pair_order[2 * lo:2 * hi]]
                        for lo, hi in zip(pairs[:-1].tolist(), pairs[1:].tolist())]
        ends = np.cumsum(widths)
        return columns, list(zip((ends - widths).tolist(), ends.tolist())), 1

    def summary(self) -> dict:
        """The attention layout in numbers (for reports)."""
        widths = [hi - lo for lo, hi in self.segments]
        return {"kv_dims_per_column": self.s, "kv_heads_per_column": self.heads_per_column,
                "score_segments": len(self.segments), "segment_columns": [min(widths), max(widths)],
                "padding_columns": self.padding_columns}

    def score_elements(self, tokens: int) -> int:
        """Partial scores per core for ``tokens`` cached tokens: the column's heads only."""
        return tokens * self.heads_per_column * self.group

    # ---------------------------------------------------------------- index maps
    def kv_index(self) -> np.ndarray:
        """Per slot, the column of a [*, kv_heads*head_dim] matrix (-1: padding)."""
        return np.where(self.slot_head >= 0, self.slot_head * self.head_dim + self.slot_offset, -1)

    def q_index(self) -> np.ndarray:
        """[cols, group, s]: the q dim (head*head_dim + offset) each q slot holds (-1: padding)."""
        heads = self.slot_head.reshape(self.cols, 1, self.s) * self.group + np.arange(self.group)[None, :, None]
        offs = np.broadcast_to(self.slot_offset.reshape(self.cols, 1, self.s), heads.shape)
        return np.where(offs >= 0, heads * self.head_dim + offs, -1)

    # ---------------------------------------------------------------- host placement
    def qkv_matrix(self, wq, wk, wv) -> np.ndarray:
        """Fused [hidden, cols*(group+2)*s]: column block j = [q slots, k slots, v slots]."""
        q = take_cols(wq, self.q_index().ravel()).reshape(-1, self.cols, self.group * self.s)
        kv = self.kv_index()
        k = take_cols(wk, kv).reshape(-1, self.cols, self.s)
        v = take_cols(wv, kv).reshape(-1, self.cols, self.s)
        return np.concatenate([q, k, v], axis=2).reshape(wq.shape[0], -1)

    def o_matrix(self, wo) -> np.ndarray:
        """W_O rows in q-slot order: [cols*group*s, hidden]."""
        return take_cols(wo.T, self.q_index().ravel()).T

    def gate_up_matrix(self, wg, wu) -> np.ndarray:
        """Fused [hidden, cols*2*ffn_chunk]: column block j = [gate chunk j, up chunk j]."""
        f = self.ffn_chunk * self.cols
        pad = lambda w: np.pad(w, ((0, 0), (0, f - w.shape[1])))  # noqa: E731
        g, u = pad(wg).reshape(-1, self.cols, self.ffn_chunk), pad(wu).reshape(-1, self.cols, self.ffn_chunk)
        return np.concatenate([g, u], axis=2).reshape(wg.shape[0], -1)

    def place(self, matrix: Gathered, reduce_axis: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The tiles of cores ``rows x cols`` of :func:`kernels.gemv.matrix_layout`:
        for 'y' tile (i, j) is W[in block i, out block j]; for 'x' W[in block j, out block i]."""
        in_lines, out_lines = (rows, cols) if reduce_axis == "y" else (cols, rows)
        in_parts, out_parts = (self.rows, self.cols) if reduce_axis == "y" else (self.cols, self.rows)
        th, tw = ceil_div(matrix.rows.size, in_parts), ceil_div(matrix.cols.size, out_parts)
        row_of = in_lines[:, None] * th + np.arange(th)
        col_of = out_lines[:, None] * tw + np.arange(tw)
        shape = (rows.size, cols.size)
        if reduce_axis == "y":
            return block_tiles(matrix, np.broadcast_to(row_of[:, None], shape + (th,)),
                               np.broadcast_to(col_of[None, :], shape + (tw,)))
        return block_tiles(matrix, np.broadcast_to(row_of[None, :], shape + (th,)),
                           np.broadcast_to(col_of[:, None], shape + (tw,)))

    def layer_matrices(self, w) -> dict:
        """One layer's four placed matrices as :class:`Gathered` (``[in, out]`` weights)."""
        return {"qkv": Gathered.of((w.q_proj, w.k_proj, w.v_proj), self.qkv_matrix),
                "o": Gathered.of((w.o_proj,), arrange_rows=self.o_matrix),
                "gate_up": Gathered.of((w.gate_proj, w.up_proj), self.gate_up_matrix),
                "down": Gathered.of((w.down_proj,))}

    # ---------------------------------------------------------------- tile shapes
    def tile_shapes(self) -> dict:
        """Per-core tile shape of each weight of one layer (and the LM head)."""
        h, s, g, f = self.hidden_chunk, self.s, self.group, self.ffn_chunk
        return {"norm1": (h,), "qkv": (h, (g + 2) * s), "o": (g * s, h), "norm2": (h,),
                "gate_up": (h, 2 * f), "down": (f, h)}

    def layer_weight_elements(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.tile_shapes().values())

    def head_elements(self) -> int:
        """Final norm and LM head per core."""
        return self.hidden_chunk + self.hidden_chunk * self.vocab_chunk
