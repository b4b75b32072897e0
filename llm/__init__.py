"""LLaMA on the emulated wafer: configs, checkpoints, tokenizer, numpy reference model (PAPER.md section 4-7)."""
