"""posttrain_assets.rl.certification_stage: each RL seed is certified once per (content, stage key), and
silver.rl_certification built from the cache equals a full certification of every seed."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import duckdb
import pytest

from posttrain_assets.rl import verifiers
from posttrain_assets.rl.certification_stage import (
    CERTIFICATION_CACHE,
    CertificationSettings,
    build_rl_certification,
    certification_stage_key,
)
from posttrain_assets.rl.verifiers import VERIFIER_VERSIONS, Certification, certify_many
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS, SILVER_RL_CERTIFICATION
from posttrain_assets.warehouse.io import insert_rows
from posttrain_assets.warehouse.stage_cache import Reuse

CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SOLUTION = "def double(x):\n    return 2 * x\n"
TESTS = "assert double(2) == 4\nassert double(-3) == -6\n"
WRONG_TESTS = "assert double(2) == 5\n"


def seed(record_id: str, verifier: str, answer: str, tests: str | None = None, source: str = "bank") -> dict[str, Any]:
    """A silver.records RL row (only what certification and the table's NOT NULL columns need)."""
    origin = {"source": source, "uri": "u", "file": "f", "row": 0, "record_sha256": record_id, "file_sha256": "f"}
    prompt = f"Question {record_id}?"
    return {
        "id": record_id,
        "source": source,
        "regime": "rl",
        "messages": [{"role": "user", "content": prompt}],
        "prompt": prompt,
        "answer": answer,
        "verifier": verifier,
        "tests": tests,
        "license": "MIT",
        "origin": origin,
        "created_at": CREATED,
        "source_kind": "human",
    }


SEEDS = [
    seed("a1", "numeric", "72"),
    seed("b2", "exact_match", "Paris"),
    seed("c3", "math", "\\frac{1}{2}"),  # compared by math-verify in worker processes
    seed("d4", "numeric", "none"),  # no number in the gold: gold_not_accepted
    seed("e5", "python_eval", SOLUTION, TESTS),  # run in the sandbox
    seed("f6", "python_eval", SOLUTION),  # no tests: no_tests
    seed("g7", "regex", "a+"),  # no such verifier
]
NOT_RL = {**seed("s9", "numeric", "1"), "regime": "sft", "answer": None, "verifier": None}
SETTINGS = CertificationSettings(runs=3, timeout_seconds=10.0)
ONES = [1.0, 1.0, 1.0]
ZEROS = [0.0, 0.0, 0.0]


@pytest.fixture
def conn(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    conn.execute(SILVER_RECORDS.create_sql())
    insert_rows(conn, SILVER_RECORDS, [*SEEDS, NOT_RL])
    return conn


def build(conn: duckdb.DuckDBPyConnection, settings: CertificationSettings = SETTINGS, **kwargs: Any) -> Reuse:
    return build_rl_certification(conn, settings, workers=2, batch_rows=kwargs.pop("batch_rows", 3), **kwargs)


def table(conn: duckdb.DuckDBPyConnection) -> list[tuple]:
    return conn.execute(f"SELECT * FROM {SILVER_RL_CERTIFICATION.qualified} ORDER BY id").fetchall()


def cached_ids(conn: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in conn.execute(f"SELECT id FROM {CERTIFICATION_CACHE.qualified} ORDER BY id").fetchall()]


def certified_as_before(conn: duckdb.DuckDBPyConnection, settings: CertificationSettings = SETTINGS) -> list[tuple]:
    """silver.rl_certification as the asset computed it before the cache: every RL seed certified in one call."""
    seeds = conn.execute(
        f"SELECT id, source, verifier, answer, tests FROM {SILVER_RECORDS.qualified} WHERE regime = 'rl' ORDER BY id"
    ).fetchall()
    verdicts = certify_many(
        [{"verifier": v, "gold": a, "tests": t} for _, _, v, a, t in seeds],
        runs=settings.runs,
        workers=2,
        timeout_seconds=settings.timeout_seconds,
    )
    return [
        (i, s, v, c.version, c.ok, c.reason, c.gold_scores, c.perturbed_score)
        for (i, s, v, _, _), c in zip(seeds, verdicts, strict=True)
    ]


def test_a_rerun_certifies_no_seed_again_and_gives_the_table_a_full_certification_gives(conn) -> None:
    first = build(conn)
    built = table(conn)
    second = build(conn)

    assert first == Reuse(computed=7, reused=0)
    assert second == Reuse(computed=0, reused=7)
    assert table(conn) == built
    assert built == certified_as_before(conn)
    math, numeric, python = VERIFIER_VERSIONS["math"], VERIFIER_VERSIONS["numeric"], VERIFIER_VERSIONS["python_eval"]
    assert built == [
        ("a1", "bank", "numeric", numeric, True, None, ONES, 0.0),
        ("b2", "bank", "exact_match", VERIFIER_VERSIONS["exact_match"], True, None, ONES, 0.0),
        ("c3", "bank", "math", math, True, None, ONES, 0.0),
        ("d4", "bank", "numeric", numeric, False, "gold_not_accepted", ZEROS, 0.0),
        ("e5", "bank", "python_eval", python, True, None, ONES, 0.0),
        ("f6", "bank", "python_eval", python, False, "no_tests", ZEROS, 0.0),
        ("g7", "bank", "regex", "", False, "unknown_verifier", [], 0.0),
    ]
    assert cached_ids(conn) == ["a1", "b2", "c3", "d4", "e5", "f6", "g7"]


def test_changed_seeds_only_are_certified_again_and_the_table_equals_a_full_build(conn) -> None:
    build(conn)
    conn.execute("DELETE FROM silver.records WHERE id = 'd4'")
    conn.execute("UPDATE silver.records SET source = 'better_bank' WHERE id = 'a1'")  # a displaced duplicate
    # The id does not cover the verifier and the tests: the same id with other ones is certified again.
    conn.execute("UPDATE silver.records SET tests = $tests WHERE id = 'e5'", {"tests": WRONG_TESTS})
    conn.execute("UPDATE silver.records SET verifier = 'numeric' WHERE id = 'b2'")
    insert_rows(conn, SILVER_RECORDS, [seed("h8", "exact_match", "Blue")])
    refreshed = build(conn)
    incremental = table(conn)
    full = build(conn, reuse=False)

    assert refreshed == Reuse(computed=3, reused=4)
    assert full == Reuse(computed=7, reused=0)
    assert incremental == table(conn) == certified_as_before(conn)
    numeric, python = VERIFIER_VERSIONS["numeric"], VERIFIER_VERSIONS["python_eval"]
    assert [r for r in incremental if r[0] in ("a1", "b2", "e5", "h8")] == [
        ("a1", "better_bank", "numeric", numeric, True, None, ONES, 0.0),
        ("b2", "bank", "numeric", numeric, False, "gold_not_accepted", ZEROS, 0.0),
        ("e5", "bank", "python_eval", python, False, "gold_not_accepted", ZEROS, 0.0),
        ("h8", "bank", "exact_match", VERIFIER_VERSIONS["exact_match"], True, None, ONES, 0.0),
    ]
    # d4 (gone) and the entries of b2's and e5's old inputs are forgotten: one entry per current seed
    assert cached_ids(conn) == ["a1", "b2", "c3", "e5", "f6", "g7", "h8"]


def fake_certify(calls: list[list[str]], verdict: Callable[[dict[str, Any]], Certification]) -> Callable[..., Any]:
    """A stand-in for verifiers.certify_many that records which seeds each call certified."""

    def certify(seeds: Iterable[dict[str, Any]], runs: int, workers: int, timeout_seconds: float | None) -> list:
        seeds = list(seeds)
        calls.append([s["id"] for s in seeds])
        return [verdict(s) for s in seeds]

    return certify


def accepted(seed: dict[str, Any]) -> Certification:
    return Certification(True, None, ONES, 0.0, "1")


def test_a_changed_stage_key_certifies_every_seed_again_and_forgets_the_old_entries(conn, monkeypatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(verifiers, "certify_many", fake_certify(calls, accepted))
    build(conn)
    five_runs = CertificationSettings(runs=5, timeout_seconds=10.0)

    assert build(conn, five_runs) == Reuse(computed=7, reused=0)
    assert certification_stage_key(five_runs) != certification_stage_key(SETTINGS)
    keys = conn.execute(f"SELECT DISTINCT stage_key FROM {CERTIFICATION_CACHE.qualified}").fetchall()
    assert keys == [(certification_stage_key(five_runs),)]
    assert cached_ids(conn) == ["a1", "b2", "c3", "d4", "e5", "f6", "g7"]
    # batches of 3 seeds in id order, twice
    assert calls == [["a1", "b2", "c3"], ["d4", "e5", "f6"], ["g7"]] * 2
    # the worker count and the batch size are not part of the key
    assert build_rl_certification(conn, five_runs, workers=1, batch_rows=100) == Reuse(computed=0, reused=7)


def test_a_killed_run_leaves_whole_batches_that_the_next_run_reuses(conn, monkeypatch) -> None:
    calls: list[list[str]] = []

    def dies_in_the_second_batch(seed: dict[str, Any]) -> Certification:
        if len(calls) == 2:
            raise RuntimeError("killed")
        return accepted(seed)

    monkeypatch.setattr(verifiers, "certify_many", fake_certify(calls, dies_in_the_second_batch))
    with pytest.raises(RuntimeError, match="killed"):
        build(conn)
    assert cached_ids(conn) == ["a1", "b2", "c3"]
    assert conn.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'rl_certification'").fetchone() == (
        1,  # the cache only: the silver table was not written
    )

    monkeypatch.setattr(verifiers, "certify_many", fake_certify(calls, accepted))
    assert build(conn) == Reuse(computed=4, reused=3)
    assert calls[-2:] == [["d4", "e5", "f6"], ["g7"]]
    assert [r[0] for r in table(conn)] == ["a1", "b2", "c3", "d4", "e5", "f6", "g7"]


def test_a_sandbox_unavailable_verdict_is_published_and_certified_again_next_run(conn, monkeypatch) -> None:
    calls: list[list[str]] = []

    def no_sandbox(seed: dict[str, Any]) -> Certification:
        if seed["verifier"] == "python_eval":
            return Certification(False, "sandbox_unavailable", ZEROS, 0.0, "3")
        return accepted(seed)

    monkeypatch.setattr(verifiers, "certify_many", fake_certify(calls, no_sandbox))
    build(conn)
    assert conn.execute(
        f"SELECT id, reason FROM {SILVER_RL_CERTIFICATION.qualified} WHERE NOT certified ORDER BY id"
    ).fetchall() == [("e5", "sandbox_unavailable"), ("f6", "sandbox_unavailable")]

    monkeypatch.setattr(verifiers, "certify_many", fake_certify(calls, accepted))
    assert build(conn) == Reuse(computed=2, reused=5)
    assert calls[-1] == ["e5", "f6"]
    assert conn.execute(f"SELECT count(*) FROM {SILVER_RL_CERTIFICATION.qualified} WHERE certified").fetchone() == (7,)
    assert cached_ids(conn) == ["a1", "b2", "c3", "d4", "e5", "f6", "g7"]


def test_no_rl_seed_gives_an_empty_table(tmp_path: Path) -> None:
    conn = duckdb.connect(str(tmp_path / "empty.duckdb"))
    conn.execute(SILVER_RECORDS.create_sql())
    insert_rows(conn, SILVER_RECORDS, [NOT_RL])

    assert build(conn) == Reuse(computed=0, reused=0)
    assert table(conn) == []
