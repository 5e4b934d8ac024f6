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
from posttrain_assets.publish.exports import CARD_FILE, shard_files
from posttrain_assets.sft.masking import IGNORE_INDEX, MaskConfig, render_mask, verify_mask
from posttrain_assets_tests.graph import Graph, deployed
from posttrain_assets_tests.publish.test_trainer_handoff import offline  # noqa: F401 (the fixture)
from posttrain_assets_tests.real_data import REAL_DATA
from posttrain_assets_tests.records.test_tools import HERMES_ROW
from posttrain_assets_tests.sft.test_agentic_masks import AGENT, BY_NAME, TOOLS

GLAIVE = REAL_DATA / "glaive-toolcall" / "glaive_toolcall_en_demo.json"

pytestmark = pytest.mark.slow  # the whole graph on 300 real rows

# Planted next to the real data: a reasoning agent trajectory that must reach gold, and three faults the quality
# gate must catch (arguments that are not JSON, a call to an undeclared tool, a call without its result).
_BAD_ARGUMENTS = [
    *AGENT[:2],
    {
        **AGENT[2],
        "tool_calls": [{**AGENT[2]["tool_calls"][0], "function": {"name": "get_weather", "arguments": "city=Oslo"}}],
    },
    *AGENT[3:5],
]
_UNDECLARED = [
    *AGENT[:2],
    {
        **AGENT[2],
        "tool_calls": [
            {**AGENT[2]["tool_calls"][0], "function": {"name": "get_forecast", "arguments": '{"city": "Oslo"}'}}
        ],
    },
    *AGENT[3:5],
]
_SECOND_CALL = {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
_UNANSWERED = [*AGENT[:2], {**AGENT[2], "tool_calls": [*AGENT[2]["tool_calls"], _SECOND_CALL]}, *AGENT[3:5]]
PLANTED = [{"messages": m, "tools": TOOLS} for m in (AGENT, _BAD_ARGUMENTS, _UNDECLARED, _UNANSWERED)]


@pytest.fixture(scope="module")
def agentic_graph(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path, make_tokenizer: Callable[..., Any]
) -> Iterator[tuple[Graph, pipeline.RunReport, Any]]:
    workdir = tmp_path_factory.mktemp("agentic_graph")
    family = BY_NAME["qwen"]
    tok = make_tokenizer(family.template, family.special_tokens, family.tokens)
    tokenizer_dir = workdir / "qwen_style_tokenizer"
    tok.save_pretrained(str(tokenizer_dir))
    planted = workdir / "planted.jsonl"
    planted.write_text("".join(json.dumps(row) + "\n" for row in PLANTED), encoding="utf-8")
    hermes = workdir / "hermes.jsonl"
    hermes.write_text(json.dumps(HERMES_ROW) + "\n", encoding="utf-8")
    registry = workdir / "sources.yaml"
    registry.write_text(
        f"""
sources:
  - name: planted_agents
    path: {planted}
    format: messages
    license: MIT
    origin: "written in test_agentic_pipeline.py"
    kind: synthetic
  - name: hermes_sample
    path: {hermes}
    format: hermes
    license: MIT
    origin: "written in test_agentic_pipeline.py, in the hermes-function-calling-v1 layout"
    kind: synthetic
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
    assert graph.query("SELECT source, count(*) FROM bronze.records GROUP BY ALL ORDER BY ALL") == [
        ("glaive_toolcall", 300),
        ("hermes_sample", 1),
        ("planted_agents", 4),
    ]
    # glaive: 300 = 216 in silver + 12 quarantined + 72 duplicates (the demo file repeats conversations)
    glaive = "WHERE source = 'glaive_toolcall'"
    assert graph.query(
        f"SELECT (SELECT count(*) FROM silver.records {glaive}), (SELECT count(*) FROM silver.quarantine {glaive}), "
        f"(SELECT count(*) FROM silver.dedup_clusters {glaive})"
    ) == [(216, 12, 72)]
    assert graph.query(
        "SELECT source, stage, reason, row_number FROM silver.quarantine WHERE source <> 'glaive_toolcall' ORDER BY ALL"
    ) == [
        ("planted_agents", "quality", "tool_arguments_not_json", 1),
        ("planted_agents", "quality", "tool_call_unanswered", 3),
        ("planted_agents", "quality", "undeclared_tool", 2),
    ]
    assert graph.query(f"SELECT stage, reason, count(*) FROM silver.quarantine {glaive} GROUP BY ALL ORDER BY ALL") == [
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
    assert graph.query("SELECT source, count(*) FROM gold.sft GROUP BY ALL ORDER BY ALL") == [
        ("glaive_toolcall", 215),
        ("hermes_sample", 1),
        ("planted_agents", 1),
    ]
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
        "glaive_toolcall": {"0": 563, "1": 146},
        "hermes_sample": {"0": 1, "1": 1},
        "planted_agents": {"0": 2, "1": 1},
        "all": {"0": 566, "1": 148},
    }
    assert metadata["agentic/glaive_toolcall/tools_share"].value == pytest.approx(0.4791)
    assert metadata["agentic/all/tool_calls"].value == 148
    tokens = metadata["reasoning_vs_answer_tokens"].value
    assert tokens["glaive_toolcall"] == {"reasoning": 0, "answer": 0}  # glaive has no reasoning
    assert tokens["planted_agents"]["reasoning"] > 0 and tokens["planted_agents"]["answer"] > 0
    assert "reasoning_share" not in {k.split("/")[-1] for k in metadata if k.startswith("agentic/glaive_toolcall/")}
    assert "| glaive_toolcall | 215 | 103 (47.9%) | 146 | 0: 563, 1: 146 | 0 |  |" in metadata["agentic"].value


def test_the_sft_export_keeps_structured_messages_next_to_the_labels(agentic_graph: Any) -> None:
    graph, _, _ = agentic_graph
    table = pq.read_table(shard_files(graph.database.parent / "exports" / "sft"))
    assert table.num_rows == 217
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
    ours = datasets.load_dataset(str(folder), split="train")  # the folder, as its card declares it
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
    assert trainer.train_dataset.num_rows == 217
    assert trainer.train_dataset["labels"] == ours["labels"]


def test_planted_reasoning_trajectory_and_hermes_row_reach_gold_proven(agentic_graph: Any) -> None:
    graph, _, tokenizer = agentic_graph
    tok = tokenizer.get()
    rows = graph.dicts(
        "SELECT source, messages, tools, input_ids, labels FROM gold.sft "
        "WHERE source IN ('planted_agents', 'hermes_sample') ORDER BY source"
    )
    assert [r["source"] for r in rows] == ["hermes_sample", "planted_agents"]
    for row in rows:
        assert (
            verify_mask(tok, row["messages"], row["input_ids"], row["labels"], MaskConfig(), tools=row["tools"]) is None
        )
    agent = rows[1]
    trained = tok.decode([t for t, label in zip(agent["input_ids"], agent["labels"], strict=True) if label != -100])
    assert "<think>\nI should call the tool.\n</think>" in trained and "4 C, cloudy" not in trained
    hermes = rows[0]
    assert [t["function"]["name"] for t in json.loads(hermes["tools"])] == ["get_weather"]
    assert hermes["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
