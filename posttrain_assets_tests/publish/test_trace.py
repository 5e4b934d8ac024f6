"""Provenance (``posttrain_assets.publish.trace``): the gold.trace view, ``trace`` for one id, and
``provenance_violations``,
on the demo graph's DuckDB file (shared with test_exports; tests that break things work on a copy)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from posttrain_assets.publish.trace import (
    GOLD_TABLES,
    TraceError,
    create_trace_view,
    gold_tables,
    provenance_violations,
    trace,
    trace_row_counts,
)
from posttrain_assets.warehouse.bronze import bronze_source_table
from posttrain_assets.warehouse.catalogue import ALL_TABLES
from posttrain_assets_tests.publish.test_exports import demo_warehouse

# Every test reads the demo graph's warehouse (one whole-graph run, shared with test_exports); `make test-fast`
# skips them.
pytestmark = pytest.mark.slow

REGIME = {"gold.sft": "sft", "gold.preference": "preference", "gold.preference_length_balanced": "preference"}


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path) -> Path:
    return demo_warehouse(tmp_path_factory, tokenizer_cache_dir)


@pytest.fixture(scope="module")
def conn(warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[duckdb.DuckDBPyConnection]:
    """A copy of the good warehouse with the gold.trace view."""
    copy = tmp_path_factory.mktemp("trace") / "warehouse.duckdb"
    shutil.copy(warehouse, copy)
    with duckdb.connect(str(copy)) as connection:
        create_trace_view(connection)
        yield connection


@pytest.fixture
def broken(warehouse: Path, tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A private copy of the good warehouse, to break."""
    copy = tmp_path / "broken.duckdb"
    shutil.copy(warehouse, copy)
    with duckdb.connect(str(copy)) as connection:
        yield connection


