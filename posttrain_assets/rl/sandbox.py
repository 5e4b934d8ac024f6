"""Run untrusted Python code (model-written solutions) in a throw-away, isolated child process.

:func:`run_untrusted` runs one program; :func:`run_judged` runs an untrusted program next to a *judge* program that
talks to it over a pipe and alone can report a verdict (how ``python_eval`` keeps a candidate from forging its
score: :mod:`posttrain_assets.rl.python_eval_harness`). Neither raises for anything the code does, nor hangs: a
hang, a crash, a fork bomb or a memory bomb comes back as a :class:`SandboxResult` whose ``status`` says what
happened. Both are safe to call from many threads at once (no ``preexec_fn``, no signals, no shared state besides
a once-only probe and a table of the uids in use).

What a run gets when the sandbox is **isolated** (:func:`isolation`; the program in the child is
:mod:`posttrain_assets.rl.sandbox_supervisor`):

- **New PID, mount, network, IPC and UTS namespaces** (util-linux ``unshare``). In the PID namespace the
  supervisor is PID 1: when it ends, the kernel kills every process the code started, including ones that left
  the process group with ``setsid``. The network namespace has no interface up, not even loopback: no
  connection of any kind can be made, to ``127.0.0.1`` either.
- **A private root file system** (``pivot_root``; the host's root is detached, so no host path resolves at all):
  the interpreter's prefix and the system's shared libraries (``/usr/lib``, ``/usr/lib64``, ``/etc/ld.so.cache``)
  read-only, ``/dev`` with only null, zero, full, random and urandom, ``/work`` (the working directory and
  ``HOME``; ``/tmp`` links to it) the only writable place, a tmpfs capped at ``disk_mb`` MiB and
  :data:`WORK_INODES` files, and a ``/proc`` of the run's own PID namespace mounted ``hidepid=2,subset=pid``:
  each process sees only the processes of its own uid, never the host's or the supervisor's. Everything else
  of the host (the warehouse, other users' files, world-readable or not) does not exist for the code.
- **Uids of its own**: the code runs under a uid no other process on the machine uses (:data:`UID_BASE` and up,
  one per concurrent run; the judge under another), with no supplementary groups. The process-count limit
  ``RLIMIT_NPROC`` (:data:`NPROC_LIMIT`) is set after the uid drop (root ignores it) and counts per uid, so a
  fork bomb stops at that many processes and does not take from other runs. The code cannot signal, trace or
  read the memory of the judge or the supervisor.
- **Resource limits** (soft = hard): ``RLIMIT_CPU`` (``cpu_seconds``), ``RLIMIT_AS`` (``memory_mb``),
  ``RLIMIT_FSIZE`` (``max_output_bytes``: caps stdout/stderr, which are files, and any one file written),
  ``RLIMIT_CORE=0``; and a **wall-clock limit** enforced by the parent: ``Popen.wait(timeout=wall_seconds)``,
  then ``SIGKILL`` to the child's process group (which ends the PID namespace).
- **A fresh interpreter** (``python -s -S -B -P``: standard library only, no bytecode writes) and **a clean
  environment** (``PATH``, ``LANG``, ``LC_ALL``, ``HOME``, ``PYTHONHASHSEED=0`` so set/dict order of strings
  does not vary, ``PYTHONIOENCODING``), and, as a first line only, in-process blocks of socket/subprocess/ctypes
  imports and of ``os.fork``/``os.exec*``/``os.kill``/``os.setsid``... (code can undo these; the layers above
  are the guarantees).

Isolation needs Linux, root, and util-linux ``unshare``: the project's machines and CI have all three, and the
tests assert it. **Where it is not available the sandbox refuses to run** (status ``unavailable``; python_eval
scores ``sandbox_unavailable``) unless :data:`ALLOW_UNISOLATED_ENV` is ``1``: then the code runs with the limits,
the in-process blocks, the process-group kill and (as root) a uid of its own with ``RLIMIT_NPROC``, but sees the
host's files and processes, may use the network, and may leave processes behind that escaped its process group.
``POSTTRAIN_SANDBOX_UNSHARE=0`` turns isolation off (to try that mode).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "timeout", "memory", "crash", "error", "unavailable"]

# Exit codes the supervisor uses to report what it saw (distinct from Python's own 1 and 2).
EXIT_MEMORY = 97
EXIT_SETUP_FAILED = 98
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
DEFAULT_DISK_MB = 64
# Most files (inodes) the work directory of an isolated run can hold.
WORK_INODES = 4096
# Most processes (and threads) one uid of a run can have at once.
NPROC_LIMIT = 32
# A run's programs get uids from here up: two per concurrent run, distinct across the machine's processes
# (the calling process's pid picks the block), below 2**31.
UID_BASE = 1_000_000_000
_RUNS_PER_PROCESS = 64
ALLOW_UNISOLATED_ENV = "POSTTRAIN_SANDBOX_ALLOW_UNISOLATED"
_UNSHARE_FLAGS = ("--pid", "--mount", "--net", "--ipc", "--uts", "--fork", "--kill-child")
_PYTHON_FLAGS = ("-s", "-S", "-B", "-P", "-c")
_SUPERVISOR = (Path(__file__).with_name("sandbox_supervisor.py")).read_text(encoding="utf-8")


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one run of untrusted code.

    ``status``: ``ok`` (exit code 0), ``timeout`` (wall limit hit and the run killed, or the CPU limit hit),
    ``memory`` (``MemoryError`` under the address-space limit), ``crash`` (killed by a signal the code brought on
    itself: abort, segfault...), ``error`` (non-zero exit: an uncaught exception, a failed assert, ``sys.exit(1)``,
    a refused import or a sandbox setup failure), ``unavailable`` (not run: the sandbox cannot isolate here and
    running unisolated was not allowed; ``stderr`` says why). ``returncode`` is the code's (negative = signal;
    None when the parent killed the run, or, for :func:`run_judged`, when it was still running as the judge
    finished). ``stdout``/``stderr`` are decoded as UTF-8 (invalid bytes replaced), each at most
    ``max_output_bytes`` (a judged run's judge writes to the same two files); ``truncated`` says whether either
    was cut. ``elapsed`` is wall seconds.

    :func:`run_judged` only: ``verdict`` is what the judge wrote on its verdict descriptor (stripped; None if it
    wrote nothing: it failed, or the run was killed first), ``judge_status`` how the judge's process ended.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    elapsed: float
    truncated: bool = False
    verdict: str | None = None
    judge_status: Status | None = None


@dataclass(frozen=True)
class Isolation:
    """Whether :func:`run_untrusted` can isolate runs on this machine (see the module docstring).

    ``isolated``: namespaces, private root and (root being the caller) uids of their own all work here.
    ``reason``: why not, when not. ``own_uids``: the code runs under uids of its own (the caller is root).
    """

    isolated: bool
    reason: str | None
    own_uids: bool


_isolation_lock = threading.Lock()
_isolation: Isolation | None = None


def isolation() -> Isolation:
    """The isolation available here (probed once per process by running an isolated no-op, then cached)."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _probe_isolation()
        return _isolation


