"""The fused GPU kernels compute what the torch code they replace computes.

Compiled on a GPU in bfloat16; elsewhere (CI) run under Triton's interpreter in float32, which checks
their indexing and masking (tests/conftest.py turns the interpreter on where there is no GPU).
"""

from __future__ import annotations

import pytest
import torch

from worker.engine.kernels.fused import add_rms_norm, rotate_, silu_and_mul
from worker.engine.models.common import RMSNorm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32
TOLERANCE = {"rtol": 2e-2, "atol": 2e-2} if DTYPE == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}

def random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, DTYPE)

@pytest.mark.parametrize("hidden_size", [64, 1536, 100])
def test_add_rms_norm_matches_residual_add_then_norm(hidden_size):
    norm = RMSNorm(hidden_size, eps=1e-6).to(DEVICE, DTYPE)
    with torch.no_grad():
        norm.weight.copy_(random(hidden_size, seed=3))
    hidden, residual = random(7, hidden_size, seed=1), random(7, hidden_size, seed=2)
    normed, new_residual = add_rms_norm(hidden, residual, norm.weight, 1e-6)
    expected_residual = residual + hidden
    torch.testing.assert_close(new_residual, expected_residual, **TOLERANCE)
    with torch.no_grad():
        normalised = torch.nn.functional.rms_norm(expected_residual.float(), (hidden_size,), eps=1e-6)
        expected = norm.weight * normalised.to(DTYPE)
    torch.testing.assert_close(normed, expected, **TOLERANCE)
    alone, passed_through = add_rms_norm(hidden, None, norm.weight, 1e-6)
    assert passed_through is hidden
    torch.testing.assert_close(alone, add_rms_norm(hidden, torch.zeros_like(hidden), norm.weight, 1e-6)[0])

def test_add_rms_norm_writes_over_its_input_in_place():
    """MLA normalises its latent where the projection wrote it: out is x, a view of a wider row."""
    entry = random(7, 100, seed=8)
    latent = entry[:, :64]
    weight = random(64, seed=9)
    expected = add_rms_norm(latent.clone(), None, weight, 1e-6)[0]
    rope_before = entry[:, 64:].clone()
    normed = add_rms_norm(latent, None, weight, 1e-6, out=latent)[0]
    assert normed.data_ptr() == entry.data_ptr()
    torch.testing.assert_close(entry[:, :64], expected, **TOLERANCE)
    assert torch.equal(entry[:, 64:], rope_before)  # nothing written past the view


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_in_place_matches_the_torch_rotation(interleaved):

    query = random(5, 3, 8, seed=4)
    cos, sin = random(5, 4, seed=5), random(5, 4, seed=6)
    # The torch path: what apply_rotary computes where the fused kernels are not used.
    cos_, sin_ = cos[:, None, :], sin[:, None, :]
    first, second = (query[..., 0::2], query[..., 1::2]) if interleaved else query.chunk(2, dim=-1)
    expected = torch.cat((first * cos_ - second * sin_, second * cos_ + first * sin_), dim=-1)
    wide = torch.zeros(5, 3, 12, device=DEVICE, dtype=DTYPE)  # a strided view, as MLA's query_rope is
    wide[..., 4:] = query
    rotated = rotate_(wide[..., 4:], cos, sin, interleaved)
    torch.testing.assert_close(rotated, expected, **TOLERANCE)
    assert torch.equal(wide[..., :4], torch.zeros_like(wide[..., :4]))  # nothing written outside the view

def test_silu_and_mul_matches_torch():
    gate_up = random(6, 2 * 1100, seed=7)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, **TOLERANCE)
