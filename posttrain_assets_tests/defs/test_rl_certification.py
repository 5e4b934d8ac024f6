"""The silver.rl_certification asset: it certifies only seeds the cache does not hold, says how many it computed and
reused in its materialisation metadata, and POSTTRAIN_FULL_REBUILD=1 (or its config) certifies every seed again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
from dagster_duckdb import DuckDBResource

from posttrain_assets import settings
from posttrain_assets.defs.silver.rl import CertificationConfig, silver_rl_certification
from posttrain_assets.rl import verifiers
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS
from posttrain_assets.warehouse.io import insert_rows
from posttrain_assets_tests.rl.test_certification_stage import SEEDS, accepted, fake_certify


@pytest.fixture
def warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DuckDBResource:
    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute(SILVER_RECORDS.create_sql())
        insert_rows(conn, SILVER_RECORDS, SEEDS)
    monkeypatch.delenv(settings.FULL_REBUILD, raising=False)
    return DuckDBResource(database=str(path))


def materialise(warehouse: DuckDBResource, **config: Any) -> dict[str, Any]:
    result = silver_rl_certification(
        context=dg.build_asset_context(), config=CertificationConfig(**config), duckdb=warehouse
    )
    wanted = ("rows_computed/", "rows_reused/", "certified", "failed")
    return {k: v.value for k, v in result.metadata.items() if k.startswith(wanted)}


def test_metadata_says_rows_computed_and_reused_and_a_full_rebuild_recomputes(warehouse, monkeypatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(verifiers, "certify_many", fake_certify(calls, accepted))
    every = {"certified": 7, "failed": 0}

    assert materialise(warehouse) == {"rows_computed/rl_certification": 7, "rows_reused/rl_certification": 0, **every}
    assert materialise(warehouse) == {"rows_computed/rl_certification": 0, "rows_reused/rl_certification": 7, **every}
    monkeypatch.setenv(settings.FULL_REBUILD, "1")
    assert materialise(warehouse) == {"rows_computed/rl_certification": 7, "rows_reused/rl_certification": 0, **every}
    monkeypatch.setenv(settings.FULL_REBUILD, "0")
    assert materialise(warehouse, full_rebuild=True)["rows_computed/rl_certification"] == 7
    assert materialise(warehouse)["rows_reused/rl_certification"] == 7
    assert len(calls) == 3  # three builds that certified, one batch of 7 seeds each
