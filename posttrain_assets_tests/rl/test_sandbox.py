"""The sandbox for untrusted code: limits, isolation, classification of outcomes, thread safety.

The project's machines and CI run as root on Linux with util-linux ``unshare``: every isolation layer must work
here, so nothing is skipped (test_isolation_on_this_machine fails first if one does not).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from posttrain_assets.rl import sandbox
from posttrain_assets.rl.sandbox import (
    ALLOW_UNISOLATED_ENV,
    NPROC_LIMIT,
    UID_BASE,
    Isolation,
    isolation,
    run_judged,
    run_untrusted,
)
from posttrain_assets_tests.real_data import PROJECT_ROOT

# Code that removes the sandbox's in-process import block first: what follows tests the kernel layers alone.
UNBLOCK = "import sys\nsys.meta_path.pop(0)\n"


def host_processes_of(uid: int) -> list[int]:
    """The pids of the host's processes whose real uid is ``uid`` (read from the host's /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue  # ended meanwhile
        for line in status.splitlines():
            if line.startswith("Uid:") and int(line.split()[1]) == uid:
                pids.append(int(entry.name))
    return pids


def test_isolation_on_this_machine() -> None:
    # The tests (and CI) run as root on Linux with util-linux unshare: the sandbox must isolate here.
    assert os.geteuid() == 0
    assert isolation() == Isolation(isolated=True, reason=None, own_uids=True)


def test_ok_run_returns_stdout_and_reads_stdin() -> None:
    result = run_untrusted("import sys\nprint(sys.stdin.read().upper(), end='')\nprint(6 * 7)", stdin="abc\n")
    assert (result.status, result.returncode, result.stdout, result.stderr) == ("ok", 0, "ABC\n42\n", "")
    assert result.truncated is False


def test_only_the_standard_library_is_importable() -> None:
    result = run_untrusted("import json, fractions\nimport yaml")
    assert result.status == "error"
    assert "ModuleNotFoundError: No module named 'yaml'" in result.stderr


def test_uncaught_exception_and_exit_code_are_errors() -> None:
    raised = run_untrusted("raise ValueError('boom')")
    assert (raised.status, raised.returncode) == ("error", 1)
    assert raised.stderr.rstrip().endswith("ValueError: boom")
    exited = run_untrusted("import sys\nsys.exit(3)")
    assert (exited.status, exited.returncode) == ("error", 3)


def test_infinite_loop_hits_the_cpu_limit() -> None:
    result = run_untrusted("while True:\n    pass", cpu_seconds=1, wall_seconds=30)
    assert (result.status, result.returncode) == ("timeout", -24)  # SIGXCPU, long before the wall limit


def test_sleeping_code_is_killed_by_the_parent_at_the_wall_limit() -> None:
    start = time.monotonic()
    result = run_untrusted("import time\nprint('started', flush=True)\ntime.sleep(60)", wall_seconds=1)
    assert (result.status, result.returncode, result.stdout) == ("timeout", None, "started\n")
    assert time.monotonic() - start >= 1


def test_memory_bomb_is_a_memory_status() -> None:
    result = run_untrusted("x = []\nwhile True:\n    x.append(' ' * 10**6)", memory_mb=128)
    assert (result.status, result.returncode) == ("memory", 97)
    assert "MemoryError" in result.stderr


def test_abort_is_a_crash() -> None:
    result = run_untrusted("import os\nos.abort()")
    assert (result.status, result.returncode) == ("crash", -6)


def test_in_process_blocks_refuse_fork_and_subprocess() -> None:
    result = run_untrusted("import os\nwhile True:\n    os.fork()")
    assert result.status == "error"
    assert "AttributeError: module 'os' has no attribute 'fork'" in result.stderr
    spawn = run_untrusted("import subprocess")
    assert spawn.status == "error"
    assert "import of 'subprocess' is not allowed in the sandbox" in spawn.stderr


# --------------------------------------------------------------------------- processes

# fork() through libc, with the in-process blocks removed: only the kernel's process-count limit stops it.
LIBC_FORK = (
    UNBLOCK + "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "def fork():\n    pid = libc.fork()\n    return pid if pid >= 0 else -ctypes.get_errno()\n"
)
# Starts sleeping children until fork fails; prints the uid, then how many started and the error (an errno).
FORK_UNTIL_REFUSED = (
    "import os, time\n"
    "print(os.getuid(), flush=True)\n"
    "started = 0\n"
    "for _ in range(10 * 32):\n"
    "    pid = fork()\n"
    "    if pid == 0:\n"
    "        time.sleep(60)\n"
    "        os._exit(0)\n"
    "    if pid < 0:\n"
    "        break\n"
    "    started += 1\n"
    "print(started, -pid, flush=True)\n"
)


