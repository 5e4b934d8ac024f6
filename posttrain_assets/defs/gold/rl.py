"""gold.rl_prompts: the RLVR prompt bank: certified seeds, curated to the pass-rate band where a policy learns.

A prompt the policy always solves (pass rate 1) or never solves (0) gives no gradient, so seeds with an
estimate outside the band are left out; seeds with no estimate yet are kept, flagged
``difficulty_estimated = false``, unless ``keep_unestimated`` is off.
"""

import dagster as dg
from dagster_duckdb import DuckDBResource
from duckdb import DuckDBPyConnection

from posttrain_assets import settings
from posttrain_assets.defs.gold.projection import (
    GOLD_AUTOMATION,
    PROJECTION_RANGE_ROWS,
    same_name_lineage,
    sync_metadata,
)
from posttrain_assets.defs.metadata import table_metadata
from posttrain_assets.defs.silver.canonical import SILVER_RECORDS_KEY
from posttrain_assets.defs.silver.rl import CERTIFICATION_KEY, DIFFICULTY_KEY
from posttrain_assets.warehouse.catalogue import (
    GOLD_RL_PROMPTS,
    SILVER_RECORDS,
    SILVER_RL_CERTIFICATION,
    SILVER_RL_DIFFICULTY,
)
from posttrain_assets.warehouse.io import (
    fingerprint_sql,
    stored_rows_with_keys,
    sync_table,
    transaction,
    trusted_fingerprints,
)


class DifficultyBandConfig(dg.Config):
    """Keep seeds whose pass rate is strictly inside (min_pass_rate, max_pass_rate)."""

    min_pass_rate: float = 0.0
    max_pass_rate: float = 1.0
    keep_unestimated: bool = True


def rl_bank(records: str = SILVER_RECORDS.qualified) -> str:
    """The bank's rows (named parameters: the difficulty band) from ``records``: silver.records, or a query of some
    of its rows (the changed rows fetched by rowid, ``io.stored_rows_with_keys``). Each seed with its latest
    difficulty estimate; a seed with none has null difficulty and is flagged."""
    return f"""
WITH latest AS (
    SELECT * FROM {SILVER_RL_DIFFICULTY.qualified}
    QUALIFY row_number() OVER (PARTITION BY id ORDER BY estimated_at DESC, lineage) = 1
)
SELECT r.id, r.source, r.source_kind, r.messages, r.prompt, r.answer, r.verifier,
       c.verifier_version, r.domain,
       l.difficulty, r.difficulty AS difficulty_source, l.pass_rate, l.k AS difficulty_k,
       l.lineage AS difficulty_lineage, l.id IS NOT NULL AS difficulty_estimated,
       r.token_count, r.lang, r.license, r.origin, r.created_at, r.source_ref, r.tests
FROM {records} r
JOIN {SILVER_RL_CERTIFICATION.qualified} c ON c.id = r.id AND c.certified
LEFT JOIN latest l ON l.id = r.id
WHERE r.regime = 'rl'
  AND CASE WHEN l.id IS NULL THEN $keep_unestimated
           ELSE l.pass_rate > $min_pass_rate AND l.pass_rate < $max_pass_rate END
"""


RL_BANK = rl_bank()

# The bank's columns that do not come from its silver.records row (every other one does).
NOT_FROM_RECORDS = frozenset(
    {"verifier_version", "difficulty", "pass_rate", "difficulty_k", "difficulty_lineage", "difficulty_estimated"}
)


def bank_fingerprints(conn: DuckDBPyConnection) -> str | None:
    """A query giving each row of the bank (``sync_key``) a fingerprint made of its silver.records row's stored
    fingerprint and the hash of its columns from the certification and difficulty tables (narrow): hashing the whole
    rows (messages, tests) cost 0.5-0.9 s of gold.rl_prompts' 1.2 s refresh on the 100k copy. None (the rows are
    hashed) when silver.records' fingerprints are not trusted."""
    records = trusted_fingerprints(conn, SILVER_RECORDS)
    if records is None:
        return None
    columns = [(c.name, c.type) for c in GOLD_RL_PROMPTS.columns if c.name in NOT_FROM_RECORDS]
    return (
        f"SELECT b.id AS sync_key, hash(f.sync_fingerprint, {fingerprint_sql(columns)}) AS sync_fingerprint "
        f"FROM ({RL_BANK}) b JOIN {records} f ON f.sync_key = b.id"
    )


@dg.asset(
    key=["gold", "rl_prompts"],
    deps=[SILVER_RECORDS_KEY, CERTIFICATION_KEY, DIFFICULTY_KEY],
    group_name="gold",
    kinds={"duckdb"},
    pool="duckdb",
    automation_condition=GOLD_AUTOMATION,
    description=GOLD_RL_PROMPTS.description,
)
def gold_rl_prompts(config: DifficultyBandConfig, duckdb: DuckDBResource) -> dg.MaterializeResult:
    """Bring gold.rl_prompts to the bank's rows: only seeds whose row changed are deleted or inserted."""
    band = {
        "keep_unestimated": config.keep_unestimated,
        "min_pass_rate": config.min_pass_rate,
        "max_pass_rate": config.max_pass_rate,
    }
    with duckdb.get_connection() as conn:
        conn.execute(SILVER_RL_DIFFICULTY.create_sql())  # no estimates yet is a valid state
        with transaction(conn, checkpoint=True):
            counts = sync_table(
                conn,
                GOLD_RL_PROMPTS,
                RL_BANK,
                "id",
                PROJECTION_RANGE_ROWS,
                band,
                fingerprints=bank_fingerprints(conn),
                trust_stored=not settings.full_rebuild(),
                rows_of_keys=lambda keys: rl_bank(f"({stored_rows_with_keys(SILVER_RECORDS.qualified, keys)})"),
            )
        metadata = table_metadata(conn, GOLD_RL_PROMPTS, preview_columns=["id", "source", "prompt"], group_by="source")
        estimated = conn.execute(
            f"SELECT count(*) FILTER (WHERE difficulty_estimated) FROM {GOLD_RL_PROMPTS.qualified}"
        ).fetchone()[0]
    metadata.update(sync_metadata(GOLD_RL_PROMPTS, counts))
    metadata["estimated_seeds"] = dg.MetadataValue.int(estimated)
    metadata["band"] = dg.MetadataValue.json(config.model_dump())
    metadata["dagster/column_lineage"] = same_name_lineage(GOLD_RL_PROMPTS, SILVER_RECORDS_KEY)
    return dg.MaterializeResult(metadata=metadata)
