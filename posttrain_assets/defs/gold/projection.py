"""The regime split: each gold table is a projection of one silver table onto its regime's columns."""

from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.metadata import column_lineage, table_metadata
from posttrain_assets.tables import Table, insert_ordered

# Gold runs on its own once silver is fresh and every blocking check upstream passed;
# `blocking=True` alone only holds inside one run.
GOLD_AUTOMATION = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
# Rows per sorted id range when a projection is written (tables.insert_ordered).
PROJECTION_RANGE_ROWS = 32_768


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
    in id order."""
    columns = ", ".join(f'"{c}"' for c in table.column_names)
    with duckdb.get_connection() as conn:
        conn.execute("BEGIN TRANSACTION")
        conn.execute(table.create_sql(replace=True))
        relation = f"SELECT {columns} FROM {upstream.qualified} WHERE {where}"
        insert_ordered(conn, table, relation, "id", PROJECTION_RANGE_ROWS, params)
        conn.execute("COMMIT")
        metadata = table_metadata(conn, table, preview_columns=["id", "source", "prompt"], group_by="source")
    metadata["dagster/column_lineage"] = same_name_lineage(table, upstream_key)
    return dg.MaterializeResult(metadata=metadata)
