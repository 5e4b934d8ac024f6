"""loss_mask_check: proves every tokenised SFT row's labels before gold.sft may be written.

For each row it re-renders the conversation with the chat template, checks that the ids decode to exactly
that rendering and, independently of the code that built the mask, that exactly the assistant contents and
their end-of-turn markers are trained (``posttrain_assets.sft.masking.verify_mask``). That the ids are the
tokenizer's canonical encoding of the rendering (a fresh re-encode) is checked on one row in
``sft.batches.CANONICAL_SAMPLE_EVERY`` (chosen by id hash; the constant's comment says why that suffices); the
metadata says how many rows that was. A failure names the row ids and the first wrong position; gold.sft then does
not materialise.

Only rows not proven before are proven (``posttrain_assets.sft.proof_cache``): a row byte-identical to one an
earlier run proved with the same proof code, tokenizer, chat template and sample rate counts as proven (metadata
``rows_reused/loss_mask_proof``); ``POSTTRAIN_FULL_REBUILD=1`` proves every row again.
"""

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.checks.verdicts import warehouse_check
from posttrain_assets.defs.metadata import markdown_table
from posttrain_assets.defs.resources import TokenizerResource
from posttrain_assets.settings import full_rebuild
from posttrain_assets.sft.batches import ProofJob, TokenizerIdentity
from posttrain_assets.sft.proof_cache import BATCH_ROWS as PROOF_BATCH_ROWS
from posttrain_assets.sft.proof_cache import STAGE, prove_tokenized
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS, SILVER_SFT_TOKENIZED

MAX_REPORTED = 20
# Rows per proof batch, read when the check runs (a test makes it small to prove in many batches and processes).
BATCH_ROWS = PROOF_BATCH_ROWS


@warehouse_check(
    asset=["silver", "sft_tokenized"],
    blocking=True,
    additional_deps=[["silver", "records"]],
    description="Every row: input_ids spell the chat template's rendering, only assistant contents + end markers "
    "trained; on a sample of rows, input_ids = a fresh encode of the rendering. A row byte-identical to one an "
    "earlier run proved (same proof code, tokenizer, template, sample) reuses that proof.",
)
def loss_mask_check(duckdb: DuckDBResource, tokenizer: TokenizerResource) -> dg.AssetCheckResult:
    identity = tokenizer.identity()
    prover = ProofJob(
        TokenizerIdentity(tokenizer.get(), identity["tokenizer_sha256"], identity["chat_template_sha256"])
    )
    with duckdb.get_connection() as conn:
        orphans = conn.execute(
            f"SELECT count(*) FROM {SILVER_SFT_TOKENIZED.qualified} WHERE id NOT IN (SELECT id FROM "
            f"{SILVER_RECORDS.qualified})"
        ).fetchone()[0]
        # Rows not proven before, streamed in id ranges and proven in worker processes, each batch with one batched
        # re-render, decode, and re-encode of its canonical sample; the others reuse their cached proof.
        run = prove_tokenized(conn, prover, reuse=not full_rebuild(), batch_rows=BATCH_ROWS)
    proof = run.proof
    failures, tokens_by_source, checked = proof.failures, proof.tokens_by_source, proof.checked
    total = sum(c[0] for c in tokens_by_source.values())
    trained = sum(c[1] for c in tokens_by_source.values())
    metadata: dict[str, dg.MetadataValue] = {
        "rows_checked": dg.MetadataValue.int(checked),
        "rows_failed": dg.MetadataValue.int(len(failures)),
        "canonical_encoding_rows_checked": dg.MetadataValue.int(proof.canonical_checked),
        "canonical_encoding_sample": dg.MetadataValue.text(f"1 in {prover.canonical_every} rows, by id hash"),
        **{name: dg.MetadataValue.int(count) for name, count in run.reuse.metadata(STAGE).items()},
        "reused_proofs": dg.MetadataValue.text(
            "rows byte-identical to rows an earlier run proved with the same proof code, tokenizer, chat template "
            "and sample count as proven (rows_checked includes them; canonical_encoding_rows_checked does not)"
        ),
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
    # The description goes to checks.verdicts and the dataset cards, which a refresh and a full build of the same
    # inputs must write alike: how many proofs were reused is in the metadata only.
    description = (
        f"{checked} rows proven"
        if not failures
        else f"{len(failures)} row(s) fail: " + "; ".join(f"{i}: {p}" for i, _, p in failures[:3])
    )
    return dg.AssetCheckResult(passed=not failures, description=description, metadata=metadata)
