"""LLaMA decode mapped the way the systems WaferLLM is compared with would map it (PAPER.md §8).

``waferllm`` is :class:`llm.decode.Decoder` itself; ``megatron``, ``ladder`` and ``t10`` are
:class:`llm.strategies.base.StrategyDecoder` with that system's GEMVs (one module each).
"""
from __future__ import annotations

STRATEGIES = ("waferllm", "megatron", "ladder", "t10")


def decoder_class(strategy: str):
    """The decoder class of ``strategy`` (its constructor takes :class:`llm.decode.Decoder`'s
    arguments)."""
    from ..decode import Decoder
    if strategy == "waferllm":
        return Decoder
    from .base import bind
    if strategy == "megatron":
        from .megatron import Megatron as mapping
    elif strategy == "ladder":
        from .ladder import Ladder as mapping
    elif strategy == "t10":
        from .t10 import T10 as mapping
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    return bind(mapping())
