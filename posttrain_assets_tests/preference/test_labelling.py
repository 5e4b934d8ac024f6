"""Who labelled the preferences (posttrain_assets/preference/labelling.py): judge-bias audit, inter-annotator
agreement, curation drops, and the WARN check on agreement."""

from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
import pytest

from posttrain_assets.defs.checks.annotator_agreement import annotator_agreement_check
from posttrain_assets.defs.resources import WarehouseResource
from posttrain_assets.defs.silver.preference_pairs import LengthConfoundConfig
from posttrain_assets.preference.audit_sql import balance_relation
from posttrain_assets.preference.labelling import (
    JudgeBias,
    annotator_agreement,
    curation_drops_query,
    judge_bias_audit,
    krippendorff_alpha,
)
from posttrain_assets.warehouse.catalogue import SILVER_PREFERENCE_BALANCE_DROPS

SCORES = pa.list_(pa.struct([("rater", pa.string()), ("chosen", pa.float64()), ("rejected", pa.float64())]))
ANNOTATIONS = pa.struct(
    [("judge", pa.string()), ("chosen_model", pa.string()), ("rejected_model", pa.string()), ("rater_scores", SCORES)]
)
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("source_kind", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("chosen_tokens", pa.int32()),
        ("rejected_tokens", pa.int32()),
        ("is_tie", pa.bool_()),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
        ("score_margin", pa.float64()),
        ("annotations", ANNOTATIONS),
    ]
)


def pair(
    pair_id: str,
    source: str,
    kind: str = "ai",
    chosen: str = "a",
    rejected: str = "b",
    tokens: tuple[int, int] = (5, 5),
    scores: tuple[float, float] | None = None,
    judge: str | None = None,
    chosen_model: str | None = None,
    raters: list[tuple[str, float, float]] | None = None,
) -> dict[str, Any]:
    annotations = None
    if judge or chosen_model or raters:
        annotations = {
            "judge": judge,
            "chosen_model": chosen_model,
            "rejected_model": None,
            "rater_scores": [{"rater": r, "chosen": c, "rejected": x} for r, c, x in raters] if raters else None,
        }
    return {
        "id": pair_id,
        "source": source,
        "source_kind": kind,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_tokens": tokens[0],
        "rejected_tokens": tokens[1],
        "is_tie": False,
        "score_chosen": scores[0] if scores else None,
        "score_rejected": scores[1] if scores else None,
        "score_margin": scores[0] - scores[1] if scores else None,
        "annotations": annotations,
    }


def pairs_table(conn: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]], name: str = "pairs") -> None:
    conn.register("incoming", pa.Table.from_pylist(rows, schema=SCHEMA))
    conn.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM incoming")
    conn.unregister("incoming")


# Three pairs, two raters each: both prefer chosen / they split / both prefer rejected.
RATED = [
    pair("h1", "humans", "human", raters=[("x", 3, 1), ("y", 3, 1)]),
    pair("h2", "humans", "human", raters=[("x", 3, 1), ("y", 1, 3)]),
    pair("h3", "humans", "human", raters=[("x", 1, 3), ("y", 1, 3)]),
]


def test_agreement_against_hand_computed_alpha() -> None:
    """By hand. Orders (+,+), (+,-), (-,-) and their mirrors (-,-), (-,+), (+,+): coincidences o(+,+) = o(-,-) = 4,
    o(+,-) = o(-,+) = 2 over n = 12 values (6 of each), so D_o = 4/12, D_e = 2*6*6/(12*11) = 6/11 and alpha =
    1 - (1/3)/(6/11) = 7/18 (with two values the ordinal metric is a constant times the nominal one: the same).
    The scores 3/1 give, over the six responses, o(3,3) = o(1,1) = 4, o(1,3) = o(3,1) = 2 with n = 12 (6 of each)
    and delta^2 = 4: D_o = 16/12, D_e = 2*6*6*4/(12*11) = 24/11, alpha = 1 - (4/3)/(24/11) = 7/18 too. Without the
    mirrors the orders would give 4/9 (D_e = 0.6 over 6 values)."""
    conn = duckdb.connect()
    pairs_table(conn, [*RATED, pair("h4", "humans", "human", raters=[("x", 2, 1)]), pair("n1", "nobody")])
    (humans,) = annotator_agreement(conn, "pairs")
    assert humans.source == "humans"
    assert (humans.rated_pairs, humans.raters, humans.ratings) == (3, 2, 6)  # h4 has one rater: not rated twice
    assert humans.order_alpha == pytest.approx(7 / 18)
    assert humans.rating_alpha == pytest.approx(7 / 18)
    assert humans.label_agreement == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert humans.order_agreement == pytest.approx(2 / 3)  # rater pairs agreeing: 1, 0, 1
    assert humans.disagreeing_pairs == 1  # h3: 0 < 0.5; h2's 0.5 is not below
    assert annotator_agreement(conn, "pairs", min_pair_agreement=0.75)[0].disagreeing_pairs == 2


