"""MeshGEMV and the allreduces on the emulated wafer: results against numpy, the K-tree's
software stages against the paper's g/2 + G/2 + 1 (pipeline: N - 1), invariance.
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from kernels import allreduce as allreduce_module, gemv
from kernels.allreduce import ALGOS, allreduce
from kernels.run import GEMV_ALGOS, run_gemv
from meshmpi import Mesh, load_hardware
from meshmpi.errors import LayoutError
from meshmpi import host
from meshes import make_mesh, modeled

pytestmark = pytest.mark.mpi

MESHES = [(1, 1), (2, 2), (2, 3), (3, 4), (4, 2), (5, 3), (4, 4), (8, 8)]


@pytest.mark.parametrize("rows,cols", MESHES)
@pytest.mark.parametrize("algo", list(GEMV_ALGOS))
def test_gemv_matches_numpy(algo, rows, cols):
    m, n = 3 * rows + 2, 2 * cols + 5   # never divisible by the mesh
    mesh = make_mesh(rows, cols)
    report = run_gemv(mesh, algo, m, n, dtype=np.float64, seed=rows + 7 * cols)
    mesh.free()
    assert report["max_abs_err"] < 1e-12 * m


@pytest.mark.parametrize("groups", [1, 2, 3, 5, 9])
def test_meshgemv_any_group_count(groups):
    mesh = make_mesh(9, 4)
    report = run_gemv(mesh, "meshgemv", 100, 37, groups=groups, dtype=np.float32)
    mesh.free()
    assert report["max_abs_err"] < 1e-4 * 10


@pytest.mark.parametrize("reduce_axis", ["y", "x"])
def test_meshgemv_output_is_the_transposed_layout(reduce_axis):
    """Row-indexed in, column-indexed out (and the transpose): no vector is ever transposed."""
    rows, cols, m, n = 4, 6, 23, 17
    rng = np.random.default_rng(3)
    x_vec, w_mat = rng.standard_normal(m), rng.standard_normal((m, n))
    indexed = "y" if reduce_axis == "y" else "x"
    mesh = make_mesh(rows, cols)
    x = host.scatter(mesh, "x", x_vec, gemv.vector_layout(rows, cols, m, indexed))
    w = host.scatter(mesh, "w", w_mat, gemv.matrix_layout(rows, cols, m, n, reduce_axis))
    # W's tile (i, j) by slicing: W[in block i, out block j] ('y'), W[in block j, out block i] ('x')
    w_tiles = host.gather_tiles(mesh, w)
    ti, to = w.tile_shape
    padded = np.zeros((ti * (rows if reduce_axis == "y" else cols), to * (cols if reduce_axis == "y" else rows)))
    padded[:m, :n] = w_mat
    for i in range(rows):
        for j in range(cols):
            bi, bo = (i, j) if reduce_axis == "y" else (j, i)
            assert np.array_equal(w_tiles[i, j], padded[bi * ti:(bi + 1) * ti, bo * to:(bo + 1) * to])
    y = gemv.meshgemv(mesh, x, w, reduce_axis)
    out_axis = gemv.other(indexed)
    assert y.layout == gemv.vector_layout(rows, cols, n, out_axis)
    tiles, result = host.gather_tiles(mesh, y), host.gather(y)
    with pytest.raises(LayoutError, match="wrong is laid out as"):     # x indexed along the wrong axis
        wrong = host.scatter(mesh, "wrong", x_vec, gemv.vector_layout(rows, cols, m, out_axis))
        gemv.meshgemv(mesh, wrong, w, reduce_axis, name="wrong_x")
    mesh.free()
    np.testing.assert_allclose(result, x_vec @ w_mat, atol=1e-12 * m)
    # replicated along the reduction axis: every line holds the same copy
    assert np.all(tiles == (tiles[:1] if out_axis == "x" else tiles[:, :1]))


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 4), (5, 3), (8, 8)])
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("op", ["sum", "max"])
def test_allreduce_matches_numpy(op, algo, rows, cols):
    rng = np.random.default_rng(rows * cols)
    tiles = rng.standard_normal((rows, cols, 7))
    mesh = make_mesh(rows, cols)
    for axis, numpy_axis in (("y", 0), ("x", 1)):
        acc = host.scatter_tiles(mesh, f"acc.{axis}", tiles)
        allreduce(mesh, acc, axis, op, algo, name=f"ar.{axis}")
        got = host.gather_tiles(mesh, acc)
        acc.free()
        reduce = np.sum if op == "sum" else np.max
        want = np.broadcast_to(reduce(tiles, axis=numpy_axis, keepdims=True), tiles.shape)
        np.testing.assert_allclose(got, want, atol=1e-12)
    mesh.free()


@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("op", ["sum", "max"])
def test_chains_inside_a_block_run_in_one_pass_as_stage_by_stage(monkeypatch, op, axis):
    """A K-tree's streamed chains that stay inside one block run in one compiled pass: the
    same tiles (bit for bit, NaN included), clocks, busy cycles, counters, totals and timeline
    rows as run stage by stage, from uneven clocks, on whole lines and on segments, twice."""
    rng = np.random.default_rng(5)
    tiles = rng.standard_normal((9, 10, 6)).astype(np.float32)
    tiles[2, 3, 1] = np.nan
    clocks = rng.uniform(0, 500, size=(9, 10))
    seen = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(allreduce_module, "_chain_parts",
                                lambda mesh, acc, axis, tag, stages, *_: [(0, len(stages), None)])
        mesh = Mesh(9, 10, load_hardware("wse2"), comm=MPI.COMM_SELF)
        mesh.clock[...] = clocks
        acc = host.scatter_tiles(mesh, "acc", tiles)
        with mesh.phase("chains"):
            allreduce(mesh, acc, axis, op, "ktree", groups=3, name="ar")
            allreduce(mesh, acc, axis, op, "ktree", groups=2, name="ar", segments=[(0, 4), (5, 9)])
            allreduce(mesh, acc, axis, op, "ktree", groups=3, name="ar")
        phases, steps = mesh.timeline.collect()
        for row in phases:
            row.pop("wall_seconds")
        seen.append((host.gather_tiles(mesh, acc), mesh.clock.copy(), mesh.busy.copy(), mesh.counters,
                     dict(mesh.totals), phases, steps, mesh.max_hops))
        mesh.free()
    (tiles_1, clock_1, busy_1, counters_1, *rest_1), (tiles_2, clock_2, busy_2, counters_2, *rest_2) = seen
    assert np.array_equal(tiles_1, tiles_2, equal_nan=True)
    assert np.array_equal(clock_1, clock_2) and np.array_equal(busy_1, busy_2)
    assert counters_1.keys() == counters_2.keys()
    assert all(np.array_equal(counters_1[name], counters_2[name]) for name in counters_1)
    assert rest_1 == rest_2
    assert len(rest_1[2]) > 6          # the stages were recorded


def allreduce_steps(mesh, algo_phase):
    """Steps (software stages, then the broadcast) recorded in the allreduce phase."""
    phases, steps = mesh.timeline.collect()
    index = [i for i, p in enumerate(phases) if p["name"] == algo_phase]
    assert len(index) == 1
    return [s for s in steps if s["phase"] == index[0]]


@pytest.mark.parametrize("n,groups", [(16, 4), (36, 6), (64, 8), (100, 10)])
def test_ktree_stages_against_pipeline(n, groups):
    """K-tree: g/2 stages inside a group + G/2 between group roots + 1 broadcast (PAPER.md §3),
    against N - 1 chain stages + 1 broadcast for the pipeline."""
    g = n // groups
    expected = {"meshgemv": g // 2 + groups // 2 + 1, "pipeline": (n - 1) + 1}
    cycles = {}
    for algo in ("meshgemv", "pipeline"):
        mesh = make_mesh(n, 4, dry_run=True)
        report = run_gemv(mesh, algo, 4 * n, 64, groups=groups)
        steps = allreduce_steps(mesh, f"{algo}.allreduce.{GEMV_ALGOS[algo]}")
        mesh.free()
        assert len(steps) == expected[algo]
        assert steps[-1]["label"] == "broadcast"
        cycles[algo] = report["comm_cycles"]
    # every software stage costs at least beta, so fewer stages is less communication
    assert cycles["meshgemv"] < cycles["pipeline"]
    beta = load_hardware("wse2").beta_cycles_per_relay
    assert cycles["pipeline"] - cycles["meshgemv"] >= beta * (expected["pipeline"] - expected["meshgemv"])


@pytest.mark.parametrize("algo", list(GEMV_ALGOS))
def test_gemv_modeled_numbers_do_not_depend_on_ranks_or_payload(algo):
    rows, cols, m, n = 6, 4, 50, 30
    reports = []
    for comm, dry_run in ((MPI.COMM_WORLD, False), (MPI.COMM_WORLD, True), (MPI.COMM_SELF, False)):
        mesh = Mesh(rows, cols, load_hardware("wse2"), comm=comm, dry_run=dry_run)
        report = run_gemv(mesh, algo, m, n, groups=2)
        mesh.free()
        reports.append(modeled(report))
    assert reports[1] == reports[0] and reports[2] == reports[0]
    assert all(r == reports[0] for r in MPI.COMM_WORLD.allgather(reports[0]))


@pytest.mark.parametrize("forwarding", ["stream", "store"])
@pytest.mark.parametrize("n", [2, 7, 16])
def test_pipeline_allreduce_closed_form(n, forwarding):
    """A pipeline allreduce of E elements along a column of n cores from zero clocks. The chain
    to the last core streams: n - 1 stages of alpha + beta on the head, then the payload once
    at the pace of the link or the add, max(B/bw, E/rate); stored and forwarded it pays a
    transfer's start, alpha + B/bw, the add (E/rate and a vector operation's start) and beta per
    stage. Then the root multicasts back: a transfer's start, alpha per hop to the far end plus
    the payload (PAPER.md §3)."""
    elements = 96
    hw = load_hardware("wse2")
    a, b, bw, rate = (hw.alpha_cycles_per_hop, hw.beta_cycles_per_relay, hw.link_bytes_per_cycle,
                      hw.flops_per_cycle)
    start, op = hw.transfer_start_cycles, hw.vector_op_cycles
    nbytes = elements * hw.element_bytes
    if forwarding == "stream":
        chain = (n - 1) * (a + b) + max(nbytes / bw, elements / rate)
    else:
        chain = (n - 1) * (start + a + nbytes / bw + elements / rate + op + b)
    expected = chain + start + (n - 1) * a + nbytes / bw
    for dry_run in (True, False):
        mesh = make_mesh(n, 3, dry_run=dry_run)
        acc = mesh.alloc("acc", (elements,), np.float64)
        if not dry_run:
            acc.data[...] = np.arange(elements) + mesh.global_rows()[:, None, None]
        allreduce(mesh, acc, "y", "sum", "pipeline", forwarding=forwarding)
        assert mesh.modeled_cycles() == pytest.approx(expected)
        if not dry_run:
            total = n * np.arange(elements) + n * (n - 1) / 2
            assert np.array_equal(acc.data, np.broadcast_to(total, acc.data.shape))
        mesh.free()


def test_streaming_beats_store_and_forward_by_the_payload_per_stage():
    """On a long chain the difference is (stages - 1) payload serialisations and adds."""
    cycles = {}
    for forwarding in ("stream", "store"):
        mesh = make_mesh(64, 2, dry_run=True)
        acc = mesh.alloc("acc", (512,), np.float32)
        allreduce(mesh, acc, "y", "sum", "ktree", groups=8, forwarding=forwarding)
        cycles[forwarding] = mesh.modeled_cycles()
        mesh.free()
    assert cycles["stream"] < cycles["store"]


SEGMENTS = [[(0, 3), (3, 7), (9, 12)], [(1, 2), (2, 12)], [(0, 5), (5, 6), (7, 12)]]


@pytest.mark.parametrize("segments", SEGMENTS)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("op", ["sum", "max"])
def test_segmented_allreduce_matches_numpy_per_segment(op, algo, segments):
    """Each segment of a line of 12 ends with the reduction of its own cores' vectors; cores
    outside every segment (and one-core segments) keep theirs."""
    rng = np.random.default_rng(len(segments))
    for axis, shape in (("x", (3, 12, 5)), ("y", (12, 3, 5))):
        tiles = rng.standard_normal(shape)
        mesh = make_mesh(*shape[:2])
        acc = host.scatter_tiles(mesh, "acc", tiles)
        allreduce(mesh, acc, axis, op, algo, groups=2, name="ar", segments=segments)
        got = host.gather_tiles(mesh, acc)
        mesh.free()
        line = np.moveaxis(tiles, 1 if axis == "x" else 0, 0).copy()     # positions first
        for lo, hi in segments:
            reduced = np.sum(line[lo:hi], 0) if op == "sum" else np.max(line[lo:hi], 0)
            line[lo:hi] = reduced
        want = np.moveaxis(line, 0, 1 if axis == "x" else 0)
        np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("forwarding", ["stream", "store"])
def test_segmented_pipeline_allreduce_closed_form(forwarding):
    """Every segment of length L costs what a line of L cores costs (the pipeline closed form
    above) at the same time as the others: the last core of a segment's chain is its root, and
    the root's multicast reaches the segment's first core last. Cores outside every segment
    stay at zero."""
    segments, elements = [(0, 3), (3, 10), (11, 13)], 40
    hw = load_hardware("wse2")
    a, b, bw, rate = (hw.alpha_cycles_per_hop, hw.beta_cycles_per_relay, hw.link_bytes_per_cycle,
                      hw.flops_per_cycle)
    start, op = hw.transfer_start_cycles, hw.vector_op_cycles
    nbytes = elements * hw.element_bytes

    def pipeline(n):
        if forwarding == "stream":
            chain = (n - 1) * (a + b) + max(nbytes / bw, elements / rate)
        else:
            chain = (n - 1) * (start + a + nbytes / bw + elements / rate + op + b)
        return chain + start + (n - 1) * a + nbytes / bw

    for dry_run in (True, False):
        mesh = make_mesh(2, 14, dry_run=dry_run)
        acc = mesh.alloc("acc", (elements,), np.float64)
        allreduce(mesh, acc, "x", "sum", "pipeline", forwarding=forwarding, segments=segments)
        latest = [mesh.max_over_ranks(float(mesh.clock[:, np.isin(mesh.global_cols(), range(lo, hi))].max(initial=0)))
                  for lo, hi in segments + [(10, 11), (13, 14)]]
        mesh.free()
        assert latest[:3] == pytest.approx([pipeline(hi - lo) for lo, hi in segments])
        assert latest[3:] == [0.0, 0.0]


def test_segments_use_the_routes_of_one_line():
    """Disjoint segments share no router: a segmented K-tree needs no more routes per core than
    the same K-tree over the whole line."""
    peaks = []
    for segments in (None, [(0, 8), (8, 16), (16, 23), (23, 30)]):
        mesh = make_mesh(2, 30, dry_run=True)
        acc = mesh.alloc("acc", (4,), np.float32)
        allreduce(mesh, acc, "x", "sum", "ktree", segments=segments)
        peaks.append(mesh.max_over_ranks(int(mesh.routes.peak.max())))
        mesh.free()
    assert 0 < peaks[1] <= peaks[0]


def test_segments_must_be_disjoint():
    mesh = make_mesh(1, 6, dry_run=True)
    acc = mesh.alloc("acc", (2,), np.float32)
    with pytest.raises(ValueError, match="disjoint"):
        allreduce(mesh, acc, "x", segments=[(0, 4), (3, 6)])
    mesh.free()
