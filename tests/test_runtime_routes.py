"""PLMR R: every pattern declares routes on the routers it crosses; the limit is per router.

The expected counts are worked out here by walking every message along its line: a message
from s to d needs a route on each router from min(s, d) to max(s, d) (send, pass-through,
receive); a multicast is one message over the span of its root and destinations.
"""
from __future__ import annotations

import numpy as np
import pytest

from meshmpi import RoutingError
from meshes import ring_dest

pytestmark = pytest.mark.mpi


def route_counts(n, deliveries, multicast=False):
    counts = np.zeros(n, np.int64)
    if multicast:
        for root in {s for s, _ in deliveries}:
            ends = [root] + [d for s, d in deliveries if s == root]
            for p in range(min(ends), max(ends) + 1):
                counts[p] += 1
    else:
        for s, d in deliveries:
            for p in range(min(s, d), max(s, d) + 1):
                counts[p] += 1
    return counts


def raised_everywhere(world, action, error=RoutingError):
    try:
        action()
        message = None
    except error as exc:
        message = str(exc)
    messages = world.allgather(message)
    return all(m is not None for m in messages) and len(set(messages)) == 1, messages[0]


def core_routes(mesh, gather_full):
    """The whole mesh's current per-core usage and peak, from every rank's own view."""
    usage = mesh.routes.usage["y"][:, None] + mesh.routes.usage["x"][None, :]
    peak = gather_full(mesh, {"peak": mesh.routes.peak})["peak"]
    return usage, peak


@pytest.mark.parametrize("root,lo,hi", [(2, 1, 6), (0, 0, 9), (8, 3, 9), (7, 1, 5), (4, 5, 8)])
def test_multicast_declares_one_route_per_router_of_its_segment(new_mesh, world, gather_full, root, lo, hi):
    mesh = new_mesh(3, 9, rank_grid=(1, world.size))
    pattern = mesh.fabric.multicast("mc", "x", root, lo, hi)
    want = np.zeros(9, np.int64)
    want[min(lo, root):max(hi - 1, root) + 1] = 1     # the segment, and the way from the root
    assert np.array_equal(mesh.routes.usage["x"], want)
    assert np.array_equal(want, route_counts(9, [(root, d) for d in range(lo, hi) if d != root], True))
    usage, peak = core_routes(mesh, gather_full)
    assert np.array_equal(peak, np.broadcast_to(want, (3, 9)))
    pattern.free()
    usage, peak = core_routes(mesh, gather_full)
    assert not usage.any()
    assert np.array_equal(peak, np.broadcast_to(want, (3, 9))), "the peak outlives the pattern"


def test_too_many_multicast_groups_raise_routing_error(new_mesh, world, gather_full):
    mesh = new_mesh(3, 9, rank_grid=(1, world.size))
    limit = mesh.hardware.routes_per_core
    assert limit == 21
    for k in range(limit):
        mesh.fabric.multicast(f"bcast{k}", "x", root=k % 9)
    assert mesh.routes.max_usage() == limit
    ok, message = raised_everywhere(world, lambda: mesh.fabric.multicast("one-too-many", "x", root=0))
    assert ok, message
    assert f"{limit + 1} routes" in message and f"limit {limit}" in message and "one-too-many" in message
    assert mesh.routes.max_usage() == limit, "the refused pattern's routes are released"
    _, peak = core_routes(mesh, gather_full)
    assert peak.max() == limit, "a refused pattern was never configured: it is not in the peak"
    # Freeing one makes room again.
    mesh.fabric.multicast("bcast0", "x", root=0).free()
    mesh.fabric.multicast("one-too-many", "x", root=0)
    assert mesh.routes.max_usage() == limit


def test_limit_counts_row_and_column_routes_of_a_core(new_mesh, world, gather_full):
    mesh = new_mesh(6, 6)
    half = mesh.hardware.routes_per_core // 2 + 1          # 11 along x + 11 along y > 21
    for k in range(half):
        mesh.fabric.multicast(f"row{k}", "x", root=0)
    for k in range(half - 1):
        mesh.fabric.multicast(f"col{k}", "y", root=5)
    usage, peak = core_routes(mesh, gather_full)
    assert np.all(usage == 2 * half - 1) and np.all(peak == 2 * half - 1)
    ok, message = raised_everywhere(world, lambda: mesh.fabric.multicast("col-last", "y", root=5))
    assert ok, message


