"""The supervisor of one sandbox run: the program :mod:`posttrain_assets.rl.sandbox` starts in its child process.

It runs as ``python -s -S -B -P -c <this file's source> <config JSON>`` (standard library only: the project is
not importable there), as root when the caller is root, and, when the sandbox is isolated, as PID 1 of new PID,
mount, network, IPC and UTS namespaces (``unshare``). In order, it:

1. reads the program(s) to run from the host files the config names;
2. imports the standard-library modules candidate code commonly needs (:data:`PRELOAD`), while it can;
3. when isolated, builds a private root file system and pivots into it (:func:`build_root`): afterwards no path
   of the host is reachable, only the interpreter, the system libraries (read-only), a size-capped ``/work``,
   a few devices and a ``/proc`` showing only the run's own processes;
4. sets the resource limits every process of the run inherits (CPU, address space, file size, no core files);
5. forks the untrusted program, and for a judged run the judge, each under a uid of its own with the
   process-count limit applied after the uid drop (root ignores it), the in-process blocks, and only the file
   descriptors it needs (the judge alone holds the verdict descriptor);
6. reports how each ended, as JSON, on the status descriptor, which no child holds.

When it exits (under ``unshare --pid``), the kernel kills every process left in the namespace.
"""

from __future__ import annotations

import json
import os
import sys

# Standard-library modules imported before the root is replaced and privileges are dropped, so candidate code
# finds them loaded (and a run does not pay for importing them).
PRELOAD = (
    "abc", "array", "ast", "base64", "binascii", "bisect", "calendar", "cmath", "codecs", "collections",
    "collections.abc", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum",
    "fractions", "functools", "gc", "hashlib", "heapq", "inspect", "io", "itertools", "json", "keyword",
    "linecache", "locale", "math", "numbers", "operator", "os", "os.path", "pprint", "queue", "random", "re",
    "string", "statistics", "struct", "textwrap", "threading", "time", "timeit", "tokenize", "traceback",
    "types", "typing", "unicodedata", "uuid", "warnings", "weakref", "zlib", "resource",
    "encodings.ascii", "encodings.latin_1", "encodings.utf_16", "encodings.utf_32", "encodings.cp1252",
    "encodings.idna", "encodings.raw_unicode_escape", "encodings.unicode_escape",
)  # fmt: skip

# Modules the run's programs may not import, and os functions removed from them: a first line of defence only
# (code can undo it); the kernel layers (namespaces, private root, uids, limits) are the guarantees.
BLOCKED_MODULES = frozenset({
    "socket", "_socket", "ssl", "_ssl", "ctypes", "_ctypes", "subprocess", "_posixsubprocess",
    "multiprocessing", "_multiprocessing", "asyncio", "http", "urllib", "ftplib", "smtplib",
    "telnetlib", "socketserver", "xmlrpc", "pty", "mmap",
})  # fmt: skip
BLOCKED_OS_FUNCTIONS = (
    "fork", "forkpty", "vfork", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve",
    "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
    "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "kill", "killpg", "setsid", "setpgid",
    "setpgrp", "register_at_fork",
)  # fmt: skip

# Host paths the interpreter needs, exposed read-only at the same place in the private root (symbolic links are
# recreated as links): the system's shared libraries and the loader's cache. The interpreter's own prefix (its
# standard library, extension modules and libpython) is added at run time.
SYSTEM_PATHS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache")
DEVICES = ("null", "zero", "full", "random", "urandom")

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


def preload() -> None:
    import contextlib
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(Exception):  # a module this build lacks is simply not preloaded
            importlib.import_module(name)


class Mounts:
    """mount(2), umount2(2) and pivot_root(2) through libc (the supervisor is root in its own mount namespace)."""

    def __init__(self) -> None:
        import ctypes

        self._ctypes = ctypes
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            err = self._ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        def enc(text: str | None) -> bytes | None:
            return None if text is None else text.encode()

        rc = self._libc.mount(enc(source), enc(target), enc(fstype), self._ctypes.c_ulong(flags), enc(data))
        self._check(rc, f"mount {target}")

    def bind_read_only(self, source: str, target: str) -> None:
        self.mount(source, target, None, MS_BIND)
        self.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)

    def pivot_into_cwd(self) -> None:
        """Make the current directory the root and detach the old root entirely (``pivot_root(".", ".")``)."""
        import platform

        number = SYS_PIVOT_ROOT.get(platform.machine())
        if number is None:
            raise OSError(f"pivot_root: unknown syscall number on {platform.machine()}")
        self._check(self._libc.syscall(self._ctypes.c_long(number), b".", b"."), "pivot_root")
        self._check(self._libc.umount2(b".", MNT_DETACH), "umount old root")


