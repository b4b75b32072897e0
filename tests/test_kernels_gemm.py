"""GEMM kernels on the emulated wafer: results against numpy and the paper's closed forms.

MeshGEMM, Cannon and SUMMA (both broadcasts) must reproduce ``A @ B`` on square and
non-square meshes with sizes that do not divide the mesh; GEMM-T must reproduce ``A @ B.T``.
The cost side is checked against numbers derived here independently of the kernels (PAPER.md
§2): the interleaved ring's order and 2-hop edges, one tile per directed link per step,
3 routes per axis (+6 for the alignment), 2 A + 2 B + C tiles of memory, and SUMMA's
R + C routes, which a wafer-sized mesh cannot have.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from mpi4py import MPI

from kernels import gemm, summa
from kernels.ring import interleaved_ring, plain_ring
from kernels.run import run_gemm
from meshmpi import Mesh, RoutingError, load_hardware
from meshmpi import host
from meshes import make_mesh, modeled

pytestmark = pytest.mark.mpi

MESHES = [(1, 1), (2, 2), (2, 3), (3, 4), (4, 2), (5, 3), (4, 4), (8, 8)]
LINES = [(1, 2), (2, 1), (1, 3), (1, 16), (16, 1), (4, 1)]   # 1-wide meshes: one ring has one core


def tolerance(reference, dtype):
    scale = max(1.0, float(np.abs(reference).max()))
    return (1e-12 if dtype == np.float64 else 1e-4) * scale


# ------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("rows,cols", MESHES + LINES)
@pytest.mark.parametrize("algo", ["meshgemm", "cannon", "summa"])
def test_gemm_matches_numpy(algo, rows, cols):
    m, k, n = 2 * rows + 3, 3 * cols + 2, rows + cols + 1   # never divisible by the mesh
    mesh = make_mesh(rows, cols)
    report = run_gemm(mesh, algo, m, k, n, np.float64, seed=rows * 10 + cols)
    mesh.free()
    assert report["max_abs_err"] < 1e-12 * max(k, 1) * 10


@pytest.mark.parametrize("rows,cols", [(1, 1), (4, 4), (5, 5), (7, 7), (3, 4), (1, 3)])
@pytest.mark.parametrize("algo", ["meshgemm", "cannon"])
def test_operands_end_where_their_layouts_say(algo, rows, cols):
    """After the L steps A and B are gathered back, through the layouts that record their
    moves, to the matrices given: on a square mesh B's tiles are read in place and moved once
    at the end, which must leave them where L - 1 ring steps would."""
    batch, m, kk, n = 2, 2 * rows + 1, 3 * cols + 2, 2 * cols + 3
    rng = np.random.default_rng(rows * 7 + cols)
    a_mats, b_mats = rng.standard_normal((batch, m, kk)), rng.standard_normal((batch, kk, n))
    plan = gemm.GemmPlan.build(algo, rows, cols, m, kk, n)
    mesh = make_mesh(rows, cols)
    a = host.scatter(mesh, "end.a", a_mats, plan.a_layout().batched(batch))
    b = host.scatter(mesh, "end.b", b_mats, plan.b_layout().batched(batch))
    c = gemm.ring_gemm(mesh, plan, a, b)
    got_a, got_b, got_c = host.gather(a), host.gather(b), host.gather(c)
    mesh.free()
    assert np.array_equal(got_a, a_mats) and np.array_equal(got_b, b_mats)
    np.testing.assert_allclose(got_c, a_mats @ b_mats, atol=tolerance(got_c, np.float64))


@pytest.mark.parametrize("rows,cols", [(2, 3), (4, 4), (5, 3)])
def test_summa_direct_matches_numpy_and_float32(rows, cols):
    mesh = make_mesh(rows, cols)
    report = run_gemm(mesh, "summa", 37, 41, 29, np.float64, broadcast="direct")
    assert report["max_abs_err"] < 1e-11
    report32 = run_gemm(mesh, "meshgemm", 37, 41, 29, np.float32)
    mesh.free()
    assert report32["max_abs_err"] < 1e-4 * 41


@pytest.mark.parametrize("algo", ["meshgemm", "cannon", "summa"])
def test_gemm_with_large_tiles_matches_numpy(algo):
    """Tiles big enough that the fabric copies them delivery by delivery."""
    mesh = make_mesh(4, 4)
    report = run_gemm(mesh, algo, 160, 176, 144, np.float64, seed=9)
    mesh.free()
    assert report["max_abs_err"] < 1e-11


def test_summa_direct_call_matches_numpy():
    """``summa.summa`` called directly on natural tiles, both broadcasts give A @ B."""
    rows, cols, (m, k, n) = 3, 4, (13, 19, 11)
    rng = np.random.default_rng(5)
    a_mat, b_mat = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    mesh = make_mesh(rows, cols)
    plan = gemm.GemmPlan.build("meshgemm", rows, cols, m, k, n)
    for broadcast in ("relay", "direct"):
        a = host.scatter(mesh, f"a.{broadcast}", a_mat, plan.a_layout())
        b = host.scatter(mesh, f"b.{broadcast}", b_mat, plan.b_natural_layout())
        c = summa.summa(mesh, plan, a, b, name=f"s.{broadcast}", broadcast=broadcast)
        result = host.gather(c)
        np.testing.assert_allclose(result, a_mat @ b_mat, atol=tolerance(a_mat @ b_mat, np.float64))
        for arr in (a, b, c):
            arr.free()
    with pytest.raises(ValueError):
        summa.summa(mesh, plan, a, b, broadcast="carrier-pigeon")
    mesh.free()


@pytest.mark.parametrize("rows,cols", [(3, 3), (5, 5), (2, 3)])
@pytest.mark.parametrize("transposed", [False, True])
def test_real_work_charges_what_each_core_multiplies_at_each_step(monkeypatch, rows, cols, transposed):
    """Uneven tiles (:class:`kernels.gemm.RealWork`): the labelled operand's padded K rows are
    zero here, so the real K rows a core multiplies at a step can be counted in the chunk it
    picks; each core's charge at that step is 2 x its real rows x those K rows x its real
    columns, and over the product the cores' sum is the unpadded 2 m k n."""
    m, k, n = 3 * rows - 1, 2 * cols + 1, 2 * cols - 1     # the last blocks partly or wholly padding
    picked, charged = [], []
    real_pick = gemm._pick_chunk
    axis = -2 if transposed else -1                 # the operand whose chunk holds the real K rows

    def pick(data, index, along, parts):
        part = real_pick(data, index, along, parts)
        if along == axis:   # B's key rows (any real column), or A's row 0 (zero on padded rows)
            picked.append(part.any(axis=-1) if transposed else part[:, :, 0] != 0)
        return part
    monkeypatch.setattr(gemm, "_pick_chunk", pick)
    plan = gemm.GemmPlan.build("meshgemm", rows, cols, m, k, n)
    block = gemm.RealWork.blocks
    work = gemm.RealWork(block(m, rows, plan.m_pad // rows), block(k, plan.chunks, plan.chunk),
                         block(n, cols, plan.n_pad // cols), np.ones(cols, np.int64))
    mesh = make_mesh(rows, cols)
    real_step, counted = mesh.step, [np.zeros(mesh.block_shape, np.int64)]

    def step(label=""):         # each compute-shift step's FLOPs: what it added to the counters
        real_step(label)
        if label.startswith("step "):
            counted.append(mesh.counters["flops"].copy())
            charged.append(counted[-1] - counted[-2])
    monkeypatch.setattr(mesh, "step", step)
    if transposed:      # C = A B^T, A m x n, B k x n: the labelled chunks are B's rows
        a = host.scatter(mesh, "w.a", np.ones((m, n)), plan.t_a_layout())
        b = host.scatter(mesh, "w.b", np.ones((k, n)), plan.b_layout())
        gemm.ring_gemm_t(mesh, plan, a, b, work=work).free()
    else:
        a = host.scatter(mesh, "w.a", np.ones((m, k)), plan.a_layout())
        b = host.scatter(mesh, "w.b", np.ones((k, n)), plan.b_layout())
        gemm.ring_gemm(mesh, plan, a, b, work=work).free()
    total = mesh.sum_over_ranks(int(mesh.counters["flops"].sum()))
    real_rows = work.rows[mesh.global_rows()][:, None]
    real_cols = work.cols[mesh.global_cols()][None, :]
    busy, hw = mesh.busy.copy(), mesh.hardware
    mesh.free()
    assert len(picked) == len(charged) == plan.chunks
    expected_busy = 0
    for step, (chunk, flops) in enumerate(zip(picked, charged)):
        k_rows = chunk.sum(axis=-1)
        assert np.array_equal(flops, 2 * real_rows * real_cols * k_rows), step
        # one vector operation per real K row, on the cores that do any work
        expected_busy = expected_busy + np.where(flops > 0, flops / hw.flops_per_cycle + k_rows * hw.vector_op_cycles, 0)
    np.testing.assert_allclose(busy, expected_busy, rtol=1e-12)
    assert total == 2 * m * k * n


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 2), (2, 3), (3, 4), (4, 2), (5, 3), (8, 8)] + LINES)
@pytest.mark.parametrize("algo", ["meshgemm", "cannon"])
def test_gemm_t_matches_a_times_b_transposed(algo, rows, cols):
    m, kk, n = 2 * rows + 1, 3 * cols + 2, 2 * cols + 3   # C = A (m x kk) @ B^T, B is n x kk
    rng = np.random.default_rng(rows * 100 + cols)
    a_mat, b_mat = rng.standard_normal((m, kk)), rng.standard_normal((n, kk))
    plan = gemm.GemmPlan.build(algo, rows, cols, m, n, kk)   # plan.k is C's N, plan.n the shared K
    mesh = make_mesh(rows, cols)
    a = host.scatter(mesh, "t.a", a_mat, plan.t_a_layout())
    b = host.scatter(mesh, "t.b", b_mat, plan.b_layout())
    c = gemm.ring_gemm_t(mesh, plan, a, b)
    result = host.gather(c)
    mesh.free()
    reference = a_mat @ b_mat.T
    assert result.shape == reference.shape
    np.testing.assert_allclose(result, reference, atol=tolerance(reference, np.float64))


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 3), (4, 4)])
def test_batched_tiles_are_independent_products(rows, cols):
    """A head axis in front of the tiles: every slice is its own product, and the modeled
    FLOPs are the batch's sum (prefill attention runs all kv groups this way)."""
    batch, m, kk, n = 3, 2 * rows + 1, 3 * cols + 2, 2 * cols + 3
    rng = np.random.default_rng(rows + 7 * cols)
    a_mats, b_mats = rng.standard_normal((batch, m, kk)), rng.standard_normal((batch, kk, n))
    plan = gemm.GemmPlan.build("meshgemm", rows, cols, m, kk, n)
    mesh = make_mesh(rows, cols)
    a = host.scatter(mesh, "b.a", a_mats, plan.a_layout().batched(batch))
    b = host.scatter(mesh, "b.b", b_mats, plan.b_layout().batched(batch))
    flops_before = mesh.counters["flops"].sum()
    c = gemm.ring_gemm(mesh, plan, a, b)
    flops = mesh.sum_over_ranks(int(mesh.counters["flops"].sum() - flops_before))
    result = host.gather(c)
    mesh.free()
    np.testing.assert_allclose(result, a_mats @ b_mats, atol=tolerance(result, np.float64))
    assert flops == batch * 2 * plan.m_pad * plan.k_pad * plan.n_pad

    plan_t = gemm.GemmPlan.build("meshgemm", rows, cols, m, n, kk)
    bt_mats = np.swapaxes(b_mats, 1, 2)                      # n x kk each
    mesh = make_mesh(rows, cols)
    a = host.scatter(mesh, "t.a", a_mats, plan_t.t_a_layout().batched(batch))
    b = host.scatter(mesh, "t.b", bt_mats, plan_t.b_layout().batched(batch))
    result = host.gather(gemm.ring_gemm_t(mesh, plan_t, a, b))
    mesh.free()
    np.testing.assert_allclose(result, a_mats @ b_mats, atol=tolerance(result, np.float64))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_head_cells_multiply_only_their_own_heads(n):
    """A CellMap per column (heads on column segments, PAPER.md §4): GEMM-T adds each cell's
    ``A_u B_slot^T`` into its head's partial, whose reduction along X then spans only the
    columns that hold that head; MeshGEMM gives each cell ``P_head @ V_slot``; padding cells
    (-1) stay zero; the FLOPs are the cells', not the heads'."""
    heads, cells, per_slot, m, kk, width = 3, 4, 2, 2 * n + 1, 3 * n, 2
    rng = np.random.default_rng(n)
    entry = rng.integers(-1, heads, (n, cells))
    heads_map = gemm.CellMap(entry, per_slot, heads)
    a_mats = rng.standard_normal((cells, m, n * width))          # column block j: column j's dims
    b_mats = rng.standard_normal((cells // per_slot, kk, n * width))
    a_mats[np.broadcast_to((entry < 0).T[:, None, :, None], (cells, m, n, width)).reshape(a_mats.shape)] = 0
    plan_t = gemm.GemmPlan.build("meshgemm", n, n, m, kk, n * width)
    mesh = make_mesh(n, n)
    a = host.scatter(mesh, "h.a", a_mats, plan_t.t_a_layout().batched(cells))
    b = host.scatter(mesh, "h.b", b_mats, plan_t.b_layout().batched(cells // per_slot))
    before = mesh.counters["flops"].sum()
    partial = gemm.ring_gemm_t(mesh, plan_t, a, b, cells=heads_map)
    partial.layout = plan_t.t_c_layout().batched(heads)    # the partials of every head, natural
    tiles = host.gather(partial)
    flops = mesh.sum_over_ranks(int(mesh.counters["flops"].sum() - before))
    mesh.free()
    block = lambda x, j: x[:, j * width:(j + 1) * width]  # noqa: E731
    for h in range(heads):
        want = sum((block(a_mats[u], j) @ block(b_mats[u // per_slot], j).T
                    for j in range(n) for u in range(cells) if entry[j, u] == h), np.zeros((m, kk)))
        got = tiles[h]
        np.testing.assert_allclose(got, want, atol=tolerance(want, np.float64))
    assert flops == n * cells * 2 * plan_t.m_pad * plan_t.k_pad * width   # each cell: its column's dims

    p_mats = rng.standard_normal((heads, m, kk))
    plan = gemm.GemmPlan.build("meshgemm", n, n, m, kk, n * width)
    v_mats = rng.standard_normal((cells // per_slot, kk, n * width))
    mesh = make_mesh(n, n)
    a = host.scatter(mesh, "h.p", p_mats, plan.a_layout().batched(heads))
    b = host.scatter(mesh, "h.v", v_mats, plan.b_layout().batched(cells // per_slot))
    out = gemm.ring_gemm(mesh, plan, a, b, cells=heads_map)
    out.layout = plan.c_layout().batched(cells)       # cell u of every column, natural
    tiles = host.gather(out)
    mesh.free()
    for u in range(cells):
        got = tiles[u]
        for j in range(n):
            want = p_mats[entry[j, u]] @ block(v_mats[u // per_slot], j) if entry[j, u] >= 0 else np.zeros((m, width))
            np.testing.assert_allclose(block(got, j), want, atol=tolerance(want, np.float64))


# ------------------------------------------------------------------------------ closed forms
def brute_force_ring(n):
    """The paper's interleaved ring, written out: evens ascending, then odds descending."""
    return [i for i in range(n) if i % 2 == 0] + [i for i in reversed(range(n)) if i % 2 == 1]


@pytest.mark.parametrize("n,order", [(4, [0, 2, 3, 1]), (5, [0, 2, 4, 3, 1]),
                                     (8, [0, 2, 4, 6, 7, 5, 3, 1])])
def test_interleaved_ring_order_from_the_paper(n, order):
    ring = interleaved_ring(n)
    assert ring.order.tolist() == order
    position = [i // 2 if i % 2 == 0 else n - (i + 1) // 2 for i in range(n)]   # PAPER.md §2
    assert ring.position.tolist() == position
    assert ring.send().tolist() == [order[(position[i] + 1) % n] for i in range(n)]
    assert ring.recv().tolist() == [order[(position[i] - 1) % n] for i in range(n)]


def test_interleaved_ring_edges_are_at_most_two_hops():
    for n in range(1, 200):
        ring = interleaved_ring(n)
        assert ring.order.tolist() == brute_force_ring(n)
        assert sorted(ring.order.tolist()) == list(range(n))
        edges = [abs(ring.send()[i] - i) for i in range(n)]
        assert max(edges, default=0) == (2 if n >= 3 else n - 1)
        assert plain_ring(n).max_hops() == n - 1


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 13])
def test_every_directed_link_carries_one_tile_per_meshgemm_step(n):
    mesh = make_mesh(n, n)
    for axis in ("x", "y"):
        pattern = mesh.fabric.permutation(f"ring.{axis}", axis, interleaved_ring(n).send())
        assert pattern.link_load["right"].tolist() == [1] * (n - 1)
        assert pattern.link_load["left"].tolist() == [1] * (n - 1)
        assert pattern.max_hops == min(2, n - 1)
    mesh.free()


@pytest.mark.parametrize("n", [3, 4, 5, 7, 12])
def test_longest_transfer_meshgemm_two_hops_cannon_n_minus_one(n):
    reports = {}
    for algo in ("meshgemm", "cannon"):
        mesh = make_mesh(n, n, dry_run=True)
        reports[algo] = run_gemm(mesh, algo, 4 * n, 4 * n, 4 * n)
        mesh.free()
    assert reports["meshgemm"]["max_hops_per_step"] == 2
    assert reports["cannon"]["max_hops_per_step"] == n - 1


def brute_force_routes(dest):
    """Routes per router of one line pattern: every router a message touches (source,
    pass-throughs, destination) holds one route for it."""
    count = [0] * len(dest)
    for s, d in enumerate(dest):
        if d == s:
            continue
        for p in range(min(s, d), max(s, d) + 1):
            count[p] += 1
    return count


@pytest.mark.parametrize("rows,cols", [(4, 4), (5, 6), (8, 8), (9, 7)])
def test_meshgemm_routes_per_core(rows, cols):
    ring_x, ring_y = interleaved_ring(cols), interleaved_ring(rows)
    steps_x, steps_y = brute_force_routes(ring_x.send()), brute_force_routes(ring_y.send())
    assert max(steps_x) == 3 and max(steps_y) == 3        # send, receive, pass-through
    # The alignment rotates A along x both ways (the shorter direction per row): two more groups.
    align_x = [a + b for a, b in zip(brute_force_routes(ring_x.send()), brute_force_routes(ring_x.recv()))]
    expected = max(s + a for s, a in zip(steps_x, align_x)) + max(steps_y)
    assert expected == 12
    mesh = make_mesh(rows, cols, dry_run=True)
    report = run_gemm(mesh, "meshgemm", 3 * rows * cols, 2 * rows * cols, 5 * cols)
    mesh.free()
    assert report["routes_per_core_max"] == expected


def closed_form_tiles(rows, cols, m, k, n):
    """Elements per core of A, B (pre-skewed) and C for (m x k) @ (k x n) on rows x cols:
    K is cut into lcm(rows, cols) chunks; A holds lcm/cols of them, B lcm/rows (PAPER.md §2)."""
    chunks = math.lcm(rows, cols)
    chunk, tm, tn = -(-k // chunks), -(-m // rows), -(-n // cols)
    return tm * chunk * (chunks // cols), chunk * (chunks // rows) * tn, tm * tn


def live_buffers(mesh):
    """Live buffer names and bytes per core (every core holds the same tiles here)."""
    live = mesh.memory.live()
    assert all(other == live for other in mesh.cart.allgather(live))
    return live


OWNERSHIP_MESHES = [(3, 3), (4, 4), (5, 5), (6, 6), (3, 5), (6, 4), (1, 4), (4, 1)]


@pytest.mark.parametrize("rows,cols", OWNERSHIP_MESHES)
@pytest.mark.parametrize("algo", ["meshgemm", "cannon"])
def test_gemm_memory_ledger_phase_by_phase(algo, rows, cols):
    """Odd and even sides alike: the spare A and B buffers are charged only while the ring
    turns (2 A + 2 B + C at peak; a 1-long ring needs no spare), the kernel frees exactly its
    own spares, and the caller's A and B keep their names and charges until the caller frees them."""
    m, k, n = 50, 70, 30
    a_el, b_el, c_el = closed_form_tiles(rows, cols, m, k, n)
    eb = load_hardware("wse2").element_bytes
    spare_a, spare_b = int(cols > 1), int(rows > 1)
    rng = np.random.default_rng(rows * 31 + cols)
    a_mat, b_mat = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    for dry_run in (True, False):
        mesh = make_mesh(rows, cols, dry_run=dry_run)
        plan = gemm.GemmPlan.build(algo, rows, cols, m, k, n)
        a = host.scatter(mesh, "caller.a", None if dry_run else a_mat, plan.a_layout(), np.float64)
        b = host.scatter(mesh, "caller.b", None if dry_run else b_mat, plan.b_layout(), np.float64)
        c = gemm.ring_gemm(mesh, plan, a, b, name="k")
        phases = {p["name"]: p for p in mesh.timeline.collect()[0]}
        assert phases["k.align"]["peak_bytes"] == (a_el + b_el) * eb
        assert phases["k.compute_shift"]["peak_bytes"] == \
            ((1 + spare_a) * a_el + (1 + spare_b) * b_el + c_el) * eb
        assert live_buffers(mesh) == {"caller.a": a_el * eb, "caller.b": b_el * eb, "k.c": c_el * eb}
        if not dry_run:
            np.testing.assert_allclose(host.gather(c), a_mat @ b_mat,
                                       atol=1e-12 * k * np.abs(a_mat).max() * np.abs(b_mat).max())
        a.free()
        b.free()
        assert live_buffers(mesh) == {"k.c": c_el * eb}
        assert mesh.max_over_ranks(mesh.memory.most_resident()) == c_el * eb
        mesh.free()


@pytest.mark.parametrize("rows,cols", OWNERSHIP_MESHES)
def test_gemm_t_memory_ledger_phase_by_phase(rows, cols):
    """GEMM-T returns C under its own name on odd and even sides (the partials and B turn;
    A stays), frees exactly its spares, and leaves the caller's A and B charged."""
    m, n, kk = 20, 33, 17                           # C = A (m x kk) @ B^T, B is n x kk
    chunks = math.lcm(rows, cols)
    chunk, tm = -(-n // chunks), -(-m // rows)
    a_el = tm * -(-kk // cols)
    b_el = chunk * (chunks // rows) * -(-kk // cols)
    c_el = tm * chunk * (chunks // cols)
    eb = load_hardware("wse2").element_bytes
    spare_c, spare_b = int(cols > 1), int(rows > 1)
    rng = np.random.default_rng(rows * 17 + cols)
    a_mat, b_mat = rng.standard_normal((m, kk)), rng.standard_normal((n, kk))
    for dry_run in (True, False):
        mesh = make_mesh(rows, cols, dry_run=dry_run)
        plan = gemm.GemmPlan.build("meshgemm", rows, cols, m, n, kk)
        a = host.scatter(mesh, "caller.a", None if dry_run else a_mat, plan.t_a_layout(), np.float64)
        b = host.scatter(mesh, "caller.b", None if dry_run else b_mat, plan.b_layout(), np.float64)
        c = gemm.ring_gemm_t(mesh, plan, a, b, name="t")
        phases = {p["name"]: p for p in mesh.timeline.collect()[0]}
        assert phases["t.compute_shift"]["peak_bytes"] == \
            (a_el + (1 + spare_b) * b_el + (1 + spare_c) * c_el) * eb
        assert phases["t.realign"]["peak_bytes"] == (a_el + b_el + c_el) * eb
        assert live_buffers(mesh) == {"caller.a": a_el * eb, "caller.b": b_el * eb, "t.c": c_el * eb}
        if not dry_run:
            result = host.gather(c)
            np.testing.assert_allclose(result, a_mat @ b_mat.T, atol=1e-12 * kk * 25)
        mesh.free()


def test_summa_direct_runs_out_of_routes_on_a_large_mesh():
    """R + C routes per core: a 32x32 mesh needs 64 > 21 (PAPER.md §2); relaying needs O(1)."""
    mesh = make_mesh(32, 32, dry_run=True)
    with pytest.raises(RoutingError):
        run_gemm(mesh, "summa", 256, 256, 256, broadcast="direct")
    mesh.free()
    mesh = make_mesh(32, 32, dry_run=True)
    report = run_gemm(mesh, "summa", 256, 256, 256, broadcast="relay")
    mesh.free()
    assert report["routes_per_core_max"] <= 4
    assert report["relays"] > 0


def test_summa_direct_routes_grow_with_the_mesh_under_warn():
    for n in (4, 6):
        mesh = make_mesh(n, n, dry_run=True, routes="warn")
        report = run_gemm(mesh, "summa", 4 * n, 4 * n, 4 * n, broadcast="direct")
        mesh.free()
        assert report["routes_per_core_max"] == 2 * n   # a route per root, on both axes


def test_summa_relay_step_grows_with_alpha_plus_beta_times_n():
    """A relayed panel reaches the far end of a line after (N-1) hops and N-2 relays; with
    no compute the modeled time grows as (alpha + beta) N per step."""
    base = load_hardware("wse2")
    times = {}
    for n in (8, 16):
        for beta in (base.beta_cycles_per_relay, 2 * base.beta_cycles_per_relay):
            hw = base.with_overrides([f"beta_cycles_per_relay={beta}"])
            world = MPI.COMM_WORLD
            mesh = Mesh(1, n, hw, comm=world if world.Get_size() <= n else MPI.COMM_SELF, dry_run=True)
            times[n, beta] = run_gemm(mesh, "summa", 1, n, 1, broadcast="relay")["comm_cycles"]
            mesh.free()
    b = base.beta_cycles_per_relay
    assert times[16, b] > 1.8 * times[8, b]
    assert times[16, 2 * b] - times[16, b] > times[8, 2 * b] - times[8, b] > 0


# ------------------------------------------------------------------------------ invariance
@pytest.mark.parametrize("algo,broadcast", [("meshgemm", "relay"), ("cannon", "relay"),
                                            ("summa", "relay"), ("summa", "direct")])
def test_modeled_numbers_do_not_depend_on_ranks_or_payload(algo, broadcast):
    rows, cols, sizes = 4, 6, (30, 50, 20)
    reports = []
    for comm, dry_run in ((MPI.COMM_WORLD, False), (MPI.COMM_WORLD, True), (MPI.COMM_SELF, False)):
        mesh = Mesh(rows, cols, load_hardware("wse2"), comm=comm, dry_run=dry_run, routes="warn")
        reports.append(run_gemm(mesh, algo, *sizes, broadcast=broadcast))
        mesh.free()
    first = modeled(reports[0])
    for other in reports[1:]:
        assert modeled(other) == first
    gathered = MPI.COMM_WORLD.allgather(first)
    assert all(g == first for g in gathered)


@pytest.mark.parametrize("n,root", [(9, 3), (6, 0), (7, 6)])
def test_relay_chain_costs(n, root):
    """SUMMA's relayed broadcast: a chain from the root; the core at distance h gets the panel
    after h hops and h-1 relays (all after the root started its send), every core that
    forwards it spends beta of its own time, and the root is busy until the panel has left it."""
    hw = load_hardware("wse2")
    world = MPI.COMM_WORLD
    mesh = Mesh(2, n, hw, comm=world if world.Get_size() <= n else MPI.COMM_SELF,
                rank_grid=(1, world.Get_size()) if world.Get_size() <= n else None)
    panel = mesh.alloc("panel", (3, 5), np.float32)
    pattern = mesh.fabric.multicast("chain", "x", root, relay=True)
    pattern.run(panel)
    nbytes = 15 * hw.element_bytes
    expected = np.zeros(n)
    for d in range(n):
        if d == root:    # busy until the panel's tail has left it
            expected[d] = hw.transfer_start_cycles + nbytes / hw.link_bytes_per_cycle
            continue
        h = abs(d - root)
        expected[d] = hw.transfer_start_cycles + hw.alpha_cycles_per_hop * h + hw.beta_cycles_per_relay * (h - 1) \
            + nbytes / hw.link_bytes_per_cycle
        if 0 < d < n - 1:   # forwards to the next core
            expected[d] += hw.beta_cycles_per_relay
    clock = mesh.cart.bcast(host.gather_block_arrays(mesh, {"clock": mesh.clock}), root=0)["clock"]
    routes = int(mesh.max_over_ranks(int(mesh.routes.peak.max())))
    mesh.free()
    np.testing.assert_allclose(clock, np.broadcast_to(expected, (2, n)))
    assert routes <= 2


@pytest.mark.parametrize("rows,cols", [(3, 4), (4, 4)])
def test_a_plan_is_built_once_and_called_for_every_operand_pair(rows, cols):
    """``MeshGemm``: one plan, called for two operand pairs of its shape (and GEMM-T's), gives
    each product, with the result in the plan's C layout."""
    m, k, n = 7, 9, 5
    mesh = make_mesh(rows, cols)
    plain, transposed = gemm.MeshGemm(mesh, m, k, n), gemm.MeshGemm(mesh, m, n, k, transposed=True)
    rng = np.random.default_rng(rows)
    for call in range(2):
        a_mat, b_mat = rng.standard_normal((m, k)), rng.standard_normal((k, n))
        for kernel, b_operand in ((plain, b_mat), (transposed, b_mat.T)):
            a = host.scatter(mesh, f"a{call}", a_mat, kernel.a_layout)
            b = host.scatter(mesh, f"b{call}", b_operand, kernel.b_layout)
            with mesh.fabric.scope():
                c = kernel(a, b, f"call{call}")
            assert c.layout == kernel.c_layout
            np.testing.assert_allclose(host.gather(c), a_mat @ b_mat, atol=tolerance(a_mat @ b_mat, np.float64))
            for arr in (a, b, c):
                arr.free()
    mesh.free()
