"""posttrain_assets.parallel: batches mapped in worker processes come back in input order, errors surface."""

from __future__ import annotations

import os
import time

import pytest

from posttrain_assets.parallel import map_batches, processes_for


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


def test_processes_for_small_inputs_is_one() -> None:
    assert processes_for(0, 4096, 2) == 1
    assert processes_for(8192, 4096, 2) == 1  # two batches: spawning costs more than it saves
    assert processes_for(8193, 4096, 2) == 2
    assert processes_for(10**6, 4096, 2) == 2
    assert processes_for(10**6, 4096, 1) == 1
    assert processes_for(5 * 4096, 4096, 8) == 5
