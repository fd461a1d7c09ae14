"""Layers the engine's models share: attention over the paged KV cache, linear projections (bf16 or FP8
block-scaled), the gated MLP, and the mixture of experts."""
