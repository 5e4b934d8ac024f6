"""The length audit and the balancing of :mod:`posttrain_assets.preference.audit` as set-based SQL over a pairs table.

:func:`audit_relation` gives the same :class:`~posttrain_assets.preference.audit.LengthAudit` per group as
:func:`~posttrain_assets.preference.audit.audit` over the same pairs, equal to the last bit, without bringing the
pairs to Python: DuckDB computes per group the exact integer sums and counts (pairs, chosen longer, equal length,
token sums, sums of d and d², ties, scored pairs, score ties), the rank sums behind the unpaired AUC, the exact sum of
the length ratios (each ratio's 53-bit mantissa summed per binary exponent as a 128-bit integer) and the two middle
ratios; Python gets those and the distinct values of d and of the score margin with their counts (a few thousand
rows whatever the number of pairs) and does the last divisions, the medians and quantiles (numpy's linear
interpolation, reproduced operation for operation), the rank-biserial r and the Wilson interval on them. The means
are correctly rounded sums divided by the count, as ``statistics.fmean`` (``math.fsum``) gives them.

:func:`balance_relation` is :func:`~posttrain_assets.preference.audit.balance_pairs` over a pairs table: the ties and
curation drops come from SQL, the remaining pairs of each source are audited with :func:`audit_relation`, and only the
pairs of a source that breaks the thresholds (the remedy, rare) come to Python, to be subsampled by the same code.

Both read the columns ``id``, ``source``, ``source_kind``, ``chosen_tokens``, ``rejected_tokens``, ``is_tie`` (not
null: silver.preference_pairs always carries it), ``score_chosen`` and ``score_rejected`` of ``relation``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import duckdb
import numpy as np

from posttrain_assets.preference.audit import (
    QUANTILES,
    SCORE_TIE_TOLERANCE,
    ConfoundThresholds,
    GroupKey,
    LengthAudit,
    balance_offending_source,
    dropped_counts,
    group_violations,
    histogram_png,
    wilson_interval,
)
from posttrain_assets.warehouse.io import fetch_dicts
from posttrain_assets.warehouse.stage_cache import code_fingerprint, library_versions

# One row per (group, pair): each pair once per group kind and once in ("overall", "all").
_ROWS = """
CREATE TEMP TABLE {rows} AS
WITH p AS (
    SELECT id, source, source_kind, CAST(chosen_tokens AS BIGINT) AS c, CAST(rejected_tokens AS BIGINT) AS r, is_tie,
        CASE WHEN isfinite(score_chosen) AND isfinite(score_rejected) THEN score_chosen - score_rejected END AS margin
    FROM ({relation})
)
{groups}
"""
_MOMENTS = """
SELECT kind, name, count(*) AS n, count(*) FILTER (c > r) AS longer, count(*) FILTER (c = r) AS equal,
    sum(c) AS sum_c, sum(r) AS sum_r, sum(c - r) AS sum_d, sum((c - r) * (c - r)) AS sum_dd,
    count(*) FILTER (is_tie) AS ties, count(margin) AS scored,
    count(*) FILTER (abs(margin) <= $tolerance) AS score_ties
