"""An independent, obviously correct (and slow) length audit of a few pairs, straight from the definitions in
posttrain_assets/preference/audit.py, to check audit_sql.audit_relation against: every statistic by brute force over
plain lists and numpy broadcasting (the unpaired AUC over all n² cross pairs, mid-ranks by counting the values
below and equal, Pearson's r with numpy's corrcoef over both orientations of every pair) instead of the SQL's rank
sums and closed forms.

The SQL takes medians, quantiles and sums of doubles from DuckDB (``median``, ``quantile_cont``, ``fsum``), so a
figure may differ from this one in the last bits of a double: compare with ``pytest.approx(rel=1e-12)``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

QUANTILES = {"p10": 0.10, "p25": 0.25, "p75": 0.75, "p90": 0.90}


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    return {name: float(np.quantile(values, q)) for name, q in QUANTILES.items()} if values else {}


def midranks(values: Sequence[float]) -> np.ndarray:
    """1-based rank of each of ``values`` among them, tied values sharing the mean of their ranks: the number of
    values below it plus (the number equal to it + 1) / 2."""
    x = np.asarray(values, dtype=float)
    below = (x[None, :] < x[:, None]).sum(axis=1)
    equal = (x[None, :] == x[:, None]).sum(axis=1)
    return below + (equal + 1) / 2


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def oracle_audit(pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every :class:`~posttrain_assets.preference.audit.LengthAudit` field of one group of pairs (rows with
    ``chosen_tokens``, ``rejected_tokens``, ``is_tie``, ``score_chosen``, ``score_rejected``)."""
    n = len(pairs)
    chosen = [p["chosen_tokens"] for p in pairs]
    rejected = [p["rejected_tokens"] for p in pairs]
    d = [c - r for c, r in zip(chosen, rejected, strict=True)]
    longer, equal = sum(x > 0 for x in d), sum(x == 0 for x in d)
    share = (longer + equal / 2) / n
    z = 1.959963984540054
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    ratios = [1.0 if c == r else c / max(r, 1) for c, r in zip(chosen, rejected, strict=True)]
    c_col, r_row = np.asarray(chosen)[:, None], np.asarray(rejected)[None, :]
    auc_unpaired = float(((c_col > r_row) + (c_col == r_row) / 2).mean())
    both = np.array([*d, *(-x for x in d)], dtype=float)
    labels = np.array([1.0] * n + [0.0] * n)
    nonzero = [x for x in d if x]
    ranks = midranks([abs(x) for x in nonzero]) if nonzero else np.zeros(0)
    t_plus = float(sum(rank for rank, x in zip(ranks, nonzero, strict=True) if x > 0))
    t_minus = float(sum(rank for rank, x in zip(ranks, nonzero, strict=True) if x < 0))
    margins = [
        p["score_chosen"] - p["score_rejected"]
        for p in pairs
        if _finite(p.get("score_chosen")) and _finite(p.get("score_rejected"))
    ]
    ties = sum(bool(p["is_tie"]) for p in pairs)
    return {
        "pairs": n,
        "chosen_longer_pairs": longer,
        "equal_length_pairs": equal,
        "chosen_longer_share": share,
        "share_ci_low": max(0.0, centre - half),
        "share_ci_high": min(1.0, centre + half),
        "mean_chosen_tokens": statistics.fmean(chosen),
        "mean_rejected_tokens": statistics.fmean(rejected),
        "mean_length_ratio": math.fsum(ratios) / n,
        "median_length_ratio": statistics.median(ratios),
        "length_diff_mean": statistics.fmean(d),
        "length_diff_median": statistics.median(d),
        "length_diff_quantiles": _quantiles(d),
        "length_auc": share,
        "length_auc_unpaired": auc_unpaired,
        "point_biserial_r": float(np.corrcoef(both, labels)[0, 1]) if any(d) else 0.0,
        "rank_biserial_r": (t_plus - t_minus) / (t_plus + t_minus) if nonzero else 0.0,
        "tie_pairs": ties,
        "tie_rate": ties / n,
        "scored_pairs": len(margins),
        "score_tie_rate": sum(abs(m) <= 1e-9 for m in margins) / len(margins) if margins else None,
        "score_margin_mean": math.fsum(margins) / len(margins) if margins else None,
        "score_margin_median": statistics.median(margins) if margins else None,
        "score_margin_quantiles": _quantiles(margins),
    }
