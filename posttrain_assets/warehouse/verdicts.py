"""Check verdicts kept in the warehouse (``checks.verdicts``): each check writes its latest verdict, and the
dataset cards read them back. No Dagster here: the checks' wiring (``defs/checks/verdicts.py``) calls these."""

from __future__ import annotations

import datetime as dt
from typing import Any

import duckdb

from posttrain_assets.warehouse.catalogue import CHECK_VERDICTS
from posttrain_assets.warehouse.io import fetch_dicts, transaction

_UPSERT = f"""
INSERT OR REPLACE INTO {CHECK_VERDICTS.qualified} ({", ".join(CHECK_VERDICTS.column_names)})
VALUES ($asset, $check_name, $passed, $severity, $description, $evaluated_at)
"""


def _ensure(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(CHECK_VERDICTS.create_sql())
    # one row per check: the key makes INSERT OR REPLACE keep the latest verdict only
    conn.execute(
        f"CREATE UNIQUE INDEX IF NOT EXISTS {CHECK_VERDICTS.name}_key ON {CHECK_VERDICTS.qualified} (asset, check_name)"
    )


def record_verdict(
    conn: duckdb.DuckDBPyConnection,
    *,
    asset: str,
    check_name: str,
    passed: bool,
    severity: str,
    description: str | None,
    evaluated_at: dt.datetime,
) -> None:
    """Make this the verdict of ``check_name`` on ``asset`` (replacing the one before), in one transaction."""
    with transaction(conn):
        _ensure(conn)
        conn.execute(
            _UPSERT,
            {
                "asset": asset,
                "check_name": check_name,
                "passed": passed,
                "severity": severity,
                "description": description,
                "evaluated_at": evaluated_at,
            },
        )


def latest_verdicts(conn: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Every recorded verdict as ``{name, asset, passed, description}``, by asset then check name (none: [])."""
    exists = conn.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = $schema AND table_name = $name",
        {"schema": CHECK_VERDICTS.schema, "name": CHECK_VERDICTS.name},
    ).fetchone()[0]
    if not exists:
        return []
    return fetch_dicts(
        conn,
        f"SELECT check_name AS name, asset, passed, coalesce(description, '') AS description "
        f"FROM {CHECK_VERDICTS.qualified} ORDER BY asset, check_name",
    )
