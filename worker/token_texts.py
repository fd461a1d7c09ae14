"""The engine's log-probabilities (token ids) as a result stores them: each token's text and bytes.

The engine gives, per output token, (token id, log-probability, [(token id, log-probability), ...]); a result
keeps the tokens as text (schema/logprobs.py: `[token, logprob, bytes, top]`), since its readers (export,
the API's output files) have no tokenizer. This runs in the engine's step loop (the feeder's `_finished`),
only for requests that asked, so each id's text and bytes are worked out once per worker and kept.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Protocol

from schema.logprobs import UNLIKELIEST, TokenEntry
from worker.engine.types import TokenLogprob


class TokenBytes(Protocol):
    def token_bytes(self, token_id: int) -> bytes: ...


class TokenTexts:
    def __init__(self, encoder: TokenBytes):
        self.encoder = encoder
        self.known: dict[int, tuple[str, list[int] | None]] = {}
        self.lock = threading.Lock()

    def text_of(self, token_id: int) -> tuple[str, list[int] | None]:
        """A token's text (its bytes as UTF-8, a partial character as U+FFFD) and its bytes, None when they
        are that text's UTF-8."""
        found = self.known.get(token_id)
        if found is None:
            raw = self.encoder.token_bytes(token_id)
            text = raw.decode("utf-8", "replace")
            found = (text, None if text.encode("utf-8") == raw else list(raw))
            with self.lock:
                self.known[token_id] = found
        return found

    def entries(self, logprobs: list[TokenLogprob] | None) -> list[TokenEntry] | None:
        if logprobs is None:
            return None
        text_of = self.text_of
        return [[*_entry(text_of(token_id), logprob), [_entry(text_of(t), p) for t, p in top]]
                for token_id, logprob, top in logprobs]


def _entry(text: tuple[str, list[int] | None], logprob: float) -> list[Any]:
    return [text[0], logprob if math.isfinite(logprob) else UNLIKELIEST, text[1]]
