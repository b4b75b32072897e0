"""HDF5 traces: schema read back with plain h5py, atomic writes, and ``meshmpi trace summary``."""
from __future__ import annotations

import json
import subprocess

import h5py
import numpy as np
import pytest

from meshmpi import UsageError, load_hardware
from meshmpi.trace import COUNTER_DOCS, SCHEMA_VERSION, read_trace, write_trace
from meshes import KNOWN_TILE, known_schedule

ROWS, COLS, TILE = 4, 6, KNOWN_TILE
HW = load_hardware("wse2")
SERIAL = TILE * HW.element_bytes / HW.link_bytes_per_cycle
START = HW.transfer_start_cycles
# The shift is in place and every core first starts its send and receive (START): the last
# core only receives (alpha + S); the others first push their own tile out (S) before the new
# one drains in, and the first one only sends.
SHIFT_CYCLES = START + max(HW.alpha_cycles_per_hop, SERIAL) + SERIAL
COMPUTE_CYCLES = 10 / HW.flops_per_cycle + HW.vector_op_cycles


def expected_counters():
    """Per-core counters of the known schedule, by walking its messages."""
    c = {k: np.zeros((ROWS, COLS), np.int64) for k in ("bytes_sent", "bytes_recv", "messages_sent", "hops",
                                                        "byte_hops", "relays", "flops")}
    nbytes = TILE * HW.element_bytes
    clock = np.zeros((ROWS, COLS))
    for r in range(ROWS):
        for s in range(COLS - 1):
            c["messages_sent"][r, s] += 1
            c["bytes_sent"][r, s] += nbytes
            c["hops"][r, s] += 1
            c["byte_hops"][r, s] += nbytes
            c["bytes_recv"][r, s + 1] += nbytes
            clock[r, s + 1] = SHIFT_CYCLES if s + 1 < COLS - 1 else START + HW.alpha_cycles_per_hop + SERIAL
        clock[r, 0] = START + SERIAL
    c["flops"][:] = 10
    # fp16 FLOPs; SRAM: 3 bytes read and 1 written per FLOP, plus the bytes sent and received;
    # one link per byte sent; static power over the run (PAPER.md §9, meshmpi/energy.py)
    seconds = (SHIFT_CYCLES + COMPUTE_CYCLES) / HW.clock_hz
    c["energy_joules"] = 1e-12 * (c["flops"] * HW.pj_per_flop_fp16
                                  + (3 * c["flops"] + c["bytes_sent"]) * HW.pj_per_sram_byte_read
                                  + (c["flops"] + c["bytes_recv"]) * HW.pj_per_sram_byte_written
                                  + c["byte_hops"] * HW.pj_per_byte_hop) + seconds * HW.static_watts_per_core
    c["clock_cycles"] = clock + COMPUTE_CYCLES
    c["busy_cycles"] = np.full((ROWS, COLS), COMPUTE_CYCLES)
    c["peak_bytes"] = c["resident_bytes"] = np.full((ROWS, COLS), nbytes)
    # Each one-hop message needs a route on its sender's and its receiver's router.
    c["routes_peak"] = np.zeros((ROWS, COLS), np.int64)
    c["routes_peak"][:, :-1] += 1
    c["routes_peak"][:, 1:] += 1
    return c


