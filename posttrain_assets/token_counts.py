"""Token counts for silver rows of every regime, with the project tokenizer's chat template.

What is counted: SFT, the whole conversation; preference, the prompt conversation
followed by the longer of the two responses (the sequence a trainer must fit);
RL, the prompt conversation with the generation prompt appended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BATCH = 1024


def conversation_to_count(record: dict[str, Any]) -> tuple[list[dict[str, str]], bool]:
    """The messages to render for ``record`` and whether to add the generation prompt."""
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if record["regime"] == "preference":
        longer = max(record["chosen"], record["rejected"], key=len)
        return [*messages, {"role": "assistant", "content": longer}], False
    return messages, record["regime"] == "rl"


def token_counts(tok: Any, records: Sequence[dict[str, Any]]) -> list[int | None]:
    """Tokens per record; None where the chat template refuses the conversation."""
    counts: list[int | None] = []
    for start in range(0, len(records), BATCH):
        texts: list[str | None] = []
        for record in records[start : start + BATCH]:
            messages, generation = conversation_to_count(record)
            try:
                texts.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation))
            except Exception:  # a template may raise for roles it does not support
                texts.append(None)
        encoded = tok([t or "" for t in texts], add_special_tokens=False)["input_ids"]
        counts.extend(len(ids) if text is not None else None for text, ids in zip(texts, encoded, strict=True))
    return counts
