"""Structured output: a request's JSON schema (or plain JSON object) as a grammar that masks its next token.

xgrammar does the work (the library vLLM and SGLang use; chosen over llguidance by measurement, README
"OpenAI parameters"): it compiles a schema against the tokenizer's vocabulary once, and a per-sequence
matcher then fills a bitmask of the tokens allowed next in microseconds. The compiler caches what it
compiled, keyed by the schema, so each distinct schema of an engine (one tokenizer) is compiled once.
Compiling happens in `LLMEngine.submit`, in the submitting thread, never in the step loop; the loop
only fills masks and advances matchers (worker/engine/sampler.py). Both run on the CPU while the GPU
computes the step's logits: the token a sequence sampled is taken by its matcher just before its next mask
is filled, after that step's forward pass was launched, not between the steps, where the GPU would wait.

Whitespace between JSON tokens is not free (`any_whitespace=False`): a small model let loose on
whitespace can spend its whole max_tokens on it. `json_object` is the schema `{"type": "object"}`.
"""

from __future__ import annotations

import threading
from typing import Any

from worker.engine.types import GrammarRequest, PermanentEngineError

JSON_OBJECT_SCHEMA = '{"type": "object"}'


class GrammarError(PermanentEngineError):
    """The request's schema cannot be compiled into a grammar (schema/lines.py refuses most such lines first)."""


class Grammars:
    """One engine's grammar compiler: a vocabulary (the tokenizer's, padded to the model's logits) and a cache."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def compiler(self) -> Any:
        with self._lock:  # built on first use: an engine that never sees a grammar never pays for the vocabulary
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=True)
            return self._compiler

    def matcher(self, request: GrammarRequest) -> Any:
        """A fresh matcher for one sequence, at the start of the grammar."""
        import xgrammar

        schema = JSON_OBJECT_SCHEMA if request.kind == "json_object" else request.schema
        try:
            compiled = self.compiler().compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        except Exception as error:  # noqa: BLE001 - xgrammar raises RuntimeError and its own types
            raise GrammarError(f"response_format: the schema cannot be compiled into a grammar: {error}") from None
        return xgrammar.GrammarMatcher(compiled)


class GrammarMasks:
    """The batch's token bitmask, kept from step to step: a step neither allocates [rows, vocab / 32] words
    (0.5 ms for 256 rows of a 152k vocabulary) nor copies them from pageable memory, which waits for the
    GPU. On a GPU the host side is pinned and its copy asynchronous: the step's own token readback, later
    on the same stream, completes it before the next step writes the host side again."""

    def __init__(self) -> None:
        self.host: Any = None
        self.on_device: Any = None

    def apply(self, logits: Any, sequences: list[Any]) -> None:
        """Sets to -inf, in place, the logits [rows, vocab] of the tokens each row's matcher (None:
        unconstrained) forbids next, each matcher having first taken the token its sequence sampled last.
        Only the constrained rows are filled and applied; the others' words are left as they were."""
        import xgrammar

        rows = [row for row, sequence in enumerate(sequences) if sequence.grammar_matcher is not None]
        if not rows:
            return
        host = self._host_rows(len(sequences), logits)
        for row in rows:
            take_sampled_token(sequences[row])
            sequences[row].grammar_matcher.fill_next_token_bitmask(host, row)
        bitmask = host
        if logits.device.type != "cpu":
            bitmask = self.on_device[: len(sequences)]
            bitmask.copy_(host, non_blocking=True)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, indices=rows)

    def _host_rows(self, rows: int, logits: Any) -> Any:
        import torch
        import xgrammar

        words = xgrammar.get_bitmask_shape(1, logits.shape[-1])[-1]
        if self.host is None or self.host.shape[0] < rows or self.host.shape[1] != words:
            pinned = logits.device.type == "cuda"
            self.host = torch.empty((max(rows, 64), words), dtype=torch.int32, pin_memory=pinned)
            if pinned:
                self.on_device = torch.empty_like(self.host, device=logits.device)
        return self.host[:rows]


def take_sampled_token(sequence: Any) -> None:
    """The matcher takes the token its sequence sampled last (a terminated matcher, whose grammar is complete,
    only ever saw the stop token it allows, which ends the sequence)."""
    matcher, token_id = sequence.grammar_matcher, sequence.grammar_token_to_accept
    if token_id is not None and not matcher.is_terminated():
        matcher.accept_token(token_id)
    sequence.grammar_token_to_accept = None
