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

Memory stays bounded as the corpus grows: bronze is read in Arrow batches, stages 0-1 run per batch (in
worker processes, ``posttrain_assets.parallel``) and write into work tables (schema ``work``). Dedup keeps its
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
from posttrain_assets.cleaning.dedup_tables import deduplicate_regime_tables
from posttrain_assets.cleaning.quality import Drop, QualityConfig, quality_verdicts
from posttrain_assets.ingest.registry import Registry
from posttrain_assets.parallel import default_processes, map_batches, processes_for
from posttrain_assets.records.normalize import PROVENANCE, FirstSeen, cleaning_entry, duplicate_entry, normalise_row
from posttrain_assets.records.schema import DEFAULT_MAX_ROW_BYTES
from posttrain_assets.sft.masking import special_tokens
from posttrain_assets.sft.token_counts import token_counts
from posttrain_assets.warehouse.catalogue import (
    BRONZE_RECORDS,
    RECORD_COLUMNS,
    SILVER_CONTAMINATION,
    SILVER_CROSS_REGIME_LEAKS,
    SILVER_DEDUP_CLUSTERS,
    SILVER_EVAL_RECORDS,
    SILVER_QUARANTINE,
    SILVER_RECORDS,
)
from posttrain_assets.warehouse.io import (
    checkpoints_held_off,
    fetch_batches,
    fetch_dicts,
    insert_ordered,
    insert_rows,
    ordered_arrow,
    ordered_batches,
    transaction,
)
from posttrain_assets.warehouse.model import Column, Table

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


# ---------------------------------------------------------------------------------------------------------------
# work tables (schema ``work``; dropped when the pass ends)
# ---------------------------------------------------------------------------------------------------------------

WORK_SCHEMA = "work"


def _work(table: Table) -> Table:
    return dataclasses.replace(table, schema=WORK_SCHEMA)


