"""PromptEncoder.token_bytes: each token's bytes, exact where decoding a lone token loses a split character;
the bytes of a text's tokens, joined, are the text's UTF-8."""

from __future__ import annotations

import pytest

from worker.engine.tokenizer import PromptEncoder, load_tokenizer

TEXT = "Plain words, café, 東京 and 😀 emoji,\ttabs\nand a NUL \x00 too."


@pytest.mark.parametrize("model", ["tiny-deepseek-v3", "smollm2-135m-instruct"])
def test_token_bytes_join_into_the_text(model):
    encoder = PromptEncoder(load_tokenizer(model))
    token_ids = encoder.tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = [encoder.token_bytes(token_id) for token_id in token_ids]
    assert b"".join(pieces) == TEXT.encode()
    assert any(not piece.decode("utf-8", "ignore") for piece in pieces if piece)  # a split character's token
    eos = encoder.tokenizer.eos_token_id
    assert encoder.token_bytes(eos) == encoder.tokenizer.eos_token.encode()
    assert encoder.token_bytes(10**9) == b"" and encoder.token_bytes(-1) == b""
