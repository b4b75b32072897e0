"""The results collector: JSON and HDF5 outputs of a sweep merged into one CSV (serial, fast)."""
import argparse
import csv
import json

import h5py
import numpy as np
import pytest

from meshmpi import collect


def parse(argv):
    parser = argparse.ArgumentParser()
    collect.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_trace(path, **meta):
    with h5py.File(path, "w") as trace:
        trace.create_group("meta").attrs.update(meta)
        counters = trace.create_group("counters")
        counters["flops"] = np.arange(4, dtype=np.int64).reshape(2, 2)  # sum 6, max 3
        counters["cycles"] = np.array([[1.5, 2.5], [0.5, 4.0]])


def test_sweep_merges_json_and_lone_traces(tmp_path):
    sweep = tmp_path / "sweep-7"
    sweep.mkdir()
    (sweep / "0.json").write_text(json.dumps(
        {"command": "gemm", "mesh": [4, 4], "modeled": {"cycles": 10, "seconds": 1e-6}}))
    (sweep / "1.json").write_text(json.dumps({"command": "gemv", "ranks": 2}))
    write_trace(sweep / "1.h5", kernel="ignored")  # has a JSON twin: not a row of its own
    write_trace(sweep / "2.h5", kernel="meshgemm", ranks=np.int32(4), mesh=np.array([8, 8]),
                result_json=json.dumps({"modeled": {"cycles": 12}}), warnings_json="[]")
    (sweep / "notes.txt").write_text("not a result")

    out = tmp_path / "table.csv"
    assert collect.run(parse(["results", "collect", str(sweep), "-o", str(out)])) == 0
    rows = read_rows(out)

    assert [r["source"] for r in rows] == ["0.json", "1.json", "2.h5"]
    assert list(rows[0])[0] == "source"
    assert rows[0]["modeled.cycles"] == "10" and rows[0]["mesh"] == "[4, 4]"
    assert rows[1]["ranks"] == "2" and rows[1]["modeled.cycles"] == ""  # union of columns
    trace = rows[2]
    assert trace["kernel"] == "meshgemm" and trace["ranks"] == "4" and trace["mesh"] == "[8, 8]"
    assert trace["counters.flops.sum"] == "6" and trace["counters.flops.max"] == "3"
    assert float(trace["counters.cycles.max"]) == 4.0
    # the stored result fills the same columns as a JSON file's
    assert trace["modeled.cycles"] == "12" and trace["warnings_json"] == "[]"


def test_broken_json_is_skipped_with_a_warning(tmp_path, capsys):
    (tmp_path / "0.json").write_text("")  # what a failed array task leaves behind
    (tmp_path / "1.json").write_text("[1, 2]")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "2.json").write_text('{"ok": true}')
    rows = collect.collect(tmp_path)
    assert rows == [{"source": "sub/2.json", "ok": True}]
    err = capsys.readouterr().err
    assert "0.json" in err and "1.json" in err


def test_stdout_when_no_output_given(tmp_path, capsys):
    (tmp_path / "a.json").write_text('{"x": {"y": {"z": 1}}}')
    collect.run(parse(["results", "collect", str(tmp_path)]))
    assert capsys.readouterr().out.splitlines() == ["source,x.y.z", "a.json,1"]


def test_missing_directory_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        collect.collect(tmp_path / "nope")


def test_no_result_files_is_a_value_error(tmp_path):
    (tmp_path / "log.out").write_text("")
    with pytest.raises(ValueError, match="no result files"):
        collect.collect(tmp_path)
