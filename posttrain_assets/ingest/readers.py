"""Readers: split a landing file into raw rows, unchanged, for the bronze layer.

Containers: JSONL (``.jsonl``, ``.jsonl.gz``), JSON arrays (``.json``, ``.json.gz``;
a ``.json`` file that is not an array is read as JSONL) and Parquet (``.parquet``).
A reader never parses a row's meaning; it only finds row boundaries. Rows keep
their raw text so that silver can quarantine bad JSON or bad bytes with the row
number, and nothing is dropped here.

Row numbers are 0-based: the line index in a JSONL file (blank lines are skipped
but still counted), the element index in a JSON array, the row index in Parquet.

A UTF-8 byte order mark is not part of a row: one at the start of a file is skipped (and in JSONL one at the
start of any line, as concatenated files carry them).

What can go wrong with a file, and what a reader then does:

- The file cannot be opened or read at all (missing, a directory, no permission, an I/O error) or has an
  unsupported name: :class:`LandingFileError`, one line naming the file. Nothing is ingested from it.
- Its content stops decoding part-way (a truncated or corrupt gzip stream, unreadable Parquet data): the rows read
  before the break are yielded as usual, then one more row, numbered where the break is, holding the bytes read
  after the last whole row and a ``decode_error`` that starts with :data:`BROKEN_FILE` and says why. Silver
  quarantines that row as ``broken_file``, so the file shows up in quarantine with its row and reason.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import itertools
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

# decode_error of the row that ends a file whose content stopped decoding (see the module docstring)
BROKEN_FILE = "file broken: "

_BOM = codecs.BOM_UTF8


class LandingFileError(Exception):
    """A landing file that cannot be read as rows at all: it is missing, unreadable or of an unsupported type.
    The message is one line that names the file."""


@dataclass(frozen=True)
class RawRow:
    """One row as it was found in the file.

    ``data`` is the row's text as UTF-8: the row's own bytes, or for invalid UTF-8 the bytes decoded with
    replacement characters and re-encoded (``decode_error`` then says where the bad bytes were). Bronze hands
    ``data`` to Arrow as it is (building Arrow strings from Python ``str`` would encode every row again).
    ``record_sha256`` hashes the row's original bytes (without its line ending or byte order mark).
    """

    row_number: int
    data: bytes
    record_sha256: str
    decode_error: str | None = None

    @property
    def payload(self) -> str:
        """The row's text."""
        return self.data.decode("utf-8")


def _is_gzip(path: Path) -> bool:
    return path.name.endswith(".gz")


def _open_file(path: Path) -> BinaryIO:
    """``path`` opened for reading; :class:`LandingFileError` when the operating system refuses."""
    try:
        return path.open("rb")
    except OSError as exc:
        raise unreadable(path, exc) from None


def unreadable(path: Path, exc: OSError) -> LandingFileError:
    """The one-line error for a file the operating system will not open or read."""
    if isinstance(exc, FileNotFoundError):
        return LandingFileError(f"{path}: file not found")
    return LandingFileError(f"{path}: cannot be read ({exc.strerror or exc})")


class _Chunks:
    """The bytes of a landing file (decompressed for ``.gz``), in chunks of at most ``_CHUNK_BYTES``.

    A decoding error of the content (a truncated or corrupt gzip stream) ends the chunks and is kept in ``error``;
    every byte decoded before it has been handed out. An operating-system error is a :class:`LandingFileError`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        with _open_file(self.path) as raw:
            stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if _is_gzip(self.path) else raw
            while True:
                try:
                    # read1: at most one read of the file, so nothing decoded is held back when the next one fails
                    chunk = stream.read1(_CHUNK_BYTES)
                except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # BadGzipFile before OSError: it is one
                    self.error = f"{type(exc).__name__}: {exc}"
                    return
                except OSError as exc:
                    raise unreadable(self.path, exc) from None
                if not chunk:
                    return
                yield chunk


def _open_bytes(path: Path) -> bytes:
    """The whole (decompressed) content of ``path``; only called for a file whose content decodes."""
    return b"".join(_Chunks(path))


def container_of(path: Path) -> str:
    """'jsonl', 'json' or 'parquet', from the file name."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    raise LandingFileError(f"{path}: unsupported file type (use .jsonl, .json, .parquet, optionally .gz for JSON)")


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


