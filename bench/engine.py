"""Throughput of the DeepBatch engine against transformers' `generate`, on the same prompts, in one process.

The baseline runs left-padded batches of `--hf-batch-size` prompts through `generate` with the KV cache;
the engine gets every prompt at once and batches them continuously. Both decode greedily and ignore EOS,
so each produces exactly `--max-tokens` tokens per prompt; the figure of merit is output tokens per
second, prefill included. Both run the same random weights (transformers' initialisation under
`--seed`, drawn on the device). Results go to bench/results/engine-<device>-<model>[-<dtype>].json.

Greedy agreement with the baseline is reported for the whole output, the first 32 tokens and the first
token; in 16 bits, random weights give nearly flat logits whose ties rounding flips, so the first
`--float32-check-prompts` prompts also decode with the same weights in float32, and the report says how
often the engine and transformers each keep the first 32 float32 tokens.

Also reported: GPU memory, the KV cache's capacity in tokens, a breakdown of the engine's steps, and
the fraction of the memory-bandwidth roofline its decode steps reach: every decode step must read the
weights (all but the input embedding) once plus the KV cache of every context position in the batch;
those bytes over the decode steps' time, against a device-to-device copy measured in the same run.
Beside it, the compute roofline: the matmul FLOPs a decode step must do (every linear weight once per token,
a routed expert's weights top-k of n_routed_experts times, and attention over every context position)
against a large GEMM in the weights' format measured in the same run. A step's three phases (dense linears,
routed experts, attention) run one after the other, each no faster than the larger of its memory and
compute times; `decode_roofline_fraction` is the sum of those bounds over the steps' time, and
`decode_bandwidth_roofline_fraction_at_best` the HBM fraction a step at that bound would reach. (At large
batches a dense model's linears are compute-bound, so the HBM fraction cannot reach 1 there.)

    python bench/engine.py                       # the tiny DeepSeek-V3 on the CPU
    python bench/engine.py --model shape-r1-distill-qwen-1.5b --device cuda --num-prompts 512 \\
        --min-prompt-len 64 --max-prompt-len 512 --max-tokens 256 --hf-batch-size 256 --max-batch-size 512
    python bench/engine.py --model shape-deepseek-v2-lite --device cuda --num-prompts 512 \\
        --min-prompt-len 64 --max-prompt-len 512 --max-tokens 128 --hf-batch-size 128 --max-batch-size 512
    python bench/engine.py --model shape-deepseek-v2-lite --device cuda --num-prompts 512 --quantization fp8 \\
        --min-prompt-len 64 --max-prompt-len 512 --max-tokens 128 --hf-batch-size 128 --max-batch-size 256
    python bench/engine.py --model shape-deepseek-v3-layers-4 --device cuda --num-prompts 256 --max-tokens 64 \\
        --max-batch-size 64   # DeepSeek-V3's layers in FP8 (random FP8 weights: no transformers baseline)
    python bench/engine.py --model smollm2-135m-instruct --chat-prompts --device cuda --num-prompts 256 \\
        --max-tokens 128 --hf-batch-size 256 --max-batch-size 256   # real weights from a GGUF
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.configs import builtin_config, resolve_model  # noqa: E402
from worker.engine.device import resolve_device, resolve_dtype  # noqa: E402
from worker.engine.engine import LLMEngine  # noqa: E402
from worker.engine.gguf_file import is_gguf, open_gguf  # noqa: E402
from worker.engine.loader import has_fp8_weights, random_reference_model  # noqa: E402
from worker.engine.tokenizer import PromptEncoder, load_tokenizer  # noqa: E402
from worker.engine.types import EngineConfig, SamplingParams  # noqa: E402

RESULTS_DIRECTORY = Path(__file__).resolve().parent / "results"
GIB = 2**30


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-deepseek-v3",
                        help="built-in name (smollm2-135m-instruct, shape-…), .gguf file or checkpoint directory")
    parser.add_argument("--chat-prompts", action="store_true",
                        help="real questions through the model's chat template instead of random token ids "
                             "(for a model with real weights: agreement on text it was trained for)")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--min-prompt-len", type=int, default=16)
    parser.add_argument("--max-prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=64, help="the engine's max_batch_size")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="the engine's step token budget")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly (to measure the graphs)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="GPUs the engine splits the model over (bench/tensor_parallel.py compares against one)")
    parser.add_argument("--quantization", choices=["none", "fp8"], default="none",
                        help="fp8: the engine's linear weights FP8 in 128x128 blocks (the baseline stays in --dtype)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample the engine's tokens (top-p --top-p, seeded by --seed) instead of greedy "
                             "decoding; no transformers baseline then")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--skip-transformers", action="store_true",
                        help="engine figures only, no baseline and no ratio (quick looks while tuning)")
    parser.add_argument("--float32-check-prompts", type=int, default=64,
                        help="how many prompts also decode in float32, to put 16-bit agreement in context (0: none)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="JSON file; default bench/results/engine-<device>-<model>.json")
    return parser.parse_args()


def random_prompts(arguments: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(arguments.seed + 1)
    lengths = torch.randint(
        arguments.min_prompt_len, arguments.max_prompt_len + 1, (arguments.num_prompts,), generator=generator
    )
    return [torch.randint(2, vocab_size, (int(length),), generator=generator).tolist() for length in lengths]


COUNTRIES = ("France", "Japan", "Italy", "Germany", "Spain", "Canada", "Brazil", "Egypt", "India", "Kenya",
             "Norway", "Peru", "Chile", "Greece", "Poland", "Mexico")
TOPICS = ("the moon", "rivers", "prime numbers", "bread", "volcanoes", "the printing press", "owls", "tides",
          "photosynthesis", "chess", "glaciers", "bees", "the internet", "music", "rain", "bridges")
QUESTION_TEMPLATES = (
    "What is the capital of {country}? Answer in one word.",
    "Write one sentence about {topic}.",
    "Explain {topic} to a child in two sentences.",
    "List three facts about {topic} and one about {country}.",
    "Summarise what you know about {topic} in a short paragraph: where it comes from, why people care about "
    "it, and one surprising detail that most people in {country} would not know.",
)


def chat_prompts(arguments: argparse.Namespace) -> list[list[int]]:
    """Questions of five lengths about 16 countries and 16 topics, through the model's chat template."""
    encoder = PromptEncoder(load_tokenizer(arguments.model))
    questions = [QUESTION_TEMPLATES[index % 5].format(country=COUNTRIES[index % 16], topic=TOPICS[index * 7 % 16])
                 for index in range(arguments.num_prompts)]
    return [encoder.encode_chat([{"role": "user", "content": question}]) for question in questions]


