"""A run that died never blocks the next one, a run waiting for the DuckDB pool says on what and stops when told,
and no run writes while another process holds the warehouse file.

Everything runs in real processes sharing one Dagster home, as two terminals would: ``posttrain run`` on a small
registry built from vendored data, and small Dagster jobs in the ``duckdb`` pool. Subprocess timeouts are safety
nets against a hang, never assertions of speed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb
import psutil
import pytest

from posttrain_assets import runs
from posttrain_assets.defs.automation.sensors import dead_run_sensor
from posttrain_assets_tests.real_data import PROJECT_ROOT, REAL_DATA

# Long enough for any run on a loaded 2-CPU machine; reached only if something hangs.
SAFETY_SECONDS = 600

REGISTRY = """
sources:
  - name: chats
    path: chats.jsonl
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


def write_landing(root: Path, chats: int = 10) -> Path:
    """A landing zone: ``chats`` generated chats and the first 40 GSM8K train rows; returns its registry file."""
    root.mkdir(parents=True)
    (root / "chats.jsonl").write_text("".join(chat_line(i) + "\n" for i in range(chats)))
    lines = (REAL_DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[:40]
    (root / "math.jsonl").write_text("\n".join(lines) + "\n")
    (root / "sources.yaml").write_text(REGISTRY)
    return root / "sources.yaml"


@dataclass
class Deployment:
    """One Dagster home and one DuckDB file, and the environment ``posttrain`` reads them from."""

    home: Path
    database: Path
    env: dict[str, str]

    def instance(self) -> dg.DagsterInstance:
        """The deployment's instance (its storage is created on first use, before any run process opens it)."""
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DAGSTER_HOME", str(self.home))
            return dg.DagsterInstance.get()

    def posttrain(self, *args: str, timeout: float = SAFETY_SECONDS) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "posttrain_assets.cli", *args],
            env=self.env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *args: str, stdout: Path) -> subprocess.Popen[str]:
        """``python *args`` in the background, stdout and stderr to a file."""
        with stdout.open("w") as out:
            return subprocess.Popen(
                [sys.executable, *args], env=self.env, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT
            )


def make_deployment(root: Path, registry: Path, tokenizer_cache_dir: Path) -> Deployment:
    """A fresh Dagster home (with the project's dagster.yaml) and DuckDB file under ``root``, reading ``registry``."""
    home = root / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "POSTTRAIN_SOURCES": str(registry),
        "POSTTRAIN_DUCKDB_PATH": str(root / "warehouse.duckdb"),
        "POSTTRAIN_TOKENIZER": "smollm2",
        "POSTTRAIN_CACHE_DIR": str(tokenizer_cache_dir),
        "DAGSTER_HOME": str(home),
    }
    return Deployment(home, root / "warehouse.duckdb", env)


@pytest.fixture(scope="module")
def deploy(tokenizer_cache_dir: Path, smollm2_tokenizer_dir: Path) -> Callable[[Path, Path], Deployment]:
    """Factory of deployments that run the whole graph (the default tokenizer is built once per session)."""
    return lambda root, registry: make_deployment(root, registry, tokenizer_cache_dir)


@pytest.fixture(scope="module")
def landing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_landing(tmp_path_factory.mktemp("recovery") / "landing")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory, deploy, landing: Path) -> Deployment:
    """``posttrain run`` once on a fresh deployment: the reference every other run is compared with."""
    clean = deploy(tmp_path_factory.mktemp("clean"), landing)
    result = clean.posttrain("run")
    assert result.returncode == 0, result.stderr
    return clean


# When and by which run a row was written: the only columns two runs over the same landing files may differ in.
RUN_SPECIFIC_COLUMNS = {"ingested_at", "run_id", "evaluated_at"}


