"""Tests for the pure dedup logic (``posttrain_assets.cleaning.dedup``): normalisation, MinHash, clusters, kept rule."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from benchmarks import bench
from posttrain_assets.cleaning import dedup
from posttrain_assets.cleaning.dedup import MinHashConfig
from posttrain_assets.demo.generator import generate_demo_data
from posttrain_assets.ingest.readers import read_raw_rows
from posttrain_assets.ingest.registry import load_registry
from posttrain_assets.records.normalize import Rejected, parse_payload

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "river",
    "stone",
    "cloud",
    "maple",
    "cedar",
    "harbor",
    "lantern",
    "meadow",
    "orbit",
    "pepper",
    "quartz",
    "saddle",
    "timber",
    "velvet",
    "willow",
    "amber",
    "basil",
    "copper",
    "dune",
    "ember",
    "falcon",
    "garnet",
    "hazel",
    "iris",
    "jasper",
]


def text_of(rng: random.Random, n: int) -> str:
    """n random words from a 51-word vocabulary (two such texts share almost no 5-word shingle)."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def edit_runs(text: str, fraction: float, runs: int, rng: random.Random) -> str:
    """Replace ``fraction`` of the words, in ``runs`` contiguous runs, with words not in the vocabulary."""
    words = text.split()
    k = round(len(words) * fraction)
    sizes = [k // runs + (1 if i < k % runs else 0) for i in range(runs)]
    segment = len(words) // runs
    for r, size in enumerate(sizes):
        start = r * segment + rng.randrange(0, segment - size)
        for j in range(start, start + size):
            words[j] = f"edited{j}"
    return " ".join(words)


def record(rid: str, regime: str, **kw: Any) -> dict[str, Any]:
    """A minimal silver row."""
    base: dict[str, Any] = {
        "id": rid,
        "source": "src_a",
        "regime": regime,
        "messages": [],
        "prompt": "",
        "response": None,
        "chosen": None,
        "rejected": None,
        "answer": None,
        "license": "MIT",
        "origin": {"file": "f.jsonl", "row": 0},
        "created_at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    }
    base.update(kw)
    return base


def sft(rid: str, user: str, assistant: str, **kw: Any) -> dict[str, Any]:
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return record(rid, "sft", messages=msgs, prompt=user, response=assistant, **kw)


def pref(rid: str, prompt: str, chosen: str, rejected: str, **kw: Any) -> dict[str, Any]:
    msgs = [{"role": "user", "content": prompt}]
    return record(rid, "preference", messages=msgs, prompt=prompt, chosen=chosen, rejected=rejected, **kw)


def rl(rid: str, prompt: str, answer: str, **kw: Any) -> dict[str, Any]:
    msgs = [{"role": "user", "content": prompt}]
    return record(rid, "rl", messages=msgs, prompt=prompt, answer=answer, verifier="numeric", **kw)


def by_priority(name: str) -> int:
    return {"src_a": 0, "src_b": 1, "src_c": 2}[name]


# ---------------------------------------------------------------------------------------------------------------
# normalisation, units, exact keys


def test_dedup_unit_per_regime() -> None:
    assert dedup.dedup_unit(sft("1", "Hi", "Hello")) == "user: Hi\nassistant: Hello"
    assert dedup.dedup_unit(pref("2", "Q", "good", "bad")) == "user: Q\nchosen: good\nrejected: bad"
    assert dedup.dedup_unit(rl("3", "What is 2+2?", "4")) == "What is 2+2?"


def test_exact_key_ignores_case_whitespace_unicode_only() -> None:
    a = sft("a", "What is  the capital of France?", "Paris.")
    b = sft("b", "what is the capital of ＦＲＡＮＣＥ?\n", "PARIS.")
    c = sft("c", "What is the capital of France?", "Paris!")
    assert dedup.exact_key(a) == dedup.exact_key(b)
    assert dedup.exact_key(a) != dedup.exact_key(c)
    # the same text in another regime is another unit
    assert dedup.exact_key(rl("d", "user: Paris", "1")) != dedup.exact_key(
        record("e", "sft", messages=[{"role": "user", "content": "Paris"}])
    )
    assert len(dedup.exact_key(a)) == 64


def test_exact_normalized_duplicate_is_dropped_onto_priority_source() -> None:
    a = sft("a", "Name a primary colour.", "Red.", source="src_b")
    b = sft("b", "name a PRIMARY colour.", "red.", source="src_a")
    kept, dropped = dedup.deduplicate([a, b], by_priority)
    assert kept == ["b"]
    assert dropped == [
        {
            "member_id": "a",
            "kept_id": "b",
            "cluster_id": "b",
            "method": "exact_normalized",
            "similarity": 1.0,
            "regime": "sft",
        }
    ]


# ---------------------------------------------------------------------------------------------------------------
# MinHash signatures


def test_shingles() -> None:
    assert dedup.shingles("A b c", 5) == ["a b c"]  # fewer words than a shingle: the whole text
    assert dedup.shingles("one two three four five six", 5) == ["one two three four five", "two three four five six"]
    assert dedup.shingles(" \n ", 5) == []


@pytest.mark.parametrize("words", [2, 5])
@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
def test_signatures_bit_identical_to_datasketch(scheme: str, words: int) -> None:
    rng = random.Random(3)
    texts = [text_of(rng, n) for n in (1, 3, 4, 5, 6, 40, 300)] + ["", "Ünïcödé  TEXT with ＦＵＬＬ width"]
    # small batches: exercises the batch boundaries
    cfg = MinHashConfig(scheme=scheme, batch_shingles=64, candidate_shingle_words=words)
    sigs = dedup.minhash_signatures(texts, cfg)
    assert sigs.shape == (len(texts), 128)
    assert sigs.dtype == (np.uint32 if scheme == "affine32" else np.uint64)
    for text, sig in zip(texts, sigs, strict=True):
        ref = MinHash(num_perm=128, seed=1, scheme=scheme, hashfunc=dedup.shingle_hash32)
        for s in dedup.shingles(text, words):
            ref.update(s.encode("utf-8"))
        assert np.array_equal(sig, ref.hashvalues)
    # the empty text has datasketch's empty signature
    assert MinHash(num_perm=128, seed=1, scheme=scheme).is_empty()
    assert dedup.to_minhash(sigs[7], cfg).is_empty()


def test_shingle_hash_combines_word_hashes() -> None:
    first = int.from_bytes(hashlib.sha1(b"alpha").digest()[:4], "little")
    assert dedup.shingle_hash32(b"alpha") == first
    assert dedup.shingle_hash32("alpha beta") == dedup.shingle_hash32(b"alpha beta")
    assert dedup.shingle_hash32("alpha beta") != dedup.shingle_hash32("beta alpha")  # word order matters


def test_candidate_pairs_leave_out_pairs_whose_same_keys_differ() -> None:
    """Six rows with one signature (every pair in every bucket); a pair counts only when its first row has no key
    or shares it, as verification judges it, so those are the candidates."""
    cfg = MinHashConfig()
    sigs = np.tile(np.arange(cfg.num_perm, dtype=np.uint32), (6, 1))
    everything = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    assert [tuple(p) for p in dedup.candidate_pairs(sigs, cfg).tolist()] == everything
    same_key = [None, "a", "a", "b", "b", "b"]
    expected = [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 2), (3, 4), (3, 5), (4, 5)]
    assert [tuple(p) for p in dedup.candidate_pairs(sigs, cfg, same_key).tolist()] == expected
    # the hash the DuckDB path pairs on: equal keys, equal hashes; none without a same key
    t1, t2 = rl("t1", "Legs 3 and 4: the area?", "6"), rl("t2", "Legs 3 and 4: the  AREA?", "6")
    assert dedup.same_key_hash(t1) == dedup.same_key_hash(t2) != dedup.same_key_hash(rl("t3", "Legs 3 and 5", "6"))
    assert dedup.same_key_hash(sft("s", "Legs 3 and 4", "x")) is None


def test_candidate_pairs_are_the_pairs_minhash_lsh_returns() -> None:
    rng = random.Random(5)
    bases = [text_of(rng, 120) for _ in range(30)]
    texts = bases + [edit_runs(b, 0.1, 2, rng) for b in bases[:10]] + [bases[0], bases[0]]  # a bucket of four
    cfg = MinHashConfig()
    sigs = dedup.minhash_signatures(texts, cfg)
    bands, rows = dedup.lsh_bands(cfg)
    lsh = MinHashLSH(threshold=cfg.effective_lsh_threshold(), num_perm=cfg.num_perm)
    assert (lsh.b, lsh.r) == (bands, rows)
    for i, sig in enumerate(sigs):
        lsh.insert(i, dedup.to_minhash(sig, cfg))
    floor = cfg.effective_lsh_threshold()
    expected = sorted(
        (i, j)
        for i, sig in enumerate(sigs)
        for j in lsh.query(dedup.to_minhash(sig, cfg))
        if j > i and dedup.estimated_jaccard(sig, sigs[j]) >= floor
    )
    assert [tuple(p) for p in dedup.candidate_pairs(sigs, cfg).tolist()] == expected
    assert (0, 40) in expected and (40, 41) in expected and (0, 30) in expected


def test_pairs_in_buckets_lists_every_pair_of_each_bucket_once() -> None:
    ordered = np.array([9, 4, 7, 1, 8, 0, 3, 6, 2, 5])
    starts, sizes = np.array([0, 2, 5, 8]), np.array([2, 3, 3, 2])  # buckets {9,4} {7,1,8} {0,3,6} {2,5}
    pairs = sorted(map(tuple, np.concatenate(list(dedup._pairs_in_buckets(ordered, starts, sizes))).tolist()))
    expected = sorted(
        pair
        for s, z in zip(starts, sizes, strict=True)
        for pair in itertools.combinations(sorted(ordered[s : s + z].tolist()), 2)
    )
    assert pairs == expected == [(0, 3), (0, 6), (1, 7), (1, 8), (2, 5), (3, 6), (4, 9), (7, 8)]


def test_a_large_bucket_is_split_by_the_next_bands_and_keeps_its_true_pairs(monkeypatch) -> None:
    """300 rows share band 0 (as long chats built from common word pairs do at scale); among them 10 groups of
    three agree on every slot. Splitting by band 1 lists about 10 x 3 pairs instead of 300 x 299 / 2."""
    cfg = MinHashConfig()
    bands, rows = dedup.lsh_bands(cfg)
    rng = np.random.default_rng(3)
    sigs = rng.integers(0, 2**32, size=(300, cfg.num_perm), dtype=np.uint64).astype(np.uint32)
    sigs[:, :rows] = 7  # one bucket of 300 in band 0
    for group in range(10):
        sigs[group * 3 + 1 : group * 3 + 3] = sigs[group * 3]  # rows 3g, 3g+1, 3g+2 are identical
    listed: list[int] = []
    real = dedup._pairs_in_buckets

    def listing(ordered, starts, sizes):
        listed.extend(sizes.tolist())
        return real(ordered, starts, sizes)

    monkeypatch.setattr(dedup, "_pairs_in_buckets", listing)
    pairs = [tuple(p) for p in dedup.candidate_pairs(sigs, cfg).tolist()]
    assert pairs == sorted((3 * g + a, 3 * g + b) for g in range(10) for a, b in ((0, 1), (0, 2), (1, 2)))
    assert max(listed) == 3  # no bucket larger than a group was ever listed whole
    monkeypatch.setattr(dedup, "MAX_BUCKET", 1000)
    assert [tuple(p) for p in dedup.candidate_pairs(sigs, cfg).tolist()] == pairs  # same result, listed whole


def test_signatures_index_in_datasketch_lsh() -> None:
    rng = random.Random(4)
    base = text_of(rng, 200)
    texts = [base, edit_runs(base, 0.05, 1, rng), text_of(rng, 200)]
    cfg = MinHashConfig()
    sigs = dedup.minhash_signatures(texts, cfg)
    lsh = MinHashLSH(threshold=0.7, num_perm=128)
    for i, sig in enumerate(sigs):
        lsh.insert(i, dedup.to_minhash(sig, cfg))
    assert sorted(lsh.query(dedup.to_minhash(sigs[0], cfg))) == [0, 1]
    assert dedup.to_minhash(sigs[0], cfg).jaccard(dedup.to_minhash(sigs[1], cfg)) == dedup.estimated_jaccard(
        sigs[0], sigs[1]
    )


# ---------------------------------------------------------------------------------------------------------------
# near-duplicate clusters


@pytest.mark.parametrize(
    ("fraction", "runs", "found"),
    # 5-15% reworded in one or two runs: every copy found. 15% in runs puts the 5-shingle Jaccard at about
    # 0.71-0.74 over 250 words (the shingle rule alone found 12 and 4 of 20), the edit similarity at 0.85.
    [(0.05, 1, 20), (0.05, 2, 20), (0.10, 1, 20), (0.10, 2, 20), (0.15, 1, 20), (0.15, 2, 20)],
)
def test_edited_copies_cluster_and_distinct_texts_do_not(fraction: float, runs: int, found: int) -> None:
    rng = random.Random(f"{fraction}:{runs}")
    originals = [text_of(rng, 250) for _ in range(20)]
    copies = [edit_runs(t, fraction, runs, rng) for t in originals]
    ids = [f"o{i}" for i in range(20)] + [f"c{i}" for i in range(20)]
    clusters = dedup.near_duplicate_clusters(ids, originals + copies)
    assert len(clusters) == found
    assert all(sorted(c.members) in [sorted([f"c{i}", f"o{i}"]) for i in range(20)] for c in clusters)
    for c in clusters:
        assert c.kept == c.members[0] and c.kept.startswith("o")  # first in input order
        assert c.similarity[c.kept] == 1.0
        # edit similarity of a copy with a fraction f of its words replaced: exactly 1 - f here
        assert min(c.similarity.values()) == pytest.approx(1.0 - round(250 * fraction) / 250)


def test_edit_similarity() -> None:
    assert dedup.edit_similarity("A b c d", "a B x d") == 0.75  # normalised words; one substitution of four
    assert dedup.edit_similarity("a b c d", "a c d") == 0.75  # one deletion
    assert dedup.edit_similarity("", "") == 1.0 and dedup.edit_similarity("a", "") == 0.0
    assert dedup.edit_distance(list("kitten"), list("sitting")) == 3
    rng = random.Random(12)
    for _ in range(200):  # Myers' bit-parallel distance equals the textbook dynamic program
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 90))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 90))]
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            prev, row = row, [i]
            for j, y in enumerate(b, 1):
                row.append(min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (x != y)))
        assert dedup.edit_distance(a, b) == row[-1]
    assert dedup.shingle_jaccard(list("abcd"), list("abce"), 2) == 0.5
    assert dedup.shingle_jaccard(["a"], ["a"], 5) == 1.0


