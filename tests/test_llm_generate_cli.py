"""The generate command end to end (serial: it starts its own process)."""
import json
import os
import subprocess
import sys

from llm.checkpoint import random_weights, save_checkpoint
from llm.config import LlamaConfig
from llm.prefill import PrefillLayout, prefill_flops, real_flops
from llm.reference import ReferenceModel

from test_llm_decode import CONFIGS


def test_generate_check_end_to_end(tmp_path_factory):
    """The generate command with --check (reference alongside) on a saved HF-style checkpoint."""
    config = LlamaConfig(**CONFIGS["gqa"], eos_token_ids=(1,))
    path = tmp_path_factory.mktemp("model")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "MPI_", "HYDRA_"))}
    save_checkpoint(path, config, random_weights(config, seed=3))
    out = subprocess.run([sys.executable, "-m", "llm", "generate", "--model", str(path), "--prompt-ids",
                          "3,5,7,11,2", "--max-new-tokens", "5", "--ignore-eos", "--mesh", "3x4",
                          "--check", "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    tokens, _ = ReferenceModel(config, random_weights(config, seed=3)).generate(
        [3, 5, 7, 11, 2], 5, ignore_eos=True)
    assert report["tokens"] == tokens
    assert report["modeled_decode_tokens_per_s"] > 0 and report["regions"] == 1
    # the prefill's FLOPs: the unpadded model's for its layers, and what the 3x3 prefill square charged
    assert report["prefill_flops_real"] == prefill_flops(real_flops(config, 5), config.num_hidden_layers)
    charged = PrefillLayout(config, 3, 5).charged_flops()
    assert report["prefill_flops_charged"] == prefill_flops(charged, config.num_hidden_layers)


def test_tiny_model_too_big_for_one_region_runs_as_a_pipeline_of_regions():
    """1M parameters at fp16 do not fit 16 cores of 48 KB: layers are split over regions,
    and the tokens still match the reference (--check)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "MPI_", "HYDRA_"))}
    out = subprocess.run([sys.executable, "-m", "llm", "generate", "--model", "tiny", "--prompt", "The meaning of",
                          "--max-new-tokens", "4", "--mesh", "4x4", "--check", "--json"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["regions"] * report["layers_per_region"] >= 4 and report["regions"] > 1
    assert report["peak_bytes_per_core"] <= 49152


def test_text_output_is_the_prompt_then_the_continuation_once():
    """Without --json the prompt is echoed and the new text follows it once (as the tokenizer
    decodes prompt and new tokens together), before the report; the tokens are those of --json."""
    from llm.checkpoint import resolve_model_dir
    from llm.tokenizer import load_tokenizer
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "MPI_", "HYDRA_"))}
    argv = [sys.executable, "-m", "llm", "generate", "--model", "tiny", "--prompt", "The meaning of",
            "--max-new-tokens", "5", "--mesh", "8x8"]
    runs = [subprocess.run(argv + extra, capture_output=True, text=True, timeout=120, env=env)
            for extra in (["--json"], [])]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    report = json.loads(runs[0].stdout)
    tokenizer = load_tokenizer(resolve_model_dir("tiny"))
    ids = tokenizer.encode("The meaning of")
    whole = tokenizer.decode(ids + report["tokens"])
    prompt = tokenizer.decode(ids)              # special tokens kept, as the model's tokenizer decodes
    assert prompt.endswith("The meaning of") and whole.startswith(prompt) and len(whole) > len(prompt)
    text = runs[1].stdout
    assert text.startswith(whole + "\n"), text
    assert text.count(whole[len(prompt):]) == 1 and "text:" not in text
    assert text.splitlines()[1].startswith("tiny on 8x8")
    flops = next(line for line in text.splitlines() if line.strip().startswith("prefill FLOPs"))
    assert f"{report['prefill_flops_charged']:,} charged, {report['prefill_flops_real']:,} real" in flops


def test_no_progress_bar_over_text_streamed_to_the_terminal(monkeypatch):
    from types import SimpleNamespace
    from llm import generate
    mesh = SimpleNamespace(rank=0)
    for stdout_tty, streaming, quiet, bar in ((True, True, False, False), (True, False, False, True),
                                              (False, True, False, True), (False, True, True, False)):
        args = SimpleNamespace(json=False, max_new_tokens=3, quiet=quiet)
        monkeypatch.setattr(sys.stdout, "isatty", lambda: stdout_tty, raising=False)
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
        progress = generate._progress(args, mesh, streaming=streaming)
        assert (progress is not None) == bar, (stdout_tty, streaming, quiet)
        if progress is not None:
            progress.close()
