"""posttrain_assets.parallel with POSTTRAIN_EXECUTOR=ray, on a Ray instance started in this process
(``ray.init(num_cpus=2)``): the same results in input order as the local path, a worker's error as its own
exception, a process per item when asked, a killed worker's batch run again exactly once, and an unreachable
cluster reported by name. The two-node cluster and the whole graph: test_ray_cluster.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray

from posttrain_assets import ray_executor
from posttrain_assets.parallel import TimeLimit, map_batches
from posttrain_assets.ray_executor import RayClusterUnreachable


def scaled_rows(offset: int, batch: list[int]) -> tuple[int, list[int]]:
    """A batch's rows shifted by ``offset``, with the process that computed them."""
    return os.getpid(), [offset + x for x in batch]


def fails_on_three(_shared: None, item: int) -> int:
    if item == 3:
        raise ValueError(f"bad item {item}")
    return item


def executor_inside(_shared: None, item: int) -> tuple[str, list[list[int]], bool]:
    """The executor a task sees, and a nested map_batches run from inside the task: its rows, and whether they were
    computed in the task's own process (``processes=1`` locally; on Ray they would go to other workers)."""
    nested = list(map_batches(scaled_rows, item, [[1], [2]], processes=1))
    return os.environ["POSTTRAIN_EXECUTOR"], [rows for _, rows in nested], {pid for pid, _ in nested} == {os.getpid()}


def dies_once(marker_dir: str, item: int) -> list[int]:
    """Item 5's first attempt SIGKILLs its own worker process (as the OOM killer or a lost node would), leaving a
    marker so the attempt Ray runs again computes normally."""
    marker = Path(marker_dir) / f"killed-{item}"
    if item == 5 and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return [item * 10 + k for k in range(3)]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A Ray instance of this process with two CPUs and a small object store, its files under a temp dir. Token
    authentication off: left unset, Ray turns it on for a new local instance and writes ~/.ray/auth_token, which
    every later `ray start` of this user would then pick up."""
    root = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's Unix sockets live under it
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=2,
            object_store_memory=100 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=root,
        )
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def on_ray(local_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTTRAIN_EXECUTOR", "ray")


def test_ray_gives_the_local_results_in_input_order(on_ray: None) -> None:
    batches = [[i, i + 1] for i in range(12)]
    before = sum(ray_executor.TASKS_PER_NODE.values())
    on_ray_results = list(map_batches(scaled_rows, 100, iter(batches), processes=2))
    assert sum(ray_executor.TASKS_PER_NODE.values()) - before == 12
    assert [rows for _, rows in on_ray_results] == [[100 + i, 101 + i] for i in range(12)]
    assert os.getpid() not in {pid for pid, _ in on_ray_results}
    os.environ["POSTTRAIN_EXECUTOR"] = "local"  # the same call on this machine (monkeypatch restores it)
    local_results = list(map_batches(scaled_rows, 100, iter(batches), processes=2))
    assert [rows for _, rows in local_results] == [rows for _, rows in on_ray_results]


def test_processes_one_still_runs_on_the_cluster(on_ray: None) -> None:
    results = list(map_batches(scaled_rows, 0, [[1], [2]], processes=1))
    assert [rows for _, rows in results] == [[1], [2]]
    assert os.getpid() not in {pid for pid, _ in results}


def test_a_failing_item_raises_its_own_error_after_the_items_before_it(on_ray: None) -> None:
    seen = []
    with pytest.raises(ValueError, match="bad item 3"):
        for value in map_batches(fails_on_three, None, range(8), processes=2):
            seen.append(value)
    assert seen == [0, 1, 2]


def test_fresh_process_per_item_gives_each_item_its_own_worker(on_ray: None) -> None:
    results = list(map_batches(scaled_rows, 0, [[i] for i in range(4)], processes=2, fresh_process_per_item=True))
    assert [rows for _, rows in results] == [[0], [1], [2], [3]]
    assert len({pid for pid, _ in results}) == 4


def test_inside_a_task_map_batches_runs_locally(on_ray: None) -> None:
    assert list(map_batches(executor_inside, None, [10, 20], processes=2)) == [
        ("local", [[11], [12]], True),
        ("local", [[21], [22]], True),
    ]


def test_a_time_limited_call_stays_on_this_machine(on_ray: None) -> None:
    before = sum(ray_executor.TASKS_PER_NODE.values())
    results = list(map_batches(scaled_rows, 0, [[1], [2]], processes=2, time_limit=TimeLimit(60, (0, []))))
    assert [rows for _, rows in results] == [[1], [2]]
    assert sum(ray_executor.TASKS_PER_NODE.values()) == before  # no Ray task


def test_a_worker_killed_mid_stage_loses_and_duplicates_nothing(on_ray: None, tmp_path: Path) -> None:
    results = list(map_batches(dies_once, str(tmp_path), range(10), processes=2))
    assert results == [[i * 10 + k for k in range(3)] for i in range(10)]
    # The kill happened (item 5's first attempt died), and Ray ran that item again, once, in another process.
    killed = tmp_path / "killed-5"
    assert killed.exists() and int(killed.read_text()) != os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == ["killed-5"]


@contextmanager
def port_without_listener() -> Iterator[int]:
    """A loopback port bound (so nothing else takes it) but not listening: a connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_no_cluster_at_ray_address_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # As in a fresh process (a Dagster step) that has not connected yet, whatever this test process did before.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("POSTTRAIN_EXECUTOR", "ray")
    with port_without_listener() as port:
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        with pytest.raises(RayClusterUnreachable, match=f"no Ray cluster answers at RAY_ADDRESS=127.0.0.1:{port}"):
            list(map_batches(scaled_rows, 0, [[1]], processes=2))
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(RayClusterUnreachable, match="POSTTRAIN_EXECUTOR=ray needs RAY_ADDRESS"):
        list(map_batches(scaled_rows, 0, [[1]], processes=2))


def test_an_unknown_executor_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTTRAIN_EXECUTOR", "dask")
    with pytest.raises(ValueError, match="POSTTRAIN_EXECUTOR='dask': expected one of local, ray"):
        list(map_batches(scaled_rows, 0, [[1]], processes=2))
