"""The length audit and the balancing of preference pairs as set-based DuckDB SQL over a pairs query.

:func:`audit_relation` gives a :class:`~posttrain_assets.preference.audit.LengthAudit` per group (the statistics are
defined in :mod:`posttrain_assets.preference.audit`) without bringing the pairs to Python: DuckDB computes per group
the integer counts and sums (pairs, chosen longer, equal length, token sums, sums of d and d², ties, scored pairs,
score ties), the rank sums behind the unpaired AUC and the rank-biserial r, the medians and quantiles
(``median``, ``quantile_cont``) and the sums of the length ratios and score margins (``fsum`` in ascending order:
the same double whatever the thread count); Python divides and computes the Wilson interval on them.

:func:`balance_relation` writes the drops of the balanced set (ties, curation drops, the length balancing of the
sources that break the thresholds) into a table, in SQL: no pair id passes through Python.

Both read the columns ``id``, ``source``, ``source_kind``, ``chosen_tokens``, ``rejected_tokens``, ``is_tie`` (not
null: silver.preference_pairs always carries it), ``score_chosen`` and ``score_rejected`` of ``query``: a SELECT
(``SELECT * FROM silver.preference_pairs`` for the table) with named parameters ``params``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np

from posttrain_assets.preference.audit import (
    DROP_REASONS,
    QUANTILES,
    SCORE_TIE_TOLERANCE,
    ConfoundThresholds,
    GroupKey,
    LengthAudit,
    group_violations,
    histogram_png,
    wilson_interval,
)
from posttrain_assets.warehouse.io import fetch_dicts
from posttrain_assets.warehouse.model import Table
from posttrain_assets.warehouse.stage_cache import code_fingerprint, library_versions

# One row per (group, pair): each pair once per group kind and once in ("overall", "all"). ratio is the length ratio
# (a zero denominator counts as 1 token, 0/0 is 1.0), margin the score margin where both scores are finite.
_ROWS = """
CREATE TEMP TABLE {rows} AS
WITH p AS (
    SELECT id, source, source_kind, CAST(chosen_tokens AS BIGINT) AS c, CAST(rejected_tokens AS BIGINT) AS r, is_tie,
        CASE WHEN isfinite(score_chosen) AND isfinite(score_rejected) THEN score_chosen - score_rejected END AS margin
    FROM ({query})
)
SELECT *, CASE WHEN c = r THEN 1.0 ELSE CAST(c AS DOUBLE) / greatest(r, 1) END AS ratio
FROM ({groups})
"""
_QUANTILE_LIST = "[" + ", ".join(str(q) for _, q in QUANTILES) + "]"
# The sums of doubles are fsum (compensated) over the values in ascending order: one fixed order, so the same bits
# whatever the number of threads DuckDB scans with.
_STATISTICS = f"""
SELECT kind, name, count(*) AS n, count(*) FILTER (c > r) AS longer, count(*) FILTER (c = r) AS equal,
    sum(c) AS sum_c, sum(r) AS sum_r, sum(c - r) AS sum_d, sum((c - r) * (c - r)) AS sum_dd,
    median(c - r) AS median_d, quantile_cont(c - r, {_QUANTILE_LIST}) AS quantiles_d,
    fsum(ratio ORDER BY ratio) AS sum_ratio, median(ratio) AS median_ratio,
    count(*) FILTER (is_tie) AS ties, count(margin) AS scored,
    count(*) FILTER (abs(margin) <= $tolerance) AS score_ties, fsum(margin ORDER BY margin) AS sum_margin,
    median(margin) AS median_margin, quantile_cont(margin, {_QUANTILE_LIST}) AS quantiles_margin
FROM {{rows}} GROUP BY kind, name
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
# The matched-pairs rank-biserial r's parts: twice T+ (the mid-ranks of |d| over pairs with d > 0; twice a mid-rank
# is an integer) and the number of pairs with d != 0; groups where every d is 0 have no row.
_SIGNED_RANKS = """
WITH v AS (
    SELECT kind, name, abs(c - r) AS a, count(*) FILTER (c > r) AS positive, count(*) AS tied
    FROM {rows} WHERE c <> r GROUP BY kind, name, a
),
w AS (SELECT *, sum(tied) OVER (PARTITION BY kind, name ORDER BY a) - tied AS before FROM v)
SELECT kind, name, sum(positive * (2 * before + tied + 1)) AS twice_t_plus, sum(tied) AS nonzero
FROM w GROUP BY kind, name
"""


