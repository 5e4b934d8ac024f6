"""Who labelled the preferences: a judge-bias audit of AI-labelled sources, inter-annotator agreement where several
annotators rated a pair, and the curation drops that follow from the labels (score margin too small, annotators
who disagree). Set-based DuckDB SQL over a pairs relation (silver.preference_pairs or any query with its
columns); numpy and the ``krippendorff`` package for alpha. No Dagster here.

A pairs relation has the columns of silver.preference_pairs that are read here: ``id``, ``source``,
``source_kind``, ``chosen``, ``rejected``, ``chosen_tokens``, ``rejected_tokens``, ``score_margin`` and
``annotations`` (:mod:`posttrain_assets.records.annotations`).

**Judge-bias audit** (:func:`judge_bias_audit`). An AI judge biases a preference set towards its own style. For
every pair of an AI-labelled source (``source_kind = 'ai'``, or a pair that names a judge other than ``human``),
each *feature* is measured on both responses: ``tokens`` (the response's token count) and three style markers,
1 when present and 0 when not (:data:`STYLE_MARKERS`): ``list`` (a line that is a bullet or numbered list item),
``header`` (a Markdown ATX header line) and ``hedge`` (a hedging phrase such as "it depends" or "I'm not sure").
Per stratum --
the whole source, each ``judge`` of it, each ``chosen_model`` (the model whose response was chosen) -- and
feature, with ``d = chosen value - rejected value`` per pair:

- ``chosen_mean`` / ``rejected_mean``: mean of the feature on each side (for a marker: the share of responses that
  have it);
- ``differing_pairs``: pairs with ``d != 0``;
- ``chosen_higher_share``: (pairs with d > 0 + half the pairs with d = 0) / pairs, the convention of the length
  audit's chosen_longer_share: 0.5 when the feature carries no signal, 1.0 when the chosen side always has more;
- ``point_biserial_r``: ``mean(d) / sqrt(mean(d**2))``, the length audit's symmetrised point-biserial r (0 with no
  signal, +-1 when the chosen side always has more / less by the same amount).

**Agreement** (:func:`annotator_agreement`), over the pairs whose ``annotations.rater_scores`` hold two or more
annotators' scores of both responses. A rater's *order* of a pair is the sign of chosen - rejected (+1 agrees with
the label, 0 tie, -1 prefers the rejected side). Per source:

- ``label_agreement``: mean over rated pairs of the pair's agreement with its label, (raters with order +1 + half
  those with 0) / raters;
- ``order_agreement``: mean over rated pairs of the share of rater pairs giving the same order (observed percent
  agreement);
- ``order_alpha``: Krippendorff's alpha of the orders, ordinal (-1 < 0 < +1), units = pairs, each pair counted in
  both presentations (as it is and mirrored, every order negated). Which side a label calls "chosen" is not an
  annotator's choice, and a set labelled by its annotators' majority has nearly every order +1: without the mirror
  alpha would measure that skew, not agreement (the length audit symmetrises its r for the same reason);
- ``rating_alpha``: Krippendorff's alpha of the scores, interval, units = responses (each pair's two);
- ``disagreeing_pairs``: rated pairs whose label agreement is below ``min_pair_agreement``.

Alpha is 1 for perfect agreement, 0 for agreement at chance level, negative below; None when undefined (fewer than
two rated units, or a single value throughout). Computed by the ``krippendorff`` package from value counts per
unit, which DuckDB aggregates, so no rater-by-unit matrix is ever built.

**Curation drops** (:func:`curation_drops_query`): ``low_margin`` for a pair whose ``score_margin`` is below
``min_score_margin`` (pairs without both scores are never dropped for their margin), then
``annotator_disagreement`` for a rated pair whose label agreement is below ``min_pair_agreement`` (when the policy
drops them). :func:`posttrain_assets.preference.audit_sql.balance_relation` takes them (the SELECT of
:func:`curation_drops_query`) as drops of the balanced set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import duckdb
import krippendorff
import numpy as np

# Style markers: RE2 patterns DuckDB's regexp_matches finds anywhere in a response ((?m): ^ at every line start).
STYLE_MARKERS: dict[str, str] = {
    "list": r"(?m)^[ \t]*(?:[-*+•]|\d{1,3}[.)])[ \t]+\S",
    "header": r"(?m)^[ \t]{0,3}#{1,6}[ \t]+\S",
    "hedge": r"(?i)\b(?:it depends|i think|i believe|i'?m not (?:sure|certain)|not entirely sure|it(?:'s| is) "
    r"possible|might be|may be|perhaps|possibly|probably|generally speaking|in most cases|as an ai)\b",
}
FEATURES = ("tokens", *STYLE_MARKERS)
STRATUM_KINDS = ("source", "judge", "chosen_model")
DEFAULT_MIN_PAIR_AGREEMENT = 0.5
DISAGREEMENT_POLICIES = ("drop", "report")


@dataclass(frozen=True)
class JudgeBias:
    """One feature of one stratum of an AI-labelled source (see the module docstring)."""

    source: str
    stratum_kind: str  # source | judge | chosen_model
    stratum: str  # the source's name, the judge, or the chosen response's model
    feature: str  # tokens | list | header | hedge
    pairs: int
    chosen_mean: float
    rejected_mean: float
    differing_pairs: int
    chosen_higher_share: float
    point_biserial_r: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _feature_columns() -> str:
    """Per pair: each style marker of both sides, 0 or 1 (the patterns are bound parameters)."""
    return ",\n".join(
        f"regexp_matches(chosen, ${name})::INTEGER AS c_{name}, regexp_matches(rejected, ${name})::INTEGER AS r_{name}"
        for name in STYLE_MARKERS
    )


def judge_bias_audit(conn: duckdb.DuckDBPyConnection, relation: str) -> list[JudgeBias]:
    """The judge-bias audit of every AI-labelled source of ``relation`` (module docstring), ordered by source,
    stratum kind (source, judge, chosen_model), stratum and feature; one aggregate query."""
    strata = " UNION ALL ".join(
        f"SELECT source, '{kind}' AS stratum_kind, {column} AS stratum, * EXCLUDE (source, judge, chosen_model) "
        f"FROM p WHERE {column} IS NOT NULL"
        for kind, column in zip(STRATUM_KINDS, ("source", "judge", "chosen_model"), strict=True)
    )
    long = " UNION ALL ".join(
        f"SELECT source, stratum_kind, stratum, '{f}' AS feature, {i} AS feature_rank, "
        f"CAST(c_{f} AS DOUBLE) AS c, CAST(r_{f} AS DOUBLE) AS r FROM s"
        for i, f in enumerate(FEATURES)
    )
    rows = conn.execute(
        f"""
        WITH p AS (
            SELECT source, annotations.judge AS judge, annotations.chosen_model AS chosen_model,
                   chosen_tokens AS c_tokens, rejected_tokens AS r_tokens,
                   {_feature_columns()}
            FROM {relation}
            WHERE source_kind = 'ai' OR lower(annotations.judge) <> 'human'
        ),
        s AS ({strata}),
        f AS ({long})
        SELECT source, stratum_kind, stratum, feature, count(*), avg(c), avg(r),
               count(*) FILTER (WHERE c <> r),
               (count(*) FILTER (WHERE c > r) + 0.5 * count(*) FILTER (WHERE c = r)) / count(*),
               coalesce(avg(c - r) / nullif(sqrt(avg((c - r) * (c - r))), 0), 0.0)
        FROM f
        GROUP BY source, stratum_kind, stratum, feature, feature_rank
        ORDER BY source, list_position({list(STRATUM_KINDS)}, stratum_kind), stratum, feature_rank
        """,
        STYLE_MARKERS,
    ).fetchall()
    return [
        JudgeBias(s, k, g, f, n, float(cm), float(rm), int(diff), float(share), float(r))
        for s, k, g, f, n, cm, rm, diff, share, r in rows
    ]


# ---------------------------------------------------------------------------------------------------------------
# agreement
# ---------------------------------------------------------------------------------------------------------------

_VOTES = """
    SELECT p.source, p.id, v.rater, v.chosen, v.rejected, CAST(sign(v.chosen - v.rejected) AS INTEGER) AS vote
    FROM {relation} p, unnest(p.annotations.rater_scores) AS t(v)
    WHERE v.chosen IS NOT NULL AND v.rejected IS NOT NULL
