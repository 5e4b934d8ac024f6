"""The tokenise + mask stage over DuckDB: silver.sft_tokenized and silver.sft_quarantine, each SFT row tokenised
once per stage key.

A row's tokens and labels depend on its content (the record id is a hash of the messages and tools), the tokenizer
and chat template, the mask config and this code: everything but the content is the stage key
(:func:`tokenize_stage_key`). Rows of silver.records whose (stage key, id) the tokenize cache does not hold are
tokenised in worker processes and appended to the cache, one transaction per batch; both silver tables are then
rebuilt from the cache, with each row's current ``source`` from silver.records (the same content can move to another
source when a duplicate displaces it). A refresh after adding 1% of rows tokenises 1% of rows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import duckdb

from posttrain_assets.parallel import map_batches, processes_for
from posttrain_assets.sft.batches import TokenizeJob, tokenize_batch
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS, SILVER_SFT_QUARANTINE, SILVER_SFT_TOKENIZED
from posttrain_assets.warehouse.io import (
    appending,
    fingerprint_sql,
    memory_limit_at_most,
    ordered_arrow,
    stored_in_key_order,
    stored_rows_in_range,
    stored_rows_with_keys,
    sync_table,
    transaction,
)
from posttrain_assets.warehouse.model import Column, Table
from posttrain_assets.warehouse.stage_cache import (
    CACHE_SCHEMA,
    CONTENT_HASH,
    Reuse,
    cache_table,
    code_fingerprint,
    keyed_rows,
    library_versions,
    open_caches,
    stage_key,
    with_content_hash,
)

TOKENIZE_CODE = ("posttrain_assets.sft", "posttrain_assets.records.tools")
TOKENIZE_LIBRARIES = ("tokenizers", "transformers", "jinja2")

_KEY = (Column("stage_key", "VARCHAR", "the tokenise stage's key (tokenize_stage.tokenize_stage_key)", False),)
# Each entry's content hash covers its published columns but the id (and the source, which the cache leaves out).
TOKENIZED_CACHE = with_content_hash(
    cache_table(
        "sft_tokenized",
        "Tokenised SFT rows by (stage key, id), without their source.",
        _KEY,
        SILVER_SFT_TOKENIZED,
        "source",
    ),
    SILVER_SFT_TOKENIZED,
    "id",
)
REJECTED_CACHE = with_content_hash(
    cache_table(
        "sft_quarantine",
        "SFT rows no exact mask could be built for, by (stage key, id), without their source.",
        _KEY,
        SILVER_SFT_QUARANTINE,
        "source",
    ),
    SILVER_SFT_QUARANTINE,
    "id",
)
CACHE_TABLES = (TOKENIZED_CACHE, REJECTED_CACHE)
# The ids to tokenise this run, in id order (narrow; dropped when the stage ends).
TODO = Table(
    CACHE_SCHEMA, "sft_tokenize_todo", "SFT ids the tokenize cache does not hold.", (SILVER_RECORDS.column("id"),)
)

SFT_IDS = f"SELECT id FROM {SILVER_RECORDS.qualified} WHERE regime = 'sft'"
FIND_TODO = f"""
INSERT INTO {TODO.qualified}
SELECT id FROM ({SFT_IDS}) r
WHERE NOT EXISTS (SELECT 1 FROM {TOKENIZED_CACHE.qualified} c WHERE c.stage_key = $key AND c.id = r.id)
  AND NOT EXISTS (SELECT 1 FROM {REJECTED_CACHE.qualified} c WHERE c.stage_key = $key AND c.id = r.id)
