"""Every DuckDB table the platform writes: its columns, types and meaning, in one place.

Assets create tables from these definitions and describe them in Dagster
(``dagster/column_schema``) from the same list, so the README, the UI and the
database cannot drift apart. No Dagster imports here.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

MESSAGES_TYPE = "STRUCT(role VARCHAR, content VARCHAR)[]"
ORIGIN_TYPE = (
    'STRUCT(source VARCHAR, uri VARCHAR, file VARCHAR, "row" BIGINT, record_sha256 VARCHAR, file_sha256 VARCHAR)'
)


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str
    nullable: bool = True


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    description: str
    columns: tuple[Column, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(f"{self.qualified} has no column {name!r}")

    def columns_sql(self) -> str:
        """The column list of a CREATE TABLE statement (identifiers are constants of this module)."""
        return ",\n  ".join(f'"{c.name}" {c.type}' + ("" if c.nullable else " NOT NULL") for c in self.columns)

    def create_sql(self, *, replace: bool = False) -> str:
        """CREATE [OR REPLACE] TABLE statement, with its schema."""
        verb = "CREATE OR REPLACE TABLE" if replace else "CREATE TABLE IF NOT EXISTS"
        return f"CREATE SCHEMA IF NOT EXISTS {self.schema};\n{verb} {self.qualified} (\n  {self.columns_sql()}\n)"

    def insert_sql(self, relation: str) -> str:
        """INSERT of every column, by name, from a registered relation (an Arrow table)."""
        names = ", ".join(f'"{n}"' for n in self.column_names)
        return f"INSERT INTO {self.qualified} ({names}) SELECT {names} FROM {relation}"


def fetch_dicts(conn: Any, sql: str, params: Any = None) -> list[dict[str, Any]]:
    """Run a query on a DuckDB connection and return its rows as dicts."""
    cursor = conn.execute(sql, params) if params is not None else conn.execute(sql)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def fetch_batches(
    conn: Any, sql: str, rows: int, params: dict[str, Any] | None = None
) -> Iterator[list[dict[str, Any]]]:
    """The rows of a query as dicts, ``rows`` at a time, streamed as Arrow batches.

    The query runs on a cursor of its own, so ``conn`` can write (e.g. the next table) while it is read.
    """
    for batch in fetch_arrow(conn, sql, rows, params):
        yield batch.to_pylist()


def fetch_arrow(conn: Any, sql: str, rows: int, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """As :func:`fetch_batches`, each batch as an Arrow record batch (e.g. to send to a worker process)."""
    # A connection keeps every cursor it hands out until the cursor is closed (each holds a client context of
    # its own), so the cursor is closed when the rows are read or the caller stops early.
    with conn.cursor() as cursor:
        yield from cursor.sql(sql, params=params or {}).to_arrow_reader(rows)


# ---------------------------------------------------------------------------------------------------------------
# reading and writing wide rows in key order
#
# DuckDB's sort does not spill rows with wide VARCHAR or LIST payloads: an ORDER BY over a whole corpus of
# messages or input_ids fails with "failed to pin block" as soon as the payload outgrows the memory limit
# (measured with duckdb 2.0.1: 400 MB of bronze payloads need more than a 400 MB limit). So wide rows are
# never sorted whole. The narrow keys are sorted, cut into ranges of ``rows`` keys, and each range is read
# or written with its own small ORDER BY. A table written this way is stored in key order, so the range
# queries of the next stage are pruned by DuckDB's zone maps instead of scanning the table per range.
# ---------------------------------------------------------------------------------------------------------------


def key_ranges(conn: Any, relation: str, key: str, rows: int, params: dict[str, Any] | None = None) -> list[tuple]:
    """Inclusive ``(first, last)`` bounds cutting the distinct values of column ``key`` of the query
    ``relation`` (named parameters ``params``) into runs of at most ``rows`` values, in order.

    Runs on ``conn`` itself, so it sees what the caller's open transaction wrote."""
    sql = f"SELECT DISTINCT {key} FROM ({relation}) ORDER BY 1"
    keys = next(iter(conn.execute(sql, params or {}).fetchnumpy().values()))

    def value(i: int) -> Any:
        v = keys[i]
        return v.item() if isinstance(v, np.generic) else v

    return [(value(start), value(min(start + rows, len(keys)) - 1)) for start in range(0, len(keys), rows)]


