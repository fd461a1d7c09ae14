"""An engine in a process of its own (worker/engine/process.py): the same answers and errors as in-process,
n choices, cancels, stats, and deaths on either side reported at once, never a hang or an orphan."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.engine.helpers import random_prompts
from worker.engine import engine as engine_module
from worker.engine.process import EngineProcess, EngineProcessError
from worker.engine.types import EngineConfig, PromptTooLongError, SamplingParams, TransientEngineError

CONFIG = EngineConfig(model="tiny-deepseek-v3", device="cpu", max_wait_ms=1, max_model_len=64)
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
FACTORY = "worker.engine.engine:build_engine"
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine_process():
    engine = EngineProcess(FACTORY, CONFIG)
    yield engine
    engine.shutdown()


def test_answers_as_the_engine_in_process_does(engine_process, make_engine):
    prompts = random_prompts([5, 9, 13])
    expected = make_engine(model=CONFIG.model, device="cpu", max_wait_ms=1, max_model_len=64).generate(prompts, GREEDY)
    futures = [engine_process.submit(prompt, GREEDY) for prompt in prompts]
    answers = [future.result(timeout=60) for future in futures]
    assert [answer.token_ids for answer in answers] == [completion.token_ids for completion in expected]
    assert [answer.text for answer in answers] == [completion.text for completion in expected]
    assert {answer.finish_reason for answer in answers} == {"length"}
    assert engine_process.facts["max_batch_size"] == engine_process.max_batch_size > 0
    assert engine_process.facts["kv_cache_tokens"] > 0


def test_errors_keep_their_type(engine_process):
    with pytest.raises(PromptTooLongError, match="max_model_len is 64"):
        engine_process.submit(list(range(5, 100)), GREEDY).result(timeout=60)


def test_choices_and_cancels(engine_process):
    samplings = [SamplingParams(max_tokens=4, temperature=1.0, seed=seed, ignore_eos=True) for seed in range(3)]
    choices = engine_process.submit_choices(random_prompts([7])[0], samplings)
    assert [len(future.result(timeout=60).token_ids) for future in choices] == [4, 4, 4]
    long_one = engine_process.submit(random_prompts([5])[0], SamplingParams(max_tokens=50, ignore_eos=True))
    assert long_one.cancel()  # still running in the child: dropped there, and this process forgets it
    follow_up = engine_process.submit(random_prompts([6])[0], GREEDY).result(timeout=60)
    assert follow_up.completion_tokens == 6
    deadline = time.monotonic() + 10
    while engine_process.stats().get("batch_size") is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "kv_cache_usage" in engine_process.stats()


def test_a_killed_engine_process_is_fatal_and_named(monkeypatch):
    """The worker's engine (runtime's build_engine passes exit_process): requests held fail naming the child,
    and on_fatal_error is called once."""
    fatal: list[BaseException] = []
    engine = EngineProcess(FACTORY, CONFIG, on_fatal_error=fatal.append)
    try:
        held = engine.submit(random_prompts([5])[0], SamplingParams(max_tokens=60, ignore_eos=True))
        os.kill(engine.pid, signal.SIGKILL)
        named = rf"the engine process \(pid {engine.pid}\) died \(killed by SIGKILL\)"
        with pytest.raises(EngineProcessError, match=named):
            held.result(timeout=20)
        assert len(fatal) == 1 and isinstance(fatal[0], EngineProcessError)
        with pytest.raises(TransientEngineError, match="shutting down"):
            engine.submit([5, 6], GREEDY)
    finally:
        engine.shutdown()


def test_an_engine_that_cannot_start_is_an_error_naming_why():
    with pytest.raises(EngineProcessError, match="could not start: .*no-such-model"):
        EngineProcess(FACTORY, EngineConfig(model="no-such-model", device="cpu"))


def test_shutdown_fails_what_is_held():
    engine = EngineProcess(FACTORY, CONFIG)
    held = engine.submit(random_prompts([5])[0], SamplingParams(max_tokens=58, ignore_eos=True))
    engine.shutdown()
    with pytest.raises(TransientEngineError, match="shut down"):
        held.result(timeout=10)
    assert not engine._process.is_alive()


def test_the_engine_process_ends_with_its_worker():
    """A worker killed with SIGKILL (no cleanup at all): its engine process exits within seconds."""
    program = textwrap.dedent(f"""
        import sys, time
        from worker.engine.process import EngineProcess
        from worker.engine.types import EngineConfig
        engine = EngineProcess({FACTORY!r}, EngineConfig(model="tiny-deepseek-v3", device="cpu"))
        print(engine.pid, flush=True)
        time.sleep(600)
    """)
    worker = subprocess.Popen([sys.executable, "-c", program], cwd=REPOSITORY, stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([worker.stdout], [], [], 120)[0], "the worker's engine process did not start"
        child_pid = int(worker.stdout.readline())
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        deadline = time.monotonic() + 15
        while alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child_pid), "the engine process outlived its worker"
    finally:
        worker.kill()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped by init) counts as gone
            return stat.read().split(")")[-1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):  # reaped meanwhile
        return False


def test_the_workers_engine_exits_the_worker_when_its_process_dies(monkeypatch):
    """runtime's engine in its own process: the child's death ends the worker with the engine's exit code."""
    from schema.settings import EngineSettings, Settings
    from worker import runtime

    exit_codes: list[int] = []
    monkeypatch.setattr(engine_module.os, "_exit", exit_codes.append)
    settings = EngineSettings.of(Settings(model="tiny-deepseek-v3", device="cpu", engine_process="own"))
    engine = runtime.build_engine(settings)
    try:
        assert isinstance(engine, EngineProcess)
        os.kill(engine.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not exit_codes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exit_codes == [engine_module.FATAL_EXIT_CODE]
    finally:
        engine.shutdown()
    assert not runtime.engine_in_own_process(EngineSettings.of(Settings(device="cpu")))  # auto: shared on a CPU


# Two GPUs where the machine has them (NCCL), else the CPU (gloo): a GPU worker's engine runs this way by default.
TENSOR_PARALLEL_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.device_count() >= 2 else [])


