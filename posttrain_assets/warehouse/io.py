"""DuckDB I/O: reading rows in batches and key order, appending Arrow, building and swapping tables, transactions."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from posttrain_assets.processes import process_gone
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
# Writing (insert_ordered) first splits the rows into their ranges in one pass (a partitioned Parquet COPY),
# since one query per range over an unsorted relation scanned all of it per range: N / rows scans of N rows.
# ---------------------------------------------------------------------------------------------------------------


def key_ranges(
    conn: duckdb.DuckDBPyConnection, relation: str, key: str, rows: int, params: dict[str, Any] | None = None
) -> list[tuple]:
    """Inclusive ``(first, last)`` bounds cutting the distinct non-null values of column ``key`` of the query
    ``relation`` (named parameters ``params``) into runs of at most ``rows`` values, in order. Only the bounds
    leave DuckDB, so Python holds two keys per run, not every key.

    Runs on ``conn`` itself, so it sees what the caller's open transaction wrote."""
    return conn.execute(
        f"""
        SELECT min({key}), max({key}) FROM (
            SELECT {key}, (row_number() OVER (ORDER BY {key}) - 1) // $range_rows AS run
            FROM (SELECT DISTINCT {key} FROM ({relation}) WHERE {key} IS NOT NULL)
        )
        GROUP BY run
        ORDER BY run
        """,
        {**(params or {}), "range_rows": rows},
    ).fetchall()


def _key_range(relation: str, key: str) -> str:
    return f"SELECT * FROM ({relation}) WHERE {key} BETWEEN $range_first AND $range_last ORDER BY {key}"


def ordered_arrow(
    conn: duckdb.DuckDBPyConnection,
    relation: str,
    key: str,
    rows: int,
    params: dict[str, Any] | None = None,
    *,
    range_keys: str | None = None,
) -> Iterator[Any]:
    """The rows of the query ``relation`` as Arrow tables in ``key`` order, one range of ``rows`` keys each.

    ``range_keys``: a query of the keys to cut the ranges from, cheaper than ``relation`` (it gets ``params`` too,
    so it must use every one of them); the ``relation`` then reads its range itself (named parameters
    ``$range_first`` and ``$range_last``, in every subquery that should be cut to it), e.g. to fetch its rows by
    rowid (:func:`stored_rows_with_keys`): a range's filter on the key outside the query is applied after its
    joins, and each range read its row groups of every table. The ranges are cut on ``conn`` (which sees the
    caller's open transaction) and read on a cursor of their own (committed data only), so the caller may write
    on ``conn`` between them, but rows it has not committed are not read."""
    params = dict(params or {})
    sql = _key_range(relation, key) if range_keys is None else f"SELECT * FROM ({relation}) ORDER BY {key}"
    ranges = key_ranges(conn, relation if range_keys is None else range_keys, key, rows, params)
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
    """Append the rows of the query ``relation`` (named parameters ``params``) to ``table`` (columns by name) in
    ``key`` order, so ``table`` is stored in key order: every row, also those with a null key (last) or a key
    held by several rows (together, in no particular order among themselves), in memory that does not grow with
    the rows and time about linear in them (a pass over the rows per factor of 16 in the number of ranges).

    The first key of each range of ``rows`` distinct keys is looked up (:func:`key_ranges`, a narrow sort) and
    each row numbered with its range by a binary search over those keys in SQL (:func:`_range_number`); then the
    rows are split into folders of a Hive-partitioned Parquet copy (DuckDB's ``COPY ... (PARTITION_BY
    ...)``), at most 16 per pass, again until each folder holds one range (:func:`_split_and_insert`); each range
    is read back, sorted and inserted on its own, in range order. The copies live in a fresh folder under the
    database's ``temp_directory`` (:func:`_scratch_folder`), removed on the way out, also when a step raises. Runs
    on ``conn`` itself, so it sees (and writes within) the caller's open transaction."""
    params = dict(params or {})
    firsts = [first for first, _ in key_ranges(conn, relation, key, rows, params)[1:]]
    if not firsts:  # one range: sorted whole, no copy to split (DuckDB sorts nulls last)
        conn.execute(table.insert_sql(f"({relation} ORDER BY {key})"), params)
        return
    bounds = {f"{_RANGE_COLUMN}_{number}": first for number, first in enumerate(firsts, 1)}
    # null keys sort last: in the last range
    number = f"CASE WHEN {key} IS NULL THEN {len(firsts)} ELSE {_range_number(key, 0, len(firsts))} END"
    ranges = len(firsts) + 1
    step = 1
    while step * _SPLIT_WAYS < ranges:
        step *= _SPLIT_WAYS
    numbered = f"SELECT *, {number} AS {_RANGE_COLUMN} FROM ({relation})"
    with _scratch_folder(conn, "insert_ordered") as folder:
        _split_and_insert(conn, table, key, numbered, {**params, **bounds}, folder, step)


def insert_key_ranges(
    conn: duckdb.DuckDBPyConnection,
    table: Table,
    relation: str,
    key: str,
    rows: int,
    params: dict[str, Any] | None = None,
) -> None:
    """As :func:`insert_ordered`, for a query ``relation`` whose tables are stored in ``key`` order (gold.sft's join
    of silver.sft_tokenized and silver.records): each range of ``rows`` distinct keys (:func:`key_ranges`) is read,
    sorted and inserted by a query of its own, whose key filter DuckDB pushes down to those tables, so each range
    reads only the row groups and segments that hold its keys; rows with a null key last. No copy of the rows is
    written: on gold.sft's first build at 100k rows this took 11 s of CPU where insert_ordered's Parquet split took
    17 to 19. Over tables in another order every range would read them whole (use insert_ordered there)."""
    params = dict(params or {})
    for first, last in key_ranges(conn, relation, key, rows, params):
        bounds = {"range_first": first, "range_last": last}
        conn.execute(table.insert_sql(f"({_key_range(relation, key)})"), {**params, **bounds})
    conn.execute(table.insert_sql(f"(SELECT * FROM ({relation}) WHERE {key} IS NULL)"), params)


