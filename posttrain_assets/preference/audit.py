"""Preference length-confound and tie audit: what the statistics mean, the thresholds and the judging, the drop
reasons of the balanced set, and the presentation (no Dagster, no DuckDB).

Annotators (human and AI) tend to prefer the longer answer, so a preference set whose chosen side is simply
the longer side teaches verbosity. The audit measures that per source, per source kind and overall, says
which groups break the thresholds, and subsamples offending sources into a length-balanced set; both run as
set-based DuckDB SQL in :mod:`posttrain_assets.preference.audit_sql`.

A *pair* is a row with ``id``, ``source``, ``source_kind``, ``chosen_tokens``, ``rejected_tokens`` (counted with
the project tokenizer), ``is_tie`` and optional ``score_chosen``/``score_rejected``.
``d = chosen_tokens - rejected_tokens`` throughout.

Definitions (each one also in the docstring of the :class:`LengthAudit` field it fills):

- **chosen_longer_share**: share of pairs whose chosen side has more tokens, pairs of *equal* token length
  counting one half. With that convention the share is 0.5 when length carries no signal, is symmetric
  (share of "rejected longer" = 1 - share) and equals the paired AUC below. Its 95% interval is Wilson's
  score interval on that proportion (with ``n`` = all pairs).
- **length_auc** (paired): P(chosen longer than its own rejected), ties one half -- identical to the share by
  construction. This is the comparison a pairwise reward model or DPO actually sees.
  **length_auc_unpaired** (kept alongside): the classic Mann-Whitney AUC of all chosen lengths against all
  rejected lengths of the group, P(chosen_i > rejected_j) over every i, j, ties one half. It ignores which
  responses belong together, so the spread of lengths *between* prompts (some prompts get long answers on
  both sides) dilutes it towards 0.5: it answers "are chosen responses longer in distribution", not "is the
  longer side of a pair the chosen one".
- **point_biserial_r**: Pearson correlation between the label and the length difference over the
  *symmetrised* sample, where each pair contributes both orientations (d, 1) and (-d, 0). Symmetrising is the
  expectation over presenting each pair in a random order, so no arbitrary "first/second" order enters. The
  symmetrised sample has mean 0 for x and p = q = 1/2 for the label, so the formula reduces to
  ``r = mean(d) / sqrt(mean(d**2))``: 0 when length carries no signal (mean difference 0), exactly +1 when
  chosen is always longer by the same amount and ``1 / sqrt(1 + cv**2)`` when by variable amounts (e.g. d
  uniform on 1..100 gives 0.87); -1 mirrors that. Unlike the share it weighs *how much* longer: a source whose
  chosen-longer pairs differ by 300 tokens and chosen-shorter ones by 10 has share 0.5 but r well above 0.
  Equal-length pairs add 0 to both sums. It is outlier-sensitive (a few very long responses move it), so the
  robust **rank_biserial_r** is kept alongside: the matched-pairs rank-biserial correlation (effect size of
  Wilcoxon's signed-rank test), ``(T+ - T-) / (T+ + T-)`` with T+/T- the sums of the mid-ranks of ``|d|``
  over pairs with d > 0 / d < 0 (d = 0 excluded); it is 0 with no signal and exactly +-1 when chosen is
  always longer / shorter, whatever the amounts. The gate uses point_biserial_r.
- **length ratios**: ``chosen_tokens / rejected_tokens`` per pair; a zero denominator is taken as 1 token
  and 0/0 as 1.0 (silver has no empty responses, so this only guards hand-made input). The mean is DuckDB's
  ``fsum`` (compensated summation) of the ratios in ascending order over the count: a fixed order, so the figure
  does not depend on how DuckDB splits the scan across threads.
- **medians and quantiles**: DuckDB's ``median`` and ``quantile_cont`` (linear interpolation between the two
  nearest values, Hyndman-Fan type 7, numpy's default), keys ``p10 p25 p75 p90``; they may differ from numpy's
  in the last bit of a double.
- **tie**: the pair's stored ``is_tie`` (the silver.preference_pairs column, computed once per pair by
  :func:`posttrain_assets.preference.pairs.pair_batch` with the project's one tie rule,
  :func:`posttrain_assets.text.is_tie`, at ``LengthConfoundConfig.tie_similarity``): chosen and rejected are
  identical or near-identical text after :func:`posttrain_assets.text.fold_bare` (NFKC, casefold, whitespace
  runs collapsed to one space, punctuation and whitespace stripped at both ends): the folded texts are equal,
  or their character-level indel similarity ``2 * LCS(a, b) / (len(a) + len(b))``
  (:func:`posttrain_assets.text.text_similarity`; LCS = longest common subsequence) is >= ``tie_similarity``
  (default 0.95). The audit, the balancing and the length-confound checks read the flag, never the texts, so
  they judge ties exactly as the pairs were measured. ``tie_rate`` = ties / pairs.
- **score statistics**: over pairs where both scores are present and finite (``scored_pairs``); a score tie
  is ``|score_chosen - score_rejected| <= 1e-9``; margins are ``score_chosen - score_rejected`` (mean as for the
  length ratios).

The figures are computed by :func:`posttrain_assets.preference.audit_sql.audit_relation` (set-based DuckDB SQL
over a pairs table); this module holds the definitions, the thresholds, the judging and the presentation.

Judging (:func:`confound_violations`): only groups of the kinds in ``ConfoundThresholds.judge_group_kinds``
(default: ``source``) with at least ``min_pairs`` pairs are judged; source kinds and the overall group are
reported only. The action is per source (a source is balanced or dropped), and when every source passes so do
their mixtures: a mixture's share and tie rate are weighted means of the sources', and its r satisfies
``|sum w_s m_s| <= 0.2 * sum w_s rms_s <= 0.2 * sqrt(sum w_s rms_s**2)`` (Jensen), so judging kinds/overall
would only repeat the source verdicts, except through small unjudged sources.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% standard normal quantile
QUANTILES = (("p10", 0.10), ("p25", 0.25), ("p75", 0.75), ("p90", 0.90))
SCORE_TIE_TOLERANCE = 1e-9  # |score_chosen - score_rejected| at or below this is a score tie

GroupKey = tuple[str, str]  # (group kind, group name), e.g. ("source", "hh_rlhf_harmless"), ("overall", "all")

# ---------------------------------------------------------------------------------------------------------------
# the interval
# ---------------------------------------------------------------------------------------------------------------


def wilson_interval(p_hat: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval (default 95%) of a proportion ``p_hat`` observed over ``n`` trials.

    ``(0.0, 1.0)`` when ``n`` is 0. ``p_hat`` may come from fractional successes (ties counted one half).
    """
    if n <= 0:
        return 0.0, 1.0
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p_hat + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p_hat * (1.0 - p_hat) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class LengthAudit:
    """Length-confound and tie statistics of one group of preference pairs (see the module docstring)."""

    pairs: int  # number of pairs in the group
    chosen_longer_pairs: int  # pairs whose chosen side has more tokens
    equal_length_pairs: int  # pairs whose two sides have the same number of tokens
    chosen_longer_share: float  # (chosen_longer_pairs + equal_length_pairs / 2) / pairs
    share_ci_low: float  # Wilson 95% interval of chosen_longer_share, low end
    share_ci_high: float  # Wilson 95% interval of chosen_longer_share, high end
    mean_chosen_tokens: float  # mean tokens of the chosen responses
    mean_rejected_tokens: float  # mean tokens of the rejected responses
    mean_length_ratio: float  # mean of chosen_tokens / rejected_tokens
    median_length_ratio: float  # median of chosen_tokens / rejected_tokens
    length_diff_mean: float  # mean of d = chosen_tokens - rejected_tokens
    length_diff_median: float  # median of d
    length_diff_quantiles: dict[str, float]  # p10, p25, p75, p90 of d
    length_auc: float  # paired AUC: P(chosen longer than its rejected), ties half (== chosen_longer_share)
    length_auc_unpaired: float  # Mann-Whitney AUC of all chosen lengths vs all rejected lengths, ties half
    point_biserial_r: float  # r of label vs d over both orientations of every pair: mean(d) / rms(d)
    rank_biserial_r: float  # matched-pairs rank-biserial r of d (robust companion of point_biserial_r)
    tie_pairs: int  # pairs whose chosen and rejected texts are (near-)identical
    tie_rate: float  # tie_pairs / pairs
    scored_pairs: int  # pairs with both scores present and finite
    score_tie_rate: float | None  # share of scored pairs with equal scores; None without scored pairs
    score_margin_mean: float | None  # mean of score_chosen - score_rejected over scored pairs
    score_margin_median: float | None  # median of the score margin
    score_margin_quantiles: dict[str, float] = field(default_factory=dict)  # p10, p25, p75, p90 of the margin

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain Python values (for Dagster metadata or JSON)."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# judging
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfoundThresholds:
    """Bounds a judged group must stay within, and which groups are judged.

    ``share_low``/``share_high`` bound chosen_longer_share, ``max_abs_r`` bounds |point_biserial_r|,
    ``max_tie_rate`` bounds tie_rate; groups with fewer than ``min_pairs`` pairs are reported but not judged.
    ``judge_group_kinds`` are the group kinds judged (others are reported only). Ties are the pairs' stored
    ``is_tie`` (see the module docstring), so there is no tie similarity here.
    """

    share_low: float = 0.35
    share_high: float = 0.65
    max_abs_r: float = 0.2
    max_tie_rate: float = 0.01
    min_pairs: int = 50
    judge_group_kinds: tuple[str, ...] = ("source",)


