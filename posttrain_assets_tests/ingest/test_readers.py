"""Readers split landing files into raw rows without losing or changing any."""

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from posttrain_assets.ingest import readers
from posttrain_assets.ingest.readers import read_raw_rows
from posttrain_assets.records.normalize import Rejected, parse_payload


def test_jsonl_rows_keep_line_numbers_bad_bytes_and_raw_text(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    lines = [b'{"a": 1}', b"", b'{"a": 2', b'{"a": "\xff\xfe"}', b'{"a": 3}\r']
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = list(read_raw_rows(path))
    assert [r.row_number for r in rows] == [0, 2, 3, 4]  # the blank line 1 is not a row
    assert rows[0].payload == '{"a": 1}'
    assert rows[0].record_sha256 == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert rows[1].payload == '{"a": 2' and rows[1].decode_error is None
    assert rows[2].decode_error == "byte 7: b'\\xff'"
    assert rows[2].record_sha256 == hashlib.sha256(lines[3]).hexdigest()
    assert rows[3].payload == '{"a": 3}'


def test_gzip_json_array_and_parquet(tmp_path: Path) -> None:
    gz = tmp_path / "pairs.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"x": "\xc3\xa9"}\n{"x": "b"}\n'))
    assert [r.payload for r in read_raw_rows(gz)] == ['{"x": "é"}', '{"x": "b"}']

    arr = tmp_path / "alpaca.json"
    arr.write_text(json.dumps([{"instruction": "Hi", "output": "Yo"}, {"instruction": "Q"}]))
    rows = list(read_raw_rows(arr))
    assert [(r.row_number, json.loads(r.payload)) for r in rows] == [
        (0, {"instruction": "Hi", "output": "Yo"}),
        (1, {"instruction": "Q"}),
    ]

    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "Hi"},')
    (only,) = list(read_raw_rows(broken))
    assert only.row_number == 0
    verdict = parse_payload(only.payload, only.decode_error, "alpaca", "sft")
    assert isinstance(verdict, Rejected) and verdict.reason == "bad_json"

    pqt = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"role": "user", "content": "2+2?"}], "n": 1}]), pqt)
    (row,) = list(read_raw_rows(pqt))
    assert json.loads(row.payload) == {"prompt": [{"role": "user", "content": "2+2?"}], "n": 1}


def test_parse_payload_reasons() -> None:
    assert parse_payload("[1, 2]", None, "alpaca", "sft") == Rejected(
        "not_an_object", None, "expected a JSON object, got list"
    )
    bad_bytes = parse_payload('{"a": "\ufffd"}', "byte 6: b'\\xff'", "alpaca", "sft")
    assert isinstance(bad_bytes, Rejected) and bad_bytes.reason == "invalid_utf8"
    missing = parse_payload('{"instruction": "Say hi"}', None, "alpaca", "sft")
    assert isinstance(missing, Rejected) and (missing.reason, missing.field) == ("missing_field", "output")
    ok = parse_payload('{"instruction": "Say hi", "input": "", "output": "Hi!"}', None, "alpaca", "sft")
    assert not isinstance(ok, Rejected)
    assert ok.messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]


ELEMENTS = [
    {"instruction": "Résumé 😀 " * 5, "n": 12345678901234567890123, "x": 1.5e-7, "ok": True, "none": None},
    [1, 2, {"nested": ']}, "quoted"'}],
    "a string with \\u escapes \u2028 and \\\\ backslashes",
    0,
    -987654321,
    {"empty": [], "obj": {}},
]


def test_json_arrays_stream_in_chunks_with_elements_across_chunk_edges(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(readers, "_CHUNK_BYTES", 7)  # every element, string and number crosses a chunk edge
    path = tmp_path / "sharegpt.json.gz"
    path.write_bytes(
        gzip.compress(("\n [ " + " ,\n".join(json.dumps(e, ensure_ascii=False) for e in ELEMENTS) + " ]\n").encode())
    )
    rows = list(read_raw_rows(path))
    # the same payloads as parsing the whole file at once and re-serialising each element
    assert [r.payload for r in rows] == [json.dumps(e, ensure_ascii=False) for e in ELEMENTS]
    assert [r.row_number for r in rows] == list(range(len(ELEMENTS)))
    empty = tmp_path / "empty.json"
    empty.write_text("[ ]")
    assert list(read_raw_rows(empty)) == []


def test_a_json_array_broken_after_many_chunks_is_one_broken_row(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(readers, "_CHUNK_BYTES", 16)
    for name, text in (
        ("truncated.json", json.dumps(ELEMENTS)[:-1]),
        ("missing_comma.json", json.dumps(ELEMENTS[:3]).replace("}, [", "} [")),
        ("trailing.json", json.dumps(ELEMENTS) + " [1]"),
    ):
        path = tmp_path / name
        path.write_text(text)
        (only,) = list(read_raw_rows(path))
        assert (only.row_number, only.payload) == (0, text), name
    bad_utf8 = tmp_path / "bad.json"
    bad_utf8.write_bytes(b'[{"a": "x"}, {"a": "\xff"}]')
    (only,) = list(read_raw_rows(bad_utf8))
    assert only.decode_error == "byte 20: b'\\xff'"


def test_a_number_cut_where_its_start_is_a_shorter_number_is_read_whole(tmp_path: Path, monkeypatch) -> None:
    # "0." of "0.0", "1e" of "1e5", "12." of "12.25": each a number on its own, so only the next chunk can say
    # the element goes on (found by the fuzz test: the file became one broken row)
    path = tmp_path / "numbers.json"
    path.write_text('[{"a": 1},\n 0.0, 1e5, 12.25, -3, 1.5e-3, 7]')
    for chunk in (1, 2, 3, 4, 5, 64):
        monkeypatch.setattr(readers, "_CHUNK_BYTES", chunk)
        assert [r.payload for r in read_raw_rows(path)] == ['{"a": 1}', "0.0", "100000.0", "12.25", "-3", "0.0015", "7"]


def test_parquet_whose_strings_are_not_utf8_ends_with_a_broken_row(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    table = pa.table({"text": pa.array([b"fine", b"\x8c\xff bad"], pa.binary()).cast(pa.string(), safe=False)})
    pq.write_table(table, path)
    rows = list(read_raw_rows(path))
    assert rows[-1].decode_error.startswith("file broken: UnicodeDecodeError: ")
    assert len(rows) == 1  # the batch that fails to decode is not split: the file ends at a broken row 0
