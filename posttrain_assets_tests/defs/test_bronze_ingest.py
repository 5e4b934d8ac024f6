"""bronze_records: a source whose landing files are unchanged since its last ingest is not read again."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from posttrain_assets.defs.bronze import bronze_records
from posttrain_assets.defs.resources import SourceRegistryResource, WarehouseResource


def chat(n: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"}]})


def test_unchanged_files_are_not_read_again_and_a_changed_file_or_full_rebuild_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    landing = tmp_path / "chats.jsonl"
    landing.write_text("".join(chat(n) + "\n" for n in range(3)))
    registry = tmp_path / "sources.yaml"
    registry.write_text(
        "sources:\n  - name: chats\n    path: chats.jsonl\n    format: messages\n    license: MIT\n"
        "    origin: test\n    kind: human\n"
    )
    database = tmp_path / "warehouse.duckdb"
    resources = {
        "duckdb": WarehouseResource(database=str(database)),
        "registry": SourceRegistryResource(path=str(registry)),
    }
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("source", ["chats"])

        def ingest() -> tuple[dict[str, int], str | None, list[tuple]]:
            result = dg.materialize([bronze_records], partition_key="chats", instance=instance, resources=resources)
            (event,) = result.get_asset_materialization_events()
            materialization = event.event_specific_data.materialization
            counts = {k: v.value for k, v in materialization.metadata.items() if k.startswith("rows_")}
            with duckdb.connect(str(database), read_only=True) as conn:
                rows = conn.execute("SELECT row_number, run_id FROM bronze.records ORDER BY 1").fetchall()
            return counts, result.run_id, rows

        first, first_run, rows = ingest()
        assert first == {"rows_computed/bronze_ingest": 3, "rows_reused/bronze_ingest": 0}
        assert {r[1] for r in rows} == {first_run}

        again, _, rows = ingest()
        assert again == {"rows_computed/bronze_ingest": 0, "rows_reused/bronze_ingest": 3}
        assert {r[1] for r in rows} == {first_run}  # the first run's rows stay

        with landing.open("a") as f:
            f.write(chat(3) + "\n")
        changed, changed_run, rows = ingest()
        assert changed == {"rows_computed/bronze_ingest": 4, "rows_reused/bronze_ingest": 0}
        assert rows == [(n, changed_run) for n in range(4)]

        monkeypatch.setenv("POSTTRAIN_FULL_REBUILD", "1")
        forced, forced_run, rows = ingest()
        assert forced == {"rows_computed/bronze_ingest": 4, "rows_reused/bronze_ingest": 0}
        assert {r[1] for r in rows} == {forced_run}