def model_config(model: str) -> PretrainedConfig:
    path = resolve_model(model)
    return builtin_config(path) or (open_gguf(path).config if is_gguf(path) else AutoConfig.from_pretrained(path))


def load_reference(model: str, seed: int, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """The same weights the engine loads: the random reference under the seed, the GGUF file (transformers
    dequantises it as the engine does) or the checkpoint."""
    path = resolve_model(model)
    hf_config = builtin_config(path)
    if hf_config is not None:
        return random_reference_model(hf_config, seed, device, dtype)
    if is_gguf(path):
        file = Path(path)
        return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype).to(device).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else 0.0


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes per second of a large device-to-device copy (read + write), the decode roofline's ceiling."""
    if device.type != "cuda":
        return None
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        target.copy_(source)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del source, target
    return 2 * 20 * (1 << 30) / seconds


def matmul_peak(device: torch.device, fp8: bool) -> float | None:
    """FLOP/s of a large GEMM in the format the weights are multiplied in (bf16, or FP8 through torch's scaled
    matmul with per-tensor scales, Hopper's FP8 ceiling), the decode roofline's compute ceiling."""
    if device.type != "cuda":
        return None
    size = 8192
    left = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    right = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    if fp8:
        one = torch.ones((), device=device)
        left, right = left.to(torch.float8_e4m3fn), right.to(torch.float8_e4m3fn).t()

        def multiply():
            return torch._scaled_mm(left, right, one, one, out_dtype=torch.bfloat16)
    else:
        def multiply():
            return left @ right
    for _ in range(3):
        multiply()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        multiply()
    end.record()
    end.synchronize()
    return 20 * 2 * size**3 / (start.elapsed_time(end) / 1000)


