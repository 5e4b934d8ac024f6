"""Deterministic verifiers for the RLVR prompt bank, and certification of verifier seeds.

A verifier scores a model's response (``candidate``) against a seed's gold ``answer``:
:func:`score` returns a :class:`Score` whose ``value`` is exactly ``0.0`` or ``1.0``, with a reason code
when it is 0. Every verifier has a ``version`` (:data:`VERIFIER_VERSIONS`) that callers record on
every row; it changes whenever the verifier's behaviour does (for ``math`` it includes the
math-verify version, whose behaviour is part of it). Nothing here imports Dagster.

Verifiers (see each ``_score_*`` function for details):

- ``exact_match``: normalised text equality.
- ``numeric``: GSM8K-style final number, compared exactly as rationals.
- ``math``: final ``\\boxed{}`` (or last expression) compared symbolically with math-verify, in a worker
  process (:func:`posttrain_assets.parallel.map_batches`) killed at a wall-clock limit (``timeout``).
- ``python_eval``: the candidate program plus the seed's assert-based tests in :mod:`posttrain_assets.rl.sandbox`,
  the tests in a judge process of their own that the candidate cannot reach (:func:`_score_python_eval`).

Score reasons: ``no_answer`` (nothing to extract from the candidate), ``wrong_answer``,
``gold_unparseable``, ``timeout``, ``tests_failed``, ``no_tests``, ``early_exit``, ``unsupported_value``,
``protocol_error``, ``sandbox_unavailable``, ``memory``, ``crash``, ``unknown_verifier``, ``worker_failed``.

Certification (:func:`certify`, :func:`certify_many`) checks a seed before it enters the bank: its
gold answer must score 1.0 on ``runs`` repeated runs in separate processes, and a perturbed wrong
answer (:func:`perturb_answer`) must score 0.0.

Entry point: ``python -m posttrain_assets.rl.verifiers score VERIFIER CANDIDATE GOLD [--tests-file F]
[--timeout S]`` prints one JSON score.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from fractions import Fraction
from importlib import metadata
from itertools import pairwise
from pathlib import Path
from typing import Any

from posttrain_assets.parallel import TimeLimit, map_batches
from posttrain_assets.records.adapters import last_boxed
from posttrain_assets.rl import python_eval_harness
from posttrain_assets.rl.sandbox import SandboxResult, run_judged
from posttrain_assets.text import fold_bare

# Default wall-clock limit for one math comparison (seconds).
MATH_TIMEOUT_SECONDS = 5.0
# Sandbox limits for one python_eval run.
PYTHON_EVAL_CPU_SECONDS = 2
PYTHON_EVAL_WALL_SECONDS = 5.0
PYTHON_EVAL_MEMORY_MB = 256
# Address-space limit of a math worker process.
MATH_WORKER_MEMORY_MB = 4096
# Most seeds one certification batch (one worker process per run) scores: larger banks are split into more
# batches, so what travels to a worker and back stays bounded as the bank grows.
SEEDS_PER_BATCH = 25_000
# Math comparisons sent to a math worker at a time: a round trip to the worker costs about as much as comparing
# an integer answer (about 1 ms against 2 ms). Even, so a seed's gold and perturbed comparisons land in the same
# worker, where math-verify's own cache parses the gold once.
MATH_PAIRS_PER_TASK = 32
# A math task runs under the time limit of ONE comparison, so it stops taking its next pair once it has run this
# share of the limit (the rest goes to the next round): a cold worker's first comparisons cost up to 50x later ones
# (math-verify's LaTeX parser learns as it goes), and a task that overruns costs a wait of the whole limit.
MATH_TASK_BUDGET_SHARE = 0.25


@dataclass(frozen=True)
class Score:
    """A verifier's verdict: ``value`` is 0.0 or 1.0; ``reason`` is None for 1.0, else a reason code."""

    value: float
    reason: str | None = None


ScoreFn = Callable[[str, str, "str | None", "float | None"], Score]


