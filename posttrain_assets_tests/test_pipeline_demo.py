"""The whole graph on the generated demo data: planted faults land where they should, reruns are identical,
and failing blocking checks keep gold tables as they were."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from posttrain_assets.cleaning import silver_pass as cleaning
from posttrain_assets.cleaning.silver_pass import STAGE_NAMES, SUBSTAGE_NAMES
from posttrain_assets.defs.checks.loss_mask import loss_mask_check
from posttrain_assets.defs.silver import sft_tokenized
from posttrain_assets.demo.generator import generate_demo_data
from posttrain_assets.publish.trace import TRACE_VIEW
from posttrain_assets.sft import batches as sft
from posttrain_assets.sft.masking import IGNORE_INDEX, TokenizedConversation
from posttrain_assets.warehouse.bronze import bronze_source_table
from posttrain_assets.warehouse.catalogue import ALL_TABLES
from posttrain_assets_tests.graph import Graph, deployed

# The whole graph on the demo data, run and rerun; `make test-fast` skips it.
pytestmark = pytest.mark.slow

GOLD_KEYS = {dg.AssetKey(["gold", name]) for name in ("sft", "preference", "preference_length_balanced", "rl_prompts")}
GOLD_TABLES = ("gold.sft", "gold.preference_length_balanced", "gold.rl_prompts")
# The silver_sft_tokenized multi-asset, which runs as a whole.
SFT_STAGE = {dg.AssetKey(["silver", "sft_tokenized"]), dg.AssetKey(["silver", "sft_quarantine"])}
# Every table a run writes, but bronze (compared without its run columns below) and the held-back gold.preference.
STORED_TABLES = (
    "SELECT table_schema, table_name FROM information_schema.tables WHERE table_catalog = current_database()"
)
SNAPSHOT_TABLES = tuple(t.qualified for t in ALL_TABLES if t.qualified not in ("bronze.records", "gold.preference"))


def snapshot(graph: Graph) -> dict[str, list[tuple]]:
    tables = {name: graph.query(f"SELECT * FROM {name} ORDER BY ALL") for name in SNAPSHOT_TABLES}
    tables["bronze.records"] = graph.query(
        "SELECT * EXCLUDE (ingested_at, run_id) FROM bronze.records ORDER BY source, file_path, row_number"
    )
    return tables


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_landing")
    generate_demo_data(out, seed=7)
    return out


@pytest.fixture(scope="module")
def manifest(demo_dir: Path) -> dict:
    return json.loads((demo_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def demo_graph(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path) -> Iterator[Graph]:
    with deployed(demo_dir / "sources.yaml", tmp_path_factory.mktemp("demo_graph"), tokenizer_cache_dir) as graph:
        graph.run_all()
        yield graph


def test_bronze_rows_match_the_files(demo_graph: Graph, manifest: dict) -> None:
    counts = dict(demo_graph.query("SELECT source, count(*) FROM bronze.records GROUP BY source"))
    assert counts == {name: spec["rows"] for name, spec in manifest["sources"].items()}
    assert sum(counts.values()) == manifest["total_rows"] == 2926


def test_every_planted_malformed_row_is_quarantined_with_its_reason(demo_graph: Graph, manifest: dict) -> None:
    planted = {
        (name, bad["row"], bad["reason"]) for name, spec in manifest["sources"].items() for bad in spec["malformed"]
    }
    quarantined = set(
        demo_graph.query("SELECT source, row_number, reason FROM silver.quarantine WHERE stage = 'canonical'")
    )
    assert quarantined == planted
    assert len(quarantined) == manifest["total_malformed"] == 33
    # The cleaning pass quarantines exactly the five GSM8K rows copied from the eval set, and nothing else.
    cleaned = set(
        demo_graph.query("SELECT source, row_number, stage, reason FROM silver.quarantine WHERE stage != 'canonical'")
    )
    assert cleaned == {(c["source"], c["row"], "decontamination", "contaminated") for c in manifest["contaminated"]}
    assert len(cleaned) == 5
    # Every message names the file, the row and (where one is to blame) the field.
    for file_path, row, field, message in demo_graph.query(
        "SELECT file_path, row_number, field, message FROM silver.quarantine"
    ):
        assert message.startswith(f"{file_path}, row {row}")
        if field:
            assert f"field {field}:" in message


def test_exact_duplicates_collapse_onto_the_kept_twin(demo_graph: Graph, manifest: dict) -> None:
    dropped = {
        (source, row): (kept_source, kept_row)
        for source, row, kept_source, kept_row in demo_graph.query(
            "SELECT d.source, d.row_number, r.source, r.origin.row FROM silver.dedup_clusters d "
            "JOIN silver.records r ON r.id = d.kept_id WHERE d.method = 'exact'"
        )
    }
    for group in manifest["exact_duplicates"]:
        first, *copies = [(r["source"], r["row"]) for r in group["rows"]]
        kept = {dropped.get(c) for c in copies}
        # All copies point at one kept twin, which is itself not dropped.
        assert len(kept) == 1 and None not in kept, group
        assert kept.pop() not in dropped
    assert len(dropped) == manifest["exact_duplicate_surplus_rows"] + 3 == 14
    # The three extra ones are templated GSM8K questions generated twice by chance: same prompt and answer
    # (silver keeps no worked solution), so the same content id.
    extra = set(dropped) - {(r["source"], r["row"]) for g in manifest["exact_duplicates"] for r in g["rows"]}
    assert sorted(extra) == [("demo_rl_gsm8k", 48), ("demo_rl_gsm8k", 302), ("demo_rl_gsm8k", 370)]


def test_planted_near_duplicates_are_clustered_with_their_originals(demo_graph: Graph, manifest: dict) -> None:
    kept_of = dict(demo_graph.query("SELECT d.source || ':' || d.row_number, d.kept_id FROM silver.dedup_clusters d"))
    id_of = {
        f"{source}:{row}": record_id
        for source, row, record_id in demo_graph.query("SELECT source, origin.row, id FROM silver.records")
    }

    def final(row: str) -> str:
        return id_of.get(row) or kept_of[row]

    for near in manifest["near_duplicates"]:
        copy, original = f"{near['source']}:{near['row']}", f"{near['source']}:{near['of_row']}"
        # Copy and original end in one cluster: one of them kept, the other dropped onto it (recall 1.0).
        assert final(copy) == final(original), near
    assert len(manifest["near_duplicates"]) == 17
    methods = dict(demo_graph.query("SELECT method, count(*) FROM silver.dedup_clusters GROUP BY method"))
    assert methods == {"exact": 14, "near": 19}


def test_nothing_is_lost_per_source(demo_graph: Graph) -> None:
    rows = demo_graph.query(
        """
        SELECT b.source, count(*) AS bronze,
          (SELECT count(*) FROM silver.records s WHERE s.source = b.source)
          + (SELECT count(*) FROM silver.eval_records e WHERE e.source = b.source)
          + (SELECT count(*) FROM silver.quarantine q WHERE q.source = b.source)
          + (SELECT count(*) FROM silver.dedup_clusters d WHERE d.source = b.source) AS placed
        FROM bronze.records b GROUP BY b.source
        """
    )
    assert len(rows) == 11
    assert all(bronze == placed for _, bronze, placed in rows), rows


def test_gold_counts_and_the_eval_set_stays_out(demo_graph: Graph) -> None:
    assert demo_graph.query("SELECT count(*) FROM gold.sft") == [(950,)]
    assert demo_graph.query("SELECT count(*) FROM gold.rl_prompts") == [(845,)]
    assert demo_graph.query("SELECT count(*) FROM silver.eval_records") == [(60,)]
    for table in GOLD_TABLES:
        assert demo_graph.query(f"SELECT count(*) FROM {table} WHERE source = 'demo_eval_gsm8k'") == [(0,)]


# Tables the next stage reads in id ranges: stored in id order, so DuckDB's zone maps prune those reads. (A gold table
# is filled in id order when it is built anew; a later refresh keeps its unchanged rows where they are and appends
# the changed ones, in id order among themselves: io.sync_table.)
ID_ORDERED_TABLES = (
    "silver.records",
    "silver.sft_tokenized",
    "silver.preference_pairs",
    "silver.preference_pairs_balanced",
    *GOLD_TABLES,
)


@pytest.mark.parametrize("table", ID_ORDERED_TABLES)
def test_tables_read_in_id_ranges_are_stored_in_id_order(demo_graph: Graph, table: str) -> None:
    ((rows, out_of_order),) = demo_graph.query(
        f"SELECT count(*), count(*) FILTER (WHERE id <= previous) "
        f"FROM (SELECT id, lag(id) OVER (ORDER BY rowid) AS previous FROM {table})"
    )
    assert rows > 0 and out_of_order == 0


def test_rerunning_the_whole_graph_gives_identical_tables(demo_graph: Graph) -> None:
    before = snapshot(demo_graph)
    demo_graph.run_all()
    after = snapshot(demo_graph)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name] == before[name], name
    # Re-ingesting replaced each bronze partition instead of appending to it.
    assert demo_graph.query("SELECT count(*) FROM bronze.records") == [(2926,)]
    # No twin under construction (io.building) or work table of the silver pass is left behind.
    # bronze.records is a view over exactly one table per source.
    stored = {f"{schema}.{name}" for schema, name in demo_graph.query(STORED_TABLES)}
    per_source = {
        bronze_source_table(s).qualified for (s,) in demo_graph.query("SELECT DISTINCT source FROM bronze.records")
    }
    assert len(per_source) == 11
    caches = {t for t in stored if t.startswith("cache.")}  # the per-row stage caches (warehouse.stage_cache)
    assert {"cache.gate_rows", "cache.sft_tokenized", "cache.near_signatures"} <= caches
    # the synced tables' stored row fingerprints (io.sync_table) and gold.sft's per-row statistics, beside them
    syncs = {t for t in stored if t.startswith("sync.")}
    assert {"sync.silver__records", "sync.gold__sft", "sync.gold__sft__row_stats"} <= syncs
    assert all(".".join(t.removeprefix("sync.").split("__")[:2]) in stored for t in syncs)
    assert (
        stored
        == {t.qualified for t in ALL_TABLES} - {"gold.preference"}
        | {TRACE_VIEW, "checks.verdicts"}
        | per_source
        | caches
        | syncs
    )
    # silver.records says where its pass spent its time, as numbers the UI plots per run
    event = demo_graph.instance.get_latest_materialization_event(dg.AssetKey(["silver", "records"]))
    seconds = {k: v.value for k, v in event.asset_materialization.metadata.items() if k.startswith("seconds/")}
    assert set(seconds) == {f"seconds/{name}" for name in (*STAGE_NAMES, *SUBSTAGE_NAMES)}
    assert all(isinstance(v, float) and v >= 0 for v in seconds.values())
    # the rerun computed no row of the cached per-row stages again: every bronze row's gate result was reused
    reused = {k: v.value for k, v in event.asset_materialization.metadata.items() if k.startswith("rows_")}
    assert reused["rows_computed/normalise_and_gate"] == 0
    assert reused["rows_reused/normalise_and_gate"] == 2926
    assert reused["rows_computed/near_dedup_signatures"] == 0
    tokenized = demo_graph.instance.get_latest_materialization_event(dg.AssetKey(["silver", "sft_tokenized"]))
    metadata = tokenized.asset_materialization.metadata
    assert metadata["rows_computed/sft_tokenize"].value == 0
    assert metadata["rows_reused/sft_tokenize"].value == 950
    # each gold table kept every row (io.sync_table): none inserted, none deleted
    for name in ("sft", "preference_length_balanced", "rl_prompts"):
        event = demo_graph.instance.get_latest_materialization_event(dg.AssetKey(["gold", name]))
        gold = {k: v.value for k, v in event.asset_materialization.metadata.items()}
        assert gold[f"rows_computed/gold_{name}"] == gold[f"rows_deleted/gold_{name}"] == 0
        assert gold[f"rows_reused/gold_{name}"] == gold["dagster/row_count"] == len(before[f"gold.{name}"]) > 0


@pytest.fixture
def broken_graph(
    demo_graph: Graph, demo_dir: Path, tmp_path: Path, tokenizer_cache_dir: Path
) -> Iterator[tuple[Graph, dict[str, list[tuple]]]]:
    """A private deployment on a copy of the demo warehouse (a good run behind it), and its snapshot."""
    shutil.copy(demo_graph.database, tmp_path / "warehouse.duckdb")
    with deployed(demo_dir / "sources.yaml", tmp_path, tokenizer_cache_dir) as graph:
        yield graph, snapshot(graph)


def _materialized(result: dg.ExecuteInProcessResult) -> set[dg.AssetKey]:
    return {e.asset_key for e in result.get_asset_materialization_events()}


def _evaluation(result: dg.ExecuteInProcessResult, check_name: str):
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == check_name]
    return evaluation


def test_failing_silver_schema_check_leaves_gold_untouched(
    broken_graph: tuple[Graph, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    graph, good = broken_graph
    real_batch = cleaning.normalise_and_gate_batch  # 2,926 bronze rows: gated in this process (processes_for)
    lost: list[str] = []

    def gate_then_lose_an_answer(context, bronze):
        gated = real_batch(context, bronze)
        victim = next((g.row for g in gated if g.table == "staged" and g.row["regime"] == "rl"), None)
        if victim is not None and not lost:
            victim["answer"] = None
            lost.append(victim["id"])
        return gated

    monkeypatch.setattr(cleaning, "normalise_and_gate_batch", gate_then_lose_an_answer)
    monkeypatch.setenv("POSTTRAIN_FULL_REBUILD", "1")  # the gate cache holds every row: gate them again
    result = graph.refresh()

    assert not result.success
    evaluation = _evaluation(result, "silver_records_schema_check")
    assert not evaluation.passed
    assert "rl rows: required field answer is null or empty: 1 row(s)" in evaluation.description
    assert dg.AssetKey(["silver", "records"]) in _materialized(result)
    assert not _materialized(result) & GOLD_KEYS
    for table in GOLD_TABLES:
        assert graph.query(f"SELECT * FROM {table} ORDER BY ALL") == good[table], table


def test_corrupted_mask_fails_loss_mask_check_and_blocks_gold_sft(
    broken_graph: tuple[Graph, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    graph, good = broken_graph
    real_chunks = sft.tokenized_chunks  # one batch of 950 rows: tokenised in this process
    corrupted: dict[str, int] = {}

    def chunks_with_a_trained_header(tok, conversations, cfg, tools=None):
        for number, results in enumerate(real_chunks(tok, conversations, cfg, tools)):
            if number == 0:
                first: TokenizedConversation = results[0]
                position = first.labels.index(IGNORE_INDEX)  # position 0: `<|im_start|>` of the system header
                first.labels[position] = first.input_ids[position]
                corrupted["position"] = position
            yield results

    monkeypatch.setattr(sft, "tokenized_chunks", chunks_with_a_trained_header)
    monkeypatch.setenv("POSTTRAIN_FULL_REBUILD", "1")  # the caches hold every row: tokenise them again
    result = graph.refresh()

    assert not result.success
    evaluation = _evaluation(result, "loss_mask_check")
    assert not evaluation.passed
    (first_id,) = graph.query("SELECT min(id) FROM silver.sft_tokenized")[0]
    assert evaluation.description.startswith(f"1 row(s) fail: {first_id}: ")
    assert f"position {corrupted['position']}" in evaluation.description
    assert evaluation.metadata["rows_failed"].value == 1
    assert dg.AssetKey(["gold", "sft"]) not in _materialized(result)
    # gold.sft is exactly what the last good run wrote; the other regimes were not blocked by an SFT mask.
    assert graph.query("SELECT * FROM gold.sft ORDER BY ALL") == good["gold.sft"]
    assert {dg.AssetKey(["gold", "preference_length_balanced"]), dg.AssetKey(["gold", "rl_prompts"])} <= _materialized(
        result
    )


def test_rows_tokenised_with_another_tokenizer_fail_loss_mask_check(broken_graph: tuple[Graph, dict]) -> None:
    graph, _good = broken_graph
    (stale_id,) = graph.query("SELECT max(id) FROM silver.sft_tokenized")[0]
    with duckdb.connect(str(graph.database)) as conn:
        conn.execute("UPDATE silver.sft_tokenized SET tokenizer_sha256 = 'an older tokenizer' WHERE id = ?", [stale_id])
    result = loss_mask_check(duckdb=graph.duckdb_resource(), tokenizer=graph.tokenizer_resource())
    assert not result.passed
    assert result.description == (
        f"1 row(s) fail: {stale_id}: tokenised with another tokenizer or template: rematerialise"
    )
    (rows,) = graph.query("SELECT count(*) FROM silver.sft_tokenized")[0]
    assert result.metadata["rows_checked"].value == rows
    assert result.metadata["rows_failed"].value == 1


def test_planted_length_bias_fails_the_gate_and_the_balanced_remedy_passes(demo_graph: Graph) -> None:
    # The demo's ultrafeedback source has chosen longer in 90% of its pairs: the gate holds gold.preference back.
    tables = {
        t for (t,) in demo_graph.query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'gold'")
    }
    assert "preference" not in tables and "preference_length_balanced" in tables
    audit = dict(
        demo_graph.query(
            "SELECT group_name, round(chosen_longer_share, 3) FROM silver.preference_audit WHERE group_kind = 'source'"
        )
    )
    assert audit["demo_pref_ultrafeedback"] == 0.9
    assert all(0.35 <= share <= 0.65 for name, share in audit.items() if name != "demo_pref_ultrafeedback")
    # The balanced remedy drops only from the offending source, and exactly the pairs it reports; the 20 planted
    # pairs whose annotators disagree are dropped too (test_who_labelled_the_preferences_is_audited).
    drops = demo_graph.query(
        "SELECT source, reason, count(*) FROM silver.preference_balance_drops GROUP BY ALL ORDER BY ALL"
    )
    assert drops == [
        ("demo_pref_trl_explicit", "annotator_disagreement", 20),
        ("demo_pref_ultrafeedback", "length_balance", 240),
    ]
    assert demo_graph.query("SELECT count(*) FROM gold.preference_length_balanced") == [(1000 - 240 - 20,)]
    balanced = demo_graph.query(
        "SELECT avg(CASE WHEN length_diff > 0 THEN 1.0 WHEN length_diff = 0 THEN 0.5 ELSE 0 END) "
        "FROM gold.preference_length_balanced WHERE source = 'demo_pref_ultrafeedback'"
    )
    assert balanced == [(0.5,)]


def test_who_labelled_the_preferences_is_audited(demo_graph: Graph, manifest: dict) -> None:
    """The UltraFeedback-format source gets a judge-stratified audit; the multi-rater source an agreement figure,
    and its planted low-agreement pairs are caught (dropped from the balanced set with their reason)."""
    labels = manifest["preference_labels"]
    by_judge = dict(
        demo_graph.query(
            "SELECT stratum, [pairs, chosen_higher_share] FROM silver.preference_judge_audit "
            "WHERE source = 'demo_pref_ultrafeedback' AND stratum_kind = 'judge' AND feature = 'tokens'"
        )
    )
    assert (
        by_judge
        == {
            judge: [stats["pairs"], stats["chosen_longer"] / stats["pairs"]]
            for judge, stats in labels["demo_pref_ultrafeedback"]["judges"].items()
        }
        == {"gpt-4-0613": [200, 1.0], "llama-3-70b-instruct": [100, 0.7]}
    )
    # chosen replies use lists (bullets, steps) and the dispreferred ones never do: the style marker shows it
    (lists,) = demo_graph.query(
        "SELECT chosen_higher_share FROM silver.preference_judge_audit "
        "WHERE source = 'demo_pref_ultrafeedback' AND stratum_kind = 'source' AND feature = 'list'"
    )
    assert lists[0] > 0.6
    # only AI-labelled sources are audited
    assert demo_graph.query("SELECT DISTINCT source FROM silver.preference_judge_audit") == [
        ("demo_pref_ultrafeedback",)
    ]
    (agreement,) = demo_graph.dicts("SELECT * FROM silver.preference_agreement")
    assert agreement["source"] == "demo_pref_trl_explicit"
    assert (agreement["rated_pairs"], agreement["raters"], agreement["disagreeing_pairs"]) == (250, 5, 20)
    assert 0.667 <= agreement["order_alpha"] < 1
    caught = demo_graph.query(
        'SELECT p.origin."row" FROM silver.preference_balance_drops d JOIN silver.preference_pairs p USING (id) '
        "WHERE d.reason = 'annotator_disagreement' ORDER BY 1"
    )
    assert [row for (row,) in caught] == labels["demo_pref_trl_explicit"]["low_agreement_rows"]


def test_rl_bank_is_certified_and_traceable(demo_graph: Graph) -> None:
    certification = demo_graph.query(
        "SELECT verifier, count(*), count(*) FILTER (WHERE certified) FROM silver.rl_certification GROUP BY ALL "
        "ORDER BY ALL"
    )
    assert certification == [("exact_match", 12, 12), ("math", 200, 200), ("numeric", 633, 633)]
    assert demo_graph.query(
        "SELECT count(*), count(*) FILTER (WHERE NOT difficulty_estimated) FROM gold.rl_prompts"
    ) == [(845, 845)]
    versions = demo_graph.query("SELECT DISTINCT verifier, verifier_version FROM gold.rl_prompts ORDER BY ALL")
    assert versions == [("exact_match", "1"), ("math", "1+math-verify-0.9.0"), ("numeric", "1")]


def test_publish_traces_every_gold_row_and_exports_them(demo_graph: Graph) -> None:
    traced = dict(demo_graph.query("SELECT gold_table, count(*) FROM gold.trace GROUP BY ALL"))
    assert traced == {"gold.sft": 950, "gold.preference_length_balanced": 740, "gold.rl_prompts": 845}
    assert demo_graph.query("SELECT count(*) FROM gold.trace WHERE NOT in_bronze OR NOT in_silver") == [(0,)]
    exports = demo_graph.database.parent / "exports"
    manifest = json.loads((exports / "manifest.json").read_text())
    assert {e["name"]: e["rows"] for e in manifest["exports"]} == {
        "sft": 950,
        "preference_length_balanced": 740,
        "rl": 845,
    }
    assert manifest["skipped"] == ["gold.preference"]
    card = (exports / "sft" / "README.md").read_text()
    assert "loss_mask_check" in card and "CC-BY-NC-4.0" in card


def test_every_check_that_ran_left_its_verdict_in_the_warehouse(demo_graph: Graph) -> None:
    verdicts = {
        (asset, name): (passed, severity)
        for asset, name, passed, severity in demo_graph.query(
            "SELECT asset, check_name, passed, severity FROM checks.verdicts"
        )
    }
    # gold.preference is held back by the failed length gate, so its schema check never ran
    assert verdicts == {
        ("silver/records", "bronze_accounting_check"): (True, "ERROR"),
        ("silver/records", "silver_records_schema_check"): (True, "ERROR"),
        ("silver/sft_tokenized", "loss_mask_check"): (True, "ERROR"),
        ("silver/preference_pairs", "length_confound_check"): (False, "ERROR"),
        ("silver/preference_pairs", "annotator_agreement_check"): (True, "WARN"),
        ("silver/preference_pairs_balanced", "balanced_length_confound_check"): (True, "ERROR"),
        ("gold/sft", "gold_sft_schema_check"): (True, "ERROR"),
        ("gold/sft", "sft_turn_depth_check"): (True, "WARN"),  # about half the demo's conversations are multi-turn
        ("gold/preference_length_balanced", "gold_preference_length_balanced_schema_check"): (True, "ERROR"),
        ("gold/rl_prompts", "gold_rl_prompts_schema_check"): (True, "ERROR"),
        ("gold/rl_prompts", "rl_certification_check"): (True, "ERROR"),
        ("gold/rl_prompts", "rl_difficulty_band_check"): (True, "WARN"),
        ("gold/trace", "provenance_audit_check"): (True, "ERROR"),
    }
    # the dataset cards show them as recorded: the preference gate's failure is on the balanced table's card
    card = (demo_graph.database.parent / "exports" / "preference_length_balanced" / "README.md").read_text()
    assert "| `length_confound_check` | silver/preference_pairs | FAILED | source demo_pref_ultrafeedback: " in card


def test_commercial_license_policy_keeps_non_commercial_sources_out_of_gold(broken_graph: tuple[Graph, dict]) -> None:
    graph, good = broken_graph
    alpaca_before = graph.query("SELECT count(*) FROM gold.sft WHERE source = 'demo_sft_alpaca'")[0][0]
    assert alpaca_before == 250
    graph.refresh({"ops": {"silver_canonical": {"config": {"license_policy": "commercial"}}}})
    assert graph.query("SELECT count(*) FROM gold.sft WHERE source = 'demo_sft_alpaca'") == [(0,)]
    assert graph.query("SELECT count(*) FROM gold.sft") == [(len(good["gold.sft"]) - 250,)]
    assert graph.query(
        "SELECT source, stage, reason, count(*) FROM silver.quarantine WHERE stage = 'quality' GROUP BY ALL"
    ) == [("demo_sft_alpaca", "quality", "license_not_allowed", 250)]
    (message,) = graph.query("SELECT message FROM silver.quarantine WHERE reason = 'license_not_allowed' LIMIT 1")[0]
    assert "CC-BY-NC-4.0" in message


def test_tokenising_and_proving_in_small_batches_gives_the_same_rows(
    broken_graph: tuple[Graph, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    from posttrain_assets.defs.checks import loss_mask

    graph, good = broken_graph
    # 950 rows: 10 batches, the last one partial; that many batches go to worker processes
    monkeypatch.setattr(sft_tokenized, "BATCH_ROWS", 97)
    monkeypatch.setattr(loss_mask, "BATCH_ROWS", 50)
    monkeypatch.setenv("POSTTRAIN_FULL_REBUILD", "1")  # tokenise and prove every row again, in these batches
    # Only this stage and its checks, out of refresh_corpus: they read the good run's silver.records, and nothing
    # else is compared here.
    result = graph.definitions.resolve_job_def("refresh_corpus").execute_in_process(
        instance=graph.instance, asset_selection=list(SFT_STAGE), raise_on_error=False
    )
    assert _materialized(result) == SFT_STAGE
    assert graph.query("SELECT * FROM silver.sft_tokenized ORDER BY ALL") == good["silver.sft_tokenized"]
    evaluation = _evaluation(result, "loss_mask_check")
    assert evaluation.passed and evaluation.metadata["rows_checked"].value == 950