def test_short_units_need_the_shingle_rule() -> None:
    """Under 40 words a one-word change is 5% of the text: templated rows stay apart unless 5-shingle similar."""
    template = "Classify the sentiment of the following review as Positive or Negative. The {}: arrived late."
    a, b = sft("a", template.format("blender"), "Negative"), sft("b", template.format("bike"), "Negative")
    ua, ub = dedup.dedup_unit(a), dedup.dedup_unit(b)
    assert dedup.edit_similarity(ua, ub) > 0.9 and len(dedup.tokens(ua)) < 40
    assert dedup.deduplicate([a, b], by_priority) == (["a", "b"], [])
    long_a = sft("la", template.format("blender") + " " + text_of(random.Random(1), 40), "Negative")
    long_b = sft("lb", long_a["prompt"].replace("blender", "bike"), "Negative")
    assert dedup.deduplicate([long_a, long_b], by_priority).kept_ids == ["la"]


def test_edit_of_twenty_percent_is_not_a_near_duplicate_at_defaults() -> None:
    rng = random.Random(9)
    originals = [text_of(rng, 250) for _ in range(10)]
    copies = [edit_runs(t, 0.30, 2, rng) for t in originals]
    assert dedup.near_duplicate_clusters(list(range(20)), originals + copies) == []


