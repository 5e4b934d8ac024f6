"""Bronze ingestion: a source's landing files as Arrow batches of bronze rows, raw and unchanged.

Each batch has exactly the columns of ``bronze.records`` (catalogue.BRONZE_RECORDS). Payloads go to Arrow as the
UTF-8 bytes the reader found (no Python ``str`` round trip), and a file's rows are handed over in batches, so
memory stays bounded by the batch size whatever the file size. No Dagster imports here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from posttrain_assets.ingest.files import file_sha256
from posttrain_assets.ingest.readers import RawRow, read_raw_rows, unreadable
from posttrain_assets.ingest.registry import Source
from posttrain_assets.warehouse.stage_cache import code_fingerprint, stage_key

# Rows per Arrow batch handed to DuckDB: 30 batches fill one DuckDB row group (io.ROW_GROUP_ROWS).
BATCH_ROWS = 4_096


@dataclass(frozen=True)
class IngestRun:
    """What every bronze row of one ingestion shares."""

    source: str
    ingested_at: dt.datetime
    run_id: str


@dataclass(frozen=True)
class FileBatch:
    """Bronze rows of one file (``rows`` is an Arrow table with bronze's columns)."""

    path: Path
    file_sha256: str
    rows: pa.Table


def _constant(value: object, count: int, type_: pa.DataType) -> pa.Array:
    return pa.repeat(pa.scalar(value, type_), count)


def bronze_table(run: IngestRun, path: Path, file_hash: str, rows: Sequence[RawRow]) -> pa.Table:
    """The bronze rows of ``rows`` (read from ``path``, whose content hash is ``file_hash``)."""
    count = len(rows)
    return pa.table(
        {
            "source": _constant(run.source, count, pa.string()),
            "file_path": _constant(str(path), count, pa.string()),
            "row_number": pa.array([r.row_number for r in rows], pa.int64()),
            "record_sha256": pa.array([r.record_sha256 for r in rows], pa.string()),
            # validated UTF-8 (readers.RawRow.data), so the cast only checks it again
            "payload": pa.array([r.data for r in rows], pa.binary()).cast(pa.string()),
            "decode_error": pa.array([r.decode_error for r in rows], pa.string()),
            "file_sha256": _constant(file_hash, count, pa.string()),
            "ingested_at": _constant(run.ingested_at, count, pa.timestamp("us", tz="UTC")),
            "run_id": _constant(run.run_id, count, pa.string()),
        }
    )


def bronze_batches(run: IngestRun, files: Sequence[Path], batch_rows: int = BATCH_ROWS) -> Iterator[FileBatch]:
    """Every row of ``files``, in file order then row order, as batches of at most ``batch_rows`` rows.

    A file with no rows yields one empty batch, so a caller counting rows per file still sees it. A file that
    cannot be read at all raises ``readers.LandingFileError`` (one line naming it); one whose content stops decoding
    part-way ends with a ``file broken`` row (readers.BROKEN_FILE).
    """
    for path in files:
        try:
            file_hash = file_sha256(path)
        except OSError as exc:
            raise unreadable(path, exc) from None
        batch: list[RawRow] = []
        emitted = False
        for row in read_raw_rows(path):
            batch.append(row)
            if len(batch) >= batch_rows:
                yield FileBatch(path, file_hash, bronze_table(run, path, file_hash, batch))
                batch, emitted = [], True
        if batch or not emitted:
            yield FileBatch(path, file_hash, bronze_table(run, path, file_hash, batch))


def landing_fingerprint(source: Source, files: Sequence[Path]) -> str:
    """What a source's bronze rows are read from: its registry entry, each file's path, size and modification time
    (nanoseconds), and the code of the readers. Equal fingerprints: re-reading the files would give the same rows
    (the rule ``make`` and ``rsync`` use; ``posttrain run --full`` reads them anyway)."""
    entry = {f.name: getattr(source, f.name) for f in dataclasses.fields(source) if f.name != "base_dir"}
    stats = [(str(p), st.st_size, st.st_mtime_ns) for p in files for st in (p.stat(),)]
    return stage_key("bronze_ingest", source=entry, files=stats, code=code_fingerprint("posttrain_assets.ingest"))
