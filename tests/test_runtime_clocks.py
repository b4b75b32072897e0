"""Modeled clocks and per-core counters against closed forms worked out by walking messages.

A delivery s -> d's head arrives at  send clock + alpha*|d-s| + beta*relays; the receiver,
which posts the receive at its own clock (after its own tile has left, when it receives into
the buffer it sends from), has it at  max(head, posted) + bytes/link_bw * load,  where load is
the most messages of the pattern on any directed link of its path; a receive takes
max(own clock, landing). The sender's send completes when its tail has left,
send clock + bytes/link_bw * load, or, if the receiver was late, when at most the path's
capacity |d-s| * (alpha + queue/link_bw) is still in flight (on pass-through routes; a software
relay takes the message off the fabric). The reference below walks every message link by link.
"""
from __future__ import annotations

import numpy as np
import pytest

from meshmpi import load_hardware

pytestmark = pytest.mark.mpi

ALPHA, BETA, LINK_BW, FLOPS_PER_CYCLE, QUEUE = 3.0, 7.0, 4.0, 2.0, 16.0


def profile(**extra):
    values = dict(alpha_cycles_per_hop=ALPHA, beta_cycles_per_relay=BETA, link_bytes_per_cycle=LINK_BW,
                  flops_per_cycle=FLOPS_PER_CYCLE, router_queue_bytes=QUEUE, vector_op_cycles=0,
                  scalar_op_cycles=0, transfer_start_cycles=0)
    values.update(extra)
    return load_hardware("wse2", [f"{k}={v}" for k, v in values.items()])


def messages_of(deliveries, multicast):
    """(source, destinations) per message: one per delivery, or one per multicast root."""
    if not multicast:
        return [(s, [d]) for s, d in deliveries]
    roots = sorted({s for s, _ in deliveries})
    return [(r, [d for s, d in deliveries if s == r]) for r in roots]


def reference(n, deliveries, *, multicast=False, relay=False, nbytes, send_clock, in_place=True,
              senders=None, start=0.0):
    """Landing time per destination position (one line) and per-position counters; with a
    ``senders`` dict, also each source's send completion. ``start``: the cycles every sender
    and receiver spends starting its fabric operation."""
    send_clock = np.asarray(send_clock, float) + start
    use = {}  # (link p between positions p and p+1, direction) -> messages of the pattern on it
    for s, dests in messages_of(deliveries, multicast):
        for p in range(s, max(dests)):        # rightwards, up to the farthest destination
            use[(p, +1)] = use.get((p, +1), 0) + 1
        for p in range(min(dests), s):        # leftwards
            use[(p, -1)] = use.get((p, -1), 0) + 1
    def path_load(s, d):
        path = [(p, +1) for p in range(s, d)] if d > s else [(p, -1) for p in range(d, s)]
        return max(use[link] for link in path)

    own_send = {}   # per source: how long its tile takes to leave (its busiest message's sharing)
    for s, dests in messages_of(deliveries, multicast):
        own_send[s] = max(own_send.get(s, 0), max(nbytes / LINK_BW * path_load(s, d) for d in dests))
    arrival = {}
    for s, d in deliveries:
        load = path_load(s, d)
        relays = abs(d - s) - 1 if relay else 0
        head = send_clock[s] + ALPHA * abs(d - s) + BETA * relays
        posted = send_clock[d] + (own_send.get(d, 0) if in_place else 0)
        arrival[d] = max(head, posted) + nbytes / LINK_BW * load
        if senders is not None:
            # a software relay takes the message off the fabric at the next core
            capacity = np.inf if relay else abs(d - s) * (ALPHA + QUEUE / LINK_BW)
            senders[s] = max(senders.get(s, send_clock[s] + own_send[s]), arrival[d] - capacity)
    counters = {k: np.zeros(n, np.int64) for k in ("messages_sent", "hops", "bytes_sent", "bytes_recv", "relays")}
    for s, dests in messages_of(deliveries, multicast):
        counters["messages_sent"][s] += 1
        counters["bytes_sent"][s] += nbytes
        counters["hops"][s] += max(dests + [s]) - min(dests + [s])
        for d in dests:
            counters["bytes_recv"][d] += nbytes
            if relay:
                for p in range(min(s, d) + 1, max(s, d)):
                    counters["relays"][p] += 1
    return arrival, counters