def _split_and_insert(
    conn: duckdb.DuckDBPyConnection, table: Table, key: str, rows: str, params: dict[str, Any], folder: Path, step: int
) -> None:
    """Write the query ``rows`` (with its range numbers) into one folder of ``folder`` per ``step`` ranges, then
    each folder in range order: its rows sorted and inserted into ``table`` (one range each, ``step`` 1), or split
    again by ``step / _SPLIT_WAYS`` ranges (each folder removed once it is split)."""
    with duckdb_settings(conn, _PARTITIONED_WRITE_SETTINGS):
        conn.execute(
            f"""
            COPY (SELECT *, {_RANGE_COLUMN} // {step} AS {_PART_COLUMN} FROM ({rows})) TO {_sql_string(str(folder))}
            (FORMAT parquet, PARTITION_BY ({_PART_COLUMN}), ROW_GROUP_SIZE {_SCRATCH_ROW_GROUP_ROWS})
            """,
            params,
        )
    written = folder.glob(f"{_PART_COLUMN}=*") if folder.exists() else ()  # no folder: no rows
    for part in sorted(written, key=lambda path: int(path.name.partition("=")[2])):
        files = f"read_parquet({_sql_string(str(part / '*.parquet'))}, hive_partitioning = false)"
        if step == 1:
            conn.execute(table.insert_sql(f"(SELECT * FROM {files} ORDER BY {key})"))
        else:
            _split_and_insert(conn, table, key, f"SELECT * FROM {files}", {}, part / "split", step // _SPLIT_WAYS)
        shutil.rmtree(part)


def _range_number(key: str, low: int, high: int) -> str:
    """SQL for the number (``low`` to ``high``) of the range holding a non-null ``key``: nested CASEs comparing it
    with the bound parameter ``$<_RANGE_COLUMN>_<n>``, the first key of range n, about log2(ranges) comparisons
    a row. (Numbering each distinct key with a window and joining it back cost twice as long at 1M rows.)"""
    if low == high:
        return str(low)
    middle = (low + high + 1) // 2
    below, above = _range_number(key, low, middle - 1), _range_number(key, middle, high)
    return f"CASE WHEN {key} < ${_RANGE_COLUMN}_{middle} THEN {below} ELSE {above} END"


# The column numbering a row's range in insert_ordered's Parquet copies, and the one naming their partition folders.
_RANGE_COLUMN = "insert_ordered_range"
_PART_COLUMN = "insert_ordered_part"

# Folders one partitioned COPY writes at most: DuckDB's partitioned COPY holds a vector (2,048 rows) per folder
# and thread before it writes (memory grows with the folders, whatever partitioned_write_max_open_files says:
# rows of 4 KB failed at once with 64 folders under a 1 GB limit, 48 passed, duckdb 2.0.1). So the ranges are
# split 16 ways per pass (16 x 2 threads x 2,048 rows: about as much memory as sorting 2 ranges of 32,768); more
# than 16 ranges take a pass more per factor 16 (32,768 keys per range: 1 pass to 500k rows, 2 to 8M).
_SPLIT_WAYS = 16

# Rows per row group of that copy (the least DuckDB takes): each open partition file holds one row group in
# memory until it is full, and a range folder of wide rows is open for a whole pass.
_SCRATCH_ROW_GROUP_ROWS = 2048

# DuckDB's partitioned COPY keeps up to ``partitioned_write_flush_threshold`` rows per thread (524,288 by
# default) before it hands them to the partition files, and up to ``partitioned_write_max_open_files`` files (100)
# open, each with a row group in memory; lowered to a vector and the folders of one pass. Each thread keeps its own
# partition buffers besides: at 1M rows silver.records' copy (a join of the narrow staged rows with the gate
# cache's wide rows) ran out of the 1 GB cap with DuckDB's two threads and passed with one (peak RSS 1.5 GB); the
# order of rows within a folder is not needed (each range is sorted when read back). They are the database's
# settings, so another connection's COPY meanwhile gets them too; only the copy runs under them.
_PARTITIONED_WRITE_SETTINGS = {
    "partitioned_write_flush_threshold": 2048,
    "partitioned_write_max_open_files": 16,
    "preserve_insertion_order": False,
    "threads": 1,
}

# Scratch folders are named posttrain-<purpose>-<pid>-<32 hex digits>: the pid tells a folder a killed process
# left behind.
_SCRATCH_FOLDER = re.compile(r"posttrain-[a-z_]+-(?P<pid>[0-9]+)-[0-9a-f]{32}")


# ---------------------------------------------------------------------------------------------------------------
# bringing a table to the rows of a query, touching only the rows that changed


@dataclass(frozen=True)
class SyncCounts:
    """What :func:`sync_table` did to a table: rows inserted, deleted and kept as they were, and whether the table
    was created anew (it was missing or its columns differ from its declaration: every row inserted)."""

    inserted: int
    deleted: int
    kept: int
    rebuilt: bool

    def metadata(self, name: str) -> dict[str, int]:
        """``rows_computed/<name>`` (inserted), ``rows_reused/<name>`` (kept) and ``rows_deleted/<name>``, the
        per-stage reuse metadata of the stage caches (plottable)."""
        return {
            f"rows_computed/{name}": self.inserted,
            f"rows_reused/{name}": self.kept,
            f"rows_deleted/{name}": self.deleted,
        }


def sync_table(
    conn: duckdb.DuckDBPyConnection,
    table: Table,
    relation: str,
    key: str,
    rows: int,
    params: dict[str, Any] | None = None,
    *,
    key_ordered: bool | Callable[[], bool] = False,
    fingerprints: str | None = None,
    trust_stored: bool = True,
    rows_of_keys: Callable[[str], str] | None = None,
) -> SyncCounts:
    """Bring ``table`` to exactly the rows of the query ``relation`` (named parameters ``params``; its columns by
    name, ``key`` unique and not null in it), touching only the rows that changed.

    Each row's fingerprint is kept beside the table (:func:`fingerprint_table`), so a sync reads the stored
    fingerprints, not the stored rows; they are trusted while the table's row count and key checksum
    (:func:`_key_checksum`, a pass over the key column alone) agree with them, and read from the rows again when
    not (a table edited outside this function). ``fingerprints``: a query (same ``params``) giving each row of
    ``relation`` as ``sync_key`` and a ``sync_fingerprint`` that changes whenever the row's content does, cheaper
    than hashing the rows (e.g. from the stored fingerprints of the tables ``relation`` reads,
    :func:`trusted_fingerprints`); the stored ones are then of that kind. When the stored fingerprints are not
    trusted (of another kind, e.g. after the ``fingerprints`` query changed, or missing) both sides are compared by
    content once, as without ``fingerprints``, and the new kind stored: only the rows whose content differs are
    written (filling the whole table anew inside the caller's transaction ran out of DuckDB's memory at 1M wide
    rows, and rewrote rows that had not changed). Rows deleted or inserted outside this function are found by
    key and set right (:func:`_reconcile`); a row edited in place outside it is not seen, unless ``trust_stored``
    is False (a full rebuild): then the stored rows and the query's are hashed again and compared by content.
    ``rows_of_keys``: given the name of a table of keys (column ``sync_key``), a query (same ``params``) of the rows
    of ``relation`` with those keys, cheaper than filtering ``relation`` (which DuckDB does after its joins: at 1M
    rows, fetching a refresh's 8,899 new silver records that way read every record's wide columns, 3 to 4 s;
    :func:`stored_rows_with_keys` fetches a stored table's rows by key cheaply).

    A missing ``table``, or one whose columns (names, types, nullability, order) differ from its declaration, is
    created anew and filled in ``key`` order, ``rows`` keys per range; so is an empty one, with no fingerprint read
    (every row is new). The rows are split into their ranges by :func:`insert_ordered`, or, with ``key_ordered``
    (the query's tables are stored in ``key`` order, so a range of keys is read without scanning the rest; a
    callable, e.g. :func:`stored_in_key_order`, is asked only when rows are inserted by ranges), each range is read
    by a query of its own (:func:`insert_key_ranges`). Otherwise each row's ``key`` and content
    fingerprint (:func:`fingerprint_sql` over the declared columns, the query's cast to their declared types) are
    read on both sides: the stored rows whose pair is not among the query's are deleted and the query's rows whose
    pair is not stored are inserted, in ``key`` order after the rows kept (so the table is no longer stored in key
    order: readers order by the key). Runs on ``conn`` itself, inside the caller's transaction, so a run killed
    midway leaves the previous rows. Raises ValueError when the query yields a null or duplicate ``key`` (the
    caller's transaction then rolls back)."""
    params = dict(params or {})
    kind = _fingerprint_kind(table, relation, fingerprints, params)

    def rebuild(had_table: bool = True) -> SyncCounts:
        return _rebuild(
            conn,
            table,
            relation,
            key,
            rows,
            params,
            had_table=had_table,
            key_ordered=key_ordered,
            fingerprints=fingerprints,
            kind=kind,
        )

    stored = _stored_columns(conn, table)
    if stored != declared_columns(table):
        return rebuild(had_table=bool(stored))
    if conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM {table.qualified} LIMIT 1)").fetchone() == (0,):
        inserted = _fill(conn, table, relation, key, rows, params, key_ordered=key_ordered)
        _store_fingerprints(conn, table, key, params, fingerprints, kind)
        return SyncCounts(inserted=inserted, deleted=0, kept=0, rebuilt=False)
    columns = declared_columns(table)
    side = fingerprint_table(table)
    same_kind = trust_stored and _stored_kind(conn, table) == kind
    strays = 0
    if same_kind and not _agrees(conn, table, key):
        strays = _reconcile(conn, table, key)
    trusted = same_kind and strays is not None
    strays = strays or 0

    # The query's own fingerprints stand for its rows only beside stored ones of the same kind; otherwise both
    # sides are hashed by content (fingerprints of the query's kind cannot be read from the stored rows).
    derived = fingerprints is not None and trusted
    fingerprint = fingerprint_sql((name, data_type) for name, data_type, _ in columns)
    # the query's columns cast to the declared types, so its rows hash as the table will store them
    casts = ", ".join(f"CAST({_quoted(name)} AS {data_type}) AS {_quoted(name)}" for name, data_type, _ in columns)
    tag = uuid.uuid4().hex
    wanted, kept, gone, fresh = (f"sync_{name}_{tag}" for name in ("wanted", "stored", "gone", "fresh"))
    try:
        conn.execute(
            f"CREATE TEMP TABLE {wanted} AS SELECT sync_key, sync_fingerprint FROM ({fingerprints})"
            if derived
            else f"CREATE TEMP TABLE {wanted} AS SELECT sync_key, {fingerprint} AS sync_fingerprint "
            f"FROM (SELECT {key} AS sync_key, {casts} FROM ({relation}))",
            params,
        )
        _require_unique_keys(conn, wanted, table, key, "the rows to sync")
        if trusted:
            kept = side
        else:
            conn.execute(
                f"CREATE TEMP TABLE {kept} AS SELECT {key} AS sync_key, {fingerprint} AS sync_fingerprint "
                f"FROM {table.qualified}"
            )
            if _duplicate_keys(conn, kept):  # not written by this function: start again from the declaration
                return rebuild()
        conn.execute(
            f"CREATE TEMP TABLE {gone} AS SELECT sync_key FROM {kept} "
            f"ANTI JOIN {wanted} USING (sync_key, sync_fingerprint)"
        )
        conn.execute(
            f"CREATE TEMP TABLE {fresh} AS SELECT sync_key FROM {wanted} "
            f"ANTI JOIN {kept} USING (sync_key, sync_fingerprint)"
        )
        (stored_rows,) = conn.execute(f"SELECT count(*) FROM {kept}").fetchone()
        (deleted,) = conn.execute(f"SELECT count(*) FROM {gone}").fetchone()
        (inserted,) = conn.execute(f"SELECT count(*) FROM {fresh}").fetchone()
        if deleted:
            conn.execute(f"DELETE FROM {table.qualified} WHERE {key} IN (SELECT sync_key FROM {gone})")
        changed = (
            f"SELECT * FROM ({relation}) WHERE {key} IN (SELECT sync_key FROM {fresh})"
            if rows_of_keys is None
            else rows_of_keys(fresh)
        )
        if inserted > rows:
            (insert_key_ranges if _decided(key_ordered) else insert_ordered)(conn, table, changed, key, rows, params)
        elif inserted:  # one range's worth: sorted whole, as insert_ordered sorts each range
            conn.execute(table.insert_sql(f"({changed} ORDER BY {key})"), params)
        if trusted:  # the stored fingerprints follow the rows deleted and inserted
            if deleted:
                conn.execute(f"DELETE FROM {side} WHERE sync_key IN (SELECT sync_key FROM {gone})")
            if inserted:
                conn.execute(f"INSERT INTO {side} SELECT * FROM {wanted} SEMI JOIN {fresh} USING (sync_key)")
        elif fingerprints is not None:  # the table now holds exactly the query's rows: store their fingerprints
            _store_fingerprints(conn, table, key, params, fingerprints, kind)
        else:  # the table now holds exactly the query's rows: their content hashes are the stored fingerprints
            _write_fingerprints(conn, table, f"SELECT sync_key, sync_fingerprint FROM {wanted}", {}, kind)
        return SyncCounts(inserted=inserted, deleted=deleted + strays, kept=stored_rows - deleted, rebuilt=False)
    finally:
        # After a failed statement the caller's transaction is aborted and takes the temporary tables with it
        # when it rolls back; dropping them then fails, and must not hide the error.
        with suppress(duckdb.Error):
            conn.execute(
                ";".join(
                    f"DROP TABLE IF EXISTS temp.main.{name}" for name in (wanted, kept, gone, fresh) if name != side
                )
            )


