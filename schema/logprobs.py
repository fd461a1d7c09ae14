"""Log-probabilities of a result: the form `results.logprobs` stores, and OpenAI's two output shapes; and
the further choices of a request with n > 1, as `results.choices` stores them.

The worker turns the engine's token ids into their text and bytes (worker/token_texts.py); what is stored
is one JSON array, an entry per output token:

    [token, logprob, bytes, top]    top: [[token, logprob, bytes], ...], most likely first

`token` is the token's text (its bytes decoded as UTF-8, a partial character as U+FFFD); `bytes` is null when
they are the token's text encoded as UTF-8 (nearly always), else the list of byte values (a token that holds
part of a character). A token's text can hold what PostgreSQL's jsonb cannot (U+0000, from a byte-level
vocabulary's token for it): it is stored escaped like a result's text (schema/stored_text.py), and read back
exact. A log-probability of minus infinity (a token the grammar or a logit_bias of -100 excludes, among the
alternatives) is stored and written as -9999.0, OpenAI's value for it: JSON has no infinity.

Output: chat's `choices[0].logprobs` is `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}],
"refusal": null}`; completions' is `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, whose
`top_logprobs` maps each alternative's text to its log-probability and, as OpenAI's does, holds the chosen
token too, and whose `text_offset` is each token's offset, in characters, in the generated text.
"""

from __future__ import annotations

import codecs
from typing import Any

from schema.stored_text import ESCAPE, from_stored, to_stored

UNLIKELIEST = -9999.0  # OpenAI's log-probability for a token that cannot be chosen

Alternative = list[Any]  # [token, logprob, bytes | None]
TokenEntry = list[Any]  # [token, logprob, bytes | None, [Alternative, ...]]


def to_stored_logprobs(entries: list[TokenEntry] | None) -> list[TokenEntry] | None:
    """The entries as `results.logprobs` holds them: token texts escaped where jsonb cannot hold them."""
    if entries is None:
        return None
    return [[to_stored(token), logprob, raw, [[to_stored(t), p, b] for t, p, b in top]]
            for token, logprob, raw, top in entries]


def from_stored_logprobs(stored: list[TokenEntry] | None) -> list[TokenEntry] | None:
    """What `to_stored_logprobs` was given, exactly."""
    if stored is None:
        return None
    return [[from_stored(token), logprob, raw, [[from_stored(t), p, b] for t, p, b in top]]
            for token, logprob, raw, top in stored]


def stored_choice(text: str, finish_reason: str, completion_tokens: int,
                  logprobs: list[TokenEntry] | None) -> dict[str, Any]:
    """A further choice of a request with n > 1, as `results.choices` holds it (its text and token texts
    escaped: schema/stored_text.py); the request's first choice is the result's own columns."""
    return {"text": text, "finish_reason": finish_reason, "completion_tokens": completion_tokens,
            "logprobs": logprobs}


def restored_choices(stored: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """`results.choices` as its writer was given them: texts and token texts restored."""
    if stored is None:
        return None
    return [{**choice, "text": from_stored(choice["text"]), "logprobs": from_stored_logprobs(choice["logprobs"])}
            for choice in stored]


def choices_hold_escapes(stored: list[dict[str, Any]] | None) -> bool:
    return stored is not None and any(ESCAPE in choice["text"] or holds_escapes(choice["logprobs"])
                                      for choice in stored)


def holds_escapes(stored: list[TokenEntry] | None) -> bool:
    """Whether a stored token text holds an escaped character (a restored one may not be UTF-8)."""
    return stored is not None and any(ESCAPE in token or any(ESCAPE in t for t, _, _ in top)
                                      for token, _, _, top in stored)


def token_bytes(token: str, raw: list[int] | None) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass")) if raw is None else raw


def chat_logprobs(entries: list[TokenEntry]) -> dict[str, Any]:
    """OpenAI chat's `choices[].logprobs`."""
    return {"content": [{"token": token, "logprob": logprob, "bytes": token_bytes(token, raw),
                         "top_logprobs": [{"token": t, "logprob": p, "bytes": token_bytes(t, b)} for t, p, b in top]}
                        for token, logprob, raw, top in entries],
            "refusal": None}


def completion_logprobs(entries: list[TokenEntry]) -> dict[str, Any]:
    """OpenAI completions' `choices[].logprobs`."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    # Offsets count the characters of the bytes so far; a character split over tokens counts once it is whole.
    decoder, characters = codecs.getincrementaldecoder("utf-8")("ignore"), 0
    for token, logprob, raw, top in entries:
        text_offset.append(characters)
        characters += len(decoder.decode(bytes(token_bytes(token, raw))))
        tokens.append(token)
        token_logprobs.append(logprob)
        alternatives = {t: p for t, p, _ in top}
        alternatives.setdefault(token, logprob)  # OpenAI's holds the chosen token as well
        top_logprobs.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}
