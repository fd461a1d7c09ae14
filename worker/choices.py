"""A request's several choices (OpenAI's `n`): submitted together so the engine prefills the prompt once, and
gathered back into one outcome for the request.

The engine's `submit_choices` shares the prompt's prefill among the choices (worker/engine/engine.py); an
engine plugged in by DEEPBATCH_ENGINE that has none gets one `submit` per choice, each with its own
SamplingParams (its own seed), which is correct, only without the sharing. A request succeeds when every
choice has; the first choice that fails fails the request, and the others are cancelled (the engine drops
a cancelled sequence at its next token).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from worker.engine.types import Completion, SamplingParams

OnChoices = Callable[[list[Completion] | None, BaseException | None], None]


def submit_choices(engine: Any, prompt_token_ids: list[int], samplings: Sequence[SamplingParams]) -> list[Future]:
    submit = getattr(engine, "submit_choices", None)
    if submit is not None:
        return list(submit(prompt_token_ids, samplings))
    return [engine.submit(prompt_token_ids, sampling) for sampling in samplings]


def gather_choices(futures: list[Future], on_choices: OnChoices) -> None:
    """Calls `on_choices(completions, None)` once every future has a completion, or `on_choices(None, error)`
    once, at the first that fails; from the thread that resolves the last (or failing) future."""
    results: list[Completion | None] = [None] * len(futures)
    state = {"left": len(futures), "over": False}
    lock = threading.Lock()

    def done(index: int, future: Future) -> None:
        try:
            completion, error = future.result(), None
        except BaseException as failure:  # noqa: BLE001 - a cancelled one raises CancelledError
            completion, error = None, failure
        with lock:  # whoever ends it (the last choice, or the first failure) is decided here, once
            if state["over"]:
                return
            if error is None:
                results[index] = completion
                state["left"] -= 1
                state["over"] = state["left"] == 0
            else:
                state["over"] = True
            ends_it = state["over"]
        if error is not None:
            for other in futures:
                other.cancel()
            on_choices(None, error)
        elif ends_it:
            on_choices([result for result in results if result is not None], None)

    for index, future in enumerate(futures):
        future.add_done_callback(lambda future, index=index: done(index, future))