@pytest.mark.parametrize("device", TENSOR_PARALLEL_DEVICES)
def test_a_tensor_parallel_engine_runs_in_its_own_process_and_a_dead_rank_ends_it(make_engine, device):
    """The engine process drives its own ranks: the same greedy tokens as one rank in-process; a SIGKILLed
    rank ends the engine process (exit code 70), which the worker's side reports as fatal."""
    fatal: list[BaseException] = []
    config = EngineConfig(model="tiny-deepseek-v3", device=device, dtype="float32", tensor_parallel_size=2,
                          max_wait_ms=1)
    prompts = random_prompts([5, 11])
    expected = make_engine(model="tiny-deepseek-v3", device=device, dtype="float32",
                           max_wait_ms=1).generate(prompts, GREEDY)
    engine = EngineProcess(FACTORY, config, on_fatal_error=fatal.append)
    try:
        answers = [future.result(timeout=60) for future in [engine.submit(prompt, GREEDY) for prompt in prompts]]
        assert [answer.token_ids for answer in answers] == [completion.token_ids for completion in expected]
        rank = rank_1_of(engine.pid)
        held = engine.submit(prompts[0], SamplingParams(max_tokens=60, ignore_eos=True))
        rank.kill()
        with pytest.raises(EngineProcessError, match=rf"pid {engine.pid}\) died \(exit code 70\)"):
            held.result(timeout=30)
        assert len(fatal) == 1
    finally:
        engine.shutdown()


def test_the_engine_process_waits_for_its_worker_not_for_signals(engine_process):
    """Ctrl-C (SIGINT to the process group) or a service manager's SIGTERM to every process: the worker's warm
    shutdown decides when the engine stops, so its process goes on answering."""
    os.kill(engine_process.pid, signal.SIGINT)
    os.kill(engine_process.pid, signal.SIGTERM)
    assert engine_process.submit(random_prompts([5])[0], GREEDY).result(timeout=60).completion_tokens == 6


def rank_1_of(engine_pid: int):
    """Rank 1 is forked from the engine process's forkserver: the one grandchild."""
    import psutil

    for child in psutil.Process(engine_pid).children(recursive=True):
        try:
            if child.ppid() != engine_pid:
                return child
        except psutil.Error:  # ended meanwhile
            continue
    raise AssertionError("the engine process started no rank")


def test_an_answer_that_cannot_be_sent_fails_alone_and_broken_stats_are_skipped():
    """An engine plugged in that hands back what no pickle carries: that request fails, by name, and the
    answers after it still come (a sender thread that died would leave every later request waiting)."""
    from tests.integration.odd_engines import UNSENDABLE_TOKEN

    engine = EngineProcess("tests.integration.odd_engines:UnsendableEngine", CONFIG)
    try:
        unsendable = engine.submit([UNSENDABLE_TOKEN, 5], SamplingParams(max_tokens=2))
        with pytest.raises(TransientEngineError, match="cannot be sent to the worker"):
            unsendable.result(timeout=30)
        time.sleep(1.5)  # a stats() call or more has failed in the child meanwhile
        assert engine.submit([5, 6], SamplingParams(max_tokens=2)).result(timeout=30).completion_tokens == 2
        assert engine.stats() == {}
    finally:
        engine.shutdown()


def test_the_engine_process_exit_code_is_the_engines():
    from worker.engine import process as process_module

    assert process_module.FATAL_EXIT_CODE == engine_module.FATAL_EXIT_CODE == 70
