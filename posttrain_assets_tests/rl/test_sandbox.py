"""The sandbox for untrusted code: limits, isolation, classification of outcomes, thread safety."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from posttrain_assets.rl.sandbox import Isolation, isolation, run_untrusted, unshare_available

needs_namespaces = pytest.mark.skipif(not unshare_available(), reason="unshare --net --pid is not available here")


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


def test_infinite_loop_hits_the_cpu_limit_within_the_wall_limit() -> None:
    start = time.monotonic()
    result = run_untrusted("while True:\n    pass", cpu_seconds=1, wall_seconds=4)
    took = time.monotonic() - start
    assert result.status == "timeout"
    assert result.returncode == -24  # SIGXCPU
    assert took < 4


def test_sleeping_code_is_killed_by_the_parent_at_the_wall_limit() -> None:
    start = time.monotonic()
    result = run_untrusted("import time\nprint('started', flush=True)\ntime.sleep(60)", wall_seconds=1)
    took = time.monotonic() - start
    assert (result.status, result.returncode, result.stdout) == ("timeout", None, "started\n")
    assert 1 <= took < 3


def test_memory_bomb_is_a_memory_status() -> None:
    result = run_untrusted("x = []\nwhile True:\n    x.append(' ' * 10**6)", memory_mb=128)
    assert (result.status, result.returncode) == ("memory", 97)
    assert "MemoryError" in result.stderr


def test_abort_is_a_crash() -> None:
    result = run_untrusted("import os\nos.abort()")
    assert (result.status, result.returncode) == ("crash", -6)


def test_fork_bomb_is_refused() -> None:
    start = time.monotonic()
    result = run_untrusted("import os\nwhile True:\n    os.fork()", wall_seconds=3)
    assert result.status == "error"
    assert "AttributeError: module 'os' has no attribute 'fork'" in result.stderr
    assert time.monotonic() - start < 3
    spawn = run_untrusted("import subprocess")
    assert spawn.status == "error"
    assert "import of 'subprocess' is not allowed in the sandbox" in spawn.stderr


@needs_namespaces
def test_processes_that_escape_the_process_group_die_with_the_sandbox() -> None:
    # Defeat the in-process blocks, start a detached process in a new session and return at once:
    # the PID namespace must still take it down when the sandbox ends.
    marker = "31.4159265"
    code = (
        "import sys\n"
        "sys.meta_path.pop(0)\n"
        "import subprocess\n"
        f"p = subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
        "print(p.pid)\n"
    )
    result = run_untrusted(code)
    assert result.status == "ok", result.stderr
    time.sleep(0.2)
    survivors = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                survivors.append(entry.name)
    assert survivors == []


@pytest.fixture
def listener() -> socket.socket:
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


def test_socket_connection_fails(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    result = run_untrusted(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    assert result.status == "error"
    assert "import of 'socket' is not allowed in the sandbox" in result.stderr
    _assert_no_connection(listener)


@needs_namespaces
def test_no_network_even_when_the_import_block_is_removed(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    code = (
        f"import sys\nsys.meta_path.pop(0)\nimport socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    )
    result = run_untrusted(code)
    assert result.status == "error"
    assert "OSError: [Errno 101] Network is unreachable" in result.stderr
    _assert_no_connection(listener)


def test_parent_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2-secret-value")
    # /proc/self/environ is root's after the privileges are dropped: unreadable, which is fine too.
    code = (
        "import os\nprint(sorted(os.environ))\n"
        "try:\n    print(open('/proc/self/environ', 'rb').read())\nexcept PermissionError as exc:\n    print(exc)\n"
    )
    result = run_untrusted(code)
    assert result.status == "ok"
    assert "hunter2-secret-value" not in result.stdout
    first_line = result.stdout.splitlines()[0]
    assert first_line == "['HOME', 'LANG', 'LC_ALL', 'PATH', 'PYTHONHASHSEED', 'PYTHONIOENCODING']"


def test_cwd_is_a_temporary_directory_removed_afterwards() -> None:
    code = "import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())"
    result = run_untrusted(code)
    assert result.status == "ok"
    cwd = Path(result.stdout.strip())
    assert str(cwd).startswith(tempfile.gettempdir())
    assert cwd.name == "work"
    assert not cwd.exists()
    assert not cwd.parent.exists()
    assert os.getcwd() != str(cwd)


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


def test_concurrent_calls_from_threads() -> None:
    codes = [f"print({i} * {i})" for i in range(8)] + ["import time\ntime.sleep(30)"]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(codes)) as pool:
        results = list(pool.map(lambda code: run_untrusted(code, wall_seconds=2), codes))
    took = time.monotonic() - start
    assert [r.stdout for r in results[:8]] == [f"{i * i}\n" for i in range(8)]
    assert all(r.status == "ok" for r in results[:8])
    assert results[8].status == "timeout"
    assert took < 6


# --------------------------------------------------------------------------- filesystem isolation


def test_isolation_layers_on_this_machine() -> None:
    # The tests (and CI) run as root on Linux with util-linux unshare: every layer must be active here.
    assert os.geteuid() == 0
    assert isolation() == Isolation(namespaces=True, read_only_fs=True, unprivileged_uid=65534)
    assert isolation().filesystem is True
    assert unshare_available() is True


def test_code_runs_as_nobody_and_can_import_the_standard_library() -> None:
    code = (
        "import os, math, json, re, itertools, functools, collections, heapq, bisect, string, random\n"
        "import statistics, fractions, decimal, typing, dataclasses, operator, copy, datetime, enum\n"
        "import xml.etree.ElementTree, sqlite3, unittest, hashlib, textwrap\n"
        "print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())\n"
        "print(decimal.Decimal('1.1') + decimal.Decimal('2.2'), 'caf\\u00e9'.encode('latin-1'))\n"
    )
    result = run_untrusted(code)
    assert result.status == "ok", result.stderr
    assert result.stdout == "65534 65534 65534 []\n3.3 b'caf\\xe9'\n"


@pytest.fixture
def open_dir() -> Path:
    """A world-writable directory outside the sandbox: only the read-only mounts stop a write to it."""
    path = Path(tempfile.mkdtemp(prefix="posttrain-escape-"))
    path.chmod(0o777)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_writing_outside_the_work_directory_is_refused(open_dir: Path) -> None:
    targets = {
        "world-writable directory": str(open_dir / "escape.txt"),
        "/tmp itself": f"/tmp/{open_dir.name}-escape.txt",
        "/dev/shm": f"/dev/shm/{open_dir.name}-escape.txt",
        "parent of the work directory": "os.path.join(os.path.dirname(os.getcwd()), 'escape.txt')",
        "relative parent": "'../escape.txt'",
        "home of root": "'/root/escape.txt'",
    }
    for where, target in targets.items():
        expr = target if target.startswith(("os.", "'")) else repr(target)
        code = f"import os\nopen('inside.txt', 'w').write('ok')\nopen({expr}, 'w').write('escaped')\n"
        result = run_untrusted(code)
        assert result.status == "error", where
        last = result.stderr.rstrip().rsplit("\n", 1)[-1]
        assert last.startswith(("PermissionError: [Errno 13]", "OSError: [Errno 30] Read-only file system")), (
            where,
            result.stderr,
        )
    assert list(open_dir.iterdir()) == []
    assert not Path(f"/tmp/{open_dir.name}-escape.txt").exists()
    assert not Path(f"/dev/shm/{open_dir.name}-escape.txt").exists()
    assert not Path("/root/escape.txt").exists()


def test_files_can_be_changed_only_in_the_work_directory(open_dir: Path) -> None:
    victim = open_dir / "victim.txt"
    victim.write_text("original")
    victim.chmod(0o666)
    code = (
        "import os\n"
        f"print(open({str(victim)!r}).read())\n"
        "for action in (lambda: open(" + repr(str(victim)) + ", 'a').write('x'),\n"
        "               lambda: os.remove(" + repr(str(victim)) + "),\n"
        "               lambda: os.mkdir('/tmp/posttrain-escape-dir'),\n"
        "               lambda: os.chmod(os.getcwd() + '/..', 0o777)):\n"
        "    try:\n        action()\n        print('allowed')\n"
        "    except OSError as exc:\n        print(type(exc).__name__, exc.errno)\n"
        "os.mkdir('sub')\nopen('sub/f.txt', 'w').write('fine')\nprint(open('sub/f.txt').read())\n"
    )
    result = run_untrusted(code)
    assert result.status == "ok", result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "original"
    assert "allowed" not in lines[1:5]
    assert lines[5] == "fine"
    assert victim.read_text() == "original"
    assert not Path("/tmp/posttrain-escape-dir").exists()
