"""Transfers deliver the right tiles, whatever the rank split (checked against numpy loops).

Every test builds the whole mesh's tiles on every rank from one seed, runs a pattern on the
distributed mesh, gathers the destination buffer and compares it bit for bit with the same
deliveries done by a plain Python loop over lines and positions.
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from meshmpi import HazardError
from meshmpi.host import gather_block_arrays, gather_tiles, scatter_tiles
from meshmpi.relocate import relocate
from meshes import ring_dest, ring_order

pytestmark = pytest.mark.mpi

TILE = (2, 3)


def expected_after(src_full, dst_full, axis, deliveries, lines=None):
    """Brute force: for every line and delivery (s, d), dst[d] = src[s] on that line."""
    out = dst_full.copy()
    n_lines = src_full.shape[0] if axis == "x" else src_full.shape[1]
    for line in range(n_lines):
        if lines is not None and line not in lines:
            continue
        for s, d in deliveries:
            if axis == "x":
                out[line, d] = src_full[line, s]
            else:
                out[d, line] = src_full[s, line]
    return out


def fresh_buffers(mesh, dtype, seed):
    rng = np.random.default_rng(seed)
    a_full = rng.standard_normal((mesh.rows, mesh.cols) + TILE).astype(dtype)
    b_full = rng.standard_normal((mesh.rows, mesh.cols) + TILE).astype(dtype)
    a = scatter_tiles(mesh, f"a{seed}", a_full)
    b = scatter_tiles(mesh, f"b{seed}", b_full)
    return a_full, b_full, a, b


def one_block_mesh(new_mesh, seed):
    """A 7 x 9 mesh on this rank alone, its clocks uneven, and fresh buffers (as
    :func:`fresh_buffers`): for comparing two ways of timing the same transfers."""
    mesh = new_mesh(7, 9, comm=MPI.COMM_SELF)
    mesh.clock[...] = np.random.default_rng(seed).uniform(0, 300, mesh.block_shape)
    return mesh, *fresh_buffers(mesh, np.float32, seed=seed)


def check_pattern(mesh, make_pattern, deliveries, axis, dtype, seed, lines=None):
    """Run ``make_pattern()`` from a into b and compare the gathered b to the brute force.

    Returns the error text (or "") after agreeing with every rank, so no rank leaves a
    collective early."""
    a_full, b_full, a, b = fresh_buffers(mesh, dtype, seed)
    with mesh.fabric.scope():
        make_pattern().run(a, b, lines=lines)
    got = gather_tiles(mesh, b)
    src_after = gather_tiles(mesh, a)
    a.free()
    b.free()
    want = expected_after(a_full, b_full, axis, deliveries, lines)
    problems = []
    if got.dtype != np.dtype(dtype):
        problems.append(f"dtype {got.dtype}")
    if not np.array_equal(got, want):
        bad = np.argwhere(np.any(got != want, axis=tuple(range(2, got.ndim))))
        problems.append(f"wrong tiles at cores {bad[:6].tolist()}")
    if not np.array_equal(src_after, a_full):
        problems.append("the source buffer changed")
    return problems


def shift_deliveries(n, offset, lo=0, hi=None):
    hi = n if hi is None else hi
    return [(s, s + offset) for s in range(lo, hi) if lo <= s + offset < hi]


GRIDS = {
    # (mesh rows, mesh cols, rank grid as a function of the world size)
    "3x9 on 1xP": (3, 9, lambda p: (1, p)),
    "9x3 on Px1": (9, 3, lambda p: (p, 1)),
    "6x7 auto": (6, 7, lambda p: None),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_shift_every_offset_both_axes(new_mesh, world, grid, dtype):
    rows, cols, rank_grid = GRIDS[grid]
    mesh = new_mesh(rows, cols, rank_grid=rank_grid(world.size))
    failures = []
    for axis, n in (("x", cols), ("y", rows)):
        for offset in [k for k in range(-(n - 1), n) if k]:
            problems = check_pattern(
                mesh, lambda: mesh.fabric.shift(f"shift{offset}", axis, offset),
                shift_deliveries(n, offset), axis, dtype, seed=1000 + offset)
            failures += [f"{axis} shift {offset}: {p}" for p in problems]
    assert not failures, failures


@pytest.mark.parametrize("relay", [False, True])
def test_shift_inside_a_segment_and_relayed(new_mesh, world, relay):
    mesh = new_mesh(3, 9, rank_grid=(1, world.size))
    failures = []
    for lo, hi, offset in ((2, 8, 3), (1, 9, -4), (0, 5, 2), (3, 7, -1)):
        problems = check_pattern(
            mesh, lambda: mesh.fabric.shift("seg", "x", offset, lo=lo, hi=hi, relay=relay),
            shift_deliveries(9, offset, lo, hi), "x", np.float32, seed=lo * 10 + hi)
        failures += [f"[{lo},{hi}) by {offset}: {p}" for p in problems]
    assert not failures, failures


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_interleaved_ring_steps(new_mesh, world, grid, dtype):
    rows, cols, rank_grid = GRIDS[grid]
    mesh = new_mesh(rows, cols, rank_grid=rank_grid(world.size))
    failures = []
    for axis, n in (("x", cols), ("y", rows)):
        for steps in (1, -1, 2):
            dest = ring_dest(n, steps)
            deliveries = [(i, int(d)) for i, d in enumerate(dest) if d != i]
            problems = check_pattern(
                mesh, lambda: mesh.fabric.permutation(f"ring{steps}", axis, dest, group="ring"),
                deliveries, axis, dtype, seed=7 + steps)
            failures += [f"{axis} ring step {steps}: {p}" for p in problems]
    assert not failures, failures


def test_ring_order_matches_the_paper():
    # The paper's examples, so the reference above is itself checked.
    assert ring_order(4) == [0, 2, 3, 1]
    assert ring_order(5) == [0, 2, 4, 3, 1]
    assert ring_order(8) == [0, 2, 4, 6, 7, 5, 3, 1]
    for n in range(2, 12):
        dest = ring_dest(n)
        assert sorted(dest.tolist()) == list(range(n))
        assert max(abs(int(d) - i) for i, d in enumerate(dest)) <= 2


def test_random_permutations_with_far_partners(new_mesh, world):
    mesh = new_mesh(4, 9, rank_grid=(1, world.size))
    rng = np.random.default_rng(5)
    failures = []
    for trial in range(4):
        dest = rng.permutation(9)
        dest[trial] = -1  # one position sends nothing
        deliveries = [(i, int(d)) for i, d in enumerate(dest) if d >= 0 and d != i]
        problems = check_pattern(mesh, lambda: mesh.fabric.permutation(f"perm{trial}", "x", dest),
                                 deliveries, "x", np.float64, seed=trial)
        failures += [f"permutation {dest.tolist()}: {p}" for p in problems]
    assert not failures, failures


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_multicast_from_a_root_over_a_segment(new_mesh, world, grid, dtype):
    rows, cols, rank_grid = GRIDS[grid]
    mesh = new_mesh(rows, cols, rank_grid=rank_grid(world.size))
    failures = []
    for axis, n in (("x", cols), ("y", rows)):
        cases = {(0, 0, n), (n - 1, 0, n), (n // 2, 0, n), (1, 0, n - 1), (n - 2, 1, n),
                 (n - 1, 0, n // 2), (0, n // 2, n)}             # the root outside its segment
        for root, lo, hi in sorted(cases):
            deliveries = [(root, d) for d in range(lo, hi) if d != root]
            problems = check_pattern(mesh, lambda: mesh.fabric.multicast("mc", axis, root, lo, hi),
                                     deliveries, axis, dtype, seed=root * 100 + lo * 10 + hi)
            failures += [f"{axis} multicast root {root} over [{lo},{hi}): {p}" for p in problems]
    assert not failures, failures


def test_several_multicasts_at_once(new_mesh, world):
    mesh = new_mesh(9, 3, rank_grid=(world.size, 1))
    roots, segments = [1, 5, 8], [(0, 3), (3, 7), (7, 9)]
    deliveries = [(r, d) for r, (lo, hi) in zip(roots, segments) for d in range(lo, hi) if d != r]
    problems = check_pattern(mesh, lambda: mesh.fabric.multicasts("mcs", "y", roots, segments),
                             deliveries, "y", np.float32, seed=3)
    assert not problems, problems


@pytest.mark.parametrize("axis", ["x", "y"])
def test_lines_subset_changes_only_those_lines(new_mesh, world, axis):
    mesh = new_mesh(6, 7, rank_grid=None)
    n = mesh.cols if axis == "x" else mesh.rows
    n_lines = mesh.rows if axis == "x" else mesh.cols
    failures = []
    for lines in ([0], [1, n_lines - 1], list(range(0, n_lines, 2)), []):
        for name, make, deliveries in (
                ("shift", lambda: mesh.fabric.shift("s", axis, 2), shift_deliveries(n, 2)),
                ("multicast", lambda: mesh.fabric.multicast("m", axis, n - 1, 1, n),
                 [(n - 1, d) for d in range(1, n - 1)]),
                ("ring", lambda: mesh.fabric.permutation("r", axis, ring_dest(n)),
                 [(i, int(d)) for i, d in enumerate(ring_dest(n))])):
            problems = check_pattern(mesh, make, deliveries, axis, np.float64, seed=len(lines),
                                     lines=lines)
            failures += [f"{name} on lines {lines}: {p}" for p in problems]
    assert not failures, failures


def test_in_place_shift_and_async_overlap(new_mesh, world):
    """src is dst: every tile moves one step at once (no tile is read after it is overwritten)."""
    mesh = new_mesh(5, 7, rank_grid=(1, world.size) if world.size <= 7 else None)
    rng = np.random.default_rng(11)
    full = rng.standard_normal((5, 7) + TILE)
    a = scatter_tiles(mesh, "inplace", full)
    with mesh.fabric.scope():
        transfer = mesh.fabric.shift("east", "x", 1).start(a)
        mesh.compute(10)
        transfer.wait()
        mesh.fabric.shift("south", "y", -2).run(a)
    got = gather_tiles(mesh, a)
    want = full.copy()
    want[:, 1:] = full[:, :-1]
    step1 = want.copy()
    want[:-2, :] = step1[2:, :]
    assert np.array_equal(got, want)


def test_tiles_land_at_wait_and_buffers_in_flight_are_hazards(new_mesh, world):
    """The destination holds the new tiles only after ``wait``; touching it before, or writing
    the source between start and wait, is an overlap bug that names the pattern and the buffer."""
    mesh = new_mesh(4, 6)
    rng = np.random.default_rng(5)
    src_full, dst_full = rng.standard_normal((4, 6) + TILE), rng.standard_normal((4, 6) + TILE)
    src, dst = scatter_tiles(mesh, "send", src_full), scatter_tiles(mesh, "recv", dst_full)
    with mesh.fabric.scope():
        east = mesh.fabric.shift("east", "x", 1)
        transfer = east.start(src, dst)
        assert np.array_equal(dst._data, dst_full[mesh.row_start:mesh.row_stop, mesh.col_start:mesh.col_stop])
        with pytest.raises(HazardError, match=r"'recv'.*'east'.*before its wait"):
            dst.data.sum()                                   # reading the receive buffer too early
        assert src.data is not None                          # reading the source is allowed
        transfer.wait()
        assert np.array_equal(gather_tiles(mesh, dst), expected_after(src_full, dst_full, "x",
                                                                [(p, p + 1) for p in range(5)]))
        transfer = east.start(src, dst)
        src.data[...] = 0.0                                  # overwriting the send buffer in flight
        with pytest.raises(HazardError, match=r"'east'.*source buffer 'send' was written"):
            transfer.wait()


@pytest.mark.parametrize("grid", ["3x9 on 1xP", "9x3 on Px1"])
def test_a_transfer_that_does_not_land_is_timed_and_counted_alike(new_mesh, world, grid):
    """``land=False`` (a kernel reading tiles in place) leaves both buffers as they were, with
    the clocks and counters of the same transfer landing, on lines in and across blocks."""
    rows, cols, rank_grid = GRIDS[grid]
    seen = {}
    for land in (True, False):
        mesh = new_mesh(rows, cols, rank_grid=rank_grid(world.size))
        a_full, b_full, a, b = fresh_buffers(mesh, np.float32, seed=5)
        with mesh.fabric.scope():
            for axis, n in (("x", cols), ("y", rows)):
                mesh.fabric.permutation(f"ring.{axis}", axis, ring_dest(n, 1)).start(a, b, land=land).wait()
        per_core = gather_block_arrays(mesh, {"clock": mesh.clock.copy(), **mesh.counters})
        seen[land] = gather_tiles(mesh, a), gather_tiles(mesh, b), mesh.cart.bcast(per_core)
    (_, b_moved, landed), (a_kept, b_kept, kept) = seen[True], seen[False]
    assert np.array_equal(a_kept, a_full) and np.array_equal(b_kept, b_full)
    assert not np.array_equal(b_moved, b_full)          # the landing transfer did move tiles
    assert landed.keys() == kept.keys()
    for name in landed:
        assert np.array_equal(landed[name], kept[name]), name


@pytest.mark.parametrize("axis", ["x", "y"])
def test_a_multicast_inside_a_block_starts_in_one_pass_as_on_the_general_path(new_mesh, axis):
    """Multicasts whose worms stay in one block walk and land in one compiled pass: the same
    tiles, clocks, link free times and counters as the general path's batches, from uneven
    clocks, in place and not, with the heads alone and from given departures."""
    seen = []
    for one_pass in (True, False):
        mesh, a_full, b_full, a, b = one_block_mesh(new_mesh, seed=4)
        n = mesh.axis_length(axis)
        with mesh.fabric.scope():
            patterns = [mesh.fabric.multicasts("bcast", axis, [1, n - 2], [(0, 4), (4, n)]),
                        mesh.fabric.multicast("one", axis, root=n // 2)]
            for pattern in patterns:
                assert pattern.one_pass_multicast
                pattern.one_pass_multicast = one_pass
            patterns[0].run(a)
            patterns[1].run(a, b)
            patterns[0].start(b, depart=mesh.clock + 40.0, payload=False).wait()
            patterns[1].run(b)
        free = {key: f.copy() for key, f in mesh.fabric.link_free(axis).items()}
        seen.append((gather_tiles(mesh, a), gather_tiles(mesh, b), mesh.clock.copy(), mesh.busy.copy(),
                     mesh.counters, free))
    (a_1, b_1, clock_1, busy_1, counters_1, free_1), (a_2, b_2, clock_2, busy_2, counters_2, free_2) = seen
    assert np.array_equal(a_1, a_2) and np.array_equal(b_1, b_2) and not np.array_equal(a_1, a_full)
    assert np.array_equal(clock_1, clock_2) and np.array_equal(busy_1, busy_2)
    assert all(np.array_equal(counters_1[name], counters_2[name]) for name in counters_1)
    assert all(np.array_equal(free_1[sign], free_2[sign]) for sign in free_1)


def run_rounds(mesh, a, axis, dest, times, relay, repeated):
    """Links made busy, then the rotation ``dest`` ``times[l]`` times on each line ``l``, by
    :meth:`LinePattern.repeat` or by a start and a wait per round on the lines still moving.
    Returns the pattern and the timeline's phases (wall times left out) and steps."""
    with mesh.fabric.scope(), mesh.phase("rounds"):
        mesh.fabric.shift("busy", axis, 1).run(a)
        pattern = mesh.fabric.permutation("rot", axis, dest, relay=relay)
        if repeated:
            pattern.repeat(a, times, "r")
        else:
            for r in range(times.max()):
                pattern.start(a, a, lines=np.flatnonzero(times > r), land=False).wait()
                mesh.step(f"r {r}")
    phases, steps = mesh.timeline.collect()
    for row in phases:
        row.pop("wall_seconds")
    return pattern, phases, steps


