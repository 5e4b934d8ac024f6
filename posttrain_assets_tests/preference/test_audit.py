"""The preference length-confound and tie audit (posttrain_assets.preference.audit, computed by
audit_sql.audit_relation): hand-computed statistics, judging, the PNG histogram, and a worked example on the real
HH-RLHF harmless test set. The balancing is tested in test_audit_sql.py."""

from __future__ import annotations

import gzip
import io
import json
import math
from typing import Any

import duckdb
import numpy as np
import pytest

from posttrain_assets.preference.audit import (
    ConfoundThresholds,
    GroupKey,
    LengthAudit,
    Violation,
    confound_violations,
    histogram_png,
    markdown_audit_table,
    wilson_interval,
)
from posttrain_assets.preference.audit_sql import audit_relation
from posttrain_assets.records.formats import get_adapter
from posttrain_assets.records.schema import RecordError
from posttrain_assets.text import is_tie
from posttrain_assets_tests.preference.test_labelling import pairs_table
from posttrain_assets_tests.real_data import REAL_DATA

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pair(
    id_: str,
    chosen_tokens: int,
    rejected_tokens: int,
    *,
    source: str = "src",
    kind: str = "human",
    chosen: str | None = None,
    rejected: str | None = None,
    score_chosen: float | None = None,
    score_rejected: float | None = None,
) -> dict[str, Any]:
    """A preference pair as silver.preference_pairs holds it, with ``is_tie`` flagged by the project's tie rule from
    the texts (which default to clearly different strings), as the preference stage flags it."""
    chosen = chosen if chosen is not None else f"the chosen answer, number {id_}"
    rejected = rejected if rejected is not None else f"a rejected reply #{id_} that says something else"
    return {
        "id": id_,
        "source": source,
        "source_kind": kind,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_tokens": chosen_tokens,
        "rejected_tokens": rejected_tokens,
        "is_tie": is_tie(chosen, rejected),
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


def table_of(pairs: list[dict[str, Any]]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the pairs in the table ``pairs`` (the columns of silver.preference_pairs the
    preference code reads; those a pair lacks are null)."""
    conn = duckdb.connect()
    pairs_table(conn, pairs)
    return conn


def audit(
    pairs: list[dict[str, Any]], group_keys: tuple[str, ...] = ("source", "source_kind")
) -> dict[GroupKey, LengthAudit]:
    """audit_relation of the pairs."""
    return audit_relation(table_of(pairs), "SELECT * FROM pairs", group_keys)


def audit_group(pairs: list[dict[str, Any]]) -> LengthAudit:
    """The audit of the pairs as one group."""
    return audit(pairs, ())[("overall", "all")]


def diffs(*values: int) -> list[dict[str, Any]]:
    """Pairs with these length differences (chosen 1000 + d tokens, rejected 1000)."""
    return [pair(f"d{i}", 1000 + d, 1000) for i, d in enumerate(values)]


# Four pairs, (chosen_tokens, rejected_tokens) = (10, 5), (6, 6), (4, 8), (20, 10): d = 5, 0, -4, 10.
HAND = [
    pair("a", 10, 5, chosen="Hello, World!", rejected="  hello world ", score_chosen=8.0, score_rejected=6.5),
    pair("b", 6, 6, chosen="ＳＴＲＡＳＳＥ", rejected="Straße.", score_chosen=7.0, score_rejected=7.0),
    pair("c", 4, 8, chosen="Yes, absolutely.", rejected="No.", score_chosen=None, score_rejected=3.0),
    pair("d", 20, 10, chosen="A long and careful answer", rejected="short", score_chosen=9.0, score_rejected=4.0),
]


# ---------------------------------------------------------------------------------------------------------------
# hand-computed statistics
# ---------------------------------------------------------------------------------------------------------------


def test_share_counts_equal_lengths_as_half_and_equals_the_paired_auc() -> None:
    a = audit_group(HAND)
    # d = 5, 0, -4, 10: 2 chosen longer, 1 equal -> (2 + 0.5) / 4 = 0.625
    assert (a.pairs, a.chosen_longer_pairs, a.equal_length_pairs) == (4, 2, 1)
    assert a.chosen_longer_share == 0.625
    assert a.length_auc == a.chosen_longer_share
    # token means: chosen (10+6+4+20)/4 = 10, rejected (5+6+8+10)/4 = 7.25
    assert (a.mean_chosen_tokens, a.mean_rejected_tokens) == (10.0, 7.25)


def test_wilson_interval_values() -> None:
    # z = 1.959964, z^2 = 3.841459. p = 0.625, n = 4: z^2/n = 0.960365, denominator 1 + 0.960365 = 1.960365;
    # centre = (0.625 + z^2/8 = 0.480182) / 1.960365 = 1.105182 / 1.960365 = 0.563764;
    # half = z / 1.960365 * sqrt(0.625 * 0.375 / 4 + z^2 / 64 = 0.058594 + 0.060023 = 0.118617)
    #      = 0.999790 * 0.344410 = 0.344337 -> [0.219427, 0.908101]
    a = audit_group(HAND)
    assert a.share_ci_low == pytest.approx(0.219427, abs=1e-6)
    assert a.share_ci_high == pytest.approx(0.908101, abs=1e-6)
    # p = 0.5, n = 100: centre 0.5; half = z / 1.038415 * sqrt(0.0025 + 3.841459 / 40000) = 1.887458 * 0.050951
    #                                   = 0.096168 -> [0.403832, 0.596168] (the textbook 0.404-0.596)
    assert wilson_interval(0.5, 100) == pytest.approx((0.403832, 0.596168), abs=1e-6)
    # p = 0.9, n = 300: centre (0.9 + 0.006402) / 1.012805 = 0.894943; half 1.935185 * sqrt(0.0003 + 0.0000107)
    #                 = 1.935185 * 0.017626 = 0.034109 -> [0.860834, 0.929052]
    assert wilson_interval(0.9, 300) == pytest.approx((0.860834, 0.929052), abs=1e-6)
    assert wilson_interval(0.3, 0) == (0.0, 1.0)
    # p = 1, n = 10: centre (1 + 0.192073) / 1.384146 = 0.861234, half 1.416010 * sqrt(0 + 0.0096037) = 0.138766
    #              -> [0.722467, 1.0] (the upper end is exactly 1 for p = 1)
    assert wilson_interval(1.0, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)


def test_length_ratios_and_differences() -> None:
    a = audit_group(HAND)
    # ratios 10/5 = 2, 6/6 = 1, 4/8 = 0.5, 20/10 = 2: mean 5.5 / 4 = 1.375, median of (0.5, 1, 2, 2) = 1.5
    assert a.mean_length_ratio == 1.375
    assert a.median_length_ratio == 1.5
    # d sorted (-4, 0, 5, 10): mean 11 / 4 = 2.75, median (0 + 5) / 2 = 2.5
    assert (a.length_diff_mean, a.length_diff_median) == (2.75, 2.5)
    # linear interpolation at position h = (n - 1) q = 3q over (-4, 0, 5, 10):
    # p10 h=0.3 -> -4 + 0.3*4 = -2.8; p25 h=0.75 -> -4 + 0.75*4 = -1; p75 h=2.25 -> 5 + 0.25*5 = 6.25;
    # p90 h=2.7 -> 5 + 0.7*5 = 8.5
    assert a.length_diff_quantiles == pytest.approx({"p10": -2.8, "p25": -1.0, "p75": 6.25, "p90": 8.5})
    # zero guard: x/0 counts the denominator as 1 token, 0/0 is 1: ratios 7, 1, 0 -> mean 8 / 3, median 1
    zeros = audit_group([pair("x", 7, 0), pair("y", 0, 0), pair("z", 0, 4)])
    assert (zeros.mean_length_ratio, zeros.median_length_ratio) == (8 / 3, 1.0)


def test_unpaired_mann_whitney_auc() -> None:
    a = audit_group(HAND)
    # chosen {10, 6, 4, 20} vs rejected {5, 6, 8, 10}, counting rejected below (+ half of equal) each chosen:
    # 10 -> 5,6,8 + half of 10 = 3.5; 6 -> 5 + half of 6 = 1.5; 4 -> 0; 20 -> 4. (3.5+1.5+0+4) / 16 = 0.5625
    assert a.length_auc_unpaired == 0.5625
    # chosen {1, 2} vs rejected {2, 1}: the same distribution -> (0.5 + 0 + 1 + 0.5) / 4 = 0.5
    assert audit_group([pair("x", 1, 2), pair("y", 2, 1)]).length_auc_unpaired == 0.5
    assert audit_group([pair("x", 5, 1), pair("y", 6, 2)]).length_auc_unpaired == 1.0
    # paired vs unpaired: every chosen is longer than its own rejected by 1, but prompts differ a lot, so across
    # the group chosen lengths are barely above rejected ones: paired 1.0, unpaired
    # chosen {11, 101, 1001} vs rejected {10, 100, 1000}: 11 > 10; 101 > 10, 100; 1001 > all -> 6 / 9
    spread = [pair("x", 11, 10), pair("y", 101, 100), pair("z", 1001, 1000)]
    s = audit_group(spread)
    assert s.length_auc == 1.0
    assert s.length_auc_unpaired == pytest.approx(6 / 9)


def test_point_biserial_r_is_the_symmetrised_correlation() -> None:
    a = audit_group(HAND)
    # mean(d) = 2.75, mean(d^2) = (25 + 0 + 16 + 100) / 4 = 35.25 -> r = 2.75 / sqrt(35.25) = 2.75 / 5.937171 = 0.463184
    assert a.point_biserial_r == pytest.approx(0.463184, abs=1e-6)
    # the same as Pearson's r over the sample of both orientations (d, 1) and (-d, 0)
    d = np.array([5, 0, -4, 10], dtype=float)
    x = np.concatenate([d, -d])
    y = np.concatenate([np.ones(4), np.zeros(4)])
    assert a.point_biserial_r == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    # no signal: differences symmetric around 0 -> 0; always longer by the same amount -> 1; by variable amounts
    # d = 1..100: mean 50.5, mean(d^2) = 101 * 201 / 6 = 3383.5 -> 50.5 / 58.1679 = 0.868177; mirrored -> -1
    assert audit_group(diffs(3, -3, 7, -7, 0)).point_biserial_r == 0.0
    assert audit_group(diffs(4, 4, 4)).point_biserial_r == 1.0
    assert audit_group(diffs(*range(1, 101))).point_biserial_r == pytest.approx(0.868177, abs=1e-6)
    assert audit_group(diffs(-4, -4)).point_biserial_r == -1.0
    assert audit_group(diffs(0, 0)).point_biserial_r == 0.0


def test_rank_biserial_r() -> None:
    # HAND: nonzero d = 5, -4, 10; |d| ranks 4 -> 1, 5 -> 2, 10 -> 3; T+ = 2 + 3 = 5, T- = 1 -> (5 - 1) / 6
    assert audit_group(HAND).rank_biserial_r == pytest.approx(4 / 6)
    # ties in |d| share the mid-rank: d = 2, -2, 5: ranks 1.5, 1.5, 3 -> (4.5 - 1.5) / 6 = 0.5
    assert audit_group(diffs(2, -2, 5)).rank_biserial_r == 0.5
    assert audit_group(diffs(1, 50, 3000)).rank_biserial_r == 1.0  # always longer, whatever the amounts
    assert audit_group(diffs(-1, -50, 0)).rank_biserial_r == -1.0  # d = 0 is left out
    assert audit_group(diffs(0, 0)).rank_biserial_r == 0.0


def test_tie_normalisation_and_rate() -> None:
    # ties compare fold_bare forms: NFKC maps fullwidth to ASCII, casefold maps ß to ss, end punctuation goes
    assert is_tie("ＳＴＲＡＳＳＥ", "Straße.", similarity=1.0)
    assert is_tie("  «Hello,\n\t  world!» ", "hello, world", similarity=1.0)
    # "hello, world" (12 chars) vs "hello world" (11): 11 matching chars -> 2 * 11 / 23 = 0.9565 >= 0.95
    assert is_tie("Hello, World!", "  hello world ")
    assert not is_tie("Hello, World!", "  hello world ", similarity=0.96)
    assert not is_tie("Yes, absolutely.", "No.")
    a = audit_group(HAND)
    # pairs a (similar) and b (normalised equal) are flagged ties: 2 / 4
    assert (a.tie_pairs, a.tie_rate) == (2, 0.5)
    # the audit counts the stored flags: flagged at similarity 0.96, only pair b is a tie
    strict = [{**p, "is_tie": is_tie(p["chosen"], p["rejected"], similarity=0.96)} for p in HAND]
    assert audit_group(strict).tie_rate == 0.25


def test_score_statistics() -> None:
    a = audit_group(HAND)
    # scored pairs: a (8 - 6.5 = 1.5), b (7 - 7 = 0, a tie), d (9 - 4 = 5); c lacks score_chosen
    assert a.scored_pairs == 3
    assert a.score_tie_rate == pytest.approx(1 / 3)
    # margins (0, 1.5, 5): mean 6.5 / 3 = 2.1667, median 1.5; positions h = 2q:
    # p10 h=0.2 -> 0.3; p25 h=0.5 -> 0.75; p75 h=1.5 -> 1.5 + 0.5*3.5 = 3.25; p90 h=1.8 -> 1.5 + 0.8*3.5 = 4.3
    assert a.score_margin_mean == pytest.approx(6.5 / 3)
    assert a.score_margin_median == 1.5
    assert a.score_margin_quantiles == pytest.approx({"p10": 0.3, "p25": 0.75, "p75": 3.25, "p90": 4.3})
    unscored = audit_group([pair("u", 3, 2, score_chosen=float("nan"), score_rejected=1.0), pair("v", 1, 2)])
    assert unscored.scored_pairs == 0
    assert unscored.score_tie_rate is None and unscored.score_margin_mean is None
    assert unscored.score_margin_quantiles == {}


def test_audit_groups_by_source_kind_and_overall() -> None:
    pairs = [
        pair("1", 5, 3, source="s_b", kind="ai"),
        pair("2", 3, 5, source="s_a", kind="human"),
        pair("3", 4, 4, source="s_b", kind="ai"),
    ]
    result = audit(pairs)
    assert list(result) == [
        ("source", "s_a"),
        ("source", "s_b"),
        ("source_kind", "ai"),
        ("source_kind", "human"),
        ("overall", "all"),
    ]
    assert result[("source", "s_b")].chosen_longer_share == 0.75  # (1 + 0.5) / 2
    assert result[("overall", "all")].pairs == 3
    assert audit([]) == {}
    assert list(audit(pairs, group_keys=("source",))) == [("source", "s_a"), ("source", "s_b"), ("overall", "all")]
    assert result[("source", "s_a")].as_dict()["pairs"] == 1


# ---------------------------------------------------------------------------------------------------------------
# judging
# ---------------------------------------------------------------------------------------------------------------


def biased_source(name: str = "demo_pref_ultrafeedback", kind: str = "ai") -> list[dict[str, Any]]:
    """300 pairs: 270 chosen longer by 10 tokens, 30 shorter by 10; the last 6 longer ones are identical texts."""
    pairs = [pair(f"{name}-{i}", 30, 20, source=name, kind=kind) for i in range(270)]
    pairs += [pair(f"{name}-s{i}", 20, 30, source=name, kind=kind) for i in range(30)]
    for p in pairs[264:270]:
        p["rejected"], p["is_tie"] = p["chosen"], True
    return pairs


def test_violations_with_exact_messages() -> None:
    pairs = biased_source() + [pair(f"tiny-{i}", 50, 10, source="tiny", kind="ai") for i in range(10)]
    result = audit(pairs)
    violations = confound_violations(result, ConfoundThresholds())
    # share (270 + 0) / 300 = 0.9; r = mean(d) / rms(d) = (2700 - 300) / 300 / 10 = 0.8; ties 6 / 300 = 0.02.
    # "tiny" (n=10 < 50) and the source_kind / overall groups are not judged.
    assert [str(v) for v in violations] == [
        "source demo_pref_ultrafeedback: chosen_longer_share = 0.900 outside [0.35, 0.65] (n=300)",
        "source demo_pref_ultrafeedback: point_biserial_r = 0.800 outside [-0.20, 0.20] (n=300)",
        "source demo_pref_ultrafeedback: tie_rate = 0.020 outside [0.00, 0.01] (n=300)",
    ]
    assert violations[0] == Violation(
        "source", "demo_pref_ultrafeedback", "chosen_longer_share", 0.9, (0.35, 0.65), 300
    )
    # judging kinds and overall too, when asked
    everything = ConfoundThresholds(judge_group_kinds=("source", "source_kind", "overall"))
    kinds = {(v.group_kind, v.group) for v in confound_violations(result, everything)}
    assert kinds == {("source", "demo_pref_ultrafeedback"), ("source_kind", "ai"), ("overall", "all")}
    # a lower min_pairs judges "tiny" as well; bounds that are not 2-decimal numbers print exactly
    strict = ConfoundThresholds(min_pairs=5, max_tie_rate=0.005)
    messages = [str(v) for v in confound_violations(result, strict)]
    assert "source tiny: chosen_longer_share = 1.000 outside [0.35, 0.65] (n=10)" in messages
    assert "source demo_pref_ultrafeedback: tie_rate = 0.020 outside [0.00, 0.005] (n=300)" in messages


def test_no_violations_when_lengths_carry_no_signal() -> None:
    pairs = [pair(str(i), 20 + i, 20, source="fair") for i in range(1, 51)]
    pairs += [pair(f"n{i}", 20, 20 + i, source="fair") for i in range(1, 51)]
    result = audit(pairs)
    assert result[("source", "fair")].chosen_longer_share == 0.5
    assert result[("source", "fair")].point_biserial_r == 0.0
    assert confound_violations(result) == []


# ---------------------------------------------------------------------------------------------------------------
# presentation
# ---------------------------------------------------------------------------------------------------------------


def value_counts(*values: int) -> tuple[np.ndarray, np.ndarray]:
    distinct, counts = np.unique(np.asarray(values), return_counts=True)
    return distinct, counts


def test_histogram_png() -> None:
    from PIL import Image

    png = histogram_png(value_counts(10, 20, 30, 500), value_counts(5, 15, 25, 35), 480.0, "demo source")
    assert png.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (640, 360)
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    small = histogram_png(empty, empty, None, "empty", width=320, height=200)
    assert small.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(small)) as image:
        assert image.size == (320, 200)


def test_markdown_audit_table() -> None:
    table = markdown_audit_table(audit(HAND))
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 3  # header, rule, source src, source_kind human, overall all
    assert lines[0].startswith("| group | pairs | chosen longer (95% CI) |")
    assert lines[2].startswith("| source `src` | 4 | 0.625 (0.219–0.908) | 0.562 | 0.463 | 0.667 | 1.38 / 1.50 |")
    assert "| 0.5000 | 3 | 0.333 | 1.500 |" in lines[2]


# ---------------------------------------------------------------------------------------------------------------
# real data: Anthropic HH-RLHF harmless-base test split
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hh_harmless_pairs(smollm2_tokenizer: Any) -> list[dict[str, Any]]:
    """The parseable pairs of the HH-RLHF harmless test set, token counts from the default tokenizer."""
    adapter = get_adapter("hh_rlhf")
    pairs = []
    with gzip.open(REAL_DATA / "hh-rlhf/harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as handle:
        for row_number, line in enumerate(handle):
            try:
                record = adapter.parse(json.loads(line), "preference")
            except RecordError:
                continue
            pairs.append(
                {
                    "id": str(row_number),
                    "source": "hh_rlhf_harmless",
                    "source_kind": "human",
                    "chosen": record.chosen,
                    "rejected": record.rejected,
                    "chosen_tokens": len(smollm2_tokenizer(record.chosen, add_special_tokens=False).input_ids),
                    "rejected_tokens": len(smollm2_tokenizer(record.rejected, add_special_tokens=False).input_ids),
                    "is_tie": is_tie(record.chosen, record.rejected),
                }
            )
    return pairs


def test_hh_rlhf_harmless_is_not_length_confounded(hh_harmless_pairs: list[dict[str, Any]]) -> None:
    result = audit(hh_harmless_pairs)
    a = result[("source", "hh_rlhf_harmless")]
    assert a.pairs == 2303
    # 1013 chosen longer, 36 equal length: (1013 + 18) / 2303 = 0.447677 -- harmless answers (refusals) run short
    assert (a.chosen_longer_pairs, a.equal_length_pairs) == (1013, 36)
    assert a.chosen_longer_share == pytest.approx(1031 / 2303)
    assert (a.share_ci_low, a.share_ci_high) == pytest.approx((0.427472, 0.468056), abs=1e-6)
    assert a.length_auc_unpaired == pytest.approx(0.434235, abs=1e-6)
    assert a.point_biserial_r == pytest.approx(-0.184238, abs=1e-6)
    assert a.rank_biserial_r == pytest.approx(-0.204986, abs=1e-6)
    assert (a.length_diff_mean, a.length_diff_median) == pytest.approx((-10.206253, -4.0), abs=1e-6)
    assert (a.mean_length_ratio, a.median_length_ratio) == pytest.approx((1.515140, 0.846154), abs=1e-6)
    # 3 ties, all "You're welcome." vs "You're welcome!" (with either apostrophe): 3 / 2303 = 0.0013
    assert a.tie_pairs == 3 and a.tie_rate == pytest.approx(3 / 2303)
    assert a.scored_pairs == 0 and a.score_tie_rate is None
    assert not math.isnan(a.length_auc)
    assert confound_violations(result, ConfoundThresholds()) == []


# ---------------------------------------------------------------------------------------------------------------
# tie verdicts are the stored flags (the rule itself is tested in test_text.py)
# ---------------------------------------------------------------------------------------------------------------


def test_the_stored_is_tie_decides_not_the_texts() -> None:
    # the audit never reads the texts: a flag the stage set is what counts
    flagged = [{**p, "is_tie": p["id"] == "c"} for p in HAND]
    assert audit_group(flagged).tie_pairs == 1
    assert audit(flagged)[("overall", "all")].tie_pairs == 1
