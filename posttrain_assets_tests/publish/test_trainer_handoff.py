"""The hand-off to trainers, tried the way an ML engineer would: with the trainers' own code and no glue.

- verl: its own ``RLHFDataset`` loads the RL export, its ``default_compute_score`` scores GSM8K rows routed by the
  exported ``data_source``, and its own loader runs the shipped ``reward.py`` with the card's config lines. The RL
  projection keeps the landing rows' data_source, split and index, and appends answer-format instructions as the
  registry and the verifiers say (on a hand-built gold table, exactly).
- ``reward.py`` gives the certification verdicts: certified seeds (GSM8K, HumanEval, one of each verifier) and the
  demo export's rows score at training time what they scored when certified.
- TRL: two SFT steps and two DPO steps on a tiny random model with the settings the cards print keep every row,
  and SFT trains on the export's labels.
- Dagster: ``dagster job execute -j publish`` runs with only DAGSTER_HOME set, and the resources fall back to the
  same defaults as ``posttrain``.

Everything runs offline. Tests marked slow read the demo graph's warehouse (test_exports.demo_warehouse) or run a
trainer or a Dagster subprocess.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import dagster as dg
import duckdb
import pyarrow.parquet as pq
import pytest

from posttrain_assets import cli, settings
from posttrain_assets.defs import resources as resources_module
from posttrain_assets.demo.generator import generate_demo_data
from posttrain_assets.ingest.registry import RegistryError, load_registry, render_registry
from posttrain_assets.publish.exports import (
    ANSWER_FORMAT_DEFAULTS,
    CARD_FILE,
    MANIFEST_FILE,
    REWARD_FILE,
    REWARD_SOURCE,
    VERL_DATA_SOURCE_ALIASES,
    ExportManifest,
    export_gold,
    shard_files,
    verl_routes,
)
from posttrain_assets.records.formats import get_adapter
from posttrain_assets.records.schema import SourceRef
from posttrain_assets.rl.verifiers import (
    VERIFIER_VERSIONS,
    Seed,
    certify_many,
    perturb_answer,
    render_answer,
)
from posttrain_assets.sft.tokenizer import tokenizer_identity
from posttrain_assets.warehouse.catalogue import GOLD_RL_PROMPTS
from posttrain_assets.warehouse.io import fetch_dicts, insert_rows
from posttrain_assets_tests.publish.test_exports import demo_warehouse
from posttrain_assets_tests.real_data import REAL_DATA

# TRL still calls transformers' deprecated gradient-checkpointing names.
pytestmark = pytest.mark.filterwarnings("ignore:`[a-z_]*gradient_checkpointing[a-z_]*` is deprecated:FutureWarning")

CREATED_AT = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
IDENTITY = {"name": "test-tokenizer", "tokenizer_sha256": "a" * 64, "chat_template_sha256": "b" * 64}
PROJECT_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path) -> Path:
    return demo_warehouse(tmp_path_factory, tokenizer_cache_dir)


@pytest.fixture(scope="module")
def exported(warehouse: Path, tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any) -> ExportManifest:
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        return export_gold(
            conn,
            tmp_path_factory.mktemp("handoff_exports"),
            tokenizer_identity=tokenizer_identity(smollm2_tokenizer),
            created_at=CREATED_AT,
        )


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Hugging Face libraries offline, their caches under tmp (verl's RLHFDataset and TRL load through them)."""
    cache = tmp_path_factory.mktemp("handoff_hf_home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_HOME", str(cache))
        env.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
        import datasets
        import huggingface_hub.constants

        # Both read these variables when first imported, which another test may have done.
        env.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        env.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        env.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
        env.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        datasets.disable_progress_bars()
        yield cache


