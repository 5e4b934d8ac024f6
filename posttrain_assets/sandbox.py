"""Run untrusted Python code (model-written solutions) in a throw-away child process.

:func:`run_untrusted` never raises for anything the code does and never hangs: a hang, a crash, a
fork bomb or a memory bomb comes back as a :class:`SandboxResult` whose ``status`` says what
happened. It is safe to call from many threads at once (no ``preexec_fn``, no signals, no shared
state besides a once-only probe).

What the child gets (all layers are applied on every machine unless marked *if available*):

- **A fresh interpreter**: ``python -s -S -B -P`` (no site-packages, no user site, no bytecode
  writes, no script directory on ``sys.path``), so only the standard library is importable.
- **A clean environment**: only ``PATH``, ``LANG``, ``LC_ALL``, ``HOME`` (the work directory),
  ``PYTHONHASHSEED=0`` (deterministic ``set``/``dict`` ordering of strings, so a score does not
  depend on hash randomisation) and ``PYTHONIOENCODING``. Nothing of the parent's environment.
- **A throw-away working directory**, created per call and deleted afterwards (whatever the outcome).
- **Resource limits** set by the bootstrap before the user code runs (soft = hard, so the code cannot
  raise them): ``RLIMIT_CPU`` (``cpu_seconds``), ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_FSIZE``
  (``max_output_bytes``: caps stdout/stderr, which are files, and any file written), ``RLIMIT_CORE=0``
  and, when not running as root (root ignores it), ``RLIMIT_NPROC``.
- **A wall-clock limit enforced by the parent**: ``Popen.wait(timeout=wall_seconds)``, then
  ``SIGKILL`` to the child's whole process group (the child is started in a new session). The group is
  killed after every run, so background processes do not outlive the call.
- **No network, no processes, no FFI (best effort, in-process)**: the bootstrap refuses to import
  ``socket``/``_socket``/``ssl``/``ctypes``/``subprocess``/``multiprocessing`` and friends, and removes
  ``os.fork``/``os.system``/``os.exec*``/``os.spawn*``/``os.posix_spawn*``/``os.kill*``/``os.setsid``
  from ``os`` and ``posix``. Determined code can get around in-process blocks; they are a first line.
- *If available* (checked once per process by running ``unshare --net --pid --fork --kill-child true``):
  the child runs in **new network and PID namespaces**. The network namespace has no interfaces up (not
  even loopback), so no connection of any kind can be made: this is the real network guarantee. In the
  PID namespace the code is PID 1: it cannot see or signal processes outside, and killing it kills every
  process it started, even ones that left its process group. ``POSTTRAIN_SANDBOX_UNSHARE=0`` disables it.

Not guaranteed: filesystem isolation. The code runs as the calling user and can read (and write)
whatever that user can; run the pipeline as an unprivileged user or in a container for that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "timeout", "memory", "crash", "error"]

# Exit codes the bootstrap uses to report what it saw (distinct from Python's own 1 and 2).
EXIT_MEMORY = 97
EXIT_SETUP_FAILED = 98
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
_NPROC_LIMIT = 32

_BOOTSTRAP = r"""
import sys

def _limits(cpu, mem, fsize, nproc):
    import resource
    def limit(which, value):
        resource.setrlimit(which, (value, value))
    limit(resource.RLIMIT_CORE, 0)
    # SIGXCPU at the soft limit, SIGKILL one second later (if the code catches SIGXCPU).
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    limit(resource.RLIMIT_AS, mem)
    limit(resource.RLIMIT_FSIZE, fsize)
    if nproc and hasattr(resource, "RLIMIT_NPROC"):
        import os
        if os.getuid() != 0:
            limit(resource.RLIMIT_NPROC, nproc)


def _block():
    blocked = frozenset({
        "socket", "_socket", "ssl", "_ssl", "ctypes", "_ctypes", "subprocess", "_posixsubprocess",
        "multiprocessing", "_multiprocessing", "asyncio", "http", "urllib", "ftplib", "smtplib",
        "telnetlib", "socketserver", "xmlrpc", "pty", "mmap",
    })

    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in blocked:
                raise ImportError(f"import of {name!r} is not allowed in the sandbox")
            return None

    for name in list(sys.modules):
        if name.partition(".")[0] in blocked:
            del sys.modules[name]
    sys.meta_path.insert(0, _Blocker())

    import os
    import posix
    names = ("fork", "forkpty", "vfork", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve",
             "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
             "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "kill", "killpg", "setsid", "setpgid",
             "setpgrp", "register_at_fork")
    for module in (os, posix):
        for name in names:
            if hasattr(module, name):
                delattr(module, name)

