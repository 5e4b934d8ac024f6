"""Provenance of every gold row, back to its landing file: the ``gold.trace`` view, a readable chain for one id,
and the list of provenance violations.

Each gold row carries its ``origin`` (source, registry uri, file, row, record and file sha256). The chain is:
gold table -> silver.records (same id) -> the dedup cluster that collapsed onto it (silver.dedup_clusters rows
with ``kept_id = id``, each with its own source, file and row) -> the bronze row at (source, file, row) -> the
landing file's and the record's sha256, the source's license and origin. Pure: a DuckDB connection, no Dagster.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import duckdb

from posttrain_assets.warehouse.io import fetch_batches

GOLD_TABLES = ("gold.sft", "gold.preference", "gold.preference_length_balanced", "gold.rl_prompts")

TRACE_VIEW = "gold.trace"

# One row per gold row. Columns named bronze_* come from the bronze row found at the origin's (source, file, row);
# they are null when there is none. The origin's own sha256s are kept next to them so a mismatch shows.
_TRACE_SELECT = """
WITH gold_rows AS ({gold_rows}),
twins AS (
    SELECT kept_id,
           list(struct_pack(
               member_id := member_id, source := source, file_path := file_path, row_number := row_number,
               record_sha256 := record_sha256, method := method, similarity := similarity
           ) ORDER BY source, file_path, row_number) AS dropped_duplicates
    FROM silver.dedup_clusters GROUP BY kept_id
)
SELECT g.gold_table,
       g.id,
       g.source,
       g.license,
       g.origin.uri AS origin_uri,
       g.origin.source AS origin_source,
       s.id IS NOT NULL AS in_silver,
       s.regime AS silver_regime,
       g.origin.file AS file_path,
       g.origin."row" AS row_number,
       g.origin.file_sha256 AS file_sha256,
       g.origin.record_sha256 AS record_sha256,
       b.source IS NOT NULL AS in_bronze,
       b.file_sha256 AS bronze_file_sha256,
       b.record_sha256 AS bronze_record_sha256,
       coalesce(t.dropped_duplicates, []) AS dropped_duplicates
FROM gold_rows g
LEFT JOIN silver.records s ON s.id = g.id
LEFT JOIN bronze.records b
       ON b.source = g.origin.source AND b.file_path = g.origin.file AND b.row_number = g.origin."row"
