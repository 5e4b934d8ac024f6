"""Reading and writing wide rows in key order without sorting them whole (io.key_ranges and friends); bronze
as a view over one table per source."""

import collections
import dataclasses
import datetime as dt
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from posttrain_assets.warehouse.bronze import bronze_source_table, ensure_bronze, replace_bronze_source
from posttrain_assets.warehouse.catalogue import BRONZE_RECORDS
from posttrain_assets.warehouse.io import (
    ROW_GROUP_ROWS,
    SyncCounts,
    Twin,
    appending,
    building,
    fingerprint_sql,
    fingerprint_table,
    insert_key_ranges,
    insert_ordered,
    insert_rows,
    key_ranges,
    memory_bytes,
    memory_limit_at_most,
    ordered_arrow,
    ordered_batches,
    replace_table,
    stored_in_key_order,
    stored_rows_in_range,
    stored_rows_with_keys,
    swap_in,
    sync_table,
    transaction,
    trusted_fingerprints,
)
from posttrain_assets.warehouse.model import Column, Table


def append_dicts(twin: Twin, rows: list[dict]) -> None:
    twin.append(pa.Table.from_pylist(rows))


WIDE = Table("main", "wide", "test rows", (Column("id", "VARCHAR", "key"), Column("payload", "VARCHAR", "text")))


@pytest.fixture
def conn(tmp_path):
    with duckdb.connect(str(tmp_path / "t.duckdb")) as conn:
        # ids in reverse insertion order, so any read in id order has to reorder the stored rows
        conn.execute(
            "CREATE TABLE src AS SELECT printf('k%04d', 999 - range) AS id, "
            "repeat(chr((97 + range % 26)::INTEGER), 50) AS payload FROM range(1000)"
        )
        yield conn


def test_key_ranges_cut_distinct_keys_into_runs(conn):
    assert key_ranges(conn, "SELECT id FROM src WHERE id < 'k0010'", "id", 4) == [
        ("k0000", "k0003"),
        ("k0004", "k0007"),
        ("k0008", "k0009"),
    ]
    assert key_ranges(conn, "SELECT 1 AS id WHERE FALSE", "id", 4) == []
    # integer keys come back as Python ints (usable as bound parameters)
    assert key_ranges(conn, "SELECT range AS n FROM range(5)", "n", 2) == [(0, 1), (2, 3), (4, 4)]


def test_ordered_batches_are_in_key_order_across_ranges(conn):
    batches = list(ordered_batches(conn, "SELECT * FROM src WHERE id >= $low", "id", 64, {"low": "k0100"}))
    assert [len(b) for b in batches] == [64] * 14 + [4]
    ids = [row["id"] for batch in batches for row in batch]
    assert ids == [f"k{i:04d}" for i in range(100, 1000)]
    # k0100 was inserted as row 899: 899 % 26 = 15 -> 'p'
    assert batches[0][0] == {"id": "k0100", "payload": "p" * 50}


def test_ordered_arrow_reads_committed_rows_while_conn_writes(conn):
    conn.execute("CREATE TABLE sink (id VARCHAR)")
    seen = 0
    for batch in ordered_arrow(conn, "SELECT id FROM src", "id", 300):
        conn.execute("INSERT INTO sink SELECT unnest($ids)", {"ids": batch.column("id").to_pylist()})
        seen += batch.num_rows
    assert seen == 1000
    assert conn.execute("SELECT count(*), min(id), max(id) FROM sink").fetchone() == (1000, "k0000", "k0999")


def test_ordered_arrow_with_range_keys_reads_each_range_by_rowid(conn):
    # the rows of the keys listed in main.wanted (every third key), each range's rows fetched by rowid
    conn.execute("CREATE TABLE wanted AS SELECT id FROM src WHERE (hash(id) % 3) = 0")
    relation = stored_rows_in_range("main.src", "SELECT id FROM main.wanted", where="payload <> $skip")
    params = {"skip": "a" * 50}
    batches = list(
        ordered_arrow(conn, relation, "id", 64, params, range_keys="SELECT id FROM main.wanted WHERE $skip <> ''")
    )
    expected = conn.execute(
        "SELECT id, payload FROM src WHERE id IN (SELECT id FROM wanted) AND payload <> $skip ORDER BY id", params
    ).fetchall()
    assert [(r["id"], r["payload"]) for b in batches for r in b.to_pylist()] == expected
    assert 250 < len(expected) < 400 and all(b.num_rows <= 64 for b in batches)


def test_stored_rows_with_keys_sees_the_open_transactions_rows(conn):
    conn.execute("CREATE TABLE keys (sync_key VARCHAR)")
    conn.execute("INSERT INTO keys VALUES ('k0001'), ('k0500'), ('k0998'), ('new1'), ('gone')")
    with transaction(conn):
        conn.execute("INSERT INTO src VALUES ('new1', 'fresh'), ('new2', 'not asked for')")
        conn.execute("DELETE FROM src WHERE id = 'k0500'")
        rows = conn.execute(f"SELECT id, payload FROM ({stored_rows_with_keys('src', 'keys')}) ORDER BY id").fetchall()
        # committed and uncommitted rows alike, deleted ones not; the where filter applies to the rows
        assert [r[0] for r in rows] == ["k0001", "k0998", "new1"]
        assert rows[2] == ("new1", "fresh")
        where = stored_rows_with_keys("src", "keys", where="payload = 'fresh'")
        assert conn.execute(f"SELECT id FROM ({where})").fetchall() == [("new1",)]


def test_insert_ordered_stores_rows_in_key_order(conn):
    conn.execute(WIDE.create_sql(replace=True))
    insert_ordered(conn, WIDE, "SELECT * FROM src WHERE payload <> $skip", "id", 128, {"skip": "a" * 50})
    stored = [r[0] for r in conn.execute("SELECT id FROM wide ORDER BY rowid").fetchall()]
    expected = [r[0] for r in conn.execute("SELECT id FROM src WHERE payload[1] <> 'a' ORDER BY id").fetchall()]
    assert len(stored) == 1000 - 39  # rows 0, 26, ..., 988 have payload 'a...'
    assert stored == expected


def test_insert_ordered_sees_the_open_transaction(conn):
    conn.execute("BEGIN TRANSACTION")
    conn.execute("CREATE TABLE staged AS SELECT * FROM src WHERE id < 'k0005'")
    conn.execute(WIDE.create_sql(replace=True))
    insert_ordered(conn, WIDE, "SELECT * FROM staged", "id", 2)
    conn.execute("COMMIT")
    assert [r[0] for r in conn.execute("SELECT id FROM wide ORDER BY rowid").fetchall()] == [
        "k0000",
        "k0001",
        "k0002",
        "k0003",
        "k0004",
    ]


