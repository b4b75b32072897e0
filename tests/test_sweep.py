"""``python -m meshmpi sweep``: a grid of profile overrides gives one row per point, each the
same as the command run by hand with those overrides, and a plot; SLURM tables round-trip."""
from __future__ import annotations

import csv
import json

import pytest

from kernels.__main__ import main as kernels_main
from meshmpi import UsageError
from meshmpi.__main__ import main

COMMAND = ["kernels", "gemv", "--algo", "meshgemv", "--mesh", "4x4", "--m", "16", "--n", "16", "--dry-run"]


def by_hand(capsys, *sets) -> dict:
    args = COMMAND[1:] + [word for key in sets for word in ("--set", key)] + ["--json"]
    assert kernels_main(args) == 0
    return json.loads(capsys.readouterr().out)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_points_make_the_table_and_the_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--grid", "link_bytes_per_cycle=4,8", "--out", str(out), "--", *COMMAND]) == 0
    rows = read_rows(out / "sweep.csv")
    assert [float(r["grid.link_bytes_per_cycle"]) for r in rows] == [4.0, 8.0]
    for row, link in zip(rows, ("4", "8")):
        expected = by_hand(capsys, f"link_bytes_per_cycle={link}")
        assert float(row["modeled_cycles"]) == expected["modeled_cycles"]
        assert float(row["energy_joules"]) == expected["energy_joules"]
        assert float(row["energy_split_joules.fabric"]) == expected["energy_split_joules"]["fabric"]
    assert float(rows[0]["modeled_cycles"]) > float(rows[1]["modeled_cycles"])  # wider links: faster
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slurm_table_and_collecting_its_results(tmp_path, capsys):
    table = tmp_path / "sweep.tsv"
    grid = ["--grid", "sram_bytes_per_core=24K,96K", "mesh=4x4,2x2"]
    assert main(["sweep", *grid, "--ranks", "2", "--slurm", str(table), "--", *COMMAND]) == 0
    lines = [line.split("\t") for line in table.read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 4 and {line[0] for line in lines} == {"2"} and {line[1] for line in lines} == {"kernels gemv"}
    assert "--set sram_bytes_per_core=24K" in lines[0][4] and lines[0][4].endswith("--mesh 4x4 --hardware wse2")
    assert "--mesh 2x2" in lines[1][4] and "--mesh 4x4" not in lines[1][4]
    done = tmp_path / "array"
    done.mkdir()
    for index in (0, 2):     # tasks 1 and 3 left nothing
        (done / f"{index}.json").write_text(json.dumps({"modeled_seconds": index + 1.0, "energy_joules": 2.0}))
    out = tmp_path / "out"
    assert main(["sweep", *grid, "--from", str(done), "--out", str(out), "--", *COMMAND]) == 0
    rows = read_rows(out / "sweep.csv")
    assert [(r["grid.sram_bytes_per_core"], r["grid.mesh"]) for r in rows] == \
        [("24576", "16"), ("24576", "4"), ("98304", "16"), ("98304", "4")]
    assert [r["modeled_seconds"] for r in rows] == ["1.0", "", "3.0", ""]
    assert rows[1]["error"].startswith("no JSON result")


@pytest.mark.parametrize("argv, words", [
    (["--grid", "warp=1,2", "--", *COMMAND], ["warp", "not a profile parameter"]),
    (["--grid", "sram_bytes_per_core=24X", "--", *COMMAND], ["'24X'"]),
    (["--grid", "routes_per_core", "--", *COMMAND], ["KEY=V1,V2"]),
    (["--grid", "routes_per_core=4", "--", "ls", "-l"], ["kernels gemm|gemv"]),
    (["--grid", "routes_per_core=4", "--", *COMMAND, "--json"], ["--json"]),
])
def test_bad_sweeps_are_usage_errors(argv, words, tmp_path):
    with pytest.raises(UsageError) as info:
        main(["sweep", "--out", str(tmp_path), *argv])
    for word in words:
        assert word in str(info.value)
