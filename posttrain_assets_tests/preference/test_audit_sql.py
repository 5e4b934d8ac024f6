"""The audit and the balancing in SQL (posttrain_assets.preference.audit_sql) give exactly, to the last bit, what the
Python audit (posttrain_assets.preference.audit) gives over the same pairs: on the real HH-RLHF harmless test set,
on synthetic sources with continuous scores, zero lengths, ties and a confounded source, and the same histogram
PNG."""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from posttrain_assets.preference import audit_sql
from posttrain_assets.preference.audit import (
    ConfoundThresholds,
    audit,
    balance_pairs,
    length_histogram_png,
    quantiles,
    rank_biserial,
)
from posttrain_assets.preference.audit_sql import (
    ValueCounts,
    audit_relation,
    balance_relation,
    length_histogram_png_of,
    rank_biserial_from_counts,
    stored_length_histogram,
)
from posttrain_assets.text import is_tie
from posttrain_assets_tests.preference.test_audit import (  # noqa: F401 (hh_harmless_pairs is a fixture)
    HAND,
    hh_harmless_pairs,
    pair,
    synthetic_biased,
)

COLUMNS = (
    "id VARCHAR, source VARCHAR, source_kind VARCHAR, chosen_tokens INTEGER, rejected_tokens INTEGER, "
    "is_tie BOOLEAN, score_chosen DOUBLE, score_rejected DOUBLE"
)


