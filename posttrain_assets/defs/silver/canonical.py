"""Silver: bronze rows normalised into the canonical schema, then the one shared cleaning pass (quality gate,
decontamination, dedup, cross-regime leaks); quarantine and duplicate tables keep every row that does not go on."""

import datetime as dt
import json
import os
from typing import Literal

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets import settings
from posttrain_assets.cleaning.dedup import MinHashConfig
from posttrain_assets.cleaning.quality import QualityConfig
from posttrain_assets.cleaning.silver_pass import CleaningConfig, run_silver_pass
from posttrain_assets.defs.metadata import column_lineage, markdown_table, table_metadata
from posttrain_assets.defs.resources import SourceRegistryResource, TokenizerResource
from posttrain_assets.defs.silver.common import silver_spec
from posttrain_assets.parallel import default_processes
from posttrain_assets.records.schema import DEFAULT_MAX_ROW_BYTES
from posttrain_assets.warehouse.bronze import ensure_bronze
from posttrain_assets.warehouse.catalogue import (
    BRONZE_RECORDS,
    SILVER_CONTAMINATION,
    SILVER_CROSS_REGIME_LEAKS,
    SILVER_DEDUP_CLUSTERS,
    SILVER_EVAL_RECORDS,
    SILVER_QUARANTINE,
    SILVER_RECORDS,
)

BRONZE_KEY = dg.AssetKey(["bronze", "records"])
SILVER_RECORDS_KEY = dg.AssetKey(["silver", "records"])
SILVER_EVAL_KEY = dg.AssetKey(["silver", "eval_records"])
SILVER_QUARANTINE_KEY = dg.AssetKey(["silver", "quarantine"])
SILVER_DEDUP_KEY = dg.AssetKey(["silver", "dedup_clusters"])
SILVER_CONTAMINATION_KEY = dg.AssetKey(["silver", "contamination"])
SILVER_LEAKS_KEY = dg.AssetKey(["silver", "cross_regime_leaks"])

QUARANTINE_BY_STAGE = f"SELECT stage, count(*) FROM {SILVER_QUARANTINE.qualified} GROUP BY ALL ORDER BY ALL"


# Content columns come from the raw payload; provenance columns from the bronze row's own columns.
_PROVENANCE_FROM_BRONZE = {
    "source": ["source"],
    "origin": ["source", "file_path", "row_number", "record_sha256", "file_sha256"],
    "created_at": ["file_path"],
}
RECORDS_LINEAGE = column_lineage(
    {
        c.name: [(BRONZE_KEY, name) for name in _PROVENANCE_FROM_BRONZE.get(c.name, ["payload"])]
        for c in SILVER_RECORDS.columns
    }
)


def _file_mtime(path: str) -> dt.datetime:
    """A landing file's created_at: its modification time now (not cached: a code server lives across runs, and a
    rewritten file must not keep its old time)."""
    return dt.datetime.fromtimestamp(os.stat(path).st_mtime, dt.UTC)


class CleaningPassConfig(dg.Config):
    """The shared cleaning pass (documented defaults; see posttrain_assets.cleaning.silver_pass)."""

    license_policy: Literal["any", "commercial"] = "any"
    allowed_languages: list[str] = ["en"]
    min_language_confidence: float = 0.5
    refusal_in_sft: bool = True
    refusal_in_preference_chosen: bool = False
    # tool calls: most per assistant turn, and whether each must name a tool of the row's tools (docs/cleaning.md)
    max_parallel_tool_calls: int = 16
    require_declared_tools: bool = True
    shingle_words: int = 5
    rl_shingle_words: int = 1
    num_perm: int = 128
    jaccard_threshold: float = 0.7
    decontamination_ngram: int = 13
    leak_policy: Literal["report", "prefer_rl"] = "report"
    # worker processes for parsing, the quality gate, token counts and MinHash signatures; 0: one per core
    processes: int = 0
    # bronze rows longer than this (UTF-8 bytes) are quarantined as too_large without being parsed
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
    # True: parse and gate every bronze row again instead of reading earlier runs' results from the gate cache
    # (so does POSTTRAIN_FULL_REBUILD=1 for every cached stage)
    full_rebuild: bool = False

    def cleaning(self) -> CleaningConfig:
        def minhash(words: int) -> MinHashConfig:
            return MinHashConfig(shingle_words=words, num_perm=self.num_perm, threshold=self.jaccard_threshold)

        return CleaningConfig(
            quality=QualityConfig(
                allowed_languages=frozenset(self.allowed_languages) if self.allowed_languages else None,
                min_language_confidence=self.min_language_confidence,
                license_policy=self.license_policy,
                refusal_in_sft=self.refusal_in_sft,
                refusal_in_preference_chosen=self.refusal_in_preference_chosen,
                max_parallel_tool_calls=self.max_parallel_tool_calls,
                require_declared_tools=self.require_declared_tools,
            ),
            minhash={
                "sft": minhash(self.shingle_words),
                "preference": minhash(self.shingle_words),
                "rl": minhash(self.rl_shingle_words),
            },
            decontamination_ngram=self.decontamination_ngram,
            leak_policy=self.leak_policy,
            processes=self.processes or default_processes(),
            max_row_bytes=self.max_row_bytes,
            reuse=not (self.full_rebuild or settings.full_rebuild()),
        )


