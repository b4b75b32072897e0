"""Messages as worms on the directed links of a line: when each head passes each core.

Every message of a pattern is a *worm*: it leaves its source, crosses ``hops`` directed links
one way along the line, and delivers at one core (unicast) or at every core it passes
(multicast). A directed link carries one message's payload at a time: it is busy for the
payload's serialisation from the moment the head enters it, and a later message enters it no
earlier (first come, first served in program order). Messages of one pattern that share a link
do not queue behind each other: they share it ``load`` ways (:func:`meshmpi.costs.serialisation`)
and see the link as it was when the pattern started, so the order of messages inside a
pattern never matters and no result depends on the rank split.

Head recurrence (cut-through, :mod:`meshmpi.costs`): the head reaches core ``p_0`` (the
source) at the send time and enters link ``j`` at ``e_j = max(h_j + b_j, free_j)``, where
``h_j`` is its arrival at the core before the link, ``b_j`` is ``beta`` when that core forwards
the message in software, and ``free_j`` the link's free time; it reaches the next core at
``e_j + alpha``. The payload's tail arrives ``load * bytes / bandwidth`` after the head, and
the link is free again at ``e_j`` plus that time. With every link free this is
``costs.arrival``.

The links of a line are stored by the core they leave: ``free[+1][p]`` is the link p -> p+1,
``free[-1][p]`` the link p -> p-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

_SEQUENTIAL = 4   # up to this many local links a head's entry times are computed link by link


@dataclass
class Worms:
    """The worms of one pattern (global positions along the line)."""
    src: np.ndarray        # [W] source position
    direction: np.ndarray  # [W] +1 or -1
    hops: np.ndarray       # [W] links crossed
    load: np.ndarray       # [W] ways each of its links is shared inside the pattern
    relay: bool            # intermediate cores forward in software (beta each)
    delivery_worm: np.ndarray   # [D] per delivery of the pattern: its worm
    delivery_hop: np.ndarray    # [D] per delivery: how many hops from the source

    @classmethod
    def of_pattern(cls, src, dst, multicast: bool, relay: bool, load) -> "Worms":
        """Unicast: one worm per delivery. Multicast: one worm per source and direction,
        reaching its farthest destination on that side."""
        src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
        direction = np.sign(dst - src)
        if not multicast:
            return cls(src, direction, np.abs(dst - src), np.asarray(load, np.int64), relay,
                       np.arange(src.size), np.abs(dst - src))
        keys = np.stack([src, direction], 1)
        unique, worm_of = np.unique(keys, axis=0, return_inverse=True)
        worm_of = worm_of.reshape(-1)
        hops = np.zeros(unique.shape[0], np.int64)
        np.maximum.at(hops, worm_of, np.abs(dst - src))
        worm_load = np.ones(unique.shape[0], np.int64)
        np.maximum.at(worm_load, worm_of, np.asarray(load, np.int64))
        return cls(unique[:, 0].copy(), unique[:, 1].copy(), hops, worm_load, relay,
                   worm_of, np.abs(dst - src))

    def position(self, worm: np.ndarray, hop: np.ndarray) -> np.ndarray:
        return self.src[worm] + self.direction[worm] * hop


def local_hops(worms: Worms, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Per worm, the first hop index whose core is in ``[start, stop)`` and how many of its
    links leave cores of that block (0 when it only ends there, -1 when it never touches it)."""
    d = worms.direction
    far = worms.src + d * worms.hops
    lo_pos, hi_pos = np.minimum(worms.src, far), np.maximum(worms.src, far)
    touches = (hi_pos >= start) & (lo_pos < stop)
    # the worm's positions in path order: hop j is at src + d*j
    first_pos = np.where(d > 0, np.maximum(worms.src, start), np.minimum(worms.src, stop - 1))
    last_link_pos = np.where(d > 0, np.minimum(far - 1, stop - 1), np.maximum(far + 1, start))
    j0 = np.abs(first_pos - worms.src)
    j_last = np.abs(last_link_pos - worms.src)
    count = np.where(touches, np.maximum(j_last - j0 + 1, 0), -1)
    return j0, count


@dataclass
class Batch:
    """Worms ``which`` advanced together on one block, planned once: per worm its direction,
    the block position owning its first local link, how many local links it crosses (0 or less:
    its head stays at the entry) and whether it enters at a core that forwards it in software."""
    which: np.ndarray
    sign: np.ndarray        # [W] +1 or -1
    first: np.ndarray       # [W] block position of the first local link's owner
    links: np.ndarray       # [W] local links
    relayed: np.ndarray     # [W] bool: the entry core forwards in software (beta)
    width: int              # most local links of any worm


def batch(worms: Worms, which: np.ndarray, j0: np.ndarray, count: np.ndarray, first: int) -> Batch:
    """Plan the batch of worms ``which``, entering the block ``[first, ...)`` at hop ``j0``
    with ``count`` local links (see :func:`local_hops`)."""
    sign = worms.direction[which].astype(np.int64)
    relayed = (j0 > 0) if worms.relay else np.zeros(which.size, bool)
    return Batch(which, sign, worms.src[which] + sign * j0 - first, count.astype(np.int64),
                 np.ascontiguousarray(relayed), int(count.max(initial=0)))


