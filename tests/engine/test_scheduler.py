"""The scheduler: token budget, batch-size cap, chunked prefill, preemption of the latest admitted."""

from __future__ import annotations

from worker.engine.block_manager import BlockManager
from worker.engine.scheduler import Scheduler
from worker.engine.sequence import Sequence, SequenceStatus
from worker.engine.types import SamplingParams


def make_scheduler(num_blocks=64, block_size=4, max_batch_size=8, max_num_batched_tokens=64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_batch_size, max_num_batched_tokens)


def run_step(scheduler: Scheduler, next_token: int = 7):
    """Schedules a step and pretends the model ran it: every completed sequence gets `next_token`."""
    plan = scheduler.schedule()
    for item in plan.scheduled:
        completes = item.completes_sequence
        scheduler.record_step(item)
        if completes:
            item.sequence.token_ids.append(next_token)
    return plan


def test_admits_within_the_token_budget_and_chunks_the_rest():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    long_prompt = Sequence(list(range(16)), SamplingParams())
    short_prompt = Sequence([1, 2, 3], SamplingParams())
    scheduler.add(long_prompt)
    scheduler.add(short_prompt)
    plan = run_step(scheduler)
    assert [(item.sequence, item.num_new_tokens) for item in plan.scheduled] == [(long_prompt, 10)]
    plan = run_step(scheduler)  # the long prompt's last 6 tokens, then the short prompt fits too
    assert [(item.sequence, item.num_new_tokens) for item in plan.scheduled] == [(long_prompt, 6), (short_prompt, 3)]
    assert long_prompt.num_output_tokens == 1 and short_prompt.num_output_tokens == 1


def test_decode_steps_compute_one_token_each():
    scheduler = make_scheduler()
    sequences = [Sequence([1, 2, 3, 4, 5], SamplingParams()) for _ in range(3)]
    for sequence in sequences:
        scheduler.add(sequence)
    run_step(scheduler)
    plan = run_step(scheduler)
    assert [item.num_new_tokens for item in plan.scheduled] == [1, 1, 1]


def test_max_batch_size_caps_running_sequences():
    scheduler = make_scheduler(max_batch_size=2)
    for _ in range(3):
        scheduler.add(Sequence([1, 2], SamplingParams()))
    plan = run_step(scheduler)
    assert len(plan.scheduled) == 2
    assert len(scheduler.waiting) == 1


def test_preempts_the_latest_admitted_when_blocks_run_out():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    older = Sequence([1, 2, 3, 4, 5, 6, 7], SamplingParams())
    newer = Sequence([11, 12, 13, 14, 15, 16, 17], SamplingParams())
    scheduler.add(older)
    scheduler.add(newer)
    run_step(scheduler)  # each holds 2 blocks for 7 tokens, then gets an 8th token
    run_step(scheduler)  # both decode into their second block
    plan = run_step(scheduler)  # the 9th token needs a third block each: none left
    assert plan.preempted == [newer]
    assert newer.status is SequenceStatus.WAITING and newer.num_computed_tokens == 0
    assert newer.block_table == [] and scheduler.waiting[0] is newer
    assert [item.sequence for item in plan.scheduled] == [older]
    scheduler.finish(older)
    tokens_before = len(newer.token_ids)
    plan = run_step(scheduler)  # recompute: the prompt and its generated tokens, prefilled again
    assert plan.scheduled[0].sequence is newer
    # Its first full block was published before the preemption, so the prefix cache spares it.
    assert plan.scheduled[0].num_new_tokens == tokens_before - 4
    assert newer.num_computed_tokens == tokens_before and len(newer.token_ids) == tokens_before + 1
