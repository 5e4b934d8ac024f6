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
  process with a wall-clock limit (``timeout`` on expiry).
- ``python_eval``: the candidate program plus the seed's assert-based tests in :mod:`posttrain_assets.rl.sandbox`.

Score reasons: ``no_answer`` (nothing to extract from the candidate), ``wrong_answer``,
``gold_unparseable``, ``timeout``, ``tests_failed``, ``no_tests``, ``early_exit``, ``memory``, ``crash``,
``unknown_verifier``, ``worker_failed``.

Certification (:func:`certify`, :func:`certify_many`) checks a seed before it enters the bank: its
gold answer must score 1.0 on ``runs`` repeated runs in separate processes, and a perturbed wrong
answer (:func:`perturb_answer`) must score 0.0.

Entry points (``python -m posttrain_assets.rl.verifiers ...``): ``score VERIFIER CANDIDATE GOLD
[--tests-file F]`` prints one JSON score; ``score-batch`` reads ``{"jobs": [[verifier, candidate, gold,
tests], ...], "timeout": s}`` on stdin and prints ``[[value, reason], ...]``; ``math-worker`` is the
internal math comparison worker.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from importlib import metadata
from itertools import pairwise
from pathlib import Path
from typing import Any

from posttrain_assets.records.adapters import last_boxed
from posttrain_assets.rl.sandbox import run_untrusted
from posttrain_assets.text import fold_bare

# Default wall-clock limit for one math comparison (seconds).
MATH_TIMEOUT_SECONDS = 5.0
# Sandbox limits for one python_eval run.
PYTHON_EVAL_CPU_SECONDS = 2
PYTHON_EVAL_WALL_SECONDS = 5.0
PYTHON_EVAL_MEMORY_MB = 256
# Address-space limit of a math worker process.
MATH_WORKER_MEMORY_MB = 4096
# How long a math worker may take to start (importing sympy and math-verify), outside the comparison limit.
MATH_WORKER_STARTUP_SECONDS = 120.0
# Most idle math workers kept per process.
MATH_WORKER_MAX_IDLE = 4
# Most seeds one score-batch process scores in certification: larger banks are split into more batches, so a
# process's memory and its wall-clock limit stay bounded as the bank grows.
SEEDS_PER_BATCH = 25_000
# Longest one score-batch process may run before it is treated as hung. subprocess waits with poll(), which
# takes at most 2**31 - 1 ms (24.8 days); a limit summed over 400,000 jobs overflowed it at 3M records.
BATCH_WALL_LIMIT_SECONDS = 24 * 3600.0

_PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


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
    """Symbolic comparison with math-verify, in the worker process (no timeout here: the parent has it)."""
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


def _math_worker_main() -> None:
    """Serve comparisons: one JSON request per stdin line, one JSON answer per stdout line."""
    import logging
    import resource

    limit = MATH_WORKER_MEMORY_MB * 1024 * 1024
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.disable(logging.WARNING)
    import math_verify  # noqa: F401 - import before saying ready, so startup is not charged to a comparison

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            ok, reason = _math_compare(request["c"], request["g"])
        except MemoryError:
            ok, reason = False, "memory"
        except Exception:  # noqa: BLE001 - any parser failure is a wrong answer, never a crash
            ok, reason = False, "no_answer"
        out.write(json.dumps({"ok": ok, "reason": reason}) + "\n")
        out.flush()


class _MathWorker:
    """One ``math-worker`` child process, used by one thread at a time."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "posttrain_assets.rl.verifiers", "math-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self._buffer = b""
        if self._readline(MATH_WORKER_STARTUP_SECONDS) != b"ready":
            self.kill()
            raise RuntimeError("the math worker did not start")

    def _readline(self, timeout: float) -> bytes | None:
        """One line from the worker within ``timeout`` seconds; None on timeout or end of file."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def compare(self, candidate: str, gold: str, timeout: float) -> Score | None:
        """The comparison's score, or None if the worker did not answer in time (then it is dead)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"c": candidate, "g": gold}) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except OSError:
            self.kill()
            return Score(0.0, "worker_failed")
        line = self._readline(timeout)
        if line is None:
            crashed = self.proc.poll() is not None
            self.kill()
            return Score(0.0, "worker_failed") if crashed else None
        answer = json.loads(line)
        return Score(1.0) if answer["ok"] else Score(0.0, answer["reason"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()


class _MathPool:
    """Idle math workers shared by the threads of this process; a timed-out worker is killed, not reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_MathWorker] = []

    def compare(self, candidate: str, gold: str, timeout: float) -> Score:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None or not worker.alive():
            worker = _MathWorker()
        result = worker.compare(candidate, gold, timeout)
        if result is None:
            return Score(0.0, "timeout")
        if worker.alive():
            with self._lock:
                if len(self._idle) < MATH_WORKER_MAX_IDLE:
                    self._idle.append(worker)
                    worker = None
            if worker is not None:
                worker.kill()
        return result

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()


_MATH_POOL = _MathPool()
atexit.register(_MATH_POOL.close)


_PLAIN_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: int() would also read other scripts' digits


