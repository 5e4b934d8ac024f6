"""Preference length-confound and tie audit: pure statistics over preference pairs (no Dagster, no DuckDB).

Annotators (human and AI) tend to prefer the longer answer, so a preference set whose chosen side is simply
the longer side teaches verbosity. This module measures that per source, per source kind and overall, says
which groups break the thresholds, and subsamples offending sources into a length-balanced set.

A *pair* is a mapping with ``id``, ``source``, ``source_kind``, ``chosen``, ``rejected`` (texts),
``chosen_tokens``, ``rejected_tokens`` (ints, counted by the caller with the project tokenizer) and optional
``score_chosen``/``score_rejected`` (floats or None). ``d = chosen_tokens - rejected_tokens`` throughout.

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
  and 0/0 as 1.0 (silver has no empty responses, so this only guards hand-made input).
- **quantiles**: numpy's default linear interpolation (Hyndman-Fan type 7), keys ``p10 p25 p75 p90``.
- **tie**: the project's one tie rule, :func:`posttrain_assets.text.is_tie`: chosen and rejected are
  identical or near-identical text after :func:`posttrain_assets.text.fold_bare` (NFKC, casefold, whitespace
  runs collapsed to one space, punctuation and whitespace stripped at both ends): the folded texts are equal,
  or their character-level indel similarity ``2 * LCS(a, b) / (len(a) + len(b))``
  (:func:`posttrain_assets.text.text_similarity`; LCS = longest common subsequence) is >= ``tie_similarity``
  (default 0.95, configurable). Equivalently the fewest single-character insertions and deletions turning one
  folded text into the other are at most 5% of their combined length. This is the quantity difflib's
  ``SequenceMatcher.ratio`` (used before) approximates with a quadratic matcher; it is never lower than
  difflib's ratio and equal to it for few, local differences (it gives the same ties on HH-RLHF and on every
  test). ``is_tie`` decides it exactly with rapidfuzz's indel distance and a distance cutoff.
  ``tie_rate`` = ties / pairs. A pair that already carries a
  boolean ``is_tie`` (the silver.preference_pairs column, computed by
  :func:`posttrain_assets.preference.pairs.pair_batch`
  with the same threshold) is trusted by :func:`audit`, :func:`audit_group` and :func:`balance_pairs`; the
  tie test runs only for pairs without one (missing or None).
- **score statistics**: over pairs where both scores are present and finite (``scored_pairs``); a score tie
  is ``|score_chosen - score_rejected| <= 1e-9``; margins are ``score_chosen - score_rejected``.

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
import random
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from posttrain_assets.text import DEFAULT_TIE_SIMILARITY, is_tie

Z_95 = 1.959963984540054  # two-sided 95% standard normal quantile
QUANTILES = (("p10", 0.10), ("p25", 0.25), ("p75", 0.75), ("p90", 0.90))
SCORE_TIE_TOLERANCE = 1e-9  # |score_chosen - score_rejected| at or below this is a score tie

Pair = Mapping[str, Any]
GroupKey = tuple[str, str]  # (group kind, group name), e.g. ("source", "hh_rlhf_harmless"), ("overall", "all")

# ---------------------------------------------------------------------------------------------------------------
# small statistics
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


def length_ratio(chosen_tokens: int, rejected_tokens: int) -> float:
    """``chosen_tokens / rejected_tokens``; a zero denominator counts as 1 token and 0/0 is 1.0."""
    if chosen_tokens == rejected_tokens:
        return 1.0
    return chosen_tokens / max(rejected_tokens, 1)


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """p10, p25, p75, p90 of ``values`` (numpy linear interpolation); empty dict when there are none."""
    if not len(values):
        return {}
    arr = np.asarray(values, dtype=float)
    return {name: float(np.quantile(arr, q)) for name, q in QUANTILES}


def midranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    arr = np.asarray(values, dtype=float)
    order = np.argsort(arr, kind="stable")
    _, inverse, counts = np.unique(arr[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # last 1-based rank of each distinct value
    mean_rank = ends - (counts - 1) / 2.0
    ranks = np.empty(len(arr), dtype=float)
    ranks[order] = mean_rank[inverse]
    return ranks


def mann_whitney_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(x > y) + P(x = y) / 2 for x from ``positives`` and y from ``negatives``, over all cross pairs."""
    n_pos, n_neg = len(positives), len(negatives)
    if not n_pos or not n_neg:
        return 0.5
    ranks = midranks([*positives, *negatives])
    rank_sum = float(ranks[:n_pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def symmetrised_point_biserial(diffs: Sequence[float]) -> float:
    """Point-biserial r of the sample holding (d, 1) and (-d, 0) for every d: ``mean(d) / sqrt(mean(d**2))``.

    0.0 when every d is 0 (no length signal at all).
    """
    if not len(diffs):
        return 0.0
    arr = np.asarray(diffs, dtype=float)
    rms = math.sqrt(float(np.mean(arr * arr)))
    return float(np.mean(arr)) / rms if rms > 0 else 0.0


def rank_biserial(diffs: Sequence[float]) -> float:
    """Matched-pairs rank-biserial correlation of ``diffs``: (T+ - T-) / (T+ + T-) over mid-ranks of |d|, d != 0."""
    nonzero = [d for d in diffs if d != 0]
    if not nonzero:
        return 0.0
    ranks = midranks([abs(d) for d in nonzero])
    t_plus = float(sum(r for r, d in zip(ranks, nonzero, strict=True) if d > 0))
    return (2.0 * t_plus - float(ranks.sum())) / float(ranks.sum())


# ---------------------------------------------------------------------------------------------------------------
# the audit
# ---------------------------------------------------------------------------------------------------------------


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


def _score(value: Any) -> float | None:
    """A score as a finite float, or None when absent, null or not finite."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def pair_is_tie(pair: Pair, tie_similarity: float = DEFAULT_TIE_SIMILARITY) -> bool:
    """The pair's own ``is_tie`` when it carries one (not None), else :func:`is_tie` of its texts."""
    flag = pair.get("is_tie")
    if flag is None:
        return is_tie(pair["chosen"], pair["rejected"], tie_similarity)
    return bool(flag)


def audit_group(pairs: Sequence[Pair], tie_similarity: float = DEFAULT_TIE_SIMILARITY) -> LengthAudit:
    """The :class:`LengthAudit` of one non-empty group of pairs; ``ValueError`` when it is empty."""
    return _audit_group(pairs, [pair_is_tie(p, tie_similarity) for p in pairs])


def _audit_group(pairs: Sequence[Pair], ties_by_pair: Sequence[bool]) -> LengthAudit:
    """:func:`audit_group` with the tie verdict of each pair already known (computed once per pair by audit)."""
    n = len(pairs)
    if n == 0:
        raise ValueError("cannot audit an empty group of pairs")
    chosen = [int(p["chosen_tokens"]) for p in pairs]
    rejected = [int(p["rejected_tokens"]) for p in pairs]
    diffs = [c - r for c, r in zip(chosen, rejected, strict=True)]
    longer = sum(1 for d in diffs if d > 0)
    equal = sum(1 for d in diffs if d == 0)
    share = (longer + 0.5 * equal) / n
    low, high = wilson_interval(share, n)
    ratios = [length_ratio(c, r) for c, r in zip(chosen, rejected, strict=True)]
    ties = sum(1 for tie in ties_by_pair if tie)

    margins: list[float] = []
    for p in pairs:
        sc, sr = _score(p.get("score_chosen")), _score(p.get("score_rejected"))
        if sc is not None and sr is not None:
            margins.append(sc - sr)
    scored = len(margins)
    return LengthAudit(
        pairs=n,
        chosen_longer_pairs=longer,
        equal_length_pairs=equal,
        chosen_longer_share=share,
        share_ci_low=low,
        share_ci_high=high,
        mean_chosen_tokens=statistics.fmean(chosen),
        mean_rejected_tokens=statistics.fmean(rejected),
        mean_length_ratio=statistics.fmean(ratios),
        median_length_ratio=float(statistics.median(ratios)),
        length_diff_mean=statistics.fmean(diffs),
        length_diff_median=float(statistics.median(diffs)),
        length_diff_quantiles=quantiles(diffs),
        length_auc=share,
        length_auc_unpaired=mann_whitney_auc(chosen, rejected),
        point_biserial_r=symmetrised_point_biserial(diffs),
        rank_biserial_r=rank_biserial(diffs),
        tie_pairs=ties,
        tie_rate=ties / n,
        scored_pairs=scored,
        score_tie_rate=(sum(1 for m in margins if abs(m) <= SCORE_TIE_TOLERANCE) / scored) if scored else None,
        score_margin_mean=statistics.fmean(margins) if scored else None,
        score_margin_median=float(statistics.median(margins)) if scored else None,
        score_margin_quantiles=quantiles(margins),
    )


def group_pairs(pairs: Iterable[Pair], group_keys: Sequence[str] = ("source", "source_kind")) -> dict[GroupKey, list]:
    """Pairs by (group kind, group name) for each key of ``group_keys``, plus ``("overall", "all")``.

    Ordered by ``group_keys`` then name, the overall group last.
    """
    groups: dict[GroupKey, list[Pair]] = defaultdict(list)
    overall: list[Pair] = []
    for pair in pairs:
        overall.append(pair)
        for key in group_keys:
            groups[(key, str(pair[key]))].append(pair)
    rank = {key: i for i, key in enumerate(group_keys)}
    ordered = {k: groups[k] for k in sorted(groups, key=lambda k: (rank[k[0]], k[1]))}
    if overall:
        ordered[("overall", "all")] = overall
    return ordered


def audit(
    pairs: Iterable[Pair],
    group_keys: Sequence[str] = ("source", "source_kind"),
    tie_similarity: float = DEFAULT_TIE_SIMILARITY,
) -> dict[GroupKey, LengthAudit]:
    """A :class:`LengthAudit` per group: ``("source", name)``, ``("source_kind", kind)``, ``("overall", "all")``.

    Groups come in the order of :func:`group_pairs`; no pairs at all give an empty dict. The tie verdict is
    taken once per pair (:func:`pair_is_tie`: its ``is_tie`` when present, else computed).
    """
    groups = group_pairs(pairs, group_keys)
    tie_of = {id(p): pair_is_tie(p, tie_similarity) for p in groups.get(("overall", "all"), [])}
    return {key: _audit_group(members, [tie_of[id(p)] for p in members]) for key, members in groups.items()}


# ---------------------------------------------------------------------------------------------------------------
# judging
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfoundThresholds:
    """Bounds a judged group must stay within, and which groups are judged.

    ``share_low``/``share_high`` bound chosen_longer_share, ``max_abs_r`` bounds |point_biserial_r|,
    ``max_tie_rate`` bounds tie_rate; groups with fewer than ``min_pairs`` pairs are reported but not judged.
    ``judge_group_kinds`` are the group kinds judged (others are reported only); ``tie_similarity`` is the
    near-identical threshold of :func:`is_tie` used by :func:`balance_pairs`.
    """

    share_low: float = 0.35
    share_high: float = 0.65
    max_abs_r: float = 0.2
    max_tie_rate: float = 0.01
    min_pairs: int = 50
    judge_group_kinds: tuple[str, ...] = ("source",)
    tie_similarity: float = DEFAULT_TIE_SIMILARITY


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


@dataclass
class BalanceResult:
    """What :func:`balance_pairs` kept and dropped.

    ``kept_ids`` and ``dropped`` (``(id, reason)``, reason one of :data:`DROP_REASONS`) are in input order;
    ``strata`` says per balanced source how |d| was stratified (a number of quantile strata, or ``"exact"``
    for one stratum per distinct |d|), absent for sources left as they were.
    """

    kept_ids: list[str]
    dropped: list[tuple[str, str]]
    strata: dict[str, int | str] = field(default_factory=dict)

    def dropped_counts(self) -> dict[str, int]:
        """Number of dropped pairs per reason."""
        return dropped_counts(self.dropped)


def dropped_counts(dropped: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Number of dropped pairs per reason of ``(id, reason)`` drops, reasons in first-seen order."""
    counts: dict[str, int] = defaultdict(int)
    for _, reason in dropped:
        counts[reason] += 1
    return dict(counts)


def _strata(abs_diffs: Sequence[int], k: int | None) -> list[int | float]:
    """Stratum of each |d|: one of ``k`` quantile strata by mid-rank (equal |d| share one), or |d| itself."""
    if k is None:
        return list(abs_diffs)
    n = len(abs_diffs)
    ranks = midranks(abs_diffs)
    return [min(k - 1, int(k * (r - 0.5) / n)) for r in ranks]


def _balance_source(members: Sequence[Pair], k: int | None, rng: random.Random) -> tuple[list[Pair], list[Pair]]:
    """Keep, in each |d| stratum, as many chosen-longer as chosen-shorter pairs (random ones); equal-length pairs stay.

    Returns (kept, dropped).
    """
    diffs = [int(p["chosen_tokens"]) - int(p["rejected_tokens"]) for p in members]
    nonzero = [i for i, d in enumerate(diffs) if d != 0]
    strata = _strata([abs(diffs[i]) for i in nonzero], k)
    cells: dict[Any, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i, stratum in zip(nonzero, strata, strict=True):
        cells[stratum][0 if diffs[i] > 0 else 1].append(i)
    drop: set[int] = set()
    for stratum in sorted(cells):
        longer, shorter = cells[stratum]
        keep = min(len(longer), len(shorter))
        for side in (longer, shorter):
            if len(side) > keep:
                drop.update(rng.sample(side, len(side) - keep))
    kept = [p for i, p in enumerate(members) if i not in drop]
    dropped = [p for i, p in enumerate(members) if i in drop]
    return kept, dropped


def balance_offending_source(
    source: str, members: Sequence[Pair], thresholds: ConfoundThresholds, seed: int
) -> tuple[dict[str, str], int | str | None]:
    """Step 3 of :func:`balance_pairs` for one source whose remaining pairs (no ties, no excluded pairs; sorted by
    id) break the thresholds: the reason of each pair it drops (``length_balance``, or ``cannot_balance`` for every
    pair) and the stratification used (None when the source cannot be balanced). Reads ``id``, ``chosen_tokens``
    and ``rejected_tokens`` of the members only."""
    distinct = len({abs(int(p["chosen_tokens"]) - int(p["rejected_tokens"])) for p in members})
    k: int | None = 10
    while True:
        if k is not None and k >= distinct:
            k = None
        kept, dropped = _balance_source(members, k, random.Random(f"{seed}:{source}"))
        ok = len(kept) >= thresholds.min_pairs and not group_violations(
            "source", source, _audit_group(kept, [False] * len(kept)), thresholds
        )
        if ok or k is None:
            break
        k *= 2
    if ok:
        return {str(p["id"]): "length_balance" for p in dropped}, "exact" if k is None else k
    return {str(p["id"]): "cannot_balance" for p in members}, None


def balance_pairs(
    pairs: Iterable[Pair],
    thresholds: ConfoundThresholds | None = None,
    seed: int = 0,
    excluded: Mapping[str, str] | None = None,
) -> BalanceResult:
    """Subsample the sources that break the thresholds into a length-balanced set; drop every tie.

    1. Every tie is dropped, reason ``tie``, in every source (:func:`pair_is_tie`: the pair's ``is_tie`` when
       it carries one, else :func:`is_tie` with ``thresholds.tie_similarity``; tested once per pair): a pair
       with the same answer on both sides teaches nothing but noise. Then every other pair whose id is in
       ``excluded`` is dropped with the reason given there (the curation drops of
       :func:`posttrain_assets.preference.labelling.curation_drops`: ``low_margin``, ``annotator_disagreement``),
       so the balancing below works on the pairs that remain.
    2. A source with fewer than ``min_pairs`` remaining pairs, or whose remaining pairs pass, is kept whole.
    3. Otherwise its pairs with d != 0 are stratified by |d| into quantile strata (10, then 20, 40, ... and
       finally one stratum per distinct |d|), and in each stratum a seeded random subset of the larger side
       (chosen-longer or chosen-shorter) is dropped, reason ``length_balance``, until both sides are equal;
       equal-length pairs stay. The share is then exactly 0.5 and |r| shrinks with the strata's width; the
       coarsest stratification that passes is used (it drops the fewest pairs). With one stratum per distinct
       |d| every stratum's mean d is 0, so r is 0 and the source always passes -- unless fewer than
       ``min_pairs`` pairs survive (e.g. chosen is always longer), and then the whole source is dropped,
       reason ``cannot_balance``, rather than kept as an unjudged sliver.

    Deterministic for a given ``seed`` and set of pairs, whatever their order: each source's pairs are sorted
    by id before sampling with a ``random.Random`` seeded by ``f"{seed}:{source}"``. Groups by ``source`` only.
    """
    thresholds = thresholds or ConfoundThresholds()
    pairs = list(pairs)
    reasons: dict[str, str] = {}
    strata_used: dict[str, int | str] = {}
    by_source: dict[str, list[Pair]] = defaultdict(list)
    excluded = excluded or {}
    for pair in pairs:
        pair_id = str(pair["id"])
        if pair_is_tie(pair, thresholds.tie_similarity):
            reasons[pair_id] = "tie"
        elif pair_id in excluded:
            reasons[pair_id] = excluded[pair_id]
        else:
            by_source[str(pair["source"])].append(pair)

    for source, members in by_source.items():
        members = sorted(members, key=lambda p: str(p["id"]))
        if len(members) < thresholds.min_pairs:
            continue
        current = _audit_group(members, [False] * len(members))  # the ties went in step 1
        if not group_violations("source", source, current, thresholds):
            continue
        source_reasons, strata = balance_offending_source(source, members, thresholds, seed)
        reasons.update(source_reasons)
        if strata is not None:
            strata_used[source] = strata

    kept_ids = [str(p["id"]) for p in pairs if str(p["id"]) not in reasons]
    dropped_list = [(str(p["id"]), reasons[str(p["id"])]) for p in pairs if str(p["id"]) in reasons]
    return BalanceResult(kept_ids=kept_ids, dropped=dropped_list, strata=strata_used)


# ---------------------------------------------------------------------------------------------------------------
# presentation
# ---------------------------------------------------------------------------------------------------------------


def length_histogram_png(
    chosen_tokens: Sequence[int], rejected_tokens: Sequence[int], title: str, width: int = 640, height: int = 360
) -> bytes:
    """Overlaid histograms of chosen and rejected lengths (tokens) as a ``width`` x ``height`` PNG.

    Shared bins up to the 99th percentile of all lengths; longer responses are counted in the last bin (the
    x label says so). :func:`histogram_png` draws it.
    """
    both = np.asarray([*chosen_tokens, *rejected_tokens], dtype=float)
    cap = max(float(np.quantile(both, 0.99)), 1.0) if both.size else None
    return histogram_png(
        (np.asarray(chosen_tokens), None), (np.asarray(rejected_tokens), None), cap, title, width, height
    )


def histogram_png(
    chosen: tuple[np.ndarray, np.ndarray | None],
    rejected: tuple[np.ndarray, np.ndarray | None],
    cap: float | None,
    title: str,
    width: int = 640,
    height: int = 360,
) -> bytes:
    """The PNG of :func:`length_histogram_png` from each side's lengths and their counts (``(values, None)``: each
    value once), capped at ``cap`` (None: no lengths). Counting distinct lengths with weights puts every response in
    the same bin as counting each response (the same values meet the same edges), so the caller can send a
    histogram of lengths instead of one length per pair. Uses matplotlib's Agg canvas directly (no pyplot, no
    global state), imported lazily."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if cap is not None:
        bins = np.linspace(0.0, cap, 41)
        for (values, counts), label in ((chosen, "chosen"), (rejected, "rejected")):
            n = len(values) if counts is None else int(counts.sum())
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
    "BalanceResult",
    "ConfoundThresholds",
    "LengthAudit",
    "Violation",
    "audit",
    "audit_group",
    "balance_offending_source",
    "balance_pairs",
    "confound_violations",
    "group_pairs",
    "group_violations",
    "histogram_png",
    "length_histogram_png",
    "markdown_audit_table",
    "pair_is_tie",
    "wilson_interval",
]
