"""The block-scaled FP8 kernels against the same arithmetic in torch, and FP8 linears in the engine.

Compiled on a GPU; elsewhere (CI) run under Triton's interpreter, which reads and multiplies float8 right
but rounds float32 → float8 wrongly where rounding carries into the exponent (124.3 becomes 64, not 128),
so the quantization kernel is checked there on values that quantize exactly. The GEMM kernels get their
FP8 operands from torch's own rounding, so they are checked on any values, partial blocks included.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.helpers import prefill_logits, random_prompts
from worker.engine.configs import builtin_config
from worker.engine.kernels import fp8_gemm, grouped_gemm
from worker.engine.kernels.fp8_blocks import quantize_weight_blocks
from worker.engine.layers.linear import Fp8Linear
from worker.engine.loader import empty_model, load_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def activations_and_scales(num_rows: int, num_columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token group quantized activations, drawn directly: FP8 values whose group maximum is 448, with
    power-of-two scales, so that quantizing their product gives them back exactly."""
    generator = torch.Generator().manual_seed(num_rows)
    x_fp8 = torch.randn(num_rows, num_columns, generator=generator).mul(100).clamp(-440, 440).to(torch.float8_e4m3fn)
    x_fp8[:, ::128] = 448.0
    x_scale = 2.0 ** torch.randint(-8, 1, (num_rows, -(-num_columns // 128)), generator=generator).float()
    return x_fp8, x_scale


def expected_product(x_fp8, x_scale, weight, weight_scale_inv) -> torch.Tensor:
    x = x_fp8.float() * x_scale.repeat_interleave(128, 1)[:, : x_fp8.shape[1]]
    return fp8_gemm.reference_block_scaled_matmul(x, weight, weight_scale_inv)


# The heuristics' own choice, and tiles that load b by rows (the layouts a launch configuration can take).
CONFIGS = [None, fp8_gemm.GemmTiles(16, 128, 4, 2, b_rows=True), fp8_gemm.GemmTiles(32, 64, 8, 3, b_rows=True)]


@pytest.mark.parametrize("config", CONFIGS, ids=["heuristic", "b-rows-16x128", "b-rows-32x64"])
@pytest.mark.parametrize(("num_rows", "num_columns", "num_inner"), [(5, 200, 320), (70, 384, 256), (1, 64, 576)])
def test_block_scaled_matmul_equals_the_torch_arithmetic(num_rows, num_columns, num_inner, config):
    """Partial blocks in N and K (200 = 1.56 blocks, 576 = 4.5 as DeepSeek-V3's latent), M past one tile."""
    x_fp8, x_scale = activations_and_scales(num_rows, num_inner)
    weight, weight_scale_inv = quantize_weight_blocks(torch.randn(num_columns, num_inner) * 0.02)
    expected = expected_product(x_fp8, x_scale, weight, weight_scale_inv)
    on_device = [tensor.to(DEVICE) for tensor in (x_fp8, x_scale, weight, weight_scale_inv)]
    output = fp8_gemm.block_scaled_matmul(*on_device, torch.float32, config).cpu()
    torch.testing.assert_close(output, expected, **fp8_tolerance(expected))


def fp8_tolerance(expected: torch.Tensor) -> dict:
    """Exact float32 arithmetic under the interpreter; on Hopper the FP8 tensor cores keep fewer bits while
    they accumulate (DeepSeek-V3's report: about 14), which an H200 showed as 3e-4 of the largest output at
    K = 256 with 64-row tiles."""
    relative = 1e-4 if DEVICE == "cpu" else 2e-3
    return {"rtol": relative, "atol": relative * expected.abs().max().item()}


@pytest.mark.parametrize("output_dtype", [torch.float32, torch.bfloat16])
def test_split_k_sums_its_slices(monkeypatch, output_dtype):
    """Small M and N with long K run as slices of K summed afterwards (the decode shapes' path), in float32
    and rounded once to the output's dtype."""
    monkeypatch.setattr(fp8_gemm, "split_k_count", lambda *arguments: 3)
    x_fp8, x_scale = activations_and_scales(3, 1100)
    weight, weight_scale_inv = quantize_weight_blocks(torch.randn(96, 1100) * 0.02)
    expected = expected_product(x_fp8, x_scale, weight, weight_scale_inv)
    on_device = [tensor.to(DEVICE) for tensor in (x_fp8, x_scale, weight, weight_scale_inv)]
    output = fp8_gemm.block_scaled_matmul(*on_device, output_dtype).cpu()
    assert output.dtype == output_dtype
    # In bfloat16: within one unit in the last place of the float32 sum's rounding (2⁻⁷ relative).
    tolerance = fp8_tolerance(expected) if output_dtype == torch.float32 else {"rtol": 2 ** -7, "atol": 1e-6}
    torch.testing.assert_close(output, expected.to(output_dtype), **tolerance)


@pytest.mark.parametrize("block_m", [16, 64])
def test_expert_tiles_cover_each_experts_rows_in_order(block_m):
    """The tile map the grouped kernel walks: each expert's rows in tiles of block_m, in expert order."""
    rows_per_expert = torch.tensor([3, 0, 140, 1, 0, 64, 17] + [0] * 70)  # 77 experts: two tiles of the walk
    tile_experts, tile_first_rows, group_ends = (
        tensor.cpu() for tensor in grouped_gemm.expert_tiles(rows_per_expert.to(DEVICE), 225, block_m))
    expected_tiles = [(expert, start) for expert, (end, count) in
                      enumerate(zip(torch.cumsum(rows_per_expert, 0).tolist(), rows_per_expert.tolist()))
                      for start in range(end - count, end, block_m)]
    used = len(expected_tiles)
    assert list(zip(tile_experts[:used].tolist(), tile_first_rows[:used].tolist())) == expected_tiles
    assert (tile_experts[used:] == len(rows_per_expert)).all()
    assert group_ends.tolist() == torch.cumsum(rows_per_expert, 0).tolist()


@pytest.mark.parametrize("num_columns", [300, 2200])  # 2200: more groups than one pass of the kernel takes
def test_quantize_per_token_group_on_exactly_representable_values(num_columns):
    x_fp8, x_scale = activations_and_scales(6, num_columns)
    x = x_fp8.float() * x_scale.repeat_interleave(128, 1)[:, :num_columns]
    quantized, scales = fp8_gemm.quantize_per_token_group(x.to(DEVICE))
    torch.testing.assert_close(scales.cpu(), x_scale, rtol=1e-6, atol=0)
    assert torch.equal(quantized.cpu().float(), x_fp8.float())


@pytest.mark.parametrize("width", [200, 2200])  # 200: a partial group; 2200: more groups than one pass takes
def test_quantize_silu_and_mul_is_quantizing_silu_and_mul(width):
    """The fused kernel's FP8 values and scales are the two kernels' exactly (the 16-bit rounding between
    them included). Float16 under the interpreter (its bfloat16 stores write garbage), bfloat16 on a GPU."""
    from worker.engine.kernels.fused import silu_and_mul

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    gate_up = (torch.randn(7, 2 * width, generator=torch.Generator().manual_seed(width)) * 3).to(DEVICE, dtype)
    fused = fp8_gemm.quantize_silu_and_mul(gate_up)
    values, scales = fp8_gemm.quantize_per_token_group(silu_and_mul(gate_up))
    assert fused.output_dtype == dtype
    assert torch.equal(fused.scales, scales)
    assert torch.equal(fused.values.float(), values.float())


# The swapped kernel (weights on the tensor cores' wide side): 16-row tiles split the 40-row expert in three.
GROUPED_CONFIGS = CONFIGS + [fp8_gemm.GemmTiles(16, 128, 4, 2, swapped=True),
                             fp8_gemm.GemmTiles(32, 64, 4, 3, swapped=True)]


@pytest.mark.parametrize("trailing_rows", [0, 6])  # 6: rows past every group (another rank's pairs)
@pytest.mark.parametrize("config", GROUPED_CONFIGS,
                         ids=["heuristic", "b-rows-16x128", "b-rows-32x64", "swapped-16x128", "swapped-32x64"])
def test_grouped_matmul_runs_each_experts_rows_on_its_weights(config, trailing_rows):
    """Rows sorted by expert, some experts with none, one with more than a tile, K (192) and N (160) ending
    inside a block; rows after the last group are left alone."""
    rows_per_expert = torch.tensor([3, 0, 40, 1, 0])
    num_rows = int(rows_per_expert.sum())
    x_fp8, x_scale = activations_and_scales(num_rows + trailing_rows, 192)
    weights, weight_scales_inv = quantize_weight_blocks(torch.randn(5, 160, 192) * 0.02)
    expert_of_row = torch.repeat_interleave(torch.arange(5), rows_per_expert)
    expected = torch.stack([expected_product(x_fp8[row : row + 1], x_scale[row : row + 1], weights[expert],
                                             weight_scales_inv[expert])[0]
                            for row, expert in enumerate(expert_of_row.tolist())])
    x = (x_fp8.float() * x_scale.repeat_interleave(128, 1)[:, :192]).to(DEVICE)
    output = grouped_gemm.fp8_grouped_linear(x, weights.to(DEVICE), weight_scales_inv.to(DEVICE),
                                         rows_per_expert.to(DEVICE), config).cpu()[:num_rows]
    if DEVICE == "cpu":  # the interpreter's rounding (see above) is spared only where quantizing is exact
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    else:
        torch.testing.assert_close(output, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.skipif(DEVICE != "cuda", reason="torch's blockwise scaled matmul runs on Hopper GPUs")
@pytest.mark.parametrize(("num_rows", "num_columns", "num_inner"),
                         [(256, 576, 2048), (32, 3072, 512), (16, 2048, 1536), (16, 2048, 1408), (24, 512, 256),
                          (32, 256, 320)])
def test_fp8_linear_on_a_gpu_equals_the_torch_arithmetic_eager_and_in_a_graph(num_rows, num_columns, num_inner):
    """torch's blockwise scaled matmul where it takes the shape (576: a partial block of N, as V3's latent),
    this module's kernel where it does not (K = 1408: 11 blocks, which cuBLAS got wrong; 24 rows; K = 320
    ends inside a block), in a CUDA graph as a decode step runs it. The same quantized operands, summed in
    another order: 1e-2 of the largest output."""
    generator = torch.Generator().manual_seed(num_inner)
    x = torch.randn(num_rows, num_inner, generator=generator).to(torch.bfloat16).to(DEVICE)
    weight, weight_scale_inv = (tensor.to(DEVICE) for tensor in
                                quantize_weight_blocks(torch.randn(num_columns, num_inner, generator=generator) * 0.02))
    expected = fp8_gemm.reference_block_scaled_matmul(x.float(), weight, weight_scale_inv)
    eager = fp8_gemm.fp8_linear(x, weight, weight_scale_inv)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fp8_gemm.fp8_linear(x, weight, weight_scale_inv)
    graph.replay()
    tolerance = {"rtol": 1e-2, "atol": 1e-2 * expected.abs().max().item()}
    torch.testing.assert_close(eager.float(), expected, **tolerance)
    torch.testing.assert_close(captured, eager)


@pytest.mark.parametrize("trailing_rows", [0, 6])
def test_fused_gate_up_silu_is_the_product_then_silu_then_its_quantization(trailing_rows):
    """gate_up, SiLU and quantization in one kernel give the separate kernels' FP8 values and scales: exactly
    under the interpreter (float16), within one FP8 step on a GPU (bfloat16), whose tensor cores may sum the
    two launches' products in another order. K (192) ends inside a block; 16-row tiles split the 40-row
    expert in three; rows past the last group (another rank's pairs) are left alone."""
    rows_per_expert = torch.tensor([3, 0, 40, 1, 0])
    num_rows = int(rows_per_expert.sum())
    generator = torch.Generator().manual_seed(9)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    x = torch.randn(num_rows + trailing_rows, 192, generator=generator).to(DEVICE, dtype)
    weights, weight_scales_inv = (tensor.to(DEVICE) for tensor in
                                  quantize_weight_blocks(torch.randn(5, 512, 192, generator=generator) * 0.05))
    rows = fp8_gemm.QuantizedRows(*fp8_gemm.quantize_per_token_group(x), dtype)
    config, counts = fp8_gemm.GemmTiles(16, 128, 4, 2, swapped=True), rows_per_expert.to(DEVICE)
    fused = grouped_gemm.fp8_gate_up_silu(rows, weights, weight_scales_inv, counts, config)
    # The product leaves rows past the last group unwritten: only the groups' rows go on to SiLU.
    gate_up = grouped_gemm.fp8_grouped_linear(rows, weights, weight_scales_inv, counts, config)[:num_rows]
    separate = fp8_gemm.quantize_silu_and_mul(gate_up)
    assert fused.values.shape == (num_rows + trailing_rows, 256) and fused.output_dtype == dtype
    fused_values, separate_values = fused.values[:num_rows].float(), separate.values[:num_rows].float()
    if DEVICE == "cpu":
        assert torch.equal(fused.scales[:num_rows], separate.scales[:num_rows])
        assert torch.equal(fused_values, separate_values)
    else:
        torch.testing.assert_close(fused.scales[:num_rows], separate.scales[:num_rows], rtol=2e-2, atol=0)
        torch.testing.assert_close(fused_values, separate_values, rtol=0.13, atol=2 ** -6)


def test_gate_up_is_fused_only_with_whole_scale_blocks():
    swapped = fp8_gemm.GemmTiles(32, 128, 4, 3, swapped=True)
    assert grouped_gemm.fuses_gate_up(swapped, 1408)  # V2-Lite: 11 blocks
    assert not grouped_gemm.fuses_gate_up(swapped, 1400)
    assert not grouped_gemm.fuses_gate_up(fp8_gemm.GemmTiles(32, 64, 4, 3, swapped=True), 1408)
    assert not grouped_gemm.fuses_gate_up(fp8_gemm.GemmTiles(64, 128, 8, 4), 1408)


@pytest.mark.parametrize("trailing_rows", [0, 6])
@pytest.mark.parametrize("config", [None, fp8_gemm.GemmTiles(16, 64, 4, 2, b_rows=True, block_k=32),
                                    fp8_gemm.GemmTiles(32, 128, 4, 3, block_k=64)],
                         ids=["heuristic", "b-rows-16x64-k32", "32x128-k64"])
def test_16_bit_grouped_matmul_runs_each_experts_rows_on_its_weights(config, trailing_rows):
    """The unscaled kernel: the same groups in 16 bits, K (200) ending inside a tile, each row against its own
    expert's product in float32; rows past the last group (another rank's pairs) do not disturb them.
    bfloat16 on a GPU; float16 under the interpreter, whose bfloat16 stores write garbage."""
    rows_per_expert = torch.tensor([3, 0, 40, 1, 0])
    num_rows = int(rows_per_expert.sum())
    generator = torch.Generator().manual_seed(5)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    x = torch.randn(num_rows + trailing_rows, 200, generator=generator).to(dtype)
    weights = (torch.randn(5, 96, 200, generator=generator) * 0.05).to(dtype)
    expert_of_row = torch.repeat_interleave(torch.arange(5), rows_per_expert)
    expected = torch.einsum("rk,rnk->rn", x[:num_rows].float(), weights[expert_of_row].float())
    output = grouped_gemm.grouped_linear(x.to(DEVICE), weights.to(DEVICE), rows_per_expert.to(DEVICE), config).cpu()
    torch.testing.assert_close(output[:num_rows].float(), expected, rtol=1e-2, atol=1e-2)
    assert output.shape == (num_rows + trailing_rows, 96)


def test_quantization_fp8_swaps_linears_of_a_builtin_model():
    """`--quantization fp8` on tiny-qwen2 (random bf16-free weights in float32): every projection FP8, the
    LM head kept; logits within 10% relative L2 of the unquantized model (measured 4.3% worst here: e4m3's
    2^-4 worst rounding per weight, ~2.6% RMS, through two layers; see test_fp8_checkpoint.py)."""
    model, _ = load_model("tiny-qwen2", 0, torch.device("cpu"), torch.float32)
    quantized, _ = load_model("tiny-qwen2", 0, torch.device("cpu"), torch.float32, quantization="fp8")
    layer = quantized.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Fp8Linear) and isinstance(layer.mlp.down_proj, Fp8Linear)
    assert type(quantized.lm_head) is torch.nn.Linear
    prompt = random_prompts([20])[0]
    expected, actual = prefill_logits(model, prompt), prefill_logits(quantized, prompt)
    errors = (actual - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert 1e-3 < errors.max() < 0.1


def test_deepseek_v3_layers_shape_has_v3s_dimensions_in_fp8():
    """shape-deepseek-v3-layers-N on the meta device only (one MoE layer is 11 GB even in FP8)."""
    hf_config = builtin_config("shape-deepseek-v3-layers-2")
    assert (hf_config.num_hidden_layers, hf_config.first_k_dense_replace) == (2, 1)
    assert builtin_config("shape-deepseek-v3-layers-1").first_k_dense_replace == 0
    model = empty_model(hf_config, torch.device("meta"), torch.bfloat16)
    attention, moe = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert attention.q_b_proj.weight.shape == (128 * 192, 1536)
    assert attention.q_and_kv_a_proj.weight_scale_inv.shape == (17, 56)  # q_a's 1536 rows, the latent's 576
    assert moe.experts.gate_up_proj.shape == (256, 2 * 2048, 7168)
    assert moe.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert moe.experts.down_proj_scale_inv.shape == (256, 56, 16)
    assert moe.shared_experts.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (2 * 18432, 7168)
    fp8_bytes = sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
    assert 12.0e9 < fp8_bytes < 12.1e9  # 256 experts × 44M, a shared one, a dense MLP, two attentions: a byte each