@dg.multi_asset(
    specs=[
        silver_spec(SILVER_RECORDS_KEY, SILVER_RECORDS, [BRONZE_KEY]),
        silver_spec(SILVER_EVAL_KEY, SILVER_EVAL_RECORDS, [BRONZE_KEY]),
        silver_spec(SILVER_QUARANTINE_KEY, SILVER_QUARANTINE, [BRONZE_KEY]),
        silver_spec(SILVER_DEDUP_KEY, SILVER_DEDUP_CLUSTERS, [BRONZE_KEY]),
        silver_spec(SILVER_CONTAMINATION_KEY, SILVER_CONTAMINATION, [BRONZE_KEY]),
        silver_spec(SILVER_LEAKS_KEY, SILVER_CROSS_REGIME_LEAKS, [BRONZE_KEY]),
    ],
    pool="duckdb",
)
def silver_canonical(
    context: dg.AssetExecutionContext,
    config: CleaningPassConfig,
    duckdb: DuckDBResource,
    registry: SourceRegistryResource,
    tokenizer: TokenizerResource,
):
    """Normalise every bronze row into the canonical schema, then run the one shared cleaning pass.

    Every bronze row ends in exactly one place: silver.records, silver.eval_records, silver.quarantine
    (with the stage and reason) or silver.dedup_clusters (with its kept twin).
    """
    sources = registry.load()
    with duckdb.get_connection() as conn:
        ensure_bronze(conn)
        orphans = conn.execute(
            f"SELECT DISTINCT source FROM {BRONZE_RECORDS.qualified} WHERE NOT list_contains($sources, source)",
            {"sources": sources.names},
        ).fetchall()
        if orphans:
            context.log.warning(f"bronze partitions not in the registry are ignored: {[o[0] for o in orphans]}")
        context.log.info(f"normalising and cleaning the bronze rows of {len(sources.names)} sources")
        result = run_silver_pass(conn, sources, tokenizer.get(), _file_mtime, config.cleaning())
        outputs = (
            (SILVER_RECORDS_KEY, SILVER_RECORDS, ["id", "source", "regime", "prompt"], "regime"),
            (SILVER_EVAL_KEY, SILVER_EVAL_RECORDS, ["id", "source", "prompt", "answer"], "source"),
            (SILVER_QUARANTINE_KEY, SILVER_QUARANTINE, ["source", "stage", "reason", "message"], "reason"),
            (SILVER_DEDUP_KEY, SILVER_DEDUP_CLUSTERS, ["kept_id", "source", "row_number", "method"], "method"),
            (SILVER_CONTAMINATION_KEY, SILVER_CONTAMINATION, ["id", "benchmark", "field"], "benchmark"),
            (SILVER_LEAKS_KEY, SILVER_CROSS_REGIME_LEAKS, ["prompt", "regimes"], None),
        )
        for key, table, preview, group_by in outputs:
            metadata = table_metadata(conn, table, preview_columns=preview, group_by=group_by)
            if key == SILVER_CONTAMINATION_KEY:
                metadata["report"] = dg.MetadataValue.md(contamination_markdown(result.contamination_report))
            if key == SILVER_QUARANTINE_KEY:
                stages = conn.execute(QUARANTINE_BY_STAGE).fetchall()
                metadata.update({f"stage/{k}": dg.MetadataValue.int(v) for k, v in stages})
            if key == SILVER_RECORDS_KEY:  # token_count was counted with this tokenizer and template
                metadata.update({f"tokenizer/{k}": dg.MetadataValue.text(v) for k, v in tokenizer.identity().items()})
                metadata["dagster/column_lineage"] = RECORDS_LINEAGE
                # Plottable per run: which stage of the pass a slow materialisation spent its time in.
                metadata.update(
                    {f"seconds/{name}": dg.MetadataValue.float(round(s, 3)) for name, s in result.stage_seconds.items()}
                )
                # What this run computed and what it read from the stage caches (warehouse.stage_cache).
                for stage, reuse in result.reuse.items():
                    metadata.update({k: dg.MetadataValue.int(v) for k, v in reuse.metadata(stage).items()})
            yield dg.MaterializeResult(asset_key=key, metadata=metadata)


def contamination_markdown(report: list[dict]) -> str:
    return markdown_table(
        ["benchmark", "eval rows", "eval rows hit", "training rows", "by source"],
        [
            (r["benchmark"], r["eval_rows"], r["eval_rows_hit"], r["training_rows"], json.dumps(r["by_source"]))
            for r in report
        ],
    )
