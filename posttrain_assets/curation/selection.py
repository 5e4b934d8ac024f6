"""Diversity selection over unit-length embeddings, and how well a selection covers its pool.

"The marginal value of a new example is its informational distance from examples already in the set": both
methods pick, one row at a time, the row that adds the most coverage, under a budget in rows or tokens.

- ``k_center``: farthest-first traversal (Gonzalez's greedy 2-approximation of k-center). The first row
  is drawn with the seed; each next row is the one farthest (cosine distance ``1 - cos``) from every row selected
  so far. Its gain is that distance: how far from the selection the row was when it was picked (null for the
  first).
- ``facility_location`` (default: it minimises the mean distance to the nearest selected row, the coverage
  figure we report): maximise ``sum_i max_{j in S} s(i, j)`` with ``s = (1 + cos) / 2`` in [0, 1], by lazy
  greedy (exact for this submodular objective: a stale upper bound is recomputed before it is trusted). Its gain is
  the objective's increase. The seed plays no part (the greedy is deterministic); it still draws the random
  baseline.

With a token budget a row is only considered while it fits in what is left, so the budget is filled as far as
the rows allow and never exceeded. Ties go to the lower index, so callers pass rows in id order and the result is
the same on every run. The cost is O(n * k * dim) for n candidates and k picks, in memory O(n * dim).

:func:`coverage` measures a selection: the mean cosine distance from every pool row to its nearest selected row
(lower is better; what facility location minimises), the largest such distance (what k-center minimises)
and how many k-means clusters of the pool have a selected row (:func:`kmeans_labels`).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METHODS = ("k_center", "facility_location")
# Rows of the pool compared at once with the selection (bounds the block of similarities held).
COVERAGE_BLOCK_ROWS = 4096
# Stale facility-location bounds refreshed per matrix product (any value gives the same picks up to float ties).
REFRESH_ROWS = 128


@dataclass(frozen=True)
class Selection:
    """Selected pool indices in pick order (``rank`` = position, from 1), with each pick's marginal gain."""

    indices: np.ndarray
    gains: np.ndarray  # float64; NaN where a method defines none (k_center's first pick)
    cost: float

    def __len__(self) -> int:
        return len(self.indices)


