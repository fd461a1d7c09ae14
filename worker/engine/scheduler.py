"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Running sequences go first, oldest first: a decode computes one token, a prompt still being prefilled
computes as much of the rest as the step's token budget allows (chunked prefill). When the KV blocks
run out, the most recently admitted running sequence is preempted by recompute: its blocks are freed
and it goes back to the front of the waiting queue, to be prefilled again (prompt and output so far)
later. Then waiting sequences are admitted, first come first served, while the token budget, the
batch-size cap and the free blocks allow; a prefix-cache hit lets an admitted sequence skip the
tokens its cached blocks already hold. The further choices of a request (n > 1) wait behind the first
until its prompt is computed: admitted then, each finds the prompt's full blocks in the prefix cache and
computes only the tokens of its last, partial block.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    sequence: Sequence
    num_new_tokens: int  # tokens computed for it this step, starting at sequence.num_computed_tokens

    @property
    def completes_sequence(self) -> bool:
        """True when this step computes the sequence's last known token, so a next token is sampled."""
        return self.sequence.num_computed_tokens + self.num_new_tokens == self.sequence.num_tokens

    @property
    def is_decode(self) -> bool:
        """Computes the sequence's last token, to sample the next (a one-token prompt chunk may not)."""
        return self.num_new_tokens == 1 and self.completes_sequence


@dataclass
class StepPlan:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def finishes_when_resolved(sequence: Sequence) -> bool:
    """Whether the token a step still on the GPU sampled for it reaches its max_tokens."""
    return bool(sequence.num_pending_tokens) and (
        sequence.num_tokens - sequence.num_prompt_tokens >= sequence.sampling.max_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0
        self.num_prompt_tokens_computed = 0  # prefill work: prompt tokens whose KV a step computed

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, sequence: Sequence) -> None:
        sequence.status = SequenceStatus.WAITING
        self.waiting.append(sequence)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        token_budget = self._schedule_running(plan, self.max_num_batched_tokens)
        if not plan.preempted:  # blocks are short already: admitting more would only thrash
            self._admit_waiting(plan, token_budget)
        return plan

    def _schedule_running(self, plan: StepPlan, token_budget: int) -> int:
        index = 0
        while index < len(self.running) and token_budget > 0:
            sequence = self.running[index]
            if finishes_when_resolved(sequence):
                index += 1  # its pending token is its last: computing it would be wasted
                continue
            num_new_tokens = min(sequence.num_uncomputed_tokens, token_budget)
            target_tokens = sequence.num_computed_tokens + num_new_tokens
            # Most decode steps stay inside the last block: then there is nothing to make room for or grow.
            if self.block_manager.blocks_short(sequence, target_tokens) > 0:
                if not self._make_room(sequence, target_tokens, plan):
                    break
                self.block_manager.grow(sequence, target_tokens)
            plan.scheduled.append(ScheduledSequence(sequence, num_new_tokens))
            token_budget -= num_new_tokens
            index += 1
        return token_budget

    def _make_room(self, sequence: Sequence, target_tokens: int, plan: StepPlan) -> bool:
        """Preempts the latest admitted sequences until `sequence` can grow to `target_tokens` tokens;
        False when that took `sequence` itself."""
        while not self.block_manager.can_grow(sequence, target_tokens):
            victim = self.running[-1]
            plan.preempted.append(self._preempt(victim))
            if victim is sequence:
                return False
        return True

    def _admit_waiting(self, plan: StepPlan, token_budget: int) -> None:
        while self.waiting and token_budget > 0 and len(self.running) < self.max_batch_size:
            sequence = self.waiting[0]
            if sequence.prefill_after is not None and not sequence.prefill_after.prompt_is_computed:
                break  # for one step or a few (a chunked prefill): then its prompt's blocks are shared
            match = self.block_manager.match_prefix(sequence)
            num_cached_tokens = len(match.block_ids) * self.block_manager.block_size
            num_new_tokens = min(len(sequence.token_ids) - num_cached_tokens, token_budget)
            if not self.block_manager.can_admit(match, num_cached_tokens + num_new_tokens):
                break
            self.waiting.popleft()
            self.block_manager.admit(sequence, match, num_cached_tokens + num_new_tokens)
            sequence.prefill_after = None  # once admitted, never held again (not after a preemption either)
            sequence.status = SequenceStatus.RUNNING
            self.running.append(sequence)
            plan.scheduled.append(ScheduledSequence(sequence, num_new_tokens))
            token_budget -= num_new_tokens

    def _preempt(self, sequence: Sequence) -> Sequence:
        self.running.remove(sequence)
        self.block_manager.free(sequence)
        sequence.num_computed_tokens = 0
        sequence.status = SequenceStatus.WAITING
        self.waiting.appendleft(sequence)
        self.num_preemptions += 1
        return sequence

    def record_step(self, scheduled: ScheduledSequence) -> None:
        """After the model ran: the scheduled tokens now have KV in the cache; publish full blocks."""
        sequence = scheduled.sequence
        if sequence.num_computed_tokens < sequence.num_prompt_tokens:
            self.num_prompt_tokens_computed += min(scheduled.num_new_tokens,
                                                   sequence.num_prompt_tokens - sequence.num_computed_tokens)
        sequence.num_computed_tokens += scheduled.num_new_tokens
        self.block_manager.publish_full_blocks(sequence)

    def finish(self, sequence: Sequence) -> None:
        """Removes a finished (or failed) sequence and frees its blocks."""
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self.block_manager.free(sequence)
        sequence.status = SequenceStatus.FINISHED
