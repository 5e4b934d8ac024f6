"""Dedup over DuckDB work tables (``posttrain_assets.cleaning.dedup_tables``) against the in-memory dedup.

The silver pass deduplicates through the work tables; ``dedup.deduplicate`` and ``dedup.candidate_pairs`` hold
everything in memory. Both must drop the same rows onto the same kept rows with the same similarities, whatever
the number of worker processes and the batch size.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from posttrain_assets.cleaning import dedup, dedup_tables
from posttrain_assets.cleaning.dedup import MinHashConfig
from posttrain_assets.warehouse.model import Column, Table
from posttrain_assets_tests.cleaning.test_dedup import (
    EDITS,
    by_priority,
    demo_records,
    passage,
    pref,
    rl,
    sentence_pool,
    sft,
)

DROPPED = Table(
    "main",
    "dropped",
    "what the tables path dropped",
    (
        Column("member_id", "VARCHAR", "dropped row"),
        Column("kept_id", "VARCHAR", "kept row"),
        Column("method", "VARCHAR", "method"),
        Column("similarity", "DOUBLE", "similarity"),
    ),
)
STAGED_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("id", pa.string()),
        ("regime", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("answer", pa.string()),
        ("exact_key", pa.string()),
        ("kept_rank", pa.int64()),
    ]
)
RANKED = "SELECT seq, id, exact_key, kept_rank FROM staged WHERE regime = $regime"


def dedup_in_tables(
    rows: list[dict[str, Any]],
    priority: dedup.Priority,
    *,
    processes: int,
    batch_rows: int,
    cfg: dict[str, MinHashConfig] | None = None,
) -> list[tuple[str, str, str, float]]:
    """The rows the tables path drops, as (member_id, kept_id, method, similarity), sorted. Rows are staged in
    input order (seq) with their kept rank within their regime (dedup.kept_sort_key)."""
    conn = staged_connection(rows, priority)
    dedup_staged(conn, {r["regime"] for r in rows}, processes=processes, batch_rows=batch_rows, cfg=cfg)
    return sorted(conn.execute(f"SELECT * FROM {DROPPED.qualified}").fetchall())


def staged_connection(rows: list[dict[str, Any]], priority: dedup.Priority) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with ``rows`` staged in input order (seq), each with its kept rank within its regime."""
    ranks: dict[str, int] = {}
    for regime in {r["regime"] for r in rows}:
        members = sorted((r for r in rows if r["regime"] == regime), key=lambda r: dedup.kept_sort_key(r, priority))
        ranks |= {r["id"]: rank for rank, r in enumerate(members)}
    staged = pa.Table.from_pylist(
        [
            {
                **{c: r.get(c) for c in STAGED_SCHEMA.names},
                "seq": seq,
                "exact_key": dedup.exact_key(r),
                "kept_rank": ranks[r["id"]],
            }
            for seq, r in enumerate(rows)
        ],
        schema=STAGED_SCHEMA,
    )
    conn = duckdb.connect()
    conn.register("staged_rows", staged)
    conn.execute("CREATE TABLE staged AS SELECT * FROM staged_rows")
    conn.execute("CREATE SCHEMA IF NOT EXISTS cache")
    return conn


def dedup_staged(
    conn: duckdb.DuckDBPyConnection,
    regimes: set[str],
    *,
    processes: int,
    batch_rows: int,
    cfg: dict[str, MinHashConfig] | None = None,
) -> dedup_tables.DedupReuse:
    """Deduplicate the staged rows regime by regime into a fresh ``dropped`` table; what the caches saved."""
    configs = dedup.regime_configs(cfg)
    conn.execute(DROPPED.create_sql(replace=True))
    reuse = dedup_tables.DedupReuse()
    for regime in sorted(regimes):
        reuse += dedup_tables.deduplicate_regime_tables(
            conn,
            regime=regime,
            records="staged",
            ranked=RANKED,
            params={"regime": regime},
            keyed=regime == "rl",
            cfg=configs[regime],
            dropped=DROPPED,
            batch_rows=batch_rows,
            processes=processes,
        )
    return reuse


def dedup_in_memory(
    rows: list[dict[str, Any]], priority: dedup.Priority, cfg: dict[str, MinHashConfig] | None = None
) -> list[tuple[str, str, str, float]]:
    _, dropped = dedup.deduplicate(rows, priority, cfg)
    return sorted((d["member_id"], d["kept_id"], d["method"], d["similarity"]) for d in dropped)


