"""DuckDB I/O: reading rows in batches and key order, appending Arrow, building and swapping tables, transactions."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np

from posttrain_assets.warehouse.model import Table


def fetch_dicts(conn: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> list[dict[str, Any]]:
    """Run a query on a DuckDB connection and return its rows as dicts."""
    cursor = conn.execute(sql, params) if params is not None else conn.execute(sql)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def fetch_batches(
    conn: duckdb.DuckDBPyConnection, sql: str, rows: int, params: dict[str, Any] | None = None
) -> Iterator[list[dict[str, Any]]]:
    """The rows of a query as dicts, ``rows`` at a time, streamed as Arrow batches.

    The query runs on a cursor of its own, so ``conn`` can write (e.g. the next table) while it is read.
    """
    for batch in fetch_arrow(conn, sql, rows, params):
        yield batch.to_pylist()


def fetch_arrow(
    conn: duckdb.DuckDBPyConnection, sql: str, rows: int, params: dict[str, Any] | None = None
) -> Iterator[Any]:
    """As :func:`fetch_batches`, each batch as an Arrow record batch (e.g. to send to a worker process)."""
    # A connection keeps every cursor it hands out until the cursor is closed (each holds a client context of
    # its own), so the cursor is closed when the rows are read or the caller stops early.
    with conn.cursor() as cursor:
        yield from cursor.sql(sql, params=params or {}).to_arrow_reader(rows)


# ---------------------------------------------------------------------------------------------------------------
# reading and writing wide rows in key order
#
# DuckDB's sort does not spill rows with wide VARCHAR or LIST payloads: an ORDER BY over a whole corpus of
# messages or input_ids fails with "failed to pin block" as soon as the payload outgrows the memory limit
# (measured with duckdb 2.0.1: 400 MB of bronze payloads need more than a 400 MB limit). So wide rows are
# never sorted whole. The narrow keys are sorted, cut into ranges of ``rows`` keys, and each range is read
# or written with its own small ORDER BY. A table written this way is stored in key order, so the range
# queries of the next stage are pruned by DuckDB's zone maps instead of scanning the table per range.
# ---------------------------------------------------------------------------------------------------------------


def key_ranges(
    conn: duckdb.DuckDBPyConnection, relation: str, key: str, rows: int, params: dict[str, Any] | None = None
) -> list[tuple]:
    """Inclusive ``(first, last)`` bounds cutting the distinct values of column ``key`` of the query
    ``relation`` (named parameters ``params``) into runs of at most ``rows`` values, in order.

    Runs on ``conn`` itself, so it sees what the caller's open transaction wrote."""
    sql = f"SELECT DISTINCT {key} FROM ({relation}) ORDER BY 1"
    keys = next(iter(conn.execute(sql, params or {}).fetchnumpy().values()))

    def value(i: int) -> Any:
        v = keys[i]
        return v.item() if isinstance(v, np.generic) else v

    return [(value(start), value(min(start + rows, len(keys)) - 1)) for start in range(0, len(keys), rows)]


def _key_range(relation: str, key: str) -> str:
    return f"SELECT * FROM ({relation}) WHERE {key} BETWEEN $range_first AND $range_last ORDER BY {key}"


def ordered_arrow(
    conn: duckdb.DuckDBPyConnection, relation: str, key: str, rows: int, params: dict[str, Any] | None = None
) -> Iterator[Any]:
    """The rows of the query ``relation`` as Arrow tables in ``key`` order, one range of ``rows`` keys each.

    The ranges are read on a cursor of their own (committed data), so the caller may write on ``conn`` between
    them."""
    params = dict(params or {})
    sql = _key_range(relation, key)
    ranges = key_ranges(conn, relation, key, rows, params)
    with conn.cursor() as cursor:  # one cursor for every range, closed at the end (see fetch_batches)
        for first, last in ranges:
            yield cursor.sql(sql, params={**params, "range_first": first, "range_last": last}).to_arrow_table()


def ordered_batches(
    conn: duckdb.DuckDBPyConnection, relation: str, key: str, rows: int, params: dict[str, Any] | None = None
) -> Iterator[list[dict[str, Any]]]:
    """As :func:`ordered_arrow`, each range as a list of dicts."""
    for batch in ordered_arrow(conn, relation, key, rows, params):
        yield batch.to_pylist()


def insert_ordered(
    conn: duckdb.DuckDBPyConnection,
    table: Table,
    relation: str,
    key: str,
    rows: int,
    params: dict[str, Any] | None = None,
) -> None:
    """Append the rows of the query ``relation`` to ``table`` (columns by name) in ``key`` order, one range of
    ``rows`` keys per INSERT, so ``table`` is stored in key order."""
    params = dict(params or {})
    sql = table.insert_sql(f"({_key_range(relation, key)})")
    for first, last in key_ranges(conn, relation, key, rows, params):
        conn.execute(sql, {**params, "range_first": first, "range_last": last})


# Rows per DuckDB row group (its default ROW_GROUP_SIZE). A checkpoint compresses every row group that changed
# since the last one, so a row group filled by many small commits, each followed by an automatic checkpoint, is
# compressed again and again.
ROW_GROUP_ROWS = 122_880

