"""Moving tiles to where transfers the fabric has already timed would have left them.

A kernel that starts its transfers with ``land=False`` (:meth:`meshmpi.fabric.LinePattern.start`)
has every modeled cost of the moves charged, round by round, but leaves the payload where it
was. :func:`relocate` then moves the payload once, to where all those rounds end. Tiles that end
on another rank travel neighbour by neighbour along the axis (:mod:`meshmpi.links`), one
exchange per rank boundary they cross, carrying only the tiles that leave.
"""
from __future__ import annotations

import numpy as np


def _positions_last(data: np.ndarray, axis: str) -> np.ndarray:
    """A block's tiles as (lines, positions, *tile), a view."""
    return data if axis == "x" else data.swapaxes(0, 1)


def relocate(mesh, arr, axis: str, source: np.ndarray) -> None:
    """Give each core of ``arr`` the tile the core ``source`` names held: ``source[l, p]`` is the
    global position along ``axis``, on this block's line ``l``, whose tile ends at global
    position ``p`` (``source`` is (block lines, axis length) and a permutation on each line;
    every rank along the axis passes the same rows for its lines). Payload only, nothing is
    charged; a dry run has nothing to move."""
    if mesh.dry_run:
        return
    start = mesh.axis_start(axis)
    old = _positions_last(arr.data, axis)
    stop = start + old.shape[1]
    ends_here = source[:, start:stop]
    new = np.empty_like(old)
    local = (ends_here >= start) & (ends_here < stop)
    lines = np.broadcast_to(np.arange(old.shape[0])[:, None], local.shape)
    new[local] = old[lines[local], ends_here[local] - start]
    offsets = mesh.offsets[axis]
    owner = np.searchsorted(offsets, np.arange(offsets[-1]), "right") - 1
    crossing = owner[source] != owner[None, :]      # the same on every rank of the axis
    if crossing.any():
        _arrive_from_other_ranks(mesh, axis, owner, crossing, source, old, new, start)
    arr.data = new if axis == "x" else new.swapaxes(0, 1)


def _arrive_from_other_ranks(mesh, axis: str, owner, crossing, source, old, new, start: int) -> None:
    """The ``crossing`` tiles, whose start and end lie on different ranks along ``axis``
    (``owner``: each position's rank), forwarded one rank boundary per round in both
    directions. Every rank of the axis works out every rank's sends from ``source``, so both
    ends of a message know its size and its order (by tile id)."""
    me, ranks = mesh.rank_coord(axis), len(mesh.offsets[axis]) - 1
    line, end = np.nonzero(crossing)
    begin = source[line, end]
    begin_rank, end_rank = owner[begin], owner[end]
    carried = {}        # per direction: the tiles this rank holds that go on that way, by id
    for direction in (+1, -1):
        ids = np.flatnonzero((begin_rank == me) & ((end_rank - me) * direction > 0))
        carried[direction] = (ids, old[line[ids], begin[ids] - start])
    for round_ in range(1, ranks):
        messages = []
        for direction in (+1, -1):
            # received this round: tiles one boundary from here, still going this way
            coming = np.flatnonzero((begin_rank + direction * round_ == me)
                                    & ((end_rank - me) * direction >= 0))
            into = np.empty((coming.size,) + old.shape[2:], old.dtype)
            messages.append((carried[direction][1], mesh.links.neighbour(axis, direction), into,
                             mesh.links.neighbour(axis, -direction), coming))
        mesh.links.exchange([message[:4] for message in messages], tag=_TAG)
        for direction, (_, _, into, _, coming) in zip((+1, -1), messages):
            here = end_rank[coming] == me
            new[line[coming[here]], end[coming[here]] - start] = into[here]
            carried[direction] = (coming[~here], into[~here])


_TAG = 71
