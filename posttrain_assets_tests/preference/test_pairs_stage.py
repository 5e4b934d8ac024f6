"""posttrain_assets.preference.pairs_stage: each pair's token counts and tie flag are computed once per record id
and stage key, and silver.preference_pairs built from the cache equals a full build."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import duckdb
import pytest

from posttrain_assets.preference.pairs import PairJob, pair_batch
from posttrain_assets.preference.pairs_stage import (
    PAIRS_CACHE,
    PairsSync,
    measure_preference_pairs,
    sync_preference_pairs,
)
from posttrain_assets.sft.tokenizer import tokenizer_identity
from posttrain_assets.warehouse.catalogue import SILVER_PREFERENCE_PAIRS, SILVER_RECORDS
from posttrain_assets.warehouse.io import SyncCounts, insert_rows, transaction
from posttrain_assets.warehouse.stage_cache import Reuse

CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def record(
    record_id: str,
    chosen: str,
    rejected: str,
    source: str = "prefs",
    scores: tuple[float, float] | None = None,
    judge: str | None = None,
) -> dict[str, Any]:
    origin = {"source": source, "uri": "u", "file": "f", "row": 0, "record_sha256": record_id, "file_sha256": "f"}
    return {
        "id": record_id,
        "source": source,
        "regime": "preference",
        "messages": [{"role": "user", "content": f"question {record_id}"}],
        "prompt": f"question {record_id}",
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": scores[0] if scores else None,
        "score_rejected": scores[1] if scores else None,
        "annotations": {"judge": judge} if judge else None,
        "token_count": 10,
        "lang": "en",
        "license": "MIT",
        "origin": origin,
        "created_at": CREATED,
        "source_kind": "human",
    }


ROWS = [
    record("a1", "Paris is the capital of France.", "Lyon.", scores=(9.0, 7.5), judge="gpt-4"),
    record("b2", "The answer is 42.", "the answer  is 42."),  # a tie: the same reply up to case and spacing
    record("c3", "No.", "Yes, and here is a much longer reply."),
    record("d4", "Blue.", "Green.", scores=(2.0, 3.0)),
]
# An SFT row beside them: never paired.
SFT_ROW = {**record("s9", "x", "y"), "regime": "sft", "chosen": None, "rejected": None}


@pytest.fixture
def conn(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    conn.execute(SILVER_RECORDS.create_sql())
    insert_rows(conn, SILVER_RECORDS, [*ROWS, SFT_ROW])
    return conn


def build_synced(
    conn: duckdb.DuckDBPyConnection,
    job: PairJob,
    tokenizer_sha256: str,
    reuse: bool = True,
    processes: int = 1,
    batch_rows: int = 2,
) -> PairsSync:
    """Measure and sync silver.preference_pairs as the asset does."""
    measured = measure_preference_pairs(
        conn, job, tokenizer_sha256, processes=processes, batch_rows=batch_rows, reuse=reuse
    )
    with transaction(conn):
        return sync_preference_pairs(conn, measured)


def build(conn: duckdb.DuckDBPyConnection, job: PairJob, tokenizer_sha256: str, **options: Any) -> Reuse:
    return build_synced(conn, job, tokenizer_sha256, **options).reuse


def pairs(conn: duckdb.DuckDBPyConnection) -> list[tuple]:
    return conn.execute(f"SELECT * FROM {SILVER_PREFERENCE_PAIRS.qualified} ORDER BY ALL").fetchall()


def cached_ids(conn: duckdb.DuckDBPyConnection) -> list[str]:
    return [i for (i,) in conn.execute(f"SELECT id FROM {PAIRS_CACHE.qualified} ORDER BY id").fetchall()]


def reference_pairs(conn: duckdb.DuckDBPyConnection, job: PairJob) -> list[dict[str, Any]]:
    """pairs.pair_batch (the definition of a pair) over the current preference records, in id order."""
    carried = [n for n in SILVER_PREFERENCE_PAIRS.column_names if n in SILVER_RECORDS.column_names]
    records = conn.sql(
        f"SELECT {', '.join(carried)} FROM silver.records WHERE regime = 'preference' ORDER BY id"
    ).to_arrow_table()
    return pair_batch(job, records).select(SILVER_PREFERENCE_PAIRS.column_names).to_pylist()


def stored_pairs(conn: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    return conn.sql(f"SELECT * FROM {SILVER_PREFERENCE_PAIRS.qualified} ORDER BY id").to_arrow_table().to_pylist()


@pytest.fixture(scope="module")
def tokenizer_sha256(smollm2_tokenizer: Any) -> str:
    return tokenizer_identity(smollm2_tokenizer)["tokenizer_sha256"]


def tokens(tok: Any, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_a_rebuild_measures_no_pair_again_and_gives_the_same_table(conn, smollm2_tokenizer, tokenizer_sha256) -> None:
    job = PairJob(smollm2_tokenizer)
    first = build(conn, job, tokenizer_sha256)
    before = pairs(conn)
    second = build(conn, job, tokenizer_sha256)

    assert first == Reuse(computed=4, reused=0)
    assert second == Reuse(computed=0, reused=4)
    assert pairs(conn) == before
    assert cached_ids(conn) == ["a1", "b2", "c3", "d4"]
    # the rows are pair_batch's, column for column
    assert stored_pairs(conn) == reference_pairs(conn, job)
    measures = conn.execute(
        "SELECT id, chosen_tokens, rejected_tokens, length_diff, is_tie, score_margin FROM silver.preference_pairs "
        "ORDER BY id"
    ).fetchall()
    expected_tokens = {
        r["id"]: (tokens(smollm2_tokenizer, r["chosen"]), tokens(smollm2_tokenizer, r["rejected"])) for r in ROWS
    }
    assert measures == [
        ("a1", *expected_tokens["a1"], expected_tokens["a1"][0] - expected_tokens["a1"][1], False, 1.5),
        ("b2", *expected_tokens["b2"], expected_tokens["b2"][0] - expected_tokens["b2"][1], True, None),
        ("c3", *expected_tokens["c3"], expected_tokens["c3"][0] - expected_tokens["c3"][1], False, None),
        ("d4", *expected_tokens["d4"], expected_tokens["d4"][0] - expected_tokens["d4"][1], False, -1.0),
    ]
    # stored in id order
    assert [i for (i,) in conn.execute("SELECT id FROM silver.preference_pairs").fetchall()] == ["a1", "b2", "c3", "d4"]


def test_only_new_rows_are_measured_and_changed_columns_come_from_the_current_records(
    conn, smollm2_tokenizer, tokenizer_sha256
) -> None:
    job = PairJob(smollm2_tokenizer)
    build(conn, job, tokenizer_sha256)
    conn.execute("DELETE FROM silver.records WHERE id = 'c3'")
    # the same content under another source, re-scored and re-judged (a displaced duplicate): same id
    conn.execute(
        "UPDATE silver.records SET source = 'better_prefs', score_chosen = 4.0, score_rejected = 1.0, "
        "annotations = {'judge': 'claude'} WHERE id = 'a1'"
    )
    insert_rows(conn, SILVER_RECORDS, [record("e5", "Four.", "Five, I think.", scores=(1.0, 0.0))])
    refreshed = build_synced(conn, job, tokenizer_sha256)
    incremental = pairs(conn)
    full = build(conn, job, tokenizer_sha256, reuse=False)

    assert refreshed.reuse == Reuse(computed=1, reused=3)
    # synced, not rebuilt: c3 and the old a1 deleted, the new a1 and e5 inserted, b2 and d4 left as they were
    assert refreshed.synced == SyncCounts(inserted=2, deleted=2, kept=2, rebuilt=False)
    assert full == Reuse(computed=4, reused=0)
    assert incremental == pairs(conn)
    assert stored_pairs(conn) == reference_pairs(conn, job)
    current = conn.execute(
        "SELECT id, source, score_margin, annotations.judge FROM silver.preference_pairs ORDER BY id"
    ).fetchall()
    assert current == [
        ("a1", "better_prefs", 3.0, "claude"),
        ("b2", "prefs", None, None),
        ("d4", "prefs", -1.0, None),
        ("e5", "prefs", 1.0, None),
    ]
    # the cache forgot c3 (gone from silver) and holds one entry per current pair
    assert cached_ids(conn) == ["a1", "b2", "d4", "e5"]


def test_a_changed_stage_key_measures_every_pair_again(conn, smollm2_tokenizer, tokenizer_sha256) -> None:
    build(conn, PairJob(smollm2_tokenizer), tokenizer_sha256)
    # a looser tie threshold: "Blue." vs "Green." (folded "blue" vs "green": LCS "e", similarity 2/9) becomes a tie
    loose = build(conn, PairJob(smollm2_tokenizer, tie_similarity=0.2), tokenizer_sha256)
    ties = conn.execute("SELECT id FROM silver.preference_pairs WHERE is_tie ORDER BY id").fetchall()
    # another tokenizer (by its hash)
    other = build(conn, PairJob(smollm2_tokenizer, tie_similarity=0.2), "another-tokenizer")

    assert loose == Reuse(computed=4, reused=0)
    assert other == Reuse(computed=4, reused=0)
    assert ties == [("b2",), ("d4",)]
    # entries of the old keys are forgotten
    assert conn.execute(f"SELECT count(*), count(DISTINCT stage_key) FROM {PAIRS_CACHE.qualified}").fetchone() == (4, 1)


def test_a_cache_of_another_shape_is_dropped_and_every_pair_measured(conn, smollm2_tokenizer, tokenizer_sha256) -> None:
    conn.execute("CREATE SCHEMA cache")
    conn.execute(f"CREATE TABLE {PAIRS_CACHE.qualified} (stage_key VARCHAR, id VARCHAR, chosen_tokens INTEGER)")
    conn.execute(f"INSERT INTO {PAIRS_CACHE.qualified} VALUES ('old', 'a1', 99)")

    assert build(conn, PairJob(smollm2_tokenizer), tokenizer_sha256) == Reuse(computed=4, reused=0)
    assert cached_ids(conn) == ["a1", "b2", "c3", "d4"]
    assert stored_pairs(conn) == reference_pairs(conn, PairJob(smollm2_tokenizer))


def test_worker_processes_and_batch_sizes_do_not_change_the_table(conn, smollm2_tokenizer, tokenizer_sha256) -> None:
    job = PairJob(smollm2_tokenizer)
    assert build(conn, job, tokenizer_sha256, processes=1, batch_rows=3) == Reuse(computed=4, reused=0)
    alone = pairs(conn)
    assert build(conn, job, tokenizer_sha256, reuse=False, processes=2, batch_rows=1) == Reuse(computed=4, reused=0)
    assert pairs(conn) == alone


def test_no_preference_rows_give_an_empty_table(tmp_path, smollm2_tokenizer, tokenizer_sha256) -> None:
    conn = duckdb.connect(str(tmp_path / "empty.duckdb"))
    conn.execute(SILVER_RECORDS.create_sql())
    insert_rows(conn, SILVER_RECORDS, [SFT_ROW])

    assert build(conn, PairJob(smollm2_tokenizer), tokenizer_sha256) == Reuse(computed=0, reused=0)
    assert pairs(conn) == []
