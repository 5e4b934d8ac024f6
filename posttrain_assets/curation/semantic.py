"""Semantic near-duplicates: pairs of rows whose embeddings' cosine similarity reaches a threshold.

silver.records is already deduplicated (exact, normalised and MinHash near duplicates are collapsed by the cleaning
pass), so every pair found among its rows is one MinHash did not catch: a paraphrase, a translation-like rewording,
a template filled with other words. Pairs are searched within a regime only, as the cleaning pass does, and RL
prompts must also share their numbers and gold answer (``cleaning.dedup.rl_same_key``), as near dedup requires.

The search compares blocks of rows with all later rows (exact, no index): O(n^2 * dim) per regime, fine for the
hundreds of thousands of rows a curated regime holds on one machine; an approximate index is the next step beyond.
"""

from __future__ import annotations

import numpy as np

# Rows compared at once with the rest of the regime: bounds the similarity block held (rows x n floats).
PAIR_BLOCK_ROWS = 1024


def similar_pairs(vectors: np.ndarray, threshold: float, block_rows: int = PAIR_BLOCK_ROWS) -> np.ndarray:
    """Every ``(i, j, similarity)`` with ``i < j`` and ``vectors[i] . vectors[j] >= threshold``, sorted by (i, j);
    a structured array with fields ``i``, ``j`` (int64) and ``similarity`` (float64). ``block_rows`` changes
    nothing in the result."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the similarity threshold must be in (0, 1], got {threshold}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    found_i, found_j, found_s = [], [], []
    n = vectors.shape[0]
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        sims = vectors[start:stop] @ vectors[start:].T  # each block against itself and every later row
        rows, cols = np.nonzero(sims >= threshold)
        later = cols > rows  # cols are offset by start, like rows: keep j > i, drop the diagonal
        rows, cols = rows[later], cols[later]
        found_i.append(rows + start)
        found_j.append(cols + start)
        found_s.append(sims[rows, cols].astype(np.float64))
    out = np.zeros(sum(len(x) for x in found_i), dtype=[("i", np.int64), ("j", np.int64), ("similarity", np.float64)])
    if len(out):
        out["i"], out["j"], out["similarity"] = (np.concatenate(x) for x in (found_i, found_j, found_s))
        out.sort(order=["i", "j"])
    return out


def group_heads(n: int, pairs: np.ndarray) -> np.ndarray:
    """For each row, the smallest index of its connected group in the graph of ``pairs`` (itself when it is in no
    pair). Rows passed in id order keep their smallest id, as a deterministic choice of which paraphrase stays."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for i, j in zip(pairs["i"].tolist(), pairs["j"].tolist(), strict=True):
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the smaller index stays the root: the root is the group's minimum
    return np.array([find(x) for x in range(n)], dtype=np.int64)