# WAL size that triggers an automatic checkpoint while checkpoints are held off (DuckDB's default is 16MB).
HELD_OFF_AUTOCHECKPOINT = "64GB"


@contextmanager
def checkpoints_held_off(conn: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """No automatic checkpoint inside the block (the caller checkpoints when it chooses); the setting is the
    database's, so it is restored on the way out, also when the block raises."""
    (autocheckpoint,) = conn.execute("SELECT current_setting('wal_autocheckpoint')").fetchone()
    conn.execute(f"SET wal_autocheckpoint = '{HELD_OFF_AUTOCHECKPOINT}'")
    try:
        yield
    finally:
        conn.execute("SET wal_autocheckpoint = $size", {"size": autocheckpoint})


@dataclass
class Twin:
    """A table under construction (:func:`building`), appended to in batches with one commit each."""

    conn: duckdb.DuckDBPyConnection
    table: Table
    rows: int = 0

    def append(self, rows: Any) -> None:
        """Append an Arrow table (None or empty: nothing); checkpoint each time a row group is full."""
        if rows is None or not rows.num_rows:
            return
        insert_arrow(self.conn, self.table, rows)
        filled = self.rows // ROW_GROUP_ROWS
        self.rows += rows.num_rows
        if self.rows // ROW_GROUP_ROWS > filled:
            self.conn.execute("CHECKPOINT")

    def finish(self) -> None:
        """Checkpoint the rows appended since the last full row group, before the twin is read back or published:
        otherwise they stay uncompressed in DuckDB's memory, under its cap, until the next automatic checkpoint."""
        if self.rows % ROW_GROUP_ROWS:
            self.conn.execute("CHECKPOINT")


@contextmanager
def building(conn: duckdb.DuckDBPyConnection, table: Table, suffix: str = "") -> Iterator[Twin]:
    """A fresh, empty twin of ``table`` (``<name>__building<suffix>``) to append batches to, one commit each.

    DuckDB keeps what an open transaction appends from Arrow in process memory until it commits (a table of
    594k tokenised chats built in one transaction grew the process to 11.8 GB), so a table built from many
    Python batches is appended to this twin outside any transaction, and the caller then publishes it in one
    short transaction (:func:`swap_in`, or its own INSERT ... SELECT). The twin is dropped on the way out.

    Automatic checkpoints are held off while the twin is built and it is checkpointed once per full row group
    instead (:meth:`Twin.append`): after every 16 MB of WAL they re-compressed the row group being filled, which
    doubled the cost of appending 122,880 tokenised chats (28 -> 13 s) and of bronze ingestion.
    """
    twin = dataclasses.replace(table, name=f"{table.name}__building{suffix}")
    conn.execute(f"DROP TABLE IF EXISTS {twin.qualified}")
    conn.execute(twin.create_sql())
    try:
        with checkpoints_held_off(conn):
            yield Twin(conn, twin)
    finally:
        conn.execute(f"DROP TABLE IF EXISTS {twin.qualified}")


def swap_in(conn: duckdb.DuckDBPyConnection, twin: Twin, table: Table) -> None:
    """Replace ``table`` by its :func:`building` twin (inside the caller's transaction, so readers see either)."""
    conn.execute(f"DROP TABLE IF EXISTS {table.qualified}")
    conn.execute(f"ALTER TABLE {twin.table.qualified} RENAME TO {table.name}")


@functools.cache
def arrow_schema(table: Table) -> Any:
    """The Arrow schema of ``table``'s columns, as DuckDB hands them over (asked of an empty copy of the table in a
    private in-memory database, once per process)."""
    with duckdb.connect() as scratch:
        scratch.execute(table.create_sql())
        return scratch.sql(f"SELECT * FROM {table.qualified}").to_arrow_table().schema


def insert_rows(conn: duckdb.DuckDBPyConnection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` (dicts keyed by column name; a missing key is null) to ``table`` through one Arrow batch.

    The batch is built with the table's own Arrow schema: inferring the types of nested values (a conversation's
    list of message structs) cost 15-20 times the conversion itself, 1-1.5 s of every 4,096 SFT rows staged."""
    import pyarrow as pa

    if rows:
        insert_arrow(conn, table, pa.Table.from_pylist(rows, schema=arrow_schema(table)))


def insert_arrow(conn: duckdb.DuckDBPyConnection, table: Table, rows: Any) -> None:
    """Append the rows of an Arrow table (columns by name; None or empty: nothing) to ``table``."""
    if rows is not None and rows.num_rows:
        conn.register("rows_to_insert", rows)
        conn.execute(table.insert_sql("rows_to_insert"))
        conn.unregister("rows_to_insert")


def replace_table(
    conn: duckdb.DuckDBPyConnection, table: Table, rows: list[dict[str, Any]], *, transaction: bool = True
) -> None:
    """Create or replace ``table`` with exactly ``rows`` (idempotent); in a transaction of its own unless
    ``transaction`` is False (the caller's transaction then covers it)."""
    with _transaction(conn) if transaction else nullcontext():
        conn.execute(table.create_sql(replace=True))
        insert_rows(conn, table, rows)


@contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN ... COMMIT, rolled back when the block raises (the connection stays usable)."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_transaction = transaction  # for functions whose ``transaction`` argument hides it
