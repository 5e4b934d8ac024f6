"""Exact-normalised and near-duplicate dedup of one regime as set operations over DuckDB tables.

The silver pass deduplicates each regime with :func:`deduplicate_regime_tables`. The rules are those of
:mod:`posttrain_assets.cleaning.dedup` and so is the outcome (the same rows dropped onto the same kept rows, with
the same similarities: tests compare it with ``dedup.deduplicate``), but no step holds a regime's rows in this
process: the per-regime state lives in work tables, the Python work runs one batch at a time in worker processes
(``parallel.map_batches``, Arrow in and out), and only the rows of verified pairs are held, in a union-find.

1. **Exact** (SQL): every row points at the lowest kept rank among the rows of its exact key (``dedup_rows``).
2. **Signatures** (workers, :func:`signature_batch`): the MinHash signatures of the exact survivors' dedup units
   and their LSH band keys (the ``r`` values of each band, as bytes: equal keys are equal values, no hash that
   could collide), appended to ``near_signatures`` and ``near_bands``.
3. **Candidates** (SQL): rows sharing a bucket (``GROUP BY band, band_key``); a bucket of more than
   ``dedup.MAX_BUCKET`` rows is split by the keys of the next bands, up to ``dedup.MAX_SPLIT_BANDS`` of them, as
   ``dedup.candidate_pairs`` splits it. The pairs of the listed buckets whose signatures agree on at least the
   net's threshold of their slots, and whose same keys agree (RL: ``dedup.same_key_hash``; verification never
   joins rows whose keys differ, and ``dedup.candidate_pairs`` leaves them out), are the candidates
   (``near_candidates``): DuckDB lists the pairs of one start band at a time and drops those whose
   one-character-per-slot sketches (:func:`sketch_of`) already fall short; the few left get the exact estimate
   (:func:`estimated_at_least`). The survivors (their band keys, per band and in one piece, and sketches), every
   bucket of two rows or more with its size and the listed buckets' candidate pairs are kept between runs
   (:data:`SURVIVOR_STATE`, :data:`BAND_STATE`, :data:`BUCKET_STATE`, :data:`PAIR_STATE`): a bucket's pairs depend
   only on its rows, so a run follows each survivor added or removed since down its path in every start band
   (:func:`walk_changed_paths`), lists again from its rows the first bucket on the path that was not split before
   and after, there pairs only the added rows in a bucket it knows (whole a bucket it does not), and takes the
   other pairs from the state (the full listing when there is no state for the config).
4. **Verification** (workers, :func:`verify_batch`): candidate pairs in order, a chunk at a time with the texts
   of their rows, checked by the rules of ``MinHashConfig``; verified pairs are joined in a union-find over their
   rows. A pair whose rows are already joined is not compared (a cluster of k copies costs about k comparisons).
5. **Kept** (SQL, then workers): the lowest kept rank of each cluster is kept; every other member's edit
   similarity to it is computed (:func:`similarity_batch`) and the dropped rows are written, an exact twin of a
   near-dropped row pointing at the final kept row (as ``dedup.resolve_chains``).

Which pairs are compared depends on the order results come back in, but not the clusters: a cluster is a
connected component of the verified candidate pairs, so the outcome does not depend on the number of processes
or the batch sizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from posttrain_assets.cleaning import dedup
from posttrain_assets.cleaning.dedup import (
    METHOD_EXACT,
    METHOD_NEAR,
    MinHashConfig,
    UnitWords,
    dedup_unit,
    edit_similarity,
    guard_text,
    lsh_bands,
    minhash_signatures,
    near_duplicate_words,
    rl_same_key,
    same_key_hash,
    tokens,
    unit_words,
)
from posttrain_assets.parallel import map_batches, processes_for
from posttrain_assets.warehouse.io import (
    WORKER_LOOP_MEMORY_LIMIT,
    fetch_arrow,
    insert_arrow,
    memory_limit_at_most,
    transaction,
)
from posttrain_assets.warehouse.model import Column, Table
from posttrain_assets.warehouse.stage_cache import (
    CACHE_SCHEMA,
    Reuse,
    code_fingerprint,
    ensure_cache_table,
    library_versions,
    stage_key,
)

WORK_SCHEMA = "work"
# The columns dedup units are built from (dedup.dedup_unit, guard_text, rl_same_key), with the row's key.
UNIT_COLUMNS = ("seq", "regime", "messages", "prompt", "chosen", "rejected", "answer")
# Candidate pairs per verification item; with their rows' texts (at most twice as many rows) this is what one
# worker holds. The texts are looked up by seq, which an index answers for up to index_scan_max_count rows. A
# worker holds its rows as word lists (Python strings): 8,192 multi-turn chats of the benchmark corpus (45 MiB as
# Arrow) took 478 MiB so, 4,096 about half (measured); 4,096 pairs held two workers near 500 MiB each at 1M.
CHUNK_PAIRS = 2048

DEDUP_ROWS = Table(
    WORK_SCHEMA,
    "dedup_rows",
    "The rows of the regime being deduplicated, with their kept rank and their exact group's kept row.",
    (
        Column("seq", "BIGINT", "the staged row", False),
        Column("id", "VARCHAR", "its record id", False),
        Column("kept_rank", "BIGINT", "its place in the kept order (dedup.kept_sort_key); lowest is kept", False),
        Column("exact_kept", "BIGINT", "seq of the lowest-ranked row of its exact key (itself: a survivor)", False),
    ),
)
NEAR_SIGNATURES = Table(
    WORK_SCHEMA,
    "near_signatures",
    "MinHash signatures of the exact survivors' dedup units (dedup.minhash_signatures).",
    (
        Column("seq", "BIGINT", "the staged row", False),
        Column(
            "signature",
            "UINTEGER[]",
            "num_perm slot values (32-bit in either permutation scheme); null for a row placed from the candidate "
            "state (SURVIVOR_STATE), whose signature the signature cache holds",
        ),
        Column("sketch", "VARCHAR", "one ASCII character per slot (sketch_of): equal slots, equal characters", False),
        Column("same_key", "BIGINT", "dedup.same_key_hash of the row (RL); null in a regime without same keys"),
        Column(
            "band_keys",
            "BLOB",
            "its band keys of every band in band order, concatenated; null for a row placed from the candidate state",
        ),
    ),
)
NEAR_BANDS = Table(
    WORK_SCHEMA,
    "near_bands",
    "LSH band keys of the exact survivors: one row per (row, band).",
    (
        Column("seq", "BIGINT", "the staged row", False),
        Column("band", "INTEGER", "band number, 0 .. bands - 1 (dedup.lsh_bands)", False),
        Column("band_key", "BLOB", "the band's r signature values, 4 bytes each: equal keys, same bucket", False),
    ),
)
NEAR_LISTED = Table(
    WORK_SCHEMA,
    "near_listed",
    "Rows of the LSH buckets whose pairs are listed: a bucket of two to MAX_BUCKET rows, or a split one. A bucket "
    "is (start_band, start_key, suffix): its path is start_key || suffix.",
    (
        Column("start_band", "INTEGER", "the band the bucket was first formed in", False),
        Column("start_key", "BLOB", "the rows' band key in the start band", False),
        Column(
            "suffix", "BLOB", "band keys of each band the bucket was split by, concatenated (empty: not split)", False
        ),
        Column("seq", "BIGINT", "the staged row", False),
    ),
)
NEAR_SPLIT = Table(
    WORK_SCHEMA,
    "near_split",
    "Rows of the LSH buckets of more than MAX_BUCKET rows of the level just listed: split by the next band.",
    NEAR_LISTED.columns,
)
NEAR_LEVEL = Table(
    WORK_SCHEMA,
    "near_level",
    "Rows of the LSH buckets of two or more rows of the current level (in a refresh, buckets listed again may sit "
    "at different depths), with the bucket's size.",
    (*NEAR_LISTED.columns, Column("size", "BIGINT", "rows in the bucket", False)),
)
NEAR_SKETCH_PAIRS = Table(
    WORK_SCHEMA,
    "near_sketch_pairs",
    "Pairs (a < b) of a listed bucket whose sketches agree on enough slots, per start band (a pair may repeat "
    "under other start bands).",
    (
        Column("start_band", "INTEGER", "the band of the bucket the pair was listed in", False),
        Column("a", "BIGINT", "the staged row of lower seq", False),
        Column("b", "BIGINT", "the other row", False),
    ),
)
NEAR_CANDIDATES = Table(
    WORK_SCHEMA,
    "near_candidates",
    "Candidate near-duplicate pairs (a < b): in a listed bucket, signatures agreeing on the net's threshold.",
    (Column("a", "BIGINT", "the staged row of lower seq", False), Column("b", "BIGINT", "the other row", False)),
)
NEAR_ADDED = Table(
    WORK_SCHEMA,
    "near_added",
    "Exact survivors the candidate state does not hold (new contents, or rows no longer an exact twin's copy).",
    (Column("seq", "BIGINT", "the staged row", False), Column("id", "VARCHAR", "its record id", False)),
)
NEAR_REMOVED = Table(
    WORK_SCHEMA,
    "near_removed",
    "Records of the candidate state that are no longer exact survivors (removed, or now an exact twin's copy).",
    (Column("id", "VARCHAR", "record id", False),),
)
NEAR_CHANGED = Table(
    WORK_SCHEMA,
    "near_changed",
    "Band keys of the rows added to or removed from the candidate state: one row per (row, band).",
    (
        Column("id", "VARCHAR", "record id", False),
        Column("delta", "INTEGER", "1: added, -1: removed", False),
        Column("band", "INTEGER", "band number", False),
        Column("band_key", "BLOB", "the band's key", False),
    ),
)
NEAR_PATHS = Table(
    WORK_SCHEMA,
    "near_paths",
    "The buckets an added or removed row is in, per start band, from depth 0 down while the bucket above stays "
    "split: (start_band, start_key, suffix) as in near_listed.",
    (
        Column("id", "VARCHAR", "record id", False),
        Column("delta", "INTEGER", "1: added, -1: removed", False),
        *NEAR_LISTED.columns[:3],
    ),
)
NEAR_WALK = Table(
    WORK_SCHEMA,
    "near_walk",
    "Buckets on the paths of added and removed rows, with their size in the state and now: a bucket split before "
    "and after is walked through (only the bucket below on each path changes); any other is listed again.",
    (
        *NEAR_LISTED.columns[:3],
        Column("old_size", "BIGINT", "its rows in the state (null: the state has no bucket of two rows there)"),
        Column("new_size", "BIGINT", "its rows now (null when old_size is)"),
        Column("added", "BIGINT", "added rows in it", False),
        Column("descend", "BOOLEAN", "split in the state and now: the buckets below on the paths are walked", False),
    ),
)
NEAR_OLD_NODES = Table(
    WORK_SCHEMA,
    "near_old_nodes",
    "The state's buckets at and below the buckets listed again: replaced by this run's.",
    (*NEAR_LISTED.columns[:3], Column("listed", "BOOLEAN", "its pairs were listed (not split)", False)),
)
NEAR_STALE = Table(
    WORK_SCHEMA,
    "near_stale",
    "The state's listed buckets below the buckets listed again that are not listed now: their pairs are dropped.",
    NEAR_LISTED.columns[:3],
)
NEAR_NODES = Table(
    WORK_SCHEMA,
    "near_nodes",
    "Every LSH bucket of two rows or more this run formed, at every split depth, with its size.",
    (*NEAR_LISTED.columns[:3], Column("size", "BIGINT", "rows in the bucket", False)),
)
NEAR_RELISTED = Table(
    WORK_SCHEMA,
    "near_relisted",
    "Listed buckets whose pairs are listed this run: whole, when the state did not list them; else the pairs of "
    "their added rows (the others are the state's).",
    (
        Column("start_band", "INTEGER", "the band the bucket was first formed in", False),
        Column("start_key", "BLOB", "the rows' band key in the start band", False),
        Column("suffix", "BLOB", "band keys of the bands it was split by", False),
        Column("whole", "BOOLEAN", "every pair listed (a bucket new to the state), not only an added row's", False),
    ),
)
NEAR_KEPT_PAIRS = Table(
    WORK_SCHEMA,
    "near_kept_pairs",
    "Candidate pairs (a < b) of the state whose bucket is not listed again whole and whose rows both survive.",
    (Column("a", "BIGINT", "the staged row of lower seq", False), Column("b", "BIGINT", "the other row", False)),
)
NEAR_CACHED_VERDICTS = Table(
    WORK_SCHEMA,
    "near_cached_verdicts",
    "The candidate pairs with the verdict the pair cache holds for their two records (null: none).",
    (
        Column("a", "BIGINT", "the staged row of lower seq", False),
        Column("b", "BIGINT", "the other row", False),
        Column("near", "BOOLEAN", "the cached verdict, or null"),
    ),
)
NEAR_JOINED = Table(
    WORK_SCHEMA,
    "near_joined",
    "Rows joined by the cached near verdicts, with their cluster so far (before this run's comparisons).",
    (Column("seq", "BIGINT", "the staged row", False), Column("cluster", "BIGINT", "its cluster so far", False)),
)
NEAR_VERDICTS = Table(
    WORK_SCHEMA,
    "near_verdicts",
    "The candidate pairs compared this run, with their verdict (then added to the pair cache).",
    (
        Column("a", "BIGINT", "the staged row of lower seq", False),
        Column("b", "BIGINT", "the other row", False),
        Column("near", "BOOLEAN", "a near duplicate by the regime's rules", False),
    ),
)
NEAR_CLUSTERS = Table(
    WORK_SCHEMA,
    "near_clusters",
    "Rows of verified near-duplicate pairs with their cluster (a union-find root; a seq of the cluster).",
    (Column("seq", "BIGINT", "the staged row", False), Column("cluster", "BIGINT", "its cluster", False)),
)
NEAR_MEMBERS = Table(
    WORK_SCHEMA,
    "near_members",
    "Every member of a near-duplicate cluster but its kept row, with the kept row and the similarity the similarity "
    "cache holds for the two records (null: to compute).",
    (
        Column("seq", "BIGINT", "the member", False),
        Column("kept_seq", "BIGINT", "the lowest-ranked row of its cluster", False),
        Column("similarity", "DOUBLE", "cached token edit similarity to the kept row, or null"),
    ),
)
NEAR_DROPPED = Table(
    WORK_SCHEMA,
    "near_dropped",
    "Rows dropped as near duplicates: the kept row of their cluster and the edit similarity to it.",
    (
        Column("seq", "BIGINT", "the dropped row", False),
        Column("kept_seq", "BIGINT", "the lowest-ranked row of its cluster", False),
        Column("similarity", "DOUBLE", "token edit similarity to the kept row (dedup.edit_similarity)", False),
    ),
)
TABLES = (
    DEDUP_ROWS,
    NEAR_SIGNATURES,
    NEAR_BANDS,
    NEAR_LISTED,
    NEAR_SPLIT,
    NEAR_LEVEL,
    NEAR_SKETCH_PAIRS,
    NEAR_CANDIDATES,
    NEAR_ADDED,
    NEAR_REMOVED,
    NEAR_CHANGED,
    NEAR_PATHS,
    NEAR_WALK,
    NEAR_OLD_NODES,
    NEAR_STALE,
    NEAR_NODES,
    NEAR_RELISTED,
    NEAR_KEPT_PAIRS,
    NEAR_CACHED_VERDICTS,
    NEAR_JOINED,
    NEAR_VERDICTS,
    NEAR_CLUSTERS,
    NEAR_MEMBERS,
    NEAR_DROPPED,
)

# The regime's rows from the caller's ranked query (seq, id, exact_key, kept_rank), each pointing at the lowest
# kept rank of its exact key.
EXACT_GROUPS = f"""
INSERT INTO {DEDUP_ROWS.qualified}
SELECT seq, id, kept_rank, arg_min(seq, kept_rank) OVER (PARTITION BY exact_key) FROM ({{ranked}})
"""
SURVIVORS = f"SELECT seq FROM {DEDUP_ROWS.qualified} WHERE seq = exact_kept"

# ---------------------------------------------------------------------------------------------------------------
# the signature cache (schema ``cache``, kept between runs; warehouse.stage_cache explains the keys)
# ---------------------------------------------------------------------------------------------------------------

# A dedup unit is built from the record's content (its id is a hash of it), so its signature depends on the id, the
# MinHash config and the code that shingles and hashes it; so does its same key (the hash of dedup.rl_same_key),
# kept beside it. Band keys and sketches are cheap functions of the signature and are derived again each run
# (signature_tables).
SIGNATURE_CODE = ("posttrain_assets.cleaning.dedup", "posttrain_assets.text")
SIGNATURE_LIBRARIES = ("datasketch", "numpy")
SIGNATURE_CACHE = Table(
    CACHE_SCHEMA,
    "near_signatures",
    "MinHash signatures of dedup units by (stage key, record id): computed once per content and MinHash config.",
    (
        Column("stage_key", "VARCHAR", "signature stage key (dedup_tables.signature_stage_key)", False),
        Column("id", "VARCHAR", "record id", False),
        Column("signature", "UINTEGER[]", "num_perm slot values", False),
        Column("same_key", "BIGINT", "dedup.same_key_hash of the record (RL); null without a same key"),
    ),
)


# A pair's verdict depends on the two records' contents (their ids), the regime's rules and whether rows carry a
# same key, and the code that compares them.
PAIR_CODE = SIGNATURE_CODE + ("posttrain_assets.cleaning.dedup_tables",)
PAIR_LIBRARIES = ("rapidfuzz", "numpy")
PAIR_CACHE = Table(
    CACHE_SCHEMA,
    "near_pairs",
    "Verdicts of compared candidate pairs by (stage key, the two record ids): a pair is compared once per rules.",
    (
        Column("stage_key", "VARCHAR", "pair stage key (dedup_tables.pair_stage_key)", False),
        Column("id_low", "VARCHAR", "the lower of the two record ids", False),
        Column("id_high", "VARCHAR", "the higher one", False),
        Column("near", "BOOLEAN", "a near duplicate by the rules", False),
    ),
)


def pair_stage_key(cfg: MinHashConfig, keyed: bool) -> str:
    """Everything a pair's verdict depends on besides the two records: the whole MinHash config (thresholds and
    rules), whether rows carry a same key (RL), the code and the libraries that compare them."""
    return stage_key(
        "near_dedup_pairs",
        minhash=cfg,
        keyed=keyed,
        code=code_fingerprint(*PAIR_CODE),
        libraries=library_versions(*PAIR_LIBRARIES),
    )


# A dropped member's edit similarity to its kept row depends on the two records' contents (their ids) and the code
# that builds their dedup units and measures the similarity; not on the thresholds (they decide who is clustered,
# not how similar two given rows are).
SIMILARITY_CODE = SIGNATURE_CODE + ("posttrain_assets.cleaning.dedup_tables",)
SIMILARITY_LIBRARIES = ("rapidfuzz",)
SIMILARITY_CACHE = Table(
    CACHE_SCHEMA,
    "near_similarities",
    "Edit similarities of dropped near duplicates to their kept rows by (stage key, the two record ids): computed "
    "once per pair of contents.",
    (
        Column("stage_key", "VARCHAR", "similarity stage key (dedup_tables.similarity_stage_key)", False),
        Column("member_id", "VARCHAR", "the dropped record", False),
        Column("kept_id", "VARCHAR", "the kept record", False),
        Column("similarity", "DOUBLE", "token edit similarity (dedup.edit_similarity)", False),
    ),
)


def similarity_stage_key() -> str:
    """Everything a member's similarity to its kept row depends on besides the two records: the code and the
    libraries that build the units and compare them."""
    return stage_key(
        "near_dedup_similarities",
        code=code_fingerprint(*SIMILARITY_CODE),
        libraries=library_versions(*SIMILARITY_LIBRARIES),
    )


def signature_stage_key(cfg: MinHashConfig) -> str:
    """Everything a signature depends on besides the record's content: the candidate shingles and the permutations
    (not the thresholds, so a new dedup threshold re-clusters from the same signatures)."""
    return stage_key(
        "near_dedup_signatures",
        shingle_words=cfg.candidate_shingle_words,
        num_perm=cfg.num_perm,
        seed=cfg.seed,
        scheme=cfg.scheme,
        code=code_fingerprint(*SIGNATURE_CODE),
        libraries=library_versions(*SIGNATURE_LIBRARIES),
    )


# The candidate state: a regime's exact survivors with their band keys (per band, and per row in one piece with its
# sketch and same key), every bucket of two rows or more at every split depth with its size, and the candidate
# pairs of the listed buckets, as the last run left them. Candidates are a function of the survivors' signatures
# and the bucket rules alone, and a bucket's pairs depend only on its rows. So a run follows each added or removed
# survivor down its path in each start band (issue 23): a bucket split in the state and still split now (its size
# stays above MAX_BUCKET) is walked through, since only the bucket below on the row's path changes; the first
# bucket on a path that is not (listed before or now, or new) is listed again from its rows, found through the
# state's band keys. A bucket listed before and now keeps the
# state's pairs less those of removed rows and gets the pairs of its added rows; any other is listed whole. The
# pairs of every bucket off the paths are the state's. A giant start bucket (short bands of common words hold
# tens of thousands of rows at a million chats) thus costs the buckets on a changed row's path, not its rows.
# The tables are replaced together in one transaction, so the state always describes one survivor set.
CANDIDATE_CODE = SIGNATURE_CODE + ("posttrain_assets.cleaning.dedup_tables",)
BAND_STATE = Table(
    CACHE_SCHEMA,
    "near_band_state",
    "LSH band keys of each regime's exact survivors as of the last run's candidates: one row per (record, band).",
    (
        Column("stage_key", "VARCHAR", "the regime's candidate state key (dedup_tables.candidate_state_key)", False),
        Column("id", "VARCHAR", "record id of an exact survivor", False),
        Column("band", "INTEGER", "band number", False),
        Column("band_key", "BLOB", "the band's r signature values, 4 bytes each", False),
    ),
)
SURVIVOR_STATE = Table(
    CACHE_SCHEMA,
    "near_survivor_state",
    "Each regime's exact survivors as of the last run's candidates, one row per record, with what listing pairs reads "
    "of it: its band keys of every band in one piece (its keys along a bucket's path are one slice), sketch and "
    "same key.",
    (
        Column("stage_key", "VARCHAR", "the regime's candidate state key (dedup_tables.candidate_state_key)", False),
        Column("id", "VARCHAR", "record id of an exact survivor", False),
        Column(
            "band_keys",
            "BLOB",
            "the band keys of bands 0 .. bands - 1 concatenated: band b's is bytes b * key_bytes + 1 .. (b + 1) * "
            "key_bytes",
            False,
        ),
        Column("sketch", "VARCHAR", "its sketch (sketch_of)", False),
        Column("same_key", "BIGINT", "dedup.same_key_hash of the record (RL); null without a same key"),
    ),
)
PAIR_STATE = Table(
    CACHE_SCHEMA,
    "near_candidate_state",
    "Candidate pairs of each regime as of the last run, with the listed bucket each was listed in (once per bucket).",
    (
        Column("stage_key", "VARCHAR", "the regime's candidate state key (dedup_tables.candidate_state_key)", False),
        Column("start_band", "INTEGER", "band of the bucket the pair was listed in", False),
        Column("band_key", "BLOB", "the start bucket's key (both rows' key in start_band)", False),
        Column("suffix", "BLOB", "the keys of the bands the bucket was split by (empty: listed unsplit)", False),
        Column("id_low", "VARCHAR", "the lower of the two record ids", False),
        Column("id_high", "VARCHAR", "the higher one", False),
    ),
)
BUCKET_STATE = Table(
    CACHE_SCHEMA,
    "near_bucket_state",
    "Every LSH bucket of two rows or more of each regime as of the last run, at every split depth, with its size: "
    "a bucket of more than MAX_BUCKET rows above the last depth was split, any other listed.",
    (
        Column("stage_key", "VARCHAR", "the regime's candidate state key (dedup_tables.candidate_state_key)", False),
        Column("start_band", "INTEGER", "band the bucket was first formed in", False),
        Column("band_key", "BLOB", "its rows' key in start_band", False),
        Column("suffix", "BLOB", "the keys of the bands it was split by (empty: a bucket of start_band)", False),
        Column("size", "BIGINT", "its rows", False),
    ),
)
# The candidate state's tables, replaced together.
CANDIDATE_STATE_TABLES = (SURVIVOR_STATE, BAND_STATE, BUCKET_STATE, PAIR_STATE)


def candidate_state_key(regime: str, cfg: MinHashConfig) -> str:
    """What a regime's candidate pairs depend on besides its survivors: their signatures (the signature stage
    key), the net's threshold and bands, the bucket limits and the code that lists the pairs."""
    return stage_key(
        "near_dedup_candidates",
        regime=regime,
        signatures=signature_stage_key(cfg),
        minhash=cfg,
        max_bucket=dedup.MAX_BUCKET,
        max_split_bands=dedup.MAX_SPLIT_BANDS,
        code=code_fingerprint(*CANDIDATE_CODE),
    )


