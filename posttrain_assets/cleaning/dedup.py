"""Exact-normalised and near-duplicate detection over silver rows (pure logic: no Dagster, no DuckDB).

Input everywhere is silver rows as dicts with the canonical keys of ``catalogue.RECORD_COLUMNS``. Exact
duplicates (identical content) are already collapsed upstream by content id; this module finds what is
left:

1. **Exact after normalisation** (method ``exact_normalized``): two rows whose dedup units are equal
   after :func:`posttrain_assets.text.fold` (differences of case, whitespace or Unicode form only), keyed by
   :func:`exact_key`.
2. **Near duplicates** (method ``near``): MinHash signatures of 2-word shingles of the dedup unit give
   candidate pairs from ``datasketch.MinHashLSH`` (a wide net); every candidate is then verified on the
   pair itself (:class:`MinHashConfig`): exact Jaccard of 5-word shingle sets ``>= 0.7`` (the original
   rule, strict on short texts), or, for units of 40+ words, token-level **edit similarity**
   ``1 - Levenshtein(words_a, words_b) / max(len_a, len_b) >= 0.8`` (the EditSim check that Lee et al.
   2022, *Deduplicating Training Data Makes Language Models Better*, run on MinHash matches). A copy with
   a fraction ``f`` of its words replaced has edit similarity ``>= 1 - f`` however the edits are spread,
   where shingle Jaccard falls fast (15% of words edited in runs: 5-shingle Jaccard about 0.6-0.7;
   scattered: about 0.3). Verified pairs are joined into clusters with union-find.

Both run per regime: dedup units of different regimes are never compared. In each cluster one row is
kept by :func:`kept_sort_key`; every other member is reported with the kept row's id. Prompts that
appear in more than one regime are not dropped here but reported by the cleaning pass (keyed by :func:`prompt_key`).

Signatures are bit-identical to ``datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash32,
scheme=cfg.scheme)`` updated with the same shingles (:func:`shingle_hash32` combines per-word SHA-1
hashes, so each distinct word is hashed once and whole batches are hashed in numpy), so they can be
wrapped as ``datasketch.LeanMinHash(seed=cfg.seed, hashvalues=sig, scheme=cfg.scheme)`` and put into any
``MinHashLSH`` index. Candidate pairs come from the same banding as ``MinHashLSH`` (its ``b`` bands of
``r`` rows for the configured threshold), computed with numpy sorts over all signatures at once
(:func:`candidate_pairs`), so a million rows never become a million Python objects in an index.

Everything here holds its rows in memory (:func:`deduplicate`, :func:`near_duplicate_clusters`). The silver pass
runs the same steps with the same rules over DuckDB work tables instead (``cleaning.dedup_tables``: band keys in a
table, candidates from SQL, verification in worker processes), so a regime's rows are never all in Python; tests
hold the two to the same outcome.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import defaultdict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from rapidfuzz.distance import Levenshtein

from posttrain_assets.text import fold

Record = dict[str, Any]
Priority = Callable[[str], int]

METHOD_EXACT = "exact_normalized"
METHOD_NEAR = "near"

# The permutation schemes of datasketch 2.x: "affine32" (its default, uint32 values) and "legacy"
# (the only scheme of datasketch < 2.0, uint64 storage of 32-bit values).
Scheme = Literal["affine32", "legacy"]
_MERSENNE_PRIME = np.uint64((1 << 61) - 1)
_MAX_HASH_32 = np.uint64((1 << 32) - 1)
# MurmurHash3 32-bit finalizer constants (datasketch's pre-mix for the affine32 scheme).
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))


# ---------------------------------------------------------------------------------------------------------------
# normalisation and dedup units
# ---------------------------------------------------------------------------------------------------------------


def _conversation_text(messages: Iterable[dict[str, Any]] | None) -> str:
    return "\n".join(_turn_text(m) for m in (messages or []))


def _turn_text(message: dict[str, Any]) -> str:
    """``role: content``, then the turn's reasoning and tool calls when it has them (two agent trajectories that
    differ only in a call's arguments are different data, not duplicates); a plain turn's text is unchanged."""
    text = f"{message['role']}: {message['content']}"
    if message.get("reasoning_content"):
        text += f"\nreasoning: {message['reasoning_content']}"
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        text += f"\ncall: {function.get('name')} {function.get('arguments')}"
    return text


def dedup_unit(record: Record) -> str:
    """The text that is deduplicated for one row, per regime.

    - sft: the whole conversation, every turn as ``role: content`` on its own line (with its reasoning and tool
      calls, when it has them).
    - preference: the prompt conversation as above, then ``chosen: ...`` and ``rejected: ...``; the pair
      is one unit, so it is kept or dropped whole, never split.
    - rl: the prompt (the last user turn, ``record["prompt"]``).
    """
    regime = record["regime"]
    if regime == "sft":
        return _conversation_text(record["messages"])
    if regime == "preference":
        conversation = _conversation_text(record["messages"])
        return f"{conversation}\nchosen: {record.get('chosen') or ''}\nrejected: {record.get('rejected') or ''}"
    if regime == "rl":
        return record.get("prompt") or ""
    raise ValueError(f"unknown regime {regime!r}")


def guard_text(record: Record) -> str | None:
    """For preference pairs, the two responses: a near-duplicate pair must also match on these.

    Without it a pair with a long shared prompt and short, different responses would reach the
    threshold on the prompt alone; two pairs that share the prompt but not the responses are distinct
    training signal and must both be kept.
    """
    if record["regime"] != "preference":
        return None
    return f"chosen: {record.get('chosen') or ''}\nrejected: {record.get('rejected') or ''}"


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def rl_same_key(record: Record) -> Hashable | None:
    """For RL prompts, what two near duplicates must share exactly: the numbers of the prompt, in order,
    and the normalised gold answer. Templated problems differ in a number or ask for another quantity
    ("area" vs "hypotenuse" of the same triangle) while their texts stay within a word or two of each
    other; they are different tasks, and their answers or numbers tell them apart.
    """
    if record["regime"] != "rl":
        return None
    return (tuple(_NUMBER.findall(record.get("prompt") or "")), fold(record.get("answer")))


def exact_key(record: Record) -> str:
    """sha256 (hex) of the normalised dedup unit; equal keys = duplicates up to case, whitespace and Unicode form."""
    unit = f"{record['regime']}\x00{fold(dedup_unit(record))}"
    return hashlib.sha256(unit.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# MinHash signatures
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MinHashConfig:
    """Parameters of near-duplicate detection.

    A candidate pair (see ``candidate_shingle_words``) is a near duplicate when either rule holds:

    1. **shingle rule**: the exact Jaccard similarity of the two units' ``shingle_words``-word shingle
       sets is ``>= threshold`` (computed on the pair). A changed word changes ``shingle_words`` shingles,
       so this rule is strict on short texts and on scattered edits.
    2. **edit rule** (off when ``edit_threshold`` is None): the token-level edit similarity
       (:func:`edit_similarity`) is ``>= edit_threshold``, for pairs whose shorter unit has at least
       ``min_words`` words (or that share a same key, see :func:`near_duplicate_clusters`). A copy with a
       fraction ``f`` of its words replaced, inserted or deleted scores ``>= 1 - f`` however the edits are
       spread; at 0.8 the planted 5-15% edits pass with a margin while unrelated texts built from the
       same templates stay far below (about 0.3-0.6 on the benchmark generator and the demo data).
       Short units are left to rule 1: in a 20-word instruction one word or number is 5% of the text,
       and templated short rows ("Classify the sentiment ... The blender: ..." vs "... The bike: ...",
       FastChat's identity chats) are edit-similar but distinct.

    Fields:

    - ``shingle_words``: words per shingle of rule 1; a text with fewer words is one shingle (the whole
      normalised text).
    - ``threshold``: the Jaccard threshold of rule 1. 0.7 with 5-word shingles: copies with 5-10% of
      their words reworded in one or two runs in texts of 100+ words.
    - ``edit_threshold``, ``min_words``: rule 2.
    - ``candidate_shingle_words``: words per shingle of the MinHash signatures that feed
      ``datasketch.MinHashLSH`` (the candidate net). Two words: 15% scattered single-word edits still
      leave a 2-shingle Jaccard of about 0.55 (5-word shingles: about 0.3).
    - ``num_perm``: MinHash permutations (signature length); the estimate's standard error is about
      ``sqrt(J (1 - J) / num_perm)``, 0.04 at J = 0.7 with 128.
    - ``lsh_threshold``: the threshold MinHashLSH's banding is tuned for (None: derived, see
      :meth:`effective_lsh_threshold`); it only sets how wide the candidate net is, every candidate is
      verified by the rules.
    - ``seed``: datasketch's permutation seed (same seed, same permutations as ``datasketch.MinHash``).
    - ``scheme``: datasketch's permutation scheme, ``affine32`` (its default since 2.0, uint32) or
      ``legacy`` (datasketch < 2.0, uint64).
    - ``batch_shingles``: shingles permuted per numpy batch (memory: batch_shingles * num_perm * 4-8 bytes).
    """

    shingle_words: int = 5
    num_perm: int = 128
    threshold: float = 0.7
    edit_threshold: float | None = 0.8
    min_words: int = 40
    candidate_shingle_words: int = 2
    lsh_threshold: float | None = None
    seed: int = 1
    scheme: Scheme = "affine32"
    # 16,384 shingles: 8 MiB of permuted values per batch at 128 permutations. A process signing a batch of 4,096
    # multi-turn chats of the benchmark corpus peaked at 503 MiB with 1 << 16, 300 MiB with this and the in-place
    # _permute (measured), no slower: a batch is still far above numpy's per-call overhead.
    batch_shingles: int = 1 << 14

    def candidate_jaccard(self) -> float:
        """The candidate-shingle Jaccard similarity of the weakest pair the rules should accept.

        Rule 1: ``threshold`` (a conservative bound when candidate shingles are no longer than
        ``shingle_words``). Rule 2: the expected Jaccard of a copy with ``1 - edit_threshold`` of its words
        replaced one by one, scattered (the worst spread for shingles): each candidate shingle survives with
        probability ``p = edit_threshold ** candidate_shingle_words``, so J = p / (2 - p) (0.47 for
        2-word shingles at 0.8).
        """
        if self.edit_threshold is None:
            return self.threshold
        p = self.edit_threshold**self.candidate_shingle_words
        return min(self.threshold, p / (2.0 - p))

    def effective_lsh_threshold(self) -> float:
        """The MinHashLSH threshold actually used: ``lsh_threshold``, else :meth:`candidate_jaccard` - 0.15.

        datasketch's threshold is the crossover of its banding's S-curve; 0.15 below it, pairs at the
        weakest accepted similarity become candidates with probability about 0.98 (2-word shingles, 128
        permutations, edit threshold 0.8: 37 bands of 3 rows).
        """
        if self.lsh_threshold is not None:
            return self.lsh_threshold
        return max(0.05, self.candidate_jaccard() - 0.15)


def shingles(text: str, shingle_words: int = 5) -> list[str]:
    """Word shingles of ``fold(text)``: every run of ``shingle_words`` words, joined by a space.

    Fewer words than ``shingle_words``: the whole normalised text is the only shingle; an empty text has
    none. Duplicates are kept (the signature treats them as one set element).
    """
    words = fold(text).split(" ")
    if words == [""]:
        return []
    if len(words) < shingle_words:
        return [" ".join(words)]
    return [" ".join(words[i : i + shingle_words]) for i in range(len(words) - shingle_words + 1)]


_GOLDEN32 = np.uint32(0x9E3779B1)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer over a uint32 array (wrap-around arithmetic)."""
    s1, m1, s2, m2, s3 = _FMIX32
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s3)