@dataclass(frozen=True)
class DecodeCosts:
    """What decoding one token costs, by the three phases of a step that run one after the other: the dense
    linears (attention projections, shared experts, dense MLPs, LM head), the routed experts, and attention
    over the context. Bytes are read once per step (all of a phase's weights, KV per context position);
    FLOPs are per token, or per context position for attention."""

    dense_bytes: int
    dense_flops: int
    expert_bytes: int
    expert_flops: int
    attention_flops: int

    def phase_bounds(self, sequences: int, context_positions: int, kv_bytes_per_token: int, bandwidth: float,
                     flops_peak: float) -> list[tuple[float, float]]:
        """(memory seconds, compute seconds) of each phase of one decode step."""
        return [(self.dense_bytes / bandwidth, self.dense_flops * sequences / flops_peak),
                (self.expert_bytes / bandwidth, self.expert_flops * sequences / flops_peak),
                (kv_bytes_per_token * context_positions / bandwidth,
                 self.attention_flops * context_positions / flops_peak)]


def decode_costs(engine: LLMEngine) -> DecodeCosts:
    """Counted from this rank's weights. Embedding rows are gathered, not multiplied or read whole; block
    scales are read but not multiplied; a stack of routed experts [experts, out, in] is read whole (at a
    decode batch every expert is picked) and multiplied by top-k of all n_routed_experts per token (under
    expert parallelism this rank holds its share of the stack and gets that share of the pairs)."""
    config = engine.model.config
    embedding = engine.model.model.embed_tokens.weight
    tied = engine.model.lm_head.weight is embedding
    dense_bytes = dense_flops = expert_bytes = expert_flops = 0
    for name, parameter in engine.model.named_parameters():
        if parameter is embedding and not tied:
            continue
        size = parameter.numel() * parameter.element_size()
        multiplied = parameter.dim() >= 2 and "scale" not in name
        if parameter.dim() == 3:
            expert_bytes += size
            expert_flops += 2 * parameter.numel() * config.num_experts_per_tok // config.n_routed_experts * multiplied
        else:
            dense_bytes += size
            dense_flops += 2 * parameter.numel() * multiplied
    attention_flops = 0
    for layer in engine.model.model.layers:
        attention = layer.self_attn
        if hasattr(attention, "kv_lora_rank"):  # MLA, absorbed: scores over latent + rope, values over latent
            width = 2 * attention.kv_lora_rank + attention.qk_rope_head_dim
        else:
            width = 2 * attention.head_dim
        attention_flops += 2 * attention.num_heads * width
    return DecodeCosts(dense_bytes, dense_flops, expert_bytes, expert_flops, attention_flops)


@torch.inference_mode()
def run_transformers(
    reference: PreTrainedModel, prompts: list[list[int]], max_tokens: int, batch_size: int, device: torch.device
) -> tuple[float, list[list[int]]]:
    outputs: list[list[int]] = []
    synchronize(device)
    started = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        longest = max(len(prompt) for prompt in batch)
        input_ids = torch.zeros(len(batch), longest, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, prompt in enumerate(batch):  # left padding
            input_ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, longest - len(prompt) :] = 1
        generated = reference.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
        outputs.extend(generated[:, longest:].tolist())
    synchronize(device)
    return time.perf_counter() - started, outputs


def float32_greedy(reference: PreTrainedModel, model: str, prompts: list[list[int]], max_tokens: int,
                   device: torch.device) -> list[list[int]]:
    """The first greedy tokens of the same weights upcast to float32 (the rounding-free answer). A GGUF's
    weights are dequantised again, straight to float32: transformers will not upcast a GGUF model."""
    if is_gguf(resolve_model(model)):
        upcast = load_reference(model, 0, device, torch.float32)
    else:
        upcast = copy.deepcopy(reference).float()
    _, outputs = run_transformers(upcast, prompts, max_tokens, len(prompts), device)
    del upcast
    return outputs


