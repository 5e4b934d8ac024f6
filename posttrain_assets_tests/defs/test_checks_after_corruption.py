"""Each warehouse check passes on a sound warehouse and fails when that same warehouse is corrupted after the pass.

The corruption is made after a passing evaluation, in place (an UPDATE, an INSERT or a DELETE, as someone outside
the pipeline would make it), so a verdict kept from the first evaluation cannot hide it: the second evaluation must
see the corrupted rows, and ``checks.verdicts`` (what the dataset cards read) must say so. The checks are called as
Dagster calls them (direct invocation of the asset checks), which also records their verdicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from posttrain_assets.defs.checks.accounting import bronze_accounting_check
from posttrain_assets.defs.checks.provenance import provenance_audit_check
from posttrain_assets.defs.checks.rl import rl_certification_check, rl_difficulty_band_check
from posttrain_assets.defs.checks.schema import gold_rl_prompts_schema_check, silver_records_schema_check
from posttrain_assets.defs.checks.turn_depth import TurnDepthConfig, sft_turn_depth_check
from posttrain_assets.defs.resources import SourceRegistryResource, WarehouseResource
from posttrain_assets.ingest.registry import render_registry
from posttrain_assets.publish.trace import create_trace_view
from posttrain_assets.rl.verifiers import VERIFIER_VERSIONS
from posttrain_assets.warehouse.catalogue import (
    GOLD_RL_PROMPTS,
    SILVER_RECORDS,
    SILVER_RL_CERTIFICATION,
    SILVER_RL_DIFFICULTY,
)
from posttrain_assets.warehouse.model import Table
from posttrain_assets.warehouse.verdicts import latest_verdicts

NUMERIC = VERIFIER_VERSIONS["numeric"]
_NO_TOOLS = "'reasoning_content': NULL, 'tool_calls': NULL, 'tool_call_id': NULL, 'name': NULL"
MESSAGES = f"[{{'role': 'user', 'content': 'q', {_NO_TOOLS}}}, {{'role': 'assistant', 'content': 'a', {_NO_TOOLS}}}]"


def origin(row: int) -> str:
    return (
        f"{{'source': 's', 'uri': 'hf://s', 'file': 'a.jsonl', 'row': {row}, 'record_sha256': 'r', 'file_sha256': 'f'}}"
    )


def insert_record(conn: duckdb.DuckDBPyConnection, table: Table, record_id: str, regime: str, row: int) -> None:
    """A sound row of a record-shaped ``table`` (silver.records, gold.rl_prompts): every column it has of the
    required ones filled, the regime's own fields too; the other columns null or false."""
    values = {
        "id": f"'{record_id}'",
        "source": "'s'",
        "regime": f"'{regime}'",
        "messages": MESSAGES,
        "prompt": "'q'",
        "response": "'a'" if regime == "sft" else None,
        "chosen": "'a'" if regime == "preference" else None,
        "rejected": "'b'" if regime == "preference" else None,
        "answer": "'42'" if regime == "rl" else None,
        "verifier": "'numeric'" if regime == "rl" else None,
        "verifier_version": f"'{NUMERIC}'",
        "difficulty_estimated": "false",
        "license": "'MIT'",
        "origin": origin(row),
        "created_at": "TIMESTAMPTZ '2024-01-01 00:00:00+00'",
        "source_kind": "'human'",
    }
    chosen = {name: sql for name, sql in values.items() if sql is not None and name in table.column_names}
    conn.execute(
        f"INSERT INTO {table.qualified} BY NAME SELECT {', '.join(f'{sql} AS {name}' for name, sql in chosen.items())}"
    )


def create(conn: duckdb.DuckDBPyConnection, *tables: Table) -> None:
    for table in tables:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {table.schema}")
        conn.execute(table.create_sql())


def create_loose(conn: duckdb.DuckDBPyConnection, table: Table) -> None:
    """``table``'s columns without their NOT NULL: the check reads only some of them, the test fills only those."""
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {table.schema}")
    conn.execute(f"CREATE TABLE {table.qualified} ({', '.join(f'{c.name} {c.type}' for c in table.columns)})")


@dataclass(frozen=True)
class Case:
    """A check (name, how it is called), a sound warehouse for it, a corruption and the failing description."""

    name: str
    build: Callable[[duckdb.DuckDBPyConnection, Path], None]
    evaluate: Callable[[WarehouseResource, Path], dg.AssetCheckResult]
    corrupt: str
    failing: str


def build_silver_records(conn: duckdb.DuckDBPyConnection, _: Path) -> None:
    create(conn, SILVER_RECORDS)
    for i, regime in enumerate(("sft", "preference", "rl")):
        insert_record(conn, SILVER_RECORDS, f"{regime[0]}1", regime, i)


