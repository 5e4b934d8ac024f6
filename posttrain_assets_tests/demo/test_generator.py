"""Tests for the seeded demo-data generator (``posttrain_assets.demo.generator``)."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from posttrain_assets.demo.generator import (
    COMPLETING_MODELS,
    EVAL_FAMILIES,
    FORMATS,
    GSM8K_FAMILIES,
    JUDGES,
    LENGTH_BIASED_SOURCE,
    MULTI_RATER_SOURCE,
    SOURCES,
    TRAIN_FAMILIES,
    generate_demo_data,
    load_pool,
    main,
)

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
UNPARSEABLE = object()  # marker for a physical row that is not valid UTF-8 JSON


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Generate once per module: (output dir, manifest)."""
    out = tmp_path_factory.mktemp("demo")
    registry = generate_demo_data(out, seed=7)
    assert registry == out / "sources.yaml"
    return out, json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def raw_lines(path: Path) -> list[bytes]:
    """Non-blank physical lines of a (possibly gzipped) JSONL file."""
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    return [line for line in data.split(b"\n") if line.strip()]


def load_rows(path: Path) -> list[Any]:
    """Every physical row of a file; unparseable JSONL lines come back as :data:`UNPARSEABLE`."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    rows: list[Any] = []
    for line in raw_lines(path):
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            rows.append(UNPARSEABLE)
    return rows


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _message_problems(
    msgs: Any, role_key: str = "role", content_key: str = "content", roles: set[str] | dict[str, str] = ROLES
) -> set[str]:
    """Problems of a message list, in the adapter's reason codes."""
    if not isinstance(msgs, list):
        return {"wrong_type"}
    if not msgs:
        return {"empty_content"}
    out: set[str] = set()
    for m in msgs:
        if not isinstance(m, dict):
            out.add("wrong_type")
            continue
        if m.get(role_key) is None or m.get(content_key) is None:
            out.add("missing_field")
            continue
        if not _is_text(m[role_key]) or not _is_text(m[content_key]):
            out.add("wrong_type")
            continue
        if m[role_key] not in roles:
            out.add("unknown_role")
        if not m[content_key].strip():
            out.add("empty_content")
    return out


def _fields(row: dict[str, Any], names: tuple[str, ...]) -> set[str]:
    """missing_field / wrong_type / empty_content for required string fields."""
    out: set[str] = set()
    for name in names:
        if row.get(name) is None:
            out.add("missing_field")
        elif not _is_text(row[name]):
            out.add("wrong_type")
        elif not row[name].strip():
            out.add("empty_content")
    return out


def hh_split(transcript: str) -> tuple[str, str]:
    """(prefix up to the last Assistant tag, final assistant reply)."""
    prefix, _, last = transcript.rpartition("\n\nAssistant:")
    return prefix, last.strip()


