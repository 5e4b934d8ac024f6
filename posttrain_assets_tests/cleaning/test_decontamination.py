"""Tests for decontamination (``posttrain_assets.cleaning.decontamination``):
n-grams, planted copies, real GSM8K overlap."""

from __future__ import annotations

import json
from typing import Any

from posttrain_assets.cleaning.decontamination import (
    EvalIndex,
    Match,
    contamination_matches,
    contamination_report,
    contamination_scan,
    word_ngrams,
    words,
)
from posttrain_assets.records.formats import get_adapter
from posttrain_assets_tests.real_data import REAL_DATA


def gsm8k_records(split: str) -> list[dict[str, Any]]:
    """The real GSM8K split as minimal silver rows (id ``<split>-<line>``, source ``gsm8k_<split>``)."""
    rows = []
    lines = (REAL_DATA / "gsm8k" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        rec = get_adapter("gsm8k").parse(json.loads(line), "rl")
        rows.append(
            {
                "id": f"{split}-{i}",
                "source": f"gsm8k_{split}",
                "regime": "rl",
                "messages": rec.messages,
                "prompt": rec.prompt,
                "answer": rec.answer,
            }
        )
    return rows


def test_word_ngrams() -> None:
    text = "One two three, FOUR five!"
    assert words(text) == ["one", "two", "three", "four", "five"]
    assert len(word_ngrams(text, 3)) == 3
    assert word_ngrams(text, 3) == word_ngrams("one  two three four five", 3)  # punctuation/case/space ignored
    assert word_ngrams(text, 6) == set()
    assert word_ngrams(text, 5) != word_ngrams("one two three four six", 5)


def test_planted_gsm8k_test_questions_are_found() -> None:
    test = gsm8k_records("test")[:200]
    index = EvalIndex.build(test)
    q0, q1, q2 = test[0]["prompt"], test[1]["prompt"], test[2]["prompt"]
    training = [
        # an SFT chat that quotes a test question inside a longer user turn
        {
            "id": "sft-1",
            "source": "chats",
            "regime": "sft",
            "messages": [
                {"role": "user", "content": f"Please solve this for me: {q0} Thanks!"},
                {"role": "assistant", "content": "Sure."},
            ],
            "prompt": "",
        },
        # a preference pair whose chosen response restates a test question
        {
            "id": "pref-1",
            "source": "prefs",
            "regime": "preference",
            "messages": [{"role": "user", "content": "Give me a word problem."}],
            "prompt": "Give me a word problem.",
            "chosen": q1.upper(),
            "rejected": "No.",
        },
        # an RL prompt copied verbatim
        {
            "id": "rl-1",
            "source": "rl",
            "regime": "rl",
            "messages": [{"role": "user", "content": q2}],
            "prompt": q2,
            "answer": "5",
        },
        # clean rows
        {
            "id": "rl-2",
            "source": "rl",
            "regime": "rl",
            "messages": [{"role": "user", "content": "What is 2 + 2?"}],
            "prompt": "What is 2 + 2?",
            "answer": "4",
        },
    ]
    got = {r["id"]: index.matches(r) for r in training}
    assert [(m.eval_id, m.field, m.eval_field) for m in got["sft-1"]] == [("test-0", "messages[0]", "prompt")]
    assert got["sft-1"][0].shared_ngrams == len(words(q0)) - 12
    assert [(m.eval_id, m.field) for m in got["pref-1"]] == [("test-1", "chosen")]
    assert [(m.eval_id, m.field) for m in got["rl-1"]] == [("test-2", "messages[0]")]
    assert got["rl-2"] == []
    report = contamination_report(training, index)
    assert report == [
        {
            "benchmark": "gsm8k_test",
            "eval_rows": 200,
            "eval_rows_hit": 3,
            "training_rows": 3,
            "by_source": {"chats": 1, "prefs": 1, "rl": 1},
            "sample_ids": ["pref-1", "rl-1", "sft-1"],
        }
    ]


def test_short_text_matches_whole_eval_prompt_only() -> None:
    index = EvalIndex.build(
        [{"id": "e1", "source": "tiny_eval", "regime": "rl", "prompt": "What is 7 times 8?", "answer": "56"}]
    )
    hit = {
        "id": "t1",
        "source": "s",
        "regime": "rl",
        "messages": [{"role": "user", "content": "what is 7 TIMES 8"}],
        "answer": "56",
    }
    assert index.matches(hit) == [Match("tiny_eval", "e1", "messages[0]", "prompt", 0, "what is 7 times 8")]
    part = {
        "id": "t2",
        "source": "s",
        "regime": "rl",
        "messages": [{"role": "user", "content": "What is 7 times 9?"}],
        "answer": "56",
    }  # the same short answer is no evidence
    assert index.matches(part) == []


def test_real_gsm8k_train_test_overlap() -> None:
    """Measured: 4 of 7,473 GSM8K train rows share a 13-gram with 3 of the 1,319 test questions."""
    train, test = gsm8k_records("train"), gsm8k_records("test")
    assert (len(train), len(test)) == (7473, 1319)
    index = EvalIndex.build(test)
    report = contamination_report(train, index)
    assert report == [
        {
            "benchmark": "gsm8k_test",
            "eval_rows": 1319,
            "eval_rows_hit": 3,
            "training_rows": 4,
            "by_source": {"gsm8k_train": 4},
            "sample_ids": ["train-1314", "train-20", "train-406", "train-5162"],
        }
    ]
    got = sorted((r["id"], m.eval_id, m.shared_ngrams) for r in train for m in index.matches(r))
    assert got == [
        ("train-1314", "test-602", 7),
        ("train-20", "test-632", 13),
        ("train-406", "test-581", 3),
        ("train-5162", "test-602", 7),
    ]


def test_empty_index_and_one_pass_report() -> None:
    test = gsm8k_records("test")[:50]
    training = [
        {"id": "a", "source": "chats", "regime": "rl", "messages": [{"role": "user", "content": test[0]["prompt"]}]},
        {"id": "b", "source": "chats", "regime": "rl", "messages": [{"role": "user", "content": "What is 2 + 2?"}]},
        {"id": "c", "source": "rl", "regime": "rl", "messages": [{"role": "user", "content": test[7]["prompt"]}]},
    ]
    index = EvalIndex.build(test)
    matches = contamination_matches(training, index)
    assert [(m["id"], m["eval_id"]) for m in matches] == [("a", "test-0"), ("c", "test-7")]
    report = contamination_report(training, index)
    # the report from precomputed matches, and both at once, equal the separate calls
    assert contamination_report(training, index, matches=matches) == report
    assert contamination_scan(training, index) == (matches, report)
    assert report[0]["by_source"] == {"chats": 1, "rl": 1} and report[0]["eval_rows_hit"] == 2
    # an empty index: nothing to match, no row is looked at (a row without messages would otherwise be read)
    empty = EvalIndex.build([])
    assert empty.is_empty() and not index.is_empty()
    unreadable = [{"id": "x", "source": "s", "regime": "sft", "messages": [{"role": "user"}]}]
    assert contamination_matches(unreadable, empty) == [] and contamination_report(unreadable, empty) == []
    assert empty.matches(unreadable[0]) == []
    assert contamination_scan(training, empty) == ([], [])
