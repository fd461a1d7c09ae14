"""The engine's contract: futures from many threads, finish reasons, stop strings, typed errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.engine.helpers import random_prompts
from worker.engine.engine import build_engine
from worker.engine.types import (
    EngineConfig,
    PermanentEngineError,
    PromptTooLongError,
    SamplingParams,
    TransientEngineError,
)

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def test_max_tokens_finishes_with_length(make_engine, tokenizer):
    engine = make_engine(model="tiny-deepseek-v3")
    completion = engine.generate(random_prompts([5]), GREEDY)[0]
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 8
    assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_eos_finishes_with_stop_unless_ignored(make_engine):
    engine = make_engine(model="tiny-deepseek-v3")
    prompt = random_prompts([5])[0]
    free_run = engine.generate([prompt], GREEDY)[0].token_ids
    engine.eos_token_ids = frozenset({free_run[3]})  # pretend the model's 4th token is its EOS
    stopped = engine.generate([prompt], SamplingParams(max_tokens=8))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free_run[: free_run.index(free_run[3])]
    assert engine.generate([prompt], GREEDY)[0].token_ids == free_run


def test_stop_string_cuts_the_text(make_engine):
    engine = make_engine(model="tiny-deepseek-v3")
    prompt = random_prompts([6], seed=9)[0]
    full = engine.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 2 :][:2]
    assert stop
    cut = engine.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True, stop=(stop, "never there")))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_prompt_too_long_fails_at_once_without_holding_up_others(make_engine):
    engine = make_engine(model="tiny-deepseek-v3", max_model_len=32)
    too_long = engine.submit(list(range(2, 34)), GREEDY)
    fits = engine.submit(list(range(2, 12)), GREEDY)
    with pytest.raises(PromptTooLongError, match="32 tokens"):
        too_long.result(timeout=0)
    assert fits.result(timeout=30).finish_reason == "length"


def test_generation_stops_at_max_model_len(make_engine):
    engine = make_engine(model="tiny-deepseek-v3", max_model_len=16)
    completion = engine.generate([list(range(2, 12))], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 6


def test_out_of_vocabulary_prompt_is_a_permanent_error(make_engine):
    engine = make_engine(model="tiny-deepseek-v3")
    with pytest.raises(PermanentEngineError):
        engine.submit([5, 10**9], GREEDY).result(timeout=0)


def test_concurrent_submits_batch_together(make_engine):
    engine = make_engine(model="tiny-deepseek-v3", max_wait_ms=300)
    prompts = random_prompts([4, 9, 14, 6, 11, 3])
    results = [None] * len(prompts)
    batch_sizes = []
    original_step = engine.step

    def recording_step():
        original_step()
        batch_sizes.append(engine.stats()["batch_size"])

    engine.step = recording_step

    def worker(index: int) -> None:
        results[index] = engine.submit(prompts[index], GREEDY).result(timeout=60)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert batch_sizes[0] == len(prompts)  # the first step already held every request
    assert engine.generate(prompts, GREEDY) == results  # and the same outputs as a plain batch


def test_a_failing_step_fails_only_its_requests(make_engine):
    engine = make_engine(model="tiny-deepseek-v3")
    original_execute = engine.runner.execute
    calls = {"count": 0}

    def out_of_memory_once(scheduled, previous=None):
        calls["count"] += 1
        if calls["count"] == 1:
            raise torch.OutOfMemoryError("simulated")
        return original_execute(scheduled, previous)

    engine.runner.execute = out_of_memory_once
    failed = engine.submit(random_prompts([5])[0], GREEDY)
    with pytest.raises(TransientEngineError, match="out of memory"):
        failed.result(timeout=30)
    later = engine.submit(random_prompts([7])[0], GREEDY)
    assert later.result(timeout=30).completion_tokens == 8
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_out_of_memory_splits_the_step_instead_of_failing_it(make_engine):
    engine = make_engine(model="tiny-deepseek-v3")
    prompts = random_prompts([5, 9, 3, 12, 7])
    expected = engine.generate(prompts, GREEDY)
    original_execute, original_launch, step_sizes, launch_sizes = engine.runner.execute, engine.runner.launch, [], []

    def out_of_memory_above_two(scheduled, previous=None):
        step_sizes.append(len(scheduled))
        if len(scheduled) > 2:
            raise torch.OutOfMemoryError("simulated")
        return original_execute(scheduled, previous)

    def launch_out_of_memory_above_two(scheduled, previous):  # a decode step launched without waiting
        launch_sizes.append(len(scheduled))
        if len(scheduled) > 2:
            raise torch.OutOfMemoryError("simulated")
        return original_launch(scheduled, previous)

    engine.runner.execute, engine.runner.launch = out_of_memory_above_two, launch_out_of_memory_above_two
    assert engine.generate(prompts, GREEDY) == expected
    assert max(step_sizes) > 2 and any(size <= 2 for size in step_sizes)  # split, then ran
    assert max(launch_sizes) > 2  # decode steps too: run again in halves


def test_seeded_sampling_is_independent_of_batch_companions(make_engine):
    engine = make_engine(model="tiny-deepseek-v3")
    prompt = random_prompts([7])[0]
    seeded = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.95, seed=123, ignore_eos=True)
    alone = engine.generate([prompt], seeded)[0]
    companions = random_prompts([3, 12], seed=11)
    together = engine.generate(
        [companions[0], prompt, companions[1]],
        [SamplingParams(max_tokens=9, temperature=0.8, ignore_eos=True), seeded, GREEDY],
    )[1]
    assert together.token_ids == alone.token_ids


def test_shutdown_fails_pending_requests_and_later_submits():
    engine = build_engine(EngineConfig(model="tiny-deepseek-v3", max_wait_ms=1))
    engine.shutdown()
    with pytest.raises(TransientEngineError):
        engine.submit([5, 6], GREEDY).result(timeout=5)



def test_the_warm_up_leaves_the_engine_ready_for_real_requests(make_engine) -> None:
    """The kernel warm-up a GPU engine runs at start answers its own requests and leaves nothing behind;
    on the CPU it runs here through the paged kernel under Triton's interpreter."""
    engine = make_engine(model="tiny-qwen2", use_paged_kernel=True, use_cuda_graphs=False)
    engine.warm_up()
    assert not engine.scheduler.has_work
    assert engine._overlap_steps  # its check found overlapped decode steps right
    completion = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert completion.completion_tokens == 3


