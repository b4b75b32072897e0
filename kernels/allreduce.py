"""Allreduce of per-core vectors along one axis of the mesh (PAPER.md §3).

Every core of a line ends with the reduction (sum or max) of the line's vectors.

- ``pipeline``: chain to the last core, then multicast back (N software stages, 2N hops).
- ``ring``: reduce-scatter then allgather on the interleaved ring (2-hop edges).
- ``ktree`` (K = 2): chains from both ends of each of G groups into the group root, chains
  of group roots (pass-through routes) into the global root, then one multicast back:
  about g/2 + G/2 + 1 software stages and N hops.

How a chain stage forwards (``forwarding``):

- ``stream`` (default, as WaferLLM's kernels do): a chain core runs one fabric-in, fabric-out
  add (``@faddh`` in the CSL) that adds its own vector to the wavelets as they pass and
  forwards the sums. The head moves on after ``alpha`` per hop and one software stage
  (``beta``) per core; the payload passes once, at the pace of the link or of the add,
  whichever is slower (:func:`meshmpi.costs.streamed_payload`); every core of the chain is
  busy until the tail has passed it.
- ``store``: each stage receives the whole vector, adds it, pays ``beta`` and only then sends
  the sum on: the payload is serialised once per stage (for comparison).

The ring's steps exchange different parts of the vector and stay store-and-forward per step.

``segments``: several disjoint ``[lo, hi)`` spans of a line reduced independently at once, each
with its own chains (its own groups and root) and its own broadcast over the span; cores outside
every span take no part. A span of one core has nothing to reduce. The spans share no link or
router, so each costs what a line of its length costs; together they use the routes of one line.

How it runs: streamed chain stages that stay inside a rank's block (all of them on one rank)
go in one compiled pass per run of stages, with exactly the times, sums, charges, counts and
timeline rows of running them stage by stage, as the stages that cross ranks still run.
"""
from __future__ import annotations

import functools
import math

import numba
import numpy as np

from meshmpi import costs
from meshmpi.fabric import LINES_AT_ONCE, NO_EXTRA, start_own
from meshmpi.mesh import block_offsets

from .ring import interleaved_ring

ALGOS = ("ktree", "pipeline", "ring")
FORWARDING = ("stream", "store")
_OPS = {"sum": np.add, "max": np.maximum}


def default_groups(n: int) -> int:
    """About sqrt(N) groups (PAPER.md §3)."""
    return max(1, int(round(math.sqrt(n))))


def allreduce(mesh, acc, axis: str, op: str = "sum", algo: str = "ktree",
              groups: int | None = None, name: str = "allreduce", forwarding: str = "stream",
              segments=None) -> None:
    """Reduce ``acc`` (1-D tiles) in place along ``axis``; every core gets the result of its
    line, or of its segment of the line (``segments``: disjoint ``(lo, hi)`` spans, default the
    whole line)."""
    if algo not in ALGOS:
        raise ValueError(f"allreduce algorithm must be one of {ALGOS}, not {algo!r}")
    if forwarding not in FORWARDING:
        raise ValueError(f"chain forwarding must be one of {FORWARDING}, not {forwarding!r}")
    spans = _spans(mesh.axis_length(axis), segments)
    if not spans:
        return
    with mesh.phase(f"{name}.{algo}"):
        if algo == "ring":
            for length in sorted({hi - lo for lo, hi in spans}):   # one ring schedule per length
                _ring(mesh, acc, axis, op, name, [(lo, hi) for lo, hi in spans if hi - lo == length])
        else:
            _tree(mesh, acc, axis, op, groups, name, spans, root_last=(algo == "pipeline"),
                  forwarding=forwarding)


def _spans(n: int, segments) -> list:
    """The segments that have something to reduce (two cores or more), checked disjoint."""
    spans = [(0, n)] if segments is None else sorted((int(lo), int(hi)) for lo, hi in segments)
    for (lo, hi), following in zip(spans, spans[1:] + [(n, n)]):
        if not 0 <= lo < hi <= following[0] <= n:
            raise ValueError(f"allreduce segments must be disjoint non-empty spans of a line of {n}: {segments}")
    return [(lo, hi) for lo, hi in spans if hi - lo > 1]


