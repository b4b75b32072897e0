"""Hugging Face LLaMA checkpoints <-> numpy weights.

A model directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Tensors may be float32, float16 or bfloat16; numpy has no
bfloat16, so those are read as raw bytes (safetensors layout: 8-byte little-endian header
length, JSON header with ``dtype``/``shape``/``data_offsets``, then the data) and widened to
float32 by a 16-bit shift. :func:`open_checkpoint` reads nothing but the headers: its tensors
are :class:`StoredTensor` handles over a memory map, and a rank converts only the rows and
columns its cores hold (:func:`select`); :func:`check_finite` shares the NaN scan out over the
ranks. Hugging Face stores Linear weights as ``[out, in]``; here they are
``[in, out]`` so every projection is ``y = x @ W``, the form MeshGEMM/MeshGEMV take (PAPER.md
sections 2-5).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
from collections import Counter
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import save_file

from .config import LlamaConfig
from .errors import ModelError

MODELS_DIR = pathlib.Path(__file__).resolve().parent / "models"
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
_RAW = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}          # stored dtype -> what numpy reads
_NON_FINITE = {"F32": 0x7F800000, "F16": 0x7C00, "BF16": 0x7F80}   # exponent bits all ones
_SCAN_ELEMENTS = 1 << 22                                     # per read of the NaN scan
_LAYER_TENSORS = {  # field -> name inside model.layers.N
    "input_layernorm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass
class LayerWeights:
    """One decoder layer; projections are ``[in, out]``, norms ``[hidden]``."""

    input_layernorm: np.ndarray
    q_proj: np.ndarray            # [hidden, heads * head_dim]
    k_proj: np.ndarray            # [hidden, kv_heads * head_dim]
    v_proj: np.ndarray            # [hidden, kv_heads * head_dim]
    o_proj: np.ndarray            # [heads * head_dim, hidden]
    post_attention_layernorm: np.ndarray
    gate_proj: np.ndarray         # [hidden, intermediate]
    up_proj: np.ndarray           # [hidden, intermediate]
    down_proj: np.ndarray         # [intermediate, hidden]


@dataclass
class LlamaWeights:
    """All weights of a LLaMA model; ``logits = norm(h) @ lm_head``. From :func:`open_checkpoint`
    the tensors are :class:`StoredTensor` handles in the same layouts."""

    config: LlamaConfig
    embed: np.ndarray             # [vocab, hidden]
    layers: list[LayerWeights]
    norm: np.ndarray              # [hidden]
    lm_head: np.ndarray           # [hidden, vocab]; a view of embed.T when tied

    def to_hf(self) -> dict[str, np.ndarray]:
        """Tensors under their Hugging Face names and ``[out, in]`` layout."""
        out = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not self.config.tie_word_embeddings:
            out["lm_head.weight"] = self.lm_head.T
        for i, layer in enumerate(self.layers):
            for field, name in _LAYER_TENSORS.items():
                value = getattr(layer, field)
                out[f"model.layers.{i}.{name}"] = value if field in _NORMS else value.T
        return out


def resolve_model_dir(model: str | pathlib.Path) -> pathlib.Path:
    """A built-in model name (``tiny``) or a directory path -> the directory."""
    builtin = MODELS_DIR / str(model)
    if "/" not in str(model) and (builtin / "config.json").is_file():
        return builtin
    path = pathlib.Path(model)
    if not path.is_dir():
        names = sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir()) if MODELS_DIR.is_dir() else []
        raise ModelError(f"model {str(model)!r} is neither a directory, a GGUF file nor a built-in model "
                         f"({', '.join(names) or 'none installed'})")
    return path


def hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Expected Hugging Face tensor names and ``[out, in]`` shapes (lm_head included)."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layer = {"input_layernorm": (h,), "q_proj": (config.q_dim, h), "k_proj": (config.kv_dim, h),
             "v_proj": (config.kv_dim, h), "o_proj": (h, config.q_dim),
             "post_attention_layernorm": (h,), "gate_proj": (f, h), "up_proj": (f, h),
             "down_proj": (h, f)}
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(config.num_hidden_layers):
        for field, name in _LAYER_TENSORS.items():
            shapes[f"model.layers.{i}.{name}"] = layer[field]
    return shapes


# ----------------------------------------------------------------------------- loading
def read_safetensors_header(path: pathlib.Path) -> tuple[dict, int]:
    """(tensor entries by name, byte offset where the data begins) of one file."""
    try:
        with open(path, "rb") as fh:
            size = path.stat().st_size
            (length,) = struct.unpack("<Q", fh.read(8))
            if not 0 < length <= size - 8:
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(fh.read(length))
    except FileNotFoundError:
        raise ModelError(f"missing file {path}") from None
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not a safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    for name, entry in header.items():
        problem = _entry_problem(entry, data_bytes)
        if problem:
            raise ModelError(f"{path} is damaged or truncated: tensor {name} {problem}")
    return header, 8 + length


_ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def _entry_problem(entry, data_bytes: int) -> str | None:
    """Why one header entry cannot be read from ``data_bytes`` bytes of data, or None."""
    if not isinstance(entry, dict):
        return "has no dtype, shape and data_offsets"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        return "has a malformed shape or data_offsets"
    if offsets[1] > data_bytes:
        return f"ends at data byte {offsets[1]:,} but the file holds {data_bytes:,}"
    item = _ITEM_BYTES.get(entry.get("dtype"))
    if item is not None and offsets[1] - offsets[0] != item * int(np.prod(shape, dtype=np.int64)):
        return f"holds {offsets[1] - offsets[0]:,} bytes, not the {item} x {shape} its dtype and shape need"
    return None


class TensorHandle:
    """A stored tensor read on demand: subclasses give ``shape`` and ``select(rows, cols)``."""

    def __getitem__(self, rows) -> np.ndarray:
        """Whole rows (``embed[token_ids]``)."""
        rows = np.asarray(rows, np.int64)
        return self.select(rows.ravel()).reshape(rows.shape + self.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.select(np.arange(self.shape[0]))
        return whole if dtype is None else whole.astype(dtype, copy=False)


class StoredTensor(TensorHandle):
    """One tensor of a safetensors file, read on demand through a memory map.

    It presents the tensor as the model uses it: ``[in, out]`` for a Linear weight stored
    ``[out, in]`` (``transposed``). :meth:`select` widens to float32 only the elements asked
    for; ``files.bytes_read[name]`` counts the stored bytes it has read.
    """

    def __init__(self, files: "_TensorFiles", name: str, transposed: bool):
        self.files, self.name, self.transposed = files, name, transposed
        entry = files.entry(name)
        self.dtype, self.stored_shape = entry["dtype"], tuple(entry["shape"])
        self.shape = self.stored_shape[::-1] if transposed else self.stored_shape
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape))

    @property
    def T(self) -> "StoredTensor":
        return StoredTensor(self.files, self.name, not self.transposed)

    def select(self, rows, cols=None, widen: bool = True) -> np.ndarray:
        """float32 ``self[rows]`` (a vector) or ``self[rows][:, cols]``; indices must be valid.
        ``widen=False``: the stored values as read (bfloat16 as its uint16 bits), for a caller
        that widens them on the way (:func:`bf16_bits`)."""
        rows = np.asarray(rows, np.int64)
        if self.ndim == 1:
            return self.files.read(self.name, (rows,), widen)
        cols = np.arange(self.shape[1]) if cols is None else np.asarray(cols, np.int64)
        if self.transposed:
            return self.files.read(self.name, (cols, rows), widen).T
        return self.files.read(self.name, (rows, cols), widen)

    @property
    def origin(self) -> str:
        return str(self.files.where[self.name])

    def non_finite(self, part: int, parts: int) -> int:
        return self.files.non_finite(self.name, part, parts)


def _run(index: np.ndarray):
    """A slice equal to ``index`` when it is a run of consecutive increasing positions, else it."""
    if index.ndim == 1 and index.size and index[-1] - index[0] == index.size - 1 and \
            (index.size < 3 or np.all(np.diff(index) == 1)):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def take(a, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``a[np.ix_(rows, cols)]``, by slices where the indices are runs (no fancy-index pass)."""
    r, c = _run(np.asarray(rows)), _run(np.asarray(cols))
    return a[r, c] if isinstance(r, slice) or isinstance(c, slice) else a[np.ix_(r, c)]