STAGED = Table(
    WORK_SCHEMA,
    "staged_records",
    "Training rows that passed the quality gate, in bronze priority order, with what the later stages group on.",
    (
        *RECORD_COLUMNS,
        Column("seq", "BIGINT", "position in bronze priority order", False),
        Column("exact_key", "VARCHAR", "dedup.exact_key of the row", False),
        Column("prompt_key", "VARCHAR", "dedup.prompt_key of the prompt; null for an empty prompt"),
        Column("quality_score", "BIGINT", "dedup.quality_score (tie-break of the kept row)", False),
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
WORK_TABLES = (STAGED, REMOVED, DROPPED_DUPLICATES, WORK_QUARANTINE, WORK_DEDUP, WORK_EVAL, WORK_CONTAMINATION)

# Bronze is read in the order that decides which exact duplicate is kept: source priority, file, row. Each
# file's rows are read in row_number ranges (io.ordered_arrow), never sorted whole.
BRONZE_FILES = f"""
SELECT source, file_path, count(*) FROM {BRONZE_RECORDS.qualified} WHERE list_contains($sources, source)
GROUP BY source, file_path ORDER BY file_path
"""
BRONZE_ROWS_OF_FILE = f"""
SELECT source, file_path, row_number, record_sha256, payload, decode_error, file_sha256
FROM {BRONZE_RECORDS.qualified}
WHERE source = $source AND file_path = $file
"""

# Staged rows still in the corpus (not removed by a later stage), in bronze priority order.
LIVE = f"""
SELECT * FROM {STAGED.qualified}
WHERE id NOT IN (SELECT id FROM {REMOVED.qualified})
"""

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

# Near-dup verification reads the texts of up to 2 x 4096 rows at a time (dedup_tables.CHUNK_PAIRS pairs), by seq;
# DuckDB answers such a look-up from an ART index only when it matches fewer rows than index_scan_max_count.
TEXT_LOOKUP_ROWS = 16_384

# Normalised prompts carried by live rows of more than one regime; the prompt as written in the first row.
# The leaking keys are found on the narrow columns first, so only their rows are aggregated with prompts.
LEAKS = f"""
WITH live AS ({LIVE}),
leaking AS (
    SELECT prompt_key FROM live WHERE prompt_key IS NOT NULL
    GROUP BY prompt_key HAVING min(regime) <> max(regime)
)
SELECT prompt_key, arg_min(prompt, seq) AS prompt, list(DISTINCT regime ORDER BY regime) AS regimes,
       list(id ORDER BY id) AS ids
FROM live WHERE prompt_key IN (SELECT prompt_key FROM leaking)
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
                normalise_and_gate(conn, registry, tokenizer, created_at, cfg)
                # Every later stage scans the staged rows. Without automatic checkpoints they sit in DuckDB's
                # buffer pool uncompressed, and once they outgrow the memory cap each scan reads them back from
                # its temp files: publishing a million rows took 319 s, growing with the square of the corpus.
                # Written to the database file once, compressed, they are scanned from there (at 300k rows: the
                # checkpoint 13 s, dedup 79 -> 61 s, publish 47 -> 26 s).
                with clock.stage("normalise_and_gate/checkpoint"):
                    conn.execute("CHECKPOINT")
            with clock.stage("decontaminate"):
                report = decontaminate(conn, cfg)
            with clock.stage("deduplicate"):
                deduplicate_staged(conn, registry, cfg, clock)
            with clock.stage("cross_regime_leaks"):
                leaks = cross_regime_leaks(conn, cfg)
            with clock.stage("quarantine"):
                quarantine_removed(conn)
            with clock.stage("publish"):
                publish(conn, leaks)
        finally:
            conn.execute(f"DROP SCHEMA IF EXISTS {WORK_SCHEMA} CASCADE")
    return PassResult(report, clock.seconds)


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
) -> None:
    """Stages 0 and 1, one Arrow batch of bronze at a time, into the work tables.

    Batches run in ``cfg.processes`` worker processes (posttrain_assets.parallel) and come back in bronze
    priority order; exact duplicates are collapsed here, in that order, so the result does not depend on the
    number of processes."""
    files = conn.execute(BRONZE_FILES, {"sources": registry.names}).fetchall()
    # The gate refuses the tokenizer's special tokens in every text field of every regime (unless given others).
    quality = dataclasses.replace(cfg.quality, special_tokens=cfg.quality.special_tokens or special_tokens(tokenizer))
    context = GateContext(
        registry, tokenizer, {file: created_at(file) for _, file, _ in files}, quality, cfg.max_row_bytes
    )
    processes = processes_for(sum(rows for _, _, rows in files), cfg.batch_rows, cfg.processes)
    batches = _bronze_in_priority_order(conn, registry, files, cfg.batch_rows)
    first_seen = FirstSeen()
    seq = 0
    for gated in map_batches(normalise_and_gate_batch, context, batches, processes):
        rows: dict[str, list[Record]] = {"staged": [], "eval": [], "quarantine": [], "duplicates": []}
        for g in gated:
            if g.key is not None and not first_seen.first(g.key):
                rows["duplicates"].append(duplicate_entry(g.provenance, g.key[1], g.key[1], "exact", 1.0))
                continue
            if g.table == "staged":
                g.row["seq"] = seq
                seq += 1
            rows[g.table].append(g.row)
        insert_rows(conn, STAGED, rows["staged"])
        insert_rows(conn, WORK_EVAL, rows["eval"])
        insert_rows(conn, WORK_QUARANTINE, rows["quarantine"])
        insert_rows(conn, WORK_DEDUP, rows["duplicates"])


def _bronze_in_priority_order(
    conn: duckdb.DuckDBPyConnection, registry: Registry, files: list[tuple[str, str, int]], batch_rows: int
) -> Iterator[Any]:
    """Arrow batches of the bronze rows of ``files`` (source, file, rows): by source priority, file, row."""
    for source in registry.names:
        for file in (f for s, f, _ in files if s == source):
            yield from ordered_arrow(
                conn, BRONZE_ROWS_OF_FILE, "row_number", batch_rows, {"source": source, "file": file}
            )


def decontaminate(conn: duckdb.DuckDBPyConnection, cfg: CleaningConfig) -> list[dict[str, Any]]:
    """Stage 2: match every staged row against the eval index; contaminated rows are removed."""
    index = EvalIndex.build(fetch_dicts(conn, f"SELECT * FROM {WORK_EVAL.qualified}"), n=cfg.decontamination_ngram)
    matches: list[dict[str, Any]] = []
    if not index.is_empty():
        for rows in fetch_batches(conn, f"SELECT * FROM {STAGED.qualified}", cfg.batch_rows, {}):
            matches += contamination_matches(rows, index)
    first_match: dict[str, dict[str, Any]] = {}
    for match in matches:
        first_match.setdefault(match["id"], match)
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
    return contamination_report((), index, matches=matches)


def deduplicate_staged(
    conn: duckdb.DuckDBPyConnection, registry: Registry, cfg: CleaningConfig, clock: StageClock | None = None
) -> None:
    """Stage 3, per regime: exact-normalised then near duplicates of the live rows, as set operations over work
    tables (``dedup_tables.deduplicate_regime_tables``): this process holds one batch in flight and the union-find
    over verified pairs, never a regime's rows. Dropped rows go to the dedup work table and leave the corpus.
    """
    clock = clock or StageClock()
    # Point look-ups by seq instead of a scan of the work table per chunk of candidate pairs (session setting:
    # other connections keep DuckDB's default).
    conn.execute(f"CREATE INDEX staged_seq ON {STAGED.qualified} (seq)")
    conn.execute(f"SET SESSION index_scan_max_count = {TEXT_LOOKUP_ROWS}")
    try:
        for regime in REGIMES:
            deduplicate_regime_tables(
                conn,
                staged=STAGED.qualified,
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
    conn.execute(DEDUP_FROM_STAGED)
    conn.execute(
        f"INSERT INTO {REMOVED.qualified} SELECT member_id, 'dedup', method, NULL FROM {DROPPED_DUPLICATES.qualified}"
    )


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


def publish(conn: duckdb.DuckDBPyConnection, leaks: list[dict[str, Any]]) -> None:
    """Replace the six silver tables from the work tables, in one transaction; silver.records is stored in id
    order (the order every later stage reads it in)."""
    with transaction(conn):
        conn.execute(SILVER_RECORDS.create_sql(replace=True))
        insert_ordered(conn, SILVER_RECORDS, LIVE, "id", PUBLISH_RANGE_ROWS)
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
