"""rl_certification_check on hand-built tables: a seed without a certificate, with a failed one or certified by an
older verifier version fails the check, in id order; a bank certified by the versions in use passes."""

from pathlib import Path

import duckdb

from posttrain_assets.defs.checks.rl import rl_certification_check
from posttrain_assets.defs.resources import WarehouseResource
from posttrain_assets.rl.verifiers import VERIFIER_VERSIONS
from posttrain_assets.warehouse.catalogue import GOLD_RL_PROMPTS, SILVER_RL_CERTIFICATION

NUMERIC = VERIFIER_VERSIONS["numeric"]
EXACT = VERIFIER_VERSIONS["exact_match"]


def warehouse(path: Path, gold: list[tuple], certificates: list[tuple]) -> WarehouseResource:
    """gold.rl_prompts ``(id, verifier, verifier_version)`` and silver.rl_certification ``(id, certified,
    reason)``, with every declared column of both tables (the others null: only these are read)."""
    with duckdb.connect(str(path)) as conn:
        for table in (GOLD_RL_PROMPTS, SILVER_RL_CERTIFICATION):
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {table.schema}")
            conn.execute(f"CREATE TABLE {table.qualified} ({', '.join(f'{c.name} {c.type}' for c in table.columns)})")
        conn.executemany("INSERT INTO gold.rl_prompts (id, verifier, verifier_version) VALUES (?, ?, ?)", gold)
        conn.executemany("INSERT INTO silver.rl_certification (id, certified, reason) VALUES (?, ?, ?)", certificates)
    return WarehouseResource(database=str(path))


def test_uncertified_failed_and_stale_seeds_fail_the_check(tmp_path: Path) -> None:
    gold = [
        ("e", "numeric", NUMERIC),  # no certificate
        ("a", "numeric", NUMERIC),
        ("d", "exact_match", "0-old"),  # certified by an older version
        ("c", "numeric", NUMERIC),  # certification failed
        ("b", "exact_match", EXACT),
        ("f", "no_such_verifier", "1"),  # a verifier not in use: no current version
    ]
    certificates = [
        ("a", True, None),
        ("b", True, None),
        ("c", False, "gold_rejected"),
        ("d", True, None),
        ("f", True, None),
        ("q", False, "perturbed_accepted"),  # quarantined in silver, not in gold
    ]
    result = rl_certification_check(duckdb=warehouse(tmp_path / "w.duckdb", gold, certificates))
    assert not result.passed
    assert result.description == (
        f"4 seed(s) not certified by the current verifier: c (numeric {NUMERIC}: gold_rejected); "
        "d (exact_match 0-old: stale version); e (numeric " + NUMERIC + ": stale version)"
    )
    assert result.metadata["certified_seeds"].value == 2
    assert result.metadata["quarantined_in_silver"].value == {"gold_rejected": 1, "perturbed_accepted": 1}


def test_a_bank_certified_by_the_versions_in_use_passes(tmp_path: Path) -> None:
    gold = [("a", "numeric", NUMERIC), ("b", "exact_match", EXACT)]
    result = rl_certification_check(
        duckdb=warehouse(tmp_path / "w.duckdb", gold, [("a", True, None), ("b", True, None)])
    )
    assert result.passed and result.description == "2 seeds certified"
    assert result.metadata["certified_seeds"].value == 2