def generated_rows() -> list[dict[str, Any]]:
    """Planted near copies (scattered and in runs, 5-15%), look-alikes and unrelated texts in SFT; preference pairs
    sharing prompts; templated RL prompts; and exact twins (case, whitespace) of some of each, among them a twin
    of a near copy (its chain ends at the copy's kept row)."""
    rng = random.Random(19)
    pool = sentence_pool(rng, 1500)
    prompts = ["Summarise the report below.", "Explain this to a new colleague.", "Rewrite the passage plainly."]
    rows: list[dict[str, Any]] = []
    sources = ["src_a", "src_b", "src_c"]
    for k in range(60):
        prompt, reply = rng.choice(prompts), passage(rng, pool, rng.randint(30, 300))
        rows.append(sft(f"o{k}", prompt, reply, source=rng.choice(sources)))
        edit = EDITS[rng.choice(sorted(EDITS))]
        for c in range(rng.choice([1, 1, 2, 4])):  # clusters of two to five
            rows.append(
                sft(f"c{k}_{c}", prompt, edit(reply, rng.choice([0.05, 0.1, 0.15]), rng), source=rng.choice(sources))
            )
    for k in range(40):
        rows.append(sft(f"x{k}", rng.choice(prompts), passage(rng, pool, rng.randint(5, 300))))
    for k in range(30):
        prompt = passage(rng, pool, rng.randint(20, 120))
        chosen, rejected = passage(rng, pool, 15), passage(rng, pool, 15)
        rows.append(pref(f"p{k}", prompt, chosen, rejected, source=rng.choice(sources)))
        rows.append(pref(f"q{k}", EDITS["scattered"](prompt, 0.05, rng), chosen, rejected))  # a near copy
        rows.append(pref(f"r{k}", prompt, passage(rng, pool, 15), passage(rng, pool, 15)))  # other responses
    for k in range(40):
        legs = (rng.randint(3, 30), rng.randint(3, 30))
        ask = rng.choice(["area", "hypotenuse"])
        text = f"A right triangle has legs of length ${legs[0]}$ and ${legs[1]}$. What is the {ask} of the triangle?"
        rows.append(rl(f"t{k}", text, str(rng.randint(1, 500))))
        rows.append(rl(f"u{k}", text.replace("What is", "What's"), rows[-1]["answer"]))
    for r in rng.sample(rows, 40):  # exact twins up to case and whitespace
        twin = {**r, "id": f"{r['id']}_twin", "source": rng.choice(sources)}
        twin["messages"] = [{**m, "content": m["content"].upper() + "  "} for m in r["messages"]]
        for field in ("prompt", "chosen", "rejected"):
            if twin.get(field):
                twin[field] = twin[field].upper()
        rows.append(twin)
    return rows


@pytest.mark.slow  # three runs, one in two worker processes: 6-8 s (the next test keeps one run fast)
def test_generated_rows_dedup_as_in_memory_whatever_the_processes_and_batches() -> None:
    rows = generated_rows()
    expected = dedup_in_memory(rows, by_priority)
    methods = {(m, member[0]) for member, _, m, _ in expected}
    # near copies and exact twins in every regime, and exact twins that follow a near-dropped row to its kept row
    assert {("near", "c"), ("near", "q"), ("near", "u"), ("exact_normalized", "c")} <= methods
    assert len(expected) > 150
    for processes, batch_rows in ((1, 4096), (2, 60), (1, 25)):
        assert dedup_in_tables(rows, by_priority, processes=processes, batch_rows=batch_rows) == expected


def test_generated_rows_without_the_edit_rule() -> None:
    """Another net (21 bands of 6 rows: longer band keys) and rule set, still the in-memory outcome."""
    rows = generated_rows()
    old = {
        r: MinHashConfig(shingle_words=c.shingle_words, edit_threshold=None) for r, c in dedup.DEFAULT_CONFIGS.items()
    }
    assert dedup.lsh_bands(old["sft"]) == (21, 6)
    expected = dedup_in_memory(rows, by_priority, old)
    assert expected != dedup_in_memory(rows, by_priority)
    assert dedup_in_tables(rows, by_priority, processes=1, batch_rows=50, cfg=old) == expected


