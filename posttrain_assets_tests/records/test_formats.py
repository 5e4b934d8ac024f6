"""Tests for the format adapters (``posttrain_assets.records.formats``).

Hand-written rows check exact outputs and exact reason codes / field paths; the
real public files in ``posttrain_assets_tests/data`` check that every row of real data maps
(or is quarantined) exactly as measured.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from posttrain_assets.records.adapters import last_boxed, parse_hh_transcript
from posttrain_assets.records.formats import ADAPTERS, Adapter, get_adapter
from posttrain_assets.records.schema import REASONS, CanonicalRecord, RecordError
from posttrain_assets_tests.real_data import REAL_DATA

DATA = REAL_DATA


def parse(name: str, row: Any, regime: str | None = None) -> CanonicalRecord:
    adapter = get_adapter(name)
    return adapter.parse(row, regime or adapter.default_regime)


def fails(name: str, row: Any, regime: str | None = None) -> tuple[str, str | None]:
    """(reason, field) of the RecordError the adapter raises for ``row``."""
    with pytest.raises(RecordError) as info:
        parse(name, row, regime)
    assert info.value.reason in REASONS
    return info.value.reason, info.value.field


def tally(name: str, rows: list[Any]) -> tuple[list[CanonicalRecord], Counter[tuple[str, str | None]]]:
    """Parse all rows: the records and a count of (reason, field) for the failures."""
    ok: list[CanonicalRecord] = []
    bad: Counter[tuple[str, str | None]] = Counter()
    for row in rows:
        try:
            ok.append(parse(name, row))
        except RecordError as exc:
            bad[(exc.reason, exc.field)] += 1
    return ok, bad


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ----------------------------------------------------------------------- registry


def test_registry_names_and_regimes() -> None:
    assert list(ADAPTERS) == [
        "messages",
        "sharegpt",
        "hermes",
        "alpaca",
        "trl_preference",
        "ultrafeedback",
        "hh_rlhf",
        "gsm8k",
        "math",
        "verl",
        "humaneval",
    ]
    assert {name: a.regimes for name, a in ADAPTERS.items()} == {
        "messages": ("sft", "rl"),
        "sharegpt": ("sft",),
        "hermes": ("sft",),
        "alpaca": ("sft",),
        "trl_preference": ("preference",),
        "ultrafeedback": ("preference",),
        "hh_rlhf": ("preference",),
        "gsm8k": ("rl",),
        "math": ("rl",),
        "verl": ("rl",),
        "humaneval": ("rl",),
    }
    adapter = get_adapter("gsm8k")
    assert isinstance(adapter, Adapter)
    assert adapter.name == "gsm8k" and adapter.default_regime == "rl"
    assert all(a.description for a in ADAPTERS.values())


def test_get_adapter_unknown_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown format 'jsonl'.*messages, sharegpt, hermes, alpaca"):
        get_adapter("jsonl")


def test_unsupported_regime_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="cannot serve regime 'preference'") as info:
        parse("alpaca", {"instruction": "a", "output": "b"}, "preference")
    assert not isinstance(info.value, RecordError)


def test_non_object_row() -> None:
    assert fails("sharegpt", ["not", "a", "dict"]) == ("not_an_object", None)


def test_new_reason_codes_are_documented() -> None:
    assert "not_ending_with_user" in REASONS and "unknown_verifier" in REASONS


# ----------------------------------------------------------------------- messages


def test_messages_sft() -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    }
    rec = parse("messages", row)
    assert rec.regime == "sft"
    assert rec.messages == row["messages"]
    assert rec.prompt == "And of Italy?"
    assert rec.response == "Rome."
    assert (rec.chosen, rec.rejected, rec.answer, rec.verifier) == (None, None, None, None)


def test_messages_rl() -> None:
    row = {
        "messages": [{"role": "user", "content": "What is 6 * 7?"}],
        "answer": 42,
        "verifier": "numeric",
        "domain": "math/arithmetic",
        "difficulty": 0.25,
    }
    rec = parse("messages", row, "rl")
    assert rec.regime == "rl"
    assert rec.messages == [{"role": "user", "content": "What is 6 * 7?"}]
    assert rec.prompt == "What is 6 * 7?"
    assert (rec.answer, rec.verifier, rec.domain, rec.difficulty) == ("42", "numeric", "math/arithmetic", 0.25)
    assert rec.response is None

    plain = parse("messages", {"messages": row["messages"], "answer": "Paris"}, "rl")
    assert (plain.answer, plain.verifier, plain.domain, plain.difficulty) == ("Paris", "exact_match", None, None)


@pytest.mark.parametrize(
    ("row", "regime", "expected"),
    [
        ({}, "sft", ("missing_field", "messages")),
        ({"messages": "hi"}, "sft", ("wrong_type", "messages")),
        ({"messages": []}, "sft", ("empty_content", "messages")),
        ({"messages": [{"role": "user", "content": "hi"}, "oops"]}, "sft", ("wrong_type", "messages[1]")),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
            "sft",
            ("unknown_role", "messages[1].role"),
        ),
        ({"messages": [{"role": "user", "content": 3}]}, "sft", ("wrong_type", "messages[0].content")),
        ({"messages": [{"role": "user"}]}, "sft", ("missing_field", "messages[0].content")),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  \n"}]},
            "sft",
            ("empty_content", "messages[1].content"),
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "?"},
                ]
            },
            "sft",
            ("not_ending_with_assistant", "messages[2].role"),
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "sft", ("no_assistant_turn", "messages")),
        ({"messages": [{"role": "user", "content": "2+2?"}]}, "rl", ("missing_gold_answer", "answer")),
        ({"messages": [{"role": "user", "content": "2+2?"}], "answer": ""}, "rl", ("missing_gold_answer", "answer")),
        ({"messages": [{"role": "user", "content": "2+2?"}], "answer": True}, "rl", ("wrong_type", "answer")),
        ({"messages": [{"role": "user", "content": "2+2?"}], "answer": [4]}, "rl", ("wrong_type", "answer")),
        (
            {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4", "verifier": "llm_judge"},
            "rl",
            ("unknown_verifier", "verifier"),
        ),
        (
            {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4", "difficulty": "hard"},
            "rl",
            ("wrong_type", "difficulty"),
        ),
        (
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "answer": "4"},
            "rl",
            ("not_ending_with_user", "messages[1].role"),
        ),
    ],
)
def test_messages_errors(row: dict[str, Any], regime: str, expected: tuple[str, str]) -> None:
    assert fails("messages", row, regime) == expected


# ----------------------------------------------------------------------- sharegpt


def test_sharegpt_maps_roles() -> None:
    row = {
        "id": "conv_7",
        "conversations": [
            {"from": "system", "value": "You can call tools."},
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": '{"temp_c": 4}'},
            {"from": "gpt", "value": "It is 4 °C in Oslo."},
        ],
    }
    rec = parse("sharegpt", row)
    # function_call / observation turns are a structured call and its result (LLaMA-Factory layout)
    call = {"id": "call_2_0", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    assert rec.messages == [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"temp_c": 4}', "tool_call_id": "call_2_0", "name": "weather"},
        {"role": "assistant", "content": "It is 4 °C in Oslo."},
    ]
    assert (rec.regime, rec.prompt, rec.response) == ("sft", "Weather in Oslo?", "It is 4 °C in Oslo.")
    assert rec.extra == {"source_id": "conv_7"}


@pytest.mark.parametrize("speaker", ["user", "human"])
def test_sharegpt_user_aliases(speaker: str) -> None:
    row = {"conversations": [{"from": speaker, "value": "hi"}, {"from": "chatgpt", "value": "hello"}]}
    assert parse("sharegpt", row).messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


@pytest.mark.parametrize(
    ("conversations", "expected"),
    [
        (None, ("missing_field", "conversations")),
        ({"from": "human"}, ("wrong_type", "conversations")),
        ([], ("empty_content", "conversations")),
        (
            [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}],
            ("unknown_role", "conversations[1].from"),
        ),
        ([{"from": "human", "value": "hi"}, {"value": "x"}], ("missing_field", "conversations[1].from")),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": 5}], ("wrong_type", "conversations[1].value")),
        ([{"from": "human", "value": "hi"}, "gpt: hello"], ("wrong_type", "conversations[1]")),
        (
            [
                {"from": "human", "value": "a"},
                {"from": "gpt", "value": "b"},
                {"from": "human", "value": "c"},
                {"from": "gpt", "value": " "},
            ],
            ("empty_content", "conversations[3].value"),
        ),
        (
            [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
            ("not_ending_with_assistant", "conversations[2].from"),
        ),
        ([{"from": "human", "value": "a"}], ("no_assistant_turn", "conversations")),
    ],
)
def test_sharegpt_errors(conversations: Any, expected: tuple[str, str]) -> None:
    row = {"id": "x"} if conversations is None else {"id": "x", "conversations": conversations}
    assert fails("sharegpt", row) == expected


# ------------------------------------------------------------------------- alpaca


def test_alpaca_with_and_without_input() -> None:
    rec = parse("alpaca", {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"})
    assert rec.messages == [
        {"role": "user", "content": "Translate to French.\n\nGood morning"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    assert (rec.prompt, rec.response) == ("Translate to French.\n\nGood morning", "Bonjour")

    bare = parse("alpaca", {"instruction": "Name a colour.", "input": "  ", "output": "Blue."})
    assert bare.messages == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]

    system = parse("alpaca", {"system": "Answer in one word.", "instruction": "Sky colour?", "output": "Blue"})
    assert system.messages[0] == {"role": "system", "content": "Answer in one word."}
    assert [m["role"] for m in system.messages] == ["system", "user", "assistant"]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "Say hi.", "input": ""}, ("missing_field", "output")),
        ({"instruction": "Say hi.", "output": None}, ("missing_field", "output")),
        ({"instruction": "Say hi.", "output": "   "}, ("empty_content", "output")),
        ({"input": "x", "output": "y"}, ("missing_field", "instruction")),
        ({"instruction": "", "output": "y"}, ("empty_content", "instruction")),
        ({"instruction": ["Say hi."], "output": "hi"}, ("wrong_type", "instruction")),
        ({"instruction": "Add.", "input": 3, "output": "hi"}, ("wrong_type", "input")),
        ({"instruction": "Say hi.", "output": 1}, ("wrong_type", "output")),
    ],
)
def test_alpaca_errors(row: dict[str, Any], expected: tuple[str, str]) -> None:
    assert fails("alpaca", row) == expected


# ----------------------------------------------------------------- trl_preference


def test_trl_explicit_string_prompt() -> None:
    row = {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No.", "score_chosen": 8}
    rec = parse("trl_preference", row)
    assert rec.regime == "preference"
    assert rec.messages == [{"role": "user", "content": "Is the sky blue?"}]
    assert (rec.prompt, rec.chosen, rec.rejected) == ("Is the sky blue?", "Yes, on a clear day.", "No.")
    assert (rec.score_chosen, rec.score_rejected, rec.response) == (8.0, None, None)


def test_trl_explicit_conversational() -> None:
    row = {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello! How can I help?"}],
        "rejected": [{"role": "assistant", "content": "What."}],
        "score_chosen": 9.5,
        "score_rejected": 2,
    }
    rec = parse("trl_preference", row)
    assert rec.messages == row["prompt"]
    assert (rec.prompt, rec.chosen, rec.rejected) == ("Hi", "Hello! How can I help?", "What.")
    assert (rec.score_chosen, rec.score_rejected) == (9.5, 2.0)


def test_trl_implicit_prompt() -> None:
    shared = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Times 3?"},
    ]
    row = {
        "chosen": [*shared, {"role": "assistant", "content": "12"}],
        "rejected": [*shared, {"role": "assistant", "content": "7"}],
    }
    rec = parse("trl_preference", row)
    assert rec.messages == shared
    assert (rec.prompt, rec.chosen, rec.rejected) == ("Times 3?", "12", "7")


U = {"role": "user", "content": "Q"}
A1 = {"role": "assistant", "content": "A1"}
A2 = {"role": "assistant", "content": "A2"}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "Q", "rejected": "no"}, ("missing_field", "chosen")),
        ({"prompt": "Q", "chosen": "yes"}, ("missing_field", "rejected")),
        ({"prompt": 5, "chosen": "a", "rejected": "b"}, ("wrong_type", "prompt")),
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, ("empty_content", "prompt")),
        ({"prompt": "Q", "chosen": "", "rejected": "b"}, ("empty_content", "chosen")),
        ({"prompt": "Q", "chosen": "a", "rejected": {"text": "b"}}, ("wrong_type", "rejected")),
        ({"prompt": "Q", "chosen": [A1, A2], "rejected": "b"}, ("pair_not_single_response", "chosen")),
        ({"prompt": "Q", "chosen": "a", "rejected": [U]}, ("pair_not_single_response", "rejected")),
        ({"prompt": [U, A1], "chosen": "a", "rejected": "b"}, ("not_ending_with_user", "prompt[1].role")),
        ({"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": "high"}, ("wrong_type", "score_chosen")),
        ({"prompt": "Q", "chosen": "a", "rejected": "b", "score_rejected": False}, ("wrong_type", "score_rejected")),
        # implicit prompt
        ({"chosen": "a", "rejected": "b"}, ("wrong_type", "chosen")),
        ({"chosen": [U, A1]}, ("missing_field", "rejected")),
        ({"chosen": [U, A1], "rejected": [U, A2, U]}, ("pair_not_single_response", "rejected[2].role")),
        ({"chosen": [U, A1, A2], "rejected": [U, A2]}, ("pair_not_single_response", "chosen[1]")),
        (
            {"chosen": [U, A1, {"role": "user", "content": "more"}, A2], "rejected": [U, A2, U, A2]},
            ("pair_prefix_mismatch", "rejected[1]"),
        ),
        (
            {"chosen": [U, A1], "rejected": [{"role": "user", "content": "other"}, A2]},
            ("pair_prefix_mismatch", "rejected[0]"),
        ),
        ({"chosen": [U, A1, A1], "rejected": [U, A1, A2]}, ("pair_not_single_response", "chosen[1].role")),
        ({"chosen": [U, {"role": "bot", "content": "x"}], "rejected": [U, A2]}, ("unknown_role", "chosen[1].role")),
    ],
)
def test_trl_errors(row: dict[str, Any], expected: tuple[str, str]) -> None:
    assert fails("trl_preference", row) == expected


# ------------------------------------------------------------------ ultrafeedback


def ultrafeedback_row(**overrides: Any) -> dict[str, Any]:
    prompt = "Write a haiku about rain."
    row = {
        "prompt": prompt,
        "prompt_id": "a1b2",
        "chosen": [
            {"role": "user", "content": prompt},
            {
                "role": "assistant",
                "content": "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky",
            },
        ],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Rain is wet."}],
        "score_chosen": 8.5,
        "score_rejected": 3,
    }
    row.update(overrides)
    return row


def test_ultrafeedback() -> None:
    rec = parse("ultrafeedback", ultrafeedback_row())
    assert rec.messages == [{"role": "user", "content": "Write a haiku about rain."}]
    assert rec.prompt == "Write a haiku about rain."
    assert rec.chosen == "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky"
    assert rec.rejected == "Rain is wet."
    assert (rec.score_chosen, rec.score_rejected) == (8.5, 3.0)
    assert rec.extra == {"prompt_id": "a1b2"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"score_chosen": None}, ("missing_field", "score_chosen")),
        ({"score_rejected": "3"}, ("wrong_type", "score_rejected")),
        ({"prompt": None}, ("missing_field", "prompt")),
        ({"prompt": "Write a limerick."}, ("pair_prefix_mismatch", "prompt")),
        ({"rejected": [{"role": "user", "content": "Other"}, A2]}, ("pair_prefix_mismatch", "rejected[0]")),
        ({"chosen": "Soft rain"}, ("wrong_type", "chosen")),
        (
            {
                "chosen": [
                    {"role": "user", "content": "Write a haiku about rain."},
                    {"role": "assistant", "content": ""},
                ]
            },
            ("empty_content", "chosen[1].content"),
        ),
    ],
)
def test_ultrafeedback_errors(overrides: dict[str, Any], expected: tuple[str, str]) -> None:
    assert fails("ultrafeedback", ultrafeedback_row(**overrides)) == expected


# ------------------------------------------------------------------------ hh_rlhf


def test_hh_rlhf_pair() -> None:
    row = {
        "chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you want to?\n\n"
        "Human: I'm locked out.\n\nAssistant:  Call a locksmith; they can let you in safely.",
        "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you want to?  \n\n"
        "Human: I'm locked out.\n\nAssistant: Use a tension wrench and a pick.",
    }
    rec = parse("hh_rlhf", row)
    assert rec.messages == [
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "Why do you want to?"},
        {"role": "user", "content": "I'm locked out."},
    ]
    assert rec.prompt == "I'm locked out."
    assert rec.chosen == "Call a locksmith; they can let you in safely."
    assert rec.rejected == "Use a tension wrench and a pick."
    assert (rec.score_chosen, rec.score_rejected) == (None, None)


def test_hh_transcript_splits_only_on_blank_line_markers() -> None:
    text = "\n\nHuman: Say 'Human: hi'\n\nAssistant: Human: hi\nAssistant: done"
    assert parse_hh_transcript(text, "chosen") == [
        {"role": "user", "content": "Say 'Human: hi'"},
        {"role": "assistant", "content": "Human: hi\nAssistant: done"},
    ]
    # a marker at the very start (no leading blank lines) is accepted too
    assert parse_hh_transcript("Human: a\n\nAssistant: b", "chosen") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ("\n\nHuman: hi\n\nAssistant:", "\n\nHuman: hi\n\nAssistant: hello", ("empty_content", "chosen")),
        ("\n\nHuman: hi\n\nAssistant: yo", "\n\nHuman: hi\n\nAssistant:   ", ("empty_content", "rejected")),
        ("\n\nHuman: \n\nAssistant: yo", "\n\nHuman: \n\nAssistant: hey", ("empty_content", "chosen")),
        ("just some text", "\n\nHuman: hi\n\nAssistant: yo", ("unparseable_transcript", "chosen")),
        ("\n\nHuman: hi\n\nAssistant: yo", "", ("unparseable_transcript", "rejected")),
        (
            "Preamble\n\nHuman: hi\n\nAssistant: yo",
            "\n\nHuman: hi\n\nAssistant: yo",
            ("unparseable_transcript", "chosen"),
        ),
        ("\n\nHuman: hi\n\nAssistant: yo", "\n\nHuman: bye\n\nAssistant: yo", ("pair_prefix_mismatch", "rejected")),
        (
            "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
            "\n\nHuman: a\n\nAssistant: X\n\nHuman: c\n\nAssistant: e",
            ("pair_prefix_mismatch", "rejected"),
        ),
        (
            "\n\nHuman: hi\n\nAssistant: a\n\nAssistant: b",
            "\n\nHuman: hi\n\nAssistant: c",
            ("pair_not_single_response", "chosen"),
        ),
        (
            "\n\nHuman: hi\n\nAssistant: a",
            "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more?",
            ("pair_not_single_response", "rejected"),
        ),
        ("\n\nHuman: hi", "\n\nHuman: hi\n\nAssistant: a", ("pair_not_single_response", "chosen")),
        (None, "\n\nHuman: hi\n\nAssistant: a", ("missing_field", "chosen")),
        ("\n\nHuman: hi\n\nAssistant: a", ["Human: hi"], ("wrong_type", "rejected")),
    ],
)
def test_hh_rlhf_errors(chosen: Any, rejected: Any, expected: tuple[str, str]) -> None:
    row = {"rejected": rejected} if chosen is None else {"chosen": chosen, "rejected": rejected}
    assert fails("hh_rlhf", row) == expected


# -------------------------------------------------------------------------- gsm8k


def test_gsm8k() -> None:
    row = {
        "question": "A farm has 1,200 hens. Each lays 1 egg a day. How many eggs in 2 days?",
        "answer": "Eggs per day: 1,200 * 1 = <<1200*1=1200>>1,200\n"
        "Two days: 1,200 * 2 = <<1200*2=2400>>2,400\n#### 2,400",
    }
    rec = parse("gsm8k", row)
    assert rec.regime == "rl"
    assert rec.messages == [{"role": "user", "content": row["question"]}]
    assert rec.prompt == row["question"]
    assert (rec.answer, rec.verifier, rec.domain) == ("2400", "numeric", "math/arithmetic")
    assert rec.extra == {"solution": row["answer"]}
    assert parse("gsm8k", {"question": "q", "answer": "#### 1\n#### -7 "}).answer == "-7"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"question": "How many?", "answer": "It is 5."}, ("missing_gold_answer", "answer")),
        ({"question": "How many?", "answer": "It is 5.\n####   "}, ("missing_gold_answer", "answer")),
        ({"question": 12, "answer": "#### 5"}, ("wrong_type", "question")),
        ({"answer": "#### 5"}, ("missing_field", "question")),
        ({"question": "How many?"}, ("missing_field", "answer")),
        ({"question": "How many?", "answer": 5}, ("wrong_type", "answer")),
        ({"question": "\n", "answer": "#### 5"}, ("empty_content", "question")),
    ],
)
def test_gsm8k_errors(row: dict[str, Any], expected: tuple[str, str]) -> None:
    assert fails("gsm8k", row) == expected


# --------------------------------------------------------------------------- math


def test_math() -> None:
    row = {
        "problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
        "solution": "We have $\\boxed{1/2}$ first... no: $\\frac{1}{2}+\\frac{1}{4} = \\boxed{\\frac{3}{4}}$.",
        "level": "Level 2",
        "type": "Intermediate Algebra",
    }
    rec = parse("math", row)
    assert rec.regime == "rl"
    assert rec.messages == [{"role": "user", "content": row["problem"]}]
    assert rec.prompt == row["problem"]
    assert rec.answer == "\\frac{3}{4}"
    assert (rec.verifier, rec.domain, rec.difficulty) == ("math", "math/intermediate_algebra", 0.4)
    assert rec.extra == {"solution": row["solution"], "level": "Level 2"}

    bare = parse("math", {"problem": "1+1?", "solution": "It is $\\fbox{2}$.", "level": "Level ?"})
    assert (bare.answer, bare.domain, bare.difficulty) == ("2", "math", None)


def test_last_boxed() -> None:
    assert last_boxed("\\boxed{\\left\\{1, \\frac{a}{b}\\right\\}}") == "\\left\\{1, \\frac{a}{b}\\right\\}"
    assert last_boxed("$\\boxed 5$") == "5"
    assert last_boxed("\\boxed{1} then \\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{unbalanced") is None
    assert last_boxed("no box here") is None


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"problem": "1+1?", "solution": "It is 2."}, ("missing_gold_answer", "solution")),
        ({"problem": "1+1?", "solution": "It is $\\boxed{}$."}, ("missing_gold_answer", "solution")),
        ({"problem": "1+1?", "solution": "$\\boxed{2"}, ("missing_gold_answer", "solution")),
        ({"solution": "\\boxed{2}"}, ("missing_field", "problem")),
        ({"problem": "1+1?", "solution": "\\boxed{2}", "level": 3}, ("wrong_type", "level")),
        ({"problem": "1+1?", "solution": "\\boxed{2}", "type": ["Algebra"]}, ("wrong_type", "type")),
    ],
)
def test_math_errors(row: dict[str, Any], expected: tuple[str, str]) -> None:
    assert fails("math", row) == expected


# --------------------------------------------------------------------------- verl


def verl_row(**overrides: Any) -> dict[str, Any]:
    row = {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": "Natalia sold 48 clips ... Let's think step by step."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "72"},
        "extra_info": {"split": "train", "index": 0},
    }
    row.update(overrides)
    return row


def test_verl() -> None:
    rec = parse("verl", verl_row())
    assert rec.regime == "rl"
    assert rec.messages == [{"role": "user", "content": "Natalia sold 48 clips ... Let's think step by step."}]
    assert rec.prompt == "Natalia sold 48 clips ... Let's think step by step."
    assert (rec.answer, rec.verifier, rec.domain) == ("72", "numeric", "math")
    assert rec.extra == {
        "data_source": "openai/gsm8k",
        "reward_style": "rule",
        "extra_info": {"split": "train", "index": 0},
    }
    text = parse("verl", verl_row(reward_model={"style": "rule", "ground_truth": "Paris"}, ability=None))
    assert (text.answer, text.verifier, text.domain) == ("Paris", "exact_match", None)
    styled = parse("verl", verl_row(reward_model={"style": "math", "ground_truth": 2.0}))
    assert (styled.answer, styled.verifier) == ("2", "math")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"reward_model": {"style": "rule"}}, ("missing_gold_answer", "reward_model.ground_truth")),
        (
            {"reward_model": {"style": "rule", "ground_truth": " "}},
            ("missing_gold_answer", "reward_model.ground_truth"),
        ),
        ({"reward_model": {"ground_truth": ["72"]}}, ("wrong_type", "reward_model.ground_truth")),
        ({"reward_model": {"style": 1, "ground_truth": "72"}}, ("wrong_type", "reward_model.style")),
        ({"reward_model": "72"}, ("wrong_type", "reward_model")),
        ({"reward_model": None}, ("missing_field", "reward_model")),
        ({"data_source": None}, ("missing_field", "data_source")),
        ({"prompt": "Natalia sold..."}, ("wrong_type", "prompt")),
        ({"prompt": [{"role": "user", "content": "q"}, A1]}, ("not_ending_with_user", "prompt[1].role")),
        ({"prompt": [{"role": "human", "content": "q"}]}, ("unknown_role", "prompt[0].role")),
        ({"extra_info": "train"}, ("wrong_type", "extra_info")),
    ],
)
def test_verl_errors(overrides: dict[str, Any], expected: tuple[str, str]) -> None:
    assert fails("verl", verl_row(**overrides)) == expected


# ----------------------------------------------------------------------- content_id


def test_content_id() -> None:
    row = {"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No."}
    first, again = parse("trl_preference", row), parse("trl_preference", dict(row))
    assert first.content_id() == again.content_id()
    assert len(first.content_id()) == 32
    assert parse("trl_preference", {**row, "rejected": "No!"}).content_id() != first.content_id()
    # scores are not content: same pair, same id
    assert parse("trl_preference", {**row, "score_chosen": 1.0}).content_id() == first.content_id()
    # same text in another regime is another record
    sft = parse("messages", {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]})
    rl = parse("messages", {"messages": [{"role": "user", "content": "Q"}], "answer": "A"}, "rl")
    assert sft.content_id() != rl.content_id()
    # the same conversation from two formats collapses on id
    share = parse("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]})
    assert share.content_id() == sft.content_id()


# ---------------------------------------------------------------------- real data


def test_real_fastchat_sharegpt() -> None:
    rows = json.loads((DATA / "fastchat" / "dummy_conversation.json").read_text(encoding="utf-8"))
    ok, bad = tally("sharegpt", rows)
    assert (len(rows), len(ok), bad) == (500, 500, Counter())
    first = ok[0]
    assert first.extra == {"source_id": "identity_0"}
    assert first.messages == [
        {"role": "user", "content": "Who are you?"},
        {
            "role": "assistant",
            "content": "I am Vicuna, a language model trained by researchers from Large Model Systems Organization "
            "(LMSYS).",
        },
        {"role": "user", "content": "Have a nice day!"},
        {"role": "assistant", "content": "You too!"},
    ]
    assert (first.prompt, first.response) == ("Have a nice day!", "You too!")
    assert sum(rec.messages[0]["content"] == "What is up?" for rec in ok) == 167
    assert len({rec.content_id() for rec in ok}) == 500  # openings repeat, but no two conversations are identical


def test_real_alpaca() -> None:
    rows = json.loads((DATA / "alpaca" / "alpaca_data_cleaned_1000.json").read_text(encoding="utf-8"))
    ok, bad = tally("alpaca", rows)
    assert (len(rows), len(ok), bad) == (1000, 1000, Counter())
    assert ok[0].prompt == "Give three tips for staying healthy."
    assert ok[0].response.startswith("1. Eat a balanced and nutritious diet:")
    assert ok[6].messages[0] == {
        "role": "user",
        "content": "Explain why the following fraction is equivalent to 1/4\n\n4/16",
    }
    # 409 rows carry a non-blank input, appended to the instruction after a blank line
    assert sum(rec.prompt != row["instruction"] for rec, row in zip(ok, rows, strict=True)) == 409
    assert all(
        rec.prompt == f"{row['instruction']}\n\n{row['input']}"
        for rec, row in zip(ok, rows, strict=True)
        if row["input"]
    )


def test_real_gsm8k() -> None:
    train = read_jsonl(DATA / "gsm8k" / "train.jsonl")
    test = read_jsonl(DATA / "gsm8k" / "test.jsonl")
    train_ok, train_bad = tally("gsm8k", train)
    test_ok, test_bad = tally("gsm8k", test)
    assert (len(train), len(train_ok), train_bad) == (7473, 7473, Counter())
    assert (len(test), len(test_ok), test_bad) == (1319, 1319, Counter())
    first = train_ok[0]
    assert first.answer == "72"
    assert first.prompt.startswith("Natalia sold clips to 48 of her friends in April")
    assert first.extra["solution"].endswith("#### 72")
    assert test_ok[0].answer == "18"
    assert test_ok[146].answer == "2125"  # "#### 2,125"
    # thousands separators: 79 train / 14 test gold answers had commas, none survive
    assert sum("," in rec.extra["solution"].rsplit("####", 1)[1] for rec in train_ok) == 79
    assert sum("," in rec.extra["solution"].rsplit("####", 1)[1] for rec in test_ok) == 14
    assert all(rec.answer.lstrip("-").replace(".", "", 1).isdigit() for rec in train_ok + test_ok)


def test_real_hh_rlhf() -> None:
    rows = read_jsonl(DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz")
    ok, bad = tally("hh_rlhf", rows)
    # Measured on harmless-base/test: 4 pairs whose chosen transcript ends in a bare
    # "Assistant:" (empty response), and 5 pairs where one side carries two assistant
    # turns after the shared prompt (e.g. "...\n\nAssistant: A\n\nAssistant: B").
    assert len(rows) == 2312
    assert len(ok) == 2303
    assert bad == Counter(
        {
            ("empty_content", "chosen"): 4,
            ("pair_not_single_response", "chosen"): 4,
            ("pair_not_single_response", "rejected"): 1,
        }
    )
    assert len(ok) + sum(bad.values()) == 2312

    first = ok[0]
    assert [m["role"] for m in first.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert first.messages[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert first.prompt == "okay some of these do not have anything to do with pens"
    assert first.chosen == (
        "No, sorry!  All of these involve a pen, the point is that you can get funny results by doing pranks with pens."
    )
    assert first.rejected.startswith("There are lots of funny things you can do with pens")
    assert all(rec.messages[-1]["role"] == "user" for rec in ok)

    assert fails("hh_rlhf", rows[86]) == ("empty_content", "chosen")
    assert fails("hh_rlhf", rows[1254]) == ("pair_not_single_response", "chosen")
    assert fails("hh_rlhf", rows[1950]) == ("pair_not_single_response", "rejected")
    # inline "Human:" without blank lines stays inside the turn (row 1254's chosen)
    turns = parse_hh_transcript(rows[1254]["chosen"], "chosen")
    assert "drag kings.  Human: Then how do they come to be called drag kings" in turns[3]["content"]
