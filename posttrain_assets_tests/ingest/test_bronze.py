"""Bronze ingestion batches (posttrain_assets.ingest.bronze): every row of every file, in order, with its provenance and
its text exactly as read (invalid UTF-8 replaced and reported), in bounded batches."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pyarrow as pa

from posttrain_assets.ingest.bronze import IngestRun, bronze_batches
from posttrain_assets.warehouse.catalogue import BRONZE_RECORDS

RUN = IngestRun("chats", dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC), "run-1")


def test_batches_hold_every_row_with_its_provenance_and_exact_text(tmp_path: Path) -> None:
    first = tmp_path / "a.jsonl"
    lines = [
        b'{"q": "caf\xc3\xa9 \xf0\x9f\x98\x80"}',
        b'{"q": "plain"}',
        b'{"q": "\xff bad"}',
        b'{"q": 4}',
        b'{"q": 5}',
    ]
    first.write_bytes(b"\n".join(lines) + b"\n")
    empty = tmp_path / "b.jsonl"
    empty.write_bytes(b"")
    last = tmp_path / "c.jsonl"
    last.write_bytes(b'{"z": 1}\n')

    batches = list(bronze_batches(RUN, [first, empty, last], batch_rows=2))

    assert [(b.path.name, b.rows.num_rows) for b in batches] == [
        ("a.jsonl", 2),
        ("a.jsonl", 2),
        ("a.jsonl", 1),
        ("b.jsonl", 0),  # an empty file still shows up, with no rows
        ("c.jsonl", 1),
    ]
    rows = pa.concat_tables(b.rows for b in batches)
    assert rows.column_names == BRONZE_RECORDS.column_names
    assert rows.schema.field("payload").type == pa.string()
    got = rows.to_pylist()
    assert [r["payload"] for r in got] == [
        '{"q": "café 😀"}',
        '{"q": "plain"}',
        '{"q": "\ufffd bad"}',
        '{"q": 4}',
        '{"q": 5}',
        '{"z": 1}',
    ]
    assert [r["decode_error"] for r in got] == [None, None, "byte 7: b'\\xff'", None, None, None]
    assert [(Path(r["file_path"]).name, r["row_number"]) for r in got] == [
        ("a.jsonl", 0),
        ("a.jsonl", 1),
        ("a.jsonl", 2),
        ("a.jsonl", 3),
        ("a.jsonl", 4),
        ("c.jsonl", 0),
    ]
    # the record hash is of the bytes in the file, the bad byte included
    assert [r["record_sha256"] for r in got[:5]] == [hashlib.sha256(line).hexdigest() for line in lines]
    assert {r["file_sha256"] for r in got[:5]} == {hashlib.sha256(first.read_bytes()).hexdigest()}
    assert {(r["source"], r["run_id"], r["ingested_at"]) for r in got} == {("chats", "run-1", RUN.ingested_at)}
