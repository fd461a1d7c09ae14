"""The processes of a tensor-parallel engine: rank 0 drives one child process per further rank.

The engine's own process is rank 0. It schedules, samples and drives one child process per further rank
(forked from a `forkserver` that has imported the engine: CUDA forbids a plain fork of a process that uses
it, and `spawn` would import torch again for every rank). Each step it broadcasts the scheduled sequences,
compactly (`RankStepItem`), and every rank runs the same forward on its shard (worker/engine/parallel.py
says how the model is split). A child watches its parent and exits when the parent is gone; rank 0
watches its children's process sentinels from a thread, so a rank that dies is reported at once by
number (`RankFailedError`), whatever collective the others are blocked in. Collectives also have a
timeout, for a rank that is alive but stuck.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from worker.engine.device import resolve_device, resolve_dtype
from worker.engine.loader import load_model
from worker.engine.gpu_runner import build_runner
from worker.engine.parallel import (
    ProcessGroups,
    RankFailedError,
    Shard,
    TensorParallelError,
    join_process_groups,
    leave_process_groups,
    rank_device,
)
from worker.engine.sizing import choose_num_kv_blocks
from worker.engine.types import EngineConfig

log = logging.getLogger(__name__)

# Child ranks fork from a server that imported these once (an engine's ranks start in a second, not after
# the imports each; CUDA is never initialised there, so forking from it is safe).
PRELOADED_MODULES = ["worker.engine.engine", "worker.engine.loader", "worker.engine.gpu_runner"]


class TokenTail:
    """The tokens a rank needs of a sequence (those computed this step) standing in for its whole list: it
    answers the length and the indexing the model runners use, so a step does not ship whole contexts."""

    def __init__(self, length: int, first: int, tail: list[int]):
        self.length, self.first, self.tail = length, first, tail

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.tail[index.start - self.first : index.stop - self.first]
        if index < 0:
            index += self.length
        return self.tail[index - self.first]


@dataclass
class RankSequence:
    """What a model runner reads of a sequence, on a rank other than 0."""

    token_ids: TokenTail
    block_table: list[int]
    num_computed_tokens: int
    num_pending_tokens: int = 0  # steps never overlap under tensor parallelism

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class RankStepItem:
    """One scheduled sequence as it is broadcast: its new tokens, its length, its blocks."""

    num_computed_tokens: int
    num_new_tokens: int
    length: int
    new_token_ids: list[int]
    block_table: list[int]

    @classmethod
    def of(cls, item) -> RankStepItem:
        sequence, start = item.sequence, item.sequence.num_computed_tokens
        return cls(start, item.num_new_tokens, len(sequence.token_ids),
                   sequence.token_ids[start : start + item.num_new_tokens], sequence.block_table)

    def scheduled(self):
        from worker.engine.scheduler import ScheduledSequence

        tokens = TokenTail(self.length, self.num_computed_tokens, self.new_token_ids)
        return ScheduledSequence(RankSequence(tokens, self.block_table, self.num_computed_tokens), self.num_new_tokens)


# ---- process group and rank processes ----


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def describe_exit(exit_code: int | None) -> str:
    if exit_code is None:
        return "still running"
    if exit_code < 0:
        return f"killed by {signal.Signals(-exit_code).name}"
    return f"exit code {exit_code}"


@dataclass
class RankProcesses:
    """Rank 0's side: the child ranks, their watcher, and the step broadcast."""

    groups: ProcessGroups
    processes: list[multiprocessing.Process]
    on_death: Callable[[RankFailedError], None]
    lifeline: multiprocessing.connection.Connection  # never written: the children see it close when rank 0 ends
    error: RankFailedError | None = None
    _stopping: bool = False
    _watcher: threading.Thread = field(init=False)

    @classmethod
    def start(cls, config: EngineConfig, device: torch.device,
              on_death: Callable[[RankFailedError], None]) -> RankProcesses:
        """Starts ranks 1..N-1 and joins the process group with them as rank 0."""
        if dist.is_initialized():
            raise TensorParallelError("a tensor-parallel engine already runs in this process; one per process")
        size, address = config.tensor_parallel_size, free_address()
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOADED_MODULES)
        lifeline_end, lifeline = context.Pipe(duplex=False)
        processes = [context.Process(target=serve_rank, args=(rank, size, address, config, lifeline_end),
                                     name=f"deepbatch-rank-{rank}", daemon=True) for rank in range(1, size)]
        for process in processes:
            process.start()
        lifeline_end.close()
        ranks = cls(ProcessGroups(Shard(0, size)), processes, on_death, lifeline)
        ranks._watcher = threading.Thread(target=ranks._watch, name="deepbatch-rank-watcher", daemon=True)
        ranks._watcher.start()
        try:
            ranks.groups = join_process_groups(0, size, address, rank_device(device, 0))  # "cuda" → "cuda:0"
        except BaseException:
            ranks.abandon()
            raise
        return ranks

    @property
    def shard(self) -> Shard:
        return self.groups.shard

    def _watch(self) -> None:
        by_sentinel = {process.sentinel: (rank, process) for rank, process in enumerate(self.processes, start=1)}
        ended = multiprocessing.connection.wait(list(by_sentinel))
        if self._stopping:
            return
        rank, process = by_sentinel[ended[0]]
        process.join(timeout=1)
        self.error = RankFailedError(f"tensor-parallel rank {rank} (pid {process.pid}) died "
                                     f"({describe_exit(process.exitcode)}); the engine stops")
        log.critical("%s", self.error)
        self.on_death(self.error)

    def dead_rank_error(self, wait_seconds: float = 2.0) -> RankFailedError | None:
        """After a failed collective: the dead rank's error once the watcher has seen it (a killed peer fails
        gloo's collectives at about the moment its sentinel fires); None if no rank died meanwhile."""
        deadline = time.monotonic() + wait_seconds
        while self.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.error

    def broadcast_step(self, scheduled: list) -> None:
        self.groups.broadcast(("step", [RankStepItem.of(item) for item in scheduled]))

    def stop(self) -> None:
        """Tells the ranks to leave (when they can still hear it), then makes sure they are gone."""
        self._stopping = True
        if self.error is None:
            try:
                self.groups.broadcast(("stop", None))
            except RuntimeError as error:  # a rank that died meanwhile: it is killed below anyway
                log.warning("could not tell the ranks to stop: %s", error)
        self._end_processes(timeout=10)

    def abandon(self) -> None:
        """After a failed start: the ranks are killed, not asked."""
        self._stopping = True
        self._end_processes(timeout=0)

    def _end_processes(self, timeout: float) -> None:
        for process in self.processes:
            process.join(timeout=timeout)
            if process.is_alive():
                process.kill()
                process.join()
        leave_process_groups()