def tables(database: Path) -> dict[str, list[tuple]]:
    """Every table and view of the warehouse with all its rows, sorted, without the run-specific columns."""
    with duckdb.connect(str(database), read_only=True) as conn:
        names = conn.execute("SELECT table_schema, table_name FROM information_schema.tables ORDER BY ALL").fetchall()
        contents = {}
        for schema, name in names:
            columns = [
                f'"{column}"'
                for (column,) in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ? "
                    "ORDER BY ordinal_position",
                    [schema, name],
                ).fetchall()
                if column not in RUN_SPECIFIC_COLUMNS
            ]
            contents[f"{schema}.{name}"] = conn.execute(
                f'SELECT {", ".join(columns)} FROM "{schema}"."{name}" ORDER BY ALL'
            ).fetchall()
        return contents


def wait_until(condition: Callable[[], object], what: str, process: subprocess.Popen | None = None) -> object:
    """Poll ``condition`` until it returns something truthy; fail if ``process`` ended first (or on the safety net)."""
    deadline = time.monotonic() + SAFETY_SECONDS
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"process ended (exit {process.returncode}) before: {what}")
        time.sleep(0.02)
    pytest.fail(f"never happened: {what}")


@pytest.mark.slow
def test_a_killed_run_does_not_block_the_next_one_which_rebuilds_exactly(
    tmp_path: Path, deploy, landing: Path, clean_run: Deployment
) -> None:
    deployment = deploy(tmp_path, landing)
    with deployment.instance() as instance:
        storage = instance.event_log_storage
        killed = deployment.start("-m", "posttrain_assets.cli", "run", stdout=tmp_path / "killed.out")
        try:
            # SIGKILL once the silver pass holds the duckdb slot, mid-silver: nothing of the run can clean up.
            wait_until(
                lambda: any(
                    s.step_key == "silver_canonical" for s in storage.get_concurrency_info("duckdb").claimed_slots
                ),
                "silver_canonical holds the duckdb slot",
                killed,
            )
        finally:
            killed.send_signal(signal.SIGKILL)
            killed.wait()
        (dead,) = instance.get_run_records(dg.RunsFilter(job_name="refresh_corpus"))
        # What made every later run hang: the dead run still marked STARTED, holding the pool's only slot.
        assert dead.dagster_run.status == dg.DagsterRunStatus.STARTED
        assert [s.run_id for s in storage.get_concurrency_info("duckdb").claimed_slots] == [dead.dagster_run.run_id]
        assert dead.dagster_run.tags[runs.TAG_PID] == str(killed.pid)

        rerun = deployment.posttrain("run")
        assert rerun.returncode == 0, rerun.stderr
        assert (
            f"run {dead.dagster_run.run_id} (refresh_corpus) was left STARTED by pid {killed.pid} on " in rerun.stdout
        )
        assert "which is gone: marked failed, pool slots freed" in rerun.stdout
        assert instance.get_run_by_id(dead.dagster_run.run_id).status == dg.DagsterRunStatus.FAILURE
        pool = storage.get_concurrency_info("duckdb")
        assert pool.claimed_slots == [] and pool.pending_steps == []
        statuses = [r.dagster_run.status for r in instance.get_run_records(dg.RunsFilter(job_name="publish"))]
        assert statuses == [dg.DagsterRunStatus.SUCCESS]

    # The same tables as a clean run, row for row (no work table of the killed silver pass left behind).
    rebuilt, reference = tables(deployment.database), tables(clean_run.database)
    assert sorted(rebuilt) == sorted(reference)
    assert {name: len(rows) for name, rows in rebuilt.items()} == {name: len(rows) for name, rows in reference.items()}
    assert len(rebuilt["gold.sft"]) == 10 and len(rebuilt["gold.rl_prompts"]) == 40
    for name in reference:
        assert rebuilt[name] == reference[name], name


