"""One request's state inside the engine: its tokens, how many of them have KV in the cache, its blocks.

The scheduler, the block manager and the model runner all read and advance this one object, so it
lives apart from each of them.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from worker.engine.types import FinishReason, SamplingParams

_request_ids = itertools.count()


class Cancellation:
    """A future's done callback that notes a cancellation in a plain flag. It holds nothing of the sequence,
    so the future (which keeps it) and the sequence (which keeps both) make no reference cycle."""

    def __init__(self) -> None:
        self.is_set = False

    def __call__(self, future: Future) -> None:
        if future.cancelled():
            self.is_set = True


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prompt_token_ids: list[int]
    sampling: SamplingParams
    future: Future = field(default_factory=Future)
    request_id: int = field(default_factory=lambda: next(_request_ids))
    token_ids: list[int] = field(init=False)  # prompt then generated tokens
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)  # KV block ids, in position order
    num_hashed_blocks: int = 0  # leading full blocks already published to the prefix cache
    last_block_hash: int | None = None  # chain hash of the last of those blocks
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    text: str | None = None  # set when a stop string cut the output
    random_generator: Any = None  # the sampler's per-request torch.Generator, made on first use
    logprobs: list[Any] = field(default_factory=list)  # per output token, when sampling.logprobs is set
    pending_logprob: Any = None  # the sampled token's, until the engine appends the token (EOS is not)
    grammar_matcher: Any = None  # structured output: xgrammar's matcher of this sequence (worker/engine/grammar.py)
    grammar_token_to_accept: int | None = None  # sampled, not yet taken by the matcher (it is, before the next mask)
    # Another choice of the same request (LLMEngine.submit_choices): this one is admitted once that one's prompt
    # is computed, so that it reuses the prompt's KV blocks from the prefix cache instead of prefilling it again.
    prefill_after: Sequence | None = None
    # Tokens sampled by steps still on the GPU (worker/engine/engine.py overlaps a decode step with the host
    # work of the one before): they count toward the sequence's length, and the next step reads its input
    # token from the GPU, but token_ids gets them only once the host has read them.
    num_pending_tokens: int = 0
    cancellation: Cancellation = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.cancellation = Cancellation()
        self.future.add_done_callback(self.cancellation)

    @property
    def is_cancelled(self) -> bool:
        """Whether the owner cancelled the request's future. Read each step for every sequence, so without the
        lock `Future.cancelled()` takes (half a millisecond a step at batch 1024)."""
        return self.cancellation.is_set

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_is_computed(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens or self.status is SequenceStatus.FINISHED

    @property
    def num_tokens(self) -> int:
        """Its length: the tokens it holds and those sampled but not yet read back from the GPU."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
