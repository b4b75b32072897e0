"""The systems WaferLLM is compared with, as GEMV operators on the same mesh (PAPER.md §8).

Each computes y = x @ W (x is 1 x m, W is m x n) the way that system maps it, with the same
fabric and cost model as MeshGEMV (§3). All three partition the output columns 1-D over a
linear order of cores, so they use at most n cores: the *used region* is the first
``ceil(n / cols)`` rows (whole rows, at most the mesh), each used core owning
``w = ceil(n / used cores)`` columns (zero-padded, as MeshGEMV pads). At paper scale
n < rows x cols, so most of the wafer idles: the conflict with P the paper names.

``megatron`` — Megatron-LM column-parallel tensor parallelism. Mapping: the used cores in
*snake* order (row 0 left to right, row 1 right to left, ...), so consecutive cores are always
1 hop apart (row-major order would put a C-1-hop jump at every row end; the snake is the best
1-D order a mesh offers). Core k owns W[:, k·w:(k+1)·w] (contiguous) and needs the whole x: x
arrives whole on the snake's first core and is broadcast down the snake as a software chain
that streams (each core keeps a copy and forwards it as it passes, β per core, the payload
once, as the project's chains do; an all-gather over the same order has the same
(P-1)-stage critical path and was not modelled separately). Then each core does its local
GEMV; y is left 1-D partitioned in snake order. Pays: L — (used cores − 1)·(α + β) on the
critical path; M — x whole plus m·w of W on every core (over 48 KB from 16K on); P — n
cores at most, each doing m·w multiply-adds; R — 1-hop routes only (3 per core).

``ladder`` — the distributed SRAM as one unified memory, "one-hop memory (all-to-all), 1D
partition". Mapping: the tensors are laid out contiguously in row-major core order over the
used cores: core q holds x[q·h:(q+1)·h] and W's rows q·h..(q+1)·h (h = ceil(m / used); when
m < used cores only the first rows of cores hold any, the last of them padded); the
compute is partitioned by output columns (core b computes y[b·w:(b+1)·w]), so every core
fetches x_q and W[q rows, b cols] from every core q — an all-to-all issued at once, as if every
access were one hop. On the mesh a fetch is routed X then Y: the x leg is C−1 rotations of
the rows (offset 1..C−1, the wrap going the long way back), all in flight together, then the y
leg is the same along the columns; the corner core forwards in software. Choice the paper
leaves open: one message per (holder, consumer column) on the x leg and per (corner,
consumer) on the y leg — the emulator's patterns are per axis, so per-pair messages are
aggregated where they share a path (this favours Ladder: fewer start costs). Routes: a direct
pass-through route per message needs O(C) routes per router, far over the profile; ``routing=
"relay"`` (the default, what a port must do) forwards every long message hop by hop in
software on shared 1-hop routes; ``"direct"`` requests the routes and raises under strict
route limits. Pays: L — the whole W crosses the mesh (bisection-bound) and every hop of a
relayed fetch costs α + β; M — the fetched operands (x and m·w of W) duplicated on every
consumer; R — O(C) routes direct, else relays; P — n cores at most.

``t10`` — T10's compute-shift plan, cores addressed by id as on the IPU's crossbar. Mapping:
row-major core ids over the used cores; core k owns W[:, k·w:(k+1)·w] resident; x is split in
p chunks that rotate around rings of p consecutive ids (chunk i starts on ring position i), so
after p steps every core has seen all of x; each step multiplies the chunk held against the
matching rows of the resident W while the next shift is in flight (double-buffered). Choices:
the partition is T10's — 1-D over the output columns, so at most n cores (coarser than the
mesh, P); the ring size p is what T10's constant-latency cost model picks: the fewest shifts
(p·(start + crossbar hop) grows with p, the bytes moved do not) whose buffers fit the core's
memory (resident W + two chunks + y), among ring sizes that tile the rows (divisors of the row
length, then whole rows); when W's columns alone overflow a core (32K on 512²), the fewest
shifts whose two chunks alone would fit; ``ring=`` overrides it. On the mesh the id-neighbour of a ring's
last core is its first: a wrap edge of p−1 hops inside a row, or, for rings of k whole rows,
a row-end jump of C−1 hops back plus one down (and k−1 up for the wrap), taken on
pass-through routes with a software relay where the path turns. Pays: L — every step waits
for its longest (wrap) edge; P — n cores at most; M — satisfied by choosing p (the 32K case
does not fit even at w = 1); R — a few pass-through routes per core.

GEMM (prefill, PAPER.md §2/§8): C = A @ B with A (T x m) activations and B (m x n) weights,
each system mapped as for the GEMV, the T rows of A riding with x: Megatron-LM broadcasts the
whole of A down the snake (column-parallel; a row-parallel GEMM sums T x n partials up it, see
:mod:`llm.strategies.megatron`), Ladder's holders keep A's columns q·h..(q+1)·h of every row
(T·h values) beside W's rows and every fetch carries them, T10's chunks are A's column chunks of
every row, and its ring is chosen with two T-row chunks and a T-row output in the memory fit.
The partition stays 1-D over the output columns: B's columns set how many cores work, however
many tokens there are (P). A core's local product charges the GEMV's vector operations, each
T times as long, as MeshGEMM charges one per K row of a whole tile (favouring none).
"""
from __future__ import annotations

