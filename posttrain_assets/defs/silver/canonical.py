"""Silver: bronze rows normalised into the canonical schema, with quarantine and exact-duplicate tables."""

import datetime as dt
import os
from functools import cache

import dagster as dg
import pyarrow as pa
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.metadata import table_metadata
from posttrain_assets.defs.resources import SourceRegistryResource, TokenizerResource
from posttrain_assets.normalize import build_silver
from posttrain_assets.tables import (
    BRONZE_RECORDS,
    SILVER_DEDUP_CLUSTERS,
    SILVER_EVAL_RECORDS,
    SILVER_QUARANTINE,
    SILVER_RECORDS,
    Table,
    fetch_dicts,
)
from posttrain_assets.token_counts import token_counts

BRONZE_KEY = dg.AssetKey(["bronze", "records"])
SILVER_RECORDS_KEY = dg.AssetKey(["silver", "records"])
SILVER_EVAL_KEY = dg.AssetKey(["silver", "eval_records"])
SILVER_QUARANTINE_KEY = dg.AssetKey(["silver", "quarantine"])
SILVER_DEDUP_KEY = dg.AssetKey(["silver", "dedup_clusters"])

# Bronze rows of the registry's sources, in the order that decides which exact duplicate is kept.
BRONZE_IN_PRIORITY_ORDER = f"""
SELECT source, file_path, row_number, record_sha256, payload, decode_error, file_sha256
FROM {BRONZE_RECORDS.qualified}
WHERE list_contains($sources, source)
ORDER BY list_position($sources, source), file_path, row_number
"""


def _spec(key: dg.AssetKey, table: Table) -> dg.AssetSpec:
    return dg.AssetSpec(
        key,
        deps=[BRONZE_KEY],
        description=table.description,
        group_name="silver",
        kinds={"duckdb"},
        metadata={
            "dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn(c.name, c.type) for c in table.columns])
        },
    )


@cache
def _file_mtime(path: str) -> dt.datetime:
    return dt.datetime.fromtimestamp(os.stat(path).st_mtime, dt.UTC)


@dg.multi_asset(
    specs=[
        _spec(SILVER_RECORDS_KEY, SILVER_RECORDS),
        _spec(SILVER_EVAL_KEY, SILVER_EVAL_RECORDS),
        _spec(SILVER_QUARANTINE_KEY, SILVER_QUARANTINE),
        _spec(SILVER_DEDUP_KEY, SILVER_DEDUP_CLUSTERS),
    ],
    pool="duckdb",
)
def silver_canonical(
    context: dg.AssetExecutionContext,
    duckdb: DuckDBResource,
    registry: SourceRegistryResource,
    tokenizer: TokenizerResource,
):
    """Normalise every bronze row: to silver.records (or eval_records), quarantine, or a duplicate of its kept twin."""
    sources = registry.load()
    tok = tokenizer.get()
    with duckdb.get_connection() as conn:
        conn.execute(BRONZE_RECORDS.create_sql())
        rows = fetch_dicts(conn, BRONZE_IN_PRIORITY_ORDER, {"sources": sources.names})
        orphans = conn.execute(
            f"SELECT DISTINCT source FROM {BRONZE_RECORDS.qualified} WHERE NOT list_contains($sources, source)",
            {"sources": sources.names},
        ).fetchall()
        if orphans:
            context.log.warning(f"bronze partitions not in the registry are ignored: {[o[0] for o in orphans]}")
        context.log.info(f"normalising {len(rows)} bronze rows from {len(sources.names)} sources")
        tables = build_silver(rows, sources, created_at=_file_mtime)
        for records in (tables.records, tables.eval_records):
            for record, count in zip(records, token_counts(tok, records), strict=True):
                record["token_count"] = count
        outputs = (
            (SILVER_RECORDS_KEY, SILVER_RECORDS, tables.records, ["id", "source", "regime", "prompt"], "regime"),
            (SILVER_EVAL_KEY, SILVER_EVAL_RECORDS, tables.eval_records, ["id", "source", "prompt", "answer"], "source"),
            (
                SILVER_QUARANTINE_KEY,
                SILVER_QUARANTINE,
                tables.quarantine,
                ["source", "row_number", "reason", "message"],
                "reason",
            ),
            (
                SILVER_DEDUP_KEY,
                SILVER_DEDUP_CLUSTERS,
                tables.duplicates,
                ["kept_id", "source", "row_number", "method"],
                "method",
            ),
        )
        for key, table, table_rows, preview, group_by in outputs:
            replace_table(conn, table, table_rows)
            metadata = table_metadata(conn, table, preview_columns=preview, group_by=group_by)
            yield dg.MaterializeResult(asset_key=key, metadata=metadata)


def replace_table(conn, table: Table, rows: list[dict]) -> None:
    """Create or replace ``table`` with exactly ``rows`` (idempotent)."""
    conn.execute("BEGIN TRANSACTION")
    conn.execute(table.create_sql(replace=True))
    if rows:
        conn.register("silver_batch", pa.Table.from_pylist(rows))
        conn.execute(table.insert_sql("silver_batch"))
        conn.unregister("silver_batch")
    conn.execute("COMMIT")
