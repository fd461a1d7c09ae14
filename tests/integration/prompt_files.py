"""Prompt files for the integration tests: valid lines of every form, and broken lines at known places."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

BROKEN_LINES = {
    # line number → the text written there and what its error must mention
    13: ('{"prompt": "unterminated', "invalid JSON"),
    27: ("not json at all", "invalid JSON"),
    41: ('{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": ', "invalid JSON"),
    55: ('{"custom_id": "no-prompt"}', "exactly one of 'prompt' or 'messages'"),
    69: ('{"custom_id": "r-9", "method": "POST", "url": "/v1/completions", "body": {"max_tokens": 4}}', "body.prompt"),
    83: ('{"prompt": 12345}', "prompt"),
    97: ('{"prompt": "hi", "max_tokens": "four"}', "max_tokens"),
    111: ('{"custom_id": "r-5", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": "hello"}}',
          "body.messages"),
    125: ('{"custom_id": "dup-1", "prompt": "the same id again"}', "duplicate custom_id 'dup-1'"),
    139: ('{"custom_id": "dup-1", "prompt": "and once more"}', "duplicate custom_id 'dup-1'"),
}


@dataclass
class PromptFile:
    path: Path
    valid_custom_ids: dict[int, str] = field(default_factory=dict)  # line number → custom_id
    broken: dict[int, str] = field(default_factory=dict)  # line number → expected error fragment


def valid_line(line_no: int) -> tuple[str, str]:
    """Cycle through the four accepted forms; returns (json text, custom_id)."""
    form = line_no % 4
    if form == 0:
        return json.dumps({"prompt": f"Fact number {line_no}:", "max_tokens": 4}), str(line_no)
    if form == 1:
        document = {"custom_id": f"chat-{line_no}", "messages": [{"role": "user", "content": f"Hello {line_no}"}]}
        return json.dumps(document), f"chat-{line_no}"
    if form == 2:
        body = {"model": "tiny-deepseek-v3", "max_tokens": 3, "temperature": 0,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{line_no}?"}]}
        document = {"custom_id": f"r-{line_no}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        return json.dumps(document), f"r-{line_no}"
    body = {"model": "tiny-deepseek-v3", "prompt": f"Once upon a time {line_no}", "max_tokens": 2, "seed": line_no}
    document = {"custom_id": f"r-{line_no}", "method": "POST", "url": "/v1/completions", "body": body}
    return json.dumps(document), f"r-{line_no}"


def write_prompt_file(path: Path, total_lines: int = 200, broken: dict | None = None) -> PromptFile:
    broken = BROKEN_LINES if broken is None else broken
    prompt_file = PromptFile(path)
    with path.open("w") as stream:
        for line_no in range(1, total_lines + 1):
            if line_no in broken:
                text, expected = broken[line_no]
                prompt_file.broken[line_no] = expected
            elif line_no == 3:  # the first use of the id that lines 125 and 139 repeat
                text, prompt_file.valid_custom_ids[line_no] = json.dumps({"custom_id": "dup-1", "prompt": "x"}), "dup-1"
            else:
                text, prompt_file.valid_custom_ids[line_no] = valid_line(line_no)
            stream.write(text + "\n")
    return prompt_file