def _combine(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The hash of a shingle extended by one word: ``fmix32(h * golden ^ w)``."""
    return _fmix32((h * _GOLDEN32) ^ w)


class _WordHashes(dict):
    """word -> first 4 bytes of its UTF-8 SHA-1, little-endian (datasketch's ``sha1_hash32`` of the word).

    A dict with ``__missing__``: ``map(cache.__getitem__, words)`` hashes each distinct word once and
    otherwise stays in C. Cleared when it outgrows ``limit`` entries, so memory stays bounded on corpora
    with open vocabularies.
    """

    limit = 1 << 21

    def __missing__(self, word: str) -> int:
        if len(self) >= self.limit:
            self.clear()
        value = int.from_bytes(hashlib.sha1(word.encode("utf-8")).digest()[:4], "little")
        self[word] = value
        return value


_WORD_HASHES = _WordHashes()


def shingle_hash32(shingle: bytes | str) -> int:
    """The 32-bit hash of one shingle (its words joined by single spaces): the SHA-1 hash of the first word,
    then, for every next word, ``fmix32(h * 0x9E3779B1 ^ sha1_32(word))``.

    This is the ``hashfunc`` under which our signatures are datasketch's own:
    ``datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash32, scheme=...)`` updated with every shingle of
    :func:`shingles` has exactly the signature :func:`minhash_signatures` computes. Hashing words once and
    combining them is what lets the signatures be computed for whole batches in numpy.
    """
    text = shingle.decode("utf-8") if isinstance(shingle, bytes) else shingle
    hashes = [np.uint32(_WORD_HASHES[w]) for w in text.split(" ")]
    h = np.asarray([hashes[0]], dtype=np.uint32)
    for w in hashes[1:]:
        h = _combine(h, np.asarray([w], dtype=np.uint32))
    return int(h[0])


def _permutations(cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    a, b = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=cfg.scheme).permutations
    return np.asarray(a), np.asarray(b)


def _empty_value(cfg: MinHashConfig) -> np.unsignedinteger:
    return np.uint32(0xFFFFFFFF) if cfg.scheme == "affine32" else _MAX_HASH_32


def signature_dtype(cfg: MinHashConfig) -> type[np.unsignedinteger]:
    """numpy dtype of signatures for the scheme: uint32 (affine32) or uint64 (legacy), as datasketch stores them."""
    return np.uint32 if cfg.scheme == "affine32" else np.uint64


def _permute(hv: np.ndarray, a: np.ndarray, b: np.ndarray, scheme: str) -> np.ndarray:
    """(m,) 32-bit input hashes -> (num_perm, m) permuted values, as datasketch's ``update`` computes them.

    Permutation-major, so the per-document minimum (``reduceat`` along axis 1) runs over contiguous memory:
    about four times faster than reducing the (m, num_perm) layout along axis 0.
    """
    if scheme == "affine32":
        permuted = np.multiply(a[:, None], _fmix32(hv.astype(np.uint32))[None, :])  # uint32 wrap-around = mod 2^32
        permuted += b[:, None]  # in place: one (num_perm, m) array alive, not the product and the sum
        return permuted
    h = hv.astype(np.uint64)
    return np.bitwise_and((a[:, None] * h[None, :] + b[:, None]) % _MERSENNE_PRIME, _MAX_HASH_32)


def _shingle_hashes(word_hashes: np.ndarray, lengths: np.ndarray, k: int) -> np.ndarray:
    """Hashes of every ``k``-word shingle of a batch of documents, document after document.

    ``word_hashes``: the documents' word hashes concatenated; ``lengths``: words per document (all > 0). A
    document of ``m >= k`` words has ``m - k + 1`` shingles, a shorter one a single shingle of all its words
    (as :func:`shingles`). Computed for every start position at once: position ``p`` takes up to ``k`` words,
    stopping at its document's end, and positions that are not a shingle start are masked out.
    """
    total = len(word_hashes)
    starts = np.cumsum(lengths) - lengths
    ends = np.repeat(starts + lengths, lengths)
    pos = np.arange(total)
    padded = np.concatenate([word_hashes, np.zeros(k, dtype=np.uint32)])
    h = padded[:total].copy()
    for t in range(1, k):
        inside = pos + t < ends
        h = np.where(inside, _combine(h, padded[t : total + t]), h)
    short = np.repeat(lengths < k, lengths)
    keep = (pos + k <= ends) | (short & (pos == np.repeat(starts, lengths)))
    return h[keep]


def minhash_signatures(texts: Sequence[str], cfg: MinHashConfig | None = None) -> np.ndarray:
    """MinHash signatures of the word-shingle sets of ``texts``: shape ``(len(texts), num_perm)``.

    dtype is :func:`signature_dtype` (uint32 for ``affine32``). Each distinct word is hashed once (SHA-1,
    32 bits); shingle hashes (:func:`shingle_hash32`), the permutations and the per-text minimum
    (``np.minimum.reduceat``) are numpy operations over a whole batch of texts, with no per-shingle Python
    step. Row ``i`` equals ``datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash32, scheme=...)``
    updated with every shingle of ``shingles(texts[i], cfg.candidate_shingle_words)``. A text with no
    shingle (empty after normalisation) gets datasketch's empty signature (every slot the maximum hash
    value), so two empty texts estimate 1.0 and an empty and a non-empty text 0.0.
    """
    cfg = cfg or MinHashConfig()
    a, b = _permutations(cfg)
    k = cfg.candidate_shingle_words
    out = np.full((len(texts), cfg.num_perm), _empty_value(cfg), dtype=signature_dtype(cfg))
    lookup = _WORD_HASHES.__getitem__
    docs: list[int] = []
    parts: list[np.ndarray] = []
    words_in_batch = 0

    def permute_batch(rows: list[int], words: list[np.ndarray]) -> None:
        lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
        hashes = _shingle_hashes(np.concatenate(words), lengths, k)
        counts = np.maximum(lengths - k + 1, 1)
        offsets = np.cumsum(counts) - counts
        out[rows] = np.minimum.reduceat(_permute(hashes, a, b, cfg.scheme), offsets, axis=1).T

    # numpy releases the GIL in the permutation and the minimum, so two worker threads reduce batches while
    # this thread splits and hashes the words of the next ones: both cores work. At most two batches are in
    # flight, so memory stays at about two batches of (num_perm x batch_shingles) values.
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque[Future[None]] = deque()
        for i, text in enumerate(texts):
            norm = fold(text)
            if not norm:
                continue
            words = norm.split(" ")
            if docs and words_in_batch + len(words) > cfg.batch_shingles:
                if len(pending) == 2:
                    pending.popleft().result()
                pending.append(pool.submit(permute_batch, docs, parts))
                docs, parts, words_in_batch = [], [], 0
            docs.append(i)
            parts.append(np.fromiter(map(lookup, words), dtype=np.uint32, count=len(words)))
            words_in_batch += len(words)
        if docs:
            pending.append(pool.submit(permute_batch, docs, parts))
        for future in pending:
            future.result()
    return out


def to_minhash(signature: np.ndarray, cfg: MinHashConfig | None = None) -> LeanMinHash:
    """A datasketch ``LeanMinHash`` holding one signature row (for ``MinHashLSH`` or ``.jaccard``)."""
    cfg = cfg or MinHashConfig()
    return LeanMinHash(seed=cfg.seed, hashvalues=signature, scheme=cfg.scheme)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures: the fraction of equal slots (datasketch's ``jaccard``)."""
    return float(np.count_nonzero(sig_a == sig_b)) / float(sig_a.shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# edit similarity (verification of candidate pairs)
# ---------------------------------------------------------------------------------------------------------------


def tokens(text: str | None) -> list[str]:
    """The words of ``fold(text)`` (what :func:`edit_similarity` compares); empty text: none."""
    norm = fold(text)
    return norm.split(" ") if norm else []


def unit_words(unit: str, guard: str | None) -> tuple[list[str], list[str] | None]:
    """The words verification compares for one row: :func:`tokens` of its dedup unit and of its guard text."""
    return tokens(unit), None if guard is None else tokens(guard)


def edit_distance(a: Sequence[str], b: Sequence[str], cutoff: int | None = None) -> int:
    """Levenshtein distance between two token sequences (unit insert, delete, substitute).

    RapidFuzz's bit-parallel implementation over sequences of hashables (each word one symbol). With
    ``cutoff``, any distance above it is reported as ``cutoff + 1``, and the computation stops early.
    """
    return Levenshtein.distance(a, b, score_cutoff=cutoff)


def _edit_sim(a: Sequence[str], b: Sequence[str], threshold: float = 0.0) -> float:
    """Edit similarity of two token sequences; below ``threshold`` only "below" is exact (the value may be higher)."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    if min(len(a), len(b)) < threshold * longest:  # distance >= the length difference: cannot reach threshold
        return min(len(a), len(b)) / longest
    # the largest distance that still reaches the threshold (the epsilon absorbs 1 - 0.8 = 0.19999...); a
    # distance above it comes back as cutoff + 1, whose similarity is then strictly below the threshold
    cutoff = None if threshold <= 0 else int((1.0 - threshold) * longest + 1e-9)
    return 1.0 - edit_distance(a, b, cutoff) / longest


def shingle_jaccard(a: Sequence[str], b: Sequence[str], shingle_words: int) -> float:
    """Exact Jaccard similarity of the ``shingle_words``-word shingle sets of two token sequences.

    Same shingles as :func:`shingles` (a sequence shorter than a shingle is one shingle); two empty: 1.0.
    """

    def grams(words: Sequence[str]) -> set[tuple[str, ...]]:
        if len(words) <= shingle_words:
            return {tuple(words)} if words else set()
        return {tuple(words[i : i + shingle_words]) for i in range(len(words) - shingle_words + 1)}

    ga, gb = grams(a), grams(b)
    union = len(ga | gb)
    return len(ga & gb) / union if union else 1.0


def edit_similarity(a: str | Sequence[str], b: str | Sequence[str]) -> float:
    """Token-level edit similarity ``1 - Levenshtein(a, b) / max(len(a), len(b))`` in [0, 1].

    Strings are compared as :func:`tokens` (normalised words); sequences as given. Two empty texts: 1.0.
    A copy with ``k`` of its ``n`` words replaced scores ``>= 1 - k / n`` whether the edits are scattered
    or in runs.
    """
    ta = tokens(a) if isinstance(a, str) else a
    tb = tokens(b) if isinstance(b, str) else b
    return _edit_sim(ta, tb)


# ---------------------------------------------------------------------------------------------------------------
# clustering
# ---------------------------------------------------------------------------------------------------------------


class _UnionFind:
    """Disjoint sets over 0..n-1 (path halving, union by index so roots are deterministic)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)