def problems(fmt: str, row: Any) -> set[str]:
    """An independent, minimal validator: the set of reason codes a row deserves (empty = well-formed)."""
    if row is UNPARSEABLE:
        return {"unparseable"}
    if fmt == "messages":
        if "messages" not in row:
            return {"missing_field"}
        out = _message_problems(row["messages"])
        if not out and row["messages"][-1]["role"] != "assistant":
            out.add("not_ending_with_assistant")
        return out
    if fmt == "sharegpt":
        if "conversations" not in row:
            return {"missing_field"}
        out = _message_problems(row["conversations"], "from", "value", SHAREGPT_ROLES)
        if not out and row["conversations"][-1]["from"] != "gpt":
            out.add("not_ending_with_assistant")
        return out
    if fmt == "alpaca":
        out = _fields(row, ("instruction", "output"))
        return out | ({"wrong_type"} if not _is_text(row.get("input", "")) else set())
    if fmt == "trl_preference":
        if "prompt" in row:
            return _fields(row, ("prompt", "chosen", "rejected"))
        out = _message_problems(row.get("chosen")) | _message_problems(row.get("rejected"))
        if not out:
            c, r = row["chosen"], row["rejected"]
            if c[:-1] != r[:-1] or c[-2]["role"] != "user" or {c[-1]["role"], r[-1]["role"]} != {"assistant"}:
                out.add("pair_prefix_mismatch")
        return out
    if fmt == "ultrafeedback":
        out = _fields(row, ("prompt",)) | _message_problems(row["chosen"]) | _message_problems(row["rejected"])
        if not out and (row["chosen"][:-1] != row["rejected"][:-1] or row["chosen"][0]["content"] != row["prompt"]):
            out.add("pair_prefix_mismatch")
        return out
    if fmt == "hh_rlhf":
        out = _fields(row, ("chosen", "rejected"))
        if not out:
            (pc, c), (pr, r) = hh_split(row["chosen"]), hh_split(row["rejected"])
            if pc != pr:
                out.add("pair_prefix_mismatch")
            if not c or not r or not pc.startswith("\n\nHuman:"):
                out.add("empty_content")
        return out
    if fmt == "gsm8k":
        out = _fields(row, ("question", "answer"))
        if not out and "\n#### " not in row["answer"]:
            out.add("missing_gold_answer")
        return out
    if fmt == "math":
        out = _fields(row, ("problem", "solution"))
        if not out and "\\boxed{" not in row["solution"]:
            out.add("missing_gold_answer")
        return out
    if fmt == "verl":
        out = _message_problems(row["prompt"])
        if not str(row["reward_model"]["ground_truth"]).strip():
            out.add("missing_gold_answer")
        return out
    raise AssertionError(f"unknown format {fmt}")


def final_replies(fmt: str, row: dict[str, Any]) -> tuple[str, str]:
    """(chosen reply, rejected reply) of a well-formed preference row."""
    if fmt == "hh_rlhf":
        return hh_split(row["chosen"])[1], hh_split(row["rejected"])[1]
    if isinstance(row["chosen"], list):
        return row["chosen"][-1]["content"], row["rejected"][-1]["content"]
    return row["chosen"], row["rejected"]


def canonical(fmt: str, row: dict[str, Any]) -> str:
    """Format-independent content signature used to check exact duplicates across sources."""
    if fmt == "sharegpt":
        msgs = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
        return json.dumps({"messages": msgs}, sort_keys=True)
    if fmt == "trl_preference" and "prompt" not in row:
        prompt = row["chosen"][:-1]
        body = {"prompt": prompt, "chosen": row["chosen"][-1]["content"], "rejected": row["rejected"][-1]["content"]}
        return json.dumps(body, sort_keys=True)
    if fmt == "trl_preference":
        body = {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": row["chosen"],
            "rejected": row["rejected"],
        }
        return json.dumps(body, sort_keys=True)
    if fmt == "sharegpt" or fmt == "messages":
        return json.dumps({"messages": row["messages"]}, sort_keys=True)
    return json.dumps(row, sort_keys=True)


NOT_CONTENT = ("role", "from", "id", "ratings", "judge", "chosen_model", "rejected_model")


def all_texts(value: Any) -> list[str]:
    """Every content string inside a JSON-like value, in order (skipping ``role``/``from``/``id`` and who labelled
    a preference pair: ``ratings``, ``judge``, the models)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() if k not in NOT_CONTENT for t in all_texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in all_texts(v)]
    return []


def shingles(row: Any, n: int = 5) -> set[tuple[str, ...]]:
    """Lower-cased whitespace-word n-grams over every string of a row."""
    words = " ".join(all_texts(row)).lower().split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


# ------------------------------------------------------------------------------------------------


def test_deterministic_bytes(tmp_path: Path) -> None:
    """Same seed -> byte-identical files; another seed -> different content, same row counts."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_demo_data(a, seed=7)
    generate_demo_data(b, seed=7)
    generate_demo_data(c, seed=8)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert len(files_a) == len(SOURCES) + 2  # data files + sources.yaml + manifest.json
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "sft/messages.jsonl").read_bytes() != (c / "sft/messages.jsonl").read_bytes()
    ma, mc = (json.loads((d / "manifest.json").read_text()) for d in (a, c))
    assert {k: v["rows"] for k, v in ma["sources"].items()} == {k: v["rows"] for k, v in mc["sources"].items()}
    assert "seed 8" in (c / "sources.yaml").read_text()