def _broken_row(row_number: int, raw: bytes, error: str) -> RawRow:
    """The row that ends a file whose content stopped decoding: the bytes read after the last whole row."""
    text = raw.decode("utf-8", errors="replace").encode("utf-8")
    return RawRow(row_number, text, hashlib.sha256(raw).hexdigest(), decode_error=BROKEN_FILE + error)


def _jsonl_row(index: int, line: bytes) -> RawRow | None:
    """Line ``index`` (without its ``\\n``) as a row; None for a blank line."""
    line = line.rstrip(b"\r")
    if line.startswith(_BOM):
        line = line[len(_BOM) :]
    return _raw_row(index, line) if line.strip() else None


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    """Lines split on b"\\n" only, as the JSONL spec does; a line may run across any number of chunks."""
    chunks = _Chunks(path)
    index = 0
    pending: list[bytes] = []  # the start of the line that runs past the chunks read so far
    for chunk in chunks:
        lines = chunk.split(b"\n")
        if len(lines) == 1:
            pending.append(chunk)
            continue
        lines[0] = b"".join([*pending, lines[0]])
        pending = [lines.pop()]
        for line in lines:
            if (row := _jsonl_row(index, line)) is not None:
                yield row
            index += 1
    rest = b"".join(pending)
    if chunks.error is not None:
        yield _broken_row(index, rest, chunks.error)
    elif (row := _jsonl_row(index, rest)) is not None:
        yield row


_CHUNK_BYTES = 1 << 20
# What may still belong to a number when it runs to the end of the text read so far.
_NUMBER_REST = re.compile(r"[0-9.eE+\-]*\Z")
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _starts_an_array(path: Path) -> bool:
    """Whether the first non-whitespace byte of the file (after a byte order mark) is ``[`` (else a ``.json``
    file is read as JSONL)."""
    head = b""
    for chunk in _Chunks(path):
        head = (head + chunk).lstrip()
        if head.startswith(_BOM):
            head = head[len(_BOM) :].lstrip()
        if head and not _BOM.startswith(head):  # (a prefix of a byte order mark may be cut by the chunk's end)
            return head.startswith(b"[")
    return head.startswith(b"[")


# Containers and strings, to find where a value too deeply nested for the standard library's decoder ends.
_STRUCTURE = re.compile(r'["\[\]{}]')
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _container_end(text: str, start: int) -> int | None:
    """The end of the array or object that starts at ``text[start]``, found by counting brackets outside strings
    (no recursion, so any depth); None when ``text`` ends before it does."""
    depth, pos = 0, start
    while match := _STRUCTURE.search(text, pos):
        if match.group() == '"':
            string = _STRING_REST.match(text, match.end())
            if string is None:
                return None
            pos = string.end()
            continue
        depth += 1 if match.group() in "[{" else -1
        pos = match.end()
        if depth == 0:
            return pos
    return None


