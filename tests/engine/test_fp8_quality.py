"""A real model in FP8: SmolLM2-135M-Instruct (the packaged model) with `quantization="fp8"` still answers
simple questions right. Its logits' error against the unquantized model is measured by bench/fp8_logits.py
(README: FP8 weights); this checks the answers, which is what a user sees, at the cost of one load."""

from __future__ import annotations

from worker.engine.engine import LLMEngine
from worker.engine.layers.linear import Fp8Linear
from worker.engine.tokenizer import PromptEncoder
from worker.engine.types import EngineConfig, SamplingParams

# A few of tests/engine/test_gguf.py's questions, and the word each answer must hold.
QUESTIONS = {
    "What is the capital of France? Answer in one word.": "Paris",
    "What is the chemical symbol for gold?": "Au",
    "What is the opposite of hot? Answer in one word.": "cold",
    "What is the largest ocean on Earth?": "Pacific",
}


def test_smollm2_in_fp8_answers_simple_questions():
    engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", device="cpu", quantization="fp8", max_wait_ms=20))
    try:
        assert isinstance(engine.model.model.layers[0].self_attn.qkv_proj, Fp8Linear)
        encoder = PromptEncoder(engine.tokenizer)
        prompts = [encoder.encode_chat([{"role": "user", "content": question}]) for question in QUESTIONS]
        completions = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    finally:
        engine.shutdown()
    for (question, word), completion in zip(QUESTIONS.items(), completions):
        assert word in completion.text, f"{question!r} → {completion.text!r}"
