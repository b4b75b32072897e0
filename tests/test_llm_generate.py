"""Prefill then decode, through the generate command's own code path, against the numpy reference.

Every prompt length from 1 to 2 * rows + 1 (and those around the prefill square's side), on
square and non-square, odd and even meshes, with both KV cache policies: the tokens must equal
the reference's and the logits agree within 1e-4 (``--check``; the reference itself is
checked against torch in test_llm_model.py). Short prompts leave rows of the decode region's
KV cache empty for the first decode steps: that is where a cache that fills in the wrong
place goes wrong.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from mpi4py import MPI

from llm.checkpoint import random_weights, save_checkpoint
from llm.config import LlamaConfig
from llm.generate import build_parser, run_generate
from llm.reference import ReferenceModel
from meshes import fits
from test_llm_decode import closed_form_payloads
from meshmpi import CheckError, UsageError

pytestmark = pytest.mark.mpi

CONFIG = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=50, head_dim=8)
NEW_TOKENS = 4
MESHES = [(3, 3), (4, 4), (4, 3), (2, 5)]


def prompt_lengths(rows: int, cols: int) -> list[int]:
    side = min(rows, cols)                      # the default prefill square
    return sorted(set(range(1, 2 * rows + 2)) | {side - 1, side, side + 1} - {0})


def shared_checkpoint(mpi_tmp_path, config, seed, mutate=None):
    """A checkpoint written by rank 0 into a directory every rank sees."""
    path = mpi_tmp_path / f"model-{seed}-{mutate.__name__ if mutate else 'clean'}"
    if MPI.COMM_WORLD.Get_rank() == 0:
        weights = random_weights(config, seed=seed)
        if mutate is not None:
            mutate(weights)
        save_checkpoint(path, config, weights)
    MPI.COMM_WORLD.Barrier()
    return path


def generate(model, ids, mesh, *extra):
    args = build_parser().parse_args(
        ["generate", "--model", str(model), "--prompt-ids", ",".join(map(str, ids)),
         "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos", "--mesh", mesh, "--json", *extra])
    return run_generate(args)


@pytest.mark.parametrize("policy", ["shift", "concat"])
@pytest.mark.parametrize("rows,cols", MESHES)
def test_every_prompt_length_decodes_the_reference_tokens(mpi_tmp_path, rows, cols, policy):
    if not fits(min(rows, cols), min(rows, cols)):
        pytest.skip("prefill square smaller than the rank grid")
    model = shared_checkpoint(mpi_tmp_path, CONFIG, seed=3)
    weights = random_weights(CONFIG, seed=3)
    rng = np.random.default_rng(rows * 10 + cols)
    for length in prompt_lengths(rows, cols):
        ids = [int(i) for i in rng.integers(0, CONFIG.vocab_size, length)]
        report = generate(model, ids, f"{rows}x{cols}", "--kv", policy, "--check", "--memory", "warn")
        want, _ = ReferenceModel(CONFIG, weights).generate(ids, NEW_TOKENS, ignore_eos=True)
        assert report["tokens"] == want, f"prompt of {length} tokens"
        counts = report["kv_tokens_per_row"]
        assert sum(counts) == length + NEW_TOKENS - 1
        if policy == "shift":     # balanced, the older tokens on the upper rows
            assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)
        # the last step's reductions: its scores cover the fullest row's tokens
        assert report["decode_reduction_payloads"] == closed_form_payloads(CONFIG, rows, cols, max(counts))


def _nan_in_a_projection(weights):
    weights.layers[0].q_proj[0, 0] = np.nan


def _huge_queries_and_keys(weights):
    for layer in weights.layers:           # finite, but q.k overflows float32: inf - inf in softmax
        layer.q_proj *= np.float32(1e20)
        layer.k_proj *= np.float32(1e20)


def test_a_checkpoint_holding_nan_is_refused_before_the_run(mpi_tmp_path):
    if not fits(3, 3):
        pytest.skip("mesh smaller than the rank grid")
    model = shared_checkpoint(mpi_tmp_path, CONFIG, seed=5, mutate=_nan_in_a_projection)
    with pytest.raises(UsageError, match=r"q_proj.*1 NaN or infinite"):
        generate(model, [3, 5, 7], "3x3", "--memory", "warn")


def test_non_finite_logits_fail_the_run_with_and_without_check(mpi_tmp_path):
    """Overflow on the mesh is never a token: the run fails, whether or not --check is given."""
    if not fits(3, 3):
        pytest.skip("mesh smaller than the rank grid")
    model = shared_checkpoint(mpi_tmp_path, CONFIG, seed=5, mutate=_huge_queries_and_keys)
    for extra in (("--check",), ()):
        with np.errstate(all="ignore"), pytest.raises(CheckError, match="non-finite"):
            generate(model, [3, 5, 7], "3x3", "--memory", "warn", *extra)


@pytest.mark.parametrize("mesh,prompt", [("8x8", ["--prompt-ids", "5"]), ("8x8", ["--prompt-ids", "5,6"]),
                                         ("8x8", ["--prompt-ids", "5,6,7"]), ("4x4", ["--prompt", "The"]),
                                         ("5x5", ["--prompt", "The"]), ("4x8", ["--prompt", "The"])])
def test_shipped_model_short_prompts_match_the_reference(mesh, prompt):
    """The cases first seen to decode wrong tokens, on the built-in trained model."""
    args = build_parser().parse_args(["generate", "--model", "tiny", *prompt, "--max-new-tokens", "6",
                                      "--ignore-eos", "--mesh", mesh, "--check", "--json"])
    report = run_generate(args)
    assert report["new_tokens"] == 6 and report["checked"]


def test_trace_tells_prefill_relayout_and_decode_with_names_that_do_not_depend_on_the_prompt(mpi_tmp_path):
    """The generate trace holds the prefill region's phases, the re-layout and one ``decode``
    phase per token, one after the other, and their times are those of the JSON result; two
    prompts of different lengths give the same phase names (positions are labels)."""
    from meshmpi.trace import read_trace
    model = shared_checkpoint(mpi_tmp_path, CONFIG, seed=3)
    traces, reports = [], []
    for ids in ([1, 2], [4, 5, 6, 7, 8]):
        path = mpi_tmp_path / f"generate-{len(ids)}.h5"
        reports.append(generate(model, ids, "4x4", "--trace", str(path)))
        traces.append(read_trace(path))
    for trace, report, prompt in zip(traces, reports, (2, 5)):
        top = [p for p in trace["phases"] if p["depth"] == 0]
        assert [p["name"] for p in top] == ["prefill", "relayout"] + ["decode"] * NEW_TOKENS
        # the first token's logits read the prompt's last position, each decode step the one after
        assert [p["label"] for p in top[2:]] == [f"position {prompt - 1 + i}" for i in range(NEW_TOKENS)]
        prefill, relayout, decode = top[0], top[1], top[2:]
        assert prefill["start_cycles"] == 0
        assert prefill["end_cycles"] == pytest.approx(report["modeled_prefill_cycles"])
        assert relayout["start_cycles"] == prefill["end_cycles"]
        assert relayout["end_cycles"] - relayout["start_cycles"] == pytest.approx(report["modeled_relayout_cycles"])
        assert decode[0]["start_cycles"] == pytest.approx(relayout["end_cycles"])
        steps = [b["end_cycles"] - b["start_cycles"] for b in decode[1:]]
        assert np.mean(steps) == pytest.approx(report["modeled_decode_cycles_per_token"])
        assert trace["meta"]["modeled_cycles"] == pytest.approx(decode[-1]["end_cycles"])
        names = {p["name"] for p in trace["phases"]}
        assert {f"prefill.layer{i}" for i in range(CONFIG.num_hidden_layers)} <= names
        assert {f"decode.layer{i}" for i in range(CONFIG.num_hidden_layers)} <= names
        # no position in any name; every name begins with its top-level phase's and its layer's
        for p in trace["phases"]:
            assert not re.search(r"pos(ition)?\d", p["name"]), p["name"]
            ancestor = p
            while ancestor["parent"] >= 0:
                ancestor = trace["phases"][ancestor["parent"]]
                if ancestor["depth"] == 0 or ancestor["name"].split(".")[-1].startswith("layer"):
                    assert p["name"].startswith(ancestor["name"] + "."), (p["name"], ancestor["name"])
    assert [p["name"] for p in traces[0]["phases"]] == [p["name"] for p in traces[1]["phases"]]
