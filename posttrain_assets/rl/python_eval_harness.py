"""The two programs of a ``python_eval`` run, which :mod:`posttrain_assets.rl.verifiers` runs side by side in one
sandbox with :func:`posttrain_assets.rl.sandbox.run_judged` (standard library only: this file's source is sent
into the sandbox, followed by a call of :func:`serve_solution` or :func:`run_tests`).

Why two processes: a candidate that runs in the same process as its tests can forge any verdict (rebind
``exec``, read a success token from the harness's frames, return an object whose ``__eq__`` is always true, exit
0 early, print the token...). Here the candidate and the tests never share a process, a namespace or an object:

- The **solution process** (:func:`serve_solution`, untrusted, its own uid) executes the candidate as module
  ``solution``, announces its top-level names, then answers calls: ``name(*args, **kwargs)`` with arguments and
  results as *plain data* (:func:`encode`): ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``,
  ``bytes``, ``bytearray``, and ``list``/``tuple``/``dict``/``set``/``frozenset`` of them, exact types only (no
  subclasses). Arguments that are lists, dicts, sets or bytearrays are sent back after the call, so in-place
  changes reach the tests too.
- The **judge process** (:func:`run_tests`, its own uid) executes the tests in a namespace where each of the
  solution's functions is a :class:`SolutionFunction` stub that makes such a call, and each of its plain-data
  globals a copy; names of built-ins (``all``, ``len``...) stay the judge's own. Whatever the solution sends is
  decoded into fresh plain objects (:func:`decode`), so the comparisons, ``assert``\\s and control flow of the
  tests run entirely on the judge's own objects. An exception the solution raises reaches the tests as the same
  built-in class (others as :class:`SolutionError`), except ``StopIteration``, which would silently end a
  ``map()`` or ``iter()`` of the tests. The judge alone holds the verdict descriptor (5) and writes ``pass`` or
  ``fail <reason>`` there.

Verdict reasons: ``tests_failed`` (a test raised: failed assert, an exception of the solution, a wrong type...),
``early_exit`` (the solution process closed the pipe or exited before its calls were answered, at any point: even
if the tests swallowed the error), ``unsupported_value`` (the tests failed and the solution had returned a value
that is not plain data, e.g. an object with its own ``__eq__``), ``memory`` (loading the solution hit the memory
limit), ``protocol_error`` (the solution process sent a malformed message). What this cannot judge: tests that
need the solution's own objects (instances of its classes, generators, functions it returns) or that pass the
solution a callable of their own; such a seed fails certification (its gold answer is not accepted).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import struct
import sys
import traceback
import types

REQUESTS, REPLIES = 3, 4  # in the solution process: calls from the judge, answers to it
FROM_SOLUTION, TO_SOLUTION, VERDICT = 3, 4, 5  # in the judge process
MAX_MESSAGE_BYTES = 64 << 20
_HEADER = struct.Struct(">Q")
_MUTABLE = (list, dict, set, bytearray)
# Exceptions that end an iteration instead of failing it: from the solution they arrive as SolutionError.
_CONTROL_FLOW_EXCEPTIONS = frozenset({"StopIteration", "StopAsyncIteration"})
_EXACT_INT = 1 << 53  # larger ints travel as hex (int <-> decimal str is capped at 4300 digits)


class Unsupported(TypeError):
    """A value that is not plain data (see the module docstring)."""


class SolutionExited(BaseException):  # noqa: N818 - an exit, not an error; BaseException so ``except Exception`` in a test does not swallow it
    """The solution process closed its pipe (it exited) before answering."""


class SolutionError(Exception):
    """An exception the solution raised whose class is not a built-in exception."""


# --------------------------------------------------------------------------- plain data


def encode(value: object, refs: dict[int, str] | None = None) -> object:
    """``value`` as JSON-ready tagged data; :class:`Unsupported` if it is not plain data. ``refs`` maps the
    ``id`` of a :class:`SolutionFunction` stub to its name (the judge passes the solution's functions by name)."""
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is float:
        return value
    if kind is int:
        return value if -_EXACT_INT < value < _EXACT_INT else {"int": hex(value)}  # type: ignore[operator]
    if kind is list:
        return [encode(v, refs) for v in value]  # type: ignore[attr-defined]
    if kind is tuple:
        return {"tuple": [encode(v, refs) for v in value]}  # type: ignore[attr-defined]
    if kind is dict:
        return {"dict": [[encode(k, refs), encode(v, refs)] for k, v in value.items()]}  # type: ignore[attr-defined]
    if kind is set or kind is frozenset:
        return {kind.__name__: [encode(v, refs) for v in value]}  # type: ignore[attr-defined]
    if kind is bytes or kind is bytearray:
        return {kind.__name__: value.hex()}  # type: ignore[attr-defined]
    if kind is complex:
        return {"complex": [value.real, value.imag]}  # type: ignore[attr-defined]
    if refs is not None and id(value) in refs:
        return {"ref": refs[id(value)]}
    raise Unsupported(f"{kind.__module__}.{kind.__qualname__} is not plain data")


def decode(data: object, refs: dict[str, object] | None = None) -> object:
    """Fresh plain objects from :func:`encode`'s output (``refs``: the solution's globals by name). Raises
    ``ValueError`` on anything else."""
    kind = type(data)
    if data is None or kind is bool or kind is str or kind is float or kind is int:
        return data
    if kind is list:
        return [decode(v, refs) for v in data]  # type: ignore[attr-defined]
    if kind is not dict or len(data) != 1:  # type: ignore[arg-type]
        raise ValueError(f"not an encoded value: {kind.__name__}")
    ((tag, body),) = data.items()  # type: ignore[attr-defined]
    if tag == "int" and type(body) is str:
        return int(body, 16)
    if tag in ("bytes", "bytearray") and type(body) is str:
        return (bytes if tag == "bytes" else bytearray).fromhex(body)
    if tag == "ref" and type(body) is str and refs is not None and body in refs:
        return refs[body]
    if type(body) is not list:
        raise ValueError(f"bad body for {tag!r}")
    if tag == "tuple":
        return tuple(decode(v, refs) for v in body)
    if tag == "set":
        return {decode(v, refs) for v in body}
    if tag == "frozenset":
        return frozenset(decode(v, refs) for v in body)
    if tag == "dict" and all(type(item) is list and len(item) == 2 for item in body):
        return {decode(k, refs): decode(v, refs) for k, v in body}
    if tag == "complex" and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(body[0], body[1])
    raise ValueError(f"not an encoded value: {tag!r}")


# --------------------------------------------------------------------------- messages


def send(fd: int, message: object) -> None:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def receive(fd: int) -> object:
    """The next message; ``EOFError`` when the other side closed the pipe, ``ValueError`` when it is malformed."""
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {size} bytes")
    return json.loads(_read_exactly(fd, size))


# --------------------------------------------------------------------------- the solution process


def serve_solution(source: str) -> None:
    """Execute the candidate ``source`` as module ``solution``, announce its names, answer calls until the judge
    closes the pipe. Never returns: exits the process."""
    exit_now, write_err = os._exit, sys.stderr.write  # held here: the candidate may rebind the module attributes
    namespace: dict[str, object] = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except Exception as exc:  # noqa: BLE001 - reported to the judge; SystemExit and the like end the process
        name = type(exc).__name__
        namespace.clear()  # frees what a memory bomb held, so the report can be written
        try:
            write_err(traceback.format_exc())
            send(REPLIES, ["failed", name])
        except BaseException:  # noqa: BLE001
            exit_now(97 if name == "MemoryError" else 1)
        exit_now(0)
    except BaseException as exc:  # noqa: BLE001 - sys.exit() at top level: the solution exits, as it asked
        code = getattr(exc, "code", 1)
        exit_now(code if isinstance(code, int) else 1)
    exported: dict[str, object] = {}
    for name, value in list(namespace.items()):
        if (name.startswith("__") and name.endswith("__")) or isinstance(value, types.ModuleType):
            continue
        if callable(value):
            exported[name] = ["callable"]
            continue
        with contextlib.suppress(Unsupported, RecursionError, ValueError):  # not plain data: the tests cannot use it
            exported[name] = ["value", encode(value)]
    send(REPLIES, ["ready", exported])
    while True:
        try:
            request = receive(REQUESTS)
        except EOFError:
            exit_now(0)
        send(REPLIES, _answer(namespace, request))


def _answer(namespace: dict[str, object], request: object) -> list[object]:
    """The reply to one ``["call", name, args, kwargs]`` request."""
    try:
        _, name, raw_args, raw_kwargs = request  # type: ignore[misc]
        args = [decode(a, namespace) for a in raw_args]
        kwargs = {str(k): decode(v, namespace) for k, v in raw_kwargs.items()}
        function = namespace[name]
    except Exception as exc:  # noqa: BLE001
        return ["raise", "TypeError", f"bad request: {exc!r}"]
    try:
        result = function(*args, **kwargs)  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - the solution's exception, for the tests to see
        bases = [c.__name__ for c in type(exc).__mro__ if c.__module__ == "builtins"]
        return ["raise", bases[0] if bases else "Exception", str(exc)[:10_000]]
    try:
        encoded = encode(result)
    except (Unsupported, RecursionError, ValueError):
        return ["unsupported", type(result).__qualname__]
    after = []
    for value in [*args, *kwargs.values()]:
        try:
            after.append(encode(value) if type(value) in _MUTABLE else None)
        except (Unsupported, RecursionError, ValueError):
            after.append(None)
    return ["return", encoded, after]


# --------------------------------------------------------------------------- the judge process


class _Judge:
    """The judge's side of the pipe, and what it saw of the solution."""

    def __init__(self) -> None:
        self.exited = False
        self.unsupported: list[str] = []
        self.protocol_error = False
        self.refs: dict[int, str] = {}

    def call(self, name: str, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
        if self.exited:
            raise SolutionExited("the solution process has exited")
        values = [*args, *kwargs.values()]
        try:
            request = ["call", name, [encode(a, self.refs) for a in args]]
            request.append({k: encode(v, self.refs) for k, v in kwargs.items()})
        except Unsupported as exc:
            raise TypeError(f"python_eval passes only plain data to the solution: {exc}") from None
        try:
            send(TO_SOLUTION, request)
            reply = receive(FROM_SOLUTION)
        except (EOFError, BrokenPipeError):
            self.exited = True
            raise SolutionExited("the solution process exited during a call") from None
        except (ValueError, RecursionError):
            return self._malformed()
        return self._result(reply, values)

    def _malformed(self) -> object:
        self.protocol_error = True
        raise SolutionExited("the solution process sent a malformed reply")

    def _result(self, reply: object, values: list[object]) -> object:
        """The result of a call from the solution's ``reply`` (or the exception it stands for)."""
        if type(reply) is not list or not reply:
            return self._malformed()
        kind = reply[0]
        if kind == "return" and len(reply) == 3 and type(reply[2]) is list:
            try:
                result = decode(reply[1])
                after = [None if new is None else decode(new) for new in reply[2]]
            except (ValueError, TypeError, RecursionError):
                return self._malformed()
            for value, new in zip(values, after, strict=False):
                if new is not None and type(value) in _MUTABLE:
                    _replace_contents(value, new)
            return result
        if kind == "raise" and len(reply) == 3:
            name, message = str(reply[1]), str(reply[2])
            error = getattr(builtins, name, None)
            if name in _CONTROL_FLOW_EXCEPTIONS:
                error = None  # raised into map(), iter() or a generator it would end the iteration silently
            try:
                exc = error(message) if isinstance(error, type) and issubclass(error, Exception) else None
            except Exception:  # noqa: BLE001 - a class that takes other arguments (UnicodeDecodeError...)
                exc = None
            raise exc if exc is not None else SolutionError(f"{name}: {message}")
        if kind == "unsupported" and len(reply) == 2:
            self.unsupported.append(str(reply[1]))
            raise TypeError(f"the solution returned a {reply[1]}, not plain data: python_eval cannot compare it")
        return self._malformed()


def _replace_contents(target: object, new: object) -> None:
    """Give the judge's argument ``target`` the contents the solution left in its copy."""
    if type(new) is not type(target):
        return
    if type(target) is dict or type(target) is set:
        target.clear()  # type: ignore[attr-defined]
        target.update(new)  # type: ignore[attr-defined]
    else:
        target[:] = new  # type: ignore[index]


class SolutionFunction:
    """Stands in, in the tests, for one function (or class) of the solution: calling it calls it in the solution
    process, with arguments and result as plain data."""

    __slots__ = ("_judge", "_name")

    def __init__(self, judge: _Judge, name: str) -> None:
        self._judge = judge
        self._name = name

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self._judge.call(self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<solution function {self._name}>"


def run_tests(tests: str) -> None:
    """Wait for the solution's names, execute ``tests`` against stubs of them, write the verdict. Never returns."""
    judge = _Judge()
    verdict = _run_tests(judge, tests)
    os.write(VERDICT, verdict.encode())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_tests(judge: _Judge, tests: str) -> str:
    try:
        ready = receive(FROM_SOLUTION)
    except EOFError:
        return "fail early_exit"
    except (ValueError, RecursionError):
        return "fail protocol_error"
    if type(ready) is list and len(ready) == 2 and ready[0] == "failed":
        return "fail memory" if ready[1] == "MemoryError" else "fail tests_failed"
    if not (type(ready) is list and len(ready) == 2 and ready[0] == "ready" and type(ready[1]) is dict):
        return "fail protocol_error"
    namespace: dict[str, object] = {"__name__": "__main__", "__builtins__": builtins}
    try:
        for name, spec in ready[1].items():
            if (name.startswith("__") and name.endswith("__")) or hasattr(builtins, name):
                continue  # the tests' built-ins (all, abs, len...) stay the judge's own
            if spec == ["callable"]:
                stub = SolutionFunction(judge, name)
                judge.refs[id(stub)] = name
                namespace[name] = stub
            elif type(spec) is list and len(spec) == 2 and spec[0] == "value":
                namespace[name] = decode(spec[1])
            else:
                return "fail protocol_error"
    except (ValueError, TypeError, RecursionError):
        return "fail protocol_error"
    failed = False
    try:
        exec(compile(tests, "tests.py", "exec"), namespace)
    except BaseException:  # noqa: BLE001 - any way the tests end other than normally is a failure
        failed = True
        traceback.print_exc()
    if judge.protocol_error:
        return "fail protocol_error"
    if judge.exited:
        return "fail early_exit"
    if failed:
        return "fail unsupported_value" if judge.unsupported else "fail tests_failed"
    return "pass"
