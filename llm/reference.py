"""Single-process numpy LLaMA: the oracle the wafer runs are checked against.

One forward pass per call, in the order of PAPER.md section 4 (prefill) and section 5 (decode):
RMSNorm, q/k/v projections, RoPE (Hugging Face ``rotate_half`` convention), causal grouped-query
attention over a KV cache, output projection and residual, RMSNorm, SiLU-gated feed-forward,
residual; then the final norm and the LM head.
"""
from __future__ import annotations

import math

import numpy as np

from .checkpoint import LlamaWeights
from .config import LlamaConfig


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """theta^(-2i/d) for i < d/2, with LLaMA-3.1 scaling applied when configured (float64)."""
    d = config.head_dim
    inv_freq = config.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, the band between blended.
    wavelen = 2 * math.pi / inv_freq
    old = s.original_max_position_embeddings
    smooth = np.clip((old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor), 0.0, 1.0)
    return (1 - smooth) * inv_freq / s.factor + smooth * inv_freq


def rope_cos_sin(config: LlamaConfig, positions: np.ndarray, dtype=np.float32):
    """cos, sin of shape [len(positions), head_dim] (each frequency used for both halves)."""
    angles = np.outer(np.asarray(positions, dtype=np.float64), rope_inv_freq(config))
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [..., T, head_dim] rotated: x*cos + rotate_half(x)*sin."""
    return x * cos + rotate_half(x) * sin


class ReferenceModel:
    """Greedy LLaMA inference with a KV cache, computing in ``dtype``."""

    def __init__(self, config: LlamaConfig, weights: LlamaWeights, dtype=np.float32):
        self.config, self.dtype = config, np.dtype(dtype)
        cast = lambda a: np.asarray(a, dtype=self.dtype)  # noqa: E731
        self.embed, self.norm, self.lm_head = cast(weights.embed), cast(weights.norm), cast(weights.lm_head)
        self.layers = [{k: cast(v) for k, v in vars(layer).items()} for layer in weights.layers]
        self.reset()

    def reset(self) -> None:
        """Empty the KV cache: per layer [kv_heads, tokens, head_dim] for K and for V."""
        shape = (self.config.num_key_value_heads, 0, self.config.head_dim)
        self.k_cache = [np.zeros(shape, self.dtype) for _ in self.layers]
        self.v_cache = [np.zeros(shape, self.dtype) for _ in self.layers]

    @property
    def position(self) -> int:
        """Number of tokens in the KV cache (the position of the next token)."""
        return self.k_cache[0].shape[1]

    def prefill(self, token_ids) -> np.ndarray:
        """Reset, run the prompt, fill the KV cache; logits [T, vocab]."""
        self.reset()
        return self.forward(token_ids)

    def decode(self, token_id: int) -> np.ndarray:
        """One more token after the cached ones; logits [vocab]."""
        return self.forward([token_id])[0]

    def forward(self, token_ids) -> np.ndarray:
        """Append tokens to the cache; logits [T, vocab] for the new tokens."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be non-empty and in [0, {self.config.vocab_size})")
        c, start = self.config, self.position
        cos, sin = rope_cos_sin(c, np.arange(start, start + ids.size), self.dtype)
        x = self.embed[ids]
        for i, w in enumerate(self.layers):
            x = x + self._attention(i, rms_norm(x, w["input_layernorm"], c.rms_norm_eps), start, cos, sin)
            n = rms_norm(x, w["post_attention_layernorm"], c.rms_norm_eps)
            x = x + (silu(n @ w["gate_proj"]) * (n @ w["up_proj"])) @ w["down_proj"]
        return rms_norm(x, self.norm, c.rms_norm_eps) @ self.lm_head

    def _attention(self, i: int, x: np.ndarray, start: int, cos, sin) -> np.ndarray:
        """Causal GQA of tokens at positions start.. against layer i's cache plus themselves."""
        c, w, t = self.config, self.layers[i], x.shape[0]
        q = (x @ w["q_proj"]).reshape(t, c.num_attention_heads, c.head_dim).transpose(1, 0, 2)
        k = (x @ w["k_proj"]).reshape(t, c.num_key_value_heads, c.head_dim).transpose(1, 0, 2)
        v = (x @ w["v_proj"]).reshape(t, c.num_key_value_heads, c.head_dim).transpose(1, 0, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.k_cache[i] = np.concatenate([self.k_cache[i], k], axis=1)
        self.v_cache[i] = np.concatenate([self.v_cache[i], v], axis=1)
        # GQA: query head h attends with kv head h // group.
        group = c.kv_group_size
        keys = np.repeat(self.k_cache[i], group, axis=0)
        values = np.repeat(self.v_cache[i], group, axis=0)
        scores = q @ keys.transpose(0, 2, 1) / np.sqrt(c.head_dim).astype(self.dtype)
        visible = np.arange(keys.shape[1])[None, :] <= start + np.arange(t)[:, None]
        scores = np.where(visible, scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out = (probs @ values).transpose(1, 0, 2).reshape(t, c.q_dim)
        return out @ w["o_proj"]

    def generate(self, prompt_ids, max_new_tokens: int, eos=None, ignore_eos: bool = False):
        """Greedy decoding. Returns (new token ids, logits [n_new, vocab] each was chosen from).

        Stops after an end-of-sequence token (``eos``: an id or ids, default the config's)
        unless ``ignore_eos``.
        """
        eos_ids = set(self.config.eos_token_ids if eos is None else np.atleast_1d(eos).tolist())
        tokens, logits = [], []
        if max_new_tokens <= 0:
            return tokens, np.zeros((0, self.config.vocab_size), self.dtype)
        last = self.prefill(prompt_ids)[-1]
        while True:
            token = int(np.argmax(last))
            tokens.append(token)
            logits.append(last)
            if len(tokens) == max_new_tokens or (token in eos_ids and not ignore_eos):
                return tokens, np.stack(logits)
            last = self.decode(token)
