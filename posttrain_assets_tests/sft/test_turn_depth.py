"""Turn depth of SFT rows (posttrain_assets/sft/turn_depth.py) and the WARN check on gold.sft."""

import json
from collections import Counter
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
import pytest

from posttrain_assets.defs.checks.turn_depth import (
    MIXTURE_SFT_ROWS,
    TurnDepthConfig,
    mixture_turn_depth_check,
    sft_turn_depth_check,
)
from posttrain_assets.defs.resources import WarehouseResource
from posttrain_assets.records.adapters import sharegpt
from posttrain_assets.sft.turn_depth import below_multi_turn_floor, turn_depth, turn_depth_with_overall
from posttrain_assets_tests.real_data import REAL_DATA

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def chat(turns: int) -> list[dict[str, str]]:
    """A conversation of ``turns`` user/assistant exchanges."""
    out: list[dict[str, str]] = []
    for i in range(turns):
        out += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    return out


def sft_table(conn: duckdb.DuckDBPyConnection, rows: list[dict], name: str = "rows") -> None:
    """A table of SFT rows with the columns turn depth reads (and ``id`` when the rows have one)."""
    fields = [
        ("source", pa.string()),
        ("messages", MESSAGES),
        ("num_messages", pa.int32()),
        ("labels", pa.list_(pa.int32())),
    ]
    schema = pa.schema(([("id", pa.string())] if rows and "id" in rows[0] else []) + fields)
    conn.register("incoming", pa.Table.from_pylist(rows, schema=schema))
    conn.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM incoming")
    conn.unregister("incoming")


M = -100
ROWS = [
    # a: one single-turn row (3 trained tokens), one two-turn row (1 + 3 trained tokens)
    {"source": "a", "messages": chat(1), "num_messages": 2, "labels": [M, M, 5, 6, 7]},
    {"source": "a", "messages": chat(2), "num_messages": 4, "labels": [M, 1, M, 2, 3, 4]},
    # b: four turns truncated to the first two messages -> one turn rendered, 2 trained tokens
    {"source": "b", "messages": chat(4), "num_messages": 2, "labels": [M, 1, 1]},
    # b: nine turns (the "8+" bucket), one trained token per turn
    {"source": "b", "messages": chat(9), "num_messages": 18, "labels": [x for _ in range(9) for x in (M, 9)]},
]


def test_histogram_share_and_tokens_per_turn_by_hand() -> None:
    conn = duckdb.connect()
    sft_table(conn, ROWS)
    depths = turn_depth(conn, "rows")
    a, b = depths["a"], depths["b"]
    assert list(depths) == ["a", "b"]
    assert a.turns_histogram == {"1": 1, "2": 1} and b.turns_histogram == {"1": 1, "8+": 1}
    assert (a.rows, a.multi_turn_rows, a.multi_turn_share, a.mean_turns) == (2, 1, 0.5, 1.5)
    assert (b.rows, b.multi_turn_rows, b.multi_turn_share, b.mean_turns) == (2, 1, 0.5, 5.0)
    # a: 7 trained tokens over 3 trained turns; per row 3.0 and 2.0 -> median 2.5, p90 2.9
    assert a.trained_turns == 3 and a.tokens_per_turn_mean == pytest.approx(7 / 3)
    assert a.tokens_per_turn_p50 == pytest.approx(2.5) and a.tokens_per_turn_p90 == pytest.approx(2.9)
    # b: 2 + 9 tokens over 1 + 9 turns; per row 2.0 and 1.0
    assert b.trained_turns == 10 and b.tokens_per_turn_mean == pytest.approx(1.1)
    assert b.tokens_per_turn_p50 == pytest.approx(1.5)
    (overall,) = turn_depth(conn, "rows", None).values()
    assert (overall.group, overall.rows, overall.multi_turn_share) == ("all", 4, 0.5)
    assert overall.turns_histogram == {"1": 2, "2": 1, "8+": 1}


def test_groups_and_overall_from_one_scan_equal_the_two_calls() -> None:
    """What the check and gold.sft read: the groups and the whole relation in one query, with the very figures of
    two separate calls; a row whose group is NULL is its own group, an empty relation has no group."""
    conn = duckdb.connect()
    sft_table(conn, [*ROWS, {**ROWS[0], "source": None}])
    grouped, overall = turn_depth_with_overall(conn, "rows")
    assert grouped == turn_depth(conn, "rows") and overall == turn_depth(conn, "rows", None)
    assert list(grouped) == ["a", "b", None] and grouped[None].rows == 1
    assert overall["all"].rows == 5 and overall["all"].turns_histogram == {"1": 3, "2": 1, "8+": 1}
    assert overall["all"].trained_turns == 3 + 10 + 1
    assert turn_depth_with_overall(conn, "rows", None) == ({}, overall)
    assert turn_depth_with_overall(conn, "(SELECT * FROM rows WHERE false)") == ({}, {})