def expose(mounts: Mounts, root: str, path: str, done: list[str]) -> None:
    """Make host ``path`` visible read-only at the same place under ``root`` (a link is recreated as a link and
    its target exposed); nothing if it does not exist or lies under a path already exposed."""
    if any(path == d or path.startswith(d + "/") for d in done):
        return
    inside = root + path
    if os.path.islink(path):
        os.makedirs(os.path.dirname(inside), 0o755, exist_ok=True)
        if not os.path.lexists(inside):
            os.symlink(os.readlink(path), inside)
        expose(mounts, root, os.path.realpath(path), done)
        return
    if os.path.isdir(path):
        os.makedirs(inside, 0o755, exist_ok=True)
    elif os.path.isfile(path):
        os.makedirs(os.path.dirname(inside), 0o755, exist_ok=True)
        open(inside, "w").close()  # noqa: SIM115 - an empty mount point
    else:
        return
    mounts.bind_read_only(path, inside)
    done.append(path)


def build_root(root: str, owner: int | None, disk_bytes: int, inodes: int) -> None:
    """Build the private root on the empty host directory ``root`` and pivot into it, then ``cd /work``.

    Layout: a read-only tmpfs holding the exposed interpreter and libraries (:func:`expose`), ``/dev`` with only
    :data:`DEVICES`, ``/work`` (a tmpfs of ``disk_bytes`` and ``inodes`` owned by ``owner``: the only writable
    place), ``/tmp`` a link to it, and ``/proc`` mounted for this PID namespace with ``hidepid=2,subset=pid``
    (each uid sees only its own processes; no system-wide files). The old root is detached, so no file of the
    host is reachable by any path, readable or not.
    """
    mounts = Mounts()
    mounts.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m,nr_inodes=4096")
    done: list[str] = []
    for path in (*SYSTEM_PATHS, os.path.realpath(sys.base_prefix)):
        expose(mounts, root, path, done)
    dev = root + "/dev"
    os.mkdir(dev, 0o755)
    mounts.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=16k,nr_inodes=32")
    for name in DEVICES:
        open(f"{dev}/{name}", "w").close()  # noqa: SIM115 - an empty mount point
        mounts.mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    mounts.mount(None, dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    work = root + "/work"
    os.mkdir(work, 0o755)
    owner_options = "" if owner is None else f",uid={owner},gid={owner}"
    options = f"mode=0700,size={disk_bytes},nr_inodes={inodes}{owner_options}"
    mounts.mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, options)
    os.symlink("work", root + "/tmp")
    os.mkdir(root + "/proc", 0o555)
    mounts.mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2,subset=pid")
    mounts.mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    mounts.pivot_into_cwd()
    os.chdir("/work")
    # The run's programs get no ready-made ctypes (they could import it again; the kernel layers hold anyway).
    for name in [n for n in sys.modules if n == "ctypes" or n.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


def keep_only(fds: list[int]) -> None:
    """Make ``fds`` descriptors 3, 4, ... (in order) and close every other descriptor above 2."""
    import resource

    wanted = list(fds)
    while any(fd < 3 + len(wanted) for fd in wanted):  # move them out of the target range first
        wanted = [os.dup(fd) if fd < 3 + len(wanted) else fd for fd in wanted]
    for i, fd in enumerate(wanted):
        os.dup2(fd, 3 + i, inheritable=True)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    os.closerange(3 + len(wanted), limit if 0 < limit < 1 << 20 else 1 << 16)


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != uid:
        raise OSError("could not drop privileges")


def set_limits(config: dict) -> None:
    """The limits every process of the run inherits (soft = hard, so the code cannot raise them)."""
    import resource

    def limit(which: int, value: int) -> None:
        resource.setrlimit(which, (value, value))

    limit(resource.RLIMIT_CORE, 0)
    # SIGXCPU at the soft limit, SIGKILL one second later (if the code catches SIGXCPU).
    cpu = int(config["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    limit(resource.RLIMIT_AS, int(config["memory_bytes"]))
    limit(resource.RLIMIT_FSIZE, int(config["file_bytes"]))


def block() -> None:
    blocked = BLOCKED_MODULES

    class Blocker:
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name.partition(".")[0] in blocked:
                raise ImportError(f"import of {name!r} is not allowed in the sandbox")

    for name in list(sys.modules):
        if name.partition(".")[0] in blocked:
            del sys.modules[name]
    sys.meta_path.insert(0, Blocker())
    import posix

    for module in (os, posix):
        for name in BLOCKED_OS_FUNCTIONS:
            if hasattr(module, name):
                delattr(module, name)


def run_program(source: str, memory_exit: int) -> None:
    """Run ``source`` as ``__main__`` and exit: 0 when it ends normally, its code on ``sys.exit``, 1 on an
    uncaught exception (traceback on stderr), ``memory_exit`` on ``MemoryError``."""
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


def start(source: str, fds: list[int], uid: int | None, cwd: str | None, config: dict) -> int:
    """Fork a process of the run: it keeps only ``fds`` (as 3, 4, ...), drops to ``uid``, gets the process-count
    limit (after the drop: root ignores it; the count is per uid, and each uid is the run's own) and the blocks,
    then runs ``source``. Returns its pid."""
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        keep_only(fds)
        if cwd is not None:
            os.chdir(cwd)
        if uid is not None:
            import resource

            drop_privileges(uid)
            nproc = int(config["nproc"])
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        block()
    except BaseException as exc:  # noqa: BLE001
        sys.stderr.write(f"sandbox setup failed: {exc!r}\n")
        sys.stderr.flush()
        os._exit(int(config["setup_exit"]))
    run_program(source, int(config["memory_exit"]))
    os._exit(0)  # not reached: run_program exits


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def exit_code(report: str) -> int:
    kind, _, value = report.partition(" ")
    if kind == "signal":
        return 128 + int(value)
    return int(value) if kind == "exit" else 0


def wait_briefly(pid: int, seconds: float) -> str:
    """How ``pid`` ended, waiting at most ``seconds``; ``running`` if it is still running then."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return describe(status)
        if time.monotonic() >= deadline:
            return "running"
        time.sleep(0.005)


def judged(code: str, judge: str, uids: list[int | None], config: dict) -> dict[str, str | None]:
    """Run ``code`` and ``judge`` connected by two pipes (each sees its ends as 3 = read, 4 = write); the judge
    alone also holds 5, the write end of the verdict pipe, created after the code's process was started."""
    judge_to_code = os.pipe()
    code_to_judge = os.pipe()
    code_pid = start(code, [judge_to_code[0], code_to_judge[1]], uids[0], None, config)
    verdict_read, verdict_write = os.pipe()
    judge_cwd = "/" if config["isolate"] else None
    judge_pid = start(judge, [code_to_judge[0], judge_to_code[1], verdict_write], uids[1], judge_cwd, config)
    for fd in (*judge_to_code, *code_to_judge, verdict_write):
        os.close(fd)
    chunks = []
    size = 0
    while size <= 4096:
        chunk = os.read(verdict_read, 4096)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    os.close(verdict_read)
    _, status = os.waitpid(judge_pid, 0)
    verdict = b"".join(chunks)[:4096].decode("utf-8", errors="replace").strip() or None
    # After a pass the code's fate does not matter; otherwise it may explain the failure (a timeout, a crash).
    code_report = "running" if verdict == "pass" else wait_briefly(code_pid, 1.0)
    return {"code": code_report, "judge": describe(status), "verdict": verdict}


def main() -> None:
    config = json.loads(sys.argv[1])
    os.umask(0o022)
    status_fd = int(config["status_fd"])
    uids = config["uids"] or [None, None]
    try:
        with open(config["code_path"], encoding="utf-8") as fh:
            code = fh.read()
        judge = None
        if config["judge_path"]:
            with open(config["judge_path"], encoding="utf-8") as fh:
                judge = fh.read()
        if config["uids"]:
            preload()
        if config["isolate"]:
            build_root(config["root"], uids[0], int(config["disk_bytes"]), int(config["inodes"]))
        set_limits(config)
        if judge is None:
            pid = start(code, [], uids[0], None, config)
    except BaseException as exc:  # noqa: BLE001
        sys.stderr.write(f"sandbox setup failed: {exc!r}\n")
        sys.stderr.flush()
        os._exit(int(config["setup_exit"]))
    if judge is None:
        _, status = os.waitpid(pid, 0)
        report: dict[str, str | None] = {"code": describe(status)}
    else:
        report = judged(code, judge, uids, config)
    os.write(status_fd, json.dumps(report).encode())
    os._exit(exit_code(report["code"] or ""))


if __name__ == "__main__":
    main()
