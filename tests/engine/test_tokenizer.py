"""Batch encoding (the worker encodes a claim's prompts together) gives each prompt's own ids; a built-in
model's tokenizer gives only ids inside its vocabulary."""

from __future__ import annotations

import pytest

from worker.engine.configs import BUILTIN_CONFIGS, builtin_config
from worker.engine.tokenizer import PromptEncoder, load_tokenizer


def test_encode_many_matches_encoding_one_by_one(tokenizer) -> None:
    encoder = PromptEncoder(tokenizer)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, 世界! Why?"}]
    prompts = ["The capital of France is", chat, "  leading spaces\tand\nnewlines", "数学 and émojis 🙂"]
    expected = [encoder.encode_prompt(p) if isinstance(p, str) else encoder.encode_chat(p) for p in prompts]
    assert encoder.encode_many(prompts) == expected
    assert encoder.encode_many([]) == []


ENGLISH = ("Summarize the following paragraph in two sentences. Photosynthesis is the process by which green "
           "plants, algae and some bacteria convert light energy into chemical energy, storing it in glucose; "
           "it releases oxygen as a by-product and underpins nearly every food chain on Earth. Explain why the "
           "sky appears blue during the day but red at sunset, and list three consequences for photography.")


@pytest.mark.parametrize("model", [*BUILTIN_CONFIGS, "shape-deepseek-v3-layers-2"])
def test_a_built_in_models_tokenizer_stays_inside_its_vocabulary(model: str) -> None:
    """Plain English, as a completion and as a chat, encodes to ids the model has rows for (V2-Lite's shape
    has 102,400; DeepSeek-V3's tokenizer as it is reaches 129,280)."""
    vocab_size = builtin_config(model).vocab_size
    encoder = PromptEncoder(load_tokenizer(model))
    sentences = ENGLISH.split(". ")
    encoded = encoder.encode_many([ENGLISH, *sentences, [{"role": "user", "content": ENGLISH}]])
    assert max(max(token_ids) for token_ids in encoded) < vocab_size
    assert encoder.decode(encoder.encode_prompt(ENGLISH)) == ENGLISH
