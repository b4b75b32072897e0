"""The Megatron-LM, Ladder and T10 style GEMVs (PAPER.md §8): results against numpy, dry runs
and rank splits against numeric runs, closed forms of their hops, routes and relays, and the
route and memory limits they run into.
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from kernels import baselines
from kernels.run import BASELINE_ALGOS, run_baseline
from meshmpi import Mesh, load_hardware
from meshmpi.errors import CoreMemoryError, RoutingError
from meshes import make_mesh, modeled

pytestmark = pytest.mark.mpi

MESHES = [(1, 1), (2, 3), (3, 4), (4, 2), (5, 3), (4, 4)]
HW = load_hardware("wse2")


def run(rows, cols, algo, m, n, dry_run=False, **kwargs):
    mesh = make_mesh(rows, cols, dry_run=dry_run, routes=kwargs.pop("routes", "strict"))
    try:
        return run_baseline(mesh, algo, m, n, np.float64, seed=rows + 5 * cols, **kwargs)
    finally:
        mesh.free()


@pytest.mark.parametrize("rows,cols", MESHES)
@pytest.mark.parametrize("algo", BASELINE_ALGOS)
def test_baselines_match_numpy(algo, rows, cols):
    m, n = 3 * rows + 2, 4 * rows * cols + 5    # never divisible by the mesh; every row used
    report = run(rows, cols, algo, m, n)
    assert report["check"] == "passed" and report["max_abs_err"] < 1e-12 * m


@pytest.mark.parametrize("ring", [2, 3, 6, 12, 24])
def test_t10_any_ring_matches_numpy(ring):
    """Rings inside a row (2, 3, 6) and rings of 2 and 4 whole rows (12, 24) on 4x6."""
    report = run(4, 6, "t10", 47, 53, ring=ring)
    assert report["check"] == "passed" and report["ring"] == ring


@pytest.mark.parametrize("algo", BASELINE_ALGOS)
def test_modeled_numbers_do_not_depend_on_ranks_or_payload(algo):
    rows, cols, m, n = 4, 6, 50, 90
    extra = {"ring": 12} if algo == "t10" else {}
    reports = []
    for comm, dry_run in ((MPI.COMM_WORLD, False), (MPI.COMM_WORLD, True), (MPI.COMM_SELF, False)):
        mesh = Mesh(rows, cols, HW, comm=comm, dry_run=dry_run)
        reports.append(modeled(run_baseline(mesh, algo, m, n, **extra)))
        mesh.free()
    assert reports[1] == reports[0] and reports[2] == reports[0]
    assert all(r == reports[0] for r in MPI.COMM_WORLD.allgather(reports[0]))


@pytest.mark.parametrize("rows,cols,n", [(3, 4, 23), (4, 5, 20), (2, 6, 7)])
def test_megatron_closed_form(rows, cols, n):
    """A streaming chain down the snake of the used cores: (used - 1)·(α + β) to the last
    core's head, the payload of x once, then the local GEMV of m·w multiply-adds (w dot products
    when w < m). A relayed
    chain per used row (cols - 1 hops, cols - 2 relays) and a 1-hop turn between rows: one
    1-hop message into every used core but the first; routes: 2 for a row chain's 1-hop send
    and receive, 1 for the turns."""
    m = 40
    used_rows = min(rows, -(-n // cols))
    used = used_rows * cols
    width = -(-n // used)
    a, b, bw = HW.alpha_cycles_per_hop, HW.beta_cycles_per_relay, HW.link_bytes_per_cycle
    compute = 2 * m * width / HW.flops_per_cycle + min(m, width) * HW.vector_op_cycles
    expected = (used - 1) * (a + b) + m * HW.element_bytes / bw + compute
    for dry_run in (False, True):
        report = run(rows, cols, "megatron", m, n, dry_run=dry_run)
        assert report["modeled_cycles"] == pytest.approx(expected)
        assert report["max_hops_per_step"] == cols - 1
        assert report["relays"] == used_rows * (cols - 2)
        assert report["messages"] == used - 1
        assert report["routes_per_core_max"] == 2 + 1
        assert report["cores_used"] == used and report["columns_per_core"] == width


def _rotation_relays(length, senders):
    """Relays of one leg: every offset 1..length-1, position i < senders to (i + d) mod length,
    each intermediate core of a path forwarding once."""
    i = np.arange(senders)
    return sum(int(np.sum(np.abs((i + d) % length - i) - 1)) for d in range(1, length))


@pytest.mark.parametrize("rows,cols,holder_rows", [(3, 4, 3), (4, 5, 3), (5, 3, 5)])
def test_ladder_closed_form(rows, cols, holder_rows):
    """X then Y all-to-all of relayed rotations from the cores that hold x and W's rows (30
    rows, h = ceil(30 / cores) each, in the first ``holder_rows`` rows): the longest message is
    the wrap of offset 1 (cols - 1 hops along x, rows - 1 along y); relays are every
    intermediate core of every rotation, plus one software stage per holder at the corner;
    routes are the shared 1-hop colours of the relays (a send and a receive each way on each
    axis)."""
    n = rows * cols * 2      # every row used
    h = -(-30 // (rows * cols))
    assert -(-(-(-30 // h)) // cols) == holder_rows
    report = run(rows, cols, "ladder", 30, n)
    assert report["max_hops_per_step"] == max(cols - 1, rows - 1)
    holders = holder_rows * cols
    expected_relays = holder_rows * _rotation_relays(cols, cols) + cols * _rotation_relays(rows, holder_rows) + holders
    assert report["relays"] == expected_relays
    assert report["messages"] == holders * (cols - 1) + holders * (rows - 1)
    assert report["routes_per_core_max"] == 4 + 4


@pytest.mark.parametrize("cols,ring", [(6, 2), (6, 3), (6, 6), (4, 4)])
def test_t10_rings_in_a_row_closed_form(cols, ring):
    """Rings of p consecutive ids inside a row: the wrap edge is p - 1 hops; each router of a
    ring carries its two neighbours' 1-hop routes and the wrap route (2 routes for p = 2)."""
    report = run(3, cols, "t10", 36, 3 * cols, ring=ring)
    assert report["max_hops_per_step"] == ring - 1
    assert report["routes_per_core_max"] == (3 if ring > 2 else 2)
    assert report["messages"] == 3 * cols * (ring - 1)


