"""Turns each sequence's logits into its next token: greedy, or temperature + top-k + top-p sampling.

Every sampling request draws from its own torch.Generator (seeded from `seed`, or at random when none
is given), so a seeded request produces the same tokens whatever else shares its batch. Greedy rows
are one batched argmax; only sampled rows pay for the sort that top-k/top-p need.
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


class Sampler:
    def sample(self, logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
        """One next token per row of logits [sequences, vocab]."""
        logits = logits.float()
        token_ids = logits.argmax(dim=-1)
        sampled_rows = [row for row, sequence in enumerate(sequences) if not sequence.sampling.greedy]
        if sampled_rows:
            row_sequences = [sequences[row] for row in sampled_rows]
            probabilities = self.probabilities(logits[sampled_rows], row_sequences)
            for row_index, (row, sequence) in enumerate(zip(sampled_rows, row_sequences)):
                generator = self.generator_of(sequence, logits.device)
                token_ids[row] = torch.multinomial(probabilities[row_index], 1, generator=generator)[0]
        return token_ids.tolist()

    @staticmethod
    def probabilities(logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        device = logits.device
        temperatures = torch.tensor([s.sampling.temperature for s in sequences], device=device)
        logits = logits / temperatures[:, None]
        top_k = torch.tensor([s.sampling.top_k for s in sequences], device=device)
        top_p = torch.tensor([s.sampling.top_p for s in sequences], device=device)
        if bool((top_k > 0).any()) or bool((top_p < 1).any()):
            logits = apply_top_k_top_p(logits, top_k, top_p)
        return logits.softmax(dim=-1)

    @staticmethod
    def generator_of(sequence: Sequence, device: torch.device) -> torch.Generator:
        if sequence.random_generator is None:
            seed = sequence.sampling.seed if sequence.sampling.seed is not None else random.getrandbits(63)
            sequence.random_generator = torch.Generator(device=device).manual_seed(seed)
        return sequence.random_generator