@contextmanager
def _temp_table(conn: duckdb.DuckDBPyConnection, prefix: str) -> Iterator[str]:
    """A fresh temporary table name, the table dropped on the way out."""
    name = f"{prefix}_{uuid.uuid4().hex}"
    try:
        yield name
    finally:
        with suppress(duckdb.Error):  # an aborted transaction drops it on rollback (see io.sync_table)
            conn.execute(f"DROP TABLE IF EXISTS temp.main.{name}")


def audit_relation(
    conn: duckdb.DuckDBPyConnection,
    query: str,
    group_keys: Sequence[str] = ("source", "source_kind"),
    params: Mapping[str, object] | None = None,
) -> dict[GroupKey, LengthAudit]:
    """A :class:`LengthAudit` per ``(kind, name)`` group of the pairs of the SELECT ``query`` (named parameters
    ``params``): one group per value of each column of ``group_keys``, ordered by ``group_keys`` then name, and the
    overall group ``("overall", "all")`` last; an empty dict when there are no pairs. Ties are the pairs' ``is_tie``.
    Runs on ``conn`` itself, so it sees what the caller's open transaction wrote."""
    groups = "\nUNION ALL\n".join(
        [f"SELECT '{key}' AS kind, CAST({key} AS VARCHAR) AS name, * FROM p" for key in group_keys]
        + ["SELECT 'overall' AS kind, 'all' AS name, * FROM p"]
    )
    with _temp_table(conn, "audit_rows") as rows:
        conn.execute(_ROWS.format(rows=rows, query=query, groups=groups), dict(params or {}))
        statistics = {
            (s["kind"], s["name"]): s
            for s in fetch_dicts(conn, _STATISTICS.format(rows=rows), {"tolerance": SCORE_TIE_TOLERANCE})
        }
        if not statistics:
            return {}
        rank_sums = {(k, n): int(s) for k, n, s in conn.execute(_RANK_SUMS.format(rows=rows)).fetchall()}
        signed = {(k, n): (int(t), int(m)) for k, n, t, m in conn.execute(_SIGNED_RANKS.format(rows=rows)).fetchall()}
    rank = {key: i for i, key in enumerate(group_keys)}
    ordered = sorted((k for k in statistics if k[0] != "overall"), key=lambda k: (rank[k[0]], k[1]))
    return {
        key: _audit(statistics[key], rank_sums[key], signed.get(key, (0, 0))) for key in [*ordered, ("overall", "all")]
    }


def _quantiles(values: list[float] | None) -> dict[str, float]:
    """``{"p10": ..., "p90": ...}`` from quantile_cont's list (None, no values: an empty dict)."""
    return {} if values is None else {name: float(v) for (name, _), v in zip(QUANTILES, values, strict=True)}


