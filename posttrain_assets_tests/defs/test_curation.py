"""Curation wiring: opt-in jobs, and the curate job on the demo and on the real test data (coverage against random,
determinism, the demo mixture's manifest against its rows and its TRL export)."""

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

import posttrain_assets.defs.automation.jobs as jobs_module
from posttrain_assets import settings
from posttrain_assets.demo.generator import generate_demo_data
from posttrain_assets.pipeline import load_definitions
from posttrain_assets.publish.exports import SFT_SCHEMA
from posttrain_assets_tests.graph import REAL_REGISTRY, Graph, deployed

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEMO_SPEC = PROJECT_ROOT / "posttrain_assets" / "demo" / "mixtures" / "demo_sft_mix.yaml"
CURATION_KEYS = {"silver/embeddings", "silver/semantic_duplicates", "silver/diversity_selection", "gold/mixtures"}


def _keys(defs: dg.Definitions, job: str) -> set[str]:
    return {k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.executable_asset_keys}


def test_curation_is_opt_in() -> None:
    with dg.instance_for_test():  # as test_definitions loads them: inside a live instance
        defs = load_definitions()
        assert _keys(defs, "curate") == CURATION_KEYS
        assert not CURATION_KEYS & _keys(defs, "refresh_corpus")  # the default refresh never loads the model
        # POSTTRAIN_CURATION=on (read as the definitions load) selects the curation group into the refresh as well.
        graph = defs.resolve_asset_graph()
        with_curation = {k.to_user_string() for k in jobs_module.refreshed(True).resolve(graph)}
        without = {k.to_user_string() for k in jobs_module.refreshed(False).resolve(graph)}
        assert with_curation - without == CURATION_KEYS


def curate(graph: Graph) -> dg.ExecuteInProcessResult:
    result = graph.definitions.resolve_job_def("curate").execute_in_process(instance=graph.instance)
    assert result.success
    return result


def materialization(result: dg.ExecuteInProcessResult, key: str) -> dict:
    for event in result.get_asset_materialization_events():
        if event.materialization.asset_key.to_user_string() == key:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    raise KeyError(key)


def coverage_numbers(metadata: dict, regime: str) -> tuple[float, float, float, float]:
    prefix = f"coverage/{regime}/all/"
    return tuple(
        round(metadata[prefix + name], 3)
        for name in ("mean_distance", "random_mean_distance", "max_distance", "random_max_distance")
    )


@pytest.fixture(scope="module")
def demo_graph(tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path) -> Iterator[Graph]:
    landing = tmp_path_factory.mktemp("demo_landing")
    generate_demo_data(landing, seed=7)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(settings.MIXTURES, str(DEMO_SPEC))
        with deployed(landing / "sources.yaml", tmp_path_factory.mktemp("demo_graph"), tokenizer_cache_dir) as graph:
            graph.run_all()
            yield graph


