"""End-to-end benchmark (issue 8): a seeded synthetic corpus through the real graph, plus peer comparisons.

``python -m benchmarks.bench [--records N] [--out DIR] [--json PATH] [--skip-peers] [--refresh-rows N]``
``python -m benchmarks.bench --compare bench-100000.json bench-1000000.json ...`` (per-stage growth vs N)

1. :func:`generate_corpus` streams N records (default 1,000,000; seeded) into a landing zone with a registry:
   60% SFT multi-turn chats (2-8 turns), 25% preference pairs, 15% RL prompts; 10% of every source's rows are
   planted near duplicates of an earlier row of the same source (5-15% of the words of every text field
   replaced in one or two runs, word count unchanged) and about 1% are malformed (every malformed row has one
   expected quarantine reason). JSONL for most sources, one JSON array and one Parquet file. Memory stays
   bounded: rows are written as they are drawn, and a planted copy draws its original from a fixed-size
   reservoir. The plan (counts, and one line per planted pair in ``near_duplicates.jsonl``) is written next
   to the data.
2. :func:`run_pipeline` deploys the real graph in a temporary Dagster instance (like the tests) and runs
   ``pipeline.run_all``; per-stage wall time comes from the run's event log (step start/success events),
   per-stage peak RSS from a sampling thread (psutil; this process plus its worker processes), and
   near-duplicate recall/precision from ``silver.dedup_clusters`` against the plan. Then the incremental refresh
   (issue 23): a small second corpus (``--refresh-rows``, seed + 1) is registered as new, lowest-priority sources
   and ``pipeline.run_all`` runs again on the same instance and warehouse; its seconds, share of the full build,
   per-stage seconds and the rows each per-row stage cache computed vs reused are reported.
3. Peers on the same data (skipped with ``--skip-peers``): near-dedup (ours vs a plain datasketch loop vs
   datatrove's MinHash pipeline vs rensa's Rust MinHash and LSH), tokenisation with assistant masks (ours vs
   transformers' ``return_assistant_tokens_mask`` on a ``{% generation %}``-tagged ChatML template, masks
   asserted identical) and ingest (our bronze load vs DuckDB's ``read_json_auto``).

Before the run, the floor (:func:`measure_floor`: DuckDB reading every landing file plus one batched encode with
offsets of every record's text) is measured in the same run, and the report prints end to end / floor, the
figure the throughput goal is stated in. A speed probe (:func:`encode_probe`: the floor's encode of the same
16,384 records) runs before the floor and again after the pipeline, so the report says how far the machine's
speed moved during the run. Floor and probes run in a process of their own (:func:`measured_apart`): the memory
the floor's reads and encodes leave behind in an allocator is not the pipeline's, whose peak RSS is measured in
this process.

Prints one table per part and writes everything to a JSON file so runs can be compared.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import resource
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from posttrain_assets.demo.generator import PARQUET_SCHEMAS as DEMO_PARQUET_SCHEMAS
from posttrain_assets.ingest.registry import render_registry

SCHEMA_VERSION = 1
DEFAULT_RECORDS = 1_000_000
DEFAULT_SEED = 8
NEAR_DUP_RATE = 0.10
MALFORMED_RATE = 0.01
EDIT_RANGE = (0.05, 0.15)
RESERVOIR = 256  # originals a planted copy can be drawn from, per source


# ---------------------------------------------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSource:
    """One landing source of the benchmark corpus: its share of N and its container."""

    name: str
    path: str
    format: str
    regime: str
    share: float
    license: str = "MIT"
    kind: str = "synthetic"

    @property
    def container(self) -> str:
        """'jsonl', 'json' (array) or 'parquet'."""
        return "parquet" if self.path.endswith(".parquet") else "json" if self.path.endswith(".json") else "jsonl"


SOURCES: tuple[BenchSource, ...] = (
    BenchSource("bench_sft_messages", "sft/messages.jsonl", "messages", "sft", 0.50),
    BenchSource("bench_sft_sharegpt", "sft/sharegpt.json", "sharegpt", "sft", 0.10, "Apache-2.0", "human"),
    BenchSource("bench_pref_trl", "preference/trl.jsonl", "trl_preference", "preference", 0.20, kind="human"),
    BenchSource("bench_pref_ultrafeedback", "preference/ultrafeedback.parquet", "ultrafeedback", "preference", 0.05),
    BenchSource("bench_rl_gsm8k", "rl/gsm8k.jsonl", "gsm8k", "rl", 0.10, kind="human"),
    BenchSource("bench_rl_math", "rl/math.jsonl", "math", "rl", 0.05),
)
REGIME_SHARES = {"sft": 0.60, "preference": 0.25, "rl": 0.15}

# Malformed rows per format, cycled; each is (reason, how). Parquet sources hold none (their schema is typed).
MALFORMED_KINDS: dict[str, tuple[str, ...]] = {
    "messages": ("bad_json", "missing_field", "unknown_role", "empty_content", "not_ending_with_assistant"),
    "sharegpt": ("missing_field", "unknown_role", "empty_content"),
    "trl_preference": ("bad_json", "missing_field", "wrong_type", "empty_content"),
    "gsm8k": ("bad_json", "missing_field", "missing_gold_answer", "wrong_type"),
    "math": ("bad_json", "missing_gold_answer", "missing_field"),
}


def load_pool(name: str) -> dict[str, Any]:
    """The parsed ``benchmarks/pools/<name>.json``: the word lists the corpus text is built from."""
    return json.loads(resources.files("benchmarks").joinpath("pools").joinpath(f"{name}.json").read_text("utf-8"))


# words.json: parts of speech for the sentence pool (duplicates in a list weight those words);
# word_problems.json: names and item words of the RL word problems.
_WORDS = load_pool("words")
NOUNS: list[str] = _WORDS["nouns"]
VERBS: list[str] = _WORDS["verbs"]
ADJS: list[str] = _WORDS["adjectives"]
_ADVS: list[str] = _WORDS["adverbs"]
_PREPS: list[str] = _WORDS["prepositions"]
DETS: list[str] = _WORDS["determiners"]
_OPENERS: tuple[str, ...] = tuple(_WORDS["openers"])
_WORD_PROBLEMS = load_pool("word_problems")
_NAMES: list[str] = _WORD_PROBLEMS["names"]
_ITEMS: list[str] = _WORD_PROBLEMS["items"]
VOCAB: tuple[str, ...] = tuple(sorted({*NOUNS, *VERBS, *ADJS, *_ADVS}))


def _sentence_pool(seed: int, size: int = 60_000) -> list[str]:
    """English-looking sentences (so the language gate keeps them), drawn once per run."""
    rng = random.Random(f"{seed}:sentences")
    pool = []
    for _ in range(size):
        words = [rng.choice(DETS).capitalize(), rng.choice(ADJS), rng.choice(NOUNS), rng.choice(VERBS)]
        words += [rng.choice(DETS), rng.choice(NOUNS)]
        if rng.random() < 0.6:
            words += [rng.choice(_PREPS), rng.choice(DETS), rng.choice(ADJS), rng.choice(NOUNS)]
        if rng.random() < 0.3:
            words.insert(0, rng.choice(_OPENERS))
            words[1] = words[1].lower()
        if rng.random() < 0.3:
            words.insert(-1, rng.choice(_ADVS))
        pool.append(" ".join(words) + ".")
    return pool


class TextMaker:
    """Draws texts of about a given number of words from the sentence pool."""

    def __init__(self, rng: random.Random, pool: list[str]) -> None:
        self.rng = rng
        self.pool = pool

    def text(self, words: int) -> str:
        """About ``words`` words (sentences of ~9 words), at least one sentence."""
        return " ".join(self.rng.choices(self.pool, k=max(1, round(words / 9))))

    def reply_words(self) -> int:
        """Assistant reply length: log-normal, median ~180 words, clipped to 30-900."""
        return int(min(900, max(30, self.rng.lognormvariate(5.2, 0.7))))


def edit_text(text: str, fraction: float, rng: random.Random) -> str:
    """Replace ``fraction`` of the whitespace words of ``text`` (at least one) in one or two runs.

    Words with a digit are never replaced (RL near duplicates must keep their numbers); the word count is
    unchanged.
    """
    words = text.split(" ")
    k = max(1, round(fraction * len(words)))
    runs = [k] if k < 4 or rng.random() < 0.5 else [k // 2, k - k // 2]
    for run in runs:
        start = rng.randrange(0, max(1, len(words) - run + 1))
        for i in range(start, min(len(words), start + run)):
            if not any(c.isdigit() for c in words[i]):
                new = rng.choice(VOCAB)
                while new == words[i]:
                    new = rng.choice(VOCAB)
                words[i] = new
    return " ".join(words)


def _edit_payload(value: Any, fraction: float, rng: random.Random, skip: frozenset[str] = frozenset()) -> Any:
    """A copy of a row with every free-text string edited (role/from/score fields and ``skip`` keys untouched)."""
    if isinstance(value, str):
        return edit_text(value, fraction, rng) if " " in value else value
    if isinstance(value, list):
        return [_edit_payload(v, fraction, rng, skip) for v in value]
    if isinstance(value, dict):
        return {
            k: (v if k in skip or k in ("role", "from") else _edit_payload(v, fraction, rng, skip))
            for k, v in value.items()
        }
    return value


class RowFactory:
    """Draws well-formed rows of every benchmark format."""

    def __init__(self, rng: random.Random, pool: list[str]) -> None:
        self.rng = rng
        self.t = TextMaker(rng, pool)

    def conversation(self) -> list[dict[str, str]]:
        """2-8 turns alternating user/assistant, ending with the assistant; sometimes a system turn first."""
        rng, t = self.rng, self.t
        msgs = []
        if rng.random() < 0.2:
            msgs.append({"role": "system", "content": t.text(rng.randint(8, 30))})
        for _ in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": t.text(rng.randint(12, 120))})
            msgs.append({"role": "assistant", "content": t.text(t.reply_words())})
        return msgs

    def messages(self) -> dict[str, Any]:
        return {"messages": self.conversation()}

    def sharegpt(self) -> dict[str, Any]:
        speaker = {"system": "system", "user": "human", "assistant": "gpt"}
        conv = [{"from": speaker[m["role"]], "value": m["content"]} for m in self.conversation()]
        return {"id": f"sg{self.rng.getrandbits(48):012x}", "conversations": conv}

    def trl_preference(self) -> dict[str, Any]:
        t = self.t
        return {
            "prompt": t.text(self.rng.randint(15, 120)),
            "chosen": t.text(t.reply_words()),
            "rejected": t.text(t.reply_words()),
        }

    def ultrafeedback(self) -> dict[str, Any]:
        t, rng = self.t, self.rng
        prompt = t.text(rng.randint(15, 120))
        user = {"role": "user", "content": prompt}
        chosen = [user, {"role": "assistant", "content": t.text(t.reply_words())}]
        rejected = [user, {"role": "assistant", "content": t.text(t.reply_words())}]
        score = round(rng.uniform(5, 10), 1)
        return {
            "prompt": prompt,
            "prompt_id": f"{rng.getrandbits(64):016x}",
            "chosen": chosen,
            "rejected": rejected,
            "score_chosen": score,
            "score_rejected": round(score - rng.uniform(0.5, 4), 1),
        }

    def _word_problem(self) -> tuple[str, int]:
        rng, t = self.rng, self.t
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b, c = rng.randint(100, 99_999), rng.randint(100, 99_999), rng.randint(2, 99)
        q = (
            f"{t.text(rng.randint(10, 40))} {name} has {a} {item} and buys {b} more {item}. "
            f"{name} then gives {c} {item} to each of 2 friends. How many {item} does {name} have now?"
        )
        return q, a + b - 2 * c

    def gsm8k(self) -> dict[str, Any]:
        q, ans = self._word_problem()
        return {"question": q, "answer": f"{self.t.text(20)}\n#### {ans}"}

    def math(self) -> dict[str, Any]:
        q, ans = self._word_problem()
        return {"problem": q, "solution": f"{self.t.text(25)} The answer is $\\boxed{{{ans}}}$.", "level": "Level 2"}

    def row(self, fmt: str) -> dict[str, Any]:
        return getattr(self, fmt)()

    def malformed(self, fmt: str, reason: str) -> bytes | dict[str, Any]:
        """A row that must be quarantined with ``reason`` (bytes: a raw JSONL line)."""
        row = self.row(fmt)
        if reason == "bad_json":
            line = json.dumps(row)
            return line[: len(line) // 2].encode()
        if fmt == "messages":
            msgs = row["messages"]
            if reason == "missing_field":
                return {"conversation": msgs}
            if reason == "unknown_role":
                msgs[-2]["role"] = "robot"
            elif reason == "empty_content":
                msgs[-1]["content"] = "   "
            elif reason == "not_ending_with_assistant":
                msgs.pop()
                if not any(m["role"] == "assistant" for m in msgs):  # else it would be no_assistant_turn
                    msgs[-1:-1] = [dict(msgs[-1]), {"role": "assistant", "content": self.t.text(40)}]
            return row
        if fmt == "sharegpt":
            turns = row["conversations"]
            if reason == "missing_field":
                del turns[-1]["value"]
            elif reason == "unknown_role":
                turns[-2]["from"] = "narrator"
            else:
                turns[-1]["value"] = " \n "
            return row
        if fmt == "trl_preference":
            if reason == "missing_field":
                del row["rejected"]
            elif reason == "wrong_type":
                row["chosen"] = 42
            else:
                row["rejected"] = "  "
            return row
        if fmt == "gsm8k":
            if reason == "missing_field":
                del row["answer"]
            elif reason == "wrong_type":
                row["question"] = 12
            else:
                row["answer"] = row["answer"].split("\n####")[0]
            return row
        if fmt == "math":
            if reason == "missing_field":
                del row["solution"]
            else:
                row["solution"] = row["solution"].replace("\\boxed", "")
            return row
        raise ValueError(f"no malformed rows for format {fmt!r}")


def source_counts(n: int) -> dict[str, dict[str, int]]:
    """Rows, planted near duplicates and malformed rows per source for a corpus of ``n`` records.

    Regime totals are exact (60/25/15%, remainder to RL); malformed rows (1% of n) are spread over the
    non-Parquet sources in proportion to their rows.
    """
    regime_n = {"sft": round(n * REGIME_SHARES["sft"]), "preference": round(n * REGIME_SHARES["preference"])}
    regime_n["rl"] = n - regime_n["sft"] - regime_n["preference"]
    counts: dict[str, dict[str, int]] = {}
    for regime, total in regime_n.items():
        members = [s for s in SOURCES if s.regime == regime]
        share = sum(s.share for s in members)
        left = total
        for i, s in enumerate(members):
            rows = left if i == len(members) - 1 else round(total * s.share / share)
            left -= rows
            counts[s.name] = {"rows": rows}
    malformable = [s for s in SOURCES if s.container != "parquet"]
    capacity = sum(counts[s.name]["rows"] for s in malformable)
    target = round(n * MALFORMED_RATE)
    for s in SOURCES:
        c = counts[s.name]
        c["malformed"] = round(target * c["rows"] / capacity) if s in malformable and capacity else 0
        c["near_duplicates"] = min(round(c["rows"] * NEAR_DUP_RATE), max(0, c["rows"] - c["malformed"] - 1))
    return counts


class _Writer:
    """Streams rows into one landing file (JSONL lines, a JSON array, or Parquet row groups)."""

    def __init__(self, path: Path, container: str, schema: pa.Schema | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = container
        self.rows: list[dict[str, Any]] = []
        self.first = True
        self.parquet = pq.ParquetWriter(path, schema, compression="zstd") if container == "parquet" else None
        self.schema = schema
        self.handle = None if container == "parquet" else path.open("wb")
        if container == "json":
            self.handle.write(b"[\n")

    def write(self, row: dict[str, Any] | bytes) -> None:
        if self.parquet is not None:
            self.rows.append(row)  # type: ignore[arg-type]
            if len(self.rows) >= 5000:
                self._flush()
            return
        data = row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode("utf-8")
        if self.container == "json":
            data = (b"" if self.first else b",\n") + data
        self.first = False
        self.handle.write(data + (b"" if self.container == "json" else b"\n"))

    def _flush(self) -> None:
        if self.rows:
            self.parquet.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        if self.parquet is not None:
            self._flush()
            self.parquet.close()
        else:
            if self.container == "json":
                self.handle.write(b"\n]\n")
            self.handle.close()


# Parquet sources are written with the demo's declared schemas, keyed here by format.
PARQUET_SCHEMAS = {"ultrafeedback": DEMO_PARQUET_SCHEMAS["demo_pref_ultrafeedback"]}


def _select(rng: random.Random, n: int, k: int) -> Iterator[bool]:
    """Selection sampling: exactly ``k`` of ``n`` slots are True, streamed."""
    for i in range(n):
        pick = rng.random() * (n - i) < k
        k -= pick
        yield pick


def generate_corpus(out_dir: Path, n: int = DEFAULT_RECORDS, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Write the benchmark landing zone under ``out_dir``; return the plan (also written to ``plan.json``).

    ``out_dir/sources.yaml`` is the registry, ``out_dir/near_duplicates.jsonl`` has one line per planted copy:
    ``{"source", "row", "of_row", "fraction"}`` (0-based rows). Same ``n`` and ``seed``: identical files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pool = _sentence_pool(seed)
    counts = source_counts(n)
    malformed_by_reason: Counter[str] = Counter()
    with (out_dir / "near_duplicates.jsonl").open("w", encoding="utf-8") as plan_out:
        for s in SOURCES:
            c = counts[s.name]
            rng = random.Random(f"{seed}:{s.name}")
            factory = RowFactory(rng, pool)
            writer = _Writer(out_dir / s.path, s.container, PARQUET_SCHEMAS.get(s.format))
            rows, n_dup, n_bad = c["rows"], c["near_duplicates"], c["malformed"]
            # The first row is always an original, so every planted copy has an earlier row to copy.
            special = _select(rng, rows - 1, n_dup + n_bad)
            kinds = MALFORMED_KINDS.get(s.format, ())
            dup_left, bad_left = n_dup, n_bad
            reservoir: list[tuple[int, dict[str, Any]]] = []
            originals = 0
            for row in range(rows):
                is_special = row > 0 and next(special)
                if is_special and rng.random() * (dup_left + bad_left) < dup_left:
                    of_row, original = rng.choice(reservoir)
                    fraction = round(rng.uniform(*EDIT_RANGE), 4)
                    skip = frozenset(
                        {"prompt_id", "score_chosen", "score_rejected", "level", "id", "answer", "solution"}
                    )
                    copy = _edit_payload(original, fraction, rng, skip)
                    if s.format == "ultrafeedback":  # the prompt must stay equal to the shared user turn
                        copy["chosen"][0] = copy["rejected"][0] = {"role": "user", "content": copy["prompt"]}
                    writer.write(copy)
                    plan_out.write(json.dumps({"source": s.name, "row": row, "of_row": of_row, "fraction": fraction}))
                    plan_out.write("\n")
                    dup_left -= 1
                elif is_special:
                    reason = kinds[bad_left % len(kinds)]
                    writer.write(factory.malformed(s.format, reason))
                    malformed_by_reason[reason] += 1
                    bad_left -= 1
                else:
                    payload = factory.row(s.format)
                    writer.write(payload)
                    originals += 1
                    if len(reservoir) < RESERVOIR:
                        reservoir.append((row, payload))
                    elif rng.random() < RESERVOIR / originals:
                        reservoir[rng.randrange(RESERVOIR)] = (row, payload)
            writer.close()
            assert dup_left == 0 and bad_left == 0, (s.name, dup_left, bad_left)
    (out_dir / "sources.yaml").write_text(_registry_text(seed, n), encoding="utf-8")
    regimes: Counter[str] = Counter()
    for s in SOURCES:
        regimes[s.regime] += counts[s.name]["rows"]
    plan = {
        "records": n,
        "seed": seed,
        "registry": str(out_dir / "sources.yaml"),
        "sources": {
            s.name: {"format": s.format, "regime": s.regime, "path": s.path, **counts[s.name]} for s in SOURCES
        },
        "by_regime": dict(regimes),
        "near_duplicates": sum(c["near_duplicates"] for c in counts.values()),
        "malformed": sum(c["malformed"] for c in counts.values()),
        "malformed_by_reason": dict(sorted(malformed_by_reason.items())),
        "bytes": sum((out_dir / s.path).stat().st_size for s in SOURCES),
        "generate_seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return plan


def _registry_entries(seed: int, n: int, name_prefix: str = "", path_prefix: str = "") -> list[dict[str, Any]]:
    """The registry entries of a corpus generated with ``seed`` and ``n`` records, in priority order; names and
    paths prefixed (a corpus registered next to another one's registry)."""
    origin = f"generated by benchmarks.bench (records {n}, seed {seed})"
    return [{**vars(s), "name": name_prefix + s.name, "path": path_prefix + s.path, "origin": origin} for s in SOURCES]


def _registry_text(seed: int, n: int) -> str:
    return render_registry(
        _registry_entries(seed, n), ["Benchmark landing zone written by benchmarks.bench; order = source priority."]
    )


REFRESH_PREFIX = "refresh_"


def default_refresh_rows(records: int) -> int:
    """Rows the refresh adds after the full build: 10,000 (the issue's figure) from 200,000 records up, else a
    twentieth of the corpus, at least 50."""
    return 10_000 if records >= 200_000 else max(50, records // 20)


def write_refresh_registry(plan: dict[str, Any], refresh_plan: dict[str, Any]) -> Path:
    """The registry of the refresh run, written next to the first one (``sources_refresh.yaml``): the first
    corpus's sources unchanged (same entries, same priority), then the refresh corpus's sources as new sources
    (``refresh_<name>``, lowest priority), their paths absolute."""
    registry = Path(plan["registry"])
    refresh_dir = Path(refresh_plan["registry"]).parent
    prefix = f"{refresh_dir.resolve()}/"  # absolute: a registry's relative paths stay inside its own folder
    entries = _registry_entries(plan["seed"], plan["records"])
    entries += _registry_entries(refresh_plan["seed"], refresh_plan["records"], REFRESH_PREFIX, prefix)
    path = registry.with_name("sources_refresh.yaml")
    comments = [
        "Benchmark refresh: the first corpus's sources, then the refresh corpus's as new sources (lowest priority)."
    ]
    path.write_text(render_registry(entries, comments), encoding="utf-8")
    return path


def planted_pairs(corpus_dir: Path) -> list[dict[str, Any]]:
    """The planted near-duplicate copies of a generated corpus (``near_duplicates.jsonl``)."""
    with (Path(corpus_dir) / "near_duplicates.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------------
# recall / precision of near-duplicate detection against the plan
# ---------------------------------------------------------------------------------------------------------------

Key = tuple[str, int]


def score_dedup(
    planted: list[dict[str, Any]], dropped: list[tuple[Key, Key]], regime_of: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """Recall and precision of detected duplicates ``(member, kept)`` (source, row) pairs against the plan.

    A planted copy is recalled when it and its original end in the same cluster (either may be the kept one).
    A detected pair is a true positive when both rows belong to the same planted group (an original and its
    copies). Recall is also broken down by edited fraction and (with ``regime_of``) by regime.
    """
    group: dict[Key, Key] = {}
    for p in planted:
        group[(p["source"], p["row"])] = (p["source"], p["of_row"])
    cluster: dict[Key, Key] = dict(dropped)

    def root(k: Key) -> Key:
        return cluster.get(k, k)

    def grp(k: Key) -> Key:
        return group.get(k, k)

    true_pos = sum(1 for member, kept in dropped if grp(member) == grp(kept))
    hits = [root((p["source"], p["row"])) == root((p["source"], p["of_row"])) for p in planted]
    buckets: dict[str, list[bool]] = defaultdict(list)
    regimes: dict[str, list[bool]] = defaultdict(list)
    for p, hit in zip(planted, hits, strict=True):
        lo = 0.05 if p["fraction"] < 0.08 else 0.08 if p["fraction"] < 0.12 else 0.12
        buckets[f"{lo:.2f}-{ {0.05: 0.08, 0.08: 0.12, 0.12: 0.15}[lo]:.2f}"].append(hit)
        if regime_of:
            regimes[regime_of(p["source"])].append(hit)

    def ratio(a: int, b: int) -> float:
        return round(a / b, 4) if b else 1.0

    return {
        "planted": len(planted),
        "recalled": sum(hits),
        "recall": ratio(sum(hits), len(planted)),
        "detected": len(dropped),
        "true_positives": true_pos,
        "precision": ratio(true_pos, len(dropped)),
        "recall_by_edit_fraction": {k: ratio(sum(v), len(v)) for k, v in sorted(buckets.items())},
        "recall_by_regime": {k: ratio(sum(v), len(v)) for k, v in sorted(regimes.items())},
    }


# ---------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------


def _rss() -> int:
    """RSS of this process plus its worker processes (posttrain_assets.parallel): the machine the run needs."""
    try:
        import psutil

        process = psutil.Process()
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a worker that exited between listing and reading
                total += child.memory_info().rss
        return total
    except ImportError:  # pragma: no cover - psutil ships with dagster
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Samples the RSS of this process and its workers every ``interval`` seconds in a thread; peak over any
    time window."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), _rss()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), _rss()))

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
        """Peak RSS (bytes) sampled in [start, end]."""
        values = [rss for t, rss in self.samples if start <= t <= end]
        return max(values) if values else 0


@contextlib.contextmanager
def timed(sampler: RssSampler | None = None) -> Iterator[dict[str, float]]:
    """Wall seconds (and peak RSS MiB when a sampler runs) of the block, filled in on exit."""
    out: dict[str, float] = {}
    t0, wall0 = time.perf_counter(), time.time()
    yield out
    out["seconds"] = round(time.perf_counter() - t0, 3)
    if sampler is not None:
        out["peak_rss_mib"] = _mib(max(sampler.peak(wall0, time.time()), _rss()))


def _mib(nbytes: int) -> float:
    return round(nbytes / (1 << 20), 1)


# Which Dagster steps make up each reported stage (step keys are the op names of the assets / checks).
STAGES: tuple[tuple[str, Callable[[str, str], bool]], ...] = (
    ("bronze ingest", lambda job, step: job == "ingest_source"),
    ("silver canonical + cleaning", lambda job, step: step == "silver_canonical"),
    ("silver sft_tokenized", lambda job, step: step == "silver_sft_tokenized"),
    ("loss_mask_check", lambda job, step: "loss_mask_check" in step),
    ("silver preference pairs", lambda job, step: step == "silver_preference_pairs"),
    ("silver RL certification", lambda job, step: step.startswith("silver__rl_") and "check" not in step),
    ("gold", lambda job, step: step.startswith("gold_") and "check" not in step),
    ("exports (Parquet + JSONL)", lambda job, step: step.startswith("exports_")),
    ("other checks", lambda job, step: "check" in step and "loss_mask_check" not in step),
)


def step_intervals(instance: Any, run_ids: Collection[str] | None = None) -> list[dict[str, Any]]:
    """(job, step, start, end) of every finished step of every run of ``instance`` (of the runs ``run_ids`` when
    given), from its event log."""
    from dagster import DagsterEventType

    out = []
    for run in instance.get_runs():
        if run_ids is not None and run.run_id not in run_ids:
            continue
        starts: dict[str, float] = {}
        for entry in instance.all_logs(run.run_id):
            ev = entry.dagster_event
            if ev is None or not ev.step_key:
                continue
            if ev.event_type == DagsterEventType.STEP_START:
                starts[ev.step_key] = entry.timestamp
            elif ev.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                out.append(
                    {
                        "job": run.job_name,
                        "partition": run.tags.get("dagster/partition"),
                        "step": ev.step_key,
                        "start": starts[ev.step_key],
                        "end": entry.timestamp,
                    }
                )
    return sorted(out, key=lambda s: s["start"])


def stage_reuse(instance: Any, run_ids: Collection[str]) -> dict[str, dict[str, int]]:
    """``{stage: {"computed", "reused"}}`` of the per-row stage caches in the runs ``run_ids``: the
    ``rows_computed/<stage>`` and ``rows_reused/<stage>`` metadata of their asset materialisations and check
    evaluations (posttrain_assets.warehouse.stage_cache.Reuse), summed over the events that carry a stage."""
    from dagster import DagsterEventType

    out: dict[str, dict[str, int]] = defaultdict(lambda: {"computed": 0, "reused": 0})
    kinds = {"rows_computed/": "computed", "rows_reused/": "reused"}
    for run_id in run_ids:
        for entry in instance.all_logs(
            run_id, of_type={DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_CHECK_EVALUATION}
        ):
            event = entry.asset_materialization or entry.asset_check_evaluation
            for key, value in (event.metadata if event is not None else {}).items():
                for prefix, kind in kinds.items():
                    if key.startswith(prefix):
                        out[key.removeprefix(prefix)][kind] += int(value.value)
    return {stage: dict(counts) for stage, counts in sorted(out.items())}


def silver_pass_seconds(instance: Any) -> dict[str, float]:
    """The silver pass's seconds per stage (``seconds/...`` metadata of silver.records), when it ran."""
    import dagster as dg

    event = instance.get_latest_materialization_event(dg.AssetKey(["silver", "records"]))
    if event is None or event.asset_materialization is None:
        return {}
    metadata = event.asset_materialization.metadata
    return {k.removeprefix("seconds/"): v.value for k, v in metadata.items() if k.startswith("seconds/")}


def _count(conn: duckdb.DuckDBPyConnection, sql: str) -> int:
    return int(conn.execute(sql).fetchone()[0])


@contextlib.contextmanager
def _deployment(registry: Path, workdir: Path, cache_dir: Path) -> Iterator[tuple[Any, Any, Path]]:
    """A temporary Dagster instance under ``workdir`` (the project's dagster.yaml policy, like the tests), the
    graph's definitions and the warehouse path, with the project's variables set for as long as it is open."""
    import dagster as dg
    import yaml

    from posttrain_assets import pipeline

    database = workdir / "warehouse.duckdb"
    home = workdir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    policy = Path(__file__).resolve().parents[1] / "dagster.yaml"
    overrides = (
        {k: v for k, v in yaml.safe_load(policy.read_text()).items() if k != "storage"} if policy.exists() else None
    )
    env = {
        "POSTTRAIN_SOURCES": str(registry),
        "POSTTRAIN_DUCKDB_PATH": str(database),
        "POSTTRAIN_TOKENIZER": "smollm2",
        "POSTTRAIN_CACHE_DIR": str(cache_dir),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with dg.instance_for_test(temp_dir=str(home), overrides=overrides) as instance:
            yield instance, pipeline.load_definitions(), database
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class Refresh:
    """New data added after the full build: the registry naming the first corpus's sources and the new ones, and
    the refresh corpus's plan."""

    registry: Path
    plan: dict[str, Any]


def run_pipeline(
    registry: Path, workdir: Path, cache_dir: Path, plan: dict[str, Any], refresh: Refresh | None = None
) -> dict[str, Any]:
    """Deploy the real graph under ``workdir``, run bronze -> gold once, and measure it; then, with ``refresh``,
    register the new sources and run again on the same instance and warehouse (``result["refresh"]``)."""
    with _deployment(registry, workdir, cache_dir) as (instance, definitions, database):
        result = _full_build(instance, definitions, database, registry, plan)
        if refresh is not None:
            if result["failure"]:
                result["refresh"] = {"skipped": "the full build failed"}
            else:
                result["refresh"] = run_refresh(instance, definitions, refresh, result["end_to_end"]["seconds"])
    return result


def _full_build(
    instance: Any, definitions: Any, database: Path, registry: Path, plan: dict[str, Any]
) -> dict[str, Any]:
    """Run bronze -> gold once on a new warehouse and measure it (the figures of ``run_pipeline``)."""
    import duckdb

    from posttrain_assets import pipeline

    rss_before = _rss()
    failure = None
    with RssSampler() as sampler, timed(sampler) as total:
        try:
            report = pipeline.run_all(instance, definitions)
        except RuntimeError as exc:  # a failed job: the stages that ran are still measured and reported
            report, failure = None, str(exc)
    runs = {run.run_id for run in instance.get_runs()}
    steps = step_intervals(instance, runs)
    silver_pass = silver_pass_seconds(instance)
    reuse = stage_reuse(instance, runs)

    with duckdb.connect(str(database), read_only=True) as conn:
        existing = {
            f"{s}.{t}"
            for s, t in conn.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall()
        }
        if failure and "silver.records" not in existing:  # nothing past bronze to measure
            raise RuntimeError(failure)
        # bronze.records is a view over one table per source; those tables are storage, not reported
        reported = sorted(n for n in existing if not n.startswith("bronze.") or n == "bronze.records")
        tables = {name: _count(conn, f"SELECT count(*) FROM {name}") for name in reported}
        regime_rows = dict(conn.execute("SELECT regime, count(*) FROM silver.records GROUP BY ALL").fetchall())
        canonical_reasons = dict(
            conn.execute(
                "SELECT reason, count(*) FROM silver.quarantine WHERE stage = 'canonical' GROUP BY ALL"
            ).fetchall()
        )
        quality_reasons = dict(
            conn.execute(
                "SELECT stage || ':' || reason, count(*) FROM silver.quarantine WHERE stage <> 'canonical' GROUP BY ALL"
            ).fetchall()
        )
        methods = dict(conn.execute("SELECT method, count(*) FROM silver.dedup_clusters GROUP BY ALL").fetchall())
        dropped = conn.execute(
            "SELECT d.source, d.row_number, r.origin.source, r.origin.row FROM silver.dedup_clusters d "
            "JOIN silver.records r ON r.id = d.kept_id"
        ).fetchall()
        tokens = (
            conn.execute(
                "SELECT coalesce(sum(num_tokens), 0), coalesce(sum(num_trainable_tokens), 0) FROM silver.sft_tokenized"
            ).fetchone()
            if "silver.sft_tokenized" in existing
            else (0, 0)
        )
        sft_quarantine = (
            dict(conn.execute("SELECT reason, count(*) FROM silver.sft_quarantine GROUP BY ALL").fetchall())
            if "silver.sft_quarantine" in existing
            else {}
        )

    n = plan["records"]
    silver_in = tables.get("bronze.records", 0)
    gold_rows = {table: n for table, n in tables.items() if table.startswith("gold.")}
    stage_inputs = {
        "bronze ingest": n,
        "silver canonical + cleaning": silver_in,
        "silver sft_tokenized": regime_rows.get("sft", 0),
        "loss_mask_check": tables.get("silver.sft_tokenized", 0),
        "silver preference pairs": regime_rows.get("preference", 0),
        "silver RL certification": regime_rows.get("rl", 0),
        "gold": sum(gold_rows.values()),
        "exports (Parquet + JSONL)": sum(n for table, n in gold_rows.items() if table != "gold.trace"),
        "other checks": silver_in,
    }
    stages: dict[str, dict[str, Any]] = {}
    for name, match in STAGES:
        mine = [s for s in steps if match(s["job"], s["step"])]
        if not mine:
            continue
        seconds = sum(s["end"] - s["start"] for s in mine)
        peak = max(sampler.peak(s["start"] - 0.05, s["end"] + 0.05) for s in mine)
        records = stage_inputs[name]
        stages[name] = {
            "seconds": round(seconds, 2),
            "records": records,
            "records_per_s": round(records / seconds, 1) if seconds else None,
            "peak_rss_mib": _mib(peak),
            "steps": len(mine),
        }
    if "silver sft_tokenized" in stages and stages["silver sft_tokenized"]["seconds"]:
        stages["silver sft_tokenized"]["tokens_per_s"] = round(tokens[0] / stages["silver sft_tokenized"]["seconds"])
    step_seconds = sum(s["end"] - s["start"] for s in steps)
    regime_of = {s.name: s.regime for s in SOURCES}.get
    near_pairs = [((a, b), (c, d)) for a, b, c, d in dropped]
    planted = planted_pairs(Path(registry).parent)
    return {
        "end_to_end": {
            "seconds": total["seconds"],
            "records_per_s": round(n / total["seconds"], 1),
            "peak_rss_mib": total["peak_rss_mib"],
            "rss_before_mib": _mib(rss_before),
            "orchestration_overhead_seconds": round(total["seconds"] - step_seconds, 2),
        },
        "stages": stages,
        "silver_pass_seconds": silver_pass,
        "tables": tables,
        "silver_by_regime": regime_rows,
        "quarantine": {
            "canonical": dict(sorted(canonical_reasons.items())),
            "cleaning": dict(sorted(quality_reasons.items())),
            "sft": dict(sorted(sft_quarantine.items())),
        },
        "dedup_methods": methods,
        "tokens": {"sft_tokens": int(tokens[0]), "sft_trained_tokens": int(tokens[1])},
        "dedup": score_dedup(planted, near_pairs, regime_of),
        "bronze_seconds_by_source": {
            s["partition"]: round(s["end"] - s["start"], 3) for s in steps if s["job"] == "ingest_source"
        },
        "checks": [{"check": c.check, "passed": c.passed} for c in report.checks] if report else [],
        "not_materialized": report.not_materialized if report else [],
        "reuse": reuse,
        "failure": failure,
    }


def run_refresh(instance: Any, definitions: Any, refresh: Refresh, full_seconds: float) -> dict[str, Any]:
    """Register the refresh corpus's sources (``refresh.registry``) and time ``pipeline.run_all`` again on the
    instance and warehouse of the full build: seconds, peak RSS, the share of the full build's seconds, per-stage
    seconds of this run's steps only, and per stage cache the rows computed and reused."""
    from posttrain_assets import pipeline

    before = {run.run_id for run in instance.get_runs()}
    os.environ["POSTTRAIN_SOURCES"] = str(refresh.registry)  # restored by _deployment
    failure = None
    with RssSampler() as sampler, timed(sampler) as total:
        try:
            pipeline.run_all(instance, definitions)
        except RuntimeError as exc:
            failure = str(exc)
    runs = {run.run_id for run in instance.get_runs()} - before
    steps = step_intervals(instance, runs)
    stages: dict[str, dict[str, Any]] = {}
    for name, match in STAGES:
        mine = [s for s in steps if match(s["job"], s["step"])]
        if mine:
            stages[name] = {
                "seconds": round(sum(s["end"] - s["start"] for s in mine), 2),
                "peak_rss_mib": _mib(max(sampler.peak(s["start"] - 0.05, s["end"] + 0.05) for s in mine)),
                "steps": len(mine),
            }
    return {
        "rows_added": refresh.plan["records"],
        "sources_added": [REFRESH_PREFIX + name for name in refresh.plan["sources"]],
        "seconds": total["seconds"],
        "peak_rss_mib": total["peak_rss_mib"],
        "share_of_full": round(total["seconds"] / full_seconds, 4) if full_seconds else None,
        "stages": stages,
        "reuse": stage_reuse(instance, runs),
        "silver_pass_seconds": silver_pass_seconds(instance)
        if any(s["step"] == "silver_canonical" for s in steps)
        else {},
        "failure": failure,
    }


# ---------------------------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path, limit: int) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as f:
        for i, line in enumerate(f):
            if i >= limit:
                return
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                yield i, row


def sft_sample(corpus_dir: Path, limit: int) -> list[tuple[int, list[dict[str, str]]]]:
    """(row, messages) of the well-formed rows among the first ``limit`` lines of the SFT messages source."""
    from posttrain_assets.records.formats import get_adapter
    from posttrain_assets.records.schema import RecordError

    out = []
    adapter = get_adapter("messages")
    for row_number, row in _read_jsonl(Path(corpus_dir) / "sft/messages.jsonl", limit):
        try:
            record = adapter.parse(row, "sft")
        except RecordError:
            continue
        out.append((row_number, [dict(m) for m in record.messages]))
    return out


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)


def _pairs_from_roots(rows: list[int], roots: list[int], source: str) -> list[tuple[Key, Key]]:
    """(member, kept) pairs: every non-root member of a cluster points at its first member."""
    first: dict[int, int] = {}
    out = []
    for row, r in zip(rows, roots, strict=True):
        if r in first:
            out.append(((source, row), (source, first[r])))
        else:
            first[r] = row
    return out


def peer_dedup(corpus_dir: Path, limit: int, threshold: float = 0.7, shingle_words: int = 5) -> dict[str, Any]:
    """Near-dedup of the SFT dedup units: ours vs a plain datasketch loop vs datatrove vs rensa, same
    shingles/threshold."""
    from datasketch import MinHash, MinHashLSH

    from posttrain_assets.cleaning.dedup import (
        MinHashConfig,
        dedup_unit,
        minhash_signatures,
        near_duplicate_clusters,
        shingles,
    )

    cfg = MinHashConfig(shingle_words=shingle_words, threshold=threshold)
    sample = sft_sample(corpus_dir, limit)
    rows = [r for r, _ in sample]
    texts = [dedup_unit({"regime": "sft", "messages": m}) for _, m in sample]
    source = "bench_sft_messages"
    wanted = set(rows)
    planted = [p for p in planted_pairs(corpus_dir) if p["source"] == source and {p["row"], p["of_row"]} <= wanted]
    n_shingles = sum(len(shingles(t, shingle_words)) for t in texts)
    out: dict[str, Any] = {"documents": len(texts), "shingles": n_shingles, "threshold": threshold}

    # ours: vectorised signatures + numpy LSH banding + verification of every candidate + union-find
    with timed() as t_sig:
        minhash_signatures(texts, cfg)
    with timed() as t_all:
        clusters = near_duplicate_clusters(rows, texts, cfg)
    ours = [((source, int(m)), (source, int(c.kept))) for c in clusters for m in c.members if m != c.kept]
    out["ours"] = {
        "seconds": t_all["seconds"],
        "signature_seconds": t_sig["seconds"],
        "docs_per_s": round(len(texts) / t_all["seconds"], 1),
        **_pr(planted, ours),
    }

    # datasketch: one MinHash.update per shingle, then MinHashLSH, same verification
    with timed() as t_all:
        with timed() as t_sig:
            mhs = []
            for text in texts:
                m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
                for s in shingles(text, shingle_words):
                    m.update(s.encode("utf-8"))
                mhs.append(m)
        # The classic setup: LSH tuned just below the Jaccard threshold (ours widens it for its edit rule).
        lsh = MinHashLSH(threshold=threshold - 0.15, num_perm=cfg.num_perm)
        for i, m in enumerate(mhs):
            lsh.insert(i, m, check_duplication=False)
        uf = _UnionFind(len(mhs))
        for i, m in enumerate(mhs):
            for j in lsh.query(m):
                if j > i and m.jaccard(mhs[j]) >= threshold:
                    uf.union(i, j)
    ds_pairs = _pairs_from_roots(rows, [uf.find(i) for i in range(len(rows))], source)
    out["datasketch"] = {
        "seconds": t_all["seconds"],
        "signature_seconds": t_sig["seconds"],
        "docs_per_s": round(len(texts) / t_all["seconds"], 1),
        **_pr(planted, ds_pairs),
    }
    out["datatrove"] = _datatrove(rows, texts, source, planted, shingle_words, threshold, cfg.num_perm)
    out["rensa"] = _rensa(rows, texts, source, planted, shingle_words, threshold, cfg.num_perm)
    for peer in ("datasketch", "datatrove", "rensa"):
        if "seconds" in out[peer]:
            out[peer]["ours_speedup"] = round(out[peer]["seconds"] / out["ours"]["seconds"], 2)
    return out


def _pr(planted: list[dict[str, Any]], pairs: list[tuple[Key, Key]]) -> dict[str, Any]:
    s = score_dedup(planted, pairs)
    return {k: s[k] for k in ("planted", "recalled", "recall", "detected", "precision")}


def _rensa(
    rows: list[int],
    texts: list[str],
    source: str,
    planted: list[dict[str, Any]],
    shingle_words: int,
    threshold: float,
    num_perm: int,
) -> dict[str, Any]:
    """rensa (Rust MinHash) on the same shingles: signatures for the whole list in one call, its LSH index, and
    the classic check of each candidate's estimated Jaccard against ``threshold`` (as the datasketch loop).

    rensa's index needs a band count that divides ``num_perm``: the one whose S-curve crossover
    ``(1 / b) ** (1 / r)`` is nearest the datasketch loop's LSH threshold (``threshold - 0.15``).
    """
    try:
        from rensa import RMinHash, RMinHashLSH
    except ImportError as exc:
        return {"skipped": f"rensa not installed ({exc})"}
    from posttrain_assets.cleaning.dedup import shingles

    lsh_threshold = threshold - 0.15
    divisors = [b for b in range(1, num_perm + 1) if num_perm % b == 0]
    bands = min(divisors, key=lambda b: abs((1 / b) ** (b / num_perm) - lsh_threshold))
    with timed() as t_all:
        with timed() as t_sig:
            mhs = RMinHash.from_token_sets([shingles(t, shingle_words) for t in texts], num_perm, 1)
        lsh = RMinHashLSH(lsh_threshold, num_perm, bands)
        lsh.insert_many(mhs)
        uf = _UnionFind(len(mhs))
        for i, candidates in enumerate(lsh.query_all(mhs)):
            for j in candidates:
                if j > i and mhs[i].jaccard(mhs[j]) >= threshold:
                    uf.union(i, j)
    pairs = _pairs_from_roots(rows, [uf.find(i) for i in range(len(rows))], source)
    return {
        "seconds": t_all["seconds"],
        "signature_seconds": t_sig["seconds"],
        "docs_per_s": round(len(texts) / t_all["seconds"], 1),
        "bands": bands,
        **_pr(planted, pairs),
    }


def _datatrove(
    rows: list[int],
    texts: list[str],
    source: str,
    planted: list[dict[str, Any]],
    shingle_words: int,
    threshold: float,
    num_perm: int,
) -> dict[str, Any]:
    """datatrove's 4-stage MinHash dedup (signatures, buckets, cluster, filter) run in-process on one rank.

    datatrove has no verification step: its banding is the datasketch optimum for ``threshold`` itself. Its
    English word tokenizer needs spaCy, so words are split on whitespace after :func:`posttrain_assets.text.fold`
    (the same words our shingles use); datatrove's own text simplification is limited to lower-casing and
    whitespace.
    """
    try:
        from datasketch import MinHashLSH
        from datatrove.data import Document
        from datatrove.pipeline.dedup import minhash as dt_minhash
        from datatrove.utils.text import TextNormConfig
    except ImportError as exc:
        return {"skipped": f"datatrove not installed ({exc})"}
    import logging

    from posttrain_assets.text import fold

    with contextlib.suppress(Exception):
        from loguru import logger

        logger.remove()
        logging.getLogger("datatrove").setLevel(logging.WARNING)

    class _Whitespace:
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

    class _Collect:
        def __init__(self) -> None:
            self.docs: list[Any] = []

        def __enter__(self) -> _Collect:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def write(self, doc: Any, rank: int = 0) -> None:
            self.docs.append(doc)

    b, r = MinHashLSH(threshold=threshold, num_perm=num_perm).b, MinHashLSH(threshold=threshold, num_perm=num_perm).r
    norm = TextNormConfig(
        lowercase=True,
        norm_whitespace=True,
        remove_punctuation=False,
        norm_unicode_diacritics=False,
        norm_numbers=False,
    )
    config = dt_minhash.MinhashConfig(n_grams=shingle_words, num_buckets=b, hashes_per_bucket=r, norm_config=norm)
    original_loader = dt_minhash.load_word_tokenizer
    dt_minhash.load_word_tokenizer = lambda language: _Whitespace()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_datatrove_") as tmp:
            tmp_path = Path(tmp)

            def docs() -> Iterator[Any]:
                for row, text in zip(rows, texts, strict=True):
                    yield Document(text=fold(text), id=str(row))

            collect = _Collect()
            with timed() as t_all:
                with timed() as t_sig:
                    sig = dt_minhash.MinhashDedupSignature(output_folder=str(tmp_path / "sigs"), config=config)
                    hash_text = sig._hash_func  # the installed xxhash wants bytes
                    sig._hash_func = lambda text: hash_text(text.encode("utf-8"))
                    sig.run(docs(), rank=0, world_size=1)
                buckets = dt_minhash.MinhashDedupBuckets(
                    input_folder=str(tmp_path / "sigs"), output_folder=str(tmp_path / "buckets"), config=config
                )
                for bi in range(b):
                    buckets.run(None, rank=bi, world_size=b)
                dt_minhash.MinhashDedupCluster(
                    input_folder=str(tmp_path / "buckets"),
                    output_folder=str(tmp_path / "remove"),
                    config=config,
                    save_cluster_id=True,
                ).run(None)
                filt = dt_minhash.MinhashDedupFilter(
                    input_folder=str(tmp_path / "remove"), exclusion_writer=collect, load_cluster_ids=True
                )
                kept = list(filt.run(docs(), rank=0, world_size=1))
    finally:
        dt_minhash.load_word_tokenizer = original_loader
    cluster_first: dict[int, int] = {}
    for doc in sorted(kept + collect.docs, key=lambda d: int(d.id)):
        cid = doc.metadata.get("minhash_cluster_id", -1)
        if cid != -1 and doc not in collect.docs:
            cluster_first.setdefault(cid, int(doc.id))
    pairs = []
    for doc in collect.docs:
        cid = doc.metadata.get("minhash_cluster_id", -1)
        pairs.append(((source, int(doc.id)), (source, cluster_first.get(cid, int(doc.id)))))
    return {
        "seconds": t_all["seconds"],
        "signature_seconds": t_sig["seconds"],
        "docs_per_s": round(len(texts) / t_all["seconds"], 1),
        "bands": b,
        "rows_per_band": r,
        **_pr(planted, pairs),
    }


# The default SmolLM2 ChatML template with {% generation %} around each assistant content + <|im_end|>: the
# oracle of transformers' return_assistant_tokens_mask (as in posttrain_assets_tests/test_masking.py).
CHATML_TAGGED = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def peer_masking(corpus_dir: Path, cache_dir: Path, limit: int) -> dict[str, Any]:
    """Ours (the silver_sft_tokenized path: batches of 1024 in worker processes) vs transformers' per-record
    ``apply_chat_template(return_assistant_tokens_mask=True)``."""
    import pyarrow as pa

    from posttrain_assets.defs.silver.sft_tokenized import BATCH_ROWS
    from posttrain_assets.parallel import default_processes, map_batches, processes_for
    from posttrain_assets.sft.batches import TokenizeJob, TokenizerIdentity, tokenize_batch
    from posttrain_assets.sft.masking import MaskConfig
    from posttrain_assets.sft.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2", cache_dir)
    convs = [m for _, m in sft_sample(corpus_dir, limit)]
    job = TokenizeJob(TokenizerIdentity(tok, "", ""), MaskConfig(max_seq_len=1 << 20))
    batches = [
        pa.Table.from_pylist([{"id": str(i), "source": "sft", "messages": m} for i, m in enumerate(chunk, start)])
        for start in range(0, len(convs), BATCH_ROWS)
        for chunk in [convs[start : start + BATCH_ROWS]]
    ]
    processes = processes_for(len(convs), BATCH_ROWS, default_processes())
    with timed() as ours_t:
        ours = list(map_batches(tokenize_batch, job, batches, processes))
    # The same batches in this process: what the stage costs without starting workers (seconds each), which
    # is what a run of a few thousand rows sees.
    with timed() as here_t:
        list(map_batches(tokenize_batch, job, batches, 1))
    with timed() as hf_t:
        theirs = [
            tok.apply_chat_template(m, chat_template=CHATML_TAGGED, return_dict=True, return_assistant_tokens_mask=True)
            for m in convs
        ]
    rows = {r["id"]: r for batch in ours if batch.tokenized is not None for r in batch.tokenized.to_pylist()}
    mismatches = []
    for i, b in enumerate(theirs):
        a = rows.get(str(i))  # a row our masking refused is a mismatch too
        mask = a and [int(label != -100) for label in a["labels"]]
        if a is None or a["input_ids"] != list(b["input_ids"]) or mask != list(b["assistant_masks"]):
            mismatches.append(i)
    tokens = sum(len(b["input_ids"]) for b in theirs)
    if mismatches:
        raise AssertionError(f"masks differ from transformers' on {len(mismatches)} rows, e.g. {mismatches[:5]}")
    return {
        "conversations": len(convs),
        "tokens": tokens,
        "identical_masks": True,
        "ours": {"seconds": ours_t["seconds"], "tokens_per_s": round(tokens / ours_t["seconds"])},
        "ours_one_process": {"seconds": here_t["seconds"], "tokens_per_s": round(tokens / here_t["seconds"])},
        "transformers": {"seconds": hf_t["seconds"], "tokens_per_s": round(tokens / hf_t["seconds"])},
        "ours_speedup": round(hf_t["seconds"] / ours_t["seconds"], 2),
        "ours_one_process_speedup": round(hf_t["seconds"] / here_t["seconds"], 2),
        "ours_processes": processes,
    }


def peer_ingest(corpus_dir: Path, bronze_seconds_by_source: dict[str, float]) -> dict[str, Any]:
    """DuckDB's ``read_json_auto`` on the JSONL sources vs our bronze ingest of the same sources."""
    import duckdb

    out: dict[str, Any] = {}
    total_rows = total_duck = total_ours = 0.0
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        conn = duckdb.connect(str(Path(tmp) / "peer.duckdb"))
        for s in SOURCES:
            if s.container != "jsonl" or s.name not in bronze_seconds_by_source:
                continue
            path = Path(corpus_dir) / s.path
            # Counting the lines first also reads the file into the page cache, as bronze found it right after the
            # corpus was written; by now the run's own writes have pushed it out (DuckDB read at half speed).
            lines = sum(1 for _ in path.open("rb"))
            with timed() as t:
                conn.execute(
                    f"CREATE OR REPLACE TABLE {s.name} AS SELECT * FROM read_json_auto(?, ignore_errors = true, "
                    "format = 'newline_delimited')",
                    [str(path)],
                )
            rows = _count(conn, f"SELECT count(*) FROM {s.name}")
            ours = bronze_seconds_by_source[s.name]
            out[s.name] = {
                "lines": lines,
                "duckdb_rows": rows,
                "duckdb_seconds": t["seconds"],
                "ours_seconds": round(ours, 2),
                "ours_slowdown": round(ours / t["seconds"], 2),
            }
            total_rows += lines
            total_duck += t["seconds"]
            total_ours += ours
        conn.close()
    out["total"] = {
        "rows": int(total_rows),
        "duckdb_rows_per_s": round(total_rows / total_duck, 1) if total_duck else None,
        "ours_rows_per_s": round(total_rows / total_ours, 1) if total_ours else None,
        "ours_slowdown": round(total_ours / total_duck, 2) if total_duck else None,
    }
    return out


# ---------------------------------------------------------------------------------------------------------------
# the floor: the work no implementation can skip
# ---------------------------------------------------------------------------------------------------------------

FLOOR_BATCH_ROWS = 4096


def _text_leaves(value: Any, out: list[str]) -> None:
    """Every string in a decoded record (nested lists and structs walked), in order."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _text_leaves(item, out)
    elif isinstance(value, list):
        for item in value:
            _text_leaves(item, out)


def _floor_relation(s: BenchSource) -> str:
    """DuckDB's own reader of a landing file (malformed JSON lines skipped: they carry no text to tokenise)."""
    if s.container == "parquet":
        return "read_parquet(?)"
    return "read_json_auto(?, ignore_errors = true)"


def _record_texts(conn: duckdb.DuckDBPyConnection, path: Path, relation: str) -> Iterator[list[str]]:
    """The text of each record of one landing file, a batch of :data:`FLOOR_BATCH_ROWS` at a time: its strings
    (nested lists and structs walked) joined by newlines."""
    reader = conn.sql(f"SELECT * FROM {relation}", params=[str(path)]).to_arrow_reader(FLOOR_BATCH_ROWS)
    for batch in reader:
        texts = []
        for row in batch.to_pylist():
            leaves: list[str] = []
            _text_leaves(row, leaves)
            texts.append("\n".join(leaves))
        yield texts


def measure_floor(corpus_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """The floor of a refresh, on this machine, now: DuckDB reading every landing file (``read_json_auto``, Parquet
    with ``read_parquet``) plus one batched encode with offsets of every record's text by the project's Rust
    tokenizer (the text: the record's strings joined by newlines). Only the reads and the encode calls are timed;
    pulling the texts out of the rows in Python is not part of the floor and is not counted."""
    from posttrain_assets.sft.tokenizer import load_tokenizer

    backend = load_tokenizer(None, cache_dir).backend_tokenizer
    read_seconds = encode_seconds = 0.0
    records = tokens = 0
    conn = duckdb.connect()
    try:
        for s in SOURCES:
            path = Path(corpus_dir) / s.path
            if not path.exists():
                continue
            with timed() as t:
                conn.sql(f"SELECT * FROM {_floor_relation(s)}", params=[str(path)]).to_arrow_table()
            read_seconds += t["seconds"]
            for texts in _record_texts(conn, path, _floor_relation(s)):
                with timed() as t:
                    encodings = backend.encode_batch(texts, add_special_tokens=False)
                encode_seconds += t["seconds"]
                records += len(texts)
                tokens += sum(len(e) for e in encodings)
    finally:
        conn.close()
    return {
        "read_seconds": round(read_seconds, 2),
        "encode_seconds": round(encode_seconds, 2),
        "seconds": round(read_seconds + encode_seconds, 2),
        "records": records,
        "tokens": tokens,
    }


# Records of the speed probe: the first of the corpus's first landing file (the same texts at every N for a seed).
PROBE_RECORDS = 16_384


def _floor_and_probe(paths: tuple[Path, Path], _item: None) -> dict[str, Any]:
    """The speed probe, then the floor (run by :func:`measured_apart`)."""
    probe = encode_probe(*paths)
    return {"probe": probe, "floor": measure_floor(*paths)}


def _probe(paths: tuple[Path, Path], _item: None) -> dict[str, Any]:
    return {"probe": encode_probe(*paths)}


def measured_apart(
    measure: Callable[[tuple[Path, Path], None], dict[str, Any]], corpus_dir: Path, cache_dir: Path
) -> dict[str, Any]:
    """``measure((corpus_dir, cache_dir), None)`` in a fresh worker process (posttrain_assets.parallel).

    The floor reads every landing file into Arrow and encodes a million texts: measured in the benchmark's own
    process, the heap it leaves behind (freed, not returned to the system: 185 MiB at 1M records) was counted in
    the pipeline's peak RSS, which a ``posttrain run`` does not carry."""
    import importlib

    from posttrain_assets.parallel import map_batches, retire_fork_server

    # Workers import a function by its module's name; run as ``python -m benchmarks.bench``, this module's is
    # ``__main__``, which they do not import.
    measure = getattr(importlib.import_module("benchmarks.bench"), measure.__name__)
    try:
        return next(iter(map_batches(measure, (corpus_dir, cache_dir), [None], 1, fresh_process_per_item=True)))
    finally:
        # the fork server that preloaded this module (83 MiB) would otherwise be counted in the pipeline's RSS
        # until the first pool of the pipeline replaced it
        retire_fork_server()


def encode_probe(corpus_dir: Path, cache_dir: Path, records: int = PROBE_RECORDS) -> dict[str, Any]:
    """The floor's encode (batched, with offsets) of the same fixed texts, timed: run before the floor and again
    after the pipeline, the two say how far the machine's speed moved during the run (these machines are shared,
    and the floor, measured once, carries whatever speed the machine had then)."""
    from posttrain_assets.sft.tokenizer import load_tokenizer

    backend = load_tokenizer(None, cache_dir).backend_tokenizer
    first = next(s for s in SOURCES if (Path(corpus_dir) / s.path).exists())
    texts: list[str] = []
    with duckdb.connect() as conn:
        for batch in _record_texts(conn, Path(corpus_dir) / first.path, _floor_relation(first)):
            texts += batch[: records - len(texts)]
            if len(texts) >= records:
                break
    tokens = 0
    with timed() as t:
        for start in range(0, len(texts), FLOOR_BATCH_ROWS):
            batch = texts[start : start + FLOOR_BATCH_ROWS]
            tokens += sum(len(e) for e in backend.encode_batch(batch, add_special_tokens=False))
    seconds = t["seconds"]
    return {
        "records": len(texts),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "us_per_token": round(seconds / tokens * 1e6, 4) if tokens else None,
    }


def _probe_line(p: dict[str, Any]) -> str | None:
    """The speed probe's line: the same encode before the floor and after the pipeline, and how far it moved."""
    probe = p.get("encode_probe")
    if not probe or not probe.get("before", {}).get("us_per_token") or not probe.get("after", {}).get("us_per_token"):
        return None
    before, after = probe["before"], probe["after"]
    drift = after["us_per_token"] / before["us_per_token"] - 1
    return (
        f"machine speed during the run: the floor's encode of the same {before['tokens']:,} tokens took "
        f"{before['us_per_token']} us/token before the floor and {after['us_per_token']} after the pipeline "
        f"({drift:+.0%}); a ratio is only as steady as this"
    )


def linearity(results: list[dict[str, Any]]) -> str:
    """Per-stage seconds of benchmark results at different N, and each stage's growth over the growth of N
    (1.0: linear; above: worse than linear), each run against the smallest."""
    runs = sorted(results, key=lambda r: r["corpus"]["records"])
    base = runs[0]
    names = list(base["pipeline"]["stages"]) + ["end to end"]

    def seconds(run: dict[str, Any], name: str) -> float | None:
        p = run["pipeline"]
        value = p["end_to_end"] if name == "end to end" else p["stages"].get(name)
        return value["seconds"] if value else None

    headers = ["stage"] + [f"{r['corpus']['records']:,} s" for r in runs]
    headers += [f"{r['corpus']['records']:,} growth / N growth" for r in runs[1:]]
    rows = []
    for name in names:
        row: list[Any] = [name] + [seconds(r, name) for r in runs]
        for run in runs[1:]:
            now, then = seconds(run, name), seconds(base, name)
            n = run["corpus"]["records"] / base["corpus"]["records"]
            row.append(round(now / then / n, 2) if now and then else None)
        rows.append(row)
    floors = [r["pipeline"].get("floor") for r in runs]
    row = ["floor"] + [f["seconds"] if f else None for f in floors]
    row += [
        round(f["seconds"] / floors[0]["seconds"] / (r["corpus"]["records"] / base["corpus"]["records"]), 2)
        if f and floors[0]
        else None
        for f, r in zip(floors[1:], runs[1:], strict=True)
    ]
    rows.append(row)
    return _table(headers, rows)


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [
        ["-" if v is None else f"{v:,}" if isinstance(v, int) else str(v) for v in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _floor_line(p: dict[str, Any]) -> str:
    floor = p.get("floor")
    if not floor:
        return "floor: not measured"
    ratio = p["end_to_end"]["seconds"] / floor["seconds"] if floor["seconds"] else None
    return (
        f"floor (read every file with DuckDB + one encode with offsets of every record's text): {floor['seconds']} s "
        f"(read {floor['read_seconds']} s, encode {floor['encode_seconds']} s of {floor['tokens']:,} tokens); "
        f"end to end / floor = {ratio:.2f} (goal <= 2.5)"
    )


REFRESH_GOAL = 0.05  # issue 23: at 1 M records, adding 10,000 rows costs at most 5% of the full build
# The reported stage whose step runs each per-row stage cache (the ``rows_computed/<cache>`` metadata); a cache not
# named here is listed after the stages.
CACHE_STAGE = {
    "bronze_ingest": "bronze ingest",
    "normalise_and_gate": "silver canonical + cleaning",
    "near_dedup_signatures": "silver canonical + cleaning",
    "near_dedup_candidates": "silver canonical + cleaning",
    "near_dedup_pairs": "silver canonical + cleaning",
    "near_dedup_similarities": "silver canonical + cleaning",
    "decontamination": "silver canonical + cleaning",
    "preference_pairs": "silver preference pairs",
    "silver_preference_pairs": "silver preference pairs",
    "silver_preference_pairs_balanced": "silver preference pairs",
    "sft_tokenize": "silver sft_tokenized",
    "loss_mask_proof": "loss_mask_check",
    "rl_certification": "silver RL certification",
    "silver_records": "silver canonical + cleaning",
    "gold_sft": "gold",
    "gold_preference": "gold",
    "gold_preference_length_balanced": "gold",
    "gold_rl_prompts": "gold",
}


def _refresh_lines(r: dict[str, Any], full_seconds: float, records: int) -> list[str]:
    """The refresh's report: both times and the share, whether the goal holds, and its per-stage table."""
    if "skipped" in r:
        return [f"incremental refresh: skipped ({r['skipped']})"]
    share = r["share_of_full"]
    lines = [
        f"incremental refresh: {r['rows_added']:,} rows added as {len(r['sources_added'])} new sources to "
        f"{records:,}: refresh {r['seconds']} s vs full build {full_seconds} s (same run) = "
        f"{share:.1%} of the full build; peak RSS {r['peak_rss_mib']} MiB",
    ]
    if r["failure"]:
        lines.append(f"THE REFRESH FAILED (the figures are the stages that ran): {r['failure']}")
    verdict = "holds" if share is not None and share <= REFRESH_GOAL and not r["failure"] else "does NOT hold"
    scale = (
        ""
        if (records, r["rows_added"]) == (1_000_000, 10_000)
        else (f" (the goal is stated for 1,000,000 records + 10,000 rows; this run: {records:,} + {r['rows_added']:,})")
    )
    lines.append(f"refresh goal (<= {REFRESH_GOAL:.0%} of the full build): {verdict} in this run{scale}")
    reuse = dict(r.get("reuse", {}))
    table_rows: list[list[Any]] = []
    for name, v in r["stages"].items():
        table_rows.append([name, v["seconds"], None, None])
        for cache in [c for c in reuse if CACHE_STAGE.get(c) == name]:
            counts = reuse.pop(cache)
            table_rows.append([f"  cache {cache}", None, counts["computed"], counts["reused"]])
    table_rows += [[f"cache {c}", None, v["computed"], v["reused"]] for c, v in reuse.items()]
    lines.append(_table(["refresh stage", "seconds", "rows computed", "rows reused"], table_rows))
    if r.get("silver_pass_seconds"):
        lines.append(
            "refresh silver pass by stage (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["silver_pass_seconds"].items())
        )
    return lines


def report_text(result: dict[str, Any]) -> str:
    """The human-readable tables of a benchmark result."""
    c, p = result["corpus"], result["pipeline"]
    parts = [
        f"corpus: {c['records']:,} records ({c['by_regime']}), {c['near_duplicates']:,} planted near duplicates, "
        f"{c['malformed']:,} malformed, {c['bytes'] / 1e6:,.1f} MB, generated in {c['generate_seconds']} s",
        "",
        _table(
            ["stage", "seconds", "records", "records/s", "peak RSS MiB"],
            [[k, v["seconds"], v["records"], v["records_per_s"], v["peak_rss_mib"]] for k, v in p["stages"].items()]
            + [
                [
                    "end to end",
                    p["end_to_end"]["seconds"],
                    c["records"],
                    p["end_to_end"]["records_per_s"],
                    p["end_to_end"]["peak_rss_mib"],
                ]
            ],
        ),
        "silver pass by stage (s): "
        + (", ".join(f"{k} {v:.1f}" for k, v in p.get("silver_pass_seconds", {}).items()) or "did not run"),
        _floor_line(p),
        *filter(None, [_probe_line(p)]),
        "",
        f"near-dedup vs plan: recall {p['dedup']['recall']} ({p['dedup']['recalled']}/{p['dedup']['planted']}), "
        f"precision {p['dedup']['precision']} ({p['dedup']['true_positives']}/{p['dedup']['detected']}); "
        f"by edit fraction {p['dedup']['recall_by_edit_fraction']}; by regime {p['dedup']['recall_by_regime']}",
        f"checks failed: {[x['check'] for x in p['checks'] if not x['passed']] or 'none'}",
    ]
    if p.get("failure"):
        parts.append(f"THE RUN FAILED (the figures above are the stages that ran): {p['failure']}")
    if p.get("refresh"):
        parts += ["", *_refresh_lines(p["refresh"], p["end_to_end"]["seconds"], c["records"])]
    peers = result.get("peers") or {}
    for name, value in peers.items():
        if "error" in value:
            parts += ["", f"peer {name} failed: {value['error']}"]
    if "error" not in peers.get("dedup", {"error": 1}):
        d = peers["dedup"]
        parts += [
            "",
            f"near-dedup peers on {d['documents']:,} SFT units ({d['shingles']:,} shingles, "
            f"threshold {d['threshold']}):",
            _table(
                ["implementation", "seconds", "signatures s", "docs/s", "recall", "precision", "ours faster x"],
                [
                    [
                        k,
                        v.get("seconds"),
                        v.get("signature_seconds"),
                        v.get("docs_per_s"),
                        v.get("recall"),
                        v.get("precision"),
                        v.get("ours_speedup"),
                    ]
                    for k, v in ((k, d[k]) for k in ("ours", "datasketch", "datatrove", "rensa") if k in d)
                ],
            ),
        ]
    if "error" not in peers.get("masking", {"error": 1}):
        m = peers["masking"]
        parts += [
            "",
            f"tokenisation with masks on {m['conversations']:,} conversations ({m['tokens']:,} tokens), "
            f"masks identical: {m['identical_masks']}:",
            _table(
                ["implementation", "seconds", "tokens/s"],
                [
                    [
                        f"ours ({m['ours_processes']} worker processes, started inside)",
                        m["ours"]["seconds"],
                        m["ours"]["tokens_per_s"],
                    ],
                    ["ours (one process)", m["ours_one_process"]["seconds"], m["ours_one_process"]["tokens_per_s"]],
                    ["transformers", m["transformers"]["seconds"], m["transformers"]["tokens_per_s"]],
                ],
            ),
        ]
    if "error" not in peers.get("ingest", {"error": 1}):
        g = peers["ingest"]
        parts += [
            "",
            "ingest of the JSONL sources:",
            _table(
                ["source", "lines", "ours s", "duckdb read_json_auto s", "ours slower x"],
                [
                    [k, v["lines"], v["ours_seconds"], v["duckdb_seconds"], v["ours_slowdown"]]
                    for k, v in g.items()
                    if k != "total"
                ],
            ),
            f"total: ours {g['total']['ours_rows_per_s']} rows/s, duckdb {g['total']['duckdb_rows_per_s']} rows/s",
        ]
    return "\n".join(parts)


def run_benchmark(
    records: int,
    out_dir: Path,
    *,
    seed: int = DEFAULT_SEED,
    skip_peers: bool = False,
    peer_docs: int = 20_000,
    peer_conversations: int = 2_000,
    cache_dir: Path | None = None,
    json_path: Path | None = None,
    refresh_rows: int | None = None,
) -> dict[str, Any]:
    """Generate the corpus under ``out_dir/corpus``, run the graph under ``out_dir/run``, then the peers.

    The refresh (``refresh_rows`` new rows, default :func:`default_refresh_rows`; 0: none) is a second corpus under
    ``out_dir/refresh_corpus`` (seed + 1), registered as new sources after the full build is measured."""
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir or os.environ.get("POSTTRAIN_CACHE_DIR") or Path.home() / ".cache/posttrain_assets")
    corpus_dir, run_dir = out_dir / "corpus", out_dir / "run"
    plan = generate_corpus(corpus_dir, records, seed)
    refresh_rows = default_refresh_rows(records) if refresh_rows is None else refresh_rows
    refresh = None
    if refresh_rows > 0:
        refresh_plan = generate_corpus(out_dir / "refresh_corpus", refresh_rows, seed + 1)
        refresh = Refresh(write_refresh_registry(plan, refresh_plan), refresh_plan)
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "corpus": plan,
    }
    # The floor is measured first, in the same run: the files are as warm as they are for bronze ingest. The speed
    # probe before it and after the pipeline says how far the machine's speed moved in between.
    before = measured_apart(_floor_and_probe, corpus_dir, cache_dir)
    probe_before, floor = before["probe"], before["floor"]
    result["pipeline"] = run_pipeline(Path(plan["registry"]), run_dir, cache_dir, plan, refresh)
    result["pipeline"]["floor"] = floor
    result["pipeline"]["encode_probe"] = {
        "before": probe_before,
        "after": measured_apart(_probe, corpus_dir, cache_dir)["probe"],
    }
    if floor["seconds"]:
        result["pipeline"]["end_to_end_over_floor"] = round(
            result["pipeline"]["end_to_end"]["seconds"] / floor["seconds"], 2
        )
    result["peak_rss_mib_process"] = _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if json_path is not None:  # keep the pipeline figures even if a peer fails
        _write_json(json_path, result)
    if not skip_peers:
        bronze_by_source = result["pipeline"]["bronze_seconds_by_source"]
        peers: dict[str, Callable[[], dict[str, Any]]] = {
            "dedup": lambda: peer_dedup(corpus_dir, peer_docs),
            "masking": lambda: peer_masking(corpus_dir, cache_dir, peer_conversations),
            "ingest": lambda: peer_ingest(corpus_dir, bronze_by_source),
        }
        result["peers"] = {}
        for name, run in peers.items():
            try:
                result["peers"][name] = run()
            except Exception as exc:  # a failing peer is reported, the others still run
                result["peers"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    if json_path is not None:
        _write_json(json_path, result)
    return result


def _write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``make bench``)."""
    parser = argparse.ArgumentParser(description="Benchmark the platform end to end on a seeded synthetic corpus.")
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS, help="corpus size (default 1,000,000)")
    parser.add_argument("--out", type=Path, default=Path("data/bench"), help="working directory (corpus + run)")
    parser.add_argument("--json", type=Path, default=None, help="result file (default OUT/bench-N.json)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--skip-peers", action="store_true", help="only the pipeline, no peer comparisons")
    parser.add_argument("--peer-docs", type=int, default=20_000, help="SFT rows given to the near-dedup peers")
    parser.add_argument("--peer-conversations", type=int, default=8_000, help="SFT rows given to the masking peers")
    parser.add_argument(
        "--refresh-rows",
        type=int,
        default=None,
        help="rows added as new sources after the full build and refreshed (default 10,000 from 200,000 records up, "
        "else records / 20, at least 50; 0: no refresh)",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        default=None,
        help="print the per-stage growth of earlier result files (e.g. 100k, 1M, 3M) instead of running",
    )
    args = parser.parse_args(argv)
    if args.compare:
        print(linearity([json.loads(path.read_text(encoding="utf-8")) for path in args.compare]))
        return 0
    path = args.json or args.out / f"bench-{args.records}.json"
    result = run_benchmark(
        args.records,
        args.out,
        seed=args.seed,
        skip_peers=args.skip_peers,
        peer_docs=args.peer_docs,
        peer_conversations=args.peer_conversations,
        json_path=path,
        refresh_rows=args.refresh_rows,
    )
    print(report_text(result))
    print(f"\nresult: {path}")
    return 1 if result["pipeline"].get("failure") or (result["pipeline"].get("refresh") or {}).get("failure") else 0


if __name__ == "__main__":
    sys.exit(main())
