"""Whether a process still runs: what recovery (runs.py) and scratch clean-up (warehouse/io.py) go by."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from posttrain_assets.processes import process_gone


def test_a_running_process_is_not_gone_unless_its_pid_was_taken_by_another() -> None:
    started = psutil.Process().create_time()
    assert not process_gone(os.getpid())
    assert not process_gone(os.getpid(), started)
    # The same pid with another creation time: the recorded process ended and its pid went to a new one.
    assert process_gone(os.getpid(), started - 60)


def test_a_killed_process_is_gone_before_and_after_it_is_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        started = psutil.Process(child.pid).create_time()
        assert not process_gone(child.pid, started)
        child.send_signal(signal.SIGKILL)
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # the kill takes effect
            time.sleep(0.01)
        assert process_gone(child.pid) and process_gone(child.pid, started)  # a zombie: killed, not yet reaped
    finally:
        child.kill()
        child.wait()
    assert process_gone(child.pid, started)
    assert process_gone(2**22 + 1)  # above Linux's highest pid: no such process
