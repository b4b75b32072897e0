"""End-to-end time of a request: prefill + re-layout + first LM head + every decode step, with the
decode steps of a long dry run sampled over the context and integrated (llm/e2e.py)."""
import numpy as np
import pytest

from llm import e2e
from llm.generate import build_parser, run_generate
from meshes import fits

pytestmark = pytest.mark.mpi


def generate(*extra):
    return run_generate(build_parser().parse_args(["generate", "--model", "tiny", *extra]))


def test_sampled_positions_include_both_ends_and_integrate_a_line_exactly():
    assert e2e.sample_positions(10, 14, 8) == [10, 11, 12, 13, 14]
    assert e2e.sample_positions(10, 9, 8) == []
    positions = e2e.sample_positions(100, 1099, 7)
    assert positions[0] == 100 and positions[-1] == 1099 and len(positions) == 7
    line = [3.0 * p + 11.0 for p in positions]
    assert e2e.integrate(positions, line, 100, 1099) == pytest.approx(sum(3.0 * p + 11.0 for p in range(100, 1100)))
    steps = list(range(5, 9))
    assert e2e.integrate(steps, [1.0, 2.0, 4.0, 8.0], 5, 8) == 15.0


@pytest.mark.parametrize("mesh,kv", [("4x4", "shift"), ("4x5", "concat")])
def test_sampled_decode_is_within_half_a_percent_of_every_step(mesh, kv):
    """The staircase of a growing cache against its linear interpolation from 8 samples."""
    rows, cols = map(int, mesh.split("x"))
    if not fits(rows, cols):
        pytest.skip("mesh smaller than the rank grid")
    common = ["--dry-run", "--prompt-len", "5", "--max-new-tokens", "60", "--mesh", mesh, "--kv", kv]
    full = generate(*common, "--decode-samples", "100")
    sampled = generate(*common, "--decode-samples", "8")
    assert full["decode_integration"] == {"steps": 59, "simulated_steps": 59, "method": "every step simulated",
                                          "positions": None}
    assert sampled["decode_integration"]["simulated_steps"] == 8
    assert sampled["modeled_decode_cycles"] == pytest.approx(full["modeled_decode_cycles"], rel=5e-3)
    # everything before decode is the same run
    for key in ("modeled_prefill_cycles", "modeled_relayout_cycles", "modeled_first_token_head_cycles"):
        assert sampled[key] == full[key]


def test_end_to_end_adds_prefill_relayout_first_head_and_decode():
    """A numeric run simulates every step: the e2e time is the sum of the parts, tokens/s the new
    tokens over it, and the decode's per-token figure the mean step."""
    if not fits(4, 4):
        pytest.skip("mesh smaller than the rank grid")
    r = generate("--prompt", "The meaning of", "--max-new-tokens", "6", "--mesh", "4x4", "--ignore-eos")
    clock = 1.1e9
    parts = (r["modeled_prefill_cycles"] + r["modeled_relayout_cycles"] + r["modeled_first_token_head_cycles"]
             + r["modeled_decode_cycles"])
    assert r["modeled_e2e_seconds"] == pytest.approx(parts / clock)
    assert r["modeled_e2e_tokens_per_s"] == pytest.approx(6 / r["modeled_e2e_seconds"])
    assert r["modeled_decode_cycles_per_token"] == pytest.approx(r["modeled_decode_cycles"] / 5)
    assert r["decode_integration"]["steps"] == 5 and r["decode_integration"]["simulated_steps"] == 5
    assert 0 < r["e2e_prefill_share"] < 1
    parts = r["decode_step_parts"]    # the last step's
    assert set(parts) == {"kv_shift", "layers", "hand_offs", "lm_head"} and parts["layers"] > 0
    assert parts["kv_shift"] >= 0 and (parts["hand_offs"] > 0) == (r["regions"] > 1)
    assert np.isfinite(r["modeled_first_token_head_cycles"]) and r["modeled_first_token_head_cycles"] > 0


def test_a_prefill_square_larger_than_the_decode_region_matches_the_reference():
    """PAPER.md §7 prefills on a larger square than it decodes on: the decode region is the
    square's corner, the cache moves there on the square's fabric, and the tokens still equal
    the numpy reference's (``--check``)."""
    if not fits(6, 6):
        pytest.skip("mesh smaller than the rank grid")
    r = generate("--prompt", "The meaning of", "--max-new-tokens", "4", "--mesh", "4x5", "--prefill-mesh", "6x6",
                 "--check", "--ignore-eos")
    assert r["prefill_mesh"] == "6x6" and r["mesh"] == "4x5"
    assert r["modeled_relayout_cycles"] > 0 and r["new_tokens"] == 4
