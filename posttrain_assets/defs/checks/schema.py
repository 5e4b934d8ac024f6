"""Schema checks: declared column types, per-regime required fields, unique ids.

The silver check is blocking, so no gold table is written from a silver table
that breaks its schema; each gold table gets the same check after it is written.
"""

from collections.abc import Sequence

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.checks.verdicts import warehouse_check
from posttrain_assets.defs.metadata import markdown_table
from posttrain_assets.warehouse.catalogue import (
    GOLD_PREFERENCE,
    GOLD_PREFERENCE_LENGTH_BALANCED,
    GOLD_RL_PROMPTS,
    GOLD_SFT,
    REQUIRED_BY_REGIME,
    REQUIRED_FOR_ALL,
    SILVER_RECORDS,
)
from posttrain_assets.warehouse.model import Table
from posttrain_assets.warehouse.validation import schema_violations


def schema_check_result(
    duckdb: DuckDBResource,
    table: Table,
    required: Sequence[str],
    required_by_regime: dict[str, Sequence[str]] | None = None,
) -> dg.AssetCheckResult:
    with duckdb.get_connection() as conn:
        violations = schema_violations(conn, table, required, required_by_regime)
    return dg.AssetCheckResult(
        passed=not violations,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"{table.qualified}: schema and required fields hold"
            if not violations
            else f"{table.qualified}: " + "; ".join(str(v) for v in violations)
        ),
        metadata={
            "violations": dg.MetadataValue.int(len(violations)),
            "details": dg.MetadataValue.md(
                markdown_table(
                    ["rule", "rows", "sample ids"], [(v.rule, v.rows, ", ".join(v.sample)) for v in violations]
                )
            ),
        },
    )


@warehouse_check(
    asset=["silver", "records"],
    blocking=True,
    description="Column types, per-regime required fields, unique ids.",
)
def silver_records_schema_check(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return schema_check_result(duckdb, SILVER_RECORDS, REQUIRED_FOR_ALL, REQUIRED_BY_REGIME)


def gold_schema_check(table: Table, regime: str) -> dg.AssetChecksDefinition:
    """The schema check of a gold table: its declared columns and the regime's required fields."""
    required = [c for c in (*REQUIRED_FOR_ALL, *REQUIRED_BY_REGIME[regime]) if c in table.column_names]

    @warehouse_check(
        asset=[table.schema, table.name],
        name=f"{table.schema}_{table.name}_schema_check",
        blocking=True,
        description=f"{table.qualified}: declared column types, required {regime} fields non-null, unique ids.",
    )
    def _check(duckdb: DuckDBResource) -> dg.AssetCheckResult:
        return schema_check_result(duckdb, table, required)

    return _check


gold_preference_schema_check = gold_schema_check(GOLD_PREFERENCE, "preference")
gold_preference_length_balanced_schema_check = gold_schema_check(GOLD_PREFERENCE_LENGTH_BALANCED, "preference")
gold_rl_prompts_schema_check = gold_schema_check(GOLD_RL_PROMPTS, "rl")
gold_sft_schema_check = gold_schema_check(GOLD_SFT, "sft")