def _uncached_units(records: str) -> str:
    """The unit columns (from ``records``) of the exact survivors whose signature the cache does not hold under
    ``$key``."""
    return f"""
    SELECT {", ".join(UNIT_COLUMNS)} FROM {records} s
    WHERE seq IN ({SURVIVORS})
      AND NOT EXISTS (SELECT 1 FROM {SIGNATURE_CACHE.qualified} c WHERE c.stage_key = $key AND c.id = s.id)
    """


def _cached_signatures(rows: str) -> str:
    """The seq and cached signature (under ``$key``) of the rows the query ``rows`` lists, unless this run already
    placed them in near_signatures."""
    return f"""
    SELECT d.seq, c.signature, c.same_key FROM {DEDUP_ROWS.qualified} d
    JOIN {SIGNATURE_CACHE.qualified} c ON c.stage_key = $key AND c.id = d.id
    WHERE d.seq IN ({rows}) AND d.seq NOT IN (SELECT seq FROM {NEAR_SIGNATURES.qualified})
    """


# Whether the state holds survivors under $state, each with its row of band 0: the survivor and band tables are
# replaced together, so they disagree only when one was dropped or emptied outside a run (then a full listing).
STATE_HOLDS = f"""
SELECT count(*) > 0 AND count(*) = (
    SELECT count(*) FROM {BAND_STATE.qualified} WHERE stage_key = $state AND band = 0
) FROM {SURVIVOR_STATE.qualified} WHERE stage_key = $state
"""
# The state's diff with this run's survivors: survivors it lacks, and its records no longer survivors.
ADDED_SURVIVORS = f"""
INSERT INTO {NEAR_ADDED.qualified}
SELECT d.seq, d.id FROM {DEDUP_ROWS.qualified} d
WHERE d.seq = d.exact_kept AND NOT EXISTS (
    SELECT 1 FROM {SURVIVOR_STATE.qualified} k WHERE k.stage_key = $state AND k.id = d.id
)
"""
REMOVED_SURVIVORS = f"""
INSERT INTO {NEAR_REMOVED.qualified}
SELECT k.id FROM {SURVIVOR_STATE.qualified} k
WHERE k.stage_key = $state AND NOT EXISTS (
    SELECT 1 FROM {DEDUP_ROWS.qualified} d WHERE d.seq = d.exact_kept AND d.id = k.id
)
"""


