"""Who labelled a preference pair: the judge, the models that wrote the responses, per-aspect ratings and, where
several annotators rated a pair, each one's scores. Read from the landing row by the preference adapters and
carried to silver and gold as the ``annotations`` column (where the judge-bias audit and the inter-annotator
agreement of :mod:`posttrain_assets.preference.labelling` read them). No Dagster imports here.

Optional row fields every preference format accepts (absent or null: not known):

- ``judge`` (string): who rated the pair, e.g. ``"gpt-4"`` or ``"human"``;
- ``chosen_model`` / ``rejected_model`` (strings): the models that wrote the two responses;
- ``chosen_ratings`` / ``rejected_ratings`` (objects): aspect -> rating, a number or a numeric string, or an
  UltraFeedback annotation object ``{"Rating": "4", ...}``; ``"N/A"`` ratings are left out;
- ``ratings`` (list): one ``{"rater": str, "chosen": number, "rejected": number}`` per annotator who scored both
  responses.

UltraFeedback's own layout (openbmb/UltraFeedback: an instruction and its rated completions) is binarised by
:func:`binarize_completions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from posttrain_assets.records.schema import RecordError, non_empty, require

# The judge of UltraFeedback's own ratings (Cui et al., 2023: GPT-4 rated every completion on four aspects); a
# row's ``judge`` field overrides it.
ULTRAFEEDBACK_JUDGE = "gpt-4"
NOT_RATED = ("N/A", "n/a", "")


@dataclass(frozen=True)
class RaterScores:
    """One annotator's scores of both responses of a pair."""

    rater: str
    chosen: float
    rejected: float


@dataclass(frozen=True)
class PairAnnotations:
    """Who labelled one preference pair (None / empty where the row does not say; see the module docstring)."""

    judge: str | None = None
    chosen_model: str | None = None
    rejected_model: str | None = None
    chosen_ratings: tuple[tuple[str, float], ...] = ()  # (aspect, rating) of the chosen response
    rejected_ratings: tuple[tuple[str, float], ...] = ()  # (aspect, rating) of the rejected response
    rater_scores: tuple[RaterScores, ...] = ()  # one per annotator who scored both responses

    def as_row(self) -> dict[str, Any]:
        """The ``annotations`` column's value: every field present, empty lists as null."""

        def ratings(items: tuple[tuple[str, float], ...]) -> list[dict[str, Any]] | None:
            return [{"aspect": aspect, "rating": rating} for aspect, rating in items] or None

        return {
            "judge": self.judge,
            "chosen_model": self.chosen_model,
            "rejected_model": self.rejected_model,
            "chosen_ratings": ratings(self.chosen_ratings),
            "rejected_ratings": ratings(self.rejected_ratings),
            "rater_scores": [{"rater": r.rater, "chosen": r.chosen, "rejected": r.rejected} for r in self.rater_scores]
            or None,
        }


def _text(row: dict[str, Any], key: str, where: str) -> str | None:
    """An optional string field; blank counts as absent."""
    if row.get(key) is None:
        return None
    value = require(row, key, path=where)
    return value if value.strip() else None


