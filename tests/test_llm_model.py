"""Model side of llm/: config parsing, checkpoint loading, tokenizer, numpy reference model.

Expected values come from independent sources: hand-written HF configs, arrays written straight
to safetensors files, closed forms, and logits recorded from the torch model that trained the
shipped tiny model (llm/train_tiny.py).
"""
import json
import math
import pathlib
import re
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from llm.checkpoint import load_checkpoint, random_weights, save_checkpoint
from llm.config import LlamaConfig
from llm.errors import ModelError
from llm.presets import PRESET_NAMES, preset
from llm.reference import ReferenceModel, apply_rope, rms_norm, rope_cos_sin, rope_inv_freq
from llm.tokenizer import load_tokenizer

LLM_DIR = pathlib.Path(__file__).resolve().parents[1] / "llm"
TINY_DIR = LLM_DIR / "models" / "tiny"

SMALL = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=16,
             intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=40, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def small_tensors(cfg: dict, seed: int = 0) -> dict:
    """HF-named float32 arrays in [out, in] layout, shapes written out by hand."""
    rng = np.random.default_rng(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    return {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in shapes.items()}


def write_model(directory: pathlib.Path, cfg: dict, tensors: dict) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def write_bf16(path: pathlib.Path, tensors: dict) -> None:
    """safetensors file with BF16 data: the upper 16 bits of each float32."""
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        blob = (value.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def assert_matches_hf(weights, tensors: dict, **tol) -> None:
    """Loaded weights equal the HF arrays, projections transposed to [in, out]."""
    np.testing.assert_allclose(weights.embed, tensors["model.embed_tokens.weight"], **tol)
    np.testing.assert_allclose(weights.lm_head, tensors["lm_head.weight"].T, **tol)
    np.testing.assert_allclose(weights.norm, tensors["model.norm.weight"], **tol)
    layer = weights.layers[1]
    for field, name in [("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                        ("v_proj", "self_attn.v_proj"), ("o_proj", "self_attn.o_proj"),
                        ("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"),
                        ("down_proj", "mlp.down_proj")]:
        np.testing.assert_allclose(getattr(layer, field), tensors[f"model.layers.1.{name}.weight"].T, **tol)
    np.testing.assert_allclose(layer.post_attention_layernorm,
                               tensors["model.layers.1.post_attention_layernorm.weight"], **tol)


# --------------------------------------------------------------------------------- config
def test_config_top_level_rope_theta_with_llama31_scaling():
    raw = dict(SMALL, rope_theta=500000.0, rope_scaling=dict(LLAMA31_SCALING),
               eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16")
    c = LlamaConfig.from_dict(raw)
    assert c.rope_theta == 500000.0
    assert (c.rope_scaling.factor, c.rope_scaling.low_freq_factor, c.rope_scaling.high_freq_factor,
            c.rope_scaling.original_max_position_embeddings) == (8.0, 1.0, 4.0, 8192)
    assert c.eos_token_ids == (128001, 128008, 128009)
    assert c.torch_dtype == "bfloat16"
    # the older spelling "type" instead of "rope_type"
    old = dict(LLAMA31_SCALING, type="llama3")
    del old["rope_type"]
    assert LlamaConfig.from_dict(dict(SMALL, rope_scaling=old)).rope_scaling.factor == 8.0


def test_config_rope_parameters_style():
    raw = dict(SMALL, rope_parameters={"rope_theta": 123456.0, "rope_type": "default"})
    del raw["rope_theta"]
    c = LlamaConfig.from_dict(raw)
    assert c.rope_theta == 123456.0 and c.rope_scaling is None
    raw["rope_parameters"] = dict(LLAMA31_SCALING, rope_theta=500000.0, factor=32.0)
    c = LlamaConfig.from_dict(raw)
    assert c.rope_theta == 500000.0 and c.rope_scaling.factor == 32.0


def test_config_head_dim_gqa_and_ties():
    c = LlamaConfig.from_dict(SMALL)
    assert (c.head_dim, c.num_key_value_heads, c.kv_group_size, c.tie_word_embeddings) == (4, 2, 2, False)
    assert (c.q_dim, c.kv_dim, c.eos_token_ids) == (16, 8, (2,))
    raw = dict(SMALL, head_dim=8, tie_word_embeddings=True)
    del raw["num_key_value_heads"]
    c = LlamaConfig.from_dict(raw)
    assert (c.head_dim, c.num_key_value_heads, c.kv_group_size, c.q_dim) == (8, 4, 1, 32)
    assert c.tie_word_embeddings


@pytest.mark.parametrize("change, words", [
    ({"model_type": "mistral"}, ["model_type", "mistral"]),
    ({"architectures": ["GPT2LMHeadModel"]}, ["architectures", "GPT2LMHeadModel"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope_type", "yarn"]),
    ({"num_key_value_heads": 3}, ["num_key_value_heads", "3"]),
    ({"attention_bias": True}, ["attention_bias"]),
    ({"hidden_size": None}, ["hidden_size"]),
])
def test_config_rejects_unsupported(change, words):
    raw = {k: v for k, v in dict(SMALL, **change).items() if v is not None}
    with pytest.raises(ModelError) as err:
        LlamaConfig.from_dict(raw)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_presets_match_paper_table():
    table = {"llama3-8b": (4096, 32, 32, 8, 14336, 128256, 500000.0, 1e-5),
             "llama2-13b": (5120, 40, 40, 40, 13824, 32000, 10000.0, 1e-5),
             "codellama-34b": (8192, 48, 64, 8, 22016, 32016, 1000000.0, 1e-5),
             "qwen2-72b": (8192, 80, 64, 8, 29568, 152064, 1000000.0, 1e-6)}
    assert set(PRESET_NAMES) == set(table)
    for name, row in table.items():
        c = preset(name)
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                c.intermediate_size, c.vocab_size, c.rope_theta, c.rms_norm_eps) == row
        assert c.head_dim == 128
    assert round(preset("llama3-8b").num_parameters() / 1e9, 2) == 8.03   # the public "8B" count
    with pytest.raises(ModelError, match="llama3-8b"):
        preset("gpt-5")


# ----------------------------------------------------------------------------- checkpoint
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_load_each_dtype(tmp_path, dtype):
    tensors = small_tensors(SMALL)
    if dtype == "bfloat16":
        # keep only bf16-representable values so the expectation is exact
        tensors = {n: (t.view(np.uint32) & 0xFFFF0000).view(np.float32) for n, t in tensors.items()}
        write_model(tmp_path, SMALL, {})
        write_bf16(tmp_path / "model.safetensors", tensors)
    else:
        tensors = {n: t.astype(dtype) for n, t in tensors.items()}
        write_model(tmp_path, SMALL, tensors)
    weights = load_checkpoint(tmp_path)
    assert weights.embed.dtype == np.float32 and weights.layers[0].q_proj.shape == (16, 16)
    assert weights.layers[0].k_proj.shape == (16, 8) and weights.layers[0].down_proj.shape == (24, 16)
    assert_matches_hf(weights, {n: t.astype(np.float32) for n, t in tensors.items()}, rtol=0, atol=0)
    assert load_checkpoint(tmp_path, dtype=np.float64).layers[1].up_proj.dtype == np.float64


def test_save_checkpoint_round_trip(tmp_path):
    config = LlamaConfig.from_dict(SMALL)
    weights = random_weights(config, seed=3)
    again = load_checkpoint(save_checkpoint(tmp_path / "f32", config, weights))
    assert again.config == config
    assert_matches_hf(again, {n: np.asarray(t) for n, t in weights.to_hf().items()}, rtol=0, atol=0)
    half = load_checkpoint(save_checkpoint(tmp_path / "bf16", config, weights, dtype="bfloat16"))
    assert half.config.torch_dtype == "bfloat16"
    # bfloat16 = the top 16 bits of a float32; saving rounds to the nearer of the two neighbours
    exact = weights.layers[0].q_proj.ravel()
    down = (exact.view(np.uint32) & 0xFFFF0000).view(np.float32)
    up = ((exact.view(np.uint32) & 0xFFFF0000) + 0x10000).view(np.float32)
    nearer = np.where(np.abs(exact - down) <= np.abs(up - exact), down, up)
    np.testing.assert_array_equal(half.layers[0].q_proj.ravel(), nearer)
    assert np.any(nearer == up) and np.any(nearer != exact)
    np.testing.assert_array_equal(random_weights(config, seed=3).embed, weights.embed)


def test_tied_embeddings_use_embed_as_lm_head(tmp_path):
    cfg = dict(SMALL, tie_word_embeddings=True)
    tensors = small_tensors(cfg)
    del tensors["lm_head.weight"]
    weights = load_checkpoint(write_model(tmp_path, cfg, tensors))
    np.testing.assert_array_equal(weights.lm_head, tensors["model.embed_tokens.weight"].T)


def test_sharded_index(tmp_path):
    tensors = small_tensors(SMALL, seed=5)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    write_model(tmp_path, SMALL, {})
    (tmp_path / "model.safetensors").unlink()
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_matches_hf(load_checkpoint(tmp_path), tensors, rtol=0, atol=0)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="model-00002-of-00002.safetensors"):
        load_checkpoint(tmp_path)


def _broken(tmp_path, name):
    tensors = small_tensors(SMALL)
    if name == "missing tensor":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif name == "wrong shape":
        tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 16), np.float32)
    elif name == "bad dtype":
        tensors["model.norm.weight"] = np.zeros(16, np.int8)
    cfg = dict(SMALL, architectures=["MistralForCausalLM"]) if name == "bad architecture" else SMALL
    write_model(tmp_path, cfg, tensors)
    if name == "missing weights file":
        (tmp_path / "model.safetensors").unlink()
    if name == "missing config":
        (tmp_path / "config.json").unlink()
    return tmp_path


@pytest.mark.parametrize("case, pattern", [
    ("missing tensor", r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight.*\[24, 16\]"),
    ("wrong shape", r"model\.layers\.0\.self_attn\.k_proj\.weight.*expected shape \[8, 16\], found \[16, 16\]"),
    ("bad dtype", r"model\.norm\.weight.*dtype I8"),
    ("bad architecture", r"MistralForCausalLM"),
    ("missing weights file", r"missing file .*model\.safetensors"),
    ("missing config", r"missing file .*config\.json"),
])
def test_loader_errors_name_the_problem(tmp_path, case, pattern):
    with pytest.raises(ModelError) as err:
        load_checkpoint(_broken(tmp_path, case))
    assert re.search(pattern, str(err.value)), str(err.value)


def test_untied_without_lm_head_is_an_error(tmp_path):
    tensors = small_tensors(SMALL)
    del tensors["lm_head.weight"]
    with pytest.raises(ModelError, match="lm_head.weight"):
        load_checkpoint(write_model(tmp_path, SMALL, tensors))


# ------------------------------------------------------------------------ reference model
def test_rms_norm_and_rope_closed_forms():
    np.testing.assert_allclose(rms_norm(np.array([3.0, 4.0]), np.array([1.0, 2.0]), 0.0),
                               [3 / math.sqrt(12.5), 8 / math.sqrt(12.5)])
    c = LlamaConfig.from_dict(dict(SMALL, head_dim=8))
    np.testing.assert_allclose(rope_inv_freq(c), [10000.0 ** (-i / 8) for i in (0, 2, 4, 6)])
    # rotating q by position m and k by n leaves q.k depending only on m - n
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal(8), rng.standard_normal(8)
    dots = []
    for m, n in [(5, 2), (13, 10), (103, 100)]:
        cos, sin = rope_cos_sin(c, np.array([m, n]), np.float64)
        dots.append(apply_rope(q, cos[0], sin[0]) @ apply_rope(k, cos[1], sin[1]))
    np.testing.assert_allclose(dots, dots[0], rtol=1e-12)
    # position 1, first pair: (x0, x4) rotated by angle 1 rad
    cos, sin = rope_cos_sin(c, np.array([1]), np.float64)
    out = apply_rope(np.eye(8)[0], cos[0], sin[0])
    np.testing.assert_allclose([out[0], out[4]], [math.cos(1), math.sin(1)], atol=1e-15)


def test_llama3_rope_scaling_piecewise():
    c = LlamaConfig.from_dict(dict(SMALL, hidden_size=512, num_attention_heads=4, head_dim=128,
                                   rope_theta=500000.0, rope_scaling=LLAMA31_SCALING))
    s = LLAMA31_SCALING
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    expected = []
    for i in range(0, 128, 2):
        f = 500000.0 ** (-i / 128)
        wavelen = 2 * math.pi / f
        if wavelen < high_wl:
            expected.append(f)
        elif wavelen > low_wl:
            expected.append(f / s["factor"])
        else:
            t = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            expected.append((1 - t) * f / s["factor"] + t * f)
    got = rope_inv_freq(c)
    np.testing.assert_allclose(got, expected, rtol=1e-13)
    assert got[0] == 1.0 and got[-1] < 500000.0 ** (-126 / 128) / 7.9   # both ends really differ


@pytest.fixture(scope="module")
def tiny_oracle():
    return np.load(TINY_DIR / "reference_logits.npz")


def test_reference_matches_torch_on_shipped_tiny_model(tiny_oracle):
    weights = load_checkpoint("tiny")
    c = weights.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.intermediate_size, c.tie_word_embeddings) == (128, 4, 4, 2, 32, 384, False)
    model = ReferenceModel(c, weights)
    prompt = tiny_oracle["prompt_ids"]
    np.testing.assert_allclose(model.prefill(prompt), tiny_oracle["prefill_logits"], atol=1e-4, rtol=0)
    n = len(tiny_oracle["generate_tokens"])
    tokens, logits = model.generate(prompt, n, ignore_eos=True)
    assert tokens == tiny_oracle["generate_tokens"].tolist()
    np.testing.assert_allclose(logits, tiny_oracle["generate_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_prefill_equals_token_by_token_decode(tied):
    config = LlamaConfig.from_dict(dict(SMALL, num_attention_heads=6, num_key_value_heads=2,
                                        hidden_size=24, head_dim=6, tie_word_embeddings=tied))
    model = ReferenceModel(config, random_weights(config, seed=11), dtype=np.float64)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, 9)
    full = model.prefill(ids)
    assert model.position == 9
    steps = [model.prefill(ids[:1])[0]] + [model.decode(t) for t in ids[1:]]
    np.testing.assert_allclose(np.stack(steps), full, rtol=1e-10, atol=1e-10)
    # a causal model: the first rows of a longer prompt do not change
    np.testing.assert_allclose(model.prefill(ids[:4]), full[:4], rtol=1e-10, atol=1e-10)


def test_generate_stops_at_eos_unless_ignored():
    config = LlamaConfig.from_dict(SMALL)
    model = ReferenceModel(config, random_weights(config, seed=2))
    tokens, logits = model.generate([1, 5, 7], 6, ignore_eos=True)
    assert len(tokens) == 6 and logits.shape == (6, 40)
    assert tokens == [int(np.argmax(row)) for row in logits]
    stop = model.generate([1, 5, 7], 6, eos=tokens[2])[0]
    assert stop == tokens[:tokens.index(tokens[2]) + 1]


# ------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trip_and_streaming(tmp_path):
    tok = load_tokenizer(TINY_DIR)
    text = "The meaning of life is 42; naïve café — 日本語 ✓\n\tindented"
    ids = tok.encode(text)
    assert ids[0] == tok.token_to_id("<s>") and len(ids) < len(text.encode())
    assert tok.decode(ids) == "<s>" + text and tok.decode(ids, skip_special_tokens=True) == text
    assert tok.encode(text, add_bos=False) == ids[1:]
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids[1:]]
    assert "".join(pieces) + stream.flush() == text
    assert load_tokenizer(tmp_path) is None


def test_llm_imports_neither_mpi4py_nor_torch_at_run_time():
    for path in LLM_DIR.glob("*.py"):
        if path.name == "train_tiny.py":
            continue
        assert not re.search(r"^\s*(import|from)\s+(mpi4py|torch)\b", path.read_text(), re.M), path
