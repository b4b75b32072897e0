"""LLaMA prefill and decode mapped the way the systems WaferLLM is compared with would map them
(PAPER.md §8).

``waferllm`` is :class:`llm.decode.Decoder` and :func:`llm.prefill.prefill` themselves;
``megatron``, ``ladder`` and ``t10`` are :class:`llm.strategies.base.StrategyDecoder` with that
system's GEMVs and :class:`llm.strategies.prefill.StrategyPrefill` with its GEMMs (one module
per system).
"""
from __future__ import annotations

STRATEGIES = ("waferllm", "megatron", "ladder", "t10")


def _mapping(strategy: str):
    """The GEMV/GEMM mapping object of a compared system."""
    if strategy == "megatron":
        from .megatron import Megatron as mapping
    elif strategy == "ladder":
        from .ladder import Ladder as mapping
    elif strategy == "t10":
        from .t10 import T10 as mapping
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    return mapping()


def decoder_class(strategy: str):
    """The decoder class of ``strategy`` (its constructor takes :class:`llm.decode.Decoder`'s
    arguments)."""
    from ..decode import Decoder
    if strategy == "waferllm":
        return Decoder
    from .base import bind
    return bind(_mapping(strategy))


def prefill_runner(strategy: str):
    """The prefill's layer runner of ``strategy`` (:func:`llm.prefill.prefill`'s ``runner``;
    None: WaferLLM's own)."""
    if strategy == "waferllm":
        return None
    from .prefill import bind
    return bind(_mapping(strategy))
