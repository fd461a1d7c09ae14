"""Tensor and expert parallelism over the devices of one host: the process group, the rank processes, the collectives.

Layout (the Megatron split, as vLLM and nano-vllm use it): attention heads are divided across ranks, the
first projection of an MLP is split by output rows (column parallel) and the second by input columns
(row parallel), so each block needs one all-reduce of its output; routed experts are divided whole
(expert parallel); the embedding and the LM head are divided by vocabulary rows. `Shard` is what a
layer knows of this: its rank, the number of ranks and the two collectives it calls.

Processes: the engine's own process is rank 0. It schedules, samples and drives one child process per
further rank (forked from a `forkserver` that has imported the engine: CUDA forbids a plain fork of a
process that uses it, and `spawn` would import torch again for every rank). Each step it broadcasts the scheduled
sequences, compactly (`RankStepItem`), and every rank runs the same forward on its shard. A child
watches its parent and exits when the parent is gone; rank 0 watches its children's process sentinels
from a thread, so a rank that dies is reported at once by number (`RankFailedError`), whatever
collective the others are blocked in. Collectives also have a timeout, for a rank that is alive but stuck.

Backends: NCCL carries the tensors between GPUs (and can be captured in CUDA graphs); the small step
messages always travel through a gloo group, on the host. On the CPU (tests) gloo carries everything.
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
from datetime import timedelta

import torch
import torch.distributed as dist

from worker.engine.types import EngineConfig, TransientEngineError

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # a rank alive but stuck this long fails the collective
# Child ranks fork from a server that imported these once (an engine's ranks start in a second, not after
# the imports each; CUDA is never initialised there, so forking from it is safe).
PRELOADED_MODULES = ["worker.engine.engine", "worker.engine.loader", "worker.engine.gpu_runner"]
FP8_BLOCK = 128  # rows and columns of one block scale of a block-quantised weight (`weight_scale_inv`)


class TensorParallelError(ValueError):
    """A tensor-parallel engine that cannot be built: a model that does not split over the configured number
    of ranks (the message names the count at fault), or a second such engine in one process."""


class RankFailedError(TransientEngineError):
    """A rank of a tensor-parallel engine died or failed a step: the ranks can no longer run in step, so the
    engine stops; its requests are worth running again elsewhere."""


# ---- what a layer knows of the parallel layout ----


@dataclass(frozen=True)
class Shard:
    """This process's place among the tensor-parallel ranks; the single-rank default makes every collective a no-op."""

    rank: int = 0
    size: int = 1

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    def part(self, total: int, what: str) -> int:
        """This rank's share of `total` (heads, rows, experts), which must divide evenly."""
        if total % self.size:
            raise TensorParallelError(
                f"tensor_parallel_size={self.size} does not divide the model's {total} {what}")
        return total // self.size

    def rows(self, count: int, dim: int = 0) -> TensorSlice:
        """This rank's `count` consecutive rows (or columns, dim=1) of a weight split evenly."""
        return TensorSlice(dim, self.rank * count, count)

    def first_rank_only(self) -> FirstRankOnly:
        return FirstRankOnly(self.rank)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (the output of a row-parallel layer)."""
        if self.is_parallel:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_columns(self, tensor: torch.Tensor) -> torch.Tensor:
        """[rows, columns] of every rank side by side: [rows, size × columns] (logits of each vocabulary part)."""
        if not self.is_parallel:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class TensorSlice:
    """`length` entries of `dim` from `start`; past the tensor's end the slice is padded with zeros (the last
    rank's part of a vocabulary that does not divide evenly). `block` shrinks it to block scales."""

    dim: int
    start: int
    length: int

    def __call__(self, tensor: torch.Tensor, block: int = 1) -> torch.Tensor:
        if self.start % block or self.length % block:
            raise TensorParallelError(f"a tensor-parallel slice of {self.length} rows from row {self.start} does "
                                      f"not fall on the {block}-row blocks of the weight's FP8 scales")
        start, length = self.start // block, self.length // block
        available = max(0, min(length, tensor.shape[self.dim] - start))
        taken = tensor.narrow(self.dim, start, available)
        if available == length:
            return taken
        padding = list(tensor.shape)
        padding[self.dim] = length - available
        return torch.cat((taken, tensor.new_zeros(padding)), dim=self.dim)