def stored_rows_with_keys(table: str, keys: str, key: str = "id", where: str = "TRUE") -> str:
    """A query of the rows of the stored table ``table`` matching ``where`` whose ``key`` the table ``keys`` lists
    (column ``sync_key``), fetched by rowid: DuckDB reads the key column to find their rowids, then only the row
    groups that hold them (a sync appends its new rows at the end). Filtered by key alone, every row's wide columns
    were read: fetching a refresh's 5,336 rows of gold.sft's 539,021 took 2.3 s that way, 0.1 s by rowid (1M
    corpus, token lists)."""
    return (
        f"SELECT * FROM {table} WHERE rowid IN "
        f"(SELECT rowid FROM {table} WHERE ({where}) AND {key} IN (SELECT sync_key FROM {keys}))"
    )


def stored_rows_in_range(table: str, keys: str, key: str = "id", where: str = "TRUE") -> str:
    """As :func:`stored_rows_with_keys`, for a relation of :func:`ordered_arrow` with ``range_keys``: the rows of
    ``table`` matching ``where`` whose ``key`` the query ``keys`` (one column) lists, of the range
    ``$range_first`` to ``$range_last`` only (the keys too, so each range's look-up stays the size of the range)."""
    in_range = "BETWEEN $range_first AND $range_last"
    listed = f"(SELECT sync_key FROM ({keys}) listed(sync_key) WHERE sync_key {in_range})"
    return stored_rows_with_keys(table, listed, key, f"({where}) AND {key} {in_range}")


