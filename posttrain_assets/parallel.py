"""Batch-parallel stages: a pure function applied to a stream of batches in worker processes, results in order.

The per-row work of the silver pass and of the SFT stages is Python (parsing, Jinja rendering, labels), so one
process uses one core however the tokenizer parallelises its own part. :func:`map_batches` spreads the batches
over a pool of processes and hands the results back in input order, so a stage that is deterministic in one
process gives the same tables with any number of processes.

Workers are never forked from the parent, which holds DuckDB and Dagster threads a fork would copy mid-flight. They
are forked from multiprocessing's fork server, a fresh single-threaded process that imports transformers and the
stage modules once (:data:`PRELOAD`), so after the first pool of a process a pool of two workers starts in about
0.2 s instead of the 1.5 s fresh interpreters take to import them (where there is no fork server, they are
spawned). Workers never re-run the caller's script: a worker normally imports the parent's ``__main__``, so a
script that runs the pipeline without an ``if __name__ == "__main__":`` guard would start the pipeline again in
every worker. The stage functions live in this package, so workers are started as if from an interactive session
(:func:`_workers_skip_main`).

What every batch needs (tokenizer, registry, configuration) is sent once per worker; only the batches and their
results travel per task, and at most ``2 x processes`` batches are in flight, so memory stays bounded by the batch
size, not the corpus.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

Shared = TypeVar("Shared")
Item = TypeVar("Item")
Result = TypeVar("Result")

# What the pool's initializer installs in each worker: the stage function and what it shares across batches.
_worker_state: tuple[Callable[[Any, Any], Any], Any] | None = None


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


# What the fork server imports once, so every worker forked from it starts with them loaded: the modules of the
# stage functions and transformers (the tokenizer each worker unpickles needs it; about 2 s to import).
PRELOAD = (
    "posttrain_assets.cleaning.silver_pass",
    "posttrain_assets.sft.batches",
    "posttrain_assets.preference.pairs",
    "transformers",
)


def _start_context() -> Any:
    """How workers start: forked from the fork server where there is one (Linux, macOS), else spawned."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Takes effect when this process's fork server starts (at its first pool); a server already started by
    # another library keeps its own list, and workers then import what they need themselves.
    context.set_forkserver_preload(list(PRELOAD))
    return context


_MISSING = object()


@contextmanager
def _workers_skip_main() -> Iterator[None]:
    """Processes spawned inside this block do not import the parent's ``__main__`` script or module.

    multiprocessing's spawn re-imports ``__main__`` in each child from its ``__spec__`` name or its ``__file__``
    and skips it when it has neither (an interactive session); both are hidden while workers start. Workers only
    run functions of importable modules (``map_batches`` sends them by module and name), so they lose nothing.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {name: getattr(main, name, _MISSING) for name in ("__spec__", "__file__")}
    main.__spec__ = None
    if saved["__file__"] is not _MISSING:
        del main.__file__
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is not _MISSING:
                setattr(main, name, value)


def _install(fn: Callable[[Any, Any], Any], shared: Any) -> None:
    global _worker_state
    _exit_with_caller()
    _worker_state = (fn, shared)


def _call(item: Any) -> Any:
    assert _worker_state is not None, "worker was not initialised"
    fn, shared = _worker_state
    return fn(shared, item)


def map_batches(
    fn: Callable[[Shared, Item], Result], shared: Shared, items: Iterable[Item], processes: int
) -> Iterator[Result]:
    """``fn(shared, item)`` for each item, yielded in the order of ``items``.

    ``processes <= 1`` runs in this process (no pickling, nothing spawned). Otherwise ``fn`` must be a function of
    an importable module (not of the caller's script, which workers do not import) and ``shared`` and the items
    picklable; a worker's exception is raised here, with its traceback.
    """
    if processes <= 1:
        for item in items:
            yield fn(shared, item)
        return
    with ProcessPoolExecutor(
        processes, mp_context=_start_context(), initializer=_install, initargs=(fn, shared)
    ) as pool:
        in_flight: deque[Future[Result]] = deque()
        try:
            for item in items:
                with _workers_skip_main():  # the pool starts its workers on a submit
                    in_flight.append(pool.submit(_call, item))
                if len(in_flight) >= 2 * processes:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:  # the caller stopped early or a batch failed: drop what is queued
                future.cancel()


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