FROM {rows} GROUP BY kind, name
"""
# Twice the rank sum of the chosen lengths among all lengths of the group (mid-ranks), an exact integer.
_RANK_SUMS = """
WITH v AS (
    SELECT kind, name, x, sum(chosen) AS cp, count(*) - sum(chosen) AS cn
    FROM (SELECT kind, name, c AS x, 1 AS chosen FROM {rows} UNION ALL SELECT kind, name, r, 0 FROM {rows})
    GROUP BY kind, name, x
),
w AS (SELECT *, sum(cp + cn) OVER (PARTITION BY kind, name ORDER BY x) - (cp + cn) AS before FROM v)
SELECT kind, name, sum(cp * (2 * before + cp + cn + 1)) AS twice_rank_sum FROM w GROUP BY kind, name
"""
_DIFFS = "SELECT kind, name, c - r AS value, count(*) AS n FROM {rows} GROUP BY ALL ORDER BY kind, name, value"
_MARGINS = (
    "SELECT kind, name, margin AS value, count(*) AS n FROM {rows} WHERE margin IS NOT NULL "
    "GROUP BY ALL ORDER BY kind, name, value"
)
# audit.length_ratio in SQL (IEEE division of the same integers: the same doubles).
_RATIO = "CASE WHEN c = r THEN 1.0 ELSE CAST(c AS DOUBLE) / greatest(r, 1) END"
# Each positive ratio x as m * 2^(e - 52) with m an integer: e is floor(log2(x)) lowered by one so an inexact log2
# can only make m larger (an integer below 2^55), never fractional; m is summed per e as a 128-bit integer.
_RATIO_SUMS = f"""
WITH x AS (SELECT kind, name, {_RATIO} AS ratio FROM {{rows}}),
e AS (SELECT kind, name, ratio, CAST(floor(log2(ratio)) AS INTEGER) - 1 AS e FROM x WHERE ratio > 0),
m AS (SELECT kind, name, e, ratio * pow(2.0, 52 - e) AS m FROM e)
SELECT kind, name, e, sum(CAST(m AS BIGINT)) AS mantissas, count(*) FILTER (m <> floor(m) OR m >= 2.0 ^ 62) AS bad
FROM m GROUP BY kind, name, e
"""
# The ratios at 0-based sorted positions (n - 1) // 2 and n // 2 of each group (statistics.median's two middles).
_RATIO_MIDDLES = f"""
WITH x AS (
    SELECT kind, name, {_RATIO} AS ratio,
        row_number() OVER (PARTITION BY kind, name ORDER BY {_RATIO}) - 1 AS position,
        count(*) OVER (PARTITION BY kind, name) AS n
    FROM {{rows}}
)
SELECT kind, name, position, ratio FROM x WHERE position IN ((n - 1) // 2, n // 2)
"""


@dataclass(frozen=True)
class ValueCounts:
    """A multiset of numbers as its distinct values in ascending order and their counts (both numpy arrays)."""

    values: np.ndarray
    counts: np.ndarray

    @property
    def size(self) -> int:
        return int(self.counts.sum())

    def at(self, position: int) -> float | int:
        """The value at 0-based ``position`` of the sorted multiset."""
        index = int(np.searchsorted(np.cumsum(self.counts), position, side="right"))
        return self.values[index].item()

    def exact_sum(self) -> float:
        """The correctly rounded sum of every element (what ``math.fsum`` of the elements gives)."""
        return float(sum((Fraction(v) * int(k) for v, k in zip(self.values.tolist(), self.counts, strict=True)), 0))

    def median(self) -> float:
        """``float(statistics.median(elements))``: the middle element, or the mean of the two middle ones."""
        n = self.size
        if n % 2:
            return float(self.at(n // 2))
        return float((self.at(n // 2 - 1) + self.at(n // 2)) / 2)

    def quantile(self, q: float) -> float:
        """``float(np.quantile(elements, q))`` with numpy's default (linear) method, operation for operation."""
        n = self.size
        virtual = (n - 1) * q
        if virtual >= n - 1:
            return float(self.at(n - 1))
        previous = math.floor(virtual)
        gamma = virtual - previous
        a, b = float(self.at(previous)), float(self.at(previous + 1))
        difference = b - a
        # numpy's _lerp: from the nearer end, so an interpolation at gamma 1 gives b exactly
        return b - difference * (1 - gamma) if gamma >= 0.5 else a + difference * gamma

    def quantiles(self) -> dict[str, float]:
        """:func:`posttrain_assets.preference.audit.quantiles` of the elements (empty dict when there are none)."""
        return {name: self.quantile(q) for name, q in QUANTILES} if self.size else {}


def _value_counts(rows: list[tuple]) -> ValueCounts:
    return ValueCounts(np.asarray([r[0] for r in rows]), np.asarray([r[1] for r in rows], dtype=np.int64))


def rank_biserial_from_counts(diffs: ValueCounts) -> float:
    """:func:`posttrain_assets.preference.audit.rank_biserial` of the elements: mid-ranks of |d| over d != 0, in
    exact integer arithmetic (twice each mid-rank is an integer) before the last division."""
    by_magnitude: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # |d| -> [pairs with d > 0, with d < 0]
    for value, count in zip(diffs.values.tolist(), diffs.counts.tolist(), strict=True):
        if value:
            by_magnitude[abs(value)][0 if value > 0 else 1] += count
    if not by_magnitude:
        return 0.0
    before, twice_t_plus = 0, 0
    for magnitude in sorted(by_magnitude):
        positive, negative = by_magnitude[magnitude]
        tied = positive + negative
        twice_t_plus += positive * (2 * before + tied + 1)
        before += tied
    t_plus = twice_t_plus / 2  # exact: a half-integer far below 2^52
    total = before * (before + 1) / 2
    return (2.0 * t_plus - total) / total


def _query(relation: str) -> str:
    """``relation`` as a query: a table name becomes ``SELECT * FROM`` it."""
    return relation if relation.lstrip().upper().startswith(("SELECT", "WITH", "FROM")) else f"SELECT * FROM {relation}"


@contextmanager
def _group_rows(
    conn: duckdb.DuckDBPyConnection, relation: str, group_keys: Sequence[str], params: Mapping | None
) -> Iterator[str]:
    """A temporary table of (kind, name, id, c, r, is_tie, margin): each pair of ``relation`` once per group kind of
    ``group_keys`` and once in the overall group; dropped on the way out."""
    rows = f"audit_rows_{uuid.uuid4().hex}"
    groups = "\nUNION ALL\n".join(
        [
            f"SELECT '{key}' AS kind, CAST({key} AS VARCHAR) AS name, id, c, r, is_tie, margin FROM p"
            for key in group_keys
        ]
        + ["SELECT 'overall' AS kind, 'all' AS name, id, c, r, is_tie, margin FROM p"]
    )
    conn.execute(_ROWS.format(rows=rows, relation=_query(relation), groups=groups), dict(params or {}))
    try:
        yield rows
    finally:
        with suppress(duckdb.Error):  # an aborted transaction drops it on rollback (see io.sync_table)
            conn.execute(f"DROP TABLE IF EXISTS temp.main.{rows}")


def _by_group(rows: list[tuple]) -> dict[GroupKey, list[tuple]]:
    out: dict[GroupKey, list[tuple]] = defaultdict(list)
    for kind, name, *rest in rows:
        out[(kind, name)].append(tuple(rest))
    return out


def audit_relation(
    conn: duckdb.DuckDBPyConnection,
    relation: str,
    group_keys: Sequence[str] = ("source", "source_kind"),
    params: Mapping | None = None,
) -> dict[GroupKey, LengthAudit]:
    """:func:`posttrain_assets.preference.audit.audit` of the pairs of the query or table ``relation`` (named
    parameters ``params``), computed in DuckDB: a :class:`LengthAudit` per ``(kind, name)`` group, ordered by
    ``group_keys`` then name, the overall group last; an empty dict when there are no pairs. Ties are the pairs'
    ``is_tie``. Runs on ``conn`` itself, so it sees what the caller's open transaction wrote."""
    with _group_rows(conn, relation, group_keys, params) as rows:
        moments = {
            (m["kind"], m["name"]): m
            for m in fetch_dicts(conn, _MOMENTS.format(rows=rows), {"tolerance": SCORE_TIE_TOLERANCE})
        }
        if not moments:
            return {}
        rank_sums = {(k, n): int(s) for k, n, s in conn.execute(_RANK_SUMS.format(rows=rows)).fetchall()}
        diffs = _by_group(conn.execute(_DIFFS.format(rows=rows)).fetchall())
        margins = _by_group(conn.execute(_MARGINS.format(rows=rows)).fetchall())
        ratio_sums = _by_group(conn.execute(_RATIO_SUMS.format(rows=rows)).fetchall())
        middles = _by_group(conn.execute(_RATIO_MIDDLES.format(rows=rows)).fetchall())
    if any(bad for parts in ratio_sums.values() for _, _, bad in parts):  # cannot happen with IEEE doubles
        raise RuntimeError("a length ratio did not split into an integer mantissa and a binary exponent")
    rank = {key: i for i, key in enumerate(group_keys)}
    ordered = sorted((k for k in moments if k[0] != "overall"), key=lambda k: (rank[k[0]], k[1]))
    return {
        key: _audit(
            moments[key],
            rank_sums[key],
            _value_counts(diffs[key]),
            _value_counts(margins.get(key, [])),
            ratio_sums.get(key, []),
            dict(middles[key]),
        )
        for key in [*ordered, ("overall", "all")]
    }


def _audit(
    m: Mapping, twice_rank_sum: int, diffs: ValueCounts, margins: ValueCounts, ratio_sums: list[tuple], middles: dict
) -> LengthAudit:
    """One group's :class:`LengthAudit` from its SQL aggregates, each figure by the same float operations as
    :func:`posttrain_assets.preference.audit._audit_group` on exact inputs."""
    n, longer, equal = int(m["n"]), int(m["longer"]), int(m["equal"])
    share = (longer + 0.5 * equal) / n
    low, high = wilson_interval(share, n)
    ratio_total = float(sum((Fraction(int(s)) * Fraction(2) ** (e - 52) for e, s, _ in ratio_sums), Fraction(0)))
    ratio_median = middles[(n - 1) // 2] if n % 2 else (middles[n // 2 - 1] + middles[n // 2]) / 2
    # np.mean of integer-valued float64 (as symmetrised_point_biserial takes it) is the exact sum over n
    mean_d, rms = float(m["sum_d"]) / n, math.sqrt(float(m["sum_dd"]) / n)
    # mann_whitney_auc: the rank sum (a half-integer, exact as a float) less n(n+1)/2, over n * n
    auc_unpaired = (twice_rank_sum / 2 - n * (n + 1) / 2.0) / (n * n)
    scored, ties = int(m["scored"]), int(m["ties"])
    return LengthAudit(
        pairs=n,
        chosen_longer_pairs=longer,
        equal_length_pairs=equal,
        chosen_longer_share=share,
        share_ci_low=low,
        share_ci_high=high,
        mean_chosen_tokens=float(m["sum_c"]) / n,
        mean_rejected_tokens=float(m["sum_r"]) / n,
        mean_length_ratio=ratio_total / n,
        median_length_ratio=float(ratio_median),
        length_diff_mean=mean_d,
        length_diff_median=diffs.median(),
        length_diff_quantiles=diffs.quantiles(),
        length_auc=share,
        length_auc_unpaired=auc_unpaired,
        point_biserial_r=mean_d / rms if rms > 0 else 0.0,
        rank_biserial_r=rank_biserial_from_counts(diffs),
        tie_pairs=ties,
        tie_rate=ties / n,
        scored_pairs=scored,
        score_tie_rate=int(m["score_ties"]) / scored if scored else None,
        score_margin_mean=margins.exact_sum() / scored if scored else None,
        score_margin_median=margins.median() if scored else None,
        score_margin_quantiles=margins.quantiles(),
    )


@dataclass
class RelationBalance:
    """What :func:`balance_relation` dropped, ``(id, reason)`` in id order, how many pairs it kept, and per balanced
    source how |d| was stratified (as :class:`posttrain_assets.preference.audit.BalanceResult`)."""

    dropped: list[tuple[str, str]]
    kept: int
    strata: dict[str, int | str] = field(default_factory=dict)

    def dropped_counts(self) -> dict[str, int]:
        """Number of dropped pairs per reason."""
        return dropped_counts(self.dropped)


def balance_relation(
    conn: duckdb.DuckDBPyConnection,
    relation: str,
    thresholds: ConfoundThresholds | None = None,
    seed: int = 0,
    excluded: Mapping[str, str] | None = None,
) -> RelationBalance:
    """:func:`posttrain_assets.preference.audit.balance_pairs` of the pairs of ``relation``: the same drops and
    reasons. Ties (``is_tie``) go first, then the ``excluded`` ids with their reason; each source's remaining pairs
    are audited in SQL, and only a source with at least ``min_pairs`` of them that breaks the thresholds has its pairs
    (id and token counts, in id order) read into Python and subsampled."""
    thresholds = thresholds or ConfoundThresholds()
    excluded = dict(excluded or {})
    relation = _query(relation)
    reasons: dict[str, str] = {
        pair_id: "tie" for (pair_id,) in conn.execute(f"SELECT id FROM ({relation}) WHERE is_tie").fetchall()
    }
    (pairs,) = conn.execute(f"SELECT count(*) FROM ({relation})").fetchone()
    present = {
        pair_id
        for (pair_id,) in conn.execute(
            f"SELECT id FROM ({relation}) WHERE NOT is_tie AND id IN (SELECT unnest(CAST($ids AS VARCHAR[])))",
            {"ids": list(excluded)},
        ).fetchall()
    }
    reasons.update((pair_id, excluded[pair_id]) for pair_id in present)
    remaining = f"SELECT * FROM ({relation}) WHERE NOT is_tie AND id NOT IN (SELECT unnest(CAST($ids AS VARCHAR[])))"
    strata: dict[str, int | str] = {}
    for (kind, source), result in audit_relation(conn, remaining, ("source",), {"ids": sorted(present)}).items():
        if kind == "overall" or not group_violations("source", source, result, thresholds):
            continue
        members = fetch_dicts(
            conn,
            f"SELECT id, chosen_tokens, rejected_tokens FROM ({remaining}) WHERE source = $source ORDER BY id",
            {"ids": sorted(present), "source": source},
        )
        source_reasons, stratified = balance_offending_source(source, members, thresholds, seed)
        reasons.update(source_reasons)
        if stratified is not None:
            strata[source] = stratified
    dropped = sorted(reasons.items())
    return RelationBalance(dropped=dropped, kept=pairs - len(dropped), strata=strata)


def length_histogram_png_of(conn: duckdb.DuckDBPyConnection, relation: str, title: str) -> bytes:
    """:func:`posttrain_assets.preference.audit.length_histogram_png` of every pair of ``relation``, the same PNG,
    from the distinct chosen and rejected lengths and their counts (the cap, the 99th percentile of all lengths, by
    :meth:`ValueCounts.quantile`)."""
    chosen, rejected, cap = _histogram_inputs(conn, relation)
    return histogram_png(chosen, rejected, cap, title)


@dataclass(frozen=True)
class StoredHistogram:
    """The length histogram's PNG and whether it was drawn by this call (False: the stored file was reused)."""

    png: bytes
    drawn: bool


def stored_length_histogram(
    conn: duckdb.DuckDBPyConnection, relation: str, title: str, path: Path, *, redraw: bool = False
) -> StoredHistogram:
    """:func:`length_histogram_png_of`, kept in the file ``path``: drawn (and written there) only when what it is
    drawn from differs from the last drawing's, else read back; the bytes are the same either way.

    Drawing costs about a second, most of it importing matplotlib, on every run of the preference stage even when
    no pair changed. The key, stored next to the PNG (``.<name>.key``) with the PNG's sha256, is a sha256 of the
    histogram's inputs (each side's distinct lengths and their counts, the cap, the title), the drawing code
    (``preference/audit.py``, where :func:`histogram_png` is) and the matplotlib version; a PNG whose sha256 is not
    the stored one (edited, truncated) is drawn again, and so is every PNG with ``redraw`` (a full rebuild)."""
    chosen, rejected, cap = _histogram_inputs(conn, relation)
    inputs = {
        "sides": [[side[0].tolist(), side[1].tolist()] for side in (chosen, rejected)],
        "cap": cap,
        "title": title,
        "code": code_fingerprint("posttrain_assets.preference.audit"),
        "libraries": library_versions("matplotlib", "numpy"),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    key_path = path.with_name(f".{path.name}.key")
    with suppress(OSError, ValueError, KeyError, TypeError):
        stored = json.loads(key_path.read_text(encoding="utf-8"))
        png = path.read_bytes()
        if not redraw and stored["inputs"] == key and stored["png_sha256"] == hashlib.sha256(png).hexdigest():
            return StoredHistogram(png, drawn=False)
    png = histogram_png(chosen, rejected, cap, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, data in (
        (path, png),
        (key_path, json.dumps({"inputs": key, "png_sha256": hashlib.sha256(png).hexdigest()}).encode()),
    ):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return StoredHistogram(png, drawn=True)


def _histogram_inputs(
    conn: duckdb.DuckDBPyConnection, relation: str
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], float | None]:
    """Each side's distinct lengths and their counts (chosen, rejected), and the cap: the 99th percentile of all
    lengths (None: no pairs)."""
    relation = _query(relation)
    sides = []
    for column in ("chosen_tokens", "rejected_tokens"):
        rows = conn.execute(f"SELECT {column}, count(*) FROM ({relation}) GROUP BY 1 ORDER BY 1").fetchall()
        sides.append(_value_counts(rows))
    both: dict[int, int] = defaultdict(int)
    for side in sides:
        for value, count in zip(side.values.tolist(), side.counts.tolist(), strict=True):
            both[value] += count
    union = _value_counts(sorted(both.items()))
    cap = max(union.quantile(0.99), 1.0) if union.size else None
    (chosen, rejected) = ((side.values, side.counts) for side in sides)
    return chosen, rejected, cap


__all__ = [
    "RelationBalance",
    "StoredHistogram",
    "ValueCounts",
    "audit_relation",
    "balance_relation",
    "length_histogram_png_of",
    "rank_biserial_from_counts",
    "stored_length_histogram",
]
