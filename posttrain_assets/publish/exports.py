"""Trainer-ready exports of the gold tables, in the layouts trainers read as they are.

``export_gold(conn, out_dir, ...)`` writes one folder per gold table under ``out_dir``, each with the same rows as
Parquet (``train.parquet``) and JSON Lines (``train.jsonl``) and a dataset card (``README.md``):

- ``sft/``: TRL conversational language modelling, pre-tokenised: ``id``, ``messages`` (the rendered turns),
  ``input_ids``, ``labels`` (-100 on untrained positions, unshifted) and ``assistant_masks`` (1 where trained).
  TRL's ``SFTTrainer`` takes a dataset with ``input_ids`` as already tokenised and uses ``labels`` as they are;
  dropping the token columns gives a plain conversational dataset that TRL tokenises itself.
- ``preference/`` and ``preference_length_balanced/``: TRL preference, conversational with an explicit prompt:
  ``id``, ``prompt`` (the prompt conversation), ``chosen`` and ``rejected`` (each a one-message assistant list),
  ``score_chosen``, ``score_rejected`` (null where the source has no scores).
- ``rl/``: verl's RL parquet layout: ``data_source``, ``prompt`` (messages), ``ability`` (the domain),
  ``reward_model`` {style: rule, ground_truth}, ``extra_info`` {id, index, split, verifier, difficulty, ...}.

The card's YAML header declares the Parquet file as the ``train`` split, so ``datasets.load_dataset(folder)``
loads it; ``load_dataset("parquet" | "json", data_files=...)`` reads either file. Output is deterministic: rows
sorted by id, a declared Arrow schema, fixed Parquet options, JSON lines from DuckDB's writer with keys in schema
order; only ``created_at`` (an input) changes the card. Pure: a DuckDB connection and a directory, no Dagster.

Memory is bounded whatever the size of a gold table: rows are read in id order one range of ``EXPORT_BATCH_ROWS``
ids at a time (``io.ordered_arrow``: a gold table is never sorted whole) and both files are written from the
same ranges in one pass, so at most one range and one Parquet row group are held.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from posttrain_assets.warehouse.io import ordered_arrow

PARQUET_FILE = "train.parquet"
JSONL_FILE = "train.jsonl"
CARD_FILE = "README.md"
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

SFT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", _MESSAGES),
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
                    ("verifier", pa.string()),
                    ("difficulty", pa.float64()),
                    ("question", pa.string()),
                ]
            ),
        ),
    ]
)


@dataclass(frozen=True)
class ExportSpec:
    """One export folder: which gold table, the projection into the trainer layout, and its documented schema.

    ``query`` returns the schema's columns and a top-level ``id`` (the gold row's id), unsorted: it is read in id
    order, range by range, and only the schema's columns are written. ``row_index``, if set, is a struct field
    (``"column.field"``) filled with the row's 0-based position in the export (a window over the whole table would
    sort it whole).
    """

    name: str
    table: str
    layout: str
    schema: pa.Schema
    query: str
    columns: dict[str, str]
    row_index: str | None = None


def _preference_spec(name: str, table: str) -> ExportSpec:
    """A gold preference table (gold.preference and its length-balanced remedy share the layout)."""
    return ExportSpec(
        name,
        table,
        "TRL preference, conversational with explicit prompt (DPOTrainer, RewardTrainer, ...)",
        PREFERENCE_SCHEMA,
        f"""
        SELECT id,
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