@dataclass
class Cluster:
    """A group of near-duplicate units (two or more).

    ``members``: ids in input order, the kept one first; ``kept``: the id kept; ``similarity``: for every
    member, its token edit similarity (:func:`edit_similarity`) to the kept member (1.0 for the kept one).
    Members join by transitivity (A~B, B~C), so a member's similarity to the kept one can be below the
    thresholds.
    """

    members: list[Hashable]
    kept: Hashable
    similarity: dict[Hashable, float] = field(default_factory=dict)


@functools.cache
def lsh_bands(cfg: MinHashConfig) -> tuple[int, int]:
    """(bands, rows per band) that ``datasketch.MinHashLSH`` chooses for the net's threshold and ``num_perm``
    (cached: datasketch finds them by numerical integration, and every batch of signatures asks)."""
    lsh = MinHashLSH(threshold=cfg.effective_lsh_threshold(), num_perm=cfg.num_perm)
    return lsh.b, lsh.r


def _estimated_at_least(sigs: np.ndarray, pairs: np.ndarray, floor: float, chunk: int = 1 << 16) -> np.ndarray:
    """The rows of ``pairs`` whose signatures agree on at least ``floor`` of their slots (chunked: bounded memory)."""
    keep = [
        part[(sigs[part[:, 0]] == sigs[part[:, 1]]).mean(axis=1) >= floor]
        for part in (pairs[s : s + chunk] for s in range(0, len(pairs), chunk))
    ]
    return np.concatenate(keep) if keep else np.empty((0, 2), dtype=np.int64)