def _key_range(relation: str, key: str) -> str:
    return f"SELECT * FROM ({relation}) WHERE {key} BETWEEN $range_first AND $range_last ORDER BY {key}"


def ordered_arrow(conn: Any, relation: str, key: str, rows: int, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """The rows of the query ``relation`` as Arrow tables in ``key`` order, one range of ``rows`` keys each.

    The ranges are read on a cursor of their own (committed data), so the caller may write on ``conn`` between
    them."""
    params = dict(params or {})
    sql = _key_range(relation, key)
    ranges = key_ranges(conn, relation, key, rows, params)
    with conn.cursor() as cursor:  # one cursor for every range, closed at the end (see fetch_batches)
        for first, last in ranges:
            yield cursor.sql(sql, params={**params, "range_first": first, "range_last": last}).to_arrow_table()


def ordered_batches(
    conn: Any, relation: str, key: str, rows: int, params: dict[str, Any] | None = None
) -> Iterator[list[dict[str, Any]]]:
    """As :func:`ordered_arrow`, each range as a list of dicts."""
    for batch in ordered_arrow(conn, relation, key, rows, params):
        yield batch.to_pylist()


def insert_ordered(
    conn: Any, table: Table, relation: str, key: str, rows: int, params: dict[str, Any] | None = None
) -> None:
    """Append the rows of the query ``relation`` to ``table`` (columns by name) in ``key`` order, one range of
    ``rows`` keys per INSERT, so ``table`` is stored in key order."""
    params = dict(params or {})
    sql = table.insert_sql(f"({_key_range(relation, key)})")
    for first, last in key_ranges(conn, relation, key, rows, params):
        conn.execute(sql, {**params, "range_first": first, "range_last": last})


# Rows per DuckDB row group (its default ROW_GROUP_SIZE). A checkpoint compresses every row group that changed
# since the last one, so a row group filled by many small commits, each followed by an automatic checkpoint, is
# compressed again and again.
ROW_GROUP_ROWS = 122_880

# WAL size that triggers an automatic checkpoint while checkpoints are held off (DuckDB's default is 16MB).
HELD_OFF_AUTOCHECKPOINT = "64GB"


@contextmanager
def checkpoints_held_off(conn: Any) -> Iterator[None]:
    """No automatic checkpoint inside the block (the caller checkpoints when it chooses); the setting is the
    database's, so it is restored on the way out, also when the block raises."""
    (autocheckpoint,) = conn.execute("SELECT current_setting('wal_autocheckpoint')").fetchone()
    conn.execute(f"SET wal_autocheckpoint = '{HELD_OFF_AUTOCHECKPOINT}'")
    try:
        yield
    finally:
        conn.execute("SET wal_autocheckpoint = $size", {"size": autocheckpoint})


@dataclass
class Twin:
    """A table under construction (:func:`building`), appended to in batches with one commit each."""

    conn: Any
    table: Table
    rows: int = 0

    def append(self, rows: Any) -> None:
        """Append an Arrow table (None or empty: nothing); checkpoint each time a row group is full."""
        if rows is None or not rows.num_rows:
            return
        insert_arrow(self.conn, self.table, rows)
        filled = self.rows // ROW_GROUP_ROWS
        self.rows += rows.num_rows
        if self.rows // ROW_GROUP_ROWS > filled:
            self.conn.execute("CHECKPOINT")

    def finish(self) -> None:
        """Checkpoint the rows appended since the last full row group, before the twin is read back or published:
        otherwise they stay uncompressed in DuckDB's memory, under its cap, until the next automatic checkpoint."""
        if self.rows % ROW_GROUP_ROWS:
            self.conn.execute("CHECKPOINT")


@contextmanager
def building(conn: Any, table: Table, suffix: str = "") -> Iterator[Twin]:
    """A fresh, empty twin of ``table`` (``<name>__building<suffix>``) to append batches to, one commit each.

    DuckDB keeps what an open transaction appends from Arrow in process memory until it commits (a table of
    594k tokenised chats built in one transaction grew the process to 11.8 GB), so a table built from many
    Python batches is appended to this twin outside any transaction, and the caller then publishes it in one
    short transaction (:func:`swap_in`, or its own INSERT ... SELECT). The twin is dropped on the way out.

    Automatic checkpoints are held off while the twin is built and it is checkpointed once per full row group
    instead (:meth:`Twin.append`): after every 16 MB of WAL they re-compressed the row group being filled, which
    doubled the cost of appending 122,880 tokenised chats (28 -> 13 s) and of bronze ingestion.
    """
    twin = dataclasses.replace(table, name=f"{table.name}__building{suffix}")
    conn.execute(f"DROP TABLE IF EXISTS {twin.qualified}")
    conn.execute(twin.create_sql())
    try:
        with checkpoints_held_off(conn):
            yield Twin(conn, twin)
    finally:
        conn.execute(f"DROP TABLE IF EXISTS {twin.qualified}")


def swap_in(conn: Any, twin: Twin, table: Table) -> None:
    """Replace ``table`` by its :func:`building` twin (inside the caller's transaction, so readers see either)."""
    conn.execute(f"DROP TABLE IF EXISTS {table.qualified}")
    conn.execute(f"ALTER TABLE {twin.table.qualified} RENAME TO {table.name}")


def insert_rows(conn: Any, table: Table, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` (dicts keyed by column name) to ``table`` through one Arrow batch."""
    import pyarrow as pa

    if rows:
        insert_arrow(conn, table, pa.Table.from_pylist(rows))


def insert_arrow(conn: Any, table: Table, rows: Any) -> None:
    """Append the rows of an Arrow table (columns by name; None or empty: nothing) to ``table``."""
    if rows is not None and rows.num_rows:
        conn.register("rows_to_insert", rows)
        conn.execute(table.insert_sql("rows_to_insert"))
        conn.unregister("rows_to_insert")


def replace_table(conn: Any, table: Table, rows: list[dict[str, Any]], *, transaction: bool = True) -> None:
    """Create or replace ``table`` with exactly ``rows`` (idempotent); in a transaction of its own unless
    ``transaction`` is False (the caller's transaction then covers it)."""
    with _transaction(conn) if transaction else nullcontext():
        conn.execute(table.create_sql(replace=True))
        insert_rows(conn, table, rows)


def _c(name: str, type_: str, description: str, nullable: bool = True) -> Column:
    return Column(name, type_, description, nullable)


PROVENANCE_COLUMNS = (
    _c("source", "VARCHAR", "registry source name (the bronze partition)", False),
    _c("file_path", "VARCHAR", "landing file the row came from (absolute path)", False),
    _c("row_number", "BIGINT", "0-based row in the file (JSONL line index, array element, Parquet row)", False),
    _c("record_sha256", "VARCHAR", "sha256 of the row's raw bytes", False),
)

BRONZE_RECORDS = Table(
    "bronze",
    "records",
    "One row per input record, raw payload unchanged, partitioned by source (a view over one table per source).",
    (
        *PROVENANCE_COLUMNS,
        _c("payload", "VARCHAR", "the raw row text (JSON line, array element or Parquet row as JSON)", False),
        _c("decode_error", "VARCHAR", "where the row's bytes are not UTF-8 (payload then has U+FFFD)"),
        _c("file_sha256", "VARCHAR", "sha256 of the whole landing file", False),
        _c("ingested_at", "TIMESTAMP WITH TIME ZONE", "when this partition was (re)ingested", False),
        _c("run_id", "VARCHAR", "Dagster run that ingested the row", False),
    ),
)

# bronze.records is a view over one table per source (bronze.records__source_<sha256(source)[:12]>): a source is
# re-ingested into a fresh table that then replaces its old one by a rename, so the rows are written once
# (appending them to a twin and copying that into one shared table wrote them twice, and the copy grew with bronze).
_BRONZE_SOURCE_PREFIX = "records__source_"
_BRONZE_SOURCE_TABLES = f"""
SELECT table_name FROM duckdb_tables()
WHERE database_name = current_database() AND schema_name = '{BRONZE_RECORDS.schema}'
  AND regexp_full_match(table_name, '{_BRONZE_SOURCE_PREFIX}[0-9a-f]{{12}}')
ORDER BY table_name
"""
_BRONZE_RELATION_TYPE = f"""
SELECT table_type FROM information_schema.tables
WHERE table_catalog = current_database() AND table_schema = '{BRONZE_RECORDS.schema}'
  AND table_name = '{BRONZE_RECORDS.name}'
"""


def bronze_source_table(source: str) -> Table:
    """The table that holds one source's bronze rows (``bronze.records`` is the view over all of them)."""
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:12]
    return dataclasses.replace(BRONZE_RECORDS, name=f"{_BRONZE_SOURCE_PREFIX}{digest}")


def _bronze_view_sql(conn: Any) -> str:
    names = ", ".join(f'"{c.name}"' for c in BRONZE_RECORDS.columns)
    tables = [t for (t,) in conn.execute(_BRONZE_SOURCE_TABLES).fetchall()]
    parts = [f"SELECT {names} FROM {BRONZE_RECORDS.schema}.{t}" for t in tables]
    if not parts:  # no source ingested yet: the view still has bronze's columns and types
        typed = ", ".join(f'CAST(NULL AS {c.type}) AS "{c.name}"' for c in BRONZE_RECORDS.columns)
        parts = [f"SELECT {typed} WHERE false"]
    return f"CREATE OR REPLACE VIEW {BRONZE_RECORDS.qualified} AS\n" + "\nUNION ALL ".join(parts)


def ensure_bronze(conn: Any) -> None:
    """Make ``bronze.records`` exist as the view over the per-source tables.

    A warehouse written before bronze was split per source holds ``bronze.records`` as a table: its rows are moved
    into per-source tables once, in one transaction, and the table becomes the view.
    """
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {BRONZE_RECORDS.schema}")
    kind = conn.execute(_BRONZE_RELATION_TYPE).fetchone()
    if kind is not None and kind[0] == "VIEW":
        return
    with transaction(conn):
        if kind is not None:
            legacy = dataclasses.replace(BRONZE_RECORDS, name=f"{BRONZE_RECORDS.name}__legacy")
            conn.execute(f"ALTER TABLE {BRONZE_RECORDS.qualified} RENAME TO {legacy.name}")
            sources = conn.execute(f"SELECT DISTINCT source FROM {legacy.qualified} ORDER BY 1").fetchall()
            for (source,) in sources:
                table = bronze_source_table(source)
                conn.execute(table.create_sql(replace=True))
                # in scan order (the old table holds each source in file and row order); never sorted: DuckDB
                # cannot sort a source's wide payloads under its memory cap (see "reading and writing wide rows")
                conn.execute(f"{table.insert_sql(legacy.qualified)} WHERE source = $source", {"source": source})
            conn.execute(f"DROP TABLE {legacy.qualified}")
        conn.execute(_bronze_view_sql(conn))


def replace_bronze_source(conn: Any, source: str, rows: Twin) -> None:
    """Make ``rows`` (a :func:`building` twin holding the source's new rows) the source's bronze table, in one
    transaction: readers of ``bronze.records`` see the old rows or the new ones, never both."""
    rows.finish()
    with transaction(conn):
        swap_in(conn, rows, bronze_source_table(source))
        conn.execute(_bronze_view_sql(conn))


@contextmanager
def transaction(conn: Any) -> Iterator[None]:
    """BEGIN ... COMMIT, rolled back when the block raises (the connection stays usable)."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_transaction = transaction  # for functions whose ``transaction`` argument hides it


RECORD_COLUMNS = (
    _c("id", "VARCHAR", "stable content hash of regime + content (sha256, 32 hex)", False),
    _c("source", "VARCHAR", "registry source name", False),
    _c("regime", "VARCHAR", "sft | preference | rl", False),
    _c("messages", MESSAGES_TYPE, "sft: whole conversation; preference/rl: the prompt conversation", False),
    _c("prompt", "VARCHAR", "last user turn of the conversation / prompt", False),
    _c("response", "VARCHAR", "sft: last assistant turn"),
    _c("chosen", "VARCHAR", "preference: preferred final assistant response"),
    _c("rejected", "VARCHAR", "preference: dispreferred final assistant response"),
    _c("answer", "VARCHAR", "rl: gold answer the verifier checks against"),
    _c("verifier", "VARCHAR", "rl: verifier name (exact_match | numeric | math | python_eval)"),
    _c("lang", "VARCHAR", "language code (filled by the quality gate)"),
    _c("difficulty", "DOUBLE", "difficulty in [0, 1] as given by the source (rl)"),
    _c("token_count", "INTEGER", "tokens of the chat-template rendering with the project tokenizer"),
    _c("license", "VARCHAR", "SPDX-like license id of the source", False),
    _c("origin", ORIGIN_TYPE, "provenance: source, uri (registry origin), file, row, record and file sha256", False),
    _c("created_at", "TIMESTAMP WITH TIME ZONE", "modification time of the landing file the row came from", False),
    _c("domain", "VARCHAR", "task domain, e.g. math/arithmetic (rl)"),
    _c("source_kind", "VARCHAR", "human | ai | synthetic, from the registry", False),
    _c("score_chosen", "DOUBLE", "preference: score of the chosen response, when the source has one"),
    _c("score_rejected", "DOUBLE", "preference: score of the rejected response, when the source has one"),
)

SILVER_RECORDS = Table(
    "silver",
    "records",
    "The canonical training corpus, cleaned: every valid row of every training source that passed the quality "
    "gate and decontamination, one row per (near-)distinct content; duplicates are in silver.dedup_clusters.",
    RECORD_COLUMNS,
)

SILVER_EVAL_RECORDS = Table(
    "silver",
    "eval_records",
    "Valid rows of evaluation sources (role: eval): never trained on, kept as the decontamination reference.",
    RECORD_COLUMNS,
)

SILVER_QUARANTINE = Table(
    "silver",
    "quarantine",
    "Every bronze row that could not be parsed or validated, or that the shared cleaning pass removed (quality "
    "gate, decontamination, cross-regime leak policy), with its raw payload, the stage and the reason.",
    (
        *PROVENANCE_COLUMNS,
        _c("id", "VARCHAR", "content id, for rows that parsed (null for parse failures)"),
        _c("stage", "VARCHAR", "canonical | quality | decontamination | leak", False),
        _c("reason", "VARCHAR", "reason code (see README)", False),
        _c("field", "VARCHAR", "offending field as a dotted path, when one is to blame"),
        _c("message", "VARCHAR", "human-readable error naming the file, row and field", False),
        _c("payload", "VARCHAR", "the raw row text", False),
    ),
)

SILVER_DEDUP_CLUSTERS = Table(
    "silver",
    "dedup_clusters",
    "One row per dropped duplicate: which kept row it collapsed onto, by which method and how similar.",
    (
        _c("cluster_id", "VARCHAR", "cluster identifier (the kept row's id)", False),
        _c("kept_id", "VARCHAR", "id of the kept twin in silver.records", False),
        _c("member_id", "VARCHAR", "content id of the dropped row", False),
        *PROVENANCE_COLUMNS,
        _c(
            "method",
            "VARCHAR",
            "exact (same content id) / exact_normalized (same after NFKC, case, whitespace folding) / near (MinHash)",
            False,
        ),
        _c("similarity", "DOUBLE", "word-level edit similarity to the kept twin (1.0 for exact)", False),
    ),
)


def _pick(names: tuple[str, ...]) -> tuple[Column, ...]:
    by_name = {c.name: c for c in RECORD_COLUMNS}
    return tuple(by_name[n] for n in names)


# Per regime, the fields the projection table (shared/docs/data-by-regime.txt) requires, beyond
# the ones every row must have (id, source, license, origin).
REQUIRED_FOR_ALL = ("id", "source", "regime", "messages", "prompt", "license", "origin", "created_at", "source_kind")
REQUIRED_BY_REGIME = {
    "sft": ("response",),
    "preference": ("chosen", "rejected"),
    "rl": ("answer", "verifier"),
}

TOKENIZER_COLUMNS = (
    _c("tokenizer_sha256", "VARCHAR", "hash of the tokenizer (vocab, merges, special tokens)", False),
    _c("chat_template_sha256", "VARCHAR", "hash of the chat template that rendered the row", False),
)

SILVER_SFT_TOKENIZED = Table(
    "silver",
    "sft_tokenized",
    "Every SFT row of silver.records rendered with the chat template and tokenised, with assistant-only labels "
    "(-100 on every untrained position). Rows that cannot be masked exactly are in silver.sft_quarantine.",
    (
        _c("id", "VARCHAR", "silver.records id", False),
        _c("source", "VARCHAR", "registry source name", False),
        _c("input_ids", "INTEGER[]", "token ids of the chat-template rendering", False),
        _c("labels", "INTEGER[]", "input id where trained, -100 elsewhere (unshifted)", False),
        _c("num_tokens", "INTEGER", "len(input_ids)", False),
        _c("num_trainable_tokens", "INTEGER", "positions whose label is not -100", False),
        _c("num_messages", "INTEGER", "leading messages rendered (fewer than the conversation when truncated)", False),
        _c("truncated", "BOOLEAN", "cut at a turn boundary to fit max_seq_len", False),
        _c("train_on", "VARCHAR", "all_assistant | last_assistant", False),
        _c("end_of_turn", "VARCHAR", "end-of-turn marker override (null: detected from the template)"),
        *TOKENIZER_COLUMNS,
    ),
)

SILVER_SFT_QUARANTINE = Table(
    "silver",
    "sft_quarantine",
    "SFT rows of silver.records kept out of gold.sft because no exact loss mask could be built, with the reason.",
    (
        _c("id", "VARCHAR", "silver.records id", False),
        _c("source", "VARCHAR", "registry source name", False),
        _c(
            "reason", "VARCHAR", "too_long | no_trainable_tokens | template_error | mask_boundary_straddle | ...", False
        ),
        _c("message", "VARCHAR", "human-readable explanation", False),
        *TOKENIZER_COLUMNS,
    ),
)

GOLD_SFT = Table(
    "gold",
    "sft",
    "Training-ready SFT rows: the conversation, its tokens and assistant-only labels, proven by loss_mask_check.",
    (
        *_pick(("id", "source", "source_kind", "messages", "response")),
        *SILVER_SFT_TOKENIZED.columns[2:8],
        *_pick(("lang", "license", "origin", "created_at")),
        *TOKENIZER_COLUMNS,
    ),
)


SILVER_CONTAMINATION = Table(
    "silver",
    "contamination",
    "Every overlap between a training row and an evaluation row (shared word n-gram, or a short prompt equal to "
    "an eval prompt); the training rows are removed by the cleaning pass.",
    (
        _c("id", "VARCHAR", "training row id (in silver.quarantine with stage decontamination)", False),
        _c("source", "VARCHAR", "training source", False),
        _c("benchmark", "VARCHAR", "evaluation source (role: eval)", False),
        _c("eval_id", "VARCHAR", "id of the evaluation row in silver.eval_records", False),
        _c("field", "VARCHAR", "training field that overlaps (messages[i], chosen, answer, ...)", False),
        _c("eval_field", "VARCHAR", "prompt | answer", False),
        _c("shared_ngrams", "INTEGER", "distinct shared n-grams (0 for a whole short-prompt match)", False),
        _c("ngram_text", "VARCHAR", "the first shared n-gram, normalised", False),
    ),
)

SILVER_CROSS_REGIME_LEAKS = Table(
    "silver",
    "cross_regime_leaks",
    "Prompts (normalised last user turn) found in more than one regime, with the ids of the rows that carry them.",
    (
        _c("prompt_key", "VARCHAR", "sha256 of the normalised prompt", False),
        _c("prompt", "VARCHAR", "the prompt as first seen", False),
        _c("regimes", "VARCHAR[]", "regimes the prompt occurs in", False),
        _c("ids", "VARCHAR[]", "silver row ids carrying it", False),
    ),
)

PAIR_COLUMNS = (
    *_pick(
        ("id", "source", "source_kind", "messages", "prompt", "chosen", "rejected", "score_chosen", "score_rejected")
    ),
    _c("score_margin", "DOUBLE", "score_chosen - score_rejected, when both scores exist"),
    _c("chosen_tokens", "INTEGER", "tokens of the chosen response (project tokenizer, no special tokens)", False),
    _c("rejected_tokens", "INTEGER", "tokens of the rejected response", False),
    _c("length_diff", "INTEGER", "chosen_tokens - rejected_tokens", False),
    _c("is_tie", "BOOLEAN", "chosen and rejected are identical or near-identical after normalisation", False),
    *_pick(("token_count", "lang", "license", "origin", "created_at")),
)

SILVER_PREFERENCE_PAIRS = Table(
    "silver",
    "preference_pairs",
    "Every preference pair of the corpus with its length and tie audit columns; length_confound_check judges it.",
    PAIR_COLUMNS,
)

SILVER_PREFERENCE_PAIRS_BALANCED = Table(
    "silver",
    "preference_pairs_balanced",
    "The pairs left after subsampling offending sources by matched length-difference strata, and dropping ties.",
    PAIR_COLUMNS,
)

SILVER_PREFERENCE_BALANCE_DROPS = Table(
    "silver",
    "preference_balance_drops",
    "Every pair the length balancing dropped, and why (tie, length_balance, cannot_balance).",
    (
        _c("id", "VARCHAR", "pair id (silver.preference_pairs)", False),
        _c("source", "VARCHAR", "registry source name", False),
        _c("reason", "VARCHAR", "tie | length_balance | cannot_balance", False),
    ),
)

SILVER_PREFERENCE_AUDIT = Table(
    "silver",
    "preference_audit",
    "Length-confound and tie statistics of silver.preference_pairs per source, per source kind and overall.",
    (
        _c("group_kind", "VARCHAR", "source | source_kind | overall", False),
        _c("group_name", "VARCHAR", "the source, the kind, or 'all'", False),
        _c("pairs", "INTEGER", "pairs in the group", False),
        _c("chosen_longer_share", "DOUBLE", "share of pairs whose chosen side has more tokens (equal = half)", False),
        _c("share_ci_low", "DOUBLE", "Wilson 95% interval, low", False),
        _c("share_ci_high", "DOUBLE", "Wilson 95% interval, high", False),
        _c("mean_length_ratio", "DOUBLE", "mean of chosen/rejected tokens", False),
        _c("median_length_ratio", "DOUBLE", "median of chosen/rejected tokens", False),
        _c("length_diff_mean", "DOUBLE", "mean of chosen - rejected tokens", False),
        _c("length_diff_median", "DOUBLE", "median of chosen - rejected tokens", False),
        _c("length_auc_unpaired", "DOUBLE", "Mann-Whitney AUC of chosen vs rejected lengths", False),
        _c("point_biserial_r", "DOUBLE", "correlation of length difference and label (symmetrised)", False),
        _c("rank_biserial_r", "DOUBLE", "matched-pairs rank-biserial correlation (robust companion of r)", False),
        _c("tie_rate", "DOUBLE", "share of identical or near-identical pairs", False),
        _c("scored_pairs", "INTEGER", "pairs with both scores", False),
        _c("score_tie_rate", "DOUBLE", "share of scored pairs with equal scores"),
        _c("score_margin_mean", "DOUBLE", "mean score margin"),
        _c("score_margin_median", "DOUBLE", "median score margin"),
    ),
)

GOLD_PREFERENCE = Table(
    "gold",
    "preference",
    "Training-ready preference pairs (DPO/IPO/KTO/RM): the prompt conversation, chosen and rejected responses, "
    "written only when length_confound_check passes.",
    PAIR_COLUMNS,
)

GOLD_PREFERENCE_LENGTH_BALANCED = Table(
    "gold",
    "preference_length_balanced",
    "The length-balanced remedy: silver.preference_pairs_balanced, for when the full set fails the length gate.",
    PAIR_COLUMNS,
)

SILVER_RL_CERTIFICATION = Table(
    "silver",
    "rl_certification",
    "Every RL seed's certification: its verifier scored the gold answer 1.0 in each of 3 separate processes and a "
    "perturbed wrong answer 0.0, or the reason it did not.",
    (
        _c("id", "VARCHAR", "silver.records id", False),
        _c("source", "VARCHAR", "registry source name", False),
        _c("verifier", "VARCHAR", "verifier name", False),
        _c("verifier_version", "VARCHAR", "verifier version that certified the seed", False),
        _c(
            "certified", "BOOLEAN", "true when every run accepted the gold answer and rejected the perturbed one", False
        ),
        _c(
            "reason", "VARCHAR", "why not: gold_not_accepted / nondeterministic / perturbation_accepted / timeout / ..."
        ),
        _c("gold_scores", "DOUBLE[]", "the gold answer's score in each run", False),
        _c("perturbed_score", "DOUBLE", "the perturbed wrong answer's score", False),
    ),
)

SILVER_RL_DIFFICULTY = Table(
    "silver",
    "rl_difficulty",
    "Difficulty estimates from real policy rollouts, one row per (seed, lineage); responses are never stored. "
    "Incremental: a seed is sampled again only for a new lineage (model, file hash, sampling, K, seed, verifier).",
    (
        _c("id", "VARCHAR", "silver.records id", False),
        _c("lineage", "VARCHAR", "hash of everything the estimate depends on", False),
        _c("model", "VARCHAR", "policy model name", False),
        _c("model_sha256", "VARCHAR", "sha256 of the model file", False),
        _c("sampling", "VARCHAR", "sampling parameters as JSON (temperature, top_p, max_new_tokens, k, seed)", False),
        _c("verifier", "VARCHAR", "verifier that scored the samples", False),
        _c("verifier_version", "VARCHAR", "its version", False),
        _c("k", "INTEGER", "samples drawn", False),
        _c("passes", "INTEGER", "samples the verifier scored 1.0", False),
        _c("pass_rate", "DOUBLE", "passes / k", False),
        _c("difficulty", "DOUBLE", "1 - pass_rate", False),
        _c("truncated", "INTEGER", "samples that hit max_new_tokens", False),
        _c("estimated_at", "TIMESTAMP WITH TIME ZONE", "when the estimate was made", False),
    ),
)

GOLD_RL_PROMPTS = Table(
    "gold",
    "rl_prompts",
    "The RLVR prompt bank: certified seeds (prompt, gold answer, verifier and its version), curated to the pass-rate "
    "band where a policy learns; responses are never stored.",
    (
        *_pick(("id", "source", "source_kind", "messages", "prompt", "answer", "verifier")),
        _c("verifier_version", "VARCHAR", "version of the verifier that certified the seed", False),
        _c("domain", "VARCHAR", "task domain, e.g. math/arithmetic"),
        _c("difficulty", "DOUBLE", "1 - pass rate of the policy rollouts (null: not estimated yet)"),
        _c("difficulty_source", "DOUBLE", "difficulty as the source gave it, never overwritten"),
        _c("pass_rate", "DOUBLE", "policy pass rate at K samples (null: not estimated yet)"),
        _c("difficulty_k", "INTEGER", "K of the estimate"),
        _c("difficulty_lineage", "VARCHAR", "lineage of the estimate (silver.rl_difficulty)"),
        _c("difficulty_estimated", "BOOLEAN", "false when no estimate exists yet for the seed", False),
        *_pick(("token_count", "lang", "license", "origin", "created_at")),
    ),
)

ALL_TABLES = (
    BRONZE_RECORDS,
    SILVER_RECORDS,
    SILVER_EVAL_RECORDS,
    SILVER_QUARANTINE,
    SILVER_DEDUP_CLUSTERS,
    SILVER_CONTAMINATION,
    SILVER_CROSS_REGIME_LEAKS,
    SILVER_SFT_TOKENIZED,
    SILVER_SFT_QUARANTINE,
    SILVER_PREFERENCE_PAIRS,
    SILVER_PREFERENCE_PAIRS_BALANCED,
    SILVER_PREFERENCE_BALANCE_DROPS,
    SILVER_PREFERENCE_AUDIT,
    GOLD_SFT,
    GOLD_PREFERENCE,
    GOLD_PREFERENCE_LENGTH_BALANCED,
    SILVER_RL_CERTIFICATION,
    SILVER_RL_DIFFICULTY,
    GOLD_RL_PROMPTS,
)


def markdown_reference() -> str:
    """The table reference in the README, generated from the declarations above."""
    parts = []
    for table in ALL_TABLES:
        lines = [f"### `{table.qualified}`", "", table.description, "", "| column | type | meaning |", "|---|---|---|"]
        for c in table.columns:
            meaning = ("" if c.nullable else "not null; ") + c.description.replace("|", "/")
            lines.append(f"| `{c.name}` | `{c.type}` | {meaning} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# What the length audit and the balancing read of a pairs table (never the texts: a pairs table can be large).
AUDITED_COLUMNS = (
    "id",
    "source",
    "source_kind",
    "chosen_tokens",
    "rejected_tokens",
    "is_tie",
    "score_chosen",
    "score_rejected",
)


def audited_columns_sql(table: Table) -> str:
    """SELECT of :data:`AUDITED_COLUMNS` of a pairs table, ordered by id."""
    return f"SELECT {', '.join(AUDITED_COLUMNS)} FROM {table.qualified} ORDER BY id"