def test_preference_pair_clustered_as_a_unit() -> None:
    rng = random.Random(5)
    prompt = text_of(rng, 400)
    chosen, rejected = text_of(rng, 15), text_of(rng, 15)
    a = pref("a", prompt, chosen, rejected)
    # same prompt, other responses: not a duplicate, although the whole unit is mostly the shared prompt
    b = pref("b", prompt, text_of(rng, 15), text_of(rng, 15))
    assert dedup.estimated_jaccard(*dedup.minhash_signatures([dedup.dedup_unit(a), dedup.dedup_unit(b)])) >= 0.8
    # a copy of the pair with a reworded prompt is one
    c = pref("c", edit_runs(prompt, 0.05, 1, rng), chosen, rejected)
    kept, dropped = dedup.deduplicate([a, b, c], by_priority)
    assert kept == ["a", "b"]
    assert [(d["member_id"], d["kept_id"], d["method"]) for d in dropped] == [("c", "a", "near")]


def test_rl_templates_with_other_numbers_or_answers_are_distinct() -> None:
    rows = [
        rl("a", "A right triangle has legs of length $7$ and $24$. What is the area of the triangle?", "84"),
        rl("b", "A right triangle has legs of length $7$ and $24$. What is the hypotenuse of the triangle?", "25"),
        rl("c", "A right triangle has legs of length $9$ and $12$. What is the area of the triangle?", "54"),
        rl("d", "A right triangle has legs of length $7$ and $24$. What's the area of this triangle?", "84"),
    ]
    kept, dropped = dedup.deduplicate(rows, by_priority)
    assert kept == ["a", "b", "c"]
    assert [(d["member_id"], d["kept_id"]) for d in dropped] == [("d", "a")]