# Each query returns the schema's columns (and id, when the schema has none at top level), in any order.
EXPORTS: tuple[ExportSpec, ...] = (
    ExportSpec(
        "sft",
        "gold.sft",
        "TRL conversational language modelling, pre-tokenised (SFTTrainer)",
        SFT_SCHEMA,
        """
        SELECT id,
               messages[1:num_messages] AS messages,
               input_ids,
               labels,
               list_transform(labels, lambda l: CASE WHEN l = -100 THEN 0 ELSE 1 END)::TINYINT[] AS assistant_masks
        FROM gold.sft
        """,
        {
            "id": "stable content id (sha256, 32 hex) of the gold row",
            "messages": "the conversation as rendered: [{role, content}] (the leading turns when truncated)",
            "input_ids": "token ids of the chat-template rendering of messages",
            "labels": "input id where trained (assistant content + end-of-turn marker), -100 elsewhere; unshifted",
            "assistant_masks": "1 where labels are trained, 0 elsewhere (TRL's assistant mask)",
        },
    ),
    _preference_spec("preference", "gold.preference"),
    _preference_spec("preference_length_balanced", "gold.preference_length_balanced"),
    ExportSpec(
        "rl",
        "gold.rl_prompts",
        "verl RL dataset (RLHFDataset parquet: data_source, prompt, ability, reward_model, extra_info)",
        RL_SCHEMA,
        """
        SELECT id,
               source AS data_source,
               messages AS prompt,
               coalesce(domain, 'unknown') AS ability,
               struct_pack(style := 'rule', ground_truth := answer) AS reward_model,
               struct_pack(
                   id := id,
                   "index" := NULL::BIGINT,
                   split := 'train',
                   verifier := verifier,
                   difficulty := difficulty,
                   question := prompt
               ) AS extra_info
        FROM gold.rl_prompts
        """,
        {
            "data_source": "registry source name (a verl reward function may dispatch on it)",
            "prompt": "the prompt conversation [{role, content}], ending with a user turn",
            "ability": "task domain, e.g. math/arithmetic ('unknown' where the source gives none)",
            "reward_model": "{style: 'rule', ground_truth: the gold answer the verifier checks against}",
            "extra_info": "{id, index (0-based row in this export), split, verifier, difficulty, question}",
        },
        row_index="extra_info.index",
    ),
)


