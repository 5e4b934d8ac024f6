"""Embedder and diversity selection on the vendored real data: determinism, budgets, coverage against random."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from posttrain_assets.curation import selection as sel
from posttrain_assets.curation.embedder import MODEL_NAME, load_embedder
from posttrain_assets_tests.real_data import REAL_DATA


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


def real_texts() -> tuple[list[str], list[str]]:
    """GSM8K questions, Alpaca instructions and HumanEval prompts (400 + 400 + 164 rows), with their source."""
    gsm8k = [json.loads(line)["question"] for line in (REAL_DATA / "gsm8k/train.jsonl").open()][:400]
    alpaca = json.loads((REAL_DATA / "alpaca/alpaca_data_cleaned_1000.json").read_text())[:400]
    alpaca_texts = [r["instruction"] + ("\n" + r["input"] if r["input"] else "") for r in alpaca]
    with gzip.open(REAL_DATA / "humaneval/HumanEval.jsonl.gz", "rt") as handle:
        humaneval = [json.loads(line)["prompt"] for line in handle]
    texts = gsm8k + alpaca_texts + humaneval
    return texts, ["gsm8k"] * 400 + ["alpaca"] * 400 + ["humaneval"] * len(humaneval)


@pytest.fixture(scope="module")
def real_vectors(embedder) -> tuple[np.ndarray, np.ndarray]:
    texts, sources = real_texts()
    return embedder.embed(texts), np.array(sources)


def test_embedder_identity_and_unit_vectors(embedder) -> None:
    ident = embedder.identity.to_dict()
    assert ident["name"] == MODEL_NAME
    assert ident["version"] == "0.4.0.post1"
    # The wheel's files, pinned: a changed model changes every row's model_sha256.
    assert ident["weights_sha256"] == "64b47a2dc493cb8e85944076601189739852d7b64e0e1eedcb1937a251cd9fd5"
    assert ident["model_sha256"] == "67f1fdb125ea37419d0c45915658529f6287fae2f9d33328fd7ad0838d744c59"
    vectors = embedder.embed(["The cat sat on the mat.", "A cat was sitting on a mat.", "Revenue grew 5%.", ""])
    assert vectors.shape == (4, 256)
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, rtol=1e-5)
    assert not vectors[3].any()  # no token: the zero vector, nobody's duplicate
    sims = vectors @ vectors.T
    assert sims[0, 1] > 0.8 > 0.1 > sims[0, 2]  # the paraphrase is far closer than the unrelated sentence


def test_embeddings_do_not_depend_on_the_batch(embedder) -> None:
    texts, _ = real_texts()
    whole = embedder.embed(texts[:300])
    pieces = np.concatenate([embedder.embed(texts[i : min(i + 7, 300)], batch_rows=3) for i in range(0, 300, 7)])
    assert np.array_equal(whole, pieces)


def test_nearest_neighbours_stay_within_their_source(real_vectors) -> None:
    vectors, sources = real_vectors
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -2)
    purity = float(np.mean(sources[np.argmax(sims, axis=1)] == sources))
    assert purity == pytest.approx(0.907, abs=0.002)  # 874 of 964


@pytest.mark.parametrize("method", sel.METHODS)
def test_selection_is_deterministic_and_covers_more_than_random_at_half_budget(real_vectors, method) -> None:
    vectors, _ = real_vectors
    half = len(vectors) // 2
    first = sel.select(vectors, half, method=method, seed=7)
    again = sel.select(vectors, half, method=method, seed=7)
    assert np.array_equal(first.indices, again.indices)
    assert np.array_equal(first.gains, again.gains, equal_nan=True)
    assert len(first) == half == len(set(first.indices.tolist()))
    cov = sel.coverage(vectors, first.indices, seed=7)
    assert cov.rows == half and cov.pool_rows == len(vectors)
    if method == "facility_location":
        # What it optimises: the mean distance to the nearest selected row, far below random's.
        assert cov.mean_distance < 0.85 * cov.random_mean_distance
        assert (round(cov.mean_distance, 3), round(cov.random_mean_distance, 3)) == (0.207, 0.256)
        assert np.all(np.diff(first.gains) <= 1e-9)  # submodular: gains never grow
    else:
        # What k-center optimises: the largest distance (the covering radius), far below random's.
        assert cov.max_distance < 0.8 * cov.random_max_distance
        assert cov.mean_distance < cov.random_mean_distance
        assert np.isnan(first.gains[0]) and np.all(np.diff(first.gains[1:]) <= 1e-9)
    assert cov.clusters_covered >= cov.random_clusters_covered


def test_token_budget_is_filled_never_exceeded(real_vectors) -> None:
    vectors, _ = real_vectors
    costs = np.arange(len(vectors)) % 50 + 10  # 10..59 tokens
    for method in sel.METHODS:
        chosen = sel.select(vectors, 2000, costs=costs, method=method, seed=1)
        assert chosen.cost == costs[chosen.indices].sum() <= 2000
        left = 2000 - chosen.cost
        unchosen = np.setdiff1d(np.arange(len(vectors)), chosen.indices)
        assert costs[unchosen].min() > left  # nothing else would have fitted


def test_small_hand_checked_k_center() -> None:
    # Four points on a circle and one near the first: farthest-first from point 0 goes to its opposite, then to the
    # two sides; the near twin comes last (its gain is its small distance to point 0).
    angles = np.array([0.0, np.pi, np.pi / 2, 3 * np.pi / 2, 0.1])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    chosen = sel.select(vectors, 5, method="k_center", seed=0)
    first = int(chosen.indices[0])
    assert len(chosen) == 5
    assert chosen.indices[-1] in ({0, 4} - {first}) or first in (0, 4)
    np.testing.assert_allclose(chosen.gains[-1], 1 - np.cos(0.1), atol=1e-6)


def test_split_budget_adds_up() -> None:
    assert sel.split_budget(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4.0, "b": 3.0, "c": 3.0}
    assert sel.split_budget(100, {"x": 3, "y": 1}) == {"x": 75.0, "y": 25.0}


def test_bad_arguments_are_named() -> None:
    vectors = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="unknown selection method 'greedy'"):
        sel.select(vectors, 1, method="greedy")
    with pytest.raises(ValueError, match="one value per row"):
        sel.select(vectors, 1, costs=np.ones(2))
