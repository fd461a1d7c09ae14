"""Layers the engine's models share: linear projections (bf16 or FP8 block-scaled)."""
