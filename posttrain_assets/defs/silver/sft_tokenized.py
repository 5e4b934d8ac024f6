"""silver.sft_tokenized: SFT conversations rendered with the chat template, tokenised, with assistant-only labels."""

from typing import Literal

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets import settings
from posttrain_assets.defs.metadata import column_lineage, table_metadata
from posttrain_assets.defs.resources import TokenizerResource
from posttrain_assets.defs.silver.canonical import SILVER_RECORDS_KEY
from posttrain_assets.defs.silver.common import silver_spec
from posttrain_assets.parallel import default_processes
from posttrain_assets.sft.batches import TokenizeJob, TokenizerIdentity
from posttrain_assets.sft.masking import MaskConfig
from posttrain_assets.sft.tokenize_stage import build_sft_tokenized
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS, SILVER_SFT_QUARANTINE, SILVER_SFT_TOKENIZED

SFT_TOKENIZED_KEY = dg.AssetKey(["silver", "sft_tokenized"])
SFT_QUARANTINE_KEY = dg.AssetKey(["silver", "sft_quarantine"])

SFT_ROW_COUNT = f"SELECT count(*) FROM {SILVER_RECORDS.qualified} WHERE regime = 'sft'"
BATCH_ROWS = 1024


class SftTokenizeConfig(dg.Config):
    """Mask rules. Trained: assistant contents and the end-of-turn marker closing each; for a turn with tool calls
    or reasoning, everything it writes after the generation prompt (reasoning per ``train_reasoning``: all, last
    assistant turn only, none); nothing else (docs/sft-masks.md)."""

    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    train_reasoning: Literal["all", "last", "none"] = "all"
    max_seq_len: int = 4096
    overflow: Literal["quarantine", "truncate"] = "quarantine"
    end_of_turn: str | None = None
    processes: int = 0  # worker processes that tokenise batches; 0: one per core this process may use
    # True: tokenise every row again instead of reading earlier runs' rows from the tokenize cache
    full_rebuild: bool = False

    def mask_config(self) -> MaskConfig:
        return MaskConfig(
            train_on=self.train_on,
            train_reasoning=self.train_reasoning,
            max_seq_len=self.max_seq_len,
            overflow=self.overflow,
            end_of_turn=self.end_of_turn,
        )


@dg.multi_asset(
    specs=[
        silver_spec(SFT_TOKENIZED_KEY, SILVER_SFT_TOKENIZED, [SILVER_RECORDS_KEY]),
        silver_spec(SFT_QUARANTINE_KEY, SILVER_SFT_QUARANTINE, [SILVER_RECORDS_KEY]),
    ],
    pool="duckdb",
)
def silver_sft_tokenized(
    context: dg.AssetExecutionContext,
    config: SftTokenizeConfig,
    duckdb: DuckDBResource,
    tokenizer: TokenizerResource,
):
    """Tokenise every SFT row in batches; rows without an exact mask go to silver.sft_quarantine."""
    identity = tokenizer.identity()
    job = TokenizeJob(
        TokenizerIdentity(tokenizer.get(), identity["tokenizer_sha256"], identity["chat_template_sha256"]),
        config.mask_config(),
    )
    with duckdb.get_connection() as conn:
        (rows,) = conn.execute(SFT_ROW_COUNT).fetchone()
        processes = config.processes or default_processes()
        context.log.info(
            f"tokenising the SFT rows of {rows} not tokenised before with {identity['name']} (stage key: tokenizer, "
            f"template, mask config, code), {BATCH_ROWS} at a time in id order, in up to {processes} process(es)"
        )
        totals = build_sft_tokenized(
            conn,
            job,
            processes=processes,
            batch_rows=BATCH_ROWS,
            reuse=not (config.full_rebuild or settings.full_rebuild()),
            progress=lambda done: context.log.info(f"tokenised {done} SFT rows"),
        )
        identity_metadata = {f"tokenizer/{k}": dg.MetadataValue.text(v) for k, v in identity.items()}
        tokens, trained = totals.tokens, totals.trained
        yield dg.MaterializeResult(
            asset_key=SFT_TOKENIZED_KEY,
            metadata={
                **table_metadata(
                    conn,
                    SILVER_SFT_TOKENIZED,
                    preview_columns=["id", "source", "num_tokens", "num_trainable_tokens"],
                    group_by="source",
                ),
                **identity_metadata,
                "tokens": dg.MetadataValue.int(tokens),
                "trainable_tokens": dg.MetadataValue.int(trained),
                "trainable_share": dg.MetadataValue.float(trained / tokens if tokens else 0.0),
                "truncated_rows": dg.MetadataValue.int(totals.truncated),
                **{k: dg.MetadataValue.int(v) for k, v in totals.reuse.metadata("sft_tokenize").items()},
                "dagster/column_lineage": column_lineage(
                    {
                        "id": [(SILVER_RECORDS_KEY, "id")],
                        "source": [(SILVER_RECORDS_KEY, "source")],
                        **{
                            c: [(SILVER_RECORDS_KEY, "messages")]
                            for c in ("input_ids", "labels", "num_tokens", "num_trainable_tokens", "num_messages")
                        },
                    }
                ),
            },
        )
        yield dg.MaterializeResult(
            asset_key=SFT_QUARANTINE_KEY,
            metadata={
                **table_metadata(
                    conn, SILVER_SFT_QUARANTINE, preview_columns=["id", "reason", "message"], group_by="reason"
                ),
                **identity_metadata,
            },
        )
