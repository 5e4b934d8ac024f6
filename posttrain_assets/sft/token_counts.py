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


def text_token_counts(tok: Any, texts: Sequence[str]) -> list[int]:
    """Tokens of each text as it is (no chat template, no special tokens), one tokenizer call per batch.

    A fast tokenizer is asked through its Rust backend (``encode_batch_fast``: no offsets, and the ids stay
    in Rust), so counting a batch never builds a Python int per token; other tokenizers are called directly.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    counts: list[int] = []
    for start in range(0, len(texts), BATCH):
        batch = list(texts[start : start + BATCH])
        if backend is not None:
            counts.extend(len(e) for e in backend.encode_batch_fast(batch, add_special_tokens=False))
        else:
            counts.extend(len(ids) for ids in tok(batch, add_special_tokens=False)["input_ids"])
    return counts


def token_counts(tok: Any, records: Sequence[dict[str, Any]]) -> list[int | None]:
    """Tokens per record; None where the chat template refuses the conversation."""
    texts: list[str | None] = []
    for record in records:
        messages, generation = conversation_to_count(record)
        try:
            texts.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation))
        except Exception:  # a template may raise for roles it does not support
            texts.append(None)
    counts = text_token_counts(tok, [t or "" for t in texts])
    return [n if text is not None else None for text, n in zip(texts, counts, strict=True)]