LEFT JOIN twins t ON t.kept_id = g.id
"""


class TraceError(LookupError):
    """An id prefix that matches no gold row, or more than one."""


def gold_tables(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """The tables of ``GOLD_TABLES`` that exist (a gold table held back by a failing check may never have been
    written)."""
    rows = conn.execute("SELECT table_schema || '.' || table_name FROM information_schema.tables").fetchall()
    existing = {name for (name,) in rows}
    return [t for t in GOLD_TABLES if t in existing]


def trace_select(conn: duckdb.DuckDBPyConnection) -> str:
    """The SELECT behind ``gold.trace`` over the gold tables that exist now."""
    tables = gold_tables(conn)
    if not tables:
        raise TraceError(f"none of {', '.join(GOLD_TABLES)} exists: materialise gold first")
    union = " UNION ALL ".join(f"SELECT '{t}' AS gold_table, id, source, license, origin FROM {t}" for t in tables)
    return _TRACE_SELECT.format(gold_rows=union)


def create_trace_view(conn: duckdb.DuckDBPyConnection) -> None:
    """Create or replace the ``gold.trace`` view over the gold tables that exist (silver.records,
    silver.dedup_clusters and bronze.records must exist too). Re-create it when a gold table first appears.

    Columns: gold_table, id, source, license, origin_uri, origin_source, in_silver, silver_regime, file_path,
    row_number, file_sha256, record_sha256 (as the gold row's origin records them), in_bronze, bronze_file_sha256,
    bronze_record_sha256 (from the bronze row at that source/file/row, null if none) and dropped_duplicates
    (list of {member_id, source, file_path, row_number, record_sha256, method, similarity} from
    silver.dedup_clusters with kept_id = id; empty when nothing collapsed onto the row).
    """
    conn.execute(f"CREATE OR REPLACE VIEW {TRACE_VIEW} AS {trace_select(conn)}")


def trace_row_counts(conn: duckdb.DuckDBPyConnection) -> list[tuple[str, int]]:
    """``(gold table, rows)`` of ``gold.trace``, in table name order: one trace row per gold row (its joins are left
    joins on keys unique in silver.records, bronze.records and the grouped clusters), so counted from the gold tables
    alone rather than by joining bronze and silver for every row."""
    tables = sorted(gold_tables(conn))
    return [(t, conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables]


def _trace_rows(conn: duckdb.DuckDBPyConnection, where: str, params: list[Any]) -> list[dict[str, Any]]:
    """Rows of the trace query (the view's SQL inline, so tracing works before the view exists)."""
    cursor = conn.execute(f"SELECT * FROM ({trace_select(conn)}) WHERE {where} ORDER BY id, gold_table", params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _not_in_gold(conn: duckdb.DuckDBPyConnection, id_prefix: str) -> str:
    """Say where a non-gold id is, if it is anywhere in silver."""
    for table, detail in (
        ("silver.sft_quarantine", "reason || ': ' || message"),
        ("silver.eval_records", "'evaluation source ' || source || ' (never in gold)'"),
        ("silver.preference_balance_drops", "'dropped by length balancing: ' || reason"),
        ("silver.records", "'regime ' || regime || ', source ' || source"),
    ):
        try:
            row = conn.execute(
                f"SELECT id, {detail} FROM {table} WHERE starts_with(id, ?) ORDER BY id LIMIT 1", [id_prefix]
            ).fetchone()
        except duckdb.CatalogException:  # a table that does not exist yet has nothing to say
            continue
        if row:
            return f"; {row[0]} is in {table}: {row[1]}"
    return ""


def trace(conn: duckdb.DuckDBPyConnection, id_prefix: str) -> str:
    """A readable provenance chain for the gold row whose id starts with ``id_prefix``.

    Raises ``TraceError`` when no gold row matches (saying where the id is if it is in silver but not in gold) or
    when the prefix matches more than one id.
    """
    id_prefix = id_prefix.strip()
    if not id_prefix:
        raise TraceError("an id (or an id prefix) is needed")
    rows = _trace_rows(conn, "starts_with(id, ?)", [id_prefix])
    if not rows:
        raise TraceError(f"no gold row has an id starting {id_prefix!r}{_not_in_gold(conn, id_prefix)}")
    ids = sorted({r["id"] for r in rows})
    if len(ids) > 1:
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        raise TraceError(f"id prefix {id_prefix!r} is ambiguous: {len(ids)} gold rows match ({shown})")
    return "\n\n".join(_format(conn, row) for row in rows)


def _sha_check(recorded: str | None, found: str | None) -> str:
    if found is None:
        return ""
    return " (matches bronze)" if recorded == found else f" (MISMATCH: bronze has {found})"


def _format(conn: duckdb.DuckDBPyConnection, r: dict[str, Any]) -> str:
    kind = None
    if r["in_silver"]:
        kind = conn.execute("SELECT source_kind FROM silver.records WHERE id = ?", [r["id"]]).fetchone()
    lines = [f"{r['gold_table']} {r['id']}"]
    if r["in_silver"]:
        lines.append(f"  <- silver.records {r['id']} (regime {r['silver_regime']}, source {r['source']})")
    else:
        lines.append("  <- silver.records: MISSING (no silver row with this id)")
    twins = r["dropped_duplicates"]
    if twins:
        lines.append(f"  <- dedup cluster {r['id']}: kept this row, dropped {len(twins)} duplicate(s):")
        lines += [
            f"       - {t['source']} {t['file_path']} row {t['row_number']} ({t['method']}, similarity "
            f"{t['similarity']:g}, record sha256 {t['record_sha256']})"
            for t in twins
        ]
    else:
        lines.append("  <- dedup cluster: none (no duplicate collapsed onto this row)")
    if r["in_bronze"]:
        lines.append(f"  <- bronze.records (source {r['origin_source']}):")
    else:
        lines.append(
            f"  <- bronze.records: MISSING (no bronze row at source {r['origin_source']}, "
            f"{r['file_path']} row {r['row_number']})"
        )
    lines += [
        f"     file:          {r['file_path']}",
        f"     row:           {r['row_number']}",
        f"     file sha256:   {r['file_sha256']}{_sha_check(r['file_sha256'], r['bronze_file_sha256'])}",
        f"     record sha256: {r['record_sha256']}{_sha_check(r['record_sha256'], r['bronze_record_sha256'])}",
        f"  source:  {r['source']}" + (f" ({kind[0]})" if kind else ""),
        f"  license: {r['license'] or 'MISSING'}",
        f"  origin:  {r['origin_uri'] or 'MISSING'}",
    ]
    return "\n".join(lines)


# What the audit reads of each trace row (not the list of dropped duplicates).
AUDITED_COLUMNS = (
    "gold_table",
    "id",
    "source",
    "license",
    "origin_uri",
    "origin_source",
    "in_silver",
    "file_path",
    "row_number",
    "file_sha256",
    "record_sha256",
    "in_bronze",
    "bronze_file_sha256",
    "bronze_record_sha256",
)
AUDIT_BATCH_ROWS = 65_536


# The trace rows that may break a rule of provenance_violations: a superset of them, decided in DuckDB so that only
# these reach Python, where the rules are applied as written. A license or origin uri holding a printable ASCII
# character is not blank to str.strip(); any other (null, empty, or only other characters) is looked at in Python.
_SUSPECT_ROWS = """
NOT in_silver
OR license IS NULL OR NOT regexp_matches(license, '[!-~]')
OR origin_uri IS NULL OR NOT regexp_matches(origin_uri, '[!-~]')
OR origin_source IS DISTINCT FROM source
OR NOT in_bronze
OR bronze_record_sha256 IS DISTINCT FROM record_sha256
OR bronze_file_sha256 IS DISTINCT FROM file_sha256
"""


def _audited_rows(conn: duckdb.DuckDBPyConnection) -> Iterator[dict[str, Any]]:
    """The audited columns of every trace row that may break a rule (``_SUSPECT_ROWS``; none when provenance is
    sound), streamed in Arrow batches and unsorted: a million gold rows sorted with their lists of dropped duplicates
    outgrow DuckDB's memory cap (the messages are sorted at the end instead)."""
    sql = f"SELECT {', '.join(AUDITED_COLUMNS)} FROM ({trace_select(conn)}) WHERE {_SUSPECT_ROWS}"
    for rows in fetch_batches(conn, sql, AUDIT_BATCH_ROWS):
        yield from rows


def provenance_violations(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """Every way a gold row fails to resolve to its sources; empty when provenance is sound.

    Each gold row must: be in silver.records; name a license and an origin uri; have an origin whose source is the
    row's source; resolve to the bronze row at its origin's (source, file, row) with the same record sha256 and file
    sha256. Each dropped duplicate in silver.dedup_clusters that collapsed onto a gold row must resolve to its bronze
    row in the same way. Messages name the table, the id and the problem, sorted.
    """
    problems: list[str] = []
    for r in _audited_rows(conn):
        where = f"{r['gold_table']} {r['id']}"
        if not r["in_silver"]:
            problems.append(f"{where}: not in silver.records")
        if not (r["license"] or "").strip():
            problems.append(f"{where}: source {r['source']} has no license")
        if not (r["origin_uri"] or "").strip():
            problems.append(f"{where}: source {r['source']} has no origin uri")
        if r["origin_source"] != r["source"]:
            problems.append(f"{where}: origin source {r['origin_source']!r} is not the row's source {r['source']!r}")
        at = f"bronze row at source {r['origin_source']}, {r['file_path']} row {r['row_number']}"
        if not r["in_bronze"]:
            problems.append(f"{where}: no {at}")
            continue
        if r["bronze_record_sha256"] != r["record_sha256"]:
            problems.append(
                f"{where}: record sha256 {r['record_sha256']} differs from the {at} ({r['bronze_record_sha256']})"
            )
        if r["bronze_file_sha256"] != r["file_sha256"]:
            problems.append(
                f"{where}: file sha256 {r['file_sha256']} differs from the {at} ({r['bronze_file_sha256']})"
            )
    gold_ids = " UNION ALL ".join(f"SELECT id FROM {t}" for t in gold_tables(conn))
    missing_twins = conn.execute(
        f"""
        SELECT d.kept_id, d.source, d.file_path, d.row_number, d.record_sha256, b.record_sha256
        FROM silver.dedup_clusters d
        LEFT JOIN bronze.records b
               ON b.source = d.source AND b.file_path = d.file_path AND b.row_number = d.row_number
        WHERE b.record_sha256 IS DISTINCT FROM d.record_sha256
          AND d.kept_id IN ({gold_ids})
        ORDER BY ALL
        """
    ).fetchall()
    for kept_id, source, file_path, row_number, recorded, found in missing_twins:
        at = f"bronze row at source {source}, {file_path} row {row_number}"
        problem = f"no {at}" if found is None else f"record sha256 {recorded} differs from the {at} ({found})"
        problems.append(f"dropped duplicate of {kept_id}: {problem}")
    return sorted(problems)
