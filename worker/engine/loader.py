"""Builds an engine model and fills its weights: from a local HF safetensors checkpoint, or at random.

Parameter names follow transformers, so a `save_pretrained` directory loads as is, with two exceptions
the loader maps: routed experts, which checkpoints store per expert (`experts.<e>.gate_proj.weight`)
and the engine as stacked tensors (`experts.gate_up_proj`); and projections the engine packs into one
matrix product (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`), which fill rows of the packed one.
Built-in names get the random weights transformers' `from_config` draws under `torch.manual_seed(seed)`
on the engine's device, so the reference engine and this one run the very same model. Checkpoints load
through safetensors directly rather than `from_pretrained`, so that no second copy of the model is built.
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
from worker.engine.models import build_model
from worker.engine.parallel import Shard

# Kept in float32 whatever the model's dtype, as transformers keeps them (they bias the expert choice).
FLOAT32_TENSOR_NAMES = ("e_score_correction_bias",)


def load_model(
    model_name: str, seed: int, device: torch.device, dtype: torch.dtype, shard: Shard = Shard()
) -> tuple[nn.Module, PretrainedConfig]:
    """The engine model for a built-in name, a GGUF file or a checkpoint directory, on `device` in `dtype`.

    Under tensor parallelism each rank builds its part of the model (`shard`) and keeps its slice of each
    named tensor: the whole tensors are read (or drawn) alike on every rank, then cut.
    """
    model_name = model_path(model_name)
    hf_config = builtin_config(model_name)
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
    return model.eval(), hf_config


def model_path(model_name: str) -> str:
    """What a model name loads from (a packaged model's file; any other name as it is); a ValueError when
    it names nothing the loader can load. Cheap: `deepbatch worker` and `run` check settings with it."""
    path = resolve_model(model_name)
    if builtin_config(path) is None and not is_gguf(path) and not Path(path).is_dir():
        raise ValueError(f"model {model_name!r} is neither a built-in name, a .gguf file nor a checkpoint directory")
    return path


def empty_model(hf_config: PretrainedConfig, device: torch.device, dtype: torch.dtype,
                shard: Shard = Shard()) -> nn.Module:
    """The model with uninitialised storage: built on the meta device so that no init work is wasted."""
    with torch.device("meta"):
        model = build_model(hf_config, shard)
    model = model.to_empty(device=device).to(dtype)
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
    for name, tensor in named_tensors:
        if rank_part is not None:
            name, tensor = rank_part(name, tensor)  # this rank's slice; None: another rank's expert
            if tensor is None:
                continue
        stacked = expert_target(name)
        packed = packed_target(model, name) if name not in targets else None
        if stacked is not None and stacked[0] in targets:
            stacked_name, expert_index, projection = stacked
            copy_expert_slice(targets[stacked_name], expert_index, projection, tensor)
            pieces_loaded[stacked_name] = pieces_loaded.get(stacked_name, 0) + 1
        elif packed is not None and packed[0] in targets:
            packed_name, first_row, rows = packed
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
    if unexpected:
        raise ValueError(f"checkpoint tensors the model does not have: {unexpected[:5]} ({len(unexpected)} in all)")
    missing = [
        name
        for name, target in targets.items()
        if pieces_loaded.get(name, 0) < expected_pieces(name, target, packed_counts) and not is_tied_head(model, name)
    ]
    if missing:
        raise ValueError(f"model tensors missing from the checkpoint: {missing[:5]} ({len(missing)} in all)")


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
            for tensor_kind in ("weight", "bias"):
                key = f"{module_path}.{packed_name}.{tensor_kind}"
                counts[key] = counts.get(key, 0) + 1
    return counts


def expected_pieces(name: str, target: torch.Tensor, packed_counts: dict[str, int] | None = None) -> int:
    """How many checkpoint tensors fill `name`: one per expert and projection for stacked experts, one
    per projection for packed ones."""
    if packed_counts and name in packed_counts:
        return packed_counts[name]
    if name.endswith("experts.gate_up_proj"):
        return 2 * target.shape[0]
    if name.endswith("experts.down_proj"):
        return target.shape[0]
    return 1


def is_tied_head(model: nn.Module, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def copy_expert_slice(stacked: torch.Tensor, expert_index: int, projection: str, tensor: torch.Tensor) -> None:
    """gate_proj fills the first half of gate_up_proj's rows, up_proj the second half."""
    if projection == "down_proj":
        target = stacked[expert_index]
    else:
        intermediate_size = stacked.shape[1] // 2
        rows = slice(0, intermediate_size) if projection == "gate_proj" else slice(intermediate_size, None)
        target = stacked[expert_index, rows]
    check_shape(f"expert {expert_index} {projection}", target, tensor)
    target.copy_(tensor)


def check_shape(name: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
    if target.shape != tensor.shape:
        raise ValueError(
            f"checkpoint tensor {name} has shape {tuple(tensor.shape)}; the model expects {tuple(target.shape)}"
        )
