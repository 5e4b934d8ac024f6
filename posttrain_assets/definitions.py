"""Entry point: every definition under ``defs/``, loaded by concern, with project-wide policy applied once."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

# Every asset and check opens the DuckDB file and is in the "duckdb" pool of one slot (dagster.yaml), so the
# multiprocess executor ran a run's steps one at a time anyway, each in a process of its own that imported Dagster
# and the project, loaded these definitions and the instance, and loaded the tokenizer again: 3 to 8 s a step
# before its first line of our code (on a loaded 2-CPU machine), against 0.1 s in process. So every run (the
# daemon's automation, sensors, schedules, the launchpad) executes in its run worker's process by default, as
# `posttrain run` always did; the launchpad can still choose `multiprocess`.
IN_PROCESS_BY_DEFAULT = dg.multi_or_in_process_executor.configured(
    lambda config: config,
    config_schema=dg.Field(
        dg.multi_or_in_process_executor.config_schema.config_type,
        default_value={"in_process": {}},
        description="in_process (the default: the pool runs one step at a time) or multiprocess",
    ),
)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(executor=IN_PROCESS_BY_DEFAULT),
    )