@pytest.mark.mpi
@pytest.mark.parametrize("dry_run", [False, True])
def test_trace_schema_read_with_plain_h5py(new_mesh, world, gather_full, mpi_tmp_path, dry_run):
    mesh = new_mesh(ROWS, COLS, HW, dry_run=dry_run)
    known_schedule(mesh)
    path = mpi_tmp_path / f"run-{dry_run}.h5"
    argv = ["prog", "--mesh", "4x6"]
    write_trace(mesh, path, kind="unit", result={"tokens": [1, 2]}, argv=argv)
    world.Barrier()
    with h5py.File(path, "r") as f:
        meta = dict(f["meta"].attrs)
        counters = {k: f["counters"][k][()] for k in f["counters"]}
        docs = {k: f["counters"][k].attrs["doc"] for k in f["counters"]}
        phases, steps = f["phases"][()], f["steps"][()]
    assert meta["schema_version"] == SCHEMA_VERSION == 4
    assert (meta["mesh_rows"], meta["mesh_cols"]) == (ROWS, COLS)
    assert tuple(meta["rank_grid"]) == mesh.rank_grid and meta["mpi_world_size"] == world.size
    assert meta["kind"] == "unit" and meta["command_line"] == "prog --mesh 4x6"
    assert bool(meta["dry_run"]) == dry_run and meta["hardware_name"] == "wse2"
    hardware = json.loads(meta["hardware_json"])
    assert {k: v["value"] for k, v in hardware.items() if isinstance(v, dict)} == \
        {k: v for k, v in HW.values().items() if k != "name"}
    assert hardware["alpha_cycles_per_hop"]["guessed"] is True
    assert json.loads(meta["result_json"]) == {"tokens": [1, 2]}
    assert json.loads(meta["warnings"]) == []
    for key in ("meshmpi_version", "mpi_library", "created", "python", "host"):
        assert key in meta, key
    # Counters: [rows, cols], equal to what the mesh holds and to the worked-out numbers.
    assert set(counters) == set(COUNTER_DOCS) and all(docs[k] for k in docs)
    held = gather_full(mesh, {"bytes_sent": mesh.counters["bytes_sent"], "clock_cycles": mesh.clock,
                              "routes_peak": mesh.routes.peak, "peak_bytes": mesh.memory.peak})
    want = expected_counters()
    for name, array in counters.items():
        assert array.shape == (ROWS, COLS), name
        if name == "energy_joules":
            np.testing.assert_allclose(array, want[name], rtol=1e-12)
        else:
            assert np.array_equal(array, want[name]), name
        if name in held:
            assert np.array_equal(array, held[name]), name
    # Phase and step tables.
    assert [p["name"].decode() if isinstance(p["name"], bytes) else p["name"] for p in phases] == ["shift", "compute"]
    shift, compute = phases
    assert (shift["start_cycles"], shift["end_cycles"]) == (0.0, SHIFT_CYCLES)
    assert (compute["start_cycles"], compute["end_cycles"]) == (SHIFT_CYCLES, SHIFT_CYCLES + COMPUTE_CYCLES)
    assert shift["messages"] == ROWS * (COLS - 1) and shift["bytes"] == want["bytes_sent"].sum()
    assert shift["max_hops"] == 1 and compute["flops"] == 10 * ROWS * COLS and compute["messages"] == 0
    assert shift["parent"] == compute["parent"] == -1 and shift["depth"] == 0
    assert shift["wall_seconds"] >= 0
    tile_bytes = KNOWN_TILE * HW.element_bytes     # the one buffer, live through both phases
    assert shift["resident_bytes"] == shift["peak_bytes"] == compute["peak_bytes"] == tile_bytes
    assert [(s["phase"], s["step"]) for s in steps] == [(0, 0), (1, 0)]
    assert [s["label"].decode() if isinstance(s["label"], bytes) else s["label"] for s in steps] == \
        ["one hop", "flops"]
    assert steps[0]["end_cycles"] == SHIFT_CYCLES and steps[1]["flops"] == 10 * ROWS * COLS
    # read_trace gives the same as h5py.
    trace = read_trace(path)
    assert trace["meta"]["hardware"] == hardware and trace["meta"]["result"] == {"tokens": [1, 2]}
    assert trace["meta"]["rank_grid"] == list(mesh.rank_grid)
    assert all(np.array_equal(trace["counters"][k], counters[k]) for k in counters)
    assert [p["name"] for p in trace["phases"]] == ["shift", "compute"]
    assert trace["phases"][1]["end_cycles"] == SHIFT_CYCLES + COMPUTE_CYCLES
    assert [s["label"] for s in trace["steps"]] == ["one hop", "flops"]
    world.Barrier()


@pytest.mark.mpi
def test_write_is_atomic_and_replaces(new_mesh, world, mpi_tmp_path):
    mesh = new_mesh(ROWS, COLS, HW)
    known_schedule(mesh)
    path = mpi_tmp_path / "nested" / "dir" / "t.h5"
    write_trace(mesh, path, kind="first")
    write_trace(mesh, path, kind="second")
    world.Barrier()
    assert read_trace(path)["meta"]["kind"] == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.h5"], "no temporary file is left"
    world.Barrier()