def test_regimes_never_compared() -> None:
    text = "Explain how vaccines train the immune system to recognise a pathogen without causing the disease."
    rows = [rl("r", text, "1"), sft("s", text, "ok"), record("p", "preference", prompt=text, chosen="x", rejected="y")]
    assert dedup.deduplicate(rows, by_priority) == (["r", "s", "p"], [])


# ---------------------------------------------------------------------------------------------------------------
# kept member


def kept(members: list[dict[str, Any]]) -> dict[str, Any]:
    return min(members, key=lambda r: dedup.kept_sort_key(r, by_priority))


def test_kept_rule() -> None:
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    low = sft("low", "q", "a long answer with many words", source="src_b")
    high = sft("high", "q", "short", source="src_a")
    assert kept([low, high])["id"] == "high"  # priority beats quality
    longer = sft("longer", "q", "a longer answer here", created_at=t0 + dt.timedelta(days=1))
    shorter = sft("shorter", "q", "short answer", created_at=t0)
    assert kept([shorter, longer])["id"] == "longer"  # quality beats age
    older = sft("older", "q", "same size", created_at=t0)
    newer = sft("newer", "q", "same size", created_at=t0 + dt.timedelta(days=1))
    assert kept([newer, older])["id"] == "older"  # then earliest created_at
    r1 = sft("r1", "q", "same size", origin={"file": "a.jsonl", "row": 9})
    r2 = sft("r2", "q", "same size", origin={"file": "a.jsonl", "row": 2})
    r3 = sft("r3", "q", "same size", origin={"file": "0.jsonl", "row": 50})
    assert kept([r1, r2, r3])["id"] == "r3"  # then file, then row
    assert kept([r1, r2])["id"] == "r2"
    assert dedup.quality_score(pref("p", "q", "one two", "three")) == 3
    assert dedup.quality_score(rl("x", "what is one", "1")) == 4


