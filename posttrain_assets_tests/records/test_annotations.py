"""Who labelled a pair: the labelling fields the preference adapters keep (posttrain_assets/records/annotations.py)."""

from typing import Any

import pytest

from posttrain_assets.records.annotations import (
    ULTRAFEEDBACK_JUDGE,
    PairAnnotations,
    RaterScores,
    binarize_completions,
)
from posttrain_assets.records.formats import get_adapter
from posttrain_assets.records.schema import RecordError


def completion(model: str, response: str, **ratings: Any) -> dict[str, Any]:
    """An UltraFeedback completion with its aspect annotations ({"Rating": "4", "Rationale": ...})."""
    return {
        "model": model,
        "response": response,
        "annotations": {aspect: {"Rating": str(r), "Rationale": "..."} for aspect, r in ratings.items()},
    }


def uf_row(**overrides: Any) -> dict[str, Any]:
    row = {
        "source": "evol_instruct",
        "instruction": "Name a prime number.",
        "models": ["m-a", "m-b", "m-c", "m-d"],
        "completions": [
            completion("m-a", "Nine.", helpfulness=1, honesty=2, truthfulness=1, instruction_following=2),
            completion("m-b", "Seven is prime.", helpfulness=5, honesty="N/A", truthfulness=5, instruction_following=5),
            completion("m-c", "Two.", helpfulness=4, honesty=4, truthfulness=5, instruction_following=3),
            completion("m-d", "Four.", helpfulness=1, honesty=2, truthfulness=1, instruction_following=2),
        ],
    }
    row.update(overrides)
    return row


def test_ultrafeedback_completions_binarise_best_against_worst_with_models_and_aspects() -> None:
    record = get_adapter("ultrafeedback").parse(uf_row(), "preference")
    assert record.messages == [{"role": "user", "content": "Name a prime number."}]
    assert (record.chosen, record.rejected) == ("Seven is prime.", "Nine.")  # m-d ties m-a at 1.5: the earlier wins
    assert (record.score_chosen, record.score_rejected) == (5.0, 1.5)  # N/A honesty left out of m-b's mean
    assert record.annotations == PairAnnotations(
        judge=ULTRAFEEDBACK_JUDGE,
        chosen_model="m-b",
        rejected_model="m-a",
        chosen_ratings=(("helpfulness", 5.0), ("truthfulness", 5.0), ("instruction_following", 5.0)),
        rejected_ratings=(
            ("helpfulness", 1.0),
            ("honesty", 2.0),
            ("truthfulness", 1.0),
            ("instruction_following", 2.0),
        ),
    )
    assert record.annotations.as_row()["chosen_ratings"][0] == {"aspect": "helpfulness", "rating": 5.0}
    assert record.annotations.as_row()["rater_scores"] is None
    # a row naming its judge overrides the default
    assert binarize_completions(uf_row(judge="gpt-4o")).annotations.judge == "gpt-4o"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"completions": [completion("m", "x", helpfulness=3)]}, ("missing_field", "completions")),
        (
            {"completions": [completion("m", "x", helpfulness="N/A"), completion("n", "  ", helpfulness=4)]},
            ("missing_field", "completions"),
        ),
        ({"completions": [completion("m", "x", helpfulness="lots")]}, ("wrong_type", "completions[0].annotations")),
        ({"completions": ["text"]}, ("wrong_type", "completions[0]")),
        ({"instruction": " "}, ("empty_content", "instruction")),
    ],
)
def test_ultrafeedback_completion_errors(overrides: dict[str, Any], expected: tuple[str, str]) -> None:
    with pytest.raises(RecordError) as caught:
        get_adapter("ultrafeedback").parse(uf_row(**overrides), "preference")
    assert caught.value.reason == expected[0]
    assert caught.value.field.startswith(expected[1])


def test_trl_pairs_keep_judge_models_and_rater_scores() -> None:
    row = {
        "prompt": "Is water wet?",
        "chosen": "Yes, in everyday usage.",
        "rejected": "No.",
        "judge": "human",
        "chosen_model": "model-x",
        "rejected_model": "model-y",
        "ratings": [
            {"rater": "r1", "chosen": 6, "rejected": 2},
            {"rater": "r2", "chosen": "5", "rejected": 5},
            {"rater": "r3", "chosen": "N/A", "rejected": 1},  # not rated: left out
        ],
    }
    annotations = get_adapter("trl_preference").parse(row, "preference").annotations
    assert annotations == PairAnnotations(
        judge="human",
        chosen_model="model-x",
        rejected_model="model-y",
        rater_scores=(RaterScores("r1", 6.0, 2.0), RaterScores("r2", 5.0, 5.0)),
    )
    # without labelling fields there is nothing to keep
    plain = get_adapter("trl_preference").parse({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference")
    assert plain.annotations is None
    # the binarized UltraFeedback layout keeps them too
    binarized = {
        "prompt": "p",
        "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
        "chosen_model": "gpt-4",
        "judge": "gpt-4",
    }
    assert get_adapter("ultrafeedback").parse(binarized, "preference").annotations == PairAnnotations(
        judge="gpt-4", chosen_model="gpt-4"
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"judge": 4}, "judge"),
        ({"ratings": {"r1": 3}}, "ratings"),
        ({"ratings": [{"rater": "r1", "chosen": 3}]}, "ratings[0].rejected"),
        ({"ratings": [{"rater": "r1", "chosen": True, "rejected": 1}]}, "ratings[0].chosen"),
        ({"chosen_ratings": [4]}, "chosen_ratings"),
    ],
)
def test_bad_labelling_fields_quarantine_the_row_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    row = {"prompt": "p", "chosen": "a", "rejected": "b", **overrides}
    with pytest.raises(RecordError) as caught:
        get_adapter("trl_preference").parse(row, "preference")
    assert caught.value.field == field