@dataclass
class StepLog:
    """What each engine step computed and how long it took: the whole step as the engine's loop runs it
    (scheduling, the runner, appending the tokens read back). A decode step that the engine launches while it
    reads the step before ends once launched and that read is done, so in steady decode the steps' times add
    up to the wall time. (Before steps overlapped, this timed the runner alone, without the host's
    bookkeeping around it: figures taken then are lower by that share.)"""

    seconds: list[float] = field(default_factory=list)
    decode_only: list[bool] = field(default_factory=list)
    sequences: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    context_positions: list[int] = field(default_factory=list)

    def attach(self, engine: LLMEngine) -> None:
        schedule, step = engine.scheduler.schedule, engine.step
        planned: list = []

        def noted_schedule():
            plan = schedule()
            planned.append([(item.num_new_tokens, item.sequence.num_computed_tokens) for item in plan.scheduled])
            return plan

        def timed_step():
            started, first_plan = time.perf_counter(), len(planned)
            step()
            elapsed = time.perf_counter() - started
            for items in planned[first_plan:]:
                if items:
                    self.seconds.append(elapsed)
                    self.decode_only.append(all(new == 1 for new, _ in items))
                    self.sequences.append(len(items))
                    self.tokens.append(sum(new for new, _ in items))
                    self.context_positions.append(sum(new + computed for new, computed in items))

        engine.scheduler.schedule, engine.step = noted_schedule, timed_step

    def summary(self, weight_bytes: int, kv_bytes_per_token: int, bandwidth: float | None,
                costs: DecodeCosts | None = None, flops_peak: float | None = None) -> dict:
        decode = [index for index, only in enumerate(self.decode_only) if only]
        other = [index for index, only in enumerate(self.decode_only) if not only]
        decode_seconds = sum(self.seconds[index] for index in decode)
        step_bytes = [weight_bytes + kv_bytes_per_token * self.context_positions[index] for index in decode]
        step_phases = [costs.phase_bounds(self.sequences[index], self.context_positions[index], kv_bytes_per_token,
                                          bandwidth, flops_peak) for index in decode] if costs and flops_peak else []
        decode_bytes = sum(step_bytes)
        summary = {
            "steps": len(self.seconds),
            "prefill_steps": len(other),
            "prefill_steps_seconds": round(sum(self.seconds[index] for index in other), 3),
            "prefill_tokens": sum(self.tokens[index] for index in other),
            "decode_steps": len(decode),
            "decode_steps_seconds": round(decode_seconds, 3),
            "decode_step_mean_ms": round(1000 * decode_seconds / max(len(decode), 1), 2),
            "decode_mean_batch": round(sum(self.sequences[index] for index in decode) / max(len(decode), 1), 1),
            "decode_tokens_per_s": round(sum(self.sequences[index] for index in decode) / max(decode_seconds, 1e-9), 1),
        }
        if bandwidth and decode_seconds:
            summary["decode_bytes_per_s"] = round(decode_bytes / decode_seconds / 1e12, 3)
            summary["decode_bandwidth_roofline_fraction"] = round(decode_bytes / decode_seconds / bandwidth, 3)
        if bandwidth and step_phases and decode_seconds:
            compute_seconds = sum(compute for phases in step_phases for _, compute in phases)
            summary["decode_tflops"] = round(compute_seconds * flops_peak / decode_seconds / 1e12, 1)
            summary["decode_compute_roofline_fraction"] = round(compute_seconds / decode_seconds, 3)
            # Each phase at the larger of its memory and compute times, the phases one after the other: the
            # fastest this step could be with every kernel at the device's measured ceilings.
            bound = sum(max(memory, compute) for phases in step_phases for memory, compute in phases)
            summary["decode_roofline_fraction"] = round(bound / decode_seconds, 3)
            summary["decode_bandwidth_roofline_fraction_at_best"] = round(
                decode_bytes / bandwidth / bound, 3)
            summary["decode_compute_bound_phases"] = {
                name: sum(phases[position][1] > phases[position][0] for phases in step_phases)
                for position, name in enumerate(("dense", "experts", "attention"))}
        return summary


def engine_weight_bytes(engine: LLMEngine) -> int:
    """Bytes a decode step reads of the weights: all but the input embedding (only a row per token)."""
    costs = decode_costs(engine)
    return costs.dense_bytes + costs.expert_bytes


