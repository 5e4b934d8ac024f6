"""Preference rows of silver.records -> audited pairs: response token counts, length difference, tie flag."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from posttrain_assets.audits import DEFAULT_TIE_SIMILARITY, is_tie
from posttrain_assets.token_counts import text_token_counts


def build_pairs(
    records: Sequence[dict[str, Any]], tok: Any, tie_similarity: float = DEFAULT_TIE_SIMILARITY
) -> list[dict[str, Any]]:
    """One audited pair per preference record (keys: the silver.preference_pairs columns)."""
    chosen = text_token_counts(tok, [r["chosen"] for r in records])
    rejected = text_token_counts(tok, [r["rejected"] for r in records])
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