def _listed(size: str, suffix: str) -> str:
    """SQL: whether a bucket of ``size`` rows whose split suffix is ``suffix`` has its pairs listed (at most
    MAX_BUCKET rows, or at the last split depth) rather than being split by the next band (dedup.candidate_pairs'
    rule; the query binds $max_bucket, $max_depth and $key_bytes)."""
    return f"({size} <= $max_bucket OR octet_length({suffix}) >= $max_depth * $key_bytes)"


# The band keys of the added rows (in near_bands by now) and of the removed ones (in the state).
CHANGED_BANDS = f"""
INSERT INTO {NEAR_CHANGED.qualified}
SELECT a.id, 1, n.band, n.band_key FROM {NEAR_BANDS.qualified} n JOIN {NEAR_ADDED.qualified} a USING (seq)
UNION ALL
SELECT b.id, -1, b.band, b.band_key FROM {BAND_STATE.qualified} b JOIN {NEAR_REMOVED.qualified} r USING (id)
WHERE b.stage_key = $state
"""
# The bucket of each changed row at depth 0 in every start band; then, below each bucket walked through at depth
# $depth - 1, the bucket at $depth (the key of band start_band + $depth appended to the suffix).
PATHS_AT_START = f"""
INSERT INTO {NEAR_PATHS.qualified} SELECT id, delta, band, band_key, ''::BLOB FROM {NEAR_CHANGED.qualified}
"""
PATHS_BELOW = f"""
INSERT INTO {NEAR_PATHS.qualified}
SELECT p.id, p.delta, p.start_band, p.start_key, p.suffix || c.band_key
FROM {NEAR_PATHS.qualified} p
SEMI JOIN (SELECT * FROM {NEAR_WALK.qualified} WHERE descend) w USING (start_band, start_key, suffix)
JOIN {NEAR_CHANGED.qualified} c ON c.id = p.id AND c.band = (p.start_band + $depth) % $bands
WHERE octet_length(p.suffix) = ($depth - 1) * $key_bytes
"""
# The buckets at $depth on the paths with their size in the state and now (added less removed rows: every added
# row is new to the bucket, every removed one was in it); walked through when split in both.
WALK_AT_DEPTH = f"""
INSERT INTO {NEAR_WALK.qualified}
WITH buckets AS (
    SELECT start_band, start_key, suffix, sum(delta) AS delta, count(*) FILTER (WHERE delta > 0) AS added
    FROM {NEAR_PATHS.qualified} WHERE octet_length(suffix) = $depth * $key_bytes
    GROUP BY start_band, start_key, suffix
)
SELECT b.start_band, b.start_key, b.suffix, s.size, s.size + b.delta, b.added,
    coalesce(NOT {_listed("s.size", "b.suffix")} AND NOT {_listed("s.size + b.delta", "b.suffix")}, false)
FROM buckets b LEFT JOIN {BUCKET_STATE.qualified} s
  ON s.stage_key = $state AND s.start_band = b.start_band AND s.band_key = b.start_key AND s.suffix = b.suffix
"""
# The buckets listed again from their rows: the first on a path not walked through, when the state has it or it
# gains a row (a bucket the state lacks had one row at most; with none added, it has nothing to list).
RELISTED_ROOTS = f"""
SELECT start_band, start_key, suffix FROM {NEAR_WALK.qualified}
WHERE NOT descend AND (old_size IS NOT NULL OR added > 0)
"""
# Their rows now, with their size (two or more): the state's rows of the bucket, less the removed ones, and the
# added rows on it. A bucket at depth 0 is a band key; the state's rows of a deeper one are those whose keys along
# its path are the bucket's. They are looked for in the band of the path whose bucket at depth 0 is the smallest
# (its seed; a bucket the state lacks holds one row at most): each seed's rows are read once per start band and
# depth that looks in it, not once per bucket (many deep buckets may share one large seed), their keys along the
# path are sliced from their band keys in one piece (SURVIVOR_STATE; a path past the last band goes on at band 0:
# sliced from the keys repeated, $wraps times, only for the rows whose path wraps), and that is matched with the
# buckets' (start key, suffix). Joining each row's keys band by band instead (a row per
# row and band of the path, then a grouped concatenation) took 5.9 s of a 10,000-row refresh's SFT candidates at
# 1M, the slices 3.3-4.0 s (163,550 buckets listed again, 3.0 M rows of their seeds looked at).
RELISTED_ROOT_ROWS = f"""
INSERT INTO {NEAR_LEVEL.qualified}
WITH roots AS ({RELISTED_ROOTS}),
path_keys AS (
    SELECT start_band, start_key, suffix, (start_band + i) % $bands AS band,
        CASE WHEN i = 0 THEN start_key ELSE suffix[(i - 1) * $key_bytes + 1 : i * $key_bytes] END AS band_key
    FROM (
        SELECT *, unnest(range(0, octet_length(suffix) // $key_bytes + 1)) AS i FROM roots WHERE suffix <> ''::BLOB
    )
),
seeds AS (
    SELECT k.start_band, octet_length(k.suffix) // $key_bytes AS depth,
        arg_min({{'band': k.band, 'band_key': k.band_key}}, coalesce(s.size, 1)) AS seed
    FROM path_keys k LEFT JOIN {BUCKET_STATE.qualified} s
      ON s.stage_key = $state AND s.start_band = k.band AND s.band_key = k.band_key AND s.suffix = ''::BLOB
    GROUP BY k.start_band, k.start_key, k.suffix
),
looked_at AS (
    SELECT DISTINCT e.start_band, e.depth, b.id
    FROM (SELECT DISTINCT start_band, depth, seed FROM seeds) e
    JOIN {BAND_STATE.qualified} b ON b.stage_key = $state AND b.band = e.seed.band AND b.band_key = e.seed.band_key
),
looked_at_paths AS (
    SELECT l.start_band, l.depth, l.id,
        k.band_keys[l.start_band * $key_bytes + 1 : (l.start_band + 1) * $key_bytes] AS start_key,
        (CASE WHEN l.start_band + l.depth < $bands THEN k.band_keys ELSE repeat(k.band_keys, $wraps) END)
            [(l.start_band + 1) * $key_bytes + 1 : (l.start_band + l.depth + 1) * $key_bytes] AS suffix
    FROM looked_at l JOIN {SURVIVOR_STATE.qualified} k ON k.stage_key = $state AND k.id = l.id
),
state_rows AS (
    SELECT r.start_band, r.start_key, r.suffix, b.id FROM roots r
    JOIN {BAND_STATE.qualified} b ON b.stage_key = $state AND b.band = r.start_band AND b.band_key = r.start_key
    WHERE r.suffix = ''::BLOB
    UNION ALL
    SELECT r.start_band, r.start_key, r.suffix, p.id FROM roots r
    JOIN looked_at_paths p ON p.start_band = r.start_band AND p.start_key = r.start_key AND p.suffix = r.suffix
    WHERE r.suffix <> ''::BLOB
),
rows AS (
    SELECT r.start_band, r.start_key, r.suffix, d.seq FROM state_rows r
    JOIN {DEDUP_ROWS.qualified} d ON d.id = r.id AND d.seq = d.exact_kept
    UNION ALL
    SELECT p.start_band, p.start_key, p.suffix, a.seq FROM {NEAR_PATHS.qualified} p
    SEMI JOIN roots USING (start_band, start_key, suffix)
    JOIN {NEAR_ADDED.qualified} a USING (id)
)
SELECT * FROM (SELECT *, count(*) OVER (PARTITION BY start_band, start_key, suffix) AS size FROM rows) WHERE size > 1
"""
# Every band key of the state's rows of the buckets split again (the next levels group them by further bands),
# unless this run placed the row's bands already (an added row, or one whose signature was computed).
STATE_BANDS_OF_SPLIT_ROWS = f"""
INSERT INTO {NEAR_BANDS.qualified}
WITH rows AS (
    SELECT DISTINCT d.seq, d.id FROM {NEAR_SPLIT.qualified} l JOIN {DEDUP_ROWS.qualified} d USING (seq)
    WHERE NOT EXISTS (SELECT 1 FROM {NEAR_BANDS.qualified} n WHERE n.seq = d.seq)
)
SELECT r.seq, b.band, b.band_key FROM {BAND_STATE.qualified} b JOIN rows r USING (id) WHERE b.stage_key = $state
"""
# The state's buckets at and below the buckets listed again at $depth (the suffix starts with theirs).
STATE_BUCKETS_BELOW = f"""
INSERT INTO {NEAR_OLD_NODES.qualified}
SELECT s.start_band, s.band_key, s.suffix, {_listed("s.size", "s.suffix")}
FROM {BUCKET_STATE.qualified} s
JOIN ({RELISTED_ROOTS}) r
  ON s.start_band = r.start_band AND s.band_key = r.start_key AND s.suffix[1 : $depth * $key_bytes] = r.suffix
WHERE s.stage_key = $state AND octet_length(r.suffix) = $depth * $key_bytes
  AND octet_length(s.suffix) >= $depth * $key_bytes
"""
# The listed buckets whose pairs are listed: whole when the state did not list them; else, when holding an added
# row, the pairs of their added rows (the others are the state's).
RELISTED_BUCKETS = f"""
INSERT INTO {NEAR_RELISTED.qualified}
WITH buckets AS (
    SELECT start_band, start_key, suffix, bool_or(seq IN (SELECT seq FROM {NEAR_ADDED.qualified})) AS grown
    FROM {NEAR_LISTED.qualified} GROUP BY ALL
),
known AS (
    SELECT b.*, EXISTS (
        SELECT 1 FROM {NEAR_OLD_NODES.qualified} o
        WHERE o.listed AND o.start_band = b.start_band AND o.start_key = b.start_key AND o.suffix = b.suffix
    ) AS known
    FROM buckets b
)
SELECT start_band, start_key, suffix, NOT known FROM known WHERE grown OR NOT known
"""
# The state's listed buckets that are not listed now (split, merged or gone): their pairs leave the state.
STALE_BUCKETS = f"""
INSERT INTO {NEAR_STALE.qualified}
SELECT start_band, start_key, suffix FROM {NEAR_OLD_NODES.qualified} WHERE listed
EXCEPT SELECT start_band, start_key, suffix FROM {NEAR_LISTED.qualified}
"""
# Of a state row ``s`` (pair or bucket): its listed bucket is stale.
STATE_BUCKET_STALE = f"""EXISTS (
    SELECT 1 FROM {NEAR_STALE.qualified} t
    WHERE t.start_band = s.start_band AND t.start_key = s.band_key AND t.suffix = s.suffix
)"""
# The rows of the buckets listed again (their sketches are needed).
ROWS_OF_RELISTED_BUCKETS = f"""
SELECT DISTINCT seq FROM {NEAR_LISTED.qualified}
SEMI JOIN {NEAR_RELISTED.qualified} USING (start_band, start_key, suffix)
"""
# The rows of the buckets listed again that this run has not placed (rows of the state), placed from the state:
# their sketches and same keys are all the listing reads of them, and the signature cache holds their signatures
# for the few pairs whose sketches agree (sketch_pairs_with_signatures). Read through Python from the signature
# cache instead (signatures to sketches), the 482,710 SFT rows of a 10,000-row refresh at 1M took 2-3 s.
RELISTED_ROWS_FROM_STATE = f"""
INSERT INTO {NEAR_SIGNATURES.qualified} (seq, sketch, same_key)
SELECT d.seq, k.sketch, k.same_key FROM {DEDUP_ROWS.qualified} d
JOIN {SURVIVOR_STATE.qualified} k ON k.stage_key = $state AND k.id = d.id
WHERE d.seq IN ({ROWS_OF_RELISTED_BUCKETS}) AND d.seq NOT IN (SELECT seq FROM {NEAR_SIGNATURES.qualified})
"""
# The state's pairs that stay candidates, by this run's rows (a < b): both rows survive and their bucket is not
# stale (untouched, or listed again in part).
STATE_PAIRS_STILL_LISTED = f"""
INSERT INTO {NEAR_KEPT_PAIRS.qualified}
SELECT DISTINCT least(da.seq, db.seq), greatest(da.seq, db.seq)
FROM {PAIR_STATE.qualified} s
JOIN {DEDUP_ROWS.qualified} da ON da.id = s.id_low AND da.seq = da.exact_kept
JOIN {DEDUP_ROWS.qualified} db ON db.id = s.id_high AND db.seq = db.exact_kept
WHERE s.stage_key = $state AND NOT {STATE_BUCKET_STALE}
"""
# The pairs this run listed that passed the estimate, once per listed bucket, by record ids.
LISTED_PAIRS_BY_ID = f"""
SELECT $state, p.start_band, l.start_key, l.suffix, least(da.id, db.id), greatest(da.id, db.id)
FROM {NEAR_SKETCH_PAIRS.qualified} p
SEMI JOIN {NEAR_CANDIDATES.qualified} c ON c.a = p.a AND c.b = p.b
JOIN {NEAR_LISTED.qualified} l ON l.start_band = p.start_band AND l.seq = p.a
JOIN {DEDUP_ROWS.qualified} da ON da.seq = p.a
JOIN {DEDUP_ROWS.qualified} db ON db.seq = p.b
"""

