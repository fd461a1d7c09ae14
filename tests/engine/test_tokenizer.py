"""Batch encoding (the worker encodes a claim's prompts together) gives each prompt's own ids."""

from __future__ import annotations

from worker.engine.tokenizer import PromptEncoder


def test_encode_many_matches_encoding_one_by_one(tokenizer) -> None:
    encoder = PromptEncoder(tokenizer)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, 世界! Why?"}]
    prompts = ["The capital of France is", chat, "  leading spaces\tand\nnewlines", "数学 and émojis 🙂"]
    expected = [encoder.encode_prompt(p) if isinstance(p, str) else encoder.encode_chat(p) for p in prompts]
    assert encoder.encode_many(prompts) == expected
    assert encoder.encode_many([]) == []
