"""gold.sft: conversations with input_ids and assistant-only labels, written only past loss_mask_check."""

import dagster as dg
from dagster_duckdb import DuckDBResource
from duckdb import DuckDBPyConnection

from posttrain_assets import settings
from posttrain_assets.defs.gold.projection import GOLD_AUTOMATION, sync_metadata
from posttrain_assets.defs.metadata import column_lineage, table_metadata
from posttrain_assets.defs.resources import TokenizerResource
from posttrain_assets.defs.silver.sft_tokenized import SFT_TOKENIZED_KEY
from posttrain_assets.sft.agentic_stats import ALL, AgenticStats, combined, markdown_agentic_table
from posttrain_assets.sft.row_stats import stats_from_rows, update_row_stats
from posttrain_assets.sft.turn_depth import TurnDepth, markdown_turn_depth_table
from posttrain_assets.warehouse.catalogue import GOLD_SFT, SILVER_RECORDS, SILVER_SFT_TOKENIZED
from posttrain_assets.warehouse.io import (
    stored_in_key_order,
    stored_rows_with_keys,
    sync_table,
    transaction,
    trusted_fingerprints,
)

SILVER_KEY = dg.AssetKey(["silver", "records"])
FROM_TOKENIZED = {c.name for c in SILVER_SFT_TOKENIZED.columns}
# Rows per sorted id range: token lists of up to max_seq_len ids each, so a range stays far below DuckDB's cap.
GOLD_SFT_RANGE_ROWS = 8192
# Turn-depth statistics plotted per source (and for the whole table, "all") across materialisations.
PLOTTED_TURN_DEPTH = ("multi_turn_share", "mean_turns", "tokens_per_turn_mean", "rows")


def turn_depth_metadata(by_source: dict[str, TurnDepth], overall: dict[str, TurnDepth]) -> dict[str, dg.MetadataValue]:
    """Turn depth of gold.sft as metadata the UI plots: a table, each group's histogram, and floats per group."""
    depths = {**by_source, **overall}
    metadata: dict[str, dg.MetadataValue] = {
        "turn_depth": dg.MetadataValue.md(markdown_turn_depth_table(depths)),
        "turns_histogram": dg.MetadataValue.json({name: d.turns_histogram for name, d in depths.items()}),
    }
    for name, d in depths.items():
        for field in PLOTTED_TURN_DEPTH:
            value = getattr(d, field)
            if value is not None:
                metadata[f"turn_depth/{name}/{field}"] = dg.MetadataValue.float(float(value))
    return metadata


# Agentic statistics plotted per source (and "all") across materialisations.
PLOTTED_AGENTIC = ("tools_share", "tool_calls", "reasoning_share")


def agentic_metadata(
    by_source: dict[str, AgenticStats], overall: dict[str, AgenticStats]
) -> dict[str, dg.MetadataValue]:
    """Tool use and reasoning of gold.sft as metadata: a table, each group's tool-calls-per-turn histogram, floats."""
    stats = {**by_source, **overall}
    metadata: dict[str, dg.MetadataValue] = {
        "agentic": dg.MetadataValue.md(markdown_agentic_table(stats)),
        "tool_calls_per_turn_histogram": dg.MetadataValue.json(
            {name: s.calls_per_turn_histogram for name, s in stats.items()}
        ),
        "reasoning_vs_answer_tokens": dg.MetadataValue.json(
            {name: {"reasoning": s.reasoning_tokens, "answer": s.answer_tokens} for name, s in stats.items()}
        ),
    }
    for name, s in stats.items():
        for field in PLOTTED_AGENTIC:
            value = getattr(s, field)
            if value is not None:
                metadata[f"agentic/{name}/{field}"] = dg.MetadataValue.float(float(value))
    return metadata


