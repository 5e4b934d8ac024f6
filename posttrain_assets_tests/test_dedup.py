"""Tests for the pure dedup logic (``posttrain_assets.dedup``): normalisation, MinHash, clusters, kept rule, leaks."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from posttrain_assets import dedup
from posttrain_assets.dedup import MinHashConfig, normalize_text
from posttrain_assets.demo_data import generate_demo_data
from posttrain_assets.formats.readers import read_raw_rows
from posttrain_assets.normalize import Rejected, parse_payload
from posttrain_assets.registry import load_registry

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


def test_normalize_text() -> None:
    assert normalize_text("  Hello\u00a0 WORLD\n\tagain ") == "hello world again"
    assert normalize_text("ＦＵＬＬ width ﬁne") == "full width fine"  # NFKC: full-width letters, ligature
    assert normalize_text("Straße") == "strasse"  # casefold, not lower
    assert normalize_text("Cafe\u0301") == normalize_text("Café")  # combining accent composed
    assert normalize_text("") == "" and normalize_text(None) == ""
    assert normalize_text("a, b!") == "a, b!"  # punctuation kept


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


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
def test_signatures_bit_identical_to_datasketch(scheme: str) -> None:
    rng = random.Random(3)
    texts = [text_of(rng, n) for n in (1, 3, 4, 5, 6, 40, 300)] + ["", "Ünïcödé  TEXT with ＦＵＬＬ width"]
    cfg = MinHashConfig(scheme=scheme, batch_shingles=64)  # small batches: exercises the batch boundaries
    sigs = dedup.minhash_signatures(texts, cfg)
    assert sigs.shape == (len(texts), 128)
    assert sigs.dtype == (np.uint32 if scheme == "affine32" else np.uint64)
    for text, sig in zip(texts, sigs, strict=True):
        ref = MinHash(num_perm=128, seed=1, scheme=scheme)
        for s in dedup.shingles(text, 5):
            ref.update(s.encode("utf-8"))
        assert np.array_equal(sig, ref.hashvalues)
    # the empty text has datasketch's empty signature
    assert MinHash(num_perm=128, seed=1, scheme=scheme).is_empty()
    assert dedup.to_minhash(sigs[7], cfg).is_empty()


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
    # 5-10% reworded: every copy found. 15% in one or two runs puts the true 5-shingle Jaccard at about
    # 0.71-0.74 over 250 words, right at the 0.7 threshold, so MinHash's estimate (sd ~0.04) finds part.
    [(0.05, 1, 20), (0.05, 2, 20), (0.10, 1, 20), (0.10, 2, 20), (0.15, 1, 12), (0.15, 2, 4)],
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
        assert 0.7 <= min(c.similarity.values()) < 1.0


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


def test_choose_kept_rule() -> None:
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    low = sft("low", "q", "a long answer with many words", source="src_b")
    high = sft("high", "q", "short", source="src_a")
    assert dedup.choose_kept([low, high], by_priority)["id"] == "high"  # priority beats quality
    longer = sft("longer", "q", "a longer answer here", created_at=t0 + dt.timedelta(days=1))
    shorter = sft("shorter", "q", "short answer", created_at=t0)
    assert dedup.choose_kept([shorter, longer], by_priority)["id"] == "longer"  # quality beats age
    older = sft("older", "q", "same size", created_at=t0)
    newer = sft("newer", "q", "same size", created_at=t0 + dt.timedelta(days=1))
    assert dedup.choose_kept([newer, older], by_priority)["id"] == "older"  # then earliest created_at
    r1 = sft("r1", "q", "same size", origin={"file": "a.jsonl", "row": 9})
    r2 = sft("r2", "q", "same size", origin={"file": "a.jsonl", "row": 2})
    r3 = sft("r3", "q", "same size", origin={"file": "0.jsonl", "row": 50})
    assert dedup.choose_kept([r1, r2, r3], by_priority)["id"] == "r3"  # then file, then row
    assert dedup.choose_kept([r1, r2], by_priority)["id"] == "r2"
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
# cross-regime leaks


def test_cross_regime_leaks() -> None:
    rows = [
        rl("r1", "What is 17 * 3?", "51"),
        sft("s1", "what is 17 *  3?", "17 * 3 = 51."),
        pref("p1", "Write a haiku.", "Leaves fall.", "No."),
        sft("s2", "Write a haiku.", "Quiet pond."),
        sft("s3", "Write a haiku.", "Frog jumps."),
        rl("r2", "Only in RL: 2 + 2?", "4"),
    ]
    leaks = dedup.cross_regime_leaks(rows)
    got = sorted((leak["regimes"], leak["ids"], leak["prompt"]) for leak in leaks)
    assert got == [
        (["preference", "sft"], ["p1", "s2", "s3"], "Write a haiku."),
        (["rl", "sft"], ["r1", "s1"], "What is 17 * 3?"),
    ]
    assert all(leak["prompt_key"] == dedup.prompt_key(leak["prompt"]) for leak in leaks)


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