def unisolated_allowed() -> bool:
    """Whether the caller opted in to running code without isolation where it is not available."""
    return os.environ.get(ALLOW_UNISOLATED_ENV, "") == "1"


def _probe_isolation() -> Isolation:
    own_uids = hasattr(os, "geteuid") and os.geteuid() == 0
    if not sys.platform.startswith("linux"):
        return Isolation(False, f"isolation needs Linux namespaces; this is {sys.platform}", own_uids)
    if not own_uids:
        return Isolation(False, "isolation needs root (to mount the private root and drop to uids of its own)", False)
    if os.environ.get("POSTTRAIN_SANDBOX_UNSHARE", "1") == "0":
        return Isolation(False, "isolation turned off by POSTTRAIN_SANDBOX_UNSHARE=0", own_uids)
    if shutil.which("unshare") is None:
        return Isolation(False, "util-linux unshare is not installed", own_uids)
    probe = _run(["print('isolated')"], "", _Limits(2, 10, 256, 4096, 4), isolate=True)
    if probe.status != "ok" or probe.stdout != "isolated\n":
        last = probe.stderr.strip().rsplit("\n", 1)[-1] if probe.stderr.strip() else f"status {probe.status}"
        return Isolation(False, f"an isolated run failed here: {last}", own_uids)
    return Isolation(True, None, own_uids)


# --------------------------------------------------------------------------- uids


_uid_lock = threading.Lock()
_uid_free = threading.Condition(_uid_lock)
_uid_slots_in_use: set[int] = set()


def _reset_after_fork() -> None:
    """In a forked child (a worker process): fresh locks and no slots in use, whatever the parent's threads held."""
    global _isolation_lock, _uid_lock, _uid_free, _uid_slots_in_use
    _isolation_lock = threading.Lock()
    _uid_lock = threading.Lock()
    _uid_free = threading.Condition(_uid_lock)
    _uid_slots_in_use = set()


os.register_at_fork(after_in_child=_reset_after_fork)


