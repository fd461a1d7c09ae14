"""The model runner on a GPU: steps laid out for the paged-attention kernel, decode steps replayed from CUDA graphs.

(Without graphs it also runs on the CPU under Triton's interpreter, which is how CI tests this path.)

Why graphs: a decode step of a 28-layer model launches hundreds of small kernels, and launched one by
one from Python they take longer than the GPU needs to run them. Each decode batch size bucket is
captured once and replayed, so a decode step costs a few copies and one graph launch. Prefill steps
vary in shape and are long enough to run eagerly.

Why one copy: every integer a step needs (token ids, positions, cache slots, per-sequence lengths,
block tables) is packed into one host array and crosses to the GPU in a single transfer; the per-step
host work is list building that grows with the number of sequences, plus numpy per prefill chunk.

`build_runner` lives here, beside both runners it chooses between, so that model_runner.py (the base) does
not import its own subclass.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from worker.engine.model_runner import ModelRunner, SampledOnDevice, StepBatch, fill_pending_inputs
from worker.engine.layers.attention import AttentionMetadata, PagedGroup, choose_backend
from worker.engine.scheduler import ScheduledSequence
from worker.engine.sequence import Sequence
from worker.engine.types import EngineConfig

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The captured decode batch sizes: 1, 2, 4, 8, then every multiple of 16 up to the engine's cap."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


@dataclass
class HostLayout:
    """One step's integers on the host, per token and per sequence, before the single copy to the GPU."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_starts: np.ndarray
    query_lens: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray  # [sequences, width]
    sample_token_indices: np.ndarray

    FIELDS = ("input_ids", "positions", "slot_mapping", "query_starts", "query_lens", "context_lens",
              "block_tables", "sample_token_indices")

    def pack(self) -> np.ndarray:
        """The fields end to end, each padded to 16 bytes: Triton compiles a kernel variant per pointer
        alignment, so every step must hand it equally aligned views."""
        return np.concatenate([padded_to_16_bytes(getattr(self, name).ravel()) for name in self.FIELDS])


def padded_length(size: int) -> int:
    """int32 elements a field of `size` takes in the packed step: a whole number of 16 bytes."""
    return size + -size % 4


def padded_to_16_bytes(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.int32, copy=False)
    return np.pad(array, (0, padded_length(array.size) - array.size))


