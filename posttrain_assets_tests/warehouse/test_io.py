"""Reading and writing wide rows in key order without sorting them whole (io.key_ranges and friends); bronze
as a view over one table per source."""

import datetime as dt
import hashlib

import duckdb
import pyarrow as pa
import pytest

from posttrain_assets.warehouse.bronze import bronze_source_table, ensure_bronze, replace_bronze_source
from posttrain_assets.warehouse.catalogue import BRONZE_RECORDS
from posttrain_assets.warehouse.io import (
    ROW_GROUP_ROWS,
    Twin,
    building,
    insert_ordered,
    insert_rows,
    key_ranges,
    ordered_arrow,
    ordered_batches,
    replace_table,
    swap_in,
    transaction,
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


# Needs its size (about 15 s): smaller limits leave no margin. At 32 MB the ordered insert itself runs out of
# memory; at 48 MB it passes with 64 MB of payload but fails with 96 MB (duckdb 2.0.1, tried).
@pytest.mark.slow
def test_insert_ordered_writes_more_than_the_memory_limit_of_wide_rows(tmp_path):
    """128 MB of payload in key order under a 64 MB DuckDB limit (a plain ORDER BY of it fails with duckdb
    2.0.1's "could not allocate block"): only one range is ever sorted."""
    with duckdb.connect(str(tmp_path / "big.duckdb"), config={"memory_limit": "64MB", "threads": 1}) as conn:
        conn.execute(
            "CREATE TABLE src AS SELECT md5(range::VARCHAR) AS id, repeat(md5(range::VARCHAR), 250) AS payload "
            "FROM range(16000)"
        )
        conn.execute(WIDE.create_sql(replace=True))
        insert_ordered(conn, WIDE, "SELECT * FROM src", "id", 2000)
        ids = [r[0] for r in conn.execute("SELECT id FROM wide ORDER BY rowid").fetchall()]
        assert len(ids) == 16000 and ids == sorted(ids)
        assert conn.execute("SELECT sum(length(payload)) FROM wide").fetchone()[0] == 16000 * 32 * 250


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
