"""length_confound_check and balanced_length_confound_check, called directly on a warehouse: a confounded source
fails with the source, statistic and value named; a fair source passes; the verdicts and figures are those of the
audit silver.preference_pairs reports (one implementation, audit_sql.audit_relation, equal to the Python audit)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import duckdb
import pytest

from posttrain_assets.defs.checks.length_confound import balanced_length_confound_check, length_confound_check
from posttrain_assets.defs.resources import WarehouseResource
from posttrain_assets.defs.silver.preference_pairs import LengthConfoundConfig
from posttrain_assets.preference.audit import audit, markdown_audit_table
from posttrain_assets.warehouse.catalogue import SILVER_PREFERENCE_PAIRS, SILVER_PREFERENCE_PAIRS_BALANCED
from posttrain_assets.warehouse.io import insert_rows
from posttrain_assets.warehouse.model import Table

CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def stored_pair(pair_id: str, source: str, chosen_tokens: int, rejected_tokens: int, tie: bool = False) -> dict:
    """A silver.preference_pairs row (texts are not read by the audit)."""
    origin = {"source": source, "uri": "u", "file": "f", "row": 0, "record_sha256": pair_id, "file_sha256": "f"}
    return {
        "id": pair_id,
        "source": source,
        "source_kind": "ai",
        "messages": [{"role": "user", "content": "q"}],
        "prompt": "q",
        "chosen": "c",
        "rejected": "r",
        "chosen_tokens": chosen_tokens,
        "rejected_tokens": rejected_tokens,
        "length_diff": chosen_tokens - rejected_tokens,
        "is_tie": tie,
        "license": "MIT",
        "origin": origin,
        "created_at": CREATED,
    }


# 100 pairs: 90 chosen longer by 10 tokens, 10 shorter by 10: share 0.9, r = (900 - 100) / 100 / 10 = 0.8; 2 ties.
CONFOUNDED = [stored_pair(f"c{i:03d}", "confounded", 30 if i < 90 else 20, 20 if i < 90 else 30) for i in range(100)]
CONFOUNDED[0]["is_tie"] = CONFOUNDED[1]["is_tie"] = True
# 60 pairs, half chosen longer, half shorter, by the same amounts: share 0.5, r 0; no ties.
FAIR = [stored_pair(f"f{i:03d}", "fair", 20 + i % 2 * 10, 30 - i % 2 * 10) for i in range(60)]


def warehouse(tmp_path: Path, table: Table, rows: list[dict[str, Any]]) -> WarehouseResource:
    database = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(database)) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {table.schema}")
        conn.execute(table.create_sql())
        insert_rows(conn, table, rows)
    return WarehouseResource(database=str(database))


def test_a_confounded_source_fails_with_its_statistics_named(tmp_path: Path) -> None:
    result = length_confound_check(
        config=LengthConfoundConfig(), duckdb=warehouse(tmp_path, SILVER_PREFERENCE_PAIRS, CONFOUNDED + FAIR)
    )
    assert not result.passed
    assert result.description == (
        "source confounded: chosen_longer_share = 0.900 outside [0.35, 0.65] (n=100); "
        "source confounded: point_biserial_r = 0.800 outside [-0.20, 0.20] (n=100); "
        "source confounded: tie_rate = 0.020 outside [0.00, 0.01] (n=100)"
    )
    assert result.metadata["pairs"].value == 160
    assert result.metadata["sources_judged"].value == 2
    # the figures are the Python audit's, exactly (the table rendered from either is the same text)
    assert result.metadata["audit"].value == markdown_audit_table(audit(CONFOUNDED + FAIR))


def test_a_fair_source_passes_and_small_sources_are_not_judged(tmp_path: Path) -> None:
    small = [stored_pair(f"s{i}", "small", 50, 10) for i in range(10)]  # always longer, but n=10 < min_pairs
    result = balanced_length_confound_check(
        config=LengthConfoundConfig(), duckdb=warehouse(tmp_path, SILVER_PREFERENCE_PAIRS_BALANCED, FAIR + small)
    )
    assert result.passed
    assert result.description == "1 source(s) within thresholds: fair"
    assert (result.metadata["pairs"].value, result.metadata["sources_judged"].value) == (70, 1)


@pytest.mark.parametrize("threshold, passed", [(0.8, True), (0.79, False)])  # r = 0.8, bounds inclusive
def test_the_thresholds_come_from_the_config(tmp_path: Path, threshold: float, passed: bool) -> None:
    no_ties = [{**p, "is_tie": False} for p in CONFOUNDED]
    config = LengthConfoundConfig(share_high=0.95, max_abs_r=threshold)
    result = length_confound_check(config=config, duckdb=warehouse(tmp_path, SILVER_PREFERENCE_PAIRS, no_ties))
    assert result.passed is passed


def test_an_empty_table_passes(tmp_path: Path) -> None:
    result = length_confound_check(
        config=LengthConfoundConfig(), duckdb=warehouse(tmp_path, SILVER_PREFERENCE_PAIRS, [])
    )
    assert result.passed and result.description == "silver.preference_pairs has no pairs"
