"""The silver.preference_pairs asset: it measures only pairs the cache does not hold, says how many it computed and
reused in its materialisation metadata, and POSTTRAIN_FULL_REBUILD=1 (or its config) measures every pair again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
from dagster_duckdb import DuckDBResource

from posttrain_assets import settings
from posttrain_assets.defs.resources import TokenizerResource
from posttrain_assets.defs.silver.preference_pairs import PAIRS_KEY, LengthConfoundConfig, silver_preference_pairs
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS
from posttrain_assets.warehouse.io import insert_rows
from posttrain_assets_tests.preference.test_pairs_stage import ROWS, SFT_ROW


@pytest.fixture
def warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DuckDBResource:
    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute(SILVER_RECORDS.create_sql())
        insert_rows(conn, SILVER_RECORDS, [*ROWS, SFT_ROW])
    monkeypatch.delenv(settings.FULL_REBUILD, raising=False)
    return DuckDBResource(database=str(path))


def materialise(warehouse: DuckDBResource, tokenizer_cache_dir: Path, **config: Any) -> dict[str, Any]:
    """The pairs asset's reuse metadata and its pair count."""
    results = list(
        silver_preference_pairs(
            context=dg.build_asset_context(),
            config=LengthConfoundConfig(processes=1, **config),
            duckdb=warehouse,
            tokenizer=TokenizerResource(spec="smollm2", cache_dir=str(tokenizer_cache_dir)),
        )
    )
    (pairs,) = [r for r in results if r.asset_key == PAIRS_KEY]
    wanted = ("rows_computed/", "rows_reused/", "dagster/row_count")
    return {k: v.value if hasattr(v, "value") else v for k, v in pairs.metadata.items() if k.startswith(wanted)}


def test_metadata_says_rows_computed_and_reused_and_a_full_rebuild_recomputes(
    warehouse, monkeypatch, tokenizer_cache_dir, smollm2_tokenizer_dir
) -> None:
    every = {"dagster/row_count": 4}
    computed = {"rows_computed/preference_pairs": 4, "rows_reused/preference_pairs": 0, **every}
    reused = {"rows_computed/preference_pairs": 0, "rows_reused/preference_pairs": 4, **every}

    assert materialise(warehouse, tokenizer_cache_dir) == computed
    assert materialise(warehouse, tokenizer_cache_dir) == reused
    monkeypatch.setenv(settings.FULL_REBUILD, "1")
    assert materialise(warehouse, tokenizer_cache_dir) == computed
    monkeypatch.setenv(settings.FULL_REBUILD, "0")
    assert materialise(warehouse, tokenizer_cache_dir, full_rebuild=True) == computed
    # a new tie similarity is a new stage key
    assert materialise(warehouse, tokenizer_cache_dir, tie_similarity=0.5) == computed
