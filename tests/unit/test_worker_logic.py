"""The worker's pure helpers: sampling from a request body, retry backoff, settings URLs."""

from __future__ import annotations

import pytest

from schema.lines import COMPLETIONS_URL, parse_body
from schema.settings import Settings
from worker.engine.types import InvalidSamplingError, SamplingParams
from worker.sampling import sampling_params
from worker.retries import backoff_seconds


def sampling(body: dict, default_max_tokens: int | None = 16):
    return sampling_params(parse_body(COMPLETIONS_URL, {"prompt": "x", **body}), default_max_tokens)


def test_sampling_uses_openai_defaults_and_the_request_values() -> None:
    defaults = sampling({})
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.max_tokens) == (1.0, 1.0, 0, 16)
    given = sampling({"max_tokens": 5, "temperature": 0, "stop": "\n", "seed": 3})
    assert (given.max_tokens, given.greedy, given.stop, given.seed) == (5, True, ("\n",), 3)
    assert sampling({"max_completion_tokens": 9}).max_tokens == 9
    assert sampling({"stop": ["a", "b"], "top_k": 1, "temperature": 0.7}).stop == ("a", "b")


def test_an_unset_default_max_tokens_is_the_engines() -> None:
    assert sampling({}, default_max_tokens=None).max_tokens == SamplingParams().max_tokens


def test_the_engine_and_the_cache_agree_on_greedy() -> None:
    for body in ({}, {"temperature": 0}, {"top_k": 1}, {"temperature": 0.5, "top_k": 2}):
        request = parse_body(COMPLETIONS_URL, {"prompt": "x", **body})
        assert sampling_params(request, 16).greedy == request.is_greedy


def test_invalid_sampling_is_a_permanent_error() -> None:
    with pytest.raises(InvalidSamplingError):
        SamplingParams(top_p=0)


def test_backoff_grows_exponentially_and_is_capped() -> None:
    assert all(0 <= backoff_seconds(1, 2.0, 300) <= 2.0 for _ in range(100))
    assert max(backoff_seconds(4, 2.0, 300) for _ in range(200)) > 8.0
    assert all(backoff_seconds(30, 2.0, 300) <= 300 for _ in range(100))


@pytest.mark.parametrize("url", ["postgresql://u@h/db", "postgres://u@h/db", "postgresql+psycopg://u@h/db"])
def test_database_url_gets_the_psycopg_driver(url: str) -> None:
    assert Settings(database_url=url).sqlalchemy_url == "postgresql+psycopg://u@h/db"


def test_a_non_postgres_url_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="DATABASE_URL"):
        _ = Settings(database_url="mysql://x").sqlalchemy_url


def test_the_pipeline_defaults_follow_the_batch_size() -> None:
    settings = Settings(max_batch_size=256)
    assert (settings.target_queue_depth, settings.slice_size, settings.worker_threads) == (512, 256, 4)
    assert Settings(max_batch_size=8).worker_threads == 3


def test_engine_errors_become_snake_case_codes() -> None:
    from worker.engine.types import InvalidSamplingError, PromptTooLongError, TransientEngineError
    from worker.retries import failure_for
    from worker.transitions import ClaimedRequest

    claim = ClaimedRequest(id=1, job_id="j", line_no=3, custom_id="c", url="/v1/completions", body={}, attempt=1,
                           max_attempts=3, cache_key=None, queued_seconds=0.0)
    settings = Settings(database_url="postgresql://x/y")
    codes = {type(error).__name__: failure_for(claim, error, settings).error_code for error in (
        PromptTooLongError("too long"), InvalidSamplingError("top_p"), TransientEngineError("oom"), RuntimeError("?"))}
    assert codes == {"PromptTooLongError": "prompt_too_long", "InvalidSamplingError": "invalid_sampling",
                     "TransientEngineError": "engine_unavailable", "RuntimeError": "internal_error"}


def test_component_settings_are_settings_fields_of_the_same_type() -> None:
    from schema.settings import EngineSettings, FeederSettings

    for component in (EngineSettings, FeederSettings):
        for name, field in component.model_fields.items():
            assert field.annotation == Settings.model_fields[name].annotation, (component.__name__, name)
        assert component.of(Settings()).model_dump() == Settings().model_dump(include=set(component.model_fields))


def test_the_engine_config_takes_the_settings_given_and_the_engines_defaults() -> None:
    from worker.engine.types import EngineConfig
    from worker.runtime import engine_config

    assert engine_config(Settings()) == EngineConfig(model=Settings().model)
    given = engine_config(Settings(model="tiny-qwen2", max_wait_ms=3, cuda_graphs=False, max_model_len=64))
    assert given == EngineConfig(model="tiny-qwen2", max_wait_ms=3, use_cuda_graphs=False, max_model_len=64)
