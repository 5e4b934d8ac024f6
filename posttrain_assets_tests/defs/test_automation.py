"""Automation: the landing-file sensor, the daily schedule, automation conditions, and parallel runs."""

import datetime
import json
import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from posttrain_assets import pipeline, runs
from posttrain_assets.defs.automation.sensors import daily_refresh_schedule, landing_files_sensor
from posttrain_assets.defs.resources import SourceRegistryResource
from posttrain_assets_tests.graph import Graph, deployed
from posttrain_assets_tests.real_data import REAL_DATA

REGISTRY = """
sources:
  - name: chats
    path: chats/*.jsonl
    format: messages
    license: Apache-2.0
    origin: "test fixture"
    kind: synthetic
  - name: math
    path: math.jsonl
    format: gsm8k
    license: MIT
    origin: "openai/grade-school-math@3101c7d5 (first 40 rows of train)"
    kind: human
"""


def chat_line(i: int) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        }
    )


@pytest.fixture
def landing(tmp_path: Path) -> Path:
    root = tmp_path / "landing"
    (root / "chats").mkdir(parents=True)
    (root / "chats" / "part-0.jsonl").write_text("\n".join(chat_line(i) for i in range(10)) + "\n")
    lines = (REAL_DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[:40]
    (root / "math.jsonl").write_text("\n".join(lines) + "\n")
    (root / "sources.yaml").write_text(REGISTRY)
    return root


def evaluate(instance: dg.DagsterInstance, registry: Path, cursor: str | None) -> dg.SensorResult:
    # Opened as a context manager, as Dagster asks: a context that opens an instance from the ref sets the current
    # defs-state storage to it and resets it only on exit; left open, the next test's definitions would load
    # against that instance once it is collected ("undefined DagsterInstance weakref").
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"registry": SourceRegistryResource(path=str(registry))}
    ) as context:
        return landing_files_sensor(context)


def test_sensor_requests_new_and_changed_sources_only(landing: Path) -> None:
    registry = landing / "sources.yaml"
    with dg.instance_for_test() as instance:
        first = evaluate(instance, registry, None)
        assert [r.partition_key for r in first.run_requests] == ["chats", "math"]
        (add,) = first.dynamic_partitions_requests
        assert add.partition_keys == ["chats", "math"]
        instance.add_dynamic_partitions("source", add.partition_keys)

        quiet = evaluate(instance, registry, first.cursor)
        assert quiet.run_requests == [] and quiet.skip_reason.skip_message == "no landing file changed"

        # A new file in a globbed folder re-ingests that source, and only that source.
        (landing / "chats" / "part-1.jsonl").write_text(chat_line(99) + "\n")
        new_file = evaluate(instance, registry, quiet.cursor)
        assert [r.partition_key for r in new_file.run_requests] == ["chats"]

        # Same bytes rewritten: the content hash is unchanged, so nothing is requested.
        content = (landing / "math.jsonl").read_bytes()
        (landing / "math.jsonl").write_bytes(content)
        assert evaluate(instance, registry, new_file.cursor).run_requests == []

        (landing / "math.jsonl").write_bytes(content + content.splitlines(keepends=True)[0])
        changed = evaluate(instance, registry, new_file.cursor)
        assert [r.partition_key for r in changed.run_requests] == ["math"]
        assert changed.run_requests[0].run_key.startswith("math:")

        # A source removed from the registry loses its partition.
        registry.write_text(REGISTRY.split("  - name: math")[0])
        removed = evaluate(instance, registry, changed.cursor)
        (delete,) = removed.dynamic_partitions_requests
        assert isinstance(delete, dg.DeleteDynamicPartitionsRequest) and delete.partition_keys == ["math"]


def test_daily_schedule_reingests_every_known_source(landing: Path) -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("source", ["chats", "math"])
        with dg.build_schedule_context(  # a context manager: see evaluate
            instance=instance,
            scheduled_execution_time=datetime.datetime(2026, 11, 25, 3, 0),
            resources={"registry": SourceRegistryResource(path=str(landing / "sources.yaml"))},
        ) as context:
            requests = daily_refresh_schedule(context)
        assert [(r.partition_key, r.run_key) for r in requests] == [
            ("chats", "daily:2026-11-25:chats"),
            ("math", "daily:2026-11-25:math"),
        ]


def _launch_requested(graph: Graph, evaluation: dg.EvaluateAutomationConditionsResult) -> set[dg.AssetKey]:
    """Do what the daemon does with an automation evaluation: run the requested assets (and their checks)."""
    all_keys = graph.definitions.resolve_asset_graph().get_all_asset_keys()
    keys = {key for key in all_keys if evaluation.get_num_requested(key)}
    if keys:
        job = graph.definitions.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(instance=graph.instance, asset_selection=list(keys), raise_on_error=False)
        assert result.success
    return keys


@pytest.fixture
def small_graph(landing: Path, tmp_path: Path, tokenizer_cache_dir: Path) -> Iterator[Graph]:
    with deployed(landing / "sources.yaml", tmp_path / "deploy", tokenizer_cache_dir) as graph:
        graph.run_all()
        yield graph


