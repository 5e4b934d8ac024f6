"""gold.preference: (prompt, chosen, rejected) pairs for DPO/IPO/KTO and reward models."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.gold.projection import GOLD_AUTOMATION, write_projection
from posttrain_assets.tables import GOLD_PREFERENCE


@dg.asset(
    key=["gold", "preference"],
    deps=[["silver", "records"]],
    group_name="gold",
    kinds={"duckdb"},
    pool="duckdb",
    automation_condition=GOLD_AUTOMATION,
    description=GOLD_PREFERENCE.description,
)
def gold_preference(duckdb: DuckDBResource) -> dg.MaterializeResult:
    return write_projection(duckdb, GOLD_PREFERENCE, "preference")