# The text pools (posttrain_assets/demo/pools/*.json) and what seed 7 makes of them. Editing a pool (or the
# generator's draws) changes these hashes on purpose: update them in the same change. Only text files are
# pinned (Parquet and gzip bytes also depend on the pyarrow / zlib version).
POOL_FILES = ("alpaca", "gsm8k", "labellers", "near_duplicates", "prompts", "replies", "topics")
PINNED_SHA256 = {
    "sft/messages.jsonl": "10670541ab8c65969dde4598f5d29d488f46e5ba53d4b13ead3268b048b17bff",
    "sft/alpaca.json": "66f256a781a56f4fc8df0c8dc9a12bb7373efda0796da6dbd5f3deba41ad21f2",
    "rl/gsm8k_train.jsonl": "4c7c4a9e850f5d2d38aff459fa2993b35ada3e3b994c1999193f01f5a7f36187",
}


def test_pools_load_and_seed_7_output_is_pinned(demo: tuple[Path, dict[str, Any]]) -> None:
    """Every pool file loads as an object of non-empty pools, and seed 7 still writes the pinned bytes."""
    pool_dir = resources.files("posttrain_assets.demo").joinpath("pools")
    assert sorted(f.name for f in pool_dir.iterdir() if f.name.endswith(".json")) == [f"{n}.json" for n in POOL_FILES]
    for name in POOL_FILES:
        pool = load_pool(name)
        assert isinstance(pool, dict) and pool and all(pool.values()), name
    assert len(GSM8K_FAMILIES) == len(TRAIN_FAMILIES) + len(EVAL_FAMILIES)
    assert all(f["questions"] for f in GSM8K_FAMILIES)
    out, _ = demo
    for rel, digest in PINNED_SHA256.items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, f"{rel} changed: update PINNED_SHA256?"


def test_registry_shape(demo: tuple[Path, dict[str, Any]]) -> None:
    """The registry lists every source in order, with every adapter format and the expected metadata."""
    out, _ = demo
    reg = yaml.safe_load((out / "sources.yaml").read_text(encoding="utf-8"))
    entries = reg["sources"]
    assert [e["name"] for e in entries] == [s.name for s in SOURCES]
    assert (
        {e["format"] for e in entries}
        == set(FORMATS)
        == {"messages", "sharegpt", "alpaca", "trl_preference", "ultrafeedback", "hh_rlhf", "gsm8k", "math", "verl"}
    )
    for e in entries:
        assert set(e) <= {"name", "path", "format", "regime", "license", "origin", "kind", "role"}
        assert e["origin"] == "generated by posttrain_assets.demo.generator (seed 7)"
        assert e["kind"] in {"human", "ai", "synthetic"}
        assert e["regime"] in {"sft", "preference", "rl"}
        assert (out / e["path"]).is_file()
    by_name = {e["name"]: e for e in entries}
    assert {e["kind"] for e in entries} == {"human", "ai", "synthetic"}
    assert by_name["demo_sft_alpaca"]["license"] == "CC-BY-NC-4.0"
    assert [e["name"] for e in entries if e["license"] == "CC-BY-NC-4.0"] == ["demo_sft_alpaca"]
    assert [e["name"] for e in entries if "role" in e] == ["demo_eval_gsm8k"]
    assert by_name["demo_eval_gsm8k"]["role"] == "eval"
    assert by_name[LENGTH_BIASED_SOURCE]["kind"] == "ai"
    containers = {Path(e["path"]).name.split(".", 1)[1] for e in entries}
    assert containers == {"jsonl", "json", "parquet", "jsonl.gz"}
    # TRL explicit and implicit are both present
    trl = [e["path"] for e in entries if e["format"] == "trl_preference"]
    assert sorted(trl) == ["preference/trl_explicit.jsonl", "preference/trl_implicit.parquet"]


