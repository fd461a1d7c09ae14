"""Turns each sequence's logits into its next token: greedy, or temperature + top-k + top-p sampling.

Before either, each row's own constraints adjust its logits, in one batched op each and only for the
rows that ask (the rest of the batch is untouched, and the model's forward, CUDA graphs included, never
sees them): OpenAI's frequency and presence penalties over the tokens the sequence generated so far,
logit_bias (a bias of -100 bans the token: its logit becomes -inf, so no logit however large brings it
back), and the grammar mask of structured output (worker/engine/grammar.py).

Sampling draws by inverse transform: each sampled row needs one uniform number, taken from the
sequence's own `random.Random` (seeded from `seed`, or at random when none is given), and the token is
where that number falls in the row's cumulative distribution. So a seeded request produces the same
tokens whatever else shares its batch, and the whole batch is sampled with a handful of tensor ops
rather than a random-generator call per row. Greedy rows are one batched argmax. On a GPU a Triton
program per sampled row applies temperature, top-k and top-p and draws, finding the cuts by searching the
logits' bit patterns rather than by sorting the vocabulary (worker/engine/kernels/sampling.py); on a CPU the torch ops below
do, and only rows that ask for top-k/top-p pay for the sort those need.
"""

from __future__ import annotations

import random

import torch

from worker.engine.device import host_values_on
from worker.engine.grammar import GrammarMasks
from worker.engine.sequence import Sequence
from worker.engine.types import MAX_LOGIT_BIAS


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


def apply_penalties(logits: torch.Tensor, sequences: list[Sequence]) -> None:
    """OpenAI's penalties, in place on float logits [sequences, vocab]: logit[j] -= count[j] * frequency_penalty
    + (count[j] > 0) * presence_penalty, count[j] being how often token j occurs in the sequence's output."""
    rows = [row for row, sequence in enumerate(sequences) if sequence.sampling.has_penalties]
    outputs = [sequences[row].output_token_ids for row in rows]
    longest = max((len(output) for output in outputs), default=0)
    if longest == 0:
        return
    device = logits.device
    padded = torch.tensor([output + [0] * (longest - len(output)) for output in outputs], device=device)
    is_real = torch.arange(longest, device=device)[None, :] < torch.tensor([len(o) for o in outputs], device=device)[:, None]
    counts = torch.zeros(len(rows), logits.shape[-1], device=device).scatter_add_(1, padded, is_real.float())
    frequency = torch.tensor([sequences[row].sampling.frequency_penalty for row in rows], device=device)
    presence = torch.tensor([sequences[row].sampling.presence_penalty for row in rows], device=device)
    row_index = torch.tensor(rows, device=device)
    logits[row_index] -= counts * frequency[:, None] + (counts > 0).float() * presence[:, None]


def apply_logit_bias(logits: torch.Tensor, sequences: list[Sequence]) -> None:
    """Each row's logit_bias added, in place, to float logits [sequences, vocab]; -100 sets the logit to -inf."""
    entries = [(row, token_id, bias) for row, sequence in enumerate(sequences)
               for token_id, bias in sequence.sampling.logit_bias]
    if not entries:
        return
    rows, token_ids, biases = zip(*entries)
    device = logits.device
    biases_tensor = torch.tensor(biases, device=device, dtype=logits.dtype)
    biases_tensor = biases_tensor.masked_fill(biases_tensor <= -MAX_LOGIT_BIAS, float("-inf"))
    logits.index_put_((torch.tensor(rows, device=device), torch.tensor(token_ids, device=device)), biases_tensor,
                      accumulate=True)


def adjusts_logits(sequence: Sequence) -> bool:
    """Whether the sequence's row of logits is changed before it is sampled: penalties, logit_bias, a grammar."""
    return sequence.sampling.has_penalties or bool(sequence.sampling.logit_bias) or sequence.grammar_matcher is not None


def adjusted_logits(logits: torch.Tensor, sequences: list[Sequence], masks: GrammarMasks | None = None) -> torch.Tensor:
    """The logits after each row's penalties, logit_bias and grammar mask: a float32 copy when any row has one
    (the model's own buffer, a CUDA graph's output, is never written), else the logits as they are."""
    if not any(adjusts_logits(sequence) for sequence in sequences):
        return logits
    logits = logits.to(torch.float32, copy=True)
    apply_penalties(logits, sequences)
    apply_logit_bias(logits, sequences)
    (masks or GrammarMasks()).apply(logits, sequences)
    return logits