def _pairs_in_buckets(ordered: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> Iterator[np.ndarray]:
    """Every pair (i < j) inside each bucket ``ordered[start : start + size]``, as (k, 2) arrays of about a
    million pairs at most. Buckets of one size are listed together (one index per pair position of a
    triangle), so a million small buckets cost a few numpy calls, not a Python step each."""
    for size in np.unique(sizes).tolist():
        first = starts[sizes == size]
        iu, ju = np.triu_indices(size, 1)
        per_chunk = max(1, (1 << 20) // len(iu))
        for begin in range(0, len(first), per_chunk):
            rows = np.sort(ordered[first[begin : begin + per_chunk, None] + np.arange(size)], axis=1)
            yield np.stack([rows[:, iu].ravel(), rows[:, ju].ravel()], axis=1)


# An LSH bucket larger than this is split by the rows of the following bands before its pairs are listed.
MAX_BUCKET = 64
# How many following bands a large bucket may be split by; a bucket still larger is listed whole.
MAX_SPLIT_BANDS = 3


def _buckets(sigs: np.ndarray, members: np.ndarray, columns: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``members`` grouped by their signature values in ``columns``: the members in group order, and the start
    and size of each group of two or more in it."""
    block = sigs[members, columns]
    order = np.lexsort(block.T[::-1])
    ordered = block[order]
    new_bucket = np.ones(len(members), dtype=bool)
    new_bucket[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    starts = np.flatnonzero(new_bucket)
    sizes = np.diff(np.append(starts, len(members)))
    return members[order], starts[sizes > 1], sizes[sizes > 1]


def candidate_pairs(
    sigs: np.ndarray, cfg: MinHashConfig | None = None, same_key: Sequence[Hashable | None] | None = None
) -> np.ndarray:
    """Candidate near-duplicate pairs: (k, 2) int64 indices ``i < j``, sorted and unique.

    A pair is a candidate when the two signatures are equal on all ``r`` rows of at least one of the ``b``
    bands :func:`lsh_bands` gives (the pairs ``MinHashLSH.query`` returns for the same signatures) and their
    estimated Jaccard similarity reaches the net's threshold (LSH false positives below it are dropped
    before any text is compared). Each band is one ``np.lexsort`` over all rows; the pairs of its buckets
    are listed a bucket size at a time (:func:`_pairs_in_buckets`), without a Python step per bucket.
    ``same_key`` (per row, as :func:`verified_clusters` takes it): a pair whose first row has a key the
    second does not share is no candidate, since verification would never join it. Buckets are formed and
    split without the keys, so the pairs left are exactly those verification would compare: templated RL
    prompts that differ only in their numbers share most buckets, and their pairs grow with the square of
    the rows of a template.

    A bucket of more than :data:`MAX_BUCKET` rows is split by the rows of the next band (up to
    :data:`MAX_SPLIT_BANDS` of them) before its pairs are listed. Listing it whole costs the square of its
    size: at a million chats, text sharing common word pairs makes buckets of thousands of rows, and a
    billion pairs to estimate. True near duplicates agree on most bands, so they meet again inside the
    split buckets or in a band of their own (measured on the 1M benchmark: every planted copy still ends
    in its original's component of the candidate graph).
    """
    cfg = cfg or MinHashConfig()
    n = len(sigs)
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    bands, rows = lsh_bands(cfg)
    floor = cfg.effective_lsh_threshold()

    def columns(band: int) -> slice:
        band %= bands
        return slice(band * rows, (band + 1) * rows)

    found: list[np.ndarray] = []
    codes = _same_key_codes(same_key)

    def comparable(pairs: np.ndarray) -> np.ndarray:
        if codes is None:
            return pairs
        first, second = codes[pairs[:, 0]], codes[pairs[:, 1]]
        return pairs[(first < 0) | (first == second)]

    def listed(ordered: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> None:
        found.extend(
            _estimated_at_least(sigs, comparable(part), floor) for part in _pairs_in_buckets(ordered, starts, sizes)
        )

    everyone = np.arange(n)
    for band in range(bands):
        pending = [(everyone, 0)]
        while pending:
            members, depth = pending.pop()
            ordered, starts, sizes = _buckets(sigs, members, columns(band + depth))
            # a bucket too large is split by the next band's rows, unless it has been split enough times
            split = (sizes > MAX_BUCKET) & (depth < MAX_SPLIT_BANDS)
            listed(ordered, starts[~split], sizes[~split])
            pending += [(ordered[s : s + z], depth + 1) for s, z in zip(starts[split], sizes[split], strict=True)]
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate([p[:, 0].astype(np.int64) * n + p[:, 1] for p in found]))
    return np.stack([codes // n, codes % n], axis=1)


def _same_key_codes(same_key: Sequence[Hashable | None] | None) -> np.ndarray | None:
    """Per row, a number for its same key (equal keys, equal numbers), -1 for a row without one; None without keys."""
    if same_key is None:
        return None
    numbers: dict[Hashable, int] = {}
    return np.array([-1 if k is None else numbers.setdefault(k, len(numbers)) for k in same_key], dtype=np.int64)


def same_key_hash(record: Record) -> int | None:
    """A 64-bit signed hash of :func:`rl_same_key` (None for a row without a same key), the same in every process:
    the DuckDB path pairs only rows whose hashes are equal (a rare collision only lets verification compare a pair
    it then rejects on the keys themselves)."""
    key = rl_same_key(record)
    if key is None:
        return None
    digest = hashlib.blake2b(repr(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


# Texts of rows by index, for verification: index -> (dedup unit, guard text or None).
TextsOf = Callable[[Sequence[int]], Mapping[int, tuple[str, str | None]]]
# A row as verification compares it: the words of its dedup unit, and of its guard text (None: no guard).
UnitWords = tuple[list[str], list[str] | None]


def similar_words(a: Sequence[str], b: Sequence[str], cfg: MinHashConfig, keyed: bool = False) -> bool:
    """The rules of :class:`MinHashConfig` on two word sequences: rule 2 (edit similarity) where it applies (units
    of ``min_words`` or more, or ``keyed`` pairs), else (or failing it) rule 1 (shingle Jaccard)."""
    t = cfg.edit_threshold
    if t is not None and (keyed or min(len(a), len(b)) >= cfg.min_words) and _edit_sim(a, b, t) >= t:
        return True
    return shingle_jaccard(a, b, cfg.shingle_words) >= cfg.threshold


def near_duplicate_words(a: UnitWords, b: UnitWords, cfg: MinHashConfig, keyed: bool = False) -> bool:
    """Whether a candidate pair is a near duplicate: the units pass :func:`similar_words`, and so do the guard
    texts when both rows have one. (A same-key check, where there is one, comes first: see
    :func:`near_duplicate_clusters`.)"""
    (wa, ga), (wb, gb) = a, b
    if not similar_words(wa, wb, cfg, keyed):
        return False
    return ga is None or gb is None or similar_words(ga, gb, cfg, keyed)


def verified_clusters(
    ids: Sequence[Hashable],
    sigs: np.ndarray,
    texts_of: TextsOf,
    cfg: MinHashConfig | None = None,
    *,
    same_key: Sequence[Hashable | None] | None = None,
    choose: Callable[[list[Hashable]], Hashable] | None = None,
    chunk_pairs: int = 4096,
) -> list[Cluster]:
    """Clusters of near duplicates among rows whose signatures are ``sigs`` (row ``i`` has id ``ids[i]``).

    Candidates come from :func:`candidate_pairs`; each is verified by the rules of :class:`MinHashConfig` on
    the texts ``texts_of`` returns (a guard text, when both rows have one, must pass as well) and verified
    pairs are joined with union-find. Texts are asked for one chunk of ``chunk_pairs`` candidate pairs at a
    time (at most twice as many rows, as word lists), so a caller can keep them out of memory (e.g. in
    DuckDB) and only the rows under verification are ever held. ``same_key`` and
    ``choose`` as in :func:`near_duplicate_clusters`.
    """
    cfg = cfg or MinHashConfig()
    n = len(ids)
    if n < 2:
        return []
    pairs = candidate_pairs(sigs, cfg, same_key)

    def keyed(i: int) -> bool:
        return same_key is not None and same_key[i] is not None

    def words(indices: np.ndarray) -> Callable[[int], UnitWords]:
        """Word lists of a chunk's rows, split on demand: a chunk holds its texts, and only the few most
        recently used rows as word lists (several times the size of the text)."""
        texts = texts_of(sorted(set(map(int, indices))))

        @functools.lru_cache(maxsize=256)
        def of(i: int) -> UnitWords:
            unit, guard = texts[i]
            return unit_words(unit, guard)

        return of

    uf = _UnionFind(n)
    for start in range(0, len(pairs), chunk_pairs):
        # Pairs already joined through earlier ones need no text: in a cluster of k copies only about k of its
        # k^2 / 2 candidate pairs are ever compared.
        part = [(i, j) for i, j in pairs[start : start + chunk_pairs].tolist() if uf.find(i) != uf.find(j)]
        if not part:
            continue
        cache = words(np.asarray(part).ravel())
        for i, j in part:
            if uf.find(i) == uf.find(j) or (keyed(i) and same_key is not None and same_key[i] != same_key[j]):
                continue
            if near_duplicate_words(cache(i), cache(j), cfg, keyed(i)):
                uf.union(i, j)

    groups: dict[int, list[int]] = defaultdict(list)
    for i in np.unique(pairs).tolist():
        groups[uf.find(i)].append(i)
    multi = [sorted(groups[root]) for root in sorted(groups) if len(groups[root]) > 1]
    clusters: list[Cluster] = []
    for start in range(0, len(multi), chunk_pairs // 2):
        block = multi[start : start + chunk_pairs // 2]
        cache = words(np.asarray([i for idx in block for i in idx]))
        for idx in block:
            member_ids = [ids[i] for i in idx]
            kept = choose(member_ids) if choose else member_ids[0]
            k = idx[member_ids.index(kept)]
            kw = cache(k)[0]
            sims = {ids[i]: (1.0 if i == k else _edit_sim(kw, cache(i)[0])) for i in idx}
            clusters.append(Cluster([ids[k]] + [ids[i] for i in idx if i != k], kept, sims))
    return clusters


def near_duplicate_clusters(
    ids: Sequence[Hashable],
    texts: Sequence[str],
    cfg: MinHashConfig | None = None,
    *,
    guard_texts: Sequence[str | None] | None = None,
    same_key: Sequence[Hashable | None] | None = None,
    choose: Callable[[list[Hashable]], Hashable] | None = None,
) -> list[Cluster]:
    """Clusters of near-duplicate texts held in memory (only clusters of two or more; order of their first member).

    Signatures (of ``cfg.candidate_shingle_words``-word shingles) are computed in numpy batches,
    candidates come from the LSH banding of :func:`candidate_pairs` and each candidate pair is verified by
    the rules of :class:`MinHashConfig` (5-shingle Jaccard, or edit similarity for units of ``min_words``
    words or more); see :func:`verified_clusters`. ``guard_texts`` (optional, per text): a second text that
    must also pass for a pair to count (preference pairs pass their two responses, see
    :func:`guard_text`); a ``None`` guard is not checked. ``same_key`` (optional, per text): a pair counts
    only if both keys are equal (RL rows pass numbers and answer, see :func:`rl_same_key`); ``None`` keys are
    not checked. Keyed pairs may pass the edit rule at any length: the key already tells templated short
    prompts apart. ``choose`` picks the kept id of a cluster from its members (default: the first in input
    order). A cluster's ``similarity`` is the members' edit similarity to the kept one.
    """
    cfg = cfg or MinHashConfig()
    if len(ids) != len(texts):
        raise ValueError("ids and texts differ in length")

    def texts_of(indices: Sequence[int]) -> dict[int, tuple[str, str | None]]:
        return {i: (texts[i], guard_texts[i] if guard_texts is not None else None) for i in indices}

    if len(ids) < 2:
        return []
    sigs = minhash_signatures(texts, cfg)
    return verified_clusters(ids, sigs, texts_of, cfg, same_key=same_key, choose=choose)


# ---------------------------------------------------------------------------------------------------------------
# which member is kept
# ---------------------------------------------------------------------------------------------------------------


def quality_score(record: Record) -> int:
    """A simple content-size proxy for quality: whitespace words of the text a model learns from.

    sft: all assistant turns; preference: chosen plus rejected; rl: the prompt plus the answer. Among
    near duplicates from sources of equal priority the fuller copy is kept (it is usually the less
    truncated one).
    """
    regime = record["regime"]
    if regime == "sft":
        parts = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    elif regime == "preference":
        parts = [record.get("chosen") or "", record.get("rejected") or ""]
    else:
        parts = [record.get("prompt") or "", record.get("answer") or ""]
    return sum(len(p.split()) for p in parts)


def kept_sort_key(record: Record, priority: Priority) -> tuple[Any, ...]:
    """The order in which duplicates are kept (smallest first). Deterministic; in order:

    1. source priority: ``priority(source)``, lower first (the registry order, ``Registry.priority``);
    2. quality: higher :func:`quality_score` first;
    3. earliest ``created_at`` (missing last);
    4. origin file then origin row (then id, which is unique).

    The silver pass ranks staged rows by the same order in SQL (``cleaning.RANKED_OF_REGIME``).
    """
    origin = record.get("origin") or {}
    created = record.get("created_at")
    return (
        priority(record["source"]),
        -quality_score(record),
        created is None,
        created.timestamp() if hasattr(created, "timestamp") else (created or 0),
        origin.get("file") or "",
        origin.get("row") if origin.get("row") is not None else -1,
        record["id"],
    )


# ---------------------------------------------------------------------------------------------------------------
# the whole pass
# ---------------------------------------------------------------------------------------------------------------


class DedupResult(NamedTuple):
    """Outcome of :func:`deduplicate`; unpacks as ``(kept_ids, dropped)``.

    ``kept_ids``: surviving ids in input order. ``dropped``: one dict per dropped row with
    ``member_id``, ``kept_id`` (always a surviving id), ``cluster_id`` (= the kept id), ``method``
    (``exact_normalized`` | ``near``), ``similarity`` (1.0 for exact; else the similarity of the member's
    unit to the kept row's: token edit similarity, see :func:`edit_similarity`) and ``regime``.
    """

    kept_ids: list[str]
    dropped: list[dict[str, Any]]


# Per-regime defaults. RL prompts are short (GSM8K questions: about 20-60 words) and templated: single words
# as rule-1 shingles, the edit rule at any length, and the RL same-key rule (:func:`rl_same_key`) keeps
# templated look-alikes with other numbers or answers apart.
DEFAULT_CONFIGS: dict[str, MinHashConfig] = {
    "sft": MinHashConfig(),
    "preference": MinHashConfig(),
    "rl": MinHashConfig(shingle_words=1),
}


# member id -> (kept id, method, similarity) of every row a dedup stage dropped.
DroppedTo = dict[str, tuple[str, str, float]]


def exact_survivors(keys: Sequence[Hashable], ranks: Sequence[int]) -> tuple[list[int], dict[int, int]]:
    """Stage 1 over one regime: ``(indices kept, dropped index -> kept index)``.

    Rows with equal ``keys`` (:func:`exact_key`) are one group; the row of lowest ``ranks`` (the
    :func:`kept_sort_key` order) is kept.
    """
    best: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        j = best.get(key)
        if j is None or ranks[i] < ranks[j]:
            best[key] = i
    dropped = {i: best[key] for i, key in enumerate(keys) if best[key] != i}
    return [i for i in range(len(keys)) if i not in dropped], dropped


def deduplicate_regime(
    ids: Sequence[str],
    exact_keys: Sequence[Hashable],
    ranks: Sequence[int],
    signatures: Callable[[list[int]], np.ndarray],
    texts_of: TextsOf,
    cfg: MinHashConfig,
    same_key: Sequence[Hashable | None] | None = None,
) -> DroppedTo:
    """Both stages over the rows of one regime, given compactly: what is dropped, and onto what.

    Row ``i`` has id ``ids[i]``, exact key ``exact_keys[i]`` and kept-order rank ``ranks[i]`` (lowest is
    kept). ``signatures(indices)`` returns the MinHash signatures of those rows (in that order) and
    ``texts_of(indices)`` their dedup units and guard texts, so the texts can stay outside memory (the
    silver pass streams them from DuckDB). Stage 1 keeps one row per exact key (:func:`exact_survivors`);
    stage 2 clusters the survivors (:func:`verified_clusters`) and keeps the lowest rank of each cluster.
    """
    survivors, exact = exact_survivors(exact_keys, ranks)
    dropped_to: DroppedTo = {ids[i]: (ids[k], METHOD_EXACT, 1.0) for i, k in exact.items()}

    def survivor_texts(local: Sequence[int]) -> dict[int, tuple[str, str | None]]:
        found = texts_of([survivors[i] for i in local])
        return {i: found[survivors[i]] for i in local}

    clusters = verified_clusters(
        survivors,
        signatures(survivors),
        survivor_texts,
        cfg,
        same_key=[same_key[i] for i in survivors] if same_key is not None else None,
        choose=lambda members: min(members, key=lambda m: ranks[int(m)]),
    )
    for cluster in clusters:
        for member in cluster.members:
            if member != cluster.kept:
                dropped_to[ids[int(member)]] = (ids[int(cluster.kept)], METHOD_NEAR, cluster.similarity[member])
    return dropped_to


def resolve_chains(dropped_to: DroppedTo) -> DroppedTo:
    """Point every dropped row at a surviving one: an exact twin whose kept row was itself dropped as a near
    duplicate follows it to the final kept row (keeping its own method, with its kept row's similarity)."""
    resolved: DroppedTo = {}
    for member, (kept_id, method, similarity) in dropped_to.items():
        while kept_id in dropped_to:
            kept_id, _, similarity = dropped_to[kept_id]
        resolved[member] = (kept_id, method, similarity)
    return resolved


def deduplicate(
    records: Sequence[Record],
    priority: Priority,
    cfg: MinHashConfig | Mapping[str, MinHashConfig] | None = None,
) -> DedupResult:
    """Exact-normalised then near-duplicate deduplication of rows held in memory, separately per regime.

    ``cfg``: one config for every regime, or a mapping regime -> config overriding
    :data:`DEFAULT_CONFIGS` (None: the defaults).

    Stage 1 groups rows by :func:`exact_key` and keeps one per group (the first by :func:`kept_sort_key`); stage 2
    clusters the stage-1 survivors with the rules of :class:`MinHashConfig` (preference pairs guarded on
    their responses) and keeps one per cluster (:func:`deduplicate_regime`). A row dropped in stage 1 whose
    kept twin is dropped in stage 2 points at the final kept row (:func:`resolve_chains`).
    """
    configs = regime_configs(cfg)
    if len({r["id"] for r in records}) != len(records):
        raise ValueError("record ids are not unique")
    by_regime: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_regime[r["regime"]].append(r)
    dropped_to: DroppedTo = {}
    for regime in sorted(by_regime):
        rows = by_regime[regime]
        order = sorted(range(len(rows)), key=lambda i: kept_sort_key(rows[i], priority))
        ranks = [0] * len(rows)
        for position, i in enumerate(order):
            ranks[i] = position
        units = [dedup_unit(r) for r in rows]
        guards = [guard_text(r) for r in rows]
        dropped_to |= deduplicate_regime(
            [r["id"] for r in rows],
            [exact_key(r) for r in rows],
            ranks,
            lambda idx, units=units, regime=regime: minhash_signatures([units[i] for i in idx], configs[regime]),
            lambda idx, units=units, guards=guards: {i: (units[i], guards[i]) for i in idx},
            configs[regime],
            same_key=[rl_same_key(r) for r in rows] if regime == "rl" else None,
        )
    resolved = resolve_chains(dropped_to)
    dropped = [
        {
            "member_id": r["id"],
            "kept_id": resolved[r["id"]][0],
            "cluster_id": resolved[r["id"]][0],
            "method": resolved[r["id"]][1],
            "similarity": resolved[r["id"]][2],
            "regime": r["regime"],
        }
        for r in records
        if r["id"] in resolved
    ]
    return DedupResult([r["id"] for r in records if r["id"] not in resolved], dropped)


def regime_configs(cfg: MinHashConfig | Mapping[str, MinHashConfig] | None) -> dict[str, MinHashConfig]:
    """Per-regime configs: :data:`DEFAULT_CONFIGS`, all replaced by one config, or updated by a mapping."""
    if isinstance(cfg, MinHashConfig):
        return dict.fromkeys(DEFAULT_CONFIGS, cfg)
    return {**DEFAULT_CONFIGS, **(cfg or {})}


def prompt_key(prompt: str | None) -> str | None:
    """sha256 (32 hex) of the normalised prompt: the key the cleaning pass groups cross-regime leaks on.

    None for a prompt that is empty after normalisation (it carries nothing that could leak)."""
    norm = fold(prompt)
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()[:32] if norm else None
