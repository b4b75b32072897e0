"""No result or modeled number depends on the rank split or on payloads (dry run).

One fixed schedule (shifts, a ring, multicasts on a subset of lines, a permutation, compute
with masks, phases and steps) runs on the world's ranks under several rank grids, on a
1-rank communicator of this process (MPI.COMM_SELF: the whole mesh in one block, an
independent split) and as a dry run. Clocks, counters, memory and route peaks, the phase and
step tables and (numeric runs) the tiles must agree bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from meshmpi import load_hardware
from meshmpi.host import gather_tiles, scatter_tiles
from meshes import ring_dest

pytestmark = pytest.mark.mpi

ROWS, COLS = 5, 7
PER_CORE = ("bytes_sent", "bytes_recv", "messages_sent", "hops", "relays", "flops")


def block_of(mesh, full):
    return full[mesh.row_start:mesh.row_stop, mesh.col_start:mesh.col_stop]


def schedule(mesh):
    """The fixed little schedule; returns what it left on the mesh, gathered on every rank."""
    rng = np.random.default_rng(42)
    a_full = rng.standard_normal((ROWS, COLS, 2, 3)).astype(np.float32)
    b_full = rng.standard_normal((ROWS, COLS, 2, 3)).astype(np.float32)
    flops_full = rng.integers(0, 500, size=(ROWS, COLS))
    checker = (np.add.outer(np.arange(ROWS), np.arange(COLS)) % 2).astype(bool)
    perm = rng.permutation(ROWS)
    if mesh.dry_run:
        a = scatter_tiles(mesh, "a", None, (2, 3), np.float32)
        b = scatter_tiles(mesh, "b", None, (2, 3), np.float32)
    else:
        a, b = scatter_tiles(mesh, "a", a_full), scatter_tiles(mesh, "b", b_full)
    c = mesh.alloc("c", (2, 2), np.float32)
    with mesh.phase("setup"):
        mesh.compute(block_of(mesh, flops_full), where=block_of(mesh, checker))
        mesh.step("masked compute")
    with mesh.phase("exchange"), mesh.fabric.scope():
        transfer = mesh.fabric.shift("east2", "x", 2, relay=True).start(a, b)
        mesh.compute(100)
        transfer.wait()
        mesh.step("relayed shift")
        with mesh.phase("ring"):
            for _ in range(3):
                mesh.fabric.permutation("ring", "y", ring_dest(ROWS), group="ring").run(b)
                mesh.matmul_acc(c, a, b, transpose_b=True)
                mesh.step()
        mesh.fabric.multicast("bcast", "x", root=3, lo=1, hi=6).run(a, b, lines=[0, 2, 4])
        mesh.fabric.permutation("perm", "y", perm).run(b, a)
        mesh.fabric.shift("up", "y", -1).run(a, lines=[1, 3, 6])
        mesh.fabric.multicasts("segs", "x", [0, 6], [(0, 3), (3, 7)]).run(c)
        mesh.compute(7, where=~block_of(mesh, checker))
        mesh.step("tail")
    arrays = {name: mesh.counters[name] for name in PER_CORE}
    arrays.update(clock=mesh.clock, busy=mesh.busy, peak_bytes=mesh.memory.peak,
                  resident=mesh.memory.resident, routes_peak=mesh.routes.peak)
    from meshmpi.host import gather_block_arrays
    full = mesh.cart.bcast(gather_block_arrays(mesh, arrays), root=0)
    phases, steps = mesh.timeline.collect()
    for row in phases:
        row.pop("wall_seconds")
    full["phases"], full["steps"] = phases, steps
    full["max_hops"] = mesh.cart.allreduce(mesh.max_hops, op=MPI.MAX)
    full["modeled_cycles"] = mesh.modeled_cycles()
    if not mesh.dry_run:
        full["tiles"] = {arr.name: gather_tiles(mesh, arr) for arr in (a, b, c)}
    return full


def differences(got, want, label):
    out = []
    for key in want:
        if key == "tiles" and key not in got:
            continue
        if key == "tiles":
            out += [f"{label}: tiles of {k} differ" for k in want[key]
                    if not np.array_equal(got[key][k], want[key][k])]
        elif isinstance(want[key], np.ndarray):
            if got[key].dtype != want[key].dtype or not np.array_equal(got[key], want[key]):
                out.append(f"{label}: {key} differs:\n{got[key]}\nvs\n{want[key]}")
        elif got[key] != want[key]:
            out.append(f"{label}: {key} differs: {got[key]} vs {want[key]}")
    return out


@pytest.fixture(scope="module")
def single_rank_run():
    mesh = None
    try:
        from meshmpi import Mesh
        mesh = Mesh(ROWS, COLS, load_hardware("wse2"), comm=MPI.COMM_SELF)
        assert mesh.size == 1 and mesh.block_shape == (ROWS, COLS)
        yield schedule(mesh)
    finally:
        if mesh is not None:
            mesh.free()


GRIDS = {"auto": lambda p: None, "1xP": lambda p: (1, p), "Px1": lambda p: (p, 1)}


@pytest.mark.parametrize("grid", list(GRIDS))
def test_same_numbers_on_every_rank_grid(new_mesh, world, single_rank_run, grid):
    mesh = new_mesh(ROWS, COLS, rank_grid=GRIDS[grid](world.size))
    got = schedule(mesh)
    problems = differences(got, single_rank_run, f"{grid} on {world.size} ranks")
    assert not problems, "\n".join(problems)
    # The schedule did something worth comparing.
    assert got["relays"].sum() > 0 and got["messages_sent"].sum() > 0 and got["flops"].sum() > 0
    assert len(got["phases"]) == 3 and len(got["steps"]) == 6


@pytest.mark.parametrize("grid", list(GRIDS))
def test_dry_run_models_the_same_numbers(new_mesh, world, single_rank_run, grid):
    mesh = new_mesh(ROWS, COLS, rank_grid=GRIDS[grid](world.size), dry_run=True)
    got = schedule(mesh)
    assert "tiles" not in got
    problems = differences(got, single_rank_run, f"dry run, {grid} on {world.size} ranks")
    assert not problems, "\n".join(problems)


def test_dry_run_on_one_rank_matches_too(single_rank_run):
    from meshmpi import Mesh
    mesh = Mesh(ROWS, COLS, load_hardware("wse2"), comm=MPI.COMM_SELF, dry_run=True)
    try:
        problems = differences(schedule(mesh), single_rank_run, "dry run on COMM_SELF")
    finally:
        mesh.free()
    assert not problems, "\n".join(problems)
