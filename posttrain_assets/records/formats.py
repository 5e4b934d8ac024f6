"""Input formats: the registry of adapters that map raw rows to :class:`CanonicalRecord`.

Each :class:`Adapter` names a source format, the regimes it can serve (the first
is its default) and a ``parse(row, regime)`` function (see
:mod:`posttrain_assets.records.adapters` for what each format looks like and
which reason codes it raises). Pure Python: no Dagster imports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain_assets.records import adapters
from posttrain_assets.records.schema import CanonicalRecord


@dataclass(frozen=True)
class Adapter:
    """One input format: ``parse(row, regime)`` maps a parsed JSON object to a record."""

    name: str
    regimes: tuple[str, ...]  # regimes this format can serve; the first is the default
    parse: Callable[[dict[str, Any], str], CanonicalRecord]
    description: str

    @property
    def default_regime(self) -> str:
        """The regime used when a source does not name one."""
        return self.regimes[0]


def _make(name: str, regimes: tuple[str, ...], description: str) -> Adapter:
    parse = getattr(adapters, name)
    if tuple(parse.regimes) != regimes:
        raise RuntimeError(f"{name}: registry regimes {regimes} != adapter regimes {parse.regimes}")
    return Adapter(name=name, regimes=regimes, parse=parse, description=description)


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (
        _make(
            "messages",
            ("sft", "rl"),
            "OpenAI/HF chat: {messages: [{role, content, tool_calls?, reasoning_content?, tool_call_id?}], tools?}; "
            "rl rows add answer, verifier, tests",
        ),
        _make(
            "sharegpt",
            ("sft",),
            "ShareGPT/FastChat/LLaMA-Factory: {id?, conversations: [{from, value}], system?, tools?}; function_call "
            "and observation turns are tool calls and results",
        ),
        _make(
            "hermes",
            ("sft",),
            "Hermes function calling: ShareGPT or messages with <tool_call>, <tool_response> and <tools> blocks",
        ),
        _make("alpaca", ("sft",), "Alpaca: {instruction, input?, output, system?}"),
        _make("trl_preference", ("preference",), "TRL preference: {prompt?, chosen, rejected}, explicit or implicit"),
        _make(
            "ultrafeedback",
            ("preference",),
            "UltraFeedback binarized: {prompt, chosen, rejected, score_*}, or rated completions: {instruction, "
            "completions: [{model, response, annotations}]}",
        ),
        _make("hh_rlhf", ("preference",), "Anthropic HH-RLHF: {chosen, rejected} Human/Assistant transcripts"),
        _make("gsm8k", ("rl",), "GSM8K: {question, answer: '... #### 72'}"),
        _make("math", ("rl",), "MATH: {problem, solution with \\boxed{}, level?, type?}"),
        _make("verl", ("rl",), "verl: {data_source, prompt: messages, reward_model: {style, ground_truth, tests?}}"),
        _make("humaneval", ("rl",), "HumanEval: {task_id?, prompt, canonical_solution, test?, entry_point?}"),
    )
}


def get_adapter(name: str) -> Adapter:
    """The adapter called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(ADAPTERS)}") from None


__all__ = ["ADAPTERS", "Adapter", "get_adapter"]