def test_rows_without_labels_or_without_trained_labels() -> None:
    """NULL labels give no token figures, empty or untrained labels zero; every row still counts its turns."""
    conn = duckdb.connect()
    rows = [
        {"source": "c", "messages": chat(2), "num_messages": 4, "labels": None},
        {"source": "c", "messages": chat(1), "num_messages": 2, "labels": []},
        {"source": "c", "messages": chat(1), "num_messages": 2, "labels": [M, M]},
        {"source": "c", "messages": chat(2), "num_messages": 4, "labels": [5, M, 6, 6]},  # trained first: 2 turns
    ]
    sft_table(conn, rows)
    (c,) = turn_depth(conn, "rows").values()
    assert (c.rows, c.multi_turn_rows, c.turns_histogram) == (4, 2, {"1": 2, "2": 2})
    assert (c.trained_turns, c.tokens_per_turn_mean, c.tokens_per_turn_p50) == (2, 1.5, 1.5)
    sft_table(conn, rows[:1])
    (only_null,) = turn_depth(conn, "rows").values()
    assert (only_null.rows, only_null.trained_turns, only_null.tokens_per_turn_mean) == (1, None, None)


def test_a_query_with_bound_parameters_and_rows_without_labels() -> None:
    """What a mixture passes: any subquery of SFT rows; without labels there are no token figures."""
    conn = duckdb.connect()
    sft_table(conn, ROWS)
    depths = turn_depth(conn, "(SELECT source, messages FROM rows WHERE source = $s)", params={"s": "b"})
    (b,) = depths.values()
    # without num_messages the truncated row counts all four of its turns
    assert b.turns_histogram == {"4": 1, "8+": 1} and b.multi_turn_share == 1.0
    assert b.trained_turns is None and b.tokens_per_turn_mean is None and b.tokens_per_turn_p90 is None
    assert turn_depth(conn, "(SELECT * FROM rows WHERE false)") == {}
    with pytest.raises(ValueError, match="no column 'domain'"):
        turn_depth(conn, "rows", "domain")


def test_real_sharegpt_conversations_counted_like_python() -> None:
    """FastChat's real ShareGPT sample: the SQL histogram equals a plain count of assistant turns."""
    conversations = json.loads((REAL_DATA / "fastchat" / "dummy_conversation.json").read_text())
    rows = []
    for conv in conversations:
        messages = sharegpt(conv, "sft").messages
        rows.append({"source": "fastchat", "messages": messages, "num_messages": len(messages), "labels": None})
    expected = Counter(min(sum(m["role"] == "assistant" for m in r["messages"]), 8) for r in rows)
    conn = duckdb.connect()
    sft_table(conn, rows)
    (depth,) = turn_depth(conn, "(SELECT source, messages, num_messages FROM rows)").values()
    assert depth.rows == len(rows) == 500
    assert depth.turns_histogram == {str(k): n for k, n in sorted(expected.items())} == {"1": 167, "2": 166, "3": 167}
    assert depth.multi_turn_rows == 333 and depth.multi_turn_share == 333 / 500


def gold_sft_database(path: Path, rows: list[dict]) -> WarehouseResource:
    """A warehouse whose gold.sft holds ``rows`` (only the columns the check reads)."""
    with duckdb.connect(str(path)) as conn:
        conn.execute("CREATE SCHEMA gold")
        sft_table(conn, rows, "gold.sft")
    return WarehouseResource(database=str(path))


def test_turn_depth_check_warns_below_the_floor_and_passes_above(tmp_path: Path) -> None:
    single = [{"source": "s", "messages": chat(1), "num_messages": 2, "labels": [M, 1]} for _ in range(45)]
    multi = [{"source": "m", "messages": chat(3), "num_messages": 6, "labels": [M, 1, M, 1, M, 1]} for _ in range(5)]
    warehouse = gold_sft_database(tmp_path / "w.duckdb", single + multi)
    low = sft_turn_depth_check(config=TurnDepthConfig(), duckdb=warehouse)  # 5 of 50 multi-turn < 0.2
    assert not low.passed and low.severity == dg.AssetCheckSeverity.WARN
    assert low.description == "gold.sft: multi-turn share 0.100 (5 of 50 rows), below the floor 0.2"
    assert low.metadata["multi_turn_share"].value == 0.1
    ok = sft_turn_depth_check(config=TurnDepthConfig(min_multi_turn_share=0.1), duckdb=warehouse)
    assert ok.passed and ok.description.endswith("at or above the floor 0.1")
    small = sft_turn_depth_check(config=TurnDepthConfig(min_rows=51), duckdb=warehouse)
    assert small.passed and small.description.endswith("not judged: fewer than 51 rows")
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as conn:
        recorded = conn.execute(
            "SELECT passed, severity FROM checks.verdicts WHERE check_name = 'sft_turn_depth_check'"
        )
        assert recorded.fetchall() == [(True, "WARN")]  # the latest verdict replaces the earlier ones


