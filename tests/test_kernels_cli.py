"""The kernels command line: ``gemm --broadcast`` and the benchmarks (small meshes, serial)."""
from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest

from kernels.__main__ import main
from meshmpi import UsageError


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_gemm_gemv_groups_write_csv_and_png(tmp_path):
    for which in ("gemm", "gemv"):
        assert main(["bench", which, "--meshes", "4,6", "--out", str(tmp_path)]) == 0
        assert (tmp_path / f"{which}.png").stat().st_size > 0
    gemm_rows = read_csv(tmp_path / "gemm.csv")
    assert {(r["algo"], r["broadcast"]) for r in gemm_rows} == {
        ("meshgemm", ""), ("cannon", ""), ("summa", "relay"), ("summa", "direct")}
    for row in gemm_rows:
        total = float(row["compute_cycles"]) + float(row["comm_cycles"])
        assert total == pytest.approx(float(row["modeled_cycles"]))
    direct = [r for r in gemm_rows if r["broadcast"] == "direct" and r["mesh"] == "6"]
    assert all(int(r["routes_per_core_max"]) == 12 for r in direct)
    gemv_rows = read_csv(tmp_path / "gemv.csv")
    assert {r["algo"] for r in gemv_rows} == {"meshgemv", "pipeline", "ring"}
    (tmp_path / "gemm.png").unlink()
    assert main(["bench", "gemm", "--replot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "gemm.png").stat().st_size > 0
    assert main(["bench", "groups", "--meshes", "9", "--out", str(tmp_path)]) == 0
    assert [int(r["groups"]) for r in read_csv(tmp_path / "groups.csv")] == [1, 2, 3, 4, 6, 9]


def test_bench_writes_into_a_fresh_folder_unless_told(tmp_path, monkeypatch, capsys):
    """Without --out a bench writes into a new results/runs/<time> folder (a second run gets
    another), so the committed results are refreshed only with --out results."""
    monkeypatch.chdir(tmp_path)
    outs = []
    for _ in range(2):
        assert main(["bench", "groups", "--meshes", "4", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        outs.append(tmp_path / doc["out"])
        assert [int(r["groups"]) for r in read_csv(outs[-1] / "groups.csv")] == [1, 2, 3, 4]
        assert [r["groups"] for r in doc["benches"]["groups"]] == [1, 2, 3, 4]
    assert outs[0] != outs[1] and {p.parent for p in outs} == {tmp_path / "results" / "runs"}
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["runs"]
    with pytest.raises(UsageError, match="--replot redraws the figures of an earlier run"):
        main(["bench", "gemm", "--replot"])


class Stop(Exception):
    pass


def test_an_interrupted_bench_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    import kernels.bench as bench
    calls = []
    real = bench.run_gemv

    def third_fails(*args, **kwargs):
        calls.append(args[1:])
        if len(calls) == 3:
            raise Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_gemv", third_fails)
    with pytest.raises(Stop):
        main(["bench", "groups", "--meshes", "4", "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "groups.csv")
    assert [int(r["groups"]) for r in rows] == [1, 2]
    assert all(float(r["modeled_cycles"]) > 0 for r in rows)
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_calibrate_writes_a_loadable_profile(tmp_path):
    assert main(["bench", "calibrate", "--meshes", "8", "--out", str(tmp_path)]) == 0
    profile = json.loads((tmp_path / "calibration" / "wse2_calibrated_8.json").read_text())
    assert profile["beta_cycles_per_relay"]["guessed"] is True
    assert "calibration" in profile["beta_cycles_per_relay"]["source"]
    rows = read_csv(tmp_path / "calibration" / "sensitivity.csv")
    assert {r["setting"] for r in rows} >= {"beta=0", "beta=16", "calibrated"}
    from meshmpi import load_hardware
    assert load_hardware(str(tmp_path / "calibration" / "wse2_calibrated_8.json")).name == "wse2-calibrated-8"


def test_gemm_broadcast_option(tmp_path, python_exe, run_env):
    base = [python_exe, "-m", "kernels", "gemm", "--algo", "summa", "--m", "64", "--k", "64",
            "--n", "64", "--dry-run", "--json"]
    done = subprocess.run(base + ["--mesh", "32x32", "--broadcast", "direct"], capture_output=True,
                          text=True, env=run_env, timeout=120)
    assert done.returncode == 2 and "routes" in done.stderr
    done = subprocess.run(base + ["--mesh", "32x32", "--broadcast", "relay"], capture_output=True,
                          text=True, env=run_env, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["broadcast"] == "relay" and report["routes_per_core_max"] <= 4


@pytest.mark.parametrize("mesh", ["1x16", "16x1", "1x3", "2x1"])
@pytest.mark.parametrize("algo", ["meshgemm", "cannon"])
def test_gemm_on_one_wide_meshes_passes_its_own_check(mesh, algo, capsys):
    assert main(["gemm", "--algo", algo, "--mesh", mesh, "--m", "32", "--k", "32", "--n", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["check"] == "passed" and report["max_abs_err"] < 1e-4


def test_a_wrong_product_fails_the_command(monkeypatch):
    """A kernel whose result disagrees with numpy must not exit 0 (cli.run exits 2 on CheckError)."""
    from kernels import gemm
    from meshmpi import CheckError

    real = gemm.ring_gemm

    def off_by_one_tile(mesh, plan, a, b, name="gemm", **options):
        c = real(mesh, plan, a, b, name=name, **options)
        c.data[0, 0] += 1.0
        return c

    monkeypatch.setattr(gemm, "ring_gemm", off_by_one_tile)
    with pytest.raises(CheckError, match="differs from numpy"):
        main(["gemm", "--mesh", "3x3", "--m", "12", "--k", "12", "--n", "12"])


def test_check_product_bounds():
    """The forward error bound passes float32 products computed in any order and fails a
    wrong element, NaN and infinity."""
    from meshmpi import CheckError
    from meshmpi.check import check_product

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20, 300)).astype(np.float32), rng.standard_normal((300, 7)).astype(np.float32)
    by_chunks = sum(a[:, i:i + 30] @ b[i:i + 30] for i in range(0, 300, 30))   # another order
    assert check_product("c", by_chunks, a, b, np.float32) < 1e-3
    wrong = by_chunks.copy()
    wrong[3, 4] += 1e-2
    with pytest.raises(CheckError, match=r"at \(3, 4\)"):
        check_product("c", wrong, a, b, np.float32)
    for bad in (np.nan, np.inf):
        broken = by_chunks.copy()
        broken[0, 1] = bad
        with pytest.raises(CheckError, match="non-finite"):
            check_product("c", broken, a, b, np.float32)