# Every LSH bucket of two or more rows at depth 0 (one band), with its size; then their rows.
START_BUCKETS = f"""
INSERT INTO {NEAR_NODES.qualified}
SELECT band, band_key, ''::BLOB, count(*) FROM {NEAR_BANDS.qualified} GROUP BY band, band_key HAVING count(*) > 1
"""
START_BUCKET_ROWS = f"""
INSERT INTO {NEAR_LEVEL.qualified}
SELECT n.band, n.band_key, ''::BLOB, n.seq, s.size
FROM {NEAR_BANDS.qualified} n JOIN {NEAR_NODES.qualified} s ON s.start_band = n.band AND s.start_key = n.band_key
"""
# The rows being split, each with the key of the band after its bucket's last appended to its suffix, in buckets
# of two or more, with their size.
SPLIT_BUCKET_ROWS = f"""
INSERT INTO {NEAR_LEVEL.qualified}
WITH rows AS (
    SELECT s.start_band, s.start_key, s.suffix || n.band_key AS suffix, s.seq
    FROM {NEAR_SPLIT.qualified} s
    JOIN {NEAR_BANDS.qualified} n
      ON n.seq = s.seq AND n.band = (s.start_band + octet_length(s.suffix) // $key_bytes + 1) % $bands
)
SELECT * FROM (SELECT *, count(*) OVER (PARTITION BY start_band, start_key, suffix) AS size FROM rows)
WHERE size > 1
"""
# Of the buckets of a level: each bucket, the rows listed (small enough, or at the last depth) and the rows split
# further.
NODES_OF_LEVEL = f"""
INSERT INTO {NEAR_NODES.qualified} SELECT DISTINCT start_band, start_key, suffix, size FROM {NEAR_LEVEL.qualified}
"""
LISTED_OF_LEVEL = f"""
INSERT INTO {NEAR_LISTED.qualified}
SELECT start_band, start_key, suffix, seq FROM {NEAR_LEVEL.qualified} WHERE {_listed("size", "suffix")}
"""
SPLIT_OF_LEVEL = f"""
INSERT INTO {NEAR_SPLIT.qualified}
SELECT start_band, start_key, suffix, seq FROM {NEAR_LEVEL.qualified} WHERE NOT {_listed("size", "suffix")}
"""


