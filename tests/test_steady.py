"""A dry run advanced over steady repeats gives the results of running every repeat.

``meshmpi.steady`` advances a repeat (a decoder layer) once the one before it shifted every
clock and link free time by one number of cycles. Each test runs the same work twice on the
same ranks, once advancing and once running every repeat, and compares everything a run
leaves: clocks, link free times, busy cycles, counters, memory peaks, the timeline's phases
and steps (names, counts, cycles), and the prefill's result. Cycles may differ by float64
rounding only; everything counted must be equal. Each case also checks that repeats were in
fact advanced (or, where the work is not steady, that none was).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from mpi4py import MPI

from llm.config import LlamaConfig
from llm.prefill import prefill
from llm.session import Options, Session
from llm.strategies import prefill_runner
from meshmpi import Mesh, load_hardware
from meshmpi.steady import SteadyState

pytestmark = pytest.mark.mpi

ROUNDING = 1e-12      # relative: cycles summed in another order
GQA = LlamaConfig(hidden_size=60, intermediate_size=100, num_hidden_layers=7, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=128, head_dim=10)


def left_by(mesh) -> dict:
    """Everything a run leaves on this rank, and the whole mesh's timeline."""
    links = [f.copy() for axis in ("x", "y") for f in mesh.fabric.link_free(axis).values()]
    phases, steps = mesh.timeline.collect()
    return dict(clock=mesh.clock.copy(), links=links, busy=mesh.busy.copy(),
                counters={k: v.copy() for k, v in mesh.counters.items()}, totals=dict(mesh.totals),
                peak=mesh.memory.peak.copy(), phases=phases, steps=steps, warnings=list(mesh.memory.warnings))


def assert_same_run(advanced: dict, every: dict) -> None:
    for key in ("clock", "busy"):
        np.testing.assert_allclose(advanced[key], every[key], rtol=ROUNDING, atol=0)
    for a, b in zip(advanced["links"], every["links"]):
        assert np.array_equal(np.isfinite(a), np.isfinite(b))
        np.testing.assert_allclose(a, b, rtol=ROUNDING, atol=0)
    for name, values in every["counters"].items():
        assert np.array_equal(advanced["counters"][name], values), name
    assert advanced["totals"] == every["totals"]
    assert np.array_equal(advanced["peak"], every["peak"])
    for rows in ("phases", "steps"):
        assert len(advanced[rows]) == len(every[rows]), rows
        for mine, theirs in zip(advanced[rows], every[rows]):
            assert mine.keys() == theirs.keys()
            for field, value in theirs.items():
                if field == "wall_seconds":
                    continue
                if isinstance(value, float):
                    assert mine[field] == pytest.approx(value, rel=ROUNDING, abs=0), (rows, field, theirs)
                else:
                    assert mine[field] == value, (rows, field, theirs)


