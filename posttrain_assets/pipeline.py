"""Run the whole graph from code (the CLI and tests use this), and read back what it produced."""

from __future__ import annotations

import os
from collections.abc import Iterable

import dagster as dg
import duckdb

from posttrain_assets.registry import load_registry

LAYER_TABLES = (
    "bronze.records",
    "silver.records",
    "silver.eval_records",
    "silver.quarantine",
    "silver.dedup_clusters",
    "silver.sft_tokenized",
    "gold.sft",
    "gold.preference",
    "gold.rl_prompts",
)


def load_definitions() -> dg.Definitions:
    from posttrain_assets.definitions import defs

    return defs()


def sync_source_partitions(instance: dg.DagsterInstance, names: Iterable[str]) -> None:
    """Make the bronze partitions exactly the registry's sources."""
    wanted = list(names)
    current = set(instance.get_dynamic_partitions("source"))
    missing = [n for n in wanted if n not in current]
    if missing:
        instance.add_dynamic_partitions("source", missing)
    for stale in current - set(wanted):
        instance.delete_dynamic_partition("source", stale)


# Runs print warnings and errors; the full event log is in the Dagster UI (`make dev`).
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def run_all(
    instance: dg.DagsterInstance | None = None, definitions: dg.Definitions | None = None, *, verbose: bool = False
) -> None:
    """Ingest every registry source into bronze, then rebuild silver and gold with every check.

    Raises if any step fails or a blocking check fails (gold is then left as it was).
    """
    instance = instance or dg.DagsterInstance.get()
    definitions = definitions or load_definitions()
    registry = load_registry(os.environ["POSTTRAIN_SOURCES"])
    sync_source_partitions(instance, registry.names)
    run_config = {} if verbose else QUIET
    ingest = definitions.resolve_job_def("ingest_source")
    for name in registry.names:
        ingest.execute_in_process(instance=instance, partition_key=name, run_config=run_config)
        print(f"ingested {name}")
    result = definitions.resolve_job_def("refresh_corpus").execute_in_process(instance=instance, run_config=run_config)
    for evaluation in result.get_asset_check_evaluations():
        verdict = "passed" if evaluation.passed else "FAILED"
        print(
            f"check {evaluation.asset_key.to_user_string()}:{evaluation.check_name} {verdict}: {evaluation.description}"
        )


def layer_counts(database: str) -> list[tuple[str, int | None]]:
    """Row count of every platform table (None where a table does not exist yet)."""
    with duckdb.connect(database, read_only=True) as conn:
        existing = {
            f"{s}.{t}"
            for s, t in conn.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall()
        }
        return [
            (name, conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0] if name in existing else None)
            for name in LAYER_TABLES
        ]


def format_counts(counts: list[tuple[str, int | None]]) -> str:
    width = max(len(name) for name, _ in counts)
    lines = ["rows per table:"]
    lines += [f"  {name:<{width}}  {'-' if n is None else f'{n:>8,}'}" for name, n in counts]
    return "\n".join(lines)


def show_mask(database: str, record_id: str, *, color: bool = False) -> str:
    """One tokenised SFT row with its trained spans marked, for debugging a template."""
    from pathlib import Path

    from posttrain_assets.masking import render_mask
    from posttrain_assets.tokenizer import load_tokenizer

    with duckdb.connect(database, read_only=True) as conn:
        rows = conn.execute(
            "SELECT id, source, input_ids, labels, num_trainable_tokens, chat_template_sha256 "
            "FROM silver.sft_tokenized WHERE starts_with(id, ?) ORDER BY id LIMIT 2",
            [record_id],
        ).fetchall()
    if not rows:
        raise SystemExit(f"no tokenised SFT row with id starting {record_id!r}")
    if len(rows) > 1:
        raise SystemExit(f"id prefix {record_id!r} is ambiguous: {rows[0][0]}, {rows[1][0]}, ...")
    ((row_id, source, input_ids, labels, trained, template_sha),) = rows
    tok = load_tokenizer(os.environ["POSTTRAIN_TOKENIZER"], Path(os.environ["POSTTRAIN_CACHE_DIR"]))
    header = f"{row_id} ({source}): {len(input_ids)} tokens, {trained} trained, template {template_sha[:12]}"
    legend = "trained spans are green" if color else "trained spans are inside ⟦ ⟧"
    return f"{header}; {legend}\n\n{render_mask(tok, input_ids, labels, color=color)}"
