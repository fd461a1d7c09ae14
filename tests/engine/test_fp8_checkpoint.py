"""A tiny DeepSeek-V3 written in the layout DeepSeek publishes V3 in (safetensors shards with an index,
per-expert projections, FP8 e4m3 weights with a float32 `weight_scale_inv` per 128×128 block, the config's
`quantization_config`) loads with its weights kept FP8 and computes what its weights say.

Two references, both transformers' DeepseekV3ForCausalLM in float32:
- the same weights dequantized: the engine's CPU path multiplies by exactly these numbers, so greedy tokens
  are equal and logits agree to float32 summation order (relative 1e-5; 1e-4 allowed). This checks the
  layout: which tensors are FP8, the per-expert and packed (gate/up; q_a/kv_a) scale rows, the partial blocks
  (hidden 192 = 1.5 blocks; kv_a_proj_with_mqa's 24 rows, as V3's 576 = 4.5 blocks), kv_b_proj's
  dequantization into the 16-bit weight MLA reads directly.
- the bf16 original the FP8 weights were made from (run by the engine from a bf16 checkpoint): the gap
  is FP8 rounding. e4m3 keeps 3 mantissa bits, so each weight is off by at most 2^-4 of itself (about
  2.6% RMS for Gaussian weights, the error uniform over half an ulp); a dot product sums independent
  errors, so a projection's output is off by about that share of its norm, and the logits by a few such
  stacked. Measured per position (104 positions): 4.2% mean, 5.5% worst; with activations also quantized
  per token group of 128 (the GPU kernels' arithmetic, emulated in torch) 5.2% mean, 7.1% worst. The
  bound, 12%, leaves about 1.7–2× margin and stays far below a wrong scale or a misplaced block (≥ 30%).
  Positions where rounding changed a token's expert choice (a near-tie in the router: 4 and 3 of 104
  here) compute another function; the test allows them on at most 10% of positions.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.engine.helpers import prefill_logits, random_prompts, reference_greedy
from worker.engine.configs import FP8_BLOCK_QUANTIZATION, tiny_deepseek_v3_config, tiny_llama_config
from worker.engine.engine import LLMEngine
from worker.engine.kernels.fp8_gemm import reference_block_scaled_matmul
from worker.engine.kernels.fp8_blocks import dequantize_blocks, quantize_weight_blocks
from worker.engine.layers.linear import Fp8Linear
from worker.engine.loader import load_model, random_reference_model
from worker.engine.types import EngineConfig, SamplingParams

VOCAB_SIZE = 1024
# What DeepSeek-V3's checkpoint stores in FP8: every linear weight of attention and MLPs (experts included);
# not embeddings, lm_head, norms, the router's gate or e_score_correction_bias.
FP8_PROJECTIONS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj")
LOGITS_RELATIVE_ERROR_BOUND = 0.12


def fp8_v3_config():
    """Tiny, with the block structure that matters: partial blocks (hidden 192 = 1.5 blocks, 24 latent rows)
    and whole-block packed boundaries (dense and expert gate/up of 256 and 128 rows each, q_a's 256 rows
    before the latent's, as V3's 1536)."""
    return tiny_deepseek_v3_config(vocab_size=VOCAB_SIZE, hidden_size=192, intermediate_size=256,
                                   moe_intermediate_size=128, q_lora_rank=256)


def bf16_original(hf_config):
    """transformers' random model with every weight rounded to bf16 (as a published checkpoint holds them)."""
    model = random_reference_model(hf_config, 0, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.bfloat16().float())
    return model


