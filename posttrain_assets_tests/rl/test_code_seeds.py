"""Code seeds from a real data set: HumanEval (vendored) carries its tests through the RL formats (its own
``humaneval`` layout, messages and verl), and its python_eval seeds certify for real, in the sandbox, with the judge
apart from the candidate."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from posttrain_assets.records.adapters import HUMANEVAL_DATA_SOURCE, HUMANEVAL_INSTRUCTION
from posttrain_assets.records.formats import get_adapter
from posttrain_assets.records.schema import CanonicalRecord, RecordError, SourceRef
from posttrain_assets.rl.verifiers import VERIFIER_VERSIONS, Score, Seed, certify_many, score
from posttrain_assets_tests.real_data import REAL_DATA

HUMANEVAL = REAL_DATA / "humaneval" / "HumanEval.jsonl.gz"


def humaneval() -> list[dict[str, Any]]:
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def solution(problem: dict[str, Any]) -> str:
    """The reference solution: the prompt (signature, docstring, helpers) followed by the canonical body."""
    return problem["prompt"] + problem["canonical_solution"]


def humaneval_tests(problem: dict[str, Any]) -> str:
    """HumanEval's tests define ``check(candidate)``; calling it with the entry point runs them."""
    return f"{problem['test']}\ncheck({problem['entry_point']})\n"


def messages_row(problem: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": problem["task_id"],
        "messages": [{"role": "user", "content": f"Complete this Python function:\n\n{problem['prompt']}"}],
        "answer": solution(problem),
        "verifier": "python_eval",
        "tests": humaneval_tests(problem),
        "domain": "code/python",
    }


def verl_row(problem: dict[str, Any]) -> dict[str, Any]:
    return {
        "data_source": "openai_humaneval",
        "prompt": [{"role": "user", "content": f"Complete this Python function:\n\n{problem['prompt']}"}],
        "ability": "code/python",
        "reward_model": {"style": "python_eval", "ground_truth": solution(problem), "tests": humaneval_tests(problem)},
        "extra_info": {"task_id": problem["task_id"]},
    }


def records(problems: list[dict[str, Any]]) -> list[CanonicalRecord]:
    """Problems in turn through the messages format, verl, and HumanEval's own layout (the row as vendored)."""
    routes = (
        lambda p: get_adapter("messages").parse(messages_row(p), "rl"),
        lambda p: get_adapter("verl").parse(verl_row(p), "rl"),
        lambda p: get_adapter("humaneval").parse(p, "rl"),
    )
    return [routes[i % 3](p) for i, p in enumerate(problems)]


def test_the_vendored_set_is_humaneval() -> None:
    problems = humaneval()
    assert len(problems) == 164
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert problems[0]["entry_point"] == "has_close_elements"


def test_rl_formats_carry_the_tests() -> None:
    problem = humaneval()[0]
    for record in records([problem, problem, problem]):
        assert (record.verifier, record.answer, record.tests) == (
            "python_eval",
            solution(problem),
            humaneval_tests(problem),
        )
    # A list of statements (MBPP's test_list) is joined one per line.
    row = {**messages_row(problem), "tests": ["assert f(1) == 2", "assert f(2) == 4\n"]}
    assert get_adapter("messages").parse(row, "rl").tests == "assert f(1) == 2\nassert f(2) == 4\n"
    # Without tests the row is still a seed (certification then says no_tests).
    bare = {k: v for k, v in messages_row(problem).items() if k != "tests"}
    assert get_adapter("messages").parse(bare, "rl").tests is None
    reward = {k: v for k, v in verl_row(problem)["reward_model"].items() if k != "tests"}
    assert get_adapter("verl").parse({**verl_row(problem), "reward_model": reward}, "rl").tests is None


def test_the_humaneval_format_reads_the_vendored_rows_as_they_are() -> None:
    problems = humaneval()
    parsed = [get_adapter("humaneval").parse(p, "rl") for p in problems]
    assert len(parsed) == 164
    first = parsed[0]
    user = f"{HUMANEVAL_INSTRUCTION}\n\n{problems[0]['prompt']}"
    assert (first.regime, first.messages, first.prompt) == ("rl", [{"role": "user", "content": user}], user)
    assert (first.answer, first.verifier, first.domain) == (solution(problems[0]), "python_eval", "code/python")
    assert first.tests == humaneval_tests(problems[0])
    assert first.tests.endswith("\ncheck(has_close_elements)\n")
    assert (first.extra, first.source_ref) == ({"task_id": "HumanEval/0"}, SourceRef(HUMANEVAL_DATA_SOURCE, "test", 0))
    # Every row has its tests and its reference solution, and the index is the task's number.
    assert all(r.tests == humaneval_tests(p) and r.answer == solution(p) for r, p in zip(parsed, problems, strict=True))
    assert [r.source_ref.index for r in parsed] == list(range(164))  # type: ignore[union-attr]


