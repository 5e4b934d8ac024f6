"""Whether a process on this machine still runs, judged one way wherever a dead process's leftovers are cleared:
a run left in progress by a killed run worker (``posttrain_assets/runs.py``), the scratch folder of a killed step
(``posttrain_assets/warehouse/io.py``). Pure code: no Dagster."""

from __future__ import annotations

import psutil

# A process's create_time is derived from the boot time and its start tick; 1 s absorbs that rounding only.
START_TIME_TOLERANCE_SECONDS = 1.0


def process_gone(pid: int, started: float | None = None) -> bool:
    """True when process ``pid`` certainly no longer runs: its pid is free, or a zombie (killed, not yet reaped by
    its parent), or, when ``started`` (its creation time, seconds since the epoch) is given, taken by a process
    created at another time. False while it runs, and when it exists but may not be inspected (another user's)."""
    try:
        process = psutil.Process(pid)
        if started is not None and abs(process.create_time() - started) > START_TIME_TOLERANCE_SECONDS:
            return True
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess is one too
        return True
    except psutil.AccessDenied:
        return False
