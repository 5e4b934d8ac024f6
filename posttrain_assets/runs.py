"""Run bookkeeping, so that a run that died never blocks the next one.

- Who runs a run: every run whose steps execute in its run worker's process carries that process's identity as
  tags (:class:`RunProcess`: pid, host, the process's start time, which tells a reused pid from the original, and
  the run it was recorded for). ``posttrain run`` (:func:`pipeline.run_all`) tags the runs it starts; a run the
  daemon, a sensor, a schedule or the UI launches is tagged by its run worker when it starts executing, as long as
  its executor is in process, the default (``posttrain_assets/definitions.py``). A multiprocess run is not tagged:
  its steps run in processes of their own, and one of them may still be writing when the run worker is gone.
- Recovery (:func:`recover_dead_runs`): a run still marked in progress whose process is gone is marked failed and
  its slots in the ``duckdb`` concurrency pool are freed; so are the slots still held by runs that already ended.
  ``posttrain run`` recovers before each run; the ``dead_run_sensor`` recovers every 30 s in the daemon.
- Waiting out loud (:func:`run_job_in_process`): before a job starts, and while it runs, a run that waits for the
  pool prints which run holds the slot, frees it if that run's process died meanwhile, and stops on SIGINT/SIGTERM.
- The warehouse lock (:func:`check_warehouse_free`): DuckDB admits one writing process per file; a run fails fast,
  before it ingests or rewrites anything, when another process holds the file.

Dagster watches runs too: the code server that launched a run (the default run launcher) marks it failed when its
run worker exits unfinished, while that server lives; ``dagster.yaml``'s ``run_monitoring`` frees the slots of runs
that ended. This is Dagster operational code; the stage packages never import it.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import dagster as dg
import duckdb
import psutil

from posttrain_assets.processes import process_gone

if TYPE_CHECKING:  # what EventLogStorage.get_concurrency_info returns; dagster does not export the class
    from dagster._core.storage.event_log.base import ConcurrencyKeyInfo

# The concurrency pool of every asset and check that opens the DuckDB file (its limit is in dagster.yaml).
DUCKDB_POOL = "duckdb"

TAG_PID = "posttrain/pid"
TAG_HOST = "posttrain/host"
TAG_PROCESS_STARTED = "posttrain/process_started"
# The run the process identity was recorded for: a re-execution copies its parent's tags, and so the identity of
# the parent's process, until its own run worker records its own.
TAG_RUN_ID = "posttrain/run_id"

IN_PROGRESS = (
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
)
ENDED = frozenset({dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED})

# How often a waiting run looks at the pool again.
POLL_SECONDS = 1.0

Say = Callable[[str], None]


def say(line: str) -> None:
    """Print a progress line now (stdout is block-buffered when it is a pipe)."""
    print(line, flush=True)


@dataclass(frozen=True)
class RunProcess:
    """The process that executes a run's steps in process (its run worker), as recorded in the run's tags."""

    pid: int
    host: str
    started: float  # the process's creation time (seconds since the epoch): a reused pid has another one

    @classmethod
    def current(cls) -> RunProcess:
        return cls(os.getpid(), socket.gethostname(), psutil.Process().create_time())

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> RunProcess | None:
        """The process recorded in these tags; None when none is (a multiprocess run, a test)."""
        try:
            return cls(int(tags[TAG_PID]), tags[TAG_HOST], float(tags[TAG_PROCESS_STARTED]))
        except (KeyError, ValueError):
            return None

    @classmethod
    def of_run(cls, run: dg.DagsterRun) -> RunProcess | None:
        """The process that executes ``run``; None when none is recorded, or the one recorded is another run's (a
        re-execution still carrying its parent's tags)."""
        if run.tags.get(TAG_RUN_ID, run.run_id) != run.run_id:
            return None
        return cls.from_tags(run.tags)

    def tags(self, run_id: str | None = None) -> dict[str, str]:
        """The tags that record this process, as the process of the run ``run_id`` when given."""
        tags = {TAG_PID: str(self.pid), TAG_HOST: self.host, TAG_PROCESS_STARTED: f"{self.started:.3f}"}
        return tags | ({TAG_RUN_ID: run_id} if run_id is not None else {})

    def is_gone(self) -> bool:
        """True when this process certainly no longer runs: it is on this host and its pid is free, a zombie, or
        taken by a process started at another time. A process on another host is never judged gone."""
        return self.host == socket.gethostname() and process_gone(self.pid, self.started)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