def _combine(mesh, acc, incoming, op: str, axis: str, runs) -> None:
    """acc = op(acc, incoming) on the cores along ``axis`` that ``runs`` index
    (:meth:`meshmpi.mesh.Mesh.positions_runs`; numeric runs), in place through views where they
    are slices."""
    if mesh.dry_run:
        return
    for index in runs:
        at = (slice(None), index) if axis == "x" else (index,)
        if isinstance(index, slice):
            _OPS[op](acc.data[at], incoming.data[at], out=acc.data[at])
        else:
            acc.data[at] = _OPS[op](acc.data[at], incoming.data[at])


def _chains(mesh, acc, axis, op, tag, stages, buffers, forwarding, schedule) -> None:
    """Run two chains stage by stage; ``stages[s]`` holds the left and the right chain's
    (sources, destinations) of stage s, or None where that chain has finished (``schedule``:
    what they were made from). Runs of streamed stages that stay inside this rank's block go
    in one compiled pass each (:class:`_BlockChains`)."""
    streaming = forwarding == "stream"
    parts = _chain_parts(mesh, acc, axis, tag, stages, schedule, streaming)
    if streaming and len(parts) == 1 and parts[0][2] is not None:
        parts[0][2].run(mesh, acc, op)       # every stage in one pass, settling into the clocks
        return
    head = mesh.clock.copy() if streaming else None     # when each core's stream can leave
    involved = np.zeros(mesh.fabric.block_length(axis), bool)     # by position along the axis
    for first, last, in_block in parts:
        if in_block is not None:
            in_block.run(mesh, acc, op, head)
            involved[in_block.involved_positions] = True
            continue
        for stage, patterns in zip(range(first, last), _chain_patterns(mesh.fabric, axis, tag, stages[first:last])):
            buffers_used = [buf for links, buf in zip(stages[stage], buffers) if links is not None]
            _stage(mesh, acc, axis, op, patterns, buffers_used, head, involved)
            mesh.step(f"{tag} stage {stage}")
    if streaming:  # every core of the chains is busy until the tail of the stream has passed it
        along_x = axis == "x"
        _move_at(mesh.clock.T if along_x else mesh.clock, head.T if along_x else head, np.flatnonzero(involved),
                 costs.streamed_payload(mesh.hardware, acc.tile_bytes, acc.tile_elements), True, along_x)


def _stage(mesh, acc, axis, op, patterns, buffers, head, involved) -> None:
    """One stage of the chains: each side's pattern delivers into its buffer, then the receivers
    add what arrived; streamed (``head``), the heads move on and ``involved`` (by position along
    the axis) gains the stage's cores, else each receiver's clock pays the stage."""
    started = []
    for pattern, buf in zip(patterns, buffers):
        transfer = pattern.start(acc, buf, depart=head, payload=head is None)
        started.append((transfer, buf, pattern, mesh.positions_runs(axis, pattern.dst)))
    heads_in = None
    if head is not None:       # the heads arriving, at the receivers (the only cores they reach)
        heads_in = np.empty(mesh.block_shape)
        for *_, runs in started:
            for index in runs:
                heads_in[(slice(None), index) if axis == "x" else (index,)] = -np.inf
    for transfer, *_ in started:    # every delivery of the stage lands, then the adds
        transfer.wait(into=heads_in)
    for _, buf, pattern, runs in started:
        _combine(mesh, acc, buf, op, axis, runs)
        if head is not None:
            for index in runs:        # the receivers' lines of this block, as views where it can
                at = (slice(None), index) if axis == "x" else (index,)
                head[at] = costs.streaming_stage_head(mesh.hardware, heads_in[at], head[at])
            mesh.charge_stage_along(axis, runs, acc.tile_elements)
            for index in runs + mesh.positions_runs(axis, pattern.src):
                involved[index] = True
        else:
            receivers = mesh.positions_mask(axis, pattern.dst)
            mesh.compute(acc.tile_elements, where=receivers)
            mesh.software_stage(receivers)


@numba.njit(cache=True, nogil=True)
def _move_at(out, values, positions, add, keep_max, lines_major):
    """``out`` at ``positions`` ([position, line] arrays) becomes ``values``, or with
    ``keep_max`` ``max(out, values + add)`` (the chains' cores busy until the tail of the stream
    has passed them, ``add`` after their heads); a few lines at a time when the arrays lie line
    after line in memory, so that both are read in whole cache lines."""
    lines = out.shape[1]
    step = LINES_AT_ONCE if lines_major else lines
    for line0 in range(0, lines, step):
        for p in positions:
            for line in range(line0, min(line0 + step, lines)):
                out[p, line] = max(out[p, line], values[p, line] + add) if keep_max else values[p, line]