def _check(vectors: np.ndarray, costs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array, got shape {vectors.shape}")
    n = vectors.shape[0]
    cost = np.ones(n, dtype=np.float64) if costs is None else np.asarray(costs, dtype=np.float64)
    if cost.shape != (n,):
        raise ValueError(f"costs must have one value per row ({n}), got shape {cost.shape}")
    if np.any(cost < 0) or not np.all(np.isfinite(cost)):
        raise ValueError("costs must be finite and non-negative")
    return vectors, cost


def select(
    vectors: np.ndarray,
    budget: float,
    *,
    costs: np.ndarray | None = None,
    method: str = "facility_location",
    seed: int = 0,
) -> Selection:
    """Pick rows of ``vectors`` (unit rows) until ``budget`` is spent: a row count when ``costs`` is None, else in
    the unit of ``costs`` (tokens per row). Deterministic for a given input and seed."""
    vectors, cost = _check(vectors, costs)
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; expected one of {', '.join(METHODS)}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if method == "k_center":
        return _k_center(vectors, cost, float(budget), seed)
    return _facility_location(vectors, cost, float(budget))


def _k_center(vectors: np.ndarray, cost: np.ndarray, budget: float, seed: int) -> Selection:
    n = vectors.shape[0]
    left = budget
    fits = cost <= left
    picked: list[int] = []
    gains: list[float] = []
    if not fits.any():
        return Selection(np.array([], dtype=np.int64), np.array([], dtype=np.float64), 0.0)
    eligible = np.flatnonzero(fits)
    first = int(eligible[np.random.default_rng(seed).integers(len(eligible))])
    nearest = np.full(n, np.inf, dtype=np.float64)
    chosen = np.zeros(n, dtype=bool)
    current, gain = first, np.nan
    while True:
        picked.append(current)
        gains.append(gain)
        chosen[current] = True
        left -= cost[current]
        np.minimum(nearest, 1.0 - vectors @ vectors[current], out=nearest)
        open_rows = ~chosen & (cost <= left)
        if not open_rows.any():
            break
        # argmax returns the first maximum: ties go to the lowest index.
        masked = np.where(open_rows, nearest, -np.inf)
        current = int(np.argmax(masked))
        gain = float(masked[current])
    idx = np.array(picked, dtype=np.int64)
    return Selection(idx, np.array(gains, dtype=np.float64), float(cost[idx].sum()))


def _facility_location(vectors: np.ndarray, cost: np.ndarray, budget: float) -> Selection:
    n = vectors.shape[0]
    # With nothing selected, row c's gain is sum_i (1 + cos(i, c)) / 2 = n/2 + (X @ sum_i x_i)[c] / 2: exact, O(n d).
    initial = n / 2.0 + (vectors @ vectors.sum(axis=0, dtype=np.float64).astype(np.float32)).astype(np.float64) / 2.0
    heap = [(-float(g), i) for i, g in enumerate(initial)]
    heapq.heapify(heap)
    best = np.zeros(n, dtype=np.float64)  # each row's similarity to its most similar selected row
    stale = np.zeros(n, dtype=bool)  # gains computed before the latest pick are upper bounds
    left = budget
    picked: list[int] = []
    gains: list[float] = []
    while heap:
        neg_gain, row = heapq.heappop(heap)
        if cost[row] > left:
            continue  # never fits again: the budget only shrinks
        if stale[row]:
            # Refresh the stale bounds at the top of the heap together, in one matrix product: when gains are close,
            # lazy greedy refreshes many rows per pick, and one at a time that is mostly Python overhead.
            rows = [row]
            while heap and len(rows) < REFRESH_ROWS and stale[heap[0][1]]:
                _, other = heapq.heappop(heap)
                if cost[other] <= left:
                    rows.append(other)
            sims = (1.0 + (vectors @ vectors[rows].T).astype(np.float64)) / 2.0
            fresh = np.maximum(sims - best[:, None], 0.0).sum(axis=0)
            stale[rows] = False
            for r, g in zip(rows, fresh.tolist(), strict=True):
                heapq.heappush(heap, (-g, r))
            continue
        picked.append(row)
        gains.append(-neg_gain)
        left -= cost[row]
        np.maximum(best, (1.0 + (vectors @ vectors[row]).astype(np.float64)) / 2.0, out=best)
        stale[:] = True
    idx = np.array(picked, dtype=np.int64)
    return Selection(idx, np.array(gains, dtype=np.float64), float(cost[idx].sum()) if len(idx) else 0.0)


def random_sample(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct indices of ``range(n)`` drawn with ``seed`` (the baseline a selection is compared with)."""
    return np.sort(np.random.default_rng(seed).permutation(n)[: min(size, n)])


def split_budget(total: float, weights: Mapping[str, float]) -> dict[str, float]:
    """``total`` shared across groups in proportion to ``weights`` (e.g. each group's tokens in the pool); whole
    units by largest remainder (ties to the group named first in sorted order), so the parts add up to ``total``
    when it is whole."""
    names = sorted(weights)
    weight_sum = float(sum(weights[n] for n in names))
    if weight_sum <= 0:
        return dict.fromkeys(names, 0.0)
    exact = [total * weights[n] / weight_sum for n in names]
    floors = [float(np.floor(e)) for e in exact]
    remainder = int(round(float(np.floor(total)) - sum(floors)))
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - floors[i]), i))
    for i in order[: max(remainder, 0)]:
        floors[i] += 1.0
    return dict(zip(names, floors, strict=True))


def nearest_distance(vectors: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Each row's cosine distance to its nearest row among ``chosen`` (indices); inf when nothing is chosen."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(chosen) == 0:
        return np.full(vectors.shape[0], np.inf)
    centres = vectors[np.asarray(chosen, dtype=np.int64)]
    out = np.empty(vectors.shape[0], dtype=np.float64)
    for start in range(0, vectors.shape[0], COVERAGE_BLOCK_ROWS):
        block = vectors[start : start + COVERAGE_BLOCK_ROWS] @ centres.T
        out[start : start + len(block)] = 1.0 - block.max(axis=1)
    return np.maximum(out, 0.0)


def kmeans_labels(vectors: np.ndarray, k: int, seed: int, iterations: int = 25) -> np.ndarray:
    """Spherical k-means (k-means++ seeding, ``iterations`` Lloyd steps on cosine similarity): a cluster label per
    row, deterministic for ``seed``. The clusters stand for "regions of the pool" when counting coverage."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = vectors.shape[0]
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = [int(rng.integers(n))]
    nearest = 1.0 - vectors @ vectors[centres[0]]
    for _ in range(1, k):
        weights = np.maximum(nearest.astype(np.float64), 0.0) ** 2
        total = weights.sum()
        nxt = int(rng.choice(n, p=weights / total)) if total > 0 else int(rng.integers(n))
        centres.append(nxt)
        np.minimum(nearest, 1.0 - vectors @ vectors[nxt], out=nearest)
    centroid = vectors[centres].copy()
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        labels = np.argmax(vectors @ centroid.T, axis=1)
        for c in range(k):
            members = vectors[labels == c]
            if len(members):
                mean = members.sum(axis=0)
                norm = np.linalg.norm(mean)
                centroid[c] = mean / norm if norm > 0 else centroid[c]
    return labels


def cluster_count(n: int) -> int:
    """Clusters used to count coverage of a pool of ``n`` rows: one per 20 rows, between 2 and 100."""
    return max(2, min(100, n // 20))


@dataclass(frozen=True)
class Coverage:
    """How well ``rows`` selected rows cover a pool, against a seeded random sample of the same size."""

    rows: int
    pool_rows: int
    mean_distance: float
    random_mean_distance: float
    max_distance: float
    random_max_distance: float
    clusters: int
    clusters_covered: int
    random_clusters_covered: int

    @property
    def distance_ratio(self) -> float:
        """Selection's mean distance over random's (below 1: the selection covers the pool more closely)."""
        return self.mean_distance / self.random_mean_distance if self.random_mean_distance > 0 else 1.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "rows": self.rows,
            "pool_rows": self.pool_rows,
            "mean_distance": self.mean_distance,
            "random_mean_distance": self.random_mean_distance,
            "distance_ratio": self.distance_ratio,
            "max_distance": self.max_distance,
            "random_max_distance": self.random_max_distance,
            "clusters": self.clusters,
            "clusters_covered": self.clusters_covered,
            "random_clusters_covered": self.random_clusters_covered,
        }


def coverage(vectors: np.ndarray, chosen: Sequence[int] | np.ndarray, seed: int) -> Coverage:
    """:class:`Coverage` of ``chosen`` (indices into ``vectors``) versus ``random_sample`` of the same size and
    seed; clusters from :func:`kmeans_labels` with :func:`cluster_count` clusters and the same seed."""
    chosen = np.asarray(chosen, dtype=np.int64)
    n = vectors.shape[0]
    baseline = random_sample(n, len(chosen), seed)
    labels = kmeans_labels(vectors, cluster_count(n), seed) if n else np.zeros(0, dtype=np.int64)
    clusters = len(np.unique(labels))
    mine = nearest_distance(vectors, chosen) if n and len(chosen) else np.array([np.nan])
    theirs = nearest_distance(vectors, baseline) if n and len(chosen) else np.array([np.nan])
    return Coverage(
        rows=len(chosen),
        pool_rows=n,
        mean_distance=float(mine.mean()),
        random_mean_distance=float(theirs.mean()),
        max_distance=float(mine.max()),
        random_max_distance=float(theirs.max()),
        clusters=clusters,
        clusters_covered=len(np.unique(labels[chosen])) if len(chosen) else 0,
        random_clusters_covered=len(np.unique(labels[baseline])) if len(baseline) else 0,
    )