@dataclass(frozen=True)
class Verifier:
    """A registered verifier: ``fn(candidate, gold, tests, timeout_seconds) -> Score`` (None: its default)."""

    name: str
    version: str
    fn: ScoreFn
    description: str


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


# --------------------------------------------------------------------------- answer extraction


def _final_segment(text: str) -> str | None:
    """The final-answer part of a response: after the last ``####``, else the last ``\\boxed{}``, else None."""
    if "####" in text:
        return text.rsplit("####", 1)[1]
    return last_boxed(text)


_NUMBER_RE = re.compile(
    r"""
    (?:(?<![\w)\]}.])(?P<sign>[-+\u2212])\s?)?   # a sign not glued to a preceding operand ("10-5" is 5)
    (?<![\d.])                                  # not inside another number
    (?:[$\u20ac\u00a3\u00a5]\s?)?               # currency
    (?P<sign2>[-+\u2212])?                      # "$-5"
    (?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)
    (?:[eE](?P<exp>[-+]?\d+))?
    (?:\s?/\s?(?P<den>\d+(?:\.\d+)?)(?![\d.]))?
    """,
    re.VERBOSE,
)


def _numbers(text: str) -> list[Fraction]:
    """Every number in ``text``, in order, as exact rationals (see :func:`_score_numeric`)."""
    values: list[Fraction] = []
    for match in _NUMBER_RE.finditer(text):
        literal = match["num"].replace(",", "")
        if match["exp"] is not None:
            if abs(int(match["exp"])) > 1000:
                continue
            literal += "e" + match["exp"]
        value = Fraction(literal)
        if match["den"] is not None:
            den = Fraction(match["den"])
            if den == 0:
                continue
            value /= den
        if "-" in (match["sign"] or "") + (match["sign2"] or "") or "\u2212" in (match["sign"] or "") + (
            match["sign2"] or ""
        ):
            value = -value
        values.append(value)
    return values


def parse_number(text: str) -> Fraction | None:
    """The final number of a response as an exact rational, or None (see :func:`_score_numeric`)."""
    text = unicodedata.normalize("NFKC", text)
    segment = _final_segment(text)
    if segment is not None and "####" in text:
        found = _numbers(segment)
        return found[0] if found else None
    found = _numbers(segment) if segment is not None else []
    if not found:
        found = _numbers(text)
    return found[-1] if found else None


def _format_number(value: Fraction) -> str:
    """``value`` as a plain literal: an integer, a terminating decimal, or ``p/q``."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for prime in (2, 5):
        while den % prime == 0:
            den //= prime
    if den == 1:
        digits = 0
        scaled = value
        while scaled.denominator != 1:
            scaled *= 10
            digits += 1
        sign = "-" if scaled < 0 else ""
        body = str(abs(scaled.numerator)).rjust(digits + 1, "0")
        return f"{sign}{body[:-digits]}.{body[-digits:]}"
    return f"{value.numerator}/{value.denominator}"


# --------------------------------------------------------------------------- exact_match and numeric


def _score_exact_match(candidate: str, gold: str, tests: str | None, timeout_seconds: float | None) -> Score:
    """Normalised equality of the candidate's final answer and the gold answer.

    The candidate's final answer is the text after its last ``####``, else the content of its last
    ``\\boxed{}``, else the whole candidate. Both sides go through :func:`posttrain_assets.text.fold_bare`
    (NFKC, casefold, whitespace collapsed, punctuation stripped at both ends).
    """
    segment = _final_segment(candidate)
    answer = fold_bare(segment if segment is not None else candidate)
    if not answer:
        return Score(0.0, "no_answer")
    return Score(1.0) if answer == fold_bare(gold) else Score(0.0, "wrong_answer")


def _score_numeric(candidate: str, gold: str, tests: str | None, timeout_seconds: float | None) -> Score:
    """GSM8K-style: the candidate's final number equals the gold number exactly (as rationals).

    The final number is the first number after the last ``####`` if there is one; else the last number
    inside the last ``\\boxed{}``; else the last number in the text. Numbers may carry a sign (``-``,
    ``+``, U+2212; a ``-`` glued to a preceding operand as in ``10-5`` is subtraction, not a sign),
    a currency sign (``$5``, ``-$5``, ``$-5``), thousands separators in groups of three (``1,234``),
    decimals (``18.00`` == ``18``; ``.5``), an exponent (``1e5``) and a fraction (``3/4`` == ``0.75``;
    so a date ``3/4`` is read as 0.75). ``%``, units and words after the number are ignored (``50%``
    is 50, as GSM8K golds write it). No float is involved: ``0.1+0.2``-style rounding cannot happen,
    and ``0.333`` is not ``1/3``. The gold is read the same way.
    """
    expected = parse_number(gold)
    if expected is None:
        return Score(0.0, "gold_unparseable")
    got = parse_number(candidate)
    if got is None:
        return Score(0.0, "no_answer")
    return Score(1.0) if got == expected else Score(0.0, "wrong_answer")


# --------------------------------------------------------------------------- math (worker processes)


def _math_compare(candidate: str, gold: str) -> tuple[bool, str | None]:
    """Symbolic comparison with math-verify, in a math worker process (no timeout here: the caller has it)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(f"${gold}$", extraction_config=config, parsing_timeout=None)
    if not gold_parsed:
        return False, "gold_unparseable"
    boxed = last_boxed(candidate)
    text = f"${boxed}$" if boxed is not None else candidate
    cand_parsed = parse(text, extraction_config=config, parsing_timeout=None)
    if not cand_parsed:
        return False, "no_answer"
    if verify(gold_parsed, cand_parsed, timeout_seconds=None):
        return True, None
    return False, "wrong_answer"