def _audit(s: Mapping, twice_rank_sum: int, signed: tuple[int, int]) -> LengthAudit:
    """One group's :class:`LengthAudit` from its SQL aggregates. Divisions of integers are Python's correctly rounded
    ``int / int``."""
    n, longer, equal = int(s["n"]), int(s["longer"]), int(s["equal"])
    share = (2 * longer + equal) / (2 * n)
    low, high = wilson_interval(share, n)
    sum_d, sum_dd = int(s["sum_d"]), int(s["sum_dd"])
    # point-biserial r over both orientations: mean(d) / rms(d) = sum_d / sqrt(n * sum_dd)
    point_biserial = sum_d / n / math.sqrt(sum_dd / n) if sum_dd else 0.0
    # Mann-Whitney: the rank sum less n(n+1)/2, over n * n (twice both sides: integers)
    auc_unpaired = (twice_rank_sum - n * (n + 1)) / (2 * n * n)
    # rank-biserial: (T+ - T-) / (T+ + T-) = (2 T+ - total) / total, total = m(m+1)/2 over the m pairs with d != 0
    twice_t_plus, nonzero = signed
    total = nonzero * (nonzero + 1) // 2
    rank_biserial = (twice_t_plus - total) / total if total else 0.0
    scored, ties = int(s["scored"]), int(s["ties"])
    return LengthAudit(
        pairs=n,
        chosen_longer_pairs=longer,
        equal_length_pairs=equal,
        chosen_longer_share=share,
        share_ci_low=low,
        share_ci_high=high,
        mean_chosen_tokens=int(s["sum_c"]) / n,
        mean_rejected_tokens=int(s["sum_r"]) / n,
        mean_length_ratio=float(s["sum_ratio"]) / n,
        median_length_ratio=float(s["median_ratio"]),
        length_diff_mean=sum_d / n,
        length_diff_median=float(s["median_d"]),
        length_diff_quantiles=_quantiles(s["quantiles_d"]),
        length_auc=share,
        length_auc_unpaired=auc_unpaired,
        point_biserial_r=point_biserial,
        rank_biserial_r=rank_biserial,
        tie_pairs=ties,
        tie_rate=ties / n,
        scored_pairs=scored,
        score_tie_rate=int(s["score_ties"]) / scored if scored else None,
        score_margin_mean=float(s["sum_margin"]) / scored if scored else None,
        score_margin_median=float(s["median_margin"]) if scored else None,
        score_margin_quantiles=_quantiles(s["quantiles_margin"]),
    )


# ---------------------------------------------------------------------------------------------------------------
# balancing
# ---------------------------------------------------------------------------------------------------------------

# Every pair of the query once (the audited columns, never the texts), with its drop reason so far: tie first, then
# the curation drop (excluded), else null.
_BALANCE_ROWS = """
CREATE TEMP TABLE {work} AS
SELECT p.id, p.source, p.source_kind, p.chosen_tokens, p.rejected_tokens, p.is_tie, p.score_chosen, p.score_rejected,
    CAST(p.chosen_tokens AS BIGINT) - CAST(p.rejected_tokens AS BIGINT) AS d,
    CASE WHEN p.is_tie THEN 'tie' ELSE x.reason END AS reason
FROM ({query}) p LEFT JOIN ({excluded}) x ON x.id = p.id
"""
# The pairs one stratification drops from a source: its remaining pairs with d != 0 are put in strata of |d| (with
# $k: quantile stratum floor(k * (midrank - 1/2) / n) of the mid-rank of |d|, in integers; without: one stratum per
# distinct |d|), and in each stratum the larger side (chosen longer or shorter) loses its surplus: the pairs last in
# the order of md5("seed:source:id"), a seeded shuffle that does not depend on the order or number of pairs read.
_BALANCE_DROPS = """
CREATE OR REPLACE TEMP TABLE {candidates} AS
WITH m AS (
    SELECT id, abs(d) AS a, d > 0 AS longer,
        2 * (rank() OVER (ORDER BY abs(d)) - 1) + count(*) OVER (PARTITION BY abs(d)) + 1 AS twice_midrank,
        count(*) OVER () AS n
    FROM {work} WHERE reason IS NULL AND source = $source AND d <> 0
),
s AS (SELECT id, longer, {stratum} AS stratum FROM m),
c AS (
    SELECT id, longer, stratum,
        row_number() OVER (
            PARTITION BY stratum, longer ORDER BY md5(concat($seed, ':', $source, ':', id)), id
        ) AS place,
        count(*) FILTER (longer) OVER (PARTITION BY stratum) AS longer_pairs,
        count(*) FILTER (NOT longer) OVER (PARTITION BY stratum) AS shorter_pairs
    FROM s
)
SELECT id FROM c WHERE place > least(longer_pairs, shorter_pairs)
"""
_QUANTILE_STRATUM = "least($k - 1, ($k * (twice_midrank - 1)) // (2 * n))"
_EXACT_STRATUM = "a"
_NO_EXCLUSIONS = "SELECT CAST(NULL AS VARCHAR) AS id, CAST(NULL AS VARCHAR) AS reason WHERE false"