def load_shipped_reward(path: Path) -> ModuleType:
    """An exported ``reward.py`` loaded from its file, the way verl's load_module does (a module of its own)."""
    spec = importlib.util.spec_from_file_location(f"shipped_reward_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def card_settings(card: str, config: str) -> dict[str, Any]:
    """The keyword arguments of the ``config(...)`` call in the card's Python block (what a user pastes)."""
    block = re.search(r"```python\n(.*?)```", card, re.DOTALL)
    assert block is not None, "the card has no Python block"
    call = ast.parse(block.group(1)).body[-1]
    assert isinstance(call, ast.Expr) and isinstance(call.value, ast.Call)
    assert ast.unparse(call.value.func) == config
    return {k.arg: ast.literal_eval(k.value) for k in call.value.keywords if k.arg is not None}


def card_bash_lines(card: str) -> list[str]:
    block = re.search(r"```bash\n(.*?)```", card, re.DOTALL)
    assert block is not None, "the card has no verl config block"
    return block.group(1).strip().split("\n")


# ---------------------------------------------------------------------------------------------------------------
# the RL projection: data_source, split, index, answer formats (a hand-built gold table; no graph)
# ---------------------------------------------------------------------------------------------------------------

GSM8K_DEFAULT = ANSWER_FORMAT_DEFAULTS["numeric"]
MATH_DEFAULT = ANSWER_FORMAT_DEFAULTS["math"]
CUSTOM = 'Answer with one word after "####".'


def gold_rl_row(
    id_: str,
    source: str,
    messages: list[dict[str, str]],
    answer: str,
    verifier: str,
    source_ref: dict[str, Any] | None,
    row: int,
    tests: str | None = None,
) -> dict[str, Any]:
    """A gold.rl_prompts row with every column (the ones the export does not read at their defaults)."""
    return {
        "id": id_,
        "source": source,
        "source_kind": "human",
        "messages": messages,
        "prompt": messages[-1]["content"],
        "answer": answer,
        "verifier": verifier,
        "verifier_version": VERIFIER_VERSIONS[verifier],
        "domain": None,
        "difficulty": None,
        "difficulty_source": None,
        "pass_rate": None,
        "difficulty_k": None,
        "difficulty_lineage": None,
        "difficulty_estimated": False,
        "token_count": 10,
        "lang": "en",
        "license": "MIT",
        "origin": {
            "source": source,
            "uri": "u",
            "file": "f.jsonl",
            "row": row,
            "record_sha256": "r",
            "file_sha256": "f",
        },
        "created_at": CREATED_AT,
        "source_ref": source_ref,
        "tests": tests,
    }


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


HAND_BUILT = [
    # A verl landing row of the GSM8K test split, named by an alias verl does not route, its prompt already
    # carrying the default instruction.
    gold_rl_row(
        "a1",
        "verl_rows",
        user(f"How many apples? {GSM8K_DEFAULT}"),
        "7",
        "numeric",
        {"data_source": "gsm8k", "split": "test", "index": 17},
        3,
    ),
    # No source_ref (the messages format): the registry name, 'train' and the landing row number; a system turn.
    gold_rl_row(
        "b2",
        "plain_math",
        [{"role": "system", "content": "Be brief."}, *user("Compute $1/2+1/4$.")],
        "\\frac{3}{4}",
        "math",
        None,
        5,
    ),
    # The registry sets this source's instruction; a data_source verl does not know stays as it is.
    gold_rl_row("c3", "custom_fmt", user("Capital of France?"), "Paris", "exact_match", {"data_source": "my/qa"}, 0),
    # The registry turns the instruction off; the MATH alias becomes verl's name.
    gold_rl_row(
        "d4",
        "no_fmt",
        user("What is 2+2?"),
        "4",
        "numeric",
        {"data_source": "hendrycks/competition_math", "split": "validation", "index": None},
        9,
    ),
    # The prompt names \boxed already: no default on top.
    gold_rl_row("e5", "plain_math", user("Put the answer in \\boxed{}: 3+4?"), "7", "numeric", None, 6),
    # python_eval has no default instruction.
    gold_rl_row("f6", "code", user("Write f() returning 1."), "def f():\n    return 1\n", "python_eval", None, 2),
]


@pytest.fixture(scope="module")
def hand_built_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportManifest, dict[str, dict[str, Any]]]:
    database = tmp_path_factory.mktemp("hand_built") / "warehouse.duckdb"
    with duckdb.connect(str(database)) as conn:
        conn.execute(GOLD_RL_PROMPTS.create_sql())
        insert_rows(conn, GOLD_RL_PROMPTS, HAND_BUILT)
    with duckdb.connect(str(database), read_only=True) as conn:
        manifest = export_gold(
            conn,
            database.parent / "out",
            tokenizer_identity=IDENTITY,
            created_at=CREATED_AT,
            answer_formats={"custom_fmt": CUSTOM, "no_fmt": ""},
        )
    rows = pq.read_table(shard_files(manifest.out_dir / "rl")).to_pylist()
    return manifest, {r["extra_info"]["id"]: r for r in rows}