def run_engine(arguments: argparse.Namespace, device: torch.device, dtype: torch.dtype,
               prompts: list[list[int]]) -> dict:
    engine = LLMEngine(EngineConfig(
        model=arguments.model, device=str(device), dtype=str(dtype).removeprefix("torch."), seed=arguments.seed,
        max_batch_size=arguments.max_batch_size, max_wait_ms=5.0,
        max_num_batched_tokens=arguments.max_num_batched_tokens,
        max_model_len=arguments.max_prompt_len + arguments.max_tokens + 1,
        use_cuda_graphs=not arguments.no_cuda_graphs, tensor_parallel_size=arguments.tensor_parallel_size,
        quantization=arguments.quantization,
    ))
    engine.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    steps = StepLog()
    steps.attach(engine)
    sampling = SamplingParams(max_tokens=arguments.max_tokens, ignore_eos=True, temperature=arguments.temperature,
                              top_p=arguments.top_p, seed=arguments.seed if arguments.temperature else None)
    synchronize(device)
    started = time.perf_counter()
    completions = engine.generate(prompts, sampling)
    seconds = time.perf_counter() - started
    kv_bytes_per_token = engine.model.kv_cache_bytes_per_token(engine.dtype)
    result = {
        "seconds": seconds,
        "outputs": [completion.token_ids for completion in completions],
        "kv_cache_capacity_tokens": engine.block_manager.num_blocks * engine.config.kv_block_size,
        "kv_cache_gib": round(engine.block_manager.num_blocks * engine.config.kv_block_size * kv_bytes_per_token
                              / GIB, 2),
        "preemptions": engine.scheduler.num_preemptions,
        "peak_gpu_memory_gib": peak_memory_gib(device),
        "steps": steps.summary(engine_weight_bytes(engine), kv_bytes_per_token, arguments.bandwidth,
                               decode_costs(engine), arguments.flops_peak),
        "weight_gib": round(sum(p.numel() * p.element_size() for p in engine.model.parameters()) / GIB, 2),
    }
    engine.shutdown()
    return result