def test_warn_policy_records_and_continues(new_mesh, world):
    mesh = new_mesh(3, 9, rank_grid=(1, world.size), routes="warn")
    limit = mesh.hardware.routes_per_core
    for k in range(limit + 2):
        mesh.fabric.multicast(f"bcast{k}", "x", root=0)
    assert mesh.routes.max_usage() == limit + 2
    warnings = world.allgather(list(mesh.routes.warnings))
    assert all(w == warnings[0] for w in warnings)
    assert len(warnings[0]) == 2
    assert warnings[0][0].startswith(f"bcast{limit}:") and f"limit {limit}" in warnings[0][0]


def test_group_costs_the_max_not_the_sum(new_mesh, world):
    mesh = new_mesh(3, 9, rank_grid=(1, world.size))
    offsets = (1, 2, -3, 4)
    per_pattern = [route_counts(9, [(s, s + k) for s in range(9) if 0 <= s + k < 9]) for k in offsets]
    grouped = [mesh.fabric.shift(f"step{k}", "x", k, group="schedule") for k in offsets]
    assert np.array_equal(mesh.routes.usage["x"], np.max(per_pattern, axis=0))
    for p in grouped:
        p.free()
    assert not mesh.routes.usage["x"].any()
    with mesh.fabric.scope():
        for k in offsets[:3]:
            mesh.fabric.shift(f"alone{k}", "x", k)
        assert np.array_equal(mesh.routes.usage["x"], np.sum(per_pattern[:3], axis=0))
    assert not mesh.routes.usage["x"].any(), "scope() releases what it planned"


def test_scope_keeps_patterns_planned_before_it(new_mesh, world):
    mesh = new_mesh(4, 4)
    outer = mesh.fabric.shift("outer", "y", 1)
    before = mesh.routes.usage["y"].copy()
    with mesh.fabric.scope():
        inner = mesh.fabric.shift("inner", "y", -1)
        assert mesh.fabric.shift("outer", "y", 1) is outer      # planned once, reused
    assert np.array_equal(mesh.routes.usage["y"], before)
    assert outer.live and not inner.live
    arr = mesh.alloc("t", (1,))
    with pytest.raises(RuntimeError, match="freed"):
        inner.start(arr)
    outer.free()
    assert not mesh.routes.usage["y"].any()


@pytest.mark.parametrize("n", [4, 5, 8, 9])
def test_interleaved_ring_needs_three_routes_per_interior_core(new_mesh, world, gather_full, n):
    mesh = new_mesh(3, n, rank_grid=(1, world.size))
    forward, backward = ring_dest(n, 1), ring_dest(n, -1)
    mesh.fabric.permutation("ring+", "x", forward, group="ring")
    mesh.fabric.permutation("ring-", "x", backward, group="ring")
    want = np.maximum(route_counts(n, list(enumerate(forward.tolist()))),
                      route_counts(n, list(enumerate(backward.tolist()))))
    # PAPER.md §2: a send, a receive and a pass-through route on each interior core.
    assert want[1:-1].tolist() == [3] * (n - 2) and want[0] == want[-1] == 2
    assert np.array_equal(mesh.routes.usage["x"], want)
    _, peak = core_routes(mesh, gather_full)
    assert np.array_equal(peak, np.broadcast_to(want, (3, n)))


@pytest.mark.parametrize("offset", [3, -2])
def test_relayed_messages_share_one_hop_colours(new_mesh, world, offset):
    """Relayed in software, every message of a direction uses the same 1-hop colour: a router
    needs a send route if some message leaves it along that direction and a receive route if
    some message arrives, however many messages pass (a pass-through route per message would
    need up to |offset| + 1)."""
    n = 9
    mesh = new_mesh(3, n, rank_grid=(1, world.size))
    deliveries = [(s, s + offset) for s in range(n) if 0 <= s + offset < n]
    sends, receives = np.zeros(n, np.int64), np.zeros(n, np.int64)
    step = 1 if offset > 0 else -1
    for s, d in deliveries:                        # walk every hop of every message
        for p in range(s, d, step):
            sends[p] = 1
            receives[p + step] = 1
    mesh.fabric.shift("relayed", "x", offset, relay=True)
    assert np.array_equal(mesh.routes.usage["x"], sends + receives)
    assert (sends + receives).max() == 2 < route_counts(n, deliveries).max()
