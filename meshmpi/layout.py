"""Layouts: where a global array lives on the mesh, stated as data.

A :class:`Layout` says, for each dimension of a global array, how the mesh holds it
(:class:`Dim`): split over the rows (``"y"``), over the columns (``"x"``) or whole on every
core (``None``); cut into ``parts`` blocks of ``block`` elements (the length zero-padded to
``parts * block``); which of those blocks each core holds — its own coordinate along the axis
(the natural layout), or a ``[rows, cols, g]`` table of block numbers (a skew: PAPER.md §2's
pre-skewed B, an A left rotated by the alignment), the ``g`` blocks stacked along the tile's
dimension; and an optional host permutation ``order`` (tile position p of the padded dimension
holds element ``order[p]``; -1 a padding slot), for heads and RoPE pairs reordered across
columns (PAPER.md §4).

The tiles of a layout are the same on every rank split: :meth:`Layout.tiles` makes one block
of cores' tiles from the global array and :meth:`Layout.assemble` puts tiles back, so
:func:`meshmpi.host.scatter` and :func:`meshmpi.host.gather` need nothing else. Mesh arrays
carry their layout (``MeshArray.layout``), so a kernel can check that its operands are where
it expects them (:func:`expect`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import LayoutError

AXES = ("y", "x", None)


@dataclass(frozen=True, eq=False)
class Dim:
    """How one dimension of a global array is held; see the module docstring. ``padded`` is
    the padded length when it is more than ``parts`` blocks need (MeshGEMM pads K to its
    chunk count); with ``order`` it is ``len(order)``."""
    length: int
    along: str | None = None
    parts: int = 1
    padded: int | None = None
    held: np.ndarray | None = None      # [rows, cols, g] block numbers, or None: natural
    order: np.ndarray | None = None     # host permutation of the padded dimension, or None

    def __post_init__(self):
        if self.along not in AXES:
            raise ValueError(f"along must be one of {AXES}, not {self.along!r}")
        if self.along is None and self.parts != 1 and self.held is None:
            raise ValueError("a dimension held whole on every core has one part")

    @property
    def block(self) -> int:
        """Elements per block: the padded length over the parts."""
        padded = len(self.order) if self.order is not None else (self.padded or self.length)
        return -(-padded // self.parts)

    @property
    def per_core(self) -> int:
        """Blocks a core holds (stacked along the tile's dimension)."""
        return 1 if self.held is None else self.held.shape[2]

    @property
    def tile(self) -> int:
        return self.per_core * self.block

    def blocks_of(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """[len(rows), len(cols), g]: the blocks cores ``rows x cols`` hold."""
        if self.held is not None:
            return self.held[np.ix_(rows, cols)]
        if self.along is None:
            return np.zeros((len(rows), len(cols), 1), np.int64)
        own = rows[:, None] if self.along == "y" else cols[None, :]
        return np.broadcast_to(own, (len(rows), len(cols)))[:, :, None]

    def index(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """[len(rows), len(cols), tile]: the global element at each tile position; -1 padding."""
        blocks = self.blocks_of(rows, cols)
        positions = (blocks[..., None] * self.block + np.arange(self.block)).reshape(blocks.shape[:2] + (-1,))
        if self.order is not None:
            order = np.append(np.asarray(self.order, np.int64), -1)
            positions = order[np.minimum(positions, len(self.order))]
        return np.where((positions >= 0) & (positions < self.length), positions, -1)

    def same(self, other: "Dim") -> bool:
        return (self.length, self.along, self.parts, self.block) == (other.length, other.along, other.parts, other.block) \
            and _same_table(self.held, other.held) and _same_table(self.order, other.order)

    def describe(self) -> str:
        where = "whole" if self.along is None else f"{self.along}/{self.parts}"
        extra = ("" if self.held is None else " skewed") + ("" if self.order is None else " permuted")
        return f"{self.length} {where}{extra}"


def _same_table(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b))


@dataclass(frozen=True, eq=False)
class Layout:
    """A global array of shape ``tuple(d.length for d in dims)`` on a ``rows x cols`` mesh."""
    rows: int
    cols: int
    dims: tuple

    @property
    def shape(self) -> tuple:
        return tuple(d.length for d in self.dims)

    @property
    def tile_shape(self) -> tuple:
        return tuple(d.tile for d in self.dims)

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and (self.rows, self.cols) == (other.rows, other.cols) \
            and len(self.dims) == len(other.dims) and all(a.same(b) for a, b in zip(self.dims, other.dims))

    __hash__ = None

    def __str__(self) -> str:
        return "[" + ", ".join(d.describe() for d in self.dims) + f"] on {self.rows}x{self.cols}"

    def with_dim(self, axis: int, **changes) -> "Layout":
        """The same layout with dimension ``axis`` changed (e.g. a new ``held`` table)."""
        dims = list(self.dims)
        dims[axis] = replace(dims[axis], **changes)
        return replace(self, dims=tuple(dims))

    def batched(self, *lengths: int) -> "Layout":
        """Leading dimensions of ``lengths``, whole on every core (a batch of independent arrays)."""
        return replace(self, dims=tuple(Dim(n) for n in lengths) + self.dims)

    def _indices(self, rows: np.ndarray, cols: np.ndarray) -> list:
        """Per dimension, the index table of cores ``rows x cols``, shaped to broadcast into
        ``[len(rows), len(cols), *tile]``."""
        nd = len(self.dims)
        out = []
        for k, dim in enumerate(self.dims):
            table = dim.index(rows, cols)
            out.append(table.reshape(table.shape[:2] + (1,) * k + (table.shape[2],) + (1,) * (nd - k - 1)))
        return out

    def tiles(self, array: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``[len(rows), len(cols), *tile]``: the tiles of cores ``rows x cols``, zero where padded."""
        array = np.asarray(array)
        if array.shape != self.shape:
            raise LayoutError(f"array of shape {array.shape} does not match layout {self}")
        padded = np.pad(array, [(0, 1)] * array.ndim)     # index -1 reads the zero at the end
        return padded[tuple(self._indices(rows, cols))]

    def assemble(self, pieces, dtype) -> np.ndarray:
        """The global array from ``(row_start, col_start, tiles)`` pieces covering the mesh."""
        out = np.zeros(tuple(n + 1 for n in self.shape), dtype)   # index -1 writes a scratch slot
        for r0, c0, block in pieces:
            rows = np.arange(r0, r0 + block.shape[0])
            cols = np.arange(c0, c0 + block.shape[1])
            out[tuple(self._indices(rows, cols))] = block
        return out[tuple(slice(0, n) for n in self.shape)]


# ---------------------------------------------------------------------------- the common layouts
def blocked(rows: int, cols: int, shape, along) -> Layout:
    """Each dimension split over ``along``'s axis (``"y"``, ``"x"`` or None: whole), in the
    natural order: core (i, j) holds block i of the y-split dimension and block j of the x one."""
    parts = {"y": rows, "x": cols, None: 1}
    return Layout(rows, cols, tuple(Dim(int(n), a, parts[a]) for n, a in zip(shape, along)))


def vector(rows: int, cols: int, length: int, indexed_along: str) -> Layout:
    """A vector split over the lines of ``indexed_along`` (``"y"``: chunk i on row i) and
    replicated along the other axis (PAPER.md §3)."""
    return blocked(rows, cols, (length,), (indexed_along,))


def expect(arr, layout: Layout, what: str) -> None:
    """Raise :class:`LayoutError` unless mesh array ``arr`` is laid out as ``layout`` (arrays
    that carry no layout are taken on trust)."""
    if arr.layout is not None and arr.layout != layout:
        raise LayoutError(f"{what}: {arr.name} is laid out as {arr.layout}, expected {layout}")

