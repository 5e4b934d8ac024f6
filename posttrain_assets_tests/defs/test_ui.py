"""The UI, tested in a real browser: the demo graph materialised through the webserver's GraphQL API, every check
verdict read back through the API, and a headless-Chromium screenshot of the rendered asset graph.

The webserver runs in a subprocess against a Dagster instance, a DuckDB file and demo landing data under tmp_path.
No daemon: the test's instance uses the DefaultRunCoordinator, so ``launchRun`` starts each run at once (and no
sensor or automation condition launches runs behind the test's back). ``POSTTRAIN_UPDATE_SCREENSHOT=1`` also copies
the screenshot to docs/asset_graph.png; otherwise the test writes only under tmp_path.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.parse
from pathlib import Path

import dagster as dg
import pytest
import yaml
from PIL import Image

from posttrain_assets import pipeline
from posttrain_assets.demo.generator import generate_demo_data
from posttrain_assets.ingest.registry import load_registry
from posttrain_assets_tests.webserver import Webserver, rendered_dom, running_webserver, screenshot

# A webserver, the whole demo graph through it and a headless browser: about 40 s; `make test-fast` skips it.
pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Portrait: the UI fits the lineage graph to the page's width at most at 100%, so a landscape window would cut
# the (tall, left-to-right) graph; the DOM check below fails if an asset falls outside the window.
SCREENSHOT_SIZE = (1600, 2400)
# One process per run (the in-process executor): a step subprocess per asset would only add start-up time.
ENV_NAMES = ("POSTTRAIN_SOURCES", "POSTTRAIN_DUCKDB_PATH", "POSTTRAIN_TOKENIZER", "POSTTRAIN_CACHE_DIR", "DAGSTER_HOME")
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
GATE_ASSET = "silver/preference_pairs"
GATE_CHECK = "length_confound_check"
HELD_BACK = "gold/preference"
BIASED_SOURCE = "demo_pref_ultrafeedback"

ASSETS_QUERY = """{ assetNodes { assetKey { path } groupName jobNames
    dependedByKeys { path }
    partitionStats { numMaterialized numPartitions numFailed }
    assetMaterializations(limit: 1) { runId }
    assetChecksOrError { __typename ... on AssetChecks { checks { name blocking jobNames
        executionForLatestMaterialization { status runId evaluation { success description } } } } } } }"""


def instance_config() -> dict:
    """The project's dagster.yaml, plus: runs start without a daemon, and no first-visit modal over the graph."""
    config = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    config["run_coordinator"] = {"module": "dagster.core.run_coordinator", "class": "DefaultRunCoordinator"}
    config["nux"] = {"enabled": False}
    return config


def key(node: dict) -> str:
    return "/".join(node["assetKey"]["path"])


