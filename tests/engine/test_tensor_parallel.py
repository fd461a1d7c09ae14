"""Tensor and expert parallelism on the CPU (on any machine): two ranks (two processes over gloo) compute what
one does.

Each architecture runs the same requests on an engine of one rank and one of two, in float32, where a
sum taken in another order (the all-reduce of two partial products) moves a logit by ~1e-6 of its size:
far less than the gap between the best two tokens, so the greedy tokens must agree exactly, and the
logits within a tolerance set a few times above that rounding. A seeded sampled request shows that
sampling on rank 0 alone draws the same tokens. Then the failure case: a rank killed mid-generation
ends the engine within seconds, with an error that names it, and the worker's engine (`build_engine`)
ends its process.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest
import torch

from tests.engine.helpers import ARCHITECTURES, random_prompts
from worker.engine.block_manager import PrefixMatch
from worker.engine import engine as engine_module
from worker.engine.engine import FATAL_EXIT_CODE, LLMEngine
from worker.engine.loader import load_model
from worker.engine.models.qwen2 import kv_heads_of_rank
from worker.engine.parallel import RankFailedError, Shard, TensorParallelError
from worker.engine.scheduler import ScheduledSequence
from worker.engine.sequence import Sequence
from worker.engine.types import EngineConfig, SamplingParams

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
PROMPT_LENGTHS = [3, 21, 9, 17]


def prefill_logits(engine: LLMEngine, prompt_token_ids: list[int]) -> torch.Tensor:
    """The next-token logits after a prompt, through the engine's runner (every rank takes part). The test
    thread borrows the block manager while the engine is idle between generates."""
    sequence = Sequence(prompt_token_ids, SamplingParams())
    engine.block_manager.admit(sequence, PrefixMatch(), len(prompt_token_ids))
    try:
        _, logits = engine.runner.step_logits([ScheduledSequence(sequence, len(prompt_token_ids))])
    finally:
        engine.block_manager.free(sequence)
    return logits[0]


def tokens_and_logits(engine: LLMEngine, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    samplings = [GREEDY] * (len(prompts) - 1) + [SEEDED]
    tokens = [completion.token_ids for completion in engine.generate(prompts, samplings)]
    return tokens, prefill_logits(engine, prompts[1])


@pytest.mark.parametrize("model_name", ARCHITECTURES)
def test_two_ranks_match_one(make_engine, model_name):
    prompts = random_prompts(PROMPT_LENGTHS, seed=8)
    one_rank = make_engine(model=model_name, device="cpu")
    expected_tokens, expected_logits = tokens_and_logits(one_rank, prompts)
    two_ranks = make_engine(model=model_name, device="cpu", tensor_parallel_size=2)
    assert two_ranks.runner.ranks.shard.size == 2 and two_ranks.model.shard.rank == 0
    tokens, logits = tokens_and_logits(two_ranks, prompts)
    assert tokens == expected_tokens
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["_torch_forward", "_fused_forward"])
def test_the_ranks_expert_shares_add_up_to_the_whole_layer(path):
    """Each rank computes only the pairs routed to its experts (the others marked as another rank's, weight
    zero), by the torch ops and by the GPU kernels (here under Triton's interpreter), with shapes that do
    not depend on the routing as a CUDA graph needs. No collective is called: the shares are added here."""
    cpu = torch.device("cpu")
    whole = load_model("tiny-deepseek-v3", 0, cpu, torch.float32)[0].model.layers[1].mlp
    hidden = torch.randn(6, whole.gate.weight.shape[1], generator=torch.Generator().manual_seed(3))
    weights, expert_ids = whole.gate(hidden)
    expected = whole.experts(hidden, expert_ids, weights)
    shares = torch.zeros_like(hidden)
    for rank in range(2):
        part = load_model("tiny-deepseek-v3", 0, cpu, torch.float32, Shard(rank, 2))[0].model.layers[1].mlp
        local_ids, local_weights = part._this_ranks_pairs(expert_ids, weights)
        assert local_ids.shape == expert_ids.shape and int(local_ids.max()) <= part.num_local_experts
        shares += getattr(part.experts, path)(hidden, local_ids, local_weights)
    torch.testing.assert_close(shares, expected, rtol=1e-5, atol=1e-6)


def test_fewer_key_value_heads_than_ranks_are_replicated():
    """tiny-qwen2 has 4 query heads reading 2 KV heads: over 4 ranks each rank keeps the one KV head its
    query head reads, cut from the checkpoint's k/v rows (no processes: loading needs no collective)."""
    assert [kv_heads_of_rank(2, Shard(rank, 4)) for rank in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    cpu = torch.device("cpu")
    whole = load_model("tiny-qwen2", 0, cpu, torch.float32)[0].model.layers[0].self_attn
    last = load_model("tiny-qwen2", 0, cpu, torch.float32, Shard(3, 4))[0].model.layers[0].self_attn
    head_dim, query_rows = whole.head_dim, whole.num_heads * whole.head_dim
    whole_key_rows = whole.qkv_proj.weight[query_rows : query_rows + whole.num_kv_heads * head_dim]
    last_key_rows = last.qkv_proj.weight[head_dim : 2 * head_dim]  # after its one query head
    torch.testing.assert_close(last_key_rows, whole_key_rows[head_dim:])  # KV head 1
    torch.testing.assert_close(last.qkv_proj.weight[:head_dim], whole.qkv_proj.weight[3 * head_dim : query_rows])
    with pytest.raises(TensorParallelError, match="neither a divisor nor a multiple of the model's 2 key/value"):
        kv_heads_of_rank(2, Shard(0, 3))


def test_a_model_that_does_not_split_is_refused_by_name(tokenizer):
    with pytest.raises(TensorParallelError, match="tensor_parallel_size=3 does not divide the model's 4 attention"):
        LLMEngine(EngineConfig(model="tiny-qwen2", device="cpu", tensor_parallel_size=3), tokenizer=tokenizer)


def test_a_killed_rank_ends_the_engine_naming_it_and_the_worker_exits(monkeypatch, capfd):
    """The engine the worker builds (build_engine): a SIGKILLed rank fails every request with an error naming
    it within seconds, and the process is ended (os._exit, recorded here instead) with code 70."""
    exit_codes: list[int] = []
    monkeypatch.setattr(engine_module.os, "_exit", exit_codes.append)
    engine = engine_module.build_engine(
        EngineConfig(model="tiny-deepseek-v3", device="cpu", tensor_parallel_size=2, max_wait_ms=1))
    try:
        futures = [engine.submit(prompt, SamplingParams(max_tokens=3000, ignore_eos=True))
                   for prompt in random_prompts([5, 8])]
        while engine.stats()["batch_size"] == 0:  # generating
            time.sleep(0.01)
        rank_1 = engine.runner.ranks.processes[0]
        killed_at = time.monotonic()
        os.kill(rank_1.pid, signal.SIGKILL)
        named = rf"rank 1 \(pid {rank_1.pid}\) died \(killed by SIGKILL\)"
        for future in futures:
            with pytest.raises(RankFailedError, match=named):
                future.result(timeout=10)
        assert time.monotonic() - killed_at < 30  # a hang would last the collectives' timeout, 5 minutes
        assert exit_codes == [FATAL_EXIT_CODE]
        assert re.search(rf"error: the engine cannot go on, the worker exits: tensor-parallel {named}",
                         capfd.readouterr().err)
        with pytest.raises(RankFailedError, match="rank 1"):
            engine.submit([5, 6], GREEDY).result(timeout=5)
    finally:
        engine.shutdown()


def test_leaving_nccl_groups_never_waits_longer_than_asked(monkeypatch, caplog):
    """An NCCL abort that never returns (as on two H200s once the peers had gone) costs its wait, not a hang."""
    import torch.distributed as dist

    from worker.engine import parallel

    never = threading.Event()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *arguments: "nccl")
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", never.wait)
    started = time.monotonic()
    parallel.leave_process_groups(wait_seconds=0.2)
    assert time.monotonic() - started < 5
    assert "did not return" in caplog.text
    never.set()