def test_row_counts_match_files(demo: tuple[Path, dict[str, Any]]) -> None:
    """Manifest row counts equal the physical rows; no blank lines in JSONL files."""
    out, man = demo
    expected = {
        "demo_sft_messages": 417,
        "demo_sft_sharegpt": 309,
        "demo_sft_alpaca": 253,
        "demo_pref_trl_explicit": 257,
        "demo_pref_trl_implicit": 204,
        "demo_pref_ultrafeedback": 301,
        "demo_pref_hh_rlhf": 256,
        "demo_rl_gsm8k": 417,
        "demo_rl_math": 202,
        "demo_rl_verl": 250,
        "demo_eval_gsm8k": 60,
    }
    assert {k: v["rows"] for k, v in man["sources"].items()} == expected
    assert man["total_rows"] == 2926
    for spec in SOURCES:
        path = out / spec.path
        assert len(load_rows(path)) == expected[spec.name], spec.name
        if ".jsonl" in spec.path:
            data = gzip.decompress(path.read_bytes()) if spec.path.endswith(".gz") else path.read_bytes()
            assert data.endswith(b"\n") and b"\n\n" not in data and not data.startswith(b"\n")


def test_malformed_rows_are_malformed_as_stated(demo: tuple[Path, dict[str, Any]]) -> None:
    """Each planted row fails in the stated way; every other row passes a minimal validator."""
    out, man = demo
    seen_reasons: set[str] = set()
    for spec in SOURCES:
        info = man["sources"][spec.name]
        path = out / spec.path
        rows = load_rows(path)
        bad = {m["row"]: m["reason"] for m in info["malformed"]}
        assert all(m["file"] == spec.path for m in info["malformed"])
        lines = raw_lines(path) if ".jsonl" in spec.path else None
        for i, row in enumerate(rows):
            reason = bad.get(i)
            if reason is None:
                assert problems(spec.format, row) == set(), (spec.name, i, row)
            elif reason == "bad_json":
                assert lines is not None
                text = lines[i].decode("utf-8")
                with pytest.raises(json.JSONDecodeError):
                    json.loads(text)
            elif reason == "invalid_utf8":
                assert lines is not None and b"\xff\xfe" in lines[i]
                with pytest.raises(UnicodeDecodeError):
                    lines[i].decode("utf-8")
            else:
                assert isinstance(row, dict)
                assert problems(spec.format, row) == {reason}, (spec.name, i, reason, row)
            if reason:
                seen_reasons.add(reason)
    assert seen_reasons == {
        "bad_json",
        "invalid_utf8",
        "missing_field",
        "wrong_type",
        "unknown_role",
        "empty_content",
        "not_ending_with_assistant",
        "missing_gold_answer",
        "pair_prefix_mismatch",
    }
    assert man["total_malformed"] == 33
    counts = {k: len(v["malformed"]) for k, v in man["sources"].items()}
    assert counts == {
        "demo_sft_messages": 7,
        "demo_sft_sharegpt": 3,
        "demo_sft_alpaca": 3,
        "demo_pref_trl_explicit": 4,
        "demo_pref_trl_implicit": 2,
        "demo_pref_ultrafeedback": 1,
        "demo_pref_hh_rlhf": 5,
        "demo_rl_gsm8k": 6,
        "demo_rl_math": 2,
        "demo_rl_verl": 0,
        "demo_eval_gsm8k": 0,
    }