# The schema of the stored row fingerprints of the tables sync_table writes, one table per synced table
# (``<schema>__<name>``: ``sync_key``, ``sync_fingerprint``), its comment naming the fingerprints' kind.
FINGERPRINT_SCHEMA = "sync"


def fingerprint_table(table: Table) -> str:
    """The qualified name of the table holding ``table``'s stored row fingerprints (see :func:`sync_table`)."""
    return f"{FINGERPRINT_SCHEMA}.{_quoted(f'{table.schema}__{table.name}')}"


def trusted_fingerprints(conn: duckdb.DuckDBPyConnection, table: Table, key: str = "id") -> str | None:
    """The qualified name of ``table``'s stored row fingerprints (``sync_key``, ``sync_fingerprint``: one row per
    row of ``table``, the fingerprint changing with the row's content) when they agree with ``table``'s rows in count
    and key checksum; None when there are none or they do not (the table was written or edited outside
    :func:`sync_table`). For a query over synced tables to fingerprint its rows by theirs (``sync_table``'s
    ``fingerprints``) instead of hashing them."""
    if _stored_kind(conn, table) is None or not _stored_columns(conn, table):
        return None
    return fingerprint_table(table) if _agrees(conn, table, key) else None


def _fingerprint_kind(table: Table, relation: str, fingerprints: str | None, params: dict[str, Any]) -> str:
    """What the stored fingerprints of ``table`` are: the hash of its declared columns' content
    (:func:`fingerprint_sql`), or those of a ``fingerprints`` query, which stand for the rows of ``relation`` only as
    long as both queries and their parameters are the same (a changed query changes the kind: the table is compared
    by content once)."""
    import hashlib

    if fingerprints is None:
        what = repr(("content", declared_columns(table)))
    else:
        what = repr(("derived", declared_columns(table), relation, fingerprints, sorted(params.items(), key=str)))
    return hashlib.sha256(what.encode()).hexdigest()