def _chain_patterns(fabric, axis: str, tag: str, stages) -> list:
    """The patterns of each stage's chains, left then right (planned once, then looked up):
    one schedule's colours serve every allreduce along this axis."""
    return [[fabric.plan(f"allreduce.{tag}.{side}", axis, *links, group=f"allreduce.{tag}.{side}.{axis}")
             for side, links in zip(("left", "right"), sides) if links is not None] for sides in stages]


def _chain_parts(mesh, acc, axis: str, tag: str, stages, schedule, streaming: bool) -> list:
    """The chains' stages as parts ``(first, last, plan)``: a run of streamed stages whose
    patterns start in one pass inside this rank's block (on any rank; not on a remapped
    wafer), on unshared links, planned as one :class:`_BlockChains`; any other stage alone,
    with None (run stage by stage). Made once per schedule and tile; patterns freed since
    are planned again."""
    if not streaming:
        return [(0, len(stages), None)]
    key = ("allreduce chains", axis, tag, schedule, acc.tile_bytes, acc.tile_elements)
    parts = mesh.fabric.kernel_plans.get(key)
    if parts is None:
        patterns = _chain_patterns(mesh.fabric, axis, tag, stages)
        inside = [bool(stage) and all(p.one_pass_inside and not p.links_shared and not p.relay for p in stage)
                  for stage in patterns]
        parts, first = [], 0
        while first < len(stages):
            last = first + 1
            while inside[first] and last < len(stages) and inside[last]:
                last += 1
            plan = _BlockChains(mesh, acc, axis, tag, patterns[first:last], first) if inside[first] else None
            parts.append((first, last, plan))
            first = last
        mesh.fabric.kernel_plans[key] = parts
    for first, last, plan in parts:
        if plan is not None and not all(p.live for p in plan.patterns):
            plan.patterns = [p for stage in _chain_patterns(mesh.fabric, axis, tag, stages[first:last]) for p in stage]
    return parts