# Needs its size (20-60 s, mostly disk): the payload has to outgrow the limit, and the ranges be more than one
# partitioned COPY writes (16), so the rows are split twice.
@pytest.mark.slow
def test_insert_ordered_writes_more_than_the_memory_limit_of_wide_rows(tmp_path):
    """384 MB of payload in key order under a 256 MB DuckDB limit (a plain ORDER BY of 512 MB of such rows fails
    with duckdb 2.0.1's "failed to pin block"): only one range is ever sorted."""
    with duckdb.connect(str(tmp_path / "big.duckdb"), config={"memory_limit": "256MB", "threads": 1}) as conn:
        conn.execute(
            "CREATE TABLE src AS SELECT md5(range::VARCHAR) AS id, repeat(md5(range::VARCHAR), 64) AS payload "
            "FROM range(192000)"
        )
        conn.execute(WIDE.create_sql(replace=True))
        # in one transaction, as silver.records is published (a commit per range would checkpoint each time)
        with transaction(conn):
            insert_ordered(conn, WIDE, "SELECT * FROM src", "id", 8000)
        ids = [r[0] for r in conn.execute("SELECT id FROM wide ORDER BY rowid").fetchall()]
        assert len(ids) == 192000 and ids == sorted(ids)
        assert conn.execute("SELECT sum(length(payload)) FROM wide").fetchone()[0] == 192000 * 32 * 64


# Every column type the catalogue's tables hold, with the values that a Parquet round trip could lose: empty and
# null lists, null structs and structs of nulls, instants with a zone, infinities.
RICH = Table(
    "main",
    "rich",
    "test rows",
    (
        Column("id", "VARCHAR", "key"),
        Column("n", "BIGINT", "number"),
        Column("score", "DOUBLE", "score"),
        Column("ok", "BOOLEAN", "flag"),
        Column("tokens", "INTEGER[]", "token ids"),
        Column("weights", "DOUBLE[]", "weights"),
        Column("origin", 'STRUCT(file VARCHAR, "row" BIGINT)', "provenance"),
        Column("messages", "STRUCT(role VARCHAR, content VARCHAR)[]", "chat"),
        Column("at", "TIMESTAMP WITH TIME ZONE", "instant"),
    ),
)

RICH_SOURCE = """
SELECT printf('k%04d', (range * 7919) % 1000 // 2) AS id,  -- every key twice, in scrambled order
       range AS n,
       CASE range % 5 WHEN 0 THEN NULL WHEN 1 THEN 'inf'::DOUBLE WHEN 2 THEN '-inf'::DOUBLE ELSE range / 7 END AS score,
       CASE WHEN range % 3 = 0 THEN NULL ELSE range % 2 = 0 END AS ok,
       CASE range % 4 WHEN 0 THEN NULL WHEN 1 THEN [] ELSE [range::INTEGER, NULL, -1] END AS tokens,
       CASE WHEN range % 6 = 0 THEN [NULL, 0.5] ELSE [range * 0.25] END AS weights,
       CASE range % 3 WHEN 0 THEN NULL WHEN 1 THEN {'file': NULL, 'row': NULL}
            ELSE {'file': 'f' || range, 'row': range} END AS origin,
       CASE WHEN range % 5 = 0 THEN [] ELSE [{'role': 'user', 'content': repeat('x', range % 40)},
            {'role': NULL, 'content': NULL}] END AS messages,
       CASE WHEN range % 7 = 0 THEN NULL
            ELSE TIMESTAMPTZ '2026-11-26 10:00:00.123456+00' + to_microseconds(range) END AS at
FROM range(1000)
WHERE range % $skip <> 0
"""


def _stored(conn: duckdb.DuckDBPyConnection, table: Table) -> list[tuple]:
    return conn.execute(f"SELECT * FROM {table.qualified} ORDER BY rowid").fetchall()


def test_insert_ordered_keeps_every_row_and_value_across_many_ranges(conn):
    """Many ranges, duplicate keys, a null key and bound parameters: the table holds exactly the source's rows,
    with the same types and values, in key order (the duplicates of a key together, the null key last)."""
    source = f"{RICH_SOURCE} UNION ALL SELECT NULL, -1, 0.0, TRUE, [], [], NULL, [], NULL"
    conn.execute(RICH.create_sql(replace=True))
    insert_ordered(conn, RICH, source, "id", 2, {"skip": 11})  # 250 ranges: split in two passes (16 x 16)
    stored = _stored(conn, RICH)
    assert len(stored) == 1000 - 91 + 1  # 91 multiples of 11 below 1000 skipped, plus the null key
    ids = [row[0] for row in stored]
    keys = conn.execute(f"SELECT id FROM ({source}) WHERE id IS NOT NULL ORDER BY id", {"skip": 11}).fetchall()
    assert ids[-1] is None and ids[:-1] == [k for (k,) in keys]
    assert max(collections.Counter(ids[:-1]).values()) == 2
    # same values, compared by DuckDB, both ways
    for a, b in (("rich", f"({source})"), (f"({source})", "rich")):
        (missing,) = conn.execute(f"SELECT count(*) FROM (FROM {a} EXCEPT ALL FROM {b})", {"skip": 11}).fetchone()
        assert missing == 0
    # the same keys in the same order whatever the range size (rows sharing a key: in no particular order)
    conn.execute("CREATE TABLE again AS FROM rich LIMIT 0")
    insert_ordered(conn, dataclasses.replace(RICH, name="again"), source, "id", 1000, {"skip": 11})
    assert conn.execute("SELECT id FROM again ORDER BY rowid").fetchall() == [(i,) for i in ids]


def _scratch(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "t.duckdb.tmp").glob("posttrain-*"))


def _partition_settings(conn: duckdb.DuckDBPyConnection) -> tuple:
    return conn.execute(
        "SELECT current_setting('partitioned_write_flush_threshold'), "
        "current_setting('partitioned_write_max_open_files')"
    ).fetchone()


def test_insert_ordered_leaves_no_scratch_files_also_when_it_fails(conn, tmp_path):
    defaults = _partition_settings(conn)
    conn.execute(WIDE.create_sql(replace=True))
    insert_ordered(conn, WIDE, "SELECT * FROM src", "id", 100)
    assert conn.execute("SELECT count(*) FROM wide").fetchone() == (1000,)
    assert (tmp_path / "t.duckdb.tmp").is_dir() and _scratch(tmp_path) == []
    # the fifth range breaks the table's NOT NULL: the caller's transaction rolls back, the scratch copy is gone
    strict = Table("main", "strict", "test rows", (Column("id", "VARCHAR", "key", False), WIDE.columns[1]))
    conn.execute(strict.create_sql())
    broken = "SELECT CASE WHEN id = 'k0450' THEN NULL ELSE id END AS id, id AS sort_key, payload FROM src"
    with pytest.raises(duckdb.ConstraintException), transaction(conn):
        insert_ordered(conn, strict, broken, "sort_key", 100)
    assert conn.execute("SELECT count(*) FROM strict").fetchone() == (0,)
    assert _scratch(tmp_path) == []
    assert _partition_settings(conn) == defaults
    # an empty source writes nothing (and leaves nothing)
    insert_ordered(conn, WIDE, "SELECT * FROM src WHERE FALSE", "id", 100)
    assert conn.execute("SELECT count(*) FROM wide").fetchone() == (1000,) and _scratch(tmp_path) == []