def test_the_warm_up_turns_overlapped_steps_off_where_they_answer_wrong(make_engine, monkeypatch) -> None:
    """Where a launched step would read wrong input tokens (here: the tokens on the device are not passed
    on), the warm-up's check sees other tokens than steps run one at a time give, and turns overlap off."""
    for module in ("worker.engine.model_runner", "worker.engine.gpu_runner"):
        monkeypatch.setattr(f"{module}.fill_pending_inputs", lambda input_ids, sequences, previous: None)
    engine = make_engine(model="tiny-qwen2", use_paged_kernel=True, use_cuda_graphs=False)
    engine.warm_up()
    assert not engine._overlap_steps
    assert engine.generate([[5, 6, 7]], GREEDY) == engine.generate([[5, 6, 7]], GREEDY)


def test_a_failed_generate_cancels_the_rest_and_the_engine_shuts_down(make_engine) -> None:
    """generate raises the first failure at once and cancels the other prompts, so nothing keeps the loop
    generating; the engine then stops with no thread left behind."""
    engine = make_engine(model="tiny-deepseek-v3")
    outside = [engine.hf_config.vocab_size + 5]
    futures: list = []
    original_submit = engine.submit
    engine.submit = lambda prompt, sampling: futures.append(original_submit(prompt, sampling)) or futures[-1]
    with pytest.raises(PermanentEngineError, match="outside the vocabulary"):
        engine.generate([[5, 6, 7], outside], SamplingParams(max_tokens=3000, ignore_eos=True))
    assert futures[0].cancelled()
    engine.shutdown()
    assert not engine._thread.is_alive()


