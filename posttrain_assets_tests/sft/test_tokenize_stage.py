"""posttrain_assets.sft.tokenize_stage: each SFT row is tokenised once per stage key, and the silver tables built
from the cache equal a full build."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import duckdb
import pytest

from posttrain_assets.sft.batches import TokenizeJob, TokenizerIdentity
from posttrain_assets.sft.masking import MaskConfig
from posttrain_assets.sft.tokenize_stage import (
    TOKENIZED_CACHE,
    TokenizeTotals,
    build_sft_tokenized,
)
from posttrain_assets.sft.tokenizer import tokenizer_identity
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS
from posttrain_assets.warehouse.io import insert_rows
from posttrain_assets.warehouse.stage_cache import Reuse

CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TABLES = ("silver.sft_tokenized", "silver.sft_quarantine")


def record(record_id: str, user: str, answer: str, source: str = "chats") -> dict[str, Any]:
    origin = {"source": source, "uri": "u", "file": "f", "row": 0, "record_sha256": record_id, "file_sha256": "f"}
    return {
        "id": record_id,
        "source": source,
        "regime": "sft",
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        "prompt": user,
        "response": answer,
        "license": "MIT",
        "origin": origin,
        "created_at": CREATED,
        "source_kind": "human",
    }


ROWS = [
    record("a1", "What is 2 + 2?", "2 + 2 = 4."),
    record("b2", "Name a prime.", "7 is prime."),
    record("c3", "Say the end token.", "Here it is: <|im_end|>"),  # a special token in content: quarantined
    record("d4", "Count to three.", "One, two, three."),
]


@pytest.fixture
def conn(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    conn.execute(SILVER_RECORDS.create_sql())
    insert_rows(conn, SILVER_RECORDS, ROWS)
    return conn


def job_of(tok: Any, **mask: Any) -> TokenizeJob:
    identity = tokenizer_identity(tok)
    return TokenizeJob(
        TokenizerIdentity(tok, identity["tokenizer_sha256"], identity["chat_template_sha256"]), MaskConfig(**mask)
    )


def build(conn: duckdb.DuckDBPyConnection, job: TokenizeJob, reuse: bool = True) -> TokenizeTotals:
    return build_sft_tokenized(conn, job, processes=1, batch_rows=2, reuse=reuse)


def tables(conn: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    return {t: conn.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}


def test_a_rebuild_tokenises_no_row_again_and_gives_the_same_tables(conn, smollm2_tokenizer) -> None:
    job = job_of(smollm2_tokenizer)
    first = build(conn, job)
    before = tables(conn)
    second = build(conn, job)

    assert first.reuse == Reuse(computed=4, reused=0)
    assert second.reuse == Reuse(computed=0, reused=4)
    assert dataclasses.replace(second, reuse=first.reuse) == first  # same token totals
    assert tables(conn) == before
    assert [r[0] for r in before["silver.sft_tokenized"]] == ["a1", "b2", "d4"]
    assert [r[:3] for r in before["silver.sft_quarantine"]] == [("c3", "chats", "special_token_in_content")]


def test_new_rows_only_are_tokenised_and_a_moved_row_takes_its_new_source(conn, smollm2_tokenizer) -> None:
    job = job_of(smollm2_tokenizer)
    build(conn, job)
    conn.execute("DELETE FROM silver.records WHERE id = 'b2'")
    conn.execute("UPDATE silver.records SET source = 'better_chats' WHERE id = 'a1'")  # a displaced duplicate
    insert_rows(conn, SILVER_RECORDS, [record("e5", "Spell cat.", "C, A, T.")])
    refreshed = build(conn, job)
    incremental = tables(conn)
    full = build(conn, job, reuse=False)

    assert refreshed.reuse == Reuse(computed=1, reused=3)
    assert full.reuse == Reuse(computed=4, reused=0)
    assert incremental == tables(conn)
    sources = conn.execute("SELECT id, source FROM silver.sft_tokenized ORDER BY id").fetchall()
    assert sources == [("a1", "better_chats"), ("d4", "chats"), ("e5", "chats")]
    # the cache forgot b2 (gone from silver) and holds one entry per current row
    assert conn.execute(f"SELECT id FROM {TOKENIZED_CACHE.qualified} ORDER BY id").fetchall() == [
        ("a1",),
        ("d4",),
        ("e5",),
    ]


def test_a_changed_mask_config_tokenises_every_row_again(conn, smollm2_tokenizer) -> None:
    build(conn, job_of(smollm2_tokenizer))
    short = build(conn, job_of(smollm2_tokenizer, max_seq_len=12))

    assert short.reuse == Reuse(computed=4, reused=0)
    # the default template's system prompt alone is longer than 12 tokens
    assert conn.execute("SELECT count(*) FROM silver.sft_tokenized").fetchone() == (0,)
    reasons = conn.execute("SELECT id, reason FROM silver.sft_quarantine ORDER BY id").fetchall()
    assert reasons == [("a1", "too_long"), ("b2", "too_long"), ("c3", "special_token_in_content"), ("d4", "too_long")]


def test_tokenising_again_to_the_same_arrays_keeps_every_fingerprint(conn, smollm2_tokenizer) -> None:
    build(conn, job_of(smollm2_tokenizer))
    before = tables(conn)
    hashes = f"SELECT id, stage_key, content_hash FROM {TOKENIZED_CACHE.qualified} ORDER BY id"
    stored = "SELECT sync_key, sync_fingerprint FROM sync.silver__sft_tokenized ORDER BY ALL"
    first_hashes, fingerprints = conn.execute(hashes).fetchall(), conn.execute(stored).fetchall()
    # a new stage key (truncate rather than quarantine an overlong row; no row is near the limit): every row is
    # tokenised again, to the same rows
    truncating = build(conn, job_of(smollm2_tokenizer, overflow="truncate"))
    again = conn.execute(hashes).fetchall()

    assert truncating.reuse == Reuse(computed=4, reused=0)
    assert [k for _, k, _ in again] != [k for _, k, _ in first_hashes]
    # the content hash is the published columns', not the stage key's: the same, so the silver rows' derived
    # fingerprints are the same and the sync writes nothing
    assert [(i, h) for i, _, h in again] == [(i, h) for i, _, h in first_hashes]
    assert conn.execute(stored).fetchall() == fingerprints
    assert tables(conn) == before
    # another row's tokens have another content hash: a1's conversation with a longer answer
    insert_rows(conn, SILVER_RECORDS, [record("a1-longer", "What is 2 + 2?", "2 + 2 = 4, always.")])
    build(conn, job_of(smollm2_tokenizer, overflow="truncate"))
    hashed = {i: h for i, _, h in conn.execute(hashes).fetchall()}
    assert hashed["a1"] != hashed["a1-longer"]