def main() -> None:
    arguments = parse_arguments()
    device = resolve_device(arguments.device)
    dtype = resolve_dtype(arguments.dtype, device)
    arguments.bandwidth = copy_bandwidth(device)
    arguments.flops_peak = matmul_peak(device, fp8=arguments.quantization == "fp8")
    hf_config = model_config(arguments.model)
    prompts = chat_prompts(arguments) if arguments.chat_prompts else random_prompts(arguments, hf_config.vocab_size)
    output_tokens = arguments.num_prompts * arguments.max_tokens
    result: dict = {
        "model": arguments.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "torch": torch.__version__, "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "num_prompts": arguments.num_prompts,
        "prompts": "chat questions" if arguments.chat_prompts else "random token ids",
        "prompt_len": ([min(map(len, prompts)), max(map(len, prompts))] if arguments.chat_prompts
                       else [arguments.min_prompt_len, arguments.max_prompt_len]),
        "max_tokens": arguments.max_tokens, "hf_batch_size": arguments.hf_batch_size,
        "engine_max_batch_size": arguments.max_batch_size,
        "engine_max_num_batched_tokens": arguments.max_num_batched_tokens,
        "engine_cuda_graphs": device.type == "cuda" and not arguments.no_cuda_graphs,
        "engine_tensor_parallel_size": arguments.tensor_parallel_size,
        "engine_quantization": arguments.quantization,
        "measured_copy_bandwidth_tb_s": round(arguments.bandwidth / 1e12, 3) if arguments.bandwidth else None,
        "measured_matmul_tflops": round(arguments.flops_peak / 1e12, 1) if arguments.flops_peak else None,
    }
    hf_outputs = float32_outputs = None
    if builtin_config(resolve_model(arguments.model)) is not None and has_fp8_weights(hf_config):
        arguments.skip_transformers = True  # its random weights are drawn in FP8: there is no bf16 model to run
        result["transformers_skipped"] = "random FP8 weights drawn by the engine's loader"
    if arguments.temperature:
        arguments.skip_transformers = True  # greedy agreement is the baseline's point; sampled tokens differ
        result["transformers_skipped"] = f"sampled at temperature {arguments.temperature}, top_p {arguments.top_p}"
    result.update(engine_temperature=arguments.temperature, engine_top_p=arguments.top_p)
    if not arguments.skip_transformers:
        # The baseline first, while the GPU is empty; its weights are drawn again by the engine's loader.
        reference = load_reference(arguments.model, arguments.seed, device, dtype)
        run_transformers(reference, prompts[:2], 2, arguments.hf_batch_size, device)  # warm-up
        hf_seconds, hf_outputs = run_transformers(reference, prompts, arguments.max_tokens,
                                                  arguments.hf_batch_size, device)
        result.update(transformers_seconds=round(hf_seconds, 3),
                      transformers_tokens_per_s=round(output_tokens / hf_seconds, 1),
                      transformers_peak_gpu_memory_gib=peak_memory_gib(device))
        if arguments.float32_check_prompts and dtype != torch.float32:
            float32_outputs = float32_greedy(reference, arguments.model, prompts[: arguments.float32_check_prompts],
                                             min(32, arguments.max_tokens), device)
        del reference
        release_memory(device)
    engine = run_engine(arguments, device, dtype, prompts)
    result.update(
        engine_seconds=round(engine["seconds"], 3),
        engine_tokens_per_s=round(output_tokens / engine["seconds"], 1),
    )
    if hf_outputs is not None:
        result["speedup"] = round(result["transformers_seconds"] / engine["seconds"], 2)
        outputs = engine["outputs"]
        result["greedy_outputs_identical"] = f"{sum(a == b for a, b in zip(outputs, hf_outputs))}/{len(outputs)}"
        # bf16 rounding can flip a late token; the first 32 say whether the model computes the same function.
        result["greedy_first_32_tokens_identical"] = (
            f"{sum(a[:32] == b[:32] for a, b in zip(outputs, hf_outputs))}/{len(outputs)}")
        result["greedy_first_token_identical"] = (
            f"{sum(a[:1] == b[:1] for a, b in zip(outputs, hf_outputs))}/{len(outputs)}")
        result["greedy_mean_tokens_before_first_difference"] = round(
            sum(common_prefix_length(a, b) for a, b in zip(outputs, hf_outputs)) / len(outputs), 1)
    if float32_outputs is not None:
        # How far 16-bit rounding alone moves greedy decoding: transformers' own 16-bit run against the same
        # weights in float32, beside the engine's. The engine should stray no further than transformers does.
        count = len(float32_outputs)
        result["float32_check_prompts"] = count
        checked = len(float32_outputs[0])
        result["first_tokens_identical_to_float32"] = {
            "tokens": checked,
            "transformers": sum(a[:checked] == b for a, b in zip(hf_outputs, float32_outputs)),
            "engine": sum(a[:checked] == b for a, b in zip(engine["outputs"], float32_outputs)),
        }
        result["mean_tokens_before_first_difference_from_float32"] = {
            name: round(sum(common_prefix_length(a[:checked], b) for a, b in zip(outputs, float32_outputs)) / count, 1)
            for name, outputs in (("transformers", hf_outputs), ("engine", engine["outputs"]))}
    result.update({f"engine_{key}": value for key, value in engine.items() if key not in ("seconds", "outputs")})
    print(json.dumps(result, indent=2))
    output = arguments.output or default_output(arguments, device, dtype)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")


def common_prefix_length(first: list[int], second: list[int]) -> int:
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return min(len(first), len(second))


def default_output(arguments: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Path:
    model_label = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(arguments.model).name or arguments.model)
    suffix = "" if dtype == resolve_dtype("auto", device) else "-" + str(dtype).removeprefix("torch.")
    if arguments.tensor_parallel_size > 1:
        suffix += f"-tp{arguments.tensor_parallel_size}"
    if arguments.quantization != "none":
        suffix += f"-{arguments.quantization}"
    return RESULTS_DIRECTORY / f"engine-{device.type}-{model_label}{suffix}.json"


if __name__ == "__main__":
    main()