_PLAIN_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: int() would also read other scripts' digits


def _integer_verdict(candidate: str, gold: str) -> Score | None:
    """The verdict on a boxed integer against an integer gold, without sympy (None for any other pair):
    math-verify finds two integers equal exactly when their values are."""
    boxed = last_boxed(candidate)
    if boxed is not None and _PLAIN_INTEGER.fullmatch(boxed.strip()) and _PLAIN_INTEGER.fullmatch(gold.strip()):
        return Score(1.0) if int(boxed) == int(gold) else Score(0.0, "wrong_answer")
    return None


_math_worker_prepared = False


def _prepare_math_worker() -> None:
    """Once per worker process: cap its address space, so a comparison that builds a huge number fails with
    MemoryError instead of taking the machine's memory, and silence math-verify's warning that its own timeouts
    are off (they use SIGALRM, which C code does not heed; the caller's time limit kills the worker instead)."""
    global _math_worker_prepared
    if _math_worker_prepared:
        return
    import logging
    import resource

    limit = MATH_WORKER_MEMORY_MB * 1024 * 1024
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.disable(logging.WARNING)
    _math_worker_prepared = True


def _math_verdict(_shared: None, pair: tuple[str, str]) -> Score:
    """The ``math`` verdict on ``(candidate, gold)``, in a math worker process (with no limit of its own)."""
    candidate, gold = pair
    verdict = _integer_verdict(candidate, gold)
    if verdict is not None:
        return verdict
    _prepare_math_worker()
    try:
        ok, reason = _math_compare(candidate, gold)
    except MemoryError:
        return Score(0.0, "memory")
    except Exception:  # noqa: BLE001 - any parser failure is a wrong answer, never a crash
        return Score(0.0, "no_answer")
    return Score(1.0) if ok else Score(0.0, reason)


def _math_task_verdicts(budget_seconds: float, pairs: tuple[tuple[str, str], ...]) -> list[Score]:
    """The ``math`` verdicts on the first of a task's ``(candidate, gold)`` pairs, in order, in a math worker
    process: the pairs it compared before it had run ``budget_seconds`` (at least one)."""
    started = time.monotonic()
    verdicts: list[Score] = []
    for pair in pairs:
        if verdicts and time.monotonic() - started >= budget_seconds:
            break
        verdicts.append(_math_verdict(None, pair))
    return verdicts


