"""Defective cores and remapping (meshmpi/defects.py): the map's hop counts against hand-worked
closed forms, the fabric's clocks and counters on a remapped mesh against the same closed
forms, numeric kernels against numpy, rank invariance, a defect-free map running exactly as a
perfect wafer, and bad defect input."""
from __future__ import annotations

import csv
import json
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

import kernels.__main__ as kernels_cli
import llm.__main__ as llm_cli
from kernels.run import run_gemm, run_gemv
from meshmpi import Mesh, UsageError, load_hardware
from meshmpi.defects import Remap, parse_spec, remap_for, spares_for
from test_bad_input import usage_error
from test_runtime_invariance import COLS, ROWS, differences, schedule

ALPHA = 10.0       # cycles per hop, large enough to see every hop in the clocks
HW = load_hardware("wse2", [f"alpha_cycles_per_hop={ALPHA}"])
TS, BW = HW.transfer_start_cycles, HW.link_bytes_per_cycle


def hand_map():
    """3x4 logical on a 4x6 wafer: dead (1, 0) and (1, 1) shift row 1 by two; row 2 runs out
    of columns, so it is retired and physical row 3, shifted by its dead (3, 2), is logical row 2."""
    dead = np.zeros((4, 6), bool)
    dead[1, 0] = dead[1, 1] = dead[2, 4] = dead[2, 5] = dead[3, 2] = True
    return Remap(dead, 3, 4, "hand")


# Worked by hand from the scheme: 2 of the 12 logical-rectangle cores are dead, so the profile
# is c + floor(2 * 2/12 * c) = [0, 1, 2, 4]. Row 0 follows it; row 1 starts at column 2 and
# stays ahead ([2, 3, 4, 5]); row 2 would need column 6 for its last core (4 and 5 are dead);
# row 3 skips its dead column 2 ([0, 1, 3, 4]).
COLUMNS = np.array([[0, 1, 2, 4], [2, 3, 4, 5], [0, 1, 3, 4]])
KX = np.array([[1, 1, 2], [1, 1, 1], [1, 2, 1]])        # x-link (r, c)-(r, c+1)
KY = np.array([[2, 2, 2, 1], [2, 2, 2, 2]])              # y-link (r, c)-(r+1, c): max(rows apart, column offset)


def test_hand_made_map_hops():
    remap = hand_map()
    assert remap.row_of.tolist() == [0, 1, 3] and np.array_equal(remap.col_of, COLUMNS)
    assert np.array_equal(remap.link_hops["x"], KX) and np.array_equal(remap.link_hops["y"], KY)
    stats = remap.stats()
    assert stats["logical_links"] == 3 * 3 + 2 * 4
    assert stats["stretched_share"] == pytest.approx(9 / 17) and stats["worst_stretch"] == 2
    assert (stats["dead_cores"], stats["spare_rows"], stats["spare_cols"]) == (5, 1, 2)


def test_dead_cores_among_the_spares_stretch_nothing():
    dead = np.zeros((4, 5), bool)
    dead[3, :] = dead[:, 4] = True        # only the spare row and the spare column
    remap = Remap(dead, 3, 4)
    assert np.array_equal(remap.col_of, np.tile(np.arange(4), (3, 1))) and remap.row_of.tolist() == [0, 1, 2]
    assert not remap.stretched
    mesh = Mesh(3, 4, HW, comm=MPI.COMM_SELF, defects=remap)
    try:
        assert mesh.fabric.remap is None and mesh.fabric.link_hops("x") is None
    finally:
        mesh.free()


def test_too_many_defects_for_the_spares():
    dead = np.zeros((4, 5), bool)
    dead[1, 1] = dead[1, 2] = dead[2, 0] = dead[2, 4] = True    # two rows to retire, one spare row
    with pytest.raises(UsageError, match="too many defects for the spares"):
        Remap(dead, 3, 4)


def test_rate_draw_and_spares():
    def enough(rate, n, s):          # the profile's slack and a line's dead cores at three sigma
        lam = rate * (n + s)
        return s >= 2 * lam + 3 * lam ** 0.5
    assert spares_for(0.0, 16) == 0
    for rate, n in ((0.01, 64), (0.07, 16), (0.1, 360)):
        s = spares_for(rate, n)
        assert enough(rate, n, s) and not enough(rate, n, s - 1)
    assert remap_for(0.0, 5, 8, 8).dead.shape == (8, 8) and not remap_for(0.0, 5, 8, 8).stretched
    a, b = remap_for(0.1, 7, 16, 16), remap_for(0.1, 7, 16, 16)
    s = spares_for(0.1, 16)
    assert a.dead.shape == (16 + s, 16 + s) and np.array_equal(a.dead, b.dead)


def full(mesh, block):
    from meshmpi.host import gather_block_arrays
    return mesh.cart.bcast(gather_block_arrays(mesh, {"v": np.asarray(block)}), root=0)["v"]


