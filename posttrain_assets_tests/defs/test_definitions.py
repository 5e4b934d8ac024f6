"""The code location loads the way `make dev` loads it (the `dagster` CLI in the project root, reading
`[tool.dg]` from pyproject.toml): every job's default config is valid."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from posttrain_assets.pipeline import load_definitions

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # the dagster CLI loads the whole code location in a fresh interpreter: 4-10 s
def test_dagster_validates_the_code_location(tmp_path: Path, tokenizer_cache_dir: Path) -> None:
    env = {
        **os.environ,
        "POSTTRAIN_SOURCES": str(tmp_path / "sources.yaml"),
        "POSTTRAIN_DUCKDB_PATH": str(tmp_path / "warehouse.duckdb"),
        "POSTTRAIN_TOKENIZER": "smollm2",
        "POSTTRAIN_CACHE_DIR": str(tokenizer_cache_dir),
        "DAGSTER_HOME": str(tmp_path),
    }
    (tmp_path / "dagster.yaml").write_text((PROJECT_ROOT / "dagster.yaml").read_text())
    dagster = Path(sys.executable).with_name("dagster")
    result = subprocess.run(
        [str(dagster), "definitions", "validate"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All code locations passed validation" in result.stdout + result.stderr


def test_jobs_sensors_and_schedules_are_registered() -> None:
    # Loaded inside a live instance, as the webserver and the daemon load them: the definitions' state storage is
    # that instance's (outside one, a storage left current by an earlier test's instance can be found dead).
    with dg.instance_for_test():
        defs = load_definitions()
        jobs = {
            name: defs.resolve_job_def(name)
            for name in ("ingest_source", "refresh_corpus", "publish", "estimate_rl_difficulty")
        }
        assert {k.to_user_string() for k in jobs["publish"].asset_layer.executable_asset_keys} == {
            "gold/trace",
            "exports/trainer_files",
        }
        assert "bronze/records" not in {
            k.to_user_string() for k in jobs["refresh_corpus"].asset_layer.executable_asset_keys
        }
        assert defs.resolve_sensor_def("landing_files_sensor").default_status.value == "RUNNING"
        assert defs.resolve_sensor_def("dead_run_sensor").default_status.value == "RUNNING"
        # Every job, and the asset job the automation and the launchpad run, executes in its run worker by default.
        for job in [*jobs.values(), defs.resolve_implicit_global_asset_job_def()]:
            assert job.executor_def.config_schema.default_value == {"in_process": {}}, job.name
        assert defs.resolve_schedule_def("daily_refresh_schedule").cron_schedule == "0 3 * * *"
