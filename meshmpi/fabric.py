"""The fabric: the only way data moves between cores.

A *line pattern* is a set of deliveries ``src -> dst`` between positions along one axis,
applied to every line (row for ``x``, column for ``y``) at once. Shifts, ring steps, chain
steps and multicasts are all line patterns. A pattern is planned once — its hops, relays,
link loads and routes are closed-form functions of the positions — and started many times.
``start`` forwards the source tiles rank by rank through Cartesian neighbours and returns a
:class:`Transfer`; ``wait`` lands the tiles in the destination and advances the receivers'
modeled clocks. Between the two, the destination may not be touched and the source may not
be written (:class:`~meshmpi.errors.HazardError`; the source check copies the payload, so it
runs only with hazard checks on, as in the tests).

Times come from :mod:`meshmpi.costs`, applied link by link in :mod:`meshmpi.worms`: on free
links a head arrives ``alpha`` a hop (``beta`` a software relay) after the sender's clock; a
link still busy with an earlier message delays it. The receiver posts its receive when its
program reaches ``start`` (its clock plus ``costs.transfer_start``, as a sender's departure;
a core receiving into the buffer it sends from posts once its own tile has left) and holds
the tile at ``costs.landing``: the later of the head and the posting, plus the payload once
(shared ``load`` ways when messages of the pattern share a link). Its clock becomes ``max(own, landing)`` at ``wait``. A sender's clock becomes the
completion of its send (``costs.send_completion``): when its tail has left, or, behind a
receiver that posted late, when no more than the path's capacity is still in flight — the
receivers' landings travel back to the sources along the worms' rounds (back-pressure).

The arithmetic runs in compiled loops (numba) that call the formulas of :mod:`meshmpi.costs`
message by message: a pattern whose worms all stay inside this rank's block starts in one
pass over its worms and lines (departures, heads, landings, completions); any other advances
batch by batch, with the heads crossing rank boundaries in between.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np

from . import costs, defects, worms
from .array import MeshArray
from .errors import HazardError, UsageError
from .mesh import COUNTERS

_DATA_TAG, _HEAD_TAG, _BACK_TAG = 11, 12, 13


def _pos_first(arr: np.ndarray, axis: str) -> np.ndarray:
    """View of a block array with the pattern's position axis first, the line axis second."""
    return np.swapaxes(arr, 0, 1) if axis == "x" else arr


def _link_loads(n: int, spans_right: list, spans_left: list) -> tuple[np.ndarray, np.ndarray]:
    """Messages on each directed link: index i is the link between positions i and i+1."""
    right, left = np.zeros(n + 1, np.int64), np.zeros(n + 1, np.int64)
    for lo, hi in spans_right:
        right[lo] += 1
        right[hi] -= 1
    for lo, hi in spans_left:
        left[lo] += 1
        left[hi] -= 1
    return np.cumsum(right)[: max(n - 1, 0)], np.cumsum(left)[: max(n - 1, 0)]


def _pick(sources: np.ndarray, local: np.ndarray, held: dict, first: int) -> np.ndarray:
    """Contiguous rows for ``sources``: from this block when it owns them, else from ``held``."""
    if sources.size == 0:
        return np.empty((0,) + local.shape[1:], local.dtype)
    if sources[0] >= first and sources[-1] < first + local.shape[0]:
        return np.ascontiguousarray(local[sources - first])
    return np.ascontiguousarray(np.stack([held[int(s)] for s in sources]))


