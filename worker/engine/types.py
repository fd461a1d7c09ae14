"""The engine's public vocabulary: what goes in (sampling), what comes out (completion), what can fail.

Kept free of torch so that the worker and the tests can import it cheaply.
"""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: -2..2
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # a bias of -100 bans the token outright (worker/engine/sampler.py)


@dataclass(frozen=True)
class GrammarRequest:
    """Structured output: decoding is constrained to JSON (`json_object`) or to JSON valid against `schema`
    (`json_schema`, the schema as JSON text). worker/engine/grammar.py compiles it."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (OpenAI names where they exist)."""

    max_tokens: int = 256  # DEEPBATCH_DEFAULT_MAX_TOKENS, when a request gives none and the setting is unset
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks generate exactly max_tokens
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence of the token in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit); -100 bans the token
    grammar: GrammarRequest | None = None
    logprobs: int | None = None  # None: none; k: each output token's log-probability and the k likeliest (k <= 20)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidSamplingError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidSamplingError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidSamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidSamplingError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise InvalidSamplingError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for token_id, bias in self.logit_bias:
            if token_id < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidSamplingError(f"logit_bias needs token ids >= 0 and biases in [-100, 100], "
                                           f"got {token_id}: {bias}")

        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidSamplingError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


TokenLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclass
class Completion:
    """The outcome of one request: generated tokens, their text and why generation stopped."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    # When asked (SamplingParams.logprobs): per output token, (token id, log-probability, the likeliest tokens
    # as [(token id, log-probability)], most likely first), from the distribution it was sampled from.
    logprobs: list[TokenLogprob] | None = None
    completion_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.completion_tokens = len(self.token_ids)


FATAL_EXIT_CODE = 70  # sysexits' EX_SOFTWARE: the worker's engine stopped (a rank or the engine's process died)


def resolve_future(future: Future, result: Completion | None = None, error: BaseException | None = None) -> None:
    """Sets the outcome unless the caller cancelled the future (or it is already set)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


CPU_BATCH = 32  # the batch on a CPU, and of engines that answer at once (worker/engine/sizing.py says why)


@dataclass(frozen=True)
class EngineConfig:
    """How to build an engine. These defaults are the deployment's too: the worker passes only the settings
    given (worker/runtime.py), so each is written here once."""

    model: str  # a built-in name, a .gguf file, or a local checkpoint directory (the deployment's default: Settings)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    seed: int = 0  # random weights of the built-in models come from this seed
    max_batch_size: int | None = None  # most sequences in one decode step; None: sized from the device (sizing.py)
    max_wait_ms: float = 20.0  # how long a lone request waits for company before a step starts
    max_num_batched_tokens: int | None = None  # token budget of one step (prefill chunks + decodes); None: as above
    max_model_len: int = 4096  # prompt + completion
    kv_block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int | None = None  # None: sized from free memory
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    use_paged_kernel: bool | None = None  # None: on a GPU. True on the CPU needs TRITON_INTERPRET=1 (tests)
    use_cuda_graphs: bool = True  # decode steps replayed from CUDA graphs (GPU only)
    quantization: str | None = None  # none | fp8: linear weights FP8 in 128x128 blocks (layers/linear.py)
    tensor_parallel_size: int = 1  # ranks (processes, one per GPU) the model is split over (worker/engine/parallel.py)


class EngineError(Exception):
    """Base of every error the engine reports for a request. `code` is what the request's row and the
    error file say (snake_case, as every error code; README "Error codes")."""

    code: str


class TransientEngineError(EngineError):
    """Worth retrying: the same request may succeed later (out of memory, a lost device)."""

    code = "engine_unavailable"


class PermanentEngineError(EngineError):
    """Never worth retrying: the request itself is at fault."""

    code = "invalid_request"


class PromptTooLongError(PermanentEngineError):
    """The prompt (plus at least one generated token) does not fit the model's context."""

    code = "prompt_too_long"


class InvalidSamplingError(PermanentEngineError, ValueError):
    """A sampling parameter is out of range."""

    code = "invalid_sampling"
