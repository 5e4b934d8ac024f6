"""What every silver table asset shares: its spec and its automation condition."""

from collections.abc import Sequence

import dagster as dg

from posttrain_assets.warehouse.model import Table

# Silver follows its upstream: a re-ingested source partition rebuilds the corpus, and so on downstream.
SILVER_AUTOMATION = dg.AutomationCondition.eager()


def silver_spec(key: dg.AssetKey, table: Table, deps: Sequence[dg.AssetKey]) -> dg.AssetSpec:
    """The spec of one silver table output: described by its declaration, grouped, automated."""
    return dg.AssetSpec(
        key,
        deps=list(deps),
        description=table.description,
        group_name="silver",
        kinds={"duckdb"},
        automation_condition=SILVER_AUTOMATION,
        metadata={
            "dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn(c.name, c.type) for c in table.columns])
        },
    )