@dataclass(frozen=True)
class ExportedFile:
    """One written file, relative to the export root."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ExportedTable:
    """One export folder."""

    name: str
    table: str
    layout: str
    rows: int
    sources: tuple[dict[str, Any], ...]
    files: tuple[ExportedFile, ...]


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
                    "files": [{"path": f.path, "sha256": f.sha256, "bytes": f.bytes} for f in t.files],
                }
                for t in self.tables
            ],
            "skipped": list(self.skipped),
        }


class ExportError(RuntimeError):
    """The gold tables cannot be exported as asked (missing table, tokenizer mismatch, bad argument)."""


def export_gold(
    conn: duckdb.DuckDBPyConnection,
    out_dir: Path,
    *,
    tokenizer_identity: dict[str, str],
    checks: list[dict[str, Any]] | None = None,
    created_at: datetime,
) -> ExportManifest:
    """Write one folder per gold table under ``out_dir`` (``sft/``, ``preference/``,
    ``preference_length_balanced/``, ``rl/``: Parquet + JSONL + dataset card each), plus ``manifest.json`` listing
    every file with its sha256.

    A gold table that does not exist (never materialised, e.g. gold.preference while the length gate fails) is
    skipped: listed in ``ExportManifest.skipped``, and this function's files of an earlier export of it removed, so
    ``out_dir`` holds exactly what the manifest lists. ``ExportError`` if no gold table exists.

    ``tokenizer_identity`` is ``posttrain_assets.sft.tokenizer.tokenizer_identity(tok)`` (name, tokenizer_sha256,
    chat_template_sha256); every gold.sft row must have been tokenised with it, else ``ExportError``.
    ``checks`` are check verdicts for the cards: dicts with ``name``, ``passed`` and optionally ``asset``
    (e.g. ``"gold/sft"``; a check on another gold table is left off this table's card) and ``description``.
    ``created_at`` is written into the cards and the manifest (a naive datetime is taken as UTC).
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
        name = next(spec.name for spec in EXPORTS if spec.table == table)
        for stale in (PARQUET_FILE, JSONL_FILE, CARD_FILE):
            (out_dir / name / stale).unlink(missing_ok=True)

    tables = []
    for spec in present:
        folder = out_dir / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        rows, files = _write_data(conn, spec, out_dir, folder)
        sources = _sources(conn, spec.table)
        card_checks = [c for c in checks if _check_applies(c, spec.table)]
        card = _card(spec, rows, sources, card_checks, tokenizer_identity, stamp, files)
        files.append(_write_file(out_dir, folder / CARD_FILE, lambda path, card=card: path.write_text(card, "utf-8")))
        tables.append(ExportedTable(spec.name, spec.table, spec.layout, rows, tuple(sources), tuple(files)))

    manifest = ExportManifest(out_dir, stamp, dict(tokenizer_identity), tuple(checks), tuple(tables), skipped)
    text = json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n"
    _write_file(out_dir, out_dir / MANIFEST_FILE, lambda path: path.write_text(text, "utf-8"))
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------------------------


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _written(root: Path, path: Path) -> ExportedFile:
    with path.open("rb") as written:
        digest = hashlib.file_digest(written, "sha256").hexdigest()
    return ExportedFile(path.relative_to(root).as_posix(), digest, path.stat().st_size)


def _write_file(root: Path, path: Path, write: Callable[[Path], Any]) -> ExportedFile:
    """Write ``path`` through a temporary sibling and an atomic rename; return its sha256 and size."""
    tmp = _tmp(path)
    write(tmp)
    os.replace(tmp, path)
    return _written(root, path)


def _write_data(
    conn: duckdb.DuckDBPyConnection, spec: ExportSpec, root: Path, folder: Path
) -> tuple[int, list[ExportedFile]]:
    """Write ``spec``'s Parquet and JSONL files in one pass over its rows in id order, each through a temporary
    sibling renamed into place once both are complete; return the row count and the two files.

    The Parquet file is byte-identical to ``pq.write_table`` of the whole table: rows are handed to the writer in
    row groups of exactly ``row_group_size`` rows, each one contiguous array, as ``write_table`` slices them.
    """
    parquet, jsonl = folder / PARQUET_FILE, folder / JSONL_FILE
    options = dict(PARQUET_OPTIONS)
    group_rows = options.pop("row_group_size")
    schema = spec.schema.remove_metadata()
    rows = 0
    try:
        with (
            pq.ParquetWriter(_tmp(parquet), schema, **options) as writer,
            _tmp(jsonl).open("w", encoding="utf-8", newline="\n") as lines,
            duckdb.connect() as json_writer,
        ):
            pending: list[pa.Table] = []
            pending_rows = 0
            for batch in ordered_arrow(conn, spec.query, "id", EXPORT_BATCH_ROWS):
                data = _trainer_rows(spec, batch, schema, rows)
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


def _trainer_rows(spec: ExportSpec, batch: pa.Table, schema: pa.Schema, offset: int) -> pa.Table:
    """One range of ``spec.query``'s rows as the written table: the schema's columns, cast to its types, with
    ``spec.row_index`` numbered from ``offset``."""
    data = batch.select(schema.names).cast(schema)
    if spec.row_index is None:
        return data
    name, field = spec.row_index.split(".")
    column = data.column(name).combine_chunks()
    children = column.flatten()
    position = column.type.get_field_index(field)
    children[position] = pa.array(range(offset, offset + data.num_rows), column.type.field(position).type)
    mask = column.is_null() if column.null_count else None
    numbered = pa.StructArray.from_arrays(children, fields=list(column.type), mask=mask)
    return data.set_column(data.schema.get_field_index(name), data.schema.field(name), numbered)


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
) -> str:
    """The folder's README.md: a Hugging Face dataset card (YAML header with the data files) plus the facts."""
    licenses = _hf_license([s["license"] for s in sources])
    header = ["---", "configs:", "  - config_name: default", "    data_files:", "      - split: train"]
    header += [f"        path: {PARQUET_FILE}", "license:"] + [f"  - {json.dumps(lic)}" for lic in licenses]
    header += ["tags:", "  - posttrain-assets", f"  - {spec.name}", "---", ""]
    lines = [
        f"# posttrain-assets export: {spec.name}",
        "",
        f"Rows of `{spec.table}` in the layout of {spec.layout}, sorted by id. The same rows are in "
        f"`{PARQUET_FILE}` and `{JSONL_FILE}`.",
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
    lines += ["", "## Schema", "", "| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{f.name}` | `{_md(f.type)}` | {_md(spec.columns[f.name])} |" for f in spec.schema]
    lines += ["", "## Files", "", "| file | sha256 | bytes |", "|---|---|---|"]
    lines += [f"| `{Path(f.path).name}` | `{f.sha256}` | {f.bytes} |" for f in files]
    return "\n".join(header + lines) + "\n"