class LinePattern:
    """Deliveries ``src[i] -> dst[i]`` along ``axis`` on every line; see the module docstring.

    ``multicast``: deliveries sharing a source are one message on a pass-through route that
    drops a copy at every destination. ``relay``: unicasts are forwarded in software by every
    intermediate core (beta each) instead of on a pass-through route; all relayed messages of
    one direction share 1-hop colours, so each router needs at most a send and a receive route
    per direction. ``multicast`` and
    ``relay`` together: a software chain from each source, in which every core on the way
    receives the message, keeps a copy and forwards it one hop (beta each, added to the
    deliveries' arrival and, at ``wait``, to the forwarding core's own clock); it needs only
    1-hop routes (a receive and a send route per router) and each link carries it once.
    ``group``: patterns of one group reuse the same routes (steps of one schedule).
    """

    def __init__(self, fabric: "Fabric", name: str, axis: str, src, dst, *,
                 multicast: bool = False, relay: bool = False, group: str | None = None):
        mesh = fabric.mesh
        if axis not in ("x", "y"):
            raise ValueError(f"axis must be 'x' or 'y', not {axis!r}")
        n = mesh.axis_length(axis)
        src, dst = np.asarray(src, np.int64).ravel(), np.asarray(dst, np.int64).ravel()
        if src.shape != dst.shape:
            raise ValueError("src and dst must have the same length")
        if src.size and (src.min() < 0 or dst.min() < 0 or src.max() >= n or dst.max() >= n):
            raise UsageError(f"pattern {name!r}: positions outside a line of {n} cores")
        if np.any(src == dst):
            raise ValueError(f"pattern {name!r}: a core cannot send to itself")
        if np.unique(dst).size != dst.size:
            raise ValueError(f"pattern {name!r}: a core may receive at most one delivery")
        self.fabric, self.mesh, self.name, self.axis, self.n = fabric, mesh, name, axis, n
        self.src, self.dst, self.multicast, self.relay = src, dst, multicast, relay
        self.group = group or name
        self.hops = np.abs(dst - src)
        self.relays = np.maximum(self.hops - 1, 0) if relay else np.zeros_like(self.hops)
        self.max_hops = int(self.hops.max()) if self.hops.size else 0
        self._count_closed_forms()
        self.worms = worms.Worms.of_pattern(src, dst, multicast, relay, self.load)
        self._plan_transport()
        self.physical = None         # a remapped wafer's physical paths (meshmpi.defects)
        if fabric.remap is not None:
            lines = slice(*mesh.axis_lines(axis))
            self.physical = defects.PatternPaths(fabric.remap, self, self.block_start,
                                                 self.block_start + fabric.block_length(axis), lines)
            self.max_hops = self.physical.max_hops
            self.one_pass = self.one_pass_inside = self.one_pass_multicast = False
        mesh.routes.declare(axis, self.group, id(self), self.routes)
        self._counts = {}             # per tile size: what a start adds to the counters
        self._split = False           # not planned yet (:meth:`_own_split`)
        self._times = {}              # per tile size (and in place or not): its fixed times
        self._aranges = {}
        self.live = True

    # ---------------------------------------------------------------- closed forms
    def _count_closed_forms(self) -> None:
        n = self.n
        self.messages_sent = np.zeros(n, np.int64)   # messages each position sends
        self.hops_sent = np.zeros(n, np.int64)       # links each position's messages use
        self.received = np.zeros(n, np.int64)
        self.relays_at = np.zeros(n, np.int64)       # software relays done by each position
        self.routes = np.zeros(n, np.int64)          # routes configured on each router
        np.add.at(self.received, self.dst, 1)
        spans_right, spans_left = [], []
        if self.multicast:
            for s in np.unique(self.src):
                targets = self.dst[self.src == s]
                lo, hi = min(int(targets.min()), int(s)), max(int(targets.max()), int(s))
                if self.relay:  # a chain of 1-hop deliveries, each with its own two routes
                    senders = np.r_[lo + 1:s + 1, s:hi]
                    np.add.at(self.messages_sent, senders, 1)
                    np.add.at(self.hops_sent, senders, 1)
                    np.add.at(self.routes, np.r_[senders, lo:s, s + 1:hi + 1], 1)
                    self.relays_at[lo + 1:s] += 1
                    self.relays_at[s + 1:hi] += 1
                else:
                    self.messages_sent[s] += 1
                    self.hops_sent[s] += hi - lo
                    self.routes[lo:hi + 1] += 1
                if hi > s:
                    spans_right.append((int(s), hi))
                if lo < s:
                    spans_left.append((lo, int(s)))
        else:
            np.add.at(self.messages_sent, self.src, 1)
            np.add.at(self.hops_sent, self.src, self.hops)
            # relayed: every message of one direction shares a 1-hop colour, so a router needs a
            # send route if some message leaves it that way and a receive route if some arrives
            relay_routes = np.zeros((4, n), bool)     # sends right, receives from the left, ditto left
            for s, d in zip(self.src.tolist(), self.dst.tolist()):
                lo, hi = min(s, d), max(s, d)
                if self.relay:
                    if d > s:
                        relay_routes[0, s:d] = relay_routes[1, s + 1:d + 1] = True
                    else:
                        relay_routes[2, d + 1:s + 1] = relay_routes[3, d:s] = True
                    self.relays_at[lo + 1:hi] += 1
                else:
                    self.routes[lo:hi + 1] += 1
                (spans_right if d > s else spans_left).append((lo, hi))
            self.routes += relay_routes.sum(axis=0)
        right, left = _link_loads(n, spans_right, spans_left)
        self.link_load = {"right": right, "left": left}
        self.load = np.ones(self.src.size, np.int64)
        if max(right.max(initial=0), left.max(initial=0)) > 1:
            for i, (s, d) in enumerate(zip(self.src.tolist(), self.dst.tolist())):
                path = right[s:d] if d > s else left[d:s]
                self.load[i] = path.max()
        self.send_load = np.zeros(n, np.int64)       # per position: the sharing of its own send
        np.maximum.at(self.send_load, self.src, self.load)

    # ---------------------------------------------------------------- transport plan
    def _plan_transport(self) -> None:
        """Which sources this rank sends/receives in each forwarding round, per direction."""
        mesh, axis = self.mesh, self.axis
        offsets, q = mesh.offsets[axis], mesh.rank_coord(axis)
        owner = lambda pos: np.searchsorted(offsets, pos, side="right") - 1  # noqa: E731
        sources = np.unique(self.src)
        which = np.searchsorted(sources, self.src)           # each delivery's source index
        reach_hi = np.full(sources.size, -1, np.int64)
        reach_lo = np.full(sources.size, self.n, np.int64)
        np.maximum.at(reach_hi, which, self.dst)
        np.minimum.at(reach_lo, which, self.dst)
        q_src, q_hi, q_lo = owner(sources), owner(reach_hi), owner(reach_lo)
        # Round k forwards, in each direction, what left a rank k ranks away; the two directions
        # are independent, so each round is one exchange with both neighbours.
        right = int(np.max(q_hi - q_src, initial=0))
        left = int(np.max(q_src - q_lo, initial=0))
        self.rounds = [[] for _ in range(max(right, left))]   # [(direction, send sources, recv sources)]
        for k in range(1, right + 1):
            send = sources[(q_src == q - k + 1) & (q_hi >= q + 1)]
            recv = sources[(q_src == q - k) & (q_hi >= q)]
            self.rounds[k - 1].append((+1, send, recv))
        for k in range(1, left + 1):
            send = sources[(q_src == q + k - 1) & (q_lo <= q - 1)]
            recv = sources[(q_src == q + k) & (q_lo <= q)]
            self.rounds[k - 1].append((-1, send, recv))
        # The worms' heads cross rank boundaries in the same rounds as the tiles.
        w = self.worms
        far = w.src + w.direction * w.hops
        q_wsrc, q_far = owner(w.src), owner(far)
        # per round: [(direction, worms sent, their rows in the batch sent from, batch received)]
        self.worm_rounds = [[] for _ in self.rounds]
        for direction, rounds in ((+1, right), (-1, left)):
            along = w.direction == direction
            for k in range(1, rounds + 1):
                if direction > 0:
                    send = np.flatnonzero(along & (q_wsrc == q - k + 1) & (q_far >= q + 1))
                    recv = np.flatnonzero(along & (q_wsrc == q - k) & (q_far >= q))
                else:
                    send = np.flatnonzero(along & (q_wsrc == q + k - 1) & (q_far <= q - 1))
                    recv = np.flatnonzero(along & (q_wsrc == q + k) & (q_far <= q))
                self.worm_rounds[k - 1].append((direction, send, recv))
        start, stop = offsets[q], offsets[q + 1]
        self.worm_j0, self.worm_links = worms.local_hops(w, int(start), int(stop))
        self.own_worms = np.flatnonzero((w.src >= start) & (w.src < stop))
        self.own_senders, self.own_sender_of = np.unique(w.src[self.own_worms] - start, return_inverse=True)
        self.own_sender_of = self.own_sender_of.reshape(-1)
        self.own_senders_in_order = bool(np.array_equal(self.own_sender_of, np.arange(self.own_worms.size)))
        self.own_senders_run = _run_of(self.own_senders)
        rows = w.src[self.own_worms] - start          # a slice (no copy) when they are a sorted run
        self.own_source_positions = rows
        run = _run_of(rows) if np.unique(rows).size == rows.size else None
        self.own_source_rows = slice(run[1], run[2]) if run is not None and run[0] is None else rows
        self.touching = np.flatnonzero(self.worm_links >= 0)      # worms that reach this block
        self.touch_row = np.full(w.src.size, -1, np.int64)
        self.touch_row[self.touching] = np.arange(self.touching.size)
        mine = (self.dst >= start) & (self.dst < stop)
        self.delivery_worm = w.delivery_worm[mine]
        self.delivery_column = w.delivery_hop[mine] - self.worm_j0[self.delivery_worm]
        self.links_shared = bool(self.load.max(initial=1) > 1)
        self.local_deliveries = np.flatnonzero(mine)
        self.block_start = int(start)
        # Every batch of worms this block advances, planned once: its own, then each round's.
        self.own_batch = self._batch(self.own_worms)
        # Unicast worms, one per sender, that either all stay inside their blocks (on any rank:
        # the rounds are global) or each cross at most one block boundary on links of their own:
        # a start is one compiled pass over this block's own worms and, when some cross, one
        # exchange (the heads leaving; what those arriving will meet, for their senders'
        # back-pressure) and a pass over the worms arriving (:meth:`_start_one_pass`). Set again
        # once a remapped wafer is known.
        in_block = not self.worm_rounds and self.own_batch.index.size == self.own_worms.size
        one_crossing = len(self.worm_rounds) == 1 and not self.links_shared
        self.one_pass = not self.multicast and self.own_senders_in_order and (in_block or one_crossing)
        self.one_pass_inside = self.one_pass and in_block      # started entirely by start_own
        # Multicasts inside their blocks (on any rank): walked and landed along their paths in
        # one compiled pass (:meth:`_start_multicast`). Set again once a remapped wafer is known.
        self.one_pass_multicast = self.multicast and not self.worm_rounds and not self.relay and not self.links_shared
        delivery = np.full(self.own_worms.size, -1, np.int64)
        delivery[self.own_batch.rows] = np.arange(self.own_batch.rows.size)
        self.own_delivery = delivery        # per own worm: its delivery in the own batch, or -1
        # Each round: per direction, the rows of the heads sent (in the batch they were last
        # advanced in), the batch received and the two neighbours; back-pressure runs the rounds
        # backwards: the ``need`` rows of the batch received go back, those of the worms sent
        # come in.
        latest = {+1: self.own_worms, -1: self.own_worms}
        self.back_rounds = []
        for stage in self.worm_rounds:
            back = []
            for i, (direction, send, recv) in enumerate(stage):
                row_of = np.full(w.src.size, -1, np.int64)
                row_of[latest[direction]] = np.arange(latest[direction].size)
                batch = self._batch(recv)
                ahead, behind = mesh.links.neighbour(axis, direction), mesh.links.neighbour(axis, -direction)
                stage[i] = (direction, row_of[send], batch, ahead, behind)
                back.append((self.touch_row[batch.worms.which], self.touch_row[send], behind, ahead))
                latest[direction] = recv
            self.back_rounds.append(back)
        # Per direction of a pattern of one crossing: the worms leaving this block as the
        # neighbour ahead advances them (its links, in path order, are reported to this rank).
        self.leaving = [self._ahead_batch(direction, self.own_worms[send_rows])
                        for direction, send_rows, *_ in self.worm_rounds[0]] if one_crossing else []
        local_src = (self.src >= start) & (self.src < stop)
        from_block, from_pool = np.flatnonzero(mine & local_src), np.flatnonzero(mine & ~local_src)
        # Numeric landings: (destinations, None: this block's own tiles, their rows) and the same
        # for the tiles received from other ranks, in the order of the rounds (pool rows).
        pool_src = np.concatenate([recv for stage in self.rounds for _, _, recv in stage] or [np.empty(0, np.int64)])
        lookup = np.full(self.n, -1, np.int64)
        lookup[pool_src] = np.arange(pool_src.size)
        self.block_landing = (self.dst[from_block] - start, None, self.src[from_block] - start)
        self.pool_landing = (self.dst[from_pool] - start, lookup[self.src[from_pool]])

    def _ahead_batch(self, direction: int, which: np.ndarray) -> worms.Batch:
        """Worms ``which`` as the block one rank ahead along ``direction`` advances them."""
        offsets, k = self.mesh.offsets[self.axis], self.mesh.rank_coord(self.axis) + direction
        start, stop = (int(offsets[k]), int(offsets[k + 1])) if 0 <= k < offsets.size - 1 else (0, 0)
        j0, count = worms.local_hops(self.worms, start, stop)
        return worms.batch(self.worms, which, j0[which], count[which], start)

    def _batch(self, which: np.ndarray) -> "_Batch":
        """The plan of advancing worms ``which`` on this block and landing their deliveries here."""
        first = self.block_start
        row_of = np.full(self.worms.src.size, -1, np.int64)
        row_of[which] = np.arange(which.size)
        here = np.flatnonzero(row_of[self.delivery_worm] >= 0)
        here = here[np.argsort(self.dst[self.local_deliveries[here]], kind="stable")]   # by destination
        index = self.local_deliveries[here]
        dests = self.dst[index] - first
        # a multicast worm lands at the cores along its path, a unicast one at its end
        columns = self.delivery_column[here] if self.multicast else np.zeros(here.size, np.int64)
        return _Batch(worms.batch(self.worms, which, self.worm_j0[which], self.worm_links[which], first),
                      index, row_of[self.delivery_worm[here]], columns, dests,
                      self.touch_row[self.delivery_worm[here]], _run_of(dests))

    # ---------------------------------------------------------------- execution
    def start(self, src: MeshArray, dst: MeshArray | None = None, lines=None, *,
              depart: np.ndarray | None = None, payload: bool = True, land: bool = True) -> "Transfer":
        """Begin delivering ``src`` tiles into ``dst`` (default: into ``src``) on the given
        lines (global indices; default all). Returns a :class:`Transfer`; the tiles land at its
        ``wait``. ``depart`` (block-shaped) replaces the senders' clocks as departure times, and
        ``payload=False`` times the head alone (a streaming stage's schedule, see
        :func:`meshmpi.costs.streaming_stage_head`). ``land=False`` times and counts the
        transfer as usual but leaves every buffer's tiles where they are: the caller keeps
        track of where they would be (a kernel that reads them in place)."""
        dst = src if dst is None else dst
        if dst.tile_shape != src.tile_shape:
            raise ValueError(f"{self.name}: tile shapes differ ({src.tile_shape} vs {dst.tile_shape})")
        self._check_startable(src, dst)
        mesh, axis = self.mesh, self.axis
        line_mask = self.fabric.line_mask(axis, lines)
        active = line_mask.size if lines is None else int(np.count_nonzero(line_mask))
        nbytes = src.tile_bytes
        if not active:
            return Transfer(self, src, dst, [], [], np.flatnonzero(line_mask))
        self._account(line_mask, active, nbytes)
        # Only the active lines are touched (None: all of them, the common case).
        lines_idx = None if active == line_mask.size else np.flatnonzero(line_mask)
        if self.one_pass:
            carry = _Payload(self, _pos_first(src.data, axis) if land and not mesh.dry_run else None)
            arrivals = self._start_one_pass(mesh.clock if depart is None else depart, nbytes, src is dst,
                                            lines_idx, payload, carry)
            landings = [] if not land or mesh.dry_run else [self.block_landing] if not self.worm_rounds else \
                [self.block_landing, self.pool_landing[:1] + (carry.pool(),) + self.pool_landing[1:]]
            return Transfer(self, src, dst, arrivals, landings, lines_idx)
        if self.one_pass_multicast and lines_idx is None:
            arrivals = self._start_multicast(mesh.clock if depart is None else depart, nbytes, src is dst, payload)
            return Transfer(self, src, dst, arrivals, [self.block_landing] if land and not mesh.dry_run else [], None)
        send_clock = _pos_first(mesh.clock if depart is None else depart, axis)
        if lines_idx is not None:
            send_clock = send_clock[:, lines_idx]
        # positions first in memory too: the heads gather whole positions at a time
        if payload:   # senders and receivers each start a fabric operation first
            send_clock = np.add(send_clock, self.fabric.transfer_start, out=np.empty(send_clock.shape))
        else:
            send_clock = np.ascontiguousarray(send_clock)
        carry = _Payload(self, _pos_first(src.data, axis) if land and not mesh.dry_run else None)
        arrivals, sends = self._move_heads(send_clock, nbytes, payload, lines_idx, carry, in_place=src is dst)
        landings = [self.block_landing, self.pool_landing[:1] + (carry.pool(),) + self.pool_landing[1:]] \
            if land and not mesh.dry_run else []
        return Transfer(self, src, dst, arrivals + ([sends] if sends is not None else []), landings, lines_idx)

    def _check_startable(self, *buffers: MeshArray) -> None:
        """A start needs a live pattern and buffers no other transfer is delivering into."""
        if not self.live:
            raise RuntimeError(f"pattern {self.name!r} was freed")
        for buffer in buffers:
            if buffer.incoming is not None:
                raise HazardError(f"pattern {self.name!r} started on buffer {buffer.name!r} while pattern "
                                  f"{buffer.incoming!r} was still delivering into it")

    def _move_heads(self, send_clock: np.ndarray, nbytes: int, payload: bool, lines_idx, carry: "_Payload",
                    in_place: bool):
        """Move every worm's head over this block's links (:mod:`meshmpi.worms`), forwarding
        heads rank by rank, and mark the links busy. Only the active lines ``lines_idx`` (None:
        all) are computed; ``send_clock`` holds their columns. Returns the landings of the
        deliveries into this block as (destinations, times [D, active lines]) pairs, and (unless
        ``payload`` is off) when this block's senders complete their sends, as one more such
        pair: the receivers' "landed - path capacity" travels back along the worms' rounds."""
        free, hops = self.fabric.link_free(self.axis), self.fabric.link_hops(self.axis)
        if lines_idx is None:
            return self._move_heads_on(free, hops, send_clock, nbytes, payload, carry, in_place, slice(None))
        active = {sign: f[:, lines_idx] for sign, f in free.items()}
        if hops is not None:
            hops = {sign: h[:, lines_idx] for sign, h in hops.items()}
        result = self._move_heads_on(active, hops, send_clock, nbytes, payload, carry, in_place, lines_idx)
        for sign, f in free.items():
            f[:, lines_idx] = active[sign]
        return result

    def _move_heads_on(self, free: dict, hops: dict | None, send_clock: np.ndarray, nbytes: int, payload: bool,
                       carry: "_Payload", in_place: bool, lines_idx):
        """:meth:`_move_heads` on the link free times ``free`` (and, on a remapped wafer, the
        links' physical hops ``hops``) of the lines ``lines_idx`` being computed; each round's
        exchange also forwards the source tiles of ``carry``."""
        fabric, w = self.fabric, self.worms
        snapshot = {sign: f.copy() for sign, f in free.items()} if self.links_shared else None
        split = self._own_split()     # before the fixed times, which then cover its batches
        occupancy, own_occupancy, tails, extra, capacity = self._crossing_times(nbytes, payload, in_place)
        if self.physical is not None:
            physical = costs.path_capacity(self.mesh.hardware, self.physical.delivery_hops[:, lines_idx])
            capacity = {batch: physical[batch.index] for batch in capacity}
        alpha, beta = fabric.alpha, fabric.beta        # one hop; one relay
        arrivals = []
        # A receive is posted when the receiver's program reaches it (its clock, or ``depart``);
        # a core receiving into the buffer it sends from posts once its own tile has left.
        posted = send_clock if extra is None else send_clock + extra
        touch = self.touch_row
        lines = send_clock.shape[1]
        # Back-pressure reaches the source only on a pass-through route: a software relay takes
        # the message off the fabric at the next core (its time is in ``beta``).
        need = np.full((self.touching.size, lines), -np.inf) if payload else None
        track = need is not None and not self.relay

        def advance(batch: _Batch, head_in):
            last, heads = worms.advance(w, batch.worms, head_in, free, alpha, beta, occupancy[batch],
                                        keep_path=self.multicast, snapshot=snapshot, link_hops=hops)
            if batch.index.size:
                landed = np.empty((batch.index.size, lines))
                # the latest each worm's source may finish its send goes to ``need``; a multicast
                # worm delivers at several cores, a unicast one once, on one rank
                _land(last[:, None, :] if heads is None else heads, batch.rows, batch.columns, posted,
                      batch.dests, tails[batch], capacity[batch], need if track else _NO_NEED, batch.need_rows,
                      self.multicast, landed)
                arrivals.append((batch.dests, landed, batch.run))
            return last

        own = self.own_worms
        departing = send_clock[self.own_source_rows]           # the own worms' sources' clocks
        if split is None:
            last = advance(self.own_batch, departing)
        else:           # the worms whose heads the first round forwards first, the others while they travel
            sent, sent_batch, staying, staying_batch = split
            last = np.empty((own.size, lines))
            last[sent] = advance(sent_batch, departing[sent])
        latest = {+1: last, -1: last}        # the heads each direction's next round forwards
        links = self.mesh.links
        for k, stage in enumerate(self.worm_rounds):
            messages = [(np.ascontiguousarray(latest[direction][send_rows]), to,    # heads at the next block
                         np.empty((batch.worms.which.size, lines)), source)
                        for direction, send_rows, batch, to, source in stage]
            tiles = carry.messages(k)
            requests = links.post(messages + tiles, _HEAD_TAG)
            if k == 0 and split is not None:
                last[staying] = advance(staying_batch, departing[staying])
            links.wait(requests)
            carry.arrived(k, tiles)
            for (direction, _, batch, _, _), (_, _, got, _) in zip(stage, messages):
                latest[direction] = advance(batch, got)
        if need is None:
            return arrivals, None
        # Back-pressure: each worm's latest "landed - capacity" travels back to its source.
        for stage in reversed(self.back_rounds if track else ()):
            messages = [(np.ascontiguousarray(need[rows_out]), to, np.empty((rows_in.size, lines)), source)
                        for rows_out, rows_in, to, source in stage]
            links.exchange(messages, _BACK_TAG)
            for (_, rows_in, _, _), (_, _, got, _) in zip(stage, messages):
                np.maximum(need[rows_in], got, out=got)
                need[rows_in] = got
        done = np.empty_like(departing)
        _complete(departing, own_occupancy, need, touch[own], done)
        senders, which = self.own_senders, self.own_sender_of
        if self.own_senders_in_order:                      # one worm per sender, in the senders' order
            return arrivals, (senders, done, self.own_senders_run)
        if senders.size == own.size:                       # one worm per sender
            latest = np.empty((senders.size, lines))
            latest[which] = done
        else:                                              # a multicast root sends both ways
            latest = np.full((senders.size, lines), -np.inf)
            worms.latest_into(latest, which, done)
        return arrivals, (senders, latest, self.own_senders_run)

    def _own_split(self):
        """For :meth:`_move_heads_on`: the rows of the own worms whose heads the first round
        forwards and their batch, and those of the others and theirs (made once); None when
        there is no round, or every own worm's head or none is forwarded."""
        if self._split is False:
            self._split = None
            if self.worm_rounds:
                sent = np.unique(np.concatenate([send_rows for _, send_rows, *_ in self.worm_rounds[0]]))
                if 0 < sent.size < self.own_worms.size:
                    staying = np.setdiff1d(np.arange(self.own_worms.size), sent)
                    self._split = (sent, self._batch(self.own_worms[sent]), staying,
                                   self._batch(self.own_worms[staying]))
        return self._split

    def _crossing_times(self, nbytes: int, payload: bool, in_place: bool) -> tuple:
        """A crossing pattern's fixed times for one tile size (made once): by batch, its worms'
        link occupancy; the own worms' occupancy; by batch, its deliveries' tails; the posting
        delay of a receive in place (per block position, or None); by batch, its deliveries'
        path capacities."""
        times = self._times.get((nbytes, payload, in_place, "crossing"))
        if times is None:
            hw, first = self.mesh.hardware, self.block_start
            occupancy = costs.serialisation(hw, nbytes, self.worms.load).astype(np.float64)
            tails = costs.serialisation(hw, nbytes if payload else 0, self.load)
            capacity = costs.path_capacity(hw, self.hops)
            split = self._split if self._split else ()       # planned by the general path only
            batches = [self.own_batch] + [batch for stage in self.worm_rounds for _, _, batch, _, _ in stage] + \
                list(split[1::2])
            by_batch = {batch: np.ascontiguousarray(occupancy[batch.worms.which]) for batch in batches}
            extra = None
            if in_place:
                senders = self.send_load[first:first + self.fabric.block_length(self.axis)]
                extra = np.asarray(costs.serialisation(hw, nbytes, senders), np.float64)[:, None]
            times = self._times[nbytes, payload, in_place, "crossing"] = (
                by_batch, np.ascontiguousarray(occupancy[self.own_worms]),
                {batch: tails[batch.index] for batch in batches}, extra,
                {batch: capacity[batch.index][:, None] for batch in batches})
        return times

    def _start_one_pass(self, clock: np.ndarray, nbytes: int, in_place: bool, lines_idx, payload: bool,
                        carry: "_Payload") -> list:
        """:meth:`_move_heads` for a pattern of :attr:`one_pass`, from the senders' clocks
        ``clock`` (block-shaped), on the lines ``lines_idx`` (None: all): the own worms in one
        compiled pass (those landing here land and complete there), then, for worms that cross
        a block boundary, :meth:`_cross`. The same times as the general path, as (destinations,
        landings, run) and, with ``payload``, (senders, completions, run)."""
        every, free, clock = self._on_lines(clock, lines_idx)
        arrivals = self._one_pass(clock, free, nbytes, in_place, payload, carry)
        self._write_back(every, free, lines_idx)
        return arrivals

    def _one_pass(self, clock: np.ndarray, free: dict, nbytes: int, in_place: bool, payload: bool,
                  carry: "_Payload") -> list:
        """:meth:`_start_one_pass` on its working arrays: the senders' clocks and the links'
        free times ([position, line], the latter updated in place) of the lines it runs on."""
        fabric, own = self.fabric, self.own_batch
        read = {sign: f.copy() for sign, f in free.items()} if self.links_shared else free
        start = fabric.transfer_start if payload else 0.0
        lines = clock.shape[1]
        landed = np.empty((own.index.size, lines))
        done = np.empty((self.own_worms.size if payload else 0, lines))
        last = np.empty((self.own_worms.size if self.worm_rounds else 1, lines))   # heads kept to forward
        start_own(clock, start, free[+1], free[-1], read[+1], read[-1], self.links_shared,
                  *self.own_walk(nbytes, payload, in_place), landed, done, last)
        arrivals = [(own.dests, landed, own.run)]
        if self.worm_rounds:
            arrivals += self._cross(clock, free, nbytes, in_place, payload, carry, last, done)
        if payload:
            arrivals.append((self.own_senders, done, self.own_senders_run))
        return arrivals

    def own_walk(self, nbytes: int, payload: bool, in_place: bool) -> tuple:
        """What :func:`start_own` takes about this pattern's own worms for one tile size (made
        once): per worm its walk (sign, first local link, local links, relayed), source
        position, occupancy and delivery; per delivery its destination, tail and path
        capacity; the posting delay of a receive in place; and the walk's constants."""
        key = (nbytes, payload, in_place, "own")
        walk = self._times.get(key)
        if walk is None:
            own = self.own_batch
            _, occupancy, tails, extra, capacity = self._crossing_times(nbytes, payload, in_place)
            walk = self._times[key] = (
                own.worms.sign, own.worms.first, own.worms.links, own.worms.relayed, self.own_source_positions,
                occupancy, self.own_delivery, own.dests, tails[own], capacity[own],
                NO_EXTRA if extra is None else extra, not self.relay, self.fabric.alpha,
                self.fabric.beta if self.relay else 0.0)
        return walk

    def _start_multicast(self, clock: np.ndarray, nbytes: int, in_place: bool, payload: bool) -> list:
        """:meth:`_move_heads` for a pattern of :attr:`one_pass_multicast` on every line, from the
        senders' clocks ``clock`` (block-shaped), in one compiled pass (:func:`_multicast_own`):
        the same times, as (destinations, landings, run) and, with ``payload``, (senders,
        completions, run)."""
        key = (nbytes, payload, in_place, "multicast")
        walk = self._times.get(key)
        if walk is None:     # own_walk's, with each worm's deliveries together along its path
            own = self.own_batch
            sign, first, links, _, sources, occupancy, _, dests, tails, capacity, extra, *_ = \
                self.own_walk(nbytes, payload, in_place)
            order = np.argsort(own.rows, kind="stable")
            starts = np.searchsorted(own.rows[order], np.arange(own.worms.which.size + 1))
            walk = self._times[key] = (sign, first, links, sources, occupancy, order, starts, own.columns, dests,
                                       tails, capacity, extra, self.own_sender_of, own.worms.width)
        free = self.fabric.link_free(self.axis)
        lines = free[+1].shape[1]
        landed = np.empty((self.own_batch.index.size, lines))
        latest = np.full((self.own_senders.size if payload else 0, lines), -np.inf)
        _multicast_own(_pos_first(clock, self.axis), self.fabric.transfer_start if payload else 0.0, free[+1],
                       free[-1], *walk, self.fabric.alpha, payload, landed, latest)
        arrivals = [(self.own_batch.dests, landed, self.own_batch.run)]
        return arrivals + [(self.own_senders, latest, self.own_senders_run)] if payload else arrivals

    def _cross(self, clock, free, nbytes: int, in_place: bool, payload: bool, carry: "_Payload", last, done) -> list:
        """The crossing part of :meth:`_start_one_pass`: one exchange with each neighbour of the
        heads leaving (``last``), their tiles and, for back-pressure, what the worms arriving
        from it will meet here; the heads arriving walked and landed (returned as arrivals);
        the leaving worms walked on what their receivers reported, to their sends'
        completions (into ``done``)."""
        fabric = self.fabric
        occupancy, own_occupancy, tails, extra, capacity = self._crossing_times(nbytes, payload, in_place)
        start = fabric.transfer_start if payload else 0.0
        alpha, lines = fabric.alpha, clock.shape[1]
        stage = self.worm_rounds[0]
        messages = [(np.ascontiguousarray(last[send_rows]), ahead, np.empty((batch.worms.which.size, lines)), behind)
                    for _, send_rows, batch, ahead, behind in stage]
        # Back-pressure without a second exchange: each receiver reports, with the heads, what
        # the arriving worms will meet (its links' free times in path order and the posting at
        # the destination); the senders walk and land their leaving worms on that themselves.
        track = payload and not self.relay
        reports = []
        if track:
            for (_, _, batch, ahead, behind), leaving in zip(stage, self.leaving):
                report = np.empty((batch.worms.which.size, batch.worms.width + 1, lines))
                if batch.worms.which.size:      # no worms (from beyond the mesh's edge, say): nothing to report
                    _report_paths(free[+1], free[-1], batch.worms.sign, batch.worms.first, batch.worms.links,
                                  batch.rows, batch.dests, clock, start, NO_EXTRA if extra is None else extra, report)
                reports.append((report, behind, np.empty((leaving.which.size, leaving.width + 1, lines)), ahead,
                                _BACK_TAG))
        tiles, arrivals = carry.messages(0), []
        self.mesh.links.exchange(messages + tiles + reports, _HEAD_TAG)
        carry.arrived(0, tiles)
        for (_, _, batch, _, _), (_, _, heads_in, _) in zip(stage, messages):
            if not batch.worms.which.size:
                continue
            head, _ = worms.advance(self.worms, batch.worms, heads_in, free, alpha, fabric.beta, occupancy[batch],
                                    keep_path=False)
            posted = clock[batch.dests] + start
            if extra is not None:
                posted += extra[batch.dests]
            arrived = np.empty((batch.index.size, lines))
            _land(head[:, None, :], batch.rows, batch.columns, posted, self._positions(batch.dests.size),
                  tails[batch], capacity[batch], _NO_NEED, batch.rows, False, arrived)
            arrivals.append((batch.dests, arrived, batch.run))
        if payload:
            leaving_times = self._leaving_times(nbytes, payload) if track else None
            for k, (_, send_rows, _, _, _) in enumerate(stage):
                if not send_rows.size:
                    continue
                departing = clock[self.own_source_positions[send_rows]] + start
                sent = np.empty((send_rows.size, lines))
                if track:
                    busy, tail, cap = leaving_times[k]
                    _complete_leaving(last[send_rows], reports[k][2], self.leaving[k].links, busy, tail, cap,
                                      departing, alpha, sent)
                else:
                    _complete(departing, own_occupancy[send_rows], np.full((send_rows.size, lines), -np.inf),
                              self._positions(send_rows.size), sent)
                done[send_rows] = sent
        return arrivals

    def _leaving_times(self, nbytes: int, payload: bool) -> list:
        """Per direction, the leaving worms' link occupancy, their deliveries' tails and path
        capacities (unicast: worm i is delivery i), for one tile size (made once)."""
        times = self._times.get((nbytes, payload, "leaving"))
        if times is None:
            hw = self.mesh.hardware
            occupancy = costs.serialisation(hw, nbytes, self.worms.load).astype(np.float64)
            tails = np.asarray(costs.serialisation(hw, nbytes if payload else 0, self.load), np.float64)
            capacity = np.asarray(costs.path_capacity(hw, self.hops), np.float64)
            times = self._times[nbytes, payload, "leaving"] = [
                (np.ascontiguousarray(occupancy[b.which]), tails[b.which], capacity[b.which]) for b in self.leaving]
        return times

    def _on_lines(self, clock: np.ndarray, lines_idx) -> tuple:
        """A one-pass start's working arrays on the lines ``lines_idx`` (None: all): the axis's
        link free times, those of the active lines (copies, see :meth:`_write_back`), and the
        senders' clocks, positions first and contiguous."""
        every = self.fabric.link_free(self.axis)
        clock = _pos_first(clock, self.axis)
        if lines_idx is None:
            return every, every, np.ascontiguousarray(clock)
        return every, {sign: f[:, lines_idx] for sign, f in every.items()}, clock[:, lines_idx]

    @staticmethod
    def _write_back(every: dict, free: dict, lines_idx) -> None:
        """The active lines' link free times (:meth:`_on_lines`) back into the axis's."""
        if lines_idx is not None:
            for sign, f in every.items():
                f[:, lines_idx] = free[sign]

    def _positions(self, count: int) -> np.ndarray:
        """``0 .. count - 1``, kept: rows that index a batch's own arrays."""
        got = self._aranges.get(count)
        if got is None:
            got = self._aranges[count] = np.arange(count)
        return got

    def run(self, src: MeshArray, dst: MeshArray | None = None, lines=None) -> None:
        """``start`` and ``wait`` at once."""
        self.start(src, dst, lines).wait()

    def repeat(self, arr: MeshArray, times: np.ndarray, label: str) -> None:
        """Run this pattern on ``arr`` in place ``times[l]`` times in a row on each global line
        ``l`` (a rotation's rounds): round r, on the lines with ``times > r``, is a step labelled
        ``f"{label} {r}"``, timed and counted as ``start(arr, arr, lines, land=False)`` and
        ``wait`` would; no tile moves (the caller moves them once, as
        :func:`meshmpi.relocate.relocate` does). The lines are ordered so that each round's are
        the first ones. A pattern inside its block runs every round in one compiled pass
        (:func:`_repeat_own`); one whose worms cross into a neighbour's block, in one
        :meth:`_one_pass` and one exchange a round (:meth:`_repeat_crossing`)."""
        rounds = int(times.max(initial=0))
        if not self.one_pass:
            for r in range(rounds):
                self.start(arr, arr, lines=np.flatnonzero(times > r), land=False).wait()
                self.mesh.step(f"{label} {r}")
            return
        self._check_startable(arr)
        mesh, axis, nbytes = self.mesh, self.axis, arr.tile_bytes
        lo, hi = mesh.axis_lines(axis)
        local = np.asarray(times[lo:hi], np.int64)
        order = np.argsort(-local, kind="stable")
        active = (local[:, None] > np.arange(rounds)[None, :]).sum(axis=0)
        free = self.fabric.link_free(axis)
        clocks = np.empty(rounds)
        if self.one_pass_inside:
            _repeat_own(_pos_first(mesh.clock, axis), order, active, self.fabric.transfer_start, free[+1], free[-1],
                        self.links_shared, *self.own_walk(nbytes, True, True), self.own_senders, clocks)
        else:
            self._repeat_crossing(free, order, active, nbytes, clocks)
        rows, per_position, sums = self.counts(nbytes)
        per = dict(sums)
        added = np.stack([per["messages_sent"] * active, per["bytes_sent"] * active, 0 * active], axis=1)
        hops = np.where(active > 0, self.max_hops, 0)
        mesh.timeline.record_steps([f"{label} {i}" for i in range(rounds)], added, hops, clocks=clocks)
        mesh.count_lines(rows, axis, per_position, local, sums)
        mesh.max_hops = max(mesh.max_hops, int(hops.max(initial=0)))

    def _repeat_crossing(self, free: dict, order: np.ndarray, active: np.ndarray, nbytes: int,
                         latest: np.ndarray) -> None:
        """:meth:`repeat`'s rounds for a pattern of :attr:`one_pass` whose worms cross block
        boundaries, on [line, position] copies of the clocks and the link free times ``free``
        with the lines in ``order``: round r is :meth:`_one_pass` (one exchange with the
        neighbours, whose lines are the same and in the same order) on the first ``active[r]``
        lines, then its wait; ``latest[r]``: the block's latest clock after it."""
        lines_first = _pos_first(self.mesh.clock, self.axis).T
        clock = lines_first[order]
        links = {sign: f.T[order] for sign, f in free.items()}
        rounds = active.size
        finished = clock[active[0] if rounds else 0:].max(initial=-np.inf)   # lines with no round left
        for r in range(rounds):
            n = active[r]
            arrivals = self._one_pass(clock[:n].T, {sign: f[:n].T for sign, f in links.items()}, nbytes, True, True,
                                      _Payload(self, None))
            for dests, arrival, _ in arrivals:
                _raise_at(clock, True, dests, arrival, _ALL_LINES)
            going_on = active[r + 1] if r + 1 < rounds else 0
            finished = max(finished, clock[going_on:n].max(initial=-np.inf))
            latest[r] = max(finished, clock[:going_on].max(initial=-np.inf))
        lines_first[order] = clock
        for sign, f in free.items():
            f.T[order] = links[sign]

    def _account(self, line_mask: np.ndarray, active: int, nbytes: int) -> None:
        """A start's counts on the ``active`` lines of ``line_mask``."""
        mesh = self.mesh
        counts = self.counts(nbytes)
        mesh.count_along(counts[0], self.axis, counts[1], line_mask, active, counts[2])
        if self.physical is not None:       # a stretched link's extra physical hops
            mesh.count_cores("hops", self.physical.extra_hops * line_mask, self.axis)
            mesh.count_cores("byte_hops", self.physical.extra_hops * line_mask * nbytes, self.axis)
        mesh.max_hops = max(mesh.max_hops, self.max_hops)
        mesh.timeline.note_transfer(self.max_hops)

    def counts(self, nbytes: int) -> tuple:
        """What one start of ``nbytes`` tiles adds to each counter on every line, per position
        of this block: the counters' rows, their per-position values and those values' sums
        (made once per tile size)."""
        counts = self._counts.get(nbytes)
        if counts is None:
            counts = self._counts[nbytes] = self._counts_of(nbytes)
        return counts

    def _counts_of(self, nbytes: int) -> tuple:
        per = {"messages_sent": self.messages_sent, "bytes_sent": self.messages_sent * nbytes,
               "bytes_recv": self.received * nbytes, "hops": self.hops_sent,
               "byte_hops": self.hops_sent * nbytes}                   # the fabric's energy
        if self.relay:
            per["relays"] = self.relays_at
        start = self.block_start
        stop = start + self.fabric.block_length(self.axis)
        values = np.stack([v[start:stop] for v in per.values()]).astype(np.int64)
        return (np.array([COUNTERS.index(name) for name in per], np.int64), values,
                list(zip(per, (int(v) for v in values.sum(axis=1)))))

    def revive(self, name: str, group: str | None) -> None:
        """A freed pattern planned again under ``name``: its routes are declared anew."""
        self.name, self.group = name, group or name
        self.mesh.routes.declare(self.axis, self.group, id(self), self.routes)
        self.live = True

    def free(self) -> None:
        """Release this pattern's routes."""
        if self.live:
            self.mesh.routes.release(self.axis, self.group, id(self))
            self.fabric.forget(self)
            self.live = False


