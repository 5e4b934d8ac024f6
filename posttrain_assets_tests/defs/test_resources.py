"""The warehouse resource releases the database file when the step using it fails."""

from pathlib import Path

import duckdb
import pytest

from posttrain_assets.defs.resources import WarehouseResource


def test_a_failing_step_leaves_the_warehouse_openable_read_only(tmp_path: Path) -> None:
    database = tmp_path / "warehouse.duckdb"
    warehouse = WarehouseResource(database=str(database), connection_config={"memory_limit": "256MB"})

    with pytest.raises(RuntimeError, match="planted") as failure, warehouse.get_connection() as conn:
        conn.execute("CREATE TABLE written_before_the_failure AS SELECT 7 AS x")
        raise RuntimeError("planted failure inside the step")

    # The traceback (kept alive here, as Dagster's failure handling and the benchmark's report do) still
    # references the step's frames; the connection must be closed all the same, or this read-only open fails
    # with "different configuration than existing connections".
    assert failure.value.__traceback__ is not None
    with duckdb.connect(str(database), read_only=True) as reader:
        assert reader.execute("SELECT x FROM written_before_the_failure").fetchall() == [(7,)]


def test_a_successful_step_closes_its_connection(tmp_path: Path) -> None:
    database = tmp_path / "warehouse.duckdb"
    warehouse = WarehouseResource(database=str(database))
    with warehouse.get_connection() as conn:
        conn.execute("CREATE TABLE t AS SELECT 1 AS x")
    with pytest.raises(duckdb.ConnectionException, match="closed"):
        conn.execute("SELECT 1")