def test_a_humaneval_row_without_test_is_a_seed_without_tests() -> None:
    problem = {k: v for k, v in humaneval()[1].items() if k not in ("test", "entry_point")}
    record = get_adapter("humaneval").parse(problem, "rl")
    assert (record.verifier, record.tests, record.answer) == ("python_eval", None, solution(humaneval()[1]))
    # No task id, or one that is not HumanEval's: no index.
    del problem["task_id"]
    assert get_adapter("humaneval").parse(problem, "rl").source_ref == SourceRef(HUMANEVAL_DATA_SOURCE, "test", None)
    assert get_adapter("humaneval").parse(problem | {"task_id": "Mbpp/3"}, "rl").extra == {"task_id": "Mbpp/3"}


@pytest.mark.parametrize(
    ("change", "reason", "field"),
    [
        ({"prompt": None}, "missing_field", "prompt"),
        ({"prompt": " \n"}, "empty_content", "prompt"),
        ({"canonical_solution": None}, "missing_gold_answer", "canonical_solution"),
        ({"canonical_solution": "\n  "}, "missing_gold_answer", "canonical_solution"),
        ({"canonical_solution": 3}, "wrong_type", "canonical_solution"),
        ({"test": "   "}, "empty_content", "test"),
        ({"test": {"assert": 1}}, "wrong_type", "test"),
        ({"entry_point": None}, "missing_field", "entry_point"),
        ({"entry_point": "has close"}, "wrong_type", "entry_point"),
        ({"task_id": 0}, "wrong_type", "task_id"),
    ],
)
def test_bad_humaneval_rows_are_named(change: dict[str, Any], reason: str, field: str) -> None:
    with pytest.raises(RecordError) as caught:
        get_adapter("humaneval").parse({**humaneval()[0], **change}, "rl")
    assert (caught.value.reason, caught.value.field) == (reason, field)


@pytest.mark.parametrize(
    ("fmt", "row", "reason", "field"),
    [
        ("messages", {"tests": 5}, "wrong_type", "tests"),
        ("messages", {"tests": ["assert True", 3]}, "wrong_type", "tests[1]"),
        ("messages", {"tests": "  \n"}, "empty_content", "tests"),
        (
            "verl",
            {"reward_model": {"style": "python_eval", "ground_truth": "x = 1", "tests": {}}},
            "wrong_type",
            "reward_model.tests",
        ),
    ],
)
def test_bad_tests_are_named(fmt: str, row: dict[str, Any], reason: str, field: str) -> None:
    problem = humaneval()[0]
    base = messages_row(problem) if fmt == "messages" else verl_row(problem)
    with pytest.raises(RecordError) as caught:
        get_adapter(fmt).parse({**base, **row}, "rl")
    assert (caught.value.reason, caught.value.field) == (reason, field)


@pytest.mark.slow  # ten HumanEval problems through the sandbox, three runs each: about 5 s
def test_humaneval_seeds_certify_for_real() -> None:
    seeds = [
        Seed(r.verifier, r.answer, r.prompt, r.tests)  # type: ignore[arg-type]
        for r in records(humaneval()[:10])
    ]
    results = certify_many(seeds, runs=3, workers=2)
    assert [(c.ok, c.reason, c.gold_scores, c.perturbed_score, c.version) for c in results] == [
        (True, None, [1.0, 1.0, 1.0], 0.0, VERIFIER_VERSIONS["python_eval"])
    ] * 10
    # The same seeds without their tests cannot be certified, as before the formats carried them.
    untested = certify_many([Seed(s.verifier, s.gold) for s in seeds[:2]], runs=3, workers=2)
    assert [(c.ok, c.reason) for c in untested] == [(False, "no_tests")] * 2


@pytest.mark.slow  # ten HumanEval problems through the sandbox: about 2 s
def test_wrong_humaneval_solutions_are_rejected() -> None:
    problems = humaneval()[:10]
    for problem in problems:
        # The canonical solution with its result replaced by a plausible wrong one of the same type.
        wrong = solution(problem) + (
            f"\n_right = {problem['entry_point']}\n"
            f"def {problem['entry_point']}(*args, **kwargs):\n"
            "    result = _right(*args, **kwargs)\n"
            "    if isinstance(result, bool):\n        return not result\n"
            "    if isinstance(result, (int, float)):\n        return result + 1\n"
            "    if isinstance(result, str):\n        return result + 'x'\n"
            "    if isinstance(result, (list, tuple)):\n        return result + type(result)([None])\n"
            "    return None\n"
        )
        assert score("python_eval", wrong, "", tests=humaneval_tests(problem)) == Score(0.0, "tests_failed"), problem[
            "task_id"
        ]
    (rejected,) = certify_many(
        [
            Seed(
                "python_eval",
                "def has_close_elements(numbers, threshold):\n    return False\n",
                tests=humaneval_tests(problems[0]),
            )
        ]
    )
    assert (rejected.ok, rejected.reason, rejected.gold_scores) == (False, "gold_not_accepted", [0.0] * 3)
