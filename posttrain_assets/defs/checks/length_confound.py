"""length_confound_check: chosen must not simply be the longer side; ties must be rare.

Re-audits the stored pairs table per source with the very audit silver.preference_pairs reports
(:func:`posttrain_assets.preference.audit_sql.audit_relation`: set-based SQL over the table) and fails when a
source with enough pairs is outside the thresholds (chosen-longer share, |point-biserial r|, tie rate). The message
names the source, the statistic and its value. Blocking: gold.preference is not written past a failure.

Ties are the stored ``is_tie`` flags, set by the preference stage at its ``LengthConfoundConfig.tie_similarity``
(the texts are not compared again here), so the checks' config, :class:`LengthConfoundGateConfig`, has the
thresholds only.
"""

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.checks.verdicts import warehouse_check
from posttrain_assets.defs.metadata import markdown_table
from posttrain_assets.defs.silver.preference_pairs import LengthConfoundGateConfig
from posttrain_assets.preference.audit import confound_violations, markdown_audit_table
from posttrain_assets.preference.audit_sql import audit_relation
from posttrain_assets.warehouse.catalogue import SILVER_PREFERENCE_PAIRS, SILVER_PREFERENCE_PAIRS_BALANCED
from posttrain_assets.warehouse.model import Table


def confound_check_result(
    duckdb: DuckDBResource, table: Table, config: LengthConfoundGateConfig
) -> dg.AssetCheckResult:
    """The verdict of the gate on the pairs stored in ``table``."""
    thresholds = config.thresholds()
    with duckdb.get_connection() as conn:
        audits = audit_relation(conn, f"SELECT * FROM {table.qualified}")
    if not audits:
        return dg.AssetCheckResult(passed=True, description=f"{table.qualified} has no pairs", metadata={"pairs": 0})
    pairs = audits[("overall", "all")].pairs
    violations = confound_violations(audits, thresholds)
    judged = sorted(n for (k, n), a in audits.items() if k == "source" and a.pairs >= thresholds.min_pairs)
    return dg.AssetCheckResult(
        passed=not violations,
        description="; ".join(str(v) for v in violations)
        if violations
        else f"{len(judged)} source(s) within thresholds: {', '.join(judged)}",
        metadata={
            "pairs": dg.MetadataValue.int(pairs),
            "sources_judged": dg.MetadataValue.int(len(judged)),
            "violations": dg.MetadataValue.md(
                markdown_table(
                    ["source", "statistic", "value", "allowed", "pairs"],
                    [(v.group, v.statistic, f"{v.value:.3f}", f"{v.bound}", v.pairs) for v in violations],
                )
            ),
            "audit": dg.MetadataValue.md(markdown_audit_table(audits)),
            "thresholds": dg.MetadataValue.json(config.model_dump()),
        },
    )


@warehouse_check(
    asset=["silver", "preference_pairs"],
    blocking=True,
    description="Per source: chosen-longer share within bounds, |point-biserial r| small, ties rare.",
)
def length_confound_check(config: LengthConfoundGateConfig, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return confound_check_result(duckdb, SILVER_PREFERENCE_PAIRS, config)


@warehouse_check(
    asset=["silver", "preference_pairs_balanced"],
    blocking=True,
    description="The balanced remedy passes the same length-confound thresholds.",
)
def balanced_length_confound_check(config: LengthConfoundGateConfig, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return confound_check_result(duckdb, SILVER_PREFERENCE_PAIRS_BALANCED, config)
