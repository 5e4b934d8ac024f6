"""checks.verdicts: one row per check holding its latest verdict, read back in a stable order."""

import datetime as dt

import duckdb

from posttrain_assets.warehouse.verdicts import latest_verdicts, record_verdict

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_no_table_yet_means_no_verdicts() -> None:
    assert latest_verdicts(duckdb.connect()) == []


def test_a_later_verdict_replaces_the_earlier_one_of_the_same_check() -> None:
    conn = duckdb.connect()
    common = {"severity": "ERROR", "evaluated_at": T0}
    record_verdict(conn, asset="silver/records", check_name="schema", passed=True, description="ok", **common)
    record_verdict(conn, asset="gold/sft", check_name="schema", passed=True, description=None, **common)
    record_verdict(conn, asset="silver/records", check_name="schema", passed=False, description="2 nulls", **common)
    assert latest_verdicts(conn) == [
        {"name": "schema", "asset": "gold/sft", "passed": True, "description": ""},
        {"name": "schema", "asset": "silver/records", "passed": False, "description": "2 nulls"},
    ]
    assert conn.execute("SELECT count(*) FROM checks.verdicts").fetchone() == (2,)
