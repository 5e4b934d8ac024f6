"""Helpers to run the real Dagster graph in tests, against a registry and a DuckDB file under tmp."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
import yaml

from posttrain_assets import pipeline
from posttrain_assets.defs.resources import SourceRegistryResource, TokenizerResource, WarehouseResource
from posttrain_assets.warehouse.io import fetch_dicts
from posttrain_assets_tests.real_data import REAL_DATA

REAL_REGISTRY = f"""
sources:
  - name: fastchat_dummy
    path: {REAL_DATA}/fastchat/dummy_conversation.json
    format: sharegpt
    license: Apache-2.0
    origin: "lm-sys/FastChat@0e6d3e4b:data/dummy_conversation.json"
    kind: human
  - name: alpaca_cleaned
    path: {REAL_DATA}/alpaca/alpaca_data_cleaned_1000.json
    format: alpaca
    license: CC-BY-NC-4.0
    origin: "lm-sys/FastChat@04a1074d:data/alpaca_data_cleaned_1000.json"
    kind: ai
  - name: hh_rlhf_harmless
    path: {REAL_DATA}/hh-rlhf/harmless-base-test.jsonl.gz
    format: hh_rlhf
    license: MIT
    origin: "anthropics/hh-rlhf@354e5c3c:harmless-base/test.jsonl.gz"
    kind: human
  - name: gsm8k_train
    path: {REAL_DATA}/gsm8k/train.jsonl
    format: gsm8k
    license: MIT
    origin: "openai/grade-school-math@3101c7d5:grade_school_math/data/train.jsonl"
    kind: human
  - name: gsm8k_test
    path: {REAL_DATA}/gsm8k/test.jsonl
    format: gsm8k
    license: MIT
    origin: "openai/grade-school-math@3101c7d5:grade_school_math/data/test.jsonl"
    kind: human
    role: eval
"""


@dataclass
class Graph:
    """One deployment of the platform under tmp: registry, DuckDB file, Dagster instance, definitions."""

    registry: Path
    database: Path
    cache_dir: Path
    instance: dg.DagsterInstance
    definitions: dg.Definitions

    def run_all(self) -> None:
        pipeline.run_all(self.instance, self.definitions)

    def refresh(self, run_config: dict | None = None) -> dg.ExecuteInProcessResult:
        """Run silver + gold once more; a failing blocking check does not raise, it shows in the result."""
        return self.definitions.resolve_job_def("refresh_corpus").execute_in_process(
            instance=self.instance, raise_on_error=False, run_config=run_config or {}
        )

    def query(self, sql: str, params: Any = None) -> list[tuple]:
        with duckdb.connect(str(self.database), read_only=True) as conn:
            return conn.execute(sql, params).fetchall() if params is not None else conn.execute(sql).fetchall()

    def dicts(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        with duckdb.connect(str(self.database), read_only=True) as conn:
            return fetch_dicts(conn, sql, params)

    def duckdb_resource(self) -> WarehouseResource:
        return WarehouseResource(database=str(self.database))

    def registry_resource(self) -> SourceRegistryResource:
        return SourceRegistryResource(path=str(self.registry))

    def tokenizer_resource(self) -> TokenizerResource:
        return TokenizerResource(spec="smollm2", cache_dir=str(self.cache_dir))


# The project's instance policy (dagster.yaml) minus its storage location, which tests put under tmp.
INSTANCE_POLICY = {
    k: v
    for k, v in yaml.safe_load((Path(__file__).resolve().parents[1] / "dagster.yaml").read_text()).items()
    if k != "storage"
}


@contextmanager
def deployed(registry: Path, workdir: Path, cache_dir: Path) -> Iterator[Graph]:
    """Point the environment at ``registry`` and a fresh DuckDB file, with a throw-away Dagster instance."""
    database = workdir / "warehouse.duckdb"
    (workdir / "dagster_home").mkdir(parents=True, exist_ok=True)
    home = str(workdir / "dagster_home")
    with pytest.MonkeyPatch.context() as env, dg.instance_for_test(temp_dir=home, overrides=INSTANCE_POLICY) as inst:
        env.setenv("POSTTRAIN_SOURCES", str(registry))
        env.setenv("POSTTRAIN_DUCKDB_PATH", str(database))
        env.setenv("POSTTRAIN_TOKENIZER", "smollm2")
        env.setenv("POSTTRAIN_CACHE_DIR", str(cache_dir))
        yield Graph(registry, database, cache_dir, inst, pipeline.load_definitions())


def copy_database(graph: Graph, workdir: Path) -> Path:
    """A private copy of a graph's DuckDB file, for tests that break things."""
    target = workdir / "copy.duckdb"
    shutil.copy(graph.database, target)
    return target