HOLD_THE_FILE = """
import sys, duckdb
conn = duckdb.connect(sys.argv[1])
print("holding", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_a_run_fails_fast_while_another_process_holds_the_warehouse(
    tmp_path: Path, deploy, clean_run: Deployment
) -> None:
    # A second deployment (its own Dagster home, so no shared pool) on a copy of the clean warehouse, whose landing
    # data has changed since: a run that got as far as ingesting would rewrite bronze.
    registry = write_landing(tmp_path / "landing", chats=12)
    deployment = deploy(tmp_path, registry)
    shutil.copy(clean_run.database, deployment.database)
    bronze_sql = "SELECT * FROM bronze.records ORDER BY ALL"  # ingested_at and run_id too: a rewrite changes them
    with duckdb.connect(str(deployment.database), read_only=True) as conn:
        bronze_before = conn.execute(bronze_sql).fetchall()

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_FILE, str(deployment.database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "holding\n"
        result = deployment.posttrain("run")
    finally:
        holder.stdin.close()
        holder.wait()

    assert result.returncode == 1
    assert f"the DuckDB file {deployment.database} is held by process {holder.pid} (" in result.stderr
    assert "stopped before ingesting or rewriting anything" in result.stderr
    assert "ingested" not in result.stdout
    with deployment.instance() as instance:
        assert instance.get_run_records() == []  # no run started, so no partition was rewritten
    with duckdb.connect(str(deployment.database), read_only=True) as conn:
        assert conn.execute(bronze_sql).fetchall() == bronze_before
        assert conn.execute("SELECT count(*) FROM bronze.records WHERE source = 'chats'").fetchone() == (10,)


# Two small jobs in the duckdb pool, run in their own processes. A "waiter" runs as posttrain runs a job
# (runs.run_job_in_process): a first step that holds the slot until told to go, then a second. A "holder" runs as
# the daemon launches a run, straight into Dagster's queue for the pool, and holds the slot until released; it is
# tagged with its process so that its death can be recognised. Markers are files: <name>.<marker>.
POOL_JOBS = """
import sys, time
from pathlib import Path

import dagster as dg

from posttrain_assets import runs

role, name, workdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])


def mark(marker):
    (workdir / f"{name}.{marker}").touch()


def wait_for(marker):
    while not (workdir / f"{name}.{marker}").exists():
        time.sleep(0.02)


@dg.op(pool=runs.DUCKDB_POOL)
def first():
    mark("first_running")
    wait_for("go")


@dg.op(pool=runs.DUCKDB_POOL, ins={"after": dg.In(dg.Nothing)})
def second():
    mark("second_ran")


@dg.op(pool=runs.DUCKDB_POOL)
def hold():
    mark("holding")
    wait_for("release")


@dg.job
def two_steps():
    second(after=first())


@dg.job
def holder():
    hold()


instance = dg.DagsterInstance.get()
wait_for("start")
if role == "waiter":
    runs.run_job_in_process(two_steps, instance, database=str(workdir / f"{name}.duckdb"))
else:
    holder.execute_in_process(instance=instance, tags=runs.RunProcess.current().tags())
"""


@dataclass
class PoolScene:
    """A waiter whose second step waits, inside Dagster's step loop, for the slot a holder took in between."""

    deployment: Deployment
    instance: dg.DagsterInstance
    workdir: Path
    waiter: subprocess.Popen[str]
    holder: subprocess.Popen[str]
    holder_run_id: str

    def output(self, name: str) -> str:
        return (self.workdir / f"{name}.out").read_text()

    def run_id(self, job_name: str) -> str:
        (record,) = self.instance.get_run_records(dg.RunsFilter(job_name=job_name))
        return record.dagster_run.run_id

    def status(self, run_id: str) -> dg.DagsterRunStatus:
        return self.instance.get_run_by_id(run_id).status

    def pool_run_ids(self) -> list[str]:
        info = self.instance.event_log_storage.get_concurrency_info(runs.DUCKDB_POOL)
        return sorted({s.run_id for s in info.claimed_slots} | {p.run_id for p in info.pending_steps})

    def touch(self, name: str, marker: str) -> None:
        (self.workdir / f"{name}.{marker}").touch()

    def exists(self, name: str, marker: str) -> bool:
        return (self.workdir / f"{name}.{marker}").exists()


