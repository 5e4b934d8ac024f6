"""The pairing stage over DuckDB: silver.preference_pairs, each pair's token counts and tie flag computed once per
record id and stage key.

The per-row work of a pair (:func:`posttrain_assets.preference.pairs.pair_measures`: both responses counted with
the tokenizer, the tie flag from their folded forms) reads a record's ``chosen`` and ``rejected`` and nothing else.
The record id (silver.records ``id``) is a hash of regime, messages, chosen, rejected, answer and tools, so it
covers both responses: a measure's key is the id and the stage key (:func:`pairs_stage_key`: the tokenizer, the
tie similarity, the code that counts and folds, the libraries and Unicode tables it runs on).

Preference rows of silver.records whose (stage key, id) the cache (``cache.preference_pairs``) does not hold are
measured in worker processes, in id order, and appended to the cache one transaction per batch (a killed run leaves
whole batches, which the next run reuses). silver.preference_pairs is then written from the cache joined with the
current silver.records, in id order: every column that is not a measure comes from the current record, so a pair
whose source, scores, annotations or provenance changed under the same id (a duplicate displacing another, a
re-scored file) is not measured again and still gets its current values; ``score_margin`` and ``length_diff`` are
computed in the same SELECT. The table is synced to that query, not rebuilt (``io.sync_table``: only pairs whose id
or content changed are deleted or inserted), in the caller's transaction. Cache entries of ids no longer among the
preference rows or of an old stage key are then forgotten. The global tables (audit, balance, judge audit,
agreement) are computed from the whole table by the caller, in SQL, as in a full build.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import duckdb

from posttrain_assets.parallel import map_batches, processes_for
from posttrain_assets.preference.pairs import PairJob, pair_measures
from posttrain_assets.warehouse.catalogue import SILVER_PREFERENCE_PAIRS, SILVER_RECORDS
from posttrain_assets.warehouse.io import SyncCounts, appending, ordered_arrow, stored_rows_in_range, sync_table
from posttrain_assets.warehouse.model import Column, Table
from posttrain_assets.warehouse.stage_cache import (
    CACHE_SCHEMA,
    Reuse,
    cache_table,
    code_fingerprint,
    keyed_rows,
    library_versions,
    open_caches,
    stage_key,
)

STAGE = "preference_pairs"
# The code whose behaviour decides a measure: pair_measures, the token counting it calls, the folding and tie rule
# (posttrain_assets.text) and this module. posttrain_assets.parallel only decides where batches run.
PAIRS_CODE = (
    "posttrain_assets.preference.pairs",
    "posttrain_assets.preference.pairs_stage",
    "posttrain_assets.sft.token_counts",
    "posttrain_assets.text",
)
# tokenizers encodes (transformers wraps it, and encodes itself for a slow tokenizer); rapidfuzz decides ties.
PAIRS_LIBRARIES = ("tokenizers", "transformers", "rapidfuzz")
# What pair_measures computes of a record (the cache keeps these beside the id).
MEASURES = ("chosen_tokens", "rejected_tokens", "is_tie")

_KEY = (Column("stage_key", "VARCHAR", "the pairing stage's key (pairs_stage.pairs_stage_key)", False),)
PAIRS_CACHE = cache_table(
    "preference_pairs",
    "Token counts and tie flags of preference pairs by (stage key, id); every other pair column is taken from the "
    "current silver.records.",
    _KEY,
    SILVER_PREFERENCE_PAIRS,
    *(name for name in SILVER_PREFERENCE_PAIRS.column_names if name not in ("id", *MEASURES)),
)
CACHE_TABLES = (PAIRS_CACHE,)
# The ids to measure this run, in id order (narrow; dropped when the stage ends).
TODO = Table(
    CACHE_SCHEMA,
    "preference_pairs_todo",
    "Preference ids the pairs cache does not hold under the current stage key.",
    (SILVER_RECORDS.column("id"),),
)

PREFERENCE_IDS = f"SELECT id FROM {SILVER_RECORDS.qualified} WHERE regime = 'preference'"
FIND_TODO = f"""
INSERT INTO {TODO.qualified}
SELECT id FROM ({PREFERENCE_IDS}) r
WHERE NOT EXISTS (SELECT 1 FROM {PAIRS_CACHE.qualified} c WHERE c.stage_key = $key AND c.id = r.id)
ORDER BY id
"""
# The preference rows to measure of one id range ($range_first, $range_last; io.ordered_arrow's range_keys), fetched
# by rowid (as the tokenize stage's: a join with the todo ids read every range's row groups of silver.records).
TODO_IDS = f"SELECT id FROM {TODO.qualified}"
ROWS_TO_MEASURE = f"""
SELECT id, chosen, rejected
FROM ({stored_rows_in_range(SILVER_RECORDS.qualified, TODO_IDS, where="regime = 'preference'")})
"""
# The silver.records columns a pair carries over unchanged (the rest are measures or computed below).
CARRIED = tuple(name for name in SILVER_PREFERENCE_PAIRS.column_names if name in SILVER_RECORDS.column_names)
_COMPUTED = {
    # null unless both scores exist, as pairs.pair_batch's Arrow subtraction
    "score_margin": "r.score_chosen - r.score_rejected",
    "length_diff": "c.chosen_tokens - c.rejected_tokens",
    **{name: f"c.{name}" for name in MEASURES},
}
_PAIR_COLUMNS = ", ".join(
    f'r."{name}"' if name in CARRIED else f'{_COMPUTED[name]} AS "{name}"'
    for name in SILVER_PREFERENCE_PAIRS.column_names
)
PAIRS = f"""
SELECT {_PAIR_COLUMNS}
FROM {SILVER_RECORDS.qualified} r JOIN {PAIRS_CACHE.qualified} c ON c.id = r.id AND c.stage_key = $key
WHERE r.regime = 'preference'
"""
FORGET_STALE = f"""
DELETE FROM {PAIRS_CACHE.qualified} c
WHERE c.stage_key <> $key OR NOT EXISTS (SELECT 1 FROM ({PREFERENCE_IDS}) r WHERE r.id = c.id)
"""

# Rows per sorted id range when silver.preference_pairs is written (or synced) from the cache.
PUBLISH_RANGE_ROWS = 32_768


def pairs_stage_key(job: PairJob, tokenizer_sha256: str) -> str:
    """Everything a pair's measures depend on besides its responses: the tokenizer (``tokenizer_sha256`` of
    ``sft.tokenizer.tokenizer_identity``; the chat template is not: responses are counted as plain text), the tie
    similarity, the code that counts and folds, the libraries it runs on and the Unicode tables of this Python
    (NFKC folding and the punctuation categories decide ties)."""
    return stage_key(
        STAGE,
        tokenizer_sha256=tokenizer_sha256,
        tie_similarity=job.tie_similarity,
        code=code_fingerprint(*PAIRS_CODE),
        libraries=library_versions(*PAIRS_LIBRARIES),
        unicode=unicodedata.unidata_version,
    )


@dataclass(frozen=True)
class MeasuredPairs:
    """What :func:`measure_preference_pairs` left for :func:`sync_preference_pairs`: the stage key the cache now holds
    every current pair under, and how many pairs it measured (the rest were read from the cache)."""

    key: str
    measured: int


@dataclass(frozen=True)
class PairsSync:
    """What :func:`sync_preference_pairs` did: silver.preference_pairs' rows inserted, deleted and kept
    (``io.SyncCounts``), and how many pairs were measured now or read from the cache."""

    synced: SyncCounts
    reuse: Reuse


def _measure_missing(
    conn: duckdb.DuckDBPyConnection,
    key: str,
    job: PairJob,
    *,
    processes: int,
    batch_rows: int,
    progress: Callable[[int], None],
) -> int:
    """Measure the preference rows whose (``key``, id) the cache does not hold, appending each batch to the cache in
    one transaction; returns how many were measured."""
    conn.execute(TODO.create_sql(replace=True))
    try:
        conn.execute(FIND_TODO, {"key": key})
        (todo,) = conn.execute(f"SELECT count(*) FROM {TODO.qualified}").fetchone()
        done = 0
        # Batches come back in id order, so a first build stores the cache in id order (the publishing ranges are
        # pruned by zone maps); a refresh appends its new ids after them.
        batches = ordered_arrow(conn, ROWS_TO_MEASURE, "id", batch_rows, range_keys=TODO_IDS)
        # one commit per batch (a killed run leaves whole batches, which the next run reuses), one checkpoint per
        # full row group of the cache (io.Appends)
        with appending(conn) as appends:
            for measures in map_batches(pair_measures, job, batches, processes_for(todo, batch_rows, processes)):
                appends.commit({PAIRS_CACHE: keyed_rows(measures, key)})
                done += measures.num_rows
                progress(done)
    finally:
        conn.execute(f"DROP TABLE IF EXISTS {TODO.qualified}")
    return todo


def measure_preference_pairs(
    conn: duckdb.DuckDBPyConnection,
    job: PairJob,
    tokenizer_sha256: str,
    *,
    processes: int,
    batch_rows: int,
    reuse: bool = True,
    progress: Callable[[int], None] = lambda done: None,
) -> MeasuredPairs:
    """Measure the preference rows of silver.records the cache does not hold (``reuse=False``: forget the cache
    first) in up to ``processes`` worker processes, ``batch_rows`` at a time, each batch appended to the cache in its
    own transaction. ``progress(done)`` is called after each measured batch."""
    key = pairs_stage_key(job, tokenizer_sha256)
    open_caches(conn, PAIRS_CACHE, reuse=reuse)
    measured = _measure_missing(conn, key, job, processes=processes, batch_rows=batch_rows, progress=progress)
    return MeasuredPairs(key, measured)


def sync_preference_pairs(conn: duckdb.DuckDBPyConnection, measured: MeasuredPairs) -> PairsSync:
    """Bring silver.preference_pairs to every current pair (the cache joined with the current silver.records), then
    forget the cache entries of rows gone from silver or of an old stage key. Synced, not rebuilt
    (``io.sync_table``): a refresh deletes and inserts only the pairs whose id or content changed; a first build
    stores the table in id order. Runs on ``conn`` itself, inside the caller's transaction (the audit tables are
    written in the same one)."""
    params = {"key": measured.key}
    synced = sync_table(conn, SILVER_PREFERENCE_PAIRS, PAIRS, "id", PUBLISH_RANGE_ROWS, params)
    built = synced.inserted + synced.kept
    (pairs,) = conn.execute(f"SELECT count(*) FROM ({PREFERENCE_IDS})").fetchone()
    if built != pairs:  # every row was measured before or held in the cache: a bug if not
        raise RuntimeError(f"silver.preference_pairs would hold {built} pairs for {pairs} preference rows")
    (held,) = conn.execute(f"SELECT count(*) FROM {PAIRS_CACHE.qualified}").fetchone()
    if held > pairs:  # entries of rows gone from silver or of an old stage key
        conn.execute(FORGET_STALE, params)
    return PairsSync(synced, Reuse(computed=measured.measured, reused=pairs - measured.measured))
