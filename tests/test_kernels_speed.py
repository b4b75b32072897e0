"""The speed bench runs at a tiny size and writes a well-formed CSV (no timing assertions)."""
import csv
import subprocess


def test_speed_bench_writes_its_table(tmp_path, python_exe, run_env):
    done = subprocess.run([python_exe, "-m", "kernels", "bench", "speed", "--meshes", "8", "--size", "64",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=run_env, timeout=600)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "speed.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["what"], r["mesh"], r["ranks"]) for r in rows] == [
        ("numeric meshgemm", "16x16", "1"), ("numeric meshgemm", "16x16", "2"),
        ("dry meshgemm", "8x8", "1"), ("dry meshgemm", "8x8", "2"),
        ("dry meshgemv", "8x8", "1"), ("dry meshgemv", "8x8", "2")]
    for row in rows:
        assert float(row["wall_seconds"]) > 0 and float(row["modeled_cycles"]) > 0
    for first, second in zip(rows[::2], rows[1::2]):    # the rank count changes no modeled number
        assert first["modeled_cycles"] == second["modeled_cycles"]
    assert all(float(r["ratio_to_floor"]) > 0 for r in rows[:2])
    assert all(float(r["speedup_over_1_rank"]) > 0 for r in rows[3::2])