@pytest.fixture
def pool_scene(tmp_path: Path, landing: Path) -> Iterator[PoolScene]:
    deployment = make_deployment(tmp_path, landing, tmp_path / "no_tokenizer")  # the pool jobs tokenize nothing
    workdir = tmp_path / "markers"
    workdir.mkdir()
    with deployment.instance() as instance:
        started = {
            name: deployment.start("-c", POOL_JOBS, role, name, str(workdir), stdout=workdir / f"{name}.out")
            for role, name in (("waiter", "waiter"), ("holder", "holder"))
        }
        scene = PoolScene(deployment, instance, workdir, started["waiter"], started["holder"], "")
        try:
            scene.touch("waiter", "start")
            wait_until(lambda: scene.exists("waiter", "first_running"), "the waiter's first step runs", scene.waiter)
            scene.touch("holder", "start")
            # The holder queues for the slot the waiter holds; when the waiter's first step ends, it gets the slot.
            wait_until(lambda: len(scene.pool_run_ids()) == 2, "the holder queues for the slot", scene.holder)
            scene.touch("waiter", "go")
            wait_until(lambda: scene.exists("holder", "holding"), "the holder holds the slot", scene.holder)
            scene.holder_run_id = scene.run_id("holder")
            yield scene
        finally:
            for process in started.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()


@pytest.mark.slow  # two `posttrain` processes queueing for the pool: about 8 s
def test_a_waiting_run_names_the_holder_and_goes_on_when_the_holder_dies(pool_scene: PoolScene) -> None:
    scene = pool_scene
    waiting = (
        f"is waiting for the 'duckdb' pool (1 slot(s), one DuckDB writer at a time): held by run {scene.holder_run_id} "
        f"(holder, STARTED, run worker pid {scene.holder.pid} on "
    )
    wait_until(lambda: waiting in scene.output("waiter"), "the waiter says what it waits for", scene.waiter)
    assert not scene.exists("waiter", "second_ran")

    scene.holder.send_signal(signal.SIGKILL)
    scene.holder.wait()
    assert scene.waiter.wait(timeout=SAFETY_SECONDS) == 0, scene.output("waiter")
    assert scene.exists("waiter", "second_ran")
    assert f"run {scene.holder_run_id} (holder) was left STARTED by pid {scene.holder.pid} on " in scene.output(
        "waiter"
    )
    assert scene.status(scene.holder_run_id) == dg.DagsterRunStatus.FAILURE
    assert scene.status(scene.run_id("two_steps")) == dg.DagsterRunStatus.SUCCESS
    assert scene.pool_run_ids() == []


@pytest.mark.slow  # two `posttrain` processes queueing for the pool: about 8 s
def test_a_waiting_run_stops_on_sigterm_and_a_new_one_waits_out_loud(pool_scene: PoolScene) -> None:
    scene = pool_scene
    wait_until(lambda: "is waiting for the 'duckdb' pool" in scene.output("waiter"), "the waiter waits", scene.waiter)
    waiter_run_id = scene.run_id("two_steps")

    # SIGTERM reaches a run waiting inside Dagster's step loop (which only records it): the run stops.
    scene.waiter.send_signal(signal.SIGTERM)
    assert scene.waiter.wait(timeout=SAFETY_SECONDS) == 128 + signal.SIGTERM
    assert (
        f"SIGTERM: stopped run {waiter_run_id} while it waited for the 'duckdb' pool "
        f"(held by run {scene.holder_run_id})" in scene.output("waiter")
    )
    assert scene.status(waiter_run_id) == dg.DagsterRunStatus.FAILURE
    assert not scene.exists("waiter", "second_ran")
    assert scene.pool_run_ids() == [scene.holder_run_id]

    # A run about to start waits before it starts, saying for what; SIGTERM ends it there, before any run exists.
    late = scene.deployment.start(
        "-c", POOL_JOBS, "waiter", "late", str(scene.workdir), stdout=scene.workdir / "late.out"
    )
    try:
        scene.touch("late", "start")
        line = (
            "waiting for the 'duckdb' pool (1 slot(s), one DuckDB writer at a time): "
            f"held by run {scene.holder_run_id} (holder"
        )
        wait_until(lambda: line in scene.output("late"), "the late run says what it waits for", late)
        late.send_signal(signal.SIGTERM)
        assert late.wait(timeout=SAFETY_SECONDS) == -signal.SIGTERM
    finally:
        if late.poll() is None:
            late.kill()
            late.wait()
    assert len(scene.instance.get_run_records(dg.RunsFilter(job_name="two_steps"))) == 1  # the late one never began

    scene.touch("holder", "release")
    assert scene.holder.wait(timeout=SAFETY_SECONDS) == 0
    assert scene.status(scene.holder_run_id) == dg.DagsterRunStatus.SUCCESS
    assert scene.pool_run_ids() == []


