"""gold.sft's statistics kept per row: each row's turn depth and agentic figures, stored beside gold.sft and
aggregated into the table's metadata, so a refresh computes the figures of the rows it inserted only.

The figures are those :mod:`posttrain_assets.sft.turn_depth` and :mod:`posttrain_assets.sft.agentic_stats` compute
over a whole relation (the same per-row SQL and aggregates), so the aggregates are the same as theirs over gold.sft.
Each row's figures are keyed by the row's id and stored fingerprint (``io.sync_table``'s), so a row replaced by a
sync has its figures computed again. Pure: a DuckDB connection, no Dagster.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from posttrain_assets.sft.agentic_stats import (
    AgenticStats,
    agentic_rows_sql,
    agentic_stats_from_rows,
    reasoning_tokens_by_row,
)
from posttrain_assets.sft.turn_depth import TurnDepth, turn_depth_from_rows, turn_depth_rows_sql
from posttrain_assets.warehouse.io import FINGERPRINT_SCHEMA, fingerprint_table, stored_rows_with_keys
from posttrain_assets.warehouse.model import Column, Table

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def row_stats_table(table: Table) -> Table:
    """The per-row statistics of the SFT table ``table`` (gold.sft), beside its stored fingerprints."""
    return Table(
        FINGERPRINT_SCHEMA,
        f"{table.schema}__{table.name}__row_stats",
        f"Turn depth and agentic figures of each row of {table.qualified} (sft.row_stats).",
        (
            Column("sync_key", "VARCHAR", "the row's id", False),
            Column("sync_fingerprint", "UBIGINT", "the row's stored fingerprint when its figures were computed"),
            Column("grp", "VARCHAR", "the row's source"),
            Column("turns", "BIGINT", "assistant turns rendered"),
            Column("trained_tokens", "BIGINT", "labels other than -100 (null without labels)"),
            Column("trained_turns", "BIGINT", "runs of trained labels (null without labels)"),
            Column("calls", "BIGINT", "tool calls of its assistant turns"),
            Column("reasons", "BOOLEAN", "an assistant turn has reasoning"),
            Column("call_buckets", "BIGINT[]", "each assistant turn's tool calls, capped"),
            Column("reasoning_tokens", "BIGINT", "tokens of its assistant turns' reasoning, if it has reasoning"),
            Column("answer_tokens", "BIGINT", "tokens of its assistant turns' content, if it has reasoning"),
        ),
    )


def update_row_stats(
    conn: duckdb.DuckDBPyConnection,
    table: Table,
    load_tokenizer: Callable[[], PreTrainedTokenizerBase],
    group_by: str = "source",
) -> int:
    """Bring ``table``'s per-row statistics to its rows, as its stored fingerprints (``io.sync_table``) name them:
    figures of rows gone or replaced are deleted, those of new rows computed from their rows alone (a pass over the
    stored fingerprints and the figures, narrow, and the new rows). The tokenizer is loaded only when a new row has
    reasoning to count. Returns the rows whose figures were computed. Runs on ``conn`` itself, inside the caller's
    transaction."""
    stats = row_stats_table(table)
    fingerprints = fingerprint_table(table)
    conn.execute(stats.create_sql())
    conn.execute(
        f"DELETE FROM {stats.qualified} s WHERE NOT EXISTS (SELECT 1 FROM {fingerprints} f "
        "WHERE f.sync_key = s.sync_key AND f.sync_fingerprint = s.sync_fingerprint)"
    )
    new = f"row_stats_new_{uuid.uuid4().hex}"
    conn.execute(
        f"CREATE TEMP TABLE {new} AS SELECT sync_key, sync_fingerprint FROM {fingerprints} "
        f"ANTI JOIN {stats.qualified} USING (sync_key)"
    )
    try:
        return _insert_row_stats(conn, table, stats, new, load_tokenizer, group_by)
    finally:
        with suppress(duckdb.Error):  # an aborted transaction drops it on rollback (see io.sync_table)
            conn.execute(f"DROP TABLE IF EXISTS temp.main.{new}")


def _insert_row_stats(
    conn: duckdb.DuckDBPyConnection,
    table: Table,
    stats: Table,
    new: str,
    load_tokenizer: Callable[[], PreTrainedTokenizerBase],
    group_by: str,
) -> int:
    """Insert the figures of ``table``'s rows whose keys and fingerprints are in the table ``new``; the rows."""
    changed = f"({stored_rows_with_keys(table.qualified, new)})"
    columns = set(table.column_names)
    group = f'CAST("{group_by}" AS VARCHAR)'
    depth = turn_depth_rows_sql(columns, changed, group, key="id")
    agentic = agentic_rows_sql(columns, changed, group, key="id")
    (computed,) = conn.execute(
        f"""
        INSERT INTO {stats.qualified}
        SELECT d.row_key, n.sync_fingerprint, d.grp, d.turns, d.trained_tokens, d.trained_turns,
               coalesce(a.calls, 0), coalesce(a.reasons, false), coalesce(a.call_buckets, []), 0, 0
        FROM ({depth}) d JOIN {new} n ON n.sync_key = d.row_key LEFT JOIN ({agentic}) a USING (row_key)
        """
    ).fetchone()
    reasoning = f"(SELECT * FROM {changed} WHERE id IN (SELECT sync_key FROM {stats.qualified} WHERE reasons))"
    if computed and conn.execute(f"SELECT count(*) FROM {reasoning}").fetchone()[0]:
        tokens = reasoning_tokens_by_row(conn, columns, reasoning, "id", load_tokenizer())
        counted = pa.Table.from_pylist(
            [{"sync_key": k, "reasoning_tokens": r, "answer_tokens": a} for k, (r, a) in tokens.items()]
        )
        conn.register("row_stats_tokens", counted)
        try:
            conn.execute(
                f"UPDATE {stats.qualified} s SET reasoning_tokens = t.reasoning_tokens, "
                "answer_tokens = t.answer_tokens FROM row_stats_tokens t WHERE t.sync_key = s.sync_key"
            )
        finally:
            conn.unregister("row_stats_tokens")
    return computed


def stats_from_rows(
    conn: duckdb.DuckDBPyConnection, table: Table
) -> tuple[tuple[dict[str, TurnDepth], dict[str, TurnDepth]], dict[str, AgenticStats]]:
    """``(turn depth by group and overall, agentic statistics by group)`` of ``table`` from its per-row statistics
    (:func:`update_row_stats`): the figures of ``turn_depth_with_overall`` and ``agentic_stats`` over its rows."""
    stats = row_stats_table(table).qualified
    return turn_depth_from_row_stats(conn, table), agentic_stats_from_rows(conn, f"SELECT * FROM {stats}")


def turn_depth_from_row_stats(
    conn: duckdb.DuckDBPyConnection, table: Table
) -> tuple[dict[str, TurnDepth], dict[str, TurnDepth]]:
    """Turn depth by group and overall of ``table`` from its per-row statistics (:func:`update_row_stats`): the
    figures of ``turn_depth_with_overall`` over its rows."""
    stats = row_stats_table(table).qualified
    return turn_depth_from_rows(conn, f"SELECT grp, turns, trained_tokens, trained_turns FROM {stats}", True)