class _Payload:
    """The source tiles of one start, forwarded rank by rank in the same exchanges as the worms'
    heads, round by round (``tiles`` None in a dry run: nothing to forward)."""

    def __init__(self, pattern: LinePattern, tiles: np.ndarray | None):
        self.pattern, self.tiles = pattern, tiles
        self.held = {}   # source position -> tile rows received in an earlier round
        self.got = []

    def messages(self, k: int) -> list:
        """Round ``k``'s messages, as :meth:`meshmpi.links.NeighbourLinks.exchange` takes them."""
        if self.tiles is None:
            return []
        p, tiles = self.pattern, self.tiles
        links = p.mesh.links
        return [(_pick(send, tiles, self.held, p.block_start), links.neighbour(p.axis, direction),
                 np.empty((recv.size,) + tiles.shape[1:], tiles.dtype), links.neighbour(p.axis, -direction),
                 _DATA_TAG) for direction, send, recv in p.rounds[k]]

    def arrived(self, k: int, messages: list) -> None:
        forwarded = k + 1 < len(self.pattern.rounds)      # a later round may forward these tiles
        for (_, _, recv), (_, _, data_in, _, _) in zip(self.pattern.rounds[k], messages):
            self.got.append(data_in)
            for i, s in enumerate(recv.tolist() if forwarded else ()):
                self.held[s] = data_in[i]

    def pool(self) -> np.ndarray | None:
        """Every tile received from other ranks, in the order of the rounds."""
        if not self.got:
            return None
        return self.got[0] if len(self.got) == 1 else np.concatenate(self.got)