# A watch whose poll never times out within the safety net: it ends only if its run's end wakes it.
WATCH_ENDS = """
import sys
import dagster as dg
from posttrain_assets import runs

runs.POLL_SECONDS = float(sys.argv[1])
instance = dg.DagsterInstance.get()
watch = runs.PoolWatch(instance, "a-run-that-holds-nothing")
with watch:
    print("watching", watch._thread.is_alive(), flush=True)
print("ended", watch._thread.is_alive(), flush=True)
"""


def test_a_pool_watch_ends_with_its_run_not_at_its_next_poll(tmp_path: Path, landing: Path) -> None:
    """Every run ``posttrain`` starts in process is watched from a thread that polls the pool; ending the run wakes
    the thread, so the run returns when it ends instead of up to a poll period later (0.7 s a run on average)."""
    deployment = make_deployment(tmp_path, landing, tmp_path / "no_tokenizer")
    with deployment.instance():  # creates the storage
        pass
    result = subprocess.run(
        [sys.executable, "-c", WATCH_ENDS, str(10 * SAFETY_SECONDS)],
        env=deployment.env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=SAFETY_SECONDS,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["watching True", "ended False"]


# Runs as the daemon, a sensor, a schedule or the UI launch them: execute_job, in a process of its own (the run
# worker), with the project's default executor (posttrain_assets/definitions.py) unless told `multiprocess`. The
# "hold" job's step takes the duckdb pool's only slot and keeps it until released; the "count" job's asset, in the
# same pool, appends its run id to a DuckDB table. Markers are files: <name>.<marker>. A file of its own, not `-c`,
# so that execute_job can reconstruct the jobs.
LAUNCHED_JOBS = """
import sys, time
from pathlib import Path

import dagster as dg
import duckdb

from posttrain_assets import runs
from posttrain_assets.definitions import IN_PROCESS_BY_DEFAULT

name, workdir = sys.argv[2], Path(sys.argv[3])


def mark(marker):
    (workdir / f"{name}.{marker}").touch()


@dg.op(pool=runs.DUCKDB_POOL)
def hold():
    mark("holding")
    while not (workdir / f"{name}.release").exists():
        time.sleep(0.02)


@dg.asset(pool=runs.DUCKDB_POOL)
def counted(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    with duckdb.connect(str(workdir / "count.duckdb")) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS counted (run_id VARCHAR)")
        conn.execute("INSERT INTO counted VALUES (?)", [context.run_id])
        (rows,) = conn.execute("SELECT count(*) FROM counted").fetchone()
    return dg.MaterializeResult(metadata={"rows": rows})


def hold_job():
    return dg.JobDefinition(
        graph_def=dg.GraphDefinition(name="hold", node_defs=[hold]), executor_def=IN_PROCESS_BY_DEFAULT
    )


def count_job():
    return dg.Definitions(
        assets=[counted],
        jobs=[dg.define_asset_job("count", selection=[counted])],
        executor=IN_PROCESS_BY_DEFAULT,
    ).resolve_job_def("count")


if __name__ == "__main__":  # not again when execute_job imports this file to reconstruct the job
    job_name, executor = sys.argv[1], sys.argv[4]
    config = {"execution": {"config": {"multiprocess": {}}}} if executor == "multiprocess" else None
    with dg.execute_job(
        dg.reconstructable({"hold": hold_job, "count": count_job}[job_name]),
        instance=dg.DagsterInstance.get(),
        run_config=config,
    ) as result:
        print("success" if result.success else "failure", result.run_id, flush=True)
"""


@dataclass
class Launcher:
    """Starts LAUNCHED_JOBS runs in their own processes, on one deployment."""

    deployment: Deployment
    instance: dg.DagsterInstance
    workdir: Path
    started: list[subprocess.Popen[str]]

    def start(self, job: str, name: str, executor: str = "default") -> subprocess.Popen[str]:
        process = self.deployment.start(
            str(self.workdir / "launched_jobs.py"),
            job,
            name,
            str(self.workdir),
            executor,
            stdout=self.workdir / f"{name}.out",
        )
        self.started.append(process)
        return process

    def exists(self, name: str, marker: str) -> bool:
        return (self.workdir / f"{name}.{marker}").exists()

    def output(self, name: str) -> str:
        return (self.workdir / f"{name}.out").read_text()

    def run_ids(self, job_name: str) -> list[str]:
        return [r.dagster_run.run_id for r in self.instance.get_run_records(dg.RunsFilter(job_name=job_name))]

    def run(self, job_name: str) -> dg.DagsterRun:
        (record,) = self.instance.get_run_records(dg.RunsFilter(job_name=job_name))
        return record.dagster_run

    def pool(self) -> tuple[list[str], list[str]]:
        """(run ids of the slots claimed, run ids of the steps queued for a slot) in the duckdb pool."""
        info = self.instance.event_log_storage.get_concurrency_info(runs.DUCKDB_POOL)
        queued = [p.run_id for p in info.pending_steps if p.assigned_timestamp is None]
        return [s.run_id for s in info.claimed_slots], queued

    def evaluate_sensor(self) -> str:
        """The dead_run_sensor evaluated once, as the daemon would on this host: its skip message."""
        return dead_run_sensor(dg.build_sensor_context(instance=self.instance)).skip_message


@pytest.fixture
def launcher(tmp_path: Path, landing: Path) -> Iterator[Launcher]:
    deployment = make_deployment(tmp_path, landing, tmp_path / "no_tokenizer")  # these jobs tokenize nothing
    workdir = tmp_path / "launched"
    workdir.mkdir()
    (workdir / "launched_jobs.py").write_text(LAUNCHED_JOBS)
    with deployment.instance() as instance:
        scene = Launcher(deployment, instance, workdir, [])
        try:
            yield scene
        finally:
            for process in scene.started:
                if process.poll() is None:
                    process.kill()
                    process.wait()


@pytest.mark.slow  # three run worker processes: about 20 s
def test_a_killed_run_worker_is_failed_by_the_sensor_and_the_queued_run_goes_on(launcher: Launcher) -> None:
    holder = launcher.start("hold", "holder")
    wait_until(lambda: launcher.exists("holder", "holding"), "the holder's step holds the slot", holder)
    held = launcher.run("hold")
    # The run worker recorded itself: this process, for this run.
    assert held.tags[runs.TAG_PID] == str(holder.pid)
    assert held.tags[runs.TAG_RUN_ID] == held.run_id
    recorded = runs.RunProcess.of_run(held)
    assert recorded.host == socket.gethostname()
    assert recorded.started == pytest.approx(psutil.Process(holder.pid).create_time(), abs=0.001)
    counter = launcher.start("count", "counter")
    wait_until(
        lambda: (queued := launcher.run_ids("count")) and launcher.pool() == ([held.run_id], queued),
        "the count run queues for the slot",
        counter,
    )
    counted_run_id = launcher.run("count").run_id

    holder.send_signal(signal.SIGKILL)  # as the out-of-memory killer would: nothing of the run can clean up
    holder.wait()
    # What blocked every later run: the dead run still STARTED, holding the pool's only slot, the next one queued.
    assert launcher.run("hold").status == dg.DagsterRunStatus.STARTED
    assert launcher.pool() == ([held.run_id], [counted_run_id])
    assert not (launcher.workdir / "count.duckdb").exists()

    message = launcher.evaluate_sensor()
    assert message.startswith(f"run {held.run_id} (hold) was left STARTED by pid {holder.pid} on ")
    assert message.endswith(", which is gone: marked failed, pool slots freed")
    assert launcher.run("hold").status == dg.DagsterRunStatus.FAILURE
    failure = launcher.instance.get_records_for_run(held.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    assert f"The process that ran this run (pid {holder.pid} on " in failure[0].event_log_entry.message

    # The queued run goes on and materialises its asset.
    assert counter.wait(timeout=SAFETY_SECONDS) == 0, launcher.output("counter")
    assert launcher.output("counter").splitlines()[-1] == f"success {counted_run_id}"
    assert launcher.run("count").status == dg.DagsterRunStatus.SUCCESS
    event = launcher.instance.get_latest_materialization_event(dg.AssetKey("counted"))
    assert event.run_id == counted_run_id
    assert event.asset_materialization.metadata["rows"] == dg.IntMetadataValue(1)
    with duckdb.connect(str(launcher.workdir / "count.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT run_id FROM counted").fetchall() == [(counted_run_id,)]
    assert launcher.pool() == ([], [])
    assert launcher.evaluate_sensor() == "no run in progress has lost its process"


@pytest.mark.slow  # two run worker processes, one with a step process: about 20 s
def test_the_sensor_never_fails_a_live_run(launcher: Launcher) -> None:
    holder = launcher.start("hold", "holder")
    wait_until(lambda: launcher.exists("holder", "holding"), "the holder's step holds the slot", holder)
    held = launcher.run("hold")
    assert held.tags[runs.TAG_PID] == str(holder.pid)
    for _ in range(3):
        assert launcher.evaluate_sensor() == "no run in progress has lost its process"
    assert launcher.run("hold").status == dg.DagsterRunStatus.STARTED
    assert launcher.pool() == ([held.run_id], [])
    (launcher.workdir / "holder.release").touch()
    assert holder.wait(timeout=SAFETY_SECONDS) == 0, launcher.output("holder")
    assert launcher.output("holder").splitlines()[-1] == f"success {held.run_id}"
    assert launcher.run("hold").status == dg.DagsterRunStatus.SUCCESS

    # A multiprocess run is not recorded: its run worker is not the process that runs its step, which could still
    # be writing when the run worker is gone. The sensor leaves it alone.
    step_holder = launcher.start("hold", "step_holder", executor="multiprocess")
    wait_until(lambda: launcher.exists("step_holder", "holding"), "the multiprocess step holds the slot", step_holder)
    (multiprocess_run,) = [
        r.dagster_run
        for r in launcher.instance.get_run_records(dg.RunsFilter(job_name="hold"))
        if r.dagster_run.run_id != held.run_id
    ]
    assert runs.TAG_PID not in multiprocess_run.tags
    assert launcher.evaluate_sensor() == "no run in progress has lost its process"
    assert launcher.instance.get_run_by_id(multiprocess_run.run_id).status == dg.DagsterRunStatus.STARTED
    (launcher.workdir / "step_holder.release").touch()
    assert step_holder.wait(timeout=SAFETY_SECONDS) == 0, launcher.output("step_holder")
    assert launcher.instance.get_run_by_id(multiprocess_run.run_id).status == dg.DagsterRunStatus.SUCCESS


@dg.op
def nothing() -> None:
    pass


@dg.job
def one_step() -> None:
    nothing()


def test_a_process_recorded_for_another_run_is_not_this_runs(tmp_path: Path, landing: Path) -> None:
    """A re-execution copies its parent's tags, the parent's process among them, until its own run worker records
    itself; recovery must not fail it for its parent's dead process."""
    deployment = make_deployment(tmp_path, landing, tmp_path / "no_tokenizer")
    gone = runs.RunProcess(2**22 + 1, socket.gethostname(), 0.0)  # above Linux's highest pid: no such process
    assert gone.is_gone()
    with deployment.instance() as instance:
        copied = instance.create_run_for_job(one_step, tags=gone.tags("the-parent-run-id"))
        own = instance.create_run_for_job(one_step)
        instance.add_run_tags(own.run_id, gone.tags(own.run_id))
        assert runs.RunProcess.of_run(instance.get_run_by_id(copied.run_id)) is None
        assert runs.recover_dead_runs(instance) == [
            f"run {own.run_id} (one_step) was left NOT_STARTED by {gone}, which is gone: marked failed, "
            "pool slots freed"
        ]
        assert instance.get_run_by_id(copied.run_id).status == dg.DagsterRunStatus.NOT_STARTED
        assert instance.get_run_by_id(own.run_id).status == dg.DagsterRunStatus.FAILURE