def test_exact_twin_of_a_near_dropped_row_points_to_final_kept() -> None:
    rng = random.Random(11)
    base = text_of(rng, 150)
    a = sft("a", "Tell me a story.", base, source="src_a")
    b = sft("b", "Tell me a story.", edit_runs(base, 0.05, 1, rng), source="src_b")
    b_twin = sft("b2", "tell me a STORY.", edit_runs(base, 0.05, 1, random.Random(11 + 0)), source="src_c")
    b_twin["messages"][1]["content"] = b["messages"][1]["content"].upper()
    kept, dropped = dedup.deduplicate([a, b, b_twin], by_priority)
    assert kept == ["a"]
    got = {d["member_id"]: (d["kept_id"], d["method"]) for d in dropped}
    assert got == {"b": ("a", "near"), "b2": ("a", "exact_normalized")}


# ---------------------------------------------------------------------------------------------------------------
# the demo data's planted near duplicates


def demo_records(out: Path) -> tuple[list[dict[str, Any]], dict[tuple[str, int], str], dict[str, Any], Any]:
    """Parse every training source of freshly generated demo data into minimal silver rows.

    Returns (rows with exact duplicates collapsed by content id, (file, row) -> content id, manifest, registry).
    """
    registry = load_registry(generate_demo_data(out, seed=7))
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    rows: list[dict[str, Any]] = []
    where: dict[tuple[str, int], str] = {}
    seen: set[str] = set()
    for source in registry.sources:
        if source.role == "eval":
            continue
        for path in source.files():
            for raw in read_raw_rows(path):
                parsed = parse_payload(raw.payload, raw.decode_error, source.format, source.regime)
                if isinstance(parsed, Rejected):
                    continue
                cid = parsed.content_id()
                where[(path.relative_to(out).as_posix(), raw.row_number)] = cid
                if cid in seen:
                    continue
                seen.add(cid)
                rows.append(
                    record(
                        cid,
                        parsed.regime,
                        source=source.name,
                        messages=parsed.messages,
                        prompt=parsed.prompt,
                        response=parsed.response,
                        chosen=parsed.chosen,
                        rejected=parsed.rejected,
                        answer=parsed.answer,
                        origin={"file": path.relative_to(out).as_posix(), "row": raw.row_number},
                    )
                )
    return rows, where, manifest, registry


