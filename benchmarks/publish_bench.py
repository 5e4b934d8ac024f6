"""Publishing a wide table in key order (``warehouse.io.insert_ordered``), apart from the end-to-end benchmark: the
current implementation against the one it replaced (one INSERT per range of keys, each scanning the whole source),
at several sizes, each run in a process of its own for its seconds and peak RSS.

The source is synthetic and shaped like silver.records: random SHA-256 hex ids in no order, about 3 KB of text and
a list of 300 token ids per row, in a DuckDB file under DuckDB's memory cap of the pipeline
(``defs.resources.DUCKDB_MEMORY_LIMIT``). Each run appends the source to an empty table in one transaction (as
``cleaning.silver_pass.publish`` does) with PUBLISH_RANGE_ROWS keys per range, then checks that the table is
stored in key order and fingerprints it (ids in stored order, and every value), so the two can be compared.

    .venv/bin/python -m benchmarks.publish_bench --rows 100000 300000 1000000

prints one line per run and a summary (seconds, seconds per row over the smallest size's, peak MiB); the figures
go to docs/performance.md. The source files live under ``--workdir`` (deleted at the end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb

from posttrain_assets.cleaning.silver_pass import PUBLISH_RANGE_ROWS
from posttrain_assets.defs.resources import DUCKDB_MEMORY_LIMIT
from posttrain_assets.warehouse.io import insert_ordered, key_ranges, transaction
from posttrain_assets.warehouse.model import Column, Table

IMPLEMENTATIONS = ("ranges", "partitioned")

TARGET = Table(
    "main",
    "published",
    "the source, in id order",
    (
        Column("id", "VARCHAR", "SHA-256 hex of the row number and a random number"),
        Column("text", "VARCHAR", "about 3 KB of hex words"),
        Column("input_ids", "INTEGER[]", "300 token ids"),
        Column("seq", "BIGINT", "row number in the source"),
    ),
)

BUILD_SOURCE = """
CREATE TABLE source AS
SELECT sha256(range::VARCHAR || ':' || random()::VARCHAR) AS id,
       repeat(md5(range::VARCHAR) || ' ' || md5((range * 7)::VARCHAR) || ' ', 45) AS text,
       list_transform(range(300), lambda x: ((x * 7919 + range) % 50000)::INTEGER) AS input_ids,
       range AS seq
FROM range($rows)
"""

FINGERPRINT = f"""
SELECT count(*) AS rows,
       coalesce(bool_and(previous IS NULL OR id > previous), TRUE) AS in_key_order,
       md5(string_agg(id, ',' ORDER BY stored)) AS ids_in_stored_order,
       sum(row_hash) AS values_hash
FROM (
    SELECT *, lag(id) OVER (ORDER BY stored) AS previous
    FROM (  -- narrow rows only through the window (a sort of the wide ones would not fit under the cap)
        SELECT rowid AS stored, id, hash(id, text, input_ids, seq) AS row_hash FROM {TARGET.qualified}
    )
)
"""


def insert_ordered_by_ranges(
    conn: duckdb.DuckDBPyConnection, table: Table, relation: str, key: str, rows: int, params: dict[str, Any] | None
) -> None:
    """The implementation insert_ordered replaced (commit e332fd0): one INSERT per range of ``rows`` keys, each a
    query over the whole of ``relation``."""
    params = dict(params or {})
    sql = table.insert_sql(
        f"(SELECT * FROM ({relation}) WHERE {key} BETWEEN $range_first AND $range_last ORDER BY {key})"
    )
    for first, last in key_ranges(conn, relation, key, rows, params):
        conn.execute(sql, {**params, "range_first": first, "range_last": last})


def _connect(database: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(database), config={"memory_limit": DUCKDB_MEMORY_LIMIT})


def build_source(database: Path, rows: int) -> None:
    with _connect(database) as conn:
        conn.execute(BUILD_SOURCE, {"rows": rows})
        conn.execute("CHECKPOINT")


def publish(database: Path, implementation: str) -> dict[str, Any]:
    """Append the source to an empty TARGET in key order with ``implementation``; seconds and fingerprint."""
    write = insert_ordered if implementation == "partitioned" else insert_ordered_by_ranges
    with _connect(database) as conn:
        conn.execute(TARGET.create_sql(replace=True))
        conn.execute("CHECKPOINT")
        started = time.perf_counter()
        with transaction(conn):
            write(conn, TARGET, "SELECT * FROM source", "id", PUBLISH_RANGE_ROWS, None)
        seconds = time.perf_counter() - started
        fingerprint = dict(
            zip(("rows", "in_key_order", "ids", "values"), conn.execute(FINGERPRINT).fetchone(), strict=True)
        )
        conn.execute(f"DROP TABLE {TARGET.qualified}")
        conn.execute("CHECKPOINT")
    return {"seconds": round(seconds, 2), **fingerprint}


def _child(*args: str) -> tuple[dict[str, Any], int]:
    """Run this module with ``args`` in a fresh process: its JSON answer and its own peak RSS in MiB."""
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.publish_bench", *args], stdout=subprocess.PIPE)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN is the max of all)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"benchmark child {args} exited with {process.returncode}")
    return json.loads(out), usage.ru_maxrss // 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the source databases go (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the source databases")
    parser.add_argument("--child", nargs=2, metavar=("ACTION", "ARG"), help=argparse.SUPPRESS)
    parser.add_argument("--database", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        action, arg = args.child
        if action == "build":
            build_source(args.database, int(arg))
            print(json.dumps({}))
        else:
            print(json.dumps(publish(args.database, arg)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="publish_bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"DuckDB {duckdb.__version__}, memory_limit {DUCKDB_MEMORY_LIMIT}, {PUBLISH_RANGE_ROWS} keys per range, "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        for rows in args.rows:
            database = workdir / f"source_{rows}.duckdb"
            if not database.exists():
                started = time.perf_counter()
                _child("--child", "build", str(rows), "--database", str(database))
                print(f"source of {rows:,} rows built in {time.perf_counter() - started:.1f} s", flush=True)
            for implementation in args.implementations:
                load = os.getloadavg()[0]
                answer, rss = _child("--child", "publish", implementation, "--database", str(database))
                results[implementation, rows] = {**answer, "peak_mib": rss, "load": round(load, 2)}
                print(
                    json.dumps({"implementation": implementation, "rows_in": rows, **results[implementation, rows]}),
                    flush=True,
                )
            fingerprints = {
                json.dumps({k: results[i, rows][k] for k in ("rows", "in_key_order", "ids", "values")})
                for i in args.implementations
            }
            print(f"{rows:,} rows: tables identical across implementations: {len(fingerprints) == 1}", flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    smallest = min(args.rows)
    print("\nimplementation | rows | seconds | s/row vs smallest | peak MiB")
    for (implementation, rows), result in sorted(results.items()):
        base = results[implementation, smallest]
        ratio = (result["seconds"] / rows) / (base["seconds"] / smallest) if base["seconds"] else float("nan")
        print(f"{implementation} | {rows:,} | {result['seconds']:.1f} | {ratio:.2f} | {result['peak_mib']:,}")


if __name__ == "__main__":
    main()
