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
  the child runs in **new network, PID and IPC namespaces**. The network namespace has no interfaces up (not
  even loopback), so no connection of any kind can be made: this is the real network guarantee. In the
  PID namespace the code is PID 1: it cannot see or signal processes outside, and killing it kills every
  process it started, even ones that left its process group. ``POSTTRAIN_SANDBOX_UNSHARE=0`` disables it.

- **Filesystem isolation**, layered; :func:`isolation` says which layers apply here:

  - *If available* (probed once, with ``mount_setattr(2)``, Linux 5.12+), the child also gets a **private
    mount namespace** in which every mount is remounted read-only and nosuid except a bind mount of the work
    directory, and a directory hiding the interpreter from other users (``/root``) is replaced by an empty
    tmpfs holding only the interpreter's prefix. Writing anywhere but the work directory fails with
    ``EROFS``/``EACCES`` (including world-writable ``/tmp`` and ``/dev/shm``).
  - When the caller is root, the user code runs as **nobody** (``setgroups([])``, ``setgid``/``setuid``
    :data:`UNPRIVILEGED_UID`) in a work directory it owns; the supervisor stays root only to report. The
    standard-library modules candidate code commonly needs are imported before the drop, in case the
    interpreter's directory is unreadable to nobody (without the mount namespace). Without the mount
    namespace, nobody can still write to world-writable directories (``/tmp``, ``/dev/shm``).
  - When the caller is not root and there are no namespaces: no filesystem isolation (the code can write
    whatever the calling user can); run the pipeline in a container for that.

  On the project's machines (root, util-linux ``unshare``) all layers apply, and the tests assert it.
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
# The user code runs as this uid (nobody) when the caller is root.
UNPRIVILEGED_UID = 65534
_UNSHARE_FLAGS = ("--net", "--pid", "--ipc", "--fork", "--kill-child")
_PYTHON_FLAGS = ("-s", "-S", "-B", "-P", "-c")

_BOOTSTRAP = r"""
import sys

# Standard-library modules candidate code commonly needs, imported before privileges are dropped: as the
# unprivileged user the interpreter's own directory may be unreadable (e.g. under /root, mode 0700).
_PRELOAD = (
    "abc", "array", "ast", "base64", "binascii", "bisect", "calendar", "cmath", "codecs", "collections",
    "collections.abc", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum",
    "fractions", "functools", "gc", "hashlib", "heapq", "inspect", "io", "itertools", "json", "keyword",
    "linecache", "locale", "math", "numbers", "operator", "os", "os.path", "pprint", "queue", "random", "re",
    "string", "statistics", "struct", "textwrap", "threading", "time", "timeit", "tokenize", "traceback",
    "types", "typing", "unicodedata", "uuid", "warnings", "weakref", "zlib",
    "encodings.ascii", "encodings.latin_1", "encodings.utf_16", "encodings.utf_32", "encodings.cp1252",
    "encodings.idna", "encodings.raw_unicode_escape", "encodings.unicode_escape",
)

MS_BIND, MS_REC, MS_NOSUID, MS_NODEV = 4096, 16384, 2, 4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE, SYS_MOUNT_SETATTR = -100, 0x8000, 442


def _preload():
    import importlib
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module this build lacks is simply not preloaded
            pass


def _read_only_mounts(work):
    # Runs as root in a private mount namespace (``unshare --mount``): every mount becomes read-only and
    # nosuid except a bind mount of the work directory; a directory that hides the interpreter from other
    # users (/root) is replaced by an empty tmpfs holding only a bind mount of the interpreter's prefix.
    import ctypes
    import os
    import stat
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc, what):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(source, target, fstype, flags, data):
        enc = lambda s: None if s is None else s.encode()  # noqa: E731
        check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    def setattr_(path, flags, attr_set, attr_clr):
        attr = MountAttr(attr_set, attr_clr, 0, 0)
        rc = libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                          ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
        check(rc, f"mount_setattr {path}")

    prefix = os.path.realpath(sys.base_prefix)
    hidden = None
    parts = prefix.strip("/").split("/")
    for i in range(1, len(parts)):
        candidate = "/" + "/".join(parts[:i])
        if not os.stat(candidate).st_mode & stat.S_IXOTH:
            hidden = candidate
            break
    if hidden is not None and not os.path.realpath(work).startswith(hidden + "/"):
        stash = os.path.join(os.path.dirname(work), "prefix")
        os.mkdir(stash, 0o700)
        mount(prefix, stash, None, MS_BIND | MS_REC, None)
        mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        os.makedirs(prefix, 0o755)
        mount(stash, prefix, None, MS_BIND | MS_REC, None)
    mount(work, work, None, MS_BIND, None)
    setattr_("/", AT_RECURSIVE, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0)
    setattr_(work, 0, 0, MOUNT_ATTR_RDONLY)
    os.chdir(work)  # onto the writable bind mount (the old cwd is the read-only directory under it)
    for name in [n for n in sys.modules if n == "ctypes" or n.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


def _drop_privileges(uid):
    import os
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("could not drop privileges")


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

def _run_user(source, memory_exit):
    import os
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
    # The supervisor: isolates the filesystem, sets the limits, forks the user code (which drops its
    # privileges), reports how it ended on the status descriptor and with its own exit code. Under
    # ``unshare --pid`` it is PID 1, so its exit kills every leftover process.
    import os
    cpu, mem, fsize, nproc, memory_exit, setup_exit, path, status_fd, uid, mounts = sys.argv[1:11]
    memory_exit, status_fd, uid = int(memory_exit), int(status_fd), int(uid)
    try:
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
        if mounts == "1":
            _read_only_mounts(os.getcwd())
        if uid >= 0:
            _preload()
        _limits(int(cpu), int(mem), int(fsize), int(nproc))
        pid = os.fork()
    except BaseException as exc:  # noqa: BLE001
        sys.stderr.write(f"sandbox setup failed: {exc!r}\n")
        sys.stderr.flush()
        os._exit(int(setup_exit))
    if pid == 0:
        try:
            os.close(status_fd)
            if uid >= 0:
                _drop_privileges(uid)
            _block()
        except BaseException as exc:  # noqa: BLE001
            sys.stderr.write(f"sandbox setup failed: {exc!r}\n")
            sys.stderr.flush()
            os._exit(int(setup_exit))
        _run_user(source, memory_exit)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        report, code = f"signal {os.WTERMSIG(status)}", 128 + os.WTERMSIG(status)
    else:
        report, code = f"exit {os.WEXITSTATUS(status)}", os.WEXITSTATUS(status)
    os.write(status_fd, report.encode())
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


@dataclass(frozen=True)
class Isolation:
    """Which isolation layers :func:`run_untrusted` applies on this machine (see the module docstring).

    ``namespaces``: new network, PID and IPC namespaces. ``read_only_fs``: a private mount namespace in
    which every mount is read-only except the work directory. ``unprivileged_uid``: the uid the user code
    runs as after dropping privileges (None: it runs as the calling user, because that is not root).
    """

    namespaces: bool
    read_only_fs: bool
    unprivileged_uid: int | None

    @property
    def filesystem(self) -> bool:
        """Whether writes outside the work directory are refused by the kernel (read-only mounts, or an
        unprivileged uid, which leaves world-writable directories such as /tmp writable)."""
        return self.read_only_fs or self.unprivileged_uid is not None


_isolation_lock = threading.Lock()
_isolation: Isolation | None = None


def isolation() -> Isolation:
    """The isolation layers available here (probed once per process, then cached)."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _probe_isolation()
        return _isolation