def test_a_killed_runs_scratch_files_do_not_stay(conn, tmp_path):
    """A folder left by a process that no longer runs is removed by the next insert_ordered; one of a process
    that runs (another connection's insert under way) is left alone."""
    scratch = tmp_path / "t.duckdb.tmp"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = scratch / f"posttrain-insert_ordered-{int(finished.stdout)}-{'0' * 32}" / "insert_ordered_range=0"
    alive = scratch / f"posttrain-insert_ordered-{os.getppid()}-{'1' * 32}"
    dead.mkdir(parents=True)
    alive.mkdir()
    (dead / "data_0.parquet").write_bytes(b"left by a killed run")
    conn.execute(WIDE.create_sql(replace=True))
    insert_ordered(conn, WIDE, "SELECT * FROM src", "id", 300)
    assert conn.execute("SELECT count(*) FROM wide").fetchone() == (1000,)
    assert _scratch(tmp_path) == [alive.name]


def test_a_transaction_commits_or_is_rolled_back_whole_and_the_connection_stays_usable(conn):
    with transaction(conn):
        conn.execute("DELETE FROM src WHERE id < 'k0500'")
    assert conn.execute("SELECT count(*) FROM src").fetchall() == [(500,)]
    with pytest.raises(duckdb.ConstraintException), transaction(conn):
        conn.execute("DELETE FROM src")
        conn.execute("CREATE TABLE strict (id INTEGER NOT NULL)")
        conn.execute("INSERT INTO strict VALUES (NULL)")
    # neither the delete nor the new table happened, and the next statement runs
    assert conn.execute("SELECT count(*) FROM src").fetchall() == [(500,)]
    assert conn.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'strict'").fetchall() == [(0,)]


def test_replace_table_leaves_the_old_rows_when_the_new_ones_fail(conn):
    strict = Table("main", "strict", "test rows", (Column("id", "VARCHAR", "key", False),))
    replace_table(conn, strict, [{"id": "a"}, {"id": "b"}])
    with pytest.raises(duckdb.ConstraintException):
        replace_table(conn, strict, [{"id": "c"}, {"id": None}])
    assert conn.execute("SELECT id FROM main.strict ORDER BY id").fetchall() == [("a",), ("b",)]
    # inside the caller's transaction it is part of that transaction
    with pytest.raises(RuntimeError), transaction(conn):
        replace_table(conn, strict, [{"id": "c"}], transaction=False)
        raise RuntimeError("a later step of the same publish failed")
    assert conn.execute("SELECT id FROM main.strict ORDER BY id").fetchall() == [("a",), ("b",)]


