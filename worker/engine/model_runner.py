"""Runs one scheduled step: batch tensors in, one sampled token per completed sequence out.

A step's new tokens are flattened into one list (decodes first, then prefill chunks) with their
positions and KV-cache slots; `AttentionMetadata` tells each attention layer which cache slots every
sequence reads. Index arithmetic is done with tensor ops rather than per-token Python loops, so the
per-step Python work grows with the number of sequences, not of tokens. This is the CPU path, which
gathers the cache into dense tensors; the GPU path (worker/engine/gpu_runner.py) subclasses it with
the paged-attention kernel and CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from worker.engine.device import host_values_on
from worker.engine.layers.attention import AttentionGroup, AttentionMetadata
from worker.engine.sampler import Sampler
from worker.engine.scheduler import ScheduledSequence
from worker.engine.sequence import Sequence


class SampledOnDevice:
    """The tokens a launched step sampled, one per sequence, still on the device: the next step reads its
    input tokens from here on the device, and the host reads them once, after that step is launched. On a GPU
    they are copied to pinned memory as soon as they are sampled, ahead of the next step's kernels in the
    stream, so reading them waits for this step only."""

    def __init__(self, sequences: list[Sequence], token_ids: torch.Tensor):
        self.sequences = sequences
        self.token_ids = token_ids  # [sequences] int64
        self.row_of = {id(sequence): row for row, sequence in enumerate(sequences)}
        self.copied = None
        self.host = token_ids
        if token_ids.is_cuda:
            self.host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self.host.copy_(token_ids, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()

    def read(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()


def fill_pending_inputs(input_ids: torch.Tensor, sequences: list[Sequence], previous: SampledOnDevice | None) -> None:
    """Writes into input_ids [rows ≥ sequences] the input token of each sequence whose last token is still on the
    device (a decode input is its last token), taken from the step that sampled it."""
    rows = [row for row, sequence in enumerate(sequences) if sequence.num_pending_tokens]
    if not rows:
        return
    sources = [previous.row_of[id(sequences[row])] for row in rows]
    device = input_ids.device
    input_ids[host_values_on(device, rows)] = previous.token_ids[host_values_on(device, sources)].to(input_ids.dtype)


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    metadata: AttentionMetadata
    sample_token_indices: torch.Tensor  # last token of each sequence that gets a next token
    sampled_sequences: list[Sequence]


class ModelRunner:
    def __init__(self, model: nn.Module, block_size: int, num_blocks: int, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        model.allocate_kv_cache(num_blocks, block_size, dtype, device)

    def release_graphs(self) -> None:
        """Nothing captured here (the GPU runner's decode graphs: worker/engine/gpu_runner.py)."""

    def execute(self, scheduled: list[ScheduledSequence],
                previous: SampledOnDevice | None = None) -> tuple[list[Sequence], list[int]]:
        """Runs the step; returns the sequences that got a next token, and those tokens. `previous`: the step
        still on the device whose tokens some of these sequences take as input."""
        sequences, logits = self.step_logits(scheduled, previous)
        if not sequences:
            return [], []
        return sequences, self.sampler.sample(logits, sequences)

    @torch.inference_mode()
    def launch(self, scheduled: list[ScheduledSequence], previous: SampledOnDevice | None) -> SampledOnDevice:
        """Runs a decode step of sequences that sample from the logits as they are
        (`Sampler.samples_logits_as_they_are`) and returns at once: its tokens stay on the device until read."""
        sequences, logits = self.step_logits(scheduled, previous)
        return SampledOnDevice(sequences, self.sampler.choose_on_device(logits, sequences))

    @torch.inference_mode()
    def step_logits(self, scheduled: list[ScheduledSequence],
                    previous: SampledOnDevice | None = None) -> tuple[list[Sequence], torch.Tensor | None]:
        """Runs the step's forward: the sequences that get a next token and their logits [sequences, vocab]
        (None when the step only fills the cache). Ranks other than 0 of a tensor-parallel engine stop here."""
        batch = self.prepare_batch(scheduled, previous)
        if not batch.sampled_sequences:
            self.forward(batch)
            return [], None
        return batch.sampled_sequences, self.sampled_logits(batch)

    def forward(self, batch: StepBatch) -> torch.Tensor:
        return self.model(batch.input_ids, batch.positions, batch.metadata)

    def sampled_logits(self, batch: StepBatch) -> torch.Tensor:
        """Logits [sampled sequences, vocab] of the step's last token of each sequence that gets a next token."""
        hidden = self.forward(batch)
        return self.model.compute_logits(hidden[batch.sample_token_indices])

    def prepare_batch(self, scheduled: list[ScheduledSequence], previous: SampledOnDevice | None = None) -> StepBatch:
        decodes = [item for item in scheduled if item.num_new_tokens == 1]
        prefills = [item for item in scheduled if item.num_new_tokens > 1]
        ordered = decodes + prefills
        input_ids: list[int] = []
        for item in ordered:
            start = item.sequence.num_computed_tokens
            known = item.sequence.token_ids[start : start + item.num_new_tokens]
            input_ids.extend(known + [0] * (item.num_new_tokens - len(known)))  # 0: still on the device
        num_new_tokens = torch.tensor([item.num_new_tokens for item in ordered])
        start_positions = torch.tensor([item.sequence.num_computed_tokens for item in ordered])
        block_tables = self.padded_block_tables([item.sequence for item in ordered])
        token_sequence_index = torch.repeat_interleave(torch.arange(len(ordered)), num_new_tokens)
        query_starts = torch.cumsum(num_new_tokens, dim=0) - num_new_tokens
        positions = start_positions[token_sequence_index] + (
            torch.arange(len(input_ids)) - query_starts[token_sequence_index]
        )
        slot_mapping = self.slots_of(block_tables, token_sequence_index, positions)
        groups = []
        for group_slice, is_decode in ((slice(0, len(decodes)), True), (slice(len(decodes), len(ordered)), False)):
            if group_slice.start < group_slice.stop:
                groups.append(
                    self.attention_group(
                        query_starts[group_slice], num_new_tokens[group_slice],
                        start_positions[group_slice], block_tables[group_slice], is_decode,
                    )
                )
        completing = [index for index, item in enumerate(ordered) if item.completes_sequence]
        sample_token_indices = (query_starts + num_new_tokens - 1)[completing]
        device_input_ids = torch.tensor(input_ids).to(self.device)
        fill_pending_inputs(device_input_ids, [item.sequence for item in decodes], previous)  # decodes lead
        return StepBatch(
            input_ids=device_input_ids,
            positions=positions.to(self.device),
            metadata=AttentionMetadata(slot_mapping=slot_mapping.to(self.device), groups=groups),
            sample_token_indices=sample_token_indices.to(self.device),
            sampled_sequences=[ordered[index].sequence for index in completing],
        )

    def padded_block_tables(self, sequences: list[Sequence]) -> torch.Tensor:
        """[sequences, most blocks] block ids, padded with block 0 (only ever read under a mask)."""
        most_blocks = max(len(sequence.block_table) for sequence in sequences)
        return torch.tensor(
            [sequence.block_table + [0] * (most_blocks - len(sequence.block_table)) for sequence in sequences]
        )

    def slots_of(self, block_tables: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat cache slot of each position of the sequence in block-table row `rows` (broadcast together)."""
        block_ids = block_tables[rows, torch.div(positions, self.block_size, rounding_mode="floor")]
        return block_ids * self.block_size + positions % self.block_size

    def attention_group(
        self,
        query_starts: torch.Tensor,
        num_new_tokens: torch.Tensor,
        start_positions: torch.Tensor,
        block_tables: torch.Tensor,
        is_decode: bool,
    ) -> AttentionGroup:
        max_query_len = int(num_new_tokens.max())
        query_offsets = torch.arange(max_query_len)
        query_is_real = query_offsets[None, :] < num_new_tokens[:, None]
        # Padding repeats each sequence's last query so that its (discarded) row stays finite.
        query_token_indices = query_starts[:, None] + torch.minimum(query_offsets[None, :], num_new_tokens[:, None] - 1)
        context_lens = start_positions + num_new_tokens
        context_positions = torch.arange(int(context_lens.max()))
        rows = torch.arange(block_tables.shape[0])[:, None]
        key_slots = self.slots_of(block_tables, rows, context_positions[None, :])
        query_positions = start_positions[:, None] + query_offsets[None, :]
        attend_mask = context_positions[None, None, :] <= query_positions[:, :, None]
        return AttentionGroup(
            query_token_indices=query_token_indices.to(self.device),
            query_is_real=query_is_real.to(self.device),
            key_slots=key_slots.to(self.device),
            attend_mask=attend_mask.to(self.device),
            real_query_token_indices=query_token_indices[query_is_real].to(self.device),
            is_decode=is_decode,
        )