def decode_layout(sequences: list[Sequence], rows: int, width: int, block_size: int, padding_block: int) -> HostLayout:
    """A decode step (one new token per sequence) padded to `rows` sequences: padding rows hold one
    position in the spare block, so they read and write nothing of a real sequence. `width` is at least the
    longest block table. Built with numpy over all sequences at once: at batch 1024 the per-sequence
    Python it replaces (a row assignment and a slot each) cost about 1 ms of host time a step."""
    count = len(sequences)
    lengths = np.fromiter((sequence.num_tokens for sequence in sequences), dtype=np.int32, count=count)
    table_lengths = np.fromiter((len(sequence.block_table) for sequence in sequences), dtype=np.int32, count=count)
    block_tables = np.full((rows, width), padding_block, dtype=np.int32)
    # Boolean indexing fills the selected cells row by row: the tables, end to end, land in their rows.
    block_tables[:count][np.arange(width) < table_lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(sequence.block_table for sequence in sequences), dtype=np.int32,
        count=int(table_lengths.sum()))
    positions = np.zeros(rows, dtype=np.int32)
    positions[:count] = lengths - 1
    slot_mapping = np.full(rows, padding_block * block_size, dtype=np.int32)
    slot_mapping[:count] = (block_tables[np.arange(count), positions[:count] // block_size] * block_size
                            + positions[:count] % block_size)
    input_ids = np.zeros(rows, dtype=np.int32)
    # A token still on the device (`num_pending_tokens`) is written there by the runner: 0 stands in for it.
    input_ids[:count] = np.fromiter((0 if sequence.num_pending_tokens else sequence.token_ids[-1]
                                     for sequence in sequences), dtype=np.int32, count=count)
    return HostLayout(
        input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
        query_starts=np.arange(rows, dtype=np.int32),
        query_lens=np.ones(rows, dtype=np.int32),
        context_lens=positions + 1,
        block_tables=block_tables,
        sample_token_indices=np.arange(count, dtype=np.int32),
    )


def chunk_layout(items: list[ScheduledSequence], first_token: int, block_size: int) -> HostLayout:
    """Sequences computing several tokens (prefill chunks), their tokens numbered from `first_token`."""
    query_lens = np.array([item.num_new_tokens for item in items], dtype=np.int32)
    query_starts = first_token + np.cumsum(query_lens, dtype=np.int32) - query_lens
    width = max(len(item.sequence.block_table) for item in items)
    block_tables = np.zeros((len(items), width), dtype=np.int32)
    input_ids, positions, slots = [], [], []
    for row, item in enumerate(items):
        sequence, start = item.sequence, item.sequence.num_computed_tokens
        table = np.asarray(sequence.block_table, dtype=np.int32)
        block_tables[row, : len(table)] = table
        token_positions = np.arange(start, start + item.num_new_tokens, dtype=np.int32)
        positions.append(token_positions)
        slots.append(table[token_positions // block_size] * block_size + token_positions % block_size)
        input_ids.append(np.asarray(sequence.token_ids[start : start + item.num_new_tokens], dtype=np.int32))
    completing = [row for row, item in enumerate(items) if item.completes_sequence]
    return HostLayout(
        input_ids=np.concatenate(input_ids), positions=np.concatenate(positions), slot_mapping=np.concatenate(slots),
        query_starts=query_starts, query_lens=query_lens,
        context_lens=np.array([item.sequence.num_computed_tokens + item.num_new_tokens for item in items],
                              dtype=np.int32),
        block_tables=block_tables,
        sample_token_indices=(query_starts + query_lens - 1)[completing],
    )


class DeviceLayout:
    """The packed step on the GPU, cut back into the views `HostLayout` packed."""

    def __init__(self, packed: torch.Tensor, layout: HostLayout):
        self.views: dict[str, torch.Tensor] = {}
        offset = 0
        for name in HostLayout.FIELDS:
            array = getattr(layout, name)
            self.views[name] = packed[offset : offset + array.size].view(array.shape)
            offset += padded_length(array.size)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.views[name]


@dataclass
class DecodeGraph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [batch size, vocab], written by each replay


class GpuModelRunner(ModelRunner):
    def __init__(self, model: nn.Module, block_size: int, num_blocks: int, device: torch.device,
                 dtype: torch.dtype, max_batch_size: int, max_model_len: int, use_cuda_graphs: bool = True):
        super().__init__(model, block_size, num_blocks, device, dtype)
        self.padding_block = num_blocks  # the spare block allocate_kv_cache adds
        self.max_blocks_per_sequence = -(-max_model_len // block_size)
        self.graphs: dict[int, DecodeGraph] = {}
        if use_cuda_graphs and not model.supports_cuda_graphs(device, dtype):
            log.warning("%s in %s cannot be captured in CUDA graphs; decode steps run eagerly",
                        type(model).__name__, dtype)
        elif use_cuda_graphs:
            self.graph_inputs = self._graph_input_buffers(max_batch_size)
            self.capture_decode_graphs(graph_batch_sizes(max_batch_size))

    # ---- eager steps ----

    def prepare_batch(self, scheduled: list[ScheduledSequence], previous: SampledOnDevice | None = None) -> StepBatch:
        decodes = [item for item in scheduled if item.is_decode]
        chunks = [item for item in scheduled if not item.is_decode]
        layouts: list[HostLayout] = []
        if decodes:
            layouts.append(self._decode_layout([item.sequence for item in decodes], len(decodes),
                                               max(len(item.sequence.block_table) for item in decodes)))
        if chunks:
            layouts.append(chunk_layout(chunks, len(decodes), self.block_size))
        devices = [DeviceLayout(packed, layout) for packed, layout in zip(self._to_device(layouts), layouts)]
        groups = [PagedGroup(device["query_starts"], device["query_lens"], device["context_lens"],
                             device["block_tables"], int(layout.query_lens.max()))
                  for device, layout in zip(devices, layouts)]
        ordered = decodes + chunks
        sampled = [item.sequence for item in ordered if item.completes_sequence]
        input_ids = torch.cat([device["input_ids"] for device in devices]).long()
        fill_pending_inputs(input_ids, [item.sequence for item in decodes], previous)  # decodes lead
        return StepBatch(
            input_ids=input_ids,
            positions=torch.cat([device["positions"] for device in devices]).long(),
            metadata=AttentionMetadata(torch.cat([device["slot_mapping"] for device in devices]).long(),
                                       paged_groups=groups, block_size=self.block_size),
            sample_token_indices=torch.cat([device["sample_token_indices"] for device in devices]).long(),
            sampled_sequences=sampled,
        )

    def _decode_layout(self, sequences: list[Sequence], rows: int, width: int) -> HostLayout:
        return decode_layout(sequences, rows, width, self.block_size, self.padding_block)

    def _to_device(self, layouts: list[HostLayout]) -> list[torch.Tensor]:
        """Every layout's integers in one host-to-device copy, split back per layout."""
        packed = [layout.pack() for layout in layouts]
        device = torch.from_numpy(np.concatenate(packed)).to(self.device, non_blocking=True)
        return list(device.split([array.size for array in packed]))  # each a multiple of 16 bytes

    # ---- decode steps from CUDA graphs ----

    def step_logits(self, scheduled: list[ScheduledSequence],
                    previous: SampledOnDevice | None = None) -> tuple[list[Sequence], torch.Tensor | None]:
        graph_size = self._graph_size_for(scheduled)
        if graph_size is None:
            return super().step_logits(scheduled, previous)
        sequences = [item.sequence for item in scheduled]
        return sequences, self._replay(sequences, graph_size, previous)

    def _graph_size_for(self, scheduled: list[ScheduledSequence]) -> int | None:
        """The smallest captured batch size that holds this step, if it is a pure decode step."""
        if not self.graphs or not all(item.is_decode for item in scheduled):
            return None
        return next((size for size in self.graphs if size >= len(scheduled)), None)

    @torch.inference_mode()
    def _replay(self, sequences: list[Sequence], graph_size: int, previous: SampledOnDevice | None) -> torch.Tensor:
        # Only the columns the longest table fills cross to the GPU: the kernel reads each row's table no further
        # than its context, so the buffer's later columns (stale ids of earlier steps) are never read.
        width = max(len(sequence.block_table) for sequence in sequences)
        layout = self._decode_layout(sequences, graph_size, width)
        device = DeviceLayout(self._to_device([layout])[0], layout)
        inputs = self.graph_inputs
        for name in ("input_ids", "positions", "slot_mapping", "context_lens"):
            inputs[name][:graph_size].copy_(device[name])
        inputs["block_tables"][:graph_size, :width].copy_(device["block_tables"])
        fill_pending_inputs(inputs["input_ids"], sequences, previous)
        decode_graph = self.graphs[graph_size]
        decode_graph.graph.replay()
        return decode_graph.logits[: len(sequences)]

    def _graph_input_buffers(self, max_batch_size: int) -> dict[str, torch.Tensor]:
        """Persistent inputs of every captured graph, filled with harmless padding (the spare block)."""
        def filled(value: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.full(shape, value, dtype=dtype, device=self.device)

        return {
            "input_ids": filled(0, max_batch_size),
            "positions": filled(0, max_batch_size),
            "slot_mapping": filled(self.padding_block * self.block_size, max_batch_size),
            "query_starts": torch.arange(max_batch_size, dtype=torch.int32, device=self.device),
            "query_lens": filled(1, max_batch_size, dtype=torch.int32),
            "context_lens": filled(1, max_batch_size, dtype=torch.int32),
            "block_tables": filled(self.padding_block, max_batch_size, self.max_blocks_per_sequence,
                                   dtype=torch.int32),
        }

    def _graph_forward(self, size: int) -> torch.Tensor:
        inputs = self.graph_inputs
        group = PagedGroup(inputs["query_starts"][:size], inputs["query_lens"][:size],
                           inputs["context_lens"][:size], inputs["block_tables"][:size], max_query_len=1)
        metadata = AttentionMetadata(inputs["slot_mapping"][:size], paged_groups=[group], block_size=self.block_size)
        hidden = self.model(inputs["input_ids"][:size], inputs["positions"][:size], metadata)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture_decode_graphs(self, sizes: list[int]) -> None:
        """Captures the largest first, so the smaller graphs reuse its memory pool."""
        pool = None
        for size in sorted(sizes, reverse=True):
            self._graph_forward(size)  # compiles the kernels and settles the allocator outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._graph_forward(size)
            pool = graph.pool()
            self.graphs[size] = DecodeGraph(graph, logits)
        self.graphs = dict(sorted(self.graphs.items()))  # smallest first, for _graph_size_for
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", sizes)

    def release_graphs(self) -> None:
        """Drops the decode graphs (and the collectives they captured) once no step runs: under tensor
        parallelism NCCL's teardown waits on communicators that live graphs still use."""
        self.graphs = {}
        torch.cuda.synchronize(self.device)


def build_runner(model: nn.Module, config: EngineConfig, num_blocks: int, device: torch.device, dtype: torch.dtype,
                 max_batch_size: int, max_model_len: int) -> ModelRunner:
    """The runner of the attention back-end (layers/attention.py): the paged kernel's (CUDA graphs for decode
    on a GPU) or the torch fallback's. Every rank of a tensor-parallel engine builds its runner here, alike."""
    backend = choose_backend(config.use_paged_kernel, config.use_cuda_graphs, device)
    if not backend.paged_kernel:
        return ModelRunner(model, config.kv_block_size, num_blocks, device, dtype)
    return GpuModelRunner(model, config.kv_block_size, num_blocks, device, dtype, max_batch_size, max_model_len,
                          use_cuda_graphs=backend.cuda_graphs)