def assert_same_value(mine, theirs, where: str) -> None:
    """A report's value: floats to rounding, anything else equal (dicts and lists by item)."""
    if isinstance(theirs, dict):
        assert mine.keys() == theirs.keys(), where
        for key in theirs:
            assert_same_value(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert len(mine) == len(theirs), where
        for i, (a, b) in enumerate(zip(mine, theirs)):
            assert_same_value(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float):
        assert mine == pytest.approx(theirs, rel=ROUNDING, abs=0), where
    else:
        assert mine == theirs, where


def agreed(value) -> bool:
    """The same truth on every rank, so that no rank leaves a collective early."""
    return MPI.COMM_WORLD.allreduce(bool(value), op=MPI.LAND)


def run_prefill(config, n, tokens, every_layer, hardware=None, comm=None, strategy="waferllm", memory="strict"):
    mesh = Mesh(n, n, hardware or load_hardware("wse2"), comm=comm, dry_run=True, memory=memory)
    try:
        result = prefill(mesh, config, None, tokens, run_every_layer=every_layer, runner=prefill_runner(strategy))
        return result, left_by(mesh), sorted(mesh.memory.buffers)
    finally:
        mesh.free()


@pytest.mark.parametrize("n,tokens", [(5, 7), (6, 20)])
def test_prefill_advanced_as_run(n, tokens):
    advanced, left, buffers = run_prefill(GQA, n, tokens, every_layer=False)
    every, left_every, _ = run_prefill(GQA, n, tokens, every_layer=True)
    assert advanced.layers_advanced > 0 and every.layers_advanced == 0
    assert advanced.layers == every.layers == GQA.num_hidden_layers
    assert advanced.modeled_cycles == pytest.approx(every.modeled_cycles, rel=ROUNDING, abs=0)
    assert advanced.cycles_per_layer == every.cycles_per_layer
    assert (advanced.flops_charged, advanced.flops_real) == (every.flops_charged, every.flops_real)
    assert (advanced.layers_per_region, advanced.regions) == (every.layers_per_region, every.regions)
    assert buffers == []
    assert_same_run(left, left_every)
    # advanced on one rank: the same steps, the same numbers to the last bit
    single, _, _ = run_prefill(GQA, n, tokens, every_layer=False, comm=MPI.COMM_SELF)
    assert single.layers_advanced == advanced.layers_advanced
    assert single.modeled_cycles == advanced.modeled_cycles


def test_prefill_regions_replay_the_first():
    """A region holds fewer layers than the model. Each hand-off leaves the clocks equal and
    every link idle, as at the first region's start, shifted: the later regions replay the
    first region's layers instead of running them."""
    wse2 = load_hardware("wse2")
    probe, _, _ = run_prefill(GQA, 5, 7, every_layer=True)
    assert probe.regions == 1
    # SRAM for the working buffers and three layers' weights and K|V
    small = dataclasses.replace(wse2, sram_bytes_per_core=int(probe_peak(GQA, 5, 7) * 0.6))
    advanced, left, _ = run_prefill(GQA, 5, 7, every_layer=False, hardware=small)
    every, left_every, _ = run_prefill(GQA, 5, 7, every_layer=True, hardware=small)
    assert every.regions >= 3 and every.layers_per_region >= 3, (every.regions, every.layers_per_region)
    assert advanced.modeled_cycles == pytest.approx(every.modeled_cycles, rel=ROUNDING, abs=0)
    assert_same_run(left, left_every)
    # the first region runs its first two layers (one from the fresh mesh, one to see the shift)
    assert advanced.layers_advanced == GQA.num_hidden_layers - 2


def test_layers_that_warn_are_run():
    """Ladder's fetched operands overflow a small region's cores in every layer (memory
    "warn"): a layer that warns is neither advanced nor replayed, over several regions too."""
    small = dataclasses.replace(load_hardware("wse2"), sram_bytes_per_core=int(probe_peak(GQA, 5, 7) * 0.3))
    runs = [run_prefill(GQA, 5, 7, every_layer=every, hardware=small, strategy="ladder", memory="warn")
            for every in (False, True)]
    (advanced, left, _), (every, left_every, _) = runs
    assert every.regions >= 2 and left["warnings"] == left_every["warnings"] != []
    assert advanced.layers_advanced == 0
    assert advanced.modeled_cycles == every.modeled_cycles
    assert_same_run(left, left_every)


def probe_peak(config, n, tokens) -> int:
    mesh = Mesh(n, n, load_hardware("wse2"), dry_run=True)
    try:
        prefill(mesh, config, None, tokens, run_every_layer=True)
        return int(mesh.max_over_ranks(int(mesh.memory.peak.max())))
    finally:
        mesh.free()


def run_request(config, side, prompt, new_tokens, run_every_layer, comm=None):
    """A dry request, prefill and decode on a ``side``² region: its report and timelines."""
    hw = load_hardware("wse2")
    session = Session(config, None, lambda r, c: Mesh(r, c, hw, comm=comm, dry_run=True), (side, side), new_tokens,
                      options=Options(run_every_layer=run_every_layer, decode_samples=3))
    try:
        session.prefill(prompt, keep_timeline=True)
        session.decode(choose=None)
        report = session.report()
        return report, session.prefill_timeline, left_by(session.mesh)
    finally:
        session.close()


def test_request_advanced_as_run():
    """Prefill and decode steps (each advances its own steady layers) against a request that
    runs every layer: the same report, both regions' timelines the same."""
    advanced, prefill_rows, left = run_request(GQA, 8, 9, 6, run_every_layer=False)
    every, prefill_rows_every, left_every = run_request(GQA, 8, 9, 6, run_every_layer=True)
    assert advanced["prefill_layers_advanced"] > 0 and advanced["decode_layers_advanced"] > 0
    assert every["prefill_layers_advanced"] == every["decode_layers_advanced"] == 0
    for key, value in every.items():
        if "wall" not in key and not key.endswith("layers_advanced"):
            assert_same_value(advanced[key], value, key)
    assert_same_run(left, left_every)
    assert_same_run(dict(left_every, phases=prefill_rows[0], steps=prefill_rows[1]),
                    dict(left_every, phases=prefill_rows_every[0], steps=prefill_rows_every[1]))


def repeat_units(mesh, unit, times, enabled, between=None) -> SteadyState:
    """``unit(index)`` repeated ``times`` times, each in its phase; ``between(index, steady)``
    before each."""
    steady = SteadyState(mesh, enabled=enabled)
    for index in range(times):
        if between is not None:
            between(index, steady)
        with mesh.phase(f"unit{index}"):
            steady.run(f"unit{index}", lambda: unit(index))
    return steady


def shift_and_work(mesh, grows: bool):
    """A unit: a shift along x, a buffer charged and freed, work on every core and, if
    ``grows``, more work each repeat that overlaps the rest (the clocks settle, the counts
    never do: never steady)."""
    def unit(index):
        tile = mesh.alloc(f"unit{index}.tile", (4,))
        pattern = mesh.fabric.shift(f"unit{index}.shift", "x", 1)
        pattern.run(tile)
        mesh.step("shifted")
        mesh.compute(100)
        if grows:
            mesh.compute(10 * index, advance_clock=False)
        mesh.step("worked")
        pattern.free()
        tile.free()
    return unit


@pytest.mark.parametrize("grows", [False, True], ids=["steady", "growing"])
def test_units_advanced_only_when_steady(new_mesh, grows):
    """From uneven clocks, the shifts along the open lines take about a line's length of
    repeats to settle: 10 repeats of 8-long lines advance some."""
    results = []
    for enabled in (True, False):
        mesh = new_mesh(3, 8, dry_run=True)
        mesh.clock[...] = np.arange(mesh.block_shape[1])[None, :] * 7.0 + mesh.col_start * 7.0
        steady = repeat_units(mesh, shift_and_work(mesh, grows), 10, enabled)
        results.append((steady.advanced, left_by(mesh)))
    (advanced, left), (none, left_every) = results
    assert none == 0
    assert agreed(advanced == 0) if grows else agreed(advanced > 0)
    assert_same_run(left, left_every)


def test_clocks_moved_between_units_end_the_steady_state(new_mesh):
    """Moving every clock between repeats (as a hand-off does) makes the next repeats run."""
    runs = []
    for enabled in (True, False):
        mesh = new_mesh(3, 8, dry_run=True)
        advanced_at = {}

        def hand_off(index, steady, mesh=mesh, advanced_at=advanced_at):
            advanced_at[index] = steady.advanced
            if index == 10:
                mesh.clock[...] = mesh.modeled_cycles() + 50.0
        steady = repeat_units(mesh, shift_and_work(mesh, grows=False), 20, enabled, between=hand_off)
        runs.append((advanced_at, steady.advanced, left_by(mesh)))
    (advanced_at, advanced, left), (_, _, left_every) = runs
    assert agreed(advanced_at[10] > 0)       # steady before the hand-off,
    assert agreed(advanced_at[12] == advanced_at[10] < advanced)   # run after it, then steady again
    assert_same_run(left, left_every)


def test_numeric_runs_every_repeat(new_mesh):
    mesh = new_mesh(3, 8)
    steady = repeat_units(mesh, shift_and_work(mesh, grows=False), 5, enabled=True)
    assert steady.advanced == 0
