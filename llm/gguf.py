"""LLaMA models in GGUF files (llama.cpp's format), read with the ``gguf`` package.

- The config comes from the ``llama.*`` metadata: ``block_count``, ``embedding_length``,
  ``feed_forward_length``, ``attention.head_count`` / ``head_count_kv`` / ``key_length`` /
  ``layer_norm_rms_epsilon``, ``rope.freq_base``, ``context_length``, ``vocab_size`` (else the
  number of tokens); the BOS/EOS ids from ``tokenizer.ggml.*`` (``eot``/``eom`` ids stop too). No
  ``output.weight`` means tied embeddings.
- Tensors (``token_embd``, ``blk.N.attn_q`` ..., ``output_norm``, ``output``) are dequantized to
  float32 by the package's reference dequantizers. GGUF's q/k weights are permuted for
  llama.cpp's RoPE, which rotates adjacent pairs (2i, 2i+1) where Hugging Face rotates
  (i, i + head_dim/2): the permutation is undone, so the weights are Hugging Face's.
- The tokenizer is built from ``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` for the
  byte-level BPE model type ``gpt2`` (control tokens are special tokens); the BOS rule is
  ``tokenizer.ggml.add_bos_token``, the chat template ``tokenizer.chat_template``. Other
  tokenizer types load no tokenizer (prompts are then given as ids).
"""
from __future__ import annotations

import pathlib

import numpy as np

from .checkpoint import _LAYER_TENSORS, LayerWeights, LlamaWeights, TensorHandle, hf_shapes
from .config import LlamaConfig
from .errors import ModelError

MAGIC = b"GGUF"
# Types the reader dequantizes (gguf.quants); the first six are checked by the tests.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_LAYER = {"attn_norm": "input_layernorm", "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
          "attn_output": "o_proj", "ffn_norm": "post_attention_layernorm", "ffn_gate": "gate_proj",
          "ffn_up": "up_proj", "ffn_down": "down_proj"}
_NORMS = ("input_layernorm", "post_attention_layernorm")
_CONTROL, _USER_DEFINED = 3, 4      # tokenizer.ggml.token_type values
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _decimal(value) -> float:
    """The shortest decimal of a float32 (GGUF stores 1e-5 as 9.99999975e-06)."""
    return float(str(np.float32(value)))


def is_gguf(model) -> bool:
    """Whether ``model`` names a GGUF file (by its magic bytes)."""
    path = pathlib.Path(str(model))
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


