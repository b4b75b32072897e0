"""Prompts and text as Hugging Face tokenizers make them: the BOS rule, special tokens kept in
the text, EOS ids from generation_config.json, chat templates.

The tokenizer fixture (tests/data/bytes/tokenizer.json) is byte-level with no merges, so the id
of every byte is its value and the expected ids below are written straight from the text; ids
256-259 are the special tokens <|endoftext|>, <|im_start|>, <|im_end|>, <s>. The expected chat
texts are worked out by hand from each template's rules (tests/data/chat_templates.json).
"""
import json
import pathlib

import numpy as np
import pytest

from llm.chat import TemplateError, messages, render_chat
from llm.config import generation_eos_ids
from llm.errors import ModelError
from llm.tokenizer import load_tokenizer

DATA = pathlib.Path(__file__).resolve().parent / "data"
TEMPLATES = json.loads((DATA / "chat_templates.json").read_text())
END, START, STOP, BOS = 256, 257, 258, 259


def b(text: str) -> list[int]:
    return list(text.encode())


def tokenizer_dir(path: pathlib.Path, post_processor=None, **settings) -> pathlib.Path:
    """The byte fixture, with a tokenizer.json post-processor and tokenizer_config.json settings."""
    path.mkdir(parents=True, exist_ok=True)
    raw = json.loads((DATA / "bytes" / "tokenizer.json").read_text())
    raw["post_processor"] = post_processor
    (path / "tokenizer.json").write_text(json.dumps(raw))
    if settings:
        (path / "tokenizer_config.json").write_text(json.dumps(settings))
    return path


BOS_TEMPLATE = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}}


# ------------------------------------------------------------------------------ BOS rule
def test_no_bos_when_the_tokenizer_adds_none(tmp_path):
    tok = load_tokenizer(tokenizer_dir(tmp_path))        # no post-processor, no config: like SmolLM2
    assert tok.encode("Hi") == b("Hi")
    assert tok.encode("Hi", add_bos=True) == [BOS, *b("Hi")]   # --add-bos


def test_bos_from_the_post_processor(tmp_path):
    tok = load_tokenizer(tokenizer_dir(tmp_path, BOS_TEMPLATE))
    assert tok.encode("Hi") == [BOS, *b("Hi")]
    assert tok.encode("Hi", add_bos=False) == b("Hi")          # --no-add-bos


def test_add_bos_token_of_tokenizer_config_decides(tmp_path):
    on = load_tokenizer(tokenizer_dir(tmp_path / "on", None, add_bos_token=True, bos_token="<s>"))
    assert on.encode("Hi") == [BOS, *b("Hi")] and on.bos_token_id == BOS
    off = load_tokenizer(tokenizer_dir(tmp_path / "off", BOS_TEMPLATE, add_bos_token=False))
    assert off.encode("Hi") == b("Hi")
    # the BOS token named by the config, whatever config.json's bos_token_id says
    other = tokenizer_dir(tmp_path / "other", None, add_bos_token=True,
                          bos_token={"content": "<|im_start|>", "special": True})
    (other / "config.json").write_text(json.dumps({"bos_token_id": 7}))
    assert load_tokenizer(other).encode("Hi") == [START, *b("Hi")]
    both = load_tokenizer(tokenizer_dir(tmp_path / "eos", None, add_bos_token=True, add_eos_token=True,
                                        bos_token="<s>", eos_token="<|endoftext|>"))
    assert both.encode("Hi") == [BOS, *b("Hi"), END]
    assert both.encode("Hi", add_bos=False) == [*b("Hi"), END]


def test_tokenizer_config_errors_name_the_field(tmp_path):
    with pytest.raises(ModelError, match="add_bos_token must be true or false"):
        load_tokenizer(tokenizer_dir(tmp_path / "a", None, add_bos_token="yes"))
    bad = tokenizer_dir(tmp_path / "b")
    (bad / "tokenizer_config.json").write_text("{")
    with pytest.raises(ModelError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(bad)


def test_shipped_tiny_model_keeps_its_bos():
    tok = load_tokenizer(pathlib.Path(__file__).resolve().parents[1] / "llm" / "models" / "tiny")
    ids = tok.encode("The")
    assert ids[0] == tok.token_to_id("<s>") == 0 and tok.add_bos is True


# --------------------------------------------------------------------------- special tokens
def test_special_tokens_stay_in_the_text(tmp_path):
    tok = load_tokenizer(tokenizer_dir(tmp_path))
    ids = [START, *b("assistant\nHi"), STOP, *b("\n")]
    assert tok.decode(ids) == "<|im_start|>assistant\nHi<|im_end|>\n"
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nHi\n"
    stream = tok.stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)
    assert tok.encode("<|im_end|>x") == [STOP, *b("x")]     # special tokens in text are parsed


