"""The paged-attention kernel against the dense path it replaces on the GPU, at the benchmark models' shapes.

Baseline (same process, same inputs): gather each sequence's cached keys and values into dense padded
tensors and run torch's scaled_dot_product_attention with a causal mask, which is what the CPU path
does. Shapes: decode (512 sequences, one new token each) and prefill (16 sequences of 512 new tokens),
for DeepSeek-R1-Distill-Qwen-1.5B's grouped-query heads (12 query, 2 key/value, 128 dims) and
DeepSeek-V2-Lite's MLA in the absorbed form (16 heads over one 512 + 64 latent). With `--sweep`, also
times a grid of launch shapes (the defaults in worker/engine/kernels/paged_attention.py come from it); for
decode the grid includes splitting each context across programs. `--sequences` and `--context` set a decode
step's batch and context lengths (an engine benchmark's, say), `--shapes` picks shapes.
Prints times, the kernel's speedup and its achieved bandwidth; writes bench/results/paged-attention-<gpu>.json.

    python bench/paged_attention.py [--sweep]
    python bench/paged_attention.py --sweep --shapes gqa-decode --sequences 128 --context 64 768 --output f.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.kernels.paged_attention import LaunchShape, launch_shape, paged_attention  # noqa: E402
from worker.engine.layers.attention import attend  # noqa: E402

RESULTS_DIRECTORY = Path(__file__).resolve().parent / "results"
PAGE_SIZE = 16

SHAPES = {
    # name: (sequences, query heads, kv heads, key dims (a, b), value dim, MLA, new tokens, context range)
    "gqa-decode": (512, 12, 2, (128, 0), 128, False, 1, (64, 768)),
    "gqa-prefill": (16, 12, 2, (128, 0), 128, False, 512, (512, 512)),
    "mla-decode": (512, 16, 1, (512, 64), 512, True, 1, (64, 640)),
    "mla-prefill": (16, 16, 1, (512, 64), 512, True, 512, (512, 512)),
}
SWEEPS = {  # tokens, block_n, warps, stages, heads (None: the whole group), context splits (decode)
    "gqa-decode": ([2], [32, 64, 128], [4, 8], [2, 3, 4], [None], [1, 2, 3, 4]),
    "gqa-prefill": ([8, 16], [32, 64], [4, 8], [2, 3], [None], [None]),
    "mla-decode": ([1], [16, 32, 64, 128], [2, 4, 8], [1, 2, 3, 4], [None], [1, 2, 4]),
    "mla-prefill": ([2, 4], [32, 64], [4, 8], [1, 2], [None], [None]),
}


def make_inputs(name: str) -> dict:
    sequences, heads, kv_heads, (dim_a, dim_b), value_dim, mla, new_tokens, (low, high) = SHAPES[name]
    generator = torch.Generator().manual_seed(0)
    context_lens = torch.randint(low, high + 1, (sequences,), generator=generator, dtype=torch.int32)
    width = -(-high // PAGE_SIZE)
    num_blocks = sequences * width
    block_tables = torch.randperm(num_blocks, generator=generator).view(sequences, width).int()
    if mla:
        key_cache = torch.randn(num_blocks, PAGE_SIZE, 1, dim_a + dim_b, dtype=torch.bfloat16, device="cuda")
        value_cache = None
    else:
        cache = torch.randn(num_blocks, PAGE_SIZE, 2, kv_heads, dim_a, dtype=torch.bfloat16, device="cuda")
        key_cache, value_cache = cache[:, :, 0], cache[:, :, 1]
    query_lens = torch.full((sequences,), new_tokens, dtype=torch.int32)
    query = torch.randn(sequences * new_tokens, heads, dim_a + dim_b, dtype=torch.bfloat16, device="cuda")
    return dict(query=query, key_cache=key_cache, value_cache=value_cache,
                output=query.new_empty(query.shape[0], heads, value_dim), block_tables=block_tables.cuda(),
                query_starts=(torch.cumsum(query_lens, 0, dtype=torch.int32) - query_lens).cuda(),
                query_lens=query_lens.cuda(), context_lens=context_lens.cuda(), max_query_len=new_tokens,
                scale=(dim_a + dim_b) ** -0.5, page_size=PAGE_SIZE, dim_a=dim_a, value_dim=value_dim)


def dense_attention(inputs: dict) -> torch.Tensor:
    """The baseline: gather every sequence's context into padded dense tensors, then masked SDPA."""
    sequences, new_tokens = inputs["query_lens"].shape[0], inputs["max_query_len"]
    context_lens, block_tables = inputs["context_lens"], inputs["block_tables"]
    positions = torch.arange(int(context_lens.max()), device="cuda")
    slots = block_tables[:, positions // PAGE_SIZE].long() * PAGE_SIZE + positions % PAGE_SIZE
    keys = inputs["key_cache"].flatten(0, 1)[slots]  # [sequences, context, kv heads, dims]
    if inputs["value_cache"] is None:  # MLA: the values are the latent, the keys' first dimensions
        values = keys[..., : inputs["value_dim"]]
    else:
        values = inputs["value_cache"].flatten(0, 1)[slots]
    query = inputs["query"].view(sequences, new_tokens, *inputs["query"].shape[1:])
    query_positions = context_lens[:, None] - new_tokens + torch.arange(new_tokens, device="cuda")
    mask = positions[None, None, :] <= query_positions[:, :, None]
    return attend(query, keys, values, mask, inputs["scale"])


def milliseconds(function) -> float:
    return triton.testing.do_bench(function, warmup=25, rep=100, return_mode="median")


def measure(name: str, sweep: bool) -> dict:
    inputs = make_inputs(name)
    sequences, heads, kv_heads, (dim_a, dim_b), value_dim, mla, new_tokens, _ = SHAPES[name]
    key_bytes_per_position = (dim_a + dim_b) * 2 * (1 if mla else 2 * kv_heads)
    cache_bytes = int(inputs["context_lens"].sum()) * key_bytes_per_position
    kernel_ms = milliseconds(lambda: paged_attention(**inputs))
    dense_ms = milliseconds(lambda: dense_attention(inputs))
    paged_attention(**inputs)
    reference = dense_attention(inputs).reshape(inputs["output"].shape).float()
    error = ((inputs["output"].float() - reference).norm() / reference.norm()).item()
    result = {
        "kernel_ms": round(kernel_ms, 4), "dense_gather_sdpa_ms": round(dense_ms, 4),
        "speedup": round(dense_ms / kernel_ms, 2), "relative_error_vs_dense": float(f"{error:.2e}"),
        "kernel_cache_read_tb_s": round(cache_bytes / kernel_ms / 1e9, 3),
        "launch": str(launch_shape(heads // kv_heads, value_dim, new_tokens == 1)),
    }
    if sweep:
        timings = []
        for shape in itertools.starmap(LaunchShape, itertools.product(*SWEEPS[name])):
            try:
                timings.append((milliseconds(lambda: paged_attention(**inputs, launch=shape)), str(shape)))
            except Exception as error:  # noqa: BLE001 - a shape that does not fit (shared memory) is skipped
                print(f"  {shape}: {type(error).__name__}")
        result["sweep_fastest"] = [(round(ms, 4), shape) for ms, shape in sorted(timings)[:5]]
    print(f"{name:12s} kernel {kernel_ms:.3f} ms  dense {dense_ms:.3f} ms  x{dense_ms / kernel_ms:.1f}  "
          f"cache read {cache_bytes / kernel_ms / 1e9:.2f} TB/s  rel err {error:.1e}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time a grid of launch shapes")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--sequences", type=int, help="decode shapes: sequences in the step")
    parser.add_argument("--context", type=int, nargs=2, metavar=("LOW", "HIGH"), help="decode shapes: context range")
    parser.add_argument("--output", type=Path)
    arguments = parser.parse_args()
    for name in SHAPES:
        if name.endswith("-decode"):
            shape = list(SHAPES[name])
            shape[0] = arguments.sequences or shape[0]
            shape[7] = tuple(arguments.context or shape[7])
            SHAPES[name] = tuple(shape)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "decode_sequences_and_context": [arguments.sequences, arguments.context]}
    results.update({name: measure(name, arguments.sweep) for name in arguments.shapes})
    label = re.sub(r"[^A-Za-z0-9]+", "-", results["device"]).strip("-").lower()
    output = arguments.output or RESULTS_DIRECTORY / f"paged-attention-{label}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