@pytest.mark.mpi
def test_fabric_pays_physical_hops(new_mesh):
    """Clocks after one shift and one multicast, hop counters and the longest hop equal the
    closed forms on the hand-made map (every link free, clocks from 0)."""
    mesh = new_mesh(3, 4, HW, defects=hand_map())
    a, b = mesh.alloc("a", (4,)), mesh.alloc("b", (4,))
    nbytes = 4 * HW.element_bytes            # the fabric moves 4 elements of the profile's size
    mesh.fabric.shift("east", "x", 1).run(a, b)
    clock = full(mesh, mesh.clock)
    want = np.full((3, 4), TS + nbytes / BW)                  # senders: their tail has left
    want[:, 1:] += ALPHA * KX                                 # receivers: head over k hops, then the tile
    assert np.array_equal(clock, want)

    mesh.clock[:] = 0
    mesh.fabric.multicast("down", "y", root=0).run(a, b)
    cum = np.vstack([np.zeros(4), np.cumsum(KY, axis=0)])
    want = TS + nbytes / BW + ALPHA * cum                     # one worm, dropping a copy on each row
    got = full(mesh, mesh.clock)
    assert np.array_equal(got[1:], want[1:])

    mesh.fabric.shift("two down", "y", 2).run(a, b)
    hops = full(mesh, mesh.counters["hops"])
    want = np.zeros((3, 4), np.int64)
    want[:, :3] += KX                                         # east: each sender's one logical link
    want[0] += cum[2].astype(np.int64)                        # down: the root's worm to the last row
    want[0] += KY[0] + KY[1]                                  # two down: rows 0 -> 2
    assert np.array_equal(hops, want)
    assert np.array_equal(full(mesh, mesh.counters["byte_hops"]), want * nbytes)   # every message carried 4 elements
    assert mesh.max_over_ranks(mesh.max_hops) == int((KY[0] + KY[1]).max())


@pytest.mark.mpi
def test_a_stretched_path_is_occupied_as_one_link(new_mesh):
    """Two shifts started together over the same links: the second message enters each
    stretched path when the first one's payload has left it, then crosses it in alpha a hop."""
    mesh = new_mesh(3, 4, HW, defects=hand_map())
    a, b, c, d = (mesh.alloc(name, (4,)) for name in "abcd")
    nbytes = 4 * HW.element_bytes
    first, second = mesh.fabric.shift("east", "x", 1).start(a, b), mesh.fabric.shift("east too", "x", 1).start(c, d)
    first.wait()
    second.wait()
    want = TS + 2 * nbytes / BW + ALPHA * KX                  # queued behind one payload
    assert np.array_equal(full(mesh, mesh.clock)[:, 1:], want)


def rate_map(seed=3):
    return remap_for(0.1, seed, ROWS, COLS)


@pytest.mark.mpi
@pytest.mark.parametrize("grid", ["auto", "1xP", "Px1"])
def test_remapped_schedule_is_rank_invariant(new_mesh, world, grid):
    remap = rate_map()
    assert remap.stretched
    alone = Mesh(ROWS, COLS, HW, comm=MPI.COMM_SELF, defects=remap)
    try:
        want = schedule(alone)
    finally:
        alone.free()
    grids = {"auto": None, "1xP": (1, world.size), "Px1": (world.size, 1)}
    got = schedule(new_mesh(ROWS, COLS, HW, rank_grid=grids[grid], defects=remap))
    problems = differences(got, want, f"{grid} on {world.size} ranks")
    assert not problems, "\n".join(problems)
    perfect = schedule(new_mesh(ROWS, COLS, HW))
    assert got["modeled_cycles"] > perfect["modeled_cycles"] and got["hops"].sum() > perfect["hops"].sum()


@pytest.mark.mpi
def test_defect_free_map_runs_as_a_perfect_wafer(new_mesh):
    dead = np.zeros((ROWS + 1, COLS + 2), bool)
    dead[ROWS, 0] = dead[2, COLS:] = True          # dead cores, all among the spares
    got = schedule(new_mesh(ROWS, COLS, HW, defects=Remap(dead, ROWS, COLS)))
    want = schedule(new_mesh(ROWS, COLS, HW))
    problems = differences(got, want, "defect-free map")
    assert not problems, "\n".join(problems)


@pytest.mark.mpi
@pytest.mark.parametrize("kernel", ["meshgemm", "cannon", "meshgemv"])
def test_numeric_kernels_equal_numpy_on_a_remapped_mesh(new_mesh, kernel):
    mesh = new_mesh(6, 6, HW, defects=remap_for(0.1, 11, 6, 6))
    assert mesh.defects.stretched
    if kernel == "meshgemv":
        report = run_gemv(mesh, kernel, 30, 24)
    else:
        report = run_gemm(mesh, kernel, 24, 18, 30)
    assert report["check"] == "passed", report["check_failure"]
    assert report["defects"]["worst_stretch"] >= 2