def _math_verdicts(pairs: Sequence[tuple[str, str]], timeout_seconds: float, processes: int) -> list[Score]:
    """The ``math`` verdicts on ``(candidate, gold)`` pairs, in order, compared in ``processes`` worker processes
    started for this call. A comparison still running after ``timeout_seconds`` scores ``timeout``: its worker is
    killed, which bounds it wherever this is called from (math-verify's own SIGALRM timeout works only in a
    process's main thread, and not at all while sympy is inside C code such as a huge integer power). A worker
    that dies of anything else raises ``BrokenProcessPool``.

    The pairs travel to the workers in tasks of up to :data:`MATH_PAIRS_PER_TASK` (one round trip to a worker per
    pair would cost about as much as comparing it), each task under the time limit of ONE comparison. A task
    compares pairs until it has run :data:`MATH_TASK_BUDGET_SHARE` of the limit. A task done in time did each of its
    comparisons in less than the limit, so its verdicts are the ones each pair gets alone. The pairs a task did not
    reach, and every pair of a task that overran (one comparison ran into the limit), are then compared one per
    task, each under the limit, in a second pool, so a pair scores ``timeout`` exactly when it overruns alone.
    Verdicts therefore do not depend on how the pairs are grouped into tasks (a timeout costs up to twice the
    limit's wait)."""
    verdicts: list[Score | None] = [None] * len(pairs)
    alone: list[int] = []  # the pairs left to compare one per task, by position
    tasks = [
        range(first, min(first + MATH_PAIRS_PER_TASK, len(pairs)))
        for first in range(0, len(pairs), MATH_PAIRS_PER_TASK)
    ]
    task_limit: TimeLimit[list[Score] | None] = TimeLimit(timeout_seconds, None)
    compared_in_tasks = map_batches(
        _math_task_verdicts,
        timeout_seconds * MATH_TASK_BUDGET_SHARE,
        [tuple(pairs[i] for i in task) for task in tasks],
        processes,
        time_limit=task_limit,
    )
    for task, compared in zip(tasks, compared_in_tasks, strict=True):
        if compared is None and len(task) == 1:  # it ran alone: its overrun is its own
            verdicts[task[0]] = Score(0.0, "timeout")
            continue
        done = [] if compared is None else compared  # an overrun: each of its pairs again, alone
        verdicts[task[0] : task[0] + len(done)] = done
        alone += task[len(done) :]
    if alone:
        alone_limit = TimeLimit(timeout_seconds, Score(0.0, "timeout"))
        compared_alone = map_batches(_math_verdict, None, [pairs[i] for i in alone], processes, time_limit=alone_limit)
        for i, verdict in zip(alone, compared_alone, strict=True):
            verdicts[i] = verdict
    scored = [verdict for verdict in verdicts if verdict is not None]
    if len(scored) != len(pairs):  # not an assert: it must hold under python -O too
        raise RuntimeError(f"math comparisons: {len(scored)} verdicts for {len(pairs)} pairs")
    return scored


def _score_math(candidate: str, gold: str, tests: str | None, timeout_seconds: float | None) -> Score:
    """Symbolic equality of the candidate's final answer and the gold (math-verify, sympy).

    The candidate's answer is the content of its last ``\\boxed{}`` (nested braces allowed); without a
    box, math-verify extracts the last LaTeX or plain expression of the text. The gold is parsed as a
    LaTeX expression. Equal means math-verify's ``verify(gold, answer)`` (symbolic equality, numeric
    equality after rounding to 6 decimal places, sets/intervals/equations handled). The comparison
    runs in a worker process (:func:`_math_verdicts`); if it takes longer than ``timeout_seconds`` (default
    :data:`MATH_TIMEOUT_SECONDS`) the worker is killed and the score is 0 with reason ``timeout``; a worker that
    dies otherwise scores ``worker_failed``.

    A boxed integer against an integer gold is compared here, without a worker (:func:`_integer_verdict`): a
    worker started for one comparison (about 40 ms) would be most of the cost of scoring it.
    """
    verdict = _integer_verdict(candidate, gold)
    if verdict is not None:
        return verdict
    try:
        (verdict,) = _math_verdicts(
            [(candidate, gold)], MATH_TIMEOUT_SECONDS if timeout_seconds is None else timeout_seconds, 1
        )
    except BrokenProcessPool:
        return Score(0.0, "worker_failed")
    return verdict