def sketch_pairs_of_band(relisted_only: bool) -> str:
    """The pairs of the listed buckets of one start band whose sketches agree on at least $min_equal slots (a
    superset of the pairs whose signatures do: see sketch_of) and whose same keys agree (dedup.candidate_pairs:
    verification never joins rows with different keys, so their pairs are not listed; in the join's condition,
    DuckDB never forms them); ``relisted_only``: of the buckets in near_relisted, all their pairs (``whole``) or
    those with an added row. The sketches are compared on the pairs as they are
    listed, so the pairs that fail (nearly all) are never stored; one start band at a time keeps DuckDB's join
    small."""
    listed = f"{NEAR_LISTED.qualified} l"
    if relisted_only:
        listed += f" JOIN {NEAR_RELISTED.qualified} r USING (start_band, start_key, suffix)"
    whole = "r.whole" if relisted_only else "true"
    added = f"l.seq IN (SELECT seq FROM {NEAR_ADDED.qualified})" if relisted_only else "false"
    # the added rows of a bucket listed in part are paired with every row of it (an added pair twice: DISTINCT)
    return f"""
    INSERT INTO {NEAR_SKETCH_PAIRS.qualified}
    WITH listed AS (
        SELECT l.start_key, l.suffix, l.seq, s.sketch, s.same_key, {whole} AS whole, {added} AS added
        FROM {listed} JOIN {NEAR_SIGNATURES.qualified} s USING (seq)
        WHERE l.start_band = $band
    )
    SELECT DISTINCT $band, x.seq, y.seq
    FROM listed x JOIN listed y ON x.start_key = y.start_key AND x.suffix = y.suffix AND x.seq < y.seq
        AND x.same_key IS NOT DISTINCT FROM y.same_key
    WHERE x.whole AND length(x.sketch) - hamming(x.sketch, y.sketch) >= $min_equal
    UNION
    SELECT $band, least(x.seq, y.seq), greatest(x.seq, y.seq)
    FROM (SELECT * FROM listed WHERE added AND NOT whole) x
    JOIN listed y ON x.start_key = y.start_key AND x.suffix = y.suffix AND x.seq <> y.seq
        AND x.same_key IS NOT DISTINCT FROM y.same_key
    WHERE length(x.sketch) - hamming(x.sketch, y.sketch) >= $min_equal
    """


def sketch_pairs_with_signatures(placed_from_state: bool) -> str:
    """Each pair whose sketches could reach the floor, once, with both signatures for the exact estimate: from
    near_signatures, and with ``placed_from_state`` (a refresh, whose rows of the buckets listed again were placed
    from the candidate state without one) from the signature cache (under ``$key``) for the rows without one."""
    signatures = "placed"  # the pairs' rows, with their signatures
    if placed_from_state:
        signatures = f"""(
            SELECT seq, signature FROM placed WHERE signature IS NOT NULL
            UNION ALL
            SELECT p.seq, c.signature FROM placed p JOIN {DEDUP_ROWS.qualified} d USING (seq)
            JOIN {SIGNATURE_CACHE.qualified} c ON c.stage_key = $key AND c.id = d.id
            WHERE p.signature IS NULL
        )"""
    return f"""
    WITH pairs AS (SELECT DISTINCT a, b FROM {NEAR_SKETCH_PAIRS.qualified}),
    placed AS (
        SELECT seq, signature FROM {NEAR_SIGNATURES.qualified}
        WHERE seq IN (SELECT a FROM pairs UNION SELECT b FROM pairs)
    )
    SELECT p.a, p.b, sa.signature AS signature_a, sb.signature AS signature_b
    FROM pairs p
    JOIN {signatures} sa ON sa.seq = p.a
    JOIN {signatures} sb ON sb.seq = p.b
    """


# The candidate pairs, each with the verdict the pair cache holds for its two records (null: none).
CANDIDATES_WITH_CACHED_VERDICT = f"""
INSERT INTO {NEAR_CACHED_VERDICTS.qualified}
SELECT c.a, c.b, p.near FROM {NEAR_CANDIDATES.qualified} c
JOIN {DEDUP_ROWS.qualified} sa ON sa.seq = c.a JOIN {DEDUP_ROWS.qualified} sb ON sb.seq = c.b
LEFT JOIN {PAIR_CACHE.qualified} p
  ON p.stage_key = $key AND p.id_low = least(sa.id, sb.id) AND p.id_high = greatest(sa.id, sb.id)
"""
# Pairs compared this run, by record ids (a pair's verdict depends only on the two contents and the stage key).
CACHE_VERDICTS = f"""
INSERT INTO {PAIR_CACHE.qualified}
SELECT DISTINCT $key, least(sa.id, sb.id), greatest(sa.id, sb.id), v.near FROM {NEAR_VERDICTS.qualified} v
JOIN {DEDUP_ROWS.qualified} sa ON sa.seq = v.a JOIN {DEDUP_ROWS.qualified} sb ON sb.seq = v.b
"""


# Every member of a cluster but its kept row (the lowest kept rank), with the kept row.
CLUSTER_MEMBERS = f"""
WITH members AS (
    SELECT c.seq, arg_min(c.seq, r.kept_rank) OVER (PARTITION BY c.cluster) AS kept_seq
    FROM {NEAR_CLUSTERS.qualified} c JOIN {DEDUP_ROWS.qualified} r USING (seq)
)
SELECT seq, kept_seq FROM members WHERE seq <> kept_seq ORDER BY kept_seq, seq
"""
# The cluster members with the similarity the similarity cache holds for their two records (null: none).
MEMBERS_WITH_CACHED_SIMILARITY = f"""
INSERT INTO {NEAR_MEMBERS.qualified}
SELECT m.seq, m.kept_seq, c.similarity FROM ({CLUSTER_MEMBERS}) m
JOIN {DEDUP_ROWS.qualified} r ON r.seq = m.seq
JOIN {DEDUP_ROWS.qualified} k ON k.seq = m.kept_seq
LEFT JOIN {SIMILARITY_CACHE.qualified} c ON c.stage_key = $key AND c.member_id = r.id AND c.kept_id = k.id
"""
# Similarities computed this run (their members had none cached), by record ids.
CACHE_SIMILARITIES = f"""
INSERT INTO {SIMILARITY_CACHE.qualified}
SELECT $key, r.id, k.id, n.similarity FROM {NEAR_DROPPED.qualified} n
SEMI JOIN {NEAR_MEMBERS.qualified} m ON m.seq = n.seq AND m.similarity IS NULL
JOIN {DEDUP_ROWS.qualified} r ON r.seq = n.seq
JOIN {DEDUP_ROWS.qualified} k ON k.seq = n.kept_seq
"""
# The dropped rows by id: near duplicates onto their cluster's kept row; exact twins onto their group's kept row,
# or, when that row was dropped as a near duplicate, onto its kept row with its similarity (dedup.resolve_chains).
DROPPED_ROWS = f"""
SELECT m.id AS member_id, k.id AS kept_id, $near AS method, n.similarity
FROM {NEAR_DROPPED.qualified} n
JOIN {DEDUP_ROWS.qualified} m ON m.seq = n.seq
JOIN {DEDUP_ROWS.qualified} k ON k.seq = n.kept_seq
UNION ALL
SELECT m.id, coalesce(nk.id, k.id), $exact, coalesce(n.similarity, 1.0)
FROM {DEDUP_ROWS.qualified} m
JOIN {DEDUP_ROWS.qualified} k ON k.seq = m.exact_kept
LEFT JOIN {NEAR_DROPPED.qualified} n ON n.seq = m.exact_kept
LEFT JOIN {DEDUP_ROWS.qualified} nk ON nk.seq = n.kept_seq
WHERE m.seq <> m.exact_kept
"""


# The texts of the rows verification and the similarities need, gathered from the records before each step (one
# scan each) and looked up by seq per chunk, through an ART index.
NEAR_TEXTS = f"{WORK_SCHEMA}.near_texts"
NEAR_WANTED = f"{WORK_SCHEMA}.near_wanted"  # the seqs a gathering adds to near_texts


def units_of_seqs(relation: str) -> str:
    """The query of the unit columns of the rows of ``relation`` whose seq is in the list ``$seqs`` (a filter on
    a constant list, which an ART index on seq answers without a scan: see silver_pass.deduplicate_staged)."""
    return f"SELECT {', '.join(UNIT_COLUMNS)} FROM {relation} WHERE list_contains($seqs, seq)"


# ---------------------------------------------------------------------------------------------------------------
# what runs in worker processes: pure functions of Arrow batches
# ---------------------------------------------------------------------------------------------------------------


def signature_batch(cfg: MinHashConfig, units: pa.RecordBatch) -> tuple[pa.Table, pa.Table]:
    """MinHash signatures and LSH band keys of a batch of rows (``UNIT_COLUMNS``): see :func:`signature_tables`."""
    seqs = np.asarray(units.column("seq"), dtype=np.int64)
    rows = units.to_pylist()
    same_keys = pa.array([same_key_hash(r) for r in rows], pa.int64())
    return signature_tables(seqs, minhash_signatures([dedup_unit(r) for r in rows], cfg), cfg, same_keys)


