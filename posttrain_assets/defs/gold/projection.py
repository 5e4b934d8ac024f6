"""The regime split: a gold table is a projection of silver.records onto one regime's fields."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.metadata import table_metadata
from posttrain_assets.tables import SILVER_RECORDS, Table

# Gold runs on its own once silver is fresh and every blocking check upstream passed;
# `blocking=True` alone only holds inside one run.
GOLD_AUTOMATION = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


SILVER_RECORDS_KEY = dg.AssetKey(["silver", "records"])


def column_lineage(table: Table, upstream: dg.AssetKey = SILVER_RECORDS_KEY) -> dg.TableColumnLineage:
    """Each gold column comes from the silver column of the same name."""
    return dg.TableColumnLineage(
        deps_by_column={name: [dg.TableColumnDep(asset_key=upstream, column_name=name)] for name in table.column_names}
    )


def write_projection(duckdb: DuckDBResource, table: Table, regime: str) -> dg.MaterializeResult:
    """Create or replace ``table`` with the ``regime`` rows of silver.records, in id order."""
    columns = ", ".join(f'"{c}"' for c in table.column_names)
    with duckdb.get_connection() as conn:
        conn.execute("BEGIN TRANSACTION")
        conn.execute(table.create_sql(replace=True))
        conn.execute(
            f"INSERT INTO {table.qualified} ({columns}) SELECT {columns} FROM {SILVER_RECORDS.qualified} "
            "WHERE regime = ? ORDER BY id",
            [regime],
        )
        conn.execute("COMMIT")
        metadata = table_metadata(conn, table, preview_columns=["id", "source", "prompt"], group_by="source")
    metadata["dagster/column_lineage"] = column_lineage(table)
    return dg.MaterializeResult(metadata=metadata)