ORDER BY id
"""
# The rows to tokenise of one id range ($range_first, $range_last; io.ordered_arrow's range_keys), fetched by rowid:
# a refresh's rows are the last ones silver.records' sync appended, and a join with the todo ids read every range's
# row groups of silver.records (its messages) to find them.
TODO_IDS = f"SELECT id FROM {TODO.qualified}"
ROWS_TO_TOKENIZE = f"""
SELECT id, source, messages, tools FROM ({stored_rows_in_range(SILVER_RECORDS.qualified, TODO_IDS)})
"""


def _current(cached: Table, keys: str | None = None) -> str:
    """The rows of ``cached`` for the current SFT rows under ``$key``, with each row's source from silver.records;
    with ``keys`` (a table with column ``sync_key``) those with these ids only, fetched by rowid before the join
    (the syncs' ``rows_of_keys``: filtered after it, DuckDB read every cached row's token lists)."""
    names = ", ".join(f'c."{n}"' for n in cached.column_names if n not in ("stage_key", CONTENT_HASH))
    rows = (
        f"SELECT * FROM {cached.qualified} WHERE stage_key = $key"
        if keys is None
        else stored_rows_with_keys(cached.qualified, keys, where="stage_key = $key")
    )
    records = SILVER_RECORDS.qualified
    return f"SELECT {names}, r.source FROM ({rows}) c JOIN {records} r USING (id) WHERE r.regime = 'sft'"


# A current row's sync fingerprint: its cache entry's content hash with its id and source. The same for the same
# tokens and mask whatever the stage key (a code change that tokenises every row again to the same arrays rewrites
# no row; the sync compares both sides by content once then, as the query's parameters, $key, changed: see
# io.sync_table); hashing every row's token lists instead read all of them on each refresh (about 3 s at 1M rows).
_ROW_FINGERPRINT = fingerprint_sql([(CONTENT_HASH, "UBIGINT"), ("id", "VARCHAR"), ("source", "VARCHAR")])


def _fingerprints(cached: Table) -> str:
    """The sync fingerprints of the rows of :func:`_current` (``cached``'s)."""
    return f"""
    SELECT id AS sync_key, {_ROW_FINGERPRINT} AS sync_fingerprint FROM (
        SELECT c.id, r.source, c.{CONTENT_HASH}
        FROM {cached.qualified} c JOIN {SILVER_RECORDS.qualified} r USING (id)
        WHERE c.stage_key = $key AND r.regime = 'sft'
    )
    """


def _forget_stale(cached: Table) -> str:
    return f"""
    DELETE FROM {cached.qualified} c
    WHERE c.stage_key <> $key OR NOT EXISTS (SELECT 1 FROM ({SFT_IDS}) r WHERE r.id = c.id)
    """


# Rows per sorted range when the silver tables are written from the cache in id order.
PUBLISH_RANGE_ROWS = 32_768


def tokenize_stage_key(job: TokenizeJob) -> str:
    """Everything a tokenised row depends on besides its content: tokenizer and template hashes, mask config, the
    code of the sft package and the libraries that render and encode."""
    return stage_key(
        "sft_tokenize",
        tokenizer=job.identity.hashes(),
        mask=dataclasses.asdict(job.mask),
        code=code_fingerprint(*TOKENIZE_CODE),
        libraries=library_versions(*TOKENIZE_LIBRARIES),
    )


@dataclass(frozen=True)
class TokenizeTotals:
    """What the stage built: tokens, trained tokens and truncated rows of silver.sft_tokenized, and reuse."""

    tokens: int
    trained: int
    truncated: int
    reuse: Reuse


def build_sft_tokenized(
    conn: duckdb.DuckDBPyConnection,
    job: TokenizeJob,
    *,
    processes: int,
    batch_rows: int,
    reuse: bool = True,
    progress: Callable[[int], None] = lambda done: None,
) -> TokenizeTotals:
    """Tokenise the SFT rows the cache does not hold (``reuse=False``: forget the cache first), then bring
    silver.sft_tokenized and silver.sft_quarantine to the cache's rows in one transaction (``io.sync_table``: only
    changed rows are written; a first build stores them in id order)."""
    key = {"key": tokenize_stage_key(job)}
    open_caches(conn, *CACHE_TABLES, reuse=reuse)
    conn.execute(TODO.create_sql(replace=True))
    try:
        conn.execute(FIND_TODO, key)
        (todo,) = conn.execute(f"SELECT count(*) FROM {TODO.qualified}").fetchone()
        done = 0
        # Batches come back in id order, so a first build stores the cache in id order and the ranges below are
        # pruned by zone maps; a refresh appends its new ids after them.
        batches = ordered_arrow(conn, ROWS_TO_TOKENIZE, "id", batch_rows, range_keys=TODO_IDS)
        # one commit per batch (a killed run leaves whole batches, which the next run reuses), one checkpoint per
        # full row group of the cache (io.Appends); the rows after the last one are written by the publishing
        # commit below, which checkpoints
        with memory_limit_at_most(conn), appending(conn, checkpoint_tail=False) as appends:
            for batch in map_batches(tokenize_batch, job, batches, processes_for(todo, batch_rows, processes)):
                appends.commit(
                    {
                        cached: keyed_rows(rows.drop_columns(["source"]), key["key"])
                        for cached, rows in ((TOKENIZED_CACHE, batch.tokenized), (REJECTED_CACHE, batch.rejected))
                        if rows is not None
                    }
                )
                done += batch.rows
                progress(done)
    finally:
        conn.execute(f"DROP TABLE IF EXISTS {TODO.qualified}")
    # asked for each of the two tables, answered once (a pass over silver.records' ids)
    records_in_id_order = functools.cache(lambda: stored_in_key_order(conn, SILVER_RECORDS))
    # Synced, not rebuilt: a refresh deletes and inserts only the rows whose id or content changed. The commit
    # checkpoints: a first build's token lists would otherwise go to the WAL first and be compressed into the file
    # at the next checkpoint (at 100k rows 7.3 -> 6.4 s of CPU for the two tables, io.transaction says why).
    with transaction(conn, checkpoint=True):
        synced = [
            sync_table(
                conn,
                table,
                _current(cached),
                "id",
                PUBLISH_RANGE_ROWS,
                key,
                # while the cache and silver.records are stored in id order (a first build of both), each id range
                # is read by a query of its own that skips the other ranges' row groups, with no copy of the token
                # lists to split them into ranges (io.insert_key_ranges)
                key_ordered=lambda cached=cached: records_in_id_order() and stored_in_key_order(conn, cached),
                fingerprints=_fingerprints(cached),
                trust_stored=reuse,  # a full rebuild hashes every stored row again
                rows_of_keys=functools.partial(_current, cached),
            )
            for table, cached in ((SILVER_SFT_TOKENIZED, TOKENIZED_CACHE), (SILVER_SFT_QUARANTINE, REJECTED_CACHE))
        ]
        built = sum(counts.inserted + counts.kept for counts in synced)
        held = sum(conn.execute(f"SELECT count(*) FROM {t.qualified}").fetchone()[0] for t in CACHE_TABLES)
        if held > built:  # entries of rows gone from silver or of an old stage key
            for cached in CACHE_TABLES:
                conn.execute(_forget_stale(cached), key)
    tokens, trained, truncated = conn.execute(
        f"SELECT coalesce(sum(num_tokens), 0), coalesce(sum(num_trainable_tokens), 0), count(*) FILTER (truncated) "
        f"FROM {SILVER_SFT_TOKENIZED.qualified}"
    ).fetchone()
    return TokenizeTotals(tokens, trained, truncated, Reuse(computed=todo, reused=built - todo))
