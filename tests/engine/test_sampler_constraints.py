"""Per-sequence constraints in the sampler: OpenAI's penalties and logit_bias against a hand computation on
fixed logits, a -100 bias that removes a token whatever its logit, and rows without constraints untouched
in the same batch."""

from __future__ import annotations

import pytest
import torch

from worker.engine.sampler import Sampler, adjusted_logits
from worker.engine.sequence import Sequence
from worker.engine.types import InvalidSamplingError, SamplingParams

LOGITS = [1.0, 2.0, 3.0, 4.0, 5.0]


def sequence_with(output_token_ids: list[int], **sampling) -> Sequence:
    sequence = Sequence([0, 0], SamplingParams(**sampling))
    sequence.token_ids.extend(output_token_ids)
    return sequence


def test_penalties_follow_openais_definition_by_hand():
    # Output so far: token 1 twice, token 3 once. The prompt's tokens (0) are not counted.
    sequence = sequence_with([1, 3, 1], frequency_penalty=0.5, presence_penalty=1.5)
    adjusted = adjusted_logits(torch.tensor([LOGITS]), [sequence])[0].tolist()
    # logit[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty
    assert adjusted == pytest.approx([1.0, 2.0 - 2 * 0.5 - 1.5, 3.0, 4.0 - 1 * 0.5 - 1.5, 5.0])


def test_negative_penalties_encourage_repetition():
    sequence = sequence_with([2, 2], frequency_penalty=-1.0, presence_penalty=-0.5)
    adjusted = adjusted_logits(torch.tensor([LOGITS]), [sequence])[0].tolist()
    assert adjusted == pytest.approx([1.0, 2.0, 3.0 + 2.0 + 0.5, 4.0, 5.0])


def test_logit_bias_adds_to_the_named_tokens():
    sequence = sequence_with([], logit_bias=((0, 10.0), (4, -2.5)))
    adjusted = adjusted_logits(torch.tensor([LOGITS]), [sequence])[0].tolist()
    assert adjusted == pytest.approx([11.0, 2.0, 3.0, 4.0, 2.5])
    assert Sampler().sample(torch.tensor([LOGITS]), [sequence]) == [0]


def test_a_bias_of_minus_100_removes_the_token_whatever_its_logit():
    logits = torch.tensor([[0.0, 1e6, 0.0]])  # token 1 would win by far more than 100
    banned = sequence_with([], logit_bias=((1, -100.0),))
    assert adjusted_logits(logits, [banned])[0, 1] == float("-inf")
    assert Sampler().sample(logits, [banned]) == [0]
    sampled = [sequence_with([], logit_bias=((1, -100.0),), temperature=1.0, seed=seed) for seed in range(200)]
    assert 1 not in Sampler().sample(logits.expand(200, -1).contiguous(), sampled)


def test_constraints_touch_only_their_own_rows_of_a_mixed_batch():
    logits = torch.tensor([LOGITS, LOGITS, LOGITS])
    sequences = [sequence_with([4, 4]), sequence_with([4, 4], frequency_penalty=2.0),
                 sequence_with([], logit_bias=((2, 100.0),), temperature=1.0, seed=3)]
    adjusted = adjusted_logits(logits, sequences)
    assert adjusted[0].tolist() == LOGITS
    assert adjusted[1].tolist() == pytest.approx([1.0, 2.0, 3.0, 4.0, 1.0])
    assert adjusted[2].tolist() == pytest.approx([1.0, 2.0, 103.0, 4.0, 5.0])
    assert Sampler().sample(logits, sequences) == [4, 3, 2]
    assert logits.tolist() == [LOGITS] * 3  # the model's buffer is never written


def test_unconstrained_batches_are_passed_through_as_they_are():
    logits = torch.tensor([LOGITS])
    assert adjusted_logits(logits, [sequence_with([1])]) is logits


@pytest.mark.parametrize("sampling", [{"presence_penalty": 2.5}, {"frequency_penalty": -2.01},
                                      {"logit_bias": ((1, 100.5),)}, {"logit_bias": ((-1, 1.0),)}])
def test_out_of_range_constraints_are_refused(sampling):
    with pytest.raises(InvalidSamplingError):
        SamplingParams(**sampling)
