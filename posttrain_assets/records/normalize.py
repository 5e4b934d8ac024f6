"""Bronze row -> canonical record, or a quarantine verdict with a reason.

This is the silver stage's per-row logic, without Dagster or DuckDB: decode,
parse JSON, run the source's format adapter, and attach provenance.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain_assets.ingest.readers import BROKEN_FILE
from posttrain_assets.ingest.registry import Registry, Source
from posttrain_assets.records.formats import get_adapter
from posttrain_assets.records.schema import DEFAULT_MAX_ROW_BYTES, MAX_JSON_DEPTH, CanonicalRecord, RecordError
from posttrain_assets.records.tools import tools_json

# Maps a landing file path to the creation time recorded on its rows.
CreatedAt = Callable[[str], dt.datetime]


@dataclass(frozen=True)
class Rejected:
    """Why a row goes to quarantine: reason code, offending field, human message."""

    reason: str
    field: str | None
    message: str


# Strings and brackets of JSON text, to measure its nesting without parsing it.
_STRUCTURE = re.compile(r'["\[\]{}]')
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _nests_deeper_than(text: str, limit: int) -> bool:
    """Whether JSON ``text`` opens more than ``limit`` arrays/objects inside each other (brackets inside strings
    do not count). Linear in the text, no recursion."""
    if text.count("[") + text.count("{") <= limit:  # most rows: too few brackets to nest that deep
        return False
    depth, pos = 0, 0
    while match := _STRUCTURE.search(text, pos):
        pos = match.end()
        char = match.group()
        if char == '"':
            string = _STRING_REST.match(text, pos)
            if string is None:  # an unterminated string: the parser says what is wrong
                return False
            pos = string.end()
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _utf8_bytes_over(text: str, limit: int) -> int | None:
    """The UTF-8 length of ``text`` when it is over ``limit``, else None (encoding only when it could be)."""
    if len(text) * 4 <= limit:  # at most 4 bytes per character
        return None
    size = len(text.encode("utf-8", errors="surrogatepass"))
    return size if size > limit else None


def parse_payload(
    payload: str,
    decode_error: str | None,
    format_name: str,
    regime: str,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> CanonicalRecord | Rejected:
    """Map one raw row to a canonical record, or say why it cannot be.

    Never raises for a bad row: a file that broke at this row, bad bytes, a row over ``max_row_bytes``, bad JSON,
    JSON nested deeper than :data:`MAX_JSON_DEPTH` (or too deep for the stack however it is reached) and every
    adapter error are a :class:`Rejected` with their reason code.
    """
    if decode_error is not None and decode_error.startswith(BROKEN_FILE):
        cause = decode_error.removeprefix(BROKEN_FILE)
        return Rejected(
            "broken_file", None, f"the file cannot be read from this row on ({cause}); rows before it are kept"
        )
    if (size := _utf8_bytes_over(payload, max_row_bytes)) is not None:
        return Rejected(
            "too_large", None, f"the row is {size:,} bytes, over the limit of {max_row_bytes:,} (max_row_bytes)"
        )
    if decode_error is not None:
        return Rejected("invalid_utf8", None, f"row is not valid UTF-8 ({decode_error})")
    payload = payload.removeprefix("\ufeff")  # a byte order mark (rows ingested before readers dropped it)
    too_deep = Rejected("too_deep", None, f"the JSON nests arrays/objects deeper than {MAX_JSON_DEPTH} levels")
    if _nests_deeper_than(payload, MAX_JSON_DEPTH):
        return too_deep
    try:
        row: Any = json.loads(payload)
    except json.JSONDecodeError as exc:
        return Rejected("bad_json", None, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except RecursionError:
        return too_deep
    if not isinstance(row, dict):
        return Rejected("not_an_object", None, f"expected a JSON object, got {type(row).__name__}")
    try:
        return get_adapter(format_name).parse(row, regime)
    except RecordError as exc:
        return Rejected(exc.reason, exc.field, exc.message)
    except RecursionError:  # an adapter walking a structure nested too deeply for the stack where it runs
        return too_deep


def describe(rejected: Rejected, file_path: str, row_number: int) -> str:
    """The full error line users see: file, row and field."""
    field = f", field {rejected.field}" if rejected.field else ""
    return f"{file_path}, row {row_number}{field}: {rejected.message}"


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


@dataclass
class Normalised:
    """One bronze row after parsing, before exact duplicates are collapsed (which needs the rows seen before).

    ``key`` is ``(role, content id)``: training and evaluation sources are deduplicated separately, so an eval
    question copied into training data stays visible to decontamination. ``key`` is None for a row that did not
    parse; ``row`` is then its quarantine entry, else its canonical record (:func:`canonical_row`).
    """

    key: tuple[str, str] | None
    row: dict[str, Any]
    bronze: dict[str, Any]


def normalise_row(
    registry: Registry, created_at: CreatedAt, bronze: dict[str, Any], max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
) -> Normalised:
    """Parse one bronze row with its source's adapter into a canonical record, or a canonical-stage quarantine
    entry saying why it cannot be (rows over ``max_row_bytes`` are not parsed)."""
    source = registry.get(bronze["source"])
    result = parse_payload(bronze["payload"], bronze["decode_error"], source.format, source.regime, max_row_bytes)
    if isinstance(result, Rejected):
        message = describe(result, bronze["file_path"], bronze["row_number"])
        return Normalised(None, quarantine_entry(bronze, "canonical", result.reason, result.field, message), bronze)
    record_id = result.content_id()
    record = canonical_row(result, record_id, source, bronze, created_at(bronze["file_path"]))
    return Normalised((source.role, record_id), record, bronze)


def canonical_row(
    record: CanonicalRecord, record_id: str, source: Source, row: dict[str, Any], created_at: dt.datetime
) -> dict[str, Any]:
    """A silver.records row: the adapter's content plus registry provenance."""
    return {
        "id": record_id,
        "source": source.name,
        "regime": record.regime,
        "messages": record.messages,
        "tools": tools_json(record.tools),
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
        "source_ref": record.source_ref.as_row() if record.source_ref else None,
        "annotations": record.annotations.as_row() if record.annotations else None,
        "tests": record.tests,
    }
