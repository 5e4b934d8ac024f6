"""Real tool-calling data through the whole graph: LLaMA-Factory's glaive_toolcall_en_demo (300 glaive function-calling
conversations, vendored unchanged in posttrain_assets_tests/data/glaive-toolcall) goes bronze -> silver -> gold ->
exports with a tokenizer whose chat template writes tool calls (Qwen/Hermes style, from test_agentic_masks). Every
row ends masked and proven in gold.sft, or in a quarantine with its reason; the gold rows keep their structured
calls and the tools; the asset metadata carries the agentic statistics; the export keeps the messages next to the
labels."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest

from posttrain_assets import pipeline
from posttrain_assets.publish.exports import CARD_FILE
from posttrain_assets.sft.masking import IGNORE_INDEX, MaskConfig, render_mask, verify_mask
from posttrain_assets_tests.graph import Graph, deployed
from posttrain_assets_tests.publish.test_trainer_handoff import offline  # noqa: F401 (the fixture)
from posttrain_assets_tests.real_data import REAL_DATA
from posttrain_assets_tests.sft.test_agentic_masks import BY_NAME

GLAIVE = REAL_DATA / "glaive-toolcall" / "glaive_toolcall_en_demo.json"

pytestmark = pytest.mark.slow  # the whole graph on 300 real rows


@pytest.fixture(scope="module")
def agentic_graph(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path, make_tokenizer: Callable[..., Any]
) -> Iterator[tuple[Graph, pipeline.RunReport, Any]]:
    workdir = tmp_path_factory.mktemp("agentic_graph")
    family = BY_NAME["qwen"]
    tok = make_tokenizer(family.template, family.special_tokens, family.tokens)
    tokenizer_dir = workdir / "qwen_style_tokenizer"
    tok.save_pretrained(str(tokenizer_dir))
    registry = workdir / "sources.yaml"
    registry.write_text(
        f"""
sources:
  - name: glaive_toolcall
    path: {GLAIVE}
    format: sharegpt
    license: Apache-2.0
    origin: "hiyouga/LLaMA-Factory@a0d44c65:data/glaive_toolcall_en_demo.json"
    kind: ai