@pytest.mark.parametrize("rows,k", [(4, 2), (6, 3)])
def test_t10_rings_of_rows_closed_form(rows, k):
    """Rings of k whole rows: a row end jumps cols - 1 hops back along its row, then one down
    (the ring's last row k - 1 up), the turn relayed in software at column 0."""
    cols = 5
    report = run(rows, cols, "t10", 30, rows * cols, ring=k * cols)
    assert report["max_hops_per_step"] == max(cols - 1, k - 1)
    down = 2 if k == 2 else 3            # y routes on a ring's rows: the 1-hop steps and the wrap
    assert report["routes_per_core_max"] == 3 + down
    assert report["relays"] == (k * cols - 1) * rows     # one turn per row and step


def test_t10_chooses_the_fewest_shifts_that_fit():
    """x whole fits beside a core's columns: no rotation at all; a vector too long for that
    rotates in the smallest ring whose two chunks fit."""
    plan = baselines.Plan(4, 8, 1000, 32)
    assert baselines.t10_ring(plan, HW) == 1
    plan = baselines.Plan(4, 8, 16384, 32)       # a 32 KB column of W: two chunks of 16 KB / p

    def fits(p):
        return HW.element_bytes * (16384 + 2 * (16384 // p) + 1) <= HW.sram_bytes_per_core
    assert baselines.ring_sizes(plan) == [1, 2, 4, 8, 16, 32]
    assert not fits(4) and fits(8) and baselines.t10_ring(plan, HW) == 8
    plan = baselines.Plan(4, 8, 32768, 32)       # a 64 KB column: nothing fits; 2 chunks alone do
    chunks = {p: HW.element_bytes * 2 * (32768 // p) for p in (2, 4)}
    assert chunks[2] > HW.sram_bytes_per_core >= chunks[4] and baselines.t10_ring(plan, HW) == 4


def test_ladder_direct_routes_raise_and_the_relay_fallback_fits():
    """A pass-through route per long-range fetch needs O(cols) routes per router: strict mode
    raises; relayed (the default) it fits; under warn the direct run reports the overflow."""
    with pytest.raises(RoutingError):
        run(4, 8, "ladder", 20, 64, dry_run=True, routing="direct")
    relayed = run(4, 8, "ladder", 20, 64, dry_run=True)
    assert relayed["routes_per_core_max"] <= HW.routes_per_core
    direct = run(4, 8, "ladder", 20, 64, routing="direct", routes="warn")
    assert direct["routes_per_core_max"] > HW.routes_per_core and direct["check"] == "passed"
    assert direct["relays"] < relayed["relays"]


def test_ladder_direct_fits_on_a_small_mesh():
    """Where the routes suffice the direct fetches run in strict mode and give numpy's result."""
    report = run(2, 2, "ladder", 9, 8, routing="direct")
    assert report["check"] == "passed" and report["routes_per_core_max"] <= HW.routes_per_core


def test_megatron_does_not_fit_a_16k_vector():
    """The whole x (32 KB) beside a 16K-row column of W is over 48 KB a core (M)."""
    with pytest.raises(CoreMemoryError):
        run(2, 2, "megatron", 16384, 4, dry_run=True)


@pytest.mark.parametrize("argv,message", [
    ("--algo megatron --ring 2", "--ring is for --algo t10"),
    ("--algo t10 --routing direct", "--routing is for --algo ladder"),
    ("--algo ladder --forwarding store", "--forwarding is for the MeshGEMV allreduces"),
    ("--algo t10 --ring 5", "--ring 5: a T10 ring must tile"),
])
def test_options_that_make_no_sense_are_refused(argv, message):
    from kernels.__main__ import main
    from meshmpi.errors import UsageError
    with pytest.raises(UsageError, match=message):
        main(["gemv", "--mesh", "4x6", "--m", "20", "--n", "30", "--dry-run"] + argv.split())
