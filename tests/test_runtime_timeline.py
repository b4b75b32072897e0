"""Phases and steps: whole-mesh numbers per phase and per step, nested phases included."""
from __future__ import annotations

import pytest

from meshmpi import load_hardware

pytestmark = pytest.mark.mpi

ROWS, COLS = 3, 8
HW = load_hardware("wse2", ["alpha_cycles_per_hop=2", "link_bytes_per_cycle=4", "flops_per_cycle=1",
                           "transfer_start_cycles=0", "vector_op_cycles=0"])


def shift_messages(k):
    return ROWS * (COLS - abs(k))


def test_nested_phase_does_not_hide_outer_traffic(new_mesh, world):
    mesh = new_mesh(ROWS, COLS, HW, rank_grid=(1, world.size))
    a = mesh.alloc("a", (2,))                           # 4 bytes a tile
    with mesh.fabric.scope(), mesh.phase("outer"):
        mesh.fabric.shift("p1", "x", 1).run(a)
        with mesh.phase("inner"):
            mesh.fabric.shift("p2", "x", -1).run(a)
            mesh.step("in")
        mesh.fabric.shift("p3", "x", 3).run(a)
        mesh.step("out")
        mesh.compute(5)
        mesh.step("tail")
    phases, steps = mesh.timeline.collect()
    outer, inner = phases
    total = shift_messages(1) * 2 + shift_messages(3)
    assert (outer["name"], outer["messages"], outer["max_hops"]) == ("outer", total, 3)
    assert (inner["name"], inner["messages"], inner["parent"], inner["depth"]) == ("inner", shift_messages(1), 0, 1)
    by_label = {s["label"]: s for s in steps}
    assert by_label["in"]["phase"] == 1 and by_label["in"]["messages"] == shift_messages(1)
    # The outer phase's first step covers everything since the phase began, the inner
    # phase's traffic included (as the outer phase's own totals do).
    assert by_label["out"]["phase"] == 0 and by_label["out"]["step"] == 0
    assert by_label["out"]["messages"] == total and by_label["out"]["max_hops"] == 3
    assert by_label["out"]["bytes"] == total * 4
    assert by_label["tail"]["messages"] == 0 and by_label["tail"]["flops"] == 5 * ROWS * COLS
    assert by_label["tail"]["max_hops"] == 0 and by_label["tail"]["step"] == 1
    # Every outer step together accounts for the whole outer phase.
    assert sum(s["messages"] for s in steps if s["phase"] == 0) == outer["messages"]
    assert sum(s["flops"] for s in steps if s["phase"] == 0) == outer["flops"]


def test_step_end_cycles_follow_the_clocks(new_mesh, world):
    mesh = new_mesh(ROWS, COLS, HW, rank_grid=(1, world.size))
    a = mesh.alloc("a", (6,))                           # 12 bytes: 3 cycles a link
    b = mesh.alloc("b", (6,))
    ends = []
    with mesh.fabric.scope(), mesh.phase("work"):
        mesh.fabric.shift("east", "x", 1).run(a, b)    # alpha + 3
        mesh.step()
        ends.append(2 + 3)
        mesh.compute(10)                                # every core +10
        mesh.step()
        ends.append(ends[-1] + 10)
        mesh.fabric.shift("west2", "x", -2).run(a, b)  # alpha*2 + 3*2 (two messages per link)
        mesh.step()
        ends.append(ends[-1] + 4 + 6)
    phases, steps = mesh.timeline.collect()
    assert [s["end_cycles"] for s in steps] == ends
    assert phases[0]["start_cycles"] == 0 and phases[0]["end_cycles"] == ends[-1]
    assert mesh.modeled_cycles() == ends[-1]
    assert [s["max_hops"] for s in steps] == [1, 0, 2]


def test_open_phase_is_refused_by_collect(new_mesh, world):
    mesh = new_mesh(ROWS, COLS, HW)
    mesh.timeline.begin("left open")
    with pytest.raises(RuntimeError, match="left open"):
        mesh.timeline.collect()
    mesh.timeline.end()
    assert [p["name"] for p in mesh.timeline.collect()[0]] == ["left open"]
