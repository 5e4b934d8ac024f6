"""bronze.records: a view over one table per source, and the one-time migration of a warehouse that held it
as a table."""

from __future__ import annotations

import dataclasses
import hashlib

import duckdb

from posttrain_assets.warehouse.catalogue import BRONZE_RECORDS
from posttrain_assets.warehouse.io import Twin, swap_in, transaction
from posttrain_assets.warehouse.model import Column, Table
from posttrain_assets.warehouse.stage_cache import CACHE_SCHEMA, ensure_cache_table

# bronze.records is a view over one table per source (bronze.records__source_<sha256(source)[:12]>): a source is
# re-ingested into a fresh table that then replaces its old one by a rename, so the rows are written once
# (appending them to a twin and copying that into one shared table wrote them twice, and the copy grew with bronze).
_BRONZE_SOURCE_PREFIX = "records__source_"
_BRONZE_SOURCE_TABLES = f"""
SELECT table_name FROM duckdb_tables()
WHERE database_name = current_database() AND schema_name = '{BRONZE_RECORDS.schema}'
  AND regexp_full_match(table_name, '{_BRONZE_SOURCE_PREFIX}[0-9a-f]{{12}}')
ORDER BY table_name
"""
_BRONZE_RELATION_TYPE = f"""
SELECT table_type FROM information_schema.tables
WHERE table_catalog = current_database() AND table_schema = '{BRONZE_RECORDS.schema}'
  AND table_name = '{BRONZE_RECORDS.name}'
"""


def bronze_source_table(source: str) -> Table:
    """The table that holds one source's bronze rows (``bronze.records`` is the view over all of them)."""
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:12]
    return dataclasses.replace(BRONZE_RECORDS, name=f"{_BRONZE_SOURCE_PREFIX}{digest}")


def _bronze_view_sql(conn: duckdb.DuckDBPyConnection) -> str:
    names = ", ".join(f'"{c.name}"' for c in BRONZE_RECORDS.columns)
    tables = [t for (t,) in conn.execute(_BRONZE_SOURCE_TABLES).fetchall()]
    parts = [f"SELECT {names} FROM {BRONZE_RECORDS.schema}.{t}" for t in tables]
    if not parts:  # no source ingested yet: the view still has bronze's columns and types
        typed = ", ".join(f'CAST(NULL AS {c.type}) AS "{c.name}"' for c in BRONZE_RECORDS.columns)
        parts = [f"SELECT {typed} WHERE false"]
    return f"CREATE OR REPLACE VIEW {BRONZE_RECORDS.qualified} AS\n" + "\nUNION ALL ".join(parts)


def ensure_bronze(conn: duckdb.DuckDBPyConnection) -> None:
    """Make ``bronze.records`` exist as the view over the per-source tables.

    A warehouse written before bronze was split per source holds ``bronze.records`` as a table: its rows are moved
    into per-source tables once, in one transaction, and the table becomes the view.
    """
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {BRONZE_RECORDS.schema}")
    kind = conn.execute(_BRONZE_RELATION_TYPE).fetchone()
    if kind is not None and kind[0] == "VIEW":
        return
    with transaction(conn):
        if kind is not None:
            legacy = dataclasses.replace(BRONZE_RECORDS, name=f"{BRONZE_RECORDS.name}__legacy")
            conn.execute(f"ALTER TABLE {BRONZE_RECORDS.qualified} RENAME TO {legacy.name}")
            sources = conn.execute(f"SELECT DISTINCT source FROM {legacy.qualified} ORDER BY 1").fetchall()
            for (source,) in sources:
                table = bronze_source_table(source)
                conn.execute(table.create_sql(replace=True))
                # in scan order (the old table holds each source in file and row order); never sorted: DuckDB
                # cannot sort a source's wide payloads under its memory cap (see "reading and writing wide rows")
                conn.execute(f"{table.insert_sql(legacy.qualified)} WHERE source = $source", {"source": source})
            conn.execute(f"DROP TABLE {legacy.qualified}")
        conn.execute(_bronze_view_sql(conn))


def replace_bronze_source(conn: duckdb.DuckDBPyConnection, source: str, rows: Twin) -> None:
    """Make ``rows`` (a :func:`building` twin holding the source's new rows) the source's bronze table, in one
    transaction: readers of ``bronze.records`` see the old rows or the new ones, never both."""
    rows.finish()
    with transaction(conn):
        swap_in(conn, rows, bronze_source_table(source))
        conn.execute(_bronze_view_sql(conn))


BRONZE_INGESTS = Table(
    CACHE_SCHEMA,
    "bronze_ingests",
    "The landing fingerprint (ingest.bronze.landing_fingerprint) each source's bronze table was last read with.",
    (
        Column("source", "VARCHAR", "registry source", False),
        Column(
            "fingerprint", "VARCHAR", "registry entry, file paths, sizes and modification times, reader code", False
        ),
    ),
)


def ingested_with(conn: duckdb.DuckDBPyConnection, source: str, fingerprint: str) -> bool:
    """Whether ``source``'s bronze table exists and was read from landing files with this fingerprint (reads only,
    so a read-only connection will do)."""
    table = bronze_source_table(source)
    present = conn.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND ((schema_name = $schema AND table_name = $name) OR (schema_name = $cache AND table_name = $ingests))",
        {"schema": table.schema, "name": table.name, "cache": BRONZE_INGESTS.schema, "ingests": BRONZE_INGESTS.name},
    ).fetchall()[0][0]
    if present < 2:
        return False
    held = conn.execute(
        f"SELECT fingerprint FROM {BRONZE_INGESTS.qualified} WHERE source = $source", {"source": source}
    ).fetchall()
    return held == [(fingerprint,)]


def record_ingest(conn: duckdb.DuckDBPyConnection, source: str, fingerprint: str) -> None:
    """Remember the fingerprint ``source``'s bronze table was just read with."""
    ensure_cache_table(conn, BRONZE_INGESTS)
    with transaction(conn):
        conn.execute(f"DELETE FROM {BRONZE_INGESTS.qualified} WHERE source = $source", {"source": source})
        conn.execute(
            f"INSERT INTO {BRONZE_INGESTS.qualified} VALUES ($source, $fingerprint)",
            {"source": source, "fingerprint": fingerprint},
        )


def drop_unregistered_sources(conn: duckdb.DuckDBPyConnection, names: list[str]) -> list[str]:
    """Drop the bronze rows of every source not in ``names`` (the registry's), with its landing fingerprint, in one
    transaction: a source removed from the registry leaves nothing behind. Returns the sources dropped."""
    keep = {bronze_source_table(name).name for name in names}
    gone = [t for (t,) in conn.execute(_BRONZE_SOURCE_TABLES).fetchall() if t not in keep]
    if not gone:
        return []
    schema = BRONZE_RECORDS.schema
    sources = sorted({s for t in gone for (s,) in conn.execute(f"SELECT DISTINCT source FROM {schema}.{t}").fetchall()})
    ensure_cache_table(conn, BRONZE_INGESTS)
    with transaction(conn):
        for table in gone:
            conn.execute(f"DROP TABLE {schema}.{table}")
        conn.execute(_bronze_view_sql(conn))
        conn.execute(
            f"DELETE FROM {BRONZE_INGESTS.qualified} WHERE NOT list_contains($names, source)", {"names": names}
        )
    return sources
