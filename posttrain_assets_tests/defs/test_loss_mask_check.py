"""loss_mask_check proves only rows it has not proven before (issue 23): a byte-identical row under the same stage
key reuses its cached proof, a changed row or a new stage key is proven again, a failure is never cached.

The check is called directly with its resources, on a warehouse holding just the two tables it reads:
silver.records (the columns the proof reads) and silver.sft_tokenized as the tokenise stage writes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pyarrow as pa
import pytest

from posttrain_assets.defs.checks.loss_mask import loss_mask_check
from posttrain_assets.defs.resources import TokenizerResource, WarehouseResource
from posttrain_assets.settings import FULL_REBUILD
from posttrain_assets.sft.batches import (
    CANONICAL_SAMPLE_EVERY,
    ProofJob,
    TokenizeJob,
    TokenizerIdentity,
    tokenize_batch,
)
from posttrain_assets.sft.masking import MaskConfig
from posttrain_assets.sft.proof_cache import PROOF_ROWS, SFT_PROOFS, proof_stage_key, prove_tokenized
from posttrain_assets.sft.tokenizer import tokenizer_identity
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS, SILVER_SFT_TOKENIZED
from posttrain_assets.warehouse.io import insert_arrow, insert_rows

# silver.records with the columns the proof reads
RECORDS = dataclasses.replace(
    SILVER_RECORDS, columns=tuple(SILVER_RECORDS.column(n) for n in ("id", "source", "regime", "messages", "tools"))
)


def chat(*turns: str) -> list[dict[str, str]]:
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


CONVERSATIONS = {
    "chats": [
        chat("What is 2 + 2?", "2 + 2 = 4."),
        chat("Name a prime.", "7 is prime."),
        chat("Hi!", "Hello.", "And a colour?", "Blue."),
        [{"role": "system", "content": "Be brief."}, *chat("Capital of France?", "Paris.")],
    ],
    "howto": [
        chat("How do I boil an egg?", "Put it in boiling water for eight minutes."),
        chat("Sort [3, 1, 2].", "[1, 2, 3]", "Reversed?", "[3, 2, 1]"),
        chat("Translate 'cat' to French.", "chat"),
    ],
}
ROWS = sum(len(c) for c in CONVERSATIONS.values())


@pytest.fixture
def warehouse(tmp_path: Path, smollm2_tokenizer: Any) -> Path:
    """A DuckDB file with silver.records and silver.sft_tokenized rows of :data:`CONVERSATIONS`, tokenised with the
    project tokenizer (the one the check's resource loads)."""
    identity = tokenizer_identity(smollm2_tokenizer)
    job = TokenizeJob(
        TokenizerIdentity(smollm2_tokenizer, identity["tokenizer_sha256"], identity["chat_template_sha256"]),
        MaskConfig(),
    )
    records = [
        {"id": f"{source}-{i}", "source": source, "regime": "sft", "messages": messages}
        for source, conversations in CONVERSATIONS.items()
        for i, messages in enumerate(conversations)
    ]
    database = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(database)) as conn:
        conn.execute(RECORDS.create_sql())
        conn.execute(SILVER_SFT_TOKENIZED.create_sql())
        insert_rows(conn, RECORDS, records)
        tokenized = tokenize_batch(job, pa.Table.from_pylist(records))
        assert tokenized.rejected is None
        insert_arrow(conn, SILVER_SFT_TOKENIZED, tokenized.tokenized)
    return database


@pytest.fixture
def check(warehouse: Path, tokenizer_cache_dir: Path) -> Callable[[], dg.AssetCheckResult]:
    def run() -> dg.AssetCheckResult:
        return loss_mask_check(
            duckdb=WarehouseResource(database=str(warehouse)),
            tokenizer=TokenizerResource(spec="smollm2", cache_dir=str(tokenizer_cache_dir)),
        )

    return run


def execute(database: Path, sql: str, params: Any = None) -> list[tuple]:
    with duckdb.connect(str(database)) as conn:
        return conn.execute(sql, params).fetchall()


def reuse(result: dg.AssetCheckResult) -> tuple[int, int]:
    """(rows proven in this run, rows whose proof was reused)"""
    metadata = result.metadata
    return metadata["rows_computed/loss_mask_proof"].value, metadata["rows_reused/loss_mask_proof"].value


def shares(result: dg.AssetCheckResult) -> dict[str, float]:
    return {k: v.value for k, v in result.metadata.items() if k.startswith("trainable_share")}


