"""Table-level validations behind the blocking checks: schema, required fields, accounting.

Plain functions over a DuckDB connection (no Dagster), so tests call them directly.
Each returns what is wrong, empty when the table is right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import duckdb

from posttrain_assets.warehouse.bronze import bronze_source_table
from posttrain_assets.warehouse.catalogue import (
    BRONZE_RECORDS,
    SILVER_DEDUP_CLUSTERS,
    SILVER_EVAL_RECORDS,
    SILVER_QUARANTINE,
    SILVER_RECORDS,
)
from posttrain_assets.warehouse.model import Table

SAMPLE = 5


@dataclass(frozen=True)
class Violation:
    """One broken rule: what, how many rows, and a sample of the row ids."""

    rule: str
    rows: int
    sample: tuple[str, ...] = ()

    def __str__(self) -> str:
        ids = f" (e.g. {', '.join(self.sample)})" if self.sample else ""
        return f"{self.rule}: {self.rows} row(s){ids}"


def column_types(conn: duckdb.DuckDBPyConnection, relation: str) -> dict[str, str]:
    return {row[0]: row[1] for row in conn.execute(f"DESCRIBE {relation}").fetchall()}


def schema_violations(
    conn: duckdb.DuckDBPyConnection,
    table: Table,
    required: Sequence[str] = (),
    required_by_regime: dict[str, Sequence[str]] | None = None,
) -> list[Violation]:
    """Column names and types as declared, required fields non-null (per regime), ids unique."""
    exists = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
        [table.schema, table.name],
    ).fetchone()[0]
    if not exists:
        return [Violation(f"table {table.qualified} does not exist", 0)]
    # DuckDB spells types its own way; compare with an empty table built from the declaration.
    conn.execute(f"CREATE OR REPLACE TEMP TABLE declared_{table.name} ({table.columns_sql()})")
    expected, actual = column_types(conn, f"declared_{table.name}"), column_types(conn, table.qualified)
    out: list[Violation] = []
    for name, type_ in expected.items():
        if name not in actual:
            out.append(Violation(f"column {name} is missing", 0))
        elif actual[name] != type_:
            out.append(Violation(f"column {name} has type {actual[name]}, expected {type_}", 0))
    out.extend(Violation(f"unexpected column {name}", 0) for name in actual.keys() - expected.keys())
    if out:
        return out
    rules = [(column, "TRUE", [], "") for column in required] + [
        (column, "regime = ?", [regime], f"{regime} rows: ")
        for regime, columns in (required_by_regime or {}).items()
        for column in columns
    ]
    # Every rule counted in one scan of the table; only a rule that some row breaks is queried again for its
    # sample of ids (the failure path, so a passing table is read once).
    if rules:
        broken_rows = [
            f"count(*) FILTER (WHERE {where} AND ({_empty(table, column)}))" for column, where, _, _ in rules
        ]
        counts = conn.execute(
            f"SELECT {', '.join(broken_rows)} FROM {table.qualified}", [p for _, _, params, _ in rules for p in params]
        ).fetchone()
        for (column, where, params, label), broken in zip(rules, counts, strict=True):
            if broken:
                out.extend(_nulls(conn, table, column, where, params, label))
    dupes = conn.execute(f"SELECT id FROM {table.qualified} GROUP BY id HAVING count(*) > 1 ORDER BY id").fetchall()
    if dupes:
        out.append(Violation("id is not unique", len(dupes), tuple(d[0] for d in dupes[:SAMPLE])))
    return out


def _empty(table: Table, column: str) -> str:
    """SQL true when ``column`` is null or empty: a blank string (nothing but what ``trim`` removes) or an empty
    list."""
    type_ = table.column(column).type
    if type_ == "VARCHAR":
        # trim() copies the whole string; a blank string's first character trims to '' too, so testing that first
        # trims the whole text of almost no row: the same rows. A CASE, because DuckDB evaluates both sides of an
        # AND inside an aggregate's FILTER (it skips the second only in a WHERE clause).
        return (
            f'CASE WHEN "{column}" IS NULL THEN true WHEN trim(left("{column}", 1)) <> \'\' THEN false '
            f"ELSE trim(\"{column}\") = '' END"
        )
    if type_.endswith("[]"):
        return f'"{column}" IS NULL OR len("{column}") = 0'
    return f'"{column}" IS NULL'


def _nulls(
    conn: duckdb.DuckDBPyConnection, table: Table, column: str, where: str, params: list, label: str = ""
) -> list[Violation]:
    ids = conn.execute(
        f"SELECT id FROM {table.qualified} WHERE {where} AND ({_empty(table, column)}) ORDER BY id", params
    ).fetchall()
    if not ids:
        return []
    return [Violation(f"{label}required field {column} is null or empty", len(ids), tuple(i[0] for i in ids[:SAMPLE]))]


@dataclass(frozen=True)
class SourceAccount:
    """Where one source's bronze rows went. ``missing`` and ``double_counted`` must be 0. ``ingested`` tells a
    source whose files held no rows (ingested, 0 rows) from one that was never ingested."""

    source: str
    bronze: int
    silver: int
    eval: int
    quarantined: int
    duplicates: int
    missing: int
    double_counted: int
    ingested: bool = True

    @property
    def balanced(self) -> bool:
        return self.missing == 0 and self.double_counted == 0


ACCOUNTING_SQL = f"""
WITH placed AS (
    SELECT origin.source AS source, origin.file AS file_path, origin."row" AS row_number FROM {SILVER_RECORDS.qualified}
    UNION ALL SELECT origin.source, origin.file, origin."row" FROM {SILVER_EVAL_RECORDS.qualified}
    UNION ALL SELECT source, file_path, row_number FROM {SILVER_QUARANTINE.qualified}
    UNION ALL SELECT source, file_path, row_number FROM {SILVER_DEDUP_CLUSTERS.qualified}
), per_row AS (
    SELECT source, file_path, row_number, count(*) AS n FROM placed GROUP BY ALL
)
SELECT
    b.source,
    count(*) AS bronze,
    (SELECT count(*) FROM {SILVER_RECORDS.qualified} s WHERE s.source = b.source) AS silver,
    (SELECT count(*) FROM {SILVER_EVAL_RECORDS.qualified} e WHERE e.source = b.source) AS eval,
    (SELECT count(*) FROM {SILVER_QUARANTINE.qualified} q WHERE q.source = b.source)
        AS quarantined,
    (SELECT count(*) FROM {SILVER_DEDUP_CLUSTERS.qualified} d WHERE d.source = b.source) AS duplicates,
    count(*) FILTER (WHERE p.n IS NULL) AS missing,
    count(*) FILTER (WHERE p.n > 1) AS double_counted