def _bound(x: float) -> str:
    """A threshold for messages: two decimals when exact (0.35, 0.01), else as short as exact (0.005)."""
    return f"{x:.2f}" if round(x, 2) == x else f"{x:g}"


@dataclass(frozen=True)
class Violation:
    """One statistic of one judged group outside its bound ``(low, high)``."""

    group_kind: str  # "source" (or another judged kind)
    group: str  # the group's name, e.g. the source name
    statistic: str  # chosen_longer_share | point_biserial_r | tie_rate
    value: float  # the group's value of the statistic
    bound: tuple[float, float]  # the allowed closed interval
    pairs: int = 0  # the group's number of pairs

    def __str__(self) -> str:
        low, high = self.bound
        return (
            f"{self.group_kind} {self.group}: {self.statistic} = {self.value:.3f} "
            f"outside [{_bound(low)}, {_bound(high)}] (n={self.pairs})"
        )


def group_violations(
    group_kind: str, group: str, result: LengthAudit, thresholds: ConfoundThresholds
) -> list[Violation]:
    """The violations of one group, whatever its kind (``[]`` when it has fewer than ``min_pairs`` pairs)."""
    if result.pairs < thresholds.min_pairs:
        return []
    checks = (
        ("chosen_longer_share", result.chosen_longer_share, (thresholds.share_low, thresholds.share_high)),
        ("point_biserial_r", result.point_biserial_r, (-thresholds.max_abs_r, thresholds.max_abs_r)),
        ("tie_rate", result.tie_rate, (0.0, thresholds.max_tie_rate)),
    )
    return [
        Violation(group_kind, group, name, value, bound, result.pairs)
        for name, value, bound in checks
        if not bound[0] <= value <= bound[1]
    ]