def test_a_second_run_on_unchanged_tables_reuses_every_proof_with_the_same_verdict(
    check: Callable[[], dg.AssetCheckResult], warehouse: Path
) -> None:
    first = check()
    assert first.passed, first.description
    assert reuse(first) == (ROWS, 0)
    assert first.description == f"{ROWS} rows proven"
    assert execute(warehouse, f"SELECT count(*), count(DISTINCT stage_key) FROM {SFT_PROOFS.qualified}") == [(ROWS, 1)]

    second = check()
    assert second.passed, second.description
    assert reuse(second) == (0, ROWS)
    assert second.metadata["rows_checked"].value == first.metadata["rows_checked"].value == ROWS
    assert second.metadata["canonical_encoding_rows_checked"].value == 0
    # the same verdict: checks.verdicts and the dataset cards read the same whether proofs were reused or not
    assert second.description == first.description
    assert "byte-identical" in second.metadata["reused_proofs"].value
    # The shares of reused rows come from SQL over the current rows: exactly the proof's figures.
    assert set(shares(first)) == {"trainable_share", "trainable_share/chats", "trainable_share/howto"}
    assert shares(second) == shares(first)
    assert 0.0 < shares(first)["trainable_share"] < 1.0
    # one entry per row, the run's scratch table gone
    assert execute(warehouse, f"SELECT count(*) FROM {SFT_PROOFS.qualified}") == [(ROWS,)]
    assert execute(
        warehouse, "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [PROOF_ROWS.name]
    ) == [(0,)]


def test_a_corrupted_row_is_proven_again_and_fails_by_name_and_its_failure_is_not_cached(
    check: Callable[[], dg.AssetCheckResult], warehouse: Path
) -> None:
    assert check().passed
    bad_id = "howto-1"
    (labels,) = execute(warehouse, "SELECT labels FROM silver.sft_tokenized WHERE id = ?", [bad_id])[0]
    position = labels.index(-100)  # the first untrained position, now trained
    execute(
        warehouse,
        "UPDATE silver.sft_tokenized SET labels = list_concat(labels[:$p], [input_ids[$p + 1]], labels[$p + 2:]) "
        "WHERE id = $id",
        {"p": position, "id": bad_id},
    )

    corrupted = check()
    assert not corrupted.passed
    assert reuse(corrupted) == (1, ROWS - 1)
    assert corrupted.description.startswith(f"1 row(s) fail: {bad_id}: position {position}")
    assert corrupted.metadata["rows_failed"].value == 1
    assert corrupted.metadata["rows_checked"].value == ROWS
    # the failure is not cached, and the entry of the row as it was is forgotten: the row is proven every run
    assert execute(warehouse, f"SELECT count(*) FROM {SFT_PROOFS.qualified} WHERE id = ?", [bad_id]) == [(0,)]
    again = check()
    assert (again.passed, reuse(again), again.description) == (False, (1, ROWS - 1), corrupted.description)

    # the row restored: proven once more, then reused
    execute(warehouse, "UPDATE silver.sft_tokenized SET labels = ? WHERE id = ?", [labels, bad_id])
    restored = check()
    assert restored.passed and reuse(restored) == (1, ROWS - 1)
    assert reuse(check()) == (0, ROWS)


def test_a_changed_record_is_proven_again(check: Callable[[], dg.AssetCheckResult], warehouse: Path) -> None:
    assert check().passed
    # The record's conversation changed under the same id (the tokenised row is now stale): a fresh proof fails it.
    execute(
        warehouse,
        "UPDATE silver.records SET messages = list_transform(messages, lambda m: struct_update(m, content := "
        "replace(m.content, 'Paris', 'Lyon'))) WHERE id = 'chats-3'",
    )
    result = check()
    assert not result.passed and reuse(result) == (1, ROWS - 1)
    assert result.description.startswith("1 row(s) fail: chats-3: ")


def test_a_deleted_row_leaves_no_cache_entry(check: Callable[[], dg.AssetCheckResult], warehouse: Path) -> None:
    assert check().passed
    execute(warehouse, "DELETE FROM silver.sft_tokenized WHERE id = 'chats-0'")
    result = check()
    assert result.passed and reuse(result) == (0, ROWS - 1)
    assert execute(warehouse, f"SELECT count(*) FROM {SFT_PROOFS.qualified} WHERE id = 'chats-0'") == [(0,)]
    assert execute(warehouse, f"SELECT count(*) FROM {SFT_PROOFS.qualified}") == [(ROWS - 1,)]


