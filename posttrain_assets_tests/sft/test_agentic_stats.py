"""Agentic statistics per source (posttrain_assets.sft.agentic_stats): tool use share, calls per turn, reasoning vs
answer tokens, computed over a DuckDB relation of SFT rows as gold.sft holds them."""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa

from posttrain_assets.sft.agentic_stats import (
    AgenticStats,
    agentic_stats,
    agentic_stats_with_overall,
    markdown_agentic_table,
)
from posttrain_assets.warehouse.catalogue import GOLD_SFT


def call(ident: str) -> dict[str, Any]:
    return {"id": ident, "type": "function", "function": {"name": "f", "arguments": "{}"}}


ROWS = [
    {  # two parallel calls, then an answer with reasoning; truncated before its last (untrained) turns
        "source": "agents",
        "num_messages": 5,
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [call("a"), call("b")]},
            {"role": "tool", "content": "1", "tool_call_id": "a"},
            {"role": "tool", "content": "2", "tool_call_id": "b"},
            {"role": "assistant", "content": "The answer is three.", "reasoning_content": "One plus two is three."},
            {"role": "user", "content": "again?"},
            {"role": "assistant", "content": "", "tool_calls": [call("c")]},
        ],
    },
    {
        "source": "agents",
        "num_messages": 2,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    },
    {
        "source": "chat",
        "num_messages": 4,
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ],
    },
]


def test_stats_per_source_and_overall(smollm2_tokenizer: Any) -> None:
    conn = duckdb.connect()
    conn.execute(
        f"CREATE TABLE sft (source VARCHAR, num_messages INTEGER, messages {GOLD_SFT.column('messages').type})"
    )
    conn.register("rows", pa.Table.from_pylist(ROWS))
    conn.execute("INSERT INTO sft SELECT source, num_messages, messages FROM rows")
    reasoning = len(smollm2_tokenizer("One plus two is three.", add_special_tokens=False)["input_ids"])
    answer = len(smollm2_tokenizer("The answer is three.", add_special_tokens=False)["input_ids"])
    stats = agentic_stats(conn, "sft", smollm2_tokenizer)
    assert stats == {
        "agents": AgenticStats(
            group="agents",
            rows=2,
            rows_with_tools=1,
            tools_share=0.5,
            tool_calls=2,  # the third call is past num_messages: not rendered, not counted
            assistant_turns=3,
            calls_per_turn_histogram={"0": 2, "2": 1},
            rows_with_reasoning=1,
            reasoning_tokens=reasoning,
            answer_tokens=answer,  # the calling turn's empty content adds nothing
            reasoning_share=round(reasoning / (reasoning + answer), 4),
        ),
        "chat": AgenticStats("chat", 1, 0, 0.0, 0, 2, {"0": 2}, 0, 0, 0, None),
    }
    (overall,) = agentic_stats(conn, "sft", None, group_by=None).values()
    assert (overall.group, overall.rows, overall.tool_calls, overall.calls_per_turn_histogram) == (
        "all",
        3,
        2,
        {"0": 4, "2": 1},
    )
    assert overall.reasoning_tokens == 0  # no tokenizer: no token counts
    table = markdown_agentic_table(stats)
    assert (
        "| agents | 2 | 1 (50.0%) | 2 | 0: 2, 2: 1 | 1 |" in table
        and "| chat | 1 | 0 (0.0%) | 0 | 0: 2 | 0 |  |" in table
    )


def test_groups_and_overall_in_one_pass_equal_the_two_calls(smollm2_tokenizer: Any) -> None:
    conn = duckdb.connect()
    conn.execute(
        f"CREATE TABLE sft (source VARCHAR, num_messages INTEGER, messages {GOLD_SFT.column('messages').type})"
    )
    conn.register("rows", pa.Table.from_pylist(ROWS))
    conn.execute("INSERT INTO sft SELECT source, num_messages, messages FROM rows")
    # a row of no source (a NULL group), eight parallel calls (the capped bucket) and reasoning in a second group
    many = [call(str(k)) for k in range(9)]
    conn.execute(
        "INSERT INTO sft SELECT NULL, 3, [{'role': 'user', 'content': 'x'}, "
        "{'role': 'assistant', 'content': 'y', 'tool_calls': $many, 'reasoning_content': 'Think first.'}, "
        "{'role': 'assistant', 'content': 'z'}]",
        {"many": many},
    )
    groups, overall = agentic_stats_with_overall(conn, "sft", smollm2_tokenizer)
    assert groups == agentic_stats(conn, "sft", smollm2_tokenizer)
    assert overall == agentic_stats(conn, "sft", smollm2_tokenizer, group_by=None)
    assert list(overall["all"].calls_per_turn_histogram) == ["0", "2", "8+"]
    assert overall["all"].reasoning_tokens > groups["agents"].reasoning_tokens > 0
    # one group; no row at all: no group and no overall
    one_group = "(SELECT * FROM sft WHERE source = $source)"
    _, chat = agentic_stats_with_overall(conn, one_group, smollm2_tokenizer, params={"source": "chat"})
    assert chat == {"all": AgenticStats("all", 1, 0, 0.0, 0, 2, {"0": 2}, 0, 0, 0, None)}
    assert agentic_stats_with_overall(conn, "(SELECT * FROM sft WHERE false)") == ({}, {})
