"""GGUF files written with the gguf package's own writer, as llama.cpp's converter writes them
from a Hugging Face checkpoint (q/k rows permuted for llama.cpp's RoPE, written out here)."""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

from llm.checkpoint import load_checkpoint

LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w, heads):
    """Rows (h, half, i) -> (h, i, half): rows i and i + head_dim/2 of a head end up side by side."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, index, rest = hf.split(".", 3)
    return f"blk.{index}.{LAYER[rest.removesuffix('.weight')]}.weight"


def quantized(value: np.ndarray, kind: str | None):
    """(data to write, its GGML type, what a reader gets back); matrices only are quantized."""
    if kind is None or value.ndim == 1:
        return value.astype(np.float32), None, value.astype(np.float32)
    qtype = GGMLQuantizationType[kind]
    if kind == "F16":
        data = value.astype(np.float16)
        return data, None, data.astype(np.float32)
    data = quants.quantize(value.astype(np.float32), qtype)
    return data, qtype, quants.dequantize(data, qtype).astype(np.float32)


def write_gguf(path: pathlib.Path, directory: pathlib.Path, kind: str | None = None, arch: str = "llama",
               add_bos: bool | None = None) -> dict:
    """A GGUF file of the checkpoint in ``directory`` (tensors stored as ``kind``: F16, BF16,
    Q8_0, ...; default F32). Returns the Hugging Face tensors a reader should get back."""
    weights = load_checkpoint(directory)
    c = weights.config
    w = GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    tokenizer = directory / "tokenizer.json"
    if tokenizer.is_file():
        raw = json.loads(tokenizer.read_text())
        vocab = dict(raw["model"]["vocab"])
        special = {t["content"] for t in raw["added_tokens"] if t["special"]}
        vocab.update({t["content"]: t["id"] for t in raw["added_tokens"]})
        tokens = sorted(vocab, key=vocab.get)
        assert [vocab[t] for t in tokens] == list(range(len(tokens)))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]])
        w.add_token_types([3 if t in special else 1 for t in tokens])
    if c.bos_token_id is not None:
        w.add_bos_token_id(c.bos_token_id)
    if c.eos_token_ids:
        w.add_eos_token_id(c.eos_token_ids[0])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    expected = {}
    for name, value in weights.to_hf().items():
        value = np.asarray(value, np.float32)
        if name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, c.num_key_value_heads)
        data, qtype, back = quantized(value, kind if kind != "F16" or value.ndim > 1 else None)
        w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
        expected[name] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for name, value in list(expected.items()):      # what the reader must return: HF row order
        heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads if "k_proj" in name else 0
        if heads:
            expected[name] = value.reshape(heads, -1, 2, value.shape[1]).swapaxes(1, 2).reshape(value.shape)
    return expected
