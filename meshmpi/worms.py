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
    """Worms ``which`` advanced together on one block, planned once: grouped by direction and
    number of local links, each group with its rows in the batch and its links' owners (as
    strided slices too where they are evenly spaced, so the links are read and written in place)."""
    which: np.ndarray
    groups: list            # (sign, rows [G] or a slice, worms [G], link owners [G, L], relayed entry
                            #  [G, 1] or None, per link column its owners as a slice, or None)
    ends_here: np.ndarray   # [W] worms with no local link (their head stays at the entry)
    width: int              # most local links of any worm


def _stride(index: np.ndarray):
    """``index`` as an equivalent slice when it is an increasing arithmetic progression, else None."""
    if index.size == 1:
        return slice(int(index[0]), int(index[0]) + 1)
    step = int(index[1] - index[0])
    if step <= 0 or np.any(np.diff(index) != step):
        return None
    return slice(int(index[0]), int(index[-1]) + 1, step)


def batch(worms: Worms, which: np.ndarray, j0: np.ndarray, count: np.ndarray, first: int) -> Batch:
    """Plan the batch of worms ``which``, entering the block ``[first, ...)`` at hop ``j0``
    with ``count`` local links (see :func:`local_hops`)."""
    direction = worms.direction[which]
    groups = []
    for sign in (+1, -1):
        along = direction == sign
        for n_links in np.unique(count[along]):
            if n_links <= 0:
                continue
            rows = np.flatnonzero((count == n_links) & along)
            w = which[rows]
            hop = j0[rows, None] + np.arange(n_links)[None, :]                   # [G, L]
            pos = worms.src[w][:, None] + sign * hop - first                      # local link owners
            relayed = hop[:, :1] > 0 if worms.relay else None   # a core that forwards in software
            columns = [_stride(pos[:, i]) for i in range(n_links)]
            rows_slice = _stride(rows)
            groups.append((sign, rows if rows_slice is None else rows_slice, w, pos, relayed,
                           columns if n_links <= _SEQUENTIAL and None not in columns else None))
    return Batch(which, groups, count <= 0, int(count.max(initial=0)))


def advance(worms: Worms, plan: Batch, head_in: np.ndarray, free: dict, alpha: float, beta: float,
            occupancy: np.ndarray, keep_path: bool, snapshot: dict | None = None, link_hops: dict | None = None):
    """Move the heads of the batch's worms (entering the block at ``head_in``, shape
    [W, lines]) over their local links, and mark those links busy (``occupancy`` [W] cycles
    from the head's entry). Returns ``last`` [W, lines], the head at the core after the last
    local link (``head_in`` when there is none), and, with ``keep_path``, ``heads``
    [W, max count + 1, lines], the head at each local core along the path (hop ``j0 + i`` at
    column i), else None.

    When worms of the pattern share links, ``snapshot`` holds the links' free times from before
    the pattern started: every worm reads those, and each link ends busy until the latest of
    its worms has left it. Otherwise each link is read and written by one worm only.

    ``link_hops`` (laid out as ``free``): on a remapped wafer (:mod:`meshmpi.defects`), the
    physical hops of each link, which the head crosses in ``alpha`` each; None: one hop each."""
    lines = head_in.shape[1]
    last = np.empty_like(head_in)
    last[plan.ends_here] = head_in[plan.ends_here]
    heads = None
    if keep_path:
        heads = np.empty((plan.which.size, plan.width + 1, lines))
        heads[:, 0] = head_in
    forwards = beta if worms.relay else 0.0
    step = alpha + forwards
    for sign, rows, w, pos, relayed, columns in plan.groups:
        n_links = pos.shape[1]
        entry = head_in[rows]
        if relayed is not None:
            entry = entry + np.where(relayed, forwards, 0.0)
        if snapshot is None and columns is not None and link_hops is None:   # evenly spaced one-hop links: in place
            _advance_in_place([free[sign][c] for c in columns], entry, occupancy[w][:, None], step, alpha,
                              last, rows, heads)
            continue
        link_free = (free if snapshot is None else snapshot)[sign][pos]         # [G, L, lines]
        # e_0 = max(entry, free_0), e_i = max(e_{i-1} + step, free_i)
        enter = np.empty_like(link_free)
        np.maximum(entry, link_free[:, 0], out=enter[:, 0])
        if link_hops is not None:
            reach = alpha * link_hops[sign][pos]                                # [G, L, lines]
            enter = _enter_stretched(enter, link_free, reach + forwards)
            last[rows] = enter[:, -1] + reach[:, -1]
            if heads is not None:
                heads[rows, 1:n_links + 1] = enter + reach
        else:
            if 1 < n_links <= _SEQUENTIAL:
                for i in range(1, n_links):
                    np.maximum(enter[:, i - 1] + step, link_free[:, i], out=enter[:, i])
            elif n_links > _SEQUENTIAL:         # a running max of free - step*i, then add back
                offsets = step * np.arange(n_links)[None, :, None]
                running = np.maximum.accumulate(link_free - offsets, axis=1)
                np.maximum(enter[:, :1], running, out=running)
                enter = running + offsets
            last[rows] = enter[:, -1] + alpha
            if heads is not None:
                heads[rows, 1:n_links + 1] = enter + alpha
        busy = np.add(enter, occupancy[w][:, None, None], out=enter)   # >= the link's old free time
        if snapshot is None:
            free[sign][pos] = busy
        else:
            latest_into(free[sign], pos.ravel(), busy.reshape(-1, lines))
    return last, heads


def _enter_stretched(enter: np.ndarray, link_free: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The head recurrence with a step per link (``steps[:, i]`` from entering link i to
    entering link i+1): ``e_i = max(e_{i-1} + steps_{i-1}, free_i)``, ``enter[:, 0]`` given."""
    n_links = enter.shape[1]
    if n_links <= 4:
        for i in range(1, n_links):
            np.maximum(enter[:, i - 1] + steps[:, i - 1], link_free[:, i], out=enter[:, i])
        return enter
    offsets = np.zeros_like(link_free)              # running max of free - offset, then add back
    np.cumsum(steps[:, :-1], axis=1, out=offsets[:, 1:])
    running = np.maximum.accumulate(link_free - offsets, axis=1)
    np.maximum(enter[:, :1], running, out=running)
    return running + offsets


def _advance_in_place(links: list, entry: np.ndarray, occupancy: np.ndarray, step: float, alpha: float,
                      last: np.ndarray, rows, heads) -> None:
    """:func:`advance` of one group whose link columns are the views ``links`` ([G, lines] each,
    every link used by this group alone): the same arithmetic, without gathering the links."""
    enter = np.maximum(entry, links[0])
    for i in range(1, len(links) + 1):
        if heads is not None:
            heads[rows, i] = enter + alpha
        if i < len(links):
            following = np.add(enter, step)
            np.maximum(following, links[i], out=following)
        np.add(enter, occupancy, out=links[i - 1])
        if i < len(links):
            enter = following
    last[rows] = enter + alpha


def latest_into(target: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """``target[r] = max(target[r], values of every i with rows[i] == r)`` (rows may repeat)."""
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    unique = rows[starts]
    target[unique] = np.maximum(target[unique], np.maximum.reduceat(values[order], starts, axis=0))
