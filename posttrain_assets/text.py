"""Text folding: the one comparison form of text used across the pipeline.

Two variants, which differ on purpose:

- :func:`fold` keeps all punctuation. Dedup units and their shingles (``cleaning.dedup``), eval n-grams
  (``cleaning.decontamination``) and the quality gate's identical-pair test compare whole documents, where
  a trailing "!" is part of the text.
- :func:`fold_bare` also strips punctuation at both ends. Final answers (``rl.verifiers`` exact_match) and
  preference tie detection (``preference.audit.is_tie``) compare short replies, where ``"Paris."`` and
  ``"paris"`` are the same answer.

Dedup keys, content hashes, tie flags and verifier verdicts are computed from these forms, so any change
here changes stored tables.
"""

from __future__ import annotations

import unicodedata


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
