"""Nothing lost: every bronze row is in exactly one of silver, eval, quarantine or the duplicates table."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.checks.verdicts import warehouse_check
from posttrain_assets.defs.metadata import markdown_table
from posttrain_assets.defs.resources import SourceRegistryResource
from posttrain_assets.warehouse.validation import account_sources


@warehouse_check(
    asset=["silver", "records"],
    blocking=True,
    additional_deps=[
        ["bronze", "records"],
        ["silver", "quarantine"],
        ["silver", "dedup_clusters"],
        ["silver", "eval_records"],
    ],
    description="Per source, bronze rows = silver + eval + quarantined + exact duplicates, each row placed once.",
)
def bronze_accounting_check(duckdb: DuckDBResource, registry: SourceRegistryResource) -> dg.AssetCheckResult:
    names = registry.load().names
    with duckdb.get_connection() as conn:
        accounts = account_sources(conn, names)
    unbalanced = [a for a in accounts if not a.balanced]
    not_ingested = [a.source for a in accounts if not a.ingested]
    empty = [a.source for a in accounts if a.ingested and a.bronze == 0]
    metadata: dict[str, dg.MetadataValue] = {
        "accounts": dg.MetadataValue.md(
            markdown_table(
                [
                    "source",
                    "ingested",
                    "bronze",
                    "silver",
                    "eval",
                    "quarantined",
                    "duplicates",
                    "missing",
                    "double_counted",
                ],
                [
                    (
                        a.source,
                        "yes" if a.ingested else "no",
                        a.bronze,
                        a.silver,
                        a.eval,
                        a.quarantined,
                        a.duplicates,
                        a.missing,
                        a.double_counted,
                    )
                    for a in accounts
                ],
            )
        ),
        "bronze_rows": dg.MetadataValue.int(sum(a.bronze for a in accounts)),
        "missing_rows": dg.MetadataValue.int(sum(a.missing for a in accounts)),
        "double_counted_rows": dg.MetadataValue.int(sum(a.double_counted for a in accounts)),
    }
    # One numeric series per source and outcome, so the UI plots them across materialisations.
    for a in accounts:
        for outcome in ("silver", "eval", "quarantined", "duplicates"):
            count = getattr(a, outcome)
            metadata[f"{a.source}/{outcome}"] = dg.MetadataValue.int(count)
            metadata[f"{a.source}/{outcome}_rate"] = dg.MetadataValue.float(count / a.bronze if a.bronze else 0.0)
    problems = [
        f"{a.source}: {a.missing} bronze row(s) missing, {a.double_counted} placed twice" for a in unbalanced
    ] + [f"{name}: no bronze rows (source not ingested)" for name in not_ingested]
    # An ingested source whose files hold no rows has nothing to lose: said, not failed.
    note = f"; ingested with 0 rows: {', '.join(empty)}" if empty else ""
    return dg.AssetCheckResult(
        passed=not problems,
        description=("every bronze row accounted for" if not problems else "; ".join(problems)) + note,
        metadata=metadata,
    )