# --------------------------------------------------------------------------- python_eval

# The source of the two programs of a python_eval run (see that module): sent into the sandbox as text.
_HARNESS = Path(python_eval_harness.__file__).read_text(encoding="utf-8")
# The judge's verdict reasons that become score reasons as they are.
_JUDGE_REASONS = frozenset({"tests_failed", "early_exit", "unsupported_value", "memory", "protocol_error"})


def _score_python_eval(candidate: str, gold: str, tests: str | None, timeout_seconds: float | None) -> Score:
    """Run the candidate program and the seed's tests in the sandbox; 1.0 only if all the tests pass.

    ``tests`` is Python source with ``assert`` statements that call the candidate's functions by name. The candidate
    and the tests run in two processes of one sandbox (:func:`posttrain_assets.rl.sandbox.run_judged`, programs in
    :mod:`posttrain_assets.rl.python_eval_harness`): the candidate in its own process and uid, the tests in a judge
    process that calls the candidate's functions over a pipe with arguments and results as plain data, compares
    them itself and alone can report the verdict. So nothing the candidate does in its process (rebinding
    ``exec`` or builtins, walking frames, objects whose ``__eq__`` is always true, printing a fake success, exiting
    0 early, threads that outlive it) can make a test pass that its answers do not pass; a solution whose
    functions return something other than plain data scores ``unsupported_value``.

    The score is 1.0 exactly when the judge reports a pass. Otherwise the reason is, in this order:
    ``sandbox_unavailable`` (the sandbox cannot isolate here and running unisolated was not allowed: nothing ran),
    ``timeout`` (wall limit, or the candidate's CPU limit), ``memory``, ``crash`` (the candidate died of a signal),
    then the judge's: ``tests_failed``, ``early_exit`` (the candidate's process exited before answering),
    ``unsupported_value``, ``protocol_error``; ``crash`` if the judge gave none. ``gold`` (the reference solution)
    is not used when scoring. Limits: ``PYTHON_EVAL_*``; a given ``timeout_seconds`` replaces them: wall limit
    ``max(1, timeout_seconds)``, CPU limit its ceiling.
    """
    if not tests or not tests.strip():
        return Score(0.0, "no_tests")
    result = run_judged(
        f"{_HARNESS}\nserve_solution({candidate!r})\n",
        f"{_HARNESS}\nrun_tests({tests!r})\n",
        cpu_seconds=PYTHON_EVAL_CPU_SECONDS if timeout_seconds is None else max(1, math.ceil(timeout_seconds)),
        wall_seconds=PYTHON_EVAL_WALL_SECONDS if timeout_seconds is None else max(1.0, timeout_seconds),
        memory_mb=PYTHON_EVAL_MEMORY_MB,
    )
    return _python_eval_verdict(result)


def _python_eval_verdict(result: SandboxResult) -> Score:
    """The python_eval score of a judged sandbox run (see :func:`_score_python_eval` for the order of reasons)."""
    if result.status == "unavailable":
        return Score(0.0, "sandbox_unavailable")
    if result.verdict == "pass":
        return Score(1.0)
    for status in (result.status, result.judge_status):
        if status in ("timeout", "memory", "crash"):
            return Score(0.0, status)
    kind, _, reason = (result.verdict or "").partition(" ")
    if kind == "fail" and reason in _JUDGE_REASONS:
        return Score(0.0, reason)
    return Score(0.0, "crash")


# --------------------------------------------------------------------------- the registry


def _build_registry() -> dict[str, Verifier]:
    verifiers = [
        Verifier("exact_match", "1", _score_exact_match, "normalised text equality"),
        Verifier("numeric", "1", _score_numeric, "GSM8K-style final number, exact rational comparison"),
        Verifier(
            "math",
            f"1+math-verify-{_dist_version('math-verify')}",
            _score_math,
            "final \\boxed{} compared symbolically with math-verify, with a wall-clock limit",
        ),
        Verifier(
            "python_eval", "3", _score_python_eval, "candidate program + assert tests, judged apart, in the sandbox"
        ),
    ]
    return {v.name: v for v in verifiers}


