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

The ring's steps exchange different segments and stay store-and-forward per step.
"""
from __future__ import annotations

import math

import numpy as np

from meshmpi import costs
from meshmpi.mesh import block_offsets

from .ring import interleaved_ring

ALGOS = ("ktree", "pipeline", "ring")
FORWARDING = ("stream", "store")
_OPS = {"sum": np.add, "max": np.maximum}


def default_groups(n: int) -> int:
    """About sqrt(N) groups (PAPER.md §3)."""
    return max(1, int(round(math.sqrt(n))))


def allreduce(mesh, acc, axis: str, op: str = "sum", algo: str = "ktree",
              groups: int | None = None, name: str = "allreduce", forwarding: str = "stream") -> None:
    """Reduce ``acc`` (1-D tiles) in place along ``axis``; every core gets the result."""
    if algo not in ALGOS:
        raise ValueError(f"allreduce algorithm must be one of {ALGOS}, not {algo!r}")
    if forwarding not in FORWARDING:
        raise ValueError(f"chain forwarding must be one of {FORWARDING}, not {forwarding!r}")
    n = mesh.axis_length(axis)
    if n == 1:
        return
    with mesh.phase(f"{name}.{algo}"):
        if algo == "ring":
            _ring(mesh, acc, axis, op, name)
        else:
            g = 1 if algo == "pipeline" else min(n, groups or default_groups(n))
            _tree(mesh, acc, axis, op, g, name, root_last=(algo == "pipeline"), forwarding=forwarding)


def _combine(mesh, acc, incoming, op: str, where: np.ndarray) -> None:
    """acc = op(acc, incoming) on the masked cores (numeric runs)."""
    if where.any() and not mesh.dry_run:
        acc.data[where] = _OPS[op](acc.data[where], incoming.data[where])


def _chains(mesh, acc, axis, op, name, tag, links_left, links_right, buffers, forwarding) -> None:
    """Run two chains stage by stage; ``links_*[s]`` are the (src, dst) pairs of stage s."""
    fabric, hw = mesh.fabric, mesh.hardware
    streaming = forwarding == "stream"
    head = mesh.clock.copy() if streaming else None     # when each core's stream can leave
    involved = np.zeros(mesh.block_shape, bool)
    for stage in range(max(len(links_left), len(links_right))):
        started = []
        for side, links, buf in (("left", links_left, buffers[0]), ("right", links_right, buffers[1])):
            if stage < len(links) and links[stage]:
                src, dst = zip(*links[stage])
                # One schedule's colours serve every allreduce along this axis.
                pattern = fabric.plan(f"allreduce.{tag}.{side}", axis, src, dst,
                                      group=f"allreduce.{tag}.{side}.{axis}")
                transfer = pattern.start(acc, buf, depart=head, payload=not streaming)
                started.append((transfer, buf, mesh.positions_mask(axis, src), mesh.positions_mask(axis, dst)))
        heads_in = np.full(mesh.block_shape, -np.inf) if streaming else None
        for transfer, _, _, _ in started:    # every delivery of the stage lands, then the adds
            transfer.wait(into=heads_in)
        for _, buf, senders, receivers in started:
            _combine(mesh, acc, buf, op, receivers)
            flops = np.where(receivers, acc.tile_elements, 0)
            if streaming:
                head[receivers] = costs.streaming_stage_head(hw, heads_in[receivers], head[receivers])
                mesh.compute(flops, advance_clock=False)
                mesh.software_stage(receivers, advance_clock=False)
                involved |= senders | receivers
            else:
                mesh.compute(flops)
                mesh.software_stage(receivers)
        mesh.step(f"{tag} stage {stage}")
    if streaming:  # every core of the chains is busy until the tail of the stream has passed it
        done = head + costs.streamed_payload(hw, acc.tile_bytes, acc.tile_elements)
        np.maximum(mesh.clock, np.where(involved, done, -np.inf), out=mesh.clock)


def _tree(mesh, acc, axis, op, n_groups, name, root_last=False, forwarding="stream") -> None:
    n = mesh.axis_length(axis)
    bounds = block_offsets(n, n_groups)
    spans = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    roots = [hi - 1 if root_last else lo + (hi - lo) // 2 for lo, hi in spans]
    buffers = (mesh.alloc(f"{name}.recv.left", acc.tile_shape, acc.dtype),
               mesh.alloc(f"{name}.recv.right", acc.tile_shape, acc.dtype))
    # Phase 1: inside each group, chains from both ends hop by hop into the group root.
    left = [[(lo + s - 1, lo + s) for (lo, _), r in zip(spans, roots) if lo + s <= r]
            for s in range(1, n + 1)]
    right = [[(hi - s, hi - s - 1) for (_, hi), r in zip(spans, roots) if hi - s - 1 >= r]
             for s in range(1, n + 1)]
    _chains(mesh, acc, axis, op, name, "group", _trim(left), _trim(right), buffers, forwarding)
    # Phase 2: group roots forward along pass-through routes into the global root.
    centre = len(roots) // 2 if not root_last else len(roots) - 1
    left = [[(roots[k - 1], roots[k])] for k in range(1, centre + 1)]
    right = [[(roots[k + 1], roots[k])] for k in range(len(roots) - 2, centre - 1, -1)]
    _chains(mesh, acc, axis, op, name, "roots", left, right, buffers, forwarding)
    for buf in buffers:
        buf.free()
    # Phase 3: the global root multicasts the result back along the line.
    mesh.fabric.multicast("allreduce.bcast", axis, roots[centre], group=f"allreduce.bcast.{axis}").run(acc)
    mesh.step("broadcast")


def _trim(stages):
    while stages and not stages[-1]:
        stages.pop()
    return stages


def _ring(mesh, acc, axis, op, name) -> None:
    """Reduce-scatter then allgather on the interleaved ring; tiles split in N segments."""
    n = mesh.axis_length(axis)
    ring = interleaved_ring(n)
    length = acc.tile_elements
    seg = -(-length // n)
    local = mesh.global_cols() if axis == "x" else mesh.global_rows()
    position = ring.position[local]
    position = position[None, :] if axis == "x" else position[:, None]
    position = np.broadcast_to(position, mesh.block_shape)
    padded = None if mesh.dry_run else np.zeros(mesh.block_shape + (n * seg,), acc.dtype)
    if padded is not None:
        padded[..., :length] = acc.data.reshape(mesh.block_shape + (-1,))
    out = mesh.alloc(f"{name}.ring.out", (seg,), acc.dtype)
    inc = mesh.alloc(f"{name}.ring.in", (seg,), acc.dtype)
    step_pattern = mesh.fabric.permutation("allreduce.ring", axis, ring.send(), group=f"allreduce.ring.{axis}")
    everywhere = np.ones(mesh.block_shape, bool)
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
                mesh.compute(seg)
                mesh.software_stage(everywhere)
            mesh.step(f"{phase} {t}")
    if padded is not None:
        acc.data[...] = padded[..., :length].reshape(acc.data.shape)
    out.free()
    inc.free()