def test_reference_walks_links_once_per_message():
    # Shift by 2 on 6 positions: links 1-2, 2-3, 3-4 carry two messages each, links 0-1 and
    # 4-5 one; every path crosses a link with two.
    arrival, counters = reference(6, [(s, s + 2) for s in range(4)], nbytes=8, send_clock=np.zeros(6))
    assert arrival == {d: 2 * ALPHA + 8 / LINK_BW * 2 for d in (2, 3, 4, 5)}
    assert counters["hops"].tolist() == [2, 2, 2, 2, 0, 0]
    # Shift by 1: no link is shared.
    arrival, _ = reference(6, [(s, s + 1) for s in range(5)], nbytes=8, send_clock=np.zeros(6))
    assert arrival == {d: ALPHA + 8 / LINK_BW for d in range(1, 6)}
    # One multicast from 2 over [0, 6): one message, each link used once.
    arrival, counters = reference(6, [(2, d) for d in (0, 1, 3, 4, 5)], multicast=True, nbytes=8,
                                  send_clock=np.zeros(6))
    assert arrival == {d: ALPHA * abs(d - 2) + 2.0 for d in (0, 1, 3, 4, 5)}
    assert counters["hops"].tolist() == [0, 0, 5, 0, 0, 0]


def expected_mesh(mesh, axis, deliveries, clock_full, *, lines=None, **kwargs):
    """Full-mesh clocks and counters after one pattern, from the per-line reference."""
    n = mesh.cols if axis == "x" else mesh.rows
    n_lines = mesh.rows if axis == "x" else mesh.cols
    clock = clock_full.copy()
    counters = {k: np.zeros((mesh.rows, mesh.cols), np.int64)
                for k in ("messages_sent", "hops", "bytes_sent", "bytes_recv", "relays")}
    for line in range(n_lines):
        if lines is not None and line not in lines:
            continue
        view = (lambda a: a[line, :]) if axis == "x" else (lambda a: a[:, line])
        senders = {}
        arrival, per_position = reference(n, deliveries, send_clock=view(clock_full).copy(),
                                          senders=senders, **kwargs)
        line_clock = view(clock)
        for d, t in list(arrival.items()) + list(senders.items()):
            line_clock[d] = max(line_clock[d], t)
        for k, v in per_position.items():
            view(counters[k])[:] += v
    return clock, counters


def observed(mesh, gather_full):
    arrays = {k: mesh.counters[k] for k in ("messages_sent", "hops", "bytes_sent", "bytes_recv", "relays", "flops")}
    arrays.update(clock=mesh.clock, busy=mesh.busy)
    return gather_full(mesh, arrays)


def compare(got, clock, counters):
    problems = []
    if not np.array_equal(got["clock"], clock):
        problems.append(f"clock:\n{got['clock']}\nwant\n{clock}")
    for k, v in counters.items():
        if not np.array_equal(got[k], v):
            problems.append(f"{k}:\n{got[k]}\nwant\n{v}")
    return problems