class _BlockChains:
    """A run of streamed chain stages that all stay inside this rank's block, planned once per
    schedule and tile: the stages in one compiled pass (:func:`_run_block_chains`), with the
    times, sums, charges, counts and timeline rows of :func:`_stage` run stage by stage."""

    def __init__(self, mesh, acc, axis: str, tag: str, patterns: list, first: int):
        self.axis = axis
        self.labels = [f"{tag} stage {stage}" for stage in range(first, first + len(patterns))]
        flat = self.patterns = [p for stage in patterns for p in stage]
        # each side's walk of its own worms (meshmpi.fabric.start_own), joined side after side
        walks = [p.own_walk(acc.tile_bytes, False, False) for p in flat]
        self.side_start = _starts(len(stage) for stage in patterns)
        self.worm_start = _starts(walk[0].size for walk in walks)
        self.delivery_start = _starts(walk[7].size for walk in walks)
        self.walk = tuple(np.concatenate([walk[i] for walk in walks]).astype(dtype)
                          for i, dtype in enumerate(_WALK_TYPES))
        self.senders = np.concatenate([p.src[p.own_batch.index] - p.block_start for p in flat]).astype(np.int64)
        hw = mesh.hardware
        self.alpha, self.beta = mesh.fabric.alpha, float(costs.software_stage(hw))
        self.elements = int(acc.tile_elements)
        self.cycles = float(costs.compute(hw, np.int64(self.elements), 1))
        involved = np.zeros(mesh.fabric.block_length(axis), bool)
        for p in flat:
            involved[p.own_source_positions] = involved[p.own_batch.dests] = True
        self.involved_positions = np.flatnonzero(involved)
        self.streamed = float(costs.streamed_payload(hw, acc.tile_bytes, acc.tile_elements))
        self._count(mesh, acc.tile_bytes, flat)

    def _count(self, mesh, nbytes: int, flat: list) -> None:
        """What the chains add to the counters (per position, once per run) and to the totals,
        and per stage: (messages, bytes, FLOPs) and the longest transfer's hops."""
        self.every_line = mesh.fabric.line_mask(self.axis, None)
        lines = self.every_line.size
        counts = [p.counts(nbytes) for p in flat]
        self.count_rows = counts[0][0]
        if any(not np.array_equal(rows, self.count_rows) for rows, _, _ in counts):
            raise AssertionError("the chains' patterns count different counters")
        self.per_position = np.sum([values for _, values, _ in counts], axis=0)
        sums = [dict(pairs) for _, _, pairs in counts]
        self.count_sums = [(name, sum(s[name] for s in sums)) for name in sums[0]]
        received = np.diff(self.delivery_start) * lines
        self.relays = int(received.sum())
        per_side = np.array([[s["messages_sent"] * lines, s["bytes_sent"] * lines, r * self.elements]
                             for s, r in zip(sums, received)], np.int64)
        running = np.concatenate([np.zeros((1, 3), np.int64), np.cumsum(per_side, axis=0)])
        self.added = running[self.side_start[1:]] - running[self.side_start[:-1]]
        self.hops = np.array([max((p.max_hops for p in flat[a:b]), default=0)
                              for a, b in zip(self.side_start[:-1], self.side_start[1:])], np.int64)

    def run(self, mesh, acc, op: str, head: np.ndarray | None = None) -> None:
        """The stages on ``acc`` (reduced with ``op``) from the stream heads ``head``, moved on
        in place; None: from the cores' clocks, and every core of the chains is then busy until
        the tail of the stream has passed it (all the chains' stages are these)."""
        axis = self.axis
        free = mesh.fabric.link_free(axis)
        busy, flops, relays = (a.T for a in mesh.charged_per_core(axis)) if axis == "x" else \
            mesh.charged_per_core(axis)
        data = _NO_TILES if mesh.dry_run else acc.data.reshape(mesh.block_shape + (-1,))
        if not mesh.dry_run and not np.may_share_memory(data, acc.data):
            raise AssertionError(f"{acc.name}: tiles not laid out in place")
        mesh.timeline.record_steps(self.labels, self.added, self.hops)    # before the clocks settle
        heads = mesh.clock if head is None else head
        _run_block_chains(heads.T if axis == "x" else heads, head is None, self.involved_positions, self.streamed,
                          free[+1], free[-1], self.side_start, self.worm_start,
                          self.delivery_start, *self.walk, self.senders, self.alpha, self.beta,
                          data.swapaxes(0, 1) if axis == "x" else data, not mesh.dry_run, op == "max",
                          busy, flops, relays, self.cycles, self.elements, axis == "x")
        mesh.count_along(self.count_rows, axis, self.per_position, self.every_line, self.every_line.size,
                         self.count_sums)
        mesh.totals["flops"] += int(self.added[:, 2].sum())
        mesh.totals["relays"] += self.relays
        mesh.max_hops = max(mesh.max_hops, int(self.hops.max(initial=0)))


_NO_TILES = np.empty((0, 0, 0), np.float32)
# what :meth:`meshmpi.fabric.LinePattern.own_walk` gives per worm (sign, first link, links,
# relayed, source, occupancy, delivery) and per delivery (destination, tail, capacity)
_WALK_TYPES = (np.int64, np.int64, np.int64, bool, np.int64, np.float64, np.int64, np.int64, np.float64, np.float64)


def _starts(counts) -> np.ndarray:
    """Where each of a run of parts starts in their concatenation, and the end."""
    return np.cumsum([0, *counts]).astype(np.int64)