def stored(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pairs as silver.preference_pairs holds them: with their is_tie flag, no texts."""
    return [
        {
            "id": p["id"],
            "source": p["source"],
            "source_kind": p["source_kind"],
            "chosen_tokens": p["chosen_tokens"],
            "rejected_tokens": p["rejected_tokens"],
            "is_tie": is_tie(p["chosen"], p["rejected"]),
            "score_chosen": p.get("score_chosen"),
            "score_rejected": p.get("score_rejected"),
        }
        for p in pairs
    ]


def table_of(pairs: list[dict[str, Any]]) -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect()
    conn.execute(f"CREATE TABLE pairs ({COLUMNS})")
    names = [c.split()[0] for c in COLUMNS.split(", ")]
    conn.executemany(
        f"INSERT INTO pairs VALUES ({', '.join('?' * len(names))})", [[p[n] for n in names] for p in pairs]
    )
    return conn


def mixed_sources(seed: int = 11) -> list[dict[str, Any]]:
    """Three sources of two kinds: a confounded one (synthetic_biased), one with continuous scores (some missing,
    infinite or NaN) and zero lengths, and a small fair one."""
    rng = random.Random(seed)
    pairs = synthetic_biased()
    for i in range(700):
        chosen, rejected = rng.choice([0, rng.randint(0, 900)]), rng.randint(0, 900)
        score = rng.choice([None, rng.uniform(-3, 3), math.inf, math.nan, 0.1 * rng.randint(0, 30)])
        pairs.append(
            pair(
                f"s{i:04d}",
                chosen,
                rejected,
                source="scored",
                kind="human",
                score_chosen=score,
                score_rejected=rng.choice([rng.uniform(-3, 3), 0.1 * rng.randint(0, 30), score]),
            )
        )
    pairs += [pair(f"f{i}", 30 + i % 3, 31, source="fair", kind="human") for i in range(9)]
    return pairs


def test_the_sql_audit_equals_the_python_audit_on_hh_rlhf(hh_harmless_pairs: list[dict[str, Any]]) -> None:  # noqa: F811
    pairs = stored(hh_harmless_pairs)
    in_sql = audit_relation(table_of(pairs), "pairs")
    assert in_sql == audit(pairs)  # every field of every group, exactly
    a = in_sql[("source", "hh_rlhf_harmless")]
    assert (a.pairs, a.chosen_longer_pairs, a.equal_length_pairs, a.tie_pairs) == (2303, 1013, 36, 3)
    assert a.length_auc_unpaired == pytest.approx(0.434235, abs=1e-6)
    assert a.rank_biserial_r == pytest.approx(-0.204986, abs=1e-6)
    assert (a.mean_length_ratio, a.median_length_ratio) == pytest.approx((1.515140, 0.846154), abs=1e-6)
    assert list(in_sql) == [("source", "hh_rlhf_harmless"), ("source_kind", "human"), ("overall", "all")]


def test_the_sql_audit_equals_the_python_audit_on_mixed_sources() -> None:
    pairs = stored(mixed_sources())
    in_sql = audit_relation(table_of(pairs), "pairs")
    in_python = audit(pairs)
    assert (
        list(in_sql)
        == list(in_python)
        == [
            ("source", "biased"),
            ("source", "fair"),
            ("source", "scored"),
            ("source_kind", "ai"),
            ("source_kind", "human"),
            ("overall", "all"),
        ]
    )
    for key, expected in in_python.items():
        assert in_sql[key].as_dict() == expected.as_dict(), key
    scored = in_sql[("source", "scored")]
    # continuous scores summed exactly: 289 of 700 pairs have two finite scores
    assert scored.scored_pairs == 289 and scored.score_margin_quantiles["p75"] == 0.7
    assert in_sql[("source", "biased")].tie_pairs == 5
    # the hand-computed four pairs, and a query with a parameter instead of a table
    hand = table_of(stored(HAND))
    assert audit_relation(hand, "pairs") == audit(stored(HAND))
    assert audit_relation(hand, "SELECT * FROM pairs WHERE id <> $id", params={"id": "c"}) == audit(
        [p for p in stored(HAND) if p["id"] != "c"]
    )
    assert audit_relation(hand, "SELECT * FROM pairs WHERE false") == {}


def test_the_sql_balance_equals_the_python_balance() -> None:
    # in id order, as the asset reads silver.preference_pairs (balance_pairs lists its drops in input order)
    pairs = sorted(stored(mixed_sources()), key=lambda p: p["id"])
    conn = table_of(pairs)
    excluded = {"s0003": "low_margin", "b010": "annotator_disagreement", "t1": "low_margin", "gone": "low_margin"}
    for thresholds, seed in ((ConfoundThresholds(), 0), (ConfoundThresholds(max_abs_r=0.05), 3)):
        expected = balance_pairs(pairs, thresholds, seed=seed, excluded=excluded)
        result = balance_relation(conn, "pairs", thresholds, seed=seed, excluded=excluded)
        assert result.dropped == expected.dropped
        assert result.strata == expected.strata
        assert result.kept == len(expected.kept_ids)
    # with max_abs_r 0.05 both large sources are balanced; the ties went first (t1 is a tie before it is excluded)
    # and then the curation drops (s0003, b010; "gone" is not a pair)
    assert result.dropped_counts() == {"tie": 5, "low_margin": 1, "annotator_disagreement": 1, "length_balance": 637}
    assert set(result.strata) == {"biased", "scored"}
    # an unbalanceable source is dropped whole
    always_longer = stored([pair(f"x{i:02d}", 10 + i, 5, source="longer") for i in range(60)])
    result = balance_relation(table_of(always_longer), "pairs")
    assert result.dropped_counts() == {"cannot_balance": 60} and result.kept == 0
    assert result.dropped == balance_pairs(always_longer).dropped


def test_value_counts_give_numpy_quantiles_fsum_medians_and_ranks_exactly() -> None:
    rng = np.random.default_rng(5)
    for size in (1, 2, 3, 10, 101, 1000):
        for values in (rng.integers(-50, 50, size), rng.normal(0, 3, size).round(rng.integers(0, 4)), rng.random(size)):
            distinct, counts = np.unique(values, return_counts=True)
            held = ValueCounts(distinct, counts)
            assert held.quantiles() == quantiles(values.tolist())
            assert held.exact_sum() == math.fsum(values.tolist())
            assert held.median() == float(statistics.median(values.tolist()))
            if values.dtype.kind == "i":
                assert rank_biserial_from_counts(held) == rank_biserial(values.tolist())


def test_the_histogram_png_from_counts_is_the_same_png() -> None:
    pairs = stored(mixed_sources())
    png = length_histogram_png_of(table_of(pairs), "pairs", "lengths")
    assert png == length_histogram_png(
        [p["chosen_tokens"] for p in pairs], [p["rejected_tokens"] for p in pairs], "lengths"
    )
    assert length_histogram_png_of(table_of(pairs), "SELECT * FROM pairs WHERE false", "none") == length_histogram_png(
        [], [], "none"
    )


def test_the_stored_histogram_is_drawn_again_only_when_its_inputs_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = stored(mixed_sources())
    path = tmp_path / "artifacts" / "histogram.png"
    first = stored_length_histogram(table_of(pairs), "pairs", "lengths", path)
    fresh = length_histogram_png_of(table_of(pairs), "pairs", "lengths")
    assert first.drawn and first.png == path.read_bytes() == fresh

    # Nothing changed (the same lengths in another order, other ids and scores): read back, not drawn.
    reordered = [{**p, "id": f"x{i}", "score_chosen": None} for i, p in enumerate(reversed(pairs))]
    drawn = []
    real_draw = audit_sql.histogram_png
    monkeypatch.setattr(audit_sql, "histogram_png", lambda *args: drawn.append(args) or real_draw(*args))
    again = stored_length_histogram(table_of(reordered), "pairs", "lengths", path)
    assert (again.drawn, again.png, drawn) == (False, first.png, [])

    # Other lengths, another title, or a damaged file: drawn again, the bytes of a fresh drawing.
    longer = [{**p, "chosen_tokens": p["chosen_tokens"] + 50} if i < 300 else p for i, p in enumerate(pairs)]
    changed = stored_length_histogram(table_of(longer), "pairs", "lengths", path)
    assert len(drawn) == 1
    fresh = length_histogram_png_of(table_of(longer), "pairs", "lengths")
    assert (changed.drawn, changed.png, path.read_bytes()) == (True, fresh, fresh)
    assert fresh != first.png
    retitled = stored_length_histogram(table_of(longer), "pairs", "other title", path)
    assert retitled.drawn and retitled.png == length_histogram_png_of(table_of(longer), "pairs", "other title")
    path.write_bytes(path.read_bytes()[:50])
    repaired = stored_length_histogram(table_of(longer), "pairs", "other title", path)
    assert (repaired.drawn, repaired.png, path.read_bytes()) == (True, retitled.png, retitled.png)
    assert not stored_length_histogram(table_of(longer), "pairs", "other title", path).drawn
    forced = stored_length_histogram(table_of(longer), "pairs", "other title", path, redraw=True)  # a full rebuild
    assert (forced.drawn, forced.png) == (True, retitled.png)