CASES = [  # (name, axis, how to plan, deliveries on a line of n, multicast, relay)
    ("shift+1", lambda n: [(s, s + 1) for s in range(n - 1)], lambda f, ax, n: f.shift("a", ax, 1), False, False),
    ("shift+3", lambda n: [(s, s + 3) for s in range(n - 3)], lambda f, ax, n: f.shift("b", ax, 3), False, False),
    ("shift-2", lambda n: [(s, s - 2) for s in range(2, n)], lambda f, ax, n: f.shift("c", ax, -2), False, False),
    ("shift-5 relayed", lambda n: [(s, s - 5) for s in range(5, n)],
     lambda f, ax, n: f.shift("d", ax, -5, relay=True), False, True),
    ("shift+2 relayed", lambda n: [(s, s + 2) for s in range(n - 2)],
     lambda f, ax, n: f.shift("e", ax, 2, relay=True), False, True),
    ("multicast", lambda n: [(n // 2, d) for d in range(1, n) if d != n // 2],
     lambda f, ax, n: f.multicast("m", ax, n // 2, 1, n), True, False),
    ("multicast from outside", lambda n: [(n - 1, d) for d in range(1, 4)],
     lambda f, ax, n: f.multicast("mo", ax, n - 1, 1, 4), True, False),
    ("two multicasts", lambda n: [(0, d) for d in range(1, 4)] + [(n - 1, d) for d in range(4, n - 1)],
     lambda f, ax, n: f.multicasts("ms", ax, [0, n - 1], [(0, 4), (4, n)]), True, False),
    ("far permutation", lambda n: [(i, n - 1 - i) for i in range(n) if i != n - 1 - i],
     lambda f, ax, n: f.permutation("p", ax, np.arange(n)[::-1]), False, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_one_pattern_from_zero_clocks(new_mesh, world, gather_full, case, axis):
    name, deliveries_of, plan, multicast, relay = case
    rows, cols = (3, 9) if axis == "x" else (9, 3)
    start = 5.0 if axis == "y" else 0.0              # the fixed cost of starting a send or receive
    mesh = new_mesh(rows, cols, profile(transfer_start_cycles=start),
                    rank_grid=(1, world.size) if axis == "x" else (world.size, 1))
    n = 9
    arr = mesh.alloc("t", (6,), np.float64)          # 6 elements at element_bytes=2: 12 bytes
    with mesh.fabric.scope():
        plan(mesh.fabric, axis, n).run(arr)
    clock, counters = expected_mesh(mesh, axis, deliveries_of(n), np.zeros((rows, cols)),
                                    multicast=multicast, relay=relay, nbytes=12, start=start)
    problems = compare(observed(mesh, gather_full), clock, counters)
    assert not problems, "\n".join(problems)


def test_shift_by_k_closed_form(new_mesh, world, gather_full):
    """An in-place shift by k on a long line: with S = bytes/bw and load the busiest link's
    messages, a core that also sends posts its receive once its own tile has left (S * its
    load), so it holds the new tile at max(alpha*|k|, S*own load) + S*load; a core that only
    sends is done when its tail has left, S * its load. In the middle, load = |k|."""
    for k in (1, 2, 3, -3):
        mesh = new_mesh(2, 12, profile(), rank_grid=(1, world.size))   # clocks and links fresh
        arr = mesh.alloc(f"t{k}", (10,), np.float32)
        with mesh.fabric.scope():
            mesh.fabric.shift(f"s{k}", "x", k).run(arr)
        clock = gather_full(mesh, {"c": mesh.clock})["c"]
        # Position d receives from d-k; the busiest link on that path carries min(|k|, ...)
        # messages: every link strictly inside the line has |k| shifts crossing it when the
        # path is at least |k| away from both ends.
        for d in range(12):
            s = d - k
            if not 0 <= s < 12:            # sends only: busy until its tail has left
                assert np.all(clock[:, d] == 20 / LINK_BW * load_of(d, k)), (k, d)
                continue
            serial = 20 / LINK_BW
            load, own = load_of(s, k), (load_of(d, k) if 0 <= d + k < 12 else 0)
            assert np.all(clock[:, d] == max(max(ALPHA * abs(k), serial * own) + serial * load, serial * own)), (k, d)
            if abs(k) <= d <= 11 - abs(k) and abs(k) <= s <= 11 - abs(k):
                assert load == abs(k)


def load_of(s, k, n=12):
    """The most shift-by-k messages on any link of the path from s (on a line of n)."""
    links = range(min(s, s + k), max(s, s + k))
    return max(sum(1 for s2 in range(n) if 0 <= s2 + k < n and min(s2, s2 + k) <= link < max(s2, s2 + k))
               for link in links)


def test_compute_then_receive_takes_the_later_time(new_mesh, world, gather_full):
    mesh = new_mesh(4, 7, profile(), rank_grid=(world.size, 1))
    rng = np.random.default_rng(2)
    flops_full = rng.integers(0, 60, size=(4, 7)) * 2
    flops_full[:, 3] = 10_000                       # column 3 is busy long after anything arrives
    busy_mask_full = rng.random((4, 7)) < 0.7
    busy_mask_full[:, 3] = True
    block = (slice(mesh.row_start, mesh.row_stop), slice(mesh.col_start, mesh.col_stop))
    mesh.compute(flops_full[block], where=busy_mask_full[block])
    done = np.where(busy_mask_full, flops_full, 0) / FLOPS_PER_CYCLE
    got = observed(mesh, gather_full)
    assert np.array_equal(got["clock"], done) and np.array_equal(got["busy"], done)
    assert np.array_equal(got["flops"], np.where(busy_mask_full, flops_full, 0))
    arr = mesh.alloc("t", (3, 2), np.float16)        # 6 elements: 12 bytes
    with mesh.fabric.scope():
        mesh.fabric.shift("east", "x", 1).run(arr)
    clock, counters = expected_mesh(mesh, "x", [(s, s + 1) for s in range(6)], done, nbytes=12)
    # column 3 posts its receive at 5000, after its own 3-cycle tile has left; the new one then
    # drains in for 3 cycles
    assert np.all(clock[:, 3] == 5000 + 2 * 12 / LINK_BW)
    problems = compare(observed(mesh, gather_full), clock, counters)
    assert not problems, "\n".join(problems)
    assert np.array_equal(observed(mesh, gather_full)["busy"], done), "receiving is not compute"


def test_overlap_start_compute_wait(new_mesh, world, gather_full):
    mesh = new_mesh(3, 8, profile(), rank_grid=(1, world.size))
    arr = mesh.alloc("t", (8,), np.float32)          # 16 bytes
    flops = np.where(np.arange(8) % 2 == 0, 20, 40)  # 10 or 20 cycles, overlapping the transfer
    with mesh.fabric.scope():
        transfer = mesh.fabric.shift("west", "x", -2).start(arr)
        mesh.compute(np.broadcast_to(flops, (3, 8))[:, mesh.col_start:mesh.col_stop])
        transfer.wait()
    own = flops / FLOPS_PER_CYCLE
    senders = {}
    arrival, _ = reference(8, [(s, s - 2) for s in range(2, 8)], nbytes=16, send_clock=np.zeros(8),
                           senders=senders)
    want = np.broadcast_to(own, (3, 8)).copy()
    for d, t in list(arrival.items()) + list(senders.items()):
        want[:, d] = max(want[0, d], t)
    # Sent at clock 0 on links shared two ways (16/bw*2 = 8 cycles): cores 0 and 1 only receive,
    # at 2*alpha + 8 = 14; cores 2-5 first push their own tile out (8), so theirs lands at 16.
    # Both are later than some cores' compute, not others'.
    assert [arrival[d] for d in range(6)] == [14, 14, 16, 16, 16, 16]
    assert set(senders.values()) == {8}
    got = observed(mesh, gather_full)
    assert np.array_equal(got["clock"], want)


@pytest.mark.parametrize("element_bytes", [1, 2, 4])
def test_bytes_are_charged_at_the_profile_element_size(new_mesh, world, gather_full, element_bytes):
    mesh = new_mesh(2, 5, profile(element_bytes=element_bytes), rank_grid=(1, world.size))
    arr = mesh.alloc("t", (4, 3), np.float64)
    with mesh.fabric.scope():
        mesh.fabric.shift("s", "x", 1).run(arr)
    nbytes = 12 * element_bytes
    clock, counters = expected_mesh(mesh, "x", [(s, s + 1) for s in range(4)], np.zeros((2, 5)),
                                    nbytes=nbytes)
    problems = compare(observed(mesh, gather_full), clock, counters)
    assert not problems, "\n".join(problems)
    resident = gather_full(mesh, {"r": mesh.memory.resident})["r"]
    assert np.all(resident == nbytes)


def test_lines_subset_moves_only_those_clocks_and_counters(new_mesh, world, gather_full):
    mesh = new_mesh(6, 5, profile(), rank_grid=(world.size, 1) if world.size <= 6 else None)
    arr = mesh.alloc("t", (2,), np.float32)
    lines = [1, 4, 5]
    with mesh.fabric.scope():
        mesh.fabric.shift("down", "y", 3, relay=True).run(arr, lines=lines)
    clock, counters = expected_mesh(mesh, "y", [(s, s + 3) for s in range(3)], np.zeros((6, 5)),
                                    lines=lines, relay=True, nbytes=4)
    problems = compare(observed(mesh, gather_full), clock, counters)
    assert not problems, "\n".join(problems)


def test_clocks_chain_through_two_patterns(new_mesh, world, gather_full):
    """The second pattern's arrivals start from the clocks the first one left."""
    mesh = new_mesh(5, 6, profile())
    arr = mesh.alloc("t", (5,), np.float32)
    with mesh.fabric.scope():
        mesh.fabric.shift("right", "x", 2).run(arr)
        mesh.fabric.multicast("down", "y", root=4, lo=0, hi=5).run(arr)
    clock, c1 = expected_mesh(mesh, "x", [(s, s + 2) for s in range(4)], np.zeros((5, 6)), nbytes=10)
    clock, c2 = expected_mesh(mesh, "y", [(4, d) for d in range(4)], clock, multicast=True, nbytes=10)
    problems = compare(observed(mesh, gather_full), clock, {k: c1[k] + c2[k] for k in c1})
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------ link occupancy
def test_pipelined_messages_over_one_link_are_bandwidth_bound(new_mesh, world, gather_full):
    """k messages of S = bytes/bw cycles started back to back on the same directed link (the
    sender is busy only until its tail has left): message i enters the link when message i-1
    has left it, at i*S, and arrives at i*S + alpha + S. The link carries one payload at a time (PAPER.md §1)."""
    mesh = new_mesh(2, 12, profile(), rank_grid=(1, world.size))
    tile = mesh.alloc("tile", (10,), np.float32)                 # 20 B at 2 B per element
    serial = 20 / LINK_BW
    with mesh.fabric.scope():
        east = mesh.fabric.shift("east", "x", 1, lo=4, hi=6)     # core 4 -> core 5 only
        for i in range(6):
            east.start(tile).wait()
            clock = gather_full(mesh, {"c": mesh.clock})["c"]
            assert np.all(clock[:, 5] == i * serial + ALPHA + serial), i
            assert np.all(clock[:, 4] == (i + 1) * serial)       # the sender: until its tail has left


def test_two_patterns_sharing_a_link_serialise(new_mesh, world, gather_full):
    """A shift by +2 and, in the same window, a shift by +1 of another pattern: the +1 message
    needs the link the +2 worm holds, so it enters it only when the worm's tail has left."""
    mesh = new_mesh(1, 12, profile(), rank_grid=(1, world.size))
    buffers = [mesh.alloc(f"b{i}", (10,), np.float32) for i in range(6)]
    serial = 20 / LINK_BW
    with mesh.fabric.scope():
        far = mesh.fabric.shift("two", "x", 2, lo=0, hi=3).start(buffers[0], buffers[1])   # 0 -> 2
        near = mesh.fabric.shift("near", "x", 1, lo=1, hi=3).start(buffers[2], buffers[3])  # 1 -> 2
        alone = mesh.fabric.shift("one", "x", 1, lo=5, hi=7).start(buffers[4], buffers[5])  # 5 -> 6
        for transfer in (far, near, alone):
            transfer.wait()
    clock = gather_full(mesh, {"c": mesh.clock})["c"][0]
    # the +2 worm enters link 1-2 at alpha and holds it until alpha + S; the +1 message then
    # crosses it: alpha + S + alpha + S, later than the worm's own arrival 2 alpha + S
    assert clock[2] == 2 * ALPHA + 2 * serial
    assert clock[6] == ALPHA + serial                            # a link of its own


# ------------------------------------------------------------------------------ back-pressure
@pytest.mark.parametrize("hops", [1, 4, 8])
def test_a_late_receiver_stalls_the_sender_once_the_path_is_full(new_mesh, world, gather_full, hops):
    """Core 1 sends S = 5 cycles of payload at clock 0 to a core that posts its receive only at
    clock 100. The message lands at 100 + S; the path holds hops * (alpha + queue/bw) cycles
    of it, so the sender's send completes at max(S, 100 + S - hops*(alpha + queue/bw))."""
    mesh = new_mesh(2, 12, profile(), rank_grid=(1, world.size))
    src, dst = mesh.alloc("src", (10,), np.float32), mesh.alloc("dst", (10,), np.float32)
    late = 1 + hops
    mesh.compute(np.where(mesh.global_cols() == late, 200, 0)[None, :].repeat(mesh.block_shape[0], 0))
    serial = 20 / LINK_BW
    with mesh.fabric.scope():
        mesh.fabric.plan("late", "x", [1], [late]).run(src, dst)
        mesh.fabric.plan("ready", "x", [10], [11]).run(src, dst)     # a ready receiver: no stall
    clock = gather_full(mesh, {"c": mesh.clock})["c"]
    capacity = hops * (ALPHA + QUEUE / LINK_BW)
    assert np.all(clock[:, late] == 100 + serial)
    assert np.all(clock[:, 1] == max(serial, 100 + serial - capacity))
    assert np.all(clock[:, 10] == serial) and np.all(clock[:, 11] == ALPHA + serial)


@pytest.mark.parametrize("n", [6, 8, 11])
@pytest.mark.parametrize("ring", ["cannon", "interleaved"])
def test_a_double_buffered_ring_settles_at_its_cycle_mean(new_mesh, world, gather_full, n, ring):
    """A ring step as the GEMM kernels do it (start into the spare, compute, wait, swap), many
    times. A core's step ends when its tile has left and the next one has landed, so a tile
    that goes once around the ring (N steps) gathers every edge's latency once: on a line both
    Cannon's ring (N-1 one-hop edges and the N-1-hop wrap) and MeshGEMM's interleaved ring
    (2-hop edges) add up to 2(N-1) hops, and the period settles at
    max(compute, 2*alpha*(N-1)/N + S). Cannon pays its wrap in full only on the first step."""
    from kernels.ring import interleaved_ring
    mesh = new_mesh(1, n, profile(), rank_grid=(1, world.size) if world.size <= n else None)
    dest = (np.arange(n) - 1) % n if ring == "cannon" else interleaved_ring(n).send()
    cur, spare = mesh.alloc("cur", (10,), np.float32), mesh.alloc("spare", (10,), np.float32)
    serial, compute = 20 / LINK_BW, 1.0
    ends = []
    with mesh.fabric.scope():
        step = mesh.fabric.permutation("ring", "x", dest)
        for _ in range(4 * n):
            transfer = step.start(cur, spare)
            mesh.compute(compute * FLOPS_PER_CYCLE)
            transfer.wait()
            cur, spare = spare, cur
            ends.append(mesh.modeled_cycles())
    first = ALPHA * (n - 1 if ring == "cannon" else 2) + serial
    assert ends[0] == first
    assert (ends[-1] - ends[-1 - n]) / n == pytest.approx(max(compute, 2 * ALPHA * (n - 1) / n + serial), rel=1e-12)


def test_fixed_costs_of_local_work(new_mesh, world, gather_full):
    """Each vector operation and each scalar operation has a start cost on the cores that work;
    cores given no work pay nothing."""
    mesh = new_mesh(3, 4, profile(vector_op_cycles=4, scalar_op_cycles=16), rank_grid=(world.size, 1)
                    if world.size <= 3 else None)
    mesh.compute(20, ops=3)                                            # 10 + 3*4
    flops = np.where(mesh.global_rows()[:, None] == 1, 0, 8) * np.ones(mesh.block_shape, np.int64)
    mesh.compute(flops, scalars=2)                                     # + 4 + 4 + 2*16 (all cores)
    mesh.compute(flops)                                                # + 4 + 4 where there is work
    clock = gather_full(mesh, {"c": mesh.clock})["c"]
    working = 22 + 40 + 8
    assert np.array_equal(clock, np.array([[working] * 4, [22 + 36] * 4, [working] * 4], float))


def test_per_core_counts_of_operations(new_mesh, world, gather_full):
    """Vector and scalar operation counts may be block-shaped (uneven tiles: each core its own);
    a core with neither FLOPs nor scalar operations pays nothing."""
    mesh = new_mesh(3, 4, profile(vector_op_cycles=4, scalar_op_cycles=16), rank_grid=(world.size, 1)
                    if world.size <= 3 else None)
    rows, cols = mesh.global_rows()[:, None], mesh.global_cols()[None, :]
    mesh.compute(np.broadcast_to(2 * cols, mesh.block_shape), ops=np.broadcast_to(rows + cols, mesh.block_shape),
                 scalars=np.broadcast_to(rows, mesh.block_shape))       # column 0: no FLOPs, row 0: no scalars
    clock = gather_full(mesh, {"c": mesh.clock})["c"]
    r, c = np.mgrid[0:3, 0:4]
    assert np.array_equal(clock, np.where((r > 0) | (c > 0), c + 4 * (r + c) + 16 * r, 0).astype(float))
