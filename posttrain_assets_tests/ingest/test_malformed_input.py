"""One bad row or file never stops a refresh: malformed landing files go through the readers, bronze ingestion and
the silver pass (driven directly, without Dagster) and every bad row ends in quarantine with its file, row and
reason; a file that cannot be read at all fails ingestion with one line naming source and file.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain_assets import cli, pipeline
from posttrain_assets.cleaning.silver_pass import CleaningConfig, run_silver_pass
from posttrain_assets.defs.checks.accounting import bronze_accounting_check
from posttrain_assets.defs.resources import SourceRegistryResource, WarehouseResource
from posttrain_assets.defs.silver.canonical import CleaningPassConfig
from posttrain_assets.ingest.bronze import IngestRun, bronze_batches
from posttrain_assets.ingest.readers import BROKEN_FILE, LandingFileError, read_raw_rows
from posttrain_assets.ingest.registry import Registry, Source, load_registry, render_registry
from posttrain_assets.records.normalize import Rejected, parse_payload
from posttrain_assets.records.schema import DEFAULT_MAX_ROW_BYTES, MAX_JSON_DEPTH
from posttrain_assets.warehouse.bronze import bronze_source_table, ensure_bronze, replace_bronze_source
from posttrain_assets.warehouse.io import building
from posttrain_assets.warehouse.validation import SourceAccount, account_sources
from posttrain_assets_tests.graph import deployed

CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def chat(n: int) -> dict[str, Any]:
    """A distinct, valid SFT chat in English (it passes the quality gate)."""
    return {
        "messages": [
            {"role": "user", "content": f"Please tell me what the number {n} plus one is, and explain the answer."},
            {"role": "assistant", "content": f"The number {n} plus one is {n + 1}, because adding one counts up."},
        ]
    }


DEEP_ROW = '{"messages": ' + "[" * 1000 + "]" * 1000 + "}"  # 2 KB, nested 1,000 levels


def ingest(conn: duckdb.DuckDBPyConnection, source: str, files: Sequence[Path]) -> None:
    """What the bronze asset does for one source, without Dagster: every row of ``files`` into the source's table."""
    ensure_bronze(conn)
    with building(conn, bronze_source_table(source)) as twin:
        for batch in bronze_batches(IngestRun(source, CREATED, "run"), files):
            twin.append(batch.rows)
        replace_bronze_source(conn, source, twin)


def messages_source(name: str, path: str, base: Path) -> Source:
    return Source(name, path, "messages", "sft", "MIT", "https://example.org", "human", "train", base)


def refresh(
    tmp_path: Path, tokenizer: Any, files: dict[str, str], **cfg: Any
) -> tuple[duckdb.DuckDBPyConnection, Registry]:
    """Ingest each source (name -> file name under tmp_path, format ``messages``), then run the silver pass."""
    registry = Registry(tmp_path / "sources.yaml", tuple(messages_source(n, p, tmp_path) for n, p in files.items()))
    conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    for source in registry.sources:
        ingest(conn, source.name, source.files())
    run_silver_pass(conn, registry, tokenizer, lambda _path: CREATED, CleaningConfig(processes=1, **cfg))
    return conn, registry


def placed(conn: duckdb.DuckDBPyConnection) -> dict[int, str]:
    """Row number -> 'records' or the quarantine reason (one source per test)."""
    out = {row: "records" for (row,) in conn.execute('SELECT origin."row" FROM silver.records').fetchall()}
    for row, reason in conn.execute("SELECT row_number, reason FROM silver.quarantine").fetchall():
        out[row] = reason
    return dict(sorted(out.items()))


def balanced(conn: duckdb.DuckDBPyConnection, registry: Registry) -> bool:
    return all(a.balanced for a in account_sources(conn, registry.names))


