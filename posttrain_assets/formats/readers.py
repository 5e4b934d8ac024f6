"""Readers: split a landing file into raw rows, unchanged, for the bronze layer.

Containers: JSONL (``.jsonl``, ``.jsonl.gz``), JSON arrays (``.json``, ``.json.gz``;
a ``.json`` file that is not an array is read as JSONL) and Parquet (``.parquet``).
A reader never parses a row's meaning; it only finds row boundaries. Rows keep
their raw text so that silver can quarantine bad JSON or bad bytes with the row
number, and nothing is dropped here.

Row numbers are 0-based: the line index in a JSONL file (blank lines are skipped
but still counted), the element index in a JSON array, the row index in Parquet.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq


@dataclass(frozen=True)
class RawRow:
    """One row as it was found in the file.

    ``payload`` is the row's text (for invalid UTF-8, decoded with replacement
    characters, and ``decode_error`` says where the bad bytes were).
    ``record_sha256`` hashes the row's original bytes.
    """

    row_number: int
    payload: str
    record_sha256: str
    decode_error: str | None = None


def _open_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def container_of(path: Path) -> str:
    """'jsonl', 'json' or 'parquet', from the file name."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    raise ValueError(f"{path}: unsupported file type (use .jsonl, .json, .parquet, optionally .gz for JSON)")


def read_raw_rows(path: Path) -> Iterator[RawRow]:
    """Yield every row of ``path`` in file order."""
    kind = container_of(path)
    if kind == "parquet":
        yield from _parquet_rows(path)
        return
    data = _open_bytes(path)
    if kind == "json":
        rows = _json_array_rows(data)
        if rows is not None:
            yield from rows
            return
    yield from _jsonl_rows(data)


def _raw_row(row_number: int, raw: bytes) -> RawRow:
    sha = hashlib.sha256(raw).hexdigest()
    try:
        return RawRow(row_number, raw.decode("utf-8"), sha)
    except UnicodeDecodeError as exc:
        where = f"byte {exc.start}: {raw[exc.start : exc.end]!r}"
        return RawRow(row_number, raw.decode("utf-8", errors="replace"), sha, decode_error=where)


def _jsonl_rows(data: bytes) -> Iterator[RawRow]:
    for index, line in enumerate(data.split(b"\n")):
        line = line.rstrip(b"\r")
        if line.strip():
            yield _raw_row(index, line)


def _json_array_rows(data: bytes) -> list[RawRow] | None:
    """Rows of a JSON array, re-serialised one element each; None if not an array."""
    stripped = data.lstrip()
    if not stripped.startswith(b"["):
        return None
    try:
        elements = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        # The whole file is one broken row: silver quarantines it with the parse error.
        return [_raw_row(0, data)]
    rows = []
    for index, element in enumerate(elements):
        raw = json.dumps(element, ensure_ascii=False).encode("utf-8")
        rows.append(_raw_row(index, raw))
    return rows


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    parquet = pq.ParquetFile(path)
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            raw = json.dumps(record, ensure_ascii=False, default=str).encode("utf-8")
            yield _raw_row(index, raw)
            index += 1