def test_process_count_is_limited_per_run_and_nothing_survives() -> None:
    result = run_untrusted(LIBC_FORK + FORK_UNTIL_REFUSED, wall_seconds=20)
    assert result.status == "ok", result.stderr
    uid_line, count_line = result.stdout.splitlines()
    uid = int(uid_line)
    started, error = map(int, count_line.split())
    # The run's own uid may have NPROC_LIMIT processes in all: the code itself and NPROC_LIMIT - 1 children.
    assert uid >= UID_BASE
    assert (started, error) == (NPROC_LIMIT - 1, errno.EAGAIN)
    assert host_processes_of(uid) == []  # the sleeping children died with the run


@pytest.mark.slow  # waits out a wall-clock or CPU limit: seconds by design
def test_fork_bomb_is_contained_and_leaves_nothing_behind() -> None:
    bomb = UNBLOCK + "import ctypes, os\nlibc = ctypes.CDLL(None)\nprint(os.getuid(), flush=True)\n"
    bomb += "while True:\n    libc.fork()\n"
    result = run_untrusted(bomb, wall_seconds=2)
    assert (result.status, result.returncode) == ("timeout", None)
    uid = int(result.stdout.split()[0])
    assert uid >= UID_BASE
    assert host_processes_of(uid) == []


def test_processes_that_leave_the_session_die_with_the_sandbox() -> None:
    # Start a detached interpreter in a new session and return at once: the PID namespace must take it down.
    code = (
        UNBLOCK + "import os, subprocess\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        "print(os.getuid(), p.pid, os.getsid(p.pid) != os.getsid(0))\n"
    )
    result = run_untrusted(code)
    assert result.status == "ok", result.stderr
    uid, _pid, own_session = result.stdout.split()
    assert own_session == "True"
    assert host_processes_of(int(uid)) == []


def test_proc_shows_only_the_runs_own_processes() -> None:
    code = (
        "import os\n"
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == [os.getpid()])\n"
        f"print(os.path.exists('/proc/{os.getpid()}'), os.path.exists('/proc/1'))\n"
        "print(sorted(os.listdir('/proc')) == sorted(['self', 'thread-self', str(os.getpid())]))\n"
    )
    result = run_untrusted(code)
    assert result.status == "ok", result.stderr
    # Only itself: neither this test's process, nor the supervisor (PID 1, root), nor /proc/sys and the like.
    assert result.stdout == "True\nFalse False\nTrue\n"


# --------------------------------------------------------------------------- network


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on loopback (no traffic leaves the machine) that the sandbox must not reach."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    yield server
    server.close()


