"""python_eval seeds through the whole graph with their unit tests: HumanEval (vendored, in its own layout) and
hand-written messages rows go bronze -> silver -> certification -> gold.rl_prompts -> the verl export, and the
shipped reward.py gives the verdicts certification gave.

The wiring under test: defs/silver/rl.py (certification reads each seed's tests, the rollouts' seed query selects
them), defs/gold/rl.py (gold carries them), publish/exports.py (extra_info.tests), publish/verl_reward.py."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from posttrain_assets.defs.silver.rl import CERTIFIED_SEEDS
from posttrain_assets.ingest.registry import render_registry
from posttrain_assets.publish.exports import REWARD_FILE, shard_files
from posttrain_assets.rl.verifiers import VERIFIER_VERSIONS, perturb_answer
from posttrain_assets.warehouse.io import fetch_dicts
from posttrain_assets_tests.graph import Graph, deployed
from posttrain_assets_tests.publish.test_trainer_handoff import load_shipped_reward
from posttrain_assets_tests.rl.test_code_seeds import HUMANEVAL, humaneval_tests, solution

# The whole graph on 7 rows, python_eval certification in the sandbox (three runs per seed): under a minute.
pytestmark = pytest.mark.slow

HUMANEVAL_ROWS = 4  # the first problems of the vendored file, their lines copied unchanged

ADD_TESTS = "assert add(1, 2) == 3\nassert add(-4, 4) == 0\n"
CODE_ROWS = {
    # A correct reference solution with its tests: certified.
    "right": {
        "messages": [{"role": "user", "content": "Write a Python function add(a, b) that returns the sum a + b."}],
        "answer": "def add(a, b):\n    return a + b\n",
        "verifier": "python_eval",
        "tests": ADD_TESTS,
    },
    # A reference solution its own tests reject: certification refuses the seed.
    "wrong": {
        "messages": [{"role": "user", "content": "Write a Python function sub(a, b) that returns a minus b."}],
        "answer": "def sub(a, b):\n    return a + b\n",
        "verifier": "python_eval",
        "tests": "assert sub(5, 3) == 2\nassert sub(0, 0) == 0\n",
    },
    # No tests: the verifier has nothing to run, certification says so.
    "untested": {
        "messages": [{"role": "user", "content": "Write a Python function mul(a, b) that returns the product."}],
        "answer": "def mul(a, b):\n    return a * b\n",
        "verifier": "python_eval",
    },
}


def humaneval_problems() -> list[dict[str, Any]]:
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(HUMANEVAL_ROWS)]


@pytest.fixture(scope="module")
def code_graph(tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path) -> Iterator[Graph]:
    landing = tmp_path_factory.mktemp("code_landing")
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(HUMANEVAL_ROWS)]
    (landing / "humaneval.jsonl").write_text("".join(lines), encoding="utf-8")
    (landing / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CODE_ROWS.values()), encoding="utf-8")
    common = {"license": "MIT", "kind": "human"}
    registry = landing / "sources.yaml"
    registry.write_text(
        render_registry(
            [
                {"name": "humaneval", "path": "humaneval.jsonl", "format": "humaneval", "origin": "openai/human-eval"}
                | common,
                {"name": "code", "path": "code.jsonl", "format": "messages", "regime": "rl", "origin": "hand"} | common,
            ]
        ),
        encoding="utf-8",
    )
    with deployed(registry, tmp_path_factory.mktemp("code_graph"), tokenizer_cache_dir) as graph:
        graph.run_all()
        yield graph


def seeds_by_name(graph: Graph) -> dict[str, dict[str, Any]]:
    """Each RL row of silver.records with its certification verdict, named: the HumanEval task id, or the key
    of :data:`CODE_ROWS`."""
    rows = graph.dicts(
        "SELECT r.id, r.source, r.prompt, r.answer, r.verifier, r.tests, r.source_ref, "
        "c.certified, c.reason, c.gold_scores, c.perturbed_score, c.verifier_version "
        "FROM silver.records r JOIN silver.rl_certification c USING (id) ORDER BY r.id"
    )
    names = {r["messages"][0]["content"]: name for name, r in CODE_ROWS.items()}
    return {
        f"HumanEval/{r['source_ref']['index']}" if r["source"] == "humaneval" else names[r["prompt"]]: r for r in rows
    }


def test_every_code_row_reaches_silver_with_its_tests(code_graph: Graph) -> None:
    assert code_graph.query("SELECT count(*) FROM silver.quarantine") == [(0,)]
    seeds = seeds_by_name(code_graph)
    problems = humaneval_problems()
    assert sorted(seeds) == sorted([p["task_id"] for p in problems] + list(CODE_ROWS))
    for problem in problems:
        seed = seeds[problem["task_id"]]
        assert (seed["verifier"], seed["answer"], seed["tests"]) == (
            "python_eval",
            solution(problem),
            humaneval_tests(problem),
        )
    assert [seeds[n]["tests"] for n in CODE_ROWS] == [r.get("tests") for r in CODE_ROWS.values()]


def test_certification_runs_each_seeds_own_tests(code_graph: Graph) -> None:
    seeds = seeds_by_name(code_graph)
    verdicts = {n: (s["certified"], s["reason"], s["gold_scores"], s["perturbed_score"]) for n, s in seeds.items()}
    certified = (True, None, [1.0, 1.0, 1.0], 0.0)
    assert verdicts == {
        **{p["task_id"]: certified for p in humaneval_problems()},
        "right": certified,
        "wrong": (False, "gold_not_accepted", [0.0, 0.0, 0.0], 0.0),
        "untested": (False, "no_tests", [0.0, 0.0, 0.0], 0.0),
    }
    assert {s["verifier_version"] for s in seeds.values()} == {VERIFIER_VERSIONS["python_eval"]}
    # The rollouts sample the certified seeds with their tests (defs/silver/rl.py's seed query).
    with duckdb.connect(str(code_graph.database), read_only=True) as conn:
        rollout_seeds = {r["id"]: r["tests"] for r in fetch_dicts(conn, CERTIFIED_SEEDS)}
    assert rollout_seeds == {s["id"]: s["tests"] for s in seeds.values() if s["certified"]}


def test_gold_and_the_verl_export_carry_the_tests(code_graph: Graph) -> None:
    seeds = seeds_by_name(code_graph)
    certified = {s["id"]: s for s in seeds.values() if s["certified"]}
    gold = {r["id"]: r["tests"] for r in code_graph.dicts("SELECT id, tests FROM gold.rl_prompts")}
    assert gold == {i: s["tests"] for i, s in certified.items()}
    assert len(gold) == HUMANEVAL_ROWS + 1 and all(gold.values())
    # The bank's blocking checks passed on it (its schema, every seed certified).
    assert code_graph.query(
        "SELECT check_name, passed FROM checks.verdicts WHERE asset = 'gold/rl_prompts' AND severity = 'ERROR' "
        "ORDER BY check_name"
    ) == [("gold_rl_prompts_schema_check", True), ("rl_certification_check", True)]
    exported = pq.read_table(shard_files(code_graph.database.parent / "exports" / "rl")).to_pylist()
    assert {r["extra_info"]["id"]: r["extra_info"]["tests"] for r in exported} == gold
    assert {r["extra_info"]["verifier"] for r in exported} == {"python_eval"}


def test_the_shipped_reward_gives_the_certification_verdicts(code_graph: Graph) -> None:
    reward = load_shipped_reward(code_graph.database.parent / "exports" / "rl" / REWARD_FILE)
    seeds = seeds_by_name(code_graph)
    exported = pq.read_table(shard_files(code_graph.database.parent / "exports" / "rl")).to_pylist()
    for row in exported:
        info, gold = row["extra_info"], row["reward_model"]["ground_truth"]
        seed = next(s for s in seeds.values() if s["id"] == info["id"])
        got = (
            reward.compute_score(row["data_source"], gold, gold, dict(info)),
            reward.compute_score(row["data_source"], perturb_answer("python_eval", gold), gold, dict(info)),
        )
        assert got == (seed["gold_scores"][0], seed["perturbed_score"]) == (1.0, 0.0), info["id"]
    # A plausible wrong answer to a HumanEval problem fails its tests at training time as it would have here.
    first = next(r for r in exported if r["extra_info"]["id"] == seeds["HumanEval/0"]["id"])
    wrong = "def has_close_elements(numbers, threshold):\n    return False\n"
    assert reward.compute_score(first["data_source"], wrong, "", dict(first["extra_info"])) == 0.0
    # The two seeds certification refused score what certification scored them, given the same extra_info.
    for name in ("wrong", "untested"):
        seed = seeds[name]
        info = {"id": seed["id"], "verifier": "python_eval", "verifier_version": seed["verifier_version"]}
        info["tests"] = seed["tests"]
        assert reward.compute_score("code", seed["answer"], seed["answer"], info) == seed["gold_scores"][0] == 0.0