FROM {BRONZE_RECORDS.qualified} b
LEFT JOIN per_row p USING (source, file_path, row_number)
WHERE list_contains($sources, b.source)
GROUP BY b.source
ORDER BY b.source
"""


# Which of the given tables exist in the bronze schema.
_EXISTING_BRONZE_TABLES = f"""
SELECT table_name FROM duckdb_tables()
WHERE database_name = current_database() AND schema_name = '{BRONZE_RECORDS.schema}'
  AND list_contains($names, table_name)
"""


def account_sources(conn: duckdb.DuckDBPyConnection, sources: Sequence[str]) -> list[SourceAccount]:
    """Per source: bronze rows, where they went, and how many are missing or placed twice."""
    rows = conn.execute(ACCOUNTING_SQL, {"sources": list(sources)}).fetchall()
    accounts = [SourceAccount(*row) for row in rows]
    seen = {a.source for a in accounts}
    # A registered source without bronze rows was ingested from files that held none when its bronze table exists
    # (ingestion writes one per source, rows or not), else never ingested.
    table_of = {bronze_source_table(s).name: s for s in sources if s not in seen}
    existing = conn.execute(_EXISTING_BRONZE_TABLES, {"names": list(table_of)}).fetchall()
    ingested = {table_of[name] for (name,) in existing}
    accounts += [SourceAccount(s, 0, 0, 0, 0, 0, 0, 0, s in ingested) for s in sources if s not in seen]
    return accounts