def _stored_kind(conn: duckdb.DuckDBPyConnection, table: Table) -> str | None:
    """The kind of ``table``'s stored fingerprints (the comment on their table); None when there are none."""
    found = conn.execute(
        "SELECT comment FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = $schema AND table_name = $name",
        {"schema": FINGERPRINT_SCHEMA, "name": f"{table.schema}__{table.name}"},
    ).fetchone()
    return None if found is None else found[0]


def _key_checksum(conn: duckdb.DuckDBPyConnection, relation: str, key: str) -> tuple[int, int]:
    """(rows, bit_xor of the hashes of column ``key``) of the table ``relation``: a pass over one column."""
    return conn.execute(f"SELECT count(*), coalesce(bit_xor(hash({key})), 0) FROM {relation}").fetchone()


def _agrees(conn: duckdb.DuckDBPyConnection, table: Table, key: str) -> bool:
    """Whether ``table``'s stored fingerprints have its rows' count and key checksum."""
    return _key_checksum(conn, table.qualified, key) == _key_checksum(conn, fingerprint_table(table), "sync_key")


def _reconcile(conn: duckdb.DuckDBPyConnection, table: Table, key: str) -> int | None:
    """Bring ``table``'s rows and its stored fingerprints back to the same keys after rows were deleted or inserted
    outside :func:`sync_table`: a stored row with no stored fingerprint is deleted (what it holds is unknown; the
    sync inserts it again if the query has it) and a fingerprint with no row is dropped (the sync inserts the row).
    The rows deleted; None when ``table`` holds a key twice (the caller starts again from the query). Narrow anti
    joins over the keys: a row edited in place outside ``sync_table`` keeps its fingerprint and goes unnoticed."""
    side = fingerprint_table(table)
    tag = uuid.uuid4().hex
    keys = f"sync_repair_{tag}"
    conn.execute(f"CREATE TEMP TABLE {keys} AS SELECT {key} AS sync_key FROM {table.qualified}")
    try:
        if _duplicate_keys(conn, keys):
            return None
        (strays,) = conn.execute(
            f"SELECT count(*) FROM {keys} WHERE sync_key NOT IN (SELECT sync_key FROM {side})"
        ).fetchone()
        if strays:
            conn.execute(f"DELETE FROM {table.qualified} WHERE {key} NOT IN (SELECT sync_key FROM {side})")
        conn.execute(f"DELETE FROM {side} WHERE sync_key NOT IN (SELECT sync_key FROM {keys})")
        return strays
    finally:
        with suppress(duckdb.Error):  # see sync_table
            conn.execute(f"DROP TABLE IF EXISTS temp.main.{keys}")


def _write_fingerprints(
    conn: duckdb.DuckDBPyConnection, table: Table, rows: str, params: dict[str, Any], kind: str
) -> None:
    """Replace ``table``'s stored fingerprints by the rows of the query ``rows`` (``sync_key``,
    ``sync_fingerprint``), of kind ``kind``."""
    side = fingerprint_table(table)
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {FINGERPRINT_SCHEMA}")
    conn.execute(f"CREATE OR REPLACE TABLE {side} AS {rows}", params)
    conn.execute(f"COMMENT ON TABLE {side} IS {_sql_string(kind)}")


def _store_fingerprints(
    conn: duckdb.DuckDBPyConnection,
    table: Table,
    key: str,
    params: dict[str, Any],
    fingerprints: str | None,
    kind: str,
) -> None:
    """Store the fingerprints of ``table``'s rows just filled: those of the ``fingerprints`` query, or each stored
    row's content hashed (one pass over the rows)."""
    if fingerprints is not None:
        _write_fingerprints(conn, table, f"SELECT sync_key, sync_fingerprint FROM ({fingerprints})", params, kind)
        return
    fingerprint = fingerprint_sql((name, data_type) for name, data_type, _ in declared_columns(table))
    rows = f"SELECT {key} AS sync_key, {fingerprint} AS sync_fingerprint FROM {table.qualified}"
    _write_fingerprints(conn, table, rows, {}, kind)


def _rebuild(
    conn: duckdb.DuckDBPyConnection,
    table: Table,
    relation: str,
    key: str,
    rows: int,
    params: dict[str, Any],
    *,
    had_table: bool,
    key_ordered: bool | Callable[[], bool],
    fingerprints: str | None,
    kind: str,
) -> SyncCounts:
    """``table`` created anew (replacing a stored one) and filled with the rows of ``relation`` in ``key`` order,
    its fingerprints stored."""
    deleted = conn.execute(f"SELECT count(*) FROM {table.qualified}").fetchone()[0] if had_table else 0
    conn.execute(table.create_sql(replace=True))
    inserted = _fill(conn, table, relation, key, rows, params, key_ordered=key_ordered)
    _store_fingerprints(conn, table, key, params, fingerprints, kind)
    return SyncCounts(inserted=inserted, deleted=deleted, kept=0, rebuilt=True)