@numba.njit(cache=True, nogil=True)
def start_own(clock, start_cost, free_right, free_left, read_right, read_left, shared, sign, first, links,
               relayed, sources, occupancy, delivery, dests, tails, capacity, extra, track, alpha, forwards, landed,
               done, last):
    """A start's own worms, in one pass (``clock`` [position, line]): each departs at its
    sender's clock plus ``start_cost`` and its head walks its local links
    (:func:`meshmpi.worms.walk_worm`; ``read`` the links' free times as the pattern found them,
    the same arrays as ``free`` unless its worms ``shared`` links). One whose delivery
    ``delivery[g]`` is in this block lands there at :func:`meshmpi.costs.landing` (posted at
    the receiver's clock plus ``start_cost`` and ``extra``, per block position when not empty)
    and, unless ``done`` is empty (a head timed alone), its send completes at
    :func:`meshmpi.costs.send_completion` (back-pressure ``landed - capacity`` unless relayed,
    ``track`` off); the others' heads at the block's edge go to ``last`` (one row per worm,
    else one row of scratch) and their completions wait for the receivers' back-pressure."""
    lines = clock.shape[1]
    completes = done.shape[0] > 0
    delays = extra.shape[0] > 0
    scratch = np.empty((5, lines))
    head = np.empty(lines)
    path, hops = np.empty((0, 0)), np.ones((1, 1), np.int64)
    for g in range(sign.size):
        source = sources[g]
        for line in range(lines):
            head[line] = clock[source, line] + start_cost
        right = sign[g] > 0
        at = last[g] if last.shape[0] == sign.size else last[0]
        worms.walk_worm(head, at, path, sign[g], first[g], links[g], occupancy[g],
                        forwards if relayed[g] else 0.0, read_right if right else read_left,
                        free_right if right else free_left, hops, shared, False, alpha, forwards, scratch)
        k = delivery[g]
        if k < 0:
            continue
        d, tail, cap = dests[k], tails[k], capacity[k, 0]
        wait = extra[d, 0] if delays else 0.0
        for line in range(lines):
            x = costs.landing(at[line], clock[d, line] + start_cost + wait, tail)
            landed[k, line] = x
            if completes:
                done[g, line] = costs.send_completion(head[line], occupancy[g], x - cap if track else -np.inf, 0.0)