def permute_for_gguf(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face q/k rows ``[heads * head_dim, in]`` -> llama.cpp's order (within each head,
    rows i and i + head_dim/2 become rows 2i and 2i+1)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_gguf(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`permute_for_gguf`."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFModel:
    """One GGUF file: its config, and on demand its weights and tokenizer."""

    def __init__(self, path):
        from gguf import GGUFReader
        self.path = pathlib.Path(path)
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as exc:  # the reader raises ValueError, struct errors, ...: all mean damaged
            raise ModelError(f"cannot read GGUF file {self.path}: {exc}") from None
        self.fields = {name: field for name, field in self.reader.fields.items()}
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.config = self._config()

    def value(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def _require(self, key: str):
        value = self.value(key)
        if value is None:
            raise ModelError(f"{self.path}: missing GGUF metadata {key}")
        return value

    def _config(self) -> LlamaConfig:
        arch = self.value("general.architecture")
        if arch != "llama":
            raise ModelError(f"{self.path}: GGUF architecture {arch!r} is not supported, only 'llama'")
        p = "llama."
        scaling = self.value(p + "rope.scaling.type", "none")
        if scaling not in ("none", None) or "rope_freqs.weight" in self.tensors:
            kind = scaling if scaling not in ("none", None) else "llama3 (rope_freqs)"
            raise ModelError(f"{self.path}: RoPE scaling {kind} in a GGUF file is not supported")
        heads = int(self._require(p + "attention.head_count"))
        hidden = int(self._require(p + "embedding_length"))
        head_dim = int(self.value(p + "attention.key_length", hidden // heads if heads else 0))
        rotary = self.value(p + "rope.dimension_count")
        if rotary is not None and int(rotary) != head_dim:
            raise ModelError(f"{self.path}: partial RoPE ({rotary} of {head_dim} head dims) is not supported")
        tokens = self.value("tokenizer.ggml.tokens")
        vocab = self.value(p + "vocab_size", len(tokens) if tokens is not None else None)
        if vocab is None:
            vocab = int(self.tensors["token_embd.weight"].shape[1]) if "token_embd.weight" in self.tensors \
                else self._require(p + "vocab_size")
        eos = [self.value(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        try:
            return LlamaConfig(
                hidden_size=hidden, intermediate_size=int(self._require(p + "feed_forward_length")),
                num_hidden_layers=int(self._require(p + "block_count")), num_attention_heads=heads,
                num_key_value_heads=int(self.value(p + "attention.head_count_kv", heads)), head_dim=head_dim,
                vocab_size=int(vocab), rms_norm_eps=_decimal(self.value(p + "attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=_decimal(self.value(p + "rope.freq_base", 10000.0)),
                tie_word_embeddings="output.weight" not in self.tensors,
                bos_token_id=self.value("tokenizer.ggml.bos_token_id"),
                eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
                max_position_embeddings=int(self.value(p + "context_length", 2048)))
        except ModelError as exc:
            raise ModelError(f"{self.path}: {exc}") from None

    # ------------------------------------------------------------------ weights
    def tensor(self, name: str, shape: tuple[int, ...], transposed: bool = False, heads: int | None = None):
        """A :class:`GGUFTensor` handle on ``name``, checked against ``shape`` (numpy order,
        ``[out, in]`` for a matrix) and the supported types; nothing is dequantized yet."""
        if name not in self.tensors:
            raise ModelError(f"{self.path}: missing tensor {name} (expected shape {list(shape)})")
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise ModelError(f"{self.path}: tensor {name} has GGML type {kind}, which is not supported "
                             f"(supported: {', '.join(SUPPORTED_TYPES)})")
        found = tuple(int(d) for d in reversed(t.shape))
        if found != tuple(shape):
            raise ModelError(f"{self.path}: tensor {name}: expected shape {list(shape)}, found {list(found)}")
        order = None if heads is None else unpermute_from_gguf(np.arange(shape[0]), heads)
        return GGUFTensor(self, name, tuple(shape), transposed, order)

    def weights(self) -> LlamaWeights:
        """All weights as :class:`GGUFTensor` handles in the layout of :mod:`llm.checkpoint`
        (``[in, out]``), the q/k rows in Hugging Face order; a rank dequantizes only the rows
        its cores need (quantized blocks run along a stored row)."""
        c = self.config
        shapes = hf_shapes(c)
        layers = []
        for i in range(c.num_hidden_layers):
            fields = {}
            for short, field in _LAYER.items():
                heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(field)
                fields[field] = self.tensor(f"blk.{i}.{short}.weight", shapes[f"model.layers.{i}.{_LAYER_TENSORS[field]}"],
                                            transposed=field not in _NORMS, heads=heads)
            layers.append(LayerWeights(**fields))
        embed = self.tensor("token_embd.weight", shapes["model.embed_tokens.weight"])
        head = embed.T if c.tie_word_embeddings else self.tensor("output.weight", shapes["lm_head.weight"],
                                                                 transposed=True)
        return LlamaWeights(config=c, embed=embed, layers=layers,
                            norm=self.tensor("output_norm.weight", shapes["model.norm.weight"]), lm_head=head)

    # ---------------------------------------------------------------- tokenizer
    def tokenizer(self):
        """A :class:`llm.tokenizer.Tokenizer` from the file's vocabulary, or None when it has
        none of a supported type."""
        from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        from .tokenizer import Tokenizer
        tokens = self.value("tokenizer.ggml.tokens")
        if tokens is None or self.value("tokenizer.ggml.model") != "gpt2":
            return None
        merges = [tuple(m.split(" ", 1)) for m in self.value("tokenizer.ggml.merges", [])]
        types = self.value("tokenizer.ggml.token_type") or [1] * len(tokens)
        tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        if self.value("tokenizer.ggml.pre") in ("llama-bpe", "llama3"):
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
        tok.add_tokens([AddedToken(t, normalized=False) for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
        special = {}
        for name in ("bos", "eos", "unknown", "padding"):
            index = self.value(f"tokenizer.ggml.{name}_token_id")
            if index is not None and 0 <= int(index) < len(tokens):
                special[{"unknown": "unk", "padding": "pad"}.get(name, name) + "_token"] = tokens[int(index)]
        add_bos = self.value("tokenizer.ggml.add_bos_token")
        return Tokenizer(tok, bos_token_id=self.config.bos_token_id,
                         add_bos=None if add_bos is None else bool(add_bos),
                         add_eos=bool(self.value("tokenizer.ggml.add_eos_token", False)),
                         chat_template=self.value("tokenizer.chat_template"), special_tokens=special)


def load_gguf(path, weights: bool = True):
    """(config, weights or None, tokenizer or None) of a GGUF file; the weights are handles
    read on demand (check them with :func:`llm.checkpoint.check_finite`)."""
    model = GGUFModel(path)
    return model.config, model.weights() if weights else None, model.tokenizer()


class GGUFTensor(TensorHandle):
    """One tensor of a GGUF file, dequantized on demand by stored rows.

    It presents the tensor as the model uses it (``[in, out]`` for a Linear weight, whose GGUF
    rows are the output features: ``transposed``), with q/k rows back in Hugging Face order
    (``row_order[r]``: the stored row of row r). ``rows_read[name]`` counts the stored rows
    dequantized, over every handle of the file.
    """

    def __init__(self, model: GGUFModel, name: str, shape: tuple, transposed: bool, row_order=None):
        self.model, self.name, self.transposed, self.row_order = model, name, transposed, row_order
        self.stored_shape = shape
        self.shape = shape[::-1] if transposed else shape
        self.ndim, self.size = len(shape), int(np.prod(shape))

    @property
    def T(self) -> "GGUFTensor":
        return GGUFTensor(self.model, self.name, self.stored_shape, not self.transposed, self.row_order)

    @property
    def origin(self) -> str:
        return str(self.model.path)

    def _rows(self, stored_rows: np.ndarray) -> np.ndarray:
        """float32 ``[len(stored_rows), in]`` (the whole vector for a 1-D tensor)."""
        from gguf import quants
        t = self.model.tensors[self.name]
        data = t.data if self.ndim == 2 else t.data.reshape(1, -1)
        rows_read = self.model.__dict__.setdefault("rows_read", {})
        rows_read[self.name] = rows_read.get(self.name, 0) + len(stored_rows)
        return np.asarray(quants.dequantize(np.asarray(data[stored_rows]), t.tensor_type),
                          np.float32).reshape(len(stored_rows), -1)

    def select(self, rows, cols=None) -> np.ndarray:
        """float32 ``self[rows]`` (a vector) or ``self[rows][:, cols]``."""
        rows = np.asarray(rows, np.int64)
        if self.ndim == 1:
            return self._rows(np.zeros(1, np.int64))[0][rows]
        cols = np.arange(self.shape[1]) if cols is None else np.asarray(cols, np.int64)
        out, inner = (cols, rows) if self.transposed else (rows, cols)
        stored = out if self.row_order is None else self.row_order[out]
        unique, back = np.unique(stored, return_inverse=True)
        picked = self._rows(unique)[back][:, inner]
        return picked.T if self.transposed else picked

    def non_finite(self, part: int, parts: int) -> int:
        """NaN or infinite values in share ``part`` of ``parts`` of the stored rows."""
        count = self.stored_shape[0] if self.ndim == 2 else 1
        lo, hi = count * part // parts, count * (part + 1) // parts
        bad = 0
        for start in range(lo, hi, 4096):
            bad += int(np.count_nonzero(~np.isfinite(self._rows(np.arange(start, min(start + 4096, hi))))))
        return bad
