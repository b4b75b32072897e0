"""Train the built-in ``--model tiny`` LLaMA and write it to ``llm/models/tiny/``.

Commands (from the repository root)::

    .venv/bin/pip install torch==2.13.0        # the optional ``train`` extra
    .venv/bin/python -m llm.train_tiny         # ~7 min on 2 idle CPU cores, ~10 min on 1
    .venv/bin/python -m llm.train_tiny --steps 50 --out /tmp/tiny   # quick smoke run

The corpus is English that ships with Python itself, so the run needs no download: the
docstrings and comments of the standard library (read with ``ast``/``tokenize``, nothing is
imported) and the help topics of ``pydoc_data``. A byte-level BPE tokenizer (``tokenizers``
library, ~1024 entries incl. ``<s>`` and ``</s>``) is trained on the same text.

The model is the LLaMA architecture written out here in torch (RMSNorm, RoPE in the Hugging
Face ``rotate_half`` convention, grouped-query attention, SwiGLU feed-forward), saved with the
Hugging Face tensor names as float32 safetensors. This file deliberately does not use the
numpy code in ``llm/``: at the end it runs the trained torch model (in float64) on a fixed
prompt and stores the prefill logits and a greedy generation, recomputed without a KV cache, in
``reference_logits.npz`` -- the independent oracle the tests hold ``llm.reference`` to.

The shipped model was made with ``--threads 1`` (the other defaults as below; a different
thread count changes float rounding, so the weights differ slightly). The result depends on the
Python version whose standard library is read (recorded in
``config.json`` under ``training``); torch is never needed to *use* the model.
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import math
import pathlib
import random
import sysconfig
import time
import tokenize

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "models" / "tiny"
PROMPT = "The meaning of"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, intermediate_size=384,
             rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=256)


# ----------------------------------------------------------------------------- corpus
def stdlib_documents() -> list[str]:
    """Docstrings, comment paragraphs and pydoc help topics of the standard library."""
    from pydoc_data.topics import topics

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = [topics[key] for key in sorted(topics)]
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts) & SKIP_DIRS:
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docs.append(ast.get_docstring(node) or "")
        docs.extend(_comment_paragraphs(tokens))
    cleaned = (_drop_doctest_lines(doc) for doc in docs)
    return list(dict.fromkeys(doc for doc in cleaned if len(doc) >= 60))


def _comment_paragraphs(tokens) -> list[str]:
    """Runs of comments on consecutive lines, joined into one line of prose."""
    paragraphs, current, last_line = [], [], -2
    for tok in tokens:
        if tok.type != tokenize.COMMENT:
            continue
        if tok.start[0] != last_line + 1 and current:
            paragraphs.append(" ".join(current))
            current = []
        text = tok.string.lstrip("#!").strip()
        if text:
            current.append(text)
        last_line = tok.start[0]
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def _drop_doctest_lines(doc: str) -> str:
    lines = [ln for ln in doc.splitlines() if not ln.lstrip().startswith((">>>", "..."))]
    return "\n".join(lines).strip()


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE; ids 0 and 1 are ``<s>`` and ``</s>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return tok


# ------------------------------------------------------------------------------ model
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class DecoderLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h, hd = c["hidden_size"], c["head_dim"]
        self.heads, self.kv_heads, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], hd
        self.input_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.q_proj = nn.Linear(h, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.gate_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.up_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(c["intermediate_size"], h, bias=False)

    def forward(self, x, cos, sin):
        batch, seq, _ = x.shape
        n = self.input_layernorm(x)
        q = self.q_proj(n).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(n).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        group = self.heads // self.kv_heads          # query head h reads kv head h // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(batch, seq, -1))
        n = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))


class TinyLlama(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * len(self.layers))
                                if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        cos, sin = rope_cos_sin(torch.arange(ids.shape[1]), self.c["head_dim"],
                                self.c["rope_theta"], x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def hf_state_dict(self) -> dict:
        """Tensors under the Hugging Face LlamaForCausalLM names."""
        out = {"model.embed_tokens.weight": self.embed_tokens.weight,
               "model.norm.weight": self.norm.weight, "lm_head.weight": self.lm_head.weight}
        for i, layer in enumerate(self.layers):
            for name, p in layer.named_parameters():
                module = name.split(".")[0]
                group = ("self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj")
                         else "mlp" if module.endswith("_proj") else None)
                key = f"model.layers.{i}.{group}.{name}" if group else f"model.layers.{i}.{name}"
                out[key] = p
        return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------- training
def batches(stream: torch.Tensor, batch: int, context: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(stream) - context - 1, (batch,), generator=gen)
        window = torch.stack([stream[s:s + context + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def train(model, stream, args) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 50)
    start = time.time()
    for step, (x, y) in zip(range(args.steps), batches(stream, args.batch, args.context, gen)):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}/{args.steps}  loss {loss.item():.3f}  lr {lr:.2e}  "
                  f"{time.time() - start:6.0f}s", flush=True)


@torch.no_grad()
def greedy(model, ids: list[int], new_tokens: int):
    """Greedy continuation recomputing the whole sequence each step (no KV cache)."""
    tokens, logits = [], []
    for _ in range(new_tokens):
        last = model(torch.tensor([ids + tokens]))[0, -1]
        logits.append(last)
        tokens.append(int(last.argmax()))
    return tokens, torch.stack(logits)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    docs = stdlib_documents()
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} MB", flush=True)
    tok = train_tokenizer(docs, args.vocab)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    stream = [t for enc in tok.encode_batch(docs) for t in [bos, *enc.ids, eos]]
    print(f"tokens: {len(stream)}  vocab: {tok.get_vocab_size()}", flush=True)

    config = dict(SHAPE, vocab_size=tok.get_vocab_size())
    model = TinyLlama(config)
    train(model, torch.tensor(stream), args)

    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / "tokenizer.json"))
    # trained with a BOS token before every document: say so, as Hugging Face tokenizers do
    (args.out / "tokenizer_config.json").write_text(json.dumps(
        dict(add_bos_token=True, add_eos_token=False, bos_token="<s>", eos_token="</s>",
             tokenizer_class="PreTrainedTokenizerFast"), indent=2) + "\n")
    save_file(model.hf_state_dict(), str(args.out / "model.safetensors"), metadata={"format": "pt"})
    hf_config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                     attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
                     bos_token_id=bos, eos_token_id=eos, torch_dtype="float32", **config,
                     training=dict(corpus="python stdlib docstrings, comments, pydoc topics",
                                   python=sysconfig.get_python_version(), steps=args.steps,
                                   batch=args.batch, context=args.context, seed=args.seed))
    (args.out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")

    model = model.double().eval()
    prompt_ids = [bos, *tok.encode(PROMPT).ids]
    with torch.no_grad():
        prefill = model(torch.tensor([prompt_ids]))[0]
    tokens, logits = greedy(model, prompt_ids, 16)
    np.savez_compressed(args.out / "reference_logits.npz", prompt=PROMPT,
                        prompt_ids=np.array(prompt_ids, dtype=np.int64),
                        prefill_logits=prefill.numpy(), generate_tokens=np.array(tokens, dtype=np.int64),
                        generate_logits=logits.numpy())
    print(f"sample: {PROMPT!r} -> {tok.decode(tokens)!r}")


if __name__ == "__main__":
    main()