@dataclass(frozen=True)
class FirstRankOnly:
    """The bias of a row-parallel layer: added by rank 0 alone, so that the all-reduce counts it once."""

    rank: int

    def __call__(self, tensor: torch.Tensor, block: int = 1) -> torch.Tensor:
        return tensor if self.rank == 0 else torch.zeros_like(tensor)


def slice_checkpoint_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a checkpoint tensor `<module path>.<projection>.<kind>`, as the module at the path
    declares in `checkpoint_slices` ({"q_proj.weight": TensorSlice, ...}); the whole tensor otherwise.
    A block-quantised weight's `weight_scale_inv` follows its weight's slice, in blocks."""
    module_path, projection, kind = split_tensor_name(name)
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return tensor
    slices = getattr(module, "checkpoint_slices", {})
    if kind == "weight_scale_inv" and f"{projection}.weight" in slices:
        return slices[f"{projection}.weight"](tensor, block=FP8_BLOCK)
    take = slices.get(f"{projection}.{kind}")
    return take(tensor) if take is not None else tensor


def split_tensor_name(name: str) -> tuple[str, str, str]:
    prefix, _, kind = name.rpartition(".")
    module_path, _, projection = prefix.rpartition(".")
    return module_path, projection, kind


def embed_vocab_parallel(embedding: torch.nn.Embedding, input_ids: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Each rank holds `num_embeddings` consecutive vocabulary rows: it looks up the ids in its part, zeros
    the others, and the all-reduce assembles every token's row."""
    if not shard.is_parallel:
        return embedding(input_ids)
    local_ids = input_ids - shard.rank * embedding.num_embeddings
    inside = (local_ids >= 0) & (local_ids < embedding.num_embeddings)
    hidden = embedding(local_ids.clamp(0, embedding.num_embeddings - 1))
    return shard.all_reduce(hidden.masked_fill(~inside[:, None], 0))


# ---- the step each rank runs ----


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


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on the r-th GPU from the configured one; on the CPU every rank shares the host."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


@dataclass
class ProcessGroups:
    """The collectives of one rank: `control` (gloo, host objects) beside the default group (tensors)."""

    shard: Shard
    control: object = None  # None: the default group, when it is gloo itself

    def broadcast(self, value=None):
        """Rank 0's `value`, on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def fewest(self, value: int) -> int:
        """The smallest of every rank's `value` (the KV blocks every rank can hold)."""
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.control)
        return int(tensor.item())


def join_process_groups(rank: int, size: int, address: str, device: torch.device) -> ProcessGroups:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if backend != "gloo" else None
    return ProcessGroups(Shard(rank, size), control)


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


def leave_process_groups() -> None:
    """Ends this rank's groups without waiting for its peers. NCCL's orderly teardown blocked for ever on two
    H200s, on every rank at once, after decode CUDA graphs had captured its all-reduces; an abort does not
    wait, and a rank that leaves has no collective left to finish (gloo's teardown never waits)."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


class DrivingRunner:
    """Rank 0's model runner under tensor parallelism: each step is broadcast to the other ranks before this
    rank runs it, so that all of them meet in the same collectives."""

    def __init__(self, local, ranks: RankProcesses):
        self.local, self.ranks = local, ranks

    def execute(self, scheduled: list) -> tuple[list, list[int]]:
        self.ranks.broadcast_step(scheduled)
        return self.local.execute(scheduled)

    def step_logits(self, scheduled: list):
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
    from worker.engine import engine as engine_module
    from worker.engine.device import resolve_device, resolve_dtype
    from worker.engine.loader import load_model
    from worker.engine.model_runner import build_runner

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
    groups.fewest(engine_module.choose_num_kv_blocks(config, bytes_per_block, device))
    num_blocks, max_batch_size, max_model_len = groups.broadcast()
    runner = build_runner(model, config, num_blocks, device, dtype, max_batch_size, max_model_len)
    while True:
        kind, items = groups.broadcast()
        if kind == "stop":
            break
        runner.step_logits([item.scheduled() for item in items])
    leave_process_groups()
