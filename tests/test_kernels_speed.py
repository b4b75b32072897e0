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
        assert float(row["reference_seconds"]) > 0      # the machine's pace, timed beside the row
    for first, second in zip(rows[::2], rows[1::2]):    # the rank count changes no modeled number
        assert first["modeled_cycles"] == second["modeled_cycles"]
    assert all(float(r["ratio_to_floor"]) > 0 for r in rows[:2])
    # the floor with the tiles' moves is timed beside it
    assert all(float(r["moves_floor_seconds"]) > 0 for r in rows[:2])
    assert all(float(r["speedup_over_1_rank"]) > 0 for r in rows[3::2])


class _Bar:
    def update(self, n=1):
        pass


def test_llm_rows_time_whole_models_on_one_and_two_ranks(tmp_path):
    from kernels import speed
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True)
    model = speed.write_smol(tmp_path / "small", small)
    runs = (("numeric small", None, "4x4", False, 3, ()), ("dry tiny all layers", "tiny", "8x8", True, 2, ()))
    rows = list(speed.llm_rows(runs, model, 5, _Bar(), ("--set", "sram_bytes_per_core=1000000")))
    assert [(r["what"], r["ranks"]) for r in rows] == [
        ("numeric small, first token", 1), ("numeric small, per decoded token", 1),
        ("numeric small, first token", 2), ("numeric small, per decoded token", 2),
        ("dry tiny all layers, first token", 1), ("dry tiny all layers, per decoded token", 1),
        ("dry tiny all layers, whole run", 1),
        ("dry tiny all layers, first token", 2), ("dry tiny all layers, per decoded token", 2),
        ("dry tiny all layers, whole run", 2)]
    assert all(r["wall_seconds"] > 0 and r["size"] == 5 for r in rows)
    for one, two in ((rows[0], rows[2]), (rows[1], rows[3]), (rows[4], rows[7]), (rows[5], rows[8]), (rows[6], rows[9])):
        assert one["modeled_cycles"] == two["modeled_cycles"] > 0   # the rank count changes no modeled number
        assert two["speedup_over_1_rank"] == one["wall_seconds"] / two["wall_seconds"]
    # the parts of a run are no longer than the whole
    assert rows[4]["wall_seconds"] + rows[5]["wall_seconds"] <= rows[6]["wall_seconds"]
    assert "--layers all" in rows[4]["command"] and "--dry-run" in rows[4]["command"]
