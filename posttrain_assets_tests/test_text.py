"""Text folding and the tie rule (posttrain_assets.text): exact folded forms of edge cases, digests over the
vendored real data, the exact indel similarity and tie verdicts.

Dedup keys, prompt keys, tie flags and exact_match verdicts are computed from these forms, so the expected values
below are the behaviour stored tables depend on, not a style choice.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Iterator

import pytest

from posttrain_assets.text import fold, fold_bare, is_tie, strip_punctuation_ends, text_similarity
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


# ---------------------------------------------------------------------------------------------------------------
# the tie rule
# ---------------------------------------------------------------------------------------------------------------


def test_hh_rlhf_transcript_similarities_are_pinned() -> None:
    # The 2312 whole transcripts of each pair share their conversation up to the last turn, so their similarities
    # spread over the whole range. The counts and the sum were recorded with the hand-written bit-parallel LCS
    # that rapidfuzz's Indel distance replaced (identical floats and verdicts at 0.5 to 1.0 on these pairs).
    with gzip.open(REAL_DATA / "hh-rlhf/harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    assert len(rows) == 2312
    similarities = [text_similarity(fold_bare(row["chosen"]), fold_bare(row["rejected"])) for row in rows]
    assert sum(similarities) == 1775.630414533872
    ties = {s: sum(is_tie(row["chosen"], row["rejected"], s) for row in rows) for s in (0.5, 0.8, 0.9, 0.95, 0.99)}
    assert ties == {0.5: 2144, 0.8: 1214, 0.9: 478, 0.95: 144, 0.99: 7}
    assert ties == {s: sum(similarity >= s for similarity in similarities) for s in ties}


def _lcs_dp(a: str, b: str) -> int:
    """Longest common subsequence length by the textbook dynamic programme (the reference)."""
    previous = [0] * (len(b) + 1)
    for ca in a:
        current = [0]
        for j, cb in enumerate(b):
            current.append(previous[j] + 1 if ca == cb else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def test_text_similarity_is_the_exact_indel_similarity() -> None:
    rng = random.Random(11)
    for _ in range(400):
        a = "".join(rng.choice("abcé ") for _ in range(rng.randint(0, 30)))
        b = "".join(rng.choice("abcé ") for _ in range(rng.randint(0, 30)))
        expected = 1.0 if a == b else 2 * _lcs_dp(a, b) / (len(a) + len(b))
        assert text_similarity(a, b) == expected  # the same float, not just close
    # "hello, world" vs "hello world": LCS 11 of 12 + 11 characters
    assert text_similarity("hello, world", "hello world") == 22 / 23
    # 2 * 1 / 3 = 0.6666666666666666, where 1 - 1 / 3 (rapidfuzz's normalized_similarity) is 0.6666666666666667
    assert text_similarity("ab", "a") == 2 / 3


def test_is_tie_exactly_at_the_threshold() -> None:
    # LCS 4 of 5 + 5 characters: similarity exactly 0.8 (rapidfuzz's normalized_similarity with score_cutoff=0.8
    # answers 0.0 here; is_tie works on the integer distance)
    assert text_similarity("aaaaa", "aaaab") == 0.8
    assert is_tie("aaaaa", "aaaab", 0.8)
    assert not is_tie("aaaaa", "aaaab", 0.8000000000000002)
    # LCS 19 of 20 + 20: exactly 0.95, the default
    assert is_tie("a" * 20, "a" * 19 + "b")
    assert not is_tie("a" * 20, "a" * 18 + "bb")
    assert is_tie("abc", "xyz", 0.0) and not is_tie("abc", "abd", 1.0) and not is_tie("abc", "abd", 1.5)


def test_quality_gate_ties_keep_end_punctuation() -> None:
    # the quality gate's use of the rule: identical after fold (punctuation kept); real HH-RLHF row 74
    chosen, rejected = "You’re welcome.", "You’re welcome!"
    assert not is_tie(chosen, rejected, similarity=1.0, folding=fold)
    assert is_tie(chosen, rejected, similarity=1.0) and is_tie(chosen, rejected)
    assert is_tie("Glucose, mostly.", "glucose,   MOSTLY.", similarity=1.0, folding=fold)
    assert is_tie(None, None, similarity=1.0, folding=fold) and is_tie(None, "", similarity=1.0, folding=fold)


def test_is_tie_agrees_with_the_definition() -> None:
    rng = random.Random(5)
    for _ in range(400):
        base = "".join(rng.choice("abcd ") for _ in range(rng.randint(1, 50)))
        other = list(base)
        for _ in range(rng.randint(0, 4)):  # a few random insertions, deletions, substitutions
            i = rng.randrange(len(other) + 1)
            op = rng.random()
            if op < 0.33:
                other.insert(i, rng.choice("abcd "))
            elif other:
                j = min(i, len(other) - 1)
                if op < 0.66:
                    other.pop(j)
                else:
                    other[j] = rng.choice("abcd")
        a, b = fold_bare(base), fold_bare("".join(other))
        for similarity in (0.8, 0.9, 0.95):
            want = a == b or 2 * _lcs_dp(a, b) / (len(a) + len(b)) >= similarity
            assert is_tie(base, "".join(other), similarity) == want


def test_is_tie_on_long_near_identical_replies() -> None:
    rng = random.Random(2)
    vocab = ["the", "plant", "uses", "light", "water", "to", "make", "sugar", "and", "oxygen", "quickly"]
    reply = " ".join(rng.choice(vocab) for _ in range(4000))  # ~20,000 characters
    words_ = reply.split()
    words_[1000] = "zzzz"
    words_[3000] = "yyyyy"
    near = " ".join(words_)
    assert is_tie(reply, near)  # 2 words changed in ~20k characters
    assert is_tie(reply + " One more sentence at the end.", reply)
    assert not is_tie(reply, " ".join(rng.choice(vocab) for _ in range(4000)))  # same vocabulary, other text
    assert not is_tie(reply, reply[: len(reply) // 2])