def test_building_twin_replaces_the_table_in_one_swap_and_is_dropped_on_error(conn):
    conn.execute(WIDE.create_sql(replace=True))
    conn.execute("INSERT INTO wide VALUES ('old', 'x')")
    with building(conn, WIDE) as twin:
        assert twin.table.qualified == "main.wide__building"
        append_dicts(twin, [{"id": "k1", "payload": "a"}])
        append_dicts(twin, [{"id": "k2", "payload": "b"}])
        assert conn.execute("SELECT id FROM wide").fetchall() == [("old",)]  # readers still see the old table
        conn.execute("BEGIN TRANSACTION")
        swap_in(conn, twin, WIDE)
        conn.execute("COMMIT")
    assert conn.execute("SELECT id FROM wide ORDER BY id").fetchall() == [("k1",), ("k2",)]

    with pytest.raises(RuntimeError, match="tokenizer broke"), building(conn, WIDE, "_x") as twin:
        append_dicts(twin, [{"id": "k3", "payload": "c"}])
        raise RuntimeError("tokenizer broke")
    tables = {name for (name,) in conn.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert "wide__building_x" not in tables
    assert conn.execute("SELECT id FROM wide ORDER BY id").fetchall() == [("k1",), ("k2",)]


@pytest.mark.slow  # needs its size: a full row group (122,880 rows) of ~10 MB batches, about 2 s
def test_a_twin_is_checkpointed_once_per_full_row_group_not_every_16_mb(tmp_path):
    """Batches of 15,360 rows of ~10 MB each: with DuckDB's automatic checkpoints a commit past 16 MB of WAL would
    write the row group being filled, and a later one write it again."""
    batch_rows = ROW_GROUP_ROWS // 8
    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        conn.execute(WIDE.create_sql())
        (default,) = conn.execute("SELECT current_setting('wal_autocheckpoint')").fetchone()

        def segments(twin: Twin) -> tuple[int, int]:
            [counts] = conn.execute(
                "SELECT count(*), count(*) FILTER (persistent) FROM pragma_storage_info($table)",
                {"table": twin.table.qualified},
            ).fetchall()
            return counts

        seen = []
        with building(conn, WIDE) as twin:
            for b in range(8):
                numbers = range(b * batch_rows, (b + 1) * batch_rows)
                batch = pa.table(
                    {
                        "id": [f"k{n:07d}" for n in numbers],
                        "payload": [hashlib.md5(str(n).encode()).hexdigest() * 20 for n in numbers],
                    }
                )
                twin.append(batch)
                seen.append(segments(twin))
            assert conn.execute("SELECT current_setting('wal_autocheckpoint')").fetchall() != [(default,)]
            assert [persistent for _, persistent in seen] == [0] * 7 + [seen[7][0]] and seen[7][0] > 0
            assert twin.rows == ROW_GROUP_ROWS
            # rows past the last full row group are checkpointed by finish(), before the twin is published
            append_dicts(twin, [{"id": "z0000001", "payload": "tail"}])
            assert segments(twin)[1] < segments(twin)[0]
            twin.finish()
            assert segments(twin)[1] == segments(twin)[0]
        assert conn.execute("SELECT current_setting('wal_autocheckpoint')").fetchone() == (default,)


def test_appends_checkpoint_when_a_tables_row_group_fills_counting_the_rows_it_held(tmp_path):
    """A cache already holding 100,000 rows gets batches of 10,000, a second table batches of 10: the third batch
    takes the cache past its first row group's boundary (122,880), so that commit checkpoints both tables; the
    rows after it stay in memory until the block ends. Automatic checkpoints are off inside, restored after."""
    narrow = dataclasses.replace(WIDE, name="narrow")

    def unwritten(table: Table) -> int:
        [(count,)] = conn.execute(
            "SELECT count(*) FILTER (NOT persistent) FROM pragma_storage_info($table)", {"table": table.qualified}
        ).fetchall()
        return count

    def batch(first: int, rows: int) -> pa.Table:
        return pa.table({"id": [f"k{n:07d}" for n in range(first, first + rows)], "payload": ["x"] * rows})

    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        conn.execute(WIDE.create_sql())
        conn.execute(narrow.create_sql())
        conn.register("held", batch(0, 100_000))
        conn.execute("INSERT INTO wide SELECT * FROM held")
        conn.execute("CHECKPOINT")
        (default,) = conn.execute("SELECT current_setting('wal_autocheckpoint')").fetchone()
        seen = []
        with appending(conn) as appends:
            assert conn.execute("SELECT current_setting('wal_autocheckpoint')").fetchone() != (default,)
            for b in range(4):
                appends.commit({WIDE: batch(100_000 + b * 10_000, 10_000), narrow: [{"id": f"n{b}"}] * 10})
                # no result left open on the connection: a relation query (not only execute) runs next
                assert conn.sql("SELECT count(*) FROM narrow").fetchall() == [(10 * (b + 1),)]
                seen.append((unwritten(WIDE) > 0, unwritten(narrow) > 0))
            assert appends.rows == {"main.wide": 140_000, "main.narrow": 40}
        assert seen == [(True, True), (True, True), (False, False), (True, True)]
        assert (unwritten(WIDE), unwritten(narrow)) == (0, 0)  # the block's end wrote the last batch
        assert conn.execute("SELECT current_setting('wal_autocheckpoint')").fetchone() == (default,)
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM wide").fetchone() == (140_000, 140_000)
        # checkpoint_tail=False: a caller that checkpoints next leaves the rows after the last full row group
        with appending(conn, checkpoint_tail=False) as appends:
            appends.commit({narrow: [{"id": "tail"}]})
        assert unwritten(narrow) > 0


def _bronze_row(source: str, row: int, payload: str) -> dict:
    return {
        "source": source,
        "file_path": f"/landing/{source}.jsonl",
        "row_number": row,
        "record_sha256": f"sha-{source}-{row}",
        "payload": payload,
        "decode_error": None,
        "file_sha256": f"file-{source}",
        "ingested_at": dt.datetime(2026, 11, 26, tzinfo=dt.UTC),
        "run_id": "run",
    }


def _ingest(conn: duckdb.DuckDBPyConnection, source: str, payloads: list[str]) -> None:
    with building(conn, bronze_source_table(source)) as twin:
        append_dicts(twin, [_bronze_row(source, i, p) for i, p in enumerate(payloads)])
        replace_bronze_source(conn, source, twin)


def _bronze(conn: duckdb.DuckDBPyConnection) -> list[tuple]:
    return conn.execute("SELECT source, row_number, payload FROM bronze.records ORDER BY ALL").fetchall()


def _bronze_relations(conn: duckdb.DuckDBPyConnection) -> list[tuple]:
    return conn.execute(
        "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = 'bronze' ORDER BY ALL"
    ).fetchall()


def test_bronze_records_is_a_view_over_one_table_per_source(tmp_path):
    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        ensure_bronze(conn)
        assert _bronze(conn) == []
        described = conn.execute("DESCRIBE bronze.records").fetchall()
        assert [(name, type_) for name, type_, *_ in described] == [(c.name, c.type) for c in BRONZE_RECORDS.columns]

        _ingest(conn, "alpaca", ['{"a": 1}', '{"a": 2}'])
        _ingest(conn, "hh", ['{"h": 1}'])
        assert _bronze(conn) == [("alpaca", 0, '{"a": 1}'), ("alpaca", 1, '{"a": 2}'), ("hh", 0, '{"h": 1}')]
        # re-ingesting a source replaces its rows and leaves the others alone
        _ingest(conn, "alpaca", ['{"a": 3}'])
        assert _bronze(conn) == [("alpaca", 0, '{"a": 3}'), ("hh", 0, '{"h": 1}')]
        assert _bronze_relations(conn) == sorted(
            [
                ("records", "VIEW"),
                (bronze_source_table("alpaca").name, "BASE TABLE"),
                (bronze_source_table("hh").name, "BASE TABLE"),
            ]
        )
        ensure_bronze(conn)  # an existing view is left as it is
        assert len(_bronze(conn)) == 2


def test_a_failed_ingest_keeps_the_sources_previous_rows(tmp_path):
    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        ensure_bronze(conn)
        _ingest(conn, "alpaca", ['{"a": 1}'])
        with pytest.raises(ValueError, match="row 7"), building(conn, bronze_source_table("alpaca")) as twin:
            append_dicts(twin, [_bronze_row("alpaca", 0, '{"new": 1}')])
            raise ValueError("row 7: unreadable")
        assert _bronze(conn) == [("alpaca", 0, '{"a": 1}')]
        assert _bronze_relations(conn) == sorted(
            [("records", "VIEW"), (bronze_source_table("alpaca").name, "BASE TABLE")]
        )
        # a failure inside the swap rolls back: the old table and the view stay, the connection stays usable
        with building(conn, bronze_source_table("alpaca")) as twin:
            append_dicts(twin, [_bronze_row("alpaca", 0, '{"new": 1}')])
            conn.execute(f"DROP TABLE {twin.table.qualified}")  # the rename inside the swap now fails
            with pytest.raises(duckdb.CatalogException):
                replace_bronze_source(conn, "alpaca", twin)
        assert _bronze(conn) == [("alpaca", 0, '{"a": 1}')]


def test_a_bronze_table_of_an_older_warehouse_is_split_per_source_once(tmp_path):
    with duckdb.connect(str(tmp_path / "old.duckdb")) as conn:
        conn.execute(BRONZE_RECORDS.create_sql())
        rows = [_bronze_row("hh", 0, "h0"), _bronze_row("alpaca", 0, "a0"), _bronze_row("hh", 1, "h1")]
        insert_rows(conn, BRONZE_RECORDS, rows)
        before = conn.execute("SELECT * FROM bronze.records ORDER BY ALL").fetchall()
        ensure_bronze(conn)
        assert conn.execute("SELECT * FROM bronze.records ORDER BY ALL").fetchall() == before
        assert _bronze_relations(conn) == sorted(
            [
                ("records", "VIEW"),
                (bronze_source_table("alpaca").name, "BASE TABLE"),
                (bronze_source_table("hh").name, "BASE TABLE"),
            ]
        )
        # each source's rows keep the old table's order
        stored = conn.execute(f"SELECT row_number FROM {bronze_source_table('hh').qualified}").fetchall()
        assert stored == [(0,), (1,)]


# sync_table: a table brought to the rows of a query, compared with a fresh build of the same query
SYNCED = Table(
    "main",
    "synced",
    "test rows",
    (
        Column("id", "VARCHAR", "key", False),
        Column("score", "DOUBLE", "a float, NULL or NaN"),
        Column("text", "VARCHAR", "a string, NULL or empty"),
        Column("ids", "INTEGER[]", "a flat list"),
        Column("messages", "STRUCT(role VARCHAR, content VARCHAR, calls VARCHAR[])[]", "a nested list"),
    ),
)
FRESH = dataclasses.replace(SYNCED, name="fresh")


def sync_rows(conn: duckdb.DuckDBPyConnection, rows: list[dict], table: Table = SYNCED, range_rows: int = 1000):
    """Sync ``table`` to ``rows`` (through a source table, the query's input) in one transaction."""
    replace_table(conn, dataclasses.replace(SYNCED, name="sync_source"), rows)
    with transaction(conn):
        return sync_table(conn, table, "SELECT * FROM main.sync_source", "id", range_rows)


def same_as_a_fresh_build(conn: duckdb.DuckDBPyConnection) -> bool:
    """Whether main.synced holds exactly the rows (every value, NaN and NULL included) a fresh table built from the
    same query holds: both read in id order as JSON text, which tells NULL, [], NaN and "" apart."""
    conn.execute("DROP TABLE IF EXISTS main.fresh")
    sync_table(conn, FRESH, "SELECT * FROM main.sync_source", "id", 1000)
    synced, fresh = (
        conn.execute(f"SELECT to_json(list(t ORDER BY id)) FROM {name} t").fetchone()[0]
        for name in ("main.synced", "main.fresh")
    )
    return synced == fresh


def row(id_: str, **values) -> dict:
    base = {"id": id_, "score": 1.0, "text": "t", "ids": [1, 2], "messages": [{"role": "user", "content": "hi"}]}
    return {**base, **values}


def test_sync_table_creates_a_missing_table_in_key_order(conn):
    counts = sync_rows(conn, [row("c"), row("a"), row("b")])
    assert counts == SyncCounts(inserted=3, deleted=0, kept=0, rebuilt=True)
    assert conn.execute("SELECT id FROM main.synced ORDER BY rowid").fetchall() == [("a",), ("b",), ("c",)]
    assert same_as_a_fresh_build(conn)
    assert counts.metadata("gold_x") == {"rows_computed/gold_x": 3, "rows_reused/gold_x": 0, "rows_deleted/gold_x": 0}


def test_sync_table_with_nothing_changed_keeps_every_row(conn):
    rows = [row("a", score=float("nan")), row("b", score=None, ids=None, messages=None), row("c", ids=[], text="")]
    sync_rows(conn, rows)
    assert sync_rows(conn, rows) == SyncCounts(inserted=0, deleted=0, kept=3, rebuilt=False)
    assert same_as_a_fresh_build(conn)


def test_sync_table_inserts_new_rows_deletes_gone_ones_and_replaces_changed_ones(conn):
    sync_rows(conn, [row(k) for k in "abcdefgh"])
    changed = [
        row("a", score=None),  # value -> NULL
        row("b", score=float("nan")),  # value -> NaN
        row("c", text=""),  # value -> empty string
        row("d", ids=[]),  # list -> empty list
        row("e", ids=[0, 1, 2]),  # a zero at the head of the list (DuckDB's hash alone misses it)
        row("f", messages=[{"role": "user", "content": "hi", "calls": []}]),  # nested NULL -> empty list
        row("g"),  # unchanged
        # "h" is gone; "i" and "j" are new
        row("j", ids=None),
        row("i"),
    ]
    counts = sync_rows(conn, changed)
    assert counts == SyncCounts(inserted=8, deleted=7, kept=1, rebuilt=False)
    assert same_as_a_fresh_build(conn)
    # the kept row stays first; the inserted ones follow it in key order
    stored = [k for (k,) in conn.execute("SELECT id FROM main.synced ORDER BY rowid").fetchall()]
    assert stored == ["g", "a", "b", "c", "d", "e", "f", "i", "j"]


def test_sync_table_changes_null_back_to_values(conn):
    sync_rows(conn, [row("a", score=None, text=None, ids=None, messages=None), row("b", ids=[None])])
    counts = sync_rows(conn, [row("a"), row("b", ids=[])])
    assert counts == SyncCounts(inserted=2, deleted=2, kept=0, rebuilt=False)
    assert same_as_a_fresh_build(conn)


def test_sync_table_inserts_many_new_rows_in_key_order_through_ranges(conn):
    sync_rows(conn, [row("k050")])
    rows = [row(f"k{n:03d}") for n in reversed(range(100))]
    counts = sync_rows(conn, rows, range_rows=7)  # 99 new rows: 15 ranges of insert_ordered
    assert counts == SyncCounts(inserted=99, deleted=0, kept=1, rebuilt=False)
    stored = [k for (k,) in conn.execute("SELECT id FROM main.synced ORDER BY rowid").fetchall()]
    assert stored == ["k050"] + [f"k{n:03d}" for n in range(100) if n != 50]
    assert same_as_a_fresh_build(conn)


def test_sync_table_rebuilds_a_table_whose_columns_differ_from_its_declaration(conn):
    conn.execute("CREATE TABLE main.synced (id VARCHAR NOT NULL, score FLOAT, extra INTEGER)")
    conn.execute("INSERT INTO main.synced VALUES ('a', 1.0, 1), ('z', 2.0, 2)")
    counts = sync_rows(conn, [row("b"), row("a")])
    assert counts == SyncCounts(inserted=2, deleted=2, kept=0, rebuilt=True)
    assert conn.execute("SELECT id FROM main.synced ORDER BY rowid").fetchall() == [("a",), ("b",)]
    assert same_as_a_fresh_build(conn)
    # a type that differs, the names being the same, also rebuilds
    conn.execute("ALTER TABLE main.synced ALTER score TYPE FLOAT")
    assert sync_rows(conn, [row("b"), row("a")]) == SyncCounts(inserted=2, deleted=2, kept=0, rebuilt=True)
    assert sync_rows(conn, [row("b"), row("a")]) == SyncCounts(inserted=0, deleted=0, kept=2, rebuilt=False)


def test_sync_table_to_an_empty_query_deletes_every_row(conn):
    sync_rows(conn, [row("a"), row("b")])
    assert sync_rows(conn, []) == SyncCounts(inserted=0, deleted=2, kept=0, rebuilt=False)
    assert conn.execute("SELECT count(*) FROM main.synced").fetchone() == (0,)
    assert sync_rows(conn, [row("a")]) == SyncCounts(inserted=1, deleted=0, kept=0, rebuilt=False)


def test_sync_table_refuses_a_duplicate_or_null_key_and_leaves_the_old_rows(conn):
    sync_rows(conn, [row("a"), row("b")])
    with pytest.raises(ValueError, match=r"main.synced: id must be unique and not null .* 'b' \(2 rows\)"):
        sync_rows(conn, [row("a", score=5.0), row("b"), row("b", score=2.0), row("c")])
    with pytest.raises(ValueError, match=r"None \(1 rows\)"):
        conn.execute("DROP TABLE main.sync_source")  # a nullable key column, so the null reaches the query
        conn.execute("CREATE TABLE main.sync_source (id VARCHAR, score DOUBLE, text VARCHAR, ids INTEGER[])")
        conn.execute("INSERT INTO main.sync_source VALUES (NULL, 1.0, 't', [1])")
        with transaction(conn):
            sync_table(conn, SYNCED, "SELECT *, NULL AS messages FROM main.sync_source", "id", 1000)
    # the failed syncs rolled back: the old rows, and no temporary table left behind
    assert conn.execute("SELECT id, score FROM main.synced ORDER BY id").fetchall() == [("a", 1.0), ("b", 1.0)]
    assert conn.execute("SELECT count(*) FROM duckdb_tables() WHERE temporary").fetchone() == (0,)
    # a duplicate key in a fresh build is refused too
    conn.execute("DROP TABLE main.synced")
    with pytest.raises(ValueError, match="'b' \\(2 rows\\)"):
        sync_rows(conn, [row("b"), row("b")])
    assert conn.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'synced'").fetchone() == (0,)


# fingerprint_sql: the row fingerprint sync_table and the exports compare rows by


def fingerprints(data_type: str, *literals: str) -> list[int]:
    """The fingerprint of a one-column row holding each SQL literal, cast to ``data_type``."""
    with duckdb.connect() as conn:
        return [
            conn.execute(
                f"SELECT {fingerprint_sql([('v', data_type)])} FROM (SELECT ({lit})::{data_type} AS v)"
            ).fetchone()[0]
            for lit in literals
        ]


def bare_hashes(data_type: str, *literals: str) -> list[int]:
    with duckdb.connect() as conn:
        return [conn.execute(f"SELECT hash(({lit})::{data_type})").fetchone()[0] for lit in literals]


@pytest.mark.parametrize(
    ("data_type", "literals"),
    [
        ("INTEGER[]", ("NULL", "[]", "[NULL]")),
        ("INTEGER[]", ("[0, 1]", "[1]")),  # zeros at the head of a list
        ("DOUBLE", ("0.0", "'-0.0'")),
        ("INTEGER[][]", ("[[1], [2]]", "[[1, 2]]", "[[1, 2], []]")),  # lists of lists
        ("STRUCT(a INTEGER, b VARCHAR)", ("NULL", "{'a': NULL, 'b': NULL}")),  # a null struct, a struct of nulls
        ("STRUCT(a INTEGER)[]", ("[NULL]", "[{'a': NULL}]", "[]", "NULL")),
        ("STRUCT(r DOUBLE)[]", ("[{'r': 0.0}]", "[{'r': '-0.0'}]")),  # a float inside a list of structs
        (
            "STRUCT(role VARCHAR, calls STRUCT(name VARCHAR)[])[]",  # a message's tool calls: null, none, moved
            (
                "[{'role': 'a', 'calls': NULL}]",
                "[{'role': 'a', 'calls': []}]",
                "[{'role': 'a', 'calls': [{'name': 'f'}]}, {'role': 'b', 'calls': []}]",
                "[{'role': 'a', 'calls': []}, {'role': 'b', 'calls': [{'name': 'f'}]}]",
            ),
        ),
    ],
)
def test_fingerprint_tells_apart_values_that_duckdbs_hash_takes_for_the_same(data_type, literals):
    assert len(set(bare_hashes(data_type, *literals))) < len(literals)  # hash() alone confuses some of them
    assert len(set(fingerprints(data_type, *literals))) == len(literals)
    assert fingerprints(data_type, *literals) == fingerprints(data_type, *literals)  # and is deterministic


def test_fingerprint_takes_duckdb_types_parsed_or_spelled_and_quotes_names():
    kind = 'STRUCT("the ""x""" DOUBLE)[]'
    with duckdb.connect() as conn:
        conn.execute(f"""CREATE TABLE t AS SELECT [{{'the "x"': '-0.0'}}]::{kind} AS "a b", 1 AS c""")
        spelled = conn.execute(f"SELECT {fingerprint_sql([('a b', kind), ('c', 'INTEGER')])} FROM t").fetchone()
        parsed = conn.execute(
            f"SELECT {fingerprint_sql(zip(conn.table('t').columns, conn.table('t').types, strict=True))} FROM t"
        ).fetchone()
        conn.execute("""UPDATE t SET "a b" = [{'the "x"': 0.0}]""")
        changed = conn.execute(f"SELECT {fingerprint_sql([('a b', kind), ('c', 'INTEGER')])} FROM t").fetchone()
    assert spelled == parsed != changed


NESTED = Table(
    "main",
    "nested",
    "rows whose changes DuckDB's hash alone misses",
    (
        Column("id", "VARCHAR", "key", False),
        Column("x", "DOUBLE", "a float"),
        Column("grid", "INTEGER[][]", "a list of lists"),
        Column("pair", "STRUCT(a INTEGER, b VARCHAR)", "a struct"),
    ),
)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"x": 0.0}, {"x": -0.0}),
        ({"grid": [[1], [2]]}, {"grid": [[1, 2]]}),
        ({"pair": None}, {"pair": {"a": None, "b": None}}),
    ],
)
def test_sync_table_replaces_a_row_whose_change_the_bare_hash_misses(conn, before, after):
    base = {"id": "a", "x": 1.0, "grid": [[3]], "pair": {"a": 1, "b": "b"}}
    source = dataclasses.replace(NESTED, name="nested_source")
    for values, expected in [
        (before, SyncCounts(inserted=1, deleted=0, kept=0, rebuilt=True)),
        (after, SyncCounts(inserted=1, deleted=1, kept=0, rebuilt=False)),
        (after, SyncCounts(inserted=0, deleted=0, kept=1, rebuilt=False)),
    ]:
        replace_table(conn, source, [{**base, **values}])
        with transaction(conn):
            assert sync_table(conn, NESTED, "SELECT * FROM main.nested_source", "id", 10) == expected
        stored = conn.execute("SELECT to_json(t)::VARCHAR FROM main.nested t").fetchone()[0]
        assert stored == conn.execute("SELECT to_json(t)::VARCHAR FROM main.nested_source t").fetchone()[0]