VERIFIERS: dict[str, Verifier] = _build_registry()
VERIFIER_VERSIONS: dict[str, str] = {name: v.version for name, v in VERIFIERS.items()}


def get_verifier(name: str) -> Verifier | None:
    """The registered verifier called ``name``, or None."""
    return VERIFIERS.get(name)


def score(
    verifier_name: str,
    candidate: str,
    gold: str,
    *,
    tests: str | None = None,
    timeout_seconds: float | None = None,
) -> Score:
    """Score ``candidate`` against ``gold`` with the named verifier. Never raises for bad input.

    ``tests`` is used by ``python_eval`` only. ``timeout_seconds`` is the wall-clock limit of a math
    comparison (default :data:`MATH_TIMEOUT_SECONDS`) or of a python_eval run (default
    :data:`PYTHON_EVAL_WALL_SECONDS`, CPU limit :data:`PYTHON_EVAL_CPU_SECONDS`); the other verifiers
    are pure and fast and ignore it.
    An unknown verifier scores 0 with reason ``unknown_verifier``.
    """
    verifier = VERIFIERS.get(verifier_name)
    if verifier is None:
        return Score(0.0, "unknown_verifier")
    return verifier.fn(candidate, gold, tests, timeout_seconds)


# --------------------------------------------------------------------------- answers for certification


def render_answer(verifier_name: str, answer: str) -> str:
    """A response that states ``answer`` the way a model is asked to (what certification scores as gold).

    numeric: ``#### <answer>``; math: ``The final answer is $\\boxed{<answer>}$.``; exact_match and
    python_eval: the answer itself (for python_eval, the reference solution).
    """
    if verifier_name == "numeric":
        return f"#### {answer}"
    if verifier_name == "math":
        return f"The final answer is $\\boxed{{{answer}}}$."
    return answer


_SABOTAGE = '''


class _PosttrainPerturbed:
    """Stands in for every public name of the solution: any use of it raises."""

    def _fail(self, *args, **kwargs):
        raise RuntimeError("perturbed solution")

    __call__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __len__ = __iter__ = _fail
    __getattr__ = __getitem__ = __contains__ = __int__ = __float__ = __index__ = __str__ = __repr__ = _fail
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __hash__ = _fail


for _posttrain_name in [n for n in list(globals()) if not n.startswith("_")]:
    if type(globals()[_posttrain_name]).__name__ != "module":
        globals()[_posttrain_name] = _PosttrainPerturbed()
'''


def perturb_answer(verifier_name: str, gold: str) -> str:
    """A WRONG response for ``gold`` that a sound verifier must score 0.0 (rendered like :func:`render_answer`).

    - numeric: the gold number plus one (``#### 73`` for 72); an unreadable gold gives ``#### none``.
    - math: ``\\boxed{<gold>+1}`` (for an equation ``x=5`` that is ``x=5+1``); a gold mentioning
      ``\\infty`` (where ``+1`` changes nothing) gives ``\\boxed{0}``.
    - exact_match: ``not <gold>``.
    - python_eval: the reference solution followed by code that replaces each of its public names
      (functions, classes, values; not modules) with an object whose every use raises.
    """
    if verifier_name == "numeric":
        value = parse_number(gold)
        return "#### none" if value is None else f"#### {_format_number(value + 1)}"
    if verifier_name == "math":
        wrong = "0" if "infty" in gold else f"{gold}+1"
        return f"The final answer is $\\boxed{{{wrong}}}$."
    if verifier_name == "exact_match":
        return f"not {gold}"
    if verifier_name == "python_eval":
        return gold + _SABOTAGE
    return gold


# --------------------------------------------------------------------------- certification