def test_demo_planted_near_duplicates_all_found(tmp_path: Path) -> None:
    rows, where, manifest, registry = demo_records(tmp_path)
    assert len(rows) == 2819
    kept, dropped = dedup.deduplicate(rows, registry.priority)
    final = {r["id"]: r["id"] for r in rows}
    final.update({d["member_id"]: d["kept_id"] for d in dropped})
    planted = manifest["near_duplicates"]
    assert len(planted) == 17
    pairs = [(where[(n["file"], n["row"])], where[(n["file"], n["of_row"])]) for n in planted]
    assert all(final[a] == final[b] for a, b in pairs)  # recall 1.0
    # three planted GSM8K copies differ only in their worked solution, which is not part of the row: same content id
    assert sum(a == b for a, b in pairs) == 3
    planted_ids = {i for pair in pairs for i in pair}
    assert {(d["method"], d["regime"]) for d in dropped} == {("near", "sft"), ("near", "preference"), ("near", "rl")}
    assert len(dropped) == 19 and len(kept) == 2819 - 19
    extra = [d for d in dropped if d["member_id"] not in planted_ids]
    # the only clusters beyond the 14 planted pairs: templated GSM8K rows whose copies differ in a name or an
    # object noun only, with the same numbers and answer (the same problem for an RL prompt bank)
    by_id = {r["id"]: r for r in rows}
    assert sorted((by_id[d["member_id"]]["prompt"][:20], by_id[d["kept_id"]]["prompt"][:20]) for d in extra) == [
        ("Noah has $120 saved.", "Aisha has $120 saved"),
        ("Olga has 56 voluntee", "Elena has 56 books a"),
        ("There are 10 marbles", "There are 10 sticker"),
        ("There are 78 student", "There are 78 chairs."),
        ("Yuki has $1060 saved", "Grace has $1060 save"),
    ]


# ---------------------------------------------------------------------------------------------------------------
# recall and precision on generated English-like texts (issue 4)

NOUNS = bench.NOUNS[:42]
VERBS = bench.VERBS[:24]
ADJS = bench.ADJS[:30]
DETS = bench.DETS[:8]
PREPS = ["in", "near", "across", "under", "over", "through", "during", "after", "before", "within"]
OPENERS = ["In practice,", "For example,", "However,", "As a result,", "First,", "Finally,", "Meanwhile,"]
EDIT_WORDS = sorted({*NOUNS, *VERBS, *ADJS})


def sentence_pool(rng: random.Random, size: int) -> list[str]:
    """Templated English-like sentences (determiner adjective noun verb ...), like benchmarks.bench's."""
    pool = []
    for _ in range(size):
        words = [rng.choice(DETS).capitalize(), rng.choice(ADJS), rng.choice(NOUNS), rng.choice(VERBS)]
        words += [rng.choice(DETS), rng.choice(NOUNS)]
        if rng.random() < 0.6:
            words += [rng.choice(PREPS), rng.choice(DETS), rng.choice(ADJS), rng.choice(NOUNS)]
        if rng.random() < 0.3:
            words = [rng.choice(OPENERS), words[0].lower(), *words[1:]]
        pool.append(" ".join(words) + ".")
    return pool


def passage(rng: random.Random, pool: list[str], words: int) -> str:
    """About ``words`` words of whole sentences from the pool."""
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(rng.choice(pool))
    return " ".join(out)


def replace_word(word: str, rng: random.Random) -> str:
    new = rng.choice(EDIT_WORDS)
    return new if new != word.rstrip(".,").lower() else replace_word(word, rng)