def test_eos_ids_from_generation_config(tmp_path):
    assert generation_eos_ids(tmp_path) is None
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert generation_eos_ids(tmp_path) == (2, 7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5, "bos_token_id": 1}))
    assert generation_eos_ids(tmp_path) == (5,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert generation_eos_ids(tmp_path) is None
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(ModelError, match="eos_token_id"):
        generation_eos_ids(tmp_path)


# ------------------------------------------------------------------------------ chat
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_chatml_template_with_its_default_system_message(tmp_path):
    text = render_chat(TEMPLATES["smollm2"], messages("Hi"), bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert text == (f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    text = render_chat(TEMPLATES["smollm2"], messages("Hi", "Be brief."), add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    tok = load_tokenizer(tokenizer_dir(tmp_path, BOS_TEMPLATE, chat_template=TEMPLATES["smollm2"],
                                       bos_token="<|im_start|>", eos_token="<|im_end|>"))
    prompt = tok.apply_chat_template(messages("Hi é", "Be brief."))
    # tokenized without added special tokens: the template wrote them (no BOS from the post-processor)
    ids = tok.encode(prompt, special=False)
    assert ids == [START, *b("system\nBe brief."), STOP, *b("\n"), START, *b("user\nHi é"), STOP, *b("\n"),
                   START, *b("assistant\n")]


def test_trim_and_lstrip_blocks_as_hugging_face_renders(tmp_path):
    """Newlines after block tags go (trim_blocks), indentation before them too (lstrip_blocks);
    the newline after an expression stays."""
    text = render_chat(TEMPLATES["zephyr"], messages("Hi", "Be brief."), eos_token="</s>")
    assert text == "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    indented = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert render_chat(indented, messages("a", "s")) == "[a]\n"


def test_bos_and_eos_variables_and_raise_exception():
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": " Hi "},
                    {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q"}]
    text = render_chat(TEMPLATES["llama2"], conversation, bos_token="<s>", eos_token="</s>")
    # strip() applies to the system block and the message together: the message's own space stays
    assert text == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\n Hi [/INST] Yo </s><s>[INST] Q [/INST]"
    with pytest.raises(TemplateError, match="refused the conversation: Conversation roles must alternate"):
        render_chat(TEMPLATES["llama2"], [{"role": "assistant", "content": "x"}])
    with pytest.raises(TemplateError, match="cannot render"):
        render_chat("{% for %}", [])
    # the sandbox: no way out to Python internals
    with pytest.raises(TemplateError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])
    assert render_chat("{{ messages | tojson }}", messages("é")) == '[{"role": "user", "content": "é"}]'


def test_chat_template_from_a_list_or_a_jinja_file(tmp_path):
    listed = load_tokenizer(tokenizer_dir(tmp_path / "a", None, chat_template=[
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages[0].content }}"}]))
    assert listed.apply_chat_template(messages("x")) == "Dx"
    filed = tokenizer_dir(tmp_path / "b")
    (filed / "chat_template.jinja").write_text("F{{ messages[0].content }}")
    assert load_tokenizer(filed).apply_chat_template(messages("x")) == "Fx"
    with pytest.raises(ModelError, match="no chat template"):
        load_tokenizer(tokenizer_dir(tmp_path / "c")).apply_chat_template(messages("x"))


# ------------------------------------------------------------------- through generate
def _args(*argv):
    from llm.generate import build_parser
    return build_parser().parse_args(["generate", *argv])


def test_prompt_options_follow_the_rule_and_override_it(tmp_path):
    from llm.generate import _check_options, _prompt_ids
    from llm.config import LlamaConfig
    from meshmpi import UsageError

    config = LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=260)
    tok = load_tokenizer(tokenizer_dir(tmp_path, None, chat_template=TEMPLATES["smollm2"]))
    assert _prompt_ids(_args("--prompt", "Hi"), config, tok) == b("Hi")
    assert _prompt_ids(_args("--prompt", "Hi", "--add-bos"), config, tok) == [BOS, *b("Hi")]
    with_bos = load_tokenizer(tokenizer_dir(tmp_path / "bos", BOS_TEMPLATE))
    assert _prompt_ids(_args("--prompt", "Hi", "--no-add-bos"), config, with_bos) == b("Hi")
    chat = _prompt_ids(_args("--chat", "Hi", "--system", "S"), config, tok)
    assert chat == [START, *b("system\nS"), STOP, *b("\n"), START, *b("user\nHi"), STOP, *b("\n"),
                    START, *b("assistant\n")]
    for bad, words in [(("--system", "S", "--prompt", "x"), "--system goes with --chat"),
                       (("--add-bos", "--prompt-ids", "1"), "--add-bos/--no-add-bos apply to text")]:
        with pytest.raises(UsageError, match=words):
            _check_options(_args(*bad))
    with pytest.raises(UsageError, match="no chat template"):
        _prompt_ids(_args("--chat", "Hi"), config, with_bos)


TEXT_CONFIG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=260, head_dim=8)
PROMPT = b("Hi there")


def _swap(weights, a, b_):
    """The same model with token ids a and b exchanged (embedding rows, LM head columns)."""
    weights.embed[[a, b_]] = weights.embed[[b_, a]]
    weights.lm_head[:, [a, b_]] = weights.lm_head[:, [b_, a]]


@pytest.mark.mpi
def test_generation_stops_at_a_generation_config_eos_and_keeps_it_in_the_text(mpi_tmp_path):
    from mpi4py import MPI

    from llm.checkpoint import random_weights, save_checkpoint
    from llm.config import LlamaConfig
    from llm.generate import run_generate
    from llm.reference import ReferenceModel
    from meshes import fits

    if not fits(3, 3):
        pytest.skip("mesh smaller than the rank grid")
    config = LlamaConfig(**TEXT_CONFIG, eos_token_ids=(END,))
    for seed in range(100):     # a model that generates neither EOS token by itself
        weights = random_weights(config, seed=seed)
        tokens, _ = ReferenceModel(config, weights).generate(PROMPT, 8, ignore_eos=True)
        if STOP not in tokens and END not in tokens:
            break
    # the first token that is new at its step (not at step 0) becomes <|im_end|>
    k = next(i for i in range(1, 8) if tokens[i] not in tokens[:i] + PROMPT)
    _swap(weights, tokens[k], STOP)
    path = mpi_tmp_path / "eos-model"
    if MPI.COMM_WORLD.Get_rank() == 0:
        save_checkpoint(path, config, weights)
        tokenizer_dir(path)
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [END, STOP]}))
    MPI.COMM_WORLD.Barrier()
    argv = ["--model", str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "8",
            "--mesh", "3x3", "--json", "--memory", "warn"]
    report = run_generate(_args(*argv))
    want = [STOP if t == tokens[k] else t for t in tokens]
    assert report["tokens"] == want[:k + 1] and report["new_tokens"] == k + 1
    assert report["text"].endswith("<|im_end|>")
    assert run_generate(_args(*argv, "--ignore-eos"))["tokens"] == want