def test_full_rebuild_proves_every_row_again(
    check: Callable[[], dg.AssetCheckResult], warehouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert check().passed
    monkeypatch.setenv(FULL_REBUILD, "1")
    result = check()
    assert result.passed and reuse(result) == (ROWS, 0)
    assert execute(warehouse, f"SELECT count(*) FROM {SFT_PROOFS.qualified}") == [(ROWS,)]
    monkeypatch.setenv(FULL_REBUILD, "0")
    assert reuse(check()) == (0, ROWS)


def test_a_new_stage_key_proves_every_row_again(warehouse: Path, smollm2_tokenizer: Any) -> None:
    hashes = tokenizer_identity(smollm2_tokenizer)
    identity = TokenizerIdentity(smollm2_tokenizer, hashes["tokenizer_sha256"], hashes["chat_template_sha256"])
    sampled, every_row = ProofJob(identity), ProofJob(identity, canonical_every=1)
    with duckdb.connect(str(warehouse)) as conn:
        # batches of 2 rows, in this process
        first = prove_tokenized(conn, sampled, batch_rows=2, processes=1)
        assert (first.proof.checked, first.proof.failures, first.reuse.computed) == (ROWS, [], ROWS)
        reused = prove_tokenized(conn, sampled, batch_rows=2, processes=1)
        assert (reused.reuse.computed, reused.proof.checked) == (0, ROWS)
        # the reused rows' token counts (kept with their proofs) are the proof's own figures
        assert reused.proof.tokens_by_source == first.proof.tokens_by_source
        # another canonical sample: a new stage key, every row proven (and re-encoded) again
        changed = prove_tokenized(conn, every_row, batch_rows=2, processes=1)
        assert (changed.reuse.computed, changed.reuse.reused, changed.proof.canonical_checked) == (ROWS, 0, ROWS)
        assert changed.proof.tokens_by_source == first.proof.tokens_by_source
        # the old key's entries are forgotten: going back proves every row again
        assert execute_on(conn, f"SELECT count(*) FROM {SFT_PROOFS.qualified}") == [(ROWS,)]
        assert prove_tokenized(conn, sampled, batch_rows=2, processes=1).reuse.computed == ROWS
        # the cache does not depend on the batches or the number of processes
        cached = execute_on(conn, f"SELECT * FROM {SFT_PROOFS.qualified} ORDER BY ALL")
        rebuilt = prove_tokenized(conn, sampled, reuse=False, batch_rows=3, processes=2)
        assert (rebuilt.reuse.computed, rebuilt.proof.tokens_by_source) == (ROWS, first.proof.tokens_by_source)
        assert execute_on(conn, f"SELECT * FROM {SFT_PROOFS.qualified} ORDER BY ALL") == cached


def execute_on(conn: duckdb.DuckDBPyConnection, sql: str) -> list[tuple]:
    return conn.execute(sql).fetchall()


def test_the_stage_key_names_the_tokenizer_the_template_and_the_sample(smollm2_tokenizer: Any) -> None:
    def key(tokenizer_sha256: str, template_sha256: str, every: int) -> str:
        return proof_stage_key(
            ProofJob(TokenizerIdentity(smollm2_tokenizer, tokenizer_sha256, template_sha256), canonical_every=every)
        )

    base = key("tok", "template", CANONICAL_SAMPLE_EVERY)
    assert base == key("tok", "template", CANONICAL_SAMPLE_EVERY)
    assert (
        len(
            {
                base,
                key("other", "template", CANONICAL_SAMPLE_EVERY),
                key("tok", "other", CANONICAL_SAMPLE_EVERY),
                key("tok", "template", 1),
            }
        )
        == 4
    )


def test_a_cache_of_another_shape_is_forgotten(check: Callable[[], dg.AssetCheckResult], warehouse: Path) -> None:
    # a cache.sft_proofs left by older code, without the token counts
    execute(
        warehouse,
        "CREATE SCHEMA cache; CREATE TABLE cache.sft_proofs (stage_key VARCHAR, id VARCHAR, row_fingerprint UBIGINT)",
    )
    execute(warehouse, "INSERT INTO cache.sft_proofs SELECT 'old', id, 0 FROM silver.sft_tokenized")
    result = check()
    assert result.passed and reuse(result) == (ROWS, 0)
    assert execute(warehouse, f"SELECT count(*), count(num_tokens) FROM {SFT_PROOFS.qualified}") == [(ROWS, ROWS)]