def test_alpha_matches_krippendorffs_published_example() -> None:
    """Krippendorff (2011), 'Computing Krippendorff's alpha-reliability': 4 observers, 12 units, values 1-5,
    alpha = 0.743 nominal, 0.815 ordinal, 0.849 interval."""
    nan = np.nan
    data = np.array(
        [
            [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
            [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
            [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
            [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
        ]
    )
    domain = [1.0, 2.0, 3.0, 4.0, 5.0]
    counts = np.array([[np.sum(data[:, unit] == v) for v in domain] for unit in range(12)])
    assert round(krippendorff_alpha(counts, domain, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(counts, domain, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(counts, domain, "interval"), 3) == 0.849
    # undefined: no unit with two values, or one value only
    assert krippendorff_alpha(np.array([[1, 0], [0, 1]]), [0, 1], "nominal") is None
    assert krippendorff_alpha(np.array([[2, 0], [3, 0]]), [0, 1], "nominal") is None


def test_judge_bias_audit_stratified_by_judge_and_chosen_model() -> None:
    listy = "Here:\n- one\n- two"
    header = "## Answer\nIt is 4."
    hedgy = "I think it might be 4."
    rows = [
        # judge j1 prefers lists and headers, and longer answers
        pair("a1", "uf", chosen=listy, rejected=hedgy, tokens=(30, 10), judge="j1", chosen_model="m1"),
        pair("a2", "uf", chosen=header, rejected="4", tokens=(20, 5), judge="j1", chosen_model="m1"),
        pair("a3", "uf", chosen=listy, rejected=listy, tokens=(10, 10), judge="j1", chosen_model="m2"),
        # judge j2 prefers the short plain answer
        pair("a4", "uf", chosen="4", rejected=listy, tokens=(2, 12), judge="j2", chosen_model="m2"),
        # a human source without a judge is not audited
        pair("b1", "people", "human", chosen=listy, rejected="x", tokens=(9, 1)),
    ]
    conn = duckdb.connect()
    pairs_table(conn, rows)
    audit = {(b.stratum_kind, b.stratum, b.feature): b for b in judge_bias_audit(conn, "pairs")}
    assert {b[:2] for b in audit} == {("source", "uf"), ("judge", "j1"), ("judge", "j2"), ("chosen_model", "m1"),
                                       ("chosen_model", "m2")}  # fmt: skip
    assert all(b.source == "uf" for b in audit.values())
    # d (tokens) over j1: 20, 15, 0 -> share (2 + 0.5) / 3; r = mean / rms = (35/3) / sqrt(625/3)
    assert audit["judge", "j1", "tokens"] == JudgeBias(
        "uf", "judge", "j1", "tokens", 3, 20.0, 25 / 3, 2, 2.5 / 3, pytest.approx((35 / 3) / (625 / 3) ** 0.5)
    )
    lists = audit["judge", "j1", "list"]  # chosen has a list in a1 and a3, rejected in a3 only
    assert (lists.chosen_mean, lists.rejected_mean, lists.differing_pairs) == (2 / 3, 1 / 3, 1)
    # d = 1, 0, 0: r = (1/3) / sqrt(1/3); pairs equal in the marker dilute r as they dilute the share
    assert lists.chosen_higher_share == pytest.approx(2 / 3)
    assert lists.point_biserial_r == pytest.approx((1 / 3) ** 0.5)
    assert audit["judge", "j1", "header"].chosen_higher_share == pytest.approx(2 / 3)
    assert audit["judge", "j1", "hedge"].point_biserial_r == pytest.approx(-((1 / 3) ** 0.5))  # a1's rejected hedges
    assert audit["judge", "j2", "tokens"].chosen_higher_share == 0.0
    assert audit["judge", "j2", "list"].point_biserial_r == pytest.approx(-1.0)
    whole = audit["source", "uf", "tokens"]
    assert (whole.pairs, whole.chosen_higher_share) == (4, pytest.approx(2.5 / 4))
    assert audit["chosen_model", "m1", "tokens"].chosen_higher_share == 1.0
    assert [b.feature for b in judge_bias_audit(conn, "pairs")[:4]] == ["tokens", "list", "header", "hedge"]


def curation_drops(conn: duckdb.DuckDBPyConnection, relation: str, *args: Any, **kwargs: Any) -> dict[str, str]:
    """Pair id -> reason of the curation drops query."""
    query, params = curation_drops_query(relation, *args, **kwargs)
    return dict(conn.execute(f"SELECT id, reason FROM ({query}) ORDER BY id", params).fetchall())


def test_margin_and_disagreement_drops_reach_the_drop_list_with_their_reason() -> None:
    rows = [
        pair("m1", "scored", scores=(8.0, 7.5)),  # margin 0.5
        pair("m2", "scored", scores=(8.0, 4.0)),  # margin 4
        pair("m3", "scored"),  # no scores: never dropped for its margin
        *RATED,
    ]
    conn = duckdb.connect()
    pairs_table(conn, rows)
    assert curation_drops(conn, "pairs") == {"h3": "annotator_disagreement"}  # no margin filter by default
    drops = curation_drops(conn, "pairs", min_score_margin=1.0)
    assert drops == {"m1": "low_margin", "h3": "annotator_disagreement"}
    assert curation_drops(conn, "pairs", 1.0, disagreement_policy="report") == {"m1": "low_margin"}
    assert curation_drops(conn, "pairs", 1.0, min_pair_agreement=0.75) == {**drops, "h2": "annotator_disagreement"}
    with pytest.raises(ValueError, match="disagreement_policy"):
        curation_drops(conn, "pairs", disagreement_policy="ignore")
    # the balancing records them as drops of the balanced set, with the ties (m2 here)
    conn.execute("UPDATE pairs SET is_tie = id = 'm2'")
    conn.execute("CREATE SCHEMA silver")
    excluded, params = curation_drops_query("pairs", min_score_margin=1.0)
    result = balance_relation(
        conn, "SELECT * FROM pairs", SILVER_PREFERENCE_BALANCE_DROPS, excluded=excluded, params=params
    )
    assert conn.execute("SELECT id, source, reason FROM silver.preference_balance_drops").fetchall() == [
        ("h3", "humans", "annotator_disagreement"),
        ("m1", "scored", "low_margin"),
        ("m2", "scored", "tie"),
    ]
    assert (result.kept, result.dropped_counts) == (3, {"tie": 1, "low_margin": 1, "annotator_disagreement": 1})


def warehouse_with_pairs(path: Path, rows: list[dict[str, Any]]) -> WarehouseResource:
    with duckdb.connect(str(path)) as conn:
        conn.execute("CREATE SCHEMA silver")
        pairs_table(conn, rows, "silver.preference_pairs")
    return WarehouseResource(database=str(path))


def test_agreement_check_warns_on_a_low_alpha_source(tmp_path: Path) -> None:
    # unanimous raters (two pairs unanimously against their label): alpha 1
    agreeing = [
        pair(f"g{i}", "good", "human", raters=[("x", 5, 1), ("y", 4, 2), ("z", 5, 2)] if i >= 2 else
             [("x", 1, 5), ("y", 2, 4), ("z", 2, 5)])
        for i in range(20)
    ]  # fmt: skip
    # the noisy source: every third pair's raters split 1:2 against the label. Orders (+,+,+) x 16, (+,-,-) x 8
    # and their mirrors: a unanimous unit adds 3 to o(v,v), a split one 1 to o(+,-), o(-,+) and o(v,v) of its
    # pair: o(+,-) = o(-,+) = 16, n = 144 (72 of each): D_o = 32/144, D_e = 2*72*72/(144*143), alpha = 0.559
    noisy = [
        pair(f"n{i}", "noisy", "human", raters=[("x", 5, 1), ("y", 1, 4), ("z", 2, 5)] if i % 3 == 0 else
             [("x", 4, 2), ("y", 3, 2), ("z", 5, 1)])
        for i in range(24)
    ]  # fmt: skip
    # raters who always agree with every label: alpha 1 (mirrored, both orders occur)
    constant = [pair(f"c{i}", "constant", "human", raters=[("x", 5, 1), ("y", 4, 2)]) for i in range(20)]
    warehouse = warehouse_with_pairs(tmp_path / "w.duckdb", agreeing + noisy + constant)
    result = annotator_agreement_check(config=LengthConfoundConfig(), duckdb=warehouse)
    assert not result.passed and result.severity == dg.AssetCheckSeverity.WARN
    assert result.description == "source noisy: order alpha 0.559 below 0.667 (24 rated pairs, 8 disagreeing)"
    expected = 1 - (32 / 144) / (2 * 72 * 72 / (144 * 143))
    assert result.metadata["agreement/noisy/order_alpha"].value == pytest.approx(expected)
    assert result.metadata["agreement/good/order_alpha"].value == 1.0
    assert result.metadata["agreement/constant/order_alpha"].value == 1.0
    assert result.metadata["sources_judged"].value == 3
    # a lower floor passes; too few rated pairs is not judged
    assert annotator_agreement_check(config=LengthConfoundConfig(min_order_alpha=-1.0), duckdb=warehouse).passed
    small = annotator_agreement_check(config=LengthConfoundConfig(min_rated_pairs=25), duckdb=warehouse)
    assert small.passed and small.description.startswith("no source has 25 or more pairs scored by several")
