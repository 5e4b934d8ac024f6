"""The whole graph on the five vendored real files (posttrain_assets_tests/data): row counts, accounting, checks,
gold tables."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from posttrain_assets.defs.checks.accounting import bronze_accounting_check
from posttrain_assets.defs.checks.loss_mask import loss_mask_check
from posttrain_assets.defs.checks.schema import silver_records_schema_check
from posttrain_assets_tests.graph import REAL_DATA, REAL_REGISTRY, Graph, deployed

# The whole graph on 12,604 real rows (and the real policy model in the last test); `make test-fast` skips it.
pytestmark = pytest.mark.slow

# Row counts from posttrain_assets_tests/data/README.md.
README_ROWS = {
    "fastchat_dummy": 500,
    "alpaca_cleaned": 1000,
    "hh_rlhf_harmless": 2312,
    "gsm8k_train": 7473,
    "gsm8k_test": 1319,
}


@pytest.fixture(scope="module")
def real_graph(tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path) -> Iterator[Graph]:
    workdir = tmp_path_factory.mktemp("real_graph")
    registry = workdir / "sources.yaml"
    registry.write_text(REAL_REGISTRY, encoding="utf-8")
    with deployed(registry, workdir, tokenizer_cache_dir) as graph:
        graph.run_all()
        yield graph


def test_bronze_holds_every_row_of_every_file(real_graph: Graph) -> None:
    counts = dict(real_graph.query("SELECT source, count(*) FROM bronze.records GROUP BY source"))
    assert counts == README_ROWS
    # Provenance of one known row: GSM8K train line 0, hashed as it was on disk.
    (row,) = real_graph.query(
        "SELECT file_path, payload, length(file_sha256), length(record_sha256) FROM bronze.records "
        "WHERE source = 'gsm8k_train' AND row_number = 0"
    )
    assert row[0].endswith("gsm8k/train.jsonl")
    assert row[1].startswith('{"question": "Natalia sold clips to 48 of her friends in April')
    assert row[2:] == (64, 64)


def test_every_bronze_row_lands_in_silver_eval_quarantine_or_a_dedup_cluster(real_graph: Graph) -> None:
    silver = dict(real_graph.query("SELECT source, count(*) FROM silver.records GROUP BY source"))
    assert silver == {"fastchat_dummy": 263, "alpaca_cleaned": 994, "hh_rlhf_harmless": 2298, "gsm8k_train": 7468}
    assert real_graph.query("SELECT source, count(*) FROM silver.eval_records GROUP BY source") == [
        ("gsm8k_test", 1319)
    ]
    quarantine = real_graph.query(
        "SELECT source, stage, reason, field, count(*) FROM silver.quarantine GROUP BY ALL ORDER BY ALL"
    )
    assert quarantine == [
        ("alpaca_cleaned", "quality", "language_not_allowed", None, 3),
        ("alpaca_cleaned", "quality", "refusal_boilerplate", None, 1),
        ("gsm8k_train", "decontamination", "contaminated", None, 4),
        ("hh_rlhf_harmless", "canonical", "empty_content", "chosen", 4),
        ("hh_rlhf_harmless", "canonical", "pair_not_single_response", "chosen", 4),
        ("hh_rlhf_harmless", "canonical", "pair_not_single_response", "rejected", 1),
        ("hh_rlhf_harmless", "quality", "roles_not_alternating", None, 4),
    ]
    # FastChat's dummy conversations repeat themselves heavily: 237 of 500 are near duplicates of a kept twin.
    dedup = real_graph.query("SELECT source, method, count(*) FROM silver.dedup_clusters GROUP BY ALL ORDER BY ALL")
    assert dedup == [
        ("alpaca_cleaned", "near", 2),
        ("fastchat_dummy", "near", 237),
        ("gsm8k_train", "near", 1),
        ("hh_rlhf_harmless", "near", 1),
    ]
    # Real GSM8K train vs test: 4 train questions share a 13-word n-gram with a test question.
    rows = real_graph.query(
        "SELECT row_number FROM silver.quarantine WHERE stage = 'decontamination' ORDER BY row_number"
    )
    assert rows == [(20,), (406,), (1314,), (5162,)]
    assert real_graph.query("SELECT count(*) FROM gold.rl_prompts WHERE origin.row IN (20, 406, 1314, 5162)") == [(0,)]
    assert real_graph.query("SELECT count(DISTINCT benchmark), count(DISTINCT id) FROM silver.contamination") == [
        (1, 4)
    ]
    (message,) = real_graph.query("SELECT message FROM silver.quarantine WHERE row_number = 86")[0]
    assert message.startswith(f"{REAL_DATA}/hh-rlhf/harmless-base-test.jsonl.gz, row 86, field chosen: ")


def test_accounting_and_schema_checks_pass_when_called_directly(real_graph: Graph) -> None:
    accounting = bronze_accounting_check(duckdb=real_graph.duckdb_resource(), registry=real_graph.registry_resource())
    assert accounting.passed, accounting.description
    assert accounting.metadata["bronze_rows"].value == sum(README_ROWS.values())
    assert accounting.metadata["missing_rows"].value == 0
    schema = silver_records_schema_check(duckdb=real_graph.duckdb_resource())
    assert schema.passed, schema.description


def test_gold_tables_are_the_regime_projections(real_graph: Graph) -> None:
    assert dict(real_graph.query("SELECT source, count(*) FROM gold.sft GROUP BY source")) == {
        "fastchat_dummy": 263,
        "alpaca_cleaned": 994,
    }
    # HH-RLHF passes the length gate (chosen is the longer one in 44.8% of pairs), so gold.preference is written.
    assert real_graph.query("SELECT count(*) FROM gold.preference") == [(2298,)]
    assert real_graph.query("SELECT count(*), count(DISTINCT verifier) FROM gold.rl_prompts") == [(7468, 1)]
    (first,) = real_graph.dicts(
        "SELECT prompt, answer, verifier, license, origin FROM gold.rl_prompts WHERE origin.row = 0"
    )
    assert first["answer"] == "72" and first["verifier"] == "numeric" and first["license"] == "MIT"
    assert first["origin"]["source"] == "gsm8k_train"
    assert first["origin"]["uri"] == "openai/grade-school-math@3101c7d5:grade_school_math/data/train.jsonl"
    # The eval set never reaches gold.
    assert real_graph.query("SELECT count(*) FROM gold.rl_prompts WHERE source = 'gsm8k_test'") == [(0,)]
    # Every preference and RL row has a token count from the project tokenizer; SFT rows are counted once, by the
    # encode that builds their tokens (silver.sft_tokenized), not in silver.records.
    counts = real_graph.query(
        "SELECT regime, count(*) FILTER (WHERE token_count IS NULL OR token_count < 5), count(*) FILTER "
        "(WHERE token_count IS NULL), count(*) FROM silver.records GROUP BY ALL ORDER BY ALL"
    )
    assert [(regime, bad, rows > 0) for regime, bad, _, rows in counts if regime != "sft"] == [
        ("preference", 0, True),
        ("rl", 0, True),
    ]
    assert [(nulls, rows) for regime, _, nulls, rows in counts if regime == "sft"] == [(counts[-1][3], counts[-1][3])]
    assert real_graph.query(
        "SELECT count(*) FROM silver.sft_tokenized t JOIN silver.records r USING (id) "
        "WHERE t.num_tokens <> len(t.input_ids) OR t.num_tokens < 5"
    ) == [(0,)]


def test_sft_masks_of_real_data_pass_the_loss_mask_check(real_graph: Graph) -> None:
    result = loss_mask_check(duckdb=real_graph.duckdb_resource(), tokenizer=real_graph.tokenizer_resource())
    assert result.passed, result.description
    assert result.metadata["rows_checked"].value == 1257
    assert 0.5 < result.metadata["trainable_share"].value < 0.8
    # No gold row without a trained token; labels are -100 or the input id, position by position.
    assert real_graph.query(
        "SELECT count(*) FROM gold.sft WHERE num_trainable_tokens = 0 "
        "OR len(input_ids) != len(labels) OR num_tokens != len(input_ids)"
    ) == [(0,)]
    bad = real_graph.query(
        "SELECT count(*) FROM (SELECT unnest(input_ids) AS i, unnest(labels) AS l FROM gold.sft) "
        "WHERE l != -100 AND l != i"
    )
    assert bad == [(0,)]


def test_real_gsm8k_seeds_are_all_certified(real_graph: Graph) -> None:
    assert real_graph.query(
        "SELECT verifier, count(*), count(*) FILTER (WHERE certified) FROM silver.rl_certification GROUP BY ALL"
    ) == [("numeric", 7468, 7468)]


# Five seeds, the first in id order: the policy solves the fifth once in two samples (at 24 new tokens as at 32) and
# the other four never, so the bank both loses seeds and keeps one with its estimate. About a sixth of the sampling
# of the 24 seeds at 32 tokens this test used to draw (30 s idle, minutes under load).
ROLLOUT_PROMPTS = 5


def test_rollout_difficulty_on_five_gsm8k_prompts_curates_the_bank(real_graph: Graph) -> None:
    """Runs last in this module: it changes gold.rl_prompts."""
    job = real_graph.definitions.resolve_job_def("estimate_rl_difficulty")
    n = ROLLOUT_PROMPTS
    config = {"max_prompts": n, "k": 2, "max_new_tokens": 24, "batch_size": 8, "seed": 0}
    result = job.execute_in_process(
        instance=real_graph.instance, run_config={"ops": {"silver__rl_difficulty": {"config": config}}}
    )
    assert result.success
    estimates = real_graph.dicts("SELECT * FROM silver.rl_difficulty ORDER BY id")
    assert len(estimates) == n
    assert {e["model"] for e in estimates} == {"HuggingFaceTB/SmolLM2-135M-Instruct@SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert all(len(e["model_sha256"]) == 64 and len(e["lineage"]) == 32 for e in estimates)
    assert {e["verifier"] for e in estimates} == {"numeric"} and all(e["k"] == 2 for e in estimates)
    assert all(e["difficulty"] == 1 - e["passes"] / 2 for e in estimates)
    assert json.loads(estimates[0]["sampling"])["max_new_tokens"] == 24
    # Seeds the policy always or never solves leave the bank; the rest carry their estimate.
    outside = sum(e["passes"] in (0, 2) for e in estimates)
    assert real_graph.query("SELECT count(*) FROM gold.rl_prompts") == [(7468 - outside,)]
    assert real_graph.query("SELECT count(*) FROM gold.rl_prompts WHERE difficulty_estimated") == [(n - outside,)]
    # Incremental: the same lineage is not sampled again; the next pending seeds are.
    again = job.execute_in_process(
        instance=real_graph.instance,
        run_config={"ops": {"silver__rl_difficulty": {"config": {**config, "max_prompts": 0}}}},
    )
    (materialization,) = again.asset_materializations_for_node("silver__rl_difficulty")
    # n seeds already have an estimate for this lineage, so only the others are pending.
    assert materialization.metadata["pending_after"].value == 7468 - n
    assert real_graph.query("SELECT count(*) FROM silver.rl_difficulty") == [(n,)]