@dataclass
class RelationBalance:
    """What :func:`balance_relation` wrote: how many pairs it kept, the number of dropped pairs per reason (in the
    order of :data:`~posttrain_assets.preference.audit.DROP_REASONS`), and per balanced source how |d| was
    stratified (a number of quantile strata, or ``"exact"`` for one stratum per distinct |d|)."""

    kept: int
    dropped_counts: dict[str, int]
    strata: dict[str, int | str] = field(default_factory=dict)


def balance_relation(
    conn: duckdb.DuckDBPyConnection,
    query: str,
    drops: Table,
    thresholds: ConfoundThresholds | None = None,
    seed: int = 0,
    excluded: str | None = None,
    params: Mapping[str, object] | None = None,
) -> RelationBalance:
    """Replace the table ``drops`` (``id``, ``source``, ``reason``; in id order) with every pair of the SELECT ``query``
    left out of the balanced set, and why:

    1. every tie (``is_tie``), reason ``tie``: a pair with the same answer on both sides teaches nothing but noise;
    2. every other pair the SELECT ``excluded`` (``id``, ``reason``) lists, with its reason (the curation drops of
       :func:`posttrain_assets.preference.labelling.curation_drops_query`); ids that are not pairs are ignored;
    3. in each source whose remaining pairs number at least ``min_pairs`` and break the thresholds, the pairs with
       d != 0 are stratified by |d| into quantile strata (10, then 20, 40, ... and finally one stratum per distinct
       |d|), and in each stratum the surplus of the larger side (chosen longer or shorter) is dropped, reason
       ``length_balance``, so both sides are equal; equal-length pairs stay. The share is then exactly 0.5 and |r|
       shrinks with the strata's width; the coarsest stratification that passes (:func:`audit_relation` of what is
       kept) is used: it drops the fewest pairs. With one stratum per distinct |d| every stratum's mean d is 0, so r
       is 0 and the source passes -- unless fewer than ``min_pairs`` pairs survive (e.g. chosen is always longer),
       and then every remaining pair of the source is dropped, reason ``cannot_balance``, rather than kept as an
       unjudged sliver.

    Which pairs of a stratum go is a shuffle seeded by ``seed``, the source and the pair id (md5), so the drops do
    not depend on the order in which the pairs are stored. ``params`` are the named parameters of ``query`` and
    ``excluded``. Runs on ``conn`` inside the caller's transaction, if any."""
    thresholds = thresholds or ConfoundThresholds()
    params = dict(params or {})
    strata: dict[str, int | str] = {}
    with _temp_table(conn, "balance_rows") as work, _temp_table(conn, "balance_candidates") as candidates:
        conn.execute(_BALANCE_ROWS.format(work=work, query=query, excluded=excluded or _NO_EXCLUSIONS), params)
        remaining = f"SELECT * FROM {work} WHERE reason IS NULL"
        for (kind, source), result in audit_relation(conn, remaining, ("source",)).items():
            if kind == "overall" or not group_violations("source", source, result, thresholds):
                continue
            (distinct,) = conn.execute(
                f"SELECT count(DISTINCT abs(d)) FROM {work} WHERE reason IS NULL AND source = $source",
                {"source": source},
            ).fetchone()
            stratified = _balance_source(conn, work, candidates, source, int(distinct), thresholds, seed)
            if stratified is None:
                conn.execute(
                    f"UPDATE {work} SET reason = 'cannot_balance' WHERE reason IS NULL AND source = $source",
                    {"source": source},
                )
            else:
                conn.execute(f"UPDATE {work} SET reason = 'length_balance' WHERE id IN (SELECT id FROM {candidates})")
                strata[source] = stratified
        conn.execute(drops.create_sql(replace=True))
        conn.execute(
            f"INSERT INTO {drops.qualified} (id, source, reason) "
            f"SELECT id, source, reason FROM {work} WHERE reason IS NOT NULL ORDER BY id"
        )
        counts = dict(conn.execute(f"SELECT reason, count(*) FROM {work} GROUP BY reason").fetchall())
    kept = counts.pop(None, 0)
    order = {reason: i for i, reason in enumerate(DROP_REASONS)}
    dropped_counts = {reason: counts[reason] for reason in sorted(counts, key=lambda r: (order.get(r, len(order)), r))}
    return RelationBalance(kept=kept, dropped_counts=dropped_counts, strata=strata)