def bf16_bits(w) -> bool:
    """A stored bfloat16 tensor: ``select(..., widen=False)`` gives its uint16 bits, the top
    half of each value's float32 bits."""
    return isinstance(w, StoredTensor) and w.dtype == "BF16"


def select(w, rows, cols=None) -> np.ndarray:
    """float32 ``w[rows]`` or ``w[rows][:, cols]`` of an array or a stored tensor handle
    (:class:`StoredTensor`, :class:`llm.gguf.GGUFTensor`)."""
    if hasattr(w, "select"):
        return w.select(rows, cols)
    w = np.asarray(w)
    return np.asarray(w[rows] if cols is None else w[np.ix_(rows, cols)], np.float32)


class _TensorFiles:
    """Finds each tensor in the single file or the shards of an index and reads parts of it."""

    def __init__(self, directory: pathlib.Path):
        index, single = directory / INDEX_FILE, directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelError(f"{index} has no valid weight_map: {exc}") from None
        elif single.is_file():
            weight_map = None
        else:
            raise ModelError(f"missing file {single} (or sharded {INDEX_FILE}) in {directory}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self.headers = {f: read_safetensors_header(directory / f) for f in files}
        self.directory = directory
        self.where = dict(weight_map) if weight_map else {n: SINGLE_FILE for n in self.headers[SINGLE_FILE][0]}
        self.bytes_read = Counter()

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def entry(self, name: str, shape: tuple[int, ...] | None = None) -> dict:
        """The header entry of ``name``, checked against ``shape`` and the dtypes read here."""
        file = self.where[name]
        entries = self.headers[file][0]
        if name not in entries:
            raise ModelError(f"tensor {name} is listed in {INDEX_FILE} under {file} but not stored there")
        entry = entries[name]
        if shape is not None and tuple(entry["shape"]) != tuple(shape):
            raise ModelError(f"tensor {name} in {file}: expected shape {list(shape)}, "
                             f"found {list(entry['shape'])}")
        if entry["dtype"] not in _RAW:
            raise ModelError(f"tensor {name} in {file} has unsupported dtype {entry['dtype']} "
                             f"(expected F32, F16 or BF16)")
        return entry

    def read(self, name: str, index: tuple[np.ndarray, ...], widen: bool = True) -> np.ndarray:
        """float32 ``stored[np.ix_(*index)]``: only those elements are copied out of the map
        (``widen=False``: as stored)."""
        file = self.where[name]
        entry, data_start = self.headers[file][0][name], self.headers[file][1]
        shape, offset = tuple(entry["shape"]), data_start + entry["data_offsets"][0]
        rows = _run(np.asarray(index[0])) if len(index) == 2 else None
        if isinstance(rows, slice):
            # A run of rows: read in one call (no page faults on a map, which cost more than
            # the copy), then the columns taken from it.
            dtype, count = np.dtype(_RAW[entry["dtype"]]), rows.stop - rows.start
            row = int(np.prod(shape[1:]))
            block = np.fromfile(self.directory / file, dtype, count * row,
                                offset=offset + rows.start * row * dtype.itemsize).reshape((count,) + shape[1:])
            raw = np.asarray(block[:, _run(np.asarray(index[1]))])
        else:
            # A map of the tensor alone, released with the array (never closed under a live view).
            stored = np.memmap(self.directory / file, _RAW[entry["dtype"]], "r", offset, shape)
            raw = np.asarray(stored[index[0]] if len(index) == 1 else take(stored, *index))
        self.bytes_read[name] += raw.nbytes
        return _widen(raw, entry["dtype"]) if widen else raw

    def non_finite(self, name: str, part: int, parts: int) -> int:
        """NaN or infinite values in share ``part`` of ``parts`` of the tensor's elements (read
        in bounded pieces and tested on their exponent bits, so nothing is widened)."""
        file = self.where[name]
        entry, data_start = self.headers[file][0][name], self.headers[file][1]
        raw = np.dtype(_RAW[entry["dtype"]])
        bits, mask = np.dtype(f"<u{raw.itemsize}"), _NON_FINITE[entry["dtype"]]
        size = int(np.prod(entry["shape"]))
        lo, hi = size * part // parts, size * (part + 1) // parts
        bad = 0
        for start in range(lo, hi, _SCAN_ELEMENTS):
            piece = np.fromfile(self.directory / file, bits, min(_SCAN_ELEMENTS, hi - start),
                                offset=data_start + entry["data_offsets"][0] + start * raw.itemsize)
            bad += int(np.count_nonzero((piece & bits.type(mask)) == mask))
        return bad


def _widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values -> float32 (bfloat16 is the top half of a float32)."""
    if dtype == "BF16":
        wide = raw.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    return raw.astype(np.float32)


def open_checkpoint(model: str | pathlib.Path) -> LlamaWeights:
    """A Hugging Face LLaMA directory (or built-in name) as :class:`StoredTensor` handles: the
    headers are read and checked against the config, no tensor data."""
    directory = resolve_model_dir(model)
    config = LlamaConfig.from_file(directory / "config.json")
    files = _TensorFiles(directory)
    tensors = {}
    for name, shape in hf_shapes(config).items():
        if name == "lm_head.weight" and (config.tie_word_embeddings or name not in files):
            if not config.tie_word_embeddings:
                raise ModelError(f"missing tensor lm_head.weight in {directory} "
                                 f"(tie_word_embeddings is false)")
            continue
        if name not in files:
            raise ModelError(f"missing tensor {name} (expected shape {list(shape)}) in {directory}")
        files.entry(name, shape)
        tensors[name] = StoredTensor(files, name, transposed=len(shape) == 2 and name != "model.embed_tokens.weight")
    return _from_hf(config, tensors, transpose=False)


def stored_tensors(weights: LlamaWeights) -> list:
    """The distinct stored tensor handles of opened weights (anything with ``non_finite``)."""
    handles = [weights.embed, weights.norm, weights.lm_head]
    handles += [getattr(layer, field) for layer in weights.layers for field in _LAYER_TENSORS]
    return list({h.name: h for h in handles if hasattr(h, "non_finite")}.values())


def check_finite(weights: LlamaWeights, part: int = 0, parts: int = 1, allgather=lambda counts: [counts]) -> None:
    """Refuse weights holding NaN or infinity: this rank scans share ``part`` of ``parts`` of
    every stored tensor; ``allgather`` returns every rank's counts, so all raise the same error."""
    handles = stored_tensors(weights)
    mine = {h.name: h.non_finite(part, parts) for h in handles}
    totals = Counter()
    for counts in allgather({name: bad for name, bad in mine.items() if bad}):
        totals.update(counts)
    for h in handles:
        if totals[h.name]:
            raise ModelError(f"tensor {h.name} in {h.origin} holds {totals[h.name]:,} NaN or "
                             f"infinite values: the checkpoint is damaged")


def load_checkpoint(model: str | pathlib.Path, dtype=np.float32) -> LlamaWeights:
    """Load a Hugging Face LLaMA directory (or built-in name) whole, as ``dtype`` numpy weights."""
    weights = open_checkpoint(model)
    check_finite(weights)
    tensors = {h.name: np.asarray(h.T if h.transposed else h).astype(dtype, copy=False)
               for h in stored_tensors(weights)}
    return _from_hf(weights.config, tensors)


def _from_hf(config: LlamaConfig, tensors: dict, transpose: bool = True) -> LlamaWeights:
    """Weights from tensors under Hugging Face names: arrays in ``[out, in]`` (``transpose``),
    or :class:`StoredTensor` handles that already present ``[in, out]``."""
    def linear(value):
        return np.ascontiguousarray(value.T) if transpose else value

    layers = []
    for i in range(config.num_hidden_layers):
        fields = {}
        for field, name in _LAYER_TENSORS.items():
            value = tensors[f"model.layers.{i}.{name}"]
            fields[field] = value if field in _NORMS else linear(value)
        layers.append(LayerWeights(**fields))
    embed = tensors["model.embed_tokens.weight"]
    head = tensors.get("lm_head.weight")
    return LlamaWeights(config=config, embed=embed, layers=layers, norm=tensors["model.norm.weight"],
                        lm_head=embed.T if head is None else linear(head))


# ------------------------------------------------------------------- saving and making
def save_checkpoint(directory: str | pathlib.Path, config: LlamaConfig, weights: LlamaWeights,
                    dtype: str = "float32") -> pathlib.Path:
    """Write ``config.json`` + ``model.safetensors`` (float32, float16 or bfloat16)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, torch_dtype=dtype)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tensors = {name: np.ascontiguousarray(value, dtype=np.float32)
               for name, value in dataclasses.replace(weights, config=config).to_hf().items()}
    path = directory / SINGLE_FILE
    if dtype == "bfloat16":
        _save_bf16(path, tensors)
    elif dtype in ("float32", "float16"):
        save_file({n: t.astype(dtype) for n, t in tensors.items()}, str(path), metadata={"format": "pt"})
    else:
        raise ModelError(f"cannot save dtype {dtype!r}; use float32, float16 or bfloat16")
    return directory


def _save_bf16(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """Raw safetensors writer; float32 -> bfloat16 rounds to nearest even."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, value in tensors.items():
        bits = value.view(np.uint32).astype(np.uint64)
        blob = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.writelines(blobs)


def random_weights(config: LlamaConfig, seed: int = 0, dtype=np.float32) -> LlamaWeights:
    """Deterministic random weights: projections N(0, 1/fan_in), norms near 1, embed N(0, 1)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in hf_shapes(config).items():
        if len(shape) == 1:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            value = rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(shape[1])
        tensors[name] = value.astype(dtype)
    if config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    return _from_hf(config, tensors)
