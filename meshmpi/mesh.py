"""The emulated wafer: a ``rows x cols`` grid of cores laid over a 2-D Cartesian communicator.

Each rank owns one rectangular block of cores. Blocks may be uneven: the first
``rows % ranks_y`` rank rows own one more row than the rest (likewise for columns); a rank
grid with more ranks than cores along an axis is an error. Per-core state (modeled clock,
counters, resident memory) is one numpy array per rank of the block's shape, so an operation
on all cores is one vectorised call. No result or modeled number depends on the split.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from contextlib import contextmanager

import numba
import numpy as np
from mpi4py import MPI

from . import costs
from .array import MeshArray
from .errors import UsageError
from .hardware import Hardware, load_hardware
from .links import NeighbourLinks
from .memory import MemoryLedger
from .routes import RouteTable
from .timeline import Timeline

COUNTERS = ("bytes_sent", "bytes_recv", "messages_sent", "hops", "byte_hops", "relays", "flops")


def keep_freed_memory() -> None:
    """Ask glibc's allocator to keep freed blocks for reuse instead of returning them to the
    system: a fabric step allocates and frees block-sized temporaries, and giving them back
    costs a page fault per page on the next step (system time rivalling the arithmetic)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_mmap_threshold, 1 << 25)     # glibc's largest (32 MiB on 64-bit)


@numba.njit(cache=True, nogil=True)
def _charge(clock, advance_clock, busy, flop_counter, where, flops, cycles) -> int:
    """On each core of ``where``: its ``cycles`` added to its busy time (and clock), its
    ``flops`` to its count (block arrays, a scalar's as a broadcast view); returns the block's
    FLOPs."""
    total = 0
    rows, cols = where.shape
    for i in range(rows):
        for j in range(cols):
            if where[i, j]:
                if advance_clock:
                    clock[i, j] += cycles[i, j]
                busy[i, j] += cycles[i, j]
                flop_counter[i, j] += flops[i, j]
                total += flops[i, j]
    return total


_MOST_RUNS = 4      # positions in more evenly spaced runs than this are indexed by one array


def evenly_spaced_runs(values: np.ndarray) -> list[tuple[int, int, slice]]:
    """``values`` (distinct non-negative integers) cut into maximal runs of one step: per run,
    its first and past-the-end indices in ``values`` and the slice that picks its values, in
    order, out of ``arange`` (a view of a run of cores, rows, ...)."""
    runs, first = [], 0
    while first < values.size:
        last = first + 1
        step = int(values[last] - values[first]) if last < values.size else 1
        while last < values.size and values[last] - values[last - 1] == step:
            last += 1
        stop = int(values[last - 1]) + step
        runs.append((first, last, slice(int(values[first]), stop if stop >= 0 else None, step)))
        first = last
    return runs


def _scalar(value) -> bool:
    """A plain number (or a 0-d array), without numpy's conversion of ``np.ndim``."""
    return isinstance(value, (int, float, np.generic)) or np.ndim(value) == 0