@pytest.mark.slow  # builds and refreshes the small graph: 12-100 s
def test_a_dropped_file_reaches_gold_with_no_manual_step(small_graph: Graph, landing: Path) -> None:
    graph = small_graph
    assert graph.query("SELECT count(*) FROM gold.sft") == [(10,)]
    sensor = evaluate(graph.instance, graph.registry, None)
    # Automation conditions start from the current state: nothing is requested until something changes.
    cursor = dg.evaluate_automation_conditions(defs=graph.definitions, instance=graph.instance).cursor

    (landing / "chats" / "part-1.jsonl").write_text(chat_line(41) + "\n" + chat_line(42) + "\n")
    tick = evaluate(graph.instance, graph.registry, sensor.cursor)
    (request,) = tick.run_requests
    graph.definitions.resolve_job_def("ingest_source").execute_in_process(
        instance=graph.instance, partition_key=request.partition_key, run_config=pipeline.QUIET
    )

    requested: list[set[dg.AssetKey]] = []
    for _ in range(4):  # the daemon's ticks: silver first, then what follows once its checks passed
        evaluation = dg.evaluate_automation_conditions(defs=graph.definitions, instance=graph.instance, cursor=cursor)
        cursor = evaluation.cursor
        requested.append(_launch_requested(graph, evaluation))
    every = set().union(*requested)
    assert dg.AssetKey(["silver", "records"]) in requested[0]
    assert {
        dg.AssetKey(["gold", "sft"]),
        dg.AssetKey(["gold", "preference"]),
        dg.AssetKey(["gold", "rl_prompts"]),
    } <= every
    assert requested[-1] == set()  # settled
    assert graph.query("SELECT count(*) FROM gold.sft") == [(12,)]
    assert graph.query("SELECT response FROM gold.sft WHERE origin.file LIKE '%part-1.jsonl' ORDER BY ALL") == [
        ("41 plus 41 is 82.",),
        ("42 plus 42 is 84.",),
    ]


def _refresh_job() -> dg.JobDefinition:
    return pipeline.load_definitions().resolve_job_def("refresh_corpus")


@pytest.mark.slow  # builds and refreshes the small graph: 12-100 s
def test_multiprocess_refresh_never_fails_on_the_duckdb_lock(small_graph: Graph) -> None:
    before = small_graph.query("SELECT * FROM gold.rl_prompts ORDER BY ALL")
    # Forkserver with the project preloaded: the same parallelism, without re-importing per step.
    # The step processes get the graph's resources from the run config, not from the environment: a fork server
    # that an earlier test in this process started (our stage pools share multiprocessing's one fork server) keeps
    # the environment of that moment, so the step processes forked from it would not see this graph's variables.
    run_config = {
        "execution": {
            "config": {
                "multiprocess": {
                    "max_concurrent": 4,
                    "start_method": {"forkserver": {"preload_modules": ["posttrain_assets.definitions"]}},
                }
            }
        },
        "resources": {
            "duckdb": {"config": {"database": str(small_graph.database)}},
            "registry": {"config": {"path": str(small_graph.registry)}},
            "tokenizer": {"config": {"spec": "smollm2", "cache_dir": str(small_graph.cache_dir)}},
        },
    }
    with dg.execute_job(
        dg.reconstructable(_refresh_job), instance=small_graph.instance, run_config=run_config
    ) as result:
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        steps = {e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
    # The whole graph ran in parallel subprocesses (checks included), one DuckDB step at a time.
    assert {"silver_canonical", "gold__sft", "gold__preference", "gold__rl_prompts"} <= steps
    assert any("loss_mask_check" in s for s in steps)
    assert small_graph.query("SELECT * FROM gold.rl_prompts ORDER BY ALL") == before
    assert small_graph.query("SELECT count(*) FROM gold.rl_prompts") == [(40,)]


def _publish_job() -> dg.JobDefinition:
    return pipeline.load_definitions().resolve_job_def("publish")


@pytest.mark.slow  # builds the small graph, then publishes it again as the daemon would: 12-100 s
def test_a_run_executes_its_steps_in_its_own_process_by_default(small_graph: Graph) -> None:
    # No execution config, as the daemon, sensors, schedules and the launchpad launch runs: the steps run one at a
    # time in the run's process (the pool admits one anyway), not in a process each that loads everything again.
    with dg.execute_job(dg.reconstructable(_publish_job), instance=small_graph.instance) as result:
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        events = result.all_events
        run = small_graph.instance.get_run_by_id(result.run_id)
    started = {e.step_key: e.pid for e in events if e.event_type_value == "STEP_START"}
    assert set(started) == {"gold__trace", "gold__trace_provenance_audit_check", "exports__trainer_files"}
    assert set(started.values()) == {os.getpid()}
    assert not [e for e in events if e.event_type_value == "STEP_WORKER_STARTING"]
    # The run worker recorded itself, so that the dead_run_sensor recovers the run if this process is killed.
    recorded = runs.RunProcess.of_run(run)
    assert recorded.pid == os.getpid() and not recorded.is_gone()  # this process, by its pid and start time
    # The job automation conditions and the launchpad's asset selections run (it cannot be reconstructed by name).
    asset_job = small_graph.definitions.resolve_implicit_global_asset_job_def()
    assert asset_job.executor_def.config_schema.default_value == {"in_process": {}}