def test_overlapped_decode_steps_give_the_tokens_of_steps_run_one_at_a_time(make_engine) -> None:
    """Decode steps are launched while the host reads the step before (their input tokens taken on the device);
    the outputs are those of steps each waited for, EOS and max_tokens ending sequences at the same token."""
    engine = make_engine(model="tiny-deepseek-v3")
    prompts = random_prompts([5, 9, 3, 12, 7, 20, 6])
    samplings = [SamplingParams(max_tokens=length, ignore_eos=ignore) for length, ignore in
                 ((8, True), (3, True), (12, False), (1, True), (16, False), (6, True))]
    samplings.append(SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True))  # sampled
    launches = []
    original_launch = engine.runner.launch
    engine.runner.launch = lambda scheduled, previous: launches.append(previous) or original_launch(scheduled, previous)
    overlapped = engine.generate(prompts, samplings)
    assert len(launches) > 5 and any(previous is not None for previous in launches)
    eos_token_ids = engine.eos_token_ids
    engine.eos_token_ids = frozenset({overlapped[2].token_ids[4]})  # the 5th token of one output is now EOS
    overlapped_with_eos = engine.generate(prompts, samplings)
    engine._can_overlap = lambda plan: False
    assert engine.generate(prompts, samplings) == overlapped_with_eos
    engine.eos_token_ids = eos_token_ids
    assert engine.generate(prompts, samplings) == overlapped
    assert overlapped_with_eos[2].finish_reason == "stop" and len(overlapped_with_eos[2].token_ids) <= 4
    assert not engine.scheduler.has_work
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_logit_bias_bans_tokens_at_every_step(make_engine) -> None:
    """A -100 bias bans its token at each decode step, not only at the prefill's (a step that samples the
    logits as they are, launched ahead of its read, would skip it)."""
    engine = make_engine(model="tiny-deepseek-v3")
    prompt = random_prompts([6])[0]
    free_run = engine.generate([prompt], GREEDY)[0].token_ids
    banned = tuple((token_id, -100.0) for token_id in set(free_run[1:]))
    biased = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True, logit_bias=banned))[0]
    assert not {token_id for token_id, _ in banned} & set(biased.token_ids)


def test_a_cancelled_request_leaves_the_batch_at_its_next_token(make_engine) -> None:
    """The loop notices a cancelled future at the sequence's next token and frees its blocks, while a request
    beside it runs to the end."""
    engine = make_engine(model="tiny-deepseek-v3")
    tokens_offered: list[int] = []  # the endless request's tokens that reached the loop's bookkeeping
    append_token = engine._append_token
    engine._append_token = lambda sequence, token_id: (
        sequence.prompt_token_ids == [5, 6, 7] and tokens_offered.append(token_id), append_token(sequence, token_id))
    endless = engine.submit([5, 6, 7], SamplingParams(max_tokens=3000, ignore_eos=True))
    assert endless.cancel()
    finished = engine.submit([8, 9], SamplingParams(max_tokens=4, ignore_eos=True)).result(timeout=60)
    assert finished.completion_tokens == 4 and endless.cancelled()
    deadline = time.monotonic() + 120
    while engine.scheduler.has_work and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.scheduler.has_work
    assert len(tokens_offered) <= 1  # dropped at its first token, not run to 3000
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


ENGINE_LEFT_RUNNING = """
import atexit, sys, threading

def no_engine_thread_left() -> None:  # registered first, so it runs after the engine module's own handler
    alive = [thread.name for thread in threading.enumerate() if thread.name == "deepbatch-engine"]
    print("engine threads at exit:", alive, flush=True)

atexit.register(no_engine_thread_left)
from worker.engine.engine import LLMEngine
from worker.engine.types import EngineConfig, PermanentEngineError, SamplingParams

engine = LLMEngine(EngineConfig(model="tiny-deepseek-v3", device="cpu", max_wait_ms=1))
try:
    engine.generate([[5, 6, 7], [10**7]], SamplingParams(max_tokens=3000, ignore_eos=True))
except PermanentEngineError as error:
    print("failed:", error, flush=True)
"""


def test_an_engine_left_running_after_a_failed_generate_stops_at_exit(tmp_path) -> None:
    """A script whose generate fails and that never shuts its engine down exits cleanly: the engine's loop
    is stopped at exit, not killed inside a step (on a GPU that aborted the process)."""
    script = tmp_path / "left_running.py"
    script.write_text(ENGINE_LEFT_RUNNING)
    root = Path(__file__).resolve().parents[2]
    finished = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert finished.returncode == 0, finished.stderr
    assert "failed: prompt_token_ids hold ids outside the vocabulary" in finished.stdout
    assert "engine threads at exit: []" in finished.stdout
    assert "terminate called" not in finished.stderr
