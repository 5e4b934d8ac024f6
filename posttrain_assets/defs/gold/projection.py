"""The regime split: each gold table is a projection of one silver table onto its regime's columns."""

from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.metadata import column_lineage, table_metadata
from posttrain_assets.warehouse.io import transaction
from posttrain_assets.warehouse.model import Table

# Gold runs on its own once silver is fresh and every blocking check upstream passed;
# `blocking=True` alone only holds inside one run.
GOLD_AUTOMATION = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


def same_name_lineage(table: Table, upstream: dg.AssetKey) -> dg.TableColumnLineage:
    """Each gold column comes from the upstream column of the same name."""
    return column_lineage({name: [(upstream, name)] for name in table.column_names})


def write_projection(
    duckdb: DuckDBResource,
    table: Table,
    upstream: Table,
    upstream_key: dg.AssetKey,
    where: str = "TRUE",
    params: dict[str, Any] | None = None,
) -> dg.MaterializeResult:
    """Create or replace ``table`` with the rows of ``upstream`` matching ``where`` (named ``params``), stored
    in id order.

    ``upstream`` is a silver table stored in id order, and DuckDB keeps a scan's order through a filter into
    an INSERT (preserve_insertion_order), so the rows are copied in one statement and nothing is sorted."""
    columns = ", ".join(f'"{c}"' for c in table.column_names)
    with duckdb.get_connection() as conn:
        with transaction(conn):
            conn.execute(table.create_sql(replace=True))
            conn.execute(table.insert_sql(f"(SELECT {columns} FROM {upstream.qualified} WHERE {where})"), params or {})
        metadata = table_metadata(conn, table, preview_columns=["id", "source", "prompt"], group_by="source")
    metadata["dagster/column_lineage"] = same_name_lineage(table, upstream_key)
    return dg.MaterializeResult(metadata=metadata)