@dataclass(frozen=True)
class Certification:
    """Whether a seed's verifier is trustworthy for it.

    ``gold_scores``: the gold answer's score in each run (one process per run); ``perturbed_score``: the
    perturbed wrong answer's score (first run). ``reason`` (None when ``ok``): ``unknown_verifier``,
    ``sandbox_unavailable`` (python_eval: the sandbox cannot isolate here, nothing ran), ``no_tests`` (python_eval:
    the seed has no tests), ``timeout`` (any run of either answer timed out), ``nondeterministic`` (runs disagree),
    ``gold_not_accepted``, ``perturbation_accepted``. ``version``: the verifier's version ("" if unknown).
    """

    ok: bool
    reason: str | None
    gold_scores: list[float]
    perturbed_score: float
    version: str


@dataclass(frozen=True)
class Seed:
    """A prompt-bank seed as certification sees it."""

    verifier: str
    gold: str
    prompt: str | None = None
    tests: str | None = None


SeedLike = Seed | Mapping[str, Any]


def _as_seed(seed: SeedLike) -> Seed:
    if isinstance(seed, Seed):
        return seed
    gold = seed.get("gold", seed.get("answer"))
    return Seed(str(seed["verifier"]), "" if gold is None else str(gold), seed.get("prompt"), seed.get("tests"))


def judge(
    version: str,
    gold: Sequence[Score],
    perturbed: Sequence[Score],
) -> Certification:
    """The certification verdict from the per-run scores of the gold and the perturbed answer."""
    gold_scores = [s.value for s in gold]
    perturbed_scores = [s.value for s in perturbed]
    first_perturbed = perturbed_scores[0] if perturbed_scores else 0.0
    reasons = {s.reason for s in (*gold, *perturbed)}
    reason: str | None = None
    if "sandbox_unavailable" in reasons:
        reason = "sandbox_unavailable"
    elif "no_tests" in reasons:
        reason = "no_tests"
    elif "timeout" in reasons:
        reason = "timeout"
    elif len(set(gold_scores)) > 1 or len(set(perturbed_scores)) > 1:
        reason = "nondeterministic"
    elif not gold_scores or gold_scores[0] != 1.0:
        reason = "gold_not_accepted"
    elif first_perturbed != 0.0:
        reason = "perturbation_accepted"
    return Certification(reason is None, reason, gold_scores, first_perturbed, version)


