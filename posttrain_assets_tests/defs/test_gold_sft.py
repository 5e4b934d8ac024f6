"""gold.sft's asset helpers (posttrain_assets.defs.gold.sft): its agentic statistics load the tokenizer only when a
row has reasoning to count."""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa
import pytest

from posttrain_assets.defs.gold.sft import agentic_stats_loading_the_tokenizer_if_needed
from posttrain_assets.sft.agentic_stats import agentic_stats_with_overall
from posttrain_assets.warehouse.catalogue import GOLD_SFT


class CountingTokenizer:
    """A TokenizerResource stand-in that counts its loads (``tokenizer`` None: a load fails the test)."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self.loads = 0

    def get(self) -> Any:
        self.loads += 1
        assert self.tokenizer is not None, "the tokenizer was loaded though no row has reasoning"
        return self.tokenizer


def sft_rows(reasoning: str | None) -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect()
    conn.execute(
        f"CREATE TABLE sft (source VARCHAR, num_messages INTEGER, messages {GOLD_SFT.column('messages').type})"
    )
    rows = [
        {
            "source": "a",
            "num_messages": 2,
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "The answer is three.", "reasoning_content": reasoning},
            ],
        },
        {
            "source": "b",
            "num_messages": 2,
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        },
    ]
    conn.register("rows", pa.Table.from_pylist(rows))
    conn.execute("INSERT INTO sft SELECT source, num_messages, messages FROM rows")
    return conn


@pytest.mark.parametrize("reasoning", [None, ""])  # no reasoning, or an empty one (not counted as reasoning)
def test_agentic_stats_without_reasoning_rows_do_not_load_the_tokenizer(reasoning, smollm2_tokenizer):
    conn = sft_rows(reasoning)
    tokenizer = CountingTokenizer()
    stats = agentic_stats_loading_the_tokenizer_if_needed(conn, "sft", tokenizer)
    assert tokenizer.loads == 0
    assert stats == agentic_stats_with_overall(conn, "sft", smollm2_tokenizer)  # the same figures as with it
    assert stats[1]["all"].rows == 2 and stats[1]["all"].answer_tokens == 0


def test_agentic_stats_with_reasoning_rows_count_their_tokens_with_the_tokenizer(smollm2_tokenizer):
    conn = sft_rows("One plus two is three.")
    tokenizer = CountingTokenizer(smollm2_tokenizer)
    stats = agentic_stats_loading_the_tokenizer_if_needed(conn, "sft", tokenizer)
    assert tokenizer.loads == 1
    assert stats == agentic_stats_with_overall(conn, "sft", smollm2_tokenizer)
    expected = len(smollm2_tokenizer("One plus two is three.", add_special_tokens=False)["input_ids"])
    assert stats[0]["a"].rows_with_reasoning == 1 and stats[0]["a"].reasoning_tokens == expected > 0