def test_the_view_has_every_gold_row_once_resolved_to_silver_and_bronze(conn: duckdb.DuckDBPyConnection) -> None:
    tables = gold_tables(conn)
    assert {"gold.sft", "gold.rl_prompts"} <= set(tables)
    counts = dict(conn.execute("SELECT gold_table, count(*) FROM gold.trace GROUP BY ALL").fetchall())
    assert counts == {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    assert trace_row_counts(conn) == sorted(counts.items())  # what gold.trace's materialisation reports
    assert conn.execute("SELECT count(*) FROM (SELECT DISTINCT gold_table, id FROM gold.trace)").fetchone() == (
        sum(counts.values()),
    )
    assert conn.execute(
        "SELECT count(*) FROM gold.trace WHERE NOT in_silver OR NOT in_bronze OR license IS NULL OR origin_uri IS NULL "
        "OR bronze_record_sha256 <> record_sha256 OR bronze_file_sha256 <> file_sha256"
    ).fetchone() == (0,)
    # Every dropped duplicate whose kept twin reached gold is listed on that twin.
    listed = conn.execute("SELECT sum(len(dropped_duplicates)) FROM gold.trace").fetchone()[0]
    expected = conn.execute(
        "SELECT count(*) FROM silver.dedup_clusters WHERE kept_id IN (SELECT id FROM gold.trace)"
    ).fetchone()[0]
    assert listed == expected > 0


# gold.preference is held back on the demo data (its planted length bias fails the gate): the preference
# regime is traced through gold.preference_length_balanced, and its absence is asserted below.
DEMO_GOLD_TABLES = tuple(t for t in GOLD_TABLES if t != "gold.preference")


def test_the_held_back_preference_table_is_not_traced(conn: duckdb.DuckDBPyConnection) -> None:
    assert "gold.preference" not in gold_tables(conn)
    assert gold_tables(conn) == list(DEMO_GOLD_TABLES)


@pytest.mark.parametrize("table", DEMO_GOLD_TABLES)
def test_trace_shows_the_chain_for_a_row_of_each_regime(conn: duckdb.DuckDBPyConnection, table: str) -> None:
    row_id, source, license_, uri, file_path, row, file_sha, record_sha = conn.execute(
        f"SELECT id, source, license, origin.uri, origin.file, origin.row, origin.file_sha256, origin.record_sha256 "
        f"FROM {table} ORDER BY id LIMIT 1"
    ).fetchone()
    text = trace(conn, row_id[:12])
    assert text.startswith(f"{table} {row_id}\n") or f"\n\n{table} {row_id}\n" in text
    assert f"<- silver.records {row_id} (regime {REGIME.get(table, 'rl')}, source {source})" in text
    assert f"<- bronze.records (source {source}):" in text
    for expected in (
        f"file:          {file_path}",
        f"row:           {row}\n",
        f"file sha256:   {file_sha} (matches bronze)",
        f"record sha256: {record_sha} (matches bronze)",
        f"license: {license_}",
        f"origin:  {uri}",
    ):
        assert expected in text


def test_trace_lists_the_dedup_twins_that_collapsed_onto_a_row(conn: duckdb.DuckDBPyConnection) -> None:
    kept_id, table = conn.execute(
        "SELECT id, gold_table FROM gold.trace WHERE len(dropped_duplicates) > 0 ORDER BY id LIMIT 1"
    ).fetchone()
    twins = conn.execute(
        "SELECT source, file_path, row_number, record_sha256, method, similarity FROM silver.dedup_clusters "
        "WHERE kept_id = ?",
        [kept_id],
    ).fetchall()
    text = trace(conn, kept_id)
    assert f"<- dedup cluster {kept_id}: kept this row, dropped {len(twins)} duplicate(s):" in text
    for source, file_path, row_number, record_sha, method, similarity in twins:
        twin = (
            f"- {source} {file_path} row {row_number} ({method}, similarity {similarity:g}, record sha256 {record_sha})"
        )
        assert twin in text
    (lonely,) = conn.execute(
        "SELECT id FROM gold.trace WHERE len(dropped_duplicates) = 0 ORDER BY id LIMIT 1"
    ).fetchone()
    assert "<- dedup cluster: none" in trace(conn, lonely)


def test_trace_rejects_unknown_ambiguous_and_non_gold_ids(conn: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(TraceError, match="no gold row has an id starting 'zz'"):
        trace(conn, "zz")
    with pytest.raises(TraceError, match="ambiguous"):
        trace(conn, "0")
    (eval_id,) = conn.execute("SELECT id FROM silver.eval_records ORDER BY id LIMIT 1").fetchone()
    with pytest.raises(TraceError, match="is in silver.eval_records: evaluation source demo_eval_gsm8k"):
        trace(conn, eval_id)
    with pytest.raises(TraceError, match="needed"):
        trace(conn, "  ")


def test_no_violations_on_a_good_run(conn: duckdb.DuckDBPyConnection) -> None:
    assert provenance_violations(conn) == []


def _delete_bronze_row(conn: duckdb.DuckDBPyConnection, source: str, file_path: str, row: int) -> None:
    """bronze.records is a view: the row is deleted from its source's table."""
    conn.execute(
        f"DELETE FROM {bronze_source_table(source).qualified} WHERE file_path = ? AND row_number = ?", [file_path, row]
    )
    assert conn.execute(
        "SELECT count(*) FROM bronze.records WHERE source = ? AND file_path = ? AND row_number = ?",
        [source, file_path, row],
    ).fetchone() == (0,)


def test_a_deleted_bronze_row_is_reported(broken: duckdb.DuckDBPyConnection) -> None:
    row_id, source, file_path, row = broken.execute(
        "SELECT id, source, origin.file, origin.row FROM gold.rl_prompts ORDER BY id LIMIT 1"
    ).fetchone()
    _delete_bronze_row(broken, source, file_path, row)
    assert provenance_violations(broken) == [
        f"gold.rl_prompts {row_id}: no bronze row at source {source}, {file_path} row {row}"
    ]
    create_trace_view(broken)
    assert "<- bronze.records: MISSING" in trace(broken, row_id)


def test_a_changed_record_a_missing_license_and_a_lost_twin_are_reported(broken: duckdb.DuckDBPyConnection) -> None:
    sft_id, source, file_path, row = broken.execute(
        "SELECT id, source, origin.file, origin.row FROM gold.sft ORDER BY id LIMIT 1"
    ).fetchone()
    broken.execute(
        f"UPDATE {bronze_source_table(source).qualified} SET record_sha256 = 'f00d' "
        "WHERE file_path = ? AND row_number = ?",
        [file_path, row],
    )
    (rl_id,) = broken.execute("SELECT id FROM gold.rl_prompts ORDER BY id LIMIT 1").fetchone()
    broken.execute("UPDATE gold.rl_prompts SET license = '' WHERE id = ?", [rl_id])
    kept_id, twin_source, twin_file, twin_row = broken.execute(
        "SELECT kept_id, source, file_path, row_number FROM silver.dedup_clusters "
        "WHERE kept_id IN (SELECT id FROM gold.sft) ORDER BY ALL LIMIT 1"
    ).fetchone()
    _delete_bronze_row(broken, twin_source, twin_file, twin_row)
    problems = provenance_violations(broken)
    assert len(problems) == 3, problems
    assert f"gold.rl_prompts {rl_id}: source " in "\n".join(problems)
    assert any(p.startswith(f"gold.sft {sft_id}: record sha256 ") and p.endswith("(f00d)") for p in problems)
    assert f"dropped duplicate of {kept_id}: no bronze row at source {twin_source}, {twin_file} row {twin_row}" in (
        problems
    )


def test_the_view_survives_gold_being_rebuilt(warehouse: Path, tmp_path: Path) -> None:
    """Gold assets replace their tables (CREATE OR REPLACE TABLE in a transaction); the view must not block that."""
    copy = tmp_path / "rebuilt.duckdb"
    shutil.copy(warehouse, copy)
    declared = {t.qualified: t for t in ALL_TABLES}
    with duckdb.connect(str(copy)) as connection:
        create_trace_view(connection)
        before = connection.execute("SELECT count(*) FROM gold.trace").fetchone()
        for name in gold_tables(connection):
            connection.execute(f"CREATE TEMP TABLE previous AS FROM {name}")
            connection.execute("BEGIN TRANSACTION")
            connection.execute(declared[name].create_sql(replace=True))
            connection.execute(f"INSERT INTO {name} FROM previous")
            connection.execute("COMMIT")
            connection.execute("DROP TABLE previous")
        assert connection.execute("SELECT count(*) FROM gold.trace").fetchone() == before
        assert provenance_violations(connection) == []
