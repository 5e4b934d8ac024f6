"""The RL prompt bank's silver stages: certify every seed's verifier, and estimate difficulty from real rollouts.

silver.rl_certification: each seed's verifier must score the gold answer 1.0 in 3 separate processes and a
perturbed wrong answer 0.0; seeds that fail stay out of gold with the reason.
silver.rl_difficulty: K samples per prompt from a real small policy (SmolLM2-135M-Instruct, optional extra
``policy``), scored by the seed's verifier; incremental per lineage. The default run config samples nothing
(``max_prompts=0``), so the routine refresh stays fast and torch-free; the ``estimate_rl_difficulty`` job
samples as many pending prompts as its token budget allows each time it runs, and reports its tokens/s.
"""

import datetime as dt
import json
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
from dagster_duckdb import DuckDBResource

from posttrain_assets import settings
from posttrain_assets.defs.metadata import markdown_table, table_metadata
from posttrain_assets.defs.resources import TokenizerResource
from posttrain_assets.defs.silver.canonical import SILVER_RECORDS_KEY
from posttrain_assets.defs.silver.common import SILVER_AUTOMATION
from posttrain_assets.rl.certification_stage import BATCH_ROWS, STAGE, CertificationSettings, build_rl_certification
from posttrain_assets.rl.verifiers import VERIFIER_VERSIONS
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS, SILVER_RL_CERTIFICATION, SILVER_RL_DIFFICULTY
from posttrain_assets.warehouse.io import fetch_dicts, transaction

CERTIFICATION_KEY = dg.AssetKey(["silver", "rl_certification"])
DIFFICULTY_KEY = dg.AssetKey(["silver", "rl_difficulty"])

CERTIFIED_SEEDS = f"""
FROM {SILVER_RECORDS.qualified} r JOIN {SILVER_RL_CERTIFICATION.qualified} c USING (id)
WHERE c.certified
"""
# The certified seeds without an estimate for their lineage, in id order; ``$verifiers`` / ``$lineages``: each
# verifier's lineage (rollouts.seed_lineage: the lineage depends on the seed's verifier only). Counted and limited in
# DuckDB, so only the run's batch reaches Python: reading every seed to find none to sample took 4.2 s of each
# refresh at 1M rows, with sampling off (max_prompts 0, the default).
PENDING_SEEDS = f"""
SELECT r.id, r.messages, r.answer, r.verifier, r.tests
{CERTIFIED_SEEDS}
  AND NOT EXISTS (
    SELECT 1 FROM {SILVER_RL_DIFFICULTY.qualified} d
    WHERE d.id = r.id AND d.lineage = $lineages[list_position($verifiers, r.verifier)]
  )
ORDER BY r.id
"""
FAILURES_BY_REASON = (
    f"SELECT reason, count(*) FROM {SILVER_RL_CERTIFICATION.qualified} WHERE NOT certified GROUP BY ALL ORDER BY ALL"
)


class CertificationConfig(dg.Config):
    """``runs`` and ``timeout_seconds`` decide verdicts (they are in the stage key); ``workers`` (processes per run)
    and ``batch_rows`` (seeds per cache transaction) do not. ``full_rebuild`` (or POSTTRAIN_FULL_REBUILD=1):
    certify every seed again instead of reusing earlier runs' verdicts."""

    runs: int = 3
    workers: int = 2
    timeout_seconds: float = 10.0
    batch_rows: int = BATCH_ROWS
    full_rebuild: bool = False


