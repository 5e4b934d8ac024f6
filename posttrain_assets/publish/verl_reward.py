"""verl custom reward function for a posttrain-assets RL export; the export ships this file as ``rl/reward.py``.

It scores a response with posttrain-assets' own verifier for the row (``extra_info.verifier``: exact_match,
numeric, math, python_eval in its sandbox) at the version that certified the row (``extra_info.verifier_version``),
so the rewards a policy trains on are the verdicts that certified its prompts. Where the verifier installed here
has another version, it raises instead of scoring by other rules. posttrain-assets must be importable where verl
computes rewards (install the checkout that wrote the export).

verl config (this file's path and function name)::

    reward.custom_reward_function.path=<export folder>/rl/reward.py
    reward.custom_reward_function.name=compute_score

verl before 0.7 reads the same two keys without the ``reward.`` prefix (later versions still accept them there).
"""

from __future__ import annotations

from typing import Any

try:
    from posttrain_assets.rl.verifiers import VERIFIER_VERSIONS, score
except ImportError as missing:  # the message verl shows when it loads this file
    raise ImportError(
        "reward.py scores with posttrain-assets' verifiers: install posttrain-assets (the checkout that wrote this "
        "export) in the environment where verl computes rewards"
    ) from missing


class VerifierVersionMismatch(RuntimeError):
    """The row was certified by another version of its verifier than the one installed here."""


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """verl's custom reward signature: 1.0 when the row's verifier accepts ``solution_str`` against
    ``ground_truth``, else 0.0.

    ``extra_info`` is the exported row's: ``verifier`` and ``verifier_version`` name the verifier, and ``tests``
    (python_eval) the asserts the solution is run against. verl's own keyword arguments (``kwargs``) are not used.
    Raises ``ValueError`` for a row that names no verifier (not from this export) and
    :class:`VerifierVersionMismatch` when the installed verifier's version is not the certifying one.
    """
    info = extra_info or {}
    verifier, certified = info.get("verifier"), info.get("verifier_version")
    if not verifier:
        raise ValueError(f"extra_info names no verifier (data_source {data_source!r}): not a posttrain-assets RL row")
    installed = VERIFIER_VERSIONS.get(verifier)
    if installed != certified:
        raise VerifierVersionMismatch(
            f"row {info.get('id')} was certified by {verifier} version {certified}, but this environment has "
            f"version {installed}: install the posttrain-assets that certified it, or re-certify and re-export"
        )
    return score(verifier, solution_str, ground_truth, tests=info.get("tests")).value
