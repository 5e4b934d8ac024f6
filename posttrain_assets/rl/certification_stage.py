"""The certification stage over DuckDB: silver.rl_certification, each RL seed certified once per content and stage
key.

Certifying a seed (:func:`posttrain_assets.rl.verifiers.certify_many`: its gold answer scored in 3 separate
processes, a perturbed wrong answer once per run) reads the seed's ``verifier``, ``answer`` and ``tests`` and
nothing else. The record id (silver.records ``id``, a hash of regime, messages and answer) covers the answer but
not the verifier nor the tests, so a seed's key is its id, the sha256 of those three fields (``inputs_sha256``)
and the stage key (:func:`certification_stage_key`: runs, time limit, verifier versions, the code of the verifiers
and the sandbox, the libraries that decide math verdicts, the Python that runs python_eval, the sandbox's
isolation settings). Worker count and batch size are not in it: verdicts do not depend on them.

Seeds whose key the cache (``cache.rl_certification``) does not hold are certified in batches of ``batch_rows``
seeds, in id order, each batch appended to the cache in one transaction (a killed run leaves whole batches, which
the next run reuses). silver.rl_certification is then replaced from the cache in one transaction, with each seed's
current ``source`` from silver.records (the same content can move to another source when a duplicate displaces
it), and cache entries of seeds no longer in silver.records, of changed inputs or of an old stage key are
forgotten. A verdict of ``sandbox_unavailable`` says nothing ran on this machine, nothing about the seed: it is
published but certified again on the next run.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

import duckdb

from posttrain_assets.rl import verifiers
from posttrain_assets.rl.sandbox import ALLOW_UNISOLATED_ENV
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS, SILVER_RL_CERTIFICATION
from posttrain_assets.warehouse.io import insert_rows, ordered_batches, transaction
from posttrain_assets.warehouse.model import Column, Table
from posttrain_assets.warehouse.stage_cache import (
    CACHE_SCHEMA,
    Reuse,
    cache_table,
    code_fingerprint,
    library_versions,
    open_caches,
    stage_key,
)

STAGE = "rl_certification"
# The code whose behaviour decides a verdict: the verifiers, the sandbox python_eval runs in (and the two programs
# it runs), last_boxed (the final answer of numeric and math responses), fold_bare (exact_match) and this module.
# posttrain_assets.parallel only decides where batches run, which verdicts do not depend on.
CERTIFICATION_CODE = (
    "posttrain_assets.rl.verifiers",
    "posttrain_assets.rl.sandbox",
    "posttrain_assets.rl.sandbox_supervisor",
    "posttrain_assets.rl.python_eval_harness",
    "posttrain_assets.rl.certification_stage",
    "posttrain_assets.records.adapters",
    "posttrain_assets.text",
)
# math-verify parses LaTeX with latex2sympy2_extended (an ANTLR grammar) and compares with sympy.
CERTIFICATION_LIBRARIES = ("math-verify", "latex2sympy2_extended", "antlr4-python3-runtime", "sympy")
# Environment variables that change how python_eval runs (sandbox.py): unisolated runs see the host.
SANDBOX_SETTINGS = (ALLOW_UNISOLATED_ENV, "POSTTRAIN_SANDBOX_UNSHARE")
# A verdict about the machine, not the seed: never reused.
RECOMPUTED_REASONS = ("sandbox_unavailable",)

_KEY = (
    Column("stage_key", "VARCHAR", "the certification's stage key (certification_stage_key)", False),
    Column(
        "inputs_sha256",
        "VARCHAR",
        "sha256 of the verifier, answer and tests the seed was certified with (the id does not cover the verifier "
        "and tests)",
        False,
    ),
)
CERTIFICATION_CACHE = cache_table(
    "rl_certification",
    "Certification verdicts by (stage key, id, inputs), without their source.",
    _KEY,
    SILVER_RL_CERTIFICATION,
    "source",
)
# The RL seeds to certify this run (narrow; dropped when the stage ends).
TODO = Table(
    CACHE_SCHEMA,
    "rl_certification_todo",
    "RL seeds whose certification the cache does not hold under the current stage key.",
    (SILVER_RECORDS.column("id"), _KEY[1]),
)

# What certification reads of a seed, hashed (to_json writes a null as null, so a missing tests field and an
# empty one differ).
INPUTS_SHA256 = "sha256(to_json(struct_pack(verifier := r.verifier, answer := r.answer, tests := r.tests))::VARCHAR)"
RL_SEEDS = (
    f"SELECT r.id, r.source, {INPUTS_SHA256} AS inputs_sha256 FROM {SILVER_RECORDS.qualified} r WHERE r.regime = 'rl'"
)
FIND_TODO = f"""
INSERT INTO {TODO.qualified}
SELECT s.id, s.inputs_sha256 FROM ({RL_SEEDS}) s
WHERE NOT EXISTS (
    SELECT 1 FROM {CERTIFICATION_CACHE.qualified} c
    WHERE c.stage_key = $key AND c.id = s.id AND c.inputs_sha256 = s.inputs_sha256
      AND (c.reason IS NULL OR NOT list_contains($recomputed, c.reason))
)
"""
SEEDS_TO_CERTIFY = f"""
SELECT t.id, t.inputs_sha256, r.verifier, r.answer, r.tests
FROM {TODO.qualified} t JOIN {SILVER_RECORDS.qualified} r USING (id)
"""
# A batch's entries replace the ones they were recomputed from (an older verdict of the same key).
DELETE_RECOMPUTED = f"""
DELETE FROM {CERTIFICATION_CACHE.qualified} c
WHERE c.stage_key = $key AND c.id IN (SELECT unnest($ids))
"""
_OUTPUT = ", ".join(f'r."{n}"' if n == "source" else f'c."{n}"' for n in SILVER_RL_CERTIFICATION.column_names)
PUBLISH = f"""
INSERT INTO {SILVER_RL_CERTIFICATION.qualified}
SELECT {_OUTPUT}
FROM {CERTIFICATION_CACHE.qualified} c JOIN ({RL_SEEDS}) r ON r.id = c.id AND r.inputs_sha256 = c.inputs_sha256
WHERE c.stage_key = $key
ORDER BY c.id
"""
FORGET_STALE = f"""
DELETE FROM {CERTIFICATION_CACHE.qualified} c
WHERE c.stage_key <> $key
   OR NOT EXISTS (SELECT 1 FROM ({RL_SEEDS}) r WHERE r.id = c.id AND r.inputs_sha256 = c.inputs_sha256)