def edit_scattered(text: str, fraction: float, rng: random.Random) -> str:
    """Replace ``round(fraction * words)`` words at distinct random positions, one by one."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, round(fraction * len(words)))):
        words[i] = replace_word(words[i], rng)
    return " ".join(words)


def edit_in_runs(text: str, fraction: float, rng: random.Random, runs: int) -> str:
    """Replace ``round(fraction * words)`` words in ``runs`` contiguous, non-overlapping runs."""
    words = text.split(" ")
    k = max(1, round(fraction * len(words)))
    segment = len(words) // runs
    for r in range(runs):
        size = k // runs + (1 if r < k % runs else 0)
        start = r * segment + rng.randrange(0, segment - size + 1)
        for i in range(start, start + size):
            words[i] = replace_word(words[i], rng)
    return " ".join(words)


EDITS = {
    "scattered": edit_scattered,
    "one_run": lambda text, f, rng: edit_in_runs(text, f, rng, 1),
    "two_runs": lambda text, f, rng: edit_in_runs(text, f, rng, 2),
}


def test_recall_and_precision_on_generated_near_duplicates() -> None:
    """Planted copies with 5%, 10% and 15% of their words replaced (scattered, in one run, in two runs) among
    unrelated texts and look-alikes from the same templates: recall and precision >= 0.95 at the defaults."""
    rng = random.Random(2024)
    pool = sentence_pool(rng, 3000)
    prompts = ["Summarise the report below.", "Explain this to a new colleague.", "Rewrite the passage plainly."]
    rows: list[dict[str, Any]] = []
    group: dict[str, str] = {}
    planted: list[str] = []
    per_condition = 25
    for fraction in (0.05, 0.10, 0.15):
        for mode, edit in EDITS.items():
            for k in range(per_condition):
                name = f"{mode}{fraction:.2f}_{k}"
                prompt, reply = rng.choice(prompts), passage(rng, pool, rng.randint(100, 400))
                rows.append(sft(f"o_{name}", prompt, reply))
                rows.append(sft(f"c_{name}", prompt, edit(reply, fraction, rng)))
                group[f"o_{name}"] = group[f"c_{name}"] = name
                planted.append(name)
    # look-alikes that must stay apart: the same prompt and half of another reply's sentences
    for k in range(60):
        prompt, reply = rng.choice(prompts), rng.choice([r for r in rows if r["id"].startswith("o_")])
        sentences = reply["messages"][1]["content"].split(". ")
        half = len(sentences) // 2
        body = ". ".join(sentences[:half]) + ". " + passage(rng, pool, 9 * (len(sentences) - half))
        rows.append(sft(f"u_{k}", prompt, body))
        group[f"u_{k}"] = f"u_{k}"
    # unrelated texts of the same templates, short ones included (left to the 5-shingle rule)
    for k in range(150):
        rows.append(sft(f"x_{k}", rng.choice(prompts), passage(rng, pool, rng.randint(10, 400))))
        group[f"x_{k}"] = f"x_{k}"

    def score(cfg: dict[str, MinHashConfig] | None) -> tuple[int, int, int, dict[str, int]]:
        """(planted copies found, rows dropped, of them true positives, found by condition)."""
        _, dropped = dedup.deduplicate(rows, by_priority, cfg)
        final = {r["id"]: r["id"] for r in rows} | {d["member_id"]: d["kept_id"] for d in dropped}
        found = [n for n in planted if final[f"c_{n}"] == final[f"o_{n}"]]
        true_pos = sum(group[d["member_id"]] == group[d["kept_id"]] for d in dropped)
        return len(found), len(dropped), true_pos, dict(Counter(n.rsplit("_", 1)[0] for n in found))

    assert len(planted) == 225
    found, detected, true_pos, _ = score(None)  # the defaults
    recall, precision = found / len(planted), true_pos / detected
    assert recall >= 0.95 and precision >= 0.95
    assert (found, detected, true_pos) == (225, 225, 225)  # recall 1.0, precision 1.0
    # the 5-shingle rule alone (no edit rule: the defaults before issue 4) misses most 10-15% and scattered copies
    old = {
        r: MinHashConfig(shingle_words=c.shingle_words, edit_threshold=None) for r, c in dedup.DEFAULT_CONFIGS.items()
    }
    found, detected, true_pos, by_condition = score(old)
    assert (found, detected, true_pos) == (136, 136, 136)  # recall 0.6
    assert by_condition == {
        "one_run0.05": 25,
        "two_runs0.05": 25,
        "one_run0.10": 25,
        "two_runs0.10": 25,
        "one_run0.15": 23,
        "two_runs0.15": 13,
    }  # and no scattered copy at all
