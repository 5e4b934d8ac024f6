"""Token counts for silver rows of every regime, with the project tokenizer's chat template.

What is counted: SFT, the whole conversation; preference, the prompt conversation
followed by the longer of the two responses (the sequence a trainer must fit);
RL, the prompt conversation with the generation prompt appended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from posttrain_assets.sft.masking import TemplateRaised, template_renderings

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
    texts: list[str | None] = [None] * len(records)
    by_generation: dict[bool, list[tuple[int, list[dict[str, str]]]]] = {False: [], True: []}
    for i, record in enumerate(records):
        messages, generation = conversation_to_count(record)
        by_generation[generation].append((i, messages))
    # One batched render per generation flag (transformers' per-call overhead was a seventh of the gate's time on
    # preference rows); a conversation the template refuses is rendered on its own and counted as None.
    for generation, rows in by_generation.items():
        rendered = template_renderings(tok, [m for _, m in rows], add_generation_prompt=generation)
        for (i, _), text in zip(rows, rendered, strict=True):
            texts[i] = None if isinstance(text, TemplateRaised) else text
    counts = text_token_counts(tok, [t or "" for t in texts])
    return [n if text is not None else None for text, n in zip(texts, counts, strict=True)]
