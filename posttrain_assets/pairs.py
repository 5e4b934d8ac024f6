"""Preference rows of silver.records -> audited pairs: response token counts, length difference, tie flag."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from posttrain_assets.audits import DEFAULT_TIE_SIMILARITY, is_tie

BATCH = 2048


def response_tokens(tok: Any, texts: Sequence[str]) -> list[int]:
    """Tokens of each response text alone (no chat template, no special tokens), in batches."""
    counts: list[int] = []
    for start in range(0, len(texts), BATCH):
        encoded = tok(list(texts[start : start + BATCH]), add_special_tokens=False)["input_ids"]
        counts.extend(len(ids) for ids in encoded)
    return counts


def build_pairs(
    records: Sequence[dict[str, Any]], tok: Any, tie_similarity: float = DEFAULT_TIE_SIMILARITY
) -> list[dict[str, Any]]:
    """One audited pair per preference record (keys: the silver.preference_pairs columns)."""
    chosen = response_tokens(tok, [r["chosen"] for r in records])
    rejected = response_tokens(tok, [r["rejected"] for r in records])
    pairs = []
    for record, c, r in zip(records, chosen, rejected, strict=True):
        scored = record["score_chosen"] is not None and record["score_rejected"] is not None
        pairs.append(
            {
                **record,
                "score_margin": record["score_chosen"] - record["score_rejected"] if scored else None,
                "chosen_tokens": c,
                "rejected_tokens": r,
                "length_diff": c - r,
                "is_tie": is_tie(record["chosen"], record["rejected"], tie_similarity),
            }
        )
    return pairs