def block_offsets(length: int, parts: int) -> np.ndarray:
    """Start of each of ``parts`` blocks over ``length`` cores, plus the end (uneven split)."""
    sizes = np.full(parts, length // parts, np.int64)
    sizes[: length % parts] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def choose_rank_grid(size: int, rows: int, cols: int) -> tuple[int, int]:
    """The factorisation ``ry * rx == size`` that fits the mesh with the squarest blocks."""
    best = None
    for ry in range(1, size + 1):
        if size % ry:
            continue
        rx = size // ry
        if ry > rows or rx > cols:
            continue
        block_y, block_x = -(-rows // ry), -(-cols // rx)
        score = (block_y + block_x, abs(block_y - block_x))  # halo perimeter, then squareness
        if best is None or score < best[0]:
            best = (score, (ry, rx))
    if best is None:
        raise UsageError(f"{size} ranks cannot be laid over a {rows}x{cols} mesh "
                         f"(at most one rank per core along each axis)")
    return best[1]


def parse_grid(text: str, what: str = "mesh") -> tuple[int, int]:
    """Parse ``ROWSxCOLS``."""
    parts = str(text).lower().split("x")
    try:
        rows, cols = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--{what} expects ROWSxCOLS like 4x4, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise UsageError(f"--{what} needs positive sizes, got {text!r}")
    return rows, cols


class Mesh:
    """A virtual core grid over MPI ranks, with modeled clocks and PLMR accounting.

    Parameters mirror the command-line options: ``dry_run`` drops payloads (shapes only);
    ``memory`` and ``routes`` are ``"strict"`` (raise) or ``"warn"`` (record, continue);
    ``hazard_checks`` also catches writes to a transfer's source before its ``wait`` (it copies
    every payload; default: on when the environment sets ``MESHMPI_HAZARD_CHECKS=1``);
    ``defects``: the logical-to-physical map of a wafer with dead cores
    (:class:`meshmpi.defects.Remap` of this mesh's shape; None: a perfect wafer).
    """

    def __init__(self, rows: int, cols: int, hardware: Hardware | None = None, *,
                 comm: MPI.Comm | None = None, rank_grid: tuple[int, int] | None = None,
                 dry_run: bool = False, memory: str = "strict", routes: str = "strict",
                 hazard_checks: bool | None = None, defects=None):
        self.rows, self.cols = int(rows), int(cols)
        if self.rows < 1 or self.cols < 1:
            raise UsageError(f"mesh must be at least 1x1, got {rows}x{cols}")
        if defects is not None and (defects.rows, defects.cols) != (self.rows, self.cols):
            raise ValueError(f"a defect map of a {defects.rows}x{defects.cols} mesh on a {rows}x{cols} one")
        self.defects = defects
        self.hardware = hardware or load_hardware("wse2")
        keep_freed_memory()
        self.dry_run = bool(dry_run)
        world = comm or MPI.COMM_WORLD
        if rank_grid is None:
            rank_grid = choose_rank_grid(world.Get_size(), self.rows, self.cols)
        ry, rx = rank_grid
        if ry * rx != world.Get_size():
            raise UsageError(f"rank grid {ry}x{rx} needs {ry * rx} ranks, the job has {world.Get_size()}")
        if ry > self.rows or rx > self.cols:
            raise UsageError(f"rank grid {ry}x{rx} has more ranks than cores along an axis of the "
                             f"{self.rows}x{self.cols} mesh")
        self.rank_grid = (ry, rx)
        self.cart = world.Create_cart([ry, rx], periods=[False, False], reorder=False)
        self.rank, self.size = self.cart.Get_rank(), self.cart.Get_size()
        self.coords = tuple(self.cart.Get_coords(self.rank))
        self.offsets = {"y": block_offsets(self.rows, ry), "x": block_offsets(self.cols, rx)}
        self.row_start, self.row_stop = (int(v) for v in self.offsets["y"][self.coords[0]:self.coords[0] + 2])
        self.col_start, self.col_stop = (int(v) for v in self.offsets["x"][self.coords[1]:self.coords[1] + 2])
        self.block_shape = (self.row_stop - self.row_start, self.col_stop - self.col_start)
        self.links = NeighbourLinks(self.cart)

        self.clock = np.zeros(self.block_shape, np.float64)
        self.busy = np.zeros(self.block_shape, np.float64)
        # Per-core counters, plus additions not yet applied: a count per position along each
        # axis for every line (most transfers; kept per pattern and tile size as a number of
        # starts, then summed per position), per-position counts times how often each line
        # took them (transfers on some lines) and one count for every core (most compute),
        # applied when the counters are read; ``totals`` are their sums over this block, exact.
        self._counters = {name: np.zeros(self.block_shape, np.int64) for name in COUNTERS}
        self._per_position = {"y": np.zeros((len(COUNTERS), self.block_shape[0]), np.int64),
                              "x": np.zeros((len(COUNTERS), self.block_shape[1]), np.int64)}
        self._per_line = {"y": {}, "x": {}}
        self._per_start = {"y": {}, "x": {}}
        self._masks = {}     # positions_mask's masks and positions_runs' indices, by axis and positions
        self._cycles_of = {}   # a core's FLOPs and cycles (block views), by its FLOPs and vector operations
        self._every_core_mask = np.broadcast_to(True, self.block_shape)
        self._every_core = dict.fromkeys(COUNTERS, 0)
        self.totals = dict.fromkeys(COUNTERS, 0)
        self.max_hops = 0
        self.memory = MemoryLedger(self, self.hardware.sram_bytes_per_core, memory)
        self.routes = RouteTable(self, self.hardware.routes_per_core, routes)
        self.timeline = Timeline(self)
        from .fabric import Fabric  # the fabric needs a finished mesh
        if hazard_checks is None:
            hazard_checks = os.environ.get("MESHMPI_HAZARD_CHECKS", "") not in ("", "0")
        self.fabric = Fabric(self, hazard_checks=bool(hazard_checks))

    # ------------------------------------------------------------------ geometry
    def axis_start(self, axis: str) -> int:
        return self.col_start if axis == "x" else self.row_start

    def axis_length(self, axis: str) -> int:
        return self.cols if axis == "x" else self.rows

    def axis_lines(self, axis: str) -> tuple[int, int]:
        """This block's first and last-plus-one line of the lines along ``axis`` (rows for x)."""
        return (self.row_start, self.row_stop) if axis == "x" else (self.col_start, self.col_stop)

    def rank_coord(self, axis: str) -> int:
        return self.coords[1] if axis == "x" else self.coords[0]

    def owns(self, core) -> bool:
        r, c = core
        return self.row_start <= r < self.row_stop and self.col_start <= c < self.col_stop

    def to_local(self, core):
        return core[0] - self.row_start, core[1] - self.col_start

    def global_rows(self) -> np.ndarray:
        return np.arange(self.row_start, self.row_stop)

    def global_cols(self) -> np.ndarray:
        return np.arange(self.col_start, self.col_stop)

    # ------------------------------------------------------------------ host-plane agreement
    def first_core_where(self, mask: np.ndarray):
        """The first (row-major) core of the whole mesh where ``mask`` holds, agreed by all ranks."""
        local = np.flatnonzero(mask)
        big = self.rows * self.cols
        if local.size:
            r, c = divmod(int(local[0]), self.block_shape[1])
            mine = (r + self.row_start) * self.cols + c + self.col_start
        else:
            mine = big
        first = self.cart.allreduce(mine, op=MPI.MIN)
        return None if first == big else divmod(first, self.cols)

    def value_at(self, core, compute):
        """A small tuple computed on the rank that owns ``core``, given to every rank."""
        owner = self.cart.Get_cart_rank([int(np.searchsorted(self.offsets["y"], core[0], "right") - 1),
                                         int(np.searchsorted(self.offsets["x"], core[1], "right") - 1)])
        return self.cart.bcast(compute() if self.rank == owner else None, root=owner)

    def say(self, message: str) -> None:
        """Print once (rank 0) to stderr."""
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ counters
    @property
    def counters(self) -> dict[str, np.ndarray]:
        """This block's per-core counters (block-shaped int64 arrays), by name."""
        for name, target in self._counters.items():
            if self._every_core[name]:
                target += self._every_core[name]
                self._every_core[name] = 0
        for axis, pending in self._per_position.items():
            for rows, per_position, times in self._per_start[axis].values():
                pending[rows] += times[0] * per_position
            self._per_start[axis].clear()
            for row in np.flatnonzero(pending.any(axis=1)):
                target = self._counters[COUNTERS[row]]
                target += pending[row][None, :] if axis == "x" else pending[row][:, None]
            pending[:] = 0
        for axis, pending in self._per_line.items():
            for rows, per_position, times in pending.values():
                for row, values in zip(rows.tolist(), per_position):
                    outer = np.outer(times, values) if axis == "x" else np.outer(values, times)
                    self._counters[COUNTERS[row]] += outer
            pending.clear()
        return self._counters

    def count_along(self, rows: np.ndarray, axis: str, per_position: np.ndarray, line_mask: np.ndarray,
                    lines: int, sums) -> None:
        """Add ``per_position[i]`` (this block's positions along ``axis``) to the counter
        ``COUNTERS[rows[i]]`` on the ``lines`` active lines of ``line_mask`` (over this block's
        lines); ``sums`` pairs each counter's name with ``per_position[i].sum()``."""
        if lines == line_mask.size:       # counted per start, added up when the counters are read
            pending = self._per_start[axis]
            key = id(per_position)          # the entry holds the array: its id is not reused meanwhile
            if key not in pending:
                pending[key] = (rows, per_position, [0])
            pending[key][2][0] += 1
        elif lines:
            self.count_lines(rows, axis, per_position, line_mask, sums)
            return
        totals = self.totals
        for name, total in sums:
            totals[name] += total * lines

    def count_lines(self, rows: np.ndarray, axis: str, per_position: np.ndarray, times: np.ndarray, sums) -> None:
        """:meth:`count_along` ``times[l]`` times on each of this block's lines ``l`` (a count
        per line, or a mask)."""
        pending = self._per_line[axis]
        key = (rows.tobytes(), per_position.tobytes())
        if key not in pending:
            pending[key] = (rows, per_position.copy(), np.zeros(times.size, np.int64))
        pending[key][2][:] += times
        lines = int(times.sum())
        totals = self.totals
        for name, total in sums:
            totals[name] += total * lines

    def count_cores(self, name: str, values: np.ndarray, axis: str) -> None:
        """Add ``values`` ([this block's positions along ``axis``, lines]) to counter ``name``."""
        self._counters[name] += values.T if axis == "x" else values
        self.totals[name] += int(values.sum())

    # ------------------------------------------------------------------ arrays and compute
    def alloc(self, name: str, tile_shape, dtype=np.float32, fill: float | None = 0.0,
              charge: bool = True) -> MeshArray:
        """A named buffer with one tile per core, charged to every core's memory (unless the
        caller accounts for it under another name: ``charge=False``)."""
        tile_shape = tuple(int(s) for s in np.atleast_1d(tile_shape)) if tile_shape != () else ()
        arr = MeshArray(self, name, tile_shape, np.dtype(dtype))
        if charge:
            self.memory.charge(name, arr.tile_bytes)
        if not self.dry_run:
            shape = self.block_shape + tile_shape
            arr.data = np.zeros(shape, dtype) if fill == 0.0 else (
                np.empty(shape, dtype) if fill is None else np.full(shape, fill, dtype))
        return arr

    def local(self, flops, work=None, out: MeshArray | None = None, *, ops=1, scalars=0, where=None,
              advance_clock: bool = True):
        """Local work on every core, in one place: in a numeric run ``work()`` runs on the
        payloads (its result, if ``out`` is given, lands in ``out``'s tiles) and is returned; in
        a dry run it is skipped and None returned. Either way each core is charged ``flops``,
        ``ops`` vector and ``scalars`` scalar operations (:meth:`compute`; the FLOP counts of
        the model's operators are tables, e.g. ``llm/flops.py``)."""
        result = None
        if work is not None and not self.dry_run:
            result = work()
            if out is not None:
                out.data[...] = result
        self.compute(flops, where, advance_clock, ops, scalars)
        return result

    def compute(self, flops, where=None, advance_clock: bool = True, ops: int = 1, scalars: int = 0,
                cycles: np.ndarray | None = None) -> None:
        """Charge ``flops`` (scalar or block-shaped) of local work to each core: its FLOP count,
        its busy cycles and (unless the work overlaps a transfer the caller times itself,
        ``advance_clock=False``) its clock. The work takes ``ops`` vector operations and
        ``scalars`` scalar ones (counts, scalar or block-shaped), each with its fixed start cost
        (:func:`meshmpi.costs.compute`), on the cores that do any of it. A caller charging
        block-shaped work at every step may pass its ``cycles``, worked out by those rules."""
        if cycles is not None:
            self.totals["flops"] += _charge(self.clock, advance_clock, self.busy, self._counters["flops"],
                                            self._every_core_mask, flops, cycles)
            return
        scalar = _scalar(flops) and _scalar(ops) and _scalar(scalars)
        if where is not None and scalar and not scalars:
            if flops > 0:    # the same work on every masked core, in one compiled pass
                per_core = self._cycles_of.get((flops, ops))
                if per_core is None:     # each core's FLOPs and cycles, as block-shaped views
                    cycles = float(costs.compute(self.hardware, np.int64(flops), ops))
                    per_core = self._cycles_of[flops, ops] = (np.broadcast_to(np.int64(flops), self.block_shape),
                                                              np.broadcast_to(cycles, self.block_shape))
                if not (isinstance(where, np.ndarray) and where.shape == self.block_shape and where.dtype == bool):
                    where = np.broadcast_to(np.asarray(where).astype(bool), self.block_shape)
                self.totals["flops"] += _charge(self.clock, advance_clock, self.busy, self._counters["flops"], where,
                                                *per_core)
            return
        if where is None and scalar:  # no block temporaries
            if not flops and not scalars:
                return
            cycles = float(costs.compute(self.hardware, float(flops), ops, scalars))
            if advance_clock:
                self.clock += cycles
            self.busy += cycles
            self._every_core["flops"] += int(flops)
            self.totals["flops"] += int(flops) * self.clock.size
            return
        flops = np.broadcast_to(np.asarray(flops, np.int64), self.block_shape)
        if where is not None:
            flops = np.where(where, flops, 0)
        working = flops > 0 if _scalar(scalars) and not scalars else (flops > 0) | (np.asarray(scalars) > 0)
        if where is not None:
            working &= where
        cycles = np.where(working, costs.compute(self.hardware, flops, ops, scalars), 0.0)
        if advance_clock:
            self.clock += cycles
        self.busy += cycles
        self._counters["flops"] += flops
        self.totals["flops"] += int(flops.sum())

    def charged_per_core(self, axis: str) -> tuple:
        """Each core's busy cycles, FLOP count and relay count, as writable views with the
        positions along ``axis`` first: for a compiled caller that charges cores exactly as
        :meth:`compute` and :meth:`software_stage` do, in bulk (it adds to :attr:`totals`)."""
        arrays = (self.busy, self._counters["flops"], self._counters["relays"])
        return tuple(a.T if axis == "x" else a for a in arrays)

    def software_stage(self, where=None, advance_clock: bool = True) -> None:
        """One software step of a multi-stage collective (receive, combine, forward) on the
        masked cores: ``beta`` cycles each (unless the caller times it), counted as a relay
        (PAPER.md §1, L)."""
        if where is None:
            if advance_clock:
                self.clock += costs.software_stage(self.hardware)
            self._every_core["relays"] += 1
            self.totals["relays"] += self.clock.size
            return
        mask = np.asarray(where, bool)
        if advance_clock:
            self.clock[mask] += costs.software_stage(self.hardware)
        self._counters["relays"] += mask
        self.totals["relays"] += int(np.count_nonzero(mask))

    def charge_stage_along(self, axis: str, runs, flops: int) -> None:
        """:meth:`compute` of ``flops`` (one vector operation) and :meth:`software_stage` on the
        cores at the local positions ``runs`` along ``axis`` (:meth:`positions_runs`) of every
        line, their clocks left to the caller: the same charges, without a block-sized mask."""
        cycles = float(costs.compute(self.hardware, np.int64(flops), 1))
        busy, flop_counter, relays = self.busy, self._counters["flops"], self._counters["relays"]
        length, lines = self.block_shape[::-1] if axis == "x" else self.block_shape
        cores = 0
        for index in runs:
            at = (slice(None), index) if axis == "x" else (index,)
            if flops > 0:
                busy[at] += cycles
                flop_counter[at] += flops
            relays[at] += 1
            cores += lines * (len(range(*index.indices(length))) if isinstance(index, slice) else index.size)
        self.totals["flops"] += max(flops, 0) * cores
        self.totals["relays"] += cores

    def positions_mask(self, axis: str, positions) -> np.ndarray:
        """Block-shaped mask of the cores whose position along ``axis`` is in ``positions``
        (read-only: one array per position set, made once)."""
        positions = np.asarray(positions, np.int64)
        key = (axis, positions.tobytes())
        mask = self._masks.get(key)
        if mask is None:
            local = self.global_cols() if axis == "x" else self.global_rows()
            on_line = np.zeros(self.axis_length(axis), bool)
            on_line[positions] = True
            hit = on_line[local]
            mask = np.zeros(self.block_shape, bool)
            if axis == "x":
                mask[:, hit] = True
            else:
                mask[hit, :] = True
            mask.flags.writeable = False
            self._masks[key] = mask
        return mask

    def positions_runs(self, axis: str, positions) -> tuple:
        """This block's local indices along ``axis`` of the global ``positions`` it holds (in
        increasing order), as the slices of their evenly spaced runs (views, no copy) when
        there are at most :data:`_MOST_RUNS` of them, else as one index array; empty if it
        holds none (made once per position set)."""
        positions = np.asarray(positions, np.int64)
        key = ("runs", axis, positions.tobytes())
        if key not in self._masks:
            local = positions - self.axis_start(axis)
            local = np.sort(local[(local >= 0) & (local < self.block_shape[1 if axis == "x" else 0])])
            runs = [run for _, _, run in evenly_spaced_runs(local)]
            self._masks[key] = tuple(runs) if len(runs) <= _MOST_RUNS else (local,)
        return self._masks[key]

    def matmul_acc(self, out: MeshArray, a: MeshArray, b: MeshArray, transpose_b: bool = False) -> None:
        """out += a @ b (or a @ b.T) on every core, charged 2*m*k*n FLOPs per core."""
        m, k = a.tile_shape[-2:]
        n = b.tile_shape[-2] if transpose_b else b.tile_shape[-1]
        if not self.dry_run:
            rhs = np.swapaxes(b.data, -1, -2) if transpose_b else b.data
            out.data += np.matmul(a.data, rhs)
        self.compute(2 * m * k * n, ops=k)

    # ------------------------------------------------------------------ clocks and phases
    def modeled_cycles(self) -> float:
        """The mesh's critical path so far: the latest clock of any core."""
        local = float(self.clock.max()) if self.clock.size else 0.0
        return self.cart.allreduce(local, op=MPI.MAX)

    def busy_cycles(self) -> float:
        """The most compute cycles any core has done."""
        local = float(self.busy.max()) if self.busy.size else 0.0
        return self.cart.allreduce(local, op=MPI.MAX)

    @contextmanager
    def phase(self, name: str):
        """Record a named phase (modeled start/end, wall time, traffic) in the timeline."""
        self.timeline.begin(name)
        try:
            yield
        finally:
            self.timeline.end()

    def step(self, label: str = "") -> None:
        """Mark the end of one step of the current phase (for per-step critical paths)."""
        self.timeline.step(label)

    def wall_time(self) -> float:
        return time.perf_counter()

    def barrier(self) -> None:
        self.cart.Barrier()

    def max_over_ranks(self, value: float) -> float:
        return self.cart.allreduce(value, op=MPI.MAX)

    def sum_over_ranks(self, value):
        return self.cart.allreduce(value, op=MPI.SUM)

    def free(self) -> None:
        self.cart.Free()
