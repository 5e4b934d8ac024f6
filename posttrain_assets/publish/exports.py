"""Trainer-ready exports of the gold tables, in the layouts trainers read as they are.

``export_gold(conn, out_dir, ...)`` writes one folder per gold table under ``out_dir``, each with its rows as
Parquet and JSON Lines in shards (``data/<source>-<part>-of-<parts>.parquet`` and ``.jsonl``: the same rows in
both) and a dataset card (``README.md``):

- ``sft/``: TRL conversational language modelling, pre-tokenised: ``id``, ``messages`` (the rendered turns),
  ``input_ids``, ``labels`` (-100 on untrained positions, unshifted) and ``assistant_masks`` (1 where trained).
  TRL's ``SFTTrainer`` takes a dataset with ``input_ids`` as already tokenised and uses ``labels`` as they are;
  dropping the token columns gives a plain conversational dataset that TRL tokenises itself.
- ``preference/`` and ``preference_length_balanced/``: TRL preference, conversational with an explicit prompt:
  ``id``, ``prompt`` (the prompt conversation), ``chosen`` and ``rejected`` (each a one-message assistant list),
  ``score_chosen``, ``score_rejected`` (null where the source has no scores).
- ``rl/``: verl's RL parquet layout: ``data_source`` (the dataset as verl's ``default_compute_score`` routes it,
  where it is one it knows), ``prompt`` (messages, with the answer-format instruction appended), ``ability`` (the
  domain), ``reward_model`` {style: rule, ground_truth}, ``extra_info`` {id, index, split, source, verifier,
  verifier_version, answer_format, difficulty, question, tests (python_eval)}; plus ``reward.py``, verl's custom
  reward function scoring with our own verifiers at the certifying version
  (:mod:`posttrain_assets.publish.verl_reward`).

Each card also says how to train on its folder: the exact ``SFTConfig`` / ``DPOConfig`` settings (``max_length``
that keeps every row, ``assistant_only_loss`` off because ``labels`` already carry the mask) or the verl config
lines, the same settings ``manifest.json`` lists as ``trainer_settings``.

Shards: a folder's rows are split by source, and a source of more than ``SHARD_ROWS`` rows into 2, 4, 8, ...
(at most 256) parts by the leading bits of the id (a sha256: the parts are even, and a part is an id range), so
the rows a change touches sit in few shards: a new source adds its own shards and rewrites no other, a removed
source's shards are deleted. (Not by landing file: ``origin.file`` is an absolute path, so a shard's name would
change with the machine; and one landing file may hold a million rows.) Each shard's rows are sorted by id. The
card's YAML header declares ``data/*.parquet`` as the ``train`` split, so ``datasets.load_dataset(folder)``
loads every shard; ``load_dataset("parquet" | "json", data_files=...)`` reads either kind of file;
``manifest.json`` lists each folder's files (verl takes the Parquet list as ``data.train_files``).

Refresh: each shard's fingerprint (computed in DuckDB: an aggregate over its ids and each row's hash, the gold
row's stored sync fingerprint while those are trusted, else a hash of the exported row; with the projection's text,
schema, writer options and library versions) is stored in ``manifest.json`` with its
files' sha256; a later export rewrites only the shards whose fingerprint differs from the manifest in ``out_dir``
or whose file is missing or does not match its sha256 (a hand-edited or truncated file), deletes the shards no
longer planned, and rewrites the cards and the manifest. Whether a kept file still matches its sha256 is decided
from its size and modification time (ns) where a file-stat record (``stat_cache``: a local directory, not the
export) holds them for that sha256, as ``make`` and ``rsync`` decide (and the bronze ingest): only a file whose size
or mtime differs from its record, or has none, is read and hashed again (``ExportedTable.files_hashed``). So a
refresh reads only what it writes; the manifest stays free of the stat (a fresh export's manifest is byte for byte
a refreshed one's). So the files are the same as a fresh export into an
empty folder, whatever was there before. Every file is written under a temporary name and renamed, so a killed
export leaves whole files (and the next one finds the shards it had not finished by their sha256).

Output is deterministic: rows sorted by id in each shard, a declared Arrow schema, fixed Parquet options, JSON
lines from DuckDB's writer with keys in schema order; only ``created_at`` (an input) changes the card and the
manifest. Pure: a DuckDB connection and a directory, no Dagster.

Memory is bounded whatever the size of a gold table: a shard's rows are read in id order one range of
``EXPORT_BATCH_ROWS`` ids at a time (``io.ordered_arrow``: a gold table is never sorted whole) and both files
are written from the same ranges in one pass, so at most one range and one Parquet row group are held.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from posttrain_assets.publish import verl_reward
from posttrain_assets.warehouse.catalogue import ALL_TABLES
from posttrain_assets.warehouse.io import fingerprint_sql, memory_limit_at_most, ordered_arrow, trusted_fingerprints
from posttrain_assets.warehouse.model import Table

# The single-file layout of a mixture folder (export_mixture); an export folder of an earlier version had them too.
PARQUET_FILE = "train.parquet"
JSONL_FILE = "train.jsonl"
# An export folder's shards: SHARD_DIR/<source>-<part>-of-<parts>.parquet and .jsonl (EMPTY_SHARD for no rows).
SHARD_DIR = "data"
SHARD_GLOB = f"{SHARD_DIR}/*.parquet"
EMPTY_SHARD = "no-rows"
# A source of more rows than this is split into a power of two of parts (an sft part of 20,000 rows is about
# 300 MB of JSON lines): a change within a large source rewrites the parts of the ids it touches.
SHARD_ROWS = 20_000
# The part of a row is the leading bits of its id's first byte, so a source has at most 256 parts.
MAX_SHARD_BITS = 8
# Part of every shard's fingerprint: raise it when the files' bytes for the same rows change by code that is not
# the projection's text, the schema or the writer options (which the fingerprint holds as they are).
EXPORT_FORMAT_VERSION = 1
CARD_FILE = "README.md"
REWARD_FILE = "reward.py"
# What rl/reward.py holds: the source of a real module of this package (linted and tested as such).
REWARD_SOURCE = Path(verl_reward.__file__).read_text(encoding="utf-8")
MANIFEST_FILE = "manifest.json"

# Fixed writer options: the same rows and the same pyarrow version give byte-identical files.
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
    "version": "2.6",
    "data_page_version": "1.0",
    "row_group_size": 10_000,
    "store_schema": True,
}

# Ids per ordered read (io.ordered_arrow): each range is sorted by its own small ORDER BY and held as one Arrow
# table, so memory is bounded by this many rows instead of the whole gold table (DuckDB cannot spill a sort of
# wide rows, and gold.sft rows carry input_ids and labels lists). A divisor of PARQUET_OPTIONS["row_group_size"],
# so a row group is assembled from whole ranges; any value gives the same files.
EXPORT_BATCH_ROWS = 5_000

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_MESSAGES = pa.list_(_MESSAGE)
# SFT messages keep the structured fields of agentic and reasoning turns (null where absent), as silver.records holds
# them: the conversation next to its input_ids/labels says what was trained.
_TOOL_CALL = pa.struct(
    [
        ("id", pa.string()),
        ("type", pa.string()),
        ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())])),
    ]
)
_SFT_MESSAGES = pa.list_(
    pa.struct(
        [
            ("role", pa.string()),
            ("content", pa.string()),
            ("reasoning_content", pa.string()),
            ("tool_calls", pa.list_(_TOOL_CALL)),
            ("tool_call_id", pa.string()),
            ("name", pa.string()),
        ]
    )
)

SFT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", _SFT_MESSAGES),
        ("tools", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("assistant_masks", pa.list_(pa.int8())),
    ]
)
PREFERENCE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", _MESSAGES),
        ("chosen", _MESSAGES),
        ("rejected", _MESSAGES),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
    ]
)
RL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", _MESSAGES),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("id", pa.string()),
                    ("index", pa.int64()),
                    ("split", pa.string()),
                    ("source", pa.string()),
                    ("verifier", pa.string()),
                    ("verifier_version", pa.string()),
                    ("answer_format", pa.string()),
                    ("difficulty", pa.float64()),
                    ("question", pa.string()),
                    ("tests", pa.string()),
                ]
            ),
        ),
    ]
)

# Dataset names verl's default_compute_score routes to a scorer of its own (verl/utils/reward_score/__init__.py,
# verl 0.9.1; names starting with "aime" too). The card says which exported rows verl can score without reward.py.
VERL_ROUTED_DATA_SOURCES = frozenset(
    {
        "openai/gsm8k",
        "lighteval/MATH",
        "DigitalLearningGmbH/MATH-lighteval",
        "HuggingFaceH4/MATH-500",
        "math_dapo",
        "math",
        "math_dapo_reasoning",
        "numina_aops_forum",
        "numina_synthetic_math",
        "numina_amc_aime",
        "numina_synthetic_amc",
        "numina_cn_k12",
        "numina_olympiads",
        "codecontests",
        "apps",
        "codeforces",
        "taco",
        "hiyouga/geometry3k",
        "searchR1_nq",
        "searchR1_triviaqa",
        "searchR1_popqa",
        "searchR1_hotpotqa",
        "searchR1_2wikimultihopqa",
        "searchR1_musique",
        "searchR1_bamboogle",
    }
)
# The same datasets under the other names they go by, exported under verl's name so verl routes them: GSM8K and
# the MATH competition set (the MATH format's rows name hendrycks/competition_math; lighteval/MATH is its copy).
VERL_DATA_SOURCE_ALIASES: dict[str, str] = {
    "gsm8k": "openai/gsm8k",
    "openai/grade-school-math": "openai/gsm8k",
    "hendrycks/competition_math": "lighteval/MATH",
    "competition_math": "lighteval/MATH",
    "EleutherAI/hendrycks_math": "lighteval/MATH",
}


def verl_routes(data_source: str) -> bool:
    """Whether verl's ``default_compute_score`` has a scorer for ``data_source``."""
    return data_source in VERL_ROUTED_DATA_SOURCES or data_source.startswith("aime")