def test_specific_planted_shapes(demo: tuple[Path, dict[str, Any]]) -> None:
    """The brief's concrete examples are there: robot/narrator roles, ``"question": 12``, gsm8k without ####."""
    out, man = demo

    def planted(name: str, reason: str) -> list[Any]:
        spec = next(s for s in SOURCES if s.name == name)
        rows = load_rows(out / spec.path)
        return [rows[m["row"]] for m in man["sources"][name]["malformed"] if m["reason"] == reason]

    (robot,) = planted("demo_sft_messages", "unknown_role")
    assert "robot" in {m["role"] for m in robot["messages"]}
    (narrator,) = planted("demo_sft_sharegpt", "unknown_role")
    assert "narrator" in {t["from"] for t in narrator["conversations"]}
    (wrong,) = planted("demo_rl_gsm8k", "wrong_type")
    assert wrong["question"] == 12
    no_gold = planted("demo_rl_gsm8k", "missing_gold_answer")
    assert len(no_gold) == 2 and all("####" not in r["answer"] for r in no_gold)
    (empty,) = planted("demo_sft_messages", "empty_content")
    assert empty["messages"][-1]["role"] == "assistant" and empty["messages"][-1]["content"].strip() == ""
    assert len(planted("demo_pref_hh_rlhf", "pair_prefix_mismatch")) == 3


def test_gsm8k_answers_and_formats(demo: tuple[Path, dict[str, Any]]) -> None:
    """GSM8K answers end with ``#### N`` (some with thousands separators); MATH boxes; verl shape."""
    out, _ = demo
    rows = [r for r in load_rows(out / "rl/gsm8k_train.jsonl") if problems("gsm8k", r) == set()]
    finals = [r["answer"].rsplit("#### ", 1)[1] for r in rows]
    assert all(f.replace(",", "").lstrip("-").isdigit() for f in finals)
    assert sum("," in f for f in finals) >= 10
    verl = load_rows(out / "rl/verl.parquet")
    assert verl[0].keys() == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert all(r["ability"] == "math" and r["reward_model"]["style"] == "rule" for r in verl)
    assert sorted(r["extra_info"]["index"] for r in verl) == list(range(250))
    assert all("," not in r["reward_model"]["ground_truth"] for r in verl)
    math_rows = load_rows(out / "rl/math.jsonl")
    assert {r["level"] for r in math_rows} <= {f"Level {i}" for i in range(1, 6)}
    sft = [r for r in load_rows(out / "sft/messages.jsonl") if problems("messages", r) == set()]
    lengths = {len(r["messages"]) for r in sft}
    assert min(lengths) == 2 and max(lengths) == 8
    assert sum(r["messages"][0]["role"] == "system" for r in sft) >= 50


def test_length_bias(demo: tuple[Path, dict[str, Any]]) -> None:
    """The ai-kind UltraFeedback source prefers the longer reply; the other preference sources are balanced."""
    out, man = demo
    assert man["length_biased_source"] == LENGTH_BIASED_SOURCE == "demo_pref_ultrafeedback"
    fractions: dict[str, float] = {}
    for spec in SOURCES:
        if spec.regime != "preference":
            continue
        bad = {m["row"] for m in man["sources"][spec.name]["malformed"]}
        pairs = [final_replies(spec.format, r) for i, r in enumerate(load_rows(out / spec.path)) if i not in bad]
        longer = sum(len(c.split()) > len(r.split()) for c, r in pairs)
        stats = man["preference_length_stats"][spec.name]
        assert (stats["pairs"], stats["chosen_longer"]) == (len(pairs), longer)
        fractions[spec.name] = longer / len(pairs)
    assert fractions["demo_pref_ultrafeedback"] == 0.9
    assert fractions["demo_pref_ultrafeedback"] >= 0.85
    for name in ("demo_pref_trl_explicit", "demo_pref_trl_implicit", "demo_pref_hh_rlhf"):
        assert 0.35 <= fractions[name] <= 0.65, (name, fractions[name])


