"""The worker's pure helpers: sampling from a request body, retry backoff, settings URLs."""

from __future__ import annotations

import pytest

from schema.settings import Settings
from worker.engine.types import InvalidSamplingError
from worker.feeder import sampling_from_body
from worker.retries import backoff_seconds


def test_sampling_uses_openai_defaults_and_the_request_values() -> None:
    assert sampling_from_body({"prompt": "x"}, 16).temperature == 1.0
    sampling = sampling_from_body({"max_tokens": 5, "temperature": 0, "stop": "\n", "seed": 3}, 16)
    assert (sampling.max_tokens, sampling.greedy, sampling.stop, sampling.seed) == (5, True, ("\n",), 3)
    assert sampling_from_body({"max_completion_tokens": 9}, 16).max_tokens == 9
    assert sampling_from_body({}, 16).max_tokens == 16


def test_invalid_sampling_is_a_permanent_error() -> None:
    with pytest.raises(InvalidSamplingError):
        sampling_from_body({"top_p": 0}, 16)


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
