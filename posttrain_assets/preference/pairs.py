"""Preference rows of silver.records -> audited pairs: response token counts, length difference, tie flag."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from posttrain_assets.sft.token_counts import text_token_counts
from posttrain_assets.text import DEFAULT_TIE_SIMILARITY, is_tie


@dataclass(frozen=True)
class PairJob:
    """What every batch of pairs needs: the tokenizer that counts response tokens and the tie threshold."""

    tokenizer: Any
    tie_similarity: float = DEFAULT_TIE_SIMILARITY


def pair_measures(job: PairJob, records: pa.Table) -> pa.Table:
    """The per-row part of a pair, read from the ``id``, ``chosen`` and ``rejected`` columns of ``records`` only: a
    table of ``id``, ``chosen_tokens``, ``rejected_tokens`` and ``is_tie``, one row per record, in order.

    The record id is a hash of content that includes both responses, so these depend only on the id and ``job``:
    :mod:`posttrain_assets.preference.pairs_stage` computes them once per id and keeps them. Only the two
    response columns become Python strings (to count and compare them).
    """
    chosen_texts = records.column("chosen").to_pylist()
    rejected_texts = records.column("rejected").to_pylist()
    chosen = pa.array(text_token_counts(job.tokenizer, chosen_texts), pa.int32())
    rejected = pa.array(text_token_counts(job.tokenizer, rejected_texts), pa.int32())
    ties = [is_tie(c, r, job.tie_similarity) for c, r in zip(chosen_texts, rejected_texts, strict=True)]
    return pa.table(
        {
            "id": records.column("id"),
            "chosen_tokens": chosen,
            "rejected_tokens": rejected,
            "is_tie": pa.array(ties, pa.bool_()),
        }
    )


def pair_batch(job: PairJob, records: pa.Table) -> pa.Table:
    """One audited pair per preference record, in order: the record's columns plus ``score_margin``,
    ``chosen_tokens``, ``rejected_tokens``, ``length_diff`` and ``is_tie`` (the silver.preference_pairs columns).

    The definition of a pair in one place: :mod:`posttrain_assets.preference.pairs_stage` builds the same rows from
    cached :func:`pair_measures` and the current record (its tests compare the two). Arrow in, Arrow out, so a
    batch travels to a worker process and back (parallel.map_batches) without a Python object per field.
    """
    measures = pair_measures(job, records)
    chosen, rejected = measures.column("chosen_tokens"), measures.column("rejected_tokens")
    return (
        records.append_column(
            "score_margin",
            # null unless both scores exist (subtract propagates nulls)
            pc.subtract(records.column("score_chosen"), records.column("score_rejected")),
        )
        .append_column("chosen_tokens", chosen)
        .append_column("rejected_tokens", rejected)
        .append_column("length_diff", pc.subtract(chosen, rejected))
        .append_column("is_tie", measures.column("is_tie"))
    )
