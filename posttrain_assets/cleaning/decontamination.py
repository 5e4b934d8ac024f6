"""Decontamination: find training rows that share word n-grams with evaluation rows (pure logic).

Texts are compared as word n-grams of their normalised form: :func:`posttrain_assets.text.fold`
(NFKC, casefold, whitespace collapsed), then words are the runs of Unicode word characters (``\\w+``), so
punctuation and spacing never hide a copy (``"$18."`` and ``"18"`` are the same word). Each n-gram is
hashed to a 64-bit int (blake2b), and an :class:`EvalIndex` maps every n-gram of every evaluation
prompt and answer to the eval rows it came from. n = 13 by default (the GPT-3 / Llama decontamination
choice): long enough that a shared 13-gram is a copy, not a common phrase.

Short texts: a text with fewer than n words has no n-gram. A training text that short matches when its
whole normalised word sequence equals a whole evaluation prompt (so a short copied question such as
"What is 7 times 8?" is still caught); short eval answers (GSM8K's ``72``) are never matched on their
own, since equal short answers are no evidence of a copy.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from posttrain_assets.text import fold

Record = dict[str, Any]
_WORD = re.compile(r"\w+")
DEFAULT_N = 13


def words(text: str | None) -> list[str]:
    """The normalised words of a text (``\\w+`` runs of ``fold(text)``)."""
    return _WORD.findall(fold(text))


def _hash(gram: str) -> int:
    return int.from_bytes(hashlib.blake2b(gram.encode("utf-8"), digest_size=8).digest(), "little")


def _ngram_hashes(ws: list[str], n: int) -> list[int]:
    """``[_hash(gram) for gram in n-grams of ws]``, with :func:`_hash` inlined (the hot loop of decontamination)."""
    blake2b, from_bytes, join = hashlib.blake2b, int.from_bytes, " ".join
    return [
        from_bytes(blake2b(join(ws[i : i + n]).encode("utf-8"), digest_size=8).digest(), "little")
        for i in range(len(ws) - n + 1)
    ]


def word_ngrams(text: str | None, n: int = DEFAULT_N) -> set[int]:
    """64-bit hashes of the normalised word n-grams of ``text`` (empty when it has fewer than n words)."""
    return set(_ngram_hashes(words(text), n))


def eval_fields(record: Record) -> Iterator[tuple[str, str]]:
    """(field, text) pairs of an eval row that are indexed: ``prompt``, and ``answer`` = the reference
    output (sft response, preference chosen and rejected, rl answer)."""
    yield "prompt", record.get("prompt") or ""
    for key in ("response", "chosen", "rejected", "answer"):
        if record.get(key):
            yield "answer", record[key]


def training_fields(record: Record) -> Iterator[tuple[str, str]]:
    """(field, text) pairs of a training row that are checked.

    Every turn of ``messages`` (``messages[i]``: sft the whole conversation, preference/rl the prompt
    conversation), then preference ``chosen`` and ``rejected``, rl ``answer``.
    """
    for i, m in enumerate(record.get("messages") or []):
        yield f"messages[{i}]", m["content"]
    regime = record.get("regime")
    keys = ("chosen", "rejected") if regime == "preference" else ("answer",) if regime == "rl" else ()
    for key in keys:
        if record.get(key):
            yield key, record[key]


@dataclass(frozen=True)
class Match:
    """One training field overlapping one eval row.

    ``benchmark``: the eval row's source; ``eval_id``: its id; ``field``: the training field
    (``messages[2]``, ``chosen``, ``answer``, ...); ``eval_field``: ``prompt`` or ``answer``;
    ``shared_ngrams``: distinct shared n-grams (0 for a whole-text match of a short text);
    ``ngram_text``: the first shared n-gram as normalised words (the whole text for a short match).
    """

    benchmark: str
    eval_id: str
    field: str
    eval_field: str
    shared_ngrams: int
    ngram_text: str


@dataclass
class EvalIndex:
    """n-gram index of evaluation rows: n-gram hash -> eval entries; short eval prompts by whole text."""

    n: int = DEFAULT_N
    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (benchmark, eval_id, eval_field)
    postings: dict[int, list[int]] = field(default_factory=dict)
    short_prompts: dict[str, list[int]] = field(default_factory=dict)
    eval_rows: dict[str, int] = field(default_factory=dict)  # benchmark -> indexed eval rows

    @classmethod
    def build(cls, eval_records: Iterable[Record], n: int = DEFAULT_N) -> EvalIndex:
        """Index the prompt and the answer/response text of every eval row (benchmark = its ``source``)."""
        index = cls(n=n)
        postings: dict[int, list[int]] = defaultdict(list)
        for rec in eval_records:
            benchmark = rec["source"]
            index.eval_rows[benchmark] = index.eval_rows.get(benchmark, 0) + 1
            for eval_field, text in eval_fields(rec):
                entry = len(index.entries)
                index.entries.append((benchmark, rec["id"], eval_field))
                ws = words(text)
                for h in set(_ngram_hashes(ws, n)):
                    postings[h].append(entry)
                if eval_field == "prompt" and ws and len(ws) < n:
                    index.short_prompts.setdefault(" ".join(ws), []).append(entry)
        index.postings = dict(postings)
        return index

    def is_empty(self) -> bool:
        """Whether nothing can match: no n-gram postings and no short prompts (e.g. no eval rows at all)."""
        return not self.postings and not self.short_prompts

    def matches(self, record: Record) -> list[Match]:
        """Every (training field, eval entry) overlap of one training row, in field then entry order."""
        out: list[Match] = []
        if self.is_empty():
            return out
        for fname, text in training_fields(record):
            ws = words(text)
            if len(ws) < self.n:
                for entry in self.short_prompts.get(" ".join(ws), []) if ws else []:
                    benchmark, eval_id, eval_field = self.entries[entry]
                    out.append(Match(benchmark, eval_id, fname, eval_field, 0, " ".join(ws)))
                continue
            shared: dict[int, set[int]] = defaultdict(set)
            first: dict[int, int] = {}
            for pos, h in enumerate(_ngram_hashes(ws, self.n)):
                for entry in self.postings.get(h, ()):
                    shared[entry].add(h)
                    first.setdefault(entry, pos)
            for entry in sorted(shared):
                benchmark, eval_id, eval_field = self.entries[entry]
                pos = first[entry]
                gram = " ".join(ws[pos : pos + self.n])
                out.append(Match(benchmark, eval_id, fname, eval_field, len(shared[entry]), gram))
        return out


def contamination_matches(records: Iterable[Record], index: EvalIndex) -> list[dict[str, Any]]:
    """One dict per match: ``id``, ``source`` of the training row plus the :class:`Match` fields.

    ``[]`` without looking at the records when the index is empty.
    """
    if index.is_empty():
        return []
    rows = []
    for rec in records:
        for m in index.matches(rec):
            rows.append({"id": rec["id"], "source": rec["source"], **m.__dict__})
    return rows


def contamination_report(
    records: Iterable[Record], index: EvalIndex, matches: Iterable[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Per-benchmark report rows, sorted by benchmark.

    ``benchmark``; ``eval_rows`` (indexed); ``eval_rows_hit`` (eval rows sharing an n-gram or short
    prompt with some training row); ``training_rows`` (contaminated training rows); ``by_source``
    (training source -> contaminated rows); ``sample_ids`` (up to 10 contaminated training ids, sorted).

    ``matches``: the :func:`contamination_matches` of the same ``records`` and ``index`` when already
    computed; the report is then built from them and ``records`` is not scanned again (it is also not
    scanned when the index is empty). :func:`contamination_scan` returns both in one pass.
    """
    if matches is None:
        matches = contamination_matches(records, index)
    hit_eval: dict[str, set[str]] = defaultdict(set)
    hit_train: dict[str, set[str]] = defaultdict(set)
    by_source: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for m in matches:
        benchmark = m["benchmark"]
        hit_eval[benchmark].add(m["eval_id"])
        hit_train[benchmark].add(m["id"])
        by_source[benchmark][m["source"]].add(m["id"])
    return [
        {
            "benchmark": b,
            "eval_rows": index.eval_rows[b],
            "eval_rows_hit": len(hit_eval[b]),
            "training_rows": len(hit_train[b]),
            "by_source": {s: len(ids) for s, ids in sorted(by_source[b].items())},
            "sample_ids": sorted(hit_train[b])[:10],
        }
        for b in sorted(index.eval_rows)
    ]


def contamination_scan(
    records: Iterable[Record], index: EvalIndex
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(contamination_matches(records, index), contamination_report(records, index))`` with one n-gram pass."""
    matches = contamination_matches(records, index)
    return matches, contamination_report((), index, matches=matches)
