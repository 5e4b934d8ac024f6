"""The loss-mask proof, proving only rows it has not proven before (issue 23; ``warehouse.stage_cache`` explains
the keys).

``cache.sft_proofs`` holds one entry per tokenised row that PASSED the proof: ``(stage_key, id, row_fingerprint)``
and the row's token counts as the proof counted them (so a refresh reads the reused rows' counts instead of scanning
their labels again: the fingerprint covers ``input_ids`` and ``labels``, so the counts are those of the current row).
The stage key (:func:`proof_stage_key`) hashes what the verdict depends on besides the row: the tokenizer and chat
template hashes, the canonical-encoding sample rate, the proof's code and the libraries it calls. The row
fingerprint (:data:`ROW_FINGERPRINT`) hashes everything of the stored row the proof reads: silver.sft_tokenized's
ids, labels, mask config and tokenizer hashes, and silver.records' messages and tools. A row whose
``(stage_key, id, row_fingerprint)`` is in the cache is byte for byte a row an earlier run proved with the same
proof, so it counts as proven without being proven again; every other row is proven (in worker processes, in
batches) and appended when it passes, one transaction per batch. Failures are never cached, so a failing row fails
again on the next run. Entries of rows that are gone, changed or proven under another stage key are forgotten at
the end.

No Dagster here: ``defs/checks/loss_mask.py`` wires :func:`prove_tokenized` into ``loss_mask_check``.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from posttrain_assets.parallel import default_processes, map_batches, processes_for
from posttrain_assets.sft.batches import MaskProof, ProofJob, prove_batch
from posttrain_assets.sft.masking import IGNORE_INDEX
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS, SILVER_SFT_TOKENIZED
from posttrain_assets.warehouse.io import appending, memory_limit_at_most, ordered_arrow, stored_rows_in_range
from posttrain_assets.warehouse.model import Column, Table
from posttrain_assets.warehouse.stage_cache import (
    CACHE_SCHEMA,
    Reuse,
    code_fingerprint,
    keyed_rows,
    library_versions,
    open_caches,
    stage_key,
)

STAGE = "loss_mask_proof"
BATCH_ROWS = 1024

# The code that decides a row's verdict: the proof itself, the mask builder's helpers it re-renders and decodes
# with, the tool-call rendering they share, and this module (the fingerprint and what counts as proven).
PROOF_CODE = (
    "posttrain_assets.sft.masking",
    "posttrain_assets.sft.batches",
    "posttrain_assets.sft.proof_cache",
    "posttrain_assets.records.tools",
)
# duckdb: its hash() makes the row fingerprints, and is not promised to be stable across versions.
PROOF_LIBRARIES = ("tokenizers", "transformers", "jinja2", "duckdb")

SFT_PROOFS = Table(
    CACHE_SCHEMA,
    "sft_proofs",
    "One entry per silver.sft_tokenized row that passed loss_mask_check, under the proof's stage key and the row's "
    "fingerprint: a row with the same (stage_key, id, row_fingerprint) is not proven again.",
    (
        Column("stage_key", "VARCHAR", "the proof's stage key (proof_cache.proof_stage_key)", False),
        Column("id", "VARCHAR", "silver.sft_tokenized id", False),
        Column("row_fingerprint", "UBIGINT", "hash of everything of the row the proof read (ROW_FINGERPRINT)", False),
        Column("num_tokens", "BIGINT", "len(input_ids) of the row proven", False),
        Column("num_trainable_tokens", "BIGINT", "labels other than -100 of the row proven", False),
    ),
)
PROOF_ROWS = Table(
    CACHE_SCHEMA,
    "sft_proof_rows",
    "Scratch of one loss_mask_check run, dropped when it ends: every tokenised row with a silver.records row, its "
    "fingerprint and whether its proof is reused.",
    (
        Column("id", "VARCHAR", "silver.sft_tokenized id", False),
        Column("source", "VARCHAR", "registry source name (the current row's)", False),
        Column("row_fingerprint", "UBIGINT", "ROW_FINGERPRINT of the current row", False),
        Column("reused", "BOOLEAN", "cache.sft_proofs holds (stage key, id, fingerprint)", False),
    ),
)

# The fingerprint of a row is DuckDB's hash(): 64 bits, fast, and meant against accidents (a corrupted mask, an
# edited record, another template), which is the threat here, not against someone forging a collision. hash() of
# several arguments runs list arguments together (hash([1, 2], [3]) = hash([1], [2, 3])) and so does a struct of
# lists, so each list column is hashed on its own first; a list of message structs keeps its element boundaries.
# The parts from silver.sft_tokenized (t) and silver.records (r) are hashed apart and combined, so the full scan
# that fingerprints every row joins two narrow hashes, never two tables' token lists.
TOKENIZED_HASH = (
    "hash(hash(t.input_ids), hash(t.labels), t.num_messages, t.train_on, t.train_reasoning, t.end_of_turn, "
    "t.tokenizer_sha256, t.chat_template_sha256)"
)
RECORD_HASH = "hash(hash(r.messages), r.tools)"
ROW_FINGERPRINT = f"hash({TOKENIZED_HASH}, {RECORD_HASH})"


# Every tokenised row with a silver.records row, fingerprinted, and whether its proof is in the cache. The two
# tables are reduced to narrow rows (id and hash) before they are joined, so the join never holds token lists or
# conversations (DuckDB would otherwise move the hashing above the join). This scan runs on every refresh: 200,000
# rows of 500 tokens take about 1.5 s; counting trained labels here as well would add 1.1 s, hence the counts kept
# in the cache.
FINGERPRINT_ROWS = f"""
CREATE OR REPLACE TABLE {PROOF_ROWS.qualified} AS
WITH tokenized AS MATERIALIZED (
    SELECT t.id, t.source, {TOKENIZED_HASH} AS tokenized_hash
    FROM {SILVER_SFT_TOKENIZED.qualified} t
), records AS MATERIALIZED (
    SELECT r.id, {RECORD_HASH} AS record_hash FROM {SILVER_RECORDS.qualified} r
    WHERE r.id IN (SELECT id FROM {SILVER_SFT_TOKENIZED.qualified})
), fingerprinted AS (
    SELECT t.id, t.source, hash(t.tokenized_hash, r.record_hash) AS row_fingerprint
    FROM tokenized t JOIN records r USING (id)
)
SELECT f.id, f.source, f.row_fingerprint, EXISTS (
        SELECT 1 FROM {SFT_PROOFS.qualified} c
        WHERE c.stage_key = $stage_key AND c.id = f.id AND c.row_fingerprint = f.row_fingerprint
    ) AS reused
