"""posttrain_assets.parallel: batches mapped in worker processes come back in input order, errors surface; a
prefetched stream keeps order, raises its producer's error and stops its producer with the caller."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from posttrain_assets.parallel import TimeLimit, map_batches, prefetched, preload_for, processes_for


def slow_then_fast(offset: int, batch: list[int]) -> tuple[int, list[int]]:
    """Earlier batches sleep longer, so a pool that yielded in completion order would reorder them."""
    time.sleep(0.05 * (5 - batch[0] % 5))
    return os.getpid(), [offset + x for x in batch]


def fails_on_three(_shared: None, item: int) -> int:
    if item == 3:
        raise ValueError(f"bad item {item}")
    return item


def test_results_come_back_in_input_order_from_worker_processes() -> None:
    batches = [[i, i] for i in range(10)]
    results = list(map_batches(slow_then_fast, 100, iter(batches), processes=2))
    assert [values for _, values in results] == [[100 + i, 100 + i] for i in range(10)]
    assert os.getpid() not in {pid for pid, _ in results}


def test_one_process_runs_here() -> None:
    results = list(map_batches(slow_then_fast, 1, [[0], [1]], processes=1))
    assert results == [(os.getpid(), [1]), (os.getpid(), [2])]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_failing_batch_raises_its_own_error(processes: int) -> None:
    seen = []
    with pytest.raises(ValueError, match="bad item 3"):
        for value in map_batches(fails_on_three, None, range(8), processes=processes):
            seen.append(value)
    assert seen == [0, 1, 2]


def worker_facts(_shared: None, _item: int) -> tuple[int, int, list[str]]:
    """The worker's parent process, the process multiprocessing says started it, and the preloaded modules it has."""
    parent = multiprocessing.parent_process()
    assert parent is not None
    return os.getppid(), parent.pid, [m for m in preload_for(worker_facts) if m in sys.modules]


FACTS = """
import json
import multiprocessing.forkserver
import os
from posttrain_assets.parallel import map_batches
from posttrain_assets_tests.test_parallel import worker_facts

if __name__ == "__main__":
    facts = list(map_batches(worker_facts, None, range(4), processes=2))
    shared_server = multiprocessing.forkserver._forkserver._forkserver_pid is not None
    print(json.dumps({"caller": os.getpid(), "facts": facts, "shared_server": shared_server}))
"""


