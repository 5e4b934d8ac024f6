"""Run the whole graph from code (the CLI and tests use this), and read back what it produced."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb

from posttrain_assets import runs, settings
from posttrain_assets.ingest.bronze import landing_fingerprint
from posttrain_assets.ingest.registry import Registry, load_registry
from posttrain_assets.warehouse.bronze import drop_unregistered_sources, ingested_with
from posttrain_assets.warehouse.catalogue import ALL_TABLES

# Every platform table, in data-flow order (the declarations in posttrain_assets.warehouse.catalogue).
LAYER_TABLES = tuple(t.qualified for t in ALL_TABLES)


def load_definitions() -> dg.Definitions:
    from posttrain_assets.definitions import defs

    return defs()


def sync_source_partitions(instance: dg.DagsterInstance, names: Iterable[str]) -> None:
    """Make the bronze partitions exactly the registry's sources."""
    wanted = list(names)
    current = set(instance.get_dynamic_partitions("source"))
    missing = [n for n in wanted if n not in current]
    if missing:
        instance.add_dynamic_partitions("source", missing)
    for stale in current - set(wanted):
        instance.delete_dynamic_partition("source", stale)


# Runs print only our summary (check verdicts, step errors); the full event log is in the Dagster UI (`make dev`).
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


@dataclass
class CheckVerdict:
    check: str
    passed: bool
    description: str


@dataclass
class RunReport:
    """What a full run did: every check's verdict, and the assets a failed blocking check held back."""

    checks: list[CheckVerdict]
    not_materialized: list[str]

    @property
    def failed_checks(self) -> list[CheckVerdict]:
        return [c for c in self.checks if not c.passed]


def run_all(
    instance: dg.DagsterInstance | None = None,
    definitions: dg.Definitions | None = None,
    *,
    verbose: bool = False,
    refresh_run_config: dict | None = None,
) -> RunReport:
    """Ingest every registry source into bronze, rebuild silver and gold with every check, then publish
    (provenance view and audit, trainer-ready exports).

    A run that died before (killed, crashed) does not block this one: runs left in progress by a process that is
    gone are marked failed and their ``duckdb`` pool slots freed first (:func:`runs.recover_dead_runs`); a job that
    waits for the pool says which run holds it and stops on SIGINT/SIGTERM (:func:`runs.run_job_in_process`, which
    then raises :class:`runs.RunInterrupted`). When another process holds the DuckDB file, the run raises
    :class:`runs.WarehouseInUseError` before it writes anything.

    A failing blocking check is reported, not raised: the assets behind it keep their previous contents.
    Any other failure (a step error) raises :class:`RunFailed`, naming the step and its error.

    ``refresh_run_config`` is run config for the refresh_corpus job only (e.g. the cleaning pass's
    ``{"ops": {"silver_canonical": {"config": {...}}}}``); the ingest and publish jobs have no such ops.
    """
    instance = instance or dg.DagsterInstance.get()
    definitions = definitions or load_definitions()
    registry = load_registry(os.environ["POSTTRAIN_SOURCES"])
    database = os.environ["POSTTRAIN_DUCKDB_PATH"]
    for line in runs.recover_dead_runs(instance):
        runs.say(line)
    runs.check_warehouse_free(database)
    sync_source_partitions(instance, registry.names)
    with duckdb.connect(database) as conn:  # a source removed from the registry leaves nothing behind
        for name in drop_unregistered_sources(conn, registry.names):
            print(f"removed {name} (no longer in the registry)")
        unchanged = _unchanged_sources(conn, registry)
    run_config = {} if verbose else QUIET
    ingest = definitions.resolve_job_def("ingest_source")
    for name in registry.names:
        if name in unchanged:  # no run: the partition's data version stays
            print(f"unchanged {name}")
            continue
        result = runs.run_job_in_process(
            ingest, instance, database=database, partition_key=name, run_config=run_config, raise_on_error=False
        )
        if errors := _step_errors(result):
            raise RunFailed("; ".join(errors))  # one line, e.g. "bronze__records: source 'x': no file matches ..."
        print(f"ingested {name}")
    report = RunReport([], [])
    for job_name in ("refresh_corpus", "publish"):
        job_config = {**run_config, **(refresh_run_config or {})} if job_name == "refresh_corpus" else run_config
        _run_job(definitions.resolve_job_def(job_name), instance, database, job_config, report)
    for check in report.checks:
        print(f"check {check.check} {'passed' if check.passed else 'FAILED'}: {check.description}")
    if report.not_materialized:
        print(f"not materialised (held back by a failed blocking check): {', '.join(report.not_materialized)}")
    return report


def _unchanged_sources(conn: duckdb.DuckDBPyConnection, registry: Registry) -> set[str]:
    """The sources whose landing files are those their bronze table was read from (the test bronze_records makes
    itself): no ingest run is launched for them, saving a Dagster run per unchanged source on every refresh."""
    if settings.full_rebuild():
        return set()
    return {
        source.name
        for source in registry.sources
        if (files := source.files()) and ingested_with(conn, source.name, landing_fingerprint(source, files))
    }


