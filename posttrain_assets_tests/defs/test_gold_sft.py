"""gold.sft's statistics kept per row (posttrain_assets.sft.row_stats, written by the gold.sft asset): after each
sync their aggregates equal turn depth and agentic statistics computed over the whole table, only the rows the sync
inserted are read, the tokenizer is loaded only when one of those has reasoning to count, and sft_turn_depth_check
reads them while they cover the table."""

from __future__ import annotations

import dataclasses
from typing import Any

import duckdb
import pytest

from posttrain_assets.defs.checks.turn_depth import gold_sft_turn_depth
from posttrain_assets.sft.agentic_stats import agentic_stats
from posttrain_assets.sft.row_stats import row_stats_table, stats_from_rows, update_row_stats
from posttrain_assets.sft.turn_depth import turn_depth_with_overall
from posttrain_assets.warehouse.catalogue import GOLD_SFT
from posttrain_assets.warehouse.io import replace_table, sync_table, transaction
from posttrain_assets.warehouse.model import Table

# gold.sft's columns that the statistics read, with gold.sft's types
SFT = Table(
    "main",
    "sft",
    "SFT rows as gold.sft holds them",
    tuple(GOLD_SFT.column(name) for name in ("id", "source", "messages", "labels", "num_messages")),
)
SOURCE = dataclasses.replace(SFT, name="sft_source")
M = -100


class CountingTokenizer:
    """A TokenizerResource's ``get`` that counts its loads (``tokenizer`` None: a load fails the test)."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self.loads = 0

    def get(self) -> Any:
        self.loads += 1
        assert self.tokenizer is not None, "the tokenizer was loaded though no new row has reasoning"
        return self.tokenizer


def call(ident: str) -> dict[str, Any]:
    return {"id": ident, "type": "function", "function": {"name": "f", "arguments": "{}"}}


def chat(id_: str, source: str, turns: int, reasoning: str | None = None, calls: int = 0) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    for n in range(turns):
        messages.append({"role": "user", "content": f"q{n}"})
        assistant: dict[str, Any] = {"role": "assistant", "content": f"answer {n} of {id_}"}
        if reasoning is not None and n == 0:
            assistant["reasoning_content"] = reasoning
        if calls and n == 0:
            assistant["tool_calls"] = [call(f"c{k}") for k in range(calls)]
        messages.append(assistant)
    labels = [x for n in range(turns) for x in (M, M, n + 1, n + 2)]
    return {"id": id_, "source": source, "messages": messages, "labels": labels, "num_messages": 2 * turns}


def sync(conn: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]], tokenizer: CountingTokenizer) -> int:
    """Sync main.sft to ``rows`` and update its row statistics in one transaction, as the gold.sft asset does."""
    replace_table(conn, SOURCE, rows)
    with transaction(conn):
        sync_table(conn, SFT, f"SELECT * FROM {SOURCE.qualified}", "id", 100)
        return update_row_stats(conn, SFT, tokenizer.get)


def whole_table(conn: duckdb.DuckDBPyConnection, tokenizer: Any) -> tuple[Any, Any]:
    return turn_depth_with_overall(conn, SFT.qualified), agentic_stats(conn, SFT.qualified, tokenizer)


def test_row_stats_aggregate_to_the_whole_tables_figures_through_syncs(smollm2_tokenizer: Any) -> None:
    conn = duckdb.connect()
    rows = [
        chat("a1", "a", 1),
        chat("a2", "a", 3, calls=2),
        chat("b1", "b", 2, reasoning="One plus two is three."),
        chat("b2", "b", 9),  # the "8+" bucket
    ]
    tokenizer = CountingTokenizer(smollm2_tokenizer)
    assert sync(conn, rows, tokenizer) == 4
    assert tokenizer.loads == 1  # b1 has reasoning
    assert stats_from_rows(conn, SFT) == whole_table(conn, smollm2_tokenizer)
    depth, agentic = stats_from_rows(conn, SFT)
    assert depth[0]["a"].rows == 2 and depth[0]["a"].turns_histogram == {"1": 1, "3": 1}
    assert agentic["a"].tool_calls == 2 and agentic["b"].reasoning_tokens > 0

    # nothing changed: nothing computed
    assert sync(conn, rows, CountingTokenizer()) == 0
    # a1 gone, a2 changed, c1 new (no reasoning: the tokenizer stays unloaded, b1's tokens are kept)
    changed = [chat("a2", "a", 4, calls=9), rows[2], rows[3], chat("c1", "c", 2)]
    assert sync(conn, changed, CountingTokenizer()) == 2
    assert stats_from_rows(conn, SFT) == whole_table(conn, smollm2_tokenizer)
    kept = conn.execute(f"SELECT sync_key FROM {row_stats_table(SFT).qualified} ORDER BY ALL").fetchall()
    assert kept == [("a2",), ("b1",), ("b2",), ("c1",)]
    assert stats_from_rows(conn, SFT)[1]["a"].calls_per_turn_histogram == {"0": 3, "8+": 1}


@pytest.mark.parametrize("reasoning", [None, ""])  # no reasoning, or an empty one (not counted as reasoning)
def test_row_stats_without_reasoning_rows_do_not_load_the_tokenizer(reasoning: str | None) -> None:
    conn = duckdb.connect()
    tokenizer = CountingTokenizer()
    assert sync(conn, [chat("a1", "a", 2, reasoning=reasoning), chat("b1", "b", 1)], tokenizer) == 2
    assert tokenizer.loads == 0
    _, agentic = stats_from_rows(conn, SFT)
    assert stats_from_rows(conn, SFT) == whole_table(conn, None)
    assert agentic["a"].rows_with_reasoning == 0 and agentic["a"].answer_tokens == 0


def test_an_empty_table_has_no_figures() -> None:
    conn = duckdb.connect()
    assert sync(conn, [], CountingTokenizer()) == 0
    assert stats_from_rows(conn, SFT) == (({}, {}), {})


def test_the_turn_depth_check_reads_the_row_stats_while_they_cover_the_table() -> None:
    conn = duckdb.connect()
    conn.execute("CREATE SCHEMA gold")
    gold = dataclasses.replace(SFT, schema="gold")
    assert row_stats_table(gold).qualified == row_stats_table(GOLD_SFT).qualified
    rows = [chat("a1", "a", 1), chat("a2", "a", 3), chat("b1", "b", 2)]
    replace_table(conn, gold, rows)
    # no statistics stored yet: the table itself
    assert gold_sft_turn_depth(conn) == turn_depth_with_overall(conn, gold.qualified)
    with transaction(conn):
        sync_table(conn, gold, f"SELECT * FROM {gold.qualified}", "id", 100)
        assert update_row_stats(conn, gold, CountingTokenizer().get) == 3
    # the statistics: the table's figures; a statistic changed on purpose shows which of the two was read
    conn.execute(f"UPDATE {row_stats_table(gold).qualified} SET turns = 5 WHERE sync_key = 'a1'")
    by_source, overall = gold_sft_turn_depth(conn)
    assert by_source["a"].turns_histogram == {"3": 1, "5": 1} and overall["all"].multi_turn_rows == 3
    # a row deleted behind the statistics' back: they no longer cover the table, which is read instead
    conn.execute(f"DELETE FROM {gold.qualified} WHERE id = 'b1'")
    assert gold_sft_turn_depth(conn) == turn_depth_with_overall(conn, gold.qualified)
    assert gold_sft_turn_depth(conn)[1]["all"].rows == 2
