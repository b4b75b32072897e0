"""``python -m llm bench`` (dry-run predictions for the presets) on every world size.

The bench row must be the ``generate --json`` report of the same run, the two KV policies must
share one region plan (concat's room = shift's per-row capacity minus the prompt's rows), the
cores used must be the regions times the region, and a region too small for one layer must be
a table entry, not a crash.
"""
import csv
import json
import math
import tempfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
from mpi4py import MPI

from llm.__main__ import main
from llm.presets import preset
from meshmpi import load_hardware

pytestmark = pytest.mark.mpi

SIDE, PROMPT = 200, 100   # a region of several, as on the paper's meshes, small enough to run in seconds


def _shared_dir():
    comm = MPI.COMM_WORLD
    path = tempfile.mkdtemp(prefix="llm-bench-") if comm.rank == 0 else None
    return Path(comm.bcast(path))


def _bench_and_generate(bench: list, generate: list):
    """(the bench's folder, the ``generate --json`` report) on rank 0; None on the others."""
    out = _shared_dir()
    with redirect_stdout(StringIO()):
        assert main(["bench", "--models", "llama3-8b", *bench, "--out", str(out)]) == 0
    text = StringIO()
    with redirect_stdout(text):
        main(["generate", "--model", "llama3-8b", "--dry-run", *generate, "--json"])
    MPI.COMM_WORLD.Barrier()
    return (out, json.loads(text.getvalue())) if MPI.COMM_WORLD.rank == 0 else None


def test_bench_rows_agree_with_generate_and_closed_forms():
    ran = _bench_and_generate(["--meshes", f"16,{SIDE}", "--prompt-len", str(PROMPT), "--new-tokens", "2"],
                              ["--prompt-len", str(PROMPT), "--max-new-tokens", "2", "--mesh", f"{SIDE}x{SIDE}"])
    if ran is None:
        return
    out, report = ran
    with open(out / "llm_presets.csv", newline="") as f:
        small, row = list(csv.DictReader(f))
    assert (out / "llm_presets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "out of memory" in small["error"] or "larger --mesh" in small["error"]

    assert float(row["modeled_decode_tokens_per_s"]) == pytest.approx(report["modeled_decode_tokens_per_s"])
    assert float(row["modeled_prefill_ms"]) == pytest.approx(report["modeled_prefill_seconds"] * 1e3)
    config, hw = preset("llama3-8b"), load_hardware("wse2")
    regions, per_region = int(row["regions"]), int(row["layers_per_region"])
    last = int(row["last_region_layers"])          # the last region also holds the LM head
    assert 0 <= last <= per_region
    body = config.num_hidden_layers - last           # on the other regions, as few as can hold them
    assert (regions - 2) * per_region < body <= (regions - 1) * per_region
    assert int(row["cores_used"]) == regions * SIDE * SIDE
    assert float(row["wafers"]) == pytest.approx(regions * SIDE * SIDE / (hw.mesh_rows * hw.mesh_cols))
    shift, concat = int(row["kv_capacity_shift"]), int(row["kv_capacity_concat"])
    per_row = shift // SIDE
    assert shift == per_row * SIDE and per_row >= 1
    assert concat == PROMPT + per_row - math.ceil(PROMPT / SIDE)
    assert int(row["decode_room_shift"]) == shift - PROMPT
    assert int(row["peak_bytes_per_core"]) <= hw.sram_bytes_per_core


class Stop(Exception):
    pass


def test_an_interrupted_bench_keeps_the_rows_it_finished(monkeypatch):
    """Stopped in its third run, the bench's CSV already holds the first two rows, whole."""
    import llm.bench as bench
    out, calls, real = _shared_dir(), [], bench._request

    def third_fails(args, model, side, *rest):
        calls.append(f"{side}x{side}")
        if len(calls) == 3:
            raise Stop
        return real(args, model, side, *rest)

    monkeypatch.setattr(bench, "_request", third_fails)
    with redirect_stdout(StringIO()), pytest.raises(Stop):
        main(["bench", "--models", "llama3-8b", "--meshes", "16,32,48", "--prompt-len", "8",
              "--new-tokens", "2", "--out", str(out)])
    MPI.COMM_WORLD.Barrier()
    rows = None
    if MPI.COMM_WORLD.rank == 0:
        with open(out / "llm_presets.csv", newline="") as f:
            rows = [(r["model"], r["mesh"]) for r in csv.DictReader(f)]
    rows = MPI.COMM_WORLD.bcast(rows)
    assert calls == ["16x16", "32x32", "48x48"]
    assert rows == [("llama3-8b", "16"), ("llama3-8b", "32")]


def test_e2e_bench_rows_are_the_generate_reports():
    """``--e2e``: one row per (input, output) pair, prefill on the larger square and decode on its
    corner, each the ``generate --json`` report of the same dry run."""
    ran = _bench_and_generate(["--e2e", "60/3,40/30", "--prefill-side", "200", "--meshes", "160",
                               "--decode-samples", "4"],
                              ["--prompt-len", "40", "--max-new-tokens", "30", "--mesh", "160x160",
                               "--prefill-mesh", "200x200", "--decode-samples", "4"])
    if ran is None:
        return
    out, report = ran
    with open(out / "llm_e2e.csv", newline="") as f:
        short, long = list(csv.DictReader(f))
    assert (short["prompt_tokens"], short["new_tokens"], short["decode_steps_simulated"]) == ("60", "3", "2")
    assert (long["prefill_mesh"], long["decode_steps"], long["decode_steps_simulated"]) == ("200x200", "29", "4")
    assert float(long["modeled_e2e_tokens_per_s"]) == pytest.approx(report["modeled_e2e_tokens_per_s"])
    assert float(long["modeled_prefill_ms"]) + float(long["modeled_decode_ms"]) < float(long["modeled_e2e_ms"])
    assert float(long["modeled_e2e_ms"]) == pytest.approx(report["modeled_e2e_seconds"] * 1e3)
