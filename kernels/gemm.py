"""MeshGEMM and Cannon: compute-shift GEMM on a ring per row and per column (PAPER.md §2).

Both run the same schedule; they differ only in the ring. MeshGEMM uses the interleaved ring
(every edge at most 2 hops); Cannon uses the plain ring, whose wrap edge is a pass-through
route of N-1 hops on a mesh without wrap-around links.

Non-square ``R x C`` meshes split K into ``L = lcm(R, C)`` chunks with labels ``0..L-1``.
A core's A tile holds the ``L/C`` chunks whose label is congruent to its x-ring position
mod C (a "group"); its B tile holds the ``L/R`` chunks congruent to its y-ring position mod
R. At step t core (i, j) multiplies chunk ``u mod L`` with ``u = pos_y(i) + pos_x(j) - t``,
which both of its groups contain; after ``L`` steps every core has seen every chunk.
For a square mesh ``L = N``, groups are single tiles and this is exactly the paper's schedule.
Matrix sizes that do not divide the mesh are zero-padded (M to R, N to C, K to L).

Head cells (square meshes, PAPER.md §4 "group the heads, then run the same operators per
group"): when the heads of a model live on segments of columns, a core multiplies only its own
heads. A :class:`CellMap` says, per column, which entry of a batch over all heads each of the
core's ``cells`` reads (MeshGEMM's A) or adds into (GEMM-T's partial C); the operand that
stays with the column holds ``cells / per_slot`` batch entries, each shared by ``per_slot``
consecutive cells. The tile that travels along X carries every head; the FLOPs are the cells'.

Uneven tiles (:class:`RealWork`, PAPER.md §4): the fabric moves tiles of one padded shape, but
a core can be charged for the real rows, K rows and columns its product spans at each step;
without it a core is charged its whole padded tile product.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numba
import numpy as np

from meshmpi import costs, fabric
from meshmpi.layout import Dim, Layout, expect
from meshmpi.mesh import evenly_spaced_runs
from meshmpi.relocate import relocate

from .ring import Ring, interleaved_ring, plain_ring

RINGS = {"meshgemm": interleaved_ring, "cannon": plain_ring}


@dataclass
class GemmPlan:
    """Sizes, padding and rings of one ``(M x K) @ (K x N)`` product on an ``R x C`` mesh."""
    rows: int
    cols: int
    m: int
    k: int
    n: int
    ring_y: Ring
    ring_x: Ring

    @classmethod
    def build(cls, algo: str, rows: int, cols: int, m: int, k: int, n: int) -> "GemmPlan":
        make = RINGS[algo]
        return cls(rows, cols, m, k, n, make(rows), make(cols))

    @property
    def chunks(self) -> int:
        return math.lcm(self.rows, self.cols)

    @property
    def m_pad(self) -> int:
        return -(-self.m // self.rows) * self.rows

    @property
    def n_pad(self) -> int:
        return -(-self.n // self.cols) * self.cols

    @property
    def k_pad(self) -> int:
        return -(-self.k // self.chunks) * self.chunks

    @property
    def chunk(self) -> int:
        return self.k_pad // self.chunks

    @property
    def b_tile_shape(self) -> tuple[int, int]:
        """A pre-skewed B operand's tile (:meth:`b_layout`): its K-chunks by a column block."""
        return (self.chunks // self.rows) * self.chunk, self.n_pad // self.cols

    # ------------------------------------------------------------------ layouts (PAPER.md §2)
    def a_layout(self) -> Layout:
        """A (M x K) natural: core (i, j) holds row block i and K block j (``L / C`` chunks)."""
        return Layout(self.rows, self.cols, (Dim(self.m, "y", self.rows),
                                             Dim(self.k, "x", self.cols, padded=self.k_pad)))

    def b_layout(self) -> Layout:
        """B (K x N) pre-skewed on load: core (i, j) holds the chunk group of y-ring position
        ``(pos_y(i) + pos_x(j)) mod R`` (the chunks with those labels, stacked along K) and
        column block j."""
        R, L = self.rows, self.chunks
        group = (self.ring_y.position[:, None] + self.ring_x.position[None, :]) % R      # [R, C]
        labels = group[:, :, None] + R * np.arange(L // R)[None, None, :]             # [R, C, L/R]
        return Layout(self.rows, self.cols, (
            Dim(self.k, "y", L, padded=self.k_pad, held=self.chunk_rows(labels)),
            Dim(self.n, "x", self.cols)))

    def b_natural_layout(self) -> Layout:
        """B (K x N) natural, as SUMMA takes it: core (i, j) holds K block i, column block j."""
        return Layout(self.rows, self.cols, (Dim(self.k, "y", self.rows, padded=self.k_pad),
                                             Dim(self.n, "x", self.cols)))

    def c_layout(self) -> Layout:
        """C (M x N) natural."""
        return Layout(self.rows, self.cols, (Dim(self.m, "y", self.rows), Dim(self.n, "x", self.cols)))

    def t_a_layout(self) -> Layout:
        """GEMM-T's A (M x K, here K = ``n``) natural: the same blocks as C's."""
        return self.c_layout()

    def t_c_layout(self) -> Layout:
        """GEMM-T's C (M x N, here N = ``k``, the labelled dimension) natural."""
        return Layout(self.rows, self.cols, (Dim(self.m, "y", self.rows),
                                             Dim(self.k, "x", self.cols, padded=self.k_pad)))

    def rotated(self, layout: Layout, axis: int, along: str, shift) -> Layout:
        """``layout`` after each line's tiles moved ``shift`` positions backward along this
        plan's ring on ``along`` (``shift``: a scalar or one value per line): dimension
        ``axis``'s blocks are those of the core ``shift`` ring positions further on."""
        ring, lines = (self.ring_x, self.rows) if along == "x" else (self.ring_y, self.cols)
        shift = np.broadcast_to(np.asarray(shift, np.int64), (lines,))
        dim = layout.dims[axis]
        held = dim.blocks_of(np.arange(self.rows), np.arange(self.cols))
        if along == "x":
            source = ring.order[(ring.position[None, :] + shift[:, None]) % ring.n]      # [R, C]
            moved = held[np.arange(self.rows)[:, None], source]
        else:
            source = ring.order[(ring.position[:, None] + shift[None, :]) % ring.n]      # [R, C]
            moved = held[source, np.arange(self.cols)[None, :]]
        return layout.with_dim(axis, held=moved)

    def chunk_rows(self, label: np.ndarray) -> np.ndarray:
        """Where K-chunk ``label`` lies in K: inside the natural block of core ``ring_x[label mod C]``."""
        per_block = self.chunks // self.cols
        return self.ring_x.order[label % self.cols] * per_block + label // self.cols

    def label_at(self, rows: np.ndarray, cols: np.ndarray, step: int) -> np.ndarray:
        """The K-chunk label core (row, col) multiplies at ``step`` (block-shaped array)."""
        u = self.ring_y.position[rows][:, None] + self.ring_x.position[cols][None, :] - step
        return u % self.chunks


@dataclass
class CellMap:
    """Per column, the entry (of ``entries``) each of a core's cells uses; -1: a padding cell."""
    entry: np.ndarray      # [cols, cells]
    per_slot: int          # consecutive cells that share one entry of the column's own operand
    entries: int

    @property
    def cells(self) -> int:
        return self.entry.shape[1]

    def slot_of_cell(self) -> np.ndarray:
        return np.arange(self.cells) // self.per_slot

    def local(self, mesh) -> np.ndarray:
        """[block cols, cells]: this block's columns' entries."""
        return self.entry[mesh.global_cols()]

    def check(self, plan: "GemmPlan", slots, cells=None, entries=None) -> None:
        """The square schedule; operands batched over slots, cells and entries as stated."""
        if plan.rows != plan.cols:
            raise ValueError("head cells need a square mesh")
        for arr, size in ((slots, self.cells // self.per_slot), (cells, self.cells), (entries, self.entries)):
            if arr is not None and arr.tile_shape[0] != size:
                raise ValueError(f"{arr.name} {arr.tile_shape}: expected a batch of {size}")


@dataclass
class RealWork:
    """The unpadded extent of each block of a product, for the FLOP charge of uneven tiles:
    core (i, j) at a step whose K-chunk is c does ``2 rows[i] k[c] cols[j]`` FLOPs in
    ``k[c] units[j]`` vector operations (one per real K row and product). ``k`` is indexed by
    the chunk's place in K (:meth:`GemmPlan.chunk_rows` order); with head cells, ``cols[j]``
    sums the real columns of column j's cells and ``units[j]`` counts the cells holding any."""
    rows: np.ndarray       # [R]
    k: np.ndarray          # [L]
    cols: np.ndarray       # [C]
    units: np.ndarray      # [C]

    @staticmethod
    def blocks(size: int, parts: int, block: int) -> np.ndarray:
        """Real extent of each of ``parts`` blocks of ``block`` over a dimension of ``size``."""
        return np.clip(size - np.arange(parts) * block, 0, block)

    def total(self) -> int:
        """FLOPs of the whole product, all cores and steps."""
        return 2 * int(self.rows.sum()) * int(self.k.sum()) * int(self.cols.sum())

    def charger(self, mesh, plan: GemmPlan):
        """``charge(step)``: charge this rank's cores the work of that step. A core's cycles are
        its step's real K rows times a per-core rate (:func:`meshmpi.costs.compute` of one K
        row's FLOPs and vector operations; nothing where the core has no rows or columns)."""
        rows, cols = mesh.global_rows(), mesh.global_cols()
        per_k = 2 * self.rows[rows][:, None].astype(np.int64) * self.cols[cols][None, :]
        rate = np.where(per_k > 0, costs.compute(mesh.hardware, per_k, self.units[cols][None, :]), 0.0)
        # core (i, j) at step t multiplies label (pos_y(i) + pos_x(j) - t) mod L: a table of each
        # column's real K rows by pos_y(i) - t, from which a step takes whole rows
        label = (np.arange(plan.chunks)[:, None] + plan.ring_x.position[cols][None, :]) % plan.chunks
        table = self.k[plan.chunk_rows(label)].astype(np.int64)              # [L, block cols]
        start = plan.ring_y.position[rows]
        busy, flop_count, _ = mesh.charged_per_core("y")      # block-shaped, as the clocks

        def charge(step: int) -> None:     # as mesh.compute(flops, cycles=...) would, in one pass
            mesh.totals["flops"] += _step_work(table, (start - step) % plan.chunks, per_k, rate, mesh.clock, busy,
                                               flop_count)
        return charge


def warm_up() -> None:
    """Load the compiled loops a MeshGEMM run uses (:func:`meshmpi.fabric.warm_up`, and its
    per-step charge) before it is timed."""
    fabric.warm_up()
    one, whole = np.zeros((1, 1)), np.zeros((1, 1), np.int64)
    _step_work(whole, np.zeros(1, np.int64), whole, one, one, one, whole)


@numba.njit(cache=True, nogil=True)
def _step_work(table, label_row, per_k, rate, clock, busy, flop_count) -> int:
    """One step's work charged to each core (i, j): its K rows ``k = table[label_row[i], j]``
    times its FLOPs and cycles per K row, added to its FLOP count, busy time and clock; returns
    the block's FLOPs."""
    rows, cols = clock.shape
    total = 0
    for i in range(rows):
        r = label_row[i]
        for j in range(cols):
            k = table[r, j]
            flops = per_k[i, j] * k
            cycles = rate[i, j] * k
            clock[i, j] += cycles
            busy[i, j] += cycles
            flop_count[i, j] += flops
            total += flops
    return total


# ---------------------------------------------------------------------------- wafer side
def rotate_lines(mesh, arr, axis: str, ring: Ring, steps: np.ndarray, name: str) -> None:
    """Rotate each line's tiles along ``ring``: line l moves ``steps[l]`` positions backward
    (data at ring position x+s ends at x), taking the shorter direction (PAPER.md §2,
    alignment), one ring step per round on the lines still moving. Each round is timed and
    counted (:meth:`meshmpi.fabric.LinePattern.repeat`); the tiles move once, at the end
    (:func:`meshmpi.relocate.relocate`)."""
    n = ring.n
    steps = np.asarray(steps) % n
    backward = np.where(steps <= n // 2, steps, 0)
    forward = np.where(steps > n // 2, n - steps, 0)
    fabric = mesh.fabric
    for direction, counts, dest in (("back", backward, ring.recv()), ("fwd", forward, ring.send())):
        if counts.max(initial=0) == 0:
            continue
        pattern = fabric.permutation(f"{name}.align.{direction}", axis, dest,
                                     group=f"{name}.align.{axis}.{direction}")
        pattern.repeat(arr, counts, f"align {direction}")
    lo, hi = mesh.axis_lines(axis)
    relocate(mesh, arr, axis, ring.order[(ring.position[None, :] + steps[lo:hi, None]) % n])


def _pick_chunk(data: np.ndarray, index: np.ndarray, axis: int, parts: int) -> np.ndarray:
    """From each core's tile, the ``index``-th of ``parts`` equal slices along tile ``axis``."""
    if parts == 1:
        return data
    axis %= data.ndim
    shape = data.shape
    split = shape[:axis] + (parts, shape[axis] // parts) + shape[axis + 1:]
    grouped = data.reshape(split)
    idx = index.reshape(index.shape + (1,) * (len(split) - 2))
    return np.take_along_axis(grouped, idx, axis=axis).squeeze(axis)


def _batch(a, b) -> tuple:
    """Leading tile dims shared by both operands: a batch of independent products per core."""
    batch = a.tile_shape[:-2]
    if b.tile_shape[:-2] != batch:
        raise ValueError(f"operand batches differ: {a.tile_shape} vs {b.tile_shape}")
    return batch


def _products(plan, a, b, heads, out: str, **operands) -> tuple[tuple, int]:
    """The batch of the output tile and the tile products each core does per step; with a
    :class:`CellMap` ``heads``, the output is batched over ``out`` ("cells" or "entries") and
    the operands are checked against the map."""
    if heads is None:
        batch = _batch(a, b)
        return batch, math.prod(batch)
    heads.check(plan, **operands)
    return (getattr(heads, out),), heads.cells


def _expect_operands(plan, a, b, cells, a_layout: Layout, name: str) -> None:
    """Operands that carry layouts must be where the schedule expects them: A as ``a_layout``,
    B pre-skewed (:meth:`GemmPlan.b_layout`), batched as the products are."""
    a_batch = a.tile_shape[:-2] if cells is None else (a.tile_shape[0],)
    b_batch = b.tile_shape[:-2] if cells is None else (b.tile_shape[0],)
    expect(a, a_layout.batched(*a_batch), f"{name} A")
    expect(b, plan.b_layout().batched(*b_batch), f"{name} B")


def _record_moves(plan, a, b, a_shift=None) -> None:
    """After the L steps, B has moved L - 1 positions along its column ring and (in MeshGEMM)
    A, aligned then stepped, ``a_shift`` along its row ring: their layouts say where the
    tiles now are."""
    steps = plan.chunks - 1
    if b.layout is not None:
        b.layout = plan.rotated(b.layout, -2, "y", -steps)
    if a is not None and a.layout is not None:
        a.layout = plan.rotated(a.layout, -1, "x", a_shift)


def _b_read_in_place(mesh, plan, cells) -> bool:
    """Whether the products can read B's tiles where they started: a numeric run, B's column
    rings inside this rank's block, one K chunk a tile. B's transfers are then timed and
    counted as usual but not copied at each step; B is moved once, at the end."""
    return (not mesh.dry_run and cells is None and plan.ring_y.n > 1 and plan.chunks == plan.rows
            and mesh.block_shape[0] == plan.rows)


@functools.lru_cache(maxsize=64)
def _held_runs(recv: tuple) -> tuple:
    """For each step t of a ring whose row i receives from row ``recv[i]``: the row each row's
    tile started on, after t steps, as an array and as (rows, starting rows) pairs of slices.
    Rows are taken by parity, since a ring's neighbours are 2 rows apart on the interleaved
    ring, whose even and odd rows then make about two runs each."""
    n = len(recv)
    held, steps, helds = np.arange(n), [], []
    for _ in range(n):
        held.flags.writeable = False
        helds.append(held)
        runs = []
        for parity in (0, 1):
            rows = np.arange(parity, n, 2)
            runs += [(slice(int(rows[first]), int(rows[last - 1]) + 1, 2), started)
                     for first, last, started in evenly_spaced_runs(held[rows])]
        steps.append(tuple(runs))
        held = held[list(recv)]
    return tuple(steps), tuple(helds)


def _ring_buffers(mesh, arr, ring: Ring, name: str):
    """The spare buffer a tile moving along ``ring`` is received into, owned by the kernel;
    None on a 1-long line, where the tile never moves."""
    return mesh.alloc(name, arr.tile_shape, arr.dtype) if ring.n > 1 else None


def ring_gemm(mesh, plan: GemmPlan, a, b, name: str = "gemm", cells: CellMap | None = None,
              work: RealWork | None = None):
    """C = A @ B with A natural, B pre-skewed; returns C (natural layout), which the caller owns.

    Tiles may carry leading batch dims (e.g. attention heads): every core multiplies its whole
    batch at each step and every transfer carries the whole batch, one message per step.
    With ``cells``, A's batch is every head's and C's is the core's cells: cell u adds
    ``A[entry(u)] @ B[u // per_slot]`` (see :class:`CellMap`). With ``work``, each core is
    charged its real work (:class:`RealWork`), else its whole tile product.
    The kernel owns and frees its spare buffers; ``a`` and ``b`` stay the caller's (same names,
    same charges), holding the tiles of the last step: A rotated along x, B along y (their
    layouts say so afterwards)."""
    R, C, L = plan.rows, plan.cols, plan.chunks
    tm, tn, s = plan.m_pad // R, plan.n_pad // C, plan.chunk
    batch, products = _products(plan, a, b, cells, "cells", slots=b, entries=a)
    _expect_operands(plan, a, b, cells, plan.a_layout(), name)
    if cells is not None:
        entry = cells.local(mesh)
        valid = (entry >= 0)[None, :, :, None, None]
        pick = (np.arange(entry.shape[0])[:, None], np.maximum(entry, 0))
    rows, cols = mesh.global_rows(), mesh.global_cols()
    charge = work.charger(mesh, plan) if work is not None else (
        lambda step: mesh.compute(2 * tm * s * tn * products, ops=s * products))
    with mesh.phase(f"{name}.align"):
        rotate_lines(mesh, a, "x", plan.ring_x, plan.ring_y.position, f"{name}.a")
    # B read in place: its rows at each step as slices of the rows where its tiles started
    b_still = _b_read_in_place(mesh, plan, cells)
    runs, held = _held_runs(tuple(plan.ring_y.recv().tolist())) if b_still else (None, None)
    moving = [(a, _ring_buffers(mesh, a, plan.ring_x, f"{name}.a.next"),
               mesh.fabric.permutation(f"{name}.shift.x", "x", plan.ring_x.send()), True),
              (b, _ring_buffers(mesh, b, plan.ring_y, f"{name}.b.next"),
               mesh.fabric.permutation(f"{name}.shift.y", "y", plan.ring_y.send()), not b_still)]
    moving = [entry for entry in moving if entry[1] is not None]
    c = mesh.alloc(f"{name}.c", batch + (tm, tn), a.dtype)
    with mesh.phase(f"{name}.compute_shift"):
        for step in range(L):
            last = step == L - 1
            sends = [] if last else [pattern.start(tile, spare, land=land) for tile, spare, pattern, land in moving]
            if not mesh.dry_run:
                label = plan.label_at(rows, cols, step)
                a_part = _pick_chunk(a.data, label // C, -1, L // C)
                if b_still:
                    for rows_now, rows_then in runs[step]:
                        c.data[rows_now] += np.matmul(a_part[rows_now], b.data[rows_then])
                elif cells is None:
                    c.data += np.matmul(a_part, _pick_chunk(b.data, label // R, -2, L // R))
                else:
                    b_part = _pick_chunk(b.data, label // R, -2, L // R)
                    a_cells = np.where(valid, a_part[:, pick[0], pick[1]], 0)
                    c.data += np.matmul(a_cells, b_part[:, :, cells.slot_of_cell()])
            charge(step)
            for transfer in sends:
                transfer.wait()
            if not last:
                for tile, spare, _, land in moving:
                    if land:
                        tile.swap_payload(spare)
            mesh.step(f"step {step}")
    for _, spare, _, _ in moving:
        spare.free()
    if b_still:     # where the L - 1 steps would have left B's tiles
        b.data = b.data[held[L - 1]]
    _record_moves(plan, a, b, a_shift=plan.ring_y.position - (L - 1))
    if cells is None:
        c.layout = plan.c_layout().batched(*batch)
    return c


def ring_gemm_t(mesh, plan: GemmPlan, a, b, name: str = "gemm_t", cells: CellMap | None = None,
                work: RealWork | None = None):
    """C = A @ B^T (PAPER.md §2, GEMM-T), K never transposed on the wafer.

    A (M x K) stays; B (N x K) moves along its column's ring; each core's partial tile of C
    moves along its row's ring, adding ``A_tile @ B_tile^T`` at every core it visits — the
    partials are reduce-added along X. Here ``plan.k`` is the N of C (the labelled dimension)
    and ``plan.n`` is the shared K. A final rotation puts C in its natural layout. Leading
    batch dims of the tiles are independent products, as in :func:`ring_gemm`. With ``cells``,
    A's batch is the core's cells and the partial's every head's: cell u adds
    ``A[u] @ B[u // per_slot]^T`` into ``C[entry(u)]`` (see :class:`CellMap`). ``work``
    charges real work as in :func:`ring_gemm` (its ``k`` is C's labelled columns, its ``cols``
    the shared K). Returns C
    (the caller owns it); the kernel frees its spare buffers and ``b`` stays the caller's.
    """
    R, C, L = plan.rows, plan.cols, plan.chunks
    tm, s = plan.m_pad // R, plan.chunk
    batch, products = _products(plan, a, b, cells, "entries", slots=b, cells=a)
    _expect_operands(plan, a, b, cells, plan.t_a_layout(), name)
    if cells is not None:
        entry = cells.local(mesh)
    rows, cols = mesh.global_rows(), mesh.global_cols()
    charge = work.charger(mesh, plan) if work is not None else (
        lambda step: mesh.compute(2 * tm * s * b.tile_shape[-1] * products, ops=s * products))
    partial = mesh.alloc(f"{name}.c", batch + (tm, (L // C) * s), a.dtype)
    moving = [(partial, _ring_buffers(mesh, partial, plan.ring_x, f"{name}.c.next"),
               mesh.fabric.permutation(f"{name}.shift.x", "x", plan.ring_x.send())),
              (b, _ring_buffers(mesh, b, plan.ring_y, f"{name}.b.next"),
               mesh.fabric.permutation(f"{name}.shift.y", "y", plan.ring_y.send()))]
    moving = [(tile, spare, pattern) for tile, spare, pattern in moving if spare is not None]
    with mesh.phase(f"{name}.compute_shift"):
        for step in range(L):
            if not mesh.dry_run:
                label = plan.label_at(rows, cols, step)
                b_part = _pick_chunk(b.data, label // R, -2, L // R)
                if cells is None:
                    update = np.matmul(a.data, np.swapaxes(b_part, -1, -2))
                    out = partial.data.reshape(partial.data.shape[:-1] + (L // C, s))
                    idx = (label // C).reshape(label.shape + (1,) * (out.ndim - 2))
                    current = np.take_along_axis(out, idx, axis=out.ndim - 2)
                    np.put_along_axis(out, idx, current + update[..., None, :], axis=out.ndim - 2)
                else:   # square: the partial holds one chunk
                    b_cells = b_part[:, :, cells.slot_of_cell()]
                    update = np.matmul(a.data, np.swapaxes(b_cells, -1, -2))
                    for u in range(cells.cells):
                        where = np.flatnonzero(entry[:, u] >= 0)
                        partial.data[:, where, entry[where, u]] += update[:, where, u]
            charge(step)
            if step < L - 1:
                sends = [pattern.start(tile, spare) for tile, spare, pattern in moving]
                for transfer in sends:
                    transfer.wait()
                for tile, spare, _ in moving:
                    tile.swap_payload(spare)
            mesh.step(f"step {step}")
    for _, spare, _ in moving:
        spare.free()
    with mesh.phase(f"{name}.realign"):
        # partial group at x-ring position x is x + pos_y(i) (+ the L-1 steps taken): move it home.
        steps = -(plan.ring_y.position - (L - 1))
        rotate_lines(mesh, partial, "x", plan.ring_x, steps, f"{name}.c")
    _record_moves(plan, None, b)
    if cells is None:
        partial.layout = plan.t_c_layout().batched(*batch)
    return partial


class MeshGemm:
    """MeshGEMM as a plan (PAPER.md §2): the rings, sizes, operand layouts, head cells and
    real-work charge of one product shape, built once and called for every operand pair of
    that shape (prefill holds one per weight for a run). ``transposed``: GEMM-T, C = A @ B^T
    with B (k x n) here the N x K operand. ``algo="cannon"``: the plain ring.

    ``__call__(a, b, name)`` checks the operands' layouts, returns C with its layout and leaves
    A and B where the schedule moved them (their layouts say so); it frees only its spares."""

    def __init__(self, mesh, m: int, k: int, n: int, *, algo: str = "meshgemm", transposed: bool = False,
                 cells: CellMap | None = None, work: RealWork | None = None, name: str = "gemm"):
        self.mesh, self.transposed, self.cells, self.work, self.name = mesh, transposed, cells, work, name
        self.plan = GemmPlan.build(algo, mesh.rows, mesh.cols, m, k, n)

    @property
    def a_layout(self) -> Layout:
        return self.plan.t_a_layout() if self.transposed else self.plan.a_layout()

    @property
    def b_layout(self) -> Layout:
        return self.plan.b_layout()

    @property
    def c_layout(self) -> Layout:
        return self.plan.t_c_layout() if self.transposed else self.plan.c_layout()

    def __call__(self, a, b, name: str | None = None):
        run = ring_gemm_t if self.transposed else ring_gemm
        return run(self.mesh, self.plan, a, b, name=name or self.name, cells=self.cells, work=self.work)