@dg.asset(
    key=CERTIFICATION_KEY,
    deps=[SILVER_RECORDS_KEY],
    group_name="silver",
    kinds={"duckdb"},
    pool="duckdb",
    automation_condition=SILVER_AUTOMATION,
    description=SILVER_RL_CERTIFICATION.description,
)
def silver_rl_certification(
    context: dg.AssetExecutionContext, config: CertificationConfig, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """Certify the seeds whose (content, stage key) is new; every other verdict comes from the certification cache
    (posttrain_assets.rl.certification_stage)."""

    def progress(done: int, total: int) -> None:
        context.log.info(f"certified {done}/{total} RL seeds ({config.runs} runs, separate processes)")

    with duckdb.get_connection() as conn:
        reuse = build_rl_certification(
            conn,
            CertificationSettings(runs=config.runs, timeout_seconds=config.timeout_seconds),
            workers=config.workers,
            batch_rows=config.batch_rows,
            reuse=not (config.full_rebuild or settings.full_rebuild()),
            progress=progress,
        )
        failures = dict(conn.execute(FAILURES_BY_REASON).fetchall())
        metadata = table_metadata(
            conn,
            SILVER_RL_CERTIFICATION,
            preview_columns=["id", "verifier", "certified", "reason"],
            group_by="verifier",
        )
    context.log.info(f"certified {reuse.computed} RL seeds now, reused {reuse.reused} verdicts")
    metadata.update(
        {
            "certified": dg.MetadataValue.int(reuse.computed + reuse.reused - sum(failures.values())),
            "failed": dg.MetadataValue.int(sum(failures.values())),
            "failures_by_reason": dg.MetadataValue.json(failures),
            "verifier_versions": dg.MetadataValue.json(VERIFIER_VERSIONS),
            **{k: dg.MetadataValue.int(v) for k, v in reuse.metadata(STAGE).items()},
        }
    )
    return dg.MaterializeResult(metadata=metadata)


class RolloutConfig(dg.Config):
    """How difficulty is sampled. One run samples at most ``max_prompts`` prompts (0: none, the default, so the
    refresh never samples) and, when ``token_budget`` is set, at most ``token_budget // (k * max_new_tokens)``
    of them (the budget counts every sample at its longest). ``backend``: ``torch`` (CPU, extra ``policy``) or
    ``vllm`` (extra ``vllm``, needs a GPU); empty: ``POSTTRAIN_POLICY_BACKEND`` (``torch`` when unset). With
    ``POSTTRAIN_EXECUTOR=ray`` the prompts are spread over the cluster's nodes (one policy actor per node).
    ``max_rows``: prompts x K decoded together by the torch backend (speed and memory only: the ids do not depend
    on it, nor on ``batch_size``, the prompts per backend call)."""

    max_prompts: int = 0
    token_budget: int = 0
    k: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 16
    backend: str = ""
    max_rows: int = 128


def prompts_this_run(config: RolloutConfig) -> int:
    """How many pending prompts one run samples: ``max_prompts``, lowered to what ``token_budget`` allows."""
    if config.token_budget <= 0:
        return max(config.max_prompts, 0)
    return max(min(config.max_prompts, config.token_budget // (config.k * config.max_new_tokens)), 0)


@dg.asset(
    key=DIFFICULTY_KEY,
    deps=[CERTIFICATION_KEY],
    group_name="silver",
    kinds={"duckdb", "torch"},
    pool="duckdb",
    description=SILVER_RL_DIFFICULTY.description,
)
def silver_rl_difficulty(
    context: dg.AssetExecutionContext, config: RolloutConfig, duckdb: DuckDBResource, tokenizer: TokenizerResource
) -> dg.MaterializeResult:
    """Sample up to ``max_prompts`` certified seeds that have no estimate for this lineage yet."""
    from posttrain_assets.rl.rollouts import SamplingParams, default_policy, seed_lineage

    policy = default_policy(Path(tokenizer.cache_dir), backend=config.backend or settings.policy_backend())
    sampling = SamplingParams(
        k=config.k,
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
    )
    with duckdb.get_connection() as conn:
        conn.execute(SILVER_RL_DIFFICULTY.create_sql())
        verifiers = [v for (v,) in conn.execute(f"SELECT DISTINCT r.verifier {CERTIFIED_SEEDS}").fetchall()]
        waiting, batch = 0, []
        if verifiers:
            lineages = {
                "verifiers": verifiers,
                "lineages": [seed_lineage({"verifier": v}, policy, sampling) for v in verifiers],
            }
            (waiting,) = conn.execute(f"SELECT count(*) FROM ({PENDING_SEEDS})", lineages).fetchone()
            if limit := prompts_this_run(config):
                batch = fetch_dicts(conn, f"{PENDING_SEEDS} LIMIT $limit", {**lineages, "limit": limit})
    context.log.info(f"{waiting} certified seeds lack an estimate for this lineage; sampling {len(batch)} now")
    estimates = []
    seconds = 0.0
    if batch:
        from posttrain_assets.rl.rollouts import estimate_difficulty, policy_backend

        def progress(done: int, total: int) -> None:
            context.log.info(f"rollouts: {done}/{total} prompts")

        started = time.perf_counter()
        backend = policy_backend(policy, tokenizer.get(), max_rows=config.max_rows)
        try:
            estimates = estimate_difficulty(
                batch,
                policy,
                sampling,
                tokenizer=tokenizer.get(),
                batch_size=config.batch_size,
                progress=progress,
                backend=backend,
            )
        finally:
            close = getattr(backend, "close", None)  # the Ray backend's actors hold a model per node
            if close is not None:
                close()
        seconds = time.perf_counter() - started
    sampled_tokens = sum(e.sampled_tokens for e in estimates)
    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "id": e.id,
            "lineage": e.lineage,
            "model": e.model,
            "model_sha256": e.model_sha256,
            "sampling": json.dumps(e.sampling, sort_keys=True),
            "verifier": e.verifier,
            "verifier_version": e.verifier_version,
            "k": e.k,
            "passes": e.passes,
            "pass_rate": e.pass_rate,
            "difficulty": e.difficulty,
            "truncated": e.truncated,
            "estimated_at": now,
        }
        for e in estimates
    ]
    with duckdb.get_connection() as conn:
        if rows:
            with transaction(conn):
                conn.register("estimates", pa.Table.from_pylist(rows))
                conn.execute(
                    f"DELETE FROM {SILVER_RL_DIFFICULTY.qualified} t USING estimates e "
                    "WHERE t.id = e.id AND t.lineage = e.lineage"
                )
                conn.execute(SILVER_RL_DIFFICULTY.insert_sql("estimates"))
                conn.unregister("estimates")
        metadata = table_metadata(conn, SILVER_RL_DIFFICULTY, preview_columns=["id", "k", "passes", "difficulty"])
    metadata.update(
        {
            "sampled_now": dg.MetadataValue.int(len(rows)),
            "sampled_tokens": dg.MetadataValue.int(sampled_tokens),
            "tokens_per_second": dg.MetadataValue.float(round(sampled_tokens / seconds, 1) if seconds else 0.0),
            "backend": dg.MetadataValue.text(policy.backend),
            "pending_after": dg.MetadataValue.int(waiting - len(batch)),
            "model": dg.MetadataValue.text(policy.name),
            "model_sha256": dg.MetadataValue.text(policy.model_sha256),
            "sampling": dg.MetadataValue.json(sampling.as_dict()),
            "estimates": dg.MetadataValue.md(
                markdown_table(
                    ["id", "passes", "k", "difficulty"],
                    [(r["id"], r["passes"], r["k"], r["difficulty"]) for r in rows[:20]],
                )
            ),
        }
    )
    return dg.MaterializeResult(metadata=metadata)
