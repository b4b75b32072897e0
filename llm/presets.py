"""Shapes-only configs of the models in PAPER.md section 7 (no weights).

Numbers follow the public Hugging Face configs (head_dim 128, RoPE theta, RMSNorm eps) and the
paper's table (vocab). Qwen2-72B is described with LLaMA shapes only: its q/k/v biases are not
modeled, which does not change the GEMM/GEMV shapes the wafer runs.
"""
from __future__ import annotations

from .config import LlamaConfig
from .errors import ModelError

_PRESETS = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                      rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                      bos_token_id=128000, eos_token_ids=(128001,)),
    "llama2-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                       rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_ids=(2,)),
    "codellama-34b": dict(hidden_size=8192, num_hidden_layers=48, num_attention_heads=64,
                          num_key_value_heads=8, intermediate_size=22016, vocab_size=32016,
                          rope_theta=1000000.0, rms_norm_eps=1e-5, max_position_embeddings=16384,
                          bos_token_id=1, eos_token_ids=(2,)),
    "qwen2-72b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, intermediate_size=29568, vocab_size=152064,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
                      bos_token_id=151643, eos_token_ids=(151643,)),
}
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str) -> LlamaConfig:
    """The LlamaConfig of a named model (``llama3-8b``, ``llama2-13b``, ...)."""
    try:
        fields = _PRESETS[name.lower()]
    except KeyError:
        raise ModelError(f"unknown model preset {name!r}; choose one of "
                         f"{', '.join(PRESET_NAMES)}") from None
    return LlamaConfig(head_dim=128, tie_word_embeddings=False, torch_dtype="bfloat16", **fields)


__all__ = ["PRESET_NAMES", "preset"]