@contextlib.contextmanager
def _run_uids() -> Iterator[tuple[int, int]]:
    """Two uids (code, judge) that no other run on this machine holds while the block runs: this process's
    block of :data:`_RUNS_PER_PROCESS` slots (by pid, which no other live process shares), one free slot of it."""
    with _uid_free:
        while len(_uid_slots_in_use) >= _RUNS_PER_PROCESS:
            _uid_free.wait()
        slot = min(set(range(_RUNS_PER_PROCESS)) - _uid_slots_in_use)
        _uid_slots_in_use.add(slot)
    first = UID_BASE + 2 * (os.getpid() * _RUNS_PER_PROCESS + slot)
    try:
        yield first, first + 1
    finally:
        with _uid_free:
            _uid_slots_in_use.discard(slot)
            _uid_free.notify()


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class _Limits:
    cpu_seconds: int
    wall_seconds: float
    memory_mb: int
    max_output_bytes: int
    disk_mb: int


def _python() -> str:
    """The interpreter for the child: the real executable behind a virtualenv's symlink."""
    return os.path.realpath(sys.executable)


def _clean_env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
    }


def _read_capped(path: str, cap: int) -> tuple[str, bool]:
    try:
        with open(path, "rb") as fh:
            data = fh.read(cap + 1)
    except OSError:
        return "", False
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def _kill_supervisor(proc: subprocess.Popen[bytes]) -> None:
    """Kill a timed-out isolated run: SIGKILL to the supervisor (``unshare``'s child, PID 1 of the run's PID
    namespace), so that the kernel kills every process of the namespace before ``unshare`` sees the supervisor
    end and exits. (Killing ``unshare`` first would return before the namespace's processes are gone.)"""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            os.kill(int(child), signal.SIGKILL)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the run's process group, then wait (a bounded while) until none of its processes is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.005)


def _unavailable(layers: Isolation) -> SandboxResult:
    message = (
        f"sandbox unavailable: {layers.reason}; not running untrusted code unisolated "
        f"(set {ALLOW_UNISOLATED_ENV}=1 to allow it)\n"
    )
    return SandboxResult("unavailable", None, "", message, 0.0)


