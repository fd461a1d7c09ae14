"""Turns each sequence's logits into its next token: greedy, or temperature + top-k + top-p sampling.

Sampling draws by inverse transform: each sampled row needs one uniform number, taken from the
sequence's own `random.Random` (seeded from `seed`, or at random when none is given), and the token is
where that number falls in the row's cumulative distribution. So a seeded request produces the same
tokens whatever else shares its batch, and the whole batch is sampled with a handful of tensor ops
rather than a random-generator call per row. Greedy rows are one batched argmax; only rows that ask
for top-k/top-p pay for the sort those need.
"""

from __future__ import annotations

import random

import torch

from worker.engine.sequence import Sequence


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits [rows, vocab] with -inf outside each row's top-k (0: no cut) and its top-p nucleus.

    The nucleus keeps the most likely tokens until their probability reaches top_p; the most likely
    token always stays.
    """
    sorted_logits, sorted_token_ids = logits.sort(dim=-1, descending=True)
    vocab_size = logits.shape[-1]
    ranks = torch.arange(vocab_size, device=logits.device)
    kept_count = torch.where(top_k > 0, top_k, vocab_size)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= kept_count[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    probability_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(probability_before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_token_ids, sorted_logits)


def sample_by_inverse_transform(probabilities: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token of each row [rows, vocab] where its uniform number [rows] falls in the cumulative distribution.

    The target is scaled by the row's own total and kept strictly below it, so rounding in float32
    cannot push a draw past the last token, and a token of probability zero is never chosen (the first
    cumulative sum above the target belongs to a token that adds something).
    """
    cumulative = probabilities.cumsum(dim=-1)
    totals = cumulative[:, -1:]
    just_below_totals = torch.nextafter(totals, torch.zeros_like(totals))
    targets = torch.minimum(uniforms[:, None].to(cumulative.dtype) * totals, just_below_totals)
    return torch.searchsorted(cumulative, targets, right=True)[:, 0]


class Sampler:
    def sample(self, logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
        """One next token per row of logits [sequences, vocab]."""
        token_ids = logits.argmax(dim=-1)
        sampled_rows = [row for row, sequence in enumerate(sequences) if not sequence.sampling.greedy]
        if sampled_rows:
            row_sequences = [sequences[row] for row in sampled_rows]
            rows = torch.tensor(sampled_rows, device=logits.device)
            probabilities = self.probabilities(logits[rows].float(), row_sequences)
            uniforms = torch.tensor([self.generator_of(sequence).random() for sequence in row_sequences],
                                    device=logits.device)
            token_ids[rows] = sample_by_inverse_transform(probabilities, uniforms)
        return token_ids.tolist()

    @staticmethod
    def probabilities(logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        device = logits.device
        temperatures = torch.tensor([s.sampling.temperature for s in sequences], device=device)
        logits = logits / temperatures[:, None]
        top_k = [s.sampling.top_k for s in sequences]
        top_p = [s.sampling.top_p for s in sequences]
        if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
            logits = apply_top_k_top_p(logits, torch.tensor(top_k, device=device), torch.tensor(top_p, device=device))
        return logits.softmax(dim=-1)

    @staticmethod
    def generator_of(sequence: Sequence) -> random.Random:
        if sequence.random_generator is None:
            seed = sequence.sampling.seed if sequence.sampling.seed is not None else random.getrandbits(63)
            sequence.random_generator = random.Random(seed)
        return sequence.random_generator