@numba.njit(cache=True, nogil=True)
def _run_block_chains(heads, settle, involved, streamed, free_right, free_left, side_start, worm_start,
                      delivery_start, sign, first, links, relayed, sources, occupancy, delivery, dests, tails,
                      capacity, senders, alpha, beta, acc, numeric, take_max, busy, flops, relays, cycles, elements,
                      lines_major):
    """Every stage of :class:`_BlockChains` ([position, line] arrays): each side's worms start
    from the stream heads (:func:`meshmpi.fabric.start_own`, heads alone); then, side by
    side, the receivers add what arrived (``acc``, numeric runs), their heads move on to
    ``max(arrival, head) + beta`` and they are charged ``cycles``, ``elements`` FLOPs and one
    relay. The heads start from ``heads`` on the ``involved`` positions and go back there; with
    ``settle``, ``heads`` are the clocks, and each involved core's clock becomes instead
    ``max(clock, head + streamed)``, busy until the stream's tail has passed. ``lines_major``:
    ``heads`` lies line after line in memory (a view along x), and the charged arrays are
    given [line, position], so both are read and charged a line at a time (the charges after
    the stages; a core's are the same whatever the order)."""
    lines = heads.shape[1]
    head = np.empty(heads.shape)
    _move_at(head, heads, involved, 0.0, False, lines_major)
    stages = side_start.size - 1
    most = 0
    for s in range(stages):
        most = max(most, delivery_start[side_start[s + 1]] - delivery_start[side_start[s]])
    landed = np.empty((most, lines))
    arrival = np.empty(head.shape)
    incoming = np.empty((most, lines, acc.shape[2]), acc.dtype)
    done, last = np.empty((0, lines)), np.empty((1, lines))
    for s in range(stages):
        base = delivery_start[side_start[s]]
        for t in range(side_start[s], side_start[s + 1]):
            w0, w1, d0, d1 = worm_start[t], worm_start[t + 1], delivery_start[t], delivery_start[t + 1]
            start_own(head, 0.0, free_right, free_left, free_right, free_left, False, sign[w0:w1], first[w0:w1],
                      links[w0:w1], relayed[w0:w1], sources[w0:w1], occupancy[w0:w1], delivery[w0:w1],
                      dests[d0:d1], tails[d0:d1], capacity[d0:d1], NO_EXTRA, True, alpha, 0.0,
                      landed[d0 - base:d1 - base], done, last)
        stop = delivery_start[side_start[s + 1]]
        for k in range(base, stop):
            for line in range(lines):
                arrival[dests[k], line] = -np.inf
        for k in range(base, stop):
            d = dests[k]
            for line in range(lines):
                arrival[d, line] = max(arrival[d, line], landed[k - base, line])
                if numeric:
                    for e in range(acc.shape[2]):
                        incoming[k - base, line, e] = acc[senders[k], line, e]
        for k in range(base, stop):      # side by side, as the deliveries are ordered
            d = dests[k]
            for line in range(lines):
                head[d, line] = max(arrival[d, line], head[d, line]) + beta
                if not lines_major:
                    busy[d, line] += cycles
                    flops[d, line] += elements
                    relays[d, line] += 1
                if numeric:
                    for e in range(acc.shape[2]):
                        x, y = acc[d, line, e], incoming[k - base, line, e]
                        if take_max:
                            acc[d, line, e] = x if x >= y or x != x else y
                        else:
                            acc[d, line, e] = x + y
    if lines_major:     # each receiver's charges, added one after another as above, a line at a time
        positions = heads.shape[0]
        received = np.zeros(positions, np.int64)
        for k in range(dests.size):
            received[dests[k]] += 1
        adds = np.zeros((received.max() if positions else 0, positions))   # the r-th charge's cycles, or 0
        for p in range(positions):
            adds[:received[p], p] = cycles
        for line in range(lines):
            for r in range(adds.shape[0]):
                for p in range(positions):
                    busy[line, p] += adds[r, p]
            for p in range(positions):
                flops[line, p] += received[p] * elements
                relays[line, p] += received[p]
    _move_at(heads, head, involved, streamed, settle, lines_major)