class DrivingRunner:
    """Rank 0's model runner under tensor parallelism: each step is broadcast to the other ranks before this
    rank runs it, so that all of them meet in the same collectives."""

    def __init__(self, local, ranks: RankProcesses):
        self.local, self.ranks = local, ranks

    def execute(self, scheduled: list, previous=None) -> tuple[list, list[int]]:
        """`previous` is always None: the engine never overlaps steps under tensor parallelism, whose ranks are
        sent each step's token ids."""
        self.ranks.broadcast_step(scheduled)
        return self.local.execute(scheduled)

    def step_logits(self, scheduled: list, previous=None):
        self.ranks.broadcast_step(scheduled)
        return self.local.step_logits(scheduled)

    def __getattr__(self, name: str):
        return getattr(self.local, name)  # graphs, sampler, ... of the local runner


def exit_when_parent_dies(lifeline_end: multiprocessing.connection.Connection) -> None:
    """A child rank must not outlive rank 0: a thread waits on the read end of a pipe whose only write end
    rank 0 holds, and ends the process when the kernel closes it (rank 0 gone, however it died). Not
    PR_SET_PDEATHSIG: it follows the thread that started the child, and the forkserver is the parent."""
    def watch() -> None:
        try:
            lifeline_end.recv()
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="deepbatch-parent-watcher", daemon=True).start()


def serve_rank(rank: int, size: int, address: str, config: EngineConfig,
               lifeline_end: multiprocessing.connection.Connection) -> None:
    """A child rank's life: load its shard, build the same runner as rank 0, run each broadcast step."""
    exit_when_parent_dies(lifeline_end)

    logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(levelname)s %(message)s")
    device = rank_device(resolve_device(config.device), rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dtype = resolve_dtype(config.dtype, device)
    groups = join_process_groups(rank, size, address, device)
    model, _ = load_model(config.model, config.seed, device, dtype, groups.shard, config.quantization)
    if device.type == "cuda":  # as rank 0 does: what loading held goes back before the cache is sized
        gc.collect()
        torch.cuda.empty_cache()
    bytes_per_block = model.kv_cache_bytes_per_token(dtype) * config.kv_block_size
    groups.fewest(choose_num_kv_blocks(config, bytes_per_block, device))
    num_blocks, max_batch_size, max_model_len = groups.broadcast()
    runner = build_runner(model, config, num_blocks, device, dtype, max_batch_size, max_model_len)
    while True:
        kind, items = groups.broadcast()
        if kind == "stop":
            break
        runner.step_logits([item.scheduled() for item in items])
    runner.release_graphs()
    leave_process_groups()