@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("ring", ["interleaved", "interleaved back", "plain", "relayed"])
def test_rounds_inside_a_block_run_in_one_pass_as_round_by_round(new_mesh, axis, ring):
    """A pattern repeated a different number of times on each line (a rotation's rounds), inside
    one block: the same clocks, link free times, counters, totals and timeline rows as
    starting and waiting round by round on the lines still moving, from uneven clocks and
    busy links; tiles stay where they are. Interleaved rings, a plain ring (its wrap route
    shares links) and software relays."""
    seen = []
    for compiled in (True, False):
        mesh, _, _, a, _ = one_block_mesh(new_mesh, seed=5)
        rng = np.random.default_rng(12)
        n, lines = mesh.axis_length(axis), mesh.axis_length("y" if axis == "x" else "x")
        dest = {"interleaved": ring_dest(n), "interleaved back": ring_dest(n, -1),
                "plain": (np.arange(n) + 1) % n, "relayed": ring_dest(n)}[ring]
        times = rng.integers(0, n, lines)
        times[1] = 0
        pattern, phases, steps = run_rounds(mesh, a, axis, dest, times, ring == "relayed", repeated=compiled)
        assert pattern.one_pass_inside
        free = {key: f.copy() for key, f in mesh.fabric.link_free(axis).items()}
        seen.append((gather_tiles(mesh, a), mesh.clock.copy(), free, mesh.counters, dict(mesh.totals), phases, steps,
                     mesh.max_hops))
    (a_1, clock_1, free_1, counters_1, *rest_1), (a_2, clock_2, free_2, counters_2, *rest_2) = seen
    assert np.array_equal(a_1, a_2)
    assert np.array_equal(clock_1, clock_2)
    assert all(np.array_equal(free_1[sign], free_2[sign]) for sign in free_1)
    assert all(np.array_equal(counters_1[name], counters_2[name]) for name in counters_1)
    assert rest_1 == rest_2
    assert len(rest_1[2]) == times.max() > 2       # a step per round was recorded