def test_rl_export_keeps_the_landing_rows_data_source_split_and_index(
    hand_built_export: tuple[ExportManifest, dict[str, dict[str, Any]]],
) -> None:
    _, rows = hand_built_export
    got = {i: (r["data_source"], r["extra_info"]["split"], r["extra_info"]["index"]) for i, r in rows.items()}
    assert got == {
        "a1": ("openai/gsm8k", "test", 17),  # alias mapped, the landing split and index kept
        "b2": ("plain_math", "train", 5),  # nothing given: registry name, train, row in the landing file
        "c3": ("my/qa", "train", 0),  # unknown to verl: kept as the row names it
        "d4": ("lighteval/MATH", "validation", 9),  # a split but no index
        "e5": ("plain_math", "train", 6),
        "f6": ("code", "train", 2),
    }
    assert all(
        r["extra_info"]["verifier_version"] == VERIFIER_VERSIONS[r["extra_info"]["verifier"]] for r in rows.values()
    )
    assert {r["extra_info"]["source"] for r in rows.values()} == {
        "verl_rows",
        "plain_math",
        "custom_fmt",
        "no_fmt",
        "code",
    }


def test_rl_prompts_get_the_registry_or_verifier_answer_format_once(
    hand_built_export: tuple[ExportManifest, dict[str, dict[str, Any]]],
) -> None:
    manifest, rows = hand_built_export
    formats = {i: r["extra_info"]["answer_format"] for i, r in rows.items()}
    assert formats == {"a1": None, "b2": MATH_DEFAULT, "c3": CUSTOM, "d4": None, "e5": None, "f6": None}
    prompts = {i: r["prompt"] for i, r in rows.items()}
    assert prompts["a1"] == user(f"How many apples? {GSM8K_DEFAULT}")  # already there: not appended twice
    assert prompts["b2"] == [{"role": "system", "content": "Be brief."}, *user(f"Compute $1/2+1/4$. {MATH_DEFAULT}")]
    assert prompts["c3"] == user(f"Capital of France? {CUSTOM}")
    assert prompts["d4"] == user("What is 2+2?")
    assert prompts["e5"] == user("Put the answer in \\boxed{}: 3+4?")
    assert prompts["f6"] == user("Write f() returning 1.")
    # The question is the prompt as the source gives it.
    assert rows["c3"]["extra_info"]["question"] == "Capital of France?"

    card = (manifest.out_dir / "rl" / CARD_FILE).read_text(encoding="utf-8")
    assert f"| `custom_fmt` | `exact_match` | {CUSTOM} | registry | 1 | 1 |" in card
    assert "| `no_fmt` | `numeric` | (none) | registry | 0 | 1 |" in card
    assert f"| `plain_math` | `math` | {MATH_DEFAULT} | verifier default | 1 | 1 |" in card
    assert f"| `plain_math` | `numeric` | {GSM8K_DEFAULT} | verifier default | 0 | 1 |" in card
    assert "| `code` | `python_eval` | (none) | verifier default | 0 | 1 |" in card
    assert "| `openai/gsm8k` | 1 | yes |" in card and "| `my/qa` | 1 | no |" in card