def certification_batches(seeds: int, workers: int) -> list[tuple[int, int]]:
    """``(first, end)`` seed ranges of the certification batches of one run: at least one per worker (when
    there are as many seeds), each of at most :data:`SEEDS_PER_BATCH` seeds, sizes within one of each other."""
    if seeds <= 0:
        return []
    n = max(min(workers, seeds), math.ceil(seeds / SEEDS_PER_BATCH))
    return list(pairwise(seeds * c // n for c in range(n + 1)))


# One scoring of a certification: verifier, candidate (the rendered gold or perturbed answer), gold, tests.
Job = tuple[str, str, str, str | None]


def _score_jobs(timeout_seconds: float | None, jobs: list[Job]) -> list[Score]:
    """The scores of a certification batch's jobs, in order (in the worker process started for the batch)."""
    return [score(v, c, g, tests=t, timeout_seconds=timeout_seconds) for v, c, g, t in jobs]


def certify_many(
    seeds: Iterable[SeedLike],
    runs: int = 3,
    workers: int = 2,
    *,
    timeout_seconds: float | None = None,
) -> list[Certification]:
    """Certify many seeds (``Seed`` objects or mappings with ``verifier``, ``gold``/``answer``, ``tests``).

    How "separate processes" is honoured: each seed's two jobs (its gold answer and its perturbed answer) are
    scored once per run, and no process scores a seed in more than one run. The jobs of ``math`` seeds are
    compared in math worker processes started for each run (``workers`` of them, each comparison killed at its
    time limit: :func:`_math_verdicts`). The other seeds' jobs are split into batches
    (:func:`certification_batches`: one per worker, more for banks over :data:`SEEDS_PER_BATCH` seeds), and each
    run of each batch is scored in a worker process started for it alone, ``workers`` at a time (each with its
    own sandboxes). The runs' scores are then compared per seed (:func:`judge`). The perturbed answer is scored in
    every run too, so its determinism is checked. A worker's error or death is raised here, not turned into
    verdicts, so no seed's verdict is lost silently.
    """
    if runs < 3:
        raise ValueError(f"runs must be >= 3, got {runs}")
    items = [_as_seed(s) for s in seeds]
    jobs: dict[int, tuple[Job, Job]] = {
        i: (
            (seed.verifier, render_answer(seed.verifier, seed.gold), seed.gold, seed.tests),
            (seed.verifier, perturb_answer(seed.verifier, seed.gold), seed.gold, seed.tests),
        )
        for i, seed in enumerate(items)
        if seed.verifier in VERIFIERS
    }
    compared = [i for i in jobs if items[i].verifier == "math"]
    batched = [i for i in jobs if items[i].verifier != "math"]
    batches = [
        [job for i in batched[first:end] for job in jobs[i]]
        for first, end in certification_batches(len(batched), workers)
    ]
    batch_scores = list(map_batches(_score_jobs, timeout_seconds, batches * runs, workers, fresh_process_per_item=True))
    math_pairs = [(candidate, gold) for i in compared for _verifier, candidate, gold, _tests in jobs[i]]
    math_timeout = MATH_TIMEOUT_SECONDS if timeout_seconds is None else timeout_seconds
    scores: dict[int, list[list[Score]]] = {i: [] for i in jobs}  # per seed, per run: [gold score, perturbed score]
    for run in range(runs):
        run_scores = [s for batch in batch_scores[run * len(batches) : (run + 1) * len(batches)] for s in batch]
        if math_pairs:
            run_scores += _math_verdicts(math_pairs, math_timeout, workers)
        for k, i in enumerate(batched + compared):
            scores[i].append(run_scores[2 * k : 2 * k + 2])
    out: list[Certification] = []
    for i, seed in enumerate(items):
        if i not in scores:
            out.append(Certification(False, "unknown_verifier", [], 0.0, ""))
            continue
        gold = [gold_score for gold_score, _perturbed in scores[i]]
        perturbed = [perturbed_score for _gold, perturbed_score in scores[i]]
        out.append(judge(VERIFIER_VERSIONS[seed.verifier], gold, perturbed))
    return out


def certify(
    verifier: str,
    gold: str,
    *,
    prompt: str | None = None,
    tests: str | None = None,
    runs: int = 3,
    timeout_seconds: float | None = None,
) -> Certification:
    """Certify one seed: see :func:`certify_many` (``prompt`` is accepted for verifiers that need it)."""
    seed = Seed(verifier, gold, prompt, tests)
    return certify_many([seed], runs=runs, workers=1, timeout_seconds=timeout_seconds)[0]


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m posttrain_assets.rl.verifiers score VERIFIER CANDIDATE GOLD [--tests-file F] [--timeout S]``."""
    parser = argparse.ArgumentParser(prog="python -m posttrain_assets.rl.verifiers")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("score", help="score one candidate, print JSON")
    one.add_argument("verifier")
    one.add_argument("candidate")
    one.add_argument("gold")
    one.add_argument("--tests-file")
    one.add_argument("--timeout", type=float)
    args = parser.parse_args(argv)
    tests = Path(args.tests_file).read_text(encoding="utf-8") if args.tests_file else None
    result = score(args.verifier, args.candidate, args.gold, tests=tests, timeout_seconds=args.timeout)
    version = VERIFIER_VERSIONS.get(args.verifier, "")
    print(json.dumps({"value": result.value, "reason": result.reason, "version": version}))
    return 0


__all__ = [
    "MATH_TIMEOUT_SECONDS",
    "VERIFIERS",
    "VERIFIER_VERSIONS",
    "Certification",
    "Score",
    "Seed",
    "Verifier",
    "certify",
    "certify_many",
    "get_verifier",
    "judge",
    "parse_number",
    "perturb_answer",
    "render_answer",
    "score",
]


if __name__ == "__main__":
    sys.exit(main())