def run_untrusted(
    code: str,
    *,
    stdin: str = "",
    cpu_seconds: int = 2,
    wall_seconds: float = 5,
    memory_mb: int = 256,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    disk_mb: int = DEFAULT_DISK_MB,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in the sandbox (see the module docstring).

    ``stdin`` is the child's whole standard input (empty: ``/dev/null``). ``cpu_seconds`` is the CPU-time limit
    of each process, ``wall_seconds`` the wall-clock limit of the run, ``memory_mb`` the address-space limit of
    each process, ``max_output_bytes`` the cap on each of stdout and stderr (and on any one file the code
    writes), ``disk_mb`` the size of the work directory (isolated runs).
    """
    layers = isolation()
    if not layers.isolated and not unisolated_allowed():
        return _unavailable(layers)
    limits = _Limits(max(1, int(cpu_seconds)), wall_seconds, int(memory_mb), int(max_output_bytes), int(disk_mb))
    return _run([code], stdin, limits, isolate=layers.isolated)


def run_judged(
    code: str,
    judge: str,
    *,
    cpu_seconds: int = 2,
    wall_seconds: float = 5,
    memory_mb: int = 256,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    disk_mb: int = DEFAULT_DISK_MB,
) -> SandboxResult:
    """Run untrusted ``code`` and trusted ``judge`` side by side in one sandbox, each as ``__main__`` in a
    process and under a uid of its own, with the same limits as :func:`run_untrusted` (per process).

    ``code`` reads on descriptor 3 what the judge writes on its descriptor 4, and writes on 4 what the judge reads
    on 3. The judge alone also holds descriptor 5: what it writes there is the result's ``verdict``. The code's
    process never holds that descriptor (the pipe is made after the code's process is started) and cannot reach
    the judge's process, so the code can influence the verdict only through what it says on the pipe.
    ``status``/``returncode`` describe the code's process; ``judge_status`` the judge's.
    """
    layers = isolation()
    if not layers.isolated and not unisolated_allowed():
        return _unavailable(layers)
    limits = _Limits(max(1, int(cpu_seconds)), wall_seconds, int(memory_mb), int(max_output_bytes), int(disk_mb))
    return _run([code, judge], "", limits, isolate=layers.isolated)


def _run(programs: list[str], stdin: str, limits: _Limits, *, isolate: bool) -> SandboxResult:
    own_uids = hasattr(os, "geteuid") and os.geteuid() == 0
    with _run_uids() if own_uids else contextlib.nullcontext() as uids:
        base = tempfile.mkdtemp(prefix="posttrain-sandbox-")
        try:
            return _run_in(base, programs, stdin, limits, isolate, uids)
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _run_in(
    base: str, programs: list[str], stdin: str, limits: _Limits, isolate: bool, uids: tuple[int, int] | None
) -> SandboxResult:
    work = os.path.join(base, "work")  # the working directory of an unisolated run; the root's mount point else
    os.mkdir(work, 0o700)
    if uids is not None and not isolate:
        os.chown(work, uids[0], uids[0])
    paths = []
    for name, source in zip(("code.py", "judge.py"), programs, strict=False):
        paths.append(os.path.join(base, name))
        with open(paths[-1], "w", encoding="utf-8") as fh:
            fh.write(source)
    status_path = os.path.join(base, "status")
    # The supervisor reports on this descriptor; none of the run's programs holds it.
    status_fd = os.open(status_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    config = {
        "cpu_seconds": limits.cpu_seconds,
        "memory_bytes": limits.memory_mb * 1024 * 1024,
        "file_bytes": limits.max_output_bytes + 1,
        "disk_bytes": limits.disk_mb * 1024 * 1024,
        "inodes": WORK_INODES,
        "nproc": NPROC_LIMIT,
        "memory_exit": EXIT_MEMORY,
        "setup_exit": EXIT_SETUP_FAILED,
        "code_path": paths[0],
        "judge_path": paths[1] if len(paths) > 1 else None,
        "status_fd": status_fd,
        "uids": list(uids) if uids is not None else None,
        "isolate": isolate,
        "root": work,
    }
    argv = [_python(), *_PYTHON_FLAGS, _SUPERVISOR, json.dumps(config)]
    if isolate:
        argv = [shutil.which("unshare") or "unshare", *_UNSHARE_FLAGS, "--", *argv]
    out_path, err_path = os.path.join(base, "stdout"), os.path.join(base, "stderr")
    start = time.monotonic()
    killed = False
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        stdin_file = None
        if stdin:
            in_path = os.path.join(base, "stdin")
            with open(in_path, "wb") as fh:
                fh.write(stdin.encode("utf-8"))
            stdin_file = open(in_path, "rb")  # noqa: SIM115 - closed below
        try:
            proc = subprocess.Popen(
                argv,
                stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=work,
                env=_clean_env("/work" if isolate else work),
                start_new_session=True,
                close_fds=True,
                pass_fds=(status_fd,),
            )
        finally:
            if stdin_file is not None:
                stdin_file.close()
            os.close(status_fd)
        try:
            returncode: int | None = proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            killed = True
            returncode = None
            if isolate:
                _kill_supervisor(proc)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        finally:
            # Always: kills a timed-out run and anything an unisolated run left in its group.
            _kill_group(proc)
            if killed:
                proc.wait()
    elapsed = time.monotonic() - start
    stdout, cut_out = _read_capped(out_path, limits.max_output_bytes)
    stderr, cut_err = _read_capped(err_path, limits.max_output_bytes)
    try:
        report = json.loads(_read_capped(status_path, 8192)[0] or "{}")
    except ValueError:
        report = {}
    if not isinstance(report, dict):
        report = {}
    status, code_returncode = _status(returncode, killed, stderr, str(report.get("code", "")))
    if len(programs) == 1:
        return SandboxResult(status, code_returncode, stdout, stderr, elapsed, cut_out or cut_err)
    judge_report = report.get("judge")
    judge_status: Status = _status(None if killed else 0, killed, "", str(judge_report))[0] if judge_report else "error"
    if killed:
        judge_status = "timeout"
    verdict = report.get("verdict") if not killed else None
    return SandboxResult(
        status,
        code_returncode,
        stdout,
        stderr,
        elapsed,
        cut_out or cut_err,
        verdict if isinstance(verdict, str) else None,
        judge_status,
    )


def _status(returncode: int | None, killed: bool, stderr: str, report: str) -> tuple[Status, int | None]:
    """Classify a process from the parent's view and the supervisor's report (``exit N`` / ``signal N`` /
    ``running``). Returns the status and the process's own return code (``-N`` for signal N), as far as known."""
    if killed or returncode is None:
        return "timeout", None
    kind, _, value = report.partition(" ")
    if kind == "running":
        return "ok", None
    if kind == "signal" and value.isdigit():
        returncode = -int(value)
    elif kind == "exit" and value.isdigit():
        returncode = int(value)
    if returncode < 0:
        return ("timeout" if -returncode in (signal.SIGXCPU, signal.SIGKILL) else "crash"), returncode
    if returncode == 0:
        return "ok", 0
    if returncode == EXIT_MEMORY or stderr.rstrip().rsplit("\n", 1)[-1].startswith("MemoryError"):
        return "memory", returncode
    return "error", returncode


__all__ = [
    "ALLOW_UNISOLATED_ENV",
    "DEFAULT_DISK_MB",
    "EXIT_MEMORY",
    "EXIT_SETUP_FAILED",
    "NPROC_LIMIT",
    "UID_BASE",
    "WORK_INODES",
    "Isolation",
    "SandboxResult",
    "Status",
    "isolation",
    "run_judged",
    "run_untrusted",
    "unisolated_allowed",
]
