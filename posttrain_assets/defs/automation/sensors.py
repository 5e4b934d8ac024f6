"""Automation: new or changed landing files re-ingest their source; a daily schedule refreshes everything; runs
whose process was killed are recovered so they never block the next one.

Only bronze is requested here. Silver follows bronze through its eager automation condition, and gold
follows silver once every blocking check upstream has passed, so gold stays current with no hand-run.
"""

import json

import dagster as dg

from posttrain_assets import runs
from posttrain_assets.defs.automation.jobs import ingest_source_job
from posttrain_assets.defs.resources import SourceRegistryResource
from posttrain_assets.ingest.landing import files_fingerprint


@dg.sensor(
    job=ingest_source_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches every registry source's files (by content hash); a new or changed file re-ingests "
    "that source's bronze partition, and registry changes add or remove partitions.",
)
def landing_files_sensor(context: dg.SensorEvaluationContext, registry: SourceRegistryResource) -> dg.SensorResult:
    state = json.loads(context.cursor) if context.cursor else {"fingerprints": {}, "hashes": {}}
    sources = registry.load()
    known = set(context.instance.get_dynamic_partitions("source"))
    fingerprints: dict[str, str] = {}
    run_requests = []
    live_files: set[str] = set()
    for source in sources.sources:
        files = source.files()  # one glob per source per tick
        live_files.update(str(p) for p in files)
        fingerprint = files_fingerprint(files, state["hashes"])
        if fingerprint is None:
            context.log.warning(f"source {source.name}: no file matches {source.pattern}")
            continue
        fingerprints[source.name] = fingerprint
        if state["fingerprints"].get(source.name) != fingerprint or source.name not in known:
            run_requests.append(
                dg.RunRequest(
                    partition_key=source.name, run_key=f"{source.name}:{fingerprint}", tags={"source": source.name}
                )
            )
    requests = []
    new = [name for name in sources.names if name not in known]
    gone = sorted(known - set(sources.names))
    if new:
        requests.append(dg.AddDynamicPartitionsRequest("source", new))
    if gone:
        requests.append(dg.DeleteDynamicPartitionsRequest("source", gone))
    hashes = {path: entry for path, entry in state["hashes"].items() if path in live_files}
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=requests,
        cursor=json.dumps({"fingerprints": fingerprints, "hashes": hashes}, sort_keys=True),
        skip_reason=None if run_requests or requests else "no landing file changed",
    )


@dg.schedule(
    cron_schedule="0 3 * * *",
    job=ingest_source_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily full refresh: re-ingest every source; silver and gold follow by automation.",
)
def daily_refresh_schedule(context: dg.ScheduleEvaluationContext, registry: SourceRegistryResource):
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    known = set(context.instance.get_dynamic_partitions("source"))
    return [
        dg.RunRequest(partition_key=name, run_key=f"daily:{day}:{name}")
        for name in registry.load().names
        if name in known
    ]


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks failed every run still in progress whose run worker process is gone (killed, out of memory, "
    "the machine restarted) and frees its duckdb pool slot, so that it never blocks the next run.",
)
def dead_run_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    # The code server that launched a run marks it failed when its run worker exits, but only while that server
    # lives; a run left STARTED otherwise (the server or `dagster dev` killed with it) would hold the pool's only
    # slot for ever. Sensors are evaluated on the host of the code server, where the default run launcher starts
    # run workers, so the recorded processes are judged on their own host.
    recovered = runs.recover_dead_runs(context.instance)
    for line in recovered:
        context.log.warning(line)
    return dg.SkipReason("; ".join(recovered) or "no run in progress has lost its process")