def test_similarities_of_dropped_rows_are_computed_once_per_pair_of_records() -> None:
    """A second dedup over the same rows reads every dropped row's similarity from the similarity cache (and the
    cache is what it reads: a planted value shows through); a member whose kept row changes is computed again."""
    rows = generated_rows()
    regimes = {r["regime"] for r in rows}
    conn = staged_connection(rows, by_priority)
    first = dedup_staged(conn, regimes, processes=1, batch_rows=500)
    dropped = sorted(conn.execute(f"SELECT * FROM {DROPPED.qualified}").fetchall())
    near = [d for d in dropped if d[2] == "near"]
    assert dropped == dedup_in_memory(rows, by_priority)
    assert first.similarities.reused == 0 and first.similarities.computed >= len(near) > 50
    cached = dedup_tables.SIMILARITY_CACHE.qualified
    assert conn.execute(f"SELECT count(*) FROM {cached}").fetchall() == [(first.similarities.computed,)]

    second = dedup_staged(conn, regimes, processes=1, batch_rows=500)
    assert second.similarities == dedup_tables.Reuse(computed=0, reused=first.similarities.computed)
    assert second.signatures.computed == 0 and second.pairs.computed == 0
    assert sorted(conn.execute(f"SELECT * FROM {DROPPED.qualified}").fetchall()) == dropped

    member, kept = near[0][0], near[0][1]
    conn.execute(f"UPDATE {cached} SET similarity = 0.125 WHERE member_id = ? AND kept_id = ?", [member, kept])
    dedup_staged(conn, regimes, processes=1, batch_rows=500)
    planted = conn.execute(f"SELECT similarity FROM {DROPPED.qualified} WHERE member_id = ?", [member]).fetchall()
    assert planted == [(0.125,)]

    # the kept row of that cluster leaves: its members are measured against the new kept row
    conn.execute("DELETE FROM staged WHERE id = ?", [kept])
    third = dedup_staged(conn, regimes, processes=1, batch_rows=500)
    assert third.similarities.computed > 0
    remaining = [r for r in rows if r["id"] != kept]
    assert sorted(conn.execute(f"SELECT * FROM {DROPPED.qualified}").fetchall()) == dedup_in_memory(
        remaining, by_priority
    )


@pytest.mark.slow  # the demo data in two worker processes: 4-6 s (test_dedup finds its planted pairs fast)
def test_demo_rows_dedup_as_in_memory(tmp_path: Path) -> None:
    rows, _where, _manifest, registry = demo_records(tmp_path)
    expected = dedup_in_memory(rows, registry.priority)
    assert len(expected) == 19
    assert dedup_in_tables(rows, registry.priority, processes=2, batch_rows=500) == expected


# ---------------------------------------------------------------------------------------------------------------
# candidate pairs: the SQL buckets and splits against dedup.candidate_pairs


def candidates_in_tables(sigs: np.ndarray, cfg: MinHashConfig, batch_rows: int = 1000) -> list[tuple[int, int]]:
    conn = duckdb.connect()
    for table in dedup_tables.TABLES:
        conn.execute(table.create_sql(replace=True))
    signatures, bands = dedup_tables.signature_tables(np.arange(len(sigs), dtype=np.int64), sigs, cfg)
    for table, rows in ((dedup_tables.NEAR_SIGNATURES, signatures), (dedup_tables.NEAR_BANDS, bands)):
        conn.register("rows", rows)
        conn.execute(table.insert_sql("rows"))
        conn.unregister("rows")
    dedup_tables.list_buckets(conn, cfg)
    dedup_tables.write_listed_pairs(conn, cfg, batch_rows)
    pairs = conn.execute(f"SELECT a, b FROM {dedup_tables.NEAR_CANDIDATES.qualified} ORDER BY a, b").fetchall()
    return [tuple(p) for p in pairs]


def clumped_signatures(rng: np.random.Generator, n: int, cfg: MinHashConfig, values: int) -> np.ndarray:
    """Signatures whose slots take one of ``values`` values: with few values most rows share most buckets, so
    buckets are large and split at every depth; near copies of some rows agree on most of their slots."""
    sigs = rng.integers(0, values, size=(n, cfg.num_perm)).astype(np.uint32)
    for i in range(0, n - 1, 7):  # a copy of row i with a tenth of its slots redrawn
        sigs[i + 1] = np.where(rng.random(cfg.num_perm) < 0.1, rng.integers(0, values, cfg.num_perm), sigs[i])
    return sigs


