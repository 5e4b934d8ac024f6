"""Text folding: the one comparison form of text used across the pipeline.

Two variants, which differ on purpose:

- :func:`fold` keeps all punctuation. Dedup units and their shingles (``cleaning.dedup``), eval n-grams
  (``cleaning.decontamination``) and the quality gate's identical-pair test compare whole documents, where
  a trailing "!" is part of the text.
- :func:`fold_bare` also strips punctuation at both ends. Final answers (``rl.verifiers`` exact_match) and
  preference tie detection (:func:`is_tie`) compare short replies, where ``"Paris."`` and
  ``"paris"`` are the same answer.

Dedup keys, content hashes, tie flags and verifier verdicts are computed from these forms, so any change
here changes stored tables.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable

from rapidfuzz.distance import Indel

# Similarity at or above which chosen and rejected are the same answer (the preference tie flag).
DEFAULT_TIE_SIMILARITY = 0.95


def fold(text: str | None) -> str:
    """The comparison form of a text: Unicode NFKC, then ``str.casefold``, then whitespace runs collapsed.

    NFKC folds compatibility forms (full-width letters, ligatures, non-breaking spaces) onto their plain
    equivalents; casefold is Unicode-aware lower-casing (``"Straße"`` -> ``"strasse"``); every run of Unicode
    whitespace becomes one space and the ends are stripped. Punctuation is kept. ``None`` is the empty string.
    """
    if not text:
        return ""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def strip_punctuation_ends(text: str) -> str:
    """``text`` without punctuation (Unicode category P*) and whitespace at either end."""
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[start:end]


def fold_bare(text: str | None) -> str:
    """:func:`fold`, then punctuation stripped at both ends (``"You're welcome!"`` -> ``"you're welcome"``)."""
    return strip_punctuation_ends(fold(text))


def text_similarity(a: str, b: str) -> float:
    """Indel similarity of two strings, in [0, 1]: ``2 * LCS(a, b) / (len(a) + len(b))``, 1.0 when equal.

    LCS is the longest common subsequence of characters, so this is ``1 - indel_distance / (len(a) + len(b))``
    with the indel distance the fewest single-character insertions and deletions turning one text into the
    other (``rapidfuzz.distance.Indel``, the measure of ``rapidfuzz.fuzz.ratio``). It is what difflib's
    ``SequenceMatcher.ratio`` approximates; difflib's matching blocks are a common subsequence, so difflib's
    ratio is never higher, and the two agree when the differences are few and local.
    """
    if a == b:
        return 1.0
    total = len(a) + len(b)
    # The integer distance, divided here: Indel.normalized_similarity computes 1 - distance / total, which is
    # often one ulp away from 2 * LCS / total.
    return (total - Indel.distance(a, b)) / total


def _max_tie_distance(total: int, similarity: float) -> int:
    """The largest indel distance ``d`` in ``0..total`` whose :func:`text_similarity`, ``(total - d) / total``,
    is still ``>= similarity``; -1 when no ``d`` is (``similarity`` above 1).

    Stepped from the estimate ``(1 - similarity) * total`` with that same float comparison, so a pair exactly at
    the threshold is decided like its similarity value, whatever the rounding of the estimate.
    """
    distance = min(max(math.floor((1.0 - similarity) * total), 0), total)
    while distance < total and (total - distance - 1) / total >= similarity:
        distance += 1
    while distance >= 0 and (total - distance) / total < similarity:
        distance -= 1
    return distance


def is_tie(
    chosen: str | None,
    rejected: str | None,
    similarity: float = DEFAULT_TIE_SIMILARITY,
    *,
    folding: Callable[[str | None], str] = fold_bare,
) -> bool:
    """Whether chosen and rejected are the same answer: their ``folding`` forms are equal or have
    :func:`text_similarity` >= ``similarity`` (see the module docstring). The one tie rule of the project.

    The defaults are the preference tie flag (``is_tie`` of silver.preference_pairs, the length gate's tie
    rate): :func:`posttrain_assets.text.fold_bare`, similarity 0.95. The quality gate drops only identical
    pairs: ``similarity=1.0`` with :func:`posttrain_assets.text.fold`, which keeps end punctuation.

    Decided on the integer indel distance with ``score_cutoff``, so rapidfuzz stops as soon as the threshold is
    out of reach and strips the common prefix and suffix itself, so long near-identical replies are cheap.
    ``Indel.normalized_similarity(score_cutoff=...)`` is not used: rapidfuzz 3.14.6 answers 0.0 for some pairs
    exactly at the threshold (``"aaaaa"`` vs ``"aaaab"`` has similarity 0.8 but 0.0 with cutoff 0.8).
    """
    if chosen == rejected:  # skips folding; also None vs None
        return True
    a, b = folding(chosen), folding(rejected)
    if a == b:
        return True
    total = len(a) + len(b)
    max_distance = _max_tie_distance(total, similarity)
    return max_distance >= 0 and Indel.distance(a, b, score_cutoff=max_distance) <= max_distance
