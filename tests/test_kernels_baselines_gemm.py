"""The Megatron-LM, Ladder and T10 style GEMMs (PAPER.md §8, the prefill's products): results
against numpy, dry runs and rank splits against numeric runs, closed forms of their hops,
messages, bytes and relays, and the route and memory limits they run into.
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from kernels import baselines
from kernels.run import BASELINE_ALGOS, run_gemm
from meshmpi import Mesh, load_hardware
from meshmpi.errors import CoreMemoryError, RoutingError
from meshes import make_mesh, modeled

pytestmark = pytest.mark.mpi

HW = load_hardware("wse2")


def run(rows, cols, algo, t, k, n, dry_run=False, routes="strict", **options):
    mesh = make_mesh(rows, cols, dry_run=dry_run, routes=routes)
    try:
        return run_gemm(mesh, algo, t, k, n, np.float64, seed=rows + 7 * cols, **options)
    finally:
        mesh.free()


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 3), (4, 2), (3, 5), (4, 4)])
@pytest.mark.parametrize("algo", BASELINE_ALGOS)
def test_gemms_match_numpy(algo, rows, cols):
    t, k, n = 5, 3 * rows + 2, 4 * rows * cols + 5     # never divisible by the mesh
    report = run(rows, cols, algo, t, k, n)
    assert report["check"] == "passed" and report["max_abs_err"] < 1e-12 * k
    assert (report["m"], report["k"], report["n"]) == (t, k, n)


@pytest.mark.parametrize("ring", [2, 3, 6, 12, 24])
def test_t10_gemm_any_ring_matches_numpy(ring):
    """Rings inside a row (2, 3, 6) and of 2 and 4 whole rows (12, 24) on 4x6."""
    report = run(4, 6, "t10", 3, 47, 53, ring=ring)
    assert report["check"] == "passed"


@pytest.mark.parametrize("algo", BASELINE_ALGOS)
def test_modeled_numbers_do_not_depend_on_ranks_or_payload(algo):
    rows, cols, t, k, n = 4, 6, 6, 50, 90
    options = {"ring": 12} if algo == "t10" else {}
    reports = []
    for comm, dry_run in ((MPI.COMM_WORLD, False), (MPI.COMM_WORLD, True), (MPI.COMM_SELF, False)):
        mesh = Mesh(rows, cols, HW, comm=comm, dry_run=dry_run)
        reports.append(modeled(run_gemm(mesh, algo, t, k, n, **options)))
        mesh.free()
    assert reports[1] == reports[0] and reports[2] == reports[0]
    assert all(r == reports[0] for r in MPI.COMM_WORLD.allgather(reports[0]))


@pytest.mark.parametrize("rows,cols,n,t", [(3, 4, 23, 4), (4, 5, 20, 9), (2, 6, 7, 1)])
def test_megatron_gemm_closed_form(rows, cols, n, t):
    """The GEMV's streaming chain down the snake with the whole of A (t x k) as payload, then
    a local product of 2·t·k·w FLOPs in min(k, w) vector operations; one message into every
    used core but the first, each carrying A."""
    k = 40
    used_rows = min(rows, -(-n // cols))
    used = used_rows * cols
    width = -(-n // used)
    a, b, bw, eb = HW.alpha_cycles_per_hop, HW.beta_cycles_per_relay, HW.link_bytes_per_cycle, HW.element_bytes
    compute = 2 * t * k * width / HW.flops_per_cycle + min(k, width) * HW.vector_op_cycles
    expected = (used - 1) * (a + b) + t * k * eb / bw + compute
    for dry_run in (False, True):
        report = run(rows, cols, "megatron", t, k, n, dry_run=dry_run)
        assert report["modeled_cycles"] == pytest.approx(expected)
        assert report["messages"] == used - 1
        assert report["bytes_moved"] == (used - 1) * t * k * eb
        assert report["relays"] == used_rows * (cols - 2)
        assert report["max_hops_per_step"] == cols - 1


def _rotation_relays(length, senders):
    """Relays of one leg: every offset 1..length-1, position i < senders to (i + d) mod length."""
    i = np.arange(senders)
    return sum(int(np.sum(np.abs((i + d) % length - i) - 1)) for d in range(1, length))


@pytest.mark.parametrize("rows,cols,t", [(3, 4, 2), (4, 5, 5)])
def test_ladder_gemm_closed_form(rows, cols, t):
    """The GEMV's X-then-Y all-to-all (same messages and relays: one per holder and consumer
    column, then per corner and consumer row), each fetch now carrying A's t·h values of the
    holder beside W's h·w: an x-leg message holds the blocks of every consumer row, a y-leg
    message those of every holder column."""
    k, n = 30, rows * cols * 2
    used, width = rows * cols, 2
    h = -(-k // used)
    holder_rows = -(-(-(-k // h)) // cols)
    report = run(rows, cols, "ladder", t, k, n)
    holders = holder_rows * cols
    assert report["messages"] == holders * (cols - 1) + holders * (rows - 1)
    assert report["relays"] == (holder_rows * _rotation_relays(cols, cols)
                                + cols * _rotation_relays(rows, holder_rows) + holders)
    block = (t * h + h * width) * HW.element_bytes
    assert report["bytes_moved"] == holders * (cols - 1) * rows * block + holders * (rows - 1) * cols * block
    assert report["max_hops_per_step"] == max(cols - 1, rows - 1)


@pytest.mark.parametrize("cols,ring", [(6, 2), (6, 3), (6, 6)])
def test_t10_gemm_rings_in_a_row_closed_form(cols, ring):
    """Rings of p ids in a row: p - 1 shifts of a t x (k / p) chunk by every core, the wrap
    edge p - 1 hops."""
    t, k = 4, 36
    report = run(3, cols, "t10", t, k, 3 * cols, ring=ring)
    assert report["max_hops_per_step"] == ring - 1
    assert report["messages"] == 3 * cols * (ring - 1)
    assert report["bytes_moved"] == report["messages"] * t * (k // ring) * HW.element_bytes


def test_t10_gemm_ring_fits_the_tokens():
    """T rows of x in the chunks and the output: the ring grows with T until two chunks, the
    output and the resident columns fit a core."""
    plan = baselines.Plan(4, 8, 1000, 32)
    assert baselines.t10_ring(plan, HW, tokens=1) == 1

    def fits(p, t):
        return HW.element_bytes * (1000 + t * (2 * -(-1000 // p) + 1)) <= HW.sram_bytes_per_core
    for t in (16, 64):
        p = baselines.t10_ring(plan, HW, tokens=t)
        smaller = [q for q in baselines.ring_sizes(plan) if q < p]
        assert fits(p, t) and not any(fits(q, t) for q in smaller)
    assert baselines.t10_ring(plan, HW, tokens=64) > baselines.t10_ring(plan, HW, tokens=16) > 1


def test_ladder_gemm_direct_routes_raise_and_relay_fits():
    with pytest.raises(RoutingError):
        run(4, 8, "ladder", 3, 20, 64, dry_run=True, routing="direct")
    relayed = run(4, 8, "ladder", 3, 20, 64, dry_run=True)
    assert relayed["routes_per_core_max"] <= HW.routes_per_core


def test_megatron_gemm_does_not_fit_a_long_prompt():
    """A whole 64 x 512 A (128 KB in fp32) on every core is over 48 KB (M)."""
    with pytest.raises(CoreMemoryError):
        run(2, 2, "megatron", 64, 512, 4, dry_run=True)


@pytest.mark.parametrize("argv,message", [
    ("--algo megatron --ring 2", "--ring is for --algo t10"),
    ("--algo meshgemm --routing relay", "--routing is for --algo ladder"),
    ("--algo t10 --broadcast direct", "--broadcast is for --algo summa"),
    ("--algo t10 --ring 5", "--ring 5: a T10 ring must tile"),
])
def test_gemm_options_that_make_no_sense_are_refused(argv, message):
    from kernels.__main__ import main
    from meshmpi.errors import UsageError
    with pytest.raises(UsageError, match=message):
        main(["gemm", "--mesh", "4x6", "--m", "3", "--k", "20", "--n", "30", "--dry-run"] + argv.split())