@pytest.mark.slow  # a fresh interpreter that imports the stage modules and starts its own fork server: seconds
@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="no fork server here")
def test_workers_are_forked_from_a_server_with_the_stage_modules_loaded(tmp_path: Path) -> None:
    """Not from the caller (its DuckDB and Dagster threads), and without importing transformers each; from a fork
    server of our own, not multiprocessing's process-global one, which Dagster's multiprocess executor also uses
    (whichever starts that one first, the other gets its modules and environment). In a fresh process, so the
    server starts here."""
    done = subprocess.run(**_script_run(tmp_path, "facts.py", FACTS), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert len(run["facts"]) == 4
    for parent, started_by, loaded in run["facts"]:
        assert started_by == run["caller"]
        assert parent != run["caller"]  # the fork server
        assert loaded == list(preload_for(worker_facts))
    assert not run["shared_server"]


STAGE_MODULE = """
import os
import sys


def facts(_shared: None, _item: int) -> tuple[int, list[str]]:
    return os.getppid(), sorted(m for m in ("colorsys", "wave") if m in sys.modules)
"""

SWITCH = """
import json
import sys
from posttrain_assets import parallel
from posttrain_assets.parallel import map_batches

if __name__ == "__main__":
    parallel.PRELOADS["colours"] = ("colorsys",)
    parallel.PRELOADS["sounds"] = ("wave",)
    from colours import facts as colour_facts
    from sounds import facts as sound_facts

    runs = [list(map_batches(f, None, range(2), processes=2)) for f in (colour_facts, colour_facts, sound_facts)]
    print(json.dumps({"runs": runs, "colorsys": "colorsys" in sys.modules, "wave": "wave" in sys.modules}))
"""


@pytest.mark.slow  # fresh interpreters and fork servers: seconds
@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="no fork server here")
def test_a_stage_with_other_modules_gets_a_fork_server_of_its_own(tmp_path: Path) -> None:
    """Pools of one stage share a server that imported the stage's modules; a stage that needs other modules gets
    a server that imported those only (not the last stage's: they would be resident in every worker)."""
    for name in ("colours", "sounds"):
        (tmp_path / f"{name}.py").write_text(STAGE_MODULE)
    done = subprocess.run(**_script_run(tmp_path, "switch.py", SWITCH), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    (first, second, third) = [{parent for parent, _ in facts} for facts in run["runs"]]
    assert len(first) == 1 and first == second  # one server for both pools of the colour stage
    assert len(third) == 1 and third != first  # the sound stage's own
    assert all(loaded == ["colorsys"] for _, loaded in run["runs"][0] + run["runs"][1])
    assert all(loaded == ["wave"] for _, loaded in run["runs"][2])
    assert not run["colorsys"] and not run["wave"]  # imported by the servers, not by the caller


def environment_variable(name: str, _item: int) -> str | None:
    return os.environ.get(name)


def test_workers_see_the_callers_environment_as_their_pool_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the fork server's, which is the caller's environment when the server started (by the first pool)."""
    assert list(map_batches(environment_variable, "POSTTRAIN_PARALLEL_PROBE", range(2), processes=2)) == [None] * 2
    monkeypatch.setenv("POSTTRAIN_PARALLEL_PROBE", "set after the fork server started")
    assert (
        list(map_batches(environment_variable, "POSTTRAIN_PARALLEL_PROBE", range(2), processes=2))
        == ["set after the fork server started"] * 2
    )


def worker_pid(_shared: None, _item: int) -> int:
    return os.getpid()


@pytest.mark.parametrize("processes", [1, 2])
def test_fresh_process_per_item_runs_each_item_in_a_process_of_its_own(processes: int) -> None:
    pids = list(map_batches(worker_pid, None, range(5), processes=processes, fresh_process_per_item=True))
    assert len(set(pids)) == 5
    assert os.getpid() not in pids


def hangs_on_two(_shared: None, item: int) -> int:
    """Item 2 never finishes (a sleep stands in for sympy stuck in C code: only a kill ends either)."""
    if item == 2:
        time.sleep(600)
    return 10 * item


@pytest.mark.slow  # waits out a 3 s time limit per run (test_verifiers' math timeout covers the path fast)
@pytest.mark.parametrize("processes", [1, 2])
def test_an_item_past_its_time_limit_yields_the_limits_result_and_the_others_still_run(processes: int) -> None:
    limit = TimeLimit(seconds=3.0, result=-1)
    assert list(map_batches(hangs_on_two, None, range(6), processes=processes, time_limit=limit)) == [
        0,
        10,
        -1,
        30,
        40,
        50,
    ]
    assert not multiprocessing.active_children()  # the worker that ran item 2 was killed, the others stopped


def test_processes_for_small_inputs_is_one() -> None:
    assert processes_for(0, 4096, 2) == 1
    assert processes_for(8192, 4096, 2) == 1  # two batches: spawning costs more than it saves
    assert processes_for(8193, 4096, 2) == 2
    assert processes_for(10**6, 4096, 2) == 2
    assert processes_for(10**6, 4096, 1) == 1
    assert processes_for(5 * 4096, 4096, 8) == 5


def report_and_wait(directory: str, item: int) -> None:
    """Say which process took the item, then wait as a long batch would."""
    (Path(directory) / f"{item}.pid").write_text(str(os.getpid()))
    time.sleep(120)


PARENT = """
import sys
from posttrain_assets.parallel import map_batches
from posttrain_assets_tests.test_parallel import report_and_wait

if __name__ == "__main__":
    for _ in map_batches(report_and_wait, sys.argv[1], range(2), processes=2):
        pass
"""


def _state(pid: int) -> str:
    """The process's state letter from /proc ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    return _state(pid) not in ("", "Z", "X")  # a zombie has exited, it only waits to be reaped


def _script_run(tmp_path: Path, name: str, source: str) -> dict[str, Any]:
    """Arguments for subprocess to run ``source`` as the script ``tmp_path/name`` (its argument: ``tmp_path``),
    with this project importable."""
    script = tmp_path / name
    script.write_text(source)
    root = Path(__file__).resolve().parents[1]
    return {
        "args": [sys.executable, str(script), str(tmp_path)],
        "cwd": root,
        "env": {**os.environ, "PYTHONPATH": str(root)},
    }


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@pytest.mark.slow  # a fresh interpreter that imports the stage modules and starts its own fork server: seconds
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
@pytest.mark.parametrize("sigterm", ["default", "ignored"])
def test_workers_stop_when_their_parent_is_killed(tmp_path: Path, sigterm: str) -> None:
    """Also when the parent was started with SIGTERM ignored, a disposition that exec passes on to the workers
    (in the full suite under CI the workers of this test outlived their killed parent, sleeping: that case)."""
    parent = subprocess.Popen(
        **_script_run(tmp_path, "parent.py", PARENT), preexec_fn=_ignore_sigterm if sigterm == "ignored" else None
    )
    try:
        pid_files = [tmp_path / "0.pid", tmp_path / "1.pid"]
        deadline = time.monotonic() + 60
        while not all(p.exists() and p.read_text() for p in pid_files):
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.1)
        workers = [int(p.read_text()) for p in pid_files]
        assert all(_alive(pid) for pid in workers)
    finally:
        parent.kill()  # SIGKILL: no clean-up code of the parent runs
        parent.wait()
    deadline = time.monotonic() + 30  # generous: the signal is immediate, a loaded machine may not be
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), {pid: _state(pid) for pid in workers}


