"""A request's sampling fields as the engine's SamplingParams: the one conversion, used by the feeder.

It lives in worker/ because that is the one package allowed to see both sides: imports run producer →
worker → schema, and the engine imports none of them. schema/lines.py reads a request (RequestSpec, its
body) and owns OpenAI's defaults for what a request leaves out; worker/engine/types.py owns SamplingParams
and the engine's defaults. This module only copies one into the other, field for field.
"""

from __future__ import annotations

import json
from dataclasses import replace

from schema.lines import ChatBody, CompletionBody, JsonObjectFormat, JsonSchemaFormat
from worker.engine.types import GrammarRequest, SamplingParams


def sampling_params(body: ChatBody | CompletionBody, default_max_tokens: int | None) -> SamplingParams:
    """default_max_tokens: for a request that gives none (DEEPBATCH_DEFAULT_MAX_TOKENS); None: the engine's."""
    max_tokens = body.requested_max_tokens or default_max_tokens
    return SamplingParams(
        **({"max_tokens": max_tokens} if max_tokens is not None else {}),
        temperature=body.sampling_temperature,
        top_p=body.sampling_top_p,
        top_k=body.sampling_top_k,
        seed=body.seed,
        stop=tuple(body.stop_strings),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=tuple(sorted(body.token_logit_bias.items())),
        grammar=grammar_request(body),
        logprobs=body.requested_logprobs,
    )


def choice_sampling_params(body: ChatBody | CompletionBody, default_max_tokens: int | None) -> list[SamplingParams]:
    """One SamplingParams per choice the body asks for (`n`): each samples on its own, so a seeded request's
    choices take the seeds seed, seed + 1, ... (a choice gives what a request with its seed alone gives)."""
    first = sampling_params(body, default_max_tokens)
    if body.choices == 1:
        return [first]
    return [first if first.seed is None else replace(first, seed=first.seed + index) for index in range(body.choices)]


def grammar_request(body: ChatBody | CompletionBody) -> GrammarRequest | None:
    """The body's response_format as the engine's grammar; None for text (or a completions body)."""
    response_format = getattr(body, "response_format", None)
    if isinstance(response_format, JsonObjectFormat):
        return GrammarRequest("json_object")
    if isinstance(response_format, JsonSchemaFormat):
        return GrammarRequest("json_schema", json.dumps(response_format.json_schema.json_schema, sort_keys=True))
    return None