def is_fp8_weight(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "weight" and parts[-2] in FP8_PROJECTIONS


def per_expert_tensors(name: str, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' stacked experts as the checkpoint names them: experts.<e>.<gate|up|down>_proj.weight."""
    prefix = name.rpartition(".")[0]
    if name.endswith("gate_up_proj"):
        gate, up = stacked.chunk(2, dim=1)
        pieces = {"gate_proj": gate, "up_proj": up}
    else:
        pieces = {"down_proj": stacked}
    return {f"{prefix}.{expert}.{projection}.weight": weights[expert].contiguous()
            for projection, weights in pieces.items() for expert in range(stacked.shape[0])}


def published_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        pieces = per_expert_tensors(name, tensor) if ".experts." in name + "." else {name: tensor}
        for piece_name, piece in pieces.items():
            if is_fp8_weight(piece_name):
                tensors[piece_name], tensors[piece_name + "_scale_inv"] = quantize_weight_blocks(piece)
            elif piece_name.endswith("e_score_correction_bias"):
                tensors[piece_name] = piece.float()
            else:
                tensors[piece_name] = piece.bfloat16()
    return tensors


def write_published_checkpoint(directory, hf_config, tensors: dict[str, torch.Tensor]) -> None:
    """Two shards, model.safetensors.index.json, config.json with quantization_config."""
    directory.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for shard_index, shard_names in enumerate((names[::2], names[1::2])):
        shard_file = f"model-{shard_index + 1:05d}-of-00002.safetensors"
        save_file({name: tensors[name].contiguous() for name in shard_names}, str(directory / shard_file))
        weight_map.update(dict.fromkeys(shard_names, shard_file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = hf_config.to_dict() | {"quantization_config": dict(FP8_BLOCK_QUANTIZATION)}
    (directory / "config.json").write_text(json.dumps(config))


def dequantized_reference(original, tensors: dict[str, torch.Tensor]):
    """The original model with each FP8 weight replaced by its dequantized value."""
    hf_config = original.config
    reference = random_reference_model(hf_config, 0, torch.device("cpu"), torch.float32)
    state = {}
    for name, tensor in original.state_dict().items():
        pieces = per_expert_tensors(name, tensor) if ".experts." in name + "." else {name: tensor}
        dequantized = {piece_name: dequantize_blocks(tensors[piece_name], tensors[piece_name + "_scale_inv"],
                                                     torch.float32) if is_fp8_weight(piece_name) else piece
                       for piece_name, piece in pieces.items()}
        if len(pieces) == 1:
            state[name] = next(iter(dequantized.values()))
        elif name.endswith("gate_up_proj"):
            experts = range(tensor.shape[0])
            prefix = name.rpartition(".")[0]
            state[name] = torch.stack([torch.cat((dequantized[f"{prefix}.{e}.gate_proj.weight"],
                                                  dequantized[f"{prefix}.{e}.up_proj.weight"])) for e in experts])
        else:
            state[name] = torch.stack(list(dequantized.values()))
    reference.load_state_dict(state)
    return reference.eval()


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    hf_config = fp8_v3_config()
    original = bf16_original(hf_config)
    tensors = published_tensors(original.state_dict())
    directory = tmp_path_factory.mktemp("fp8") / "tiny-deepseek-v3-fp8"
    write_published_checkpoint(directory, hf_config, tensors)
    return directory, original, dequantized_reference(original, tensors)


def relative_errors(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Per position: ‖logits − reference‖ / ‖reference‖."""
    return (logits - reference_logits).norm(dim=-1) / reference_logits.norm(dim=-1)


def test_fp8_weights_stay_fp8_where_the_checkpoint_has_them(fp8_checkpoint):
    directory, _, _ = fp8_checkpoint
    model, _ = load_model(str(directory), 0, torch.device("cpu"), torch.float32)
    attention, moe = model.model.layers[1].self_attn, model.model.layers[1].mlp
    for linear in (attention.q_and_kv_a_proj, attention.q_b_proj, attention.o_proj,
                   model.model.layers[0].mlp.gate_up_proj, moe.shared_experts.down_proj):
        assert isinstance(linear, Fp8Linear) and linear.weight.dtype == torch.float8_e4m3fn
    # q_a's 256 rows then the latent's 24, 192 columns: the last block partial in both directions
    assert attention.q_and_kv_a_proj.weight_scale_inv.shape == (3, 2)
    assert moe.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert moe.experts.gate_up_proj_scale_inv.shape == (8, 2, 2)
    assert attention.kv_b_proj.weight.dtype == torch.float32  # dequantized: MLA reads it directly
    assert model.lm_head.weight.dtype == torch.float32 and model.model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_fp8_checkpoint_computes_its_dequantized_weights_exactly(fp8_checkpoint):
    directory, _, dequantized = fp8_checkpoint
    model, _ = load_model(str(directory), 0, torch.device("cpu"), torch.float32)
    prompts = [[token % VOCAB_SIZE for token in prompt] for prompt in random_prompts([7, 23, 40], seed=3)]
    for prompt in prompts:
        with torch.inference_mode():
            expected = dequantized(torch.tensor([prompt])).logits[0]
        assert relative_errors(prefill_logits(model, prompt), expected).max() < 1e-4
    engine = LLMEngine(EngineConfig(model=str(directory), device="cpu", max_wait_ms=20))
    try:
        completions = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    finally:
        engine.shutdown()
    for prompt, completion in zip(prompts, completions):
        assert completion.token_ids == reference_greedy(dequantized, prompt, 8)


def emulate_gpu_activation_quantization(monkeypatch) -> None:
    """Fp8Linear on the CPU computing what the GPU kernel does: activations quantized per token group too."""
    def forward(self, x):
        out = reference_block_scaled_matmul(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale_inv)
        out = out.view(*x.shape[:-1], -1).to(x.dtype)
        return out if self.bias is None else out + self.bias

    monkeypatch.setattr(Fp8Linear, "forward", forward)


def expert_choices(model) -> list[torch.Tensor]:
    """Records each MoE layer's chosen experts [tokens, top_k] (sorted) on every forward."""
    choices: list[torch.Tensor] = []
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(
                lambda module, inputs, output: choices.append(output[1].sort(dim=-1).values))
    return choices


@pytest.mark.parametrize("activations", ["unquantized", "quantized"])
def test_fp8_checkpoint_logits_stay_near_the_bf16_original(fp8_checkpoint, tmp_path, monkeypatch, activations):
    """Per position, where FP8 rounding left every token's expert choice alone. Where it did not (a
    near-tie in the router), that position's output is another function: allowed on few positions."""
    directory, original, _ = fp8_checkpoint
    original.save_pretrained(tmp_path / "bf16")
    if activations == "quantized":
        emulate_gpu_activation_quantization(monkeypatch)
    fp8_model, _ = load_model(str(directory), 0, torch.device("cpu"), torch.float32)
    bf16_model, _ = load_model(str(tmp_path / "bf16"), 0, torch.device("cpu"), torch.float32)
    fp8_choices, bf16_choices = expert_choices(fp8_model), expert_choices(bf16_model)
    prompts = [[token % VOCAB_SIZE for token in prompt] for prompt in random_prompts([9, 31, 64], seed=5)]
    errors, rerouted = [], []
    for prompt in prompts:
        errors.append(relative_errors(prefill_logits(fp8_model, prompt), prefill_logits(bf16_model, prompt)))
        rerouted.append((fp8_choices[-1] != bf16_choices[-1]).any(dim=-1))
    errors, rerouted = torch.cat(errors), torch.cat(rerouted)
    assert errors[~rerouted].max() < LOGITS_RELATIVE_ERROR_BOUND, (
        f"mean {errors[~rerouted].mean():.4f} max {errors[~rerouted].max():.4f}")
    assert errors.mean() > 1e-3  # the FP8 weights did round: this is not the original in disguise
    assert rerouted.float().mean() <= 0.1


def test_fp8_checkpoint_whose_packed_projections_share_a_block_is_refused(tmp_path):
    """tiny-llama's k_proj starts at row 64 of the packed qkv_proj: its scales would share a 128-row block
    with q_proj's. The loader says which tensor, rather than loading wrong scales."""
    hf_config = tiny_llama_config(vocab_size=VOCAB_SIZE)
    state = random_reference_model(hf_config, 0, torch.device("cpu"), torch.float32).state_dict()
    tensors = {}
    for name, tensor in state.items():
        if name.endswith("_proj.weight"):
            tensors[name], tensors[name + "_scale_inv"] = quantize_weight_blocks(tensor)
        else:
            tensors[name] = tensor
    write_published_checkpoint(tmp_path / "llama-fp8", hf_config, tensors)
    with pytest.raises(ValueError, match=r"k_proj\.weight_scale_inv.*row 64"):
        load_model(str(tmp_path / "llama-fp8"), 0, torch.device("cpu"), torch.float32)