def record_logprobs(logits: torch.Tensor, sequences: list[Sequence], token_ids: list[int]) -> None:
    """For each sequence that asks: the chosen token's log-probability and the k likeliest, from the adjusted
    logits (penalties, bias, grammar mask) divided by the temperature (1 for greedy) before the top-k/top-p cut,
    the distribution the token was drawn from. Batched: one log_softmax and one topk for the rows that ask."""
    rows = [row for row, sequence in enumerate(sequences) if sequence.sampling.logprobs is not None]
    if not rows:
        return
    device = logits.device
    row_index = torch.tensor(rows, device=device)
    temperatures = torch.tensor([sequences[row].sampling.temperature or 1.0 for row in rows], device=device)
    log_probabilities = (logits[row_index].float() / temperatures[:, None]).log_softmax(dim=-1)
    chosen = log_probabilities.gather(1, torch.tensor([[token_ids[row]] for row in rows], device=device))[:, 0]
    most = max(sequences[row].sampling.logprobs for row in rows)
    top_values, top_ids = log_probabilities.topk(most, dim=-1) if most else (None, None)
    chosen_list = chosen.tolist()
    top_values_list = top_values.tolist() if most else None
    top_ids_list = top_ids.tolist() if most else None
    for position, row in enumerate(rows):
        k = sequences[row].sampling.logprobs
        top = [] if not k else [(token_id, value) for token_id, value in
                                zip(top_ids_list[position][:k], top_values_list[position][:k]) if value > float("-inf")]
        sequences[row].pending_logprob = (token_ids[row], chosen_list[position], top)


class Sampler:
    def __init__(self) -> None:
        self.grammar_masks = GrammarMasks()  # its buffers live as long as the runner

    def sample(self, logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
        """One next token per row of logits [sequences, vocab]; a constrained sequence's matcher takes it before
        its next mask is filled (worker/engine/grammar.py: then the GPU is busy with the next step)."""
        logits = adjusted_logits(logits, sequences, self.grammar_masks)
        token_ids = self.choose(logits, sequences)
        record_logprobs(logits, sequences, token_ids)
        for sequence, token_id in zip(sequences, token_ids):
            if sequence.grammar_matcher is not None:
                sequence.grammar_token_to_accept = token_id
        return token_ids

    def choose(self, logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
        return self.choose_on_device(logits, sequences).tolist()

    @staticmethod
    def samples_logits_as_they_are(sequence: Sequence) -> bool:
        """Whether `choose_on_device` alone samples the sequence: nothing adjusts its logits (`adjusts_logits`)
        and it reports no log-probabilities (`sample` does both on the host)."""
        return not adjusts_logits(sequence) and sequence.sampling.logprobs is None

    def choose_on_device(self, logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        """The tokens [rows] where the logits are, not read back: a sampled row's uniform number comes from its
        own generator on the host, which its earlier tokens do not move. On a GPU one Triton program per
        sampled row draws it (kernels/sampling.py: no sort of the vocabulary); elsewhere the torch ops do."""
        token_ids = logits.argmax(dim=-1)
        sampled_rows = [row for row, sequence in enumerate(sequences) if not sequence.sampling.greedy]
        if not sampled_rows:
            return token_ids
        row_sequences = [sequences[row] for row in sampled_rows]
        device = logits.device
        rows = host_values_on(device, sampled_rows)
        temperatures = host_values_on(device, [s.sampling.temperature for s in row_sequences])
        # A top_k past the vocabulary cuts nothing; clamped, it fits the kernel's int32 (and torch's int64).
        top_k = host_values_on(device, [min(s.sampling.top_k, logits.shape[-1]) for s in row_sequences])
        top_p = host_values_on(device, [s.sampling.top_p for s in row_sequences])
        uniforms = host_values_on(device, [self.generator_of(s).random() for s in row_sequences])
        if device.type == "cuda":
            from worker.engine.kernels.sampling import sample_rows  # Triton: a GPU's dependency only

            sample_rows(logits if logits.stride(-1) == 1 else logits.contiguous(), rows, temperatures, top_k, top_p,
                        uniforms, token_ids)
        else:
            cut = any(s.sampling.top_k > 0 or s.sampling.top_p < 1 for s in row_sequences)
            probabilities = self.probabilities(logits[rows].float(), temperatures, top_k if cut else None, top_p)
            token_ids[rows] = sample_by_inverse_transform(probabilities, uniforms)
        return token_ids

    @staticmethod
    def probabilities(logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor) -> torch.Tensor:
        """Each row's distribution at its temperature, cut to its top-k and top-p (top_k None: no row cuts)."""
        logits = logits / temperatures[:, None]
        if top_k is not None:
            logits = apply_top_k_top_p(logits, top_k, top_p)
        return logits.softmax(dim=-1)

    @staticmethod
    def generator_of(sequence: Sequence) -> random.Random:
        if sequence.random_generator is None:
            seed = sequence.sampling.seed if sequence.sampling.seed is not None else random.getrandbits(63)
            sequence.random_generator = random.Random(seed)
        return sequence.random_generator
