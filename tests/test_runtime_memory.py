"""PLMR M: resident bytes per core against the profile's SRAM, agreed by every rank."""
from __future__ import annotations

import numpy as np
import pytest

from meshmpi import CoreMemoryError, load_hardware

pytestmark = pytest.mark.mpi

SRAM = 1000


def small_sram(**extra):
    sets = [f"sram_bytes_per_core={SRAM}"] + [f"{k}={v}" for k, v in extra.items()]
    return load_hardware("wse2", sets)


def outcome(world, action):
    """Run ``action`` on every rank; return (raised on every rank?, the messages of all ranks)."""
    try:
        action()
        message = None
    except CoreMemoryError as exc:
        message = str(exc)
    messages = world.allgather(message)
    return all(m is not None for m in messages), messages


def test_alloc_past_sram_names_first_core_buffer_and_bytes(new_mesh, world, gather_full):
    mesh = new_mesh(4, 6, small_sram())
    element_bytes = mesh.hardware.element_bytes
    small = mesh.alloc("small", (100,), np.float32)          # 200 B everywhere
    raised, messages = outcome(world, lambda: mesh.alloc("big", (450,), np.float64))
    need = 450 * element_bytes                                 # the profile's bytes, not float64's
    assert raised, messages
    assert len(set(messages)) == 1
    text = messages[0]
    assert "\n" not in text
    assert "core (0, 0)" in text and "'big'" in text
    assert f"{need} B" in text and f"{need + 200} B" in text and f"{SRAM} B" in text
    # The failed buffer is not resident; the others are untouched.
    full = gather_full(mesh, {"resident": mesh.memory.resident, "peak": mesh.memory.peak})
    assert np.all(full["resident"] == 100 * element_bytes)
    assert np.all(full["peak"] == 100 * element_bytes)
    assert "big" not in mesh.memory.buffers
    small.free()


def test_failed_recharge_keeps_the_old_charge(new_mesh, world, gather_full):
    mesh = new_mesh(3, 5, small_sram())
    mesh.memory.charge("buf", 300)
    raised, messages = outcome(world, lambda: mesh.memory.charge("buf", SRAM + 1))
    assert raised, messages
    full = gather_full(mesh, {"resident": mesh.memory.resident})
    assert np.all(full["resident"] == 300), "a refused charge must leave the ledger as it was"
    mesh.memory.release("buf")
    full = gather_full(mesh, {"resident": mesh.memory.resident})
    assert np.all(full["resident"] == 0)


def spike_case(mesh):
    """Per-core bytes that overflow only inside the last rank's block (along x)."""
    start = int(mesh.offsets["x"][-2])   # first column of the last rank's block
    full = np.full((mesh.rows, mesh.cols), 10, np.int64)
    over = [(3, start), (1, mesh.cols - 1), (2, start)]
    for k, (r, c) in enumerate(over):
        full[r, c] = SRAM - 100 + 7 * (k + 1)   # over once 200 B are already resident
    first = min(over)                          # row-major order = tuple order
    block = full[mesh.row_start:mesh.row_stop, mesh.col_start:mesh.col_stop]
    return full, block, first


def test_non_uniform_charge_overflowing_on_one_rank_raises_everywhere(new_mesh, world, gather_full):
    mesh = new_mesh(4, 6, small_sram(), rank_grid=(1, world.size))
    mesh.memory.charge("base", 200)
    full, block, first = spike_case(mesh)
    raised, messages = outcome(world, lambda: mesh.memory.charge("spike", block))
    assert raised, f"not every rank raised: {messages}"
    assert len(set(messages)) == 1
    need = int(full[first])
    assert f"core ({first[0]}, {first[1]})" in messages[0]
    assert "'spike'" in messages[0] and f"{need} B" in messages[0] and f"{need + 200} B" in messages[0]
    got = gather_full(mesh, {"resident": mesh.memory.resident, "peak": mesh.memory.peak})
    assert np.all(got["resident"] == 200)
    assert np.all(got["peak"] == 200), "a refused charge never reaches the peak"


def test_warn_policy_records_once_and_continues(new_mesh, world, gather_full):
    mesh = new_mesh(4, 6, small_sram(), rank_grid=(1, world.size), memory="warn")
    mesh.memory.charge("base", 200)
    full, block, first = spike_case(mesh)
    mesh.memory.charge("spike", block)          # no exception
    mesh.memory.charge("spike", block + 1)      # the same buffer again: no second warning
    warnings = world.allgather(list(mesh.memory.warnings))
    assert all(w == warnings[0] for w in warnings)
    assert len(warnings[0]) == 1
    assert "spike" in warnings[0][0] and f"core ({first[0]}, {first[1]})" in warnings[0][0]
    got = gather_full(mesh, {"resident": mesh.memory.resident, "peak": mesh.memory.peak})
    assert np.array_equal(got["resident"], full + 1 + 200)
    assert np.array_equal(got["peak"], full + 1 + 200)
    # Work goes on: an allocation after the warning is charged as usual.
    mesh.alloc("after", (5,), np.float32)
    got = gather_full(mesh, {"resident": mesh.memory.resident})
    assert np.array_equal(got["resident"], full + 1 + 200 + 5 * mesh.hardware.element_bytes)


def test_peak_and_resident_follow_a_sequence_of_buffers(new_mesh, world, gather_full):
    hardware = small_sram(element_bytes=4)
    mesh = new_mesh(5, 7, hardware)
    rng = np.random.default_rng(3)
    resident = np.zeros((5, 7), np.int64)
    peak = np.zeros((5, 7), np.int64)
    held = {}
    arrays = {}
    steps = [("alloc", "a", (10,), np.float16), ("alloc", "b", (4, 5), np.float64),
             ("charge", "c", None, None), ("free", "a", None, None), ("alloc", "d", (30,), np.float32),
             ("charge", "c", None, None), ("free", "b", None, None), ("alloc", "a", (2,), np.float32)]
    for op, name, tile, dtype in steps:
        if op == "alloc":
            arrays[name] = mesh.alloc(name, tile, dtype)
            held[name] = np.full((5, 7), int(np.prod(tile)) * 4, np.int64)
        elif op == "charge":
            per_core = rng.integers(0, 100, size=(5, 7))
            mesh.memory.charge(name, per_core[mesh.row_start:mesh.row_stop, mesh.col_start:mesh.col_stop])
            held[name] = per_core
        else:
            arrays.pop(name).free()
            held.pop(name)
        resident = sum(held.values(), np.zeros((5, 7), np.int64))
        peak = np.maximum(peak, resident)
    got = gather_full(mesh, {"resident": mesh.memory.resident, "peak": mesh.memory.peak})
    assert np.array_equal(got["resident"], resident)
    assert np.array_equal(got["peak"], peak)


def test_dry_run_charges_the_same_bytes(new_mesh, world, gather_full):
    results = []
    for dry in (False, True):
        mesh = new_mesh(3, 4, small_sram(), dry_run=dry)
        arr = mesh.alloc("t", (3, 7), np.float64)
        assert (arr.data is None) == dry
        results.append(gather_full(mesh, {"resident": mesh.memory.resident})["resident"])
    assert np.array_equal(results[0], results[1])
    assert np.all(results[0] == 21 * 2)
