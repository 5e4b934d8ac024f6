"""The audit and the balancing in SQL (posttrain_assets.preference.audit_sql): every statistic agrees with an
independent brute-force oracle (audit_oracle.py) on the real HH-RLHF harmless test set and on synthetic sources with
continuous scores, zero lengths and ties, and does not depend on row order or thread count; the balancing leaves
every judged source passing with every stratum balanced, drops ties and curation drops first, and is deterministic;
the stored histogram is drawn again only when its inputs change."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from posttrain_assets.preference import audit_sql
from posttrain_assets.preference.audit import ConfoundThresholds, LengthAudit, confound_violations, histogram_png
from posttrain_assets.preference.audit_sql import (
    RelationBalance,
    audit_relation,
    balance_relation,
    stored_length_histogram,
)
from posttrain_assets.warehouse.catalogue import SILVER_PREFERENCE_BALANCE_DROPS
from posttrain_assets_tests.preference.audit_oracle import midranks, oracle_audit
from posttrain_assets_tests.preference.test_audit import (  # noqa: F401 (hh_harmless_pairs is a fixture)
    HAND,
    hh_harmless_pairs,
    pair,
    table_of,
)

PAIRS = "SELECT * FROM pairs"
DROPS = SILVER_PREFERENCE_BALANCE_DROPS.qualified


def synthetic_biased(n: int = 400, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` pairs, 90% chosen longer, length differences of variable size; plus 5 ties by text."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        base = rng.randint(20, 400)
        diff = rng.randint(1, 150)
        longer = rng.random() < 0.9
        chosen, rejected = (base + diff, base) if longer else (base, base + diff)
        pairs.append(pair(f"b{i:03d}", chosen, rejected, source="biased", kind="ai"))
    for i in range(5):
        pairs.append(pair(f"t{i}", 12, 11, source="biased", kind="ai", chosen="Sure!", rejected="sure."))
    return pairs


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


def assert_matches_oracle(result: LengthAudit, pairs: list[dict[str, Any]]) -> None:
    """Counts exactly, doubles to 1e-12 relative (DuckDB's median, quantile_cont and fsum may differ from numpy's and
    math.fsum's in the last bits)."""
    expected = oracle_audit(pairs)
    for name, value in result.as_dict().items():
        if isinstance(expected[name], int) or expected[name] is None:
            assert value == expected[name], name
        else:
            assert value == pytest.approx(expected[name], rel=1e-12, abs=1e-15), name


def test_the_audit_agrees_with_the_oracle_on_hh_rlhf(hh_harmless_pairs: list[dict[str, Any]]) -> None:  # noqa: F811
    result = audit_relation(table_of(hh_harmless_pairs), PAIRS)
    assert list(result) == [("source", "hh_rlhf_harmless"), ("source_kind", "human"), ("overall", "all")]
    for group in result.values():
        assert_matches_oracle(group, hh_harmless_pairs)


def test_the_audit_agrees_with_the_oracle_on_mixed_sources() -> None:
    pairs = mixed_sources()
    result = audit_relation(table_of(pairs), PAIRS)
    assert list(result) == [
        ("source", "biased"),
        ("source", "fair"),
        ("source", "scored"),
        ("source_kind", "ai"),
        ("source_kind", "human"),
        ("overall", "all"),
    ]
    members = {("source", name): [p for p in pairs if p["source"] == name] for name in ("biased", "fair", "scored")} | {
        ("source_kind", kind): [p for p in pairs if p["source_kind"] == kind] for kind in ("ai", "human")
    }
    members[("overall", "all")] = pairs
    for key, group in members.items():
        assert_matches_oracle(result[key], group)
    scored = result[("source", "scored")]
    # 289 of the 700 pairs have two finite scores (counted by the oracle too)
    assert scored.scored_pairs == 289 and scored.score_margin_quantiles["p75"] == pytest.approx(0.7)
    assert result[("source", "biased")].tie_pairs == 5
    # a query with a parameter instead of the whole table, and an empty one
    hand = table_of(HAND)
    without_c = audit_relation(hand, "SELECT * FROM pairs WHERE id <> $id", params={"id": "c"})
    assert_matches_oracle(without_c[("overall", "all")], [p for p in HAND if p["id"] != "c"])
    assert audit_relation(hand, "SELECT * FROM pairs WHERE false") == {}


def test_the_audit_does_not_depend_on_row_order_or_threads() -> None:
    pairs = mixed_sources()
    one = table_of(pairs)
    one.execute("SET threads = 1")
    shuffled = pairs[:]
    random.Random(3).shuffle(shuffled)
    many = table_of(shuffled)
    many.execute("SET threads = 4")
    assert audit_relation(one, PAIRS) == audit_relation(many, PAIRS)  # every double to the last bit


# ---------------------------------------------------------------------------------------------------------------
# balancing
# ---------------------------------------------------------------------------------------------------------------


def balance(
    pairs: list[dict[str, Any]],
    thresholds: ConfoundThresholds | None = None,
    seed: int = 0,
    excluded: str | None = None,
) -> tuple[RelationBalance, list[tuple[str, str, str]], duckdb.DuckDBPyConnection]:
    """balance_relation of the pairs: the result, the drops table's rows (id, source, reason) and the connection."""
    conn = table_of(pairs)
    conn.execute("CREATE SCHEMA silver")
    result = balance_relation(conn, PAIRS, SILVER_PREFERENCE_BALANCE_DROPS, thresholds, seed=seed, excluded=excluded)
    return result, conn.execute(f"SELECT id, source, reason FROM {DROPS}").fetchall(), conn


def kept_audit(conn: duckdb.DuckDBPyConnection) -> dict:
    return audit_relation(conn, f"SELECT * FROM pairs WHERE id NOT IN (SELECT id FROM {DROPS})")


def assert_every_stratum_balanced(pairs: list[dict[str, Any]], dropped: set[str], strata: int | str) -> None:
    """Recomputes the strata independently (the oracle's mid-ranks of |d| over the pairs with d != 0 that were not
    dropped as ties or curation drops) and checks each keeps min(longer, shorter) pairs of either side."""
    members = [p for p in pairs if p["chosen_tokens"] != p["rejected_tokens"]]
    magnitudes = [abs(p["chosen_tokens"] - p["rejected_tokens"]) for p in members]
    if strata == "exact":
        stratum_of = magnitudes
    else:
        ranks = midranks(magnitudes)
        stratum_of = [min(strata - 1, math.floor(strata * (r - 0.5) / len(members))) for r in ranks]
    cells: dict[Any, list[list[bool]]] = {}
    for p, stratum in zip(members, stratum_of, strict=True):
        side = 0 if p["chosen_tokens"] > p["rejected_tokens"] else 1
        cells.setdefault(stratum, [[], []])[side].append(p["id"] not in dropped)
    for longer, shorter in cells.values():
        keep = min(len(longer), len(shorter))
        assert (sum(longer), sum(shorter)) == (keep, keep)


def test_balancing_a_biased_source_passes_and_reports_every_drop() -> None:
    pairs = synthetic_biased()
    before = audit_relation(table_of(pairs), PAIRS)[("source", "biased")]
    assert before.chosen_longer_share > 0.85 and before.point_biserial_r > 0.6
    result, drops, conn = balance(pairs)
    assert {reason for _, _, reason in drops} == {"tie", "length_balance"}
    assert sorted(i for i, _, r in drops if r == "tie") == [f"t{i}" for i in range(5)]
    assert [i for i, _, _ in drops] == sorted(i for i, _, _ in drops)  # in id order
    assert result.kept + len(drops) == len(pairs)
    assert result.dropped_counts == {"tie": 5, "length_balance": len(drops) - 5}
    after = kept_audit(conn)
    assert confound_violations(after) == []
    assert after[("source", "biased")].chosen_longer_share == 0.5  # equal sides in every stratum
    assert after[("source", "biased")].pairs == result.kept >= 50
    assert result.strata["biased"] in (10, 20, 40, 80, 160, "exact")
    untied = [p for p in pairs if not p["is_tie"]]
    assert_every_stratum_balanced(untied, {i for i, _, _ in drops}, result.strata["biased"])
    # deterministic: the same seed over the pairs stored in another order gives the same drops; another seed gives
    # another sample of the same size, still passing
    shuffled = pairs[:]
    random.Random(1).shuffle(shuffled)
    assert balance(shuffled)[1] == drops
    other, other_drops, other_conn = balance(pairs, seed=1)
    assert other_drops != drops and other.dropped_counts == result.dropped_counts
    assert confound_violations(kept_audit(other_conn)) == []


def test_balancing_fixes_a_magnitude_confound_with_a_fair_share() -> None:
    # half the pairs chosen longer by 1..200 tokens, half chosen shorter by 1..40: share 0.5 but r ~ 0.5
    rng = random.Random(3)
    pairs = [pair(f"p{i}", 100 + rng.randint(1, 200), 100, source="skew") for i in range(200)]
    pairs += [pair(f"q{i}", 100, 100 + rng.randint(1, 40), source="skew") for i in range(200)]
    before = audit_relation(table_of(pairs), PAIRS)[("source", "skew")]
    assert before.chosen_longer_share == 0.5 and before.point_biserial_r > 0.2
    result, drops, conn = balance(pairs)
    assert confound_violations(kept_audit(conn)) == []
    assert {reason for _, _, reason in drops} == {"length_balance"}
    assert_every_stratum_balanced(pairs, {i for i, _, _ in drops}, result.strata["skew"])


def test_a_source_with_one_length_difference_is_balanced_exactly() -> None:
    # By hand: 70 pairs chosen longer by 10, 30 shorter by 10, 5 of equal length. |d| takes 2 values (0, 10), fewer
    # than 10 quantile strata, so one stratum per |d|: the 10-token stratum keeps 30 + 30 and drops 40 chosen-longer
    # pairs; the equal pairs stay: 65 kept >= 50, share 0.5, r 0.
    pairs = [pair(f"l{i:02d}", 30, 20, source="one") for i in range(70)]
    pairs += [pair(f"s{i:02d}", 20, 30, source="one") for i in range(30)]
    pairs += [pair(f"e{i}", 25, 25, source="one") for i in range(5)]
    result, drops, conn = balance(pairs)
    assert (result.kept, result.dropped_counts, result.strata) == (65, {"length_balance": 40}, {"one": "exact"})
    assert all(i.startswith("l") for i, _, _ in drops)
    kept = kept_audit(conn)[("source", "one")]
    assert (kept.chosen_longer_share, kept.point_biserial_r) == (0.5, 0.0)


def test_balanced_set_is_left_whole() -> None:
    pairs = [pair(f"f{i}", 20 + (i % 7) + 1, 20, source="fair") for i in range(60)]
    pairs += [pair(f"g{i}", 20, 20 + (i % 7) + 1, source="fair") for i in range(60)]
    result, drops, _ = balance(pairs)
    assert (result.kept, drops, result.dropped_counts, result.strata) == (120, [], {}, {})


def test_unbalanceable_and_small_sources() -> None:
    always = [pair(f"a{i:02d}", 30 + i, 10, source="always_longer") for i in range(80)]
    small = [pair(f"s{i:02d}", 30, 10, source="small") for i in range(20)]  # offending but under min_pairs
    result, drops, _ = balance(always + small)
    assert drops == [(p["id"], "always_longer", "cannot_balance") for p in always]
    assert (result.kept, result.dropped_counts) == (20, {"cannot_balance": 80})


def test_ties_then_curation_drops_then_balancing() -> None:
    pairs = sorted(mixed_sources(), key=lambda p: p["id"])
    # t1 is a tie before it is a curation drop; "gone" is not a pair and is ignored
    excluded = (
        "SELECT * FROM (VALUES ('s0003', 'low_margin'), ('b010', 'annotator_disagreement'), ('t1', 'low_margin'), "
        "('gone', 'low_margin')) AS t(id, reason)"
    )
    result, drops, conn = balance(pairs, ConfoundThresholds(max_abs_r=0.05), seed=3, excluded=excluded)
    reasons = {i: r for i, _, r in drops}
    assert (reasons["t1"], reasons["s0003"], reasons["b010"]) == ("tie", "low_margin", "annotator_disagreement")
    assert "gone" not in reasons
    # with max_abs_r 0.05 both large sources are balanced; the small fair one is not judged
    assert set(result.strata) == {"biased", "scored"}
    counts = result.dropped_counts
    assert list(counts) == ["tie", "length_balance", "low_margin", "annotator_disagreement"]  # DROP_REASONS order
    assert (counts["tie"], counts["low_margin"], counts["annotator_disagreement"]) == (5, 1, 1)
    assert result.kept + sum(counts.values()) == len(pairs)
    assert confound_violations(kept_audit(conn), ConfoundThresholds(max_abs_r=0.05)) == []
    for source in ("biased", "scored"):
        remaining = [p for p in pairs if p["source"] == source and reasons.get(p["id"]) in (None, "length_balance")]
        assert_every_stratum_balanced(remaining, set(reasons), result.strata[source])


def test_hh_rlhf_harmless_keeps_every_pair_but_the_ties(hh_harmless_pairs: list[dict[str, Any]]) -> None:  # noqa: F811
    result, drops, _ = balance(hh_harmless_pairs)
    assert (result.kept, result.dropped_counts) == (2300, {"tie": 3})


# ---------------------------------------------------------------------------------------------------------------
# the length histogram
# ---------------------------------------------------------------------------------------------------------------


def expected_png(pairs: list[dict[str, Any]], title: str) -> bytes:
    """histogram_png from each side's lengths counted with numpy, capped at numpy's 99th percentile of all lengths."""
    chosen = [p["chosen_tokens"] for p in pairs]
    rejected = [p["rejected_tokens"] for p in pairs]
    cap = max(float(np.quantile(chosen + rejected, 0.99)), 1.0)
    sides = [np.unique(np.asarray(side, dtype=np.int64), return_counts=True) for side in (chosen, rejected)]
    return histogram_png(sides[0], sides[1], cap, title)


def test_the_stored_histogram_is_drawn_again_only_when_its_inputs_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = mixed_sources()
    path = tmp_path / "artifacts" / "histogram.png"
    first = stored_length_histogram(table_of(pairs), PAIRS, "lengths", path)
    assert first.drawn and first.png == path.read_bytes() == expected_png(pairs, "lengths")

    # Nothing changed (the same lengths in another order, other ids and scores): read back, not drawn.
    reordered = [{**p, "id": f"x{i}", "score_chosen": None} for i, p in enumerate(reversed(pairs))]
    drawn = []
    real_draw = audit_sql.histogram_png
    monkeypatch.setattr(audit_sql, "histogram_png", lambda *args: drawn.append(args) or real_draw(*args))
    again = stored_length_histogram(table_of(reordered), PAIRS, "lengths", path)
    assert (again.drawn, again.png, drawn) == (False, first.png, [])

    # Other lengths, another title, or a damaged file: drawn again, the bytes of a fresh drawing.
    longer = [{**p, "chosen_tokens": p["chosen_tokens"] + 50} if i < 300 else p for i, p in enumerate(pairs)]
    changed = stored_length_histogram(table_of(longer), PAIRS, "lengths", path)
    assert len(drawn) == 1
    fresh = expected_png(longer, "lengths")
    assert (changed.drawn, changed.png, path.read_bytes()) == (True, fresh, fresh)
    assert fresh != first.png
    retitled = stored_length_histogram(table_of(longer), PAIRS, "other title", path)
    assert retitled.drawn and retitled.png == expected_png(longer, "other title")
    path.write_bytes(path.read_bytes()[:50])
    repaired = stored_length_histogram(table_of(longer), PAIRS, "other title", path)
    assert (repaired.drawn, repaired.png, path.read_bytes()) == (True, retitled.png, retitled.png)
    assert not stored_length_histogram(table_of(longer), PAIRS, "other title", path).drawn
    forced = stored_length_histogram(table_of(longer), PAIRS, "other title", path, redraw=True)  # a full rebuild
    assert (forced.drawn, forced.png) == (True, retitled.png)
    # no pairs: the "no pairs" drawing
    empty = stored_length_histogram(table_of(pairs), "SELECT * FROM pairs WHERE false", "none", tmp_path / "e.png")
    no_lengths = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert empty.png == histogram_png(no_lengths, no_lengths, None, "none")