def confound_violations(
    audits: Mapping[GroupKey, LengthAudit], thresholds: ConfoundThresholds | None = None
) -> list[Violation]:
    """Violations of every judged group (kinds in ``thresholds.judge_group_kinds``, >= ``min_pairs`` pairs)."""
    thresholds = thresholds or ConfoundThresholds()
    found: list[Violation] = []
    for (kind, name), result in audits.items():
        if kind in thresholds.judge_group_kinds:
            found.extend(group_violations(kind, name, result, thresholds))
    return found


# ---------------------------------------------------------------------------------------------------------------
# balancing
# ---------------------------------------------------------------------------------------------------------------

DROP_REASONS = {
    "tie": "chosen and rejected are (near-)identical text: the pair carries no preference",
    "length_balance": "dropped from a length-confounded source to equalise chosen-longer and chosen-shorter pairs",
    "cannot_balance": "the source cannot be balanced into at least min_pairs pairs that pass: dropped whole",
    "low_margin": "the score margin (score_chosen - score_rejected) is below min_score_margin: too close to call",
    "annotator_disagreement": "the pair's annotators disagree: fewer than min_pair_agreement of them prefer the "
    "chosen side",
}


# ---------------------------------------------------------------------------------------------------------------
# presentation
# ---------------------------------------------------------------------------------------------------------------


