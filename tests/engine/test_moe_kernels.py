"""The routed experts' GPU kernels (worker/engine/kernels/moe.py) compute what the torch ops they replace do.

Compiled on a GPU in bfloat16; elsewhere run under Triton's interpreter in float32 (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from worker.engine.configs import tiny_deepseek_v3_config
from worker.engine.kernels.moe import SORT_BLOCK, combine_expert_outputs, sort_pairs_by_expert
from worker.engine.layers.moe import RoutedExperts

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32
TOLERANCE = {"rtol": 2e-2, "atol": 2e-2} if DTYPE == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expert_ids(tokens: int, top_k: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Distinct experts per token, drawn from the first half only, so that some experts get no pairs."""
    scores = torch.rand(tokens, num_experts // 2, generator=generator(seed))
    return scores.topk(top_k, dim=-1).indices.to(DEVICE)


def spread_ids(tokens: int, top_k: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Any expert, the last one included, and an expert repeated within a token (as tensor parallelism's
    masked pairs repeat them)."""
    return torch.randint(num_experts, (tokens, top_k), generator=generator(seed)).to(DEVICE)


@pytest.mark.parametrize(("tokens", "top_k", "draw"), [
    (0, 4, expert_ids), (1, 4, expert_ids), (5, 4, expert_ids), (SORT_BLOCK // 2 + 7, 4, expert_ids),
    (300, 1, spread_ids), (SORT_BLOCK + 3, 3, spread_ids)])  # past one block of pairs: a second pass
def test_sort_pairs_is_a_stable_sort_by_expert(tokens, top_k, draw):
    num_experts = 16
    ids = draw(tokens, top_k, num_experts)
    sorted_position, token_of_row, rows_per_expert = sort_pairs_by_expert(ids, num_experts)
    pair_order = torch.argsort(ids.flatten(), stable=True)
    assert torch.equal(token_of_row, pair_order // top_k)
    assert torch.equal(sorted_position[pair_order], torch.arange(tokens * top_k, device=DEVICE))
    assert torch.equal(rows_per_expert, torch.bincount(ids.flatten(), minlength=num_experts))
    if draw is expert_ids and tokens:
        assert rows_per_expert[num_experts // 2:].sum() == 0  # experts without pairs get no rows


@pytest.mark.parametrize("width", [100, 2 * 1024 + 5])  # a masked tail; several column blocks
def test_combine_adds_each_tokens_weighted_expert_rows(width):
    tokens, top_k = 9, 3
    sorted_position = torch.randperm(tokens * top_k, generator=generator(1)).to(DEVICE)
    expert_output = torch.randn(tokens * top_k, width, generator=generator(2)).to(DEVICE, DTYPE)
    weights = torch.rand(tokens, top_k, generator=generator(3)).to(DEVICE)
    combined = combine_expert_outputs(expert_output, sorted_position, weights)
    rows = expert_output[sorted_position].float().view(tokens, top_k, width)
    expected = (rows * weights[..., None]).sum(dim=1).to(DTYPE)
    torch.testing.assert_close(combined, expected, **TOLERANCE)
    assert combine_expert_outputs(expert_output[:0], sorted_position[:0], weights[:0]).shape == (0, width)


def test_combine_never_reads_the_rows_of_pairs_weighted_zero():
    """Another rank's pairs have weight zero and rows no GEMM wrote: NaN there must not reach the sum."""
    tokens, top_k, width = 7, 4, 96
    sorted_position = torch.randperm(tokens * top_k, generator=generator(8)).to(DEVICE)
    expert_output = torch.randn(tokens * top_k, width, generator=generator(9)).to(DEVICE, DTYPE)
    weights = torch.rand(tokens, top_k, generator=generator(10)).to(DEVICE)
    weights[:, 1::2] = 0.0
    expert_output[sorted_position.view(tokens, top_k)[:, 1::2].flatten()] = float("nan")
    combined = combine_expert_outputs(expert_output, sorted_position, weights)
    rows = expert_output[sorted_position].float().view(tokens, top_k, width)[:, 0::2]
    expected = (rows * weights[:, 0::2, None]).sum(dim=1).to(DTYPE)
    torch.testing.assert_close(combined, expected, **TOLERANCE)


def test_the_fused_experts_match_the_torch_ops():
    config = tiny_deepseek_v3_config()
    experts = RoutedExperts(config).to(DEVICE, DTYPE)
    with torch.no_grad():
        for weight in (experts.gate_up_proj, experts.down_proj):
            weight.copy_(torch.randn(weight.shape, generator=generator(4)) * 0.1)
    tokens = 11
    hidden = torch.randn(tokens, config.hidden_size, generator=generator(5)).to(DEVICE, DTYPE)
    ids = expert_ids(tokens, config.num_experts_per_tok, config.n_routed_experts, seed=6)
    weights = torch.rand(tokens, config.num_experts_per_tok, generator=generator(7)).to(DEVICE)
    with torch.no_grad():
        fused = experts._fused_forward(hidden, ids, weights)
        expected = experts._torch_forward(hidden, ids, weights)
    torch.testing.assert_close(fused, expected, **TOLERANCE)


def test_the_fused_experts_leave_out_another_ranks_pairs():
    """Pairs with the id one past the last expert (another rank's, weight zero) add nothing; the rest add
    what they add alone. The torch ops reach the same by multiplying those rows and weighting them zero."""
    config = tiny_deepseek_v3_config()
    experts = RoutedExperts(config).to(DEVICE, DTYPE)
    with torch.no_grad():
        for weight in (experts.gate_up_proj, experts.down_proj):
            weight.copy_(torch.randn(weight.shape, generator=generator(11)) * 0.1)
    tokens, top_k, num_experts = 13, config.num_experts_per_tok, config.n_routed_experts
    hidden = torch.randn(tokens, config.hidden_size, generator=generator(12)).to(DEVICE, DTYPE)
    ids = spread_ids(tokens, top_k, num_experts, seed=13)
    weights = torch.rand(tokens, top_k, generator=generator(14)).to(DEVICE)
    elsewhere = torch.rand(tokens, top_k, generator=generator(15)).to(DEVICE) < 0.5
    local_ids, local_weights = ids.masked_fill(elsewhere, num_experts), weights.masked_fill(elsewhere, 0.0)
    with torch.no_grad():
        fused = experts._fused_forward(hidden, local_ids, local_weights)
        torch_ops = experts._torch_forward(hidden, local_ids, local_weights)
        alone = experts._torch_forward(hidden, ids, local_weights)
    torch.testing.assert_close(fused, alone, **TOLERANCE)
    torch.testing.assert_close(torch_ops, alone, **TOLERANCE)


@pytest.mark.parametrize(("pairs_per_expert", "expected"), [(48, "ours"), (49, "torch's")])
def test_16_bit_experts_take_our_grouped_kernel_up_to_its_rows_an_expert_over_every_ranks_experts(
        monkeypatch, pairs_per_expert, expected):
    """Which grouped GEMM a 16-bit projection on a GPU takes (the kernels replaced by recorders): ours up to
    GROUPED_16_BIT_MAX_ROWS pairs an expert, torch's past it. Under expert parallelism a rank holds half the
    experts but sees every pair, so the mean is over the model's experts, not the rank's."""
    import copy

    import worker.engine.layers.moe as moe
    from worker.engine.kernels import grouped_gemm

    config = tiny_deepseek_v3_config()
    local_config = copy.copy(config)
    local_config.n_routed_experts = config.n_routed_experts // 2
    experts = RoutedExperts(local_config, experts_in_model=config.n_routed_experts)
    chosen = []

    def recorder(name):
        return lambda rows, weight, rows_per_expert: chosen.append(name) or rows

    monkeypatch.setattr(moe, "uses_fused_kernels", lambda tensor: True)
    monkeypatch.setattr(grouped_gemm, "grouped_linear", recorder("ours"))
    monkeypatch.setattr(moe, "grouped_matmul", recorder("torch's"))
    assert grouped_gemm.GROUPED_16_BIT_MAX_ROWS == 48
    rows = torch.zeros(pairs_per_expert * config.n_routed_experts, config.hidden_size, dtype=torch.bfloat16)
    experts._project(rows, "gate_up_proj", torch.zeros(local_config.n_routed_experts, dtype=torch.int64))
    assert chosen == [expected]


def test_fp8_experts_share_their_quantized_rows_and_tile_map_without_changing_a_product():
    """RoutedExperts._fp8_products (the GPU's FP8 path: tokens quantized before their rows are gathered, one
    tile map for both products, SiLU quantized as it is made) gives exactly what quantizing each product's own
    input gives, with experts left empty. Float16 under the interpreter, bfloat16 on a GPU."""
    from worker.engine.kernels.fused import silu_and_mul
    from worker.engine.kernels.grouped_gemm import fp8_grouped_linear
    from worker.engine.layers.linear import quantize_stacked_experts

    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    config = tiny_deepseek_v3_config()
    experts = RoutedExperts(config)
    with torch.no_grad():
        for weight in (experts.gate_up_proj, experts.down_proj):
            weight.copy_(torch.randn(weight.shape, generator=generator(21)) * 0.1)
    quantize_stacked_experts(experts)
    experts = experts.to(DEVICE)
    tokens = 9
    hidden = torch.randn(tokens, config.hidden_size, generator=generator(22)).to(DEVICE, dtype)
    ids = expert_ids(tokens, config.num_experts_per_tok, config.n_routed_experts, seed=23)
    _, token_of_row, rows_per_group = sort_pairs_by_expert(ids, config.n_routed_experts + 1)
    rows_per_expert = rows_per_group[:-1]
    with torch.no_grad():
        shared = experts._fp8_products(hidden, token_of_row, rows_per_expert)
        gate_up = fp8_grouped_linear(hidden[token_of_row], experts.gate_up_proj, experts.gate_up_proj_scale_inv,
                                     rows_per_expert)
        separate = fp8_grouped_linear(silu_and_mul(gate_up), experts.down_proj, experts.down_proj_scale_inv,
                                      rows_per_expert)
    assert torch.equal(shared, separate)
    assert shared.abs().sum() > 0
