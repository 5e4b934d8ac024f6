"""gold.preference: (prompt, chosen, rejected) pairs for DPO/IPO/KTO and reward models, past the length gate;
gold.preference_length_balanced: the balanced remedy, for when the full set fails it."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.gold.projection import GOLD_AUTOMATION, write_projection
from posttrain_assets.defs.silver.preference_pairs import BALANCED_KEY, PAIRS_KEY
from posttrain_assets.warehouse.catalogue import (
    GOLD_PREFERENCE,
    GOLD_PREFERENCE_LENGTH_BALANCED,
    SILVER_PREFERENCE_PAIRS,
    SILVER_PREFERENCE_PAIRS_BALANCED,
)


@dg.asset(
    key=["gold", "preference"],
    deps=[PAIRS_KEY],
    group_name="gold",
    kinds={"duckdb"},
    pool="duckdb",
    automation_condition=GOLD_AUTOMATION,
    description=GOLD_PREFERENCE.description,
)
def gold_preference(duckdb: DuckDBResource) -> dg.MaterializeResult:
    return write_projection(duckdb, GOLD_PREFERENCE, SILVER_PREFERENCE_PAIRS, PAIRS_KEY)


@dg.asset(
    key=["gold", "preference_length_balanced"],
    deps=[BALANCED_KEY],
    group_name="gold",
    kinds={"duckdb"},
    pool="duckdb",
    automation_condition=GOLD_AUTOMATION,
    description=GOLD_PREFERENCE_LENGTH_BALANCED.description,
)
def gold_preference_length_balanced(duckdb: DuckDBResource) -> dg.MaterializeResult:
    return write_projection(duckdb, GOLD_PREFERENCE_LENGTH_BALANCED, SILVER_PREFERENCE_PAIRS_BALANCED, BALANCED_KEY)