UNGUARDED = """
import operator
import sys
from pathlib import Path

from posttrain_assets.parallel import map_batches

with open(Path(sys.argv[1]) / "runs.log", "a") as log:  # each time this script's body runs, in any process
    log.write("ran\\n")
print(list(map_batches(operator.add, 10, range(6), processes=2)))
"""


@pytest.mark.slow  # a fresh interpreter that imports the stage modules and starts its own fork server: seconds
def test_a_script_without_a_main_guard_is_not_rerun_by_the_workers(tmp_path: Path) -> None:
    """A script that calls the pipeline at top level: spawned workers would re-run it (and the pipeline) if they
    imported it as their __main__; they do not, and its batches still run in the workers."""
    done = subprocess.run(
        **_script_run(tmp_path, "unguarded.py", UNGUARDED), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[10, 11, 12, 13, 14, 15]"
    assert (tmp_path / "runs.log").read_text() == "ran\n"


def _counted(count: int, produced: list[int]) -> Iterator[int]:
    """0 .. count - 1, each noted in ``produced`` as the producer makes it."""
    for i in range(count):
        produced.append(i)
        yield i


def test_prefetched_yields_every_item_in_order_at_most_depth_ahead() -> None:
    produced: list[int] = []
    consumed = []
    for item in prefetched(_counted(50, produced), depth=2):
        time.sleep(0.001)  # let the producer run ahead as far as it may
        # taken from the queue: at most `depth` queued behind it, and one more held by a blocked producer
        assert len(produced) <= item + 1 + 2 + 1
        consumed.append(item)
    assert consumed == list(range(50))


def test_prefetched_raises_the_producers_error_after_its_items() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("row 3 of landing.jsonl: bad bytes")

    seen = []
    with pytest.raises(ValueError, match="row 3 of landing.jsonl"):
        for item in prefetched(items()):
            seen.append(item)
    assert seen == [1, 2]


def test_prefetched_stops_its_producer_when_the_caller_stops_early() -> None:
    produced: list[int] = []
    stream = prefetched(_counted(1_000, produced), depth=2)
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()  # joins the producer
    count = len(produced)
    time.sleep(0.2)
    assert len(produced) == count < 10
    assert not any(t.name == "prefetched" for t in threading.enumerate())