def test_rl_folder_ships_reward_py_and_the_verl_config_lines(
    hand_built_export: tuple[ExportManifest, dict[str, dict[str, Any]]],
) -> None:
    manifest, _ = hand_built_export
    folder = manifest.out_dir / "rl"
    assert (folder / REWARD_FILE).read_text(encoding="utf-8") == REWARD_SOURCE
    sources = ("code", "custom_fmt", "no_fmt", "plain_math", "verl_rows")
    shards = [f"rl/data/{source}-00000-of-00001" for source in sources]
    assert [f.path for f in manifest.table("rl").files] == [
        *(f"{shard}{suffix}" for shard in shards for suffix in (".parquet", ".jsonl")),
        "rl/reward.py",
        "rl/README.md",
    ]
    settings_ = json.loads((manifest.out_dir / MANIFEST_FILE).read_text())["exports"][0]["trainer_settings"]
    assert settings_ == {
        "config": "verl",
        "settings": {
            "data.train_files": [f"{shard}.parquet" for shard in shards],
            "reward.custom_reward_function.path": "rl/reward.py",
            "reward.custom_reward_function.name": "compute_score",
        },
    }
    assert card_bash_lines((folder / CARD_FILE).read_text(encoding="utf-8")) == [
        '"data.train_files=[' + ",".join(f"$EXPORT/{shard}.parquet" for shard in shards) + ']"',
        "reward.custom_reward_function.path=$EXPORT/rl/reward.py",
        "reward.custom_reward_function.name=compute_score",
    ]


# ---------------------------------------------------------------------------------------------------------------
# reward.py gives the certification verdicts
# ---------------------------------------------------------------------------------------------------------------


