"""The silver pass over DuckDB (``posttrain_assets.cleaning.silver_pass``): where every bronze row ends, and why.

A small registry and hand-written bronze rows go through ``run_silver_pass`` on a DuckDB file under
tmp_path, with one-row batches so every stage crosses batch boundaries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import pytest

from posttrain_assets.cleaning import silver_pass as cleaning
from posttrain_assets.cleaning.dedup import DEFAULT_CONFIGS
from posttrain_assets.cleaning.silver_pass import (
    GATE_STAGED,
    STAGE_NAMES,
    SUBSTAGE_NAMES,
    CleaningConfig,
    PassResult,
    run_silver_pass,
)
from posttrain_assets.ingest.registry import Registry, Source
from posttrain_assets.records.schema import DEFAULT_MAX_ROW_BYTES
from posttrain_assets.warehouse.catalogue import BRONZE_RECORDS
from posttrain_assets.warehouse.io import fetch_dicts, insert_rows

CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
LONG_ANSWER = " ".join(f"step {i}: the clips are counted once more and the total stays the same." for i in range(12))


def chat(user: str, assistant: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


SFT_ROWS: list[Any] = [
    chat("What is 17 * 3?", "17 * 3 = 51."),  # 0: kept; its prompt is also in the RL bank
    chat("What is 17 * 3?", "17 * 3 = 51."),  # 1: same content id as row 0
    chat("WHAT is 17 *  3?", "17 * 3 = 51."),  # 2: row 0 up to case and whitespace
    chat("Explain how to count the clips.", LONG_ANSWER),  # 3: kept
    chat("Explain how to count the clips!", LONG_ANSWER.replace("step 5:", "stage 5:")),  # 4: near copy of 3
    chat(f"Solve: {QUESTION} How many clips?", "72"),  # 5: carries the eval question
    "{not json",  # 6: malformed
]
RL_ROWS = [{"question": "What is 17 * 3?", "answer": "17 * 3 = 51\n#### 51"}]
EVAL_ROWS = [{"question": f"{QUESTION} How many clips did Natalia sell altogether?", "answer": "#### 72"}]


def source(name: str, fmt: str, regime: str, role: str, base: Path) -> Source:
    return Source(name, f"{name}.jsonl", fmt, regime, "MIT", "https://example.org", "human", role, base)


@pytest.fixture
def warehouse(tmp_path: Path) -> tuple[duckdb.DuckDBPyConnection, Registry]:
    registry = Registry(
        tmp_path / "sources.yaml",
        (
            source("eval_gsm8k", "gsm8k", "rl", "eval", tmp_path),
            source("rl_bank", "gsm8k", "rl", "train", tmp_path),
            source("sft_chats", "messages", "sft", "train", tmp_path),
        ),
    )
    conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    conn.execute(BRONZE_RECORDS.create_sql())
    for name, rows in (("eval_gsm8k", EVAL_ROWS), ("rl_bank", RL_ROWS), ("sft_chats", SFT_ROWS)):
        for n, row in enumerate(rows):
            payload = row if isinstance(row, str) else json.dumps(row)
            conn.execute(
                f"INSERT INTO {BRONZE_RECORDS.qualified} VALUES (?, ?, ?, ?, ?, NULL, 'f', now(), 'run')",
                [name, str(tmp_path / f"{name}.jsonl"), n, hashlib.sha256(payload.encode()).hexdigest(), payload],
            )
    return conn, registry


def run(conn: duckdb.DuckDBPyConnection, registry: Registry, tok: Any, **cfg: Any) -> PassResult:
    return run_silver_pass(conn, registry, tok, lambda _path: CREATED, CleaningConfig(batch_rows=1, **cfg))


def where(conn: duckdb.DuckDBPyConnection) -> dict[tuple[str, int], str]:
    """Every bronze row -> the table (and stage/reason or method) it ended in."""
    placed: dict[tuple[str, int], str] = {}
    for src, row in conn.execute('SELECT origin.source, origin."row" FROM silver.records').fetchall():
        placed[(src, row)] = "records"
    for src, row in conn.execute('SELECT origin.source, origin."row" FROM silver.eval_records').fetchall():
        placed[(src, row)] = "eval"
    for src, row, stage, reason in conn.execute(
        "SELECT source, row_number, stage, reason FROM silver.quarantine"
    ).fetchall():
        placed[(src, row)] = f"quarantine:{stage}:{reason}"
    for src, row, method in conn.execute("SELECT source, row_number, method FROM silver.dedup_clusters").fetchall():
        placed[(src, row)] = f"dedup:{method}"
    return placed


# Stages 0-1 run in worker processes (two here: one-row batches) or in this one; the rows must not differ.
# processes=2 starts two workers for a handful of rows (about 3 s); the pass itself is tested fast with one.
@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_every_bronze_row_ends_in_exactly_one_place(warehouse, smollm2_tokenizer, processes: int) -> None:
    conn, registry = warehouse
    run(conn, registry, smollm2_tokenizer, processes=processes)
    assert where(conn) == {
        ("eval_gsm8k", 0): "eval",
        ("rl_bank", 0): "records",
        ("sft_chats", 0): "records",
        ("sft_chats", 1): "dedup:exact",
        ("sft_chats", 2): "dedup:exact_normalized",
        ("sft_chats", 3): "records",
        ("sft_chats", 4): "dedup:near",
        ("sft_chats", 5): "quarantine:decontamination:contaminated",
        ("sft_chats", 6): "quarantine:canonical:bad_json",
    }
    bronze = conn.execute("SELECT count(*) FROM bronze.records").fetchone()[0]
    placed = sum(
        conn.execute(f"SELECT count(*) FROM silver.{t}").fetchone()[0]
        for t in ("records", "eval_records", "quarantine", "dedup_clusters")
    )
    assert placed == bronze == 9
    # duplicates point at their kept twin, which is in silver.records
    kept = dict(conn.execute("SELECT row_number, kept_id FROM silver.dedup_clusters").fetchall())
    ids = dict(conn.execute("SELECT origin.\"row\", id FROM silver.records WHERE source = 'sft_chats'").fetchall())
    assert kept[2] == ids[0] and kept[4] == ids[3]
    (message,) = conn.execute("SELECT message FROM silver.quarantine WHERE stage = 'decontamination'").fetchone()
    assert message.startswith(f"{registry.get('sft_chats').pattern}, row 5: messages[0] overlaps eval_gsm8k row ")
    # token counts are filled for preference and RL rows; SFT rows are counted when they are tokenised (null here);
    # the work tables are gone
    counted = "SELECT regime, count(*) FILTER (WHERE token_count IS NULL), count(*) FROM silver.records GROUP BY ALL"
    nulls = {regime: (null, rows) for regime, null, rows in conn.execute(counted).fetchall()}
    assert nulls["rl"][0] == 0 and nulls["rl"][1] > 0
    assert nulls["sft"][0] == nulls["sft"][1] > 0
    assert conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'work'").fetchone()[0] == 0


def test_the_pass_reports_the_seconds_of_each_stage(warehouse, smollm2_tokenizer) -> None:
    conn, registry = warehouse
    start = time.perf_counter()
    seconds = run(conn, registry, smollm2_tokenizer).stage_seconds
    wall = time.perf_counter() - start
    assert set(seconds) == {*STAGE_NAMES, *SUBSTAGE_NAMES}
    assert all(s > 0 for s in seconds.values())
    # the stages run one after another inside the pass; each part is counted in its stage
    assert sum(seconds[name] for name in STAGE_NAMES) <= wall
    dedup_parts = [name for name in SUBSTAGE_NAMES if name.startswith("deduplicate/")]
    assert dedup_parts == ["deduplicate/signatures", "deduplicate/candidates", "deduplicate/verification"]
    assert sum(seconds[part] for part in dedup_parts) <= seconds["deduplicate"]
    assert seconds["normalise_and_gate/checkpoint"] <= seconds["normalise_and_gate"]


@pytest.mark.parametrize(("checkpoint_after", "in_file"), [(1, True), (10, False)])
def test_the_staged_rows_are_in_the_database_file_when_the_later_stages_scan_them(
    warehouse, smollm2_tokenizer, monkeypatch: pytest.MonkeyPatch, checkpoint_after: int, in_file: bool
) -> None:
    """After gating many rows the pass checkpoints, so the later stages scan the staged rows from the file; after
    gating few (here 9 rows: a threshold of 10) it does not, and the work tables are never written to the file."""
    conn, registry = warehouse
    monkeypatch.setattr(cleaning, "CHECKPOINT_AFTER_GATED_ROWS", checkpoint_after)
    seen: list[tuple[int, int]] = []
    decontaminate = cleaning.decontaminate

    def storage_then_decontaminate(conn, sources, cfg):
        # column segments of the staged rows: how many there are, and how many live in the database file
        seen.append(
            conn.execute(
                "SELECT count(*), count(*) FILTER (persistent) FROM pragma_storage_info($table)",
                {"table": cleaning.STAGED.qualified},
            ).fetchone()
        )
        return decontaminate(conn, sources, cfg)

    monkeypatch.setattr(cleaning, "decontaminate", storage_then_decontaminate)
    run(conn, registry, smollm2_tokenizer)
    [(segments, persistent)] = seen
    assert segments > 0 and persistent == (segments if in_file else 0)


def test_cross_regime_leaks_reported_then_removed_under_prefer_rl(warehouse, smollm2_tokenizer) -> None:
    conn, registry = warehouse
    run(conn, registry, smollm2_tokenizer)
    ((prompt, regimes, n_ids),) = conn.execute(
        "SELECT prompt, regimes, len(ids) FROM silver.cross_regime_leaks"
    ).fetchall()
    assert (prompt, regimes, n_ids) == ("What is 17 * 3?", ["rl", "sft"], 2)
    run(conn, registry, smollm2_tokenizer, leak_policy="prefer_rl")
    assert where(conn)[("sft_chats", 0)] == "quarantine:leak:cross_regime_leak"
    assert where(conn)[("rl_bank", 0)] == "records"
    # the exact twins of the removed row still point at it: its content is known, only withheld from training
    assert where(conn)[("sft_chats", 2)] == "dedup:exact_normalized"


def test_a_failed_pass_leaves_the_previous_silver_in_place(warehouse, smollm2_tokenizer, monkeypatch) -> None:
    conn, registry = warehouse
    run(conn, registry, smollm2_tokenizer)
    before = conn.execute("SELECT id FROM silver.records ORDER BY id").fetchall()

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("posttrain_assets.cleaning.silver_pass.cross_regime_leaks", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run(conn, registry, smollm2_tokenizer)
    assert conn.execute("SELECT id FROM silver.records ORDER BY id").fetchall() == before
    assert conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'work'").fetchone()[0] == 0


# ---------------------------------------------------------------------------------------------------------------
# the gate cache: a rerun parses and gates only the rows it has not seen, and gives what a full pass gives
# ---------------------------------------------------------------------------------------------------------------

SILVER_TABLES = (
    "silver.records",
    "silver.eval_records",
    "silver.quarantine",
    "silver.dedup_clusters",
    "silver.contamination",
    "silver.cross_regime_leaks",
)


def silver(conn: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    return {t: conn.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in SILVER_TABLES}


def gate_cache_rows(conn: duckdb.DuckDBPyConnection) -> list[tuple]:
    return conn.execute(
        f"SELECT source, row_number, destination FROM {cleaning.GATE_ROWS.qualified} ORDER BY ALL"
    ).fetchall()


def test_a_rerun_gates_no_row_again_and_gives_the_same_tables(warehouse, smollm2_tokenizer) -> None:
    conn, registry = warehouse
    first = run(conn, registry, smollm2_tokenizer)
    before = silver(conn)
    second = run(conn, registry, smollm2_tokenizer)

    assert first.reuse["normalise_and_gate"] == cleaning.Reuse(computed=9, reused=0)
    assert second.reuse["normalise_and_gate"] == cleaning.Reuse(computed=0, reused=9)
    # staged: rl row 0 and sft rows 0, 2, 3, 4, 5 (1 is an exact copy, 6 did not parse); row 5 is contaminated
    assert first.reuse["decontamination"] == cleaning.Reuse(computed=6, reused=0)
    assert second.reuse["decontamination"] == cleaning.Reuse(computed=0, reused=6)
    # the candidate pairs (sft rows 3 and 4, a near copy) were compared once; the rerun reads their verdicts
    compared = first.reuse["near_dedup_pairs"].computed
    assert compared > 0 and first.reuse["near_dedup_pairs"].reused == 0
    assert second.reuse["near_dedup_pairs"] == cleaning.Reuse(computed=0, reused=compared)
    # the exact survivors (rl row 0, sft rows 0, 3 and 4) were listed in their LSH buckets once; the rerun takes
    # their candidate pairs from the candidate state
    assert first.reuse["near_dedup_candidates"] == cleaning.Reuse(computed=4, reused=0)
    assert second.reuse["near_dedup_candidates"] == cleaning.Reuse(computed=0, reused=4)
    # the near copy's similarity to its kept row was measured once
    assert first.reuse["near_dedup_similarities"] == cleaning.Reuse(computed=1, reused=0)
    assert second.reuse["near_dedup_similarities"] == cleaning.Reuse(computed=0, reused=1)
    assert silver(conn) == before
    assert len(before["silver.records"]) == 3  # sft rows 0 and 3 (1, 2, 4: duplicates; 5: contaminated), rl row 0
    assert gate_cache_rows(conn)[:2] == [("eval_gsm8k", 0, "eval"), ("rl_bank", 0, "staged")]


def test_a_changed_row_and_a_new_row_are_the_only_rows_gated_again(warehouse, smollm2_tokenizer) -> None:
    conn, registry = warehouse
    run(conn, registry, smollm2_tokenizer)
    changed = json.dumps(chat("Explain how to count the clips, please.", LONG_ANSWER + " Done."))
    conn.execute(
        f"UPDATE {BRONZE_RECORDS.qualified} SET payload = $p, record_sha256 = $h "
        "WHERE source = 'sft_chats' AND row_number = 3",
        {"p": changed, "h": hashlib.sha256(changed.encode()).hexdigest()},
    )
    # a new exact copy of row 3's new content, in a higher-priority position than nothing: it collapses onto row 3
    conn.execute(
        f"INSERT INTO {BRONZE_RECORDS.qualified} SELECT source, file_path, 7, record_sha256, payload, decode_error, "
        f"file_sha256, ingested_at, run_id FROM {BRONZE_RECORDS.qualified} "
        "WHERE source = 'sft_chats' AND row_number = 3"
    )
    refreshed = run(conn, registry, smollm2_tokenizer)
    incremental = silver(conn)
    full = run(conn, registry, smollm2_tokenizer, reuse=False)

    assert refreshed.reuse["normalise_and_gate"] == cleaning.Reuse(computed=2, reused=8)
    assert full.reuse["normalise_and_gate"] == cleaning.Reuse(computed=10, reused=0)
    assert incremental == silver(conn)
    exact = conn.execute(
        "SELECT row_number, method FROM silver.dedup_clusters WHERE method = 'exact' ORDER BY ALL"
    ).fetchall()
    assert exact == [(1, "exact"), (7, "exact")]
    # the cache holds one entry per current bronze row: row 3's old content is forgotten
    assert len(gate_cache_rows(conn)) == 10


def test_a_changed_file_hash_or_time_is_taken_from_bronze_without_gating_again(warehouse, smollm2_tokenizer) -> None:
    conn, registry = warehouse
    run(conn, registry, smollm2_tokenizer)
    conn.execute(f"UPDATE {BRONZE_RECORDS.qualified} SET file_sha256 = 'g' WHERE source = 'rl_bank'")
    later = CREATED + dt.timedelta(days=1)
    result = run_silver_pass(conn, registry, smollm2_tokenizer, lambda _path: later, CleaningConfig(batch_rows=1))

    assert result.reuse["normalise_and_gate"] == cleaning.Reuse(computed=0, reused=9)
    rows = conn.execute(
        "SELECT source, origin.file_sha256, created_at FROM silver.records ORDER BY source LIMIT 1"
    ).fetchall()
    assert rows == [("rl_bank", "g", later)]
    # publishing writes a record again when it changed (its new row fetched by live_records_of): every record's
    # created_at moved, so every one is written again; a run with nothing new writes none
    (published,) = conn.execute("SELECT count(*) FROM silver.records").fetchone()
    assert published == 3
    assert result.reuse["silver_records"] == cleaning.Reuse(computed=3, reused=0)
    again = run_silver_pass(conn, registry, smollm2_tokenizer, lambda _path: later, CleaningConfig(batch_rows=1))
    assert again.reuse["silver_records"] == cleaning.Reuse(computed=0, reused=3)


def test_gating_again_to_the_same_records_rewrites_no_record(warehouse, smollm2_tokenizer) -> None:
    conn, registry = warehouse
    run(conn, registry, smollm2_tokenizer)
    before = silver(conn)
    stored = "SELECT sync_key, sync_fingerprint FROM sync.silver__records ORDER BY ALL"
    fingerprints = conn.execute(stored).fetchall()
    # a new stage key for every source (a larger row limit no row comes near): every row is gated again, to the
    # same records, so silver.records' derived fingerprints (gate_staged.content_hash + the narrow staged
    # columns) do not move and the publish writes nothing
    result = run(conn, registry, smollm2_tokenizer, max_row_bytes=2 * DEFAULT_MAX_ROW_BYTES)

    assert result.reuse["normalise_and_gate"] == cleaning.Reuse(computed=9, reused=0)
    assert result.reuse["silver_records"] == cleaning.Reuse(computed=0, reused=3)
    assert conn.execute(stored).fetchall() == fingerprints
    assert silver(conn) == before
    # the content hash, computed as an entry is inserted, covers the cached record columns, not the cache's key
    entry = fetch_dicts(conn, "SELECT * EXCLUDE (content_hash) FROM cache.gate_staged ORDER BY source LIMIT 1")[0]
    insert_rows(
        conn,
        GATE_STAGED,
        [dict(entry, stage_key="another", row_number=100), dict(entry, row_number=101, prompt=entry["prompt"] + "!")],
    )
    hashes = dict(
        conn.execute(
            "SELECT row_number, content_hash FROM cache.gate_staged WHERE source = $s", {"s": entry["source"]}
        ).fetchall()
    )
    assert hashes[100] == hashes[entry["row_number"]] != hashes[101]


def test_a_changed_gate_config_or_a_removed_source_invalidates_exactly_its_rows(warehouse, smollm2_tokenizer) -> None:
    conn, registry = warehouse
    run(conn, registry, smollm2_tokenizer)
    commercial = run(conn, registry, smollm2_tokenizer, quality=cleaning.QualityConfig(license_policy="commercial"))
    assert commercial.reuse["normalise_and_gate"] == cleaning.Reuse(computed=9, reused=0)

    without_sft = Registry(registry.path, tuple(s for s in registry.sources if s.name != "sft_chats"))
    result = run(conn, without_sft, smollm2_tokenizer, quality=cleaning.QualityConfig(license_policy="commercial"))
    assert result.reuse["normalise_and_gate"] == cleaning.Reuse(computed=0, reused=2)
    assert [s for s, _, _ in gate_cache_rows(conn)] == ["eval_gsm8k", "rl_bank"]
    assert conn.execute("SELECT count(*) FROM silver.records WHERE source = 'sft_chats'").fetchone() == (0,)


def test_a_new_dedup_threshold_reclusters_from_the_cached_signatures(warehouse, smollm2_tokenizer) -> None:
    conn, registry = warehouse
    first = run(conn, registry, smollm2_tokenizer)
    strict = {r: replace(c, threshold=0.99, edit_threshold=0.99) for r, c in DEFAULT_CONFIGS.items()}
    refreshed = run(conn, registry, smollm2_tokenizer, minhash=strict)
    incremental = silver(conn)
    full = run(conn, registry, smollm2_tokenizer, minhash=strict, reuse=False)

    survivors = first.reuse["near_dedup_signatures"].computed
    assert survivors > 0 and first.reuse["near_dedup_signatures"].reused == 0
    assert refreshed.reuse["near_dedup_signatures"] == cleaning.Reuse(computed=0, reused=survivors)
    # new thresholds: the pairs' verdicts are not reused (they depend on them)
    assert refreshed.reuse["near_dedup_pairs"].reused == 0 and refreshed.reuse["near_dedup_pairs"].computed > 0
    assert full.reuse["near_dedup_signatures"] == cleaning.Reuse(computed=survivors, reused=0)
    assert incremental == silver(conn)
    # at 0.99 the near copy of row 3 (one word changed in ~150) is kept: no near cluster any more
    methods = conn.execute("SELECT method FROM silver.dedup_clusters ORDER BY ALL").fetchall()
    assert ("near",) not in methods