# --- finding 2: one deeply nested row -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chats.jsonl", "chats.json"])
def test_a_row_nested_1000_deep_is_quarantined_and_the_rest_refreshes(tmp_path: Path, smollm2_tokenizer, name) -> None:
    rows = [json.dumps(chat(0)), DEEP_ROW, json.dumps(chat(2))]
    text = "\n".join(rows) + "\n" if name.endswith(".jsonl") else "[" + ",\n".join(rows) + "]"
    (tmp_path / name).write_text(text)
    conn, registry = refresh(tmp_path, smollm2_tokenizer, {"chats": name})
    assert placed(conn) == {0: "records", 1: "too_deep", 2: "records"}
    (message, payload) = conn.execute("SELECT message, payload FROM silver.quarantine").fetchone()
    assert message == f"{tmp_path / name}, row 1: the JSON nests arrays/objects deeper than {MAX_JSON_DEPTH} levels"
    assert payload == DEEP_ROW  # the array reader keeps a row too deep for the standard decoder as written
    assert balanced(conn, registry)


def test_nesting_depth_is_judged_by_a_fixed_limit_not_by_the_stack() -> None:
    def nested(depth: int) -> str:
        # brackets inside strings do not count
        return '{"messages": ' + "[" * (depth - 1) + '"[[[{{{"' + "]" * (depth - 1) + "}"

    at_limit = parse_payload(nested(MAX_JSON_DEPTH), None, "messages", "sft")
    assert isinstance(at_limit, Rejected) and at_limit.reason == "wrong_type"  # parsed, then the adapter says why
    over = parse_payload(nested(MAX_JSON_DEPTH + 1), None, "messages", "sft")
    assert isinstance(over, Rejected) and over.reason == "too_deep"


# --- finding 3: damaged, missing, unreadable and empty files -------------------------------------------------------


def _recoverable(truncated: bytes) -> bytes:
    """What a streaming gunzip gets out of ``truncated`` (the test's own oracle: zlib without the gzip module)."""
    return zlib.decompressobj(wbits=31).decompress(truncated)


