"""LLMEngine: `submit(prompt_token_ids, sampling) → Future[Completion]` from any thread, one step-loop thread
(`submit_choices` for several choices of one prompt, which prefill it once).

The loop thread owns the scheduler, the block manager and the model runner; other threads only hand it
sequences through `_incoming` under a condition variable. When the engine is idle and a request
arrives, the loop waits up to `max_wait_ms` for company so that concurrent submits start in one batch.
Each step: schedule, run the model, append sampled tokens, resolve the futures of finished requests.
A step that runs out of memory is split in halves and retried; one that still fails (or raises anything
else) fails only the futures of the requests in that step (out of memory as a TransientEngineError), and
the loop carries on with the rest. With tensor parallelism (worker/engine/ranks.py) this process is
rank 0: it schedules and samples, each step runs on every rank, and a rank that dies or fails ends the
engine, failing what it holds and calling `on_fatal_error` (the worker exits).
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from concurrent.futures import FIRST_EXCEPTION, Future, wait

import torch

from worker.engine.block_manager import BlockManager
from worker.engine.device import resolve_device, resolve_dtype
from worker.engine.grammar import GrammarError, Grammars
from worker.engine.loader import load_model
from worker.engine.gpu_runner import build_runner
from worker.engine.model_runner import ModelRunner, SampledOnDevice
from worker.engine.parallel import RankFailedError, Shard, rank_device
from worker.engine.ranks import DrivingRunner, RankProcesses
from worker.engine.scheduler import Scheduler, StepPlan
from worker.engine.sequence import Sequence, SequenceStatus
from worker.engine.sizing import choose_batch_limits, choose_num_kv_blocks
from worker.engine.tokenizer import load_tokenizer
from worker.engine.types import (
    FATAL_EXIT_CODE,
    Completion,
    EngineConfig,
    EngineError,
    FinishReason,
    PermanentEngineError,
    PromptTooLongError,
    SamplingParams,
    TransientEngineError,
    resolve_future,
)

log = logging.getLogger(__name__)

FATAL_REPORT_WAIT_S = 10.0  # how long a second _die waits for the first to have told the owner

# Engines whose loop runs. Their threads are daemons (a worker exiting must not wait on a step), and a
# daemon killed at exit inside a CUDA call aborts the process ("terminate called without an active
# exception"): atexit stops each loop first, as the interpreter runs atexit before it kills daemons.
_running_engines: set[LLMEngine] = set()


@atexit.register
def _shut_down_running_engines() -> None:
    for engine in list(_running_engines):
        engine.shutdown()


def eos_token_ids_of(hf_config, tokenizer) -> frozenset[int]:
    configured = getattr(hf_config, "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return frozenset()
    return frozenset(configured if isinstance(configured, (list, tuple)) else [configured])


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None,
                 on_fatal_error: Callable[[EngineError], None] | None = None):
        """on_fatal_error: called (from any thread) when the engine cannot go on, a rank of a tensor-parallel
        engine having died or failed; the requests the engine holds are failed with the same error next."""
        self.config = config
        self._on_fatal_error = on_fatal_error
        self._fatal_error: EngineError | None = None
        self._fatal_reported = threading.Event()  # on_fatal_error has returned (it does not, in a worker)
        self._incoming: list[Sequence] = []
        self._in_flight: SampledOnDevice | None = None  # a launched decode step whose tokens are unread
        self._overlap_steps = True  # launch decode steps ahead of their reads; off if the warm-up's check fails
        self._condition = threading.Condition()
        self._stopping = False
        self.ranks: RankProcesses | None = None
        if config.tensor_parallel_size > 1:
            self.ranks = RankProcesses.start(config, resolve_device(config.device), self._die)
        try:
            self._build(config, tokenizer)
        except BaseException:
            if self.ranks is not None:
                self.ranks.abandon()
            raise

    def _build(self, config: EngineConfig, tokenizer) -> None:
        shard = self.ranks.shard if self.ranks is not None else Shard()
        self.device = rank_device(resolve_device(config.device), shard.rank)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model, self.hf_config = load_model(config.model, config.seed, self.device, self.dtype, shard,
                                               config.quantization)
        if self.device.type == "cuda":  # what loading held (a random model's reference copy) goes back first
            gc.collect()
            torch.cuda.empty_cache()
        block_size = config.kv_block_size
        bytes_per_block = self.model.kv_cache_bytes_per_token(self.dtype) * block_size
        num_blocks = choose_num_kv_blocks(config, bytes_per_block, self.device)
        if self.ranks is not None:  # every rank holds the same blocks: as many as the fullest device allows
            num_blocks = self.ranks.groups.fewest(num_blocks)
        # A lone sequence must always fit the cache, or preemption could never make room for it.
        self.max_model_len = min(config.max_model_len, num_blocks * block_size)
        self.limits = choose_batch_limits(config, num_blocks, self.device)
        self.max_batch_size = self.limits.max_batch_size
        self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.max_batch_size, self.limits.max_num_batched_tokens)
        self.runner = self._make_runner(num_blocks)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        self.eos_token_ids = eos_token_ids_of(self.hf_config, self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.hf_config.vocab_size, self.eos_token_ids)
        self._last_batch_size = 0
        self._thread = threading.Thread(target=self._run_loop, name="deepbatch-engine", daemon=True)
        self._thread.start()
        _running_engines.add(self)
        if self.device.type == "cuda":
            self.warm_up()
        self._log_start(num_blocks, bytes_per_block)

    def warm_up(self) -> None:
        """Runs two prefills of different lengths and their decodes once, so that Triton compiles those kernels
        now and not inside the first job's requests (on an H200 that cost the first 4,096-request job a quarter
        of its throughput, bench/results/system-nvidia-h200-*.json)."""
        token_id = min(self.eos_token_ids, default=0) + 1
        prompt = [token_id] * (2 * self.config.kv_block_size + 1)
        prompts, sampling = [prompt, prompt + [token_id] * 3], SamplingParams(max_tokens=4, ignore_eos=True)
        self.generate(prompts, sampling)
        if self.ranks is None:
            self._check_overlapped_steps(prompts, sampling)

    def _check_overlapped_steps(self, prompts: list[list[int]], sampling: SamplingParams) -> None:
        """Decode steps launched ahead of their reads (`step`) must give the tokens of steps run one at a time,
        which take their inputs from the host: checked once on this device, where a difference makes the
        engine run its steps one at a time (and says so) rather than answer wrong. Both runs compute every
        prompt token (no prefix-cache hits), so that only the overlap differs between them."""
        prefix_caching = self.block_manager.enable_prefix_caching
        self.block_manager.enable_prefix_caching = False
        try:
            overlapped = self.generate(prompts, sampling)
            self._overlap_steps = False
            one_at_a_time = self.generate(prompts, sampling)
        finally:
            self.block_manager.enable_prefix_caching = prefix_caching
        self._overlap_steps = overlapped == one_at_a_time
        if not self._overlap_steps:
            log.error("decode steps launched ahead of their reads gave other tokens than steps run one at a time "
                      "on %s; running steps one at a time", self.device)

    def _log_start(self, num_blocks: int, bytes_per_block: int) -> None:
        """One line that says what runs where and why the batch is as big as it is."""
        log.info("engine ready: model %s on %s in %s; KV cache %d blocks (%d tokens, %.1f GiB); max_batch_size %d, "
                 "max_num_batched_tokens %d (%s)", self.config.model, self.device, str(self.dtype).removeprefix("torch."),
                 num_blocks, num_blocks * self.config.kv_block_size, num_blocks * bytes_per_block / (1 << 30),
                 self.max_batch_size, self.limits.max_num_batched_tokens, self.limits.reason)

    def _make_runner(self, num_blocks: int) -> ModelRunner | DrivingRunner:
        """This process's runner; under tensor parallelism the other ranks build theirs alike (same shape,
        sent here) and rank 0's sends each step to them first."""
        if self.ranks is not None:
            self.ranks.groups.broadcast((num_blocks, self.max_batch_size, self.max_model_len))
        runner = build_runner(self.model, self.config, num_blocks, self.device, self.dtype, self.max_batch_size,
                              self.max_model_len)
        return DrivingRunner(runner, self.ranks) if self.ranks is not None else runner

    # ---- the public interface (any thread) ----

    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Future:
        return self.submit_choices(prompt_token_ids, [sampling])[0]

    def submit_choices(self, prompt_token_ids: list[int], samplings: SequenceOf[SamplingParams]) -> list[Future]:
        """Several choices of one prompt (OpenAI's `n`), each sampled with its own SamplingParams (its own
        seed): a future per choice. The prompt is prefilled once: the first choice's sequence computes it
        and the others, admitted after that, reuse its blocks through the prefix cache (only the tokens of
        the prompt's last, partial block are computed again for each)."""
        sequences = [Sequence(list(prompt_token_ids), sampling) for sampling in samplings]
        for sequence in sequences[1:]:
            sequence.prefill_after = sequences[0]
        accepted = []
        for sequence in sequences:
            problem = self._prompt_problem(sequence.prompt_token_ids) or self._sampling_problem(sequence.sampling)
            if problem is None and sequence.sampling.grammar is not None:
                try:  # compiled here, in the submitting thread, not in the step loop (cached per schema)
                    sequence.grammar_matcher = self.grammars.matcher(sequence.sampling.grammar)
                except GrammarError as error:
                    problem = error
            if problem is not None:
                resolve_future(sequence.future, error=problem)
            else:
                accepted.append(sequence)
        if accepted and accepted[0] is not sequences[0]:  # nothing to wait for
            for sequence in accepted:
                sequence.prefill_after = None
        with self._condition:
            if self._stopping:
                shut_down = self._fatal_error or TransientEngineError("the engine is shut down")
                for sequence in accepted:
                    resolve_future(sequence.future, error=shut_down)
            elif accepted:
                self._incoming.extend(accepted)
                self._condition.notify()
        return [sequence.future for sequence in sequences]

    def generate(
        self, prompts: SequenceOf[list[int]], sampling: SamplingParams | SequenceOf[SamplingParams]
    ) -> list[Completion]:
        """Submits every prompt at once and waits for all (for tests and benchmarks). The first failure is
        raised at once, the other prompts cancelled, so that the loop does not go on generating for them."""
        samplings = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        futures = [self.submit(prompt, params) for prompt, params in zip(prompts, samplings)]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((future for future in futures if future.done() and future.exception()), None)
        if failed is not None:
            for future in futures:
                future.cancel()  # the loop drops a cancelled sequence at its next token
            raise failed.exception()
        return [future.result() for future in futures]

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def stats(self) -> dict[str, float]:
        return {
            "batch_size": self._last_batch_size,
            "kv_cache_usage": self.block_manager.usage,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_blocks": self.block_manager.prefix_cache_hit_blocks,
            "prompt_tokens_computed": self.scheduler.num_prompt_tokens_computed,
        }

    def shutdown(self) -> None:
        """Stops the step loop (failing what it holds) and the ranks. Idempotent; also run at interpreter
        exit for an engine nobody shut down."""
        _running_engines.discard(self)
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout=60)
        if self.ranks is not None:
            runner = getattr(self, "runner", None)  # none when the engine failed to start
            if runner is not None and not self._thread.is_alive():  # no step can be replaying its graphs
                runner.release_graphs()
            self.ranks.stop()

    def _prompt_problem(self, prompt_token_ids: list[int]) -> Exception | None:
        if len(prompt_token_ids) + 1 > self.max_model_len:
            return PromptTooLongError(
                f"prompt has {len(prompt_token_ids)} tokens; max_model_len is {self.max_model_len}"
                " (the prompt plus at least one generated token must fit)"
            )
        if not prompt_token_ids:
            return PermanentEngineError("prompt_token_ids is empty")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.hf_config.vocab_size:
            vocab_size = self.hf_config.vocab_size
            return PermanentEngineError(f"prompt_token_ids hold ids outside the vocabulary [0, {vocab_size})")
        return None

    def _sampling_problem(self, sampling: SamplingParams) -> Exception | None:
        vocab_size = self.hf_config.vocab_size
        outside = [token_id for token_id, _ in sampling.logit_bias if token_id >= vocab_size]
        if outside:
            return PermanentEngineError(f"logit_bias names token ids outside the vocabulary [0, {vocab_size}): "
                                        f"{outside[:5]}")
        return None

    # ---- the step loop (engine thread only) ----

    def _run_loop(self) -> None:
        while True:
            incoming = self._wait_for_requests()
            if incoming is None:
                break
            for sequence in incoming:
                self.scheduler.add(sequence)
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - a bug outside the model; keep serving others
                log.exception("engine step failed outside the model; failing its requests")
                for sequence in [*self.scheduler.running, *self.scheduler.waiting]:
                    self._fail(sequence, error)
        self._fail_everything(
            self._fatal_error or TransientEngineError("the engine shut down before the request finished"))

    def _wait_for_requests(self) -> list[Sequence] | None:
        """New sequences to schedule (waiting for some while idle); None once shutdown is asked."""
        with self._condition:
            if not self.scheduler.has_work:
                while not self._incoming and not self._stopping:
                    self._condition.wait()
                self._wait_for_company()
            if self._stopping:
                return None
            incoming, self._incoming = self._incoming, []
            return incoming

    def _wait_for_company(self) -> None:
        deadline = time.monotonic() + self.config.max_wait_ms / 1000
        while len(self._incoming) < self.max_batch_size and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._condition.wait(remaining)

    def step(self) -> None:
        """Schedules and runs one step. A decode step whose sequences sample from the logits as they are is launched
        and left running: the host reads the step before it (appends its tokens, finishes sequences) while the
        GPU computes this one, whose input tokens it takes from that step on the device. A sequence that
        finished there has its token of this step dropped when it is read."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            self._read_in_flight()
            return
        self._last_batch_size = len(plan.scheduled)
        previous, launched = self._in_flight, None
        try:
            if self._can_overlap(plan):
                launched = self._launch(plan, previous)
            if launched is None:
                sequences, token_ids = self._execute_splitting(plan.scheduled, previous)
        except torch.OutOfMemoryError as error:
            self._read_in_flight()
            message = f"out of memory even for a single sequence of the step: {error}"
            self._fail_step(plan, TransientEngineError(message))
            return
        except Exception as error:  # noqa: BLE001 - reported on each request's future
            self._read_in_flight()
            self._fail_step(plan, error)
            return
        for item in plan.scheduled:
            self.scheduler.record_step(item)
        if launched is not None:
            for sequence in launched.sequences:
                sequence.num_pending_tokens += 1
        self._read_in_flight()
        if launched is not None:
            self._in_flight = launched
        else:
            self._append_tokens(sequences, token_ids)

    def _can_overlap(self, plan: StepPlan) -> bool:
        """A pure decode step, on one rank (tensor parallelism sends token ids to the ranks), of sequences that
        sample from the logits as they are (`runner.launch` skips the sampler's adjustments and host side)."""
        return self._overlap_steps and self.ranks is None and all(
            item.is_decode and self.runner.sampler.samples_logits_as_they_are(item.sequence)
            for item in plan.scheduled)

    def _launch(self, plan: StepPlan, previous: SampledOnDevice | None) -> SampledOnDevice | None:
        """The step launched; None when it ran out of memory (an eager step: graphs allocate nothing), to be run
        again in halves as `_execute_splitting` does."""
        try:
            return self.runner.launch(plan.scheduled, previous)
        except torch.OutOfMemoryError:
            return None

    def _read_in_flight(self) -> None:
        """Reads the launched step's tokens (waiting for it) and appends them."""
        launched, self._in_flight = self._in_flight, None
        if launched is None:
            return
        token_ids = launched.read()
        for sequence in launched.sequences:
            sequence.num_pending_tokens -= 1
        self._append_tokens(launched.sequences, token_ids)

    def _append_tokens(self, sequences: list[Sequence], token_ids: list[int]) -> None:
        for sequence, token_id in zip(sequences, token_ids):
            if sequence.status is not SequenceStatus.FINISHED:  # finished by the step before, or failed
                self._append_token(sequence, token_id)

    def _execute_splitting(self, scheduled: list,
                           previous: SampledOnDevice | None = None) -> tuple[list[Sequence], list[int]]:
        """Runs the step; out of memory splits it in halves (recursively) before anyone is failed.

        Re-running part of a step is safe: each sequence's cache slots are its own, and a repeated
        write stores the same values. Not under tensor parallelism, where one rank's failure leaves the
        others inside a collective: there any failure ends the engine.
        """
        if self.ranks is not None:
            return self._execute_on_ranks(scheduled)
        try:
            return self.runner.execute(scheduled, previous)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(scheduled) == 1:
                raise
            log.warning("out of memory in a step of %d sequences; running it in halves", len(scheduled))
            middle = len(scheduled) // 2
            first_sequences, first_tokens = self._execute_splitting(scheduled[:middle], previous)
            second_sequences, second_tokens = self._execute_splitting(scheduled[middle:], previous)
            return first_sequences + second_sequences, first_tokens + second_tokens

    def _execute_on_ranks(self, scheduled: list) -> tuple[list[Sequence], list[int]]:
        try:
            return self.runner.execute(scheduled)
        except Exception as error:
            fatal = self.ranks.dead_rank_error() or RankFailedError(
                f"tensor-parallel rank 0 failed a step ({type(error).__name__}: {error}); the engine stops")
            self._die(fatal)
            raise fatal from error

    def _die(self, error: EngineError) -> None:
        """The engine cannot go on: stop the loop, tell the owner (the worker exits there and then), fail
        every request it holds with `error`. Called from the rank watcher's thread too, while the loop may
        be blocked in a collective: the lists are copied (atomically, under the GIL) and futures are safe
        to set from any thread. A second caller (the step loop, its collective failed by the same death)
        returns only once the owner has been told: until then no request it holds may fail (a failure would
        be recorded as the request's own before the worker exits)."""
        with self._condition:
            first = self._fatal_error is None
            if first:
                self._fatal_error, self._stopping = error, True
                held, self._incoming = self._incoming, []
                self._condition.notify_all()
        if not first:
            self._fatal_reported.wait(timeout=FATAL_REPORT_WAIT_S)
            return
        if self._on_fatal_error is not None:
            self._on_fatal_error(error)
        self._fatal_reported.set()
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            held += list(scheduler.running) + list(scheduler.waiting)
        for sequence in held:
            resolve_future(sequence.future, error=error)

    def _append_token(self, sequence: Sequence, token_id: int) -> None:
        sampling = sequence.sampling
        if sequence.is_cancelled:
            self.scheduler.finish(sequence)
            return
        if token_id in self.eos_token_ids and not sampling.ignore_eos:
            self._finish(sequence, "stop")  # the EOS token itself is not part of the output
            return
        sequence.token_ids.append(token_id)
        if sequence.pending_logprob is not None:
            sequence.logprobs.append(sequence.pending_logprob)
            sequence.pending_logprob = None
        if sampling.stop and self._cut_at_stop_string(sequence):
            self._finish(sequence, "stop")
        elif sequence.num_output_tokens >= sampling.max_tokens or len(sequence.token_ids) >= self.max_model_len:
            self._finish(sequence, "length")

    def _cut_at_stop_string(self, sequence: Sequence) -> bool:
        """Cuts the output text before the earliest stop string, if one has appeared."""
        text = self.tokenizer.decode(sequence.output_token_ids, skip_special_tokens=True)
        cuts = [position for position in (text.find(stop) for stop in sequence.sampling.stop) if position != -1]
        if not cuts:
            return False
        sequence.text = text[: min(cuts)]
        return True

    def _finish(self, sequence: Sequence, finish_reason: FinishReason) -> None:
        self.scheduler.finish(sequence)
        sequence.finish_reason = finish_reason
        text = sequence.text
        if text is None:
            text = self.tokenizer.decode(sequence.output_token_ids, skip_special_tokens=True)
        completion = Completion(
            token_ids=sequence.output_token_ids,
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=sequence.num_prompt_tokens,
            logprobs=sequence.logprobs if sequence.sampling.logprobs is not None else None,
        )
        resolve_future(sequence.future, result=completion)

    def _fail(self, sequence: Sequence, error: BaseException) -> None:
        self.scheduler.finish(sequence)
        resolve_future(sequence.future, error=error)

    def _fail_step(self, plan: StepPlan, error: BaseException) -> None:
        log.warning("engine step of %d sequences failed: %r", len(plan.scheduled), error)
        for item in plan.scheduled:
            self._fail(item.sequence, error)

    def _fail_everything(self, error: BaseException) -> None:
        with self._condition:
            incoming, self._incoming = self._incoming, []
        for sequence in [*self.scheduler.running, *self.scheduler.waiting, *incoming]:
            self._fail(sequence, error)


def build_engine(config: EngineConfig) -> LLMEngine:
    """The engine the worker runs (`DEEPBATCH_ENGINE=deepbatch`): when it cannot go on, the worker process
    ends at once (the leases of its requests run out and they run again elsewhere)."""
    return LLMEngine(config, on_fatal_error=exit_process)


def exit_process(error: EngineError) -> None:
    message = f"the engine cannot go on, the worker exits: {error}"
    log.critical(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(FATAL_EXIT_CODE)
