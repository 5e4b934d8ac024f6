"""posttrain_assets.preference.pairs: a batch of preference records becomes audited pairs, as
silver_preference_pairs builds
them in worker processes."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from posttrain_assets.parallel import map_batches
from posttrain_assets.preference.pairs import PairJob, pair_batch
from posttrain_assets.warehouse.catalogue import PAIR_COLUMNS

RECORDS = [
    # chosen longer, both scores
    {"id": "p1", "chosen": "Paris is the capital of France.", "rejected": "Lyon.", "sc": 9.0, "sr": 7.5},
    # a tie: the same reply up to case and spacing; one score missing
    {"id": "p2", "chosen": "The answer is 42.", "rejected": "the answer  is 42.", "sc": 3.0, "sr": None},
    # rejected longer, no scores
    {"id": "p3", "chosen": "No.", "rejected": "Yes, and here is a much longer reply.", "sc": None, "sr": None},
]


def records_table() -> pa.Table:
    """The silver.records columns a pair carries, in silver.preference_pairs order."""
    rows = [
        {
            "id": r["id"],
            "source": "prefs",
            "source_kind": "human",
            "messages": [{"role": "user", "content": f"question {r['id']}"}],
            "prompt": f"question {r['id']}",
            "chosen": r["chosen"],
            "rejected": r["rejected"],
            "score_chosen": r["sc"],
            "score_rejected": r["sr"],
            "annotations": {"judge": "gpt-4", "chosen_model": None} if r["id"] == "p1" else None,
            "token_count": 10,
            "lang": "en",
            "license": "cc-by-4.0",
            "origin": {"file": "prefs.jsonl", "row": i},
            "created_at": None,
        }
        for i, r in enumerate(RECORDS)
    ]
    return pa.Table.from_pylist(rows)


def tokens(tok: Any, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_a_batch_of_records_becomes_pairs_with_counts_margins_and_ties(smollm2_tokenizer: Any) -> None:
    pairs = pair_batch(PairJob(smollm2_tokenizer), records_table())

    # every silver.preference_pairs column (inserted by name), the carried ones unchanged
    assert sorted(pairs.column_names) == sorted(c.name for c in PAIR_COLUMNS)
    assert pairs.select(records_table().column_names).to_pylist() == records_table().to_pylist()
    rows = pairs.to_pylist()
    assert [r["id"] for r in rows] == ["p1", "p2", "p3"]
    for row, record in zip(rows, RECORDS, strict=True):
        assert row["chosen_tokens"] == tokens(smollm2_tokenizer, record["chosen"])
        assert row["rejected_tokens"] == tokens(smollm2_tokenizer, record["rejected"])
        assert row["length_diff"] == row["chosen_tokens"] - row["rejected_tokens"]
    assert rows[0]["length_diff"] > 0 and rows[2]["length_diff"] < 0
    assert [r["score_margin"] for r in rows] == [1.5, None, None]  # only where both scores exist
    assert [r["is_tie"] for r in rows] == [False, True, False]


def test_the_tie_threshold_comes_from_the_job(smollm2_tokenizer: Any) -> None:
    # p2 differs from its twin only by case and spacing: a tie at any threshold; nothing else is one, even at 0.5
    loose = pair_batch(PairJob(smollm2_tokenizer, tie_similarity=0.5), records_table())
    assert loose.column("is_tie").to_pylist() == [False, True, False]
    # "yes it is" vs "yes it was": 8 of their 9 + 10 characters in common, a similarity of 16/19 = 0.84
    close = records_table()
    close = close.set_column(
        5, "chosen", pa.array(["Paris is the capital of France.", "The answer is 42.", "Yes it is"])
    )
    close = close.set_column(6, "rejected", pa.array(["Lyon.", "the answer  is 42.", "Yes it was"]))
    assert pair_batch(PairJob(smollm2_tokenizer, 0.8), close).column("is_tie").to_pylist() == [False, True, True]
    assert pair_batch(PairJob(smollm2_tokenizer, 0.85), close).column("is_tie").to_pylist() == [False, True, False]


def test_pairs_built_in_worker_processes_equal_those_built_here(smollm2_tokenizer: Any) -> None:
    batches = [records_table().slice(i, 1) for i in range(3)]
    job = PairJob(smollm2_tokenizer)
    here = list(map_batches(pair_batch, job, batches, processes=1))
    workers = list(map_batches(pair_batch, job, batches, processes=2))
    assert [b.to_pylist() for b in workers] == [b.to_pylist() for b in here]
    assert pa.concat_tables(here).to_pylist() == pair_batch(job, records_table()).to_pylist()
