"""length_confound_check and balanced_length_confound_check, called directly on a warehouse: a confounded source
fails with the source, statistic and value named; a fair source passes; a biased source slipped into the balanced
table fails the balanced check; ties are the stored flags. The figures are those of the audit silver.preference_pairs
reports (one implementation, audit_sql.audit_relation), checked here against values computed by hand."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import duckdb
import pytest

from posttrain_assets.defs.checks.length_confound import balanced_length_confound_check, length_confound_check
from posttrain_assets.defs.resources import WarehouseResource
from posttrain_assets.defs.silver.preference_pairs import LengthConfoundConfig, LengthConfoundGateConfig
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
        config=LengthConfoundGateConfig(), duckdb=warehouse(tmp_path, SILVER_PREFERENCE_PAIRS, CONFOUNDED + FAIR)
    )
    assert not result.passed
    assert result.description == (
        "source confounded: chosen_longer_share = 0.900 outside [0.35, 0.65] (n=100); "
        "source confounded: point_biserial_r = 0.800 outside [-0.20, 0.20] (n=100); "
        "source confounded: tie_rate = 0.020 outside [0.00, 0.01] (n=100)"
    )
    assert result.metadata["pairs"].value == 160
    assert result.metadata["sources_judged"].value == 2
    # the audit table's rows, by hand. confounded: share 90/100, Wilson 95% [0.8256, 0.9448]; unpaired AUC: chosen
    # {30 x 90, 20 x 10} vs rejected {20 x 90, 30 x 10}: (90 * 90 + 0.5 * 90 * 10 + 0.5 * 10 * 90) / 100^2 = 0.9;
    # r 0.8; rank r: every |d| is 10 (mid-rank 50.5), T+ = 90 * 50.5, T- = 10 * 50.5 -> 0.8; ratios 1.5 x 90 and
    # 2/3 x 10: mean 1.4167, median 1.5; d = -10 x 10, 10 x 90: median 10, p10 at position 9.9: -10 + 0.9 * 20 = 8.
    # fair: share 0.5, Wilson [0.3774, 0.6226], AUC 0.5, r 0, ratios 2/3 and 1.5 x 30 each: mean = median = 1.0833.
    rows = result.metadata["audit"].value.splitlines()
    assert rows[2] == (
        "| source `confounded` | 100 | 0.900 (0.826–0.945) | 0.900 | 0.800 | 0.800 | 1.42 / 1.50 | 10 [8, 10] "
        "| 0.0200 | 0 | — | — |"
    )
    assert rows[3] == (
        "| source `fair` | 60 | 0.500 (0.377–0.623) | 0.500 | 0.000 | 0.000 | 1.08 / 1.08 | 0 [-10, 10] "
        "| 0.0000 | 0 | — | — |"
    )


def test_a_biased_source_in_the_balanced_table_fails_the_balanced_check(tmp_path: Path) -> None:
    # a corrupted remedy: the confounded pairs (ties flagged off) written into the balanced table with the fair ones
    biased = [{**p, "is_tie": False} for p in CONFOUNDED]
    result = balanced_length_confound_check(
        config=LengthConfoundGateConfig(),
        duckdb=warehouse(tmp_path, SILVER_PREFERENCE_PAIRS_BALANCED, FAIR + biased),
    )
    assert not result.passed
    assert result.description == (
        "source confounded: chosen_longer_share = 0.900 outside [0.35, 0.65] (n=100); "
        "source confounded: point_biserial_r = 0.800 outside [-0.20, 0.20] (n=100)"
    )


def test_ties_are_the_stored_flags_and_the_check_has_no_tie_similarity(tmp_path: Path) -> None:
    # identical texts not flagged are not ties to the check (the stage's flags decide, at the stage's similarity);
    # 2 flagged pairs of 60 are 0.033 > 0.01
    flagged = [{**p, "chosen": "same", "rejected": "same", "is_tie": p["id"] in ("f000", "f001")} for p in FAIR]
    result = length_confound_check(
        config=LengthConfoundGateConfig(), duckdb=warehouse(tmp_path, SILVER_PREFERENCE_PAIRS, flagged)
    )
    assert result.description == "source fair: tie_rate = 0.033 outside [0.00, 0.01] (n=60)"
    # the tie similarity is the stage's setting (it decides the flags), not the checks'
    assert "tie_similarity" not in LengthConfoundGateConfig.model_fields
    assert "tie_similarity" in LengthConfoundConfig.model_fields


def test_a_fair_source_passes_and_small_sources_are_not_judged(tmp_path: Path) -> None:
    small = [stored_pair(f"s{i}", "small", 50, 10) for i in range(10)]  # always longer, but n=10 < min_pairs
    result = balanced_length_confound_check(
        config=LengthConfoundGateConfig(), duckdb=warehouse(tmp_path, SILVER_PREFERENCE_PAIRS_BALANCED, FAIR + small)
    )
    assert result.passed
    assert result.description == "1 source(s) within thresholds: fair"
    assert (result.metadata["pairs"].value, result.metadata["sources_judged"].value) == (70, 1)


@pytest.mark.parametrize("threshold, passed", [(0.8, True), (0.79, False)])  # r = 0.8, bounds inclusive
def test_the_thresholds_come_from_the_config(tmp_path: Path, threshold: float, passed: bool) -> None:
    no_ties = [{**p, "is_tie": False} for p in CONFOUNDED]
    config = LengthConfoundGateConfig(share_high=0.95, max_abs_r=threshold)
    result = length_confound_check(config=config, duckdb=warehouse(tmp_path, SILVER_PREFERENCE_PAIRS, no_ties))
    assert result.passed is passed


def test_an_empty_table_passes(tmp_path: Path) -> None:
    result = length_confound_check(
        config=LengthConfoundGateConfig(), duckdb=warehouse(tmp_path, SILVER_PREFERENCE_PAIRS, [])
    )
    assert result.passed and result.description == "silver.preference_pairs has no pairs"
