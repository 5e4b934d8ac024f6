"""Publish: the provenance view over every gold table, and the trainer-ready exports.

Run as their own job after a refresh: a gold table held back by its gate (say gold.preference past a failed
length_confound_check) must not stop the others from being traced and exported; a held-back table that was
never written is skipped and its card says so.
"""

import datetime as dt
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets import settings
from posttrain_assets.defs.metadata import markdown_table
from posttrain_assets.defs.resources import SourceRegistryResource, TokenizerResource
from posttrain_assets.publish.exports import export_gold
from posttrain_assets.publish.trace import GOLD_TABLES, create_trace_view, gold_tables, trace_row_counts
from posttrain_assets.warehouse.verdicts import latest_verdicts

GOLD_KEYS = [dg.AssetKey(t.split(".")) for t in GOLD_TABLES]
TRACE_KEY = dg.AssetKey(["gold", "trace"])
EXPORTS_KEY = dg.AssetKey(["exports", "trainer_files"])

# Publish whenever gold changed; unlike gold itself, not every upstream table has to exist.
PUBLISH_AUTOMATION = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())


@dg.asset(
    key=TRACE_KEY,
    deps=GOLD_KEYS,
    group_name="publish",
    kinds={"duckdb"},
    pool="duckdb",
    automation_condition=PUBLISH_AUTOMATION,
    description="gold.trace: one row per gold row with its silver row, bronze row (file, row number, sha256s), source, "
    "license, origin and the duplicates that collapsed onto it. `posttrain trace ID` prints the same chain.",
)
def gold_trace(duckdb: DuckDBResource) -> dg.MaterializeResult:
    with duckdb.get_connection() as conn:
        create_trace_view(conn)
        tables = gold_tables(conn)
        counts = trace_row_counts(conn)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(sum(n for _, n in counts)),
            "gold_tables": dg.MetadataValue.json(tables),
            "rows_by_table": dg.MetadataValue.md(markdown_table(["gold table", "rows"], counts)),
        }
    )


class ExportsConfig(dg.Config):
    """Where to write (empty: an ``exports`` folder next to the DuckDB file)."""

    out_dir: str = ""


@dg.asset(
    key=EXPORTS_KEY,
    deps=[TRACE_KEY],
    group_name="publish",
    kinds={"parquet", "json"},
    pool="duckdb",
    automation_condition=dg.AutomationCondition.eager(),
    description="Every gold table as Parquet and JSONL in the layouts trainers read as they are (TRL SFT with "
    "input_ids/labels, TRL preference, verl RL with its reward.py), each with a dataset card (counts, sources and "
    "licenses, checks, tokenizer and template hashes, the trainer settings to use). RL prompts get their source's "
    "answer-format instruction (registry answer_format). Files are sharded by source; a refresh rewrites only the "
    "shards whose rows changed (fingerprints in manifest.json) and re-hashes only kept files whose size or mtime "
    "changed.",
)
def exports_trainer_files(
    config: ExportsConfig, duckdb: DuckDBResource, tokenizer: TokenizerResource, registry: SourceRegistryResource
) -> dg.MaterializeResult:
    out_dir = Path(config.out_dir) if config.out_dir else Path(duckdb.database).resolve().parent / "exports"
    answer_formats = {s.name: s.answer_format for s in registry.load().sources if s.answer_format is not None}
    with duckdb.get_connection() as conn:
        manifest = export_gold(
            conn,
            out_dir,
            tokenizer_identity=tokenizer.identity(),
            checks=latest_verdicts(conn),
            created_at=dt.datetime.now(dt.UTC),
            answer_formats=answer_formats,
            # This machine's size/mtime record of the data files: a kept shard is not read again to prove it.
            stat_cache=Path(tokenizer.cache_dir),
            # A full rebuild (posttrain run --full) distrusts the record too: every kept file is hashed.
            rehash=settings.full_rebuild(),
        )
    rows = [
        (t.name, t.table, t.layout, t.rows, len(t.shards), len(t.written) // 2, t.rows_written) for t in manifest.tables
    ]
    header = ["folder", "gold table", "layout", "rows", "shards", "shards written", "rows written"]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out_dir)),
            "exports": dg.MetadataValue.md(markdown_table(header, rows)),
            "skipped": dg.MetadataValue.json(list(manifest.skipped)),
            **{f"rows/{t.name}": dg.MetadataValue.int(t.rows) for t in manifest.tables},
            # A refresh writes only the shards whose rows changed; the others are kept as they were.
            "rows_written": dg.MetadataValue.int(sum(t.rows_written for t in manifest.tables)),
            "rows_reused": dg.MetadataValue.int(sum(t.rows - t.rows_written for t in manifest.tables)),
            # Kept files hashed again (no stat record, or their size or mtime changed): 0 when nothing changed.
            "files_hashed": dg.MetadataValue.int(sum(t.files_hashed for t in manifest.tables)),
        }
    )