def test_exact_duplicates(demo: tuple[Path, dict[str, Any]]) -> None:
    """Planted exact duplicates are equal in content, and no other well-formed rows of a file are equal."""
    out, man = demo
    specs = {s.name: s for s in SOURCES}
    cache = {s.name: load_rows(out / s.path) for s in SOURCES}
    groups = man["exact_duplicates"]
    assert len(groups) == 10 and man["exact_duplicate_surplus_rows"] == 11
    assert sum(g["kind"] == "cross_source" for g in groups) == 4
    planted_pairs: set[tuple[str, int, int]] = set()
    for g in groups:
        sigs = {canonical(specs[r["source"]].format, cache[r["source"]][r["row"]]) for r in g["rows"]}
        assert len(sigs) == 1, g
        sources = {r["source"] for r in g["rows"]}
        assert len(sources) == (2 if g["kind"] == "cross_source" else 1)
        assert {specs[s].regime for s in sources} == {g["regime"]}
        for a, b in itertools.combinations(g["rows"], 2):
            if a["source"] == b["source"]:
                planted_pairs.add((a["source"], *sorted((a["row"], b["row"]))))
    contaminated = {(c["source"], c["row"]) for c in man["contaminated"]}
    for spec in SOURCES:
        bad = {m["row"] for m in man["sources"][spec.name]["malformed"]}
        by_sig: dict[str, list[int]] = {}
        for i, row in enumerate(cache[spec.name]):
            if i not in bad:
                by_sig.setdefault(json.dumps(row, sort_keys=True), []).append(i)
        for rows in by_sig.values():
            for a, b in itertools.combinations(rows, 2):
                assert (spec.name, a, b) in planted_pairs, (spec.name, a, b)
        assert not any((spec.name, i) in contaminated for rows in by_sig.values() if len(rows) > 1 for i in rows)


@pytest.mark.slow  # 5-gram Jaccard of every pair of rows in three chat sources: 2-3 s
def test_near_duplicates(demo: tuple[Path, dict[str, Any]]) -> None:
    """Near duplicates differ from their original in 5-15% of whitespace words, and stand out from the rest."""
    out, man = demo
    near = man["near_duplicates"]
    assert len(near) == 17
    per_source: dict[str, int] = {}
    for n in near:
        per_source[n["source"]] = per_source.get(n["source"], 0) + 1
        spec = next(s for s in SOURCES if s.name == n["source"])
        rows = load_rows(out / spec.path)
        orig_words = " ".join(all_texts(rows[n["of_row"]])).split()
        dup_words = " ".join(all_texts(rows[n["row"]])).split()
        assert len(orig_words) == len(dup_words) == n["total_words"]
        changed = sum(a != b for a, b in zip(orig_words, dup_words, strict=True))
        assert changed == n["edited_words"]
        assert 0.05 <= changed / len(orig_words) <= 0.15
        assert problems(spec.format, rows[n["row"]]) == set()
    assert per_source == {
        "demo_sft_messages": 6,
        "demo_sft_sharegpt": 4,
        "demo_pref_trl_explicit": 3,
        "demo_rl_gsm8k": 4,
    }
    # In the chat sources, the planted pairs are exactly the pairs with 5-gram Jaccard >= 0.7.
    exact_pairs = {
        (r1["source"], *sorted((r1["row"], r2["row"])))
        for g in man["exact_duplicates"]
        for r1, r2 in itertools.combinations(g["rows"], 2)
        if r1["source"] == r2["source"]
    }
    for name in ("demo_sft_messages", "demo_sft_sharegpt", "demo_pref_trl_explicit"):
        spec = next(s for s in SOURCES if s.name == name)
        bad = {m["row"] for m in man["sources"][name]["malformed"]}
        grams = [(i, shingles(r)) for i, r in enumerate(load_rows(out / spec.path)) if i not in bad]
        similar = set()
        for (i, a), (j, b) in itertools.combinations(grams, 2):
            if len(a & b) >= 0.7 * len(a | b):
                similar.add((i, j))
        planted = {tuple(sorted((n["row"], n["of_row"]))) for n in near if n["source"] == name}
        exact = {(a, b) for s, a, b in exact_pairs if s == name}
        assert similar == planted | exact, name


