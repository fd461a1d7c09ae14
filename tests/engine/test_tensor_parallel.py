"""Tensor and expert parallelism on the CPU: two ranks (two processes over gloo) compute what one does.

Each architecture runs the same requests on an engine of one rank and one of two, in float32, where a
sum taken in another order (the all-reduce of two partial products) moves a logit by ~1e-6 of its size:
far less than the gap between the best two tokens, so the greedy tokens must agree exactly, and the
logits within a tolerance set a few times above that rounding. A seeded sampled request shows that
sampling on rank 0 alone draws the same tokens. Then the failure case: a rank killed mid-generation
ends the engine within seconds, with an error that names it, and the process of the worker's engine
(`build_engine`) exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.engine.helpers import ARCHITECTURES, random_prompts
from worker.engine.block_manager import PrefixMatch
from worker.engine.engine import FATAL_EXIT_CODE, LLMEngine
from worker.engine.parallel import RankFailedError, TensorParallelError
from worker.engine.scheduler import ScheduledSequence
from worker.engine.sequence import Sequence
from worker.engine.types import EngineConfig, SamplingParams

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
PROMPT_LENGTHS = [3, 21, 9, 17]


def prefill_logits(engine: LLMEngine, prompt_token_ids: list[int]) -> torch.Tensor:
    """The next-token logits after a prompt, through the engine's runner (every rank takes part). The test
    thread borrows the block manager while the engine is idle between generates."""
    sequence = Sequence(prompt_token_ids, SamplingParams())
    engine.block_manager.admit(sequence, PrefixMatch(), len(prompt_token_ids))
    try:
        _, logits = engine.runner.step_logits([ScheduledSequence(sequence, len(prompt_token_ids))])
    finally:
        engine.block_manager.free(sequence)
    return logits[0]


def tokens_and_logits(engine: LLMEngine, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    samplings = [GREEDY] * (len(prompts) - 1) + [SEEDED]
    tokens = [completion.token_ids for completion in engine.generate(prompts, samplings)]
    return tokens, prefill_logits(engine, prompts[1])


@pytest.mark.parametrize("model_name", ARCHITECTURES)
def test_two_ranks_match_one(make_engine, model_name):
    prompts = random_prompts(PROMPT_LENGTHS, seed=8)
    one_rank = make_engine(model=model_name)
    expected_tokens, expected_logits = tokens_and_logits(one_rank, prompts)
    two_ranks = make_engine(model=model_name, tensor_parallel_size=2)
    assert two_ranks.runner.ranks.shard.size == 2 and two_ranks.model.shard.rank == 0
    tokens, logits = tokens_and_logits(two_ranks, prompts)
    assert tokens == expected_tokens
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)


def test_a_model_that_does_not_split_is_refused_by_name(tokenizer):
    with pytest.raises(TensorParallelError, match="tensor_parallel_size=3 does not divide the model's 4 attention"):
        LLMEngine(EngineConfig(model="tiny-qwen2", tensor_parallel_size=3), tokenizer=tokenizer)


def test_a_killed_rank_ends_the_engine_naming_it(tokenizer):
    fatal_errors: list[Exception] = []
    engine = LLMEngine(EngineConfig(model="tiny-deepseek-v3", tensor_parallel_size=2, max_wait_ms=1),
                       tokenizer=tokenizer, on_fatal_error=fatal_errors.append)
    try:
        futures = [engine.submit(prompt, SamplingParams(max_tokens=3000, ignore_eos=True))
                   for prompt in random_prompts([5, 8])]
        while engine.stats()["batch_size"] == 0:  # generating
            time.sleep(0.01)
        rank_1 = engine.runner.ranks.processes[0]
        killed_at = time.monotonic()
        os.kill(rank_1.pid, signal.SIGKILL)
        for future in futures:
            with pytest.raises(RankFailedError, match=rf"rank 1 \(pid {rank_1.pid}\) died \(killed by SIGKILL\)"):
                future.result(timeout=10)
        assert time.monotonic() - killed_at < 5
        assert [str(error) for error in fatal_errors] == [str(engine._fatal_error)]
        with pytest.raises(RankFailedError, match="rank 1"):
            engine.submit([5, 6], GREEDY).result(timeout=5)
    finally:
        engine.shutdown()


WORKER_ENGINE_SCRIPT = """
import os, signal, time
from worker.engine.engine import build_engine
from worker.engine.types import EngineConfig, SamplingParams

if __name__ == "__main__":
    engine = build_engine(EngineConfig(model="tiny-qwen2", tensor_parallel_size=2, max_wait_ms=1))
    engine.submit([5, 6, 7], SamplingParams(max_tokens=3000, ignore_eos=True))
    while engine.stats()["batch_size"] == 0:
        time.sleep(0.01)
    os.kill(engine.runner.ranks.processes[0].pid, signal.SIGKILL)
    time.sleep(60)  # the engine ends the process long before
"""


def test_the_worker_engine_exits_its_process_when_a_rank_dies(tmp_path):
    """What `deepbatch worker` builds (worker/runtime.py calls build_engine): its process ends, naming the rank."""
    script = tmp_path / "worker_engine.py"
    script.write_text(WORKER_ENGINE_SCRIPT)
    repository = Path(__file__).resolve().parents[2]
    completed = subprocess.run([sys.executable, str(script)], cwd=repository, capture_output=True, text=True,
                               timeout=120, env={**os.environ, "PYTHONPATH": str(repository)})
    assert completed.returncode == FATAL_EXIT_CODE, completed.stderr[-2000:]
    assert "rank 1" in completed.stderr and "killed by SIGKILL" in completed.stderr