def test_bad_defect_input(tmp_path):
    base = ["gemm", "--mesh", "4x4", "--m", "8", "--k", "8", "--n", "8", "--defects"]
    usage_error(kernels_cli.main, base + ["0.5"], "out of range")
    usage_error(kernels_cli.main, base + ["-0.1"], "out of range")
    usage_error(kernels_cli.main, base + [str(tmp_path / "none.json")], "no such file")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    usage_error(kernels_cli.main, base + [str(bad)], "not a defect map")
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"rows": 5, "cols": 5, "dead": [[5, 0]]}))
    usage_error(kernels_cli.main, base + [str(outside)], "outside")
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"rows": 3, "cols": 5, "dead": []}))
    usage_error(kernels_cli.main, base + [str(small)], "cannot hold")
    many = tmp_path / "many.json"
    many.write_text(json.dumps({"rows": 5, "cols": 5, "dead": [[0, 0], [0, 1], [1, 0], [1, 1]]}))
    usage_error(kernels_cli.main, base + [str(many)], "too many defects for the spares")
    assert parse_spec("0.07") == 0.07


def _shared_dir():
    path = tempfile.mkdtemp(prefix="defects-bench-") if MPI.COMM_WORLD.rank == 0 else None
    return Path(MPI.COMM_WORLD.bcast(path))


def _draw(rate, seed, side):
    """The dead cores of a --defects RATE draw, counted straight from the generator."""
    phys = side + spares_for(rate, side)
    return int((np.random.default_rng(seed).random((phys, phys)) < rate).sum())


@pytest.mark.mpi
def test_kernels_bench_defects(new_mesh):
    out = _shared_dir()
    with redirect_stdout(StringIO()), redirect_stderr(StringIO()):
        assert kernels_cli.main(["bench", "defects", "--meshes", "8", "--rates", "0,0.05", "--seeds", "2",
                                 "--out", str(out)]) == 0
    perfect = {"meshgemm": run_gemm(new_mesh(8, 8, dry_run=True, memory="warn"), "meshgemm", 2048, 2048, 2048),
               "meshgemv": run_gemv(new_mesh(8, 8, dry_run=True, memory="warn"), "meshgemv", 16384, 16384)}
    if MPI.COMM_WORLD.rank:
        return
    with open(out / "defects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert (out / "defects.png").read_bytes()[:4] == b"\x89PNG"
    assert [(r["algo"], float(r["rate"]), int(r["seed"])) for r in rows] == [
        (algo, rate, seed) for algo in ("meshgemm", "meshgemv") for rate, seed in ((0, 0), (0.05, 0), (0.05, 1))]
    for r in rows:
        assert not r["error"] and int(r["dead_cores"]) == _draw(float(r["rate"]), int(r["seed"]), 8)
        base = perfect[r["algo"]]
        assert float(r["extra_cycles"]) == pytest.approx(float(r["modeled_cycles"]) - base["modeled_cycles"])
        assert int(r["defect_free_max_hops"]) == base["max_hops_per_step"]
        if float(r["rate"]) == 0:
            assert float(r["modeled_cycles"]) == base["modeled_cycles"] and float(r["slowdown"]) == 1
        else:
            assert float(r["stretched_share"]) > 0 and int(r["max_hops_per_step"]) >= base["max_hops_per_step"]


@pytest.mark.mpi
def test_llm_bench_defects():
    out = _shared_dir()
    with redirect_stdout(StringIO()), redirect_stderr(StringIO()):
        assert llm_cli.main(["bench", "--defects", "0,0.05", "--seeds", "1", "--meshes", "176", "--prompt-len", "16",
                             "--out", str(out)]) == 0
    if MPI.COMM_WORLD.rank:
        return
    with open(out / "llm_defects.csv", newline="") as f:
        perfect, remapped = list(csv.DictReader(f))
    assert (out / "llm_defects.png").read_bytes()[:4] == b"\x89PNG"
    assert float(perfect["slowdown"]) == 1 and int(perfect["dead_cores"]) == 0
    assert int(remapped["dead_cores"]) == _draw(0.05, 0, 176) and float(remapped["stretched_share"]) > 0
    clock = load_hardware("wse2").clock_hz
    for r in (perfect, remapped):        # tokens/s is the clock over the step's cycles
        assert float(r["modeled_decode_tokens_per_s"]) == pytest.approx(clock / float(r["modeled_decode_cycles_per_token"]))
    assert float(remapped["extra_cycles_per_token"]) == pytest.approx(
        float(remapped["modeled_decode_cycles_per_token"]) - float(perfect["modeled_decode_cycles_per_token"]))
    assert float(remapped["slowdown"]) == pytest.approx(
        float(remapped["modeled_decode_cycles_per_token"]) / float(perfect["modeled_decode_cycles_per_token"]))