def test_sync_table_fills_an_empty_table_in_key_order_without_comparing_rows(conn):
    conn.execute(SYNCED.create_sql())
    rows = [row(f"k{n:03d}") for n in reversed(range(50))]
    counts = sync_rows(conn, rows, range_rows=7)
    assert counts == SyncCounts(inserted=50, deleted=0, kept=0, rebuilt=False)
    stored = [k for (k,) in conn.execute("SELECT id FROM main.synced ORDER BY rowid").fetchall()]
    assert stored == [f"k{n:03d}" for n in range(50)]
    assert same_as_a_fresh_build(conn)
    with pytest.raises(ValueError, match=r"'k001' \(2 rows\)"):  # a duplicate key is still refused
        conn.execute("DELETE FROM main.synced")
        sync_rows(conn, [row("k001"), row("k001", score=2.0)])


@pytest.mark.parametrize("first_build", [True, False])
def test_sync_table_over_key_ordered_tables_stores_rows_in_key_order_with_exact_counts(conn, first_build):
    if not first_build:
        sync_rows(conn, [row("k050", score=7.0), row("gone")])
    rows = [row(f"k{n:03d}") for n in reversed(range(100))]
    replace_table(conn, dataclasses.replace(SYNCED, name="sync_source"), rows)
    with transaction(conn):
        counts = sync_table(conn, SYNCED, "SELECT * FROM main.sync_source", "id", 7, key_ordered=True)
    expected = (100, 0, True) if first_build else (100, 2, False)
    assert (counts.inserted, counts.deleted, counts.rebuilt) == expected
    stored = [k for (k,) in conn.execute("SELECT id FROM main.synced ORDER BY rowid").fetchall()]
    assert stored == [f"k{n:03d}" for n in range(100)]
    assert same_as_a_fresh_build(conn)