def test_contamination(demo: tuple[Path, dict[str, Any]]) -> None:
    """Five GSM8K training rows copy eval rows verbatim; no other training question matches the eval set."""
    out, man = demo
    train = load_rows(out / "rl/gsm8k_train.jsonl")
    evals = load_rows(out / "eval/gsm8k_test.jsonl")
    assert len(man["contaminated"]) == 5
    for c in man["contaminated"]:
        assert c["source"] == "demo_rl_gsm8k" and c["eval_source"] == "demo_eval_gsm8k"
        assert train[c["row"]] == evals[c["eval_row"]]
    eval_q = {r["question"] for r in evals}
    hits = sorted(i for i, r in enumerate(train) if isinstance(r, dict) and r.get("question") in eval_q)
    assert hits == sorted(c["row"] for c in man["contaminated"])
    verl_prompts = " ".join(r["prompt"][0]["content"] for r in load_rows(out / "rl/verl.parquet"))
    assert not any(q in verl_prompts for q in eval_q)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI writes the same files as the function and prints a summary."""
    assert main([str(tmp_path / "cli"), "--seed", "7"]) == 0
    generate_demo_data(tmp_path / "fn", seed=7)
    assert (tmp_path / "cli/manifest.json").read_bytes() == (tmp_path / "fn/manifest.json").read_bytes()
    printed = capsys.readouterr().out
    assert "total rows=2926 malformed=33" in printed


def test_preference_labels_are_planted_as_the_manifest_says(demo: tuple[Path, dict[str, Any]]) -> None:
    """The UltraFeedback source names a judge and both models on every row, one judge labelling only chosen-longer
    pairs; the multi-rater source carries three annotators' scores per pair, with 20 planted low-agreement pairs."""
    out, man = demo
    labels = man["preference_labels"]
    uf = pq.read_table(out / "preference/ultrafeedback.parquet").to_pylist()
    assert {r["judge"] for r in uf} == set(JUDGES) and all(r["chosen_model"] != r["rejected_model"] for r in uf)
    assert {r["chosen_model"] for r in uf} <= set(COMPLETING_MODELS)
    assert labels[LENGTH_BIASED_SOURCE]["judges"] == {
        JUDGES[0]: {"pairs": 200, "chosen_longer": 200},
        JUDGES[1]: {"pairs": 100, "chosen_longer": 70},
    }
    rows = []
    for line in (out / "preference/trl_explicit.jsonl").read_bytes().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            rows.append(None)  # the planted bad_json row
    bad = {m["row"] for m in man["sources"][MULTI_RATER_SOURCE]["malformed"]}
    against = {}
    for i, row in enumerate(rows):
        if i in bad:
            assert row is None or "ratings" not in row
            continue
        ratings = row["ratings"]
        assert len(ratings) == 3 and len({r["rater"] for r in ratings}) == 3
        assert all(
            1 <= r["chosen"] <= 10 and 1 <= r["rejected"] <= 10 and r["chosen"] != r["rejected"] for r in ratings
        )
        against[i] = sum(r["chosen"] < r["rejected"] for r in ratings)
    low = labels[MULTI_RATER_SOURCE]["low_agreement_rows"]
    assert low == sorted(i for i, n in against.items() if n == 2) and len(low) == 20
    assert len(labels[MULTI_RATER_SOURCE]["one_dissent_rows"]) == 25
    assert sum(1 for n in against.values() if n == 0) == len(against) - 45