"""
_PER_PAIR = """
    SELECT source, id, count(*) AS n,
           count(*) FILTER (WHERE vote = 1) AS pos, count(*) FILTER (WHERE vote = 0) AS tie,
           count(*) FILTER (WHERE vote = -1) AS neg,
           (count(*) FILTER (WHERE vote = 1) + 0.5 * count(*) FILTER (WHERE vote = 0)) / count(*) AS label_agreement
    FROM votes GROUP BY source, id
"""


@dataclass(frozen=True)
class Agreement:
    """Inter-annotator agreement of one source (see the module docstring)."""

    source: str
    rated_pairs: int  # pairs with scores of two or more annotators
    raters: int  # distinct annotators over those pairs
    ratings: int  # annotator scorings over those pairs
    label_agreement: float  # mean share of a pair's annotators whose order agrees with its label (ties half)
    order_agreement: float  # mean share of a pair's annotator pairs giving the same order
    order_alpha: float | None  # Krippendorff's alpha of the orders (ordinal), units = pairs in both presentations
    rating_alpha: float | None  # Krippendorff's alpha of the scores (interval), units = responses
    disagreeing_pairs: int  # rated pairs whose label agreement is below min_pair_agreement

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def krippendorff_alpha(value_counts: np.ndarray, value_domain: Sequence[float], level: str) -> float | None:
    """Krippendorff's alpha from ``value_counts`` (units x values: how many annotators gave each unit each value of
    ``value_domain``, in that order) at ``level`` (nominal, ordinal, interval, ratio); units with fewer than two
    values are not pairable and left out. None when alpha is undefined (no pairable unit, or one value only)."""
    counts = np.asarray(value_counts, dtype=float)
    counts = counts[counts.sum(axis=1) >= 2] if counts.size else counts
    if counts.shape[0] == 0 or int((counts.sum(axis=0) > 0).sum()) < 2:
        return None
    return float(krippendorff.alpha(value_counts=counts, value_domain=list(value_domain), level_of_measurement=level))


def _counts_by_source(rows: dict[str, np.ndarray], unit: str, value: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per source: (units x values count matrix, sorted value domain) from columns source, unit, value, n."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sources = rows["source"]
    for name in np.unique(sources):
        mask = sources == name
        _, unit_index = np.unique(rows[unit][mask], return_inverse=True)
        domain, value_index = np.unique(rows[value][mask], return_inverse=True)
        matrix = np.zeros((int(unit_index.max()) + 1, len(domain)))
        np.add.at(matrix, (unit_index, value_index), rows["n"][mask])
        out[str(name)] = (matrix, domain)
    return out


def annotator_agreement(
    conn: duckdb.DuckDBPyConnection, relation: str, min_pair_agreement: float = DEFAULT_MIN_PAIR_AGREEMENT
) -> list[Agreement]:
    """:class:`Agreement` of every source of ``relation`` with at least one pair rated by two or more annotators,
    ordered by source."""
    votes = _VOTES.format(relation=relation)
    rated = f"WITH votes AS ({votes}), per_pair AS ({_PER_PAIR}), rated AS (SELECT * FROM per_pair WHERE n >= 2)"
    summary = conn.execute(
        f"""
        {rated}
        SELECT r.source, count(*), sum(r.n),
               -- averaged as DECIMAL: exact sums, so the figure does not depend on the order DuckDB's threads add
               -- the pairs in (a DOUBLE avg differed in its last digits between two runs of the same data)
               avg(r.label_agreement::DECIMAL(38, 18))::DOUBLE,
               avg(((r.pos * (r.pos - 1) + r.tie * (r.tie - 1) + r.neg * (r.neg - 1)) / (r.n * (r.n - 1)))
                   ::DECIMAL(38, 18))::DOUBLE,
               count(*) FILTER (WHERE r.label_agreement < $min_pair_agreement),
               (SELECT count(DISTINCT v.rater) FROM votes v WHERE v.source = r.source
                  AND v.id IN (SELECT id FROM rated WHERE rated.source = r.source))
        FROM rated r GROUP BY r.source ORDER BY r.source
        """,
        {"min_pair_agreement": min_pair_agreement},
    ).fetchall()
    if not summary:
        return []
    orders = conn.execute(
        f"""
        {rated}, rated_votes AS (SELECT v.* FROM votes v SEMI JOIN rated USING (source, id))
        SELECT source, unit, value, count(*) AS n FROM (
            SELECT source, id AS unit, vote AS value FROM rated_votes
            UNION ALL
            SELECT source, id || ':mirrored', -vote FROM rated_votes
        ) GROUP BY ALL
        """
    ).fetchnumpy()
    ratings = conn.execute(
        f"""
        {rated}
        , rated_votes AS (SELECT v.* FROM votes v SEMI JOIN rated USING (source, id))
        SELECT source, unit, value, count(*) AS n FROM (
            SELECT source, id || ':chosen' AS unit, chosen AS value FROM rated_votes
            UNION ALL
            SELECT source, id || ':rejected', rejected FROM rated_votes
        ) GROUP BY ALL
        """
    ).fetchnumpy()
    order_counts = _counts_by_source(orders, "unit", "value")
    rating_counts = _counts_by_source(ratings, "unit", "value")
    return [
        Agreement(
            source=source,
            rated_pairs=int(pairs),
            raters=int(raters),
            ratings=int(n),
            label_agreement=float(label),
            order_agreement=float(order),
            order_alpha=krippendorff_alpha(*order_counts[source], "ordinal"),
            rating_alpha=krippendorff_alpha(*rating_counts[source], "interval"),
            disagreeing_pairs=int(disagreeing),
        )
        for source, pairs, n, label, order, disagreeing, raters in summary
    ]


# ---------------------------------------------------------------------------------------------------------------
# curation drops
# ---------------------------------------------------------------------------------------------------------------


def curation_drops_query(
    relation: str,
    min_score_margin: float | None = None,
    min_pair_agreement: float = DEFAULT_MIN_PAIR_AGREEMENT,
    disagreement_policy: str = "drop",
) -> tuple[str, dict[str, object]]:
    """A SELECT of ``(id, reason)`` for every pair of ``relation`` the labels disqualify, and its named parameters:
    ``low_margin`` (score_margin below ``min_score_margin``; None: no margin filter) before ``annotator_disagreement``
    (two or more annotators, label agreement below ``min_pair_agreement``; only when ``disagreement_policy`` is
    ``drop``)."""
    if disagreement_policy not in DISAGREEMENT_POLICIES:
        raise ValueError(f"disagreement_policy must be one of {DISAGREEMENT_POLICIES}, got {disagreement_policy!r}")
    votes = _VOTES.format(relation=relation)
    query = f"""
        WITH votes AS ({votes}), per_pair AS ({_PER_PAIR})
        SELECT p.id,
               CASE WHEN p.score_margin < $min_score_margin THEN 'low_margin' ELSE 'annotator_disagreement' END
               AS reason
        FROM {relation} p LEFT JOIN per_pair a USING (source, id)
        WHERE p.score_margin < $min_score_margin
           OR ($drop_disagreement AND a.n >= 2 AND a.label_agreement < $min_pair_agreement)
        """
    params: dict[str, object] = {
        "min_score_margin": min_score_margin,
        "min_pair_agreement": min_pair_agreement,
        "drop_disagreement": disagreement_policy == "drop",
    }
    return query, params


__all__ = [
    "DISAGREEMENT_POLICIES",
    "FEATURES",
    "STYLE_MARKERS",
    "Agreement",
    "JudgeBias",
    "annotator_agreement",
    "curation_drops_query",
    "judge_bias_audit",
    "krippendorff_alpha",
]