def stored_fingerprints(conn: duckdb.DuckDBPyConnection, table: Table = SYNCED) -> dict[str, int]:
    return dict(conn.execute(f"SELECT sync_key, sync_fingerprint FROM {fingerprint_table(table)}").fetchall())


def content_fingerprints(conn: duckdb.DuckDBPyConnection, table: Table = SYNCED) -> dict[str, int]:
    columns = [(c.name, c.type) for c in table.columns]
    return dict(conn.execute(f"SELECT id, {fingerprint_sql(columns)} FROM {table.qualified}").fetchall())


def test_sync_table_keeps_each_rows_fingerprint_beside_the_table_and_compares_with_those(conn):
    sync_rows(conn, [row("a"), row("b"), row("c")])
    assert stored_fingerprints(conn) == content_fingerprints(conn) and len(content_fingerprints(conn)) == 3
    sync_rows(conn, [row("a"), row("b", score=2.0), row("d")])  # b changed, c gone, d new
    assert stored_fingerprints(conn) == content_fingerprints(conn)
    assert sorted(stored_fingerprints(conn)) == ["a", "b", "d"]
    # the sync compares the query's rows with the stored fingerprints, not with the stored rows: a stored
    # fingerprint that no longer matches its row makes the row be written again
    conn.execute(f"UPDATE {fingerprint_table(SYNCED)} SET sync_fingerprint = 0 WHERE sync_key = 'a'")
    counts = sync_rows(conn, [row("a"), row("b", score=2.0), row("d")])
    assert counts == SyncCounts(inserted=1, deleted=1, kept=2, rebuilt=False)
    assert stored_fingerprints(conn) == content_fingerprints(conn)
    assert trusted_fingerprints(conn, SYNCED) == fingerprint_table(SYNCED)


