"""The Ray backend of :func:`posttrain_assets.parallel.map_batches` (``POSTTRAIN_EXECUTOR=ray``): the same pure batch
functions, run as Ray tasks on the cluster at Ray's own ``RAY_ADDRESS``, results yielded in input order.

What runs where: the caller (a Dagster step, ``posttrain run``) stays the driver. It reads DuckDB, builds the
batches, submits them and writes the results; workers on the cluster's nodes run ``fn(shared, item)`` and never open
DuckDB. ``shared`` (tokenizer, registry, configuration) is put in the object store once per call (``ray.put``) and
deserialised once per worker process, not per task (:func:`_run`); the items and results travel per task.

Exactly once: results are collected by position (one object reference per item, read in input order), so a task
Ray runs again after its worker process or node died (``max_retries``) still fills its one slot; nothing is appended
on completion. An exception raised by ``fn`` is not retried (a bug fails the same way twice) and is raised in the
caller as the worker's own exception type (Ray's ``RayTaskError`` subclasses it). A task whose retries are used up
raises ``ray.exceptions.WorkerCrashedError`` (or ``NodeDiedError``) there, so nothing is lost silently.

At most ``2 x the cluster's CPUs`` tasks are in flight, so the driver holds a bounded number of batches however
long the stream. ``fresh_process_per_item`` maps to ``max_calls=1``: Ray starts a worker process for each item
and retires it after that one call. Inside a task, ``map_batches`` runs locally (the task's environment sets
``POSTTRAIN_EXECUTOR=local``), so a task's own worker processes are on its node.

Policy rollouts (RL difficulty) keep a model loaded, so they run in actors rather than tasks:
:class:`RayPolicyBackend`, one actor per node, chosen by :func:`posttrain_assets.rl.rollouts.policy_backend` when the
executor is ``ray``.

Why a plain Ray client and not dagster-ray: map_batches is called from pure stage code (the silver pass, dedup,
verifiers) that has no Dagster context, and a Ray task per batch is all it needs; dagster-ray's resources and run
launchers manage clusters (KubeRay, a local cluster per step) and would add a second way of starting workers beside
this one. Which cluster to use is Ray's own ``RAY_ADDRESS``, as in every Ray program.
"""

from __future__ import annotations

import os
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from posttrain_assets.settings import EXECUTOR, RAY_ADDRESS

Shared = TypeVar("Shared")
Item = TypeVar("Item")
Result = TypeVar("Result")

# How often Ray runs a task again after its worker process (or node) died; Ray's own default is 3.
MAX_RETRIES = 3
# How long the driver waits for a TCP connection to the cluster's head before it reports the cluster unreachable:
# ray.init itself keeps retrying an address where nothing listens for minutes.
CONNECT_TIMEOUT_SECONDS = 5.0

# The nodes this process's map_batches calls ran tasks on: node id -> tasks (the two-node test reads it).
TASKS_PER_NODE: Counter[str] = Counter()

# In a worker process: the last shared context it deserialised (object id hex, value), so a worker running many
# batches of one call deserialises the tokenizer once, and holds one context at a time.
_worker_shared: tuple[str, Any] | None = None


class RayClusterUnreachable(RuntimeError):
    """``POSTTRAIN_EXECUTOR=ray`` but the Ray cluster named by ``RAY_ADDRESS`` cannot be reached (or none is
    named)."""


def _head_host_port(address: str) -> tuple[str, int] | None:
    """The host and port to probe for ``address`` (``host:port`` or ``ray://host:port``); None for the forms Ray
    resolves itself (``auto``, ``local``)."""
    bare = address.split("://", 1)[-1]
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host, int(port)