@pytest.mark.parametrize("split", ["along the axis", "automatic"])
@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("ring", ["interleaved", "interleaved back", "relayed"])
def test_rounds_across_blocks_run_as_round_by_round(new_mesh, world, axis, ring, split, gather_full):
    """The same rounds on a mesh split over every rank (along their axis, or as the ranks tile
    it by default: 2 x 2 on 4), whose worms cross into the neighbours' blocks:
    :meth:`LinePattern.repeat` (one pass and one exchange a round, on the lines still moving)
    gives the clocks, link free times, counters, totals and timeline rows of starting and
    waiting round by round, from uneven clocks and busy links."""
    seen = []
    along = (1, world.size) if axis == "x" else (world.size, 1)
    for repeated in (True, False):
        mesh = new_mesh(7, 9, rank_grid=along if split == "along the axis" else None)
        rng = np.random.default_rng(5)
        full = rng.uniform(0, 300, (mesh.rows, mesh.cols))
        mesh.clock[...] = full[np.ix_(mesh.global_rows(), mesh.global_cols())]
        a = mesh.alloc("a", TILE)
        n, lines = mesh.axis_length(axis), mesh.axis_length("y" if axis == "x" else "x")
        dest = ring_dest(n, -1 if ring == "interleaved back" else 1)
        times = rng.integers(0, n, lines)
        times[1] = 0
        pattern, phases, steps = run_rounds(mesh, a, axis, dest, times, ring == "relayed", repeated)
        assert pattern.one_pass
        if split == "along the axis":
            assert pattern.one_pass_inside == (world.size == 1)
        free = mesh.cart.allgather({key: f.copy() for key, f in mesh.fabric.link_free(axis).items()})
        seen.append((gather_full(mesh, {"clock": mesh.clock, **mesh.counters}), free, mesh.totals, phases, steps,
                     mesh.max_hops))
    (full_1, free_1, *rest_1), (full_2, free_2, *rest_2) = seen
    assert full_1.keys() == full_2.keys() and all(np.array_equal(full_1[k], full_2[k]) for k in full_1)
    assert all(np.array_equal(f_1[sign], f_2[sign]) for f_1, f_2 in zip(free_1, free_2) for sign in f_1)
    assert rest_1 == rest_2
    assert len(rest_1[2]) == times.max() > 3       # a step per round was recorded


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("axis", ["x", "y"])
def test_relocate_moves_each_tile_to_where_its_line_permutation_sends_it(new_mesh, world, grid, axis):
    """After transfers that did not land, the tiles move once: on every line, each position
    gets the tile its permutation names, however far it comes from (across every rank of
    the axis, forwarded neighbour by neighbour); rotations, the identity and random ones."""
    rows, cols, rank_grid = GRIDS[grid]
    mesh = new_mesh(rows, cols, rank_grid=rank_grid(world.size))
    n, lines = (cols, rows) if axis == "x" else (rows, cols)
    rng = np.random.default_rng(11)
    source = np.stack([np.roll(np.arange(n), line) if line % 3 == 0 else
                       np.arange(n) if line % 3 == 1 else rng.permutation(n) for line in range(lines)])
    a_full, _, a, _ = fresh_buffers(mesh, np.float64, seed=7)
    lo, hi = mesh.axis_lines(axis)
    relocate(mesh, a, axis, source[lo:hi])
    want = np.take_along_axis(a_full, source[:, :, None, None], axis=1) if axis == "x" else \
        np.take_along_axis(a_full, source.T[:, :, None, None], axis=0)
    assert np.array_equal(gather_tiles(mesh, a), want)


@pytest.mark.parametrize("axis", ["x", "y"])
def test_positions_runs_index_exactly_the_positions_a_block_holds(new_mesh, world, axis):
    """Collectives combine tiles through the runs of positions a block holds: views of evenly
    spaced runs, or one index array past a few runs; either way exactly those positions."""
    mesh = new_mesh(9, 11, rank_grid=(1, world.size) if axis == "x" else (world.size, 1))
    n, start = (11, mesh.col_start) if axis == "x" else (9, mesh.row_start)
    length = mesh.block_shape[1 if axis == "x" else 0]
    rng = np.random.default_rng(3)
    sets = [[0, 2, 4, 6, 8], [1, 2, 3, 7, 8], [0, 1, 3, 4, 6, 7, 9, 10], [5]]
    sets += [sorted(rng.choice(n, size=k, replace=False).tolist()) for k in (2, 4, 6, 8)]
    for positions in sets:
        want = [p - start for p in positions if start <= p < start + length]
        got = np.concatenate([np.arange(length)[index] for index in mesh.positions_runs(axis, positions)]
                             or [np.empty(0, np.int64)])
        assert sorted(got.tolist()) == want, positions