def test_sync_table_repairs_its_fingerprints_after_rows_were_written_outside_it(conn):
    rows = [row("a"), row("b"), row("c")]
    sync_rows(conn, rows)
    conn.execute("DELETE FROM main.synced WHERE id = 'b'")
    insert_rows(conn, SYNCED, [row("z")])
    assert trusted_fingerprints(conn, SYNCED) is None  # the row count agrees, the key checksum does not
    counts = sync_rows(conn, rows)
    assert counts == SyncCounts(inserted=1, deleted=1, kept=2, rebuilt=False)
    assert same_as_a_fresh_build(conn)
    assert stored_fingerprints(conn) == content_fingerprints(conn)
    assert trusted_fingerprints(conn, SYNCED) == fingerprint_table(SYNCED)
    # a row edited in place keeps its key: not seen while the stored fingerprints are trusted, set right when not
    conn.execute("UPDATE main.synced SET score = 9.0 WHERE id = 'a'")
    assert sync_rows(conn, rows) == SyncCounts(inserted=0, deleted=0, kept=3, rebuilt=False)
    with transaction(conn):
        counts = sync_table(conn, SYNCED, "SELECT * FROM main.sync_source", "id", 1000, trust_stored=False)
    assert counts == SyncCounts(inserted=1, deleted=1, kept=2, rebuilt=False)
    assert same_as_a_fresh_build(conn)


PROJECTED = Table(
    "main", "projected", "test rows", (Column("id", "VARCHAR", "key", False), Column("score", "DOUBLE", "a float"))
)


def sync_projection(conn: duckdb.DuckDBPyConnection, salt: int = 0, *, trust_stored: bool = True) -> SyncCounts:
    """Sync main.projected to main.synced's ids and scores, fingerprinted by main.synced's stored fingerprints."""
    upstream = trusted_fingerprints(conn, SYNCED)
    assert upstream is not None
    derived = f"SELECT sync_key, hash(sync_fingerprint, {salt}) AS sync_fingerprint FROM {upstream}"
    with transaction(conn):
        return sync_table(
            conn,
            PROJECTED,
            "SELECT id, score FROM main.synced",
            "id",
            1000,
            fingerprints=derived,
            trust_stored=trust_stored,
        )


