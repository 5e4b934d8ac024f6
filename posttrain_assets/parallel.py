"""Worker processes: a pure function applied to a stream of items in other processes, results in input order.

:func:`map_batches` is how this project runs its own Python in other processes (untrusted code goes through
:mod:`posttrain_assets.rl.sandbox` instead):

- the per-row work of the silver pass and of the SFT and preference stages (parsing, Jinja rendering, labels: one
  process uses one core however the tokenizer parallelises its own part);
- certification of RL seeds, where each repetition of each batch must be scored in a process of its own
  (``fresh_process_per_item``);
- math comparisons, which sympy can hang on a pathological input, inside C code no signal interrupts: an item that
  runs past its ``time_limit`` has its worker killed and yields the limit's result instead.

Results come back in input order, so a stage that is deterministic in one process gives the same tables with any
number of processes. A worker's exception is raised in the caller with its traceback, and a worker that dies fails
the call (:class:`concurrent.futures.process.BrokenProcessPool`) rather than losing its item silently.

The pools are the standard library's :class:`~concurrent.futures.ProcessPoolExecutor`, given a multiprocessing
context of this module's own (:class:`_WorkerContext`) for three things the stock contexts do not do:

- Workers are forked from a fork server of this module's own, not from the caller, which holds DuckDB and Dagster
  threads a fork would copy mid-flight. The server is a fresh process (POSIX only) that imports the modules of
  the function its workers run once (:func:`preload_for`), so after the first pool a pool of two workers starts in
  about 0.2 s instead of the 1.5 s fresh interpreters take to import them; a pool of a function that needs other
  modules retires it and starts one with those (a stage's pools share one), so no worker holds every stage's
  modules. It is not multiprocessing's process-global fork server,
  which Dagster's multiprocess executor (``start_method: forkserver``) also uses: that one keeps the environment of
  whoever starts it first, and each user gets the other's stale environment variables. Our workers are handed the
  caller's environment as it is when their pool starts.
- Workers never import the caller's ``__main__``: multiprocessing re-runs the caller's script in every child it
  starts from a fork server or by spawning, so a script that runs the pipeline without an
  ``if __name__ == "__main__":`` guard would start the pipeline again in every worker. The functions workers run
  live in this package's modules (sent by module and name), so they need nothing from ``__main__``.
- The context remembers the workers it started, so a pool whose item overran its time limit can be killed.

``POSTTRAIN_EXECUTOR=ray`` (:func:`posttrain_assets.settings.executor`) runs the same functions as Ray tasks on the
cluster at ``RAY_ADDRESS`` instead (:mod:`posttrain_assets.ray_executor`, docs/scale-out.md), results again in input
order. Calls with a ``time_limit`` stay local: a deadline on a cluster would count queueing and worker start-up, so
whether a comparison times out, and with it a verdict, would depend on the cluster's load.

Workers exit as soon as the process that started them dies (:func:`_exit_with_caller`). What every item needs
(tokenizer, registry, configuration: ``shared``) is sent once per worker; only the items and their results travel
per task, and at most ``2 x processes`` items are in flight (``processes`` with a time limit), so memory stays
bounded by the item size.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.context import BaseContext, set_spawning_popen
from multiprocessing.process import BaseProcess
from typing import Any, Generic, TypeVar

from posttrain_assets.settings import executor

Shared = TypeVar("Shared")
Item = TypeVar("Item")
Result = TypeVar("Result")

# What the pool's initializer installs in each worker: the function and what it shares across items.
_worker_state: tuple[Callable[[Any, Any], Any], Any] | None = None

# What a fork server imports once, so every worker forked from it starts with them loaded: the module of the
# function its workers run, plus what the data they are sent needs, by that module: transformers for a stage whose
# shared data holds the tokenizer (about 2 s to import), math-verify for RL scoring (sympy; about 1 s). One server
# per set of modules, not one with all of them: every module a server loads is resident in each of its workers and
# counts in each one's RSS (100k rows, two tokenise workers: 199 MiB each with every stage's modules, 89 MiB with
# the tokenizer stages' own).
TOKENIZER_LIBRARIES = ("transformers", "transformers.tokenization_utils_tokenizers")
PRELOADS: dict[str, tuple[str, ...]] = {
    "posttrain_assets.cleaning.silver_pass": TOKENIZER_LIBRARIES,
    "posttrain_assets.sft.batches": TOKENIZER_LIBRARIES,
    "posttrain_assets.sft.proof_cache": TOKENIZER_LIBRARIES,
    "posttrain_assets.preference.pairs": TOKENIZER_LIBRARIES,
    "posttrain_assets.rl.verifiers": ("math_verify",),
}


def preload_for(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The modules the fork server of ``fn``'s workers imports: ``fn``'s module and its :data:`PRELOADS`."""
    return (fn.__module__, *PRELOADS.get(fn.__module__, ()))