def build_gold_rl_prompts(conn: duckdb.DuckDBPyConnection, _: Path) -> None:
    create(conn, GOLD_RL_PROMPTS)
    insert_record(conn, GOLD_RL_PROMPTS, "a", "rl", 0)
    insert_record(conn, GOLD_RL_PROMPTS, "b", "rl", 1)


def build_accounting(conn: duckdb.DuckDBPyConnection, folder: Path) -> None:
    """Source s: bronze rows 0..3 of a.jsonl; row 0 in silver, 1 in eval, 2 quarantined, 3 an exact duplicate."""
    (folder / "sources.yaml").write_text(
        render_registry(
            [
                {
                    "name": "s",
                    "path": "a.jsonl",
                    "format": "messages",
                    "license": "MIT",
                    "origin": "hf://s",
                    "kind": "human",
                }
            ]
        )
    )
    for schema in ("bronze", "silver"):
        conn.execute(f"CREATE SCHEMA {schema}")
    conn.execute(
        "CREATE TABLE bronze.records AS SELECT 's' AS source, 'a.jsonl' AS file_path, range AS row_number FROM range(4)"
    )
    struct = "{'source': 's', 'file': 'a.jsonl', 'row': %d}"
    conn.execute(f"CREATE TABLE silver.records AS SELECT 's' AS source, {struct % 0} AS origin")
    conn.execute(f"CREATE TABLE silver.eval_records AS SELECT 's' AS source, {struct % 1} AS origin")
    for table, row in (("quarantine", 2), ("dedup_clusters", 3)):
        conn.execute(
            f"CREATE TABLE silver.{table} AS SELECT 's' AS source, 'a.jsonl' AS file_path, {row} AS row_number"
        )


def build_provenance(conn: duckdb.DuckDBPyConnection, _: Path) -> None:
    """gold.sft rows g1, g2 of source s at bronze rows 1, 2 (record sha r, file sha f), both in silver.records."""
    for schema in ("bronze", "silver", "gold"):
        conn.execute(f"CREATE SCHEMA {schema}")
    conn.execute(
        "CREATE TABLE bronze.records AS SELECT 's' AS source, 'a.jsonl' AS file_path, range AS row_number, "
        "'f' AS file_sha256, 'r' AS record_sha256 FROM range(1, 3)"
    )
    conn.execute("CREATE TABLE silver.records AS SELECT 'g' || range AS id, 'sft' AS regime FROM range(1, 3)")
    conn.execute(
        "CREATE TABLE silver.dedup_clusters (kept_id VARCHAR, member_id VARCHAR, source VARCHAR, file_path VARCHAR, "
        "row_number BIGINT, record_sha256 VARCHAR, method VARCHAR, similarity DOUBLE)"
    )
    conn.execute(
        f"CREATE TABLE gold.sft AS SELECT 'g1' AS id, 's' AS source, 'MIT' AS license, {origin(1)} AS origin "
        f"UNION ALL SELECT 'g2', 's', 'MIT', {origin(2)}"
    )
    create_trace_view(conn)


def build_rl_certification(conn: duckdb.DuckDBPyConnection, _: Path) -> None:
    create(conn, GOLD_RL_PROMPTS)
    create_loose(conn, SILVER_RL_CERTIFICATION)
    for i, seed in enumerate("ab"):
        insert_record(conn, GOLD_RL_PROMPTS, seed, "rl", i)
        conn.execute("INSERT INTO silver.rl_certification (id, certified) VALUES (?, true)", [seed])


def build_rl_difficulty(conn: duckdb.DuckDBPyConnection, _: Path) -> None:
    """Seeds a and b estimated at pass rate 0.5 and in gold; silver.records gives their domain."""
    create(conn, GOLD_RL_PROMPTS)
    create_loose(conn, SILVER_RL_DIFFICULTY)
    conn.execute("CREATE TABLE silver.records (id VARCHAR, domain VARCHAR)")
    for i, seed in enumerate("ab"):
        insert_record(conn, GOLD_RL_PROMPTS, seed, "rl", i)
        conn.execute("INSERT INTO silver.records VALUES (?, 'math')", [seed])
        conn.execute(
            "INSERT INTO silver.rl_difficulty (id, lineage, model, model_sha256, sampling, verifier, verifier_version, "
            "k, passes, pass_rate, difficulty) VALUES (?, 'l', 'm', 'h', '{}', 'numeric', ?, 4, 2, 0.5, 0.5)",
            [seed, NUMERIC],
        )
    conn.execute(
        "UPDATE gold.rl_prompts SET difficulty_estimated = true, pass_rate = 0.5, difficulty = 0.5, difficulty_k = 4"
    )