FROM fingerprinted f
"""

# The ids of the rows to prove, and those rows of one id range ($range_first, $range_last; io.ordered_arrow's
# range_keys): what prove_batch reads, with the fingerprint of exactly the bytes read (computed again here rather
# than carried from the scratch table, so the entry a passing row gets names what was proven). Both tables' rows are
# fetched by rowid: a refresh's rows are the last ones their syncs appended, and joining the ids read every range's
# row groups of both tables (token lists and messages): 4.0-4.2 s for a 10k-row refresh at 1M, 0.5-0.7 s by rowid.
ROWS_TO_PROVE_IDS = f"SELECT id FROM {PROOF_ROWS.qualified} WHERE NOT reused"
ROWS_TO_PROVE = f"""
SELECT t.id, t.source, r.messages, r.tools, t.input_ids, t.labels, t.num_messages, t.train_on, t.train_reasoning,
       t.end_of_turn, t.tokenizer_sha256, t.chat_template_sha256, {ROW_FINGERPRINT} AS row_fingerprint
FROM ({stored_rows_in_range(SILVER_SFT_TOKENIZED.qualified, ROWS_TO_PROVE_IDS)}) t
JOIN ({stored_rows_in_range(SILVER_RECORDS.qualified, ROWS_TO_PROVE_IDS)}) r USING (id)
"""
ROWS_TO_PROVE_COUNT = f"SELECT count(*) FROM ({ROWS_TO_PROVE_IDS})"

# Rows and [tokens, trained tokens] per source of the reused rows, the source being the current row's.
REUSED_TOKENS = f"""
SELECT p.source, count(*), sum(c.num_tokens), sum(c.num_trainable_tokens)
FROM {PROOF_ROWS.qualified} p JOIN {SFT_PROOFS.qualified} c
  ON c.stage_key = $stage_key AND c.id = p.id AND c.row_fingerprint = p.row_fingerprint