@pytest.mark.parametrize(("max_bucket", "values"), [(64, 2), (64, 3), (4, 2), (8, 4), (2, 3), (1000, 2)])
def test_candidates_in_sql_are_dedup_candidate_pairs(monkeypatch, max_bucket: int, values: int) -> None:
    """Bucket sizes at every split depth, wrap-around of the split bands, the last depth listed whole."""
    monkeypatch.setattr(dedup, "MAX_BUCKET", max_bucket)
    cfg = MinHashConfig()
    sigs = clumped_signatures(np.random.default_rng(values * max_bucket), 400, cfg, values)
    expected = [tuple(p) for p in dedup.candidate_pairs(sigs, cfg).tolist()]
    assert 0 < len(expected) < 400 * 399 // 2
    assert candidates_in_tables(sigs, cfg) == expected


@pytest.mark.slow  # four split-band settings over buckets split at every depth: about 3 s (the cases above split fast)
def test_candidates_after_deep_splits_match_with_fewer_split_bands(monkeypatch) -> None:
    monkeypatch.setattr(dedup, "MAX_BUCKET", 3)
    cfg = MinHashConfig()
    sigs = clumped_signatures(np.random.default_rng(7), 300, cfg, 2)
    for split_bands in (0, 1, 2, 5):
        monkeypatch.setattr(dedup, "MAX_SPLIT_BANDS", split_bands)
        assert candidates_in_tables(sigs, cfg, batch_rows=77) == [
            tuple(p) for p in dedup.candidate_pairs(sigs, cfg).tolist()
        ]


def test_the_large_bucket_test_of_test_dedup_in_sql() -> None:
    """300 rows share band 0; 10 groups of three agree on every slot: only the groups' pairs are candidates."""
    cfg = MinHashConfig()
    _bands, rows = dedup.lsh_bands(cfg)
    rng = np.random.default_rng(3)
    sigs = rng.integers(0, 2**32, size=(300, cfg.num_perm), dtype=np.uint64).astype(np.uint32)
    sigs[:, :rows] = 7
    for group in range(10):
        sigs[group * 3 + 1 : group * 3 + 3] = sigs[group * 3]
    assert candidates_in_tables(sigs, cfg) == sorted(
        (3 * g + a, 3 * g + b) for g in range(10) for a, b in ((0, 1), (0, 2), (1, 2))
    )


def test_rl_pairs_whose_same_keys_differ_are_never_listed() -> None:
    """Templated RL prompts that differ in their numbers share most buckets, and their pairs grow with the square of
    a template's rows; verification never joins two whose same keys differ (dedup.rl_same_key), so the SQL listing
    leaves them out as dedup.candidate_pairs does, and the dedup outcome is the in-memory one."""
    words = ["kindly", "please", "now", "quickly", "carefully", "simply", "exactly", "briefly"]
    rows = []
    for k in range(64):
        a, b = 3 + k % 4, 5 + k // 16  # 16 keys of four rows
        text = f"{words[k % 8]} {words[k // 8]} answer: a right triangle has legs {a} and {b}. What is its area?"
        rows.append(rl(f"t{k:02d}", text, str(a * b)))
    conn = staged_connection(rows, by_priority)
    dedup_staged(conn, {"rl"}, processes=1, batch_rows=20)
    cfg = dedup.regime_configs(None)["rl"]
    sigs = dedup.minhash_signatures([dedup.dedup_unit(r) for r in rows], cfg)
    keys = [dedup.rl_same_key(r) for r in rows]
    unkeyed = dedup.candidate_pairs(sigs, cfg).tolist()
    keyed = dedup.candidate_pairs(sigs, cfg, keys).tolist()
    assert len(unkeyed) > 4 * len(keyed) > 0  # most pairs of the template have other numbers
    assert all(keys[i] == keys[j] for i, j in keyed)
    assert candidate_ids(conn) == sorted((rows[i]["id"], rows[j]["id"]) for i, j in keyed)
    dropped = dedup_in_tables(rows, by_priority, processes=1, batch_rows=20)
    assert dropped == dedup_in_memory(rows, by_priority) and len(dropped) > 16


