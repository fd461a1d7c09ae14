"""The GPU's sampling kernel (worker/engine/kernels/sampling.py) draws the token that sorting the vocabulary
would: the same cuts (top-k, then top-p of the top-k mass, ties ranked by token id) and the same inverse
transform over the kept tokens in token order.

Compiled on a GPU; elsewhere run under Triton's interpreter (tests/conftest.py), with small blocks so that
every pass crosses blocks. The reference below sorts in float64, stably, so ties rank by token id.
"""

from __future__ import annotations

import pytest
import torch

from worker.engine.kernels.sampling import sample_rows

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = 4096 if DEVICE.type == "cuda" else 128


def reference_token(row: torch.Tensor, temperature: float, top_k: int, top_p: float, uniform: float) -> int:
    scaled = row.float() / temperature  # as the kernel scales, in float32
    order = torch.sort(-scaled.double(), stable=True).indices
    probabilities = (scaled.double() - scaled.double().max()).exp()[order]
    kept = torch.ones_like(probabilities, dtype=torch.bool)
    if 0 < top_k < len(row):
        kept[top_k:] = False
    masses = torch.where(kept, probabilities, 0.0)
    if top_p < 1:
        before = masses.cumsum(0) - masses
        kept &= before < top_p * masses.sum()
    in_token_order = torch.zeros_like(kept)
    in_token_order[order] = kept
    mass = torch.where(in_token_order, (scaled.double() - scaled.double().max()).exp(), 0.0)
    running = mass.cumsum(0)
    return int(torch.searchsorted(running, uniform * running[-1], right=True))


def drawn(logits: torch.Tensor, rows: list[int], settings: list[tuple[float, int, float]],
          uniforms: list[float]) -> list[int]:
    token_ids = torch.full((logits.shape[0],), -1, dtype=torch.long, device=DEVICE)
    temperatures, top_k, top_p = zip(*settings)
    sample_rows(logits.to(DEVICE), torch.tensor(rows, device=DEVICE), torch.tensor(temperatures, device=DEVICE),
                torch.tensor(top_k, device=DEVICE), torch.tensor(top_p, device=DEVICE),
                torch.tensor(uniforms, device=DEVICE), token_ids, block=BLOCK)
    return token_ids.tolist()


SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 20, 1.0), (0.5, 7, 0.8), (1.0, 1, 1.0), (2.0, 0, 0.05),
            (1.0, 1000, 0.6)]  # temperature alone, top-p, top-k, both, k of 1, a tiny nucleus, k past the vocabulary


@pytest.mark.parametrize("seed", [0, 1])
def test_draws_the_token_sorting_would_in_float32(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(SETTINGS) + 1, 300, generator=generator) * 3  # no ties
    uniforms = torch.rand(len(SETTINGS), generator=generator).tolist()
    rows = list(range(1, len(SETTINGS) + 1))  # row 0 is not sampled: left as it was
    tokens = drawn(logits, rows, SETTINGS, uniforms)
    assert tokens[0] == -1
    expected = [reference_token(logits[row], *setting, uniform)
                for row, setting, uniform in zip(rows, SETTINGS, uniforms)]
    assert tokens[1:] == expected


def test_ties_at_a_cut_are_kept_by_token_order_and_16_bit_logits_bisect_their_own_bits():
    """Logits on a coarse grid tie in dozens; in bfloat16 the kernel bisects 16-bit keys. Uniforms across the
    whole range land on the tokens the stable sort gives, so each cut keeps exactly the first ties, no more."""
    generator = torch.Generator().manual_seed(3)
    grid = torch.randint(-6, 7, (200,), generator=generator) / 2
    settings = [(1.0, 20, 1.0), (1.0, 0, 0.5), (0.5, 25, 0.7), (1.0, 20, 0.99)]  # the last: both cut at one value
    uniforms = [0.013, 0.37, 0.71, 0.999]
    cases = [(setting, uniform) for setting in settings for uniform in uniforms]
    for dtype in (torch.float32, torch.bfloat16):
        tokens = drawn(grid.repeat(len(cases), 1).to(dtype), list(range(len(cases))), [setting for setting, _ in cases],
                       [uniform for _, uniform in cases])
        assert tokens == [reference_token(grid, *setting, uniform) for setting, uniform in cases], dtype


def test_banned_tokens_are_never_drawn_even_a_whole_block_of_them():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 2 * BLOCK + 44, generator=generator)
    logits[:, : BLOCK + 5] = float("-inf")  # the first block and more: nothing to scale the sum by yet
    logits[1, BLOCK + 70:] = float("-inf")  # a row whose few allowed tokens sit in one block
    logits[2] = 0.0  # every token ties with the lowest: temperature alone keeps them all
    logits[2, ::2] = -0.0  # and -0.0 ties with 0.0
    settings = [(1.0, 0, 0.9), (0.8, 3, 1.0), (1.0, 5, 1.0)]  # the last keeps the first five zeros
    for uniform in (0.0, 0.5, 0.999999):
        tokens = drawn(logits, [0, 1, 2], settings, [uniform] * 3)
        assert tokens == [reference_token(logits[row], *setting, uniform) for row, setting in enumerate(settings)]
        assert all(torch.isfinite(logits[row, token]) for row, token in enumerate(tokens))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="Qwen2's whole vocabulary in bfloat16 is for a compiled kernel")
def test_a_batch_of_real_width_bf16_rows_matches_the_sort():
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, 151936, generator=generator) * 4).to(torch.bfloat16)
    settings = [SETTINGS[row % len(SETTINGS)] for row in range(64)]
    uniforms = torch.rand(64, generator=generator).tolist()
    tokens = drawn(logits, list(range(64)), settings, uniforms)
    expected = [reference_token(logits[row], *settings[row], uniforms[row]) for row in range(64)]
    assert sum(a == b for a, b in zip(tokens, expected)) >= 63  # a draw at a boundary may round the other way


def test_float16_logits_that_differ_below_bfloat16s_precision_do_not_tie():
    """float16's mantissa reaches below the top 16 bits of a float32, which bfloat16 keys keep alone: 1 and
    1 + 2**-10 would tie there, and top-k of 1 would keep the first in token order, not the larger."""
    logits = torch.full((1, 300), -5.0)
    logits[0, 10], logits[0, 20] = 1.0, 1.0 + 2**-10
    for uniform in (0.0, 0.99):
        assert drawn(logits.to(torch.float16), [0], [(1.0, 1, 1.0)], [uniform]) == [20]