def unshare_available() -> bool:
    """Whether the child can be put in new network and PID namespaces here (probed once, then cached)."""
    return isolation().namespaces


def _run_quietly(argv: list[str]) -> bool:
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _probe_isolation() -> Isolation:
    uid = UNPRIVILEGED_UID if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    if os.environ.get("POSTTRAIN_SANDBOX_UNSHARE", "1") == "0" or not sys.platform.startswith("linux"):
        return Isolation(False, False, uid)
    exe = shutil.which("unshare")
    if exe is None:
        return Isolation(False, False, uid)
    if not _run_quietly([exe, *_UNSHARE_FLAGS, "--", "true"]):
        return Isolation(False, False, uid)
    # The read-only remount needs mount_setattr(2) (Linux 5.12+): probe it by running the bootstrap itself.
    with tempfile.TemporaryDirectory(prefix="posttrain-sandbox-probe-") as base:
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        # Defines the bootstrap's helper functions (everything before ``_limits``) and calls the remount.
        script = "import sys\nexec(sys.argv[1].partition('\\ndef _limits(')[0])\n_read_only_mounts(sys.argv[2])\n"
        ok = _run_quietly([exe, *_UNSHARE_FLAGS, "--mount", "--", _python(), *_PYTHON_FLAGS, script, _BOOTSTRAP, work])
    return Isolation(True, ok, uid)


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
    layers = isolation()
    base = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    status_fd = -1
    try:
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        if layers.unprivileged_uid is not None:
            os.chown(work, layers.unprivileged_uid, layers.unprivileged_uid)
        code_path = os.path.join(base, "main.py")
        status_path = os.path.join(base, "status")
        with open(code_path, "w", encoding="utf-8") as fh:
            fh.write(code)
        # The supervisor reports on this descriptor (the user code closes it): the mounts it sees are read-only.
        status_fd = os.open(status_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        argv = [
            _python(),
            *_PYTHON_FLAGS,
            _BOOTSTRAP,
            str(max(1, int(cpu_seconds))),
            str(int(memory_mb) * 1024 * 1024),
            str(int(max_output_bytes) + 1),
            str(_NPROC_LIMIT),
            str(EXIT_MEMORY),
            str(EXIT_SETUP_FAILED),
            code_path,
            str(status_fd),
            str(-1 if layers.unprivileged_uid is None else layers.unprivileged_uid),
            "1" if layers.read_only_fs else "0",
        ]
        if layers.namespaces:
            argv = ["unshare", *_UNSHARE_FLAGS, *(["--mount"] if layers.read_only_fs else []), "--", *argv]
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
                    pass_fds=(status_fd,),
                )
            finally:
                if stdin_file is not None:
                    stdin_file.close()
                os.close(status_fd)
                status_fd = -1
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
        if status_fd >= 0:
            os.close(status_fd)
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


__all__ = [
    "EXIT_MEMORY",
    "EXIT_SETUP_FAILED",
    "UNPRIVILEGED_UID",
    "Isolation",
    "SandboxResult",
    "Status",
    "isolation",
    "run_untrusted",
    "unshare_available",
]