# The answer-format instruction appended to an RL prompt whose source sets none (registry ``answer_format``), by
# verifier: where the verifier, and verl's scorer for the same dataset, look for the final answer. The numeric and
# math wording is verl's own GSM8K and MATH preprocessing's; python_eval runs the response as a program and needs
# none.
ANSWER_FORMAT_DEFAULTS: dict[str, str] = {
    "numeric": 'Let\'s think step by step and output the final answer after "####".',
    "math": "Let's think step by step and output the final answer within \\boxed{}.",
    "exact_match": 'Output the final answer after "####".',
}
# A prompt naming one of these already says how to give its final answer: no default is appended to it (a
# registry instruction still is).
FINAL_ANSWER_MARKERS = ("####", "\\boxed")


@dataclass(frozen=True)
class ExportSpec:
    """One export folder: which gold table, the projection into the trainer layout, and its documented schema.

    ``query`` returns the schema's columns, a top-level ``id`` (the gold row's id) and ``source`` (the shard it
    goes to), unsorted: it is read in id order, range by range, and only the schema's columns are written. Its
    named parameters come from :meth:`params`. ``kind`` (sft, preference, rl) says which trainer reads it, and so
    what its card says about training.
    """

    name: str
    kind: str
    table: str
    layout: str
    schema: pa.Schema
    query: str
    columns: dict[str, str]
    bind: Callable[[Mapping[str, str]], dict[str, Any]] | None = None
    # Columns the query computes from other exported columns only (sft's assistant_masks from labels): left out
    # of the row hash of the fingerprint, which holds the query's text (hashing them cost as much as the rest).
    derived: tuple[str, ...] = ()

    def params(self, answer_formats: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The named parameters of ``query``; ``answer_formats`` as :func:`export_gold` takes them."""
        return self.bind(answer_formats or {}) if self.bind else {}


def _preference_spec(name: str, table: str) -> ExportSpec:
    """A gold preference table (gold.preference and its length-balanced remedy share the layout)."""
    return ExportSpec(
        name,
        "preference",
        table,
        "TRL preference, conversational with explicit prompt (DPOTrainer, RewardTrainer, ...)",
        PREFERENCE_SCHEMA,
        f"""
        SELECT id,
               source,
               messages AS prompt,
               [struct_pack(role := 'assistant', content := chosen)] AS chosen,
               [struct_pack(role := 'assistant', content := rejected)] AS rejected,
               score_chosen,
               score_rejected
        FROM {table}
        """,
        {
            "id": "stable content id (sha256, 32 hex) of the gold row",
            "prompt": "the prompt conversation [{role, content}], ending with a user turn",
            "chosen": "[{role: assistant, content}]: the preferred response",
            "rejected": "[{role: assistant, content}]: the dispreferred response",
            "score_chosen": "score of the chosen response, when the source has one (else null)",
            "score_rejected": "score of the rejected response, when the source has one (else null)",
        },
    )


def _rl_params(answer_formats: Mapping[str, str]) -> dict[str, Any]:
    """The RL query's parameters: the registry's answer formats, the verifiers' defaults, verl's dataset names."""
    sources = sorted(answer_formats)
    verifiers = sorted(ANSWER_FORMAT_DEFAULTS)
    aliases = sorted(VERL_DATA_SOURCE_ALIASES)
    return {
        "format_sources": sources,
        "format_texts": [answer_formats[s] for s in sources],
        "default_verifiers": verifiers,
        "default_texts": [ANSWER_FORMAT_DEFAULTS[v] for v in verifiers],
        "marker_pattern": "|".join(re.escape(m) for m in FINAL_ANSWER_MARKERS),
        "alias_names": aliases,
        "verl_names": [VERL_DATA_SOURCE_ALIASES[a] for a in aliases],
    }


# The RL projection. The instruction a row gets is its source's registry answer_format ("" = none), else its
# verifier's default unless the prompt already names a final-answer marker; it is appended to the last (user)
# turn, after a space as verl's own preprocessing does, unless that turn already contains it.
RL_QUERY = """
WITH bank AS (
    SELECT *,
           messages[-1].content AS last_turn,
           CASE WHEN list_contains($format_sources, source)
                     THEN nullif(list_extract($format_texts, list_position($format_sources, source)), '')
                WHEN regexp_matches(messages[-1].content, $marker_pattern) THEN NULL
                ELSE list_extract($default_texts, list_position($default_verifiers, verifier))
           END AS wanted_format
    FROM gold.rl_prompts
), instructed AS (
    SELECT *, CASE WHEN NOT contains(last_turn, wanted_format) THEN wanted_format END AS answer_format
    FROM bank
)
SELECT id,
       source,
       coalesce(
           list_extract($verl_names, list_position($alias_names, source_ref.data_source)),
           source_ref.data_source,
           source
       ) AS data_source,
       CASE WHEN answer_format IS NULL THEN messages
            ELSE list_concat(
                messages[1:-2],
                [struct_pack(role := messages[-1].role, content := last_turn || ' ' || answer_format)]
            )
       END AS prompt,
       coalesce(domain, 'unknown') AS ability,
       struct_pack(style := 'rule', ground_truth := answer) AS reward_model,
       struct_pack(
           id := id,
           "index" := coalesce(source_ref."index", origin."row"),
           split := coalesce(source_ref.split, 'train'),
           source := source,
           verifier := verifier,
           verifier_version := verifier_version,
           answer_format := answer_format,
           difficulty := difficulty,
           question := prompt,
           tests := tests
       ) AS extra_info
FROM instructed
"""


# Each query returns the schema's columns, id (also when the schema has none at top level) and source, in any order.
EXPORTS: tuple[ExportSpec, ...] = (
    ExportSpec(
        "sft",
        "sft",
        "gold.sft",
        "TRL conversational language modelling, pre-tokenised (SFTTrainer)",
        SFT_SCHEMA,
        """
        SELECT id,
               source,
               messages[1:num_messages] AS messages,
               tools,
               input_ids,
               labels,
               list_transform(labels, lambda l: CASE WHEN l = -100 THEN 0 ELSE 1 END)::TINYINT[] AS assistant_masks
        FROM gold.sft
        """,
        {
            "id": "stable content id (sha256, 32 hex) of the gold row",
            "messages": "the conversation as rendered: [{role, content, reasoning_content, tool_calls: [{id, type, "
            "function: {name, arguments (JSON text)}}], tool_call_id, name}] (null where absent; the leading turns "
            "when truncated)",
            "tools": "the tool definitions passed to the chat template as tools= (JSON text), null when none",
            "input_ids": "token ids of the chat-template rendering of messages",
            "labels": "input id where trained (assistant content + end-of-turn marker), -100 elsewhere; unshifted",
            "assistant_masks": "1 where labels are trained, 0 elsewhere (TRL's assistant mask)",
        },
        derived=("assistant_masks",),
    ),
    _preference_spec("preference", "gold.preference"),
    _preference_spec("preference_length_balanced", "gold.preference_length_balanced"),
    ExportSpec(
        "rl",
        "rl",
        "gold.rl_prompts",
        "verl RL dataset (RLHFDataset parquet: data_source, prompt, ability, reward_model, extra_info)",
        RL_SCHEMA,
        RL_QUERY,
        {
            "data_source": "the dataset as the landing row names it (verl's name where verl routes it, e.g. "
            "openai/gsm8k, lighteval/MATH); the registry source name where the row names none",
            "prompt": "the prompt conversation [{role, content}], ending with a user turn that carries the "
            "answer-format instruction (extra_info.answer_format)",
            "ability": "task domain, e.g. math/arithmetic ('unknown' where the source gives none)",
            "reward_model": "{style: 'rule', ground_truth: the gold answer the verifier checks against}",
            "extra_info": "{id, index and split (the landing row's own; else its row in the landing file and "
            "'train'), source (registry), verifier and verifier_version (that certified the row), answer_format "
            "(the instruction this export appended; null: none), difficulty, question (the prompt as the source "
            "gives it), tests (python_eval: the unit tests reward.py runs the response against; else null)}",
        },
        bind=_rl_params,
    ),
)


@dataclass(frozen=True)
class ExportedFile:
    """One written file, relative to the export root."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Shard:
    """One shard of an export folder: the rows of ``source`` whose id's first byte, shifted right by
    ``8 - bits``, is ``part`` (of ``2 ** bits`` parts). ``fingerprint`` changes whenever its files' bytes would
    (:func:`_plan_shards`)."""

    source: str
    part: int
    bits: int
    rows: int
    fingerprint: str

    @property
    def name(self) -> str:
        """The files' stem, stable across runs: ``<source>-<part>-of-<parts>`` (:data:`EMPTY_SHARD`: no rows)."""
        if not self.source:
            return EMPTY_SHARD
        return f"{self.source}-{self.part:05d}-of-{2**self.bits:05d}"

    def paths(self, export: str) -> tuple[str, str]:
        """The Parquet and JSONL files, relative to the export root."""
        return (f"{export}/{SHARD_DIR}/{self.name}.parquet", f"{export}/{SHARD_DIR}/{self.name}.jsonl")

    def to_dict(self, export: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "part": self.part,
            "parts": 2**self.bits,
            "rows": self.rows,
            "fingerprint": self.fingerprint,
            "files": list(self.paths(export)),
        }


@dataclass(frozen=True)
class ExportedTable:
    """One export folder; ``trainer``: how to train on it (:class:`TrainerSettings` as a dict). ``written``: the
    data files this export wrote (the others were kept as the previous export left them), and ``rows_written``
    their rows; neither goes into the manifest, which is the same however the files came to be."""

    name: str
    table: str
    layout: str
    rows: int
    sources: tuple[dict[str, Any], ...]
    files: tuple[ExportedFile, ...]
    trainer: dict[str, Any] = field(default_factory=dict)
    shards: tuple[Shard, ...] = ()
    written: tuple[str, ...] = field(default=(), compare=False)
    rows_written: int = field(default=0, compare=False)
    # Kept data files read and hashed again to prove they still match the manifest (no stat record, or their size
    # or mtime differs from it); 0 on a refresh that changed nothing, with a ``stat_cache``.
    files_hashed: int = field(default=0, compare=False)

    def parquet_files(self) -> list[str]:
        """The folder's Parquet files, relative to the export root, in shard order."""
        return [shard.paths(self.name)[0] for shard in self.shards]


@dataclass(frozen=True)
class ExportManifest:
    """What ``export_gold`` wrote: the folders, their row counts and sources, each file's sha256."""

    out_dir: Path
    created_at: str
    tokenizer: dict[str, str]
    checks: tuple[dict[str, Any], ...]
    tables: tuple[ExportedTable, ...] = field(default_factory=tuple)
    skipped: tuple[str, ...] = field(default_factory=tuple)

    def table(self, name: str) -> ExportedTable:
        """The export folder called ``name`` (sft / preference / rl)."""
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(f"no export named {name!r} (have: {', '.join(t.name for t in self.tables)})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``manifest.json`` holds), with paths relative to ``out_dir``."""
        return {
            "created_at": self.created_at,
            "tokenizer": dict(self.tokenizer),
            "checks": [dict(c) for c in self.checks],
            "exports": [
                {
                    "name": t.name,
                    "table": t.table,
                    "layout": t.layout,
                    "rows": t.rows,
                    "sources": [dict(s) for s in t.sources],
                    "shards": [shard.to_dict(t.name) for shard in t.shards],
                    "files": [{"path": f.path, "sha256": f.sha256, "bytes": f.bytes} for f in t.files],
                    "trainer_settings": dict(t.trainer),
                }
                for t in self.tables
            ],
            "skipped": list(self.skipped),
        }


def shard_files(folder: Path, suffix: str = ".parquet") -> list[Path]:
    """The Parquet (``suffix=".jsonl"``: JSON Lines) shards of the export folder ``folder`` in shard order (by
    name, as ``manifest.json`` lists them and ``datasets`` globs them): together, the folder's rows."""
    return sorted((Path(folder) / SHARD_DIR).glob(f"*{suffix}"))


class ExportError(RuntimeError):
    """The gold tables cannot be exported as asked (missing table, tokenizer mismatch, bad argument)."""


def export_gold(
    conn: duckdb.DuckDBPyConnection,
    out_dir: Path,
    *,
    tokenizer_identity: dict[str, str],
    checks: list[dict[str, Any]] | None = None,
    created_at: datetime,
    answer_formats: Mapping[str, str] | None = None,
    stat_cache: Path | None = None,
    rehash: bool = False,
) -> ExportManifest:
    """Write one folder per gold table under ``out_dir`` (``sft/``, ``preference/``,
    ``preference_length_balanced/``, ``rl/``: Parquet + JSONL shards under ``data/`` and a dataset card each;
    ``rl/`` also ``reward.py``), plus ``manifest.json`` listing every shard (source, rows, fingerprint) and file
    with its sha256, and each folder's trainer settings.

    Into a folder an earlier export wrote, only the shards whose fingerprint or files differ from its
    ``manifest.json`` are written (see the module docstring); the result is the same as into an empty folder.
    A gold table that does not exist (never materialised, e.g. gold.preference while the length gate fails) is
    skipped: listed in ``ExportManifest.skipped``, and this function's files of an earlier export of it removed, so
    ``out_dir`` holds exactly what the manifest lists. ``ExportError`` if no gold table exists.

    ``tokenizer_identity`` is ``posttrain_assets.sft.tokenizer.tokenizer_identity(tok)`` (name, tokenizer_sha256,
    chat_template_sha256); every gold.sft row must have been tokenised with it, else ``ExportError``.
    ``checks`` are check verdicts for the cards: dicts with ``name``, ``passed`` and optionally ``asset``
    (e.g. ``"gold/sft"``; a check on another gold table is left off this table's card) and ``description``.
    ``created_at`` is written into the cards and the manifest (a naive datetime is taken as UTC).
    ``answer_formats`` maps a registry source to the answer-format instruction for its RL prompts (its registry
    ``answer_format``; "" for none); a source not in it gets its verifier's default (:data:`ANSWER_FORMAT_DEFAULTS`)
    unless its prompt already names a final-answer marker (:data:`FINAL_ANSWER_MARKERS`).
    ``stat_cache`` is a directory (``POSTTRAIN_CACHE_DIR``) for this machine's record of each data file's size,
    mtime (ns) and sha256 (:class:`FileStats`): a kept file that matches its record is not hashed again. None, or
    ``rehash`` (a full rebuild): every kept file is hashed (and, with ``stat_cache``, recorded).
    """
    for key in ("name", "tokenizer_sha256", "chat_template_sha256"):
        if not tokenizer_identity.get(key):
            raise ExportError(f"tokenizer_identity lacks {key!r}: {tokenizer_identity!r}")
    stamp = (created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC)).isoformat()
    checks = [_normalise_check(c) for c in (checks or [])]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = _existing_tables(conn)
    present = [spec for spec in EXPORTS if spec.table in existing]
    skipped = tuple(spec.table for spec in EXPORTS if spec.table not in existing)
    if not present:
        raise ExportError(f"none of {', '.join(s.table for s in EXPORTS)} exists: materialise gold before exporting")
    if any(spec.table == "gold.sft" for spec in present):
        _require_tokenizer(conn, tokenizer_identity)

    for table in skipped:
        folder = out_dir / next(spec.name for spec in EXPORTS if spec.table == table)
        _remove_stale_shards(folder, set())
        for stale in (REWARD_FILE, CARD_FILE):
            (folder / stale).unlink(missing_ok=True)

    previous = _previous_files(out_dir)
    stats = FileStats.load(stat_cache, out_dir, trust=not rehash)
    answer_formats = dict(answer_formats or {})
    tables = []
    for spec in present:
        folder = out_dir / spec.name
        (folder / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        params = spec.params(answer_formats)
        shards = _plan_shards(conn, spec, params)
        files: list[ExportedFile] = []
        written: list[str] = []
        rows_written = 0
        hashed_before = stats.hashed
        for shard in shards:
            kept = _kept_files(out_dir, shard, spec.name, previous, stats)
            if kept is None:
                parquet, jsonl = (out_dir / path for path in shard.paths(spec.name))
                rows, kept = _write_data(conn, spec, _shard_query(spec, shard), params, out_dir, parquet, jsonl)
                if rows != shard.rows:  # the gold table changed under the export
                    raise ExportError(f"{spec.table}: shard {shard.name} has {rows} rows, planned {shard.rows}")
                written += [f.path for f in kept]
                rows_written += rows
                stats.record(out_dir, kept)
            files += kept
        _remove_stale_shards(folder, {Path(path).name for shard in shards for path in shard.paths(spec.name)})
        rows = sum(shard.rows for shard in shards)
        if spec.kind == "rl":
            files.append(_write_text(out_dir, folder / REWARD_FILE, REWARD_SOURCE))
        sources = _sources(conn, spec.table)
        card_checks = [c for c in checks if _check_applies(c, spec.table)]
        trainer = _trainer_settings(conn, spec, params, answer_formats, [shard.paths(spec.name)[0] for shard in shards])
        card = _card(spec, rows, sources, card_checks, tokenizer_identity, stamp, files, trainer)
        files.append(_write_text(out_dir, folder / CARD_FILE, card))
        tables.append(
            ExportedTable(
                spec.name,
                spec.table,
                spec.layout,
                rows,
                tuple(sources),
                tuple(files),
                trainer.manifest_entry(),
                tuple(shards),
                tuple(written),
                rows_written,
                stats.hashed - hashed_before,
            )
        )

    manifest = ExportManifest(out_dir, stamp, dict(tokenizer_identity), tuple(checks), tuple(tables), skipped)
    text = json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n"
    _write_text(out_dir, out_dir / MANIFEST_FILE, text)
    stats.save({f.path for t in tables for f in t.files})
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------------------------

# The first byte of an id (two lowercase hex digits) as an integer, in SQL; the part of a row is its leading bits.
_ID_BYTE = """(CASE WHEN regexp_full_match(left(id, 2), '[0-9a-f]{2}')
      THEN (strpos('0123456789abcdef', id[1]) - 1) * 16 + strpos('0123456789abcdef', id[2]) - 1
      ELSE error('gold row id ' || coalesce(id, 'NULL') || ' does not start with two lowercase hex digits') END)"""
# Source names become file names: registry names are [a-z0-9_]+ (ingest.registry.NAME_PATTERN).
_SHARD_SOURCE = re.compile(r"[a-z0-9_]+")


def _writer_identity(spec: ExportSpec) -> str:
    """What the files' bytes depend on besides the rows: the projection, the schema, the writer options and the
    libraries that write them (a new pyarrow or DuckDB rewrites every shard once)."""
    identity = {
        "format": EXPORT_FORMAT_VERSION,
        "query": spec.query,
        "schema": str(spec.schema),
        "derived": list(spec.derived),
        "parquet": PARQUET_OPTIONS,
        "pyarrow": pa.__version__,
        "duckdb": duckdb.__version__,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _plan_shards(conn: duckdb.DuckDBPyConnection, spec: ExportSpec, params: dict[str, Any]) -> list[Shard]:
    """The shards of ``spec``'s rows, in name order, each with its row count and fingerprint; one empty shard
    (:data:`EMPTY_SHARD`) when there are no rows, so the folder still holds the schema.

    A source of ``n`` rows has ``2 ** bits`` parts, the fewest of at most ``SHARD_ROWS`` rows each on average
    (at most 256). The fingerprint is the sha256 of the writer identity, the shard's name and rows, and the md5
    of its ``id:row hash`` list in id order (:func:`_row_hashes`): one aggregate query, no row leaves DuckDB."""
    counts = conn.execute(
        f"SELECT source, count(*) FROM ({spec.query}) GROUP BY source ORDER BY source", params
    ).fetchall()
    bits = {}
    for source, rows in counts:
        if source is None or not _SHARD_SOURCE.fullmatch(source):
            raise ExportError(f"{spec.table}: source {source!r} cannot name a shard file (want [a-z0-9_]+)")
        bits[source] = min(((rows - 1) // SHARD_ROWS).bit_length(), MAX_SHARD_BITS)
    writer = _writer_identity(spec)
    if not bits:
        return [Shard("", 0, 0, 0, hashlib.sha256(f"{writer}:{EMPTY_SHARD}".encode()).hexdigest())]
    hashed, basis = _row_hashes(conn, spec, params)
    sources = sorted(bits)
    planned = conn.execute(
        f"""
        WITH hashed AS ({hashed}), parted AS (
            SELECT *, list_extract($shard_bits, list_position($shard_sources, source)) AS bits FROM hashed
        )
        SELECT source, bits, id_byte >> (8 - bits) AS part, count(*) AS rows,
               md5(string_agg(id || ':' || row_hash::VARCHAR, ',' ORDER BY id)) AS digest
        FROM parted
        GROUP BY ALL
        ORDER BY source, part
        """,
        {**params, "shard_sources": sources, "shard_bits": [bits[s] for s in sources]},
    ).fetchall()
    shards = []
    for source, source_bits, part, rows, digest in planned:
        shard = Shard(source, part, source_bits, rows, "")
        fingerprint = hashlib.sha256(f"{writer}:{basis}:{shard.name}:{rows}:{digest}".encode()).hexdigest()
        shards.append(replace(shard, fingerprint=fingerprint))
    return shards


# The warehouse's tables by qualified name: an export's table has stored row fingerprints when io.sync_table keeps it.
_TABLES: dict[str, Table] = {t.qualified: t for t in ALL_TABLES}


def _row_hashes(conn: duckdb.DuckDBPyConnection, spec: ExportSpec, params: dict[str, Any]) -> tuple[str, str]:
    """A query of ``spec``'s rows as (``source``, ``id``, ``id_byte``, ``row_hash``) and what the hashes are of.

    An exported row is a function of its gold row and ``params``, so where the gold table's stored row
    fingerprints are trusted (io.trusted_fingerprints: they change whenever the row does) they are read, with the
    parameters in the basis, instead of hashing every exported value: hashing gold.sft's input_ids and labels was
    most of a refresh's export at 1M rows. Otherwise each row's exported columns but ``spec.derived`` are hashed
    (io.fingerprint_sql)."""
    table = _TABLES.get(spec.table)
    stored = trusted_fingerprints(conn, table) if table is not None else None
    if stored is not None:
        query = (
            f"SELECT q.source, q.id, {_ID_BYTE} AS id_byte, f.sync_fingerprint AS row_hash "
            f"FROM ({spec.query}) q JOIN {stored} f ON f.sync_key = q.id"
        )
        return query, "stored:" + json.dumps(params, sort_keys=True, default=str)
    row_hash = fingerprint_sql((name, kind) for name, kind in _duckdb_columns(spec.schema) if name not in spec.derived)
    return f"SELECT source, id, {_ID_BYTE} AS id_byte, {row_hash} AS row_hash FROM ({spec.query})", "rows"


@functools.cache
def _duckdb_columns(schema: pa.Schema) -> tuple[tuple[str, duckdb.DuckDBPyType], ...]:
    """(name, DuckDB type) of each column of ``schema``, as DuckDB reads the Arrow types (asked of a private
    in-memory database, once per schema)."""
    with duckdb.connect() as scratch:
        relation = scratch.from_arrow(schema.empty_table())
        return tuple(zip(relation.columns, relation.types, strict=True))


def _shard_query(spec: ExportSpec, shard: Shard) -> str:
    """``spec``'s query restricted to the rows of ``shard``, the part as an id range (the ids whose first byte
    has the part's leading bits: :func:`_plan_shards` proved every id starts with two lowercase hex digits), which
    DuckDB answers from the id column's min/max per row group. Literals, not parameters: the shard is ours (its
    source matched ``[a-z0-9_]+``), not input."""
    if not shard.source:
        return f"SELECT * FROM ({spec.query}) WHERE false"
    where = [f"source = '{shard.source}'"]
    width = 1 << (8 - shard.bits)
    if shard.part > 0:
        where.append(f"id >= '{shard.part * width:02x}'")
    if (shard.part + 1) * width < 256:
        where.append(f"id < '{(shard.part + 1) * width:02x}'")
    return f"SELECT * FROM ({spec.query}) WHERE {' AND '.join(where)}"


def _previous_files(out_dir: Path) -> dict[str, tuple[str, dict[str, ExportedFile]]]:
    """Per shard file path of the previous export into ``out_dir`` (its ``manifest.json``): the shard's
    fingerprint and its files as the manifest lists them. Empty without a readable manifest (then every shard is
    written)."""
    try:
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        found: dict[str, tuple[str, dict[str, ExportedFile]]] = {}
        for export in manifest["exports"]:
            listed = {f["path"]: ExportedFile(f["path"], f["sha256"], f["bytes"]) for f in export["files"]}
            for shard in export.get("shards", []):
                files = {path: listed[path] for path in shard["files"]}
                for path in shard["files"]:
                    found[path] = (shard["fingerprint"], files)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return found


def _kept_files(
    root: Path,
    shard: Shard,
    export: str,
    previous: dict[str, tuple[str, dict[str, ExportedFile]]],
    stats: FileStats,
) -> list[ExportedFile] | None:
    """The shard's files as the previous export wrote them, if that export planned the same fingerprint for it
    and both files are still there with its size and sha256 (taken from ``stats`` when the file's size and mtime
    are those recorded with that sha256, else hashed); else None (write the shard)."""
    kept = []
    for path in shard.paths(export):
        fingerprint, files = previous.get(path, ("", {}))
        listed = files.get(path)
        if fingerprint != shard.fingerprint or listed is None:
            return None
        try:
            if not stats.matches(root, listed):
                return None
        except OSError:
            return None
        kept.append(listed)
    return kept


class FileStats:
    """This machine's record of the data files of one export folder: path (relative to the export root) ->
    [size, mtime_ns, sha256] as last written or hashed, kept in ``<stat_cache>/export_file_stats/`` under a hash of
    the folder's resolved path (the rule ``make``, ``rsync`` and the bronze ingest use: a file whose size and
    modification time are unchanged holds the same bytes).

    Not in ``manifest.json``: the mtimes differ from one machine and one export to the next, and the manifest is
    byte for byte the same however its files came to be. A missing or unreadable record only costs a re-hash; an
    edit that keeps a file's size and mtime (a tool that restores the mtime, or one within the file system's
    timestamp granularity of our own write) is not seen: delete the record (or pass no ``stat_cache``) to hash
    every file."""

    def __init__(self, path: Path | None, root: str, records: dict[str, list[Any]]) -> None:
        self.path = path
        self.root = root
        self.records = records
        self.loaded = dict(records)
        self.hashed = 0

    @classmethod
    def load(cls, stat_cache: Path | None, out_dir: Path, *, trust: bool = True) -> FileStats:
        """The record of ``out_dir`` in ``stat_cache``; ``trust=False``: start from none (every kept file is
        hashed), and replace it when saved."""
        if stat_cache is None:
            return cls(None, "", {})
        root = str(out_dir.resolve())
        path = Path(stat_cache) / "export_file_stats" / f"{hashlib.sha256(root.encode()).hexdigest()[:32]}.json"
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            records = stored["files"] if stored.get("out_dir") == root else {}
            if not isinstance(records, dict):
                records = {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            records = {}
        return cls(path, root, records if trust else {})

    def matches(self, root: Path, listed: ExportedFile) -> bool:
        """Whether the file ``listed`` names holds its sha256 and size: by its record when its size and mtime are
        the recorded ones for that sha256, else by hashing it (recorded then). OSError when it is missing."""
        stat = (root / listed.path).stat()
        if stat.st_size != listed.bytes:
            return False
        if self.records.get(listed.path) == [stat.st_size, stat.st_mtime_ns, listed.sha256]:
            return True
        self.hashed += 1
        if _written(root, root / listed.path) != listed:
            return False
        self.records[listed.path] = [stat.st_size, stat.st_mtime_ns, listed.sha256]
        return True

    def record(self, root: Path, files: Sequence[ExportedFile]) -> None:
        """Record the files just written (their sha256 computed from what was written)."""
        for written in files:
            stat = (root / written.path).stat()
            self.records[written.path] = [stat.st_size, stat.st_mtime_ns, written.sha256]

    def save(self, current: set[str]) -> None:
        """Keep the records of ``current`` files only; written (atomically) when they changed."""
        self.records = {path: record for path, record in self.records.items() if path in current}
        if self.path is None or self.records == self.loaded:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"out_dir": self.root, "files": self.records}, sort_keys=True)
        _tmp(self.path).write_text(text, encoding="utf-8")
        os.replace(_tmp(self.path), self.path)


def _remove_stale_shards(folder: Path, keep: set[str]) -> None:
    """Delete the files under ``folder/data`` not named in ``keep`` (shards no longer planned, temporary files of
    a killed export) and the single files of the earlier layout; ``data/`` itself when left empty."""
    for legacy in (PARQUET_FILE, JSONL_FILE):
        (folder / legacy).unlink(missing_ok=True)
    shard_dir = folder / SHARD_DIR
    if not shard_dir.is_dir():
        return
    for path in shard_dir.iterdir():
        if path.name not in keep and path.is_file():
            path.unlink()
    if not keep and not any(shard_dir.iterdir()):
        shard_dir.rmdir()


def export_mixture(
    conn: duckdb.DuckDBPyConnection,
    folder: Path,
    *,
    mixture: str,
    table: str,
    mixture_manifest: Mapping[str, Any],
    answer_formats: Mapping[str, str] | None = None,
) -> list[ExportedFile]:
    """Write one mixture of gold.mixtures (posttrain_assets.curation) into ``folder`` in its gold table's layout
    (TRL for SFT and preference, verl for RL: the same projection as :data:`EXPORTS`): ``train.parquet``,
    ``train.jsonl`` (a row drawn for several epochs appears that many times, next to itself: rows are in id
    order) and ``mixture_manifest.json`` (the mixture's manifest). Returns the written files."""
    spec = next((s for s in EXPORTS if s.table == table), None)
    if spec is None:
        raise ExportError(f"mixture {mixture!r}: {table!r} is not an exported gold table")
    drawn = f"(SELECT g.* FROM {table} g JOIN gold.mixtures m ON m.id = g.id WHERE m.mixture = $mixture_name)"
    query, replaced = re.subn(rf"FROM {re.escape(table)}\b", f"FROM {drawn}", spec.query)
    if replaced != 1:
        raise ExportError(f"the {spec.name} export query does not read {table} exactly once")
    params = {**spec.params(answer_formats), "mixture_name": mixture}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, files = _write_data(conn, replace(spec, query=query), query, params, folder, *_single(folder))
    text = json.dumps(dict(mixture_manifest), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    files.append(_write_file(folder, folder / "mixture_manifest.json", lambda path: path.write_text(text, "utf-8")))
    return files


# ---------------------------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------------------------


def _single(folder: Path) -> tuple[Path, Path]:
    return folder / PARQUET_FILE, folder / JSONL_FILE


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _written(root: Path, path: Path) -> ExportedFile:
    with path.open("rb") as written:
        digest = hashlib.file_digest(written, "sha256").hexdigest()
    return ExportedFile(path.relative_to(root).as_posix(), digest, path.stat().st_size)


def _write_text(root: Path, path: Path, text: str) -> ExportedFile:
    """``path`` holding ``text`` (UTF-8), written (atomically) only if it holds something else."""
    data = text.encode("utf-8")
    try:
        if path.read_bytes() == data:
            return ExportedFile(path.relative_to(root).as_posix(), hashlib.sha256(data).hexdigest(), len(data))
    except OSError:
        pass
    return _write_file(root, path, lambda tmp: tmp.write_bytes(data))


def _write_file(root: Path, path: Path, write: Callable[[Path], Any]) -> ExportedFile:
    """Write ``path`` through a temporary sibling and an atomic rename; return its sha256 and size."""
    tmp = _tmp(path)
    write(tmp)
    os.replace(tmp, path)
    return _written(root, path)


def _write_data(
    conn: duckdb.DuckDBPyConnection,
    spec: ExportSpec,
    query: str,
    params: dict[str, Any],
    root: Path,
    parquet: Path,
    jsonl: Path,
) -> tuple[int, list[ExportedFile]]:
    """Write the rows of ``query`` (``spec``'s, or a part of it, with ``params``) in ``spec``'s schema as the
    Parquet file ``parquet`` and the JSONL file ``jsonl``, in one pass over the rows in id order, each through a
    temporary sibling renamed into place once both are complete; return the row count and the two files.

    The Parquet file is byte-identical to ``pq.write_table`` of the whole table: rows are handed to the writer in
    row groups of exactly ``row_group_size`` rows, each one contiguous array, as ``write_table`` slices them.
    """
    options = dict(PARQUET_OPTIONS)
    group_rows = options.pop("row_group_size")
    schema = spec.schema.remove_metadata()
    rows = 0
    try:
        with (
            pq.ParquetWriter(_tmp(parquet), schema, **options) as writer,
            _tmp(jsonl).open("w", encoding="utf-8", newline="\n") as lines,
            duckdb.connect() as json_writer,
            # the rows are read range by range: DuckDB's cache of the blocks read would only sit beside the ranges
            memory_limit_at_most(conn),
        ):
            pending: list[pa.Table] = []
            pending_rows = 0
            for batch in ordered_arrow(conn, query, "id", EXPORT_BATCH_ROWS, params):
                data = batch.select(schema.names).cast(schema)
                rows += data.num_rows
                _write_jsonl(spec, data, lines, json_writer)
                pending.append(data)
                pending_rows += data.num_rows
                while pending_rows >= group_rows:
                    group = pa.concat_tables(pending)
                    writer.write_table(group.slice(0, group_rows).combine_chunks(), row_group_size=group_rows)
                    pending, pending_rows = [group.slice(group_rows)], pending_rows - group_rows
            if pending_rows or not rows:
                # The last, short row group; or, with no rows at all, the one empty row group write_table writes.
                group = pa.concat_tables(pending) if pending else schema.empty_table()
                writer.write_table(group.combine_chunks(), row_group_size=group_rows)
        for path in (parquet, jsonl):
            os.replace(_tmp(path), path)
    finally:
        for path in (parquet, jsonl):
            _tmp(path).unlink(missing_ok=True)
    return rows, [_written(root, parquet), _written(root, jsonl)]


def _write_jsonl(spec: ExportSpec, data: pa.Table, out: Any, writer: Any) -> None:
    """One JSON object per line, keys in schema order, compact, UTF-8 as is; nested values keep their layout.

    The lines come from DuckDB's JSON writer (``to_json`` of each row, in row order, on ``writer``, an in-memory
    connection of the export's own): a range of 5,000 gold.sft rows (4.6 M token ids) takes 0.5 s where
    ``json.dumps`` of the Python rows took 1.6 s, and gives the same bytes for ids, strings and integers
    (floats in shortest round-trip form, ``1e-7`` where Python writes ``1e-07``). JSON has no NaN or Infinity,
    which the writer would emit as bare words, so a non-finite float fails the export."""
    for column in data.column_names:
        where = _non_finite_at(data.column(column), column)
        if where is not None:
            raise ExportError(f"{spec.table}: {where} holds NaN or an infinity, which JSON cannot carry")
    writer.register("export_rows", data)
    try:
        lines = writer.sql("SELECT to_json(export_rows)::VARCHAR FROM export_rows").fetchnumpy()
    finally:
        writer.unregister("export_rows")
    for line in next(iter(lines.values())):
        out.write(line)
        out.write("\n")


def _non_finite_at(values: Any, name: str) -> str | None:
    """The path of the first float field of ``values`` (an Arrow array, nested or not) holding NaN or an
    infinity, e.g. ``extra_info.difficulty``; None if every float is finite or null."""
    import pyarrow.compute as pc

    kind = values.type
    if pa.types.is_floating(kind):
        return name if pc.any(pc.invert(pc.is_finite(values))).as_py() else None
    if pa.types.is_struct(kind):
        for index, child in enumerate(kind):
            found = _non_finite_at(pc.struct_field(values, [index]), f"{name}.{child.name}")
            if found is not None:
                return found
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _non_finite_at(pc.list_flatten(values), f"{name}[]")
    return None


# ---------------------------------------------------------------------------------------------------------------
# database look-ups
# ---------------------------------------------------------------------------------------------------------------


def _existing_tables(conn: duckdb.DuckDBPyConnection) -> set[str]:
    rows = conn.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall()
    return {f"{schema}.{name}" for schema, name in rows}


def _require_tokenizer(conn: duckdb.DuckDBPyConnection, identity: dict[str, str]) -> None:
    """Every gold.sft row's token ids must come from the tokenizer and template the card names."""
    rows = conn.execute(
        "SELECT tokenizer_sha256, chat_template_sha256, count(*) FROM gold.sft GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    wrong = [r for r in rows if (r[0], r[1]) != (identity["tokenizer_sha256"], identity["chat_template_sha256"])]
    if wrong:
        described = "; ".join(f"{n} row(s) tokenizer {t[:12]} template {c[:12]}" for t, c, n in wrong)
        raise ExportError(
            f"gold.sft was tokenised with another tokenizer or chat template than the one given "
            f"(tokenizer {identity['tokenizer_sha256'][:12]}, template {identity['chat_template_sha256'][:12]}): "
            f"{described}; re-run the graph with this tokenizer or pass its identity"
        )


def _sources(conn: duckdb.DuckDBPyConnection, table: str) -> list[dict[str, Any]]:
    """Per source of ``table``: rows, kind, license(s) and origin(s), sorted by source name."""
    rows = conn.execute(
        f"""
        SELECT source, count(*) AS rows,
               list(DISTINCT source_kind ORDER BY source_kind) AS kinds,
               list(DISTINCT license ORDER BY license) AS licenses,
               list(DISTINCT origin.uri ORDER BY origin.uri) AS origins
        FROM {table} GROUP BY source ORDER BY source
        """
    ).fetchall()
    return [
        {
            "source": source,
            "rows": n,
            "kind": ", ".join(k for k in kinds if k),
            "license": ", ".join(lic for lic in licenses if lic),
            "origin": "; ".join(o for o in origins if o),
        }
        for source, n, kinds, licenses, origins in rows
    ]


def _normalise_check(check: dict[str, Any]) -> dict[str, Any]:
    if "name" not in check or "passed" not in check:
        raise ExportError(f"a check needs 'name' and 'passed': {check!r}")
    out = {"name": str(check["name"]), "passed": bool(check["passed"])}
    for key in ("asset", "description"):
        if check.get(key) is not None:
            out[key] = str(check[key])
    return out


def _check_applies(check: dict[str, Any], table: str) -> bool:
    """Upstream checks (bronze, silver) go on every card; a gold table's own checks only on its card."""
    asset = check.get("asset", "").replace("/", ".")
    return not asset.startswith("gold.") or asset == table


# ---------------------------------------------------------------------------------------------------------------
# how to train on an export
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainerSettings:
    """How to train on one export folder: the trainer's config (``trl.SFTConfig``, ``trl.DPOConfig``, or ``verl``'s
    Hydra overrides) and the settings to give it, with the card's explanation of them."""

    config: str
    settings: dict[str, Any]
    card_lines: tuple[str, ...]

    def manifest_entry(self) -> dict[str, Any]:
        return {"config": self.config, "settings": dict(self.settings)}

    def python(self) -> str:
        """The settings as the Python call a user pastes (``SFTConfig(max_length=4096, ...)``)."""
        module, name = self.config.rsplit(".", 1)
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.settings.items())
        return f"from {module} import {name}\n{name}({arguments})"


# TRL's defaults that would change what is trained on: max_length=1024 truncates longer rows (and drops those left
# with nothing to train), and assistant_only_loss=True makes TRL rebuild the mask from the chat template.
TRL_DEFAULT_MAX_LENGTH = 1024


def _trainer_settings(
    conn: duckdb.DuckDBPyConnection,
    spec: ExportSpec,
    params: dict[str, Any],
    answer_formats: Mapping[str, str],
    parquet_files: list[str],
) -> TrainerSettings:
    """``parquet_files``: the folder's Parquet shards, relative to the export root (verl takes the list)."""
    if spec.kind == "sft":
        return _sft_settings(conn)
    if spec.kind == "preference":
        return _dpo_settings(conn, spec.table)
    return _verl_settings(conn, spec, params, answer_formats, parquet_files)


def _sft_settings(conn: duckdb.DuckDBPyConnection) -> TrainerSettings:
    """SFTConfig for gold.sft: ``max_length`` at the ``max_seq_len`` the rows were fitted to (so no row is
    truncated or dropped), ``assistant_only_loss`` off (``labels`` carry the mask), no packing."""
    budgets, longest = conn.execute(
        "SELECT list(DISTINCT max_seq_len ORDER BY max_seq_len), max(num_tokens) FROM gold.sft"
    ).fetchone()
    max_length = max([*budgets, longest]) if longest is not None else None
    settings = {"max_length": max_length, "assistant_only_loss": False, "packing": False}
    budget = ", ".join(str(b) for b in budgets) or "none (no rows)"
    lines = (
        f"Rows were tokenised to fit `max_seq_len` = {budget} tokens; the longest has {longest or 0}. `labels` "
        "already carry the assistant-only loss mask (-100 on every position not trained: system and user turns, "
        "template markup), and TRL's `SFTTrainer` uses a `labels` column as it is. Train with:",
        "",
        "```python",
        *TrainerSettings("trl.SFTConfig", settings, ()).python().split("\n"),
        "```",
        "",
        f"- `max_length={max_length}`: TRL's default ({TRL_DEFAULT_MAX_LENGTH}) cuts longer rows and drops those "
        "left with no trained token; at `max_seq_len` every row is kept whole.",
        "- `assistant_only_loss=False` (TRL's default): the mask is in `labels` already. `True` makes TRL rebuild it "
        "from the chat template, which needs `{% generation %}` markers this template does not have (TRL raises "
        '"The chat template is not training-compatible").',
        "- `packing=False`: one row per sequence, as exported.",
    )
    return TrainerSettings("trl.SFTConfig", settings, lines)


def _dpo_settings(conn: duckdb.DuckDBPyConnection, table: str) -> TrainerSettings:
    """DPOConfig for a gold preference table: ``max_length`` at least the longest pair.

    ``token_count`` is the chat-template rendering of the prompt and the longer (by characters) response; the other
    response differs from it by at most ``|length_diff|`` tokens, so their sum bounds both sequences of a pair
    (None when some pair has no count: no truncation then)."""
    bound, uncounted = conn.execute(
        f"SELECT max(token_count + abs(length_diff)), count(*) FILTER (WHERE token_count IS NULL) FROM {table}"
    ).fetchone()
    max_length = bound if not uncounted else None
    settings = {"max_length": max_length}
    longest = f"at most {bound} tokens" if bound is not None else "not counted"
    lines = (
        f"A pair's longer sequence (prompt and response with the chat template) is {longest}. Train with:",
        "",
        "```python",
        *TrainerSettings("trl.DPOConfig", settings, ()).python().split("\n"),
        "```",
        "",
        f"- `max_length={max_length}`: TRL's default ({TRL_DEFAULT_MAX_LENGTH}) cuts longer pairs and drops those "
        "whose prompt alone fills it; at this length every pair is kept whole.",
    )
    return TrainerSettings("trl.DPOConfig", settings, lines)


def _verl_settings(
    conn: duckdb.DuckDBPyConnection,
    spec: ExportSpec,
    params: dict[str, Any],
    answer_formats: Mapping[str, str],
    parquet_files: list[str],
) -> TrainerSettings:
    """verl's config lines for the RL folder, and what the card says about rewards, answer formats and routing.
    ``data.train_files`` is the list of the folder's Parquet shards (verl's RLHFDataset reads a list of files)."""
    settings: dict[str, Any] = {
        "data.train_files": list(parquet_files),
        "reward.custom_reward_function.path": f"{spec.name}/{REWARD_FILE}",
        "reward.custom_reward_function.name": "compute_score",
    }
    relation = f"({spec.query})"
    formats = conn.execute(
        f"""SELECT extra_info.source, extra_info.verifier, count(*) FILTER (WHERE extra_info.answer_format IS NOT NULL),
                   count(*)
            FROM {relation} GROUP BY ALL ORDER BY ALL""",
        params,
    ).fetchall()
    routed = conn.execute(f"SELECT data_source, count(*) FROM {relation} GROUP BY ALL ORDER BY ALL", params).fetchall()
    versions = conn.execute(
        "SELECT verifier, verifier_version, count(*) FROM gold.rl_prompts GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    lines = [
        f"`{REWARD_FILE}` (in this folder) is verl's custom reward function for these rows: it scores a response "
        "with posttrain-assets' own verifier for the row (`extra_info.verifier`) at the version that certified it "
        "(`extra_info.verifier_version`; another installed version raises instead of scoring by other rules), so "
        "training-time rewards are the certification-time verdicts. posttrain-assets must be importable where "
        "verl computes rewards. With `$EXPORT` the export folder (the one holding `manifest.json`):",
        "",
        "```bash",
        '"data.train_files=[' + ",".join(f"$EXPORT/{path}" for path in parquet_files) + ']"',
        f"reward.custom_reward_function.path=$EXPORT/{settings['reward.custom_reward_function.path']}",
        f"reward.custom_reward_function.name={settings['reward.custom_reward_function.name']}",
        "```",
        "",
        "(`data.train_files` lists every Parquet shard of this folder, as `manifest.json` does. The two "
        "`reward.custom_reward_function` lines; verl before 0.7 reads them without the `reward.` prefix.)",
        "",
        "| verifier | certified with version | rows |",
        "|---|---|---|",
        *(f"| `{_md(v)}` | `{_md(version)}` | {n} |" for v, version, n in versions),
        "",
        "### Answer format",
        "",
        "Each prompt's last user turn ends with an instruction saying where to put the final answer, the place the "
        "verifier (and verl's scorer for the dataset) reads it from; `extra_info.answer_format` holds the "
        'instruction this export appended (null: none). A source\'s registry `answer_format` sets it ("": '
        "none); otherwise the verifier's default is used, unless the prompt already names a final-answer marker "
        f"({', '.join(f'`{m}`' for m in FINAL_ANSWER_MARKERS)}). No instruction is appended twice.",
        "",
        "| source | verifier | instruction | set by | rows given it | rows |",
        "|---|---|---|---|---|---|",
    ]
    for source, verifier, given, n in formats:
        if source in answer_formats:
            instruction, origin = answer_formats[source] or "(none)", "registry"
        else:
            instruction, origin = ANSWER_FORMAT_DEFAULTS.get(verifier) or "(none)", "verifier default"
        lines.append(f"| `{_md(source)}` | `{_md(verifier)}` | {_md(instruction)} | {origin} | {given} | {n} |")
    lines += [
        "",
        "### Data sources",
        "",
        "`data_source` is the dataset as the landing row names it, under verl's name where verl knows the dataset, "
        "else the registry source; verl's `default_compute_score` scores only the routed ones, `reward.py` every "
        "row. `extra_info.split` and `extra_info.index` are the landing row's own (else `train` and its row in "
        "the landing file).",
        "",
        "| data_source | rows | routed by verl's default_compute_score |",
        "|---|---|---|",
        *(f"| `{_md(d)}` | {n} | {'yes' if verl_routes(d) else 'no'} |" for d, n in routed),
    ]
    return TrainerSettings("verl", settings, tuple(lines))


# ---------------------------------------------------------------------------------------------------------------
# dataset card
# ---------------------------------------------------------------------------------------------------------------


def _hf_license(licenses: Sequence[str]) -> list[str]:
    return sorted({lic.strip().lower() for joined in licenses for lic in joined.split(",") if lic.strip()})


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _card(
    spec: ExportSpec,
    rows: int,
    sources: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    tokenizer: dict[str, str],
    created_at: str,
    files: list[ExportedFile],
    trainer: TrainerSettings,
) -> str:
    """The folder's README.md: a Hugging Face dataset card (YAML header with the data files) plus the facts."""
    licenses = _hf_license([s["license"] for s in sources])
    header = ["---", "configs:", "  - config_name: default", "    data_files:", "      - split: train"]
    header += [f"        path: {json.dumps(SHARD_GLOB)}", "license:"] + [f"  - {json.dumps(lic)}" for lic in licenses]
    header += ["tags:", "  - posttrain-assets", f"  - {spec.name}", "---", ""]
    lines = [
        f"# posttrain-assets export: {spec.name}",
        "",
        f"Rows of `{spec.table}` in the layout of {spec.layout}, in shards: `{SHARD_DIR}/<source>-<part>-of-"
        "<parts>.parquet` and the same rows in the `.jsonl` of the same name, each shard sorted by id (a source of "
        f"more than {SHARD_ROWS:,} rows is split into parts by id). `datasets.load_dataset` of this folder reads "
        f"every Parquet shard (`{SHARD_GLOB}`); `manifest.json` lists the files.",
        "",
        f"- rows: {rows}",
        f"- created: {created_at}",
        f"- tokenizer: {tokenizer['name']}",
        f"- tokenizer sha256: `{tokenizer['tokenizer_sha256']}`",
        f"- chat template sha256: `{tokenizer['chat_template_sha256']}`",
        "",
        "## Sources",
        "",
        "| source | rows | kind | license | origin |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{_md(s['source'])}` | {s['rows']} | {_md(s['kind'])} | {_md(s['license'])} | {_md(s['origin'])} |"
        for s in sources
    ]
    lines += ["", "## Checks", ""]
    if checks:
        lines += ["| check | on | verdict | description |", "|---|---|---|---|"]
        lines += [
            f"| `{_md(c['name'])}` | {_md(c.get('asset', ''))} | {'passed' if c['passed'] else 'FAILED'} "
            f"| {_md(c.get('description', ''))} |"
            for c in checks
        ]
    else:
        lines.append("No check verdicts were given to the export.")
    lines += ["", "## Training with " + ("verl" if trainer.config == "verl" else "TRL"), "", *trainer.card_lines]
    lines += ["", "## Schema", "", "| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{f.name}` | `{_md(f.type)}` | {_md(spec.columns[f.name])} |" for f in spec.schema]
    lines += ["", "## Files", "", "| file | sha256 | bytes |", "|---|---|---|"]
    lines += [f"| `{Path(f.path).name}` | `{f.sha256}` | {f.bytes} |" for f in files]
    return "\n".join(header + lines) + "\n"