class RunFailed(RuntimeError):
    """A step of a run failed (not a blocking check); the message has one line per failed step: its own error."""


def _root_cause(error) -> str:
    """The innermost error message of a Dagster step failure (the user code's own exception); a ``dg.Failure``'s
    message as its asset wrote it."""
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()
    return message.split(": ", 1)[1] if error.cls_name == "Failure" else message


def _step_errors(result: dg.ExecuteInProcessResult, skip: Collection[str] = ()) -> list[str]:
    """``step: error`` for each failed step of ``result`` but those in ``skip``."""
    return [
        f"{e.step_key}: {_root_cause(e.event_specific_data.error)}"
        for e in result.all_events
        if e.is_step_failure and e.step_key not in skip and e.event_specific_data.error
    ]


def _run_job(
    job: dg.JobDefinition, instance: dg.DagsterInstance, database: str, run_config: dict, report: RunReport
) -> None:
    """Execute ``job``; add its check verdicts and held-back assets to ``report``; raise on any step error."""
    result = runs.run_job_in_process(job, instance, database=database, run_config=run_config, raise_on_error=False)
    evaluations = result.get_asset_check_evaluations()
    failed_steps = {e.step_key for e in result.all_events if e.is_step_failure}
    failed_check_steps = {
        step for step in failed_steps for e in evaluations if not e.passed and step.endswith(e.check_name)
    }
    if errors := _step_errors(result, failed_check_steps):
        raise RunFailed(f"{job.name} failed:\n" + "\n".join(errors))
    report.checks += [
        CheckVerdict(f"{e.asset_key.to_user_string()}:{e.check_name}", e.passed, e.description or "")
        for e in evaluations
    ]
    done = {e.asset_key for e in result.get_asset_materialization_events()}
    report.not_materialized += sorted(k.to_user_string() for k in job.asset_layer.executable_asset_keys - done)


def layer_counts(database: str) -> list[tuple[str, int | None]]:
    """Row count of every platform table (None where a table does not exist yet)."""
    with duckdb.connect(database, read_only=True) as conn:
        existing = {
            f"{s}.{t}"
            for s, t in conn.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall()
        }
        return [
            (name, conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0] if name in existing else None)
            for name in LAYER_TABLES
        ]


def format_counts(counts: list[tuple[str, int | None]]) -> str:
    width = max(len(name) for name, _ in counts)
    lines = ["rows per table:"]
    lines += [f"  {name:<{width}}  {'-' if n is None else f'{n:>8,}'}" for name, n in counts]
    return "\n".join(lines)


def show_mask(database: str, record_id: str, *, color: bool = False) -> str:
    """One tokenised SFT row with its trained spans marked, for debugging a template."""

    from posttrain_assets.sft.masking import render_mask
    from posttrain_assets.sft.tokenizer import load_tokenizer

    with duckdb.connect(database, read_only=True) as conn:
        rows = conn.execute(
            "SELECT t.id, t.source, t.input_ids, t.labels, t.num_trainable_tokens, t.chat_template_sha256, "
            "r.messages[1:t.num_messages] FROM silver.sft_tokenized t LEFT JOIN silver.records r USING (id) "
            "WHERE starts_with(t.id, ?) ORDER BY t.id LIMIT 2",
            [record_id],
        ).fetchall()
    if not rows:
        raise SystemExit(f"no tokenised SFT row with id starting {record_id!r}")
    if len(rows) > 1:
        raise SystemExit(f"id prefix {record_id!r} is ambiguous: {rows[0][0]}, {rows[1][0]}, ...")
    ((row_id, source, input_ids, labels, trained, template_sha, messages),) = rows
    tok = load_tokenizer(os.environ["POSTTRAIN_TOKENIZER"], Path(os.environ["POSTTRAIN_CACHE_DIR"]))
    header = f"{row_id} ({source}): {len(input_ids)} tokens, {trained} trained, template {template_sha[:12]}"
    legend = "trained spans are green" if color else "trained spans are inside ⟦ ⟧"
    if messages and any(m.get("tool_calls") or m.get("reasoning_content") or m["role"] == "tool" for m in messages):
        legend += (
            "; reasoning magenta, tool calls yellow, tool results cyan"
            if color
            else "; reasoning in ⟨reasoning⟩, tool-call names in ⟨call⟩, tool results in ⟨result⟩"
        )
    return f"{header}; {legend}\n\n{render_mask(tok, input_ids, labels, color=color, messages=messages)}"


def trace_row(database: str, record_id: str) -> str:
    """The provenance chain of one gold row (``posttrain trace``)."""
    from posttrain_assets.publish.trace import TraceError, trace

    with duckdb.connect(database, read_only=True) as conn:
        try:
            return trace(conn, record_id)
        except TraceError as exc:
            raise SystemExit(str(exc)) from exc
