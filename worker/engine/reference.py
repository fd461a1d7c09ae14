"""A reference engine on transformers' `generate`, with simple dynamic batching.

It is the oracle the fast engine is tested against, not a worker engine: transformers cannot batch
continuously, and its paged cache cannot hold DeepSeek's MLA. (A worker can still run it, as any engine,
with `DEEPBATCH_ENGINE=worker.engine.reference:ReferenceEngine`.)
A background thread gathers requests for up to `max_wait_ms` (at most `max_batch_size`), groups
those with the same sampling parameters, and runs one left-padded `generate` per group with the KV cache.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from worker.engine.configs import builtin_config
from worker.engine.device import resolve_device, resolve_dtype
from worker.engine.loader import random_reference_model
from worker.engine.tokenizer import PromptEncoder, load_tokenizer
from worker.engine.types import (
    CPU_BATCH,
    Completion,
    EngineConfig,
    PromptTooLongError,
    SamplingParams,
    TransientEngineError,
)


def load_hf_model(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """A transformers model: random weights from `config.seed` for built-in names, else the checkpoint."""
    hf_config = builtin_config(config.model)
    if hf_config is None:
        hf_config = AutoConfig.from_pretrained(config.model)
        model = AutoModelForCausalLM.from_pretrained(config.model, config=hf_config, dtype=dtype)
    else:
        model = random_reference_model(hf_config, config.seed, device, dtype)
    return model.to(device=device, dtype=dtype).eval()


@dataclass
class _Pending:
    prompt_token_ids: list[int]
    sampling: SamplingParams
    future: Future = field(default_factory=Future)


class ReferenceEngine:
    """`submit()` from any thread; one background thread runs batched `generate` calls."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.model = load_hf_model(config, self.device, resolve_dtype(config.dtype, self.device))
        self.encoder = PromptEncoder(load_tokenizer(config.model))
        self.eos_token_id = self.encoder.tokenizer.eos_token_id
        self.pad_token_id = self.encoder.tokenizer.pad_token_id or self.eos_token_id
        self._inbox: queue.Queue[_Pending | None] = queue.Queue()
        self._last_batch_size = 0
        self._thread = threading.Thread(target=self._loop, name="reference-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Future:
        pending = _Pending(list(prompt_token_ids), sampling)
        if len(prompt_token_ids) + 1 > self.config.max_model_len:
            pending.future.set_exception(
                PromptTooLongError(
                    f"prompt has {len(prompt_token_ids)} tokens; max_model_len is {self.config.max_model_len}"
                )
            )
        else:
            self._inbox.put(pending)
        return pending.future

    def stats(self) -> dict[str, float]:
        """For the worker's metrics: the size of the latest batch (this engine has no paged KV cache)."""
        return {"batch_size": self._last_batch_size}

    def shutdown(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            batch = self._gather(first)
            self._last_batch_size = len(batch)
            for group in self._group_by_sampling(batch):
                self._run_group(group)

    def _gather(self, first: _Pending) -> list[_Pending]:
        batch = [first]
        deadline = time.monotonic() + self.config.max_wait_ms / 1000
        while len(batch) < (self.config.max_batch_size or CPU_BATCH):
            remaining = deadline - time.monotonic()
            try:
                item = self._inbox.get(timeout=max(remaining, 0)) if remaining > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._inbox.put(None)  # let the loop see the shutdown after this batch
                break
            batch.append(item)
        return batch

    @staticmethod
    def _group_by_sampling(batch: list[_Pending]) -> list[list[_Pending]]:
        groups: dict[SamplingParams, list[_Pending]] = {}
        for pending in batch:
            groups.setdefault(pending.sampling, []).append(pending)
        return list(groups.values())

    def _run_group(self, group: list[_Pending]) -> None:
        try:
            completions = self._generate(group)
        except torch.OutOfMemoryError as error:
            if len(group) > 1:  # smaller batches may fit: split and try each half
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                middle = len(group) // 2
                self._run_group(group[:middle])
                self._run_group(group[middle:])
                return
            group[0].future.set_exception(TransientEngineError(f"out of memory on a single request: {error}"))
        except Exception as error:  # noqa: BLE001 - reported on each request's future
            for pending in group:
                pending.future.set_exception(error)
        else:
            for pending, completion in zip(group, completions):
                pending.future.set_result(completion)

    @torch.inference_mode()
    def _generate(self, group: list[_Pending]) -> list[Completion]:
        sampling = group[0].sampling
        longest = max(len(p.prompt_token_ids) for p in group)
        input_ids = torch.full((len(group), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(group), longest), dtype=torch.long)
        for row, pending in enumerate(group):  # left padding, as decoder-only generation needs
            length = len(pending.prompt_token_ids)
            input_ids[row, longest - length :] = torch.tensor(pending.prompt_token_ids)
            attention_mask[row, longest - length :] = 1
        max_new_tokens = min(sampling.max_tokens, self.config.max_model_len - longest)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_p=sampling.top_p if not sampling.greedy else None,
            top_k=(sampling.top_k or None) if not sampling.greedy else None,
            eos_token_id=None if sampling.ignore_eos else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        generated = output[:, longest:].tolist()
        return [self._finish(pending, token_ids) for pending, token_ids in zip(group, generated)]

    def _finish(self, pending: _Pending, token_ids: list[int]) -> Completion:
        sampling = pending.sampling
        finish_reason = "length"
        if not sampling.ignore_eos and self.eos_token_id in token_ids:
            token_ids = token_ids[: token_ids.index(self.eos_token_id)]
            finish_reason = "stop"
        text = self.encoder.decode(token_ids)
        for stop in sampling.stop:
            cut = text.find(stop)
            if cut != -1:
                text, finish_reason = text[:cut], "stop"
        return Completion(
            token_ids=token_ids,
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=len(pending.prompt_token_ids),
        )