def test_band_keys_are_the_bands_signature_values() -> None:
    cfg = MinHashConfig()
    bands, r = dedup.lsh_bands(cfg)
    texts = [f"text number {i} with a few words" for i in range(5)]
    sigs = dedup.minhash_signatures(texts, cfg)
    signatures, band_rows = dedup_tables.signature_tables(np.arange(10, 15, dtype=np.int64), sigs, cfg)
    assert signatures.num_rows == 5 and band_rows.num_rows == 5 * bands
    assert signatures.slice(3, 1).to_pylist()[0]["signature"] == sigs[3].tolist()
    row = band_rows.slice(bands + 2, 1).to_pylist()[0]  # the second row's band 2: its r slot values as bytes
    assert (row["seq"], row["band"]) == (11, 2)
    assert row["band_key"] == sigs[1, 2 * r : 3 * r].astype(np.uint32).tobytes()
    # every band's key in one piece: band 2's is the slice of bytes 2 * key_bytes .. 3 * key_bytes
    in_one_piece = signatures.column("band_keys")[1].as_py()
    assert in_one_piece == sigs[1, : bands * r].astype(np.uint32).tobytes()
    key_bytes = dedup_tables.band_key_bytes(cfg)
    assert in_one_piece[2 * key_bytes : 3 * key_bytes] == row["band_key"]


# ---------------------------------------------------------------------------------------------------------------
# the candidate state: a run lists again only the buckets of added and removed survivors