def connect() -> None:
    """Connect this process to the cluster at ``RAY_ADDRESS`` once (a process already connected, e.g. a test's
    ``ray.init``, is used as it is). Raises :class:`RayClusterUnreachable` naming ``RAY_ADDRESS`` rather than
    waiting on an address where no cluster answers."""
    try:
        import ray
    except ImportError:
        raise RayClusterUnreachable(
            f"{EXECUTOR}=ray needs Ray in this environment: pip install -e '.[ray]' (the project's `ray` extra)"
        ) from None

    if ray.is_initialized():
        return
    address = os.environ.get(RAY_ADDRESS, "")
    if not address:
        raise RayClusterUnreachable(
            f"{EXECUTOR}=ray needs {RAY_ADDRESS}: the address of the Ray cluster's head (host:port, as printed by "
            f"`ray start --head`), or unset {EXECUTOR} to run on this machine"
        )
    probe = _head_host_port(address)
    if probe is not None:
        try:
            socket.create_connection(probe, timeout=CONNECT_TIMEOUT_SECONDS).close()
        except OSError as exc:
            raise RayClusterUnreachable(
                f"{EXECUTOR}=ray but no Ray cluster answers at {RAY_ADDRESS}={address} "
                f"(no connection within {CONNECT_TIMEOUT_SECONDS:g} s: {exc}); start one with `ray start --head` or "
                f"point {RAY_ADDRESS} at a running cluster's head"
            ) from None  # this message is the run's error (Dagster reports a chain's innermost cause)
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:
        message = f"{EXECUTOR}=ray but Ray could not connect to {RAY_ADDRESS}={address}: {exc}"
        raise RayClusterUnreachable(message) from None


def _run(fn: Callable[[Any, Any], Any], shared_box: list[Any], item: Any) -> tuple[str, Any]:
    """One task: ``fn(shared, item)`` and the id of the node it ran on. ``shared_box`` holds the shared context's
    object reference (boxed, so Ray does not resolve it per task; it is resolved once per worker process)."""
    global _worker_shared
    import ray

    (shared_ref,) = shared_box
    key = shared_ref.hex()
    if _worker_shared is None or _worker_shared[0] != key:
        _worker_shared = (key, ray.get(shared_ref))
    return ray.get_runtime_context().get_node_id(), fn(_worker_shared[1], item)


_remote_functions: dict[bool, Any] = {}


def _remote(fresh_process_per_item: bool) -> Any:
    """The remote function for :func:`_run`: ``max_calls=1`` retires the worker process after each task (Ray
    allows that option on the function only, not per call)."""
    if fresh_process_per_item not in _remote_functions:
        import ray

        _remote_functions[fresh_process_per_item] = ray.remote(
            num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False, max_calls=1 if fresh_process_per_item else 0
        )(_run)
    return _remote_functions[fresh_process_per_item]


def _task_environment() -> dict[str, str]:
    """What the tasks see of the caller's environment: the project's own variables (a sandbox setting, say), with
    the executor set to local so that a task's own map_batches runs on its node."""
    env = {name: value for name, value in os.environ.items() if name.startswith("POSTTRAIN_")}
    env[EXECUTOR] = "local"
    return env


def map_on_ray(
    fn: Callable[[Shared, Item], Result],
    shared: Shared,
    items: Iterable[Item],
    *,
    fresh_process_per_item: bool = False,
) -> Iterator[Result]:
    """``fn(shared, item)`` for each item as a Ray task, yielded in the order of ``items`` (see the module)."""
    connect()
    import ray

    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    remote = _remote(fresh_process_per_item).options(runtime_env={"env_vars": _task_environment()})
    shared_box = [ray.put(shared)]
    in_flight: deque[Any] = deque()

    def collect() -> Result:
        node_id, result = ray.get(in_flight.popleft())
        TASKS_PER_NODE[node_id] += 1
        return result

    try:
        for item in items:
            in_flight.append(remote.remote(fn, shared_box, item))
            if len(in_flight) >= window:
                yield collect()
        while in_flight:
            yield collect()
    finally:
        for ref in in_flight:  # the caller stopped early or an item failed: drop what is still queued or running
            ray.cancel(ref, force=True)


# --------------------------------------------------------------------------- policy rollouts on the cluster

# The nodes this process's rollout calls ran on: node id -> calls (the two-node test reads it).
ROLLOUT_CALLS_PER_NODE: Counter[str] = Counter()
# How often Ray restarts a policy actor whose process or node died, and runs its interrupted calls again.
ACTOR_RESTARTS = 2


