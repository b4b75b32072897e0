"""Errors raised by the model side of ``llm`` (configs, checkpoints, tokenizers)."""


class ModelError(ValueError):
    """A model directory, config or checkpoint that cannot be used; the message says why."""