def candidate_ids(conn: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """The last run's candidate pairs as (lower id, higher id), sorted."""
    pairs = conn.execute(
        f"SELECT least(x.id, y.id), greatest(x.id, y.id) FROM {dedup_tables.NEAR_CANDIDATES.qualified} c "
        f"JOIN {dedup_tables.DEDUP_ROWS.qualified} x ON x.seq = c.a JOIN {dedup_tables.DEDUP_ROWS.qualified} y "
        "ON y.seq = c.b ORDER BY ALL"
    ).fetchall()
    return [tuple(p) for p in pairs]


def expected_candidate_ids(rows: list[dict[str, Any]], sigs: dict[str, np.ndarray], cfg: MinHashConfig) -> list:
    """dedup.candidate_pairs over the rows' signatures, as sorted id pairs."""
    matrix = np.stack([sigs[r["id"]] for r in rows])
    pairs = dedup.candidate_pairs(matrix, cfg).tolist()
    return sorted(tuple(sorted((rows[i]["id"], rows[j]["id"]))) for i, j in pairs)


@pytest.mark.parametrize("max_bucket", [3, 8])
def test_candidates_from_the_state_are_those_of_a_full_listing(monkeypatch, max_bucket: int) -> None:
    """Signatures planted in the signature cache: a clump whose buckets split at every depth, and rows of their
    own. Added and removed rows change bucket sizes (a bucket split before may be listed whole now, and the other
    way round); the candidates are dedup.candidate_pairs' every time, and a run lists again only the buckets on
    the changed rows' paths that changed."""
    monkeypatch.setattr(dedup, "MAX_BUCKET", max_bucket)
    cfg = MinHashConfig()
    bands, rows_per_band = dedup.lsh_bands(cfg)
    rng = np.random.default_rng(max_bucket)
    clump = clumped_signatures(rng, 120, cfg, 2)
    unique = rng.integers(0, 2**32, size=(120, cfg.num_perm), dtype=np.uint64).astype(np.uint32)
    unique[60:] = np.where(
        rng.random((60, cfg.num_perm)) < 0.1, rng.integers(0, 2**32, (60, cfg.num_perm)), unique[:60]
    )
    rows = [sft(f"row{i:03d}", "Say something.", f"text {i}") for i in range(240)]
    sigs = {r["id"]: s for r, s in zip(rows, np.concatenate([clump, unique]), strict=True)}
    first = [r for i, r in enumerate(rows) if i % 10 != 3]  # 24 rows held back, from the clump and the others

    conn = with_planted_signatures(first, sigs, cfg)
    dedup_staged(conn, {"sft"}, processes=1, batch_rows=50)
    assert candidate_ids(conn) == expected_candidate_ids(first, sigs, cfg)
    listed = conn.execute(f"SELECT count(DISTINCT seq) FROM {dedup_tables.NEAR_BANDS.qualified}").fetchall()
    assert listed == [(len(first),)]  # no state yet: every survivor's buckets

    # the held-back rows arrive, and ten of the first rows (clump and unique) leave
    second = [r for i, r in enumerate(rows) if i % 24 != 5]
    restage(conn, second)
    dedup_staged(conn, {"sft"}, processes=1, batch_rows=50)
    expected = expected_candidate_ids(second, sigs, cfg)
    assert candidate_ids(conn) == expected and len(expected) > 100
    placed = conn.execute(f"SELECT count(DISTINCT seq) FROM {dedup_tables.NEAR_BANDS.qualified}").fetchall()[0][0]
    changed = {r["id"] for r in first} ^ {r["id"] for r in second}
    # the added rows and the rows of the buckets listed again (here, with buckets split at every depth, most of the
    # clump's rows: test_a_row_added_to_a_giant_bucket_reads_only_its_path shows the other end)
    assert 24 <= placed < len(sharing_a_start_bucket(second, changed, sigs, cfg))
    walked = conn.execute(f"SELECT count(*) FROM {dedup_tables.NEAR_WALK.qualified} WHERE descend").fetchall()
    assert walked[0][0] > 0  # split buckets on the changed rows' paths were walked through, not listed again
    kept = conn.execute(f"SELECT count(*) FROM {dedup_tables.NEAR_KEPT_PAIRS.qualified}").fetchall()[0][0]
    assert kept > 0  # pairs of untouched buckets came from the state

    # nothing changed: nothing listed, every candidate from the state
    dedup_staged(conn, {"sft"}, processes=1, batch_rows=50)
    assert candidate_ids(conn) == expected
    assert conn.execute(f"SELECT count(*) FROM {dedup_tables.NEAR_BANDS.qualified}").fetchall() == [(0,)]
    state = conn.execute(f"SELECT count(*), count(DISTINCT id) FROM {dedup_tables.BAND_STATE.qualified}").fetchall()
    assert state == [(len(second) * bands, len(second))]
    keys = conn.execute(f"SELECT id, band_keys FROM {dedup_tables.SURVIVOR_STATE.qualified} ORDER BY id").fetchall()
    assert keys == [
        (r["id"], sigs[r["id"]][: bands * rows_per_band].tobytes()) for r in sorted(second, key=lambda r: r["id"])
    ]


@pytest.mark.parametrize(
    ("max_bucket", "values", "split_bands", "deepest"), [(4, 3, 3, 1), (2, 2, 3, 3), (3, 2, 1, 1), (5, 3, 0, 0)]
)
def test_rounds_of_added_and_removed_rows_keep_the_state_exact(
    monkeypatch, max_bucket: int, values: int, split_bands: int, deepest: int
) -> None:
    """Five runs, each adding and removing a random tenth of a clumped pool, exact twins among them (a twin whose
    kept row leaves survives in its place): buckets grow past MAX_BUCKET and shrink below it, down to the last
    split depth, and rows come back after leaving. Every time the candidates are a full listing's, and the state
    (band keys, buckets with their sizes, pairs by bucket) is the one a full listing of the survivors stores."""
    monkeypatch.setattr(dedup, "MAX_BUCKET", max_bucket)
    monkeypatch.setattr(dedup, "MAX_SPLIT_BANDS", split_bands)
    cfg = MinHashConfig()
    rng = np.random.default_rng(max_bucket * values + split_bands)
    pool = clumped_signatures(rng, 160, cfg, values)
    rows = [sft(f"row{i:03d}", "Say something.", f"text {i}") for i in range(160)]
    for i in range(0, 160, 8):  # an exact twin (case) of every eighth row, after it in the kept order
        rows.append(
            {
                **rows[i],
                "id": f"twin{i:03d}",
                "source": "src_b",
                "messages": [{**m, "content": m["content"].upper()} for m in rows[i]["messages"]],
            }
        )
    sigs = {r["id"]: pool[int(r["id"][-3:])] for r in rows}
    member = rng.random(len(rows)) < 0.6

    def current() -> list[dict[str, Any]]:
        return [r for r, m in zip(rows, member, strict=True) if m]

    state_key = {"key": dedup_tables.candidate_state_key("sft", cfg)}
    state_queries = [
        f"SELECT * EXCLUDE (stage_key) FROM {t.qualified} WHERE stage_key = $key ORDER BY ALL"
        for t in dedup_tables.CANDIDATE_STATE_TABLES
    ]
    conn = with_planted_signatures(current(), sigs, cfg)
    walked = relisted = shrunk = 0
    for run in range(5):
        if run:
            member ^= rng.random(len(rows)) < 0.1
            restage(conn, current())
        dedup_staged(conn, {"sft"}, processes=1, batch_rows=40)
        survivors = [
            r
            for r in current()
            if not (r["id"].startswith("twin") and f"row{r['id'][4:]}" in {c["id"] for c in current()})
        ]
        assert candidate_ids(conn) == expected_candidate_ids(survivors, sigs, cfg)
        fresh = with_planted_signatures(current(), sigs, cfg)
        dedup_staged(fresh, {"sft"}, processes=1, batch_rows=40)
        for query in state_queries:
            assert conn.execute(query, state_key).fetchall() == fresh.execute(query, state_key).fetchall()
        if run:  # the refresh path ran: buckets walked through and buckets listed again
            walk = dedup_tables.NEAR_WALK.qualified
            walked += conn.execute(f"SELECT count(*) FROM {walk} WHERE descend").fetchall()[0][0]
            relisted += conn.execute(f"SELECT count(*) FROM {walk} WHERE NOT descend").fetchall()[0][0]
            shrunk += conn.execute(
                f"SELECT count(*) FROM {walk} WHERE old_size > $max AND new_size <= $max", {"max": max_bucket}
            ).fetchall()[0][0]
    depths = conn.execute(
        f"SELECT max(octet_length(suffix)) // {dedup_tables.band_key_bytes(cfg)} "
        f"FROM {dedup_tables.BUCKET_STATE.qualified}"
    ).fetchall()
    assert depths == [(deepest,)]  # buckets split this deep (the second and third cases: down to the last depth)
    assert relisted > 0 and shrunk > 0 and (walked > 0 or split_bands == 0)


def test_paths_going_round_the_bands_more_than_once(monkeypatch) -> None:
    """Two bands (8 permutations at an LSH threshold of 0.7) split by three more: a bucket's path from band 1 goes
    through bands 1, 0, 1, 0, so a row's keys along it wrap past the last band twice. Groups of rows with one
    signature fill buckets split down to the last depth; rows added to them meet the state's rows there, and the
    candidates and the whole state are a full listing's. A state whose band table was emptied outside a run is not
    trusted: the next run lists in full."""
    monkeypatch.setattr(dedup, "MAX_BUCKET", 2)
    cfg = MinHashConfig(num_perm=8, lsh_threshold=0.7)
    assert dedup.lsh_bands(cfg)[0] == 2
    rng = np.random.default_rng(11)
    groups = rng.integers(0, 2**32, size=(6, cfg.num_perm), dtype=np.uint64).astype(np.uint32)
    pool = np.concatenate([np.repeat(groups, 8, axis=0), clumped_signatures(rng, 48, cfg, 2)])
    rows = [sft(f"row{i:03d}", "Say something.", f"text {i}") for i in range(len(pool))]
    sigs = {r["id"]: s for r, s in zip(rows, pool, strict=True)}
    configs = {"sft": cfg}
    conn = with_planted_signatures([r for i, r in enumerate(rows) if i % 8 != 7], sigs, cfg)
    dedup_staged(conn, {"sft"}, processes=1, batch_rows=40, cfg=configs)
    restage(conn, rows)
    refresh = dedup_staged(conn, {"sft"}, processes=1, batch_rows=40, cfg=configs)
    assert refresh.candidates.reused > 0  # a refresh: some survivors' buckets came from the state
    expected = expected_candidate_ids(rows, sigs, cfg)
    assert candidate_ids(conn) == expected and len(expected) > 6 * 28
    fresh = with_planted_signatures(rows, sigs, cfg)
    dedup_staged(fresh, {"sft"}, processes=1, batch_rows=40, cfg=configs)
    state_key = {"key": dedup_tables.candidate_state_key("sft", cfg)}
    for table in dedup_tables.CANDIDATE_STATE_TABLES:
        query = f"SELECT * EXCLUDE (stage_key) FROM {table.qualified} WHERE stage_key = $key ORDER BY ALL"
        assert conn.execute(query, state_key).fetchall() == fresh.execute(query, state_key).fetchall(), table.name
    walk = f"SELECT start_band, octet_length(suffix) // {dedup_tables.band_key_bytes(cfg)} AS depth, old_size"
    relisted = conn.execute(f"{walk} FROM {dedup_tables.NEAR_WALK.qualified} WHERE NOT descend").fetchall()
    assert (1, 3, 8 - 1) in relisted  # a group's bucket from band 1 at the last depth, listed before

    conn.execute(f"DELETE FROM {dedup_tables.BAND_STATE.qualified}")
    again = dedup_staged(conn, {"sft"}, processes=1, batch_rows=40, cfg=configs)
    assert again.candidates.reused == 0  # listed in full
    assert candidate_ids(conn) == expected


def test_a_row_added_to_a_giant_bucket_reads_only_its_path() -> None:
    """300 rows share their band-0 key and nothing else: the start bucket is split by band 1 into single rows. A
    row added to it (with a band-1 key of its own) and one added beside a row of it are walked down their paths:
    the start bucket's other rows are never read, and the candidates are those of a full listing."""
    cfg = MinHashConfig()
    _bands, r = dedup.lsh_bands(cfg)
    rng = np.random.default_rng(5)
    sigs_matrix = rng.integers(0, 2**32, size=(303, cfg.num_perm), dtype=np.uint64).astype(np.uint32)
    sigs_matrix[:302, :r] = 7  # band 0: one key for all but the last row
    sigs_matrix[301, r : 2 * r] = sigs_matrix[5, r : 2 * r]  # band 1: row 301 meets row 5 below the start bucket
    sigs_matrix[302] = np.where(rng.random(cfg.num_perm) < 0.05, sigs_matrix[302], sigs_matrix[9])  # near row 9
    sigs_matrix[302, :r] = 8
    rows = [sft(f"row{i:03d}", "Say something.", f"text {i}") for i in range(303)]
    sigs = {row["id"]: sig for row, sig in zip(rows, sigs_matrix, strict=True)}
    conn = with_planted_signatures(rows[:300], sigs, cfg)
    dedup_staged(conn, {"sft"}, processes=1, batch_rows=50)

    restage(conn, rows)
    dedup_staged(conn, {"sft"}, processes=1, batch_rows=50)
    assert candidate_ids(conn) == expected_candidate_ids(rows, sigs, cfg)
    assert ("row009", "row302") in candidate_ids(conn)
    read = conn.execute(
        f"SELECT DISTINCT d.id FROM {dedup_tables.NEAR_SIGNATURES.qualified} "
        f"JOIN {dedup_tables.DEDUP_ROWS.qualified} d USING (seq) ORDER BY ALL"
    ).fetchall()
    # the three added rows, row 5 (row 301's bucket below the start bucket) and row 9 (row 302's in other bands)
    assert [r[0] for r in read] == ["row005", "row009", "row300", "row301", "row302"]
    placed = conn.execute(f"SELECT count(DISTINCT seq) FROM {dedup_tables.NEAR_BANDS.qualified}").fetchall()
    assert placed == [(3,)]  # only the added rows' band keys: no bucket holding a row of the state is split again


def with_planted_signatures(
    rows: list[dict[str, Any]], sigs: dict[str, np.ndarray], cfg: MinHashConfig
) -> duckdb.DuckDBPyConnection:
    """``rows`` staged (staged_connection), with the signatures ``sigs`` (by id, of these rows and others) in the
    signature cache under ``cfg``'s key: runs list candidates of the planted signatures."""
    conn = staged_connection(rows, by_priority)
    conn.execute(dedup_tables.SIGNATURE_CACHE.create_sql())
    key = dedup_tables.signature_stage_key(cfg)
    conn.executemany(
        f"INSERT INTO {dedup_tables.SIGNATURE_CACHE.qualified} VALUES (?, ?, ?, NULL)",
        [(key, rid, sig.tolist()) for rid, sig in sigs.items()],
    )
    return conn


def sharing_a_start_bucket(
    rows: list[dict[str, Any]], changed: set[str], sigs: dict[str, np.ndarray], cfg: MinHashConfig
) -> set[str]:
    """The ids of ``rows`` that share a band key (a bucket at depth 0) with a row of ``changed``."""
    bands, r = dedup.lsh_bands(cfg)

    def keys(rid: str) -> set[tuple[int, bytes]]:
        return {(band, sigs[rid][band * r : (band + 1) * r].tobytes()) for band in range(bands)}

    changed_keys = set().union(*(keys(rid) for rid in changed))
    return {row["id"] for row in rows if keys(row["id"]) & changed_keys}


def restage(conn: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> None:
    """Replace the staged rows of ``conn`` (as staged_connection stages them)."""
    fresh = staged_connection(rows, by_priority)
    staged = fresh.sql("SELECT * FROM staged").to_arrow_table()
    conn.register("restaged", staged)
    conn.execute("CREATE OR REPLACE TABLE staged AS SELECT * FROM restaged")
    conn.unregister("restaged")
