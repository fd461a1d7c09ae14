"""Tensor and expert parallelism over the devices of one host: how a model is split, and its collectives.

Layout (the Megatron split, as vLLM and nano-vllm use it): attention heads are divided across ranks, the
first projection of an MLP is split by output rows (column parallel) and the second by input columns
(row parallel), so each block needs one all-reduce of its output; routed experts are divided whole
(expert parallel); the embedding and the LM head are divided by vocabulary rows. `Shard` is what a
layer knows of this: its rank, the number of ranks and the two collectives it calls. The processes
that hold the ranks are worker/engine/ranks.py's.

Backends: NCCL carries the tensors between GPUs (and can be captured in CUDA graphs); the small step
messages always travel through a gloo group, on the host. On the CPU (tests) gloo carries everything.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from worker.engine.kernels.fp8_blocks import BLOCK as FP8_BLOCK
from worker.engine.types import TransientEngineError

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # a rank alive but stuck this long fails the collective


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


def leave_process_groups(wait_seconds: float = 10.0) -> None:
    """Ends this rank's groups without waiting for its peers. NCCL's orderly teardown blocked for ever on two
    H200s, on every rank at once, after decode CUDA graphs had captured its all-reduces, and so did an
    abort on rank 0 once its peers had gone (the runners now drop their graphs first: `release_graphs`).
    The abort runs on a daemon thread and is waited for `wait_seconds` at most: a process that is stopping
    its engine must not hang on a communicator nobody will use again (gloo's teardown never waits)."""
    if not dist.is_initialized():
        return
    if dist.get_backend() != "nccl":
        dist.destroy_process_group()
        return
    aborting = threading.Thread(target=dist.distributed_c10d._abort_process_group, name="nccl-abort", daemon=True)
    aborting.start()
    aborting.join(wait_seconds)
    if aborting.is_alive():
        log.warning("NCCL's abort did not return within %.0f s; leaving its communicator behind", wait_seconds)

