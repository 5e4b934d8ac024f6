"""schema_violations: declared types, required fields (blank strings and empty lists count as missing, per regime),
unique ids; and the schema check's verdict on a corrupted gold table."""

from pathlib import Path

import duckdb

from posttrain_assets.defs.checks.schema import schema_check_result
from posttrain_assets.defs.resources import WarehouseResource
from posttrain_assets.warehouse.model import Column, Table
from posttrain_assets.warehouse.validation import Violation, schema_violations

ROWS = Table(
    "silver",
    "rows",
    "a small table with each kind of required column",
    (
        Column("id", "VARCHAR", "row id"),
        Column("regime", "VARCHAR", "sft or rl"),
        Column("prompt", "VARCHAR", "required of every row"),
        Column("tags", "VARCHAR[]", "required of every row"),
        Column("origin", "STRUCT(source VARCHAR)", "required of every row"),
        Column("answer", "VARCHAR", "required of rl rows"),
    ),
)
REQUIRED = ("id", "prompt", "tags", "origin")
BY_REGIME = {"rl": ("answer",), "sft": ()}
GOOD = ("prompt text", ["t"], {"source": "s"}, None)


def table_with(conn: duckdb.DuckDBPyConnection, rows: list[tuple]) -> None:
    conn.execute("CREATE SCHEMA IF NOT EXISTS silver")
    conn.execute(ROWS.create_sql(replace=True))
    conn.executemany(f"INSERT INTO {ROWS.qualified} VALUES (?, ?, ?, ?, ?, ?)", rows)


def test_a_sound_table_has_no_violation() -> None:
    conn = duckdb.connect()
    # an sft row needs no answer; text around or inside a value is not blank
    table_with(conn, [("a", "sft", *GOOD), ("b", "rl", " x ", ["t"], {"source": "s"}, "\u3000 42")])
    assert schema_violations(conn, ROWS, REQUIRED, BY_REGIME) == []


def test_each_broken_rule_counted_with_its_first_ids() -> None:
    conn = duckdb.connect()
    blank_prompts = ["", " ", "   ", "\u3000", "\u00a0 \u2003", None, "  ", " "]  # eight blank (or null) prompts
    rows = [(f"p{i}", "sft", p, ["t"], {"source": "s"}, None) for i, p in enumerate(blank_prompts)]
    rows += [
        ("e1", "sft", "q", [], {"source": "s"}, None),  # empty list
        ("e2", "sft", "q", None, None, None),  # null list and null struct
        ("r1", "rl", *GOOD[:3], " "),  # rl row with a blank answer
        ("r2", "rl", *GOOD[:3], "7"),
        ("s1", "sft", *GOOD[:3], " "),  # an sft row's answer is not required
        ("d", "sft", *GOOD),
        ("d", "sft", *GOOD),
        ("\t", "sft", *GOOD),  # a tab is not what trim removes: an id, though an odd one
    ]
    table_with(conn, rows)
    assert schema_violations(conn, ROWS, REQUIRED, BY_REGIME) == [
        Violation("required field prompt is null or empty", 8, ("p0", "p1", "p2", "p3", "p4")),
        Violation("required field tags is null or empty", 2, ("e1", "e2")),
        Violation("required field origin is null or empty", 1, ("e2",)),
        Violation("rl rows: required field answer is null or empty", 1, ("r1",)),
        Violation("id is not unique", 1, ("d",)),
    ]


def test_types_are_checked_before_the_rows() -> None:
    conn = duckdb.connect()
    conn.execute("CREATE SCHEMA silver")
    conn.execute("CREATE TABLE silver.rows (id VARCHAR, regime VARCHAR, prompt INTEGER, tags VARCHAR[], extra INT)")
    assert [str(v) for v in schema_violations(conn, ROWS, REQUIRED, BY_REGIME)] == [
        "column prompt has type INTEGER, expected VARCHAR: 0 row(s)",
        "column origin is missing: 0 row(s)",
        "column answer is missing: 0 row(s)",
        "unexpected column extra: 0 row(s)",
    ]


def test_schema_check_fails_on_a_blank_required_field(tmp_path: Path) -> None:
    database = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(database)) as conn:
        table_with(conn, [("a", "rl", *GOOD[:3], "1"), ("b", "rl", " ", ["t"], {"source": "s"}, "2")])
    result = schema_check_result(WarehouseResource(database=str(database)), ROWS, REQUIRED, BY_REGIME)
    assert not result.passed
    assert result.description == "silver.rows: required field prompt is null or empty: 1 row(s) (e.g. b)"
    assert result.metadata["violations"].value == 1
    with duckdb.connect(str(database)) as conn:
        conn.execute("UPDATE silver.rows SET prompt = 'fixed' WHERE id = 'b'")
    result = schema_check_result(WarehouseResource(database=str(database)), ROWS, REQUIRED, BY_REGIME)
    assert result.passed and result.description == "silver.rows: schema and required fields hold"