@pytest.mark.mpi
def test_a_failed_check_still_writes_the_logits_and_the_trace(mpi_tmp_path, monkeypatch):
    import h5py
    from mpi4py import MPI

    from llm.generate import run_generate
    from llm.reference import ReferenceModel
    from meshes import fits
    from meshmpi import CheckError

    if not fits(4, 4):
        pytest.skip("mesh smaller than the rank grid")
    real = ReferenceModel.generate

    def off_by_one(self, *args, **kwargs):
        tokens, logits = real(self, *args, **kwargs)
        return [tokens[0], (tokens[1] + 1) % 1024, *tokens[2:]], logits

    monkeypatch.setattr(ReferenceModel, "generate", off_by_one)
    logits, trace = mpi_tmp_path / "fail.npy", mpi_tmp_path / "fail.h5"
    with pytest.raises(CheckError, match="check failed: token 1 is"):
        run_generate(_args("--model", "tiny", "--prompt-ids", "0,5,9", "--max-new-tokens", "3", "--ignore-eos",
                           "--mesh", "8x8", "--check", "--json", "--save-logits", str(logits),
                           "--trace", str(trace)))
    MPI.COMM_WORLD.Barrier()
    assert np.load(logits).shape == (3, 1024)
    with h5py.File(trace, "r") as f:
        result = json.loads(f["meta"].attrs["result_json"])
    assert result["check_failure"].startswith("check failed: token 1") and result["new_tokens"] == 3