@numba.njit(cache=True, nogil=True)
def _repeat_own(clock, order, active, start_cost, free_right, free_left, shared, sign, first, links, relayed,
                sources, occupancy, delivery, dests, tails, capacity, extra, track, alpha, forwards, senders, latest):
    """:meth:`LinePattern.repeat` inside the block ([position, line] arrays), on the lines
    taken in ``order`` (most rounds first): round r runs on the first ``active[r]`` of them,
    as :func:`start_own` (tiles sent in place, their sends completed) then its wait
    (receivers' clocks raised to their landings, senders' to their completions);
    ``latest[r]``: the block's latest clock after round r."""
    positions, lines = clock.shape
    at, right, left = np.empty((positions, lines)), np.empty(free_right.shape), np.empty(free_left.shape)
    for i in range(lines):
        at[:, i], right[:, i], left[:, i] = clock[:, order[i]], free_right[:, order[i]], free_left[:, order[i]]
    landed, done, last = np.empty((dests.size, lines)), np.empty((sign.size, lines)), np.empty((1, lines))
    rounds = active.size
    finished = -np.inf      # the latest clock of the lines with no round left
    for i in range(active[0] if rounds else 0, lines):
        finished = max(finished, at[:, i].max())
    for r in range(rounds):
        n = active[r]
        now, now_right, now_left = at[:, :n], right[:, :n], left[:, :n]
        if shared:      # the worms read the links as the round found them
            start_own(now, start_cost, now_right, now_left, now_right.copy(), now_left.copy(), True, sign, first,
                      links, relayed, sources, occupancy, delivery, dests, tails, capacity, extra, track, alpha,
                      forwards, landed[:, :n], done[:, :n], last[:, :n])
        else:
            start_own(now, start_cost, now_right, now_left, now_right, now_left, False, sign, first, links, relayed,
                      sources, occupancy, delivery, dests, tails, capacity, extra, track, alpha, forwards,
                      landed[:, :n], done[:, :n], last[:, :n])
        for k in range(dests.size):
            d = dests[k]
            for i in range(n):
                at[d, i] = max(at[d, i], landed[k, i])
        for g in range(senders.size):
            s = senders[g]
            for i in range(n):
                at[s, i] = max(at[s, i], done[g, i])
        going_on = active[r + 1] if r + 1 < rounds else 0
        for i in range(going_on, n):
            finished = max(finished, at[:, i].max())
        most = finished
        for i in range(going_on):
            most = max(most, at[:, i].max())
        latest[r] = most
    for i in range(lines):
        clock[:, order[i]], free_right[:, order[i]], free_left[:, order[i]] = at[:, i], right[:, i], left[:, i]


