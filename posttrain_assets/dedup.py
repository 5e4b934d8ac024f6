"""Exact-normalised and near-duplicate detection over silver rows (pure logic: no Dagster, no DuckDB).

Input everywhere is silver rows as dicts with the canonical keys of ``tables.RECORD_COLUMNS``. Exact
duplicates (identical content) are already collapsed upstream by content id; this module finds what is
left:

1. **Exact after normalisation** (method ``exact_normalized``): two rows whose dedup units are equal
   after :func:`normalize_text` (differences of case, whitespace or Unicode form only), keyed by
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
kept by :func:`choose_kept`; every other member is reported with the kept row's id. Prompts that
appear in more than one regime are not dropped here but reported by :func:`cross_regime_leaks`.

Signatures are bit-identical to ``datasketch.MinHash(num_perm, seed, scheme=cfg.scheme)`` updated with
the UTF-8 bytes of the same shingles (SHA-1 32-bit input hash, then the scheme's permutations), so they
can be wrapped as ``datasketch.LeanMinHash(seed=cfg.seed, hashvalues=sig, scheme=cfg.scheme)`` and put
into any ``MinHashLSH`` index; only the permutation step is computed here, vectorised with numpy.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

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


def normalize_text(text: str | None) -> str:
    """The comparison form of a text: Unicode NFKC, then ``str.casefold``, then whitespace collapsed.

    NFKC folds compatibility forms (full-width letters, ligatures, non-breaking spaces, superscripts)
    onto their plain equivalents; casefold is Unicode-aware lower-casing (``"Straße"`` -> ``"strasse"``);
    every run of Unicode whitespace (``str.split()``) becomes one space and the ends are stripped.
    Punctuation is kept. ``None`` is treated as the empty string.
    """
    if not text:
        return ""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _conversation_text(messages: Iterable[dict[str, Any]] | None) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in (messages or []))


def dedup_unit(record: Record) -> str:
    """The text that is deduplicated for one row, per regime.

    - sft: the whole conversation, every turn as ``role: content`` on its own line.
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


def _guard_text(record: Record) -> str | None:
    """For preference pairs, the two responses: a near-duplicate pair must also match on these.

    Without it a pair with a long shared prompt and short, different responses would reach the
    threshold on the prompt alone; two pairs that share the prompt but not the responses are distinct
    training signal and must both be kept.
    """
    if record["regime"] != "preference":
        return None
    return f"chosen: {record.get('chosen') or ''}\nrejected: {record.get('rejected') or ''}"


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _same_key(record: Record) -> Hashable | None:
    """For RL prompts, what two near duplicates must share exactly: the numbers of the prompt, in order,
    and the normalised gold answer. Templated problems differ in a number or ask for another quantity
    ("area" vs "hypotenuse" of the same triangle) while their texts stay within a word or two of each
    other; they are different tasks, and their answers or numbers tell them apart.
    """
    if record["regime"] != "rl":
        return None
    return (tuple(_NUMBER.findall(record.get("prompt") or "")), normalize_text(record.get("answer")))


def exact_key(record: Record) -> str:
    """sha256 (hex) of the normalised dedup unit; equal keys = duplicates up to case, whitespace and Unicode form."""
    unit = f"{record['regime']}\x00{normalize_text(dedup_unit(record))}"
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
    batch_shingles: int = 1 << 16

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
    """Word shingles of ``normalize_text(text)``: every run of ``shingle_words`` words, joined by a space.

    Fewer words than ``shingle_words``: the whole normalised text is the only shingle; an empty text has
    none. Duplicates are kept (the signature treats them as one set element).
    """
    words = normalize_text(text).split(" ")
    if words == [""]:
        return []
    if len(words) < shingle_words:
        return [" ".join(words)]
    return [" ".join(words[i : i + shingle_words]) for i in range(len(words) - shingle_words + 1)]


