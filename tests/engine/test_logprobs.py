"""Log-probabilities with the packaged SmolLM2 (GGUF, CPU): each output token's log-probability and its top
alternatives equal those of a float32 reference computed by transformers on the same GGUF file, within
TOLERANCE; the top list is sorted and holds the chosen token with the same value."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker.engine.configs import packaged_model_path
from worker.engine.engine import LLMEngine
from worker.engine.tokenizer import PromptEncoder
from worker.engine.types import EngineConfig, SamplingParams

SMOLLM = "smollm2-135m-instruct"
TOLERANCE = 2e-3  # nats: both run float32 on the CPU, in a different order of operations
QUESTIONS = ["What is the capital of France?", "List three fruits.", "Write one sentence about the sea."]


@pytest.fixture(scope="module")
def engine():
    with LLMEngine(EngineConfig(model=SMOLLM, device="cpu", max_wait_ms=20)) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference():
    import gguf

    path = Path(packaged_model_path(SMOLLM))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def reference_log_probabilities(reference, prompt: list[int], output: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = reference(torch.tensor([prompt + output[:-1]]), logits_to_keep=len(output)).logits[0]
    return logits.float().log_softmax(-1)


def test_logprobs_equal_a_float32_transformers_reference(engine, reference):
    encoder = PromptEncoder(engine.tokenizer)
    prompts = [encoder.encode_chat([{"role": "user", "content": question}]) for question in QUESTIONS]
    completions = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, logprobs=5, ignore_eos=True))
    for prompt, completion in zip(prompts, completions):
        expected = reference_log_probabilities(reference, prompt, completion.token_ids)
        assert [entry[0] for entry in completion.logprobs] == completion.token_ids
        for position, (token_id, logprob, top) in enumerate(completion.logprobs):
            assert logprob == pytest.approx(expected[position, token_id].item(), abs=TOLERANCE)
            values, ids = expected[position].topk(5)
            assert [token for token, _ in top] == ids.tolist()
            assert [value for _, value in top] == pytest.approx(values.tolist(), abs=TOLERANCE)
            assert top[0] == (token_id, logprob)  # greedy: the chosen token is the likeliest


def test_sampled_tokens_logprobs_are_consistent_with_their_top_list(engine):
    encoder = PromptEncoder(engine.tokenizer)
    prompt = encoder.encode_chat([{"role": "user", "content": "Tell me a story."}])
    (completion,) = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=1.0, seed=7, logprobs=20))
    assert len(completion.logprobs) == completion.completion_tokens
    for token_id, logprob, top in completion.logprobs:
        values = [value for _, value in top]
        assert values == sorted(values, reverse=True) and len(top) == 20
        assert logprob <= values[0] + 1e-6
        assert dict(top).get(token_id, logprob) == pytest.approx(logprob)
        if logprob > values[-1] + 1e-6:
            assert token_id in dict(top)


def test_no_logprobs_unless_asked(engine):
    (completion,) = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    assert completion.logprobs is None
