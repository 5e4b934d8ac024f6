"""The regime split: each gold table is a projection of one silver table onto its regime's columns."""

from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets import settings
from posttrain_assets.defs.metadata import column_lineage, table_metadata
from posttrain_assets.warehouse.io import (
    SyncCounts,
    stored_rows_with_keys,
    sync_table,
    transaction,
    trusted_fingerprints,
)
from posttrain_assets.warehouse.model import Table

# Gold runs on its own once silver is fresh and every blocking check upstream passed;
# `blocking=True` alone only holds inside one run.
GOLD_AUTOMATION = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()

# Ids per sorted range when a gold table is filled anew or gets many new rows (io.insert_ordered): rows of a few
# KB (a conversation and its scores), so a range stays far below the memory limit.
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
    """Bring ``table`` to the rows of ``upstream`` matching ``where`` (named ``params``), projected onto its columns:
    only the rows that changed since the last materialisation are deleted or inserted (:func:`sync_table`), the new
    ones in id order after the rows kept, so the table is not stored in id order (readers order by id). A gold row
    changes only with its upstream row, so when ``upstream``'s stored fingerprints are trusted the rows are compared
    by those (``io.trusted_fingerprints``), not hashed."""
    columns = ", ".join(f'"{c}"' for c in table.column_names)
    projection = f"SELECT {columns} FROM {upstream.qualified} WHERE {where}"
    with duckdb.get_connection() as conn:
        with transaction(conn, checkpoint=True):
            upstream_fingerprints = trusted_fingerprints(conn, upstream)
            fingerprints = (
                f"SELECT u.id AS sync_key, f.sync_fingerprint FROM {upstream.qualified} u "
                f"JOIN {upstream_fingerprints} f ON f.sync_key = u.id WHERE {where}"
                if upstream_fingerprints
                else None
            )
            counts = sync_table(
                conn,
                table,
                projection,
                "id",
                PROJECTION_RANGE_ROWS,
                params,
                fingerprints=fingerprints,
                trust_stored=not settings.full_rebuild(),  # a full rebuild distrusts every kept result
                # the changed rows fetched by rowid, not by filtering every upstream row's wide columns
                rows_of_keys=lambda keys: (
                    f"SELECT {columns} FROM ({stored_rows_with_keys(upstream.qualified, keys, where=where)})"
                ),
            )
        metadata = table_metadata(conn, table, preview_columns=["id", "source", "prompt"], group_by="source")
    metadata.update(sync_metadata(table, counts))
    metadata["dagster/column_lineage"] = same_name_lineage(table, upstream_key)
    return dg.MaterializeResult(metadata=metadata)


def sync_metadata(table: Table, counts: SyncCounts) -> dict[str, int]:
    """A gold table's ``rows_computed/gold_<name>`` (rows inserted), ``rows_reused/gold_<name>`` (rows kept) and
    ``rows_deleted/gold_<name>``, read like the stage caches' (benchmarks/bench.py's stage_reuse)."""
    return counts.metadata(f"gold_{table.name}")
