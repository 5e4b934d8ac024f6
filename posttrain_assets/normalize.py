"""Bronze row -> canonical record, or a quarantine verdict with a reason.

This is the silver stage's per-row logic, without Dagster or DuckDB: decode,
parse JSON, run the source's format adapter, and attach provenance.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from posttrain_assets.formats import get_adapter
from posttrain_assets.registry import Registry, Source
from posttrain_assets.schema import CanonicalRecord, RecordError

# Maps a landing file path to the creation time recorded on its rows.
CreatedAt = Callable[[str], dt.datetime]


@dataclass(frozen=True)
class Rejected:
    """Why a row goes to quarantine: reason code, offending field, human message."""

    reason: str
    field: str | None
    message: str


def parse_payload(payload: str, decode_error: str | None, format_name: str, regime: str) -> CanonicalRecord | Rejected:
    """Map one raw row to a canonical record, or say why it cannot be."""
    if decode_error is not None:
        return Rejected("invalid_utf8", None, f"row is not valid UTF-8 ({decode_error})")
    try:
        row: Any = json.loads(payload)
    except json.JSONDecodeError as exc:
        return Rejected("bad_json", None, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    if not isinstance(row, dict):
        return Rejected("not_an_object", None, f"expected a JSON object, got {type(row).__name__}")
    try:
        return get_adapter(format_name).parse(row, regime)
    except RecordError as exc:
        return Rejected(exc.reason, exc.field, exc.message)


def describe(rejected: Rejected, file_path: str, row_number: int) -> str:
    """The full error line users see: file, row and field."""
    field = f", field {rejected.field}" if rejected.field else ""
    return f"{file_path}, row {row_number}{field}: {rejected.message}"


@dataclass
class SilverTables:
    """Where each bronze row went: one of records, eval_records, quarantine or duplicates.

    ``bronze`` maps the id of every training row in records to the bronze row it came from, so a later
    stage that removes a record can still quarantine it with its file, row and raw payload.
    """

    records: list[dict[str, Any]]
    eval_records: list[dict[str, Any]]
    quarantine: list[dict[str, Any]]
    duplicates: list[dict[str, Any]]
    bronze: dict[str, dict[str, Any]]


PROVENANCE = ("source", "file_path", "row_number", "record_sha256")


def quarantine_entry(
    row: dict[str, Any], stage: str, reason: str, field: str | None, message: str, record_id: str | None = None
) -> dict[str, Any]:
    """A silver.quarantine row for bronze ``row``."""
    return {
        **{k: row[k] for k in PROVENANCE},
        "id": record_id,
        "stage": stage,
        "reason": reason,
        "field": field,
        "message": message,
        "payload": row["payload"],
    }


def cleaning_entry(row: dict[str, Any], stage: str, reason: str, detail: str, record_id: str) -> dict[str, Any]:
    """A silver.quarantine row for a record the cleaning pass removed, located by its bronze ``row``."""
    message = describe(Rejected(reason, None, detail), row["file_path"], row["row_number"])
    return quarantine_entry(row, stage, reason, None, message, record_id)


def duplicate_entry(
    row: dict[str, Any], member_id: str, kept_id: str, method: str, similarity: float
) -> dict[str, Any]:
    """A silver.dedup_clusters row: bronze ``row`` (content ``member_id``) collapsed onto ``kept_id``."""
    return {
        "cluster_id": kept_id,
        "kept_id": kept_id,
        "member_id": member_id,
        **{k: row[k] for k in PROVENANCE},
        "method": method,
        "similarity": similarity,
    }


class SilverBuilder:
    """Normalises bronze rows batch by batch (in source-priority order) into the silver tables.

    Exact duplicates (same content id) collapse onto the first row seen, so the rows must arrive ordered
    by registry priority, file and row number: the kept twin is the one from the highest-priority source,
    then the earliest row. Training and evaluation sources are deduplicated separately, so an eval
    question copied into training data stays visible to decontamination. Only the content ids seen so far
    are kept between batches; each :meth:`add` returns the tables of its own batch.
    """

    def __init__(self, registry: Registry, created_at: CreatedAt) -> None:
        self.registry = registry
        self.created_at = created_at
        self._seen: set[tuple[str, str]] = set()

    def add(self, bronze_rows: Iterable[dict[str, Any]]) -> SilverTables:
        out = SilverTables([], [], [], [], {})
        for row in bronze_rows:
            source = self.registry.get(row["source"])
            result = parse_payload(row["payload"], row["decode_error"], source.format, source.regime)
            if isinstance(result, Rejected):
                message = describe(result, row["file_path"], row["row_number"])
                out.quarantine.append(quarantine_entry(row, "canonical", result.reason, result.field, message))
                continue
            record_id = result.content_id()
            key = (source.role, record_id)
            if key in self._seen:
                out.duplicates.append(duplicate_entry(row, record_id, record_id, "exact", 1.0))
                continue
            self._seen.add(key)
            if source.role != "eval":  # an eval row may share its id with a contaminated training copy
                out.bronze[record_id] = row
            record = canonical_row(result, record_id, source, row, self.created_at(row["file_path"]))
            (out.eval_records if source.role == "eval" else out.records).append(record)
        return out


def canonical_row(
    record: CanonicalRecord, record_id: str, source: Source, row: dict[str, Any], created_at: dt.datetime
) -> dict[str, Any]:
    """A silver.records row: the adapter's content plus registry provenance."""
    return {
        "id": record_id,
        "source": source.name,
        "regime": record.regime,
        "messages": record.messages,
        "prompt": record.prompt,
        "response": record.response,
        "chosen": record.chosen,
        "rejected": record.rejected,
        "answer": record.answer,
        "verifier": record.verifier,
        "lang": record.lang,
        "difficulty": record.difficulty,
        "token_count": None,
        "license": source.license,
        "origin": {
            "source": source.name,
            "uri": source.origin,
            "file": row["file_path"],
            "row": row["row_number"],
            "record_sha256": row["record_sha256"],
            "file_sha256": row["file_sha256"],
        },
        "created_at": created_at,
        "domain": record.domain,
        "source_kind": source.kind,
        "score_chosen": record.score_chosen,
        "score_rejected": record.score_rejected,
    }
