"""loss_mask_check: proves every tokenised SFT row's labels before gold.sft may be written.

For each row it re-renders and re-tokenises the conversation and checks, independently of the
code that built the mask, that exactly the assistant contents and their end-of-turn markers are
trained (``posttrain_assets.masking.verify_mask``). A failure names the row ids and the first
wrong position; gold.sft then does not materialise.
"""

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.metadata import markdown_table
from posttrain_assets.defs.resources import TokenizerResource
from posttrain_assets.masking import MaskConfig, fresh_template_ids, verify_mask
from posttrain_assets.tables import SILVER_RECORDS, SILVER_SFT_TOKENIZED, ordered_batches

MAX_REPORTED = 20
BATCH_ROWS = 1024

ROWS_TO_VERIFY = f"""
SELECT t.id, t.source, r.messages, t.input_ids, t.labels, t.num_messages, t.train_on, t.end_of_turn,
       t.tokenizer_sha256, t.chat_template_sha256
FROM {SILVER_SFT_TOKENIZED.qualified} t JOIN {SILVER_RECORDS.qualified} r USING (id)
"""


@dg.asset_check(
    asset=["silver", "sft_tokenized"],
    blocking=True,
    pool="duckdb",
    additional_deps=[["silver", "records"]],
    description="Every row: only assistant contents + end markers trained, input_ids = fresh chat-template tokens.",
)
def loss_mask_check(duckdb: DuckDBResource, tokenizer: TokenizerResource) -> dg.AssetCheckResult:
    tok, identity = tokenizer.get(), tokenizer.identity()
    hashes = (identity["tokenizer_sha256"], identity["chat_template_sha256"])
    failures: list[tuple[str, str, str]] = []
    tokens_by_source: dict[str, list[int]] = {}
    checked = 0
    with duckdb.get_connection() as conn:
        orphans = conn.execute(
            f"SELECT count(*) FROM {SILVER_SFT_TOKENIZED.qualified} WHERE id NOT IN (SELECT id FROM "
            f"{SILVER_RECORDS.qualified})"
        ).fetchone()[0]
        # Streamed in id ranges: memory holds one batch of token lists, not the table.
        for batch in ordered_batches(conn, ROWS_TO_VERIFY, "id", BATCH_ROWS):
            rows = [tuple(row.values()) for row in batch]
            current = []
            for row in rows:
                if (row[8], row[9]) == hashes:
                    current.append(row)
                else:
                    failures.append((row[0], row[1], "tokenised with another tokenizer or template: rematerialise"))
            # one batched re-render and re-tokenisation (both cores) for the rows of this batch
            fresh = fresh_template_ids(tok, [messages[:n] for _, _, messages, _, _, n, *_ in current])
            for row, expected in zip(current, fresh, strict=True):
                record_id, source, messages, input_ids, labels, num_messages, train_on, eot, _, _ = row
                cfg = MaskConfig(train_on=train_on, end_of_turn=eot)
                problem = verify_mask(tok, messages, input_ids, labels, cfg, num_messages, expected)
                if problem:
                    failures.append((record_id, source, problem))
                counts = tokens_by_source.setdefault(source, [0, 0])
                counts[0] += len(input_ids)
                counts[1] += sum(1 for label in labels if label != -100)
            checked += len(rows)
    total = sum(c[0] for c in tokens_by_source.values())
    trained = sum(c[1] for c in tokens_by_source.values())
    metadata: dict[str, dg.MetadataValue] = {
        "rows_checked": dg.MetadataValue.int(checked),
        "rows_failed": dg.MetadataValue.int(len(failures)),
        "trainable_share": dg.MetadataValue.float(trained / total if total else 0.0),
        "failures": dg.MetadataValue.md(markdown_table(["id", "source", "problem"], failures[:MAX_REPORTED])),
        **{
            f"trainable_share/{source}": dg.MetadataValue.float(c[1] / c[0] if c[0] else 0.0)
            for source, c in sorted(tokens_by_source.items())
        },
    }
    if orphans:
        failures.append(("-", "-", f"{orphans} tokenised row(s) have no silver.records row"))
    if not checked:
        failures.append(("-", "-", "no tokenised rows to prove"))
    description = (
        f"{checked} rows proven"
        if not failures
        else f"{len(failures)} row(s) fail: " + "; ".join(f"{i}: {p}" for i, _, p in failures[:3])
    )
    return dg.AssetCheckResult(passed=not failures, description=description, metadata=metadata)