def downstream_closure(nodes: dict[str, dict], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        if current in seen or current not in nodes:
            continue
        seen.add(current)
        todo += ["/".join(k["path"]) for k in nodes[current]["dependedByKeys"]]
    return seen


def drawn_asset_labels(dom: str) -> list[str]:
    """The asset names the graph drew (long ones shortened in the middle with an ellipsis)."""
    return re.findall(r'class="AssetNode_assetName__[^"]*">([^<]+)<', dom)


def label_matches(label: str, name: str) -> bool:
    if "…" not in label:
        return label == name
    head, tail = label.split("…", 1)
    return name.startswith(head) and name.endswith(tail) and len(name) >= len(head) + len(tail)


def ingest_in_process(env: dict[str, str], sources: list[str]) -> None:
    """Bronze for every source, in this process and the same instance the webserver serves (the UI's own part
    is the refresh below; eleven run processes through the API would only add start-up time)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in (
            "POSTTRAIN_SOURCES",
            "POSTTRAIN_DUCKDB_PATH",
            "POSTTRAIN_TOKENIZER",
            "POSTTRAIN_CACHE_DIR",
            "DAGSTER_HOME",
        ):
            patch.setenv(name, env[name])
        with dg.DagsterInstance.get() as instance:
            pipeline.sync_source_partitions(instance, sources)
            ingest = pipeline.load_definitions().resolve_job_def("ingest_source")
            for name in sources:
                assert ingest.execute_in_process(
                    instance=instance, partition_key=name, run_config=pipeline.QUIET
                ).success


def materialise_demo_graph(server: Webserver) -> str:
    """Launch ``refresh_corpus`` through the GraphQL API and wait for it; its run id."""
    refresh = server.launch_run("refresh_corpus", run_config=IN_PROCESS)
    (status,) = server.wait_for_runs([refresh]).values()
    # The run fails for one reason only: the blocking length gate on the planted biased source.
    failed_steps = server.failed_steps(refresh)
    assert status == "FAILURE", f"refresh_corpus ended {status}; the demo's length gate should have failed it"
    assert set(failed_steps) == {f"{GATE_ASSET.replace('/', '__')}_{GATE_CHECK}"}, failed_steps
    return refresh


def assert_verdicts(server: Webserver, refresh: str, sources: list[str]) -> dict[str, dict]:
    nodes = {key(n): n for n in server.graphql(ASSETS_QUERY)["assetNodes"]}
    bronze = nodes["bronze/records"]["partitionStats"]
    assert bronze == {"numMaterialized": len(sources), "numPartitions": len(sources), "numFailed": 0}

    in_refresh = {k for k, n in nodes.items() if "refresh_corpus" in n["jobNames"]}
    held_back = downstream_closure(nodes, HELD_BACK)
    assert HELD_BACK in in_refresh and GATE_ASSET in in_refresh
    # Held back by the failed gate: never materialised. Every other asset of the run: materialised by it.
    for name in held_back:
        assert not nodes[name]["assetMaterializations"], f"{name} was materialised past the failed gate"
    not_by_run = sorted(
        k for k in in_refresh - held_back if [m["runId"] for m in nodes[k]["assetMaterializations"]] != [refresh]
    )
    assert not not_by_run, f"not materialised by refresh_corpus {refresh}: {not_by_run}"

    checks = {
        f"{k}:{c['name']}": (k, c)
        for k, n in nodes.items()
        if n["assetChecksOrError"]["__typename"] == "AssetChecks"
        for c in n["assetChecksOrError"]["checks"]
        if "refresh_corpus" in c["jobNames"]
    }
    assert f"{GATE_ASSET}:{GATE_CHECK}" in checks, sorted(checks)
    wrong = {}
    for name, (asset, check) in sorted(checks.items()):
        execution = check["executionForLatestMaterialization"] or {}
        evaluation = execution.get("evaluation") or {}
        if asset in held_back:
            # Its asset was never written, so the check had nothing to pass on.
            if execution.get("status") == "SUCCEEDED":
                wrong[name] = execution
        elif name == f"{GATE_ASSET}:{GATE_CHECK}":
            assert check["blocking"]
            assert execution["runId"] == refresh and execution["status"] == "FAILED", execution
            assert evaluation["success"] is False
            assert BIASED_SOURCE in evaluation["description"], evaluation["description"]
        elif not (
            execution.get("runId") == refresh and execution.get("status") == "SUCCEEDED" and evaluation["success"]
        ):
            wrong[name] = execution
    assert not wrong, f"checks that did not pass in run {refresh}: {wrong}"
    return nodes


def test_ui_materialises_the_demo_and_shows_the_asset_graph(tmp_path: Path, tokenizer_cache_dir: Path) -> None:
    registry = generate_demo_data(tmp_path / "demo", seed=7)
    sources = load_registry(registry).names
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config(), sort_keys=False))
    env = {
        **os.environ,
        "POSTTRAIN_SOURCES": str(registry),
        "POSTTRAIN_DUCKDB_PATH": str(tmp_path / "warehouse" / "posttrain.duckdb"),
        "POSTTRAIN_TOKENIZER": "smollm2",
        "POSTTRAIN_CACHE_DIR": str(tokenizer_cache_dir),
        "DAGSTER_HOME": str(home),
    }
    (tmp_path / "warehouse").mkdir()
    started = time.monotonic()
    timings: dict[str, float] = {}

    def lap(stage: str) -> None:
        timings[stage] = round(time.monotonic() - started - sum(timings.values()), 1)
        print(f"{stage}: {timings[stage]} s")

    ingest_in_process(env, sources)
    lap("ingest")
    with running_webserver(env, tmp_path / "webserver.log", cwd=PROJECT_ROOT) as server:
        lap("webserver up")
        refresh = materialise_demo_graph(server)
        lap("refresh_corpus run")
        nodes = assert_verdicts(server, refresh, sources)
        lap("verdicts")

        # Global lineage with every group expanded (the page's `expanded` query parameter, group ids as the UI
        # builds them), so each asset is drawn with its materialisation and check status.
        groups = sorted({n["groupName"] for n in nodes.values() if n["groupName"]})
        expanded = ",".join(f"global@global:{g}" for g in groups)
        url = f"{server.url}/asset-groups?{urllib.parse.urlencode({'expanded': expanded})}"
        dom = rendered_dom(url, tmp_path / "chromium_dom", size=SCREENSHOT_SIZE)
        (tmp_path / "asset_graph.html").write_text(dom)
        labels = drawn_asset_labels(dom)
        missing = sorted(k for k in nodes if not any(label_matches(label, k.split("/")[-1]) for label in labels))
        assert len(labels) == len(nodes), f"{len(labels)} asset nodes drawn, {len(nodes)} assets: {labels}"
        assert not missing, f"assets not drawn inside the {SCREENSHOT_SIZE} window on {url}: {missing}"
        png = tmp_path / "asset_graph.png"
        screenshot(url, png, tmp_path / "chromium_profile", size=SCREENSHOT_SIZE)
        lap("browser")

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == SCREENSHOT_SIZE
        # A rendered graph, not a blank page or a lone spinner: many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 200
    if os.environ.get("POSTTRAIN_UPDATE_SCREENSHOT") == "1":
        (PROJECT_ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(png, PROJECT_ROOT / "docs" / "asset_graph.png")
