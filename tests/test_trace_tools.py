"""``python -m meshmpi trace plot|compare|export`` on small traces made in-process (serial).

Expected values are read straight from the HDF5 datasets with h5py, not through the
commands' own readers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from meshmpi import Mesh, load_hardware
from meshmpi.__main__ import main
from meshmpi.plots import pool_max
from meshmpi.trace import write_trace

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEATMAPS = {f"core_{name}.png" for name in ("busy_cycles", "clock_cycles", "bytes_recv", "bytes_sent",
                                              "hops", "relays", "peak_bytes", "routes_peak", "energy_joules")}


# ---------------------------------------------------------------------- traces
def kernel_trace(path, algo: str, offset: int, flops: int, rows: int = 4, cols: int = 4):
    """``<algo>.align`` (two steps of +1 shifts along x) then ``<algo>.compute_shift``
    (three steps: a shift by ``offset`` along y overlapped with ``flops`` per core)."""
    mesh = Mesh(rows, cols, load_hardware("wse2"), comm=MPI.COMM_SELF)
    a = mesh.alloc(f"{algo}.a", (16,), np.float32)
    with mesh.phase(f"{algo}.align"):
        east = mesh.fabric.shift(f"{algo}.east", "x", 1)
        for step in range(2):
            east.run(a)
            mesh.step(f"align {step}")
    with mesh.phase(f"{algo}.compute_shift"):
        south = mesh.fabric.shift(f"{algo}.south", "y", offset)
        for step in range(3):
            transfer = south.start(a)
            mesh.compute(flops)
            transfer.wait()
            mesh.step(f"step {step}")
    write_trace(mesh, path, kind="gemm", result={"algo": algo}, argv=["test"])
    mesh.free()
    return path


def llm_trace(path, layers: int = 3, tokens: int = 2):
    """Nested phases as the decoder records them: decode > decode.layerN > attention / ffn,
    with steps in the leaves and in the layer phases."""
    mesh = Mesh(4, 4, load_hardware("wse2"), comm=MPI.COMM_SELF)
    x = mesh.alloc("x", (8,), np.float32)
    east = mesh.fabric.shift("east", "x", 1)
    down = mesh.fabric.multicast("down", "y", 0)
    for _ in range(tokens):
        with mesh.phase("decode"):
            for layer in range(layers):
                with mesh.phase(f"decode.layer{layer}"):
                    with mesh.phase(f"decode.layer{layer}.attention"):
                        mesh.compute(64 * (layer + 1))
                        east.run(x)
                        mesh.step("scores")
                        mesh.compute(32)
                        mesh.step("softmax")
                    with mesh.phase(f"decode.layer{layer}.ffn"):
                        mesh.compute(128)
                        down.run(x)
                        mesh.step("up")
                    mesh.compute(16, where=mesh.positions_mask("x", [0]))
                    mesh.step("residual")
            with mesh.phase("decode.sample"):
                mesh.compute(10)
    write_trace(mesh, path, kind="generate", result={"tokens": tokens}, argv=["test"])
    mesh.free()
    return path


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    return {
        "alpha": kernel_trace(d / "alpha.h5", "alpha", 1, 64),
        "beta": kernel_trace(d / "beta.h5", "beta", 2, 96),
        "gamma": kernel_trace(d / "gamma.h5", "gamma", 3, 32),
        "llm": llm_trace(d / "llm.h5"),
        "wide": kernel_trace(d / "wide.h5", "wide", 1, 8, rows=10, cols=12),
    }


@pytest.fixture(scope="module")
def huge_trace(traces, tmp_path_factory):
    """A 720x720 trace: a small run's file with its counters replaced by 720x720 arrays
    (writing them is what a dry run at that size would leave; the schema is the same)."""
    path = tmp_path_factory.mktemp("huge") / "huge.h5"
    path.write_bytes(Path(traces["alpha"]).read_bytes())
    rng = np.random.default_rng(0)
    with h5py.File(path, "r+") as f:
        f["meta"].attrs["mesh_rows"] = 720
        f["meta"].attrs["mesh_cols"] = 720
        for name in list(f["counters"]):
            dtype = f["counters"][name].dtype
            del f["counters"][name]
            f["counters"].create_dataset(name, data=rng.integers(0, 40000, (720, 720)).astype(dtype))
    return path


def run_main(capsys, *argv, stderr: list | None = None) -> str:
    assert main(list(argv)) == 0
    captured = capsys.readouterr()
    if stderr is not None:
        stderr.append(captured.err)
    return captured.out


# ---------------------------------------------------------------------- plot
def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path


def test_plot_kernel_trace(traces, tmp_path, capsys):
    out = run_main(capsys, "trace", "plot", str(traces["alpha"]), "-o", str(tmp_path / "plots"))
    listed = [Path(line) for line in out.split()]
    names = {p.name for p in listed}
    assert names == HEATMAPS | {"phases.png", "steps.png"}
    assert set((tmp_path / "plots").iterdir()) == set(listed)
    for path in listed:
        check_png(path)


def test_plot_nested_phases_per_layer(traces, tmp_path, capsys):
    out = run_main(capsys, "trace", "plot", str(traces["llm"]), "-o", str(tmp_path))
    names = {Path(line).name for line in out.split()}
    assert names == HEATMAPS | {"phases.png", "layers.png", "steps.png"}
    for name in names:
        check_png(tmp_path / name)


def test_self_costs_add_up_to_the_run(traces):
    from meshmpi.plots import self_costs
    from meshmpi.trace import read_trace
    trace = read_trace(traces["llm"])
    rows = self_costs(trace)
    top = sum(p["end_cycles"] - p["start_cycles"] for p in trace["phases"] if p["depth"] == 0)
    assert sum(r["cycles"] for r in rows) == pytest.approx(top)
    assert sum(r["flops"] for r in rows) == sum(p["flops"] for p in trace["phases"] if p["depth"] == 0)
    kinds = {r["kind"] for r in rows}
    assert {"decode.layer*.attention", "decode.layer*.ffn", "decode.layer* (self)"} <= kinds


def test_step_costs_leave_out_nested_phases(traces):
    from meshmpi.export import step_spans
    from meshmpi.plots import step_self_costs
    from meshmpi.trace import read_trace
    trace = read_trace(traces["llm"])
    cycles, flops = step_self_costs(trace)
    spans = step_spans(trace)
    for i, s in enumerate(trace["steps"]):
        phase = trace["phases"][s["phase"]]
        assert phase["start_cycles"] <= spans[i][0] <= spans[i][1] == s["end_cycles"] <= phase["end_cycles"]
        if s["label"] == "residual":  # 16 FLOPs on column 0 after attention and ffn
            assert s["flops"] > 64 and flops[i] == 64
            assert spans[i][0] == phase["start_cycles"] and cycles[i] < spans[i][1] - spans[i][0]
        else:
            assert flops[i] == s["flops"] and cycles[i] == spans[i][1] - spans[i][0]


def test_phase_paths_full_or_relative_names():
    from meshmpi.export import phase_paths
    names = [("decode.pos3", -1), ("layer0", 0), ("layer0.qkv.local", 1), ("prefill", -1),
             ("prefill.layer3", 3), ("prefill.layer3.attention", 4), ("prefill.layer3.h2.softmax", 5),
             ("lm_head", -1), ("lm_head.local", 7), ("allreduce", 7)]
    paths = phase_paths([{"name": n, "parent": p} for n, p in names])
    assert paths == ["decode.pos3", "decode.pos3.layer0", "decode.pos3.layer0.qkv.local", "prefill",
                     "prefill.layer3", "prefill.layer3.attention", "prefill.layer3.attention.h2.softmax",
                     "lm_head", "lm_head.local", "lm_head.allreduce"]


def test_pool_max_keeps_every_core_s_maximum():
    values = np.random.default_rng(1).integers(0, 1000, (721, 719))
    pooled, k = pool_max(values, limit=400)
    assert k == 2 and pooled.shape == (361, 360)
    assert pooled[0, 0] == values[:2, :2].max()
    assert pooled[-1, -1] == values[720:, 718:].max()
    assert pooled.max() == values.max()
    small, k = pool_max(values[:8, :8])
    assert k == 1 and np.array_equal(small, values[:8, :8])


def test_plot_720x720_is_fast(huge_trace, tmp_path, capsys):
    started = time.process_time()
    out = run_main(capsys, "trace", "plot", str(huge_trace), "-o", str(tmp_path))
    assert time.process_time() - started < 30  # seconds of CPU for all charts (a few, usually)
    for line in out.split():
        check_png(Path(line))


# ---------------------------------------------------------------------- compare
def h5_numbers(path) -> dict:
    with h5py.File(path, "r") as f:
        c = f["counters"]
        phases = f["phases"][()]
        cycles = defaultdict(float)
        for p in phases:
            name = p["name"].decode()
            cycles[name.split(".", 1)[1]] += p["end_cycles"] - p["start_cycles"]
        clock_hz = json.loads(f["meta"].attrs["hardware_json"])["clock_hz"]["value"]
        return {
            "modeled_cycles": float(c["clock_cycles"][()].max()),
            "modeled_seconds": float(c["clock_cycles"][()].max()) / clock_hz,
            "messages": int(c["messages_sent"][()].sum()),
            "bytes_moved": int(c["bytes_sent"][()].sum()),
            "peak_bytes_per_core": int(c["peak_bytes"][()].max()),
            "routes_per_core_max": int(c["routes_peak"][()].max()),
            "phases": dict(cycles),
        }


def test_compare_ratios_against_the_first(traces, capsys):
    files = [traces["alpha"], traces["beta"], traces["gamma"]]
    doc = json.loads(run_main(capsys, "trace", "compare", *map(str, files), "--json"))
    expected = [h5_numbers(f) for f in files]
    assert doc["files"] == [str(f) for f in files]
    assert doc["phase_prefixes"] == ["alpha", "beta", "gamma"]
    totals = {t["metric"]: t for t in doc["totals"]}
    for metric in ("modeled_cycles", "modeled_seconds", "messages", "bytes_moved",
                   "peak_bytes_per_core", "routes_per_core_max"):
        values = [e[metric] for e in expected]
        assert totals[metric]["values"] == pytest.approx(values)
        assert totals[metric]["ratios"] == pytest.approx([v / values[0] for v in values])
    phases = {p["phase"]: p for p in doc["phases"]}
    assert set(phases) == {"align", "compute_shift"}
    for key, row in phases.items():
        values = [e["phases"][key] for e in expected]
        assert row["cycles"] == pytest.approx(values)
        assert row["ratios"] == pytest.approx([v / values[0] for v in values])
    # the runs differ, so the ratios are not trivially 1
    assert totals["modeled_cycles"]["ratios"][1] != pytest.approx(1.0)


def test_compare_text_and_repeated_phases(traces, capsys):
    out = run_main(capsys, "trace", "compare", str(traces["llm"]), str(traces["llm"]))
    assert "B/A" in out and "decode.layer1.attention" in out
    doc = json.loads(run_main(capsys, "trace", "compare", str(traces["llm"]), str(traces["llm"]), "--json"))
    assert doc["phase_prefixes"] is None
    attention = next(p for p in doc["phases"] if p["phase"] == "decode.layer0.attention")
    assert attention["count"] == [2, 2] and attention["ratios"] == [1.0, 1.0]
    # different kinds: phases are matched on their full names
    doc = json.loads(run_main(capsys, "trace", "compare", str(traces["alpha"]), str(traces["llm"]), "--json"))
    assert doc["phase_prefixes"] is None
    assert {"alpha.align", "decode"} <= {p["phase"] for p in doc["phases"]}


# ---------------------------------------------------------------------- export
EPS = 1e-6  # microseconds: slice times are rounded to the picosecond


def export(capsys, path, out, *options, stderr=None) -> dict:
    run_main(capsys, "trace", "export", str(path), "--format", "chrome", "-o", str(out), *options,
             stderr=stderr)
    return json.loads(Path(out).read_text())


def check_chrome_structure(doc: dict, cols: int, rows_range, cols_range) -> None:
    events = doc["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert slices and {e["ph"] for e in events} <= {"X", "s", "f", "M"}
    tracks = defaultdict(list)
    for e in slices:
        for key in ("name", "ts", "dur", "pid", "tid"):
            assert key in e, e
        assert e["dur"] >= 0
        r, c = divmod(e["tid"], cols)
        assert e["pid"] == r and r in rows_range and c in cols_range
        tracks[(e["pid"], e["tid"])].append(e)
    assert len(tracks) == len(rows_range) * len(cols_range)
    for track in tracks.values():  # proper nesting: a slice lies inside, or after, the open ones
        track.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in track:
            while stack and not (e["ts"] >= stack[-1]["ts"] - EPS
                                 and e["ts"] + e["dur"] <= stack[-1]["ts"] + stack[-1]["dur"] + EPS):
                top = stack.pop()
                assert e["ts"] >= top["ts"] + top["dur"] - EPS, (top, e)  # no partial overlap
            stack.append(e)
        roots = [e for e in track if e["name"] == "run"]
        assert len(roots) == 1 and track[0] is roots[0]
    starts = defaultdict(list)
    finishes = defaultdict(list)
    for e in events:
        if e["ph"] == "s":
            starts[e["id"]].append(e)
        elif e["ph"] == "f":
            finishes[e["id"]].append(e)
    assert set(starts) == set(finishes)
    for flow_id, (s,) in starts.items():
        (f,) = finishes[flow_id]
        assert (s["name"], s["cat"]) == (f["name"], f["cat"]) and s["ts"] <= f["ts"]
        (sr, sc), (fr, fc) = divmod(s["tid"], cols), divmod(f["tid"], cols)
        assert abs(sr - fr) + abs(sc - fc) == 1  # between adjacent cores
        assert {sr, fr} <= set(rows_range) and {sc, fc} <= set(cols_range)
        for end in (s, f):  # each end binds to a step slice on its track
            assert any(x["cat"] == "step" and x["ts"] - EPS <= end["ts"] <= x["ts"] + x["dur"] + EPS
                       for x in tracks[(end["pid"], end["tid"])])


def test_export_modeled_structure_and_times(traces, tmp_path, capsys):
    doc = export(capsys, traces["llm"], tmp_path / "llm.json")
    check_chrome_structure(doc, 4, range(4), range(4))
    with h5py.File(traces["llm"], "r") as f:
        phases = f["phases"][()]
        steps = f["steps"][()]
        clock_hz = json.loads(f["meta"].attrs["hardware_json"])["clock_hz"]["value"]
        busy = f["counters"]["busy_cycles"][()]
    track = sorted((e for e in doc["traceEvents"] if e["ph"] == "X" and e["tid"] == 5),
                   key=lambda e: (e["ts"], -e["dur"]))
    phase_slices = [e for e in track if e["cat"] == "phase"]
    assert len(phase_slices) == len(phases)
    for p in phases:  # every phase appears with its modeled start and length in microseconds
        assert any(e["name"] == p["name"].decode()
                   and e["ts"] == pytest.approx(p["start_cycles"] / clock_hz * 1e6, abs=EPS)
                   and e["dur"] == pytest.approx((p["end_cycles"] - p["start_cycles"]) / clock_hz * 1e6, abs=EPS)
                   for e in phase_slices)
    assert sum(e["cat"] == "step" for e in track) == len(steps)
    run = next(e for e in track if e["name"] == "run")
    assert run["args"]["core"] == [1, 1] and run["args"]["busy_cycles"] == busy[1, 1]
    assert any(e["ph"] == "s" for e in doc["traceEvents"])
    assert "reconstructed" in doc["otherData"]["flows"]


def test_export_wall_clock_nests(traces, tmp_path, capsys):
    doc = export(capsys, traces["llm"], tmp_path / "wall.json", "--clock", "wall")
    check_chrome_structure(doc, 4, range(4), range(4))
    assert doc["otherData"]["clock"] == "wall"


def test_export_core_filter(traces, tmp_path, capsys):
    doc = export(capsys, traces["wide"], tmp_path / "part.json", "--cores", "2:5,3:7")
    check_chrome_structure(doc, 12, range(2, 5), range(3, 7))
    assert doc["otherData"]["cores"] == "2:5,3:7"
    doc = export(capsys, traces["wide"], tmp_path / "open.json", "--cores", "8:,:2")
    check_chrome_structure(doc, 12, range(8, 10), range(0, 2))


def test_export_defaults_to_the_first_8x8_cores(traces, huge_trace, tmp_path, capsys):
    notes = []
    doc = export(capsys, traces["wide"], tmp_path / "wide.json", stderr=notes)
    assert "first 8x8 cores of the 10x12 mesh" in notes[0]
    check_chrome_structure(doc, 12, range(8), range(8))
    doc = export(capsys, huge_trace, tmp_path / "huge.json")
    check_chrome_structure(doc, 720, range(8), range(8))
    assert (tmp_path / "huge.json").stat().st_size < 5_000_000


# ---------------------------------------------------------------------- bad input
def cli(*argv):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "meshmpi", *argv], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


@pytest.mark.parametrize("argv", [
    ("trace", "plot", "missing.h5", "-o", "{tmp}/plots"),
    ("trace", "compare", "{alpha}", "missing.h5"),
    ("trace", "export", "missing.h5", "-o", "{tmp}/x.json"),
    ("trace", "export", "{alpha}", "-o", "{tmp}/x.json", "--cores", "0:9,0:2"),
    ("trace", "export", "{alpha}", "-o", "{tmp}/x.json", "--cores", "rows"),
    ("trace", "export", "{alpha}", "-o", "{tmp}/x.json", "--cores", "2:2,0:4"),
    ("trace", "export", "{alpha}", "-o", "{tmp}/x.json", "--format", "svg"),
    ("trace", "plot", "{notrace}", "-o", "{tmp}/plots"),
])
def test_bad_input_is_one_error_line(argv, traces, tmp_path):
    (tmp_path / "not.h5").write_text("not HDF5")
    fill = {"tmp": tmp_path, "alpha": traces["alpha"], "notrace": tmp_path / "not.h5"}
    done = cli(*(a.format(**fill) for a in argv))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert not (tmp_path / "x.json").exists()


def test_summary_gives_each_phase_s_peak_memory(traces, capsys):
    """The one buffer of the kernel trace (16 elements at the profile's 2 bytes) is resident
    through both phases; the summary reports the phases' peak as the trace stores it."""
    assert main(["trace", "summary", str(traces["alpha"]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    with h5py.File(traces["alpha"], "r") as f:
        stored = [int(p["peak_bytes"]) for p in f["phases"][()]]
    assert [p["peak_bytes"] for p in summary["phases"]] == stored == [32, 32]
    assert main(["trace", "summary", str(traces["alpha"])]) == 0
    assert "peak B/core" in capsys.readouterr().out


# ---------------------------------------------------------------------- summary
def stored_phases(path) -> list[tuple[str, int, float]]:
    with h5py.File(path, "r") as f:
        return [(p["name"].decode(), int(p["depth"]), float(p["end_cycles"] - p["start_cycles"]))
                for p in f["phases"][()]]


@pytest.mark.parametrize("aggregate,key", [
    ("name", lambda name: name),
    ("kind", lambda name: name.replace("layer0", "layer*").replace("layer1", "layer*").replace("layer2", "layer*")),
])
def test_summary_groups_repeated_phases(traces, capsys, aggregate, key):
    """Each group is the stored phases of one name (or, by kind, of one name up to the layer
    number): their count, total and mean modeled cycles, in first-seen order."""
    stored = stored_phases(traces["llm"])
    expected: dict = {}
    for name, _, cycles in stored:
        expected.setdefault(key(name), []).append(cycles)
    doc = json.loads(run_main(capsys, "trace", "summary", str(traces["llm"]), "--aggregate", aggregate, "--json"))
    groups = doc["phase_groups"]
    assert [g["name"] for g in groups] == list(expected)
    for g in groups:
        assert g["count"] == len(expected[g["name"]])
        assert g["modeled_cycles"] == pytest.approx(sum(expected[g["name"]]))
        assert g["mean_cycles"] == pytest.approx(sum(expected[g["name"]]) / g["count"])
    assert len(doc["phases"]) == len(stored)       # every instance stays in the JSON
    text = run_main(capsys, "trace", "summary", str(traces["llm"]), "--aggregate", aggregate)
    table = text.split("\n\n", 1)[1].splitlines()
    assert len(table) == 1 + len(expected) + 1     # header, one row per group, the note
    if aggregate == "kind":
        assert len(groups) < len(set(name for name, _, _ in stored)) < len(stored)


def test_summary_every_instance_depth_and_glob(traces, capsys):
    stored = stored_phases(traces["llm"])
    doc = json.loads(run_main(capsys, "trace", "summary", str(traces["llm"]), "--aggregate", "none", "--json"))
    assert [(g["name"], g["count"]) for g in doc["phase_groups"]] == [(name, 1) for name, _, _ in stored]
    doc = json.loads(run_main(capsys, "trace", "summary", str(traces["llm"]), "--depth", "1", "--json"))
    assert [(g["name"], g["count"]) for g in doc["phase_groups"]] == [("decode", 2)]
    doc = json.loads(run_main(capsys, "trace", "summary", str(traces["llm"]), "--phase", "decode.layer1*",
                              "--aggregate", "name", "--json"))
    want = [name for name, _, _ in stored if name.startswith("decode.layer1")]
    assert [g["name"] for g in doc["phase_groups"]] == list(dict.fromkeys(want))
    assert sum(g["count"] for g in doc["phase_groups"]) == len(want)
    # the totals are the whole run's whatever the filter
    with h5py.File(traces["llm"], "r") as f:
        assert doc["totals"]["modeled_cycles"] == f["counters/clock_cycles"][()].max()
    usage_error_line = subprocess.run([sys.executable, "-m", "meshmpi", "trace", "summary", str(traces["llm"]),
                                       "--depth", "0"], capture_output=True, text=True, env=os.environ | {
                                           "PYTHONPATH": str(REPO)})
    assert usage_error_line.returncode == 2
    assert usage_error_line.stderr.strip().splitlines() == ["error: --depth must be at least 1, got 0"]


def test_steps_chart_groups_repeated_steps(traces):
    """The decoder-like trace's steps fall in one group per (phase, label), layers merged by kind."""
    from meshmpi.plots import step_groups
    from meshmpi.trace import read_trace
    trace = read_trace(traces["llm"])
    groups = step_groups(trace, "kind")
    assert [(g["phase"], g["label"], g["count"]) for g in groups] == [
        ("decode.layer*.attention", "scores", 6), ("decode.layer*.attention", "softmax", 6),
        ("decode.layer*.ffn", "up", 6), ("decode.layer*", "residual", 6)]
    by_name = step_groups(trace, "name")
    assert len(by_name) == 3 * 4 and sum(g["count"] for g in by_name) == len(trace["steps"])


def test_a_schema_2_trace_is_still_read(traces, tmp_path, capsys):
    """Version 2 had no phase labels and no /meta modeled_cycles: rewritten that way, the trace
    reads with empty labels and the latest core clock as the run's modeled time."""
    old = tmp_path / "v2.h5"
    old.write_bytes(traces["llm"].read_bytes())
    with h5py.File(old, "r+") as f:
        phases = f["phases"][()]
        names = [n for n in phases.dtype.names if n != "label"]
        del f["phases"]
        f.create_dataset("phases", data=phases[names])
        f["meta"].attrs["schema_version"] = 2
        del f["meta"].attrs["modeled_cycles"]
        clock = f["counters/clock_cycles"][()].max()
        stored = [n.decode() for n in phases["name"]]
    doc = json.loads(run_main(capsys, "trace", "summary", str(old), "--aggregate", "none", "--json"))
    assert [p["name"] for p in doc["phases"]] == stored and {p["label"] for p in doc["phases"]} == {""}
    assert doc["totals"]["modeled_cycles"] == clock


def test_a_schema_3_trace_without_energy_is_still_read(traces, tmp_path, capsys):
    """Version 3 had no byte_hops or energy_joules counters and no energy constants in its
    profile: it reads, and plots without the energy heatmap."""
    from meshmpi.hardware import ENERGY_KEYS
    old = tmp_path / "v3.h5"
    old.write_bytes(traces["alpha"].read_bytes())
    with h5py.File(old, "r+") as f:
        del f["counters/byte_hops"], f["counters/energy_joules"]
        profile = json.loads(f["meta"].attrs["hardware_json"])
        f["meta"].attrs["hardware_json"] = json.dumps({k: v for k, v in profile.items() if k not in ENERGY_KEYS})
        f["meta"].attrs["schema_version"] = 3
    out = run_main(capsys, "trace", "plot", str(old), "-o", str(tmp_path / "plots"))
    assert {Path(line).name for line in out.split()} == (HEATMAPS - {"core_energy_joules.png"}) | {"phases.png", "steps.png"}


# ---------------------------------------------------------------------- results collect
def test_collect_puts_a_metric_in_one_column_from_json_and_trace(tmp_path, capsys):
    """One run's --json output and its trace (no JSON twin) give the same columns for the
    result's keys: a row from either file has modeled_cycles, none has result.modeled_cycles."""
    from kernels.__main__ import main as kernels_main
    import csv
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    assert kernels_main(["gemm", "--algo", "cannon", "--mesh", "4x4", "--m", "16", "--k", "16", "--n", "16",
                         "--json", "--trace", str(sweep / "b.h5")]) == 0
    report = json.loads(capsys.readouterr().out)
    (sweep / "a.json").write_text(json.dumps(report))
    assert main(["results", "collect", str(sweep), "-o", str(tmp_path / "t.csv")]) == 0
    with open(tmp_path / "t.csv", newline="") as f:
        rows = {r["source"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"a.json", "b.h5"}
    assert not [c for c in rows["a.json"] if c.startswith("result.")]
    for row in rows.values():
        assert float(row["modeled_cycles"]) == report["modeled_cycles"]
        assert float(row["max_abs_err"]) == report["max_abs_err"] and row["algo"] == "cannon"
    assert rows["b.h5"]["kind"] == "gemm" and rows["a.json"]["kind"] == ""