def test_a_truncated_jsonl_gz_keeps_the_rows_before_the_break_and_quarantines_the_rest(
    tmp_path: Path, smollm2_tokenizer
) -> None:
    whole = gzip.compress(b"".join(json.dumps(chat(n)).encode() + b"\n" for n in range(40)))
    truncated = whole[: len(whole) * 6 // 10]
    (tmp_path / "chats.jsonl.gz").write_bytes(truncated)
    recovered = _recoverable(truncated)
    complete = recovered.count(b"\n")
    assert 5 < complete < 40  # the cut falls inside the rows

    conn, registry = refresh(tmp_path, smollm2_tokenizer, {"chats": "chats.jsonl.gz"})

    assert placed(conn) == {**{n: "records" for n in range(complete)}, complete: "broken_file"}
    (message, payload) = conn.execute("SELECT message, payload FROM silver.quarantine").fetchone()
    assert message == (
        f"{tmp_path / 'chats.jsonl.gz'}, row {complete}: the file cannot be read from this row on (EOFError: "
        "Compressed file ended before the end-of-stream marker was reached); rows before it are kept"
    )
    assert payload == recovered[recovered.rindex(b"\n") + 1 :].decode()  # the partial line, as far as it was read
    assert balanced(conn, registry)


def test_a_truncated_json_array_gz_keeps_its_whole_elements(tmp_path: Path) -> None:
    elements = [chat(n) for n in range(40)]
    whole = gzip.compress(json.dumps(elements).encode())
    path = tmp_path / "chats.json.gz"
    path.write_bytes(whole[: len(whole) // 2])
    rows = list(read_raw_rows(path))
    *kept, broken = rows
    assert 5 < len(kept) < 40
    assert [json.loads(r.payload) for r in kept] == elements[: len(kept)]
    assert broken.row_number == len(kept)
    assert (
        broken.decode_error
        == f"{BROKEN_FILE}EOFError: Compressed file ended before the end-of-stream marker was reached"
    )


def test_corrupt_gzip_and_parquet_files_end_in_one_broken_row(tmp_path: Path) -> None:
    lines = b"".join(json.dumps(chat(n)).encode() + b"\n" for n in range(10))
    bad_crc = bytearray(gzip.compress(lines))
    bad_crc[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    (tmp_path / "crc.jsonl.gz").write_bytes(bytes(bad_crc))
    *kept, broken = read_raw_rows(tmp_path / "crc.jsonl.gz")
    assert len(kept) == 10 and broken.row_number == 10 and broken.payload == ""
    assert broken.decode_error.startswith(f"{BROKEN_FILE}BadGzipFile: CRC check failed")

    (tmp_path / "plain.jsonl.gz").write_bytes(lines)  # named .gz, not compressed
    (only,) = read_raw_rows(tmp_path / "plain.jsonl.gz")
    assert (only.row_number, only.decode_error) == (0, f"{BROKEN_FILE}BadGzipFile: Not a gzipped file (b'{{\"')")

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([chat(n) for n in range(10)]), buffer)
    (tmp_path / "cut.parquet").write_bytes(buffer.getvalue()[:-100])  # no footer
    (only,) = read_raw_rows(tmp_path / "cut.parquet")
    assert only.row_number == 0 and only.decode_error.startswith(f"{BROKEN_FILE}ArrowInvalid: ")


def test_a_file_that_cannot_be_read_fails_ingestion_with_one_line_naming_it(tmp_path: Path) -> None:
    run = IngestRun("chats", CREATED, "run")
    gone = tmp_path / "gone.jsonl"  # matched by the glob, deleted before it is read
    with pytest.raises(LandingFileError) as missing:
        list(bronze_batches(run, [gone]))
    assert str(missing.value) == f"{gone}: file not found"
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    with pytest.raises(LandingFileError) as unreadable:
        list(bronze_batches(run, [folder]))
    assert str(unreadable.value) == f"{folder}: cannot be read (Is a directory)"
    with pytest.raises(LandingFileError) as unsupported:
        list(read_raw_rows(tmp_path / "chats.csv"))
    assert str(unsupported.value).startswith(f"{tmp_path / 'chats.csv'}: unsupported file type")


def _write_registry(path: Path, entries: dict[str, str]) -> Path:
    fields = {"format": "messages", "license": "MIT", "origin": "https://example.org", "kind": "human"}
    path.write_text(render_registry([{"name": n, "path": p, **fields} for n, p in entries.items()]))
    return path


@pytest.mark.slow  # `posttrain run` (Dagster instance, definitions, a run): about 4 s
def test_posttrain_run_reports_a_missing_file_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    registry = _write_registry(tmp_path / "sources.yaml", {"gone": "gone.jsonl"})
    monkeypatch.setenv("POSTTRAIN_SOURCES", str(registry))
    monkeypatch.setenv("POSTTRAIN_DUCKDB_PATH", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    assert cli.main(["run"]) == 1
    assert capsys.readouterr().err == (
        f"posttrain run: bronze__records: source 'gone': no file matches {tmp_path / 'gone.jsonl'}\n"
    )


@pytest.mark.slow  # the whole graph, until ingestion fails: about 6 s
def test_run_all_raises_the_ingestion_error_without_dagster_s_wrapping(tmp_path: Path, tokenizer_cache_dir) -> None:
    registry = _write_registry(tmp_path / "sources.yaml", {"chats": "chats.jsonl", "odd": "odd.csv"})
    (tmp_path / "chats.jsonl").write_text(json.dumps(chat(0)) + "\n")
    (tmp_path / "odd.csv").write_text("a,b\n")
    with (
        deployed(registry, tmp_path / "deploy", tokenizer_cache_dir) as graph,
        pytest.raises(pipeline.RunFailed) as failed,
    ):
        graph.run_all()
    assert str(failed.value) == (
        f"bronze__records: source 'odd': {tmp_path / 'odd.csv'}: unsupported file type "
        "(use .jsonl, .json, .parquet, optionally .gz for JSON)"
    )


def test_an_empty_file_is_ingested_with_0_rows_not_reported_as_never_ingested(
    tmp_path: Path, smollm2_tokenizer
) -> None:
    (tmp_path / "chats.jsonl").write_text(json.dumps(chat(0)) + "\n")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    registry_file = _write_registry(
        tmp_path / "sources.yaml", {"chats": "chats.jsonl", "empty": "empty.jsonl", "later": "later.jsonl"}
    )
    registry = load_registry(registry_file)
    database = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(database)) as conn:
        ingest(conn, "chats", registry.get("chats").files())
        ingest(conn, "empty", registry.get("empty").files())  # "later" is never ingested
        run_silver_pass(conn, registry, smollm2_tokenizer, lambda _path: CREATED, CleaningConfig(processes=1))
        assert account_sources(conn, registry.names) == [
            SourceAccount("chats", 1, 1, 0, 0, 0, 0, 0, True),
            SourceAccount("empty", 0, 0, 0, 0, 0, 0, 0, True),
            SourceAccount("later", 0, 0, 0, 0, 0, 0, 0, False),
        ]
    check = bronze_accounting_check(
        duckdb=WarehouseResource(database=str(database)), registry=SourceRegistryResource(path=str(registry_file))
    )
    assert not check.passed
    assert check.description == ("later: no bronze rows (source not ingested); ingested with 0 rows: empty")
    with duckdb.connect(str(database)) as conn:
        ingest(conn, "later", [])  # ingested: its files hold no rows
    check = bronze_accounting_check(
        duckdb=WarehouseResource(database=str(database)), registry=SourceRegistryResource(path=str(registry_file))
    )
    assert check.passed
    assert check.description == "every bronze row accounted for; ingested with 0 rows: empty, later"


# --- finding 8 (part): byte order marks --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chats.jsonl", "chats.json", "chats.jsonl.gz"])
def test_a_byte_order_mark_keeps_row_0(tmp_path: Path, smollm2_tokenizer, name) -> None:
    bom = b"\xef\xbb\xbf"
    rows = [json.dumps(chat(n)).encode() for n in range(3)]
    if ".jsonl" in name:  # at the start of the file, and at the start of a line (as concatenated files have)
        data = bom + rows[0] + b"\n" + rows[1] + b"\n" + bom + rows[2] + b"\n"
    else:
        data = bom + b" [" + b",".join(rows) + b"]"
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    conn, registry = refresh(tmp_path, smollm2_tokenizer, {"chats": name})
    assert placed(conn) == {0: "records", 1: "records", 2: "records"}
    assert balanced(conn, registry)


def test_a_row_ingested_with_its_byte_order_mark_still_parses() -> None:
    record = parse_payload("\ufeff" + json.dumps(chat(0)), None, "messages", "sft")
    assert not isinstance(record, Rejected) and record.prompt == chat(0)["messages"][0]["content"]


# --- oversized rows --------------------------------------------------------------------------------------------------


def test_a_row_over_the_byte_limit_is_too_large_and_not_parsed(tmp_path: Path, smollm2_tokenizer) -> None:
    small, big = json.dumps(chat(0)), json.dumps(chat(1) | {"note": "é" * 600}, ensure_ascii=False)  # 2-byte characters
    limit = len(big.encode()) - 1
    assert len(big) < limit < len(big.encode())  # over the limit in bytes, not in characters
    (tmp_path / "chats.jsonl").write_text(small + "\n" + big + "\n")
    conn, registry = refresh(tmp_path, smollm2_tokenizer, {"chats": "chats.jsonl"}, max_row_bytes=limit)
    assert placed(conn) == {0: "records", 1: "too_large"}
    (message,) = conn.execute("SELECT message FROM silver.quarantine").fetchone()
    assert message == (
        f"{tmp_path / 'chats.jsonl'}, row 1: the row is {limit + 1:,} bytes, over the limit of {limit:,} "
        "(max_row_bytes)"
    )
    assert balanced(conn, registry)
    # the limit is checked before parsing: a row over it is too_large even when it is not JSON
    verdict = parse_payload("x" * 11, None, "messages", "sft", max_row_bytes=10)
    assert isinstance(verdict, Rejected) and verdict.reason == "too_large"
    at_limit = parse_payload("x" * 10, None, "messages", "sft", max_row_bytes=10)
    assert isinstance(at_limit, Rejected) and at_limit.reason == "bad_json"


def test_the_byte_limit_is_set_in_the_silver_pass_config() -> None:
    assert CleaningConfig().max_row_bytes == DEFAULT_MAX_ROW_BYTES == 16 * 1024 * 1024
    assert CleaningPassConfig().cleaning().max_row_bytes == DEFAULT_MAX_ROW_BYTES
    assert CleaningPassConfig(max_row_bytes=1000).cleaning().max_row_bytes == 1000