def test_sync_table_with_derived_fingerprints_follows_the_rows_they_stand_for(conn):
    sync_rows(conn, [row("a"), row("b"), row("c")])
    assert sync_projection(conn) == SyncCounts(inserted=3, deleted=0, kept=0, rebuilt=True)
    assert sync_projection(conn) == SyncCounts(inserted=0, deleted=0, kept=3, rebuilt=False)
    sync_rows(conn, [row("a", score=5.0), row("b"), row("d")])
    assert sync_projection(conn) == SyncCounts(inserted=2, deleted=2, kept=1, rebuilt=False)
    projected = conn.execute("SELECT id, score FROM main.projected ORDER BY id").fetchall()
    assert projected == [("a", 5.0), ("b", 1.0), ("d", 1.0)]
    # another fingerprint query (another kind): derived fingerprints cannot be read from the rows, so both sides
    # are compared by content once (only the row whose content changed meanwhile is written) and the new kind stored
    sync_rows(conn, [row("a", score=5.0), row("b", score=3.0), row("d")])
    assert sync_projection(conn, salt=1) == SyncCounts(inserted=1, deleted=1, kept=2, rebuilt=False)
    projected = conn.execute("SELECT id, score FROM main.projected ORDER BY id").fetchall()
    assert projected == [("a", 5.0), ("b", 3.0), ("d", 1.0)]
    salted = f"SELECT sync_key, hash(sync_fingerprint, 1) FROM {fingerprint_table(SYNCED)} ORDER BY sync_key"
    assert conn.execute(f"SELECT * FROM {fingerprint_table(PROJECTED)} ORDER BY sync_key").fetchall() == (
        conn.execute(salted).fetchall()
    )
    assert sync_projection(conn, salt=1) == SyncCounts(inserted=0, deleted=0, kept=3, rebuilt=False)
    # a row edited in place keeps its stored fingerprint: a full rebuild (stored fingerprints not trusted) compares
    # by content and writes that row alone
    conn.execute("UPDATE main.projected SET score = 9.0 WHERE id = 'd'")
    assert sync_projection(conn, salt=1) == SyncCounts(inserted=0, deleted=0, kept=3, rebuilt=False)
    assert sync_projection(conn, salt=1, trust_stored=False) == SyncCounts(inserted=1, deleted=1, kept=2, rebuilt=False)
    assert conn.execute("SELECT id, score FROM main.projected ORDER BY id").fetchall() == projected
    # rows deleted and inserted outside the sync are found by key: the stray row goes, the deleted one comes back
    conn.execute("DELETE FROM main.projected WHERE id = 'a'")
    conn.execute("INSERT INTO main.projected VALUES ('stray', 9.0)")
    assert sync_projection(conn, salt=1) == SyncCounts(inserted=1, deleted=1, kept=2, rebuilt=False)
    assert conn.execute("SELECT id, score FROM main.projected ORDER BY id").fetchall() == projected
    assert trusted_fingerprints(conn, PROJECTED) == fingerprint_table(PROJECTED)
    conn.execute("INSERT INTO main.projected VALUES ('b', 9.0)")  # a key twice: filled anew
    assert sync_projection(conn, salt=1) == SyncCounts(inserted=3, deleted=4, kept=0, rebuilt=True)
    assert conn.execute("SELECT id, score FROM main.projected ORDER BY id").fetchall() == projected


def test_key_order_is_asked_only_when_rows_go_in_by_ranges_and_a_sync_erodes_it(conn):
    asked = []

    def in_order() -> bool:
        asked.append(True)
        return stored_in_key_order(conn, SYNCED)

    rows = [row(f"k{n:03d}") for n in range(1, 40, 2)]
    replace_table(conn, dataclasses.replace(SYNCED, name="sync_source"), rows)
    with transaction(conn):  # a first build: the callable decides how the ranges are read
        sync_table(conn, SYNCED, "SELECT * FROM main.sync_source", "id", 7, key_ordered=in_order)
    assert len(asked) == 1 and stored_in_key_order(conn, SYNCED)
    sync_rows(conn, [*rows, row("k000")])  # one new row: appended after the kept ones, not asked
    assert len(asked) == 1
    assert not stored_in_key_order(conn, SYNCED)
    assert same_as_a_fresh_build(conn)


def test_insert_key_ranges_appends_every_row_in_key_order_nulls_last(conn):
    conn.execute(WIDE.create_sql())
    relation = "SELECT CASE WHEN id = 'k0500' THEN NULL ELSE id END AS id, payload FROM src"
    insert_key_ranges(conn, WIDE, relation, "id", 64)
    stored = conn.execute("SELECT id, payload FROM main.wide ORDER BY rowid").fetchall()
    expected = conn.execute(f"SELECT id, payload FROM ({relation}) ORDER BY id NULLS LAST").fetchall()
    assert stored == expected and len(stored) == 1000


@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_transaction_can_checkpoint_at_commit_instead_of_writing_the_wal(tmp_path, checkpoint):
    path = tmp_path / "wal.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute("CREATE TABLE t (id INTEGER, ids INTEGER[])")
        conn.execute("CHECKPOINT")
        (before,) = conn.execute("SELECT current_setting('wal_autocheckpoint')").fetchone()
        with transaction(conn, checkpoint=checkpoint):
            conn.execute("INSERT INTO t SELECT range, [range, range + 1, range + 2] FROM range(50000)")
        wal = path.with_name(path.name + ".wal")
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        # DuckDB's estimate leaves the lists out: without checkpoint the rows went to the WAL (over 16 MB is not
        # reached by the estimate, so no automatic checkpoint); with it, straight into the database file
        assert (wal_bytes == 0) is checkpoint
        assert conn.execute("SELECT current_setting('wal_autocheckpoint')").fetchone() == (before,)
        assert conn.execute("SELECT count(*), sum(len(ids)) FROM t").fetchone() == (50000, 150000)
        with pytest.raises(duckdb.Error), transaction(conn, checkpoint=checkpoint):
            conn.execute("INSERT INTO t VALUES (1, [1])")
            conn.execute("SELECT error('boom')")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (50000,)
    with duckdb.connect(str(path), read_only=True) as conn:
        assert conn.execute("SELECT count(*), max(id) FROM t").fetchone() == (50000, 49999)


def memory_limit(conn: duckdb.DuckDBPyConnection) -> str:
    return conn.execute("SELECT current_setting('memory_limit')").fetchone()[0]


def test_memory_limit_at_most_caps_duckdb_memory_and_restores_the_warehouse_cap(tmp_path: Path) -> None:
    conn = duckdb.connect(str(tmp_path / "w.duckdb"), config={"memory_limit": "1GB"})
    with memory_limit_at_most(conn, "256MiB"):
        assert memory_limit(conn) == "256.0 MiB"
    assert memory_limit(conn) == "953.6 MiB"  # 1 GB
    with pytest.raises(RuntimeError, match="stage failed"), memory_limit_at_most(conn, "128MiB"):
        assert memory_limit(conn) == "128.0 MiB"
        raise RuntimeError("stage failed")
    assert memory_limit(conn) == "953.6 MiB" and abs(memory_bytes("953.65 MiB") - 1e9) < 0.05 * 2**20
    conn.execute("SET memory_limit = '100MB'")  # a cap already below the streaming one is never raised
    with memory_limit_at_most(conn, "256MiB"):
        assert memory_limit(conn) == "95.3 MiB"
    assert memory_limit(conn) == "95.3 MiB"