def signature_tables(
    seqs: np.ndarray,
    sigs: np.ndarray,
    cfg: MinHashConfig,
    same_keys: pa.Array | pa.ChunkedArray | None = None,
) -> tuple[pa.Table, pa.Table]:
    """``(signatures, bands)``: the rows of ``near_signatures`` and ``near_bands`` for rows ``seqs`` with
    signatures ``sigs`` (one row each) and same-key hashes ``same_keys`` (dedup.same_key_hash; None: no row has
    one). Slot values are 32-bit in both permutation schemes (the legacy scheme stores them in uint64), so they
    are kept as uint32; a band key is the band's ``r`` values as bytes."""
    sigs = np.ascontiguousarray(sigs, dtype=np.uint32)
    bands, r = lsh_bands(cfg)
    n = len(seqs)
    keys = np.ascontiguousarray(sigs[:, : bands * r])  # row-major: row 0 band 0, row 0 band 1, ...
    signatures = pa.table(
        {
            "seq": seqs,
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(sigs.ravel()), cfg.num_perm),
            "sketch": sketch_of(sigs),
            "same_key": pa.nulls(n, pa.int64()) if same_keys is None else same_keys,
            "band_keys": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(bands * band_key_bytes(cfg)), n, [None, pa.py_buffer(keys)]
            ),
        }
    )
    band_keys = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(band_key_bytes(cfg)), n * bands, [None, pa.py_buffer(keys)]
    )
    band_rows = pa.table(
        {"seq": np.repeat(seqs, bands), "band": np.tile(np.arange(bands, dtype=np.int32), n), "band_key": band_keys}
    )
    return signatures, band_rows


def band_key_bytes(cfg: MinHashConfig) -> int:
    """Bytes of a band key: the band's ``r`` slot values, 4 bytes each (uint32)."""
    return 4 * lsh_bands(cfg)[1]


def sketch_of(sigs: np.ndarray) -> pa.StringArray:
    """Per signature, a string of one ASCII character (1 to 127) per slot: ``1 + value % 127``.

    Two slots with equal values have equal characters, so the sketches of two rows agree on at least the slots
    their signatures agree on (and on about 1 in 127 others). DuckDB compares two sketches with ``hamming``
    inside the join that lists the pairs of each bucket, and only pairs that could reach the estimated-Jaccard
    floor leave it; the exact estimate (:func:`estimated_at_least`) then runs on those few.
    """
    n, num_perm = sigs.shape
    chars = (sigs % 127 + 1).astype(np.uint8)
    offsets = np.arange(0, (n + 1) * num_perm, num_perm, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(chars)))


def _signature_matrix(column: pa.ChunkedArray | pa.Array, num_perm: int) -> np.ndarray:
    """A column of signatures (lists of ``num_perm`` uint32) as an (n, num_perm) array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return np.asarray(column.flatten(), dtype=np.uint32).reshape(-1, num_perm)


def estimated_at_least(cfg: MinHashConfig, pairs: pa.RecordBatch) -> pa.Table:
    """The pairs (``a``, ``b``, ``signature_a``, ``signature_b``) whose signatures agree on at least the net's
    threshold of their slots, as ``dedup.candidate_pairs`` filters them (same float comparison)."""
    sa = _signature_matrix(pairs.column("signature_a"), cfg.num_perm)
    sb = _signature_matrix(pairs.column("signature_b"), cfg.num_perm)
    keep = (sa == sb).mean(axis=1) >= cfg.effective_lsh_threshold()
    return pa.table({"a": pairs.column("a"), "b": pairs.column("b")}).filter(pa.array(keep))


def _words_by_seq(units: pa.Table, keyed: bool) -> tuple[dict[int, UnitWords], dict[int, Hashable | None]]:
    """Per row of ``units``: the words verification compares, and (``keyed``: RL) its same key."""
    words: dict[int, UnitWords] = {}
    keys: dict[int, Hashable | None] = {}
    for row in units.to_pylist():
        words[row["seq"]] = unit_words(dedup_unit(row), guard_text(row))
        if keyed:
            keys[row["seq"]] = rl_same_key(row)
    return words, keys


def verify_batch(shared: tuple[MinHashConfig, bool], item: tuple[pa.Table, pa.Table]) -> pa.Table:
    """The compared pairs of a chunk of candidate pairs ``(a, b)`` with their verdict ``near``, given the unit
    columns of their rows.

    ``shared``: the regime's config, and whether rows carry a same key (RL, :func:`dedup.rl_same_key`): a keyed
    pair counts only with equal keys, and may pass the edit rule at any length. Pairs are checked in order, and
    a pair already joined through earlier verified pairs of the chunk is not compared (it adds nothing to the
    clusters).
    """
    cfg, keyed = shared
    pairs, units = item
    words, keys = _words_by_seq(units, keyed)
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    compared: dict[str, list] = {"a": [], "b": [], "near": []}
    for a, b in zip(pairs.column("a").to_pylist(), pairs.column("b").to_pylist(), strict=True):
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        near = (not keyed or keys[a] == keys[b]) and near_duplicate_words(words[a], words[b], cfg, keyed)
        if near:
            parent[max(ra, rb)] = min(ra, rb)
        compared["a"].append(a)
        compared["b"].append(b)
        compared["near"].append(near)
    return pa.table(
        {"a": pa.array(compared["a"], pa.int64()), "b": pa.array(compared["b"], pa.int64()), "near": compared["near"]}
    )


def similarity_batch(_shared: None, item: tuple[pa.Table, pa.Table]) -> pa.Table:
    """Each dropped member's token edit similarity to its kept row (``seq``, ``kept_seq``), given the unit
    columns of both: ``(seq, kept_seq, similarity)``."""
    members, units = item
    unit_tokens = {row["seq"]: tokens(dedup_unit(row)) for row in units.to_pylist()}
    seqs = members.column("seq").to_pylist()
    kept = members.column("kept_seq").to_pylist()
    similarity = [edit_similarity(unit_tokens[k], unit_tokens[s]) for s, k in zip(seqs, kept, strict=True)]
    return pa.table({"seq": members.column("seq"), "kept_seq": members.column("kept_seq"), "similarity": similarity})


# ---------------------------------------------------------------------------------------------------------------
# the regime's pass over the work tables
# ---------------------------------------------------------------------------------------------------------------


def _count(conn: duckdb.DuckDBPyConnection, relation: str, params: dict[str, Any] | None = None) -> int:
    """Rows of a table or parenthesised query (fetched whole, so the connection is free for the next statement)."""
    return conn.execute(f"SELECT count(*) FROM {relation}", params or {}).fetchall()[0][0]


class _UnionFind:
    """Disjoint sets over the rows of verified pairs only (a row never joined is not held)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent.setdefault(rx, rx)
            self.parent.setdefault(ry, ry)
            self.parent[max(rx, ry)] = min(rx, ry)


Timed = Callable[[str], AbstractContextManager[None]]


@dataclass(frozen=True)
class DedupReuse:
    """What the near-dup stage's caches saved in a run: MinHash signatures of the exact survivors, their candidate
    pairs (survivors whose buckets were listed again vs taken from the candidate state), verdicts of candidate
    pairs, similarities of dropped members to their kept rows (each computed vs read from its cache)."""

    signatures: Reuse = Reuse()
    pairs: Reuse = Reuse()
    similarities: Reuse = Reuse()
    candidates: Reuse = Reuse()

    def __add__(self, other: DedupReuse) -> DedupReuse:
        return DedupReuse(
            self.signatures + other.signatures,
            self.pairs + other.pairs,
            self.similarities + other.similarities,
            self.candidates + other.candidates,
        )


def deduplicate_regime_tables(
    conn: duckdb.DuckDBPyConnection,
    *,
    regime: str,
    records: str,
    ranked: str,
    params: dict[str, Any],
    keyed: bool,
    cfg: MinHashConfig,
    dropped: Table,
    batch_rows: int,
    processes: int,
    timed: Timed = lambda _part: nullcontext(),
) -> DedupReuse:
    """Exact-normalised then near-duplicate dedup of one regime's rows; appends the dropped rows to ``dropped``.
    Returns how many survivors' signatures, candidate pairs' verdicts and dropped members' similarities were
    computed and how many read from their caches.

    ``ranked``: a query (with ``params``) of the regime's rows: ``seq``, ``id``, ``exact_key`` (dedup.exact_key)
    and ``kept_rank`` (unique; lowest is kept). ``records``: a relation holding their ``id`` and ``UNIT_COLUMNS``
    by seq, read once for the signatures the cache lacks and once each for the texts verification and the
    similarities need (gathered into ``near_texts``, whose index makes a chunk's look-ups point reads). ``keyed``:
    rows carry a same key (RL). ``regime`` names the candidate state (:data:`CANDIDATE_STATE_TABLES`): when it
    holds this config's state, only the buckets on the paths of survivors added or removed since change (the first
    one on a path not split before and after is listed again).
    ``dropped`` gets ``member_id``, ``kept_id`` (always a kept row), ``method`` and ``similarity``.
    ``timed(part)`` wraps the parts ``signatures``, ``candidates`` and ``verification``. The work tables of this
    module are replaced; the caller drops the work schema.
    """
    survivors = group_exact_duplicates(conn, ranked, params)
    computed, listed = list_candidates(
        conn, regime=regime, records=records, cfg=cfg, batch_rows=batch_rows, processes=processes, timed=timed
    )
    with timed("verification"):
        conn.execute(f"CREATE OR REPLACE TABLE {NEAR_TEXTS} AS SELECT {', '.join(UNIT_COLUMNS)} FROM {records} LIMIT 0")
        conn.execute(f"CREATE INDEX near_texts_seq ON {NEAR_TEXTS} (seq)")
        clusters, pairs = _verified_clusters(conn, records, cfg, keyed, batch_rows, processes)
        _insert_clusters(conn, NEAR_CLUSTERS, clusters, batch_rows)
        del clusters
        similarities = _dropped_near(conn, records, batch_rows, processes)
    conn.execute(
        f"INSERT INTO {dropped.qualified} (member_id, kept_id, method, similarity) {DROPPED_ROWS}",
        {"near": METHOD_NEAR, "exact": METHOD_EXACT},
    )
    return DedupReuse(
        Reuse(computed=computed, reused=survivors - computed),
        pairs,
        similarities,
        Reuse(computed=listed, reused=survivors - listed),
    )