def _sha1_32(items: Sequence[str]) -> np.ndarray:
    """datasketch's ``sha1_hash32`` of each item's UTF-8 bytes: first 4 bytes of SHA-1, little-endian."""
    sha1 = hashlib.sha1
    digest = b"".join(sha1(s.encode("utf-8")).digest()[:4] for s in items)
    return np.frombuffer(digest, dtype="<u4").astype(np.uint32)


def _permutations(cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    a, b = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=cfg.scheme).permutations
    return np.asarray(a), np.asarray(b)


def _empty_value(cfg: MinHashConfig) -> np.unsignedinteger:
    return np.uint32(0xFFFFFFFF) if cfg.scheme == "affine32" else _MAX_HASH_32


def signature_dtype(cfg: MinHashConfig) -> type[np.unsignedinteger]:
    """numpy dtype of signatures for the scheme: uint32 (affine32) or uint64 (legacy), as datasketch stores them."""
    return np.uint32 if cfg.scheme == "affine32" else np.uint64


def _permute(hv: np.ndarray, a: np.ndarray, b: np.ndarray, scheme: str) -> np.ndarray:
    """(m,) 32-bit input hashes -> (m, num_perm) permuted values, as datasketch's ``update`` computes them."""
    if scheme == "affine32":
        s1, m1, s2, m2, s3 = _FMIX32
        h = hv.astype(np.uint32)
        h = h ^ (h >> s1)
        h = h * m1
        h = h ^ (h >> s2)
        h = h * m2
        h = h ^ (h >> s3)
        return h[:, None] * a[None, :] + b[None, :]  # uint32 wrap-around = mod 2^32
    h = hv.astype(np.uint64)
    return np.bitwise_and((h[:, None] * a[None, :] + b[None, :]) % _MERSENNE_PRIME, _MAX_HASH_32)


def minhash_signatures(texts: Sequence[str], cfg: MinHashConfig | None = None) -> np.ndarray:
    """MinHash signatures of the word-shingle sets of ``texts``: shape ``(len(texts), num_perm)``.

    dtype is :func:`signature_dtype` (uint32 for ``affine32``). Each shingle is hashed once (SHA-1, 32
    bits, like datasketch); the permutations are one numpy broadcast over all shingles of a batch and
    ``np.minimum.reduceat`` takes the per-text minimum. Row ``i`` equals ``datasketch.MinHash(num_perm,
    seed, scheme=...)`` updated with ``s.encode()`` for every ``s`` in ``shingles(texts[i])``. A text
    with no shingle (empty after normalisation) gets datasketch's empty signature (every slot the
    maximum hash value), so two empty texts estimate 1.0 and an empty and a non-empty text 0.0.
    """
    cfg = cfg or MinHashConfig()
    a, b = _permutations(cfg)
    out = np.full((len(texts), cfg.num_perm), _empty_value(cfg), dtype=signature_dtype(cfg))
    batch_docs: list[int] = []
    batch_shingles: list[str] = []
    batch_offsets: list[int] = []

    def flush() -> None:
        if not batch_docs:
            return
        values = _permute(_sha1_32(batch_shingles), a, b, cfg.scheme)
        out[batch_docs] = np.minimum.reduceat(values, np.asarray(batch_offsets), axis=0)
        batch_docs.clear()
        batch_shingles.clear()
        batch_offsets.clear()

    for i, text in enumerate(texts):
        doc = shingles(text, cfg.candidate_shingle_words)
        if not doc:
            continue
        if batch_shingles and len(batch_shingles) + len(doc) > cfg.batch_shingles:
            flush()
        batch_docs.append(i)
        batch_offsets.append(len(batch_shingles))
        batch_shingles.extend(doc)
    flush()
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
    """The words of ``normalize_text(text)`` (what :func:`edit_similarity` compares); empty text: none."""
    norm = normalize_text(text)
    return norm.split(" ") if norm else []


