"""How many prompts one difficulty run samples: none in the refresh, a token budget's worth in the job."""

from __future__ import annotations

import pytest

from posttrain_assets import settings
from posttrain_assets.defs.automation.jobs import estimate_rl_difficulty_job
from posttrain_assets.defs.silver.rl import RolloutConfig, prompts_this_run


def test_the_default_config_samples_nothing() -> None:
    """The refresh materialises silver.rl_difficulty with the default config: it must not sample (nor import
    torch), so the rollouts stay out of the refresh's cost."""
    assert prompts_this_run(RolloutConfig()) == 0
    assert prompts_this_run(RolloutConfig(token_budget=10**9)) == 0  # a budget alone does not switch it on


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"max_prompts": 16}, 16),
        ({"max_prompts": 1000, "token_budget": 2048 * 40}, 40),  # K=8 x 256 tokens = 2048 per prompt at most
        ({"max_prompts": 10, "token_budget": 2048 * 40}, 10),
        ({"max_prompts": 1000, "token_budget": 2047}, 0),
        ({"max_prompts": 1000, "token_budget": 5000, "k": 2, "max_new_tokens": 24}, 104),
    ],
)
def test_a_token_budget_sizes_the_run(config: dict[str, int], expected: int) -> None:
    assert prompts_this_run(RolloutConfig(**config)) == expected


def test_the_difficulty_job_samples_a_token_budget_on_the_torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's own default: more prompts than the 16 of rollout version 1, sized by tokens, on CPU torch unless
    POSTTRAIN_POLICY_BACKEND names another backend (the config leaves it empty)."""
    run_config = estimate_rl_difficulty_job.config["ops"]["silver__rl_difficulty"]["config"]
    config = RolloutConfig(**run_config)
    assert config.backend == ""
    monkeypatch.delenv("POSTTRAIN_POLICY_BACKEND", raising=False)
    assert (config.backend or settings.policy_backend()) == "torch"
    monkeypatch.setenv("POSTTRAIN_POLICY_BACKEND", "vllm")
    assert (config.backend or settings.policy_backend()) == "vllm"
    assert config.token_budget > 0
    assert prompts_this_run(config) > 16