def _run_user(path, memory_exit):
    import os
    with open(path, encoding="utf-8") as fh:
        source = fh.read()
    sys.argv = ["main.py"]
    namespace = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
    try:
        exec(compile(source, "main.py", "exec"), namespace)
    except MemoryError:
        try:
            sys.stderr.write("MemoryError\n")
            sys.stderr.flush()
        finally:
            os._exit(memory_exit)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            sys.stderr.write(f"{code}\n")
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code & 0xFF)
    except BaseException:
        import traceback
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except MemoryError:
            os._exit(memory_exit)
        os._exit(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        os._exit(1)
    os._exit(0)


def _main():
    # The supervisor: sets the limits, forks the user code, reports how it ended in the status file and
    # with its own exit code. Under ``unshare --pid`` it is PID 1, so its exit kills every leftover process.
    import os
    cpu, mem, fsize, nproc, memory_exit, setup_exit, path, status_path = sys.argv[1:9]
    memory_exit = int(memory_exit)
    try:
        _limits(int(cpu), int(mem), int(fsize), int(nproc))
        pid = os.fork()
    except BaseException as exc:  # noqa: BLE001
        sys.stderr.write(f"sandbox setup failed: {exc!r}\n")
        sys.stderr.flush()
        os._exit(int(setup_exit))
    if pid == 0:
        try:
            _block()
        except BaseException as exc:  # noqa: BLE001
            sys.stderr.write(f"sandbox setup failed: {exc!r}\n")
            sys.stderr.flush()
            os._exit(int(setup_exit))
        _run_user(path, memory_exit)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        report, code = f"signal {os.WTERMSIG(status)}", 128 + os.WTERMSIG(status)
    else:
        report, code = f"exit {os.WEXITSTATUS(status)}", os.WEXITSTATUS(status)
    with open(status_path, "w") as fh:
        fh.write(report)
    os._exit(code)

_main()
"""


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one run of untrusted code.

    ``status``: ``ok`` (exit code 0), ``timeout`` (wall limit hit and the process group killed, or the
    CPU limit hit), ``memory`` (``MemoryError`` under the address-space limit), ``crash`` (killed by a
    signal the code brought on itself: abort, segfault...), ``error`` (non-zero exit: an uncaught
    exception, a failed assert, ``sys.exit(1)``, a refused import or a sandbox setup failure).
    ``returncode`` is the child's (negative = signal; None when the parent killed it).
    ``stdout``/``stderr`` are decoded as UTF-8 (invalid bytes replaced), each at most
    ``max_output_bytes``; ``truncated`` says whether either was cut. ``elapsed`` is wall seconds.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    elapsed: float
    truncated: bool = False


_unshare_lock = threading.Lock()
_unshare_ok: bool | None = None


def unshare_available() -> bool:
    """Whether the child can be put in new network and PID namespaces here (probed once, then cached)."""
    global _unshare_ok
    with _unshare_lock:
        if _unshare_ok is None:
            _unshare_ok = _probe_unshare()
        return _unshare_ok


def _probe_unshare() -> bool:
    if os.environ.get("POSTTRAIN_SANDBOX_UNSHARE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        done = subprocess.run(
            [exe, "--net", "--pid", "--fork", "--kill-child", "--", "true"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


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


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_untrusted(
    code: str,
    *,
    stdin: str = "",
    cpu_seconds: int = 2,
    wall_seconds: float = 5,
    memory_mb: int = 256,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a sandboxed child process (see the module docstring).

    ``stdin`` is the child's whole standard input (empty: ``/dev/null``). ``cpu_seconds`` is the CPU-time
    limit, ``wall_seconds`` the wall-clock limit the parent enforces, ``memory_mb`` the address-space
    limit, ``max_output_bytes`` the cap on each of stdout and stderr (and on any file the code writes).
    """
    base = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    try:
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        code_path = os.path.join(base, "main.py")
        status_path = os.path.join(base, "status")
        with open(code_path, "w", encoding="utf-8") as fh:
            fh.write(code)
        argv = [
            _python(),
            "-s",
            "-S",
            "-B",
            "-P",
            "-c",
            _BOOTSTRAP,
            str(max(1, int(cpu_seconds))),
            str(int(memory_mb) * 1024 * 1024),
            str(int(max_output_bytes) + 1),
            str(_NPROC_LIMIT),
            str(EXIT_MEMORY),
            str(EXIT_SETUP_FAILED),
            code_path,
            status_path,
        ]
        if unshare_available():
            argv = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--", *argv]
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
                    env=_clean_env(work),
                    start_new_session=True,
                    close_fds=True,
                )
            finally:
                if stdin_file is not None:
                    stdin_file.close()
            try:
                returncode: int | None = proc.wait(timeout=wall_seconds)
            except subprocess.TimeoutExpired:
                killed = True
                returncode = None
            finally:
                # Always: kills a timed-out child and anything the code left running in its group.
                _kill_group(proc)
                if killed:
                    proc.wait()
        elapsed = time.monotonic() - start
        stdout, cut_out = _read_capped(out_path, max_output_bytes)
        stderr, cut_err = _read_capped(err_path, max_output_bytes)
        status, returncode = _status(returncode, killed, stderr, _read_capped(status_path, 64)[0])
        return SandboxResult(status, returncode, stdout, stderr, elapsed, cut_out or cut_err)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _status(returncode: int | None, killed: bool, stderr: str, report: str) -> tuple[Status, int | None]:
    """Classify a run from the parent's view and the supervisor's report (``exit N`` / ``signal N``).

    Returns the status and the user code's own return code (``-N`` for signal N), as far as known.
    """
    if killed or returncode is None:
        return "timeout", None
    kind, _, value = report.partition(" ")
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


__all__ = ["EXIT_MEMORY", "EXIT_SETUP_FAILED", "SandboxResult", "Status", "run_untrusted", "unshare_available"]
