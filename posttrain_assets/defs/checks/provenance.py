"""provenance_audit_check: every gold row resolves to its silver row, bronze row and a licensed, originated source."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.checks.verdicts import warehouse_check
from posttrain_assets.publish.trace import provenance_violations

MAX_LISTED = 20


@warehouse_check(
    asset=["gold", "trace"],
    blocking=True,
    description="Every gold row is in silver.records, names a license and an origin, and resolves to the bronze row "
    "at its origin with the same record and file sha256; so do the duplicates that collapsed onto it. Blocks exports.",
)
def provenance_audit_check(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    with duckdb.get_connection() as conn:
        problems = provenance_violations(conn)
        rows = conn.execute("SELECT count(*) FROM gold.trace").fetchone()[0]
    return dg.AssetCheckResult(
        passed=not problems,
        description=f"{rows} gold rows trace back to bronze"
        if not problems
        else f"{len(problems)} provenance problem(s): " + "; ".join(problems[:3]),
        metadata={
            "gold_rows": dg.MetadataValue.int(rows),
            "problems": dg.MetadataValue.int(len(problems)),
            "listed": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems[:MAX_LISTED]) or "none"),
        },
    )
