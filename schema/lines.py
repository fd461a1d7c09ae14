"""Input and output line formats.

Input: the OpenAI Batch line (`custom_id`, `method`, `url`, `body`) for `/v1/chat/completions` and
`/v1/completions`, or a plain line (`{"prompt": ...}` or `{"messages": [...]}` with optional
`custom_id` and sampling parameters). Both normalise to a `RequestSpec`: what the worker needs.
What a request asks of the engine, OpenAI's defaults included, is read off its body here (`SamplingFields`);
worker/sampling.py only copies it into the engine's SamplingParams. Output: the OpenAI Batch output and
error line formats.

Parsing has two paths with one outcome. The fast path hands the raw line to pydantic's JSON parser
once, with a model shaped like the line's form (no `json.loads`, no dict validated field by field in
Python): a large file's valid lines take it, 1.3 to 2 times as fast (measured). Whatever it does not take goes
to the reference path (`json.loads`, then the models below), which decides, and words the error.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schema.logprobs import chat_logprobs, completion_logprobs

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
Url = Literal["/v1/chat/completions", "/v1/completions"]
# OpenAI's defaults for a request that leaves them out (the engine's own temperature default is greedy).
OPENAI_TEMPERATURE = 1.0
OPENAI_TOP_P = 1.0
NO_TOP_K = 0  # OpenAI has no top_k; 0 cuts nothing
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: -100..100
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs: 0..20
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs: 0..5
MAX_CHOICES = 16  # n: choices per request, sharing the prompt's prefill
# OpenAI parameters DeepBatch refuses, and why; a line giving one fails naming it (README "OpenAI parameters").
# Any other unknown key is refused too, as an unknown parameter.
REFUSED_PARAMETERS = {
    "response_format": "structured output is a chat parameter (/v1/chat/completions)",
    "best_of": "choices are not ranked: n returns every choice",
    "echo": "the prompt is not returned",
    "suffix": "insertion is not supported",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "stream_options": "batch results are not streamed",
    "modalities": "text output only",
    "audio": "text output only",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "no reasoning models are served",
    "service_tier": "there is one service tier",
    "store": "completions are not stored for distillation or evals",
    "metadata": "request metadata is not stored",
    "web_search_options": "web search is not supported",
}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class SamplingFields(BaseModel):
    """The OpenAI parameters DeepBatch honours; any other key is an error, so nothing is silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    stream: Literal[False] | None = None
    user: str | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, logit_bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in logit_bias or {}:
            if not key.isdigit() or not key.isascii():
                raise ValueError(f"logit_bias keys are token ids (non-negative integers as strings), got {key!r}")
        return logit_bias

    # What the request asks for, with OpenAI's defaults for what it leaves out: the worker hands these to the
    # engine (worker/sampling.py) and the result cache keys only greedy requests (schema/cache.py).
    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def sampling_temperature(self) -> float:
        return OPENAI_TEMPERATURE if self.temperature is None else self.temperature

    @property
    def sampling_top_p(self) -> float:
        return OPENAI_TOP_P if self.top_p is None else self.top_p

    @property
    def sampling_top_k(self) -> int:
        return NO_TOP_K if self.top_k is None else self.top_k

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_tokens`, or its newer name `max_completion_tokens`; None: the deployment's default."""
        return self.max_tokens or self.max_completion_tokens

    @property
    def token_logit_bias(self) -> dict[int, float]:
        """logit_bias with its keys as token ids (a later duplicate of one id wins, as in json.loads)."""
        return {int(key): value for key, value in (self.logit_bias or {}).items()}

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def is_greedy(self) -> bool:
        """Temperature 0 or top_k 1: the output is a function of the model and the prompt alone."""
        return self.sampling_temperature == 0 or self.sampling_top_k == 1


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    json_schema: Annotated[dict[str, Any], Field(alias="schema")] = Field(default_factory=dict)
    strict: bool | None = None

    @field_validator("json_schema")
    @classmethod
    def _compiles(cls, json_schema: dict[str, Any]) -> dict[str, Any]:
        problem = schema_problem(json.dumps(json_schema, sort_keys=True))
        if problem is not None:
            raise ValueError(f"the schema cannot be compiled into a grammar: {problem}")
        return json_schema


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


@functools.lru_cache(maxsize=256)
def schema_problem(schema_json: str) -> str | None:
    """Why xgrammar cannot turn this JSON schema into a grammar, or None when it can. The grammar does not
    depend on a tokenizer, so a schema the worker could not constrain decoding with fails here, at submit."""
    import xgrammar  # only lines with a json_schema pay for the import

    try:
        xgrammar.Grammar.from_json_schema(schema_json, strict_mode=True)
    except Exception as error:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError/its own types
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return re.sub(r"^\[[\d:.]+\] \S+:\d+: ", "", lines[0])  # xgrammar's "[time] file.cc:line: " prefix
    return None


class ChatBody(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatBody:
        if self.top_logprobs is not None and self.logprobs is not True:
            raise ValueError("top_logprobs requires logprobs: true (as OpenAI's chat completions do)")
        return self

    @property
    def requested_logprobs(self) -> int | None:
        """How many likeliest alternatives to give with each output token's log-probability; None: none."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_input(self) -> list[dict[str, str]]:
        """The messages as the prompt encoder takes them (worker/engine/tokenizer.py)."""
        return self.model_dump(include={"messages"}, exclude_none=True)["messages"]


class CompletionBody(SamplingFields):
    prompt: str
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None

    @property
    def requested_logprobs(self) -> int | None:
        """As ChatBody's: completions' `logprobs` is the number of alternatives itself."""
        return self.logprobs

    def prompt_input(self) -> str:
        return self.prompt


CustomId = Annotated[str, Field(min_length=1, max_length=512)]


class OpenAIBatchLine(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    custom_id: CustomId
    method: Literal["POST"]
    url: Url
    body: dict[str, Any]


class PlainLine(SamplingFields):
    """`{"prompt": "..."}` or `{"messages": [...]}`; custom_id defaults to the line number."""

    custom_id: CustomId | None = None
    response_format: ResponseFormat | None = None  # messages only: ChatBody has it, CompletionBody refuses it
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    # chat's (a flag, with top_logprobs) or completions' (a count): ChatBody or CompletionBody checks which
    logprobs: bool | int | None = None
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _one_input(self) -> PlainLine:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a plain line needs exactly one of 'prompt' or 'messages'")
        return self


class RequestSpec(BaseModel):
    """One validated request, as stored in the `requests.body` column and read back by the worker."""

    custom_id: str
    url: Url
    body: ChatBody | CompletionBody

    def body_json(self) -> dict[str, Any]:
        return self.body.model_dump(exclude_none=True)


# The fast path's models, one per accepted form. Each accepts only lines that the reference path accepts
# as the same request: extra keys are forbidden throughout, a batch line must have `url`, `body` and
# `method` (so the reference reads it as one too) and a plain line can have none of them.
class PlainPromptLine(CompletionBody):
    custom_id: CustomId | None = None


class PlainChatLine(ChatBody):
    custom_id: CustomId | None = None


class BatchChatLine(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    custom_id: CustomId
    method: Literal["POST"]
    url: Literal["/v1/chat/completions"]
    body: ChatBody


class BatchCompletionLine(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    custom_id: CustomId
    method: Literal["POST"]
    url: Literal["/v1/completions"]
    body: CompletionBody


TEXT_MARKERS = ('"url"', f'"{CHAT_URL}"', '"messages"')
BYTES_MARKERS = tuple(marker.encode() for marker in TEXT_MARKERS)


def fast_line_model(raw: str | bytes) -> type[BaseModel]:
    """Which form the line looks like. Only a guess to save trying all four: a wrong one fails to validate."""
    url_key, chat_url, messages_key = TEXT_MARKERS if isinstance(raw, str) else BYTES_MARKERS
    if url_key in raw:
        return BatchChatLine if chat_url in raw else BatchCompletionLine
    return PlainChatLine if messages_key in raw else PlainPromptLine


def parse_line_fast(raw: str | bytes, line_no: int) -> RequestSpec | None:
    """The request of a well-formed line in one pass of pydantic's JSON parser; None when the line needs the
    reference path (it is invalid, or written in a way the guess or the parser does not take)."""
    try:
        line = fast_line_model(raw).model_validate_json(raw)
    except ValidationError:
        return None
    if isinstance(line, (BatchChatLine, BatchCompletionLine)):
        return RequestSpec(custom_id=line.custom_id, url=line.url, body=line.body)
    # As the reference path builds it: the body of the fields given and not null (cheaper than model_construct).
    values = {name: value for name, value in line.__dict__.items() if value is not None and name != "custom_id"}
    if isinstance(line, PlainChatLine):
        return RequestSpec(custom_id=line.custom_id or str(line_no), url=CHAT_URL, body=ChatBody(**values))
    return RequestSpec(custom_id=line.custom_id or str(line_no), url=COMPLETIONS_URL, body=CompletionBody(**values))


class LineError(Exception):
    """A line that cannot become a request; the message names what is wrong."""

    def __init__(self, code: str, message: str, custom_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.custom_id = custom_id


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """Each problem as `body.max_tokens: Input should be greater than or equal to 1`, joined by '; '."""
    problems = []
    for item in error.errors():
        where = prefix + ".".join(str(part) for part in item["loc"]) if item["loc"] else "line"
        problems.append(f"{where}: {refusal_reason(item) or item['msg']}")
    return "; ".join(problems)


def refusal_reason(item: Any) -> str | None:
    """A refused OpenAI parameter named with why; an unknown key said to be one (never silently ignored)."""
    name = item["loc"][-1] if item["loc"] else None
    if item["type"] == "extra_forbidden":
        if name in REFUSED_PARAMETERS:
            return f"OpenAI's parameter '{name}' is not supported by DeepBatch: {REFUSED_PARAMETERS[name]}"
        return f"unknown parameter '{name}' (README \"OpenAI parameters\" lists those DeepBatch takes)"
    return None


class BodyError(ValueError):
    """The `body` of an OpenAI Batch line is invalid; the message names the fields under `body.`."""


def parse_body(url: str, body: dict[str, Any]) -> ChatBody | CompletionBody:
    """A batch line's body, or a stored one read back (the worker reads `requests.body` through this)."""
    model = ChatBody if url == CHAT_URL else CompletionBody
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise BodyError(describe_validation_error(error, prefix="body.")) from None


def parse_line(text: str, line_no: int) -> RequestSpec:
    """Validate one line of an input file; raises LineError naming the fault."""
    return parse_line_fast(text, line_no) or parse_line_reference(text, line_no)


def parse_line_reference(text: str, line_no: int) -> RequestSpec:
    """The path that decides every line the fast path does not take, and words its error."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise LineError("invalid_json", f"invalid JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(document, dict):
        raise LineError("invalid_request", f"a line must be a JSON object, got {type(document).__name__}")
    custom_id = document.get("custom_id") if isinstance(document.get("custom_id"), str) else None
    try:
        if {"url", "body", "method"} & document.keys():
            line = OpenAIBatchLine.model_validate(document)
            return RequestSpec(custom_id=line.custom_id, url=line.url, body=parse_body(line.url, line.body))
        return plain_to_spec(PlainLine.model_validate(document), line_no)
    except ValidationError as error:
        raise LineError("invalid_request", describe_validation_error(error), custom_id) from None
    except BodyError as error:
        raise LineError("invalid_request", str(error), custom_id) from None


def plain_to_spec(plain: PlainLine, line_no: int) -> RequestSpec:
    fields = plain.model_dump(exclude_none=True, exclude={"custom_id", "prompt", "messages"})
    if plain.messages is not None:
        body: ChatBody | CompletionBody = ChatBody(messages=plain.messages, **fields)
        url: Url = CHAT_URL
    else:
        body, url = CompletionBody(prompt=plain.prompt or "", **fields), COMPLETIONS_URL
    return RequestSpec(custom_id=plain.custom_id or str(line_no), url=url, body=body)


def output_line(
    request_id: int, custom_id: str, url: str, model: str, created: int, text: str,
    finish_reason: str, prompt_tokens: int, completion_tokens: int, logprobs: list[Any] | None = None,
    more_choices: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A line of the OpenAI Batch output file; `logprobs` as results.logprobs holds them, restored
    (schema/logprobs.py), when the request asked for them; `more_choices`, a request's choices after the
    first (n > 1), as results.choices holds them, restored. `completion_tokens` counts every choice's."""
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    first = {"text": text, "finish_reason": finish_reason, "logprobs": logprobs}
    choices = [output_choice(url, index, choice) for index, choice in enumerate([first, *(more_choices or [])])]
    if url == CHAT_URL:
        body = {"id": f"chatcmpl-{request_id}", "object": "chat.completion"}
    else:
        body = {"id": f"cmpl-{request_id}", "object": "text_completion"}
    body.update(created=created, model=model, choices=choices, usage=usage)
    response = {"status_code": 200, "request_id": f"req_{request_id}", "body": body}
    return {"id": f"batch_req_{request_id}", "custom_id": custom_id, "response": response, "error": None}


def output_choice(url: str, index: int, choice: dict[str, Any]) -> dict[str, Any]:
    """One of `choices`: {"text", "finish_reason", "logprobs"} in the endpoint's shape."""
    logprobs = choice["logprobs"]
    if url == CHAT_URL:
        shaped: dict[str, Any] = {"index": index, "message": {"role": "assistant", "content": choice["text"]}}
        shaped["logprobs"] = None if logprobs is None else chat_logprobs(logprobs)
    else:
        shaped = {"index": index, "text": choice["text"],
                  "logprobs": None if logprobs is None else completion_logprobs(logprobs)}
    shaped["finish_reason"] = choice["finish_reason"]
    return shaped


def error_line(request_id: int, custom_id: str | None, line_no: int, code: str, message: str) -> dict[str, Any]:
    """A line of the OpenAI Batch error file; `line` tells which input line it answers."""
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message, "line": line_no},
    }
