"""The demo graph on a real two-node Ray cluster (two ``ray start`` nodes on loopback, one CPU and a small object
store each), with one task's worker process killed by the test mid-stage: tasks run on both nodes and every bronze,
silver and gold table is identical to the local run (nothing lost or duplicated). RL difficulty rollouts spread over
both nodes (one policy actor each) give the local run's token ids and estimates. And a run pointed at an address
where no cluster answers fails at once, naming RAY_ADDRESS."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import ray

from posttrain_assets import ray_executor
from posttrain_assets.demo.generator import generate_demo_data
from posttrain_assets.pipeline import RunFailed
from posttrain_assets.ray_executor import RayPolicyBackend
from posttrain_assets.records.formats import get_adapter
from posttrain_assets.rl import rollouts
from posttrain_assets.rl.policy_backends import TorchDecoder
from posttrain_assets_tests.graph import deployed
from posttrain_assets_tests.real_data import REAL_DATA
from posttrain_assets_tests.test_pipeline_demo import snapshot

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
OBJECT_STORE_BYTES = 150 * 1024 * 1024
# A throw-away cluster on loopback, without token authentication (Ray's default for a new cluster is to turn it on and
# write ~/.ray/auth_token, which every later `ray start` of this user would pick up). The driver sets the same.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode} before the head listened on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the Ray head did not listen on port {port}")


def ray_start(*args: str, temp_dir: Path, worker_ports: tuple[int, int], log: Path) -> subprocess.Popen:
    """One Ray node in the foreground (``--block``): terminating this process stops the node's own processes, so
    the test stops exactly the nodes it started (``ray stop`` would stop every Ray process of this user)."""
    return subprocess.Popen(
        [
            RAY,
            "start",
            "--block",
            *args,
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={temp_dir}",
            f"--min-worker-port={worker_ports[0]}",
            f"--max-worker-port={worker_ports[1]}",
            "--disable-usage-stats",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **RAY_ENV},
        start_new_session=True,  # a Ctrl-C of pytest does not reach the nodes before the finally below
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_landing")
    generate_demo_data(out, seed=7)
    return out


@contextmanager
def two_node_cluster() -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A head and a second node on loopback, one CPU each; yields the head's address (this process is connected)
    and the two `ray start --block` processes (every process of a node descends from its own)."""
    # Short paths: Ray's sockets live under the temp dir, and a Unix socket path has at most 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(
            ray_start(
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                temp_dir=root / "head",
                worker_ports=(30000, 30499),
                log=root / "head.log",
            )
        )
        deadline = time.monotonic() + 120
        wait_for_port(port, nodes[0], deadline)
        address = f"127.0.0.1:{port}"
        nodes.append(
            ray_start(
                f"--address={address}", temp_dir=root / "node2", worker_ports=(30500, 30999), log=root / "node2.log"
            )
        )
        ray.init(address=address, log_to_driver=False)
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if time.monotonic() > deadline or nodes[1].poll() is not None:
                raise RuntimeError(f"the second node did not join: {(root / 'node2.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield address, nodes
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            stop(node)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def killing_one_task_worker(nodes: list[subprocess.Popen]) -> Iterator[list[str]]:
    """While the block runs, SIGKILL the first worker process of these nodes seen running a task (Ray titles it
    ``ray::_run``, after the task's function), as the OOM killer or a lost machine would; yields the killed process's
    pid and title once it happened. Only descendants of the test's own nodes are looked at."""
    killed: list[str] = []
    done = threading.Event()

    def hunt() -> None:
        while not done.is_set():
            for node in nodes:
                try:
                    descendants = psutil.Process(node.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                for process in descendants:
                    try:
                        title = " ".join(process.cmdline()).strip()
                        if title.startswith("ray::_run"):
                            process.kill()
                            killed.append(f"{process.pid} {title}")
                            return
                    except psutil.Error:  # gone meanwhile
                        continue
            done.wait(0.02)

    hunter = threading.Thread(target=hunt, name="kill-one-task-worker", daemon=True)
    hunter.start()
    try:
        yield killed
    finally:
        done.set()
        hunter.join()


def test_a_run_pointed_at_no_cluster_fails_naming_ray_address(
    demo_dir: Path, tmp_path: Path, tokenizer_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not ray.is_initialized()
    with socket.socket() as closed:  # bound, not listening: a connection is refused
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        monkeypatch.setenv("POSTTRAIN_EXECUTOR", "ray")
        monkeypatch.setenv("RAY_ADDRESS", address)
        with deployed(demo_dir / "sources.yaml", tmp_path, tokenizer_cache_dir) as graph:
            with pytest.raises(RunFailed, match=f"no Ray cluster answers at RAY_ADDRESS={address}"):
                graph.run_all()
            # Bronze was ingested (no batch work there); the first stage with batches stopped the run.
            assert graph.query("SELECT count(*) FROM bronze.records") == [(2926,)]


def test_demo_graph_on_two_ray_nodes_with_a_worker_killed_matches_the_local_run(
    demo_dir: Path, tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POSTTRAIN_EXECUTOR", raising=False)
    with deployed(demo_dir / "sources.yaml", tmp_path_factory.mktemp("local"), tokenizer_cache_dir) as graph:
        graph.run_all()
        local = snapshot(graph)

    monkeypatch.setenv("RAY_AUTH_MODE", RAY_ENV["RAY_AUTH_MODE"])
    with two_node_cluster() as (address, nodes), killing_one_task_worker(nodes) as killed:
        node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(node_ids) == 2
        monkeypatch.setenv("POSTTRAIN_EXECUTOR", "ray")
        monkeypatch.setenv("RAY_ADDRESS", address)
        ray_executor.TASKS_PER_NODE.clear()
        with deployed(demo_dir / "sources.yaml", tmp_path_factory.mktemp("on_ray"), tokenizer_cache_dir) as graph:
            graph.run_all()
            on_ray = snapshot(graph)
        tasks_per_node = dict(ray_executor.TASKS_PER_NODE)

    print(f"tasks per node: {tasks_per_node}; killed mid-task: {killed}")
    # A task's worker process was SIGKILLed while it ran a batch (Ray ran the batch again), and that was invisible.
    assert killed, "no task worker was seen running"
    # Every stage with batches ran on the cluster, on both nodes.
    assert set(tasks_per_node) == node_ids, json.dumps(tasks_per_node)
    assert all(count > 0 for count in tasks_per_node.values())
    assert set(on_ray) == set(local)
    differing = [name for name in local if on_ray[name] != local[name]]
    assert differing == [], differing
    assert sum(len(rows) for name, rows in local.items() if name.startswith(("silver.", "gold."))) > 0


def gsm8k_seeds(count: int) -> list[dict]:
    """The first ``count`` GSM8K training problems (the vendored real data) as rollout seeds."""
    adapter = get_adapter("gsm8k")
    seeds = []
    with (REAL_DATA / "gsm8k" / "train.jsonl").open(encoding="utf-8") as fh:
        for _ in range(count):
            record = adapter.parse(json.loads(next(fh)), "rl")
            seeds.append(
                {
                    "id": record.content_id(),
                    "messages": record.messages,
                    "answer": record.answer,
                    "verifier": record.verifier,
                }
            )
    return seeds


def test_rollouts_on_two_ray_nodes_match_the_local_run(
    tokenizer_cache_dir: Path, smollm2_tokenizer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Difficulty rollouts with POSTTRAIN_EXECUTOR=ray: one policy actor per node, each loading the model once, the
    prompts sent to both; the same token ids and estimates as in this process."""
    seeds = gsm8k_seeds(4)
    policy = rollouts.default_policy(tokenizer_cache_dir)
    sampling = rollouts.SamplingParams(k=2, max_new_tokens=16, seed=0)
    monkeypatch.delenv("POSTTRAIN_EXECUTOR", raising=False)
    local_backend = rollouts.policy_backend(policy, smollm2_tokenizer)
    assert isinstance(local_backend, TorchDecoder)
    local_ids = rollouts.sample_token_ids(
        seeds, policy, sampling, tokenizer=smollm2_tokenizer, batch_size=4, backend=local_backend
    )
    local = rollouts.estimate_difficulty(
        seeds, policy, sampling, tokenizer=smollm2_tokenizer, batch_size=4, backend=local_backend
    )

    monkeypatch.setenv("RAY_AUTH_MODE", RAY_ENV["RAY_AUTH_MODE"])
    with two_node_cluster() as (address, _nodes):
        node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        monkeypatch.setenv("POSTTRAIN_EXECUTOR", "ray")
        monkeypatch.setenv("RAY_ADDRESS", address)
        ray_executor.ROLLOUT_CALLS_PER_NODE.clear()
        # max_rows = K: one prompt per actor call, so the four prompts are dealt to both actors.
        backend = rollouts.policy_backend(policy, smollm2_tokenizer, max_rows=sampling.k)
        assert isinstance(backend, RayPolicyBackend)
        try:
            on_ray_ids = rollouts.sample_token_ids(
                seeds, policy, sampling, tokenizer=smollm2_tokenizer, batch_size=4, backend=backend
            )
            on_ray = rollouts.estimate_difficulty(
                seeds, policy, sampling, tokenizer=smollm2_tokenizer, batch_size=4, backend=backend
            )
            actors = len(backend.actors())
        finally:
            backend.close()
        calls_per_node = dict(ray_executor.ROLLOUT_CALLS_PER_NODE)

    print(f"rollout calls per node: {calls_per_node}")
    assert actors == 2
    assert set(calls_per_node) == node_ids  # both nodes' actors sampled
    assert sum(calls_per_node.values()) == 8  # 4 prompts, one per call, in each of the two passes
    assert list(on_ray_ids) == [s["id"] for s in seeds]
    assert on_ray_ids == local_ids  # token by token
    assert all(len(samples) == 2 and all(1 <= len(t) <= 16 for t in samples) for samples in local_ids.values())
    assert on_ray == local
    assert [e.id for e in on_ray] == [s["id"] for s in seeds]