@dataclass(frozen=True)
class TimeLimit(Generic[Result]):
    """How long one item may run in its worker (``seconds``, from when it is handed to an idle worker), and what
    :func:`map_batches` yields for it (``result``) when it runs longer."""

    seconds: float
    result: Result


def default_processes() -> int:
    """The cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def processes_for(rows: int, batch_rows: int, processes: int) -> int:
    """Processes worth starting for ``rows`` rows in batches of ``batch_rows``: none beyond this one for a
    couple of batches (the first pool of a process starts the fork server, which imports transformers: seconds),
    never more than batches."""
    batches = -(-rows // batch_rows)
    return 1 if batches <= 2 else max(1, min(processes, batches))


# --------------------------------------------------------------------------- how workers start


def _new_fork_server(preload: tuple[str, ...] = ()) -> forkserver.ForkServer:
    """A fork server handle that imports ``preload``, not started yet (it starts with the first pool that needs
    it)."""
    server = forkserver.ForkServer()
    server.set_forkserver_preload(list(preload))
    return server


_FORK_SERVER = _new_fork_server()
_FORK_SERVER_PRELOAD: tuple[str, ...] = ()
_FORK_SERVER_LOCK = threading.Lock()
_RETIRED_SERVERS: list[int] = []  # pids of servers told to exit, reaped once they have


def _use_fork_server(preload: tuple[str, ...]) -> None:
    """Make the fork server that imports ``preload`` the one new workers start from. A server with other modules is
    retired: its end of the liveness pipe is closed, so it exits as soon as the workers it started (which hold
    copies of that end) have exited; it is not waited for, a pool of it may still be running."""
    global _FORK_SERVER, _FORK_SERVER_PRELOAD
    with _FORK_SERVER_LOCK:
        if preload == _FORK_SERVER_PRELOAD:
            return
        retired = _FORK_SERVER
        if retired._forkserver_alive_fd is not None:
            os.close(retired._forkserver_alive_fd)
            _RETIRED_SERVERS.append(retired._forkserver_pid)
            address = retired._forkserver_address  # the socket file; the server keeps its listening socket open
            if address and not util.is_abstract_socket_namespace(address):
                with contextlib.suppress(OSError):
                    os.unlink(address)
        _FORK_SERVER, _FORK_SERVER_PRELOAD = _new_fork_server(preload), preload
        for retired in list(_RETIRED_SERVERS):
            try:
                done, _status = os.waitpid(retired, os.WNOHANG)
            except ChildProcessError:
                done = retired
            if done:
                _RETIRED_SERVERS.remove(retired)


def retire_fork_server() -> None:
    """Retire the fork server and the modules it imported (it exits once its workers have); the next pool starts
    a new one. For a caller whose pools are done and whose memory is measured next (the benchmark's floor)."""
    _use_fork_server(())


def _forget_fork_server() -> None:
    """In a child forked from a process whose fork server runs: that server is not the child's own child, so the
    handle's liveness check (waitpid) would fail there; the child starts a server of its own when it needs one."""
    global _FORK_SERVER, _FORK_SERVER_PRELOAD
    _FORK_SERVER, _FORK_SERVER_PRELOAD = _new_fork_server(), ()
    _RETIRED_SERVERS.clear()


os.register_at_fork(after_in_child=_forget_fork_server)


class _WorkerPopen(popen_forkserver.Popen):
    """Starts a worker from :data:`_FORK_SERVER` with the caller's preparation data minus its ``__main__``.

    The body is multiprocessing's own ``popen_forkserver.Popen._launch`` (Python 3.11 and 3.12) with two changes:
    the server is ours, and the preparation data does not name the caller's main module, which the child would
    otherwise import (running an unguarded script again)."""

    def _launch(self, process_obj: BaseProcess) -> None:
        prep_data = spawn.get_preparation_data(process_obj.name)
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = _FORK_SERVER.connect_to_new_process(self._fds)
        # The child's sentinel of its parent: a duplicate of the data pipe's write end that only this process holds.
        parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _WorkerProcess(BaseProcess):
    _start_method = "forkserver"

    @staticmethod
    def _Popen(process_obj: BaseProcess) -> _WorkerPopen:  # noqa: N802 - multiprocessing's name
        return _WorkerPopen(process_obj)


class _WorkerContext(BaseContext):
    """The multiprocessing context of one pool: its processes start from our fork server (queues and locks are the
    standard ones), and it keeps a reference to each so the pool can be killed."""

    _name = "forkserver"

    def __init__(self) -> None:
        self._started: weakref.WeakSet[_WorkerProcess] = weakref.WeakSet()

    def Process(self, *args: Any, **kwargs: Any) -> _WorkerProcess:  # noqa: N802 - multiprocessing's name
        process = _WorkerProcess(*args, **kwargs)
        self._started.add(process)
        return process

    def kill_workers(self) -> None:
        """SIGKILL every worker still running: a worker stuck in C code (sympy on a huge power) runs no Python, so
        only a signal whose default action ends the process stops it."""
        for process in list(self._started):
            try:
                process.kill()
            except ValueError:  # already closed by the pool
                continue


def _exit_with_caller() -> None:
    """Stop this worker as soon as the process that started the pool dies: a caller killed outright (a cancelled
    run, OOM) would otherwise leave its workers blocked forever on a call queue they also hold open.

    multiprocessing gives every worker a sentinel of the process that started it (a pipe whose write end only that
    process holds), also when the worker is forked from the fork server; a daemon thread waits on it and exits the
    process when it closes. os._exit, not a signal: a worker holds nothing to clean up (no DuckDB, no files of its
    own), and a process started with SIGTERM ignored would pass that on to every worker."""
    parent = multiprocessing.parent_process()
    if parent is None:  # not started by multiprocessing (a test calling the initializer directly)
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-caller", daemon=True).start()


def _install(fn: Callable[[Any, Any], Any], shared: Any, environ: dict[str, str]) -> None:
    global _worker_state
    _exit_with_caller()
    # The fork server's environment is the one of the moment it started; the caller's may have changed since.
    os.environ.clear()
    os.environ.update(environ)
    _worker_state = (fn, shared)


def _call(item: Any) -> Any:
    assert _worker_state is not None, "worker was not initialised"
    fn, shared = _worker_state
    return fn(shared, item)


def _new_pool(fn: Callable[[Any, Any], Any], shared: Any, processes: int) -> tuple[ProcessPoolExecutor, _WorkerContext]:
    _use_fork_server(preload_for(fn))
    context = _WorkerContext()
    pool = ProcessPoolExecutor(
        max(1, processes), mp_context=context, initializer=_install, initargs=(fn, shared, dict(os.environ))
    )
    return pool, context


@contextmanager
def _pool(
    fn: Callable[[Any, Any], Any], shared: Any, processes: int
) -> Iterator[tuple[ProcessPoolExecutor, _WorkerContext]]:
    pool, context = _new_pool(fn, shared, processes)
    with pool:
        yield pool, context


# --------------------------------------------------------------------------- mapping


def map_batches(
    fn: Callable[[Shared, Item], Result],
    shared: Shared,
    items: Iterable[Item],
    processes: int,
    *,
    fresh_process_per_item: bool = False,
    time_limit: TimeLimit[Result] | None = None,
) -> Iterator[Result]:
    """``fn(shared, item)`` for each item, yielded in the order of ``items``, at most ``processes`` at a time.

    ``processes <= 1`` runs in this process (no pickling, nothing started), unless an option asks for workers.
    Otherwise ``fn`` must be a function of an importable module (workers do not import the caller's script) and
    ``shared`` and the items picklable; a worker's exception is raised here, with its traceback, and so is the
    death of a worker (``BrokenProcessPool``).

    ``fresh_process_per_item``: each item runs in a process of its own, started for it, so nothing an item does to
    its process (state, caches, memory) is seen by another. ``time_limit``: an item still running
    ``time_limit.seconds`` after it was handed to its worker yields ``time_limit.result``; the pool's workers are
    killed (so items must not have effects a kill could leave half done) and the items that were running beside
    it run again in a fresh pool. The two options do not combine.

    With ``POSTTRAIN_EXECUTOR=ray`` every call without a ``time_limit`` runs on the Ray cluster whatever
    ``processes`` says (the cluster's CPUs bound the tasks in flight); ``fresh_process_per_item`` then means a Ray
    worker process per item (``max_calls=1``).
    """
    if fresh_process_per_item and time_limit is not None:
        raise ValueError("fresh_process_per_item and time_limit do not combine")
    if time_limit is None and executor() == "ray":
        from posttrain_assets.ray_executor import map_on_ray

        yield from map_on_ray(fn, shared, items, fresh_process_per_item=fresh_process_per_item)
        return
    if processes <= 1 and not fresh_process_per_item and time_limit is None:
        for item in items:
            yield fn(shared, item)
        return
    if fresh_process_per_item:
        yield from _map_in_fresh_processes(fn, shared, items, processes)
    elif time_limit is None:
        yield from _map_in_pool(fn, shared, items, processes)
    else:
        yield from _map_with_time_limit(fn, shared, items, processes, time_limit)


def _map_in_fresh_processes(
    fn: Callable[[Shared, Item], Result], shared: Shared, items: Iterable[Item], processes: int
) -> Iterator[Result]:
    """Each item in a one-worker pool started for it, at most ``processes`` at a time.

    Not one pool with ``max_tasks_per_child=1``: its manager thread can die on a ``KeyError`` when a worker exits
    (CPython gh-115634, gh-119592; seen here as an RL certification that never returned) and the caller then
    waits forever. A pool per item starts the same one process per item and never replaces a worker."""
    in_flight: deque[tuple[ProcessPoolExecutor, _WorkerContext, Future[Result]]] = deque()

    def oldest() -> Result:
        pool, _context, future = in_flight.popleft()
        try:
            return future.result()
        finally:
            pool.shutdown()

    try:
        for item in items:
            pool, context = _new_pool(fn, shared, 1)
            in_flight.append((pool, context, pool.submit(_call, item)))
            if len(in_flight) >= max(1, processes):
                yield oldest()
        while in_flight:
            yield oldest()
    finally:
        for pool, context, future in in_flight:  # the caller stopped early or an item failed
            future.cancel()
            context.kill_workers()
            pool.shutdown(wait=False, cancel_futures=True)


def _map_in_pool(
    fn: Callable[[Shared, Item], Result], shared: Shared, items: Iterable[Item], processes: int
) -> Iterator[Result]:
    with _pool(fn, shared, processes) as (pool, _context):
        in_flight: deque[Future[Result]] = deque()
        try:
            for item in items:
                in_flight.append(pool.submit(_call, item))
                if len(in_flight) >= 2 * processes:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:  # the caller stopped early or an item failed: drop what is queued
                future.cancel()


_END = object()


def _map_with_time_limit(
    fn: Callable[[Shared, Item], Result],
    shared: Shared,
    items: Iterable[Item],
    processes: int,
    time_limit: TimeLimit[Result],
) -> Iterator[Result]:
    """:func:`map_batches` with a time limit per item.

    No more items are in flight than there are workers, so an item starts as it is submitted (``submit`` returns
    once its worker process exists: the fork server's start is not charged to it) and its deadline counts from
    there. The oldest item has the earliest deadline and is waited on first. ProcessPoolExecutor cannot kill one
    worker, so an overrun kills the pool; the items that were running beside the late one lose only their time.
    """
    pending = iter(items)
    rerun: deque[Item] = deque()  # items whose worker was killed for another item's overrun, in input order
    while True:
        in_flight: deque[tuple[Item, Future[Result], float]] = deque()
        with _pool(fn, shared, processes) as (pool, context):
            try:
                while True:
                    while len(in_flight) < max(1, processes):
                        item = rerun.popleft() if rerun else next(pending, _END)
                        if item is _END:
                            break
                        future = pool.submit(_call, item)
                        in_flight.append((item, future, time.monotonic() + time_limit.seconds))
                    if not in_flight:
                        return
                    _item, future, deadline = in_flight[0]
                    try:
                        result = future.result(timeout=max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        break
                    in_flight.popleft()
                    yield result
            finally:
                if in_flight:  # an overrun, an item's error, or the caller stopped early: nothing to wait for
                    context.kill_workers()
        in_flight.popleft()
        rerun.extendleft(reversed([item for item, _future, _deadline in in_flight]))
        yield time_limit.result


def prefetched(items: Iterable[Item], depth: int = 2) -> Iterator[Item]:
    """The items of ``items``, in order, produced by a background thread at most ``depth`` items ahead.

    For a Python producer (reading, hashing, building Arrow batches) feeding a consumer that releases the GIL
    (a DuckDB insert): the two then run at once on two cores. An exception of the producer is raised here, after
    the items it produced before it; when the caller stops early the producer stops at its next item.
    """
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(("item", item)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            offer(("error", exc))
            return
        offer(("end", None))

    producer = threading.Thread(target=produce, name="prefetched", daemon=True)
    producer.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        producer.join()