def advance(worms: Worms, plan: Batch, head_in: np.ndarray, free: dict, alpha: float, beta: float,
            occupancy: np.ndarray, keep_path: bool, snapshot: dict | None = None, link_hops: dict | None = None):
    """Move the heads of the batch's worms (entering the block at ``head_in``, shape
    [W, lines]) over their local links, and mark those links busy (``occupancy``: per worm of
    the batch, contiguous float64 cycles from the head's entry). Returns ``last`` [W, lines], the head at the core after the last
    local link (``head_in`` when there is none), and, with ``keep_path``, ``heads``
    [W, max count + 1, lines], the head at each local core along the path (hop ``j0 + i`` at
    column i), else None.

    When worms of the pattern share links, ``snapshot`` holds the links' free times from before
    the pattern started: every worm reads those, and each link ends busy until the latest of
    its worms has left it. Otherwise each link is read and written by one worm only.

    ``link_hops`` (laid out as ``free``): on a remapped wafer (:mod:`meshmpi.defects`), the
    physical hops of each link, which the head crosses in ``alpha`` each; None: one hop each.
    The recurrence runs compiled (:func:`_walk`), one pass over the batch's links."""
    lines = head_in.shape[1]
    last = np.empty((plan.which.size, lines))
    heads = np.empty((plan.which.size, plan.width + 1, lines)) if keep_path else _NO_HEADS
    read = free if snapshot is None else snapshot
    hops = _NO_HOPS if link_hops is None else link_hops
    _walk(free[+1], free[-1], read[+1], read[-1], snapshot is not None, hops[+1], hops[-1], link_hops is not None,
          plan.sign, plan.first, plan.links, plan.relayed, np.ascontiguousarray(head_in),
          occupancy, float(alpha),
          float(beta) if worms.relay else 0.0, last, heads)
    return last, (heads if keep_path else None)


_NO_HEADS = np.empty((0, 0, 0))
_NO_HOPS = {+1: np.ones((1, 1), np.int64), -1: np.ones((1, 1), np.int64)}


@numba.njit(cache=True, nogil=True)
def _walk(free_right, free_left, read_right, read_left, shared, hops_right, hops_left, stretched,
          sign, first, links, relayed, head_in, occupancy, alpha, forwards, last, heads):
    """:func:`walk_worm` for each worm of a batch (``heads`` empty: no path kept)."""
    count, lines = head_in.shape
    keep = heads.shape[0] > 0
    scratch = np.empty((5, lines))
    path = np.empty((0, 0))
    for g in range(count):
        walk_worm(head_in[g], last[g], heads[g] if keep else path, sign[g], first[g], links[g], occupancy[g],
                  forwards if relayed[g] else 0.0, read_right if sign[g] > 0 else read_left,
                  free_right if sign[g] > 0 else free_left, hops_right if sign[g] > 0 else hops_left,
                  shared, stretched, alpha, forwards, scratch)


@numba.njit(cache=True, nogil=True, inline="always")
def walk_worm(head, last, path, s, p, n, busy_for, add, read, write, hops, shared, stretched, alpha, forwards,
              scratch):
    """The head recurrence of the module docstring for one worm entering at ``head`` (per
    line) and crossing ``n`` local links from block position ``p`` in direction ``s``, with the
    lines innermost; ``last`` gets the head after its last link, ``path`` (unless empty) the
    head at each core. A head enters link i at ``e_i = max(e_{i-1} + step_{i-1}, free_i)``
    (``step``: ``alpha`` times the link's physical hops, plus ``forwards`` on relayed paths;
    ``add`` on entering at a relaying core). Up to ``_SEQUENTIAL`` links this is evaluated link
    by link; longer paths use the equivalent running-max form
    ``e_i = max(e_0, max_{j<=i}(free_j - o_j)) + o_j`` with ``o`` the summed steps, which is
    what the head reaches on a free path. Each link is then busy until ``e_i + busy_for`` (the
    latest of its worms' when ``shared``). ``scratch``: [5, lines] of working space."""
    lines = head.size
    keep = path.shape[0] > 0
    if keep:
        path[0, :] = head
    if n <= 0:
        last[:] = head
        return
    enter, entry, running, offset, reach = scratch[0], scratch[1], scratch[2], scratch[3], scratch[4]
    offset[:] = 0.0
    reach[:] = alpha
    for i in range(n):
        q = p + s * i
        if i == 0:
            for line in range(lines):
                entry[line] = max(head[line] + add, read[q, line])
                running[line] = read[q, line]
            enter[:] = entry
        elif n <= _SEQUENTIAL:          # e_i = max(e_{i-1} + step, free_i)
            for line in range(lines):
                enter[line] = max(enter[line] + (reach[line] + forwards), read[q, line])
        else:                           # the running-max form
            if stretched:
                for line in range(lines):
                    offset[line] += reach[line] + forwards
            else:
                offset[:] = (alpha + forwards) * i
            for line in range(lines):
                running[line] = max(running[line], read[q, line] - offset[line])
                enter[line] = max(entry[line], running[line]) + offset[line]
        if stretched:
            for line in range(lines):
                reach[line] = alpha * hops[q, line]
        if keep:
            for line in range(lines):
                path[i + 1, line] = enter[line] + reach[line]
        if shared:
            for line in range(lines):
                write[q, line] = max(write[q, line], enter[line] + busy_for)
        else:
            for line in range(lines):
                write[q, line] = enter[line] + busy_for
    for line in range(lines):
        last[line] = enter[line] + reach[line]


def latest_into(target: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """``target[r] = max(target[r], values of every i with rows[i] == r)`` (rows may repeat)."""
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    unique = rows[starts]
    target[unique] = np.maximum(target[unique], np.maximum.reduceat(values[order], starts, axis=0))