def _rating(value: Any, where: str) -> float | None:
    """A rating: a finite number, a numeric string, or an annotation object's ``Rating``; None when not rated."""
    if isinstance(value, dict):
        value = value.get("Rating", value.get("rating"))
        where = f"{where}.Rating"
    if value is None or (isinstance(value, str) and value.strip() in NOT_RATED):
        return None
    if isinstance(value, bool):
        raise RecordError("wrong_type", where, f"{where} must be a number, got bool")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RecordError("wrong_type", where, f"{where} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError("wrong_type", where, f"{where} must be a finite number")
    return float(value)


def aspect_ratings(value: Any, where: str) -> tuple[tuple[str, float], ...]:
    """``{aspect: rating}`` -> ((aspect, rating), ...) in the row's order, unrated aspects left out."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RecordError("wrong_type", where, f"{where} must be an object of aspect -> rating")
    out = []
    for aspect, raw in value.items():
        rating = _rating(raw, f"{where}.{aspect}")
        if rating is not None:
            out.append((str(aspect), rating))
    return tuple(out)


def rater_scores(value: Any, where: str = "ratings") -> tuple[RaterScores, ...]:
    """A ``ratings`` list: one ``{rater, chosen, rejected}`` per annotator."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RecordError("wrong_type", where, f"{where} must be a list of {{rater, chosen, rejected}}")
    out = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise RecordError("wrong_type", at, f"{at} must be an object with rater, chosen and rejected")
        rater = non_empty(require(item, "rater", path=f"{at}.rater"), f"{at}.rater")
        scores = []
        for side in ("chosen", "rejected"):
            if item.get(side) is None:
                raise RecordError("missing_field", f"{at}.{side}", f"field {at}.{side!r} is required")
            scores.append(_rating(item[side], f"{at}.{side}"))
        if scores[0] is not None and scores[1] is not None:
            out.append(RaterScores(rater, scores[0], scores[1]))
    return tuple(out)


def pair_annotations(row: dict[str, Any], **known: Any) -> PairAnnotations | None:
    """The row's optional labelling fields (module docstring) over what the adapter already ``known``s (keyword
    arguments named like :class:`PairAnnotations`' fields; a row field that is present wins); None when nothing
    is known."""
    fields: dict[str, Any] = dict(known)
    for key in ("judge", "chosen_model", "rejected_model"):
        value = _text(row, key, key)
        if value is not None:
            fields[key] = value
    for key in ("chosen_ratings", "rejected_ratings"):
        ratings = aspect_ratings(row.get(key), key)
        if ratings:
            fields[key] = ratings
    scores = rater_scores(row.get("ratings"))
    if scores:
        fields["rater_scores"] = scores
    annotations = PairAnnotations(**fields)
    return annotations if annotations != PairAnnotations() else None


@dataclass(frozen=True)
class BinarizedPair:
    """A pair picked from rated completions (:func:`binarize_completions`)."""

    prompt: str
    chosen: str
    rejected: str
    score_chosen: float
    score_rejected: float
    annotations: PairAnnotations


def binarize_completions(row: dict[str, Any]) -> BinarizedPair:
    """UltraFeedback's layout -> one pair.

    ``{"instruction": str, "completions": [{"model"?: str, "response": str, "annotations": {aspect:
    {"Rating": "1".."5" | "N/A", ...}}}, ...], "judge"?: str}``

    A completion's score is the mean of its rated aspects; completions with a blank response or no rated aspect
    take no part. The chosen response is the highest-scoring completion and the rejected one the lowest-scoring of
    the others (the earlier completion wins ties), so the pair carries the widest margin the row offers. Fewer
    than two rated completions is ``missing_field`` on ``completions``. The judge is the row's ``judge``, else
    :data:`ULTRAFEEDBACK_JUDGE`; both models and both responses' aspect ratings are kept.
    """
    prompt = non_empty(require(row, "instruction"), "instruction")
    completions = require(row, "completions", list)
    rated: list[tuple[int, float, str, str | None, tuple[tuple[str, float], ...]]] = []
    for i, completion in enumerate(completions):
        at = f"completions[{i}]"
        if not isinstance(completion, dict):
            raise RecordError("wrong_type", at, f"{at} must be an object with response and annotations")
        response = require(completion, "response", path=f"{at}.response")
        model = _text(completion, "model", f"{at}.model")
        ratings = aspect_ratings(completion.get("annotations"), f"{at}.annotations")
        if response.strip() and ratings:
            rated.append((i, sum(r for _, r in ratings) / len(ratings), response, model, ratings))
    if len(rated) < 2:
        raise RecordError(
            "missing_field", "completions", f"{len(rated)} completion(s) with a response and a rating, need two"
        )
    best = min(rated, key=lambda c: (-c[1], c[0]))
    worst = min((c for c in rated if c is not best), key=lambda c: (c[1], c[0]))
    annotations = PairAnnotations(
        judge=_text(row, "judge", "judge") or ULTRAFEEDBACK_JUDGE,
        chosen_model=best[3],
        rejected_model=worst[3],
        chosen_ratings=best[4],
        rejected_ratings=worst[4],
    )
    return BinarizedPair(prompt, best[2], worst[2], best[1], worst[1], annotations)


__all__ = [
    "ULTRAFEEDBACK_JUDGE",
    "BinarizedPair",
    "PairAnnotations",
    "RaterScores",
    "aspect_ratings",
    "binarize_completions",
    "pair_annotations",
    "rater_scores",
]