"""

# RL seeds per certification batch (one cache transaction each): big enough that the worker processes each batch
# starts (3 runs x workers) cost little next to its seeds, small enough that a killed run loses little.
BATCH_ROWS = 16_384


@dataclass(frozen=True)
class CertificationSettings:
    """What decides a verdict besides the seed: repeated runs (>= 3) and the time limit of one scoring (None: each
    verifier's default)."""

    runs: int = 3
    timeout_seconds: float | None = None


def certification_stage_key(settings: CertificationSettings) -> str:
    """Everything a seed's verdict depends on besides its verifier, answer and tests."""
    return stage_key(
        STAGE,
        settings=settings,
        verifier_versions=verifiers.VERIFIER_VERSIONS,
        code=code_fingerprint(*CERTIFICATION_CODE),
        libraries=library_versions(*CERTIFICATION_LIBRARIES),
        python=platform.python_version(),
        sandbox={name: os.environ.get(name, "") for name in SANDBOX_SETTINGS},
    )


def build_rl_certification(
    conn: duckdb.DuckDBPyConnection,
    settings: CertificationSettings,
    *,
    workers: int,
    batch_rows: int = BATCH_ROWS,
    reuse: bool = True,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> Reuse:
    """Certify the RL seeds of silver.records the cache does not hold (``reuse=False``: forget the cache first), in
    ``workers`` processes per run, then replace silver.rl_certification from the cache in one transaction, in id
    order. ``progress(done, total)`` is called after each batch. Returns how many seeds were certified now and how
    many verdicts were reused."""
    params = {"key": certification_stage_key(settings)}
    open_caches(conn, CERTIFICATION_CACHE, reuse=reuse)
    conn.execute(TODO.create_sql(replace=True))
    try:
        conn.execute(FIND_TODO, {**params, "recomputed": list(RECOMPUTED_REASONS)})
        (todo,) = conn.execute(f"SELECT count(*) FROM {TODO.qualified}").fetchone()
        done = 0
        for seeds in ordered_batches(conn, SEEDS_TO_CERTIFY, "id", batch_rows):
            verdicts = verifiers.certify_many(
                seeds, runs=settings.runs, workers=workers, timeout_seconds=settings.timeout_seconds
            )
            entries = [
                {
                    "stage_key": params["key"],
                    "inputs_sha256": seed["inputs_sha256"],
                    "id": seed["id"],
                    "verifier": seed["verifier"],
                    "verifier_version": verdict.version,
                    "certified": verdict.ok,
                    "reason": verdict.reason,
                    "gold_scores": verdict.gold_scores,
                    "perturbed_score": verdict.perturbed_score,
                }
                for seed, verdict in zip(seeds, verdicts, strict=True)
            ]
            with transaction(conn):  # a killed run leaves whole batches, which the next run reuses
                conn.execute(DELETE_RECOMPUTED, {**params, "ids": [seed["id"] for seed in seeds]})
                insert_rows(conn, CERTIFICATION_CACHE, entries)
            done += len(seeds)
            progress(done, todo)
    finally:
        conn.execute(f"DROP TABLE IF EXISTS {TODO.qualified}")
    with transaction(conn):
        conn.execute(SILVER_RL_CERTIFICATION.create_sql(replace=True))
        conn.execute(PUBLISH, params)
        (published,) = conn.execute(f"SELECT count(*) FROM {SILVER_RL_CERTIFICATION.qualified}").fetchone()
        (seeds,) = conn.execute(f"SELECT count(*) FROM ({RL_SEEDS})").fetchone()
        if published != seeds:  # every seed was certified above or held in the cache: a bug if not
            raise RuntimeError(f"silver.rl_certification would hold {published} verdicts for {seeds} RL seeds")
    with transaction(conn):
        conn.execute(FORGET_STALE, params)
    return Reuse(computed=todo, reused=seeds - todo)
