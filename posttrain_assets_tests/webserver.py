"""A real Dagster webserver in a subprocess for tests: start it, talk to its GraphQL API, screenshot its pages.

Everything here is plain HTTP (``urllib``) and subprocesses: the webserver from the virtualenv and Debian's
headless Chromium (``make browser`` installs it). Nothing is written outside the paths the caller passes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
LOCATION = "posttrain_assets"
REPOSITORY = "__repository__"  # the repository name Dagster gives a @dg.definitions code location
REPOSITORY_SELECTOR = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GraphQLError(AssertionError):
    pass


@dataclass
class Webserver:
    """A running ``dagster-webserver``: its URL, its log file, and a GraphQL client."""

    url: str
    log: Path
    process: subprocess.Popen

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            result = json.load(response)
        if result.get("errors"):
            raise GraphQLError(f"GraphQL errors: {json.dumps(result['errors'], indent=1)[:3000]}")
        return result["data"]

    # -- the code location ------------------------------------------------------------------------------------

    def wait_for_location(self, timeout: float = 120) -> None:
        """Wait until the code location is loaded; fail with its load error if it does not load."""
        query = """{ workspaceOrError { __typename
            ... on Workspace { locationEntries { name loadStatus
                locationOrLoadError { __typename ... on PythonError { message stack } } } }
            ... on PythonError { message } } }"""
        deadline = time.monotonic() + timeout
        while True:
            workspace = self.graphql(query)["workspaceOrError"]
            entries = {e["name"]: e for e in workspace.get("locationEntries", [])}
            entry = entries.get(LOCATION)
            if entry and entry["loadStatus"] == "LOADED":
                error = entry["locationOrLoadError"]
                if error and error["__typename"] == "PythonError":
                    raise AssertionError(f"code location {LOCATION} failed to load:\n{error['message']}")
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"code location {LOCATION} not loaded after {timeout}s: {workspace}")
            time.sleep(0.25)

    # -- runs -------------------------------------------------------------------------------------------------

    def add_dynamic_partitions(self, partitions_def: str, keys: Sequence[str]) -> None:
        mutation = """mutation($repo: RepositorySelector!, $name: String!, $key: String!) {
            addDynamicPartition(repositorySelector: $repo, partitionsDefName: $name, partitionKey: $key) {
                __typename ... on Error { message } } }"""
        for key in keys:
            result = self.graphql(mutation, {"repo": REPOSITORY_SELECTOR, "name": partitions_def, "key": key})
            outcome = result["addDynamicPartition"]
            if outcome["__typename"] != "AddDynamicPartitionSuccess":
                raise AssertionError(f"adding partition {key!r} to {partitions_def!r} failed: {outcome}")

    def launch_run(
        self, job: str, *, tags: Mapping[str, str] | None = None, run_config: Mapping[str, Any] | None = None
    ) -> str:
        """``launchRun`` of ``job``; returns the run id (tags such as ``dagster/partition`` pick a partition)."""
        mutation = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
            ... on LaunchRunSuccess { run { runId } }
            ... on RunConfigValidationInvalid { errors { message } }
            ... on PythonError { message stack }
            ... on Error { message } } }"""
        params = {
            "selector": {**REPOSITORY_SELECTOR, "jobName": job},
            "runConfigData": dict(run_config or {}),
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
        }
        outcome = self.graphql(mutation, {"params": params})["launchRun"]
        if outcome["__typename"] != "LaunchRunSuccess":
            raise AssertionError(f"launchRun {job} {tags or ''} failed: {json.dumps(outcome, indent=1)[:3000]}")
        return outcome["run"]["runId"]

    def run_status(self, run_id: str) -> str:
        query = "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"
        run = self.graphql(query, {"id": run_id})["runOrError"]
        if run["__typename"] != "Run":
            raise AssertionError(f"run {run_id}: {run}")
        return run["status"]

    def wait_for_runs(self, run_ids: Sequence[str], timeout: float = 300) -> dict[str, str]:
        """Poll ``runOrError { status }`` until every run has finished; returns run id -> final status."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = {run_id: self.run_status(run_id) for run_id in run_ids}
            if all(s in FINISHED for s in statuses.values()):
                return statuses
            if time.monotonic() > deadline:
                raise AssertionError(f"runs not finished after {timeout}s: {statuses}\n{self.log_tail()}")
            time.sleep(0.5)

    def failed_steps(self, run_id: str) -> dict[str, str]:
        """Failed step key -> its error message (with the cause), for assertion messages."""
        query = """query($id: ID!) { runOrError(runId: $id) { ... on Run {
            eventConnection(afterCursor: null) { events { __typename
                ... on ExecutionStepFailureEvent { stepKey error { message cause { message } } } } } } } }"""
        events = self.graphql(query, {"id": run_id})["runOrError"]["eventConnection"]["events"]
        failed = {}
        for event in events:
            if event["__typename"] == "ExecutionStepFailureEvent":
                error = event["error"] or {}
                cause = (error.get("cause") or {}).get("message", "")
                failed[event["stepKey"]] = f"{error.get('message', '')}{cause}".strip()
        return failed


@contextmanager
def running_webserver(
    env: Mapping[str, str], log: Path, *, cwd: Path, startup_timeout: float = 120
) -> Iterator[Webserver]:
    """``dagster-webserver -h 127.0.0.1 -p <free port>`` in its own process group, started in ``cwd`` (the
    project's root, whose pyproject.toml names the code location in ``[tool.dg]``).

    Yields once the code location has loaded; on exit (also on failure) the whole process group, the code
    server and any run worker included, is stopped: SIGTERM, then SIGKILL after 15 s.
    """
    port = free_port()
    binary = Path(sys.executable).with_name("dagster-webserver")
    command = [str(binary), "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Webserver(f"http://127.0.0.1:{port}", log, process)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"dagster-webserver exited with {process.returncode}:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{server.url}/server_info", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"webserver not up after {startup_timeout}s:\n{server.log_tail()}") from None
                time.sleep(0.25)
        server.wait_for_location(timeout=max(deadline - time.monotonic(), 5))
        yield server
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, grace: float = 15) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    # Children (code server, run workers) share the group; make sure none outlives the test.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=5)


def chromium(args: Sequence[str], profile: Path, *, size: tuple[int, int], timeout: float = 90) -> str:
    """Run headless Chromium once with a throw-away profile; returns its stdout (e.g. ``--dump-dom``)."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make browser` installs it (apt-get install chromium)"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"chromium exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


def screenshot(url: str, png: Path, profile: Path, *, size: tuple[int, int], budget_ms: int = 15000) -> None:
    """A PNG of ``url`` after ``budget_ms`` of virtual time (the page's JS has rendered by then)."""
    chromium([f"--virtual-time-budget={budget_ms}", f"--screenshot={png}", url], profile, size=size)


def rendered_dom(url: str, profile: Path, *, size: tuple[int, int], budget_ms: int = 15000) -> str:
    """The page's DOM after ``budget_ms`` of virtual time, as the screenshot sees it."""
    return chromium([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], profile, size=size)