def _fill(
    conn: duckdb.DuckDBPyConnection,
    table: Table,
    relation: str,
    key: str,
    rows: int,
    params: dict[str, Any],
    *,
    key_ordered: bool | Callable[[], bool],
) -> int:
    """Insert the rows of ``relation`` into the empty ``table`` in ``key`` order; the rows inserted. Raises
    ValueError when ``key`` is null or held by several rows (the caller's transaction then rolls back)."""
    (insert_key_ranges if _decided(key_ordered) else insert_ordered)(conn, table, relation, key, rows, params)
    tag = uuid.uuid4().hex
    conn.execute(f"CREATE TEMP TABLE sync_keys_{tag} AS SELECT {key} AS sync_key FROM {table.qualified}")
    try:
        _require_unique_keys(conn, f"sync_keys_{tag}", table, key, "the rows to sync")
        (inserted,) = conn.execute(f"SELECT count(*) FROM sync_keys_{tag}").fetchone()
    finally:
        with suppress(duckdb.Error):  # see sync_table
            conn.execute(f"DROP TABLE IF EXISTS temp.main.sync_keys_{tag}")
    return inserted


def _decided(key_ordered: bool | Callable[[], bool]) -> bool:
    """``key_ordered``, asked only when rows are about to be inserted by ranges (a check may read a column whole)."""
    return key_ordered() if callable(key_ordered) else key_ordered


def stored_in_key_order(conn: duckdb.DuckDBPyConnection, table: Table, key: str = "id") -> bool:
    """Whether ``table``'s rows are stored in ``key`` order (by ``rowid``), so :func:`insert_key_ranges` over it reads
    each range's row groups only. A sync appends its new rows after the rows kept (:func:`sync_table`), so a table
    synced since it was filled is not: each range would also read every appended row group, at 1M rows after ten
    refreshes of 10,000 rows about 100,000 rows per range. A pass over the key column."""
    (descents,) = conn.execute(
        f"SELECT count(*) FILTER (WHERE {key} < previous) FROM "
        f"(SELECT {key}, lag({key}) OVER (ORDER BY rowid) AS previous FROM {table.qualified})"
    ).fetchone()
    return descents == 0


def _duplicate_keys(conn: duckdb.DuckDBPyConnection, keys: str) -> list[tuple[Any, int]]:
    """Up to 5 (key, rows) of the keys that are null or held by more than one row of the table ``keys``
    (column ``sync_key``)."""
    return conn.execute(
        f"SELECT sync_key, count(*) FROM {keys} GROUP BY sync_key HAVING count(*) > 1 OR sync_key IS NULL "
        "ORDER BY sync_key NULLS FIRST LIMIT 5"
    ).fetchall()


def _require_unique_keys(conn: duckdb.DuckDBPyConnection, keys: str, table: Table, key: str, what: str) -> None:
    if duplicates := _duplicate_keys(conn, keys):
        listed = ", ".join(f"{k!r} ({n} rows)" for k, n in duplicates)
        raise ValueError(f"{table.qualified}: {key} must be unique and not null in {what}; found {listed}")


def _stored_columns(conn: duckdb.DuckDBPyConnection, table: Table) -> tuple[tuple[str, str, bool], ...]:
    """(name, DuckDB type, nullable) of each column of ``table`` as stored in ``conn``'s database, in order (empty:
    no such table)."""
    return tuple(
        (name, data_type, nullable == "YES")
        for name, data_type, nullable in conn.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_catalog = current_database() AND table_schema = $schema AND table_name = $name "
            "ORDER BY ordinal_position",
            {"schema": table.schema, "name": table.name},
        ).fetchall()
    )


@functools.cache
def declared_columns(table: Table) -> tuple[tuple[str, str, bool], ...]:
    """(name, DuckDB type, nullable) of each column ``table`` declares, as DuckDB spells the types (asked of an empty
    copy of the table in a private in-memory database, once per process)."""
    with duckdb.connect() as scratch:
        scratch.execute(table.create_sql())
        return _stored_columns(scratch, table)


def fingerprint_sql(columns: Iterable[tuple[str, str | duckdb.DuckDBPyType]]) -> str:
    """SQL for a row's 64-bit content fingerprint over ``columns``, (name, DuckDB type) pairs (the type as DuckDB
    spells it, or parsed): DuckDB's ``hash`` of each column's value together with the terms of its shape
    (:func:`_shape_terms`). The one row fingerprint of the warehouse: :func:`sync_table` compares a table's rows
    with a query's by it, and the exports decide which shards to rewrite by it.

    DuckDB's ``hash`` is cheap but takes some values that differ for the same: NULL, ``[]`` and ``[NULL]`` hash
    alike, as do a null struct and one whose fields are all null; zeros at the head of a list vanish (``[0, 1]``
    hashes as ``[1]``); a list of lists hashes as its elements flattened (``[[1], [2]]`` as ``[[1, 2]]``); and
    -0.0 as 0.0. The shape terms tell those apart, so the remaining chance that a changed row keeps its
    fingerprint is that of a 64-bit hash, about 5e-20 per changed row. Cheaper than hashing each nested value's
    JSON text, as sync_table did (gold.sft's messages: 0.22 s instead of 0.72 s over 53,903 rows), and stricter
    (-0.0; lists of lists)."""
    terms = []
    for name, kind in columns:
        column = _quoted(name)
        terms += [column, *_shape_terms(column, duckdb.sqltype(kind) if isinstance(kind, str) else kind, 0)]
    return f"hash({', '.join(terms)})"


