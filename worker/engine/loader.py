"""Builds an engine model and fills its weights: from a local HF safetensors checkpoint, or at random.

Parameter names follow transformers, so a `save_pretrained` directory loads as is, with two exceptions
the loader maps: routed experts, which checkpoints store per expert (`experts.<e>.gate_proj.weight`)
and the engine as stacked tensors (`experts.gate_up_proj`); and projections the engine packs into one
matrix product (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`), which fill rows of the packed one.
Built-in names get the random weights transformers' `from_config` draws under `torch.manual_seed(seed)`
on the engine's device, so the reference engine and this one run the very same model. Checkpoints load
through safetensors directly rather than `from_pretrained`, so that no second copy of the model is built.

FP8: a checkpoint whose config says `quantization_config: {quant_method: fp8, weight_block_size: [128,
128]}` (DeepSeek-V3's published layout) loads into FP8 linears and experts (worker/engine/layers/linear.py)
byte for byte, each `weight_scale_inv` beside its weight; packed and stacked weights get their scales'
rows alike, which needs every packed boundary on a whole 128-row block (DeepSeek-V3's are) and is
refused with a message otherwise. A weight the model keeps in 16 bits (kv_b_proj) is dequantized once
its weight and scale have both arrived. `quantization="fp8"` quantizes any other model after loading;
built-in shapes whose config is FP8 (shape-deepseek-v3-layers-N) draw random FP8 weights on the device.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from worker.engine.configs import builtin_config, resolve_model
from worker.engine.gguf_file import is_gguf, open_gguf
from worker.engine.kernels.fp8_blocks import BLOCK, dequantize_blocks, is_fp8
from worker.engine.layers.linear import quantize_linears
from worker.engine.models import build_model
from worker.engine.parallel import Shard

# Kept in float32 whatever the model's dtype, as transformers keeps them (they bias the expert choice).
FLOAT32_TENSOR_NAMES = ("e_score_correction_bias",)
SCALE_SUFFIX: str = "_scale_inv"  # of a weight's block scales: `weight` → `weight_scale_inv`
QUANTIZATIONS = ("none", "fp8")


def load_model(
    model_name: str, seed: int, device: torch.device, dtype: torch.dtype, shard: Shard = Shard(),
    quantization: str | None = None,
) -> tuple[nn.Module, PretrainedConfig]:
    """The engine model for a built-in name, a GGUF file or a checkpoint directory, on `device` in `dtype`.

    Under tensor parallelism each rank builds its part of the model (`shard`) and keeps its slice of each
    named tensor: the whole tensors are read (or drawn) alike on every rank, then cut.
    quantization "fp8" makes the linear weights FP8 block-scaled (an FP8 checkpoint stays FP8 whatever).
    """
    if (quantization or "none") not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} (DEEPBATCH_QUANTIZATION) is not one of "
                         f"{', '.join(QUANTIZATIONS)}")
    model_name = model_path(model_name)
    hf_config = builtin_config(model_name)
    if hf_config is not None and has_fp8_weights(hf_config):
        model = empty_model(hf_config, device, dtype, shard)
        fill_random(model, seed)
        return model.eval(), hf_config
    if hf_config is not None:
        named_tensors: Iterable[tuple[str, torch.Tensor]] = random_named_tensors(hf_config, seed, device, dtype)
    elif is_gguf(model_name):
        gguf = open_gguf(model_name)
        hf_config, named_tensors = gguf.config, gguf.named_tensors()
    else:
        hf_config = AutoConfig.from_pretrained(model_name)
        named_tensors = checkpoint_named_tensors(Path(model_name))
    model = empty_model(hf_config, device, dtype, shard)
    load_named_tensors(model, named_tensors)
    if quantization == "fp8" and not has_fp8_weights(hf_config):
        quantize_linears(model)
    return model.eval(), hf_config


def has_fp8_weights(hf_config: PretrainedConfig) -> bool:
    """Whether the config says FP8 weights in 128×128 blocks (DeepSeek-V3's); a ValueError for any other
    quantization, which the engine cannot load."""
    quantization_config = getattr(hf_config, "quantization_config", None)
    if quantization_config is None:
        return False
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    method = quantization_config.get("quant_method")
    block_size = list(quantization_config.get("weight_block_size") or [])
    scheme = quantization_config.get("activation_scheme", "dynamic")
    if method != "fp8" or block_size != [BLOCK, BLOCK] or scheme != "dynamic":
        raise ValueError(f"quantization_config {quantization_config} is not supported: the engine loads FP8 "
                         f"weights in {BLOCK}x{BLOCK} blocks with dynamic activation scales")
    return True


def model_path(model_name: str) -> str:
    """What a model name loads from (a packaged model's file; any other name as it is); a ValueError when
    it names nothing the loader can load. Cheap: `deepbatch worker` and `run` check settings with it."""
    path = resolve_model(model_name)
    if builtin_config(path) is None and not is_gguf(path) and not Path(path).is_dir():
        raise ValueError(f"model {model_name!r} is neither a built-in name, a .gguf file nor a checkpoint directory")
    return path


def empty_model(hf_config: PretrainedConfig, device: torch.device, dtype: torch.dtype,
                shard: Shard = Shard()) -> nn.Module:
    """The model with uninitialised storage: built on the meta device so that no init work is wasted, its
    linears made FP8 there when the config's weights are."""
    with torch.device("meta"):
        model = build_model(hf_config, shard).to(dtype)
        if has_fp8_weights(hf_config):
            quantize_linears(model)
    model = model.to_empty(device=device)
    if getattr(hf_config, "tie_word_embeddings", False):  # to_empty may have untied them
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, buffer in list(model.named_buffers()):
        if name.endswith(FLOAT32_TENSOR_NAMES):
            owner = model.get_submodule(name.rpartition(".")[0])
            setattr(owner, name.rpartition(".")[2], buffer.float())
    return model


def random_reference_model(hf_config: PretrainedConfig, seed: int, device: torch.device,
                           dtype: torch.dtype) -> nn.Module:
    """transformers' own model with its random initialisation under `seed`, drawn on `device` in `dtype`.

    The engine's built-in weights, the reference engine's and the benchmark's baseline all come from
    here, so they run the same model. Drawing on the device itself keeps a 16B-parameter benchmark
    model from a slow float32 detour through host memory.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()


def random_named_tensors(hf_config: PretrainedConfig, seed: int, device: torch.device,
                         dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The reference model's random weights, by name; the reference is dropped once they are copied."""
    yield from random_reference_model(hf_config, seed, device, dtype).state_dict().items()


@torch.no_grad()
def fill_random(model: nn.Module, seed: int) -> None:
    """Random weights drawn on the model's device straight into its storage: N(0, initializer_range²)
    for matrices (FP8 ones as N(0, 1) values with that as their block scale), ones for norms, zeros for
    biases. For shapes whose 16-bit copy through transformers would not fit (DeepSeek-V3)."""
    std = model.config.initializer_range
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, parameter in model.named_parameters():
        if is_fp8(parameter):
            for matrix in parameter.view(-1, *parameter.shape[-2:]):  # one expert at a time
                matrix.copy_(torch.randn(matrix.shape, generator=generator, device=device, dtype=torch.bfloat16))
        elif name.endswith(SCALE_SUFFIX):
            parameter.fill_(std)
        elif parameter.dim() == 1:
            parameter.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        else:
            parameter.normal_(0.0, std, generator=generator)
    for buffer in model.buffers():
        buffer.zero_()


def checkpoint_named_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the directory's safetensors files (sharded through model.safetensors.index.json)."""
    index_file = directory / "model.safetensors.index.json"
    if index_file.exists():
        shard_names = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        shard_files = [directory / name for name in shard_names]
    else:
        shard_files = sorted(directory.glob("*.safetensors"))
    if not shard_files:
        raise FileNotFoundError(f"no *.safetensors files in checkpoint directory {directory}")
    for shard_file in shard_files:
        with safe_open(str(shard_file), framework="pt", device="cpu") as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)


def is_ignorable(name: str, hf_config: PretrainedConfig) -> bool:
    """Checkpoint tensors the engine has no use for: rope tables and layers past num_hidden_layers
    (DeepSeek-V3 ships its multi-token-prediction layer as layer 61)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    parts = name.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2]) >= hf_config.num_hidden_layers
    return False


@torch.no_grad()
def load_named_tensors(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copies checkpoint tensors into the model; raises when one is unknown or a model tensor is missing."""
    targets = model.state_dict(keep_vars=True)
    packed_counts = packed_piece_counts(model)
    pieces_loaded: dict[str, int] = {}
    unexpected: list[str] = []
    expert_target = getattr(model, "checkpoint_expert_target", lambda name: None)
    rank_part = getattr(model, "rank_part_of", None)
    held_for_dequantization: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in named_tensors:
        if rank_part is not None:
            name, tensor = rank_part(name, tensor)  # this rank's slice; None: another rank's expert
            if tensor is None:
                continue
        sixteen_bit_name = sixteen_bit_target(name, tensor, targets)
        if sixteen_bit_name is not None:
            held = held_for_dequantization.setdefault(sixteen_bit_name, {})
            held[name] = tensor
            if len(held) == 2:  # the FP8 weight and its scales: dequantized into the 16-bit weight
                weight = dequantize_blocks(held[sixteen_bit_name], held[sixteen_bit_name + SCALE_SUFFIX],
                                           targets[sixteen_bit_name].dtype)
                check_shape(sixteen_bit_name, targets[sixteen_bit_name], weight)
                targets[sixteen_bit_name].copy_(weight)
                pieces_loaded[sixteen_bit_name] = 1
                del held_for_dequantization[sixteen_bit_name]
            continue
        stacked = expert_target(name)
        packed = packed_target(model, name) if name not in targets else None
        if stacked is not None and stacked[0] in targets:
            stacked_name, expert_index, projection = stacked
            copy_expert_slice(targets[stacked_name], expert_index, projection, tensor)
            pieces_loaded[stacked_name] = pieces_loaded.get(stacked_name, 0) + 1
        elif packed is not None and packed[0] in targets:
            packed_name, first_row, rows = packed
            if name.endswith(SCALE_SUFFIX):
                first_row, rows = scale_rows(name, first_row, rows)
            target = targets[packed_name][first_row : first_row + rows]
            check_shape(name, target, tensor)
            target.copy_(tensor)
            pieces_loaded[packed_name] = pieces_loaded.get(packed_name, 0) + 1
        elif name in targets:
            check_shape(name, targets[name], tensor)
            targets[name].copy_(tensor)
            pieces_loaded[name] = pieces_loaded.get(name, 0) + expected_pieces(name, targets[name], packed_counts)
        elif not is_ignorable(name, model.config):
            unexpected.append(name)
    unexpected += [name for held in held_for_dequantization.values() for name in held]
    if unexpected:
        raise ValueError(f"checkpoint tensors the model does not have: {unexpected[:5]} ({len(unexpected)} in all)")
    missing = [
        name
        for name, target in targets.items()
        if pieces_loaded.get(name, 0) < expected_pieces(name, target, packed_counts) and not is_tied_head(model, name)
    ]
    if missing:
        raise ValueError(f"model tensors missing from the checkpoint: {missing[:5]} ({len(missing)} in all)")


def sixteen_bit_target(name: str, tensor: torch.Tensor, targets: dict[str, torch.Tensor]) -> str | None:
    """The 16-bit model weight an FP8 checkpoint weight or its `weight_scale_inv` belongs to; None when the
    model's tensor is FP8 too (or there is none)."""
    weight_name = name.removesuffix(SCALE_SUFFIX) if name.endswith("weight" + SCALE_SUFFIX) else name
    target = targets.get(weight_name)
    if target is None or is_fp8(target) or (weight_name == name and not is_fp8(tensor)):
        return None
    return weight_name


def scale_rows(name: str, first_row: int, rows: int) -> tuple[int, int]:
    """The rows of a packed weight's block scales that a packed projection's scales fill."""
    if first_row % BLOCK:
        raise ValueError(f"checkpoint tensor {name}: its projection starts at row {first_row} of the packed "
                         f"weight, inside a {BLOCK}-row block whose one scale it would share with the previous "
                         f"projection; FP8 checkpoints load only where packed projections are whole blocks")
    return first_row // BLOCK, -(-rows // BLOCK)


def packed_target(model: nn.Module, name: str) -> tuple[str, int, int] | None:
    """For a checkpoint projection the model packs with others (`...self_attn.q_proj.weight` into
    `qkv_proj`): the packed tensor's name and the rows it fills; None for every other name."""
    prefix, _, tensor_kind = name.rpartition(".")
    module_path, _, projection = prefix.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return None
    where = getattr(module, "packed_projections", {}).get(projection)
    if where is None:
        return None
    packed_name, first_row, rows = where
    return f"{module_path}.{packed_name}.{tensor_kind}", first_row, rows


def packed_piece_counts(model: nn.Module) -> dict[str, int]:
    """How many checkpoint tensors fill each packed weight and bias."""
    counts: dict[str, int] = {}
    for module_path, module in model.named_modules():
        for packed_name, _, _ in getattr(module, "packed_projections", {}).values():
            for tensor_kind in ("weight", "bias", "weight" + SCALE_SUFFIX):
                key = f"{module_path}.{packed_name}.{tensor_kind}"
                counts[key] = counts.get(key, 0) + 1
    return counts


def expected_pieces(name: str, target: torch.Tensor, packed_counts: dict[str, int] | None = None) -> int:
    """How many checkpoint tensors fill `name`: one per expert and projection for stacked experts, one
    per projection for packed ones."""
    if packed_counts and name in packed_counts:
        return packed_counts[name]
    if name.endswith(("experts.gate_up_proj", "experts.gate_up_proj" + SCALE_SUFFIX)):
        return 2 * target.shape[0]
    if name.endswith(("experts.down_proj", "experts.down_proj" + SCALE_SUFFIX)):
        return target.shape[0]
    return 1


def is_tied_head(model: nn.Module, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def copy_expert_slice(stacked: torch.Tensor, expert_index: int, projection: str, tensor: torch.Tensor) -> None:
    """gate_proj fills the first half of gate_up_proj's rows, up_proj the second half (of their FP8 scales'
    rows alike, which needs moe_intermediate_size a whole number of blocks)."""
    if projection == "down_proj":
        target = stacked[expert_index]
    else:
        intermediate_size = stacked.shape[1] // 2
        if stacked.shape[1] != 2 * tensor.shape[0]:
            raise ValueError(f"expert {expert_index} {projection} of shape {tuple(tensor.shape)} fills half of "
                             f"rows of {tuple(stacked.shape[1:])}: FP8 gate/up scales need moe_intermediate_size "
                             f"a multiple of {BLOCK}")
        rows = slice(0, intermediate_size) if projection == "gate_proj" else slice(intermediate_size, None)
        target = stacked[expert_index, rows]
    check_shape(f"expert {expert_index} {projection}", target, tensor)
    target.copy_(tensor)


def check_shape(name: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
    if target.shape != tensor.shape:
        raise ValueError(
            f"checkpoint tensor {name} has shape {tuple(tensor.shape)}; the model expects {tuple(target.shape)}"
        )