@numba.njit(cache=True, nogil=True)
def _multicast_own(clock, start_cost, free_right, free_left, sign, first, links, sources, occupancy, order, starts,
                   columns, dests, tails, capacity, extra, sender_of, width, alpha, payload, landed, latest):
    """A multicast's own worms inside the block, in one pass (``clock`` [position, line]): each
    departs at its sender's clock plus ``start_cost``, its head walks its links
    (:func:`meshmpi.worms.walk_worm`, the head at each core kept), and each of its deliveries
    (``order[starts[g]:starts[g + 1]]``, at path column ``columns[k]``) lands at
    :func:`meshmpi.costs.landing` (posted at the receiver's clock plus ``start_cost`` and
    ``extra``). With ``payload``, the worm's send completes at
    :func:`meshmpi.costs.send_completion` with back-pressure the latest of its deliveries'
    ``landed - capacity``, and its sender's completion ``latest[sender_of[g]]`` is the latest
    of its worms'."""
    lines = clock.shape[1]
    delays = extra.shape[0] > 0
    scratch = np.empty((5, lines))
    head, last, need = np.empty(lines), np.empty(lines), np.empty(lines)
    path = np.empty((width + 1, lines))
    hops = np.ones((1, 1), np.int64)
    for g in range(sign.size):
        source = sources[g]
        for line in range(lines):
            head[line] = clock[source, line] + start_cost
        right = sign[g] > 0
        worms.walk_worm(head, last, path, sign[g], first[g], links[g], occupancy[g], 0.0,
                        free_right if right else free_left, free_right if right else free_left, hops, False, False,
                        alpha, 0.0, scratch)
        need[:] = -np.inf
        for i in range(starts[g], starts[g + 1]):
            k = order[i]
            d, c, tail, cap = dests[k], columns[k], tails[k], capacity[k, 0]
            wait = extra[d, 0] if delays else 0.0
            for line in range(lines):
                x = costs.landing(path[c, line], clock[d, line] + start_cost + wait, tail)
                landed[k, line] = x
                need[line] = max(need[line], x - cap)
        if payload:
            r = sender_of[g]
            for line in range(lines):
                latest[r, line] = max(latest[r, line], costs.send_completion(head[line], occupancy[g], need[line], 0.0))


@numba.njit(cache=True, nogil=True)
def _report_paths(free_right, free_left, sign, first, links, rows, dests, clock, start_cost, extra, report):
    """What the worms arriving in this block will meet, for their senders: per worm g, the free
    times of its local links in path order (``report[g, i]``) and the posting of its delivery
    (``report[g, -1]``: the receiver's clock plus ``start_cost`` and ``extra`` at its block
    position when not empty; delivery d is worm ``rows[d]``'s, at position ``dests[d]``)."""
    width, lines = report.shape[1] - 1, report.shape[2]
    for g in range(sign.size):
        free = free_right if sign[g] > 0 else free_left
        for i in range(links[g]):
            q = first[g] + sign[g] * i
            for line in range(lines):
                report[g, i, line] = free[q, line]
    delays = extra.shape[0] > 0
    for d in range(rows.size):
        g, p = rows[d], dests[d]
        wait = extra[p, 0] if delays else 0.0
        for line in range(lines):
            report[g, width, line] = clock[p, line] + start_cost + wait


@numba.njit(cache=True, nogil=True)
def _complete_leaving(heads, report, links, occupancy, tails, capacity, departing, alpha, done):
    """Each leaving worm's send completion, from its head at the next block (``heads[g]``) and
    what its receiver reported (:func:`_report_paths`): the head walks those links as the
    receiver's walk does (:func:`meshmpi.worms.walk_worm`, no software relays: back-pressure
    is tracked on pass-through routes only), lands at the reported posting, and the send
    completes at :func:`meshmpi.costs.send_completion` with back-pressure ``landed - capacity``."""
    count, lines = heads.shape
    width = report.shape[1] - 1
    scratch = np.empty((5, lines))
    last = np.empty(lines)
    path, hops = np.empty((0, 0)), np.ones((1, 1), np.int64)
    written = np.empty((max(width, 1), lines))
    for g in range(count):
        worms.walk_worm(heads[g], last, path, 1, 0, links[g], occupancy[g], 0.0, report[g], written, hops,
                        False, False, alpha, 0.0, scratch)
        for line in range(lines):
            x = costs.landing(last[line], report[g, width, line], tails[g])
            done[g, line] = costs.send_completion(departing[g, line], occupancy[g], x - capacity[g], 0.0)