def histogram_png(
    chosen: tuple[np.ndarray, np.ndarray],
    rejected: tuple[np.ndarray, np.ndarray],
    cap: float | None,
    title: str,
    width: int = 640,
    height: int = 360,
) -> bytes:
    """Overlaid histograms of chosen and rejected lengths (tokens) as a ``width`` x ``height`` PNG, from each side's
    distinct lengths and their counts: 40 shared bins from 0 to ``cap`` (the 99th percentile of all lengths; None:
    no pairs), longer responses counted in the last bin (the x label says so). Counting distinct lengths with
    weights puts every response in the same bin as counting each response, so the caller sends a few thousand
    (length, count) rows whatever the number of pairs. Uses matplotlib's Agg canvas directly (no pyplot, no global
    state), imported lazily."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if cap is not None:
        bins = np.linspace(0.0, cap, 41)
        for (values, counts), label in ((chosen, "chosen"), (rejected, "rejected")):
            n = int(counts.sum())
            ax.hist(np.minimum(values, cap), bins=bins, weights=counts, alpha=0.55, label=f"{label} (n={n})")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_xlabel(f"tokens (longer than p99 = {cap:.0f} counted in the last bin)", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no pairs", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("tokens", fontsize=8)
    ax.set_ylabel("responses", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _fmt(value: float | None, digits: int = 3) -> str:
    """A number for the table, or an em dash for None."""
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_audit_table(audits: Mapping[GroupKey, LengthAudit]) -> str:
    """A Markdown table, one row per group, with the main statistics (for the Dagster UI)."""
    header = (
        "| group | pairs | chosen longer (95% CI) | unpaired AUC | r (point-biserial) | r (rank) | ratio mean/median "
        "| Δ tokens median [p10, p90] | tie rate | scored | score tie rate | score margin median |"
    )
    lines = [header, "|" + "---|" * 12]
    for (kind, name), a in audits.items():
        q = a.length_diff_quantiles
        lines.append(
            f"| {kind} `{name}` | {a.pairs} | {a.chosen_longer_share:.3f} ({a.share_ci_low:.3f}–{a.share_ci_high:.3f}) "
            f"| {a.length_auc_unpaired:.3f} | {a.point_biserial_r:.3f} | {a.rank_biserial_r:.3f} "
            f"| {a.mean_length_ratio:.2f} / {a.median_length_ratio:.2f} "
            f"| {a.length_diff_median:g} [{q.get('p10', 0.0):g}, {q.get('p90', 0.0):g}] | {a.tie_rate:.4f} "
            f"| {a.scored_pairs} | {_fmt(a.score_tie_rate)} | {_fmt(a.score_margin_median)} |"
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "DROP_REASONS",
    "ConfoundThresholds",
    "LengthAudit",
    "Violation",
    "confound_violations",
    "group_violations",
    "histogram_png",
    "markdown_audit_table",
    "wilson_interval",
]