@functools.lru_cache(maxsize=1024)
def _tree_schedule(spans: tuple, groups: int | None, root_last: bool) -> tuple:
    """The K-tree's stages on ``spans`` (made once per shape): the group chains' and the root
    chains' stages (as :func:`_chains` takes them), and each span's global root."""
    n_max = max(hi - lo for lo, hi in spans)
    groups_of, roots, centres = [], [], []   # per span: group spans, group roots, the global root
    for lo, hi in spans:
        length = hi - lo
        count = 1 if root_last else min(length, groups or default_groups(length))
        bounds = lo + block_offsets(length, count)
        mine = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
        groups_of += mine
        roots.append([b - 1 if root_last else a + (b - a) // 2 for a, b in mine])
        centres.append(len(mine) - 1 if root_last else len(mine) // 2)
    group_roots = [r for span_roots in roots for r in span_roots]
    # Phase 1: inside each group, chains from both ends hop by hop into the group root.
    left = [[(lo + s - 1, lo + s) for (lo, _), r in zip(groups_of, group_roots) if lo + s <= r]
            for s in range(1, n_max + 1)]
    right = [[(hi - s, hi - s - 1) for (_, hi), r in zip(groups_of, group_roots) if hi - s - 1 >= r]
             for s in range(1, n_max + 1)]
    in_groups = _stages(left, right)
    # Phase 2: in each span, group roots forward along pass-through routes into the global root.
    stages = max(len(r) for r in roots)
    left = [[(r[k - 1], r[k]) for r, c in zip(roots, centres) if k <= c] for k in range(1, stages)]
    right = [[(r[len(r) - k], r[len(r) - k - 1]) for r, c in zip(roots, centres) if len(r) - k - 1 >= c]
             for k in range(1, stages)]
    return in_groups, _stages(left, right), tuple(r[c] for r, c in zip(roots, centres))


def _stages(left: list, right: list) -> tuple:
    """Two chains' per-stage (src, dst) pairs as per-stage (left, right) (sources, destinations)
    arrays, None where a chain has nothing to send; trailing empty stages dropped."""
    def arrays(pairs):
        return tuple(np.array(side, np.int64) for side in zip(*pairs)) if pairs else None
    stages = [(arrays(a), arrays(b)) for a, b in zip(left, right)]
    while stages and stages[-1] == (None, None):
        stages.pop()
    return tuple(stages)


def _tree(mesh, acc, axis, op, groups, name, spans, root_last=False, forwarding="stream") -> None:
    """K-tree (or, ``root_last`` with one group, pipeline) allreduce on every span at once."""
    in_groups, between_roots, centres = _tree_schedule(tuple(spans), groups, root_last)
    buffers = (mesh.alloc(f"{name}.recv.left", acc.tile_shape, acc.dtype),
               mesh.alloc(f"{name}.recv.right", acc.tile_shape, acc.dtype))
    schedule = (tuple(spans), groups, root_last)
    _chains(mesh, acc, axis, op, "group", in_groups, buffers, forwarding, schedule)
    _chains(mesh, acc, axis, op, "roots", between_roots, buffers, forwarding, schedule)
    for buf in buffers:
        buf.free()
    # Phase 3: each span's root multicasts the result back along its span.
    mesh.fabric.multicasts("allreduce.bcast", axis, list(centres), spans,
                           group=f"allreduce.bcast.{axis}").run(acc)
    mesh.step("broadcast")


def _ring(mesh, acc, axis, op, name, spans) -> None:
    """Reduce-scatter then allgather on the interleaved ring of each span (spans of one length
    ``n``); tiles split in n parts."""
    n = spans[0][1] - spans[0][0]
    ring = interleaved_ring(n)
    length = acc.tile_elements
    seg = -(-length // n)
    dest = np.full(mesh.axis_length(axis), -1, np.int64)
    position = np.zeros(mesh.axis_length(axis), np.int64)
    for lo, hi in spans:
        dest[lo:hi] = lo + ring.send()
        position[lo:hi] = ring.position
    local = mesh.global_cols() if axis == "x" else mesh.global_rows()
    member = mesh.positions_mask(axis, np.flatnonzero(dest >= 0))
    position = position[local]
    position = position[None, :] if axis == "x" else position[:, None]
    position = np.broadcast_to(position, mesh.block_shape)
    padded = None if mesh.dry_run else np.zeros(mesh.block_shape + (n * seg,), acc.dtype)
    if padded is not None:
        padded[..., :length] = acc.data.reshape(mesh.block_shape + (-1,))
    out = mesh.alloc(f"{name}.ring.out", (seg,), acc.dtype)
    inc = mesh.alloc(f"{name}.ring.in", (seg,), acc.dtype)
    step_pattern = mesh.fabric.permutation("allreduce.ring", axis, dest, group=f"allreduce.ring.{axis}")
    for phase in ("reduce_scatter", "allgather"):
        for t in range(n - 1):
            send_seg = (position - t) % n if phase == "reduce_scatter" else (position + 1 - t) % n
            recv_seg = (send_seg - 1) % n
            if padded is not None:
                view = padded.reshape(mesh.block_shape + (n, seg))
                out.data[...] = np.take_along_axis(view, send_seg[..., None, None], axis=2)[..., 0, :]
            step_pattern.start(out, inc).wait()
            if padded is not None:
                idx = recv_seg[..., None, None]
                current = np.take_along_axis(view, idx, axis=2)[..., 0, :]
                new = _OPS[op](current, inc.data) if phase == "reduce_scatter" else inc.data
                np.put_along_axis(view, idx, new[..., None, :], axis=2)
            if phase == "reduce_scatter":
                mesh.compute(seg, where=member)
                mesh.software_stage(member)
            mesh.step(f"{phase} {t}")
    if padded is not None:
        acc.data[member] = padded[member][..., :length].reshape(acc.data[member].shape)
    out.free()
    inc.free()