class _ArrayReader:
    """The elements of the JSON array in a file, as row payloads, decoded one at a time from chunks.

    Each element is parsed by the standard library's decoder and re-serialised (so numbers, escapes and big
    integers come out as ``json.loads`` gives them); an element nested too deeply for it keeps its text as it is
    in the file (silver quarantines it). Only the text from the current element on is held. :meth:`elements`
    raises ``ValueError`` (``json.JSONDecodeError`` or ``UnicodeDecodeError``) where the file stops being a
    well-formed array; when that is because its content stopped decoding, ``chunks.error`` says why and
    :meth:`tail` holds the text read after the last whole element.
    """

    def __init__(self, path: Path) -> None:
        self.chunks = _Chunks(path)
        self._source = iter(self.chunks)
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._buf, self._pos, self._eof = "", 0, False

    def tail(self) -> str:
        """The text read after the last whole element."""
        return self._buf[self._pos :]

    def elements(self, serialise: bool = True) -> Iterator[bytes]:
        """Each element's payload (``b""`` for every element when not ``serialise``: a check of the file)."""
        if self._skip_whitespace() == "\ufeff":  # a byte order mark
            self._pos += 1
        if self._skip_whitespace() != "[":
            raise json.JSONDecodeError("expected '['", self._buf, self._pos)
        self._pos += 1
        if self._skip_whitespace() == "]":
            self._pos += 1
        else:
            while True:
                yield self._element(serialise)
                separator = self._skip_whitespace()
                self._pos += 1
                if separator == "]":
                    break
                if separator != ",":
                    raise json.JSONDecodeError("expected ',' or ']'", self._buf, self._pos - 1)
                self._skip_whitespace()
        if self._skip_whitespace():
            raise json.JSONDecodeError("extra data after the array", self._buf, self._pos)

    def _more(self) -> bool:
        """Append the next chunk to the text from the current position on; False at the end of the file."""
        if self._eof:
            return False
        chunk = next(self._source, b"")
        self._eof = not chunk
        self._buf, self._pos = self._buf[self._pos :] + self._utf8.decode(chunk, final=self._eof), 0
        return True

    def _skip_whitespace(self) -> str:
        """Advance past whitespace; the next character ('' at the end of the file)."""
        while True:
            self._pos = _JSON_WHITESPACE.match(self._buf, self._pos).end()  # type: ignore[union-attr]
            if self._pos < len(self._buf) or not self._more():
                return self._buf[self._pos : self._pos + 1]

    def _element(self, serialise: bool) -> bytes:
        """The payload of the element at the current position, which is then moved past it."""
        while True:
            buf, pos = self._buf, self._pos
            value: Any = None
            try:
                value, end = _DECODER.raw_decode(buf, pos)
                payload = json.dumps(value, ensure_ascii=False) if serialise else ""
            except json.JSONDecodeError:
                if self._more():
                    continue  # the element runs past this chunk
                raise
            except RecursionError:
                end = _container_end(buf, pos)
                if end is None:
                    if self._more():
                        continue
                    raise json.JSONDecodeError("unterminated value", buf, pos) from None
                payload = buf[pos:end]
            # A number cut by the chunk's end may go on in the next chunk, also when what was read of it is a
            # shorter number ("0." of "0.5", "1e" of "1e5"): only what follows it in this chunk can tell.
            cut_number = isinstance(value, int | float) and not isinstance(value, bool) and _NUMBER_REST.match(buf, end)
            if (end < len(buf) and not cut_number) or not self._more():
                self._pos = end
                return payload.encode("utf-8")


def _json_array_rows(path: Path) -> Iterator[RawRow]:
    """Rows of a JSON array, one element each.

    The file is checked in a first streaming pass: a file that is not a well-formed array is one broken row
    (silver quarantines it with the parse error), and nothing of it is yielded before that is known. A file whose
    content stops decoding keeps the elements before the break, then ends with a :data:`BROKEN_FILE` row.
    """
    check = _ArrayReader(path)
    count = 0
    try:
        for _ in check.elements(serialise=False):
            count += 1
    except ValueError:
        if check.chunks.error is None:
            yield _raw_row(0, _open_bytes(path))
            return
    for index, payload in enumerate(itertools.islice(_ArrayReader(path).elements(), count)):
        yield _raw_row(index, payload)
    if check.chunks.error is not None:
        yield _broken_row(count, check.tail().encode("utf-8"), check.chunks.error)


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    """Rows of a Parquet file as JSON objects. Data Arrow cannot read ends the file with a BROKEN_FILE row."""
    with _open_file(path) as handle:
        index = 0
        try:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=4096)
            for batch in batches:
                records = batch.to_pylist()
                for record in records:
                    yield _raw_row(index, json.dumps(record, ensure_ascii=False, default=str).encode("utf-8"))
                    index += 1
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # damaged data can also be invalid UTF-8
            yield _broken_row(index, b"", f"{type(exc).__name__}: {exc}")