def _score_math(candidate: str, gold: str, tests: str | None, timeout_seconds: float | None) -> Score:
    """Symbolic equality of the candidate's final answer and the gold (math-verify, sympy).

    The candidate's answer is the content of its last ``\\boxed{}`` (nested braces allowed); without a
    box, math-verify extracts the last LaTeX or plain expression of the text. The gold is parsed as a
    LaTeX expression. Equal means math-verify's ``verify(gold, answer)`` (symbolic equality, numeric
    equality after rounding to 6 decimal places, sets/intervals/equations handled). The comparison
    runs in a worker process; if it takes longer than ``timeout_seconds`` (default
    :data:`MATH_TIMEOUT_SECONDS`) the worker is killed and the score is 0 with reason ``timeout``.

    A boxed integer against an integer gold is compared here, without the worker: math-verify finds two
    integers equal exactly when their values are, and the round trip (about 1.3 ms) is most of the cost of
    certifying a bank whose answers are mostly integers.
    """
    boxed = last_boxed(candidate)
    if boxed is not None and _PLAIN_INTEGER.fullmatch(boxed.strip()) and _PLAIN_INTEGER.fullmatch(gold.strip()):
        return Score(1.0) if int(boxed) == int(gold) else Score(0.0, "wrong_answer")
    return _MATH_POOL.compare(candidate, gold, MATH_TIMEOUT_SECONDS if timeout_seconds is None else timeout_seconds)


# --------------------------------------------------------------------------- python_eval

_HARNESS = """
import sys


def _posttrain_harness(candidate, tests):
    token = sys.stdin.readline().strip()
    namespace = globals()
    exec(compile(candidate, "solution.py", "exec"), namespace)
    exec(compile(tests, "tests.py", "exec"), namespace)
    sys.stdout.write("\\n" + token + "\\n")
    sys.stdout.flush()


_posttrain_harness(_POSTTRAIN_CANDIDATE, _POSTTRAIN_TESTS)
"""


def _score_python_eval(candidate: str, gold: str, tests: str | None, timeout_seconds: float | None) -> Score:
    """Run the candidate program and then the seed's tests in the sandbox; 1.0 only if all pass.

    ``tests`` is Python source with ``assert`` statements, executed in the candidate's module namespace
    after the candidate (so it can call the candidate's functions). The run passes only when it exits
    normally AND the harness prints a random per-run token after the tests: a candidate that calls
    ``sys.exit(0)``/``os._exit(0)`` before the tests run gets ``early_exit``. (Best effort: the token
    lives in the sandboxed process, so code that inspects the harness's frames could find it.)
    The sandbox lets the code write only in its own throw-away working directory: a write anywhere else
    fails (read-only file system / permission denied), so the run errors and scores ``tests_failed``.
    ``gold`` (the reference solution) is not used when scoring. Limits: ``PYTHON_EVAL_*``; a given
    ``timeout_seconds`` replaces them: wall limit ``max(1, timeout_seconds)``, CPU limit its ceiling.
    """
    if not tests or not tests.strip():
        return Score(0.0, "no_tests")
    token = secrets.token_hex(16)
    code = f"_POSTTRAIN_CANDIDATE = {candidate!r}\n_POSTTRAIN_TESTS = {tests!r}\n{_HARNESS}"
    result = run_untrusted(
        code,
        stdin=token + "\n",
        cpu_seconds=PYTHON_EVAL_CPU_SECONDS if timeout_seconds is None else max(1, math.ceil(timeout_seconds)),
        wall_seconds=PYTHON_EVAL_WALL_SECONDS if timeout_seconds is None else max(1.0, timeout_seconds),
        memory_mb=PYTHON_EVAL_MEMORY_MB,
    )
    if result.status == "ok":
        last = result.stdout.rstrip("\n").rsplit("\n", 1)[-1]
        return Score(1.0) if last == token else Score(0.0, "early_exit")
    return Score(0.0, {"error": "tests_failed"}.get(result.status, result.status))


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
        Verifier("python_eval", "2", _score_python_eval, "candidate program + assert tests in the sandbox"),
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
    ``timeout`` (any run of either answer timed out), ``nondeterministic`` (runs disagree),
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
    reason: str | None = None
    if any(s.reason == "timeout" for s in (*gold, *perturbed)):
        reason = "timeout"
    elif len(set(gold_scores)) > 1 or len(set(perturbed_scores)) > 1:
        reason = "nondeterministic"
    elif not gold_scores or gold_scores[0] != 1.0:
        reason = "gold_not_accepted"
    elif first_perturbed != 0.0:
        reason = "perturbation_accepted"
    return Certification(reason is None, reason, gold_scores, first_perturbed, version)


def batch_wall_limit(jobs: int, timeout_seconds: float | None) -> float:
    """Seconds a score-batch process of ``jobs`` jobs may run: its math workers' start plus each job's own
    limit (and 5 s) in turn, capped at :data:`BATCH_WALL_LIMIT_SECONDS`."""
    per_job = max(timeout_seconds or MATH_TIMEOUT_SECONDS, PYTHON_EVAL_WALL_SECONDS) + 5
    return min(MATH_WORKER_STARTUP_SECONDS + per_job * jobs, BATCH_WALL_LIMIT_SECONDS)