def _balance_source(
    conn: duckdb.DuckDBPyConnection,
    work: str,
    candidates: str,
    source: str,
    distinct: int,
    thresholds: ConfoundThresholds,
    seed: int,
) -> int | str | None:
    """Leave in ``candidates`` the ids the coarsest passing stratification of ``source`` drops and return it (a
    number of strata or ``"exact"``); None when not even one stratum per distinct |d| passes."""
    k: int | None = 10
    while True:
        if k is not None and k >= distinct:
            k = None
        stratum = _EXACT_STRATUM if k is None else _QUANTILE_STRATUM
        conn.execute(
            _BALANCE_DROPS.format(candidates=candidates, work=work, stratum=stratum),
            {"source": source, "seed": str(seed), **({} if k is None else {"k": k})},
        )
        kept = audit_relation(
            conn,
            f"SELECT * FROM {work} WHERE reason IS NULL AND source = $source "
            f"AND id NOT IN (SELECT id FROM {candidates})",
            ("source",),
            {"source": source},
        ).get(("source", source))
        if (
            kept is not None
            and kept.pairs >= thresholds.min_pairs
            and not group_violations("source", source, kept, thresholds)
        ):
            return "exact" if k is None else k
        if k is None:
            return None
        k *= 2


# ---------------------------------------------------------------------------------------------------------------
# the length histogram
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredHistogram:
    """The length histogram's PNG and whether it was drawn by this call (False: the stored file was reused)."""

    png: bytes
    drawn: bool


def stored_length_histogram(
    conn: duckdb.DuckDBPyConnection, query: str, title: str, path: Path, *, redraw: bool = False
) -> StoredHistogram:
    """:func:`~posttrain_assets.preference.audit.histogram_png` of the chosen and rejected lengths of every pair of the
    SELECT ``query``, kept in the file ``path``: drawn (and written there) only when what it is drawn from differs
    from the last drawing's, else read back; the bytes are the same either way.

    Drawing costs about a second, most of it importing matplotlib, on every run of the preference stage even when
    no pair changed. The key, stored next to the PNG (``.<name>.key``) with the PNG's sha256, is a sha256 of the
    histogram's inputs (each side's distinct lengths and their counts, the cap, the title), the drawing code
    (``preference/audit.py``, where :func:`histogram_png` is) and the matplotlib version; a PNG whose sha256 is not
    the stored one (edited, truncated) is drawn again, and so is every PNG with ``redraw`` (a full rebuild)."""
    chosen, rejected, cap = _histogram_inputs(conn, query)
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
    conn: duckdb.DuckDBPyConnection, query: str
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], float | None]:
    """Each side's distinct lengths and their counts (chosen, rejected), and the cap: the 99th percentile of all
    lengths, at least 1 (DuckDB's quantile_cont; None: no pairs)."""
    sides = []
    for column in ("chosen_tokens", "rejected_tokens"):
        rows = conn.execute(f"SELECT {column}, count(*) FROM ({query}) GROUP BY 1 ORDER BY 1").fetchall()
        sides.append(
            (np.asarray([v for v, _ in rows], dtype=np.int64), np.asarray([k for _, k in rows], dtype=np.int64))
        )
    (p99,) = conn.execute(
        f"SELECT quantile_cont(x, 0.99) FROM (SELECT chosen_tokens AS x FROM ({query}) "
        f"UNION ALL SELECT rejected_tokens FROM ({query}))"
    ).fetchone()
    cap = None if p99 is None else max(float(p99), 1.0)
    return sides[0], sides[1], cap


__all__ = [
    "RelationBalance",
    "StoredHistogram",
    "audit_relation",
    "balance_relation",
    "stored_length_histogram",
]