def humaneval_seeds(count: int) -> list[Seed]:
    with gzip.open(REAL_DATA / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as fh:
        problems = [json.loads(next(fh)) for _ in range(count)]
    return [
        Seed("python_eval", p["prompt"] + p["canonical_solution"], tests=f"{p['test']}\ncheck({p['entry_point']})\n")
        for p in problems
    ]


def gsm8k_seeds(count: int) -> list[Seed]:
    adapter = get_adapter("gsm8k")
    with (REAL_DATA / "gsm8k" / "train.jsonl").open(encoding="utf-8") as fh:
        records = [adapter.parse(json.loads(next(fh)), "rl") for _ in range(count)]
    return [Seed(r.verifier, r.answer) for r in records]


@pytest.mark.slow  # certifies 26 seeds three times (sandbox and math workers): about 5 s
def test_reward_py_scores_the_certification_fixtures_as_certification_did(tmp_path: Path) -> None:
    (tmp_path / REWARD_FILE).write_text(REWARD_SOURCE, encoding="utf-8")
    reward = load_shipped_reward(tmp_path / REWARD_FILE)
    seeds = [
        *gsm8k_seeds(20),
        *humaneval_seeds(2),
        Seed("numeric", "1,080"),
        Seed("math", r"\frac{\sqrt{3}}{2}"),
        Seed("math", "x=5"),
        Seed("exact_match", "Paris"),
        Seed("numeric", "n/a"),  # the gold itself is unreadable: certification refuses it, so must the reward
    ]
    certified = certify_many(seeds, runs=3, workers=2)
    assert [c.ok for c in certified] == [True] * (len(seeds) - 1) + [False]
    for seed, verdict in zip(seeds, certified, strict=True):
        info = {"id": seed.gold, "verifier": seed.verifier, "verifier_version": verdict.version}
        if seed.tests is not None:
            info["tests"] = seed.tests
        gold = reward.compute_score("any", render_answer(seed.verifier, seed.gold), seed.gold, info)
        wrong = reward.compute_score("any", perturb_answer(seed.verifier, seed.gold), seed.gold, info)
        assert (gold, wrong) == (verdict.gold_scores[0], verdict.perturbed_score), seed


def test_reward_py_refuses_another_verifier_version_and_rows_without_a_verifier(tmp_path: Path) -> None:
    (tmp_path / REWARD_FILE).write_text(REWARD_SOURCE, encoding="utf-8")
    reward = load_shipped_reward(tmp_path / REWARD_FILE)
    info = {"id": "x1", "verifier": "numeric", "verifier_version": "0"}
    with pytest.raises(reward.VerifierVersionMismatch, match="row x1 was certified by numeric version 0, but"):
        reward.compute_score("openai/gsm8k", "#### 7", "7", info)
    with pytest.raises(ValueError, match="names no verifier"):
        reward.compute_score("openai/gsm8k", "#### 7", "7", {"index": 3})


@pytest.mark.slow
def test_the_demo_exports_rows_score_with_reward_py_as_they_were_certified(
    exported: ExportManifest, warehouse: Path
) -> None:
    reward = load_shipped_reward(exported.out_dir / "rl" / REWARD_FILE)
    rows = pq.read_table(shard_files(exported.out_dir / "rl")).to_pylist()
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        certified = {
            r["id"]: r
            for r in fetch_dicts(
                conn, "SELECT id, verifier_version, gold_scores, perturbed_score FROM silver.rl_certification"
            )
        }
    # Every numeric and exact_match row, and the math rows whose gold is not a plain integer (those are compared
    # by math-verify in a worker process each: a dozen is enough).
    chosen = [r for r in rows if r["extra_info"]["verifier"] != "math"]
    chosen += [
        r for r in rows if r["extra_info"]["verifier"] == "math" and not r["reward_model"]["ground_truth"].isdigit()
    ][:12]
    assert len(chosen) > 600 and {r["extra_info"]["verifier"] for r in chosen} == {"numeric", "exact_match", "math"}
    for row in chosen:
        info, gold = row["extra_info"], row["reward_model"]["ground_truth"]
        verdict = certified[info["id"]]
        assert info["verifier_version"] == verdict["verifier_version"]
        got = (
            reward.compute_score(row["data_source"], render_answer(info["verifier"], gold), gold, dict(info)),
            reward.compute_score(row["data_source"], perturb_answer(info["verifier"], gold), gold, dict(info)),
        )
        assert got == (verdict["gold_scores"][0], verdict["perturbed_score"]) == (1.0, 0.0), info["id"]


# ---------------------------------------------------------------------------------------------------------------
# verl itself
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_verl_loads_the_rl_export_and_scores_gsm8k_rows_as_reward_py_does(
    exported: ExportManifest, warehouse: Path, smollm2_tokenizer: Any, offline: Path, tmp_path: Path
) -> None:
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.reward_score import default_compute_score

    folder = exported.out_dir / "rl"
    config = OmegaConf.create(
        {"prompt_key": "prompt", "max_prompt_length": 1024, "cache_dir": str(tmp_path / "verl")}
        | {"filter_overlong_prompts": True, "filter_overlong_prompts_workers": 1}
    )
    # verl's dataset reads the Parquet shards the card's data.train_files line lists.
    card = (folder / CARD_FILE).read_text(encoding="utf-8")
    lines = [line.replace("$EXPORT", str(exported.out_dir)).strip('"') for line in card_bash_lines(card)]
    train_files = OmegaConf.from_dotlist(lines).data.train_files
    assert list(train_files) == [str(p) for p in shard_files(folder)] and len(train_files) > 1
    dataset = RLHFDataset(data_files=train_files, tokenizer=smollm2_tokenizer, config=config)
    assert len(dataset) == exported.table("rl").rows  # no prompt filtered out, none lost
    items = [dataset[i] for i in range(len(dataset))]
    assert {i["data_source"] for i in items} == {"openai/gsm8k", "lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval"}
    assert all(i["raw_prompt"][-1]["role"] == "user" and i["index"] == i["extra_info"]["index"] for i in items)

    # verl's reward loader, configured with the card's lines, runs the shipped reward.py.
    shipped = get_custom_reward_fn(OmegaConf.from_dotlist([line for line in lines if line.startswith("reward.")]))
    assert shipped is not None

    gsm8k = [i for i in items if i["data_source"] == "openai/gsm8k"]
    assert {i["extra_info"]["source"] for i in gsm8k} == {"demo_rl_gsm8k", "demo_rl_verl"}
    for item in (next(i for i in gsm8k if i["extra_info"]["source"] == s) for s in ("demo_rl_gsm8k", "demo_rl_verl")):
        # Every GSM8K prompt asks for the answer after ####, the format verl's strict GSM8K scorer reads.
        assert item["raw_prompt"][-1]["content"].endswith(GSM8K_DEFAULT)
        truth = item["reward_model"]["ground_truth"]
        right = f"Step by step the total comes out as {truth}.\n#### {truth}"
        wrong = f"Step by step the total comes out as {int(truth) + 1}.\n#### {int(truth) + 1}"
        for solution, expected in ((right, 1.0), (wrong, 0.0)):
            by_verl = default_compute_score(item["data_source"], solution, truth, item["extra_info"])
            by_ours = shipped(
                data_source=item["data_source"],
                solution_str=solution,
                ground_truth=truth,
                extra_info=dict(item["extra_info"]),
            )
            assert by_verl == by_ours == expected

    # The card's routing column is what verl's default_compute_score does with each exported data_source.
    for data_source in {i["data_source"] for i in items} | set(VERL_DATA_SOURCE_ALIASES.values()) | {"my/qa"}:
        try:
            default_compute_score(data_source, "#### 1", "1")
            routed = True
        except NotImplementedError:
            routed = False
        assert routed == verl_routes(data_source), data_source


@pytest.mark.slow
def test_the_demo_rl_rows_carry_their_landing_data_source_and_index(exported: ExportManifest, warehouse: Path) -> None:
    rows = {r["extra_info"]["id"]: r for r in pq.read_table(shard_files(exported.out_dir / "rl")).to_pylist()}
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        landing = fetch_dicts(
            conn,
            """
            SELECT g.id, g.source, g.origin."row" AS landing_row, b.payload
            FROM gold.rl_prompts g
            JOIN bronze.records b
              ON b.source = g.source AND b.file_path = g.origin.file AND b.row_number = g.origin."row"
            """,
        )
    assert len(landing) == len(rows)
    expected_source = {"demo_rl_gsm8k": "openai/gsm8k", "demo_rl_math": "lighteval/MATH"}
    for row in landing:
        info = rows[row["id"]]["extra_info"]
        payload = json.loads(row["payload"])
        if row["source"] == "demo_rl_verl":  # the landing row's own
            assert rows[row["id"]]["data_source"] == payload["data_source"]
            assert (info["split"], info["index"]) == (payload["extra_info"]["split"], payload["extra_info"]["index"])
        else:
            assert rows[row["id"]]["data_source"] == expected_source[row["source"]]
            assert (info["split"], info["index"]) == ("train", row["landing_row"])


# ---------------------------------------------------------------------------------------------------------------
# TRL with the cards' settings
# ---------------------------------------------------------------------------------------------------------------


def tiny_llama(tok: Any) -> Any:
    """A two-layer random Llama over our tokenizer's vocabulary, built from a config (nothing downloaded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def two_steps(out: Path) -> dict[str, Any]:
    """Training arguments of a two-step CPU run that writes nothing but its output folder."""
    return {
        "output_dir": str(out),
        "report_to": "none",
        "use_cpu": True,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
    }


def recording_loss(trainer: Any) -> list[dict[str, Any]]:
    """Record the batches ``trainer`` computes its loss on."""
    seen: list[dict[str, Any]] = []
    compute_loss: Callable[..., Any] = trainer.compute_loss

    def recorded(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        seen.append({k: v.detach().clone() for k, v in inputs.items() if hasattr(v, "detach")})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recorded
    return seen


@pytest.mark.slow
def test_two_sft_steps_with_the_cards_settings_keep_every_row_and_our_labels(
    exported: ExportManifest, smollm2_tokenizer: Any, offline: Path, tmp_path: Path
) -> None:
    import datasets
    from trl import SFTConfig, SFTTrainer

    folder = exported.out_dir / "sft"
    card = (folder / CARD_FILE).read_text(encoding="utf-8")
    settings_ = card_settings(card, "SFTConfig")
    assert settings_ == exported.table("sft").trainer["settings"]
    assert settings_["assistant_only_loss"] is False
    assert "fit `max_seq_len` = 4096 tokens" in card and "`labels` already carry the assistant-only loss mask" in card
    ours = datasets.load_dataset(str(folder), split="train")  # the folder, as its card declares it
    assert settings_["max_length"] == 4096 >= max(len(ids) for ids in ours["input_ids"])

    trainer = SFTTrainer(
        model=tiny_llama(smollm2_tokenizer),
        args=SFTConfig(**two_steps(tmp_path / "sft"), **settings_),
        train_dataset=ours,
        processing_class=smollm2_tokenizer,
    )
    assert trainer.train_dataset.num_rows == ours.num_rows == exported.table("sft").rows
    assert trainer.train_dataset["labels"] == ours["labels"]
    seen = recording_loss(trainer)
    result = trainer.train()
    assert trainer.state.global_step == 2 and math.isfinite(result.training_loss)
    labels_by_ids = {tuple(ids): labels for ids, labels in zip(ours["input_ids"], ours["labels"], strict=True)}
    trained = 0
    for batch in seen:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
            length = int(mask.sum())
            assert labels.tolist()[:length] == labels_by_ids[tuple(ids.tolist()[:length])]
            assert set(labels.tolist()[length:]) <= {-100}
            trained += 1
    assert trained == 4  # two steps of two rows, each trained on the export's own labels

    # What the card warns about: asking TRL for assistant-only loss makes it rebuild the mask, and it cannot.
    with pytest.raises(ValueError, match="not training-compatible"):
        SFTTrainer(
            model=tiny_llama(smollm2_tokenizer),
            args=SFTConfig(**two_steps(tmp_path / "refused"), **(settings_ | {"assistant_only_loss": True})),
            train_dataset=ours.remove_columns(["input_ids", "labels", "assistant_masks"]),
            processing_class=smollm2_tokenizer,
        )


@pytest.mark.slow
def test_two_dpo_steps_with_the_cards_settings_keep_every_pair_whole(
    exported: ExportManifest, smollm2_tokenizer: Any, offline: Path, tmp_path: Path
) -> None:
    import datasets
    from trl import DPOConfig, DPOTrainer

    name = next(t.name for t in exported.tables if t.name.startswith("preference"))
    folder = exported.out_dir / name
    settings_ = card_settings((folder / CARD_FILE).read_text(encoding="utf-8"), "DPOConfig")
    assert settings_ == exported.table(name).trainer["settings"] and settings_["max_length"] > 0
    pairs = datasets.load_dataset(str(folder), split="train")
    model = tiny_llama(smollm2_tokenizer)
    reference = tiny_llama(smollm2_tokenizer)
    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=DPOConfig(**two_steps(tmp_path / "dpo"), **settings_),
        train_dataset=pairs,
        processing_class=smollm2_tokenizer,
    )
    prepared = trainer.train_dataset
    assert prepared.num_rows == pairs.num_rows == exported.table(name).rows
    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in prepared)
    assert longest <= settings_["max_length"]  # so no pair is cut: each trains whole
    result = trainer.train()
    assert trainer.state.global_step == 2 and math.isfinite(result.training_loss)


# ---------------------------------------------------------------------------------------------------------------
# Dagster without project variables
# ---------------------------------------------------------------------------------------------------------------


def test_resources_fall_back_to_the_defaults_posttrain_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    names = (settings.SOURCES, settings.DUCKDB_PATH, settings.TOKENIZER, settings.CACHE_DIR)
    for name in names:  # set first, so that what apply_environment_defaults sets below is undone afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    defaults = settings.environment_defaults()
    assert defaults[settings.DUCKDB_PATH] == str(tmp_path / "data" / "posttrain.duckdb")
    built = resources_module.resources().resources
    assert built["duckdb"].database == defaults[settings.DUCKDB_PATH]
    assert built["registry"].path == defaults[settings.SOURCES]
    assert (built["tokenizer"].spec, built["tokenizer"].cache_dir) == (
        defaults[settings.TOKENIZER],
        defaults[settings.CACHE_DIR],
    )
    # The CLI fills the environment with the very same values.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    cli.apply_environment_defaults()
    assert {name: os.environ[name] for name in names} == defaults

    # A variable that is set is read by Dagster when a run starts.
    monkeypatch.setenv(settings.DUCKDB_PATH, str(tmp_path / "elsewhere.duckdb"))
    assert resources_module.resources().resources["duckdb"].database == dg.EnvVar(settings.DUCKDB_PATH)


@pytest.mark.slow
def test_the_publish_job_runs_with_only_dagster_home_set(
    warehouse: Path, tokenizer_cache_dir: Path, tmp_path: Path
) -> None:
    # The default layout under a fresh working directory: data/posttrain.duckdb and the demo registry.
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copy(warehouse, work / "data" / "posttrain.duckdb")
    generate_demo_data(work / "data" / "demo", seed=7)
    home = tmp_path / "home"  # the default tokenizer cache, ~/.cache/posttrain_assets, already filled
    shutil.copytree(tokenizer_cache_dir, home / ".cache" / "posttrain_assets")
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "DAGSTER_HOME": str(dagster_home)}
    dagster = Path(sys.executable).with_name("dagster")
    result = subprocess.run(
        [str(dagster), "job", "execute", "-m", "posttrain_assets.definitions", "-j", "publish"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "RUN_SUCCESS" in result.stdout + result.stderr
    manifest = json.loads((work / "data" / "exports" / MANIFEST_FILE).read_text(encoding="utf-8"))
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        expected = {
            name: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for name, table in (("sft", "gold.sft"), ("rl", "gold.rl_prompts"))
        }
    assert {e["name"]: e["rows"] for e in manifest["exports"] if e["name"] in expected} == expected
    assert (work / "data" / "exports" / "rl" / REWARD_FILE).read_text(encoding="utf-8") == REWARD_SOURCE


# ---------------------------------------------------------------------------------------------------------------
# the registry's answer_format and the adapters' source_ref
# ---------------------------------------------------------------------------------------------------------------

REGISTRY = """
sources:
  - name: bank
    path: rl/gsm8k.jsonl
    format: gsm8k
    license: MIT
    origin: openai/grade-school-math
    kind: human
    answer_format: {answer_format}
  - name: chats
    path: sft/*.jsonl
    format: sharegpt
    license: MIT
    origin: here
    kind: human
"""


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"Put it in \\\\boxed{}."', "Put it in \\boxed{}."), ('""', ""), ("null", None)],
)
def test_registry_reads_an_answer_format_for_rl_sources(tmp_path: Path, value: str, expected: str | None) -> None:
    path = tmp_path / "sources.yaml"
    path.write_text(REGISTRY.format(answer_format=value), encoding="utf-8")
    registry = load_registry(path)
    assert registry.get("bank").answer_format == expected
    assert registry.get("chats").answer_format is None
    # A registry written back keeps it.
    entries = [
        {
            "name": s.name,
            "path": s.path,
            "format": s.format,
            "license": s.license,
            "origin": s.origin,
            "kind": s.kind,
            "answer_format": s.answer_format,
        }
        for s in registry.sources
    ]
    path.write_text(render_registry(entries), encoding="utf-8")
    assert load_registry(path).get("bank").answer_format == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (REGISTRY.format(answer_format="7"), "sources[0] (bank): field 'answer_format': must be a string, got int"),
        (
            REGISTRY.format(answer_format="null") + '    answer_format: "x"\n',
            "sources[1] (chats): field 'answer_format': only RL sources take an answer format, this one is sft",
        ),
    ],
)
def test_registry_rejects_a_bad_answer_format(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "sources.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RegistryError, match=re.escape(message)):
        load_registry(path)


def test_adapters_record_where_a_row_sits_in_its_dataset() -> None:
    verl_row = {
        "data_source": "openai/gsm8k",
        "prompt": user("q?"),
        "reward_model": {"style": "rule", "ground_truth": "3"},
        "extra_info": {"split": "test", "index": 41},
    }
    assert get_adapter("verl").parse(verl_row, "rl").source_ref == SourceRef("openai/gsm8k", "test", 41)
    odd = verl_row | {"extra_info": {"split": 3, "index": "41"}}  # not a split or an index: not carried
    assert get_adapter("verl").parse(odd, "rl").source_ref == SourceRef("openai/gsm8k", None, None)
    assert get_adapter("verl").parse(verl_row | {"extra_info": None}, "rl").source_ref == SourceRef("openai/gsm8k")
    gsm8k = get_adapter("gsm8k").parse({"question": "q?", "answer": "so #### 3"}, "rl")
    assert gsm8k.source_ref == SourceRef("openai/gsm8k")
    math_row = {"problem": "p?", "solution": "\\boxed{3}"}
    assert get_adapter("math").parse(math_row, "rl").source_ref == SourceRef("hendrycks/competition_math")
    assert get_adapter("messages").parse({"messages": user("q?"), "answer": "3"}, "rl").source_ref is None