def group_exact_duplicates(conn: duckdb.DuckDBPyConnection, ranked: str, params: dict[str, Any]) -> int:
    """Step 1: this module's work tables made afresh, the caches and the candidate state made ready, and
    ``dedup_rows`` filled from the query ``ranked`` (with ``params``; see deduplicate_regime_tables). Returns the
    exact survivors."""
    for table in TABLES:
        conn.execute(table.create_sql(replace=True))
    for table in (SIGNATURE_CACHE, PAIR_CACHE, *CANDIDATE_STATE_TABLES, SIMILARITY_CACHE):
        ensure_cache_table(conn, table)
    conn.execute(EXACT_GROUPS.format(ranked=ranked), params)
    return _count(conn, f"({SURVIVORS})")


def list_candidates(
    conn: duckdb.DuckDBPyConnection,
    *,
    regime: str,
    records: str,
    cfg: MinHashConfig,
    batch_rows: int,
    processes: int,
    timed: Timed = lambda _part: nullcontext(),
) -> tuple[int, int]:
    """Steps 2 and 3 for the exact survivors of ``dedup_rows``: their signatures (computed for the rows of
    ``records`` the signature cache lacks) and band keys, then ``near_candidates``, from the regime's candidate
    state when it holds one (then brought to this run's survivors) or by a full listing. Returns how many
    signatures were computed and how many survivors' buckets were listed (all, or the rows of the buckets listed
    again). ``timed`` wraps the parts ``signatures`` and ``candidates``."""
    state = {"state": candidate_state_key(regime, cfg)}
    with timed("signatures"):
        incremental = bool(conn.execute(STATE_HOLDS, state).fetchall()[0][0])
        if incremental:
            conn.execute(ADDED_SURVIVORS, state)
            conn.execute(REMOVED_SURVIVORS, state)
        computed = _signatures_of_uncached(conn, records, cfg, batch_rows, processes)
        if incremental:
            # the added rows' signatures and bands (the removed rows' are in the state)
            _signatures_from_cache(conn, cfg, batch_rows, f"SELECT seq FROM {NEAR_ADDED.qualified}")
        else:
            _signatures_from_cache(conn, cfg, batch_rows, SURVIVORS)
    with timed("candidates"):
        if incremental:
            # the buckets on the changed rows' paths, listed again from their rows where not walked through
            walk_changed_paths(conn, cfg, state)
            list_buckets(conn, cfg, state)
            # the listed buckets whose pairs change, and their rows' sketches (from the state when not placed)
            conn.execute(RELISTED_BUCKETS)
            conn.execute(STALE_BUCKETS)
            conn.execute(RELISTED_ROWS_FROM_STATE, state)
        else:
            list_buckets(conn, cfg)
        write_listed_pairs(conn, cfg, batch_rows, relisted_only=incremental)
        _save_candidate_state(conn, cfg, state, incremental)
        # survivors whose buckets were listed: all, or (from a state) the rows of the buckets listed again
        listed = _count(conn, f"({ROWS_OF_RELISTED_BUCKETS})" if incremental else f"({SURVIVORS})")
    return computed, listed


def _signatures_of_uncached(
    conn: duckdb.DuckDBPyConnection, records: str, cfg: MinHashConfig, batch_rows: int, processes: int
) -> int:
    """Signatures and band keys of the survivors the signature cache lacks, computed in worker processes into
    near_signatures and near_bands, then into the cache. Returns how many."""
    key = {"key": signature_stage_key(cfg)}
    computed = _count(conn, f"({_uncached_units(records)})", key)
    units = fetch_arrow(conn, _uncached_units(records), batch_rows, key)
    workers = processes_for(computed, batch_rows, processes)
    with memory_limit_at_most(conn, WORKER_LOOP_MEMORY_LIMIT):
        for signatures, bands in map_batches(signature_batch, cfg, units, workers):
            insert_arrow(conn, NEAR_SIGNATURES, signatures)
            insert_arrow(conn, NEAR_BANDS, bands)
    conn.execute(
        f"INSERT INTO {SIGNATURE_CACHE.qualified} SELECT $key, d.id, n.signature, n.same_key "
        f"FROM {NEAR_SIGNATURES.qualified} n JOIN {DEDUP_ROWS.qualified} d USING (seq)",
        key,
    )
    return computed


def _signatures_from_cache(conn: duckdb.DuckDBPyConnection, cfg: MinHashConfig, batch_rows: int, rows: str) -> None:
    """Place the cached signatures of the rows the query ``rows`` lists in near_signatures and near_bands, with
    their sketches and band keys derived here (numpy, no shingling); rows already placed are skipped."""
    for cached in fetch_arrow(conn, _cached_signatures(rows), batch_rows, {"key": signature_stage_key(cfg)}):
        seqs = np.asarray(cached.column("seq"), dtype=np.int64)
        sigs = _signature_matrix(cached.column("signature"), cfg.num_perm)
        signatures, bands = signature_tables(seqs, sigs, cfg, cached.column("same_key"))
        insert_arrow(conn, NEAR_SIGNATURES, signatures)
        insert_arrow(conn, NEAR_BANDS, bands)


def _save_candidate_state(
    conn: duckdb.DuckDBPyConnection, cfg: MinHashConfig, state: dict[str, str], incremental: bool
) -> None:
    """Bring the candidate state to this run's survivors and add the state's still-valid pairs to the candidates.

    A full listing replaces the state. Otherwise the pairs of the buckets not stale are taken from the state (by
    this run's rows) before it changes; then the removed rows (survivor rows, bands and pairs), the stale buckets'
    pairs and the state's buckets at and below the buckets listed again leave it, the walked-through buckets get
    their new size, and the added rows (survivor rows and bands), the buckets formed this run and the pairs listed
    this run enter it, in one transaction."""
    if incremental:
        conn.execute(STATE_PAIRS_STILL_LISTED, state)
    with transaction(conn):
        if incremental:
            for table in (SURVIVOR_STATE, BAND_STATE):
                conn.execute(
                    f"DELETE FROM {table.qualified} WHERE stage_key = $state "
                    f"AND id IN (SELECT id FROM {NEAR_REMOVED.qualified})",
                    state,
                )
            conn.execute(
                f"INSERT INTO {SURVIVOR_STATE.qualified} SELECT $state, a.id, n.band_keys, n.sketch, n.same_key "
                f"FROM {NEAR_SIGNATURES.qualified} n JOIN {NEAR_ADDED.qualified} a USING (seq)",
                state,
            )
            conn.execute(
                f"INSERT INTO {BAND_STATE.qualified} SELECT $state, a.id, n.band, n.band_key "
                f"FROM {NEAR_BANDS.qualified} n JOIN {NEAR_ADDED.qualified} a USING (seq)",
                state,
            )
            conn.execute(
                f"DELETE FROM {PAIR_STATE.qualified} s WHERE stage_key = $state AND ("
                f"id_low IN (SELECT id FROM {NEAR_REMOVED.qualified}) "
                f"OR id_high IN (SELECT id FROM {NEAR_REMOVED.qualified}) OR {STATE_BUCKET_STALE})",
                state,
            )
            conn.execute(
                f"DELETE FROM {BUCKET_STATE.qualified} s WHERE stage_key = $state AND EXISTS ("
                f"SELECT 1 FROM {NEAR_OLD_NODES.qualified} o WHERE o.start_band = s.start_band "
                "AND o.start_key = s.band_key AND o.suffix = s.suffix)",
                state,
            )
            conn.execute(
                f"UPDATE {BUCKET_STATE.qualified} s SET size = w.new_size FROM {NEAR_WALK.qualified} w "
                "WHERE s.stage_key = $state AND w.descend AND s.start_band = w.start_band "
                "AND s.band_key = w.start_key AND s.suffix = w.suffix",
                state,
            )
        else:
            for table in CANDIDATE_STATE_TABLES:
                conn.execute(f"DELETE FROM {table.qualified} WHERE stage_key = $state", state)
            conn.execute(
                f"INSERT INTO {SURVIVOR_STATE.qualified} SELECT $state, d.id, n.band_keys, n.sketch, n.same_key "
                f"FROM {NEAR_SIGNATURES.qualified} n JOIN {DEDUP_ROWS.qualified} d USING (seq)",
                state,
            )
            conn.execute(
                f"INSERT INTO {BAND_STATE.qualified} SELECT $state, d.id, n.band, n.band_key "
                f"FROM {NEAR_BANDS.qualified} n JOIN {DEDUP_ROWS.qualified} d USING (seq)",
                state,
            )
        conn.execute(f"INSERT INTO {BUCKET_STATE.qualified} SELECT $state, * FROM {NEAR_NODES.qualified}", state)
        conn.execute(f"INSERT INTO {PAIR_STATE.qualified} {LISTED_PAIRS_BY_ID}", state)
    if incremental:
        conn.execute(
            f"INSERT INTO {NEAR_CANDIDATES.qualified} SELECT a, b FROM {NEAR_KEPT_PAIRS.qualified} "
            f"EXCEPT SELECT a, b FROM {NEAR_CANDIDATES.qualified}"
        )


def _run(conn: duckdb.DuckDBPyConnection, sql: str, values: dict[str, Any]) -> None:
    """Execute ``sql`` with the entries of ``values`` it names as ``$name`` (DuckDB rejects unused parameters)."""
    names = set(re.findall(r"\$(\w+)", sql))
    conn.execute(sql, {name: value for name, value in values.items() if name in names})