def test_floor_judges_only_groups_with_enough_rows() -> None:
    conn = duckdb.connect()
    sft_table(conn, ROWS)
    (overall,) = turn_depth(conn, "rows", None).values()
    assert below_multi_turn_floor(overall, 0.6) and not below_multi_turn_floor(overall, 0.5)
    assert not below_multi_turn_floor(overall, 0.6, min_rows=5)


def test_gold_sft_metadata_has_plottable_figures_per_source_and_overall() -> None:
    from posttrain_assets.defs.gold.sft import turn_depth_metadata

    conn = duckdb.connect()
    sft_table(conn, ROWS)
    metadata = turn_depth_metadata(turn_depth(conn, "rows"), turn_depth(conn, "rows", None))
    assert metadata["turn_depth/a/multi_turn_share"].value == 0.5
    assert metadata["turn_depth/all/rows"].value == 4.0
    assert metadata["turn_depth/b/tokens_per_turn_mean"].value == pytest.approx(1.1)
    assert metadata["turns_histogram"].value == {
        "a": {"1": 1, "2": 1},
        "b": {"1": 1, "8+": 1},
        "all": {"1": 2, "2": 1, "8+": 1},
    }


def test_mixture_turn_depth_check_judges_each_sft_mixture_as_drawn(tmp_path: Path) -> None:
    single = [
        {"id": f"s{i}", "source": "s", "messages": chat(1), "num_messages": 2, "labels": [M, 1]} for i in range(60)
    ]
    multi = [
        {"id": f"m{i}", "source": "m", "messages": chat(3), "num_messages": 6, "labels": [M, 1, M, 1, M, 1]}
        for i in range(60)
    ]
    warehouse = gold_sft_database(tmp_path / "w.duckdb", single + multi)
    # "deep": 30 multi-turn rows drawn twice (epochs 2) and 40 single-turn rows: 60 of 100 drawn rows multi-turn.
    # "flat": 55 single-turn rows and 5 multi-turn ones: 5 of 60. "prefs": a preference mixture, not judged.
    drawn = (
        [("deep", f"m{i}", "m", "sft") for i in range(30) for _ in range(2)]
        + [("deep", f"s{i}", "s", "sft") for i in range(40)]
        + [("flat", f"s{i}", "s", "sft") for i in range(55)]
        + [("flat", f"m{i}", "m", "sft") for i in range(5)]
        + [("prefs", "p0", "p", "preference")]
    )
    with duckdb.connect(warehouse.database) as conn:
        conn.execute(
            "CREATE TABLE gold.mixtures AS SELECT * FROM (VALUES "
            + ", ".join(f"('{m}', '{i}', '{s}', '{r}')" for m, i, s, r in drawn)
            + ") t(mixture, id, source, regime)"
        )
    result = mixture_turn_depth_check(config=TurnDepthConfig(), duckdb=warehouse)
    assert not result.passed and result.severity == dg.AssetCheckSeverity.WARN
    assert result.description == (
        "multi-turn share per SFT mixture: deep 0.600 (100 rows), flat 0.083 (60 rows); below the floor 0.2: flat"
    )
    assert result.metadata["multi_turn_share/deep"].value == 0.6
    assert "multi_turn_share/prefs" not in result.metadata
    # with a floor under both, nothing warns; a mixture smaller than min_rows is not judged
    assert mixture_turn_depth_check(config=TurnDepthConfig(min_multi_turn_share=0.05), duckdb=warehouse).passed
    assert mixture_turn_depth_check(config=TurnDepthConfig(min_rows=61), duckdb=warehouse).passed
    # per mixture and per source within it, as the mixtures asset plots them
    with duckdb.connect(warehouse.database, read_only=True) as conn:
        by_source = turn_depth(conn, MIXTURE_SFT_ROWS, "mixture_source")
    assert {name: (d.rows, d.multi_turn_rows) for name, d in by_source.items()} == {
        "deep/m": (60, 60),
        "deep/s": (40, 0),
        "flat/m": (5, 5),
        "flat/s": (55, 0),
    }