import numpy as np

from meshmpi import costs, host

STRATEGIES = ("megatron", "ladder", "t10")
ROUTING = ("relay", "direct")


class Plan:
    """The used region and partition shared by the three strategies (module docstring)."""

    def __init__(self, rows: int, cols: int, m: int, n: int):
        self.rows, self.cols, self.m, self.n = rows, cols, m, n
        self.used_rows = min(rows, -(-n // cols))
        self.used = self.used_rows * cols
        self.width = -(-n // self.used)                 # output columns per used core (w)
        self.n_pad = self.width * self.used

    def ladder_holders(self) -> tuple[int, int]:
        """(h, holder rows): Ladder's x and W rows, h per core in row-major order, fill the
        first ``holder rows`` rows of cores (the last one padded)."""
        h = -(-self.m // self.used)
        return h, -(-(-(-self.m // h)) // self.cols)

    def snake(self) -> np.ndarray:
        """[used_rows, cols] -> position of each core in snake order."""
        index = np.arange(self.used).reshape(self.used_rows, self.cols)
        index[1::2] = index[1::2, ::-1]
        return index

    def row_major(self) -> np.ndarray:
        return np.arange(self.used).reshape(self.used_rows, self.cols)

    def column_tiles(self, w_mat: np.ndarray, order: np.ndarray, m_pad: int) -> np.ndarray:
        """(rows, cols, m_pad, w): core at order position k holds W[:, k·w:(k+1)·w]; cores
        outside the used region hold zeros."""
        padded = host.pad_to(w_mat, m_pad, self.n_pad)
        slices = padded.reshape(m_pad, self.used, self.width).transpose(1, 0, 2)
        tiles = np.zeros((self.rows, self.cols, m_pad, self.width), w_mat.dtype)
        tiles[: self.used_rows] = slices[order]
        return tiles

    def read_columns(self, y_tiles: np.ndarray, order: np.ndarray) -> np.ndarray:
        """y back from (rows, cols, w) tiles partitioned in ``order``; a GEMM's C (T x n) from
        (rows, cols, T, w) tiles."""
        per_core = y_tiles.shape[2:]
        flat = np.empty((self.used,) + per_core, y_tiles.dtype)
        flat[order.ravel()] = y_tiles[: self.used_rows].reshape((self.used,) + per_core)
        return np.moveaxis(flat, 0, -2).reshape(per_core[:-1] + (-1,))[..., : self.n]


def used_mask(mesh, plan: Plan) -> np.ndarray:
    """This rank's block: True on the cores of the used region."""
    return np.broadcast_to((mesh.global_rows() < plan.used_rows)[:, None], mesh.block_shape)


def vector_ops(rows: int, width: int) -> int:
    """Vector operations of a rows x width local GEMV done the cheaper way: one multiply-add
    per x element over the row of W (MeshGEMV's way), or one dot product per output column."""
    return min(rows, width)


def tokens_of(x) -> int:
    """Rows of the operand: 1 for a GEMV's vector tile ``(m,)``, T for a GEMM's ``(T, m)``."""
    return x.tile_shape[0] if len(x.tile_shape) == 2 else 1


def output_shape(x, width: int) -> tuple:
    """The output tile: ``(width,)`` for a GEMV, ``(T, width)`` for a GEMM."""
    return x.tile_shape[:-1] + (width,)


def _times(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per core, x @ w for a vector (``x`` one dimension short of ``w``) or a matrix x."""
    return np.matmul(x[..., None, :], w)[..., 0, :] if x.ndim == w.ndim - 1 else np.matmul(x, w)


def _local_gemv(mesh, plan, y, x_full, w_cols, where) -> None:
    """y = x · W_cols on the used cores (a GEMV, or a GEMM of T rows: its vector operations
    are the GEMV's, each T times as long, as MeshGEMM's hold a whole tile of rows)."""
    rows = x_full.tile_shape[-1]
    if not mesh.dry_run:
        y.data[...] = _times(x_full.data, w_cols.data)
    mesh.compute(2 * tokens_of(x_full) * rows * plan.width, where=where, ops=vector_ops(rows, plan.width))


# ---------------------------------------------------------------------------- Megatron
def megatron_broadcast(mesh, plan: Plan, x) -> None:
    """Broadcast x from the snake's first core down the snake as one streaming software chain:
    a relayed multicast along each row from the core the snake enters it by, and a 1-hop turn
    into the next row; heads are timed alone and the payload is paid once (PAPER.md §3's
    streaming chains), so stage k's head is at k·(α + β)."""
    fabric, hw, cols = mesh.fabric, mesh.hardware, plan.cols
    head = mesh.clock.copy()
    involved = used_mask(mesh, plan).copy()
    row_of = mesh.global_rows()[:, None]
    col_of = mesh.global_cols()[None, :]
    for row in range(plan.used_rows):
        entry = 0 if row % 2 == 0 else cols - 1
        if cols > 1:
            chain = fabric.multicast(f"megatron.row.{entry}", "x", entry, relay=True, group="megatron.row")
            arrived = np.full(mesh.block_shape, -np.inf)
            chain.start(x, lines=[row], depart=head, payload=False).wait(into=arrived)
            here = (row_of == row) & (col_of != entry)
            head = np.where(here, costs.streaming_stage_head(hw, arrived, head), head)
        if row + 1 < plan.used_rows:
            exit_col = cols - 1 - entry
            turn = fabric.plan(f"megatron.turn.{row % 2}", "y", [row], [row + 1], group="megatron.turn")
            arrived = np.full(mesh.block_shape, -np.inf)
            turn.start(x, lines=[exit_col], depart=head, payload=False).wait(into=arrived)
            here = (row_of == row + 1) & (col_of == exit_col)
            head = np.where(here, costs.streaming_stage_head(hw, arrived, head), head)
        mesh.step(f"row {row}")
    done = head + costs.streamed_payload(hw, x.tile_bytes)
    np.maximum(mesh.clock, np.where(involved, done, -np.inf), out=mesh.clock)


def megatron(mesh, plan: Plan, x, w, name: str = "megatron"):
    """Column-parallel GEMV: broadcast x down the snake, then local GEMVs (module docstring)."""
    with mesh.phase(f"{name}.broadcast"):
        megatron_broadcast(mesh, plan, x)
    y = mesh.alloc(f"{name}.y", output_shape(x, plan.width), x.dtype)
    with mesh.phase(f"{name}.local"):
        _local_gemv(mesh, plan, y, x, w, used_mask(mesh, plan))
    return y


# ---------------------------------------------------------------------------- Ladder
def _rotations(mesh, name, axis, length, senders, lines, send_of, tile, dtype, routing):
    """Rotate along ``axis`` by every offset 1..length-1 at once (all in flight together):
    position i < ``senders`` sends ``send_of(offset)`` to (i + offset) mod length. Returns the
    received tiles per offset."""
    fabric, relay = mesh.fabric, routing == "relay"
    received, transfers = {}, []
    positions = np.arange(mesh.axis_length(axis))
    for offset in range(1, length):
        dest = np.where(positions < senders, (positions + offset) % length, -1)
        pattern = fabric.permutation(f"{name}.{axis}.{offset}", axis, dest, relay=relay,
                                     group=f"{name}.{axis}" if relay else None)
        source = mesh.alloc(f"{name}.{axis}.send.{offset}", tile, dtype, charge=False)
        if not mesh.dry_run:
            source.data[...] = send_of(offset)
        received[offset] = mesh.alloc(f"{name}.{axis}.recv.{offset}", tile, dtype)
        transfers.append((pattern.start(source, received[offset], lines=lines), source))
    for transfer, source in transfers:
        transfer.wait()
        source.free()
    mesh.step(f"{axis} leg")
    return received


def ladder(mesh, plan: Plan, stored, name: str = "ladder", routing: str = "relay", tokens: int = 0):
    """Unified-memory GEMV: every consumer fetches (x_q, W[q rows, its columns]) from every
    holder q over an X-then-Y all-to-all, then computes its columns (module docstring).
    ``stored`` tiles: (h + h·n_pad,) = this core's x chunk and W rows, row-major; for a GEMM of
    ``tokens`` rows, (T·h + h·n_pad,): this core's h columns of every row of x first."""
    if routing not in ROUTING:
        raise ValueError(f"ladder routing must be one of {ROUTING}, not {routing!r}")
    rows_used, cols, width = plan.used_rows, plan.cols, plan.width
    h, holder_rows = plan.ladder_holders()
    t = max(tokens, 1)
    xh = t * h
    block = xh + h * width                    # one (holder, consumer) fetch: x_q and W_qb
    dtype = stored.dtype
    col_of = mesh.global_cols()[None, :]
    row_of = mesh.global_rows()[:, None]
    blocks = None
    if not mesh.dry_run:     # this core's fetches grouped by consumer: [consumer col, consumer row, block]
        x_part = stored.data[..., :xh]
        w_part = stored.data[..., xh:].reshape(mesh.block_shape + (h, rows_used, cols, width))
        w_part = np.moveaxis(w_part, 2, -2)                  # (.., rows_used, cols, h, width) per consumer
        per_consumer = np.concatenate([np.broadcast_to(x_part[..., None, None, :], mesh.block_shape + (rows_used, cols, xh)),
                                       w_part.reshape(mesh.block_shape + (rows_used, cols, h * width))], -1)
        blocks = np.moveaxis(per_consumer, 2, 3)             # (.., consumer col, consumer row, block)
    with mesh.phase(f"{name}.fetch.x"):
        def x_send(offset):
            target = (col_of + offset) % cols
            pick = np.broadcast_to(target, mesh.block_shape)[..., None, None, None]
            return np.take_along_axis(blocks, pick, axis=2)[:, :, 0]
        x_legs = _rotations(mesh, name, "x", cols, cols, list(range(holder_rows)), x_send, (rows_used, block),
                            dtype, routing)
    # at (r, c): from every holder column, the blocks for every consumer row of column c
    gathered = None
    if not mesh.dry_run:
        own = np.take_along_axis(blocks, np.broadcast_to(col_of, mesh.block_shape)[..., None, None, None],
                                 axis=2)[:, :, 0]
        gathered = np.zeros(mesh.block_shape + (cols, rows_used, block), dtype)
        gathered[np.arange(mesh.block_shape[0])[:, None], np.arange(mesh.block_shape[1])[None, :],
                 np.broadcast_to(col_of, mesh.block_shape)] = own
        for offset, buf in x_legs.items():
            source_col = np.broadcast_to((col_of - offset) % cols, mesh.block_shape)
            gathered[np.arange(mesh.block_shape[0])[:, None], np.arange(mesh.block_shape[1])[None, :],
                     source_col] = buf.data
    holding = np.broadcast_to(row_of < holder_rows, mesh.block_shape)
    if cols > 1 and rows_used > 1:   # the corner forwards every fetch it received (software)
        mesh.software_stage(holding)
    with mesh.phase(f"{name}.fetch.y"):
        def y_send(offset):
            target = np.broadcast_to((row_of + offset) % rows_used, mesh.block_shape)
            return np.take_along_axis(gathered, target[..., None, None, None], axis=3)[:, :, :, 0]
        y_legs = _rotations(mesh, name, "y", rows_used, holder_rows, None, y_send, (cols, block), dtype, routing)
    y = mesh.alloc(f"{name}.y", (tokens, width) if tokens else (width,), dtype)
    with mesh.phase(f"{name}.local"):
        if not mesh.dry_run:       # fetched[holder row, holder col, block] per consumer
            fetched = np.zeros(mesh.block_shape + (holder_rows, cols, block), dtype)
            mine = np.broadcast_to(np.minimum(row_of, rows_used - 1), mesh.block_shape)
            own = np.take_along_axis(gathered, mine[..., None, None, None], axis=3)[:, :, :, 0]
            for source_row, tiles in [(row_of + 0 * col_of, own)] + [
                    ((row_of - offset) % rows_used + 0 * col_of, buf.data) for offset, buf in y_legs.items()]:
                got = source_row < holder_rows
                fetched[got, source_row[got]] = tiles[got]
            x_q = fetched[..., :xh].reshape(fetched.shape[:-1] + (t, h))
            w_qb = fetched[..., xh:].reshape(fetched.shape[:-1] + (h, width))
            y.data[...] = np.einsum("abqctk,abqckw->abtw", x_q, w_qb).reshape(y.data.shape)
        rows_fetched = h * holder_rows * cols
        mesh.compute(2 * t * rows_fetched * width, where=used_mask(mesh, plan), ops=vector_ops(rows_fetched, width))
    for buf in list(x_legs.values()) + list(y_legs.values()):
        buf.free()
    return y


def ladder_stored(plan: Plan, x_vec: np.ndarray, w_mat: np.ndarray) -> np.ndarray:
    """(rows, cols, h + h·n_pad): core q (row-major) holds x[q·h:(q+1)·h] then W's rows
    q·h..(q+1)·h, row-major — tensors laid out contiguously over the cores. A GEMM's x
    (T x m) is split by its columns alike: core q holds x[:, q·h:(q+1)·h] (T·h values)."""
    h, holder_rows = plan.ladder_holders()
    holders = holder_rows * plan.cols
    x_rows = np.atleast_2d(x_vec)
    x_pad = host.pad_to(x_rows, x_rows.shape[0], h * holders)
    x_flat = x_pad.reshape(-1, holders, h).transpose(1, 0, 2).reshape(holders, -1)
    w_pad = host.pad_to(w_mat, h * holders, plan.n_pad)
    flat = np.concatenate([x_flat, w_pad.reshape(holders, h * plan.n_pad)], 1)
    tiles = np.zeros((plan.rows, plan.cols, flat.shape[1]), x_vec.dtype)
    tiles[:holder_rows] = flat.reshape(holder_rows, plan.cols, -1)
    return tiles


# ---------------------------------------------------------------------------- T10
def ring_sizes(plan: Plan) -> list[int]:
    """Ring sizes that tile the used region: divisors of the row length, then whole rows."""
    return ([d for d in range(1, plan.cols + 1) if plan.cols % d == 0]
            + [k * plan.cols for k in range(2, plan.used_rows + 1) if plan.used_rows % k == 0])


def t10_ring(plan: Plan, hw, tokens: int = 1) -> int:
    """T10's choice: the fewest shifts whose buffers fit (resident W, two x chunks of
    ``tokens`` rows, y). When a core's columns of W alone overflow its memory no ring fits;
    the chunks are then sized as if the two of them had the core to themselves."""
    sizes = ring_sizes(plan)
    for resident in (plan.width, 0):
        for p in sizes:
            chunk = -(-plan.m // p)
            if hw.element_bytes * (p * chunk * resident + tokens * (2 * chunk + resident)) <= hw.sram_bytes_per_core:
                return p
    return sizes[-1]


def t10(mesh, plan: Plan, x, w, ring: int, name: str = "t10"):
    """Compute-shift GEMV on rings of ``ring`` consecutive core ids (module docstring).
    ``x`` tiles: (chunk,) — ring position i starts with chunk i; ``w`` tiles:
    (ring, chunk, width) — W's rows of chunk i for this core's columns. A GEMM's ``x`` tiles
    are (T, chunk): the chunk of columns of every row of x."""
    cols, fabric = plan.cols, mesh.fabric
    chunk, width, tokens = x.tile_shape[-1], plan.width, tokens_of(x)
    used = used_mask(mesh, plan)
    ids = mesh.global_rows()[:, None] * cols + mesh.global_cols()[None, :]
    position = np.broadcast_to(ids % ring, mesh.block_shape)
    lines = list(range(plan.used_rows))
    buffers = (x, mesh.alloc(f"{name}.x.next", x.tile_shape, x.dtype))
    y = mesh.alloc(f"{name}.y", output_shape(x, width), x.dtype)
    steps = []
    if ring > 1 and ring <= cols:     # rings inside a row: successor, and a wrap of ring-1 hops
        positions = np.arange(cols)
        dest = np.where((positions + 1) % ring == 0, positions + 1 - ring, positions + 1)
        steps.append(("x", fabric.permutation(f"{name}.ring", "x", dest, group=f"{name}.ring"), lines))
    elif ring > cols:                 # rings of k whole rows: row-end jump back, one down (k-1 up)
        k = ring // cols
        transit = mesh.alloc(f"{name}.x.transit", x.tile_shape, x.dtype)
        steps.append(("x", fabric.shift(f"{name}.along", "x", 1, group=f"{name}.along"), lines))
        steps.append(("transit", fabric.plan(f"{name}.back", "x", [cols - 1], [0], group=f"{name}.back"), lines))
        rows = np.arange(mesh.rows)
        down = np.where(rows < plan.used_rows, np.where((rows + 1) % k == 0, rows + 1 - k, rows + 1), -1)
        steps.append(("corner", fabric.permutation(f"{name}.down", "y", down, group=f"{name}.down"), [0]))
        arrive = mesh.alloc(f"{name}.x.arrive", x.tile_shape, x.dtype)
    corner = (mesh.global_cols()[None, :] == 0) & used
    with mesh.phase(f"{name}.compute_shift"):
        for step in range(ring):
            current, following = buffers[step % 2], buffers[(step + 1) % 2]
            pending = []
            if step + 1 < ring:
                for kind, pattern, on in steps:
                    if kind == "x":
                        pending.append(pattern.start(current, following, lines=on))
                    elif kind == "transit":
                        pattern.start(current, transit, lines=on).wait()
                    else:
                        mesh.software_stage(corner)      # the turn is a software relay
                        pending.append(pattern.start(transit, arrive, lines=on))
            if not mesh.dry_run:
                held = (position - step) % ring
                w_rows = np.take_along_axis(w.data, held[..., None, None, None], axis=2)[:, :, 0]
                y.data += _times(current.data, w_rows)
            mesh.compute(2 * tokens * chunk * width, where=used, ops=vector_ops(chunk, width))
            for transfer in pending:
                transfer.wait()
            if ring > cols and step + 1 < ring and not mesh.dry_run:   # column 0's chunk came down
                following.data[:, mesh.global_cols() == 0] = arrive.data[:, mesh.global_cols() == 0]
            mesh.step(f"step {step}")
    buffers[1].free()
    if ring > cols:
        transit.free()
        arrive.free()
    return y


def t10_tiles(plan: Plan, ring: int, x_vec: np.ndarray, w_mat: np.ndarray):
    """x: ring position i holds chunk i (of every row, for a GEMM's T x m x); W: each core's
    columns split in the ring's chunks."""
    chunk = -(-plan.m // ring)
    m_pad = chunk * ring
    x_pad = host.pad_to(np.atleast_2d(x_vec), np.atleast_2d(x_vec).shape[0], m_pad)
    ids = plan.row_major()
    per_core = np.moveaxis(x_pad.reshape(-1, ring, chunk)[:, ids % ring], 0, -2)   # [used_rows, cols, T, chunk]
    if x_vec.ndim == 1:
        per_core = per_core[..., 0, :]
    x_tiles = np.zeros((plan.rows, plan.cols) + per_core.shape[2:], x_vec.dtype)
    x_tiles[: plan.used_rows] = per_core
    w_tiles = plan.column_tiles(w_mat, ids, m_pad).reshape(plan.rows, plan.cols, ring, chunk, plan.width)
    return x_tiles, w_tiles