def _bucket_shape(cfg: MinHashConfig) -> dict[str, int]:
    """The parameters of the bucket queries: bands, bytes of a band key, bucket limit and split depth."""
    bands, _rows = lsh_bands(cfg)
    return {
        "bands": bands,
        "key_bytes": band_key_bytes(cfg),
        "max_bucket": dedup.MAX_BUCKET,
        "max_depth": dedup.MAX_SPLIT_BANDS,
        # copies of a row's band keys that hold every path: start band + depth + 1 <= bands + max_depth
        "wraps": 1 + -(-dedup.MAX_SPLIT_BANDS // bands),
    }


def walk_changed_paths(conn: duckdb.DuckDBPyConnection, cfg: MinHashConfig, state: dict[str, str]) -> None:
    """Fill ``near_walk`` with the buckets on the paths of the added and removed rows (near_added, near_removed),
    depth by depth while a bucket stays split, and ``near_old_nodes`` with the state's buckets at and below the
    buckets to list again."""
    shape = {**state, **_bucket_shape(cfg)}
    conn.execute(CHANGED_BANDS, state)
    conn.execute(PATHS_AT_START)
    for depth in range(dedup.MAX_SPLIT_BANDS + 1):
        at_depth = {**shape, "depth": depth}
        if depth:
            _run(conn, PATHS_BELOW, at_depth)
        _run(conn, WALK_AT_DEPTH, at_depth)
        _run(conn, STATE_BUCKETS_BELOW, at_depth)
        walked = f"SELECT 1 FROM {NEAR_WALK.qualified} WHERE descend AND octet_length(suffix) = $length"
        if not _count(conn, f"({walked})", {"length": depth * shape["key_bytes"]}):
            break


def list_buckets(conn: duckdb.DuckDBPyConnection, cfg: MinHashConfig, state: dict[str, str] | None = None) -> None:
    """Fill ``near_listed`` with the rows of every bucket whose pairs are listed and ``near_nodes`` with every
    bucket formed, from ``near_bands``.

    The first level is every bucket of two rows or more at depth 0 (one band), or, with the candidate ``state``,
    the buckets ``walk_changed_paths`` left to list again, at their depths, with their rows now. A bucket of more
    than ``dedup.MAX_BUCKET`` rows goes on to the next level, where its rows are grouped by the next band as well,
    and so on down to depth ``dedup.MAX_SPLIT_BANDS``, where every bucket is listed whole (as
    ``dedup.candidate_pairs``)."""
    shape = {**(state or {}), **_bucket_shape(cfg)}
    if state is None:
        conn.execute(START_BUCKETS)
        conn.execute(START_BUCKET_ROWS)
    else:
        _run(conn, RELISTED_ROOT_ROWS, shape)
        conn.execute(NODES_OF_LEVEL)
    for level in range(dedup.MAX_SPLIT_BANDS + 1):
        if level:
            conn.execute(f"DELETE FROM {NEAR_LEVEL.qualified}")
            _run(conn, SPLIT_BUCKET_ROWS, shape)
            conn.execute(f"DELETE FROM {NEAR_SPLIT.qualified}")
            conn.execute(NODES_OF_LEVEL)
        _run(conn, LISTED_OF_LEVEL, shape)
        _run(conn, SPLIT_OF_LEVEL, shape)
        if state is not None and not level:
            conn.execute(STATE_BANDS_OF_SPLIT_ROWS, state)
        if not _count(conn, NEAR_SPLIT.qualified):
            break


def write_listed_pairs(
    conn: duckdb.DuckDBPyConnection, cfg: MinHashConfig, batch_rows: int, *, relisted_only: bool = False
) -> None:
    """Fill ``near_sketch_pairs`` with the pairs of the listed buckets (``relisted_only``: of those in
    near_relisted) per start band and ``near_candidates`` with those whose signatures pass the estimate; their rows'
    sketches are in ``near_signatures``, their signatures there or (``relisted_only``: rows placed from the state) in
    the signature cache."""
    bands, _rows = lsh_bands(cfg)
    # the sketch of a candidate agrees on at least the slots its signature does: count / num_perm >= floor
    min_equal = math.floor(cfg.effective_lsh_threshold() * cfg.num_perm) - 1  # - 1: whatever the float rounding
    sketch_pairs = sketch_pairs_of_band(relisted_only)
    for band in range(bands):
        conn.execute(sketch_pairs, {"band": band, "min_equal": min_equal})
    with_signatures = sketch_pairs_with_signatures(placed_from_state=relisted_only)
    key = {"key": signature_stage_key(cfg)} if relisted_only else {}
    for pairs in fetch_arrow(conn, with_signatures, batch_rows, key):
        insert_arrow(conn, NEAR_CANDIDATES, estimated_at_least(cfg, pairs))


def _gather_texts(conn: duckdb.DuckDBPyConnection, records: str, seqs: str, params: dict[str, Any]) -> None:
    """Add to ``near_texts`` the unit columns of the rows of ``records`` whose seq the query ``seqs`` lists (its one
    column). The seqs are listed first: when near_texts holds them all (a run that adds nothing), ``records`` (a
    join over every staged row in the silver pass) is not read."""
    conn.execute(
        f"CREATE OR REPLACE TABLE {NEAR_WANTED} AS SELECT DISTINCT seq FROM ({seqs}) wanted(seq) "
        f"WHERE seq NOT IN (SELECT seq FROM {NEAR_TEXTS})",
        params,
    )
    if _count(conn, NEAR_WANTED):
        conn.execute(
            f"INSERT INTO {NEAR_TEXTS} SELECT {', '.join(UNIT_COLUMNS)} FROM {records} "
            f"WHERE seq IN (SELECT seq FROM {NEAR_WANTED})"
        )


def _texts(conn: duckdb.DuckDBPyConnection, seqs: list[int]) -> pa.Table:
    return conn.sql(units_of_seqs(NEAR_TEXTS), params={"seqs": seqs}).to_arrow_table()


def _insert_clusters(conn: duckdb.DuckDBPyConnection, table: Table, clusters: _UnionFind, batch_rows: int) -> None:
    """Append every row the union-find holds, with its cluster (root), to ``table`` (``seq``, ``cluster``)."""
    rows = list(clusters.parent)
    for start in range(0, len(rows), batch_rows):
        part = rows[start : start + batch_rows]
        insert_arrow(conn, table, pa.table({"seq": part, "cluster": [clusters.find(s) for s in part]}))


def _verified_clusters(
    conn: duckdb.DuckDBPyConnection,
    records: str,
    cfg: MinHashConfig,
    keyed: bool,
    batch_rows: int,
    processes: int,
) -> tuple[_UnionFind, Reuse]:
    """Join the candidate pairs the pair cache holds as near; then verify the others in order, a chunk at a time in
    worker processes, and join the verified ones.

    A pair whose rows are already joined is not compared (it adds nothing to the clusters), so neither are its
    texts read. Which pairs get compared depends on the cache and the order results come back in, not the
    clusters: they are the connected components of the near pairs. The verdicts of the pairs compared go to the
    cache. Returns how many pairs were compared and how many verdicts were reused."""
    clusters = _UnionFind()
    chunk = min(CHUNK_PAIRS, batch_rows)
    key = {"key": pair_stage_key(cfg, keyed)}
    conn.execute(CANDIDATES_WITH_CACHED_VERDICT, key)
    reused = _count(conn, f"{NEAR_CACHED_VERDICTS.qualified} WHERE near IS NOT NULL")
    for batch in fetch_arrow(conn, f"SELECT a, b FROM {NEAR_CACHED_VERDICTS.qualified} WHERE near", batch_rows):
        for a, b in zip(batch.column("a").to_pylist(), batch.column("b").to_pylist(), strict=True):
            clusters.union(a, b)
    _insert_clusters(conn, NEAR_JOINED, clusters, batch_rows)
    # the texts of the pairs without a cached verdict whose rows the cached verdicts did not join (a superset of
    # those compared: a pair joined by an earlier comparison of this run is skipped too)
    open_pairs = f"""
    SELECT v.a, v.b FROM {NEAR_CACHED_VERDICTS.qualified} v
    LEFT JOIN {NEAR_JOINED.qualified} ja ON ja.seq = v.a LEFT JOIN {NEAR_JOINED.qualified} jb ON jb.seq = v.b
    WHERE v.near IS NULL AND (ja.cluster IS NULL OR ja.cluster IS DISTINCT FROM jb.cluster)
    """
    _gather_texts(conn, records, f"SELECT unnest([a, b]) FROM ({open_pairs})", {})

    def chunks() -> Iterator[tuple[pa.Table, pa.Table]]:
        for batch in fetch_arrow(conn, f"{open_pairs} ORDER BY v.a, v.b", chunk):
            a, b = batch.column("a").to_pylist(), batch.column("b").to_pylist()
            pairs = [(x, y) for x, y in zip(a, b, strict=True) if clusters.find(x) != clusters.find(y)]
            if pairs:
                table = pa.table({"a": [x for x, _ in pairs], "b": [y for _, y in pairs]})
                yield table, _texts(conn, sorted({s for pair in pairs for s in pair}))

    count = _count(conn, f"({open_pairs})")
    workers = processes_for(count, chunk, processes)
    with memory_limit_at_most(conn, WORKER_LOOP_MEMORY_LIMIT):
        for compared in map_batches(verify_batch, (cfg, keyed), chunks(), workers):
            insert_arrow(conn, NEAR_VERDICTS, compared)
            near = compared.filter(compared.column("near"))
            for a, b in zip(near.column("a").to_pylist(), near.column("b").to_pylist(), strict=True):
                clusters.union(a, b)
    conn.execute(CACHE_VERDICTS, key)
    return clusters, Reuse(computed=_count(conn, NEAR_VERDICTS.qualified), reused=reused)


def _dropped_near(conn: duckdb.DuckDBPyConnection, records: str, batch_rows: int, processes: int) -> Reuse:
    """Fill ``near_dropped``: every cluster member but the kept one, with its edit similarity to the kept one.

    A similarity the similarity cache holds for the two records is read from it; the others are computed in worker
    processes (with the texts of both rows) and go to the cache. Returns how many were computed and reused."""
    key = {"key": similarity_stage_key()}
    conn.execute(MEMBERS_WITH_CACHED_SIMILARITY, key)
    conn.execute(
        f"INSERT INTO {NEAR_DROPPED.qualified} SELECT seq, kept_seq, similarity FROM {NEAR_MEMBERS.qualified} "
        "WHERE similarity IS NOT NULL"
    )
    reused = _count(conn, NEAR_DROPPED.qualified)
    missing = f"SELECT seq, kept_seq FROM {NEAR_MEMBERS.qualified} WHERE similarity IS NULL"
    computed = _count(conn, f"({missing})")
    _gather_texts(conn, records, f"SELECT unnest([seq, kept_seq]) FROM ({missing})", {})

    def batches() -> Iterator[tuple[pa.Table, pa.Table]]:
        for members in fetch_arrow(conn, f"{missing} ORDER BY kept_seq, seq", min(CHUNK_PAIRS, batch_rows)):
            seqs = {*members.column("seq").to_pylist(), *members.column("kept_seq").to_pylist()}
            yield pa.table(members), _texts(conn, sorted(seqs))

    workers = processes_for(computed, min(CHUNK_PAIRS, batch_rows), processes)
    with memory_limit_at_most(conn, WORKER_LOOP_MEMORY_LIMIT):
        for similarities in map_batches(similarity_batch, None, batches(), workers):
            insert_arrow(conn, NEAR_DROPPED, similarities)
    if computed:
        conn.execute(CACHE_SIMILARITIES, key)
    return Reuse(computed=computed, reused=reused)