_NO_NEED = np.empty((0, 0))
NO_EXTRA = np.empty((0, 1))


@numba.njit(cache=True, nogil=True)
def _land(heads, rows, columns, posted, dests, tails, capacity, need, need_rows, repeat, landed):
    """Land each delivery d of a batch: its worm's head at its core, ``heads[rows[d],
    columns[d]]``, and its receiver's posting, ``posted[dests[d]]``, give ``landed[d]``
    (:func:`meshmpi.costs.landing`, ``tails[d]`` of payload). With ``need`` (non-empty), each
    delivery's ``landed - capacity[d]`` is when its source may finish sending at the latest; it
    goes to row ``need_rows[d]`` (the latest of a row's deliveries when ``repeat``)."""
    count, lines = landed.shape
    track, wide = need.shape[0] > 0, capacity.shape[1] > 1
    for d in range(count):
        r, c, p, tail = rows[d], columns[d], dests[d], tails[d]
        for line in range(lines):
            landed[d, line] = costs.landing(heads[r, c, line], posted[p, line], tail)
        if track:
            n = need_rows[d]
            for line in range(lines):
                late = landed[d, line] - capacity[d, line if wide else 0]
                need[n, line] = max(need[n, line], late) if repeat else late


@numba.njit(cache=True, nogil=True)
def _complete(departing, occupancy, need, need_rows, done):
    """Each own worm's send completes at :func:`meshmpi.costs.send_completion` of its departure
    ``departing[i]``, its occupancy and ``need[need_rows[i]]``, the latest its receivers allow."""
    count, lines = done.shape
    for i in range(count):
        n, busy_for = need_rows[i], occupancy[i]
        for line in range(lines):
            done[i, line] = costs.send_completion(departing[i, line], busy_for, need[n, line], 0.0)


def _run_of(dests: np.ndarray):
    """``(order, lo, hi)`` when the unique positions ``dests`` are the run ``lo..hi-1``
    (``order`` sorts them; None when they already are), else None."""
    if not dests.size:
        return None
    order = np.argsort(dests)
    lo, hi = int(dests[order[0]]), int(dests[order[-1]]) + 1
    if hi - lo != dests.size:
        return None
    return None if np.array_equal(order, np.arange(order.size)) else order, lo, hi


def _raise_to(target: np.ndarray, axis: str, dests: np.ndarray, arrival: np.ndarray, lines, run) -> None:
    """``target`` (block-shaped) at positions ``dests`` (unique) along ``axis`` and ``lines``
    (None: all) becomes ``max(itself, arrival)`` ([positions, lines]). A run of consecutive
    positions on every line (``run``, see :func:`_run_of`) is updated in place in ``target``'s
    own layout; anything else in one compiled pass (:func:`_raise_at`)."""
    if lines is None and run is not None:
        order, lo, hi = run
        if order is not None:
            arrival = arrival[order]
        part = target[:, lo:hi] if axis == "x" else target[lo:hi]
        np.maximum(part, arrival.T if axis == "x" else arrival, out=part)
        return
    _raise_at(target, axis == "x", dests, arrival, _ALL_LINES if lines is None else lines)


_ALL_LINES = np.empty(0, np.int64)


@numba.njit(cache=True, nogil=True)
def _raise_at(target, along_x, dests, arrival, lines):
    """:func:`_raise_to` at any positions: delivery d's line j is ``lines[j]`` (every line in
    order when ``lines`` is empty)."""
    count, width = arrival.shape
    every = lines.size == 0
    step = LINES_AT_ONCE if along_x else width   # along x, a few lines at a time: whole cache lines
    for j0 in range(0, width, step):
        for d in range(count):
            p = dests[d]
            for j in range(j0, min(j0 + step, width)):
                line = j if every else lines[j]
                if along_x:
                    target[line, p] = max(target[line, p], arrival[d, j])
                else:
                    target[p, line] = max(target[p, line], arrival[d, j])


LINES_AT_ONCE = 16    # lines a compiled loop takes at once along x, where a line lies contiguous


@dataclass(eq=False)     # hashed by identity: a pattern's per-batch times are keyed by it
class _Batch:
    """A batch of worms advanced together on one block (:class:`meshmpi.worms.Batch`) and the
    deliveries it lands there: their pattern indices, rows in the batch, path columns,
    destinations (block positions), rows of ``need`` and destinations' run (:func:`_run_of`).
    A delivery's head is at column ``columns`` of its worm's path (0, its end, for a unicast)."""
    worms: worms.Batch
    index: np.ndarray
    rows: np.ndarray
    columns: np.ndarray
    dests: np.ndarray
    need_rows: np.ndarray
    run: tuple | None


class Transfer:
    """An in-flight pattern. ``wait`` lands the tiles in the destination and moves each
    receiver's clock (or the ``into`` array's entry) to max(own, arrival).
    ``landings``: (destinations, received tiles or None for this block's own, sources) pairs;
    ``lines``: this block's active line indices, or None for all lines."""

    def __init__(self, pattern: LinePattern, src: MeshArray, dst: MeshArray, arrivals, landings, lines):
        self.pattern, self.src, self.dst = pattern, src, dst
        self.arrivals, self.landings, self.lines = arrivals, landings, lines
        self.done = False
        self.source_copy = None
        if pattern.fabric.hazard_checks and src.data is not None:
            self.source_copy = src.data.copy()
        dst.incoming = pattern.name

    def wait(self, into: np.ndarray | None = None) -> None:
        if self.done:
            return
        pattern, dst = self.pattern, self.dst
        dst.incoming = None
        if self.source_copy is not None and not np.array_equal(self.src.data, self.source_copy,
                                                                equal_nan=True):
            raise HazardError(f"pattern {pattern.name!r}: its source buffer {self.src.name!r} was "
                              f"written between start and wait")
        self._land()
        target = pattern.mesh.clock if into is None else into
        clock = _pos_first(target, pattern.axis)
        for dests, arrival, run in self.arrivals:
            _raise_to(target, pattern.axis, dests, arrival, self.lines, run)
        if pattern.multicast and pattern.relay and self.arrivals and into is None:
            # a chain: every core that forwarded the message spent a software stage on it
            first = pattern.block_start
            work = pattern.relays_at[first:first + clock.shape[0]] * pattern.fabric.beta
            if self.lines is None:
                clock += work[:, None]
            else:
                clock[:, self.lines] += work[:, None]
        self.done = True

    def _land(self) -> None:
        """Write the delivered tiles into the destination (numeric runs)."""
        if not self.landings:
            return
        out = _pos_first(self.dst.data, self.pattern.axis)
        own = _pos_first(self.src.data, self.pattern.axis)
        in_place = self.dst is self.src
        for dests, data, srcs in self.landings:
            if not dests.size:
                continue
            data = own if data is None else data
            if self.lines is None and not (in_place and data is own):     # no temporary copy
                rows_out, rows_in = _tile_rows(out), _tile_rows(data)
                if rows_out is None or rows_in is None:
                    out[dests] = data[srcs]
                else:
                    _copy_tiles(rows_out, rows_in, dests, srcs)
            elif self.lines is None:
                out[dests] = data[srcs]
            else:
                out[dests[:, None], self.lines[None, :]] = data[srcs[:, None], self.lines[None, :]]


def warm_up() -> None:
    """Load (or compile, the first time) the fabric's and the charges' compiled loops now, on
    empty inputs of the types a run passes them, so that a timed kernel does not pay for it."""
    from .mesh import _charge
    f8, i8 = np.zeros((1, 1)), np.zeros((1, 1), np.int64)
    none_f, none_i, none_b = np.empty(0), np.empty(0, np.int64), np.empty(0, bool)
    start_own(f8, 0.0, f8, f8, f8, f8, False, none_i, none_i, none_i, none_b, none_i, none_f, none_i, none_i,
              none_f, np.empty((0, 1)), NO_EXTRA, True, 1.0, 0.0, np.empty((0, 1)), np.empty((0, 1)),
              np.empty((1, 1)))
    _report_paths(f8, f8, none_i, none_i, none_i, none_i, none_i, f8, 0.0, NO_EXTRA, np.empty((0, 1, 1)))
    _repeat_own(f8, np.zeros(1, np.int64), none_i, 0.0, f8, f8, False, none_i, none_i, none_i, none_b, none_i, none_f,
                none_i, none_i, none_f, np.empty((0, 1)), NO_EXTRA, True, 1.0, 0.0, none_i, none_f)
    _multicast_own(f8, 0.0, f8, f8, none_i, none_i, none_i, none_i, none_f, none_i, np.zeros(1, np.int64), none_i,
                   none_i, none_f, np.empty((0, 1)), NO_EXTRA, none_i, 0, 1.0, True, np.empty((0, 1)),
                   np.empty((0, 1)))
    _complete_leaving(np.empty((0, 1)), np.empty((0, 1, 1)), none_i, none_f, none_f, none_f, np.empty((0, 1)), 1.0,
                      np.empty((0, 1)))
    worms._walk(f8, f8, f8, f8, False, i8, i8, False, none_i, none_i, none_i, none_b, np.empty((0, 1)), none_f,
                1.0, 0.0, np.empty((0, 1)), np.empty((0, 0, 0)))
    _land(np.empty((0, 1, 1)), none_i, none_i, f8, none_i, none_f, np.empty((0, 1)), _NO_NEED, none_i, False,
          np.empty((0, 1)))
    _complete(np.empty((0, 1)), none_f, np.empty((0, 1)), none_i, np.empty((0, 1)))
    _raise_at(f8, True, none_i, np.empty((0, 1)), _ALL_LINES)
    _charge(f8, True, f8, i8, np.broadcast_to(True, (1, 1)), i8, f8)
    # The same loops on the views a run also passes them: along x, [position, line] views of
    # [line, position] blocks ("F"); masks and per-core values broadcast from a line ("A").
    _load_layouts(start_own, dict.fromkeys((0, 2, 3, 4, 5), "F"))
    _load_layouts(_report_paths, dict.fromkeys((0, 1, 7), "F"))
    _load_layouts(_repeat_own, dict.fromkeys((0, 4, 5), "F"))
    _load_layouts(_multicast_own, dict.fromkeys((0, 2, 3), "F"))
    _load_layouts(worms._walk, dict.fromkeys((0, 1, 2, 3), "F"))
    _load_layouts(_charge, {4: "A"})
    _load_layouts(_charge, {5: "A", 6: "A"})
    tiles, index = {layout: numba.types.Array(numba.float32, 3, layout) for layout in "ACF"}, numba.int64[::1]
    for out, data in ("AA", "AC", "CC", "FC", "FF"):    # float32 tiles, as the numeric kernels move
        _copy_tiles.compile((tiles[out], tiles[data], index, index))