def _shape_terms(value: str, kind: duckdb.DuckDBPyType, depth: int) -> list[str]:
    """SQL terms that tell apart the values of type ``kind`` (the SQL expression ``value``) that ``hash(value)``
    takes for the same: a list's length (null for a null list) and, for a nested element type, each element's
    shape hashed; whether a struct is null, and its fields' shapes; a float's text (-0.0). A MAP, UNION or
    fixed-size ARRAY (none in the catalogue) gives its JSON text, which tells every value apart. Flat lists of
    numbers or strings need only their length: their hash already covers each element in order."""
    if kind.id in ("float", "double"):
        return [f"{value}::VARCHAR"]
    if kind.id == "struct":
        fields = [
            term for field, child in kind.children for term in _shape_terms(f"{value}.{_quoted(field)}", child, depth)
        ]
        return [f"{value} IS NULL", *fields]
    if kind.id == "list":
        element = f"e{depth}"
        inner = _shape_terms(element, kind.child, depth + 1)
        terms = [f"len({value})"]
        if inner:
            terms.append(f"list_transform({value}, lambda {element}: hash({', '.join(inner)}))")
        return terms
    if kind.id in ("map", "union", "array"):
        return [f"to_json({value})"]
    return []


def _quoted(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


# DuckDB's memory cap while a stage streams batches through worker processes (SFT tokenisation, the mask proof): a
# range read and a batch's insert need little, but under the warehouse's cap (defs.resources.DUCKDB_MEMORY_LIMIT,
# 1 GB) the buffer pool keeps every block the loop reads or writes, so the process grew with the corpus towards the
# cap while the workers hold their own memory beside it (100k rows: 600-900 MiB of DuckDB in that loop).
STREAMING_MEMORY_LIMIT = "256MiB"
# A cap of the same kind, higher, for the silver pass's worker loops (the gate, MinHash signatures, near-dup
# verification and similarities), which also stream a query's result into the workers and fill the pass's work
# tables and caches as they go: at 1 M rows 256 MiB runs out of memory there, 512 MiB holds. Without a cap the
# parent's 1 GB of DuckDB sat beside the workers' memory: the silver pass peaked at 3.2 GiB at 1 M rows.
WORKER_LOOP_MEMORY_LIMIT = "512MiB"
_MEMORY_SIZE = re.compile(r"\s*([\d.]+)\s*([KMGT]i?B|bytes)\s*")
_UNITS = {"bytes": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
_UNITS |= {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def memory_bytes(size: str) -> float:
    """A DuckDB memory size (``953.6 MiB``, ``1GB``) in bytes."""
    found = _MEMORY_SIZE.fullmatch(size)
    if found is None:
        raise ValueError(f"not a DuckDB memory size: {size!r}")
    return float(found[1]) * _UNITS[found[2]]


def _restorable(shown: str) -> str:
    """A setting's value as DuckDB shows it, to set it back: a memory size is shown truncated to 0.1 of its unit
    (1 GB as 953.6 MiB), so it is set to within 0.05 of that unit (953.65 MiB, shown alike); anything else as is."""
    found = _MEMORY_SIZE.fullmatch(shown)
    if found is None or found[2] == "bytes":
        return shown
    return f"{float(found[1]) + 0.05:.2f} {found[2]}"


@contextmanager
def duckdb_settings(conn: duckdb.DuckDBPyConnection, settings: dict[str, int | str]) -> Iterator[None]:
    """The database's global DuckDB ``settings`` inside the block, restored on the way out, also when the block
    raises. Set on a cursor of its own: a failed statement aborts the caller's open transaction on ``conn``, where
    no SET runs until the caller rolls back."""
    with conn.cursor() as cursor:
        before = {
            name: cursor.execute("SELECT current_setting($name)", {"name": name}).fetchone()[0] for name in settings
        }
        try:
            for name, value in settings.items():
                cursor.execute(f"SET GLOBAL {name} = $value", {"value": value})
            yield
        finally:
            for name, value in before.items():
                cursor.execute(f"SET GLOBAL {name} = $value", {"value": _restorable(str(value))})


@contextmanager
def memory_limit_at_most(conn: duckdb.DuckDBPyConnection, limit: str = STREAMING_MEMORY_LIMIT) -> Iterator[None]:
    """DuckDB's ``memory_limit`` at most ``limit`` inside the block (a lower cap is never raised), the warehouse's
    cap again after it (:func:`duckdb_settings`). Lowering it evicts cached blocks."""
    with conn.cursor() as cursor:
        (before,) = cursor.execute("SELECT current_setting('memory_limit')").fetchone()
    with (
        duckdb_settings(conn, {"memory_limit": limit}) if memory_bytes(limit) < memory_bytes(before) else nullcontext()
    ):
        yield


def _sql_string(text: str) -> str:
    """``text`` as an SQL string literal (COPY ... TO takes no bound parameter for its target)."""
    return "'" + text.replace("'", "''") + "'"


@contextmanager
def _scratch_folder(conn: duckdb.DuckDBPyConnection, purpose: str) -> Iterator[Path]:
    """A path for a fresh folder (not created) under the database's ``temp_directory`` (where DuckDB spills, beside
    the database file by default; the system's temporary folder if spilling is off or the database is in memory,
    whose default is ``.tmp`` under the working directory), removed on the way out, also when the block raises.
    Folders of processes that no longer run (a killed run) are removed first; a live process's are left alone."""
    setting, in_memory = conn.execute(
        "SELECT current_setting('temp_directory'), "
        "(SELECT path IS NULL FROM duckdb_databases() WHERE database_name = current_database())"
    ).fetchone()
    parent = Path(tempfile.gettempdir() if not setting or (in_memory and setting == ".tmp") else setting).absolute()
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob("posttrain-*"):
        named = _SCRATCH_FOLDER.fullmatch(stale.name)
        if named and process_gone(int(named["pid"])):
            shutil.rmtree(stale, ignore_errors=True)
    folder = parent / f"posttrain-{purpose}-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
class Appends:
    """Batches appended to tables, one commit each, while automatic checkpoints are held off (:func:`appending`):
    a CHECKPOINT each time a table's appended rows fill a row group (its rows at the start, counted, place the
    boundaries), and one at :meth:`finish` for the rows past the last full one.

    DuckDB's automatic checkpoint (every 16 MB of WAL by its estimate, which leaves out list contents) compresses
    the row group being filled again each time: rebuilding the tokenize cache at 1M rows, 1,024 rows a commit,
    its commits took 133 s for the first 256,000 rows with checkpoints that grew from 2 to 22 s, against 59 s
    with a checkpoint per full row group (7-8 s each, flat)."""

    conn: duckdb.DuckDBPyConnection
    rows: dict[str, int] = dataclasses.field(default_factory=dict)  # per table: rows held (at start + appended)
    unwritten: bool = False  # rows appended since the last checkpoint

    def commit(self, batch: Mapping[Table, Any]) -> None:
        """Append each table's rows (an Arrow table or a list of dicts; None or empty: nothing) in one
        transaction; checkpoint when a table's row group fills."""
        with transaction(self.conn):
            for table, rows in batch.items():
                if isinstance(rows, list):
                    insert_rows(self.conn, table, rows)
                else:
                    insert_arrow(self.conn, table, rows)
        filled = False
        for table, rows in batch.items():
            added = 0 if rows is None else len(rows) if isinstance(rows, list) else rows.num_rows
            if not added:
                continue
            if table.qualified not in self.rows:
                # fetchall: a result left unfinished (fetchone) would refuse the caller's next conn.sql()
                [(held,)] = self.conn.execute(f"SELECT count(*) FROM {table.qualified}").fetchall()
                self.rows[table.qualified] = held - added
            before = self.rows[table.qualified]
            self.rows[table.qualified] = before + added
            filled |= (before + added) // ROW_GROUP_ROWS > before // ROW_GROUP_ROWS
            self.unwritten = True
        if filled:
            self.checkpoint()

    def checkpoint(self) -> None:
        self.conn.execute("CHECKPOINT")
        self.unwritten = False

    def finish(self) -> None:
        """Checkpoint the rows appended since the last full row group, before the tables are read back or
        published: otherwise they stay uncompressed in DuckDB's memory, under its cap, until the next automatic
        checkpoint."""
        if self.unwritten:
            self.checkpoint()


@contextmanager
def appending(conn: duckdb.DuckDBPyConnection, *, checkpoint_tail: bool = True) -> Iterator[Appends]:
    """:class:`Appends` on ``conn``, with automatic checkpoints held off inside the block and the rows appended
    since the last full row group checkpointed when it ends (not when it raises: a killed or failed run leaves
    its committed batches to the next automatic checkpoint). ``checkpoint_tail=False``: not at the end either,
    for a caller that checkpoints right after (a refresh's few rows then cost one checkpoint, not two)."""
    with checkpoints_held_off(conn):
        appends = Appends(conn)
        yield appends
        if checkpoint_tail:
            appends.finish()


@dataclass
class Twin:
    """A table under construction (:func:`building`), appended to in batches with one commit each."""

    appends: Appends
    table: Table

    @property
    def conn(self) -> duckdb.DuckDBPyConnection:
        return self.appends.conn

    @property
    def rows(self) -> int:
        """Rows appended so far (the twin starts empty)."""
        return self.appends.rows.get(self.table.qualified, 0)

    def append(self, rows: Any) -> None:
        """Append an Arrow table (None or empty: nothing); checkpoint each time a row group is full."""
        if rows is None or not rows.num_rows:
            return
        self.appends.commit({self.table: rows})

    def finish(self) -> None:
        """Checkpoint the rows appended since the last full row group (:meth:`Appends.finish`)."""
        self.appends.finish()


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
        with appending(conn, checkpoint_tail=False) as appends:  # the caller checkpoints with twin.finish()
            yield Twin(appends, twin)
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
def transaction(conn: duckdb.DuckDBPyConnection, *, checkpoint: bool = False) -> Iterator[None]:
    """BEGIN ... COMMIT, rolled back when the block raises (the connection stays usable).

    ``checkpoint``: the COMMIT checkpoints the database instead of first writing what the transaction appended to
    the WAL, for a transaction that may write many rows (a gold table's first build). DuckDB checkpoints at a
    commit only when its estimate of the WAL passes ``wal_autocheckpoint``, and the estimate leaves out list
    contents: gold.sft's 53,903 rows went to the WAL at commit (760 MB, 7.1 s of CPU) and were compressed into the
    database at the next checkpoint (the step's close, 5.6 s), against 8.4 s for the checkpoint at commit. So the
    threshold (a setting of the database) is lowered for the commit and restored after. Where another transaction
    is open on the database, DuckDB writes the WAL as before."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    with duckdb_settings(conn, {"wal_autocheckpoint": CHECKPOINT_AT_COMMIT}) if checkpoint else nullcontext():
        conn.execute("COMMIT")


# The WAL size over which a commit checkpoints, in transaction(checkpoint=True): DuckDB's estimate of any
# transaction that appended rows passes it.
CHECKPOINT_AT_COMMIT = "1KB"


_transaction = transaction  # for functions whose ``transaction`` argument hides it
