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

import codecs
import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.parquet as pq


@dataclass(frozen=True)
class RawRow:
    """One row as it was found in the file.

    ``data`` is the row's text as UTF-8: the row's own bytes, or for invalid UTF-8 the bytes decoded with
    replacement characters and re-encoded (``decode_error`` then says where the bad bytes were). Bronze hands
    ``data`` to Arrow as it is (building Arrow strings from Python ``str`` would encode every row again).
    ``record_sha256`` hashes the row's original bytes.
    """

    row_number: int
    data: bytes
    record_sha256: str
    decode_error: str | None = None

    @property
    def payload(self) -> str:
        """The row's text."""
        return self.data.decode("utf-8")


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _open_bytes(path: Path) -> bytes:
    with _open_binary(path) as f:
        return f.read()


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
    """Yield every row of ``path`` in file order, reading it in chunks (memory does not grow with the file)."""
    kind = container_of(path)
    if kind == "parquet":
        yield from _parquet_rows(path)
    elif kind == "json" and _starts_an_array(path):
        yield from _json_array_rows(path)
    else:
        yield from _jsonl_rows(path)


def _raw_row(row_number: int, raw: bytes) -> RawRow:
    sha = hashlib.sha256(raw).hexdigest()
    if raw.isascii():  # most rows: ASCII is valid UTF-8, and the check is much cheaper than a decode
        return RawRow(row_number, raw, sha)
    try:
        raw.decode("utf-8")
        return RawRow(row_number, raw, sha)
    except UnicodeDecodeError as exc:
        where = f"byte {exc.start}: {raw[exc.start : exc.end]!r}"
        return RawRow(row_number, raw.decode("utf-8", errors="replace").encode("utf-8"), sha, decode_error=where)


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    with _open_binary(path) as f:
        for index, line in enumerate(f):  # binary files split on b"\n" only, as the JSONL spec does
            line = (line[:-1] if line.endswith(b"\n") else line).rstrip(b"\r")
            if line.strip():
                yield _raw_row(index, line)


_CHUNK_BYTES = 1 << 20
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _starts_an_array(path: Path) -> bool:
    """Whether the first non-whitespace byte of the file is ``[`` (else a ``.json`` file is read as JSONL)."""
    with _open_binary(path) as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped.startswith(b"[")
    return False


def _array_elements(path: Path) -> Iterator[Any]:
    """The elements of the JSON array in ``path``, decoded one at a time from 1 MiB chunks.

    Each element is parsed by the standard library's decoder (so numbers, escapes and big integers come out as
    ``json.loads`` gives them); only the text from the current element on is held. Raises ``ValueError``
    (``json.JSONDecodeError`` or ``UnicodeDecodeError``) where the file stops being a well-formed array.
    """
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with _open_binary(path) as f:
        buf, pos, eof = "", 0, False

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(_CHUNK_BYTES)
            eof = not chunk
            buf, pos = buf[pos:] + utf8.decode(chunk, final=eof), 0
            return True

        def skip_whitespace() -> str:
            """Advance past whitespace; the next character ('' at the end of the file)."""
            nonlocal pos
            while True:
                pos = _JSON_WHITESPACE.match(buf, pos).end()  # type: ignore[union-attr]
                if pos < len(buf) or not more():
                    return buf[pos : pos + 1]

        if skip_whitespace() != "[":
            raise json.JSONDecodeError("expected '['", buf, pos)
        pos += 1
        if skip_whitespace() == "]":
            pos += 1
        else:
            while True:
                while True:
                    try:
                        value, end = _DECODER.raw_decode(buf, pos)
                    except json.JSONDecodeError:
                        if more():
                            continue  # the element runs past this chunk
                        raise
                    if end < len(buf) or not more():  # a number at the chunk's end may go on in the next one
                        break
                pos = end
                yield value
                separator = skip_whitespace()
                pos += 1
                if separator == "]":
                    break
                if separator != ",":
                    raise json.JSONDecodeError("expected ',' or ']'", buf, pos - 1)
                skip_whitespace()
        if skip_whitespace():
            raise json.JSONDecodeError("extra data after the array", buf, pos)


def _json_array_rows(path: Path) -> Iterator[RawRow]:
    """Rows of a JSON array, re-serialised one element each.

    The file is checked in a first streaming pass: a file that is not a well-formed array is one broken row
    (silver quarantines it with the parse error), and nothing of it is yielded before that is known.
    """
    try:
        for _ in _array_elements(path):
            pass
    except ValueError:
        yield _raw_row(0, _open_bytes(path))
        return
    for index, element in enumerate(_array_elements(path)):
        yield _raw_row(index, json.dumps(element, ensure_ascii=False).encode("utf-8"))


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    parquet = pq.ParquetFile(path)
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            raw = json.dumps(record, ensure_ascii=False, default=str).encode("utf-8")
            yield _raw_row(index, raw)
            index += 1
