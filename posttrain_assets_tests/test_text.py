"""Text folding (posttrain_assets.text): exact folded forms of edge cases, and digests over the vendored real data.

Dedup keys, prompt keys, tie flags and exact_match verdicts are computed from these forms, so the expected values
below are the behaviour stored tables depend on, not a style choice.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator

import pytest

from posttrain_assets.text import fold, fold_bare, strip_punctuation_ends
from posttrain_assets_tests.real_data import REAL_DATA


@pytest.mark.parametrize(
    ("text", "folded", "bare"),
    [
        (None, "", ""),
        ("", "", ""),
        (" \t\n", "", ""),
        ("  Hello\u00a0 WORLD\n\tagain ", "hello world again", "hello world again"),  # NBSP, tab, newline
        ("\u2028line\u2029para", "line para", "line para"),  # line/paragraph separators are whitespace
        ("1\u202f234", "1 234", "1 234"),  # narrow NBSP as a digit group separator
        ("ＦＵＬＬ width \ufb01ne", "full width fine", "full width fine"),  # full-width letters, ligature fi
        ("Ｈｅｌｌｏ，\u3000ｗｏｒｌｄ！", "hello, world!", "hello, world"),  # full-width, ideographic space
        ("\ufb06", "st", "st"),  # ligature st
        ("ｶﾀｶﾅ", "カタカナ", "カタカナ"),  # half-width katakana
        ("Straße", "strasse", "strasse"),  # casefold, not lower
        ("İstanbul", "i\u0307stanbul", "i\u0307stanbul"),  # dotted capital I keeps its dot as a combining mark
        ("ΣΑΣ", "σασ", "σασ"),  # casefold has no final sigma
        ("\u01c5", "d\u017e", "d\u017e"),  # title-case digraph Dž
        ("Cafe\u0301", "café", "café"),  # combining acute composed
        ("\u304b\u3099", "\u304c", "\u304c"),  # combining voiced mark composed
        ("x\u200by", "x\u200by", "x\u200by"),  # zero-width space is neither whitespace nor removed by NFKC
        ("a\u200db", "a\u200db", "a\u200db"),  # zero-width joiner kept
        ("\u00ad soft", "\u00ad soft", "\u00ad soft"),  # soft hyphen kept (category Cf, not P)
        ("x²", "x2", "x2"),  # superscript
        ("½", "1\u20442", "1\u20442"),  # vulgar fraction -> 1 FRACTION SLASH 2
        ("Ⅻ", "xii", "xii"),  # Roman numeral
        ("㎏", "kg", "kg"),  # squared unit
        ("1,234,567.89", "1,234,567.89", "1,234,567.89"),  # separators inside are kept
        ("#### 1,000.", "#### 1,000.", "1,000"),
        ("42.", "42.", "42"),
        ("-42", "-42", "42"),  # a leading minus is punctuation (Pd): exact_match takes -42 and 42 as equal
        ("$\\boxed{42}$", "$\\boxed{42}$", "$\\boxed{42}$"),  # $ is a symbol (Sc), } ends inside it
        ("…", "...", ""),
        ("  «Hello,\t  World!»  ", "«hello, world!»", "hello, world"),
        ("“quoted”", "“quoted”", "quoted"),
        ("¿Qué?", "¿qué?", "qué"),
        ("You're welcome!", "you're welcome!", "you're welcome"),  # inner apostrophe kept
        ("(x)", "(x)", "x"),
        ("a, b!", "a, b!", "a, b"),  # fold keeps all punctuation
    ],
)
def test_fold_and_fold_bare(text: str | None, folded: str, bare: str) -> None:
    assert fold(text) == folded
    assert fold_bare(text) == bare


def test_strip_punctuation_ends() -> None:
    assert strip_punctuation_ends(" ¡¿«a, b!»? ") == "a, b"
    assert strip_punctuation_ends("?!") == ""
    assert strip_punctuation_ends("$5") == "$5"  # symbols are not punctuation


def real_texts() -> Iterator[str]:
    """Every text field of the vendored data sets, in file order."""
    for name in ("train.jsonl", "test.jsonl"):
        for line in (REAL_DATA / "gsm8k" / name).open(encoding="utf-8"):
            row = json.loads(line)
            yield from (row["question"], row["answer"])
    with gzip.open(REAL_DATA / "hh-rlhf/harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            yield from (row["chosen"], row["rejected"])
    for conversation in json.loads((REAL_DATA / "fastchat/dummy_conversation.json").read_text(encoding="utf-8")):
        yield from (turn["value"] for turn in conversation["conversations"])
    for row in json.loads((REAL_DATA / "alpaca/alpaca_data_cleaned_1000.json").read_text(encoding="utf-8")):
        yield from (row["instruction"], row["input"], row["output"])


def test_folding_of_the_real_data_is_pinned() -> None:
    # sha256 of the folded texts joined by NUL, recorded when the four copies of this folding were merged into
    # this module (they gave byte-identical outputs on these texts): a change here changes dedup and prompt keys.
    texts = list(real_texts())
    assert len(texts) == 27_208
    folded = hashlib.sha256("\x00".join(map(fold, texts)).encode("utf-8")).hexdigest()
    bare = hashlib.sha256("\x00".join(map(fold_bare, texts)).encode("utf-8")).hexdigest()
    assert folded == "d29c97016f9a043b99de0fee0f7b94b50f09074d5f15c7e412301eb38e5f2b75"
    assert bare == "274537ef4882312b7391dcfc9c1fb7e1d2aeaf7982a70a646baa3b6fbbdf15d7"