def upstream_fingerprints(conn: DuckDBPyConnection) -> str | None:
    """A query giving each gold.sft row (``sync_key``) a fingerprint made of its silver.sft_tokenized and
    silver.records rows' stored fingerprints, which change whenever either row does: reading them costs a pass over
    narrow tables where hashing the joined rows (messages, input_ids, labels) cost 3.8-4.0 s of gold.sft's 9 s refresh
    on the 100k copy. None (the rows are hashed) when either table's fingerprints are not trusted."""
    tokenized = trusted_fingerprints(conn, SILVER_SFT_TOKENIZED)
    records = trusted_fingerprints(conn, SILVER_RECORDS)
    if tokenized is None or records is None:
        return None
    return (
        f"SELECT t.id AS sync_key, hash(ft.sync_fingerprint, fr.sync_fingerprint) AS sync_fingerprint "
        f"FROM {SILVER_SFT_TOKENIZED.qualified} t JOIN {tokenized} ft ON ft.sync_key = t.id "
        f"JOIN {records} fr ON fr.sync_key = t.id WHERE t.num_trainable_tokens > 0"
    )


def proven_rows(keys: str | None = None) -> str:
    """Each tokenised row with trained tokens joined with its silver record (gold.sft's rows); with ``keys`` (a
    table with column ``sync_key``) those with these ids only, both tables' rows fetched by rowid first
    (``io.stored_rows_with_keys``: 0.1 s for a refresh's 5,336 rows at 1M where filtering the join took 2.3 s)."""
    select = ", ".join(f't."{c}"' if c in FROM_TOKENIZED else f'r."{c}"' for c in GOLD_SFT.column_names)
    tokenized, records = SILVER_SFT_TOKENIZED.qualified, SILVER_RECORDS.qualified
    if keys is not None:
        tokenized, records = (f"({stored_rows_with_keys(t, keys)})" for t in (tokenized, records))
    return f"SELECT {select} FROM {tokenized} t JOIN {records} r USING (id) WHERE t.num_trainable_tokens > 0"


@dg.asset(
    key=["gold", "sft"],
    deps=[SFT_TOKENIZED_KEY, SILVER_KEY],
    group_name="gold",
    kinds={"duckdb"},
    pool="duckdb",
    automation_condition=GOLD_AUTOMATION,
    description=GOLD_SFT.description,
)
def gold_sft(duckdb: DuckDBResource, tokenizer: TokenizerResource) -> dg.MaterializeResult:
    """Join each proven tokenised row with its silver record; rows with no trained token never reach gold. Only the
    rows that changed since the last materialisation are deleted or inserted (io.sync_table)."""
    proven = proven_rows()
    with duckdb.get_connection() as conn:
        # while both silver tables are stored in id order, each id range of a (first) build is read by its own
        # query; the commit checkpoints rather than writing the token lists to the WAL first
        with transaction(conn, checkpoint=True):
            counts = sync_table(
                conn,
                GOLD_SFT,
                proven,
                "id",
                GOLD_SFT_RANGE_ROWS,
                # a sync appends new rows after the kept ones: the silver tables are in id order only until then
                key_ordered=lambda: all(stored_in_key_order(conn, t) for t in (SILVER_SFT_TOKENIZED, SILVER_RECORDS)),
                fingerprints=upstream_fingerprints(conn),
                trust_stored=not settings.full_rebuild(),
                rows_of_keys=proven_rows,
            )
            # each row's turn depth and agentic figures are kept beside it: only the rows inserted are read, and
            # the tokenizer is loaded only when one of them has reasoning to count
            computed = update_row_stats(conn, GOLD_SFT, tokenizer.get)
        metadata = table_metadata(
            conn, GOLD_SFT, preview_columns=["id", "source", "num_tokens", "num_trainable_tokens"], group_by="source"
        )
        depth, agentic = stats_from_rows(conn, GOLD_SFT)
        metadata.update(turn_depth_metadata(*depth))
        metadata.update(agentic_metadata(agentic, {ALL: combined(agentic.values())} if agentic else {}))
    metadata.update(sync_metadata(GOLD_SFT, counts))
    metadata["rows_computed/gold_sft_row_stats"] = computed
    metadata["dagster/column_lineage"] = column_lineage(
        {c: [(SFT_TOKENIZED_KEY if c in FROM_TOKENIZED else SILVER_KEY, c)] for c in GOLD_SFT.column_names}
    )
    metadata.update({f"tokenizer/{k}": dg.MetadataValue.text(v) for k, v in tokenizer.identity().items()})
    return dg.MaterializeResult(metadata=metadata)