class _PolicyWorker:
    """A Ray actor, one per node (:class:`RayPolicyBackend`): builds the local policy backend once, so the model is
    loaded once per node, and samples the chunks of prompts it is sent. Returns its node id with each result."""

    def __init__(self, policy: Any, tokenizer_dir: str, max_rows: int, num_threads: int | None) -> None:
        from posttrain_assets.rl.rollouts import local_policy_backend

        if num_threads is not None and policy.backend == "torch":
            import torch

            torch.set_num_threads(num_threads)
        self._backend = local_policy_backend(policy, tokenizer_dir, max_rows=max_rows)

    def model_eos_ids(self) -> int | list[int] | None:
        return self._backend.model_eos_ids()

    def sample(self, prompts: list[list[int]], prompt_seeds: list[int], sampling: Any, end_ids: list[int]) -> Any:
        import ray

        samples = self._backend.sample(prompts, prompt_seeds, sampling, end_ids)
        return ray.get_runtime_context().get_node_id(), samples


class RayPolicyBackend:
    """The policy backend on a Ray cluster (``POSTTRAIN_EXECUTOR=ray``): one actor per alive node, pinned to it
    (``NodeAffinitySchedulingStrategy``), each loading the policy once and running the ``policy.backend`` backend
    (torch or vLLM) on the chunks of prompts it is sent. Results are gathered by position (``ActorPool.map`` keeps
    the input order), and a prompt's ids do not depend on the batch, so they equal the local run's (same torch build
    and ``num_threads``). A dead actor is restarted and its call run again (:data:`ACTOR_RESTARTS`), which gives the
    same ids; nothing is appended on completion, so nothing is duplicated.

    The model file must be at ``policy.model_path`` on every node (the project installed the same way there)."""

    def __init__(self, policy: Any, tokenizer_dir: str, *, max_rows: int, num_threads: int | None) -> None:
        self.name = policy.backend
        self._policy = policy
        self._tokenizer_dir = tokenizer_dir
        self._max_rows = max_rows
        self._num_threads = num_threads
        self._actors: list[Any] = []

    def actors(self) -> list[Any]:
        """The actors, one per alive node with CPUs, created on first use."""
        if self._actors:
            return self._actors
        connect()
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        worker = ray.remote(_PolicyWorker)
        for node in ray.nodes():
            cpus = node.get("Resources", {}).get("CPU", 0)
            if not node.get("Alive") or cpus < 1:
                continue
            self._actors.append(
                worker.options(
                    num_cpus=min(self._num_threads or 1, int(cpus)),
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False),
                    max_restarts=ACTOR_RESTARTS,
                    max_task_retries=ACTOR_RESTARTS,
                    runtime_env={"env_vars": _task_environment()},
                ).remote(self._policy, self._tokenizer_dir, self._max_rows, self._num_threads)
            )
        if not self._actors:
            raise RayClusterUnreachable(f"the Ray cluster at {RAY_ADDRESS} has no alive node with a CPU")
        return self._actors

    def model_eos_ids(self) -> int | list[int] | None:
        import ray

        return ray.get(self.actors()[0].model_eos_ids.remote())

    def sample(
        self, prompts: Sequence[Sequence[int]], prompt_seeds: Sequence[int], sampling: Any, end_ids: Sequence[int]
    ) -> list[list[list[int]]]:
        """Every prompt's samples, in order: the prompts go to the actors in chunks (at most ``max_rows // k``
        prompts, and no more than an even share per actor, so every node gets work)."""
        from ray.util import ActorPool

        if len(prompts) != len(prompt_seeds):
            raise ValueError("one seed per prompt is needed")
        actors = self.actors()
        share = -(-len(prompts) // len(actors))
        size = max(1, min(self._max_rows // sampling.k, share))
        chunks = [
            ([list(p) for p in prompts[i : i + size]], list(prompt_seeds[i : i + size]), sampling, list(end_ids))
            for i in range(0, len(prompts), size)
        ]
        results: list[list[list[int]]] = []
        for node_id, samples in ActorPool(actors).map(lambda actor, chunk: actor.sample.remote(*chunk), chunks):
            ROLLOUT_CALLS_PER_NODE[node_id] += 1
            results.extend(samples)
        return results

    def close(self) -> None:
        """Stop the actors (their nodes free the model's memory)."""
        if self._actors:
            import ray

            for actor in self._actors:
                ray.kill(actor)
            self._actors = []
