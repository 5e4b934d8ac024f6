"""Verifiers (exact_match, numeric, math, python_eval), perturbations and seed certification."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from posttrain_assets.records.adapters import VERIFIERS as ADAPTER_VERIFIERS
from posttrain_assets.records.formats import get_adapter
from posttrain_assets.rl import sandbox
from posttrain_assets.rl import verifiers as v
from posttrain_assets.rl.sandbox import ALLOW_UNISOLATED_ENV, run_untrusted
from posttrain_assets.rl.verifiers import (
    Score,
    Seed,
    certify,
    certify_many,
    judge,
    parse_number,
    perturb_answer,
    render_answer,
    score,
)
from posttrain_assets_tests.real_data import PROJECT_ROOT, REAL_DATA

# A power tower sympy tries to evaluate exactly: it never finishes.
HANGING_LATEX = r"2^{2^{2^{2^{2^{10}}}}}"


def test_registry_matches_the_verifiers_rows_can_name() -> None:
    assert sorted(v.VERIFIERS) == sorted(ADAPTER_VERIFIERS)
    assert v.VERIFIER_VERSIONS == {
        "exact_match": "1",
        "numeric": "1",
        "math": "1+math-verify-0.9.0",
        "python_eval": "3",  # 3: the tests run in a judge process the candidate cannot reach
    }


def test_unknown_verifier_scores_zero() -> None:
    assert score("regex", "a", "a") == Score(0.0, "unknown_verifier")


# --------------------------------------------------------------------------- numeric


@pytest.mark.parametrize(
    ("candidate", "gold", "expected"),
    [
        ("Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72", "72", Score(1.0)),
        ("#### 1,234", "1234", Score(1.0)),
        ("#### 1,234", "1,234", Score(1.0)),
        ("She earned $18.00 in total.", "18", Score(1.0)),
        ("The temperature fell to -5 degrees", "-5", Score(1.0)),
        ("The change is \u22125", "-5", Score(1.0)),
        ("She lost -$5 on the deal", "-5", Score(1.0)),
        ("72 clips", "72", Score(1.0)),
        ("18.0", "18", Score(1.0)),
        ("It is 50% of the total", "50", Score(1.0)),
        ("3/4 of the pie", "0.75", Score(1.0)),
        ("Step 10-5 gives 5", "5", Score(1.0)),
        ("10-5", "5", Score(1.0)),
        ("The answer is \\boxed{72}. Checked 3 times.", "72", Score(1.0)),
        ("#### 72\nI used 3 steps.", "72", Score(1.0)),
        ("1e3", "1000", Score(1.0)),
        ("It is 72.", "72", Score(1.0)),
        ("#### 73", "72", Score(0.0, "wrong_answer")),
        ("The answer is 7.2", "72", Score(0.0, "wrong_answer")),
        ("She had 72 clips, then sold 3", "72", Score(0.0, "wrong_answer")),
        ("0.333", "1/3", Score(0.0, "wrong_answer")),
        ("-72", "72", Score(0.0, "wrong_answer")),
        ("#### seventy-two", "72", Score(0.0, "no_answer")),
        ("I don't know", "72", Score(0.0, "no_answer")),
        ("72", "seventy-two", Score(0.0, "gold_unparseable")),
    ],
)
def test_numeric(candidate: str, gold: str, expected: Score) -> None:
    assert score("numeric", candidate, gold) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234,567", Fraction(1234567)),
        ("$1,000.50", Fraction(2001, 2)),
        ("12,34", Fraction(34)),
        ("3 / 4", Fraction(3, 4)),
        ("1/0", None),
        (".5", Fraction(1, 2)),
        ("+7", Fraction(7)),
        ("2.5e-1", Fraction(1, 4)),
        ("", None),
    ],
)
def test_parse_number(text: str, expected: Fraction | None) -> None:
    assert parse_number(text) == expected


def test_numeric_on_real_gsm8k_solutions() -> None:
    # The worked solutions of the first 200 train rows, scored against their own gold answers.
    adapter = get_adapter("gsm8k")
    with (REAL_DATA / "gsm8k" / "train.jsonl").open(encoding="utf-8") as fh:
        rows = [json.loads(next(fh)) for _ in range(200)]
    records = [adapter.parse(row, "rl") for row in rows]
    assert sum(score("numeric", r.extra["solution"], r.answer).value for r in records) == 200
    assert sum(score("numeric", r.extra["solution"], str(int(r.answer) + 1)).value for r in records) == 0


# --------------------------------------------------------------------------- exact_match


@pytest.mark.parametrize(
    ("candidate", "gold", "expected"),
    [
        ('  "PARIS." ', "Paris", Score(1.0)),
        ("The   Eiffel\nTower!", "the eiffel tower", Score(1.0)),
        ("\uff30\uff41\uff52\uff49\uff53", "paris", Score(1.0)),  # full-width letters (NFKC)
        ("STRASSE", "stra\u00dfe", Score(1.0)),  # casefold
        ("'(B)'", "b", Score(1.0)),
        ("Reasoning...\n#### Paris", "Paris", Score(1.0)),
        ("so \\boxed{Paris}", "Paris", Score(1.0)),
        ("Paris, France", "Paris", Score(0.0, "wrong_answer")),
        ("Pa ris", "Paris", Score(0.0, "wrong_answer")),
        ("...", "Paris", Score(0.0, "no_answer")),
    ],
)
def test_exact_match(candidate: str, gold: str, expected: Score) -> None:
    assert score("exact_match", candidate, gold) == expected


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    ("candidate", "gold", "expected"),
    [
        (r"So the answer is $\boxed{\frac{1}{2}}$.", "0.5", Score(1.0)),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", Score(1.0)),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\sin(\pi/3)", Score(1.0)),
        (r"first \boxed{3}, finally \boxed{\dfrac{3}{4}}", "0.75", Score(1.0)),
        (r"\boxed{\left\{ 1, 2 \right\}}", r"\{2,1\}", Score(1.0)),
        (r"\boxed{x = 5}", "5", Score(1.0)),
        ("The answer is $\\frac{1}{2}$", r"\frac12", Score(1.0)),
        (r"\boxed{3}", "4", Score(0.0, "wrong_answer")),
        (r"\boxed{\frac{1}{2}+1}", r"\frac{1}{2}", Score(0.0, "wrong_answer")),
        (r"\boxed{2\sqrt{3}}", r"\sqrt{8}", Score(0.0, "wrong_answer")),
        ("I have no idea", "4", Score(0.0, "no_answer")),
    ],
)
def test_math(candidate: str, gold: str, expected: Score) -> None:
    assert score("math", candidate, gold) == expected


INTEGER_PAIRS = [
    (r"The final answer is $\boxed{144763}$.", "144763"),
    (r"\boxed{ -12 }", "-12"),
    (r"\boxed{007}", "7"),
    (r"\boxed{-0}", "0"),
    (r"\boxed{12}", "13"),
    (r"\boxed{-5}", "5"),
    (r"first \boxed{4}, then \boxed{40}", "4"),
]


@pytest.mark.parametrize(("candidate", "gold"), INTEGER_PAIRS)
def test_integer_answers_are_scored_without_the_worker_as_math_verify_would(
    candidate: str, gold: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok, reason = v._math_compare(candidate, gold)  # math-verify itself, in this process

    def no_worker(*_args):
        raise AssertionError("an integer pair went to the math worker")

    monkeypatch.setattr(v, "_math_verdicts", no_worker)
    assert score("math", candidate, gold) == (Score(1.0) if ok else Score(0.0, reason))


def test_math_timeout_is_bounded_and_the_pool_recovers() -> None:
    start = time.monotonic()
    assert score("math", rf"\boxed{{{HANGING_LATEX}}}", "3", timeout_seconds=1) == Score(0.0, "timeout")
    assert time.monotonic() - start < 4
    assert score("math", r"\boxed{\frac{1}{2}}", "0.5") == Score(1.0)


@pytest.mark.slow  # waits out a wall-clock or CPU limit: seconds by design
def test_math_hang_inside_c_code_is_bounded_too() -> None:
    # sympy evaluates 10^(10^10) as one long-integer power, in C: no signal handler (math-verify's SIGALRM
    # timeout) runs until it returns, minutes later; only killing the worker stops it.
    assert score("math", r"\boxed{10^{10^{10^{10}}}}", "3", timeout_seconds=1) == Score(0.0, "timeout")
    assert score("math", r"\boxed{\frac{1}{2}}", "0.5") == Score(1.0)


@pytest.mark.slow  # waits out a wall-clock limit several times: seconds by design
def test_math_pairs_get_the_verdicts_they_get_alone_whatever_the_task_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hanging comparison makes its task overrun; the task's pairs are then compared again one per task, so only
    # the hanging one times out and the others keep their own verdicts, with tasks of any size.
    pairs = [
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (rf"\boxed{{{HANGING_LATEX}}}", "3"),
        (r"\boxed{2\sqrt{3}}", r"\sqrt{8}"),
        (r"\boxed{12}", "12"),
        ("I have no idea", "4"),
    ]
    expected = [Score(1.0), Score(0.0, "timeout"), Score(0.0, "wrong_answer"), Score(1.0), Score(0.0, "no_answer")]
    map_batches = v.map_batches
    sent: list[int] = []  # the pairs sent to the workers in each call

    def counting(fn: Callable[[Any, Any], Any], shared: Any, items: Any, workers: int, **options: Any) -> Any:
        items = list(items)
        sent.append(sum(len(item) if fn is v._math_task_verdicts else 1 for item in items))
        return map_batches(fn, shared, items, workers, **options)

    monkeypatch.setattr(v, "map_batches", counting)
    for pairs_per_task in (1, 2, 32):
        sent.clear()
        monkeypatch.setattr(v, "MATH_PAIRS_PER_TASK", pairs_per_task)
        assert v._math_verdicts(pairs, 1.0, 2) == expected, pairs_per_task
        assert sent[0] == 5, pairs_per_task
        # The hanging pair's task overran: its pairs were compared again, alone (a task of one pair is alone).
        assert len(sent) == (1 if pairs_per_task == 1 else 2), pairs_per_task
    # Without a hang and with a limit no task nears, every pair is compared once, in its task...
    sent.clear()
    monkeypatch.setattr(v, "MATH_TASK_BUDGET_SHARE", 1.0)
    assert v._math_verdicts(pairs[2:], 60.0, 2) == expected[2:]
    assert sent == [3]
    # ... and a task that has used its share of the limit leaves its other pairs to be compared alone: with no
    # share at all, a task compares its first pair only, and the verdicts are the same.
    sent.clear()
    monkeypatch.setattr(v, "MATH_TASK_BUDGET_SHARE", 0.0)
    assert v._math_verdicts(pairs[2:], 60.0, 2) == expected[2:]
    assert sent == [3, 2]


def test_math_from_threads() -> None:
    cases = [(rf"\boxed{{\frac{{{i}}}{{2}}}}", str(i / 2)) for i in range(6)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda case: score("math", *case), cases))
    assert results == [Score(1.0)] * 6


# --------------------------------------------------------------------------- python_eval

SOLUTION = "def double(x):\n    return 2 * x\n"
TESTS = "assert double(2) == 4\nassert double(-3) == -6\n"


@pytest.mark.parametrize(
    ("candidate", "tests", "expected"),
    [
        (SOLUTION, TESTS, Score(1.0)),
        ("def double(x):\n    return x + 2\n", TESTS, Score(0.0, "tests_failed")),
        ("def double(x):\n    raise ValueError\n", TESTS, Score(0.0, "tests_failed")),
        ("def double(x)\n    return 2 * x\n", TESTS, Score(0.0, "tests_failed")),  # syntax error
        ("import sys\nsys.exit(0)\n", "assert False\n", Score(0.0, "early_exit")),
        ("import os\nos._exit(0)\n", "assert False\n", Score(0.0, "early_exit")),
        ("print('noise', end='')\n" + SOLUTION, TESTS, Score(1.0)),
        ("x = []\nwhile True:\n    x.append(' ' * 10**6)\n", TESTS, Score(0.0, "memory")),
        ("import os\nos.abort()\n", TESTS, Score(0.0, "crash")),
        (SOLUTION, "", Score(0.0, "no_tests")),
    ],
)
def test_python_eval(candidate: str, tests: str, expected: Score) -> None:
    assert score("python_eval", candidate, "", tests=tests) == expected


@pytest.mark.slow  # waits out a wall-clock or CPU limit: seconds by design
def test_python_eval_infinite_loop_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v, "PYTHON_EVAL_CPU_SECONDS", 1)
    assert score("python_eval", "while True:\n    pass\n", "", tests=TESTS) == Score(0.0, "timeout")


def test_python_eval_writing_outside_its_directory_scores_zero() -> None:
    folder = Path(tempfile.mkdtemp(prefix="posttrain-escape-"))
    folder.chmod(0o777)  # world-writable: only the sandbox's private root keeps the code out
    try:
        for target in (repr(str(folder / "escape.txt")), "os.path.join(os.path.dirname(os.getcwd()), 'escape.txt')"):
            candidate = f"import os\nopen({target}, 'w').write('escaped')\n" + SOLUTION
            assert score("python_eval", candidate, "", tests=TESTS) == Score(0.0, "tests_failed")
            result = run_untrusted(candidate + TESTS)
            assert result.status == "error"
            assert "No such file or directory" in result.stderr or "Read-only file system" in result.stderr
        assert list(folder.iterdir()) == []
        # Writing inside its own working directory is fine.
        inside = "open('scratch.txt', 'w').write('ok')\n" + SOLUTION
        assert score("python_eval", inside, "", tests=TESTS) == Score(1.0)
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


def test_python_eval_passes_plain_data_both_ways_and_in_place_changes_back() -> None:
    solution = (
        "import math\n"
        "LIMIT = 10\n"
        "def stats(xs, *, scale=1):\n"
        "    xs.sort()\n"
        "    return {'n': len(xs), 'mean': sum(xs) / len(xs) * scale, 'set': frozenset(xs), 'pair': (xs[0], None)}\n"
        "def big():\n"
        "    return 3 ** 200, b'\\x00\\xff', complex(1, -2), float('inf'), {(1, 2): [True]}\n"
        "def fails(kind):\n"
        "    raise {'key': KeyError, 'value': ValueError}[kind]('no')\n"
        "def apply(fn, x):\n"
        "    return fn(x) + 1\n"
        "def square(x):\n"
        "    return x * x\n"
    )
    tests = (
        "xs = [3, 1, 2]\n"
        "assert stats(xs, scale=2) == {'n': 3, 'mean': 4.0, 'set': frozenset({1, 2, 3}), 'pair': (1, None)}\n"
        "assert xs == [1, 2, 3]\n"  # sorted in place by the solution
        "assert big() == (3 ** 200, b'\\x00\\xff', 1 - 2j, float('inf'), {(1, 2): [True]})\n"
        "assert LIMIT == 10\n"
        "for kind, error in (('key', KeyError), ('value', ValueError)):\n"
        "    try:\n        fails(kind)\n        raise AssertionError('no exception')\n"
        "    except error:\n        pass\n"
        "assert apply(square, 3) == 10\n"  # the solution's own function, passed by name
        "def cube(x):\n    return x ** 3\n"
        "try:\n    apply(cube, 3)\n    raise AssertionError('a callable of the tests was passed')\n"
        "except TypeError as exc:\n    assert 'plain data' in str(exc)\n"
    )
    assert score("python_eval", solution, "", tests=tests) == Score(1.0)


# Attacks on the verdict: (candidate, tests, reason it must score 0.0 with[, a correct solution that passes the
# same tests]). The first seven scored 1.0 when the candidate ran in the harness's own process and namespace (the
# harness printed a per-run token after the tests); the others failed then too, and must keep failing.
WRONG = 'def f():\n    return "wrong"\n'
RIGHT = "def f():\n    return 1\n"
ATTACKS: dict[str, tuple[str, ...]] = {
    # Finding: rebinding exec in the shared namespace made the harness skip the tests.
    "rebinds exec": ("exec = lambda *a, **k: None\n" + WRONG, "assert f() == 1\n", "tests_failed"),
    # Finding: the harness's success token was readable from its frame; print whatever looks like one and leave
    # before the tests.
    "reads the token from the frames": (
        "import os, re, sys\n"
        "frame = sys._getframe()\n"
        "while frame is not None:\n"
        "    for value in list(frame.f_locals.values()):\n"
        "        if isinstance(value, str) and re.fullmatch('[0-9a-f]{32}', value):\n"
        "            print(); print(value)\n"
        "    frame = frame.f_back\n"
        "sys.stdout.flush()\nos._exit(0)\n",
        "assert f() == 1\n",
        "early_exit",
    ),
    # Finding: an object equal to everything passed every == assertion.
    "returns an always-equal object": (
        "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
        "def f():\n    return Anything()\n",
        "assert f() == 1\nassert 1 == f()\n",
        "unsupported_value",
    ),
    "returns an always-true object": (
        "class Yes:\n    def __bool__(self):\n        return True\ndef f():\n    return Yes()\n",
        "assert f()\n",
        "unsupported_value",
    ),
    "patches the builtins the harness uses": (
        "import builtins\n"
        "real_compile = builtins.compile\n"
        "builtins.compile = lambda *a, **k: real_compile('pass', 'x', 'exec')\n" + WRONG,
        "assert f() == 1\n",
        "tests_failed",
    ),
    "shadows the builtins the tests use": (
        "def all(*a, **k):\n    return True\n" + WRONG,
        "assert all([f() == 1])\n",
        "tests_failed",
    ),
    "ends the tests' iteration with StopIteration": (
        "def f(x):\n    raise StopIteration\n",
        "assert all(map(f, [1, 2, 3]))\nassert list(iter(lambda: f(0), False)) == []\n",
        "tests_failed",
        "def f(x):\n    return x > 0\n",
    ),
    "prints a fake success and exits 0 early": (
        "print('pass')\nprint('OK', flush=True)\nraise SystemExit(0)\n",
        "assert f() == 1\n",
        "early_exit",
    ),
    "raises SystemExit(0) from __del__ and a thread": (
        "import threading, time\n"
        "class Bye:\n    def __del__(self):\n        raise SystemExit(0)\n"
        "keep = Bye()\n"
        "def later():\n    time.sleep(0.2)\n    raise SystemExit(0)\n"
        "threading.Thread(target=later, daemon=False).start()\n" + WRONG,
        "assert f() == 1\n",
        "tests_failed",
    ),
    "writes a verdict to every descriptor": (
        "import os, threading\n"
        "def spam():\n"
        "    for fd in range(64):\n"
        "        try:\n            os.write(fd, b'pass\\n')\n"
        "        except OSError:\n            pass\n"
        "spam()\nthreading.Thread(target=spam).start()\n" + WRONG,
        "assert f() == 1\n",
        "protocol_error",
    ),
    "signals every process it can name": (
        "import sys\nsys.meta_path.pop(0)\ndel sys.modules['posix']\nimport posix\n"
        "for pid in range(1, 200):\n"
        "    try:\n        posix.kill(pid, 9) if pid != posix.getpid() else None\n"
        "    except OSError:\n        pass\n" + WRONG,
        "assert f() == 1\n",
        "tests_failed",
    ),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_python_eval_verdict_cannot_be_forged(name: str) -> None:
    candidate, tests, reason, *correct = ATTACKS[name]
    assert score("python_eval", candidate, "", tests=tests) == Score(0.0, reason)
    # A genuinely correct solution still passes the same tests.
    assert score("python_eval", correct[0] if correct else RIGHT, "", tests=tests) == Score(1.0)


def test_python_eval_refuses_to_run_without_isolation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTTRAIN_SANDBOX_UNSHARE", "0")
    monkeypatch.delenv(ALLOW_UNISOLATED_ENV, raising=False)
    monkeypatch.setattr(sandbox, "_isolation", None)
    assert score("python_eval", SOLUTION, "", tests=TESTS) == Score(0.0, "sandbox_unavailable")
    (certified,) = certify_many([Seed("python_eval", SOLUTION, tests=TESTS)], runs=3, workers=1)
    assert (certified.ok, certified.reason, certified.gold_scores) == (False, "sandbox_unavailable", [0.0] * 3)
    monkeypatch.setenv(ALLOW_UNISOLATED_ENV, "1")  # the documented opt-in
    assert score("python_eval", SOLUTION, "", tests=TESTS) == Score(1.0)
    monkeypatch.setattr(sandbox, "_isolation", None)


# --------------------------------------------------------------------------- perturbation


def test_render_and_perturb_answers() -> None:
    assert render_answer("numeric", "72") == "#### 72"
    assert render_answer("math", r"\frac{1}{2}") == r"The final answer is $\boxed{\frac{1}{2}}$."
    assert render_answer("exact_match", "Paris") == "Paris"
    assert perturb_answer("numeric", "72") == "#### 73"
    assert perturb_answer("numeric", "-0.25") == "#### 0.75"
    assert perturb_answer("numeric", "1/3") == "#### 4/3"
    assert perturb_answer("numeric", "n/a") == "#### none"
    assert perturb_answer("math", r"\frac{1}{2}") == r"The final answer is $\boxed{\frac{1}{2}+1}$."
    assert perturb_answer("math", r"-\infty") == r"The final answer is $\boxed{0}$."
    assert perturb_answer("exact_match", "Paris") == "not Paris"
    assert perturb_answer("python_eval", SOLUTION).startswith(SOLUTION)


@pytest.mark.parametrize(
    ("verifier", "gold", "tests"),
    [
        ("numeric", "1234", None),
        ("numeric", "-2.5", None),
        ("math", r"\frac{1}{2}", None),
        ("math", "x=5", None),
        ("math", r"\infty", None),
        ("exact_match", "Paris", None),
        ("python_eval", SOLUTION, TESTS),
        ("python_eval", SOLUTION, "assert double(1) != 0\nassert not double(0)\n"),
    ],
)
def test_gold_scores_one_and_perturbation_scores_zero(verifier: str, gold: str, tests: str | None) -> None:
    assert score(verifier, render_answer(verifier, gold), gold, tests=tests) == Score(1.0)
    assert score(verifier, perturb_answer(verifier, gold), gold, tests=tests).value == 0.0


# --------------------------------------------------------------------------- certification


def test_certify_first_200_gsm8k_train_rows() -> None:
    adapter = get_adapter("gsm8k")
    with (REAL_DATA / "gsm8k" / "train.jsonl").open(encoding="utf-8") as fh:
        rows = [json.loads(next(fh)) for _ in range(200)]
    records = [adapter.parse(row, "rl") for row in rows]
    seeds = [{"verifier": r.verifier, "answer": r.answer, "prompt": r.prompt} for r in records]
    results = certify_many(seeds, runs=3, workers=2)
    assert len(results) == 200
    assert sum(c.ok for c in results) == 200
    assert {(c.reason, tuple(c.gold_scores), c.perturbed_score, c.version) for c in results} == {
        (None, (1.0, 1.0, 1.0), 0.0, "1")
    }


def test_certify_every_gsm8k_train_row() -> None:
    # The gold answer of every one of the 7,473 train rows is certified with the numeric verifier.
    adapter = get_adapter("gsm8k")
    with (REAL_DATA / "gsm8k" / "train.jsonl").open(encoding="utf-8") as fh:
        records = [adapter.parse(json.loads(line), "rl") for line in fh if line.strip()]
    assert len(records) == 7473
    assert {r.verifier for r in records} == {"numeric"}
    seeds = [{"verifier": r.verifier, "answer": r.answer, "prompt": r.prompt} for r in records]
    start = time.monotonic()
    results = certify_many(seeds, runs=3, workers=2)
    took = time.monotonic() - start
    failures = [(r.answer, c.reason) for r, c in zip(records, results, strict=True) if not c.ok]
    assert failures == []
    assert sum(c.ok for c in results) == 7473
    assert {(tuple(c.gold_scores), c.perturbed_score, c.version) for c in results} == {((1.0, 1.0, 1.0), 0.0, "1")}
    assert took < 60


def test_certify_one_seed_of_each_verifier() -> None:
    results = certify_many(
        [
            Seed("numeric", "1,080"),
            Seed("math", r"\frac{\sqrt{3}}{2}"),
            Seed("exact_match", "Paris"),
            Seed("python_eval", SOLUTION, tests=TESTS),
        ]
    )
    assert [(c.ok, c.reason, c.gold_scores, c.perturbed_score) for c in results] == [
        (True, None, [1.0, 1.0, 1.0], 0.0)
    ] * 4


def test_certification_batches_cover_every_seed_once_in_bounded_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    assert v.certification_batches(0, 2) == []
    assert v.certification_batches(1, 2) == [(0, 1)]
    assert v.certification_batches(5, 2) == [(0, 2), (2, 5)]
    batches = v.certification_batches(450_000, 2)
    assert len(batches) == 18
    assert batches[0][0] == 0 and batches[-1][1] == 450_000
    assert all(end == nxt for (_, end), (nxt, _) in zip(batches, batches[1:], strict=False))
    assert {end - first for first, end in batches} == {25_000}
    monkeypatch.setattr(v, "SEEDS_PER_BATCH", 3)
    assert v.certification_batches(7, 2) == [(0, 2), (2, 4), (4, 7)]


def scored_in(shared: tuple[Callable[[Any, Any], list[Score]], Any], jobs: list[Any]) -> tuple[int, list[Score]]:
    """A certification batch's scores and the process that scored them (runs in the batch's worker)."""
    score_jobs, timeout_seconds = shared
    return os.getpid(), score_jobs(timeout_seconds, jobs)


def test_certify_many_scores_each_batch_in_its_own_process_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v, "SEEDS_PER_BATCH", 3)
    batches: list[list[str]] = []
    processes: list[int] = []
    map_batches = v.map_batches

    def recording(fn: Callable[[Any, Any], Any], shared: Any, items: Any, workers: int, **options: Any) -> Any:
        items = list(items)
        batches.extend([str(job[2]) for job in jobs[::2]] for jobs in items)  # the gold answer of each seed
        for pid, scores in map_batches(scored_in, (fn, shared), items, workers, **options):
            processes.append(pid)
            yield scores

    monkeypatch.setattr(v, "map_batches", recording)
    seeds = [Seed("numeric", str(n)) for n in range(1, 8)]
    results = certify_many([*seeds[:3], Seed("no_such_verifier", "1"), *seeds[3:]], runs=3, workers=2)
    assert [(c.ok, c.reason, c.gold_scores, c.perturbed_score) for c in results] == [
        *[(True, None, [1.0, 1.0, 1.0], 0.0)] * 3,
        (False, "unknown_verifier", [], 0.0),
        *[(True, None, [1.0, 1.0, 1.0], 0.0)] * 4,
    ]
    # 7 known seeds in batches of at most 3, each batch scored once per run (9 processes).
    assert sorted(batches) == sorted([["1", "2"], ["3", "4"], ["5", "6", "7"]] * 3)
    assert len(set(processes)) == 9


def test_certify_gold_not_accepted() -> None:
    assert certify("numeric", "seventy-two").reason == "gold_not_accepted"
    wrong_tests = certify("python_eval", SOLUTION, tests="assert double(2) == 5\n")
    assert (wrong_tests.ok, wrong_tests.reason, wrong_tests.gold_scores) == (False, "gold_not_accepted", [0.0] * 3)


def test_certify_perturbation_accepted() -> None:
    result = certify("python_eval", SOLUTION, tests="assert True\n")
    assert (result.ok, result.reason, result.gold_scores, result.perturbed_score) == (
        False,
        "perturbation_accepted",
        [1.0, 1.0, 1.0],
        1.0,
    )


def test_certify_unknown_verifier() -> None:
    result = certify("regex", "a+")
    assert (result.ok, result.reason, result.gold_scores, result.version) == (False, "unknown_verifier", [], "")
    mixed = certify_many([Seed("regex", "a"), Seed("numeric", "5")])
    assert [c.reason for c in mixed] == ["unknown_verifier", None]


def first_run_differs(shared: tuple[Callable[[Any, Any], list[Score]], Any, str], jobs: list[Any]) -> list[Score]:
    """Score the batch with ``FIRST = True`` in its candidates in the first batch process to get here and
    ``FIRST = False`` in the others (runs in the batch's worker)."""
    score_jobs, timeout_seconds, folder = shared
    try:
        os.close(os.open(Path(folder) / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        first = True
    except FileExistsError:
        first = False
    changed = [(name, c.replace("FIRST = True", f"FIRST = {first}"), gold, t) for name, c, gold, t in jobs]
    return score_jobs(timeout_seconds, changed)


def test_certify_nondeterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sandbox sees nothing of the host, so what differs between the repetitions (separate processes, run one
    # after another with workers=1) is set from outside: the first batch process scores a candidate that passes,
    # the later ones one that fails.
    folder = Path(tempfile.mkdtemp(prefix="posttrain-marker-"))
    batches: list[int] = []
    map_batches = v.map_batches

    def marking(fn: Callable[[Any, Any], Any], shared: Any, items: Any, workers: int, **options: Any) -> Any:
        items = list(items)
        batches.extend(len(jobs) for jobs in items)
        return map_batches(first_run_differs, (fn, shared, str(folder)), items, workers, **options)

    monkeypatch.setattr(v, "map_batches", marking)
    try:
        result = certify("python_eval", "FIRST = True\n", tests="assert FIRST is True\n")
    finally:
        (folder / "claimed").unlink(missing_ok=True)
        folder.rmdir()
    assert batches == [2, 2, 2]
    assert (result.ok, result.reason, result.gold_scores) == (False, "nondeterministic", [1.0, 0.0, 0.0])


@pytest.mark.slow  # waits out a wall-clock or CPU limit: seconds by design
def test_certify_timeout() -> None:
    start = time.monotonic()
    seed = Seed("python_eval", "while True:\n    pass\n", tests="assert True\n")
    (result,) = certify_many([seed], runs=3, workers=3, timeout_seconds=1)
    assert (result.ok, result.reason, result.gold_scores, result.perturbed_score) == (
        False,
        "timeout",
        [0.0, 0.0, 0.0],
        0.0,
    )
    assert time.monotonic() - start < 20


def test_certify_needs_three_runs() -> None:
    with pytest.raises(ValueError, match="runs must be >= 3"):
        certify("numeric", "5", runs=2)


def test_judge_precedence() -> None:
    one, zero, late = Score(1.0), Score(0.0, "wrong_answer"), Score(0.0, "timeout")
    assert judge("1", [one, one, one], [zero, zero, zero]).ok is True
    assert judge("1", [one, late, one], [zero, zero, zero]).reason == "timeout"
    assert judge("1", [one, zero, one], [zero, zero, zero]).reason == "nondeterministic"
    assert judge("1", [one, one, one], [zero, one, zero]).reason == "nondeterministic"
    assert judge("1", [zero, zero, zero], [one, one, one]).reason == "gold_not_accepted"
    assert judge("1", [one, one, one], [one, one, one]).reason == "perturbation_accepted"


# --------------------------------------------------------------------------- command line


def test_score_command_line() -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "posttrain_assets.rl.verifiers", "score", "numeric", "so #### 1,234 dollars", "1234"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(done.stdout) == {"value": 1.0, "reason": None, "version": "1"}
