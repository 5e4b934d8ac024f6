"""Entry point: every definition under ``defs/``, loaded by concern, with project-wide policy applied once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from posttrain_assets.runs import RunProcess

if TYPE_CHECKING:  # the executor interface's argument types; dagster does not export them
    from dagster._core.execution.context.system import PlanOrchestrationContext
    from dagster._core.execution.plan.plan import ExecutionPlan
    from dagster._core.execution.retries import RetryMode
    from dagster._core.execution.step_dependency_config import StepDependencyConfig


class RunWorkerRecorded(dg.Executor):
    """An in-process executor that first records its process, the run worker, in the run's tags
    (:class:`RunProcess`), so that a run whose worker is killed is recognised as dead and recovered: marked failed
    and its ``duckdb`` pool slot freed (``runs.recover_dead_runs``, from the ``dead_run_sensor`` and from
    ``posttrain run``). Everything else is the wrapped executor's."""

    def __init__(self, in_process: dg.Executor) -> None:
        self._in_process = in_process

    @property
    def retries(self) -> RetryMode:
        return self._in_process.retries

    @property
    def step_dependency_config(self) -> StepDependencyConfig:
        return self._in_process.step_dependency_config

    def execute(
        self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan
    ) -> Iterator[dg.DagsterEvent]:
        # This runs in the run worker, after the run is marked STARTED and before its first step.
        plan_context.instance.add_run_tags(plan_context.run_id, RunProcess.current().tags(plan_context.run_id))
        yield from self._in_process.execute(plan_context, execution_plan)


def _create_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
    executor = dg.multi_or_in_process_executor.executor_creation_fn(init_context)
    # Only an in-process run is recorded: with multiprocess, a step runs in a process of its own, which may still be
    # writing the DuckDB file when the run worker is gone; such a run is Dagster's to recover (docs/operations.md).
    return RunWorkerRecorded(executor) if "in_process" in init_context.executor_config else executor


# Every asset and check opens the DuckDB file and is in the "duckdb" pool of one slot (dagster.yaml), so the
# multiprocess executor ran a run's steps one at a time anyway, each in a process of its own that imported Dagster
# and the project, loaded these definitions and the instance, and loaded the tokenizer again: 3 to 8 s a step
# before its first line of our code (on a loaded 2-CPU machine), against 0.1 s in process. So every run (the
# daemon's automation, sensors, schedules, the launchpad) executes in its run worker's process by default, as
# `posttrain run` always did, recorded so that a killed run worker never blocks the next run (RunWorkerRecorded);
# the launchpad can still choose `multiprocess`. The config schema and requirements are Dagster's
# multi_or_in_process_executor's, with in_process as the default.
IN_PROCESS_BY_DEFAULT = dg.ExecutorDefinition(
    name="multi_or_in_process_executor",
    config_schema=dg.Field(
        dg.multi_or_in_process_executor.config_schema.config_type,
        default_value={"in_process": {}},
        description="in_process (the default: the duckdb pool runs one step at a time anyway) or multiprocess",
    ),
    requirements=lambda config: dg.multiple_process_executor_requirements() if "multiprocess" in config else [],
    executor_creation_fn=_create_executor,
    description="Steps in the run worker's process (recorded in the run's tags), or a process per step",
)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(executor=IN_PROCESS_BY_DEFAULT),
    )
