"""Structured tool calls, tool results, reasoning and tool definitions: every source layout lands in one canonical
form (``posttrain_assets.records.tools``), plain rows stay exactly as they were, and the form survives DuckDB."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from posttrain_assets.records.formats import get_adapter
from posttrain_assets.records.normalize import Rejected, parse_payload
from posttrain_assets.records.schema import CanonicalRecord
from posttrain_assets.records.tools import normalise_arguments, template_messages, template_tools
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def parse(fmt: str, row: dict[str, Any]) -> CanonicalRecord:
    return get_adapter(fmt).parse(row, "sft")


def rejected(fmt: str, row: dict[str, Any]) -> Rejected:
    result = parse_payload(json.dumps(row), None, fmt, "sft")
    assert isinstance(result, Rejected), result
    return result


def call(ident: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}}


OPENAI_ROW = {
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Two cities: two calls.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "4 C"},
        {"role": "tool", "tool_call_id": "c2", "content": "21 C"},
        {"role": "assistant", "content": "Oslo 4 C, Rome 21 C.", "tool_calls": []},
    ],
}


def test_openai_messages_with_tools_are_canonical() -> None:
    rec = parse("messages", OPENAI_ROW)
    assert rec.messages == [
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Two cities: two calls.",
            # an object and a JSON string give the same text
            "tool_calls": [
                call("c1", "get_weather", '{"city": "Oslo"}'),
                call("c2", "get_weather", '{"city": "Rome"}'),
            ],
        },
        {"role": "tool", "content": "4 C", "tool_call_id": "c1", "name": "get_weather"},
        {"role": "tool", "content": "21 C", "tool_call_id": "c2"},
        {"role": "assistant", "content": "Oslo 4 C, Rome 21 C."},  # an empty tool_calls list is no calls
    ]
    assert rec.tools == [WEATHER_TOOL]
    assert rec.response == "Oslo 4 C, Rome 21 C."


def test_plain_rows_and_their_ids_are_unchanged() -> None:
    row = {"messages": [{"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "hello"}]}
    rec = parse("messages", row)
    assert rec.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert rec.tools is None
    payload = {"regime": "sft", "messages": rec.messages, "chosen": None, "rejected": None, "answer": None}
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    assert rec.content_id() == hashlib.sha256(text.encode()).hexdigest()[:32]
    with_tools = parse("messages", {**row, "tools": [WEATHER_TOOL]})
    assert with_tools.content_id() != rec.content_id()  # the declared tools are part of the content


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ({"a": 1, "b": [1, 2]}, '{"a": 1, "b": [1, 2]}'),
        ('{"a":1,"b":[1,2]}', '{"a": 1, "b": [1, 2]}'),
        ('"{\\"a\\": 1}"', '{"a": 1}'),  # double-encoded
        ("not json {", "not json {"),  # kept: the quality gate quarantines it
        (None, "{}"),
        ({"ville": "Zürich"}, '{"ville": "Zürich"}'),
    ],
)
def test_arguments_normalised_consistently(given: Any, stored: str) -> None:
    assert normalise_arguments(given) == stored


def test_legacy_function_call_and_reasoning_aliases() -> None:
    rec = parse(
        "messages",
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "function_call": {"name": "get_weather", "arguments": "{}"}},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "Sunny.", "thinking": "The tool said sunny."},
            ]
        },
    )
    assert rec.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [call("call_1_0", "get_weather", "{}")],
    }
    assert rec.messages[3] == {"role": "assistant", "content": "Sunny.", "reasoning_content": "The tool said sunny."}


GLAIVE_ROW = {
    "system": "You are a helpful assistant.",
    "tools": json.dumps([WEATHER_TOOL["function"]]),
    "conversations": [
        {"from": "human", "value": "Weather in Oslo and Rome?"},
        {
            "from": "function_call",
            "value": '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
            '{"name": "get_weather", "arguments": {"city": "Rome"}}]',
        },
        {"from": "observation", "value": "4 C"},
        {"from": "observation", "value": "21 C"},
        {"from": "gpt", "value": "Oslo 4 C, Rome 21 C."},
    ],
}


def test_sharegpt_llama_factory_tool_layout() -> None:
    rec = parse("sharegpt", GLAIVE_ROW)
    assert rec.messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                call("call_2_0", "get_weather", '{"city": "Oslo"}'),
                call("call_2_1", "get_weather", '{"city": "Rome"}'),
            ],
        },
        {"role": "tool", "content": "4 C", "tool_call_id": "call_2_0", "name": "get_weather"},
        {"role": "tool", "content": "21 C", "tool_call_id": "call_2_1", "name": "get_weather"},
        {"role": "assistant", "content": "Oslo 4 C, Rome 21 C."},
    ]
    assert rec.tools == [WEATHER_TOOL]  # bare definitions are wrapped


def test_sharegpt_call_joins_the_assistant_turn_before_it() -> None:
    rec = parse(
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "Oslo?"},
                {"from": "gpt", "value": "Let me check."},
                {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
                {"from": "observation", "value": "4 C"},
                {"from": "gpt", "value": "4 C."},
            ]
        },
    )
    assert [m["role"] for m in rec.messages] == ["user", "assistant", "tool", "assistant"]
    assert rec.messages[1] == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [call("call_1_0", "get_weather", '{"city": "Oslo"}')],
    }


HERMES_ROW = {
    "id": "h-1",
    "conversations": [
        {
            "from": "system",
            "value": "You are a function calling AI model. You are provided with function signatures within <tools> "
            "</tools> XML tags. <tools> " + json.dumps(WEATHER_TOOL) + " </tools> Use them.",
        },
        {"from": "human", "value": "Weather in Oslo?"},
        {
            "from": "gpt",
            # the Hermes data writes calls as Python dicts
            "value": "<tool_call>\n{'arguments': {'city': 'Oslo'}, 'name': 'get_weather'}\n</tool_call>",
        },
        {
            "from": "tool",
            "value": '<tool_response>\n{"name": "get_weather", "content": {"temp_c": 4}}\n</tool_response>',
        },
        {"from": "gpt", "value": "It is 4 C in Oslo."},
    ],
}


def test_hermes_blocks_become_structured() -> None:
    rec = parse("hermes", HERMES_ROW)
    assert rec.messages == [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call("call_1_0", "get_weather", '{"city": "Oslo"}')]},
        {"role": "tool", "content": '{"temp_c": 4}', "tool_call_id": "call_1_0", "name": "get_weather"},
        {"role": "assistant", "content": "It is 4 C in Oslo."},
    ]
    assert rec.tools == [WEATHER_TOOL]
    assert rec.extra == {"source_id": "h-1"}


def test_hermes_in_messages_layout_with_text_around_calls() -> None:
    rec = parse(
        "hermes",
        {
            "tools": [WEATHER_TOOL],
            "messages": [
                {"role": "user", "content": "Oslo?"},
                {
                    "role": "assistant",
                    "content": 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                    "</tool_call>",
                },
                {"role": "tool", "content": "<tool_response>\n4 C\n</tool_response>"},
                {"role": "assistant", "content": "4 C."},
            ],
        },
    )
    assert rec.messages[1] == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [call("call_1_0", "get_weather", '{"city": "Oslo"}')],
    }
    assert rec.messages[2] == {"role": "tool", "content": "4 C", "tool_call_id": "call_1_0", "name": "get_weather"}


@pytest.mark.parametrize(
    ("fmt", "row", "reason", "field"),
    [
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "weather(Oslo)"}]},
            "wrong_type",
            "conversations[1].value",
        ),
        (
            "messages",
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]},
                ]
            },
            "missing_field",
            "messages[1].tool_calls[0].function.name",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
            "missing_field",
            "messages[1].content",
        ),
        (
            "messages",
            {
                "tools": "{not json",
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            },
            "wrong_type",
            "tools",
        ),
        (
            "hermes",
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "<tool_call>call it</tool_call>"},
                ]
            },
            "wrong_type",
            "conversations[1].value",
        ),
    ],
)
def test_bad_structured_fields_are_named(fmt: str, row: dict[str, Any], reason: str, field: str) -> None:
    got = rejected(fmt, row)
    assert (got.reason, got.field) == (reason, field)


def test_template_messages_drop_nulls_and_parse_arguments() -> None:
    stored = [
        {"role": "user", "content": "q", "reasoning_content": None, "tool_calls": None, "tool_call_id": None},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": None,
            "tool_calls": [call("c1", "get_weather", '{"city": "Oslo"}')],
        },
        {"role": "assistant", "content": "", "tool_calls": [call("c2", "f", "not json")]},
    ]
    assert template_messages(stored) == [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
            ],
        },
        {"role": "assistant", "content": "", "tool_calls": [call("c2", "f", "not json")]},
    ]
    assert template_tools(json.dumps([WEATHER_TOOL])) == [WEATHER_TOOL]
    assert template_tools(None) is None


def test_structured_messages_round_trip_through_silver_records_type() -> None:
    """Plain and structured rows go into the messages column side by side (Arrow infers each batch's own struct;
    DuckDB fills the missing fields with null) and come back as what the chat template saw."""
    plain = parse("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    agentic = parse("messages", OPENAI_ROW)
    conn = duckdb.connect()
    column = SILVER_RECORDS.column("messages").type
    conn.execute(f"CREATE TABLE t (n INTEGER, messages {column})")
    for n, rec in enumerate((plain, agentic)):
        batch = pa.Table.from_pylist([{"n": n, "messages": rec.messages}])
        conn.register("batch", batch)
        conn.execute("INSERT INTO t SELECT n, messages FROM batch")
        conn.unregister("batch")
    back = [row[0] for row in conn.execute("SELECT messages FROM t ORDER BY n").fetchall()]
    assert back[0][0] == {
        "role": "user",
        "content": "hi",
        "reasoning_content": None,
        "tool_calls": None,
        "tool_call_id": None,
        "name": None,
    }
    assert template_messages(back[0]) == plain.messages
    assert template_messages(back[1]) == template_messages(agentic.messages)
    assert back[1][1]["tool_calls"][1]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
