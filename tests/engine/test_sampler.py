"""The sampler: greedy, top-k/top-p masks, and per-request seeds independent of batch companions."""

from __future__ import annotations

import pytest
import torch

from worker.engine.model_runner import SampledOnDevice, fill_pending_inputs
from worker.engine.sampler import Sampler, apply_top_k_top_p, sample_by_inverse_transform
from worker.engine.sequence import Sequence
from worker.engine.types import SamplingParams


def sequence_with(**sampling) -> Sequence:
    return Sequence([1], SamplingParams(**sampling))


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    assert Sampler().sample(logits, [sequence_with(), sequence_with(top_k=1, temperature=1.0)]) == [1, 0]


def test_a_top_k_past_the_vocabulary_cuts_nothing_however_large():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    assert Sampler().sample(logits, [sequence_with(temperature=1.0, top_k=2**70, seed=1)])[0] in (0, 1, 2)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    masked = apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isfinite(masked).tolist() == [[False, True, True, False]]
    assert masked[0, 1] == 4.0


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probabilities = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probabilities.log()
    kept = torch.isfinite(apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.75]))).tolist()
    assert kept == [[True, True, False, False]]
    kept = torch.isfinite(apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.1]))).tolist()
    assert kept == [[True, False, False, False]]  # the most likely token always stays


def test_rows_get_their_own_top_k_and_top_p():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    masked = apply_top_k_top_p(logits, torch.tensor([1, 0]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(masked).tolist() == [[False, False, True], [True, True, True]]


def test_same_seed_same_tokens_whatever_the_batch():
    vocab_logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    alone = sequence_with(temperature=1.0, seed=42)
    draws_alone = [Sampler().sample(vocab_logits, [alone])[0] for _ in range(5)]
    accompanied = sequence_with(temperature=1.0, seed=42)
    draws_accompanied = []
    for _ in range(5):
        companions = [sequence_with(temperature=0.7), sequence_with(), sequence_with(temperature=1.3, top_p=0.9)]
        batch = companions[:1] + [accompanied] + companions[1:]
        logits = torch.cat([torch.randn(1, 1000), vocab_logits, torch.randn(2, 1000)])
        draws_accompanied.append(Sampler().sample(logits, batch)[1])
    assert draws_alone == draws_accompanied
    assert len(set(draws_alone)) > 1  # it really samples


def test_sampling_respects_top_k():
    logits = torch.zeros(1, 50)
    logits[0, 10] = logits[0, 20] = 1.0
    sequence = sequence_with(temperature=5.0, top_k=2, seed=1)
    assert {Sampler().sample(logits, [sequence])[0] for _ in range(40)} == {10, 20}


def test_inverse_transform_never_picks_a_zero_probability_token():
    probabilities = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    uniforms = torch.tensor([0.0, 0.49999, 0.5, 1.0 - 1e-12], dtype=torch.float64)
    assert sample_by_inverse_transform(probabilities, uniforms).tolist() == [1, 1, 3, 3]


def test_sampled_frequencies_follow_the_distribution():
    target = torch.tensor([0.1, 0.6, 0.3])
    sequences = [sequence_with(temperature=1.0, seed=seed) for seed in range(3000)]
    tokens = Sampler().sample(target.log().expand(len(sequences), -1).clone(), sequences)
    frequencies = torch.bincount(torch.tensor(tokens), minlength=3).float() / len(tokens)
    torch.testing.assert_close(frequencies, target, atol=0.03, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a stream to wait for needs a GPU")
def test_a_launched_step_samples_and_takes_its_inputs_without_waiting_for_the_stream():
    """A decode step launched while the one before still runs samples its rows (temperature, top-k, top-p) and
    takes its input tokens from that step without synchronizing the stream: a wait there holds the host until
    the steps end, which undoes the overlap (torch's blocking copy of a list to the GPU does). Torch's own
    synchronizations raise under the sync debug mode; a wait anywhere shows as the sleeping kernel done."""
    sequences = [sequence_with(temperature=0.8, top_k=20, top_p=0.9, seed=row) for row in range(3)]
    sequences.append(sequence_with())
    logits = torch.randn(4, 1000, device="cuda")
    previous = SampledOnDevice(sequences, torch.arange(4, device="cuda"))
    for sequence in sequences:
        sequence.num_pending_tokens = 1
    input_ids = torch.zeros(8, dtype=torch.long, device="cuda")
    # Once before: a first call allocates (pinned host blocks, device memory), which may synchronize; a
    # running engine's steps find those allocations in torch's caches.
    Sampler().choose_on_device(logits, sequences)
    fill_pending_inputs(input_ids, sequences[::-1], previous)
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # about half a second of GPU clock: the step still running
    still_running = torch.cuda.Event()
    still_running.record()
    torch.cuda.set_sync_debug_mode("error")
    try:
        token_ids = Sampler().choose_on_device(logits, sequences)
        fill_pending_inputs(input_ids, sequences[::-1], previous)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not still_running.query(), "the host waited for the stream (the driver's copy from pageable memory?)"
    torch.cuda.synchronize()
    assert token_ids[3].item() == logits[3].argmax().item()
    assert input_ids.tolist() == [3, 2, 1, 0, 0, 0, 0, 0]