def build_turn_depth(conn: duckdb.DuckDBPyConnection, _: Path) -> None:
    """50 SFT conversations of source s, 20 of them with two assistant turns: share 0.4, above the floor 0.2."""
    conn.execute("CREATE SCHEMA gold")
    conn.execute(
        "CREATE TABLE gold.sft (id VARCHAR, source VARCHAR, messages STRUCT(role VARCHAR, content VARCHAR)[], "
        "num_messages INTEGER, labels INTEGER[])"
    )
    one = "[{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]"
    two = (
        "[{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}, {'role': 'user', 'content': 'q'}, "
        "{'role': 'assistant', 'content': 'a'}]"
    )
    conn.execute(
        f"INSERT INTO gold.sft SELECT 'r' || range, 's', CASE WHEN range < 20 THEN {two} ELSE {one} END, "
        "CASE WHEN range < 20 THEN 4 ELSE 2 END, "
        "CASE WHEN range < 20 THEN [-100, 7, -100, 7] ELSE [-100, 7] END FROM range(50)"
    )


def registry(folder: Path) -> SourceRegistryResource:
    return SourceRegistryResource(path=str(folder / "sources.yaml"))


CASES = [
    Case(
        "silver_records_schema_check",
        build_silver_records,
        lambda warehouse, _: silver_records_schema_check(duckdb=warehouse),
        "UPDATE silver.records SET answer = ' ' WHERE regime = 'rl'",
        "silver.records: rl rows: required field answer is null or empty: 1 row(s) (e.g. r1)",
    ),
    Case(
        "gold_rl_prompts_schema_check",
        build_gold_rl_prompts,
        lambda warehouse, _: gold_rl_prompts_schema_check(duckdb=warehouse),
        "INSERT INTO gold.rl_prompts SELECT * FROM gold.rl_prompts WHERE id = 'b'",
        "gold.rl_prompts: id is not unique: 1 row(s) (e.g. b)",
    ),
    Case(
        "bronze_accounting_check",
        build_accounting,
        lambda warehouse, folder: bronze_accounting_check(duckdb=warehouse, registry=registry(folder)),
        "DELETE FROM silver.quarantine",
        "s: 1 bronze row(s) missing, 0 placed twice",
    ),
    Case(
        "provenance_audit_check",
        build_provenance,
        lambda warehouse, _: provenance_audit_check(duckdb=warehouse),
        "UPDATE gold.sft SET license = ' ' WHERE id = 'g2'",
        "1 provenance problem(s): gold.sft g2: source s has no license",
    ),
    Case(
        "rl_certification_check",
        build_rl_certification,
        lambda warehouse, _: rl_certification_check(duckdb=warehouse),
        "UPDATE silver.rl_certification SET certified = false, reason = 'gold_rejected' WHERE id = 'b'",
        f"1 seed(s) not certified by the current verifier: b (numeric {NUMERIC}: gold_rejected)",
    ),
    Case(
        "rl_difficulty_band_check",
        build_rl_difficulty,
        lambda warehouse, _: rl_difficulty_band_check(duckdb=warehouse),
        "UPDATE gold.rl_prompts SET pass_rate = 1.0, difficulty = 0.0 WHERE id = 'a'",
        "1 seed(s) in gold that the policy always or never solves; 0 estimated seed(s) outside the band left out of "
        "gold; 0 seed(s) not estimated yet",
    ),
    Case(
        "sft_turn_depth_check",
        build_turn_depth,
        lambda warehouse, _: sft_turn_depth_check(config=TurnDepthConfig(), duckdb=warehouse),
        # 12 of the 20 two-turn conversations cut to their first turn: 8 of 50 multi-turn (0.16 < 0.2)
        "UPDATE gold.sft SET messages = messages[1:2], num_messages = 2, labels = [-100, 7] "
        "WHERE num_messages = 4 AND id NOT IN ('r0', 'r1', 'r2', 'r3', 'r4', 'r5', 'r6', 'r7')",
        "gold.sft: multi-turn share 0.160 (8 of 50 rows), below the floor 0.2",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_corruption_after_a_passing_check_fails_the_next_evaluation(tmp_path: Path, case: Case) -> None:
    database = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(database)) as conn:
        case.build(conn, tmp_path)
    warehouse = WarehouseResource(database=str(database))

    sound = case.evaluate(warehouse, tmp_path)
    assert sound.passed, sound.description
    with duckdb.connect(str(database)) as conn:
        (verdict,) = [v for v in latest_verdicts(conn) if v["name"] == case.name]
        assert verdict["passed"] and verdict["description"] == sound.description
        conn.execute(case.corrupt)

    corrupted = case.evaluate(warehouse, tmp_path)
    assert not corrupted.passed
    assert corrupted.description == case.failing
    with duckdb.connect(str(database)) as conn:
        (verdict,) = [v for v in latest_verdicts(conn) if v["name"] == case.name]
    assert (verdict["passed"], verdict["description"]) == (False, case.failing)