def _load_layouts(loop, layouts: dict) -> None:
    """Load ``loop``'s compiled code for its first signature with the arguments at the positions
    ``layouts`` names laid out as it says (numba's "C", "F" or "A")."""
    first = loop.signatures[0]
    loop.compile(tuple(t.copy(layout=layouts[i]) if i in layouts else t for i, t in enumerate(first)))


def _tile_rows(tiles: np.ndarray) -> np.ndarray | None:
    """A [position, line, ...] tile array as a [position, line, tile element] view of it
    (None when its tiles' elements cannot be laid in one row without a copy)."""
    rows = tiles.reshape(tiles.shape[:2] + (-1,))
    return rows if np.may_share_memory(rows, tiles) else None


@numba.njit(cache=True, nogil=True)
def _copy_tiles(out, data, dests, sources):
    """``out[dests[i]] = data[sources[i]]`` ([position, line, tile element] arrays)."""
    for i in range(dests.size):
        d, s = dests[i], sources[i]
        for line in range(out.shape[1]):
            for element in range(out.shape[2]):
                out[d, line, element] = data[s, line, element]


class Fabric:
    """Plans line patterns (cached by shape) and keeps the routes they declare."""

    def __init__(self, mesh, hazard_checks: bool = False):
        self.mesh = mesh
        hw = mesh.hardware     # a head's cycles per hop, per software relay; a transfer's start
        self.alpha, self.beta = float(costs.route_latency(hw, 1)), float(costs.software_stage(hw))
        self.transfer_start = float(costs.transfer_start(hw))
        self.hazard_checks = hazard_checks
        self._plans: dict[tuple, LinePattern] = {}
        self._every_line = {axis: np.ones(mesh.block_shape[0 if axis == "x" else 1], bool) for axis in ("x", "y")}
        for mask in self._every_line.values():
            mask.flags.writeable = False
        self._retired: dict[tuple, LinePattern] = {}   # freed patterns by their deliveries
        self.kernel_plans: dict = {}     # what kernels plan over several patterns, by their own keys
        # When each directed link out of each core is free again, stored positions first
        # ([position along the axis, line]) so that a pattern reads whole lines at a time.
        rows, cols = mesh.block_shape
        self._link_free = {axis: {sign: np.full(shape, -np.inf) for sign in (+1, -1)}
                           for axis, shape in (("x", (cols, rows)), ("y", (rows, cols)))}
        # A remapped wafer (meshmpi.defects) with some logical link longer than one hop: the
        # physical hops of each directed link, stored like the free times. None: a perfect wafer.
        remap = mesh.defects
        self.remap = remap if remap is not None and remap.stretched else None
        self._link_hops = None if self.remap is None else {
            axis: self.remap.block_link_hops(axis, mesh.axis_start(axis), mesh.axis_start(axis) + self.block_length(axis),
                                             slice(*mesh.axis_lines(axis))) for axis in ("x", "y")}

    def block_length(self, axis: str) -> int:
        """This block's positions along ``axis``."""
        return self.mesh.block_shape[1 if axis == "x" else 0]

    def link_hops(self, axis: str) -> dict | None:
        """Physical hops of the links along ``axis``, laid out as :meth:`link_free`; None on a
        wafer whose logical links are all one hop."""
        return None if self._link_hops is None else self._link_hops[axis]

    def link_free(self, axis: str) -> dict:
        """Free times of the links along ``axis`` as ``{+1: ..., -1: ...}`` arrays of shape
        [position along the axis, line]: entry (p, l) is the link leaving core p of line l."""
        return self._link_free[axis]

    def forget_idle_links(self) -> None:
        """Links free since before every core's clock (of the whole mesh) can no longer hold a
        worm up: a head enters a link no earlier than its sender's clock, and clocks only grow.
        Their free times become minus infinity, as on a fresh mesh: the same times from here on,
        and a time state that a steady run can recognise (:mod:`meshmpi.steady`)."""
        mesh = self.mesh
        floor = -mesh.max_over_ranks(-float(mesh.clock.min()) if mesh.clock.size else -np.inf)
        for links in self._link_free.values():
            for free in links.values():
                free[free <= floor] = -np.inf

    def line_mask(self, axis: str, lines) -> np.ndarray:
        """Boolean mask over this block's lines (rows for ``x``, columns for ``y``)."""
        if lines is None:
            return self._every_line[axis]
        mesh = self.mesh
        local = mesh.global_rows() if axis == "x" else mesh.global_cols()
        lines = np.asarray(lines, np.int64)
        hit = np.zeros(mesh.axis_length("y" if axis == "x" else "x"), bool)
        hit[lines[(lines >= 0) & (lines < hit.size)]] = True     # lines off the mesh: none
        return hit[local]

    def plan(self, name: str, axis: str, src, dst, *, multicast: bool = False,
             relay: bool = False, group: str | None = None) -> LinePattern:
        src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
        key = (name, axis, src.tobytes(), dst.tobytes(), multicast, relay, group)
        pattern = self._plans.get(key)
        if pattern is None:
            pattern = self._retired.pop(key[1:6], None)
            if pattern is None:
                pattern = LinePattern(self, name, axis, src, dst, multicast=multicast,
                                      relay=relay, group=group)
            else:
                pattern.revive(name, group)
            pattern.key = key
            self._plans[key] = pattern
        return pattern

    def forget(self, pattern: LinePattern) -> None:
        """Drop a freed pattern from the live plans; its plan is kept for the next pattern of
        the same deliveries (the next layer's, under another name)."""
        key = getattr(pattern, "key", None)
        self._plans.pop(key, None)
        if key is not None:
            self._retired[key[1:6]] = pattern

    # ---------------------------------------------------------------- named patterns
    def shift(self, name: str, axis: str, offset: int, *, lo: int = 0, hi: int | None = None,
              relay: bool = False, group: str | None = None) -> LinePattern:
        """Every core in positions ``[lo, hi)`` sends to the core ``offset`` further on
        (cores whose target falls outside ``[lo, hi)`` send nothing)."""
        hi = self.mesh.axis_length(axis) if hi is None else hi
        src = np.arange(lo, hi)
        dst = src + offset
        keep = (dst >= lo) & (dst < hi)
        return self.plan(name, axis, src[keep], dst[keep], relay=relay, group=group)

    def permutation(self, name: str, axis: str, dest, *, relay: bool = False,
                    group: str | None = None) -> LinePattern:
        """Position ``i`` sends to ``dest[i]`` (a ring step, a rotation, ...); ``dest[i] == i``
        or ``dest[i] < 0`` means no message."""
        dest = np.asarray(dest, np.int64)
        src = np.arange(dest.size)
        keep = (dest >= 0) & (dest != src)
        return self.plan(name, axis, src[keep], dest[keep], relay=relay, group=group)

    def multicast(self, name: str, axis: str, root: int, lo: int = 0, hi: int | None = None,
                  group: str | None = None, relay: bool = False) -> LinePattern:
        """``root`` sends one message that drops a copy on every core of ``[lo, hi)``
        (``relay``: forwarded hop by hop in software instead of on a pass-through route)."""
        hi = self.mesh.axis_length(axis) if hi is None else hi
        dst = np.array([p for p in range(lo, hi) if p != root], np.int64)
        return self.plan(name, axis, np.full(dst.size, root), dst, multicast=True, relay=relay,
                         group=group)

    def multicasts(self, name: str, axis: str, roots, segments, group: str | None = None) -> LinePattern:
        """Several disjoint multicasts at once: ``roots[i]`` covers ``segments[i] = (lo, hi)``."""
        src, dst = [], []
        for root, (lo, hi) in zip(roots, segments):
            targets = [p for p in range(lo, hi) if p != root]
            src += [root] * len(targets)
            dst += targets
        return self.plan(name, axis, src, dst, multicast=True, group=group)

    @contextmanager
    def scope(self):
        """Free every pattern planned inside the block when it ends (routes are released)."""
        before = set(self._plans)
        try:
            yield self
        finally:
            for key in [k for k in self._plans if k not in before]:
                self._plans[key].free()
