"""Text folding shared by dedup, tie detection and answer matching."""

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
