"""gold.rl_prompts: the RLVR prompt bank (prompt, gold answer, verifier, domain, difficulty)."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.gold.projection import GOLD_AUTOMATION, write_projection
from posttrain_assets.defs.silver.canonical import SILVER_RECORDS_KEY
from posttrain_assets.tables import GOLD_RL_PROMPTS, SILVER_RECORDS


@dg.asset(
    key=["gold", "rl_prompts"],
    deps=[["silver", "records"]],
    group_name="gold",
    kinds={"duckdb"},
    pool="duckdb",
    automation_condition=GOLD_AUTOMATION,
    description=GOLD_RL_PROMPTS.description,
)
def gold_rl_prompts(duckdb: DuckDBResource) -> dg.MaterializeResult:
    return write_projection(duckdb, GOLD_RL_PROMPTS, SILVER_RECORDS, SILVER_RECORDS_KEY, "regime = ?", ["rl"])
