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

Why a plain Ray client and not dagster-ray: map_batches is called from pure stage code (the silver pass, dedup,
verifiers) that has no Dagster context, and a Ray task per batch is all it needs; dagster-ray's resources and run
launchers manage clusters (KubeRay, a local cluster per step) and would add a second way of starting workers beside
this one. Which cluster to use is Ray's own ``RAY_ADDRESS``, as in every Ray program.
"""

from __future__ import annotations

import os
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
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
