"""LLaMA model configuration parsed from a Hugging Face ``config.json`` (PAPER.md section 7).

Both ways of writing RoPE found in the wild are accepted:

- ``"rope_theta": 500000.0`` at top level, optionally with LLaMA-3.1 ``"rope_scaling":
  {"rope_type" (or "type"): "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"}``;
- ``"rope_parameters": {"rope_theta": ..., "rope_type": "default" | "llama3", ...}``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from dataclasses import dataclass, field

from .errors import ModelError

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1 frequency-dependent scaling of the RoPE inverse frequencies."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of a LLaMA decoder; Linear weights are used as ``y = x @ W``."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None      # None -> num_attention_heads (no GQA)
    head_dim: int | None = None                 # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default=())
    max_position_embeddings: int = 2048
    torch_dtype: str = "float32"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ModelError(f"hidden_size {self.hidden_size} is not divisible by "
                                 f"num_attention_heads {self.num_attention_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        self._validate()

    def _validate(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelError(f"{name} must be a positive integer, found {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ModelError(f"head_dim must be even for RoPE, found {self.head_dim}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ModelError(f"rms_norm_eps and rope_theta must be positive, found "
                             f"{self.rms_norm_eps} and {self.rope_theta}")
        if self.torch_dtype not in SUPPORTED_DTYPES:
            raise ModelError(f"torch_dtype {self.torch_dtype!r} is not one of {SUPPORTED_DTYPES}")

    # ----------------------------------------------------------------- derived shapes
    @property
    def kv_group_size(self) -> int:
        """Query heads per key/value head (GQA); query head h reads kv head h // group."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_parameters(self) -> int:
        """Weights in the checkpoint (lm_head counted once more unless tied)."""
        h, f = self.hidden_size, self.intermediate_size
        layer = 2 * h + h * (2 * self.q_dim + 2 * self.kv_dim) + 3 * h * f
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head

    # ---------------------------------------------------------------------- from/to HF
    @classmethod
    def from_dict(cls, raw: dict, origin: str = "config") -> "LlamaConfig":
        """Parse a Hugging Face config dictionary; unsupported models and fields of the wrong
        type raise ModelError (naming ``origin``, the file, and the field)."""
        try:
            return cls._from_dict(raw)
        except ModelError as exc:
            raise ModelError(f"{origin}: {exc}") from None

    @classmethod
    def _from_dict(cls, raw: dict) -> "LlamaConfig":
        _check_architecture(raw)
        _check_types(raw)
        for key in ("attention_bias", "mlp_bias"):
            if raw.get(key):
                raise ModelError(f"{key}=true is not supported (LLaMA projections have no bias)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelError(f"hidden_act {raw['hidden_act']!r} is not supported, only 'silu'")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if k not in raw]
        if missing:
            raise ModelError(f"config is missing required field(s): {', '.join(missing)}")
        theta, scaling = _parse_rope(raw)
        eos = raw.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(
            hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"], vocab_size=raw["vocab_size"],
            num_key_value_heads=raw.get("num_key_value_heads"), head_dim=raw.get("head_dim"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=scaling, tie_word_embeddings=raw.get("tie_word_embeddings", False),
            bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos_ids,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"))

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "LlamaConfig":
        """Read ``config.json`` (or a directory containing it)."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelError(f"missing file {path}")
        return cls.from_dict(read_json(path), str(path))

    def to_dict(self) -> dict:
        """Hugging Face ``config.json`` contents (top-level ``rope_theta`` style)."""
        out = {"architectures": list(SUPPORTED_ARCHITECTURES), "model_type": "llama",
               "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
        for f in dataclasses.fields(self):
            if f.name not in ("rope_scaling", "eos_token_ids"):
                out[f.name] = getattr(self, f.name)
        eos = list(self.eos_token_ids)
        out["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        if self.rope_scaling is not None:
            out["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        return out


def _check_architecture(raw: dict) -> None:
    model_type = raw.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"unsupported model_type {model_type!r}: only "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} models can be loaded")
    bad = [a for a in raw.get("architectures") or [] if a not in SUPPORTED_ARCHITECTURES]
    if bad:
        raise ModelError(f"unsupported architectures {bad}: only "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)} can be loaded")


_INTEGERS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
             "num_key_value_heads", "head_dim", "max_position_embeddings")
_NUMBERS = ("rms_norm_eps", "rope_theta")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_types(raw: dict) -> None:
    """Every field this loader reads has the JSON type Hugging Face writes (``null`` = absent)."""
    def found(key):
        return f"found {json.dumps(raw[key])}"

    for key in _INTEGERS:
        if raw.get(key) is not None and not (_is_int(raw[key]) and raw[key] > 0):
            raise ModelError(f"{key} must be a positive integer, {found(key)}")
    for key in _NUMBERS:
        if raw.get(key) is not None and not (_is_number(raw[key]) and raw[key] > 0):
            raise ModelError(f"{key} must be a positive number, {found(key)}")
    if raw.get("tie_word_embeddings") is not None and not isinstance(raw["tie_word_embeddings"], bool):
        raise ModelError(f"tie_word_embeddings must be true or false, {found('tie_word_embeddings')}")
    if raw.get("bos_token_id") is not None and not _is_int(raw["bos_token_id"]):
        raise ModelError(f"bos_token_id must be an integer or null, {found('bos_token_id')}")
    eos = raw.get("eos_token_id")
    if eos is not None and not (_is_int(eos) or isinstance(eos, list) and all(_is_int(t) for t in eos)):
        raise ModelError(f"eos_token_id must be an integer, a list of integers or null, {found('eos_token_id')}")
    for key in ("rope_scaling", "rope_parameters"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ModelError(f"{key} must be an object or null, {found(key)}")
    for key in ("torch_dtype", "dtype"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ModelError(f"{key} must be a string, {found(key)}")


def _parse_rope(raw: dict) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from ``rope_theta``/``rope_scaling`` or ``rope_parameters``."""
    params = raw.get("rope_parameters")
    if params is not None:
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
    if not _is_number(theta) or theta <= 0:
        raise ModelError(f"rope_theta must be a positive number, found {json.dumps(theta)}")
    if not scaling:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ModelError(f"unsupported rope_type {rope_type!r}: only 'default' and 'llama3'")
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise ModelError(f"llama3 rope scaling is missing {', '.join(missing)}")
    for key in _LLAMA3_KEYS:
        whole = key == "original_max_position_embeddings"
        if not (_is_int if whole else _is_number)(scaling[key]) or scaling[key] <= 0:
            raise ModelError(f"rope scaling {key} must be a positive {'integer' if whole else 'number'}, "
                             f"found {json.dumps(scaling[key])}")
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


GENERATION_CONFIG = "generation_config.json"


def generation_eos_ids(directory: str | pathlib.Path) -> tuple[int, ...] | None:
    """``eos_token_id`` of a model directory's ``generation_config.json`` (an integer or a list),
    or None when the file or the field is absent (then ``config.json``'s applies)."""
    path = pathlib.Path(directory) / GENERATION_CONFIG
    eos = read_json(path).get("eos_token_id")
    if eos is None:
        return None
    if not (_is_int(eos) or isinstance(eos, list) and all(_is_int(t) for t in eos)):
        raise ModelError(f"{path}: eos_token_id must be an integer or a list of integers, found {json.dumps(eos)}")
    return tuple(eos) if isinstance(eos, list) else (eos,)


def read_json(path: pathlib.Path) -> dict:
    """The JSON object in ``path``; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path} must hold a JSON object")
    return raw
