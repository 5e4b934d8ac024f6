"""Checks on the RL prompt bank: every seed certified with the current verifier; difficulty histogram."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.checks.verdicts import warehouse_check
from posttrain_assets.defs.metadata import markdown_table
from posttrain_assets.rl.verifiers import VERIFIER_VERSIONS
from posttrain_assets.warehouse.catalogue import GOLD_RL_PROMPTS, SILVER_RL_CERTIFICATION, SILVER_RL_DIFFICULTY

# Each seed in the bank with its certificate; ``$verifiers`` / ``$versions`` are VERIFIER_VERSIONS as two lists.
_CERTIFIED_SEEDS = f"""
FROM {GOLD_RL_PROMPTS.qualified} g LEFT JOIN {SILVER_RL_CERTIFICATION.qualified} c USING (id)
LEFT JOIN (SELECT unnest($verifiers) AS verifier, unnest($versions) AS version) v ON v.verifier = g.verifier
"""
# The seeds not certified by the verifier version in use now (no certificate, certified false, or another version),
# in id order; counted in DuckDB, so only these reach Python.
GOLD_UNCERTIFIED = f"""
SELECT g.id, g.verifier, g.verifier_version, c.reason
{_CERTIFIED_SEEDS}
WHERE NOT coalesce(c.certified, false) OR g.verifier_version IS DISTINCT FROM v.version
ORDER BY g.id
"""


@warehouse_check(
    asset=["gold", "rl_prompts"],
    blocking=True,
    additional_deps=[["silver", "rl_certification"]],
    description="Every seed in the bank was certified (gold accepted in 3 processes, perturbed answer rejected) "
    "by the verifier version in use now.",
)
def rl_certification_check(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    with duckdb.get_connection() as conn:
        versions = {"verifiers": list(VERIFIER_VERSIONS), "versions": list(VERIFIER_VERSIONS.values())}
        (total,) = conn.execute(f"SELECT count(*) {_CERTIFIED_SEEDS}", versions).fetchone()
        bad = conn.execute(GOLD_UNCERTIFIED, versions).fetchall()
        failures = conn.execute(
            f"SELECT reason, count(*) FROM {SILVER_RL_CERTIFICATION.qualified} WHERE NOT certified GROUP BY ALL "
            "ORDER BY ALL"
        ).fetchall()
    return dg.AssetCheckResult(
        passed=not bad,
        description=f"{total} seeds certified"
        if not bad
        else f"{len(bad)} seed(s) not certified by the current verifier: "
        + "; ".join(f"{i} ({v} {ver}: {reason or 'stale version'})" for i, v, ver, reason in bad[:3]),
        metadata={
            "certified_seeds": dg.MetadataValue.int(total - len(bad)),
            "quarantined_in_silver": dg.MetadataValue.json(dict(failures)),
            "verifier_versions": dg.MetadataValue.json(VERIFIER_VERSIONS),
        },
    )


@warehouse_check(
    asset=["gold", "rl_prompts"],
    additional_deps=[["silver", "rl_difficulty"]],
    description="Difficulty histogram of the estimated seeds and, per domain, how many fall outside the pass-rate "
    "band (0, 1); warns if a seed the policy always or never solves is in gold.",
)
def rl_difficulty_band_check(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    with duckdb.get_connection() as conn:
        conn.execute(SILVER_RL_DIFFICULTY.create_sql())
        estimated_all = conn.execute(
            f"""
            SELECT coalesce(r.domain, 'unknown'), count(*),
                   count(*) FILTER (WHERE d.pass_rate <= 0 OR d.pass_rate >= 1)
            FROM {SILVER_RL_DIFFICULTY.qualified} d JOIN silver.records r USING (id) GROUP BY ALL ORDER BY ALL
            """
        ).fetchall()
        unestimated = conn.execute(
            f"SELECT count(*) FROM {GOLD_RL_PROMPTS.qualified} WHERE NOT difficulty_estimated"
        ).fetchone()[0]
        in_gold_outside = conn.execute(
            f"SELECT count(*) FROM {GOLD_RL_PROMPTS.qualified} WHERE pass_rate <= 0 OR pass_rate >= 1"
        ).fetchone()[0]
        histogram = conn.execute(
            f"""
            SELECT floor(difficulty * 4) / 4 AS bucket, count(*) FROM {GOLD_RL_PROMPTS.qualified}
            WHERE difficulty_estimated GROUP BY ALL ORDER BY ALL
            """
        ).fetchall()
    outside = sum(row[2] for row in estimated_all)
    metadata: dict[str, dg.MetadataValue] = {
        "in_gold_outside_band": dg.MetadataValue.int(in_gold_outside),
        "unestimated_seeds": dg.MetadataValue.int(unestimated),
        "estimated_outside_band": dg.MetadataValue.int(outside),
        "per_domain": dg.MetadataValue.md(
            markdown_table(["domain", "estimated", "outside (0, 1) band, left out of gold"], estimated_all)
        ),
        "histogram": dg.MetadataValue.md(
            markdown_table(["difficulty from", "seeds in gold"], [(f"{b:.2f}", n) for b, n in histogram])
        ),
        **{f"difficulty_bucket/{b:.2f}": dg.MetadataValue.int(n) for b, n in histogram},
    }
    return dg.AssetCheckResult(
        passed=in_gold_outside == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{in_gold_outside} seed(s) in gold that the policy always or never solves; {outside} estimated "
        f"seed(s) outside the band left out of gold; {unestimated} seed(s) not estimated yet",
        metadata=metadata,
    )