WHERE p.reused GROUP BY p.source ORDER BY p.source
"""

# Entries of another stage key, of rows that are gone, and of rows whose fingerprint changed.
FORGET_STALE = f"""
DELETE FROM {SFT_PROOFS.qualified} c
WHERE c.stage_key <> $stage_key OR NOT EXISTS (
    SELECT 1 FROM {PROOF_ROWS.qualified} p WHERE p.id = c.id AND p.row_fingerprint = c.row_fingerprint
)
"""


def proof_stage_key(job: ProofJob) -> str:
    """The proof's stage key: the tokenizer and chat template hashes, the canonical-encoding sample rate, the code
    of :data:`PROOF_CODE` and the versions of :data:`PROOF_LIBRARIES`."""
    return stage_key(
        STAGE,
        tokenizer=job.identity.hashes(),
        canonical_every=job.canonical_every,
        code=code_fingerprint(*PROOF_CODE),
        libraries=library_versions(*PROOF_LIBRARIES),
    )


@dataclass
class ProvenBatch:
    """What proving a batch found, and ``(id, row_fingerprint, num_tokens, num_trainable_tokens)`` of its rows that
    passed (Arrow)."""

    proof: MaskProof
    passed: pa.Table


def prove_and_keep_passed(job: ProofJob, batch: pa.Table) -> ProvenBatch:
    """``prove_batch`` on a batch of :data:`ROWS_TO_PROVE`, with the id, fingerprint and token counts (as the proof
    counts them) of every row it did not fail (in a worker process: only the proof and the passing keys cross back)."""
    proof = prove_batch(job, batch)
    failed = pa.array(sorted({row_id for row_id, _, _ in proof.failures}), pa.string())
    labels = batch.column("labels").combine_chunks()
    offsets = labels.offsets.to_numpy()
    trained = np.concatenate([[0], np.cumsum(labels.values.to_numpy(zero_copy_only=False) != IGNORE_INDEX)])
    keys = pa.table(
        {
            "id": batch.column("id"),
            "row_fingerprint": batch.column("row_fingerprint"),
            "num_tokens": pc.list_value_length(batch.column("input_ids")).cast(pa.int64()),
            "num_trainable_tokens": pa.array(trained[offsets[1:]] - trained[offsets[:-1]], pa.int64()),
        }
    )
    return ProvenBatch(proof, keys.filter(pc.invert(pc.is_in(keys.column("id"), value_set=failed))))


@dataclass
class ProofRun:
    """A run of the proof over silver.sft_tokenized: ``proof`` covers every row (``checked`` and
    ``tokens_by_source`` count the reused rows too; ``failures`` and ``canonical_checked`` are of the rows proven in
    this run), ``reuse`` says how many rows were proven now and how many proofs were reused."""

    proof: MaskProof
    reuse: Reuse


def prove_tokenized(
    conn: duckdb.DuckDBPyConnection,
    job: ProofJob,
    *,
    reuse: bool = True,
    batch_rows: int = BATCH_ROWS,
    processes: int | None = None,
) -> ProofRun:
    """Prove every silver.sft_tokenized row that has a silver.records row, reusing the cached proofs of
    byte-identical rows under the same stage key (``reuse=False``: forget them first and prove every row).

    Rows are streamed in id ranges of ``batch_rows`` (memory holds a few batches of token lists, not the table) and
    proven in ``processes`` worker processes (default: as many as the rows to prove call for)."""
    key = proof_stage_key(job)
    open_caches(conn, SFT_PROOFS, reuse=reuse)  # a cache of another shape (older code) is forgotten
    conn.execute(FINGERPRINT_ROWS, {"stage_key": key})
    try:
        proof = MaskProof()
        (missing,) = conn.execute(ROWS_TO_PROVE_COUNT).fetchone()
        workers = processes_for(missing, batch_rows, default_processes() if processes is None else processes)
        batches = ordered_arrow(conn, ROWS_TO_PROVE, "id", batch_rows, range_keys=ROWS_TO_PROVE_IDS)
        # DuckDB's cache beside the workers stays small, whatever the corpus; one commit per batch (a killed run
        # leaves whole batches, which the next run reuses), one checkpoint per full row group (io.Appends)
        with memory_limit_at_most(conn), appending(conn) as appends:
            for proven in map_batches(prove_and_keep_passed, job, batches, workers):
                proof.add(proven.proof)
                appends.commit({SFT_PROOFS: keyed_rows(proven.passed, key)})
        reused = MaskProof()
        for source, rows, tokens, trained in conn.execute(REUSED_TOKENS, {"stage_key": key}).fetchall():
            reused.checked += rows
            reused.tokens_by_source[source] = [int(tokens), int(trained)]
        proof.add(reused)
        conn.execute(FORGET_STALE, {"stage_key": key})
    finally:
        conn.execute(f"DROP TABLE IF EXISTS {PROOF_ROWS.qualified}")
    return ProofRun(proof, Reuse(computed=proof.checked - reused.checked, reused=reused.checked))