def describe_run(instance: dg.DagsterInstance, run_id: str) -> str:
    """One line naming a run: id, job, status and the process that runs it (when our code started it)."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return f"run {run_id} (deleted)"
    process = RunProcess.of_run(run)
    where = (
        f"run worker {process}" if process else "launched by Dagster; if its process is gone, terminate it in the UI"
    )
    return f"run {run_id} ({run.job_name}, {run.status.value}, {where})"


def _fail_and_free(instance: dg.DagsterInstance, run: dg.DagsterRun, message: str) -> None:
    instance.report_run_failed(run, message)
    instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


def release_if_stale(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """Free what ``run_id`` holds in the concurrency pools when that run is over: deleted, ended, or in progress
    with its process gone (then it is marked failed first). A line saying what was done, or None."""
    record = instance.get_run_record_by_id(run_id)
    if record is None:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        return f"freed the pool slots of run {run_id}, which no longer exists"
    run = record.dagster_run
    if run.status in ENDED:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        return f"freed the pool slots still held by run {run_id} ({run.job_name}), which ended {run.status.value}"
    process = RunProcess.of_run(run)
    if run.status in IN_PROGRESS and process is not None and process.is_gone():
        _fail_and_free(
            instance,
            run,
            f"The process that ran this run ({process}) is gone (killed or crashed); marked failed and its "
            f"pool slots freed by pid {os.getpid()} (posttrain_assets/runs.py).",
        )
        return (
            f"run {run_id} ({run.job_name}) was left {run.status.value} by {process}, which is gone: "
            "marked failed, pool slots freed"
        )
    return None


def recover_dead_runs(instance: dg.DagsterInstance, pools: tuple[str, ...] = (DUCKDB_POOL,)) -> list[str]:
    """Mark failed every run of this host still marked in progress while the process recorded as executing it
    (:meth:`RunProcess.of_run`) is gone, free its pool slots, and free the slots still held by runs that ended.
    Lines saying what was done; a run whose process lives, or whose process is not recorded, is left alone."""
    done = []
    ours_here = dg.RunsFilter(statuses=list(IN_PROGRESS), tags={TAG_HOST: socket.gethostname()})
    for record in instance.get_run_records(filters=ours_here):
        process = RunProcess.of_run(record.dagster_run)
        if process is not None and process.is_gone():
            done.append(release_if_stale(instance, record.dagster_run.run_id))
    if instance.event_log_storage.supports_global_concurrency_limits:
        for pool in pools:
            info = instance.event_log_storage.get_concurrency_info(pool)
            holders = {s.run_id for s in info.claimed_slots} | {p.run_id for p in info.pending_steps}
            done += [release_if_stale(instance, run_id) for run_id in sorted(holders)]
    return [line for line in done if line]


def _blockers(info: ConcurrencyKeyInfo, run_id: str | None) -> list[tuple[str, str]]:
    """(run id, step key) of what keeps a step of ``run_id`` out of the pool, or for None a new run's first step;
    empty when it may go. Dagster assigns a pool's slots in queue order (its pending steps; an assigned step holds
    a slot or is about to claim it): a new run is kept out while every slot is assigned; a queued step of ``run_id``
    waits for the assigned steps and for the steps queued ahead of it."""
    if info.limit is None:
        return []
    assigned = [p for p in info.pending_steps if p.assigned_timestamp is not None]
    holding = {(p.run_id, p.step_key) for p in assigned} | {(s.run_id, s.step_key) for s in info.claimed_slots}
    if run_id is None:
        return sorted(holding) if len(assigned) >= info.limit else []
    mine = [p.enqueued_timestamp for p in info.pending_steps if p.run_id == run_id and p.assigned_timestamp is None]
    if not mine:
        return []  # not waiting
    queued_ahead = {
        (p.run_id, p.step_key)
        for p in info.pending_steps
        if p.assigned_timestamp is None and p.run_id != run_id and p.enqueued_timestamp < min(mine)
    }
    return sorted(key for key in holding | queued_ahead if key[0] != run_id)


def _waiting_line(instance: dg.DagsterInstance, pool: str, limit: int, blockers: list[tuple[str, str]]) -> str:
    holders = "; ".join(f"{describe_run(instance, run_id)} at step {step}" for run_id, step in blockers)
    return f"waiting for the {pool!r} pool ({limit} slot(s), one DuckDB writer at a time): held by {holders}"


def wait_for_pool(instance: dg.DagsterInstance, pool: str = DUCKDB_POOL, *, out: Say = say) -> None:
    """Return once a new run could take a slot of ``pool``. While it cannot, say which runs hold it (again when
    they change), and free the slots of holders that are over. Sleeps between looks, so Ctrl-C stops it."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    announced = None
    while blockers := _blockers(info := storage.get_concurrency_info(pool), None):
        released = [line for line in (release_if_stale(instance, r) for r in {r for r, _ in blockers}) if line]
        for line in released:
            out(line)
        if released:
            continue
        line = _waiting_line(instance, pool, info.limit, blockers)
        if line != announced:
            out(line)
            announced = line
        time.sleep(POLL_SECONDS)


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached a run we started in process."""

    def __init__(self, signum: int, run_id: str) -> None:
        super().__init__(f"{signal.Signals(signum).name} during run {run_id}")
        self.signum = signum


class PoolWatch:
    """Watch one run that executes in this process, from a thread, while Dagster's step loop runs in the main thread.

    Dagster 1.13's loop waits for a pool slot without a word, and only records SIGINT/SIGTERM there (it raises them
    inside a step), so a run queued behind a dead run spun forever. This watch says which run holds the slot, frees
    it if that run is over (:func:`release_if_stale`), and on SIGINT/SIGTERM while the run waits for the pool, marks
    the run failed, frees its place in the queue and ends the process (no step is running then: nothing is half
    written). Signals reach the thread through :func:`signal.set_wakeup_fd`, which works whatever Python handler
    Dagster installed; from a non-main thread (no signals there) the watch only reports and recovers.
    """

    def __init__(self, instance: dg.DagsterInstance, run_id: str, pool: str = DUCKDB_POOL, *, out: Say = say) -> None:
        self.instance = instance
        self.run_id = run_id
        self.pool = pool
        self.out = out
        self.signum: int | None = None  # the first SIGINT/SIGTERM received while watching
        self._stop = threading.Event()
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup_fd = -1
        self._thread = threading.Thread(target=self._watch, name=f"posttrain-pool-watch-{run_id[:8]}", daemon=True)

    def __enter__(self) -> PoolWatch:
        if threading.current_thread() is threading.main_thread():
            self._pipe = os.pipe()
            for fd in self._pipe:
                os.set_blocking(fd, False)
            self._previous_wakeup_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        if self.instance.event_log_storage.supports_global_concurrency_limits:
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._pipe is not None:
            # Wake the thread from its select now: otherwise every run we start in process ended only when the
            # thread's poll timed out, up to POLL_SECONDS later (0.7 s a run on average, 5 s of a 52 s refresh).
            # The byte is no signal number, so _read_signals ignores it.
            with contextlib.suppress(BlockingIOError):
                os.write(self._pipe[1], b"\0")
        if self._thread.is_alive():
            self._thread.join()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            self._read_signals()  # a signal that arrived just before the end still counts
            for fd in self._pipe:
                os.close(fd)

    def _read_signals(self) -> None:
        try:
            received = os.read(self._pipe[0], 512)
        except BlockingIOError:
            return
        for signum in received:
            if signum in (signal.SIGINT, signal.SIGTERM) and self.signum is None:
                self.signum = signum

    def _watch(self) -> None:
        storage = self.instance.event_log_storage
        announced = None
        while not self._stop.is_set():
            if self._pipe is not None:
                readable, _, _ = select.select([self._pipe[0]], [], [], POLL_SECONDS)
                if readable:
                    self._read_signals()
            else:
                self._stop.wait(POLL_SECONDS)
            if self._stop.is_set():
                return
            info = storage.get_concurrency_info(self.pool)
            blockers = _blockers(info, self.run_id)
            if not blockers:
                announced = None
                continue
            if self.signum is not None:
                self._stop_waiting_run(blockers)
            released = [line for line in (release_if_stale(self.instance, r) for r in {r for r, _ in blockers}) if line]
            for line in released:
                self.out(line)
            line = _waiting_line(self.instance, self.pool, info.limit, blockers)
            if not released and line != announced:
                self.out(f"run {self.run_id} is {line}")
                announced = line

    def _stop_waiting_run(self, blockers: list[tuple[str, str]]) -> None:
        name = signal.Signals(self.signum).name
        run = self.instance.get_run_by_id(self.run_id)
        if run is not None:
            _fail_and_free(
                self.instance, run, f"Stopped by {name} while waiting for the {self.pool!r} pool; no step was running."
            )
        self.out(
            f"{name}: stopped run {self.run_id} while it waited for the {self.pool!r} pool (held by run "
            f"{', '.join(sorted({r for r, _ in blockers}))}); no step was running, the run is marked failed"
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # The main thread is inside Dagster's step loop, which only records the signal; ending the process is the
        # one way to stop it from here, and with no step running it leaves nothing half done.
        os._exit(128 + self.signum)


def run_job_in_process(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    *,
    database: str,
    run_config: Mapping | None = None,
    partition_key: str | None = None,
    raise_on_error: bool = True,
    out: Say = say,
) -> dg.ExecuteInProcessResult:
    """``job.execute_in_process``, guarded: fail fast if another process holds the warehouse file, wait out loud
    for the ``duckdb`` pool, tag the run with this process, watch it (:class:`PoolWatch`), and raise
    :class:`RunInterrupted` when SIGINT/SIGTERM arrived during the run."""
    check_warehouse_free(database)
    wait_for_pool(instance, out=out)
    run_id = str(uuid.uuid4())
    watch = PoolWatch(instance, run_id, out=out)
    error: BaseException | None = None
    with watch:
        try:
            result = job.execute_in_process(
                run_config=run_config,
                instance=instance,
                partition_key=partition_key,
                raise_on_error=raise_on_error,
                run_id=run_id,
                tags=RunProcess.current().tags(run_id),
            )
        except BaseException as exc:  # re-raised below; as the interruption it was when a signal came
            error = exc
    if watch.signum is not None:
        raise RunInterrupted(watch.signum, run_id) from error
    if error is not None:
        raise error
    return result


class WarehouseInUseError(RuntimeError):
    """Another process holds the DuckDB file; nothing was ingested or rewritten."""


_LOCK_HOLDER = re.compile(r"\(PID (\d+)\)")


def check_warehouse_free(database: str) -> None:
    """Open ``database`` read-write once and close it; raise :class:`WarehouseInUseError` naming the file and the
    holding process (DuckDB names its pid) when another process has it open, so a run fails before it writes."""
    try:
        duckdb.connect(database).close()
    except duckdb.IOException as exc:
        if "lock" not in str(exc).lower():
            raise
        holder = "another process"
        if match := _LOCK_HOLDER.search(str(exc)):
            pid = int(match.group(1))
            holder = f"process {pid}"
            with contextlib.suppress(psutil.Error):  # gone meanwhile, or not ours to inspect
                holder += f" ({' '.join(psutil.Process(pid).cmdline())[:200]})"
        raise WarehouseInUseError(
            f"the DuckDB file {database} is held by {holder}: DuckDB allows one writing process per file, so this "
            f"run stopped before ingesting or rewriting anything. Close that process or wait for it to finish, then "
            f"run again.\nDuckDB: {exc}"
        ) from exc