""",
        encoding="utf-8",
    )
    with deployed(registry, workdir, tokenizer_cache_dir) as graph, pytest.MonkeyPatch.context() as env:
        env.setenv("POSTTRAIN_TOKENIZER", str(tokenizer_dir))
        report = pipeline.run_all(graph.instance, graph.definitions)
        yield graph, report, graph.tokenizer_resource().model_copy(update={"spec": str(tokenizer_dir)})


def test_every_row_is_masked_and_proven_or_quarantined_with_a_reason(agentic_graph: Any) -> None:
    graph, report, _ = agentic_graph
    assert report.failed_checks == [] and report.not_materialized == []
    assert any(c.check.endswith("loss_mask_check") and c.passed for c in report.checks)
    assert graph.query("SELECT count(*) FROM bronze.records") == [(300,)]
    # 300 = 221 in silver + 12 quarantined + 67 duplicates (the demo file repeats conversations)
    assert graph.query(
        "SELECT (SELECT count(*) FROM silver.records), (SELECT count(*) FROM silver.quarantine), "
        "(SELECT count(*) FROM silver.dedup_clusters)"
    ) == [(221, 12, 67)]
    assert graph.query("SELECT stage, reason, count(*) FROM silver.quarantine GROUP BY ALL ORDER BY ALL") == [
        ("quality", "refusal_boilerplate", 11),
        ("quality", "tool_arguments_invalid", 1),
    ]
    # A real schema violation in the data: track_calories declares calories_per_item a number, the call passes a list.
    assert graph.query("SELECT row_number, message FROM silver.quarantine WHERE reason = 'tool_arguments_invalid'") == [
        (
            259,
            f"{GLAIVE}, row 259: messages[3].tool_calls[0] (track_calories): calories_per_item: [150, 350, 800] is "
            "not of type 'number'",
        )
    ]
    # SFT: every silver row is tokenised and proven (gold.sft), or in silver.sft_quarantine with its reason.
    assert graph.query(
        "SELECT r.origin.row, q.reason, q.message FROM silver.sft_quarantine q JOIN silver.records r USING (id)"
    ) == [(243, "too_long", "11611 tokens > max_seq_len 4096")]
    assert graph.query("SELECT count(*) FROM gold.sft") == [(220,)]
    assert graph.query(
        "SELECT count(*) FROM silver.records r WHERE r.id NOT IN (SELECT id FROM gold.sft) "
        "AND r.id NOT IN (SELECT id FROM silver.sft_quarantine)"
    ) == [(0,)]


def test_gold_rows_keep_their_calls_and_their_masks_train_the_calls_only(agentic_graph: Any) -> None:
    graph, _, tokenizer = agentic_graph
    tok = tokenizer.get()
    (row,) = graph.dicts(
        "SELECT messages, tools, input_ids, labels, num_messages FROM gold.sft WHERE origin.row = 3"
    )  # the calculate_area conversation: three calls and their results
    calls = [m for m in row["messages"] if m["tool_calls"]]
    assert [json.loads(m["tool_calls"][0]["function"]["arguments"]) for m in calls] == [
        {"shape": "rectangle", "dimensions": [5, 3]},
        {"shape": "circle", "dimensions": [4]},
        {"shape": "square", "dimensions": [7]},
    ]
    assert [t["function"]["name"] for t in json.loads(row["tools"])] == ["calculate_area", "calculate_discount"]
    assert verify_mask(tok, row["messages"], row["input_ids"], row["labels"], MaskConfig(), tools=row["tools"]) is None
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    trained_text = tok.decode(trained)
    assert (
        '<tool_call>\n{"name": "calculate_area", "arguments": {"shape": "circle", "dimensions": [4]}}' in trained_text
    )
    for untrained in ('{"area": 15}', '{"area": 50.24}', "Calculate the discounted price", "the area of a rectangle"):
        assert untrained not in trained_text
    view = render_mask(tok, row["input_ids"], row["labels"], messages=row["messages"])
    assert view.count("⟨call⟩calculate_area⟨/call⟩") == 3 and '⟨result⟩{"area": 49}⟨/result⟩' in view


def test_agentic_statistics_are_asset_metadata(agentic_graph: Any) -> None:
    graph, _, _ = agentic_graph
    event = graph.instance.get_latest_materialization_event(dg.AssetKey(["gold", "sft"]))
    metadata = event.asset_materialization.metadata
    assert metadata["tool_calls_per_turn_histogram"].value == {
        "glaive_toolcall": {"0": 569, "1": 151},
        "all": {"0": 569, "1": 151},
    }
    assert metadata["agentic/glaive_toolcall/tools_share"].value == pytest.approx(0.4909)
    assert metadata["agentic/all/tool_calls"].value == 151
    assert metadata["reasoning_vs_answer_tokens"].value["all"] == {"reasoning": 0, "answer": 0}  # no reasoning here
    assert "| glaive_toolcall | 220 | 108 (49.1%) | 151 | 0: 569, 1: 151 | 0 |  |" in metadata["agentic"].value


def test_the_sft_export_keeps_structured_messages_next_to_the_labels(agentic_graph: Any) -> None:
    graph, _, _ = agentic_graph
    table = pq.read_table(graph.database.parent / "exports" / "sft" / "train.parquet")
    assert table.num_rows == 220
    rows = {r["id"]: r for r in table.to_pylist()}
    (gold,) = graph.dicts("SELECT id, labels, tools FROM gold.sft WHERE origin.row = 3")
    exported = rows[gold["id"]]
    assert exported["labels"] == list(gold["labels"]) and exported["tools"] == gold["tools"]
    assert exported["messages"][1]["tool_calls"][0]["function"] == {
        "name": "calculate_area",
        "arguments": '{"shape": "rectangle", "dimensions": [5, 3]}',
    }
    assert exported["messages"][2]["role"] == "tool" and exported["messages"][2]["tool_call_id"] == "call_1_0"


@pytest.mark.usefixtures("offline")
def test_trl_takes_the_tool_calling_export_with_our_labels(agentic_graph: Any, tmp_path: Path) -> None:
    """TRL's SFTTrainer reads the export (structured messages with null fields included) and keeps our labels: it
    does not re-render the conversations, so the tool-call masks are the ones proven here."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from posttrain_assets_tests.publish.test_trainer_handoff import card_settings, tiny_llama, two_steps

    graph, _, tokenizer = agentic_graph
    folder = graph.database.parent / "exports" / "sft"
    settings = card_settings((folder / CARD_FILE).read_text(encoding="utf-8"), "SFTConfig")
    ours = datasets.load_dataset("parquet", data_files=str(folder / "train.parquet"), split="train")
    calling = next(r for r in ours if any(m["tool_calls"] for m in r["messages"]))
    assert isinstance(
        next(m for m in calling["messages"] if m["tool_calls"])["tool_calls"][0]["function"]["arguments"], str
    )
    tok = tokenizer.get()
    trainer = SFTTrainer(
        model=tiny_llama(tok),
        args=SFTConfig(**two_steps(tmp_path / "sft"), **settings),
        train_dataset=ours,
        processing_class=tok,
    )
    assert trainer.train_dataset.num_rows == 220
    assert trainer.train_dataset["labels"] == ours["labels"]
