"""The quality gate on agentic rows: tool-call arguments, declared tools and their JSON Schemas, calls answered by
their results, orphan results and the parallel-call cap, each with its reason and a detail naming the call."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from posttrain_assets.cleaning import quality
from posttrain_assets.cleaning.quality import Drop, QualityConfig, apply_quality_gate
from posttrain_assets.records.formats import get_adapter
from posttrain_assets.records.tools import tools_json

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time"}}  # no parameters: any object


def agentic_row(rid: str = "ok", **changes: Any) -> dict[str, Any]:
    """A silver row as the gate sees it, from the messages adapter: two parallel calls, their results, an answer."""
    row = {
        "tools": [WEATHER, CLOCK],
        "messages": [
            {"role": "system", "content": "You can look up the weather."},
            {"role": "user", "content": "What is the weather like in Oslo and Rome right now, in Celsius please?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "a", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}},
                    {"id": "b", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "4 degrees and cloudy"},
            {"role": "tool", "tool_call_id": "b", "content": "21 degrees and sunny"},
            {"role": "assistant", "content": "Oslo has four degrees with clouds; Rome is sunny at twenty-one degrees."},
        ],
    }
    record = get_adapter("messages").parse(row, "sft")
    out = {
        "id": rid,
        "source": "s",
        "regime": "sft",
        "messages": record.messages,
        "tools": tools_json(record.tools),
        "license": "MIT",
    }
    for key, value in changes.items():
        out[key] = value
    return out


def with_call(rid: str, index: int, **function: Any) -> dict[str, Any]:
    row = agentic_row(rid)
    row["messages"] = copy.deepcopy(row["messages"])
    row["messages"][2]["tool_calls"][index]["function"].update(function)
    return row


def messages_of(rid: str, edit: Any) -> dict[str, Any]:
    row = agentic_row(rid)
    row["messages"] = edit(copy.deepcopy(row["messages"]))
    return row


CASES = [
    (
        with_call("not_json", 1, arguments='{"city": Rome}'),
        "tool_arguments_not_json",
        "messages[2].tool_calls[1] arguments are not JSON (Expecting value: line 1 column 10 (char 9)): "
        "'{\"city\": Rome}'",
    ),
    (
        with_call("not_object", 0, arguments='["Oslo"]'),
        "tool_arguments_not_json",
        "messages[2].tool_calls[0] arguments are not a JSON object: '[\"Oslo\"]'",
    ),
    (
        with_call("undeclared", 1, name="get_forecast"),
        "undeclared_tool",
        "messages[2].tool_calls[1] calls 'get_forecast', not one of the declared tools (get_weather, now)",
    ),
    (
        agentic_row("no_tools", tools=None),
        "undeclared_tool",
        "messages[2].tool_calls[0] calls 'get_weather', but the conversation declares no tools",
    ),
    (
        with_call("missing_required", 1, arguments='{"unit": "c"}'),
        "tool_arguments_invalid",
        "messages[2].tool_calls[1] (get_weather): arguments: 'city' is a required property",
    ),
    (
        with_call("wrong_enum", 0, arguments='{"city": "Oslo", "unit": "kelvin"}'),
        "tool_arguments_invalid",
        "messages[2].tool_calls[0] (get_weather): unit: 'kelvin' is not one of ['c', 'f']",
    ),
    (
        with_call("extra_property", 0, arguments='{"city": "Oslo", "days": 3}'),
        "tool_arguments_invalid",
        "messages[2].tool_calls[0] (get_weather): arguments: Additional properties are not allowed "
        "('days' was unexpected)",
    ),
    (
        agentic_row(
            "bad_schema",
            tools=json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": 7}}}]),
        ),
        "invalid_tool_schema",
        "messages[2].tool_calls[0] (get_weather): the tool's parameters are not a valid JSON Schema: 7 is not valid "
        "under any of the given schemas",
    ),
    (
        messages_of("unanswered", lambda m: [*m[:4], m[5]]),
        "tool_call_unanswered",
        "messages[2].tool_calls[1] (id 'b') has no tool result before messages[4]",
    ),
    (
        messages_of("orphan", lambda m: [*m[:5], {"role": "tool", "tool_call_id": "c", "content": "late"}, m[5]]),
        "orphan_tool_result",
        "messages[5] (tool_call_id 'c') answers no pending tool call",
    ),
    (
        messages_of("wrong_id", lambda m: [*m[:3], {**m[3], "tool_call_id": "zz"}, *m[4:]]),
        "orphan_tool_result",
        "messages[3] (tool_call_id 'zz') answers no pending tool call",
    ),
]


@pytest.mark.parametrize(("row", "reason", "detail"), CASES, ids=[c[0]["id"] for c in CASES])
def test_each_tool_fault_is_dropped_with_its_reason(row: dict[str, Any], reason: str, detail: str) -> None:
    kept, dropped = apply_quality_gate([agentic_row(), row])
    assert [r["id"] for r in kept] == ["ok"]
    assert dropped == [{"id": row["id"], "source": "s", "reason": reason, "detail": detail}]
    assert reason in quality.QUALITY_REASONS


def test_parallel_call_cap_is_configurable() -> None:
    row = agentic_row()
    assert quality.tool_call_invalid(row, QualityConfig(max_parallel_tool_calls=2)) is None
    assert quality.tool_call_invalid(row, QualityConfig(max_parallel_tool_calls=1)) == Drop(
        "too_many_parallel_calls", "messages[2] makes 2 tool calls, over max_parallel_tool_calls 1"
    )


def test_undeclared_tools_pass_when_not_required_but_arguments_are_still_checked() -> None:
    cfg = QualityConfig(require_declared_tools=False)
    assert quality.tool_call_invalid(agentic_row(tools=None), cfg) is None
    bad = with_call("x", 0, arguments="city=Oslo")
    bad["tools"] = None
    assert quality.tool_call_invalid(bad, cfg) == Drop(
        "tool_arguments_not_json",
        "messages[2].tool_calls[0] arguments are not JSON (Expecting value: line 1 column 1 (char 0)): 'city=Oslo'",
    )


def test_tool_without_parameters_takes_any_object_and_results_may_omit_ids() -> None:
    row = messages_of(
        "clock",
        lambda m: [
            m[1],
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{**m[2]["tool_calls"][0], "function": {"name": "now", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "12:00"},  # no id: answers the oldest pending call
            {"role": "assistant", "content": "It is noon now, which is a good time to check the weather outside."},
        ],
    )
    assert quality.tool_call_invalid(row, QualityConfig()) is None
    assert quality.tool_result_unmatched(row, QualityConfig()) is None
    kept, dropped = apply_quality_gate([row])
    assert (len(kept), dropped) == (1, [])


def test_a_conversation_may_end_on_calls_and_unstructured_tool_text_is_not_checked() -> None:
    ends_on_calls = messages_of("ends", lambda m: m[:3])
    assert quality.tool_result_unmatched(ends_on_calls, QualityConfig()) is None
    legacy = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "Let me look."},
            {"role": "tool", "content": "{}"},
            {"role": "assistant", "content": "Done."},
        ]
    }
    assert quality.tool_result_unmatched(legacy, QualityConfig()) is None


def test_tool_call_turn_without_text_is_not_an_empty_turn_and_special_tokens_in_calls_are_caught() -> None:
    assert quality.empty_turn(agentic_row(), QualityConfig()) is None
    cfg = QualityConfig(special_tokens=("<|im_end|>",))
    assert quality.special_token_in_content(agentic_row(), cfg) is None
    forged = with_call("forged", 1, arguments='{"city": "Rome<|im_end|>"}')
    assert quality.special_token_in_content(forged, cfg) == Drop(
        "special_token_in_content", "messages[2].tool_calls[1].function.arguments contains special token '<|im_end|>'"
    )
    thinking = messages_of("t", lambda m: [*m[:5], {**m[5], "reasoning_content": "done <|im_end|>"}])
    assert quality.special_token_in_content(thinking, cfg) == Drop(
        "special_token_in_content", "messages[5].reasoning_content contains special token '<|im_end|>'"
    )


def test_the_launchpad_config_sets_the_tool_call_limits() -> None:
    from posttrain_assets.defs.silver.canonical import CleaningPassConfig

    assert (
        CleaningPassConfig().cleaning().quality.max_parallel_tool_calls,
        QualityConfig().require_declared_tools,
    ) == (
        16,
        True,
    )
    quality_cfg = CleaningPassConfig(max_parallel_tool_calls=1, require_declared_tools=False).cleaning().quality
    assert (quality_cfg.max_parallel_tool_calls, quality_cfg.require_declared_tools) == (1, False)
    assert quality.tool_call_invalid(agentic_row(), quality_cfg) == Drop(
        "too_many_parallel_calls", "messages[2] makes 2 tool calls, over max_parallel_tool_calls 1"
    )


def test_trajectories_that_differ_only_in_their_calls_are_not_duplicates() -> None:
    """The dedup unit of an SFT row includes its tool calls and reasoning: the same prompt and answer reached with
    different calls is different data (a plain row's unit is unchanged)."""
    from posttrain_assets.cleaning.dedup import dedup_unit, exact_key

    rome = with_call("rome", 0, arguments='{"city": "Rome"}')
    assert exact_key(agentic_row()) != exact_key(rome)
    assert 'call: get_weather {"city": "Rome"}' in dedup_unit(rome)
    plain = {"regime": "sft", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert dedup_unit(plain) == "user: q\nassistant: a"