def certification_batches(seeds: int, workers: int) -> list[tuple[int, int]]:
    """``(first, end)`` seed ranges of the score-batch processes of one run: at least one per worker (when
    there are as many seeds), each of at most :data:`SEEDS_PER_BATCH` seeds, sizes within one of each other."""
    if seeds <= 0:
        return []
    n = max(min(workers, seeds), math.ceil(seeds / SEEDS_PER_BATCH))
    return list(pairwise(seeds * c // n for c in range(n + 1)))


def _run_batch(jobs: list[list[Any]], timeout_seconds: float | None) -> list[Score]:
    """Score ``jobs`` in ONE fresh ``score-batch`` process."""
    if not jobs:
        return []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "posttrain_assets.rl.verifiers", "score-batch"],
        input=json.dumps({"jobs": jobs, "timeout": timeout_seconds}).encode("utf-8"),
        capture_output=True,
        env=env,
        timeout=batch_wall_limit(len(jobs), timeout_seconds),
        check=False,
    )
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"score-batch process failed with exit code {done.returncode}: {tail}")
    return [Score(float(v), r) for v, r in json.loads(done.stdout)]


def certify_many(
    seeds: Iterable[SeedLike],
    runs: int = 3,
    workers: int = 2,
    *,
    timeout_seconds: float | None = None,
) -> list[Certification]:
    """Certify many seeds (``Seed`` objects or mappings with ``verifier``, ``gold``/``answer``, ``tests``).

    How "separate processes" is honoured: the seeds' jobs (gold and perturbed answer of each) are split
    into batches (:func:`certification_batches`: one per worker, more for banks over
    :data:`SEEDS_PER_BATCH` seeds); each of the ``runs`` repetitions of each batch is ONE fresh
    ``python -m posttrain_assets.rl.verifiers score-batch`` process (so every repetition of a seed is
    scored in a different process from its other repetitions, with its own math workers and sandboxes),
    and ``workers`` such processes run at a time. The runs' scores are then compared per seed
    (:func:`judge`). The perturbed answer is scored in every run too, so its determinism is checked.
    """
    if runs < 3:
        raise ValueError(f"runs must be >= 3, got {runs}")
    items = [_as_seed(s) for s in seeds]
    known = [i for i, s in enumerate(items) if s.verifier in VERIFIERS]
    jobs: list[list[Any]] = []
    for i in known:
        seed = items[i]
        jobs.append([seed.verifier, render_answer(seed.verifier, seed.gold), seed.gold, seed.tests])
        jobs.append([seed.verifier, perturb_answer(seed.verifier, seed.gold), seed.gold, seed.tests])
    # Two jobs per seed (gold, perturbed), so a seed's jobs never straddle two batches.
    chunks = [jobs[2 * first : 2 * end] for first, end in certification_batches(len(known), workers)]
    n_chunks = len(chunks)
    tasks = [(run, c) for run in range(runs) for c in range(n_chunks)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {task: pool.submit(_run_batch, chunks[task[1]], timeout_seconds) for task in tasks}
        results = {task: future.result() for task, future in futures.items()}
    per_run = [[s for c in range(n_chunks) for s in results[(run, c)]] for run in range(runs)]
    out: list[Certification] = []
    position = {i: k for k, i in enumerate(known)}
    for i, seed in enumerate(items):
        if i not in position:
            out.append(Certification(False, "unknown_verifier", [], 0.0, ""))
            continue
        k = position[i]
        gold = [per_run[run][2 * k] for run in range(runs)]
        perturbed = [per_run[run][2 * k + 1] for run in range(runs)]
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
    """``python -m posttrain_assets.rl.verifiers {score,score-batch,math-worker}``."""
    parser = argparse.ArgumentParser(prog="python -m posttrain_assets.rl.verifiers")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("score", help="score one candidate, print JSON")
    one.add_argument("verifier")
    one.add_argument("candidate")
    one.add_argument("gold")
    one.add_argument("--tests-file")
    one.add_argument("--timeout", type=float)
    sub.add_parser("score-batch", help='read {"jobs": [[verifier, candidate, gold, tests], ...]} on stdin')
    sub.add_parser("math-worker", help="internal: the math comparison worker")
    args = parser.parse_args(argv)
    if args.command == "math-worker":
        _math_worker_main()
        return 0
    if args.command == "score":
        tests = Path(args.tests_file).read_text(encoding="utf-8") if args.tests_file else None
        result = score(args.verifier, args.candidate, args.gold, tests=tests, timeout_seconds=args.timeout)
        version = VERIFIER_VERSIONS.get(args.verifier, "")
        print(json.dumps({"value": result.value, "reason": result.reason, "version": version}))
        return 0
    request = json.load(sys.stdin)
    timeout = request.get("timeout")
    scores = [score(v, c, g, tests=t, timeout_seconds=timeout) for v, c, g, t in request["jobs"]]
    json.dump([[s.value, s.reason] for s in scores], sys.stdout)
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