@pytest.mark.slow
def test_demo_curation_covers_more_than_random_and_builds_the_demo_mixture(demo_graph: Graph) -> None:
    # The default refresh and publish ran: no curation table exists yet.
    assert not demo_graph.query("SELECT table_name FROM duckdb_tables() WHERE table_name = 'embeddings'")
    first = curate(demo_graph)
    selection = materialization(first, "silver/diversity_selection")
    # Half of each regime's gold rows, covering their pool more closely than a random half (docs/curation.md).
    assert demo_graph.query("SELECT regime, count(*) FROM silver.diversity_selection GROUP BY ALL ORDER BY ALL") == [
        ("preference", 370),
        ("rl", 422),
        ("sft", 475),
    ]
    assert coverage_numbers(selection, "sft") == (0.065, 0.092, 0.197, 0.471)
    # (the balanced pairs gold keeps are drawn by md5(seed:source:id) order since the audit moved to SQL)
    assert coverage_numbers(selection, "preference") == (0.119, 0.142, 0.303, 0.484)
    assert coverage_numbers(selection, "rl") == (0.014, 0.045, 0.075, 0.559)
    for regime in ("sft", "preference", "rl"):
        assert selection[f"coverage/{regime}/all/clusters_covered"] == selection[f"coverage/{regime}/all/clusters"]

    # The demo mixture: its manifest matches its rows, component by component.
    manifest = json.loads(demo_graph.query("SELECT manifest FROM gold.mixture_manifests")[0][0])
    rows = demo_graph.query(
        "SELECT component, count(*), sum(tokens), count(DISTINCT id), max(epoch) FROM gold.mixtures "
        "WHERE mixture = 'demo_sft_mix' GROUP BY ALL"
    )
    by_component = {c: (n, t, d, e) for c, n, t, d, e in rows}
    for component in manifest["components"]:
        n, tokens, distinct, last_epoch = by_component[component["name"]]
        assert (n, tokens) == (component["delivered_rows"], component["delivered_tokens"])
        assert distinct == component["drawn_rows"] and last_epoch == component["epochs"] - 1
        if component["asked_tokens"] is not None:
            assert component["delivered_tokens"] <= component["asked_tokens"]
    conversations, instructions, again = manifest["components"]
    assert (conversations["asked_tokens"], instructions["asked_tokens"]) == (45000, 15000)
    assert (again["asked_rows"], again["delivered_rows"], again["drawn_rows"]) == (50, 50, 25)
    assert manifest["gold_versions"]["gold.sft"]["rows"] == 950
    assert manifest["gold_versions"]["gold.sft"]["data_version"]  # Dagster's version of gold/sft, recorded
    assert manifest["delivered"]["rows"] == sum(n for n, *_ in by_component.values())

    # The TRL export of the mixture holds the same rows (a row drawn twice is there twice).
    folder = demo_graph.database.parent / "exports" / "mixtures" / "demo_sft_mix"
    exported = pq.read_table(folder / "train.parquet")
    assert exported.num_rows == manifest["delivered"]["rows"]
    assert exported.schema.equals(SFT_SCHEMA.remove_metadata())  # the gold SFT export's TRL layout
    assert json.loads((folder / "mixture_manifest.json").read_text()) == manifest

    # Deterministic: a second run gives the same selection and the same mixture.
    before = demo_graph.query("SELECT * FROM silver.diversity_selection ORDER BY ALL")
    mixture = demo_graph.query("SELECT * FROM gold.mixtures ORDER BY position")
    curate(demo_graph)
    assert demo_graph.query("SELECT * FROM silver.diversity_selection ORDER BY ALL") == before
    assert demo_graph.query("SELECT * FROM gold.mixtures ORDER BY position") == mixture


@pytest.mark.slow
def test_real_data_selection_at_half_budget_covers_more_than_random(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path
) -> None:
    workdir = tmp_path_factory.mktemp("real_curation")
    registry = workdir / "sources.yaml"
    registry.write_text(REAL_REGISTRY, encoding="utf-8")
    with deployed(registry, workdir, tokenizer_cache_dir) as graph:
        graph.run_all()
        result = curate(graph)
        selection = materialization(result, "silver/diversity_selection")
        semantic = materialization(result, "silver/semantic_duplicates")
        counts = dict(graph.query("SELECT regime, count(*) FROM silver.diversity_selection GROUP BY ALL"))
        gold = dict(
            graph.query("SELECT 'sft', count(*) FROM gold.sft UNION ALL SELECT 'rl', count(*) FROM gold.rl_prompts")
        )
    assert counts["sft"] == gold["sft"] // 2 and counts["rl"] == gold["rl"] // 2
    observed = {
        "sft": coverage_numbers(selection, "sft"),
        "preference": coverage_numbers(selection, "preference"),
        "rl": coverage_numbers(selection, "rl"),
        "pairs": {k: v for k, v in semantic.items() if k.startswith("pairs/")},
    }
    # Half the rows cover the pool more closely than a random half in every regime (docs/curation.md, README).
    assert observed == {
        "sft": (0.111, 0.182, 0.472, 0.754),
        "preference": (0.164, 0.198, 0.425, 0.725),
        "rl": (0.155, 0.195, 0.416, 0.722),
        # FastChat's dummy conversations are templated: 1,200 SFT pairs; RL pairs must share numbers and answer.
        "pairs": {"pairs/preference": 11, "pairs/rl": 0, "pairs/sft": 1200},
    }