@pytest.mark.mpi
def test_unwritable_target_is_one_usage_error_on_every_rank(new_mesh, world, mpi_tmp_path):
    mesh = new_mesh(ROWS, COLS, HW)
    blocker = mpi_tmp_path / "not-a-directory"
    if world.rank == 0:
        blocker.write_text("a file where a directory should be")
    world.Barrier()
    try:
        write_trace(mesh, blocker / "t.h5", kind="x")
        message = None
    except UsageError as exc:
        message = str(exc)
    messages = world.allgather(message)
    assert all(m is not None for m in messages) and len(set(messages)) == 1, messages
    assert "\n" not in messages[0] and "cannot write trace" in messages[0]
    assert sorted(p.name for p in mpi_tmp_path.iterdir()) == ["not-a-directory"]
    world.Barrier()


def test_read_trace_rejects_what_is_not_a_trace(tmp_path):
    with pytest.raises(UsageError, match="no such trace file"):
        read_trace(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(UsageError, match="not a meshmpi trace"):
        read_trace(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(UsageError, match="not a meshmpi trace"):
        read_trace(tmp_path / "other.h5")


def test_summary_cli_json_totals(tmp_path, run_env, python_exe, mpiexec_exe, helper_script):
    path = tmp_path / "two-ranks.h5"
    made = subprocess.run([mpiexec_exe, "-n", "2", python_exe, helper_script("make_trace.py"), str(path)],
                          env=run_env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert not list(tmp_path.glob("*.tmp"))
    out = subprocess.run([python_exe, "-m", "meshmpi", "trace", "summary", str(path), "--json"],
                         env=run_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    totals = summary["totals"]
    want = expected_counters()
    assert totals["ranks"] == 2 and totals["mesh"] == f"{ROWS}x{COLS}" and totals["kind"] == "helper"
    assert totals["messages"] == ROWS * (COLS - 1) == want["messages_sent"].sum()
    assert totals["bytes_moved"] == want["bytes_sent"].sum() and totals["flops"] == 10 * ROWS * COLS
    assert totals["modeled_cycles"] == SHIFT_CYCLES + COMPUTE_CYCLES
    assert totals["modeled_seconds"] == pytest.approx((SHIFT_CYCLES + COMPUTE_CYCLES) / HW.clock_hz)
    assert totals["busy_cycles_max"] == COMPUTE_CYCLES and totals["relays"] == 0
    assert totals["peak_bytes_per_core"] == TILE * HW.element_bytes
    assert totals["routes_per_core_max"] == 2 and totals["route_limit"] == HW.routes_per_core
    assert totals["dry_run"] is False and summary["result"] == {"answer": 42}
    assert [(p["name"], p["steps"], p["messages"]) for p in summary["phases"]] == \
        [("shift", 1, ROWS * (COLS - 1)), ("compute", 1, 0)]
    assert summary["phases"][0]["modeled_cycles"] == SHIFT_CYCLES
    # The text form says the same in words.
    text = subprocess.run([python_exe, "-m", "meshmpi", "trace", "summary", str(path)],
                          env=run_env, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert f"{ROWS * (COLS - 1)} messages" in text.stdout and "shift" in text.stdout


def test_dry_run_trace_has_the_same_counters(tmp_path, run_env, python_exe, mpiexec_exe, helper_script):
    paths = [tmp_path / "numeric.h5", tmp_path / "dry.h5"]
    for path, extra in zip(paths, ([], ["--dry-run"])):
        done = subprocess.run([mpiexec_exe, "-n", "2", python_exe, helper_script("make_trace.py"), str(path)]
                              + extra, env=run_env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    numeric, dry = (read_trace(p) for p in paths)
    assert dry["meta"]["dry_run"] and not numeric["meta"]["dry_run"]
    for name in COUNTER_DOCS:
        assert np.array_equal(numeric["counters"][name], dry["counters"][name]), name
