"""n: choices per request. Lines take 1..16; each choice gets its own SamplingParams (seed, seed + 1, ...); the
gathered outcome is every choice or the first error (the rest cancelled); output lines list every choice."""

from __future__ import annotations

import json
from concurrent.futures import Future

import pytest

from schema.cache import result_cache_key
from schema.lines import LineError, output_line, parse_line
from worker.choices import gather_choices, submit_choices
from worker.engine.types import Completion, SamplingParams
from worker.sampling import choice_sampling_params


def chat(**body) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], **body})


def test_n_gives_one_sampling_per_choice():
    assert len(choice_sampling_params(parse_line(chat(), 1).body, None)) == 1
    seeded = choice_sampling_params(parse_line(chat(n=3, seed=10, temperature=1), 1).body, None)
    assert [sampling.seed for sampling in seeded] == [10, 11, 12]
    unseeded = choice_sampling_params(parse_line(json.dumps({"prompt": "a", "n": 16}), 1).body, None)
    assert len(unseeded) == 16 and {sampling.seed for sampling in unseeded} == {None}


@pytest.mark.parametrize("n", [0, 17, 2.0, True])
def test_n_out_of_range_is_a_line_error(n):
    with pytest.raises(LineError) as raised:
        parse_line(chat(n=n), 1)
    assert "n" in raised.value.message and raised.value.code == "invalid_request"


def test_the_cache_key_tells_n_apart():
    keys = {result_cache_key("m", "/v1/chat/completions", parse_line(chat(temperature=0, **extra), 1).body, "o")
            for extra in ({}, {"n": 2}, {"n": 3})}
    assert len(keys) == 3


def completion(text: str) -> Completion:
    return Completion([1, 2], text, "length", 4)


def test_gathered_choices_or_the_first_error():
    futures = [Future() for _ in range(3)]
    outcomes = []
    gather_choices(futures, lambda completions, error: outcomes.append((completions, error)))
    futures[2].set_result(completion("c"))
    futures[0].set_result(completion("a"))
    assert outcomes == []
    futures[1].set_result(completion("b"))
    assert [c.text for c in outcomes[0][0]] == ["a", "b", "c"] and outcomes[0][1] is None

    futures, outcomes = [Future() for _ in range(3)], []
    gather_choices(futures, lambda completions, error: outcomes.append((completions, error)))
    futures[0].set_result(completion("a"))
    futures[1].set_exception(RuntimeError("boom"))
    assert len(outcomes) == 1 and outcomes[0][0] is None and str(outcomes[0][1]) == "boom"
    assert futures[2].cancelled()


def test_an_engine_without_submit_choices_gets_one_submit_per_choice():
    class OneAtATime:
        def __init__(self):
            self.seeds = []

        def submit(self, prompt_token_ids, sampling):
            self.seeds.append(sampling.seed)
            future = Future()
            future.set_result(completion("x"))
            return future

    engine = OneAtATime()
    futures = submit_choices(engine, [1, 2], [SamplingParams(seed=seed) for seed in (5, 6)])
    assert len(futures) == 2 and engine.seeds == [5, 6]


@pytest.mark.parametrize("url", ["/v1/chat/completions", "/v1/completions"])
def test_output_lines_list_every_choice(url):
    more = [{"text": "two", "finish_reason": "stop", "completion_tokens": 1, "logprobs": None}]
    line = output_line(3, "r", url, "m", 0, "one", "length", 4, 3, None, more)
    body = line["response"]["body"]
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    assert [choice["finish_reason"] for choice in body["choices"]] == ["length", "stop"]
    texts = [choice["message"]["content"] if url == "/v1/chat/completions" else choice["text"]
             for choice in body["choices"]]
    assert texts == ["one", "two"] and body["usage"]["completion_tokens"] == 3
