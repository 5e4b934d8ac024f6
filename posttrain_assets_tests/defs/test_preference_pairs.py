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
    wanted = ("rows_computed/", "rows_reused/", "rows_deleted/", "dagster/row_count", "length_histogram_drawn")
    return {k: v.value if hasattr(v, "value") else v for k, v in pairs.metadata.items() if k.startswith(wanted)}


def test_metadata_says_rows_computed_and_reused_and_a_full_rebuild_recomputes(
    warehouse, monkeypatch, tokenizer_cache_dir, smollm2_tokenizer_dir
) -> None:
    every = {"dagster/row_count": 4, "length_histogram_drawn": False}
    # the length histogram is drawn by the first run (and a full rebuild); later runs, whose lengths are the same,
    # reuse the stored PNG
    drawn = {"length_histogram_drawn": True}
    # measures: computed now or read from the pairs cache; the table: rows inserted, kept and deleted by the sync
    measured = {"rows_computed/preference_pairs": 4, "rows_reused/preference_pairs": 0}
    read = {"rows_computed/preference_pairs": 0, "rows_reused/preference_pairs": 4}
    inserted = {
        "rows_computed/silver_preference_pairs": 4,
        "rows_reused/silver_preference_pairs": 0,
        "rows_deleted/silver_preference_pairs": 0,
    }
    kept = {
        "rows_computed/silver_preference_pairs": 0,
        "rows_reused/silver_preference_pairs": 4,
        "rows_deleted/silver_preference_pairs": 0,
    }

    assert materialise(warehouse, tokenizer_cache_dir) == {**measured, **inserted, **every, **drawn}
    assert materialise(warehouse, tokenizer_cache_dir) == {**read, **kept, **every}
    # measured again, but the same pairs: not one row of the table is written
    monkeypatch.setenv(settings.FULL_REBUILD, "1")
    assert materialise(warehouse, tokenizer_cache_dir) == {**measured, **kept, **every, **drawn}
    monkeypatch.setenv(settings.FULL_REBUILD, "0")
    assert materialise(warehouse, tokenizer_cache_dir, full_rebuild=True) == {**measured, **kept, **every, **drawn}
    # a new tie similarity is a new stage key: every pair measured again; at 0.5 no flag changes, so no row is
    # written; at 0.2 "Blue." vs "Green." (folded similarity 2/9) becomes a tie, so d4 alone is replaced
    assert materialise(warehouse, tokenizer_cache_dir, tie_similarity=0.5) == {**measured, **kept, **every}
    assert materialise(warehouse, tokenizer_cache_dir, tie_similarity=0.2) == {
        **measured,
        "rows_computed/silver_preference_pairs": 1,
        "rows_reused/silver_preference_pairs": 3,
        "rows_deleted/silver_preference_pairs": 1,
        **every,
    }