def _assert_no_connection(server: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        server.accept()


def test_socket_import_is_refused(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    result = run_untrusted(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    assert result.status == "error"
    assert "import of 'socket' is not allowed in the sandbox" in result.stderr
    _assert_no_connection(listener)


def test_no_loopback_connection_even_when_the_import_block_is_removed(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    code = UNBLOCK + f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    result = run_untrusted(code)
    assert result.status == "error"
    assert "OSError: [Errno 101] Network is unreachable" in result.stderr
    _assert_no_connection(listener)


# --------------------------------------------------------------------------- environment and files


def test_parent_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2-secret-value")
    code = (
        "import os\nprint(sorted(os.environ), os.environ['HOME'], os.getcwd())\n"
        "try:\n    print(open('/proc/self/environ', 'rb').read())\nexcept PermissionError as exc:\n    print(exc)\n"
    )
    result = run_untrusted(code)
    assert result.status == "ok"
    assert "hunter2-secret-value" not in result.stdout
    first_line = result.stdout.splitlines()[0]
    assert first_line == "['HOME', 'LANG', 'LC_ALL', 'PATH', 'PYTHONHASHSEED', 'PYTHONIOENCODING'] /work /work"


def test_code_runs_under_a_uid_of_its_own_and_can_import_the_standard_library() -> None:
    code = (
        "import os, math, json, re, itertools, functools, collections, heapq, bisect, string, random\n"
        "import statistics, fractions, decimal, typing, dataclasses, operator, copy, datetime, enum\n"
        "import xml.etree.ElementTree, sqlite3, unittest, hashlib, textwrap, zoneinfo\n"
        "print(os.getuid() == os.geteuid() == os.getgid(), os.getgroups(), os.getuid() >= 10**9)\n"
        "print(decimal.Decimal('1.1') + decimal.Decimal('2.2'), 'caf\\u00e9'.encode('latin-1'))\n"
        "print(sqlite3.connect(':memory:').execute('select 6 * 7').fetchone()[0])\n"
    )
    first, second = run_untrusted(code), run_untrusted(code)
    assert first.status == "ok", first.stderr
    assert first.stdout == "True [] True\n3.3 b'caf\\xe9'\n42\n"
    assert second.stdout == first.stdout


def test_concurrent_runs_get_distinct_uids() -> None:
    code = "import os, time\ntime.sleep(0.5)\nprint(os.getuid())"
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: run_untrusted(code), range(4)))
    uids = [int(r.stdout) for r in results]
    assert len(set(uids)) == 4
    assert min(uids) >= UID_BASE


@pytest.fixture
def outside_file() -> Iterator[Path]:
    """A world-readable file in a world-readable directory of the host: only the private root hides it."""
    folder = Path(tempfile.mkdtemp(prefix="posttrain-outside-"))
    folder.chmod(0o755)
    path = folder / "secret.txt"
    path.write_text("host secret")
    path.chmod(0o644)
    yield path
    path.unlink()
    folder.rmdir()


def test_files_of_the_host_cannot_be_read(outside_file: Path) -> None:
    targets = [
        str(outside_file),  # world-readable
        str(PROJECT_ROOT / "README.md"),  # the project and its warehouse
        "/etc/passwd",
        "/etc/hostname",
        "/root/.bashrc",
        str(Path(os.path.realpath(sys.executable)).parent.parent / "lib" / "python3.11" / "os.py"),
    ]
    code = f"for path in {targets!r}:\n" + (
        "    try:\n"
        "        open(path, 'rb').read(1)\n"
        "        print('read', path)\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__, exc.errno)\n"
    )
    result = run_untrusted(code)
    assert result.status == "ok", result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == ["FileNotFoundError 2"] * 5
    assert lines[5].startswith("read ")  # the interpreter's own standard library is there, read-only


def test_writing_outside_the_work_directory_is_refused() -> None:
    targets = {
        "root of the file system": "/escape.txt",
        "parent of the work directory": "../escape.txt",
        "interpreter": os.path.realpath(sys.executable) + "-escape",
        "system libraries": "/usr/lib/escape.txt",
        "devices": "/dev/escape",
        "a host directory": tempfile.gettempdir() + "/../var/escape.txt",
    }
    for where, target in targets.items():
        result = run_untrusted(f"open('inside.txt', 'w').write('ok')\nopen({target!r}, 'w').write('escaped')\n")
        assert result.status == "error", where
        last = result.stderr.rstrip().rsplit("\n", 1)[-1]
        assert last.startswith(
            ("OSError: [Errno 30] Read-only file system", "FileNotFoundError: [Errno 2]", "PermissionError: [Errno 13]")
        ), (where, result.stderr)
    assert not Path("/escape.txt").exists()
    assert not Path(os.path.realpath(sys.executable) + "-escape").exists()


def test_work_directory_is_private_size_capped_and_gone_afterwards() -> None:
    code = (
        "import os, tempfile\n"
        "print(os.getcwd(), tempfile.gettempdir(), os.path.realpath('/tmp'))\n"
        "open('/tmp/marker-posttrain-sandbox.txt', 'w').write('x')\n"
        "print(sorted(os.listdir('/work')))\n"
        "written = 0\n"
        "try:\n"
        "    for i in range(64):\n"
        "        with open(f'part{i}', 'wb') as fh:\n"
        "            fh.write(b'x' * (512 * 1024))\n"
        "        written += 1\n"
        "except OSError as exc:\n"
        "    print('refused after', written, 'files:', exc.errno)\n"
    )
    result = run_untrusted(code, disk_mb=4)
    assert result.status == "ok", result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "/work /tmp /work"
    assert lines[1] == "['marker-posttrain-sandbox.txt']"
    # 4 MiB hold 7 files of 512 KiB next to the marker (and the directory itself); the 8th fills the disk.
    assert lines[2] == f"refused after 7 files: {errno.ENOSPC}"
    assert not Path("/tmp/marker-posttrain-sandbox.txt").exists()


def test_file_size_is_capped() -> None:
    result = run_untrusted("open('big', 'wb').write(b'x' * 200_000)", max_output_bytes=100_000)
    assert result.status == "error"
    assert "OSError: [Errno 27] File too large" in result.stderr


def test_hash_seed_is_fixed_so_runs_are_deterministic() -> None:
    code = "print(list({'apple', 'banana', 'cherry', 'damson', 'elder'}))"
    outputs = {run_untrusted(code).stdout for _ in range(3)}
    assert len(outputs) == 1


def test_output_is_capped() -> None:
    result = run_untrusted("print('x' * 100000)", max_output_bytes=1000)
    assert result.truncated is True
    assert result.stdout == "x" * 1000
    assert result.status == "error"  # the write past the cap fails inside the child
    assert "File too large" in result.stderr


@pytest.mark.slow  # waits out a wall-clock or CPU limit: seconds by design
def test_concurrent_calls_from_threads() -> None:
    codes = [f"print({i} * {i})" for i in range(8)] + ["import time\ntime.sleep(30)"]
    with ThreadPoolExecutor(max_workers=len(codes)) as pool:
        results = list(pool.map(lambda code: run_untrusted(code, wall_seconds=3), codes))
    assert [r.stdout for r in results[:8]] == [f"{i * i}\n" for i in range(8)]
    assert all(r.status == "ok" for r in results[:8])
    assert results[8].status == "timeout"


# --------------------------------------------------------------------------- no silent fallback


@pytest.fixture
def unisolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's sandbox as on a machine without isolation (the probe is redone, then restored)."""
    monkeypatch.setenv("POSTTRAIN_SANDBOX_UNSHARE", "0")
    monkeypatch.delenv(ALLOW_UNISOLATED_ENV, raising=False)
    monkeypatch.setattr(sandbox, "_isolation", None)
    yield
    monkeypatch.setattr(sandbox, "_isolation", None)


def test_without_isolation_the_sandbox_refuses_to_run(unisolated: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isolation() == Isolation(False, "isolation turned off by POSTTRAIN_SANDBOX_UNSHARE=0", True)
    marker = Path(tempfile.gettempdir()) / f"posttrain-refused-{os.getpid()}"
    result = run_untrusted(f"open({str(marker)!r}, 'w').write('ran')")
    assert (result.status, result.returncode, result.stdout) == ("unavailable", None, "")
    assert result.stderr == (
        "sandbox unavailable: isolation turned off by POSTTRAIN_SANDBOX_UNSHARE=0; not running untrusted code "
        f"unisolated (set {ALLOW_UNISOLATED_ENV}=1 to allow it)\n"
    )
    assert not marker.exists()
    assert run_judged("print(1)", "print(2)").status == "unavailable"
    # Opting in runs it unisolated: the code sees the host (here it can read this project's files).
    monkeypatch.setenv(ALLOW_UNISOLATED_ENV, "1")
    pyproject = PROJECT_ROOT / "pyproject.toml"
    opted = run_untrusted(f"print(open({str(pyproject)!r}).readline(), end='')")
    assert (opted.status, opted.stdout) == ("ok", pyproject.read_text().splitlines(keepends=True)[0])


@pytest.mark.slow  # forks until the per-uid limit refuses: over a second
def test_unisolated_opt_in_still_limits_processes_per_uid(unisolated: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_UNISOLATED_ENV, "1")
    # Unisolated, the interpreter's directory (under /root) is unreadable to the run's uid, so ctypes cannot be
    # imported; a fresh posix module brings fork back.
    posix_fork = (
        UNBLOCK + "del sys.modules['posix']\nimport posix\n"
        "def fork():\n    try:\n        return posix.fork()\n    except OSError as exc:\n        return -exc.errno\n"
    )
    result = run_untrusted(posix_fork + FORK_UNTIL_REFUSED, wall_seconds=20)
    assert result.status == "ok", result.stderr
    uid_line, count_line = result.stdout.splitlines()
    assert tuple(map(int, count_line.split())) == (NPROC_LIMIT - 1, errno.EAGAIN)
    assert host_processes_of(int(uid_line)) == []  # the process-group kill took the children


# --------------------------------------------------------------------------- judged runs


def test_judged_run_connects_code_and_judge_and_only_the_judge_reports() -> None:
    code = (
        "import os\n"
        "request = os.read(3, 100)\n"
        "os.write(4, request.upper())\n"
        "for fd in range(3, 64):\n"  # try every descriptor: none reaches the verdict
        "    try:\n"
        "        os.write(fd, b'pass')\n"
        "    except OSError:\n"
        "        pass\n"
        "print(os.getuid(), flush=True)\n"
    )
    judge = (
        "import os\n"
        "os.write(4, b'ping')\n"
        "answer = os.read(3, 4)\n"
        "os.write(5, b'got ' + answer + b' as ' + str(os.getuid()).encode())\n"
    )
    result = run_judged(code, judge)
    assert (result.status, result.judge_status) == ("ok", "ok"), result.stderr
    code_uid = int(result.stdout.split()[0])
    assert result.verdict == f"got PING as {code_uid + 1}"


def test_judged_run_without_a_verdict() -> None:
    result = run_judged("import os\nos._exit(3)", "import os\nos.read(3, 1)\nraise SystemExit(1)")
    assert (result.status, result.returncode, result.judge_status, result.verdict) == ("error", 3, "error", None)
    killed = run_judged("import time\ntime.sleep(60)", "import os\nos.read(3, 1)", wall_seconds=1)
    assert (killed.status, killed.judge_status, killed.verdict) == ("timeout", "timeout", None)
