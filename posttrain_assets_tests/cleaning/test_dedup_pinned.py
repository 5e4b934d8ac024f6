"""Which rows the silver pass drops as duplicates, pinned on the demo data and on the vendored real data.

The pass runs on bronze loaded straight from the landing files (no Dagster). The expected digests were recorded
from the silver pass before near dedup moved into DuckDB tables (issue 19): which row is dropped, onto which kept
row, by which method and with which similarity, and which ids reach silver.records, must not change with the
implementation, the number of worker processes or the batch size.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from posttrain_assets.cleaning.silver_pass import CleaningConfig, run_silver_pass
from posttrain_assets.defs.silver.canonical import CleaningPassConfig
from posttrain_assets.demo.generator import generate_demo_data
from posttrain_assets.ingest.bronze import IngestRun, bronze_batches
from posttrain_assets.ingest.registry import Registry, load_registry
from posttrain_assets.warehouse.catalogue import BRONZE_RECORDS
from posttrain_assets_tests.graph import REAL_REGISTRY

CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
# Each pin runs the whole silver pass over a landing zone (4-10 s on the demo data); the SQL dedup itself is
# checked against the in-memory one fast in test_dedup_tables.
pytestmark = pytest.mark.slow

# Every dropped duplicate with its kept row, method and similarity (paths left out: they name tmp directories).
DROPPED = """
SELECT source, row_number, member_id, kept_id, cluster_id, method, similarity
FROM silver.dedup_clusters ORDER BY ALL
"""
# Clusters by the number of rows collapsed onto one kept row (exact content-id twins included).
CLUSTER_SIZES = """
SELECT members, count(*) FROM (SELECT kept_id, count(*) AS members FROM silver.dedup_clusters GROUP BY kept_id)
GROUP BY members ORDER BY members
"""


def silver_pass(registry: Registry, tmp_path: Path, tokenizer: Any, processes: int, batch_rows: int) -> dict:
    """Load every source of ``registry`` into a fresh bronze.records, run the silver pass with the pipeline's
    default cleaning config, and summarise its dedup outcome."""
    conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    conn.execute(BRONZE_RECORDS.create_sql())
    for source in registry.sources:
        for batch in bronze_batches(IngestRun(source.name, CREATED, "run"), source.files()):
            rows = batch.rows  # noqa: F841 - read by name in the SQL below
            conn.execute(f"INSERT INTO {BRONZE_RECORDS.qualified} SELECT * FROM rows")
    cfg: CleaningConfig = dataclasses.replace(
        CleaningPassConfig().cleaning(), processes=processes, batch_rows=batch_rows
    )
    run_silver_pass(conn, registry, tokenizer, lambda _path: CREATED, cfg)
    dropped = conn.execute(DROPPED).fetchall()
    ids = [i for (i,) in conn.execute("SELECT id FROM silver.records ORDER BY id").fetchall()]
    summary = {
        "methods": dict(conn.execute("SELECT method, count(*) FROM silver.dedup_clusters GROUP BY ALL").fetchall()),
        "cluster_sizes": dict(conn.execute(CLUSTER_SIZES).fetchall()),
        "dropped": hashlib.sha256(json.dumps(dropped).encode()).hexdigest()[:16],
        "records": len(ids),
        "record_ids": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16],
    }
    conn.close()
    return summary


@pytest.mark.parametrize(("processes", "batch_rows"), [(1, 4096), (2, 300)])
def test_demo_data_dedup_is_pinned(tmp_path: Path, smollm2_tokenizer: Any, processes: int, batch_rows: int) -> None:
    registry = load_registry(generate_demo_data(tmp_path / "landing", seed=7))
    summary = silver_pass(registry, tmp_path, smollm2_tokenizer, processes, batch_rows)
    assert summary == {
        "methods": {"exact": 14, "near": 19},
        "cluster_sizes": {1: 31, 2: 1},
        "dropped": "1679f7b4d0515430",
        "records": 2795,
        "record_ids": "315b2b0693110534",
    }


@pytest.mark.slow
def test_real_data_dedup_is_pinned(tmp_path: Path, smollm2_tokenizer: Any) -> None:
    (tmp_path / "sources.yaml").write_text(REAL_REGISTRY, encoding="utf-8")
    summary = silver_pass(load_registry(tmp_path / "sources.yaml"), tmp_path, smollm2_tokenizer, 2, 4096)
    assert summary == {
        # FastChat's dummy conversations: 141 near copies of one kept chat, and a few smaller families
        "methods": {"near": 241},
        "cluster_sizes": {1: 23, 2: 3, 5: 1, 10: 1, 11: 2, 17: 2, 141: 1},
        "dropped": "8fe57c2b5c602b5a",
        "records": 11023,
        "record_ids": "9a0ec9662d4339bd",
    }