class _Pattern:
    """One token sequence prepared as the pattern of Myers' bit-parallel edit distance.

    ``peq[token]`` has bit ``i`` set where the pattern's ``i``-th token is ``token``. Built once per row
    and reused against all of its candidates.
    """

    __slots__ = ("n", "peq")

    def __init__(self, words: Sequence[str]) -> None:
        self.n = len(words)
        peq: dict[str, int] = {}
        for i, w in enumerate(words):
            peq[w] = peq.get(w, 0) | (1 << i)
        self.peq = peq

    def distance(self, other: Sequence[str]) -> int:
        """Levenshtein distance (unit insert, delete, substitute) from the pattern to ``other``, in tokens.

        Myers (1999) / Hyyro (2001) bit-vector algorithm with Python integers as bit vectors of pattern
        length: one pass over ``other`` of a few big-integer operations per token, O(len(other) *
        len(pattern) / 64) machine work instead of the O(n * m) Python-level dynamic program.
        """
        m = self.n
        if m == 0:
            return len(other)
        peq = self.peq
        mask = (1 << m) - 1
        high = 1 << (m - 1)
        vp, vn, score = mask, 0, m
        for w in other:
            eq = peq.get(w, 0)
            xv = eq | vn
            xh = (((eq & vp) + vp) ^ vp) | eq
            hp = vn | ~(xh | vp)
            hn = vp & xh
            if hp & high:
                score += 1
            elif hn & high:
                score -= 1
            hp = ((hp << 1) | 1) & mask
            hn = (hn << 1) & mask
            vp = (hn | ~(xv | hp)) & mask
            vn = hp & xv
        return score


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (unit costs)."""
    return _Pattern(a).distance(b)


def _edit_sim(pattern: _Pattern, a: Sequence[str], b: Sequence[str], threshold: float = 0.0) -> float:
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    if min(len(a), len(b)) < threshold * longest:  # distance >= the length difference: cannot reach threshold
        return min(len(a), len(b)) / longest
    return 1.0 - pattern.distance(b) / longest


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
    return _edit_sim(_Pattern(ta), ta, tb)


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


def _candidate_pairs(sigs: np.ndarray, cfg: MinHashConfig) -> Iterator[tuple[int, np.ndarray]]:
    """(i, candidate indices j > i) from a MinHashLSH index over all signatures."""
    lsh = MinHashLSH(threshold=cfg.effective_lsh_threshold(), num_perm=cfg.num_perm)
    minhashes = [to_minhash(sig, cfg) for sig in sigs]
    with lsh.insertion_session() as session:
        for i, m in enumerate(minhashes):
            session.insert(i, m, check_duplication=False)
    for i, m in enumerate(minhashes):
        js = np.fromiter((j for j in lsh.query(m) if j > i), dtype=np.int64)
        if js.size:
            yield i, np.sort(js)


def near_duplicate_clusters(
    ids: Sequence[Hashable],
    texts: Sequence[str],
    cfg: MinHashConfig | None = None,
    *,
    guard_texts: Sequence[str | None] | None = None,
    same_key: Sequence[Hashable | None] | None = None,
    choose: Callable[[list[Hashable]], Hashable] | None = None,
) -> list[Cluster]:
    """Clusters of near-duplicate texts (only clusters of two or more; order of their first member).

    Signatures (of ``cfg.candidate_shingle_words``-word shingles) are computed in numpy batches,
    candidates come from ``datasketch.MinHashLSH`` and each candidate pair is verified by the rules of
    :class:`MinHashConfig` (5-shingle Jaccard, or edit similarity for units of ``min_words`` words or
    more). ``guard_texts`` (optional, per text): a second text that must also pass for a pair to count
    (preference pairs pass their two responses, see :func:`_guard_text`); a ``None`` guard is not
    checked. ``same_key`` (optional, per text): a pair counts only if both keys are equal (RL rows pass
    numbers and answer, see :func:`_same_key`); ``None`` keys are not checked. Keyed pairs may pass the
    edit rule at any length: the key already tells templated short prompts apart. ``choose`` picks the
    kept id of a cluster from its members (default: the first in input order). A cluster's
    ``similarity`` is the members' edit similarity to the kept one.
    """
    cfg = cfg or MinHashConfig()
    if len(ids) != len(texts):
        raise ValueError("ids and texts differ in length")
    n = len(ids)
    if n < 2:
        return []
    sigs = minhash_signatures(texts, cfg)

    # token lists of the rows under verification (bounded: a row's candidates are mostly near it in the index)
    @lru_cache(maxsize=1 << 14)
    def words_of(i: int) -> list[str]:
        return tokens(texts[i])

    @lru_cache(maxsize=1 << 12)
    def guard_words_of(i: int) -> list[str]:
        return tokens(guard_texts[i] if guard_texts is not None else None)

    def keyed(i: int) -> bool:
        return same_key is not None and same_key[i] is not None

    def similar(a: list[str], b: list[str], key: bool, patterns: dict[str, _Pattern], kind: str) -> bool:
        """Rule 2 where it applies, else (or failing it) rule 1; ``patterns`` caches ``a``'s Myers pattern."""
        t = cfg.edit_threshold
        if t is not None and (key or min(len(a), len(b)) >= cfg.min_words):
            pattern = patterns.get(kind) or patterns.setdefault(kind, _Pattern(a))
            if _edit_sim(pattern, a, b, t) >= t:
                return True
        return shingle_jaccard(a, b, cfg.shingle_words) >= cfg.threshold

    uf = _UnionFind(n)
    floor = cfg.effective_lsh_threshold()
    for i, js in _candidate_pairs(sigs, cfg):
        # LSH's false positives (estimated Jaccard below the net's own threshold) are dropped unverified
        js = js[(sigs[js] == sigs[i]).mean(axis=1) >= floor]
        wi, key = words_of(i), keyed(i)
        patterns: dict[str, _Pattern] = {}
        for j in map(int, js):
            if uf.find(i) == uf.find(j) or (key and same_key is not None and same_key[i] != same_key[j]):
                continue
            if not similar(wi, words_of(j), key, patterns, "unit"):
                continue
            guarded = guard_texts is not None and guard_texts[i] is not None and guard_texts[j] is not None
            if guarded and not similar(guard_words_of(i), guard_words_of(j), key, patterns, "guard"):
                continue
            uf.union(i, j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[uf.find(i)].append(i)
    clusters = []
    for root in sorted(groups):
        idx = groups[root]
        if len(idx) < 2:
            continue
        member_ids = [ids[i] for i in idx]
        kept = choose(member_ids) if choose else member_ids[0]
        k = idx[member_ids.index(kept)]
        kp = _Pattern(words_of(k))
        sims = {ids[i]: (1.0 if i == k else _edit_sim(kp, words_of(k), words_of(i))) for i in idx}
        clusters.append(Cluster([ids[k]] + [ids[i] for i in idx if i != k], kept, sims))
    return clusters


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
    """The sort key of :func:`choose_kept` (smallest is kept)."""
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


def choose_kept(members: Sequence[Record], priority: Priority) -> Record:
    """The member of a duplicate cluster that is kept. Deterministic; in order:

    1. source priority: ``priority(source)``, lower first (the registry order, ``Registry.priority``);
    2. quality: higher :func:`quality_score` first;
    3. earliest ``created_at`` (missing last);
    4. origin file then origin row (then id, which is unique).
    """
    if not members:
        raise ValueError("empty cluster")
    return min(members, key=lambda r: kept_sort_key(r, priority))


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
# as rule-1 shingles, the edit rule at any length, and the RL same-key rule (:func:`_same_key`) keeps
# templated look-alikes with other numbers or answers apart.
DEFAULT_CONFIGS: dict[str, MinHashConfig] = {
    "sft": MinHashConfig(),
    "preference": MinHashConfig(),
    "rl": MinHashConfig(shingle_words=1),
}


def deduplicate(
    records: Sequence[Record],
    priority: Priority,
    cfg: MinHashConfig | Mapping[str, MinHashConfig] | None = None,
) -> DedupResult:
    """Exact-normalised then near-duplicate deduplication, separately per regime.

    ``cfg``: one config for every regime, or a mapping regime -> config overriding
    :data:`DEFAULT_CONFIGS` (None: the defaults).

    Stage 1 groups rows by :func:`exact_key` and keeps one per group (:func:`choose_kept`); stage 2
    clusters the stage-1 survivors with :func:`near_duplicate_clusters` (preference pairs guarded on
    their responses) and keeps one per cluster. A row dropped in stage 1 whose kept twin is dropped in
    stage 2 points at the final kept row (method ``exact_normalized``, similarity of its twin).
    """
    configs = dict(DEFAULT_CONFIGS)
    if isinstance(cfg, MinHashConfig):
        configs = dict.fromkeys(configs, cfg)
    elif cfg is not None:
        configs.update(cfg)
    by_id = {r["id"]: r for r in records}
    if len(by_id) != len(records):
        raise ValueError("record ids are not unique")
    dropped_to: dict[str, tuple[str, str, float]] = {}  # member -> (kept, method, similarity)
    by_regime: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_regime[r["regime"]].append(r)

    def choose_ids(member_ids: list[Hashable]) -> Hashable:
        return choose_kept([by_id[str(i)] for i in member_ids], priority)["id"]

    for regime in sorted(by_regime):
        rows = by_regime[regime]
        groups: dict[str, list[Record]] = defaultdict(list)
        for r in rows:
            groups[exact_key(r)].append(r)
        for group in groups.values():
            kept = choose_kept(group, priority)
            for r in group:
                if r is not kept:
                    dropped_to[r["id"]] = (kept["id"], METHOD_EXACT, 1.0)
        survivors = [r for r in rows if r["id"] not in dropped_to]
        units = [dedup_unit(r) for r in survivors]
        guards = [_guard_text(r) for r in survivors] if regime == "preference" else None
        keys = [_same_key(r) for r in survivors] if regime == "rl" else None
        clusters = near_duplicate_clusters(
            [r["id"] for r in survivors], units, configs[regime], guard_texts=guards, same_key=keys, choose=choose_ids
        )
        for cluster in clusters:
            for member in cluster.members:
                if member != cluster.kept:
                    dropped_to[str(member)] = (str(cluster.kept), METHOD_NEAR, cluster.similarity[member])

    dropped = []
    for r in records:
        if r["id"] not in dropped_to:
            continue
        kept_id, method, similarity = dropped_to[r["id"]]
        while kept_id in dropped_to:  # an exact twin whose kept row was itself a near duplicate
            kept_id, _, similarity = dropped_to[kept_id]
        dropped.append(
            {
                "member_id": r["id"],
                "kept_id": kept_id,
                "cluster_id": kept_id,
                "method": method,
                "similarity": similarity,
                "regime": r["regime"],
            }
        )
    kept_ids = [r["id"] for r in records if r["id"] not in dropped_to]
    return DedupResult(kept_ids, dropped)


def prompt_key(prompt: str | None) -> str:
    """sha256 (32 hex) of the normalised prompt: the key :func:`cross_regime_leaks` groups on."""
    return hashlib.sha256(normalize_text(prompt).encode("utf-8")).hexdigest()[:32]


def cross_regime_leaks(records: Iterable[Record]) -> list[dict[str, Any]]:
    """Prompts (the last user turn, normalised) that occur in more than one regime.

    One dict per such prompt: ``prompt_key``, ``prompt`` (as written in the first row seen),
    ``regimes`` (sorted), ``ids`` (sorted). Sorted by prompt_key. Reporting only; what to do about
    them is a policy decision of the caller.
    """
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if normalize_text(r.get("prompt")):
            groups[prompt_key(r.get("prompt"))].append(r)
    leaks = []
    for key in sorted(groups):
        rows = groups[key]
        regimes = sorted({r["regime"] for r in rows})
        if len(regimes) > 1:
            leaks.append(
                {
                    "prompt_key": key,
                    "prompt": rows[0]["prompt"],
                    "regimes": regimes,
                    "ids": sorted(r["id"] for r in rows),
                }
            )
    return leaks
