r"""Seeded, offline demo-data generator: a small landing zone of post-training data.

``generate_demo_data(out_dir, seed=7)`` writes raw files in every supported input
format, a source registry ``out_dir/sources.yaml`` (order = source priority) and a
manifest ``out_dir/manifest.json`` describing everything that was planted. It
returns the registry path. Pure Python (pyarrow + stdlib); nothing here imports
Dagster. CLI: ``python -m posttrain_assets.demo.generator OUT_DIR [--seed N]``.

The wording it draws from (topics, prompt and reply templates, names, review snippets,
GSM8K question phrasings, near-duplicate substitutions) is data: ``pools/*.json`` beside
this module (package data), read by :func:`load_pool`. This file holds the logic.

Determinism: the same seed gives byte-identical files (every source draws from its
own ``random.Random(f"{seed}:{name}")``, no timestamps, gzip ``mtime=0``, fixed
Parquet writer options). Row counts and planted counts below do not depend on the
seed; only the generated text does.

Sources (registry order), physical rows (JSONL non-blank lines / JSON-array
elements / Parquet rows):

======================= ================================ ============== ==== =========
name                    path                             format         rows malformed
======================= ================================ ============== ==== =========
demo_sft_messages       sft/messages.jsonl               messages        417         7
demo_sft_sharegpt       sft/sharegpt.json                sharegpt        309         3
demo_sft_alpaca         sft/alpaca.json                  alpaca          253         3
demo_pref_trl_explicit  preference/trl_explicit.jsonl    trl_preference  257         4
demo_pref_trl_implicit  preference/trl_implicit.parquet  trl_preference  204         2
demo_pref_ultrafeedback preference/ultrafeedback.parquet ultrafeedback   301         1
demo_pref_hh_rlhf       preference/hh_rlhf.jsonl.gz      hh_rlhf         256         5
demo_rl_gsm8k           rl/gsm8k_train.jsonl             gsm8k           417         6
demo_rl_math            rl/math.jsonl                    math            202         2
demo_rl_verl            rl/verl.parquet                  verl            250         0
demo_eval_gsm8k         eval/gsm8k_test.jsonl            gsm8k (eval)     60         0
======================= ================================ ============== ==== =========

Total: 2926 physical rows, 33 malformed. Parquet files hold no malformed-by-parsing
rows, only content problems (prefix mismatch, blank reply).

Planted (all recorded in ``manifest.json`` with file and 0-based row number):

- Malformed rows (33), each with one expected reason code:
  messages.jsonl: bad_json, invalid_utf8, missing_field, wrong_type, unknown_role
  (``"role": "robot"``), empty_content (whitespace-only assistant turn),
  not_ending_with_assistant; sharegpt.json: unknown_role (``"from": "narrator"``),
  missing_field (turn without ``value``), empty_content; alpaca.json:
  missing_field (no ``output``), wrong_type (``output`` is a number), empty_content
  (blank ``output``); trl_explicit.jsonl: bad_json, missing_field (no
  ``rejected``), wrong_type (``chosen`` is a number), empty_content (blank
  ``rejected``); trl_implicit.parquet: 2 x pair_prefix_mismatch; ultrafeedback.parquet:
  empty_content (blank chosen reply); hh_rlhf.jsonl.gz: 3 x pair_prefix_mismatch,
  bad_json, invalid_utf8; gsm8k_train.jsonl: bad_json, invalid_utf8,
  missing_field (no ``answer``), wrong_type (``"question": 12``), 2 x
  missing_gold_answer (worked solution without ``####``); math.jsonl:
  missing_gold_answer (no ``\boxed``), missing_field (no ``solution``).
  Row numbers are line indices of the (decompressed) JSONL file, element indices of
  a JSON array, or row indices of a Parquet file. Files contain no blank lines.
- Exact duplicates (10 groups, 11 surplus rows): within a source — messages x3
  groups (one of them with 3 copies), gsm8k x2, hh_rlhf x1; across two sources of
  the same regime — messages <-> sharegpt x2 (same conversation, ShareGPT
  spelling), trl_explicit <-> trl_implicit x2 (same prompt/chosen/rejected).
- Near duplicates (17 rows, each a copy of another row of the same file with
  5-9% of its whitespace words reworded in one or two runs, word count unchanged):
  messages x6, sharegpt x4, trl_explicit x3, gsm8k x4. The manifest gives, per
  pair, the edited fraction and the Jaccard similarity of lower-cased word
  5-gram sets (:func:`shingle_jaccard`): 0.72-0.85 for chat rows with seed 7 (about
  0.67-0.86 over other seeds), 0.65-0.72 for the short GSM8K rows. Unplanted pairs of chat rows in one file stay below
  0.7; templated math prompts (gsm8k, math, verl) can reach about 0.8 with each
  other, so a near-dup check on RL prompts will see some template look-alikes.
- Length bias: in ``demo_pref_ultrafeedback`` (kind ``ai``) the chosen reply has
  more whitespace words than the rejected one in exactly 270 of the 300
  well-formed pairs (90%). The other preference sources are balanced: trl_explicit
  125/250 before planted copies, trl_implicit 100/200, hh_rlhf 125/250 (the
  manifest gives the exact figures over all well-formed rows, duplicates included).
- Who labelled the preferences (``preference_labels``; drawn from their own random streams, so the text is the
  same as without them): every ``demo_pref_ultrafeedback`` row names its ``judge`` and the ``chosen_model`` /
  ``rejected_model`` (``pools/labellers.json``). The first judge labels 200 pairs, all chosen-longer; the second
  100 (70 chosen-longer, all 30 chosen-shorter). Every well-formed ``demo_pref_trl_explicit`` row carries
  ``ratings`` of 3 of 5 annotators (1-10 for each response): they agree with the label except in 20 planted
  low-agreement pairs (10 chosen-longer, 10 shorter; two of three raters prefer the rejected response) and 25 pairs
  with one dissenting rater; a near duplicate carries its original's ratings.
- Contamination: 5 rows of ``demo_rl_gsm8k`` copy a row of the eval set
  ``demo_eval_gsm8k`` verbatim (question and answer). These are listed under
  ``contaminated`` and not under ``exact_duplicates``.
- Everything not listed above is well-formed and unique: no two rows of a file
  are equal unless planted, and no RL question appears twice across sources
  unless planted.
- GSM8K final answers of 1000 or more use a thousands separator in about half the
  rows (``#### 1,234``); verl ground truths never do.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import math
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from posttrain_assets.ingest.registry import render_registry

# --------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class SourceSpec:
    """One registry entry for a generated source."""

    name: str
    path: str
    format: str
    regime: str
    license: str
    kind: str
    role: str | None = None


SOURCES: tuple[SourceSpec, ...] = (
    SourceSpec("demo_sft_messages", "sft/messages.jsonl", "messages", "sft", "Apache-2.0", "synthetic"),
    SourceSpec("demo_sft_sharegpt", "sft/sharegpt.json", "sharegpt", "sft", "CC-BY-4.0", "human"),
    SourceSpec("demo_sft_alpaca", "sft/alpaca.json", "alpaca", "sft", "CC-BY-NC-4.0", "ai"),
    SourceSpec(
        "demo_pref_trl_explicit", "preference/trl_explicit.jsonl", "trl_preference", "preference", "MIT", "human"
    ),
    SourceSpec(
        "demo_pref_trl_implicit",
        "preference/trl_implicit.parquet",
        "trl_preference",
        "preference",
        "Apache-2.0",
        "synthetic",
    ),
    SourceSpec(
        "demo_pref_ultrafeedback", "preference/ultrafeedback.parquet", "ultrafeedback", "preference", "MIT", "ai"
    ),
    SourceSpec("demo_pref_hh_rlhf", "preference/hh_rlhf.jsonl.gz", "hh_rlhf", "preference", "MIT", "human"),
    SourceSpec("demo_rl_gsm8k", "rl/gsm8k_train.jsonl", "gsm8k", "rl", "MIT", "human"),
    SourceSpec("demo_rl_math", "rl/math.jsonl", "math", "rl", "MIT", "human"),
    SourceSpec("demo_rl_verl", "rl/verl.parquet", "verl", "rl", "Apache-2.0", "synthetic"),
    SourceSpec("demo_eval_gsm8k", "eval/gsm8k_test.jsonl", "gsm8k", "rl", "MIT", "human", role="eval"),
)

FORMATS: tuple[str, ...] = (
    "messages",
    "sharegpt",
    "alpaca",
    "trl_preference",
    "ultrafeedback",
    "hh_rlhf",
    "gsm8k",
    "math",
    "verl",
)

LENGTH_BIASED_SOURCE = "demo_pref_ultrafeedback"
MULTI_RATER_SOURCE = "demo_pref_trl_explicit"
JUDGE_B_PAIRS = (70, 30)  # (chosen longer, chosen shorter) pairs of the ultrafeedback source the second judge labels
RATERS_PER_PAIR = 3
LOW_AGREEMENT_PAIRS = (10, 10)  # (chosen longer, shorter) pairs of MULTI_RATER_SOURCE whose raters mostly disagree
ONE_DISSENT_PAIRS = 25  # pairs of MULTI_RATER_SOURCE where one rater of three prefers the rejected response

# --------------------------------------------------------------------------------------
# Text pools: the wording lives in ``pools/*.json`` beside this module (package data); the code
# below only draws from it. Each file is one concern:
#   topics.json           TOPICS: what conversations are about (name, area, terms, examples)
#   prompts.json          user-side templates: openers, prefixes, suffixes, follow-ups, audiences,
#                         system prompts
#   replies.json          assistant-side templates: openers, core sentences, metaphors, closers,
#                         dispreferred ("bad") replies
#   near_duplicates.json  word substitutions, filler phrases and words for planted near duplicates
#   alpaca.json           review snippets and title openers for the instruction-following tasks
#   gsm8k.json            names and, per GSM8K problem family, item words and question phrasings
#   labellers.json        who labelled the preference pairs: AI judges, completing models, human annotators
# Templates use ``str.format`` slots: {topic}, {Topic}, {term}, {term2}, {example}, {metaphor},
# {audience}, {audience_bare}, {area} (see ChatWriter.slots) and per-family slots in gsm8k.json.


@functools.cache
def load_pool(name: str) -> dict[str, Any]:
    """The parsed ``pools/<name>.json`` of this package (read once per name; do not mutate)."""
    path = resources.files("posttrain_assets.demo").joinpath("pools").joinpath(f"{name}.json")
    return json.loads(path.read_text(encoding="utf-8"))


TOPICS: tuple[dict[str, Any], ...] = tuple(load_pool("topics")["topics"])

_PROMPTS = load_pool("prompts")
USER_OPENERS: tuple[str, ...] = tuple(_PROMPTS["user_openers"])
USER_PREFIXES: tuple[str, ...] = tuple(_PROMPTS["user_prefixes"])
USER_SUFFIXES: tuple[str, ...] = tuple(_PROMPTS["user_suffixes"])
FOLLOW_UPS: tuple[str, ...] = tuple(_PROMPTS["follow_ups"])
AUDIENCES: tuple[str, ...] = tuple(_PROMPTS["audiences"])
SYSTEM_PROMPTS: tuple[str, ...] = tuple(_PROMPTS["system_prompts"])

_REPLIES = load_pool("replies")
OPENERS: tuple[str, ...] = tuple(_REPLIES["openers"])
SENTENCES: tuple[str, ...] = tuple(_REPLIES["sentences"])
METAPHORS: tuple[str, ...] = tuple(_REPLIES["metaphors"])
CLOSERS: tuple[str, ...] = tuple(_REPLIES["closers"])
BAD_REPLIES: tuple[str, ...] = tuple(_REPLIES["bad_replies"])

_NEAR = load_pool("near_duplicates")
NEAR_DUP_SUBS: dict[str, str] = dict(_NEAR["substitutions"])
PHRASE_BANK: tuple[str, ...] = tuple(_NEAR["phrase_bank"])
FILLERS: tuple[str, ...] = tuple(_NEAR["fillers"])

_ALPACA = load_pool("alpaca")
REVIEW_ITEMS: tuple[str, ...] = tuple(_ALPACA["review_items"])
REVIEW_POS: tuple[str, ...] = tuple(_ALPACA["review_positive"])
REVIEW_NEG: tuple[str, ...] = tuple(_ALPACA["review_negative"])
TITLE_OPENERS: tuple[str, ...] = tuple(_ALPACA["title_openers"])

_GSM8K = load_pool("gsm8k")
NAMES: tuple[str, ...] = tuple(_GSM8K["names"])
# One entry per problem family, in family-number order: {"family": label, "items"?: [...], "questions": [...]}.
GSM8K_FAMILIES: tuple[dict[str, Any], ...] = tuple(_GSM8K["families"])

_LABELLERS = load_pool("labellers")
JUDGES: tuple[str, ...] = tuple(_LABELLERS["judges"])  # the first labels only chosen-longer pairs (see below)
COMPLETING_MODELS: tuple[str, ...] = tuple(_LABELLERS["models"])
ANNOTATORS: tuple[str, ...] = tuple(_LABELLERS["annotators"])

# --------------------------------------------------------------------------------------
# Row bookkeeping


@dataclass
class Entry:
    """One physical row before writing: a JSON-able payload or raw bytes (JSONL only)."""

    key: str
    payload: Any
    raw: bytes | None = None
    reason: str | None = None
    note: str = ""


@dataclass
class SourceBuild:
    """Rows of one source plus planted relations, referring to rows by entry key."""

    spec: SourceSpec
    entries: list[Entry] = field(default_factory=list)
    exact_groups: list[tuple[str, list[str]]] = field(default_factory=list)
    # near duplicates: (dup key, original key, edited words, total words, 5-gram Jaccard)
    near: list[tuple[str, str, int, int, float]] = field(default_factory=list)

    def add(
        self,
        payload: Any,
        *,
        key: str | None = None,
        raw: bytes | None = None,
        reason: str | None = None,
        note: str = "",
    ) -> Entry:
        """Append a row and return it."""
        entry = Entry(key or f"{self.spec.name}#{len(self.entries)}", payload, raw, reason, note)
        self.entries.append(entry)
        return entry


def _rng(seed: int, name: str) -> random.Random:
    """An independent, reproducible RNG per (seed, purpose)."""
    return random.Random(f"{seed}:{name}")


def _fmt_int(n: int, rng: random.Random | None = None) -> str:
    """Format an integer, with a thousands separator half the time when >= 1000 and ``rng`` is given."""
    if rng is not None and abs(n) >= 1000 and rng.random() < 0.5:
        return f"{n:,}"
    return str(n)


def _words(text: str) -> int:
    """Whitespace word count."""
    return len(text.split())


def shingle_jaccard(a: list[str], b: list[str], n: int = 5) -> float:
    """Jaccard similarity of lower-cased whitespace-word ``n``-gram sets over the concatenated texts."""

    def grams(texts: list[str]) -> set[tuple[str, ...]]:
        words = " ".join(texts).lower().split()
        return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb) if ga | gb else 1.0


# --------------------------------------------------------------------------------------
# Chat content


class ChatWriter:
    """Templated but varied prompts and replies about :data:`TOPICS`."""

    def __init__(self, rng: random.Random) -> None:
        """Draw all choices from ``rng``."""
        self.rng = rng

    def slots(self, topic: dict[str, Any] | None = None) -> dict[str, str]:
        """Fill-in values for one conversation."""
        rng = self.rng
        topic = topic or rng.choice(TOPICS)
        term, term2 = rng.sample(topic["terms"], 2)
        audience = rng.choice(AUDIENCES)
        return {
            "topic": topic["name"],
            "Topic": topic["name"][0].upper() + topic["name"][1:],
            "term": term,
            "term2": term2,
            "example": rng.choice(topic["examples"]),
            "metaphor": rng.choice(METAPHORS),
            "audience": audience,
            "audience_bare": audience,
            "area": topic["area"],
        }

    def user_prompt(self, s: dict[str, str]) -> str:
        """A first user turn."""
        rng = self.rng
        body = rng.choice(USER_OPENERS).format(**s)
        prefix = rng.choice(USER_PREFIXES).format(**s)
        if prefix.endswith("and "):
            body = "I'd like to know: " + body[0].lower() + body[1:]
        elif prefix.endswith(", ") and not re.match(r"I\b|I'", body):
            body = body[0].lower() + body[1:]
        return prefix + body + rng.choice(USER_SUFFIXES)

    def sentences(self, s: dict[str, str], n: int) -> list[str]:
        """``n`` distinct filled-in sentences."""
        return [t.format(**s) for t in self.rng.sample(SENTENCES, n)]

    def reply(self, s: dict[str, str], n: int | None = None, style: str | None = None) -> str:
        """An assistant reply of ``n`` core sentences in a random style."""
        rng = self.rng
        n = n if n is not None else rng.randint(2, 6)
        style = style or rng.choice(("paragraph", "paragraph", "bullets", "steps", "two_paragraphs"))
        core = self.sentences(s, n)
        opener = rng.choice(OPENERS)
        closer = rng.choice(CLOSERS)
        if style == "bullets" and n >= 2:
            body = "Here are the key points:\n" + "\n".join(f"- {c}" for c in core)
        elif style == "steps" and n >= 2:
            body = "A simple way to approach it:\n" + "\n".join(f"{i}. {c}" for i, c in enumerate(core, 1))
        elif style == "two_paragraphs" and n >= 3:
            cut = n // 2
            body = " ".join(core[:cut]) + "\n\n" + " ".join(core[cut:])
        else:
            body = " ".join(core)
        parts = [p for p in (opener, body, closer) if p]
        return ("\n\n" if style in ("bullets", "steps") else " ").join(parts) if len(parts) > 1 else parts[0]

    def follow_up(self, s: dict[str, str]) -> str:
        """A later user turn."""
        return self.rng.choice(FOLLOW_UPS).format(**s)

    def system(self, s: dict[str, str]) -> str:
        """A system prompt."""
        return self.rng.choice(SYSTEM_PROMPTS).format(**s)

    def conversation(self) -> list[dict[str, str]]:
        """A 2-8 turn conversation ending with an assistant turn; about 30% have a system turn."""
        rng = self.rng
        s = self.slots()
        msgs: list[dict[str, str]] = []
        with_system = rng.random() < 0.3
        if with_system:
            msgs.append({"role": "system", "content": self.system(s)})
        exchanges = rng.randint(1, 3 if with_system else 4)
        follow_ups = [f.format(**s) for f in rng.sample(FOLLOW_UPS, exchanges - 1)]
        for i in range(exchanges):
            user = self.user_prompt(s) if i == 0 else follow_ups[i - 1]
            msgs.append({"role": "user", "content": user})
            msgs.append({"role": "assistant", "content": self.reply(s, rng.randint(1 if i else 2, 6))})
        return msgs

    def bad_reply(self, s: dict[str, str], n_extra: int) -> str:
        """A dispreferred reply: unhelpful core plus ``n_extra`` padding sentences (vague or off-topic)."""
        rng = self.rng
        head = rng.choice(BAD_REPLIES).format(**s)
        if n_extra <= 0:
            return head
        other = self.slots()  # off-topic rambling about another topic
        pad = [t.format(**other) for t in rng.sample(SENTENCES, n_extra)]
        return head + " " + " ".join(pad)


def _pref_pair(cw: ChatWriter, s: dict[str, str], chosen_longer: bool) -> tuple[str, str]:
    """A (chosen, rejected) reply pair where ``chosen`` is strictly longer in words iff ``chosen_longer``."""
    rng = cw.rng
    while True:
        if chosen_longer:
            chosen = cw.reply(s, rng.randint(3, 6))
            rejected = cw.bad_reply(s, rng.randint(0, 2))
        else:
            chosen = cw.reply(s, rng.randint(1, 3), style="paragraph")
            rejected = cw.bad_reply(s, rng.randint(3, 6))
        if (_words(chosen) > _words(rejected)) == chosen_longer and _words(chosen) != _words(rejected):
            return chosen, rejected


def _flags(rng: random.Random, n: int, k: int) -> list[bool]:
    """A shuffled list of ``n`` booleans with exactly ``k`` True."""
    flags = [True] * k + [False] * (n - k)
    rng.shuffle(flags)
    return flags


# --------------------------------------------------------------------------------------
# Near duplicates


_WORD_RE = re.compile(r"^([A-Za-z]+)([.,!?:;]?)$")


def _near_dup_texts(rng: random.Random, texts: list[str], lo: float = 0.05, hi: float = 0.09) -> tuple[list[str], int]:
    """Reword a fraction in [lo, hi] of the whitespace words across ``texts`` (alphabetic words only).

    The edits form one or two runs of neighbouring words (a reworded phrase), so the copy stays close at the
    shingle level. Returns the edited texts and the number of edited words; word counts stay the same.
    """
    split = [re.split(r"(\s+)", t) for t in texts]
    positions = [
        (i, j) for i, parts in enumerate(split) for j, w in enumerate(parts) if j % 2 == 0 and _WORD_RE.match(w)
    ]
    total = sum(_words(t) for t in texts)
    k = max(math.ceil(total * lo), round(total * rng.uniform(lo, hi)))
    k = min(k, len(positions), math.floor(total * 0.15))
    if k < 1 or k / total < 0.05:
        raise ValueError("text too short for a 5-15% near duplicate")
    runs = [k] if k < 8 else [k // 2, k - k // 2]
    chosen: list[tuple[int, int]] = []
    for length in runs:
        free = [s for s in range(len(positions) - length + 1) if not set(positions[s : s + length]) & set(chosen)]
        start = rng.choice(free)
        chosen += positions[start : start + length]
    phrase = rng.choice(PHRASE_BANK).split()
    offset = rng.randrange(len(phrase))
    for n, (i, j) in enumerate(chosen):
        word, punct = _WORD_RE.match(split[i][j]).groups()  # type: ignore[union-attr]
        sub = NEAR_DUP_SUBS.get(word.lower()) or phrase[(offset + n) % len(phrase)]
        if sub.lower() == word.lower():
            sub = rng.choice([f for f in FILLERS if f != word.lower()])
        if word[0].isupper():
            sub = sub[0].upper() + sub[1:]
        split[i][j] = sub + punct
    return ["".join(parts) for parts in split], k


# --------------------------------------------------------------------------------------
# Math content


# Problem families the evaluation set draws from; training sources use the others. Templated questions of
# one family share long word n-grams, so a shared family would look like contamination everywhere; only
# the planted verbatim copies of eval rows should.
EVAL_FAMILIES = (8, 9)
TRAIN_FAMILIES = tuple(f for f in range(10) if f not in EVAL_FAMILIES)


def _gsm8k_problem(rng: random.Random, families: Sequence[int] = TRAIN_FAMILIES) -> tuple[str, list[str], int]:
    """One GSM8K-style word problem: (question, solution lines without the final line, integer answer).

    The numbers and the worked solution are computed here; the question's wording (and the item words of
    families that have them) come from :data:`GSM8K_FAMILIES`.
    """
    name = rng.choice(NAMES)
    other = rng.choice([n for n in NAMES if n != name])
    family = rng.choice(families)
    spec = GSM8K_FAMILIES[family]

    def ask(**values: Any) -> str:
        """One of the family's question phrasings, filled in."""
        return rng.choice(spec["questions"]).format(name=name, other=other, **values)

    if family == 0:
        item = rng.choice(spec["items"])
        a, b, c = rng.randint(3, 15), rng.randint(4, 24), rng.randint(2, 20)
        c = min(c, a * b - 1)
        q = ask(item=item, a=a, b=b, c=c)
        sol = [
            f"{name} bought {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {item}.",
            f"After giving away {c}, {name} has {a * b} - {c} = <<{a * b}-{c}={a * b - c}>>{a * b - c} {item}.",
        ]
        return q, sol, a * b - c
    if family == 1:
        a, h, d = rng.randint(12, 95), rng.randint(6, 12), rng.randint(5, 30)
        thing = rng.choice(spec["items"])
        q = ask(item=thing, a=a, h=h, d=d)
        per_day = a * h
        sol = [
            f"Each day it makes {a} * {h} = <<{a}*{h}={per_day}>>{per_day} {thing}.",
            f"In {d} days that is {per_day} * {d} = <<{per_day}*{d}={per_day * d}>>{per_day * d} {thing}.",
        ]
        return q, sol, per_day * d
    if family == 2:
        p, n, cost = rng.randint(3, 25), rng.randint(20, 200), rng.randint(50, 900)
        thing = rng.choice(spec["items"])
        q = ask(item=thing, p=p, n=n, cost=cost)
        rev = p * n
        sol = [
            f"Revenue was {n} * {p} = <<{n}*{p}={rev}>>{rev} dollars.",
            f"Profit is {rev} - {cost} = <<{rev}-{cost}={rev - cost}>>{rev - cost} dollars.",
        ]
        return q, sol, rev - cost
    if family == 3:
        speed, t1, t2 = rng.randint(30, 75), rng.randint(2, 6), rng.randint(1, 5)
        q = ask(speed=speed, t1=t1, t2=t2)
        d1, d2 = speed * t1, speed * t2
        sol = [
            f"First leg: {speed} * {t1} = <<{speed}*{t1}={d1}>>{d1} miles.",
            f"Second leg: {speed} * {t2} = <<{speed}*{t2}={d2}>>{d2} miles.",
            f"Total: {d1} + {d2} = <<{d1}+{d2}={d1 + d2}>>{d1 + d2} miles.",
        ]
        return q, sol, d1 + d2
    if family == 4:
        total, pct = rng.randint(4, 60) * 20, rng.choice([10, 15, 20, 25, 30, 40, 50, 75])
        spent = total * pct // 100
        q = ask(total=total, pct=pct)
        sol = [
            f"{pct}% of {total} is {total} * {pct} / 100 = <<{total}*{pct}/100={spent}>>{spent} dollars.",
            f"Left over: {total} - {spent} = <<{total}-{spent}={total - spent}>>{total - spent} dollars.",
        ]
        return q, sol, total - spent
    if family == 5:
        rows, per_row, broken = rng.randint(6, 40), rng.randint(8, 45), rng.randint(1, 30)
        q = ask(rows=rows, per_row=per_row, broken=broken)
        t = rows * per_row
        sol = [
            f"There are {rows} * {per_row} = <<{rows}*{per_row}={t}>>{t} in total.",
            f"Subtracting {broken} gives {t} - {broken} = <<{t}-{broken}={t - broken}>>{t - broken}.",
        ]
        return q, sol, t - broken
    if family == 6:
        weekly, weeks, bonus = rng.randint(15, 400), rng.randint(4, 52), rng.randint(10, 500)
        q = ask(weekly=weekly, weeks=weeks, bonus=bonus)
        w = weekly * weeks
        sol = [
            f"Weekly amounts: {weekly} * {weeks} = <<{weekly}*{weeks}={w}>>{w} dollars.",
            f"With the extra {bonus}: {w} + {bonus} = <<{w}+{bonus}={w + bonus}>>{w + bonus} dollars.",
        ]
        return q, sol, w + bonus
    if family == 7:
        groups, each = rng.randint(3, 12), rng.randint(3, 15)
        left = rng.randint(1, groups - 1)
        total = groups * each + left
        thing = rng.choice(spec["items"])
        q = ask(item=thing, total=total, groups=groups, left=left)
        rest = total - left
        sol = [
            f"After setting aside {left}, there are {total} - {left} = <<{total}-{left}={rest}>>{rest}.",
            f"Each group gets {rest} / {groups} = <<{rest}/{groups}={each}>>{each}.",
        ]
        return q, sol, each
    if family == 8:
        length, width, price = rng.randint(8, 40), rng.randint(6, 30), rng.randint(2, 12)
        q = ask(length=length, width=width, price=price)
        area = length * width
        sol = [
            f"The area is {length} * {width} = <<{length}*{width}={area}>>{area} square feet.",
            f"The cost is {area} * {price} = <<{area}*{price}={area * price}>>{area * price} dollars.",
        ]
        return q, sol, area * price
    age, diff, years = rng.randint(5, 30), rng.randint(2, 30), rng.randint(2, 20)
    q = ask(age=age, diff=diff, years=years)
    o = age + diff
    sol = [
        f"{other} is now {age} + {diff} = <<{age}+{diff}={o}>>{o} years old.",
        f"In {years} years {other} will be {o} + {years} = <<{o}+{years}={o + years}>>{o + years}.",
    ]
    return q, sol, o + years


def _tex(x: Fraction) -> str:
    """A fraction as LaTeX (integer when whole)."""
    if x.denominator == 1:
        return str(x.numerator)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


def _math_problem(rng: random.Random) -> tuple[str, str, str, str, str]:
    """One MATH-style problem: (problem, solution body without box, boxed answer, level, type)."""
    family = rng.randrange(8)
    if family == 0:
        a, b, c = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-40, 60)
        x = Fraction(c - b, a)
        prob = f"Solve for $x$: ${a}x {'+' if b >= 0 else '-'} {abs(b)} = {c}$."
        sol = f"Subtract {b} from both sides to get ${a}x = {c - b}$. Dividing by ${a}$ gives $x = {_tex(x)}$."
        return prob, sol, _tex(x), f"Level {1 if x.denominator == 1 else 2}", "Algebra"
    if family == 1:
        r1, r2 = rng.randint(-9, 12), rng.randint(-9, 12)
        s, p = r1 + r2, r1 * r2
        which = rng.choice(["sum", "product"])
        sign_s = "-" if s >= 0 else "+"
        sign_p = "+" if p >= 0 else "-"
        prob = f"What is the {which} of the roots of $x^2 {sign_s} {abs(s)}x {sign_p} {abs(p)} = 0$?"
        ans = s if which == "sum" else p
        sol = (
            f"By Vieta's formulas, for $x^2 + bx + c = 0$ the sum of the roots is $-b$ and the product is $c$. "
            f"Here the {which} is ${ans}$."
        )
        return prob, sol, str(ans), "Level 3", "Algebra"
    if family == 2:
        n, m = rng.randint(100, 99999), rng.randint(3, 29)
        prob = f"What is the remainder when ${n}$ is divided by ${m}$?"
        q = n // m
        sol = f"We have ${n} = {m} \\cdot {q} + {n - m * q}$, so the remainder is ${n % m}$."
        return prob, sol, str(n % m), "Level 2", "Number Theory"
    if family == 3:
        g = rng.randint(2, 30)
        a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
        prob = f"Find the greatest common divisor of ${a}$ and ${b}$."
        ans = math.gcd(a, b)
        sol = f"Using the Euclidean algorithm repeatedly on ${a}$ and ${b}$, the last nonzero remainder is ${ans}$."
        return prob, sol, str(ans), "Level 2", "Number Theory"
    if family == 4:
        n = rng.randint(5, 16)
        k = rng.randint(2, min(6, n - 1))
        prob = rng.choice(
            [
                f"In how many ways can a committee of {k} people be chosen from a group of {n} people?",
                f"How many different {k}-element subsets does a set with {n} elements have?",
            ]
        )
        ans = math.comb(n, k)
        sol = f"Order does not matter, so the count is $\\binom{{{n}}}{{{k}}} = {ans}$."
        return prob, sol, str(ans), f"Level {3 if n < 10 else 4}", "Counting & Probability"
    if family == 5:
        target = rng.randint(2, 12)
        ways = sum(1 for i in range(1, 7) for j in range(1, 7) if i + j == target)
        p = Fraction(ways, 36)
        prob = f"Two fair six-sided dice are rolled. What is the probability that the sum of the numbers is {target}?"
        sol = (
            f"There are $36$ equally likely outcomes, and ${ways}$ of them sum to ${target}$, so the probability "
            f"is $\\frac{{{ways}}}{{36}} = {_tex(p)}$."
        )
        return prob, sol, _tex(p), "Level 3", "Counting & Probability"
    if family == 6:
        base = rng.choice([(3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29)])
        k = rng.randint(1, 6)
        a, b, c = (k * t for t in base)
        which = rng.choice(["hypotenuse", "area"])
        prob = f"A right triangle has legs of length ${a}$ and ${b}$. What is the {which} of the triangle?"
        if which == "hypotenuse":
            sol = f"By the Pythagorean theorem, $c = \\sqrt{{{a}^2 + {b}^2}} = \\sqrt{{{a * a + b * b}}} = {c}$."
            return prob, sol, str(c), "Level 2", "Geometry"
        area = Fraction(a * b, 2)
        sol = f"The area is $\\frac{{1}}{{2}} \\cdot {a} \\cdot {b} = {_tex(area)}$."
        return prob, sol, _tex(area), "Level 1", "Geometry"
    pct, n = rng.choice([5, 12, 15, 20, 25, 35, 40, 60, 80]), rng.randint(2, 90) * 10
    ans = Fraction(pct * n, 100)
    prob = f"What is ${pct}\\%$ of ${n}$?"
    sol = f"We compute $\\frac{{{pct}}}{{100}} \\cdot {n} = {_tex(ans)}$."
    return prob, sol, _tex(ans), "Level 1", "Prealgebra"


class QuestionPool:
    """Hands out RL questions that are unique across all RL sources."""

    def __init__(self) -> None:
        """Start with no questions handed out."""
        self.seen: set[str] = set()

    def gsm8k(self, rng: random.Random, families: Sequence[int] = TRAIN_FAMILIES) -> tuple[str, list[str], int]:
        """A fresh GSM8K-style problem from ``families``."""
        while True:
            q, sol, ans = _gsm8k_problem(rng, families)
            if q not in self.seen:
                self.seen.add(q)
                return q, sol, ans

    def math(self, rng: random.Random) -> tuple[str, str, str, str, str]:
        """A fresh MATH-style problem."""
        while True:
            prob = _math_problem(rng)
            if prob[0] not in self.seen:
                self.seen.add(prob[0])
                return prob


def _gsm8k_row(rng: random.Random, q: str, sol: list[str], ans: int) -> dict[str, str]:
    """A GSM8K row with the final ``#### N`` line (thousands separator about half the time)."""
    return {"question": q, "answer": "\n".join(sol) + f"\n#### {_fmt_int(ans, rng)}"}


# --------------------------------------------------------------------------------------
# Source builders


def _truncate(row: dict[str, Any], rng: random.Random) -> bytes:
    """A JSON line cut off part-way (bad_json), still valid UTF-8."""
    text = json.dumps(row, ensure_ascii=False)
    return text[: int(len(text) * rng.uniform(0.4, 0.8))].encode("utf-8")


def _with_invalid_utf8(row: dict[str, Any], field_name: str) -> bytes:
    """A JSON line whose ``field_name`` string contains raw 0xFF 0xFE bytes (invalid_utf8)."""
    marker = "@@BAD@@"
    row = dict(row)
    row[field_name] = row[field_name][:20] + marker + row[field_name][20:]
    return json.dumps(row, ensure_ascii=False).encode("utf-8").replace(marker.encode(), b"\xff\xfe")


def _sharegpt(conv: list[dict[str, str]], ident: str) -> dict[str, Any]:
    """Messages -> ShareGPT record."""
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"id": ident, "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in conv]}


def _payload_words(value: Any) -> tuple[int, int]:
    """(whitespace words, purely alphabetic words) over every string inside a JSON-like value."""
    if isinstance(value, str):
        words = value.split()
        return len(words), sum(1 for w in words if _WORD_RE.match(w))
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    counts = [_payload_words(v) for v in items]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def _pick(
    rng: random.Random, rows: list[Entry], n_exact: int, n_near: int, min_words: int = 40
) -> tuple[list[int], list[int]]:
    """Distinct row indices to copy exactly and to near-duplicate.

    Near-duplicate candidates have at least ``min_words`` words, a fifth of them alphabetic (editable).
    """
    exact = rng.sample(range(len(rows)), n_exact)
    eligible = []
    for i, e in enumerate(rows):
        total, alpha = _payload_words(e.payload)
        if i not in exact and total >= min_words and alpha * 5 >= total:
            eligible.append(i)
    return exact, rng.sample(eligible, n_near)


def _unique(make: Callable[[], Any], seen: set[str]) -> Any:
    """Call ``make`` until its JSON form is new."""
    while True:
        value = make()
        sig = json.dumps(value, sort_keys=True, ensure_ascii=False)
        if sig not in seen:
            seen.add(sig)
            return value


def _build_sft(seed: int) -> tuple[SourceBuild, SourceBuild, SourceBuild]:
    """Build the SFT sources: messages (JSONL), sharegpt (JSON array), alpaca (JSON array)."""
    msg_b, sg_b, al_b = (SourceBuild(spec) for spec in SOURCES[:3])
    seen: set[str] = set()

    # messages
    rng = _rng(seed, msg_b.spec.name)
    cw = ChatWriter(rng)
    convs = [_unique(cw.conversation, seen) for _ in range(400)]
    for conv in convs:
        msg_b.add({"messages": conv})
    clean = list(msg_b.entries)
    exact_idx, near_idx = _pick(rng, clean, 3, 6)
    for gi, idx in enumerate(exact_idx):  # within-source exact duplicates
        orig = clean[idx]
        n_copies = 2 if gi == 0 else 1
        copies = [msg_b.add(json.loads(json.dumps(orig.payload)), note="exact_dup").key for _ in range(n_copies)]
        msg_b.exact_groups.append(("within_source", [orig.key, *copies]))
    for idx in near_idx:  # near duplicates
        orig = clean[idx]
        texts, k = _near_dup_texts(rng, [m["content"] for m in orig.payload["messages"]])
        conv = [{"role": m["role"], "content": t} for m, t in zip(orig.payload["messages"], texts, strict=True)]
        dup = msg_b.add({"messages": conv}, note="near_dup")
        msg_b.near.append(
            (
                dup.key,
                orig.key,
                k,
                sum(_words(t) for t in texts),
                shingle_jaccard([m["content"] for m in orig.payload["messages"]], texts),
            )
        )
    good = cw.conversation()
    msg_b.add(None, raw=_truncate({"messages": good}, rng), reason="bad_json")
    bad = json.dumps({"messages": cw.conversation()}, ensure_ascii=False)
    cut = bad.index('"content": "') + len('"content": "') + 5
    msg_b.add(None, raw=bad[:cut].encode() + b"\xff\xfe" + bad[cut:].encode(), reason="invalid_utf8")
    msg_b.add({"conversation": cw.conversation()}, reason="missing_field", note="no 'messages' key")
    msg_b.add({"messages": cw.user_prompt(cw.slots())}, reason="wrong_type", note="'messages' is a string")
    conv = cw.conversation()
    conv[-2] = {"role": "robot", "content": conv[-2]["content"]}
    msg_b.add({"messages": conv}, reason="unknown_role", note="role 'robot'")
    conv = cw.conversation()
    conv[-1] = {"role": "assistant", "content": "  \n "}
    msg_b.add({"messages": conv}, reason="empty_content", note="whitespace-only assistant turn")
    conv = cw.conversation()
    conv.append({"role": "user", "content": cw.follow_up(cw.slots())})
    msg_b.add({"messages": conv}, reason="not_ending_with_assistant", note="ends with a user turn")

    # sharegpt
    rng = _rng(seed, sg_b.spec.name)
    cw = ChatWriter(rng)
    for i in range(300):
        sg_b.add(_sharegpt(_unique(cw.conversation, seen), f"sg_{i:05d}"))
    clean = list(sg_b.entries)
    free = sorted(set(range(len(convs))) - set(exact_idx) - set(near_idx))
    for j, idx in enumerate(rng.sample(free, 2)):  # cross-source exact duplicates
        src = msg_b.entries[idx]
        dup = sg_b.add(_sharegpt(src.payload["messages"], f"sg_x{j:04d}"), note="exact_dup_of_messages")
        sg_b.exact_groups.append(("cross_source", [src.key, dup.key]))
    for j, idx in enumerate(_pick(rng, clean, 0, 4)[1]):
        orig = clean[idx]
        turns = orig.payload["conversations"]
        texts, k = _near_dup_texts(rng, [t["value"] for t in turns])
        dup = sg_b.add(
            {
                "id": f"sg_n{j:04d}",
                "conversations": [{"from": t["from"], "value": v} for t, v in zip(turns, texts, strict=True)],
            },
            note="near_dup",
        )
        sg_b.near.append(
            (dup.key, orig.key, k, sum(_words(t) for t in texts), shingle_jaccard([t["value"] for t in turns], texts))
        )
    rec = _sharegpt(cw.conversation(), "sg_bad0")
    rec["conversations"].insert(-2, {"from": "narrator", "value": "The assistant pauses to think."})
    sg_b.add(rec, reason="unknown_role", note="from 'narrator'")
    rec = _sharegpt(cw.conversation(), "sg_bad1")
    del rec["conversations"][-1]["value"]
    sg_b.add(rec, reason="missing_field", note="last turn has no 'value'")
    rec = _sharegpt(cw.conversation(), "sg_bad2")
    rec["conversations"][-1]["value"] = "\n\t "
    sg_b.add(rec, reason="empty_content", note="whitespace-only gpt turn")

    # alpaca
    rng = _rng(seed, al_b.spec.name)
    cw = ChatWriter(rng)
    for _ in range(250):
        al_b.add(_unique(lambda: _alpaca_row(rng, cw), seen))
    row = _alpaca_row(rng, cw)
    del row["output"]
    al_b.add(row, reason="missing_field", note="no 'output'")
    row = _alpaca_row(rng, cw)
    row["output"] = 42
    al_b.add(row, reason="wrong_type", note="'output' is a number")
    row = _alpaca_row(rng, cw)
    row["output"] = "   "
    al_b.add(row, reason="empty_content", note="blank 'output'")
    return msg_b, sg_b, al_b


def _alpaca_row(rng: random.Random, cw: ChatWriter) -> dict[str, str]:
    """One instruction-following row; some tasks have computed outputs."""
    task = rng.randrange(7)
    if task == 0:
        s = cw.slots()
        return {
            "instruction": f"Give {rng.randint(3, 5)} tips for {s['topic']}.",
            "input": "",
            "output": "\n".join(f"{i}. {c}" for i, c in enumerate(cw.sentences(s, rng.randint(3, 5)), 1)),
        }
    if task == 1:
        s = cw.slots()
        return {
            "instruction": f"Explain {s['term']} to {s['audience']}.",
            "input": f"Context: {s['topic']}",
            "output": cw.reply(s, rng.randint(2, 4), style="paragraph"),
        }
    if task == 2:
        positive = rng.random() < 0.5
        text = f"The {rng.choice(REVIEW_ITEMS)}: {rng.choice(REVIEW_POS if positive else REVIEW_NEG)}."
        if rng.random() < 0.5:
            text += f" Rated {rng.randint(4, 5) if positive else rng.randint(1, 2)} out of 5."
        return {
            "instruction": "Classify the sentiment of the following review as Positive or Negative.",
            "input": text,
            "output": "Positive" if positive else "Negative",
        }
    if task == 3:
        c = rng.randint(-30, 45)
        f = c * 9 / 5 + 32
        return {
            "instruction": "Convert the temperature from Celsius to Fahrenheit.",
            "input": f"{c} degrees Celsius",
            "output": f"{c} degrees Celsius is {f:g} degrees Fahrenheit, since F = C * 9/5 + 32.",
        }
    if task == 4:
        nums = rng.sample(range(-50, 500), rng.randint(4, 9))
        order = rng.choice(["ascending", "descending"])
        out = sorted(nums, reverse=order == "descending")
        return {
            "instruction": f"Sort the following numbers in {order} order.",
            "input": ", ".join(map(str, nums)),
            "output": ", ".join(map(str, out)),
        }
    if task == 5:
        s = cw.slots()
        paragraph = " ".join(cw.sentences(s, rng.randint(4, 6)))
        return {
            "instruction": "Summarize the following paragraph in one sentence.",
            "input": paragraph,
            "output": f"The paragraph explains that {s['topic']} depends on {s['term']} and {s['term2']}.",
        }
    s = cw.slots()
    return {
        "instruction": f"Write a short title for an article about {s['term']} in {s['topic']}.",
        "input": "",
        "output": rng.choice(TITLE_OPENERS) + f" {s['term'][0].upper() + s['term'][1:]}",
    }


def _build_preference(seed: int) -> tuple[SourceBuild, SourceBuild, SourceBuild, SourceBuild]:
    """Build the preference sources: TRL explicit (JSONL), TRL implicit and UltraFeedback (Parquet), HH (JSONL.gz)."""
    ex_b, im_b, uf_b, hh_b = (SourceBuild(spec) for spec in SOURCES[3:7])
    seen: set[str] = set()

    def pair(cw: ChatWriter, longer: bool) -> tuple[str, str, str]:
        s = cw.slots()
        return (cw.user_prompt(s), *_pref_pair(cw, s, longer))

    # trl explicit
    rng = _rng(seed, ex_b.spec.name)
    cw = ChatWriter(rng)
    for longer in _flags(rng, 250, 125):
        p, c, r = _unique(lambda lg=longer: pair(cw, lg), seen)
        ex_b.add({"prompt": p, "chosen": c, "rejected": r})
    clean = list(ex_b.entries)
    ex_cross, ex_near = _pick(rng, clean, 2, 3)
    for idx in ex_near:
        orig = clean[idx].payload
        texts, k = _near_dup_texts(rng, [orig["prompt"], orig["chosen"], orig["rejected"]])
        dup = ex_b.add(dict(zip(("prompt", "chosen", "rejected"), texts, strict=True)), note="near_dup")
        ex_b.near.append(
            (
                dup.key,
                clean[idx].key,
                k,
                sum(_words(t) for t in texts),
                shingle_jaccard([orig["prompt"], orig["chosen"], orig["rejected"]], texts),
            )
        )
    p, c, r = pair(cw, True)
    ex_b.add(None, raw=_truncate({"prompt": p, "chosen": c, "rejected": r}, rng), reason="bad_json")
    p, c, r = pair(cw, True)
    ex_b.add({"prompt": p, "chosen": c}, reason="missing_field", note="no 'rejected'")
    p, c, r = pair(cw, False)
    ex_b.add({"prompt": p, "chosen": 3.5, "rejected": r}, reason="wrong_type", note="'chosen' is a number")
    p, c, r = pair(cw, True)
    ex_b.add({"prompt": p, "chosen": c, "rejected": "  "}, reason="empty_content", note="blank 'rejected'")

    # trl implicit
    rng = _rng(seed, im_b.spec.name)
    cw = ChatWriter(rng)

    def implicit(prefix: list[dict[str, str]], c: str, r: str) -> dict[str, Any]:
        return {
            "chosen": [*prefix, {"role": "assistant", "content": c}],
            "rejected": [*prefix, {"role": "assistant", "content": r}],
        }

    def implicit_row(longer: bool) -> dict[str, Any]:
        s = cw.slots()
        prefix: list[dict[str, str]] = []
        if rng.random() < 0.25:
            prefix.append({"role": "system", "content": cw.system(s)})
        prefix.append({"role": "user", "content": cw.user_prompt(s)})
        if rng.random() < 0.35:
            prefix += [
                {"role": "assistant", "content": cw.reply(s, rng.randint(1, 3))},
                {"role": "user", "content": cw.follow_up(s)},
            ]
        return implicit(prefix, *_pref_pair(cw, s, longer))

    for longer in _flags(rng, 200, 100):
        im_b.add(_unique(lambda lg=longer: implicit_row(lg), seen))
    for idx in ex_cross:  # cross-source exact duplicates of trl explicit rows
        src = ex_b.entries[idx]
        pl = src.payload
        dup = im_b.add(
            implicit([{"role": "user", "content": pl["prompt"]}], pl["chosen"], pl["rejected"]),
            note="exact_dup_of_trl_explicit",
        )
        im_b.exact_groups.append(("cross_source", [src.key, dup.key]))
    for _ in range(2):
        row = implicit_row(rng.random() < 0.5)
        first_user = next(i for i, m in enumerate(row["rejected"]) if m["role"] == "user")
        row["rejected"][first_user] = {"role": "user", "content": cw.user_prompt(cw.slots())}
        im_b.add(row, reason="pair_prefix_mismatch", note="rejected has a different user turn")

    # ultrafeedback (length-biased, kind ai)
    rng = _rng(seed, uf_b.spec.name)
    cw = ChatWriter(rng)

    def uf_row(longer: bool) -> dict[str, Any]:
        p, c, r = pair(cw, longer)
        sc = rng.choice([6.0, 7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0])
        sr = max(1.0, sc - rng.choice([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0]))
        return {
            "prompt": p,
            "prompt_id": hashlib.sha256(p.encode()).hexdigest(),
            "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
            "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
            "score_chosen": sc,
            "score_rejected": sr,
        }

    for longer in _flags(rng, 300, 270):
        uf_b.add(_unique(lambda lg=longer: uf_row(lg), seen))
    row = uf_row(True)
    row["chosen"][1]["content"] = " \n "
    uf_b.add(row, reason="empty_content", note="blank chosen assistant reply")

    # hh-rlhf
    rng = _rng(seed, hh_b.spec.name)
    cw = ChatWriter(rng)

    def transcript(turns: list[tuple[str, str]]) -> str:
        return "".join(f"\n\n{'Human' if r == 'user' else 'Assistant'}: {t}" for r, t in turns)

    def hh_row(longer: bool) -> tuple[list[tuple[str, str]], str, str]:
        s = cw.slots()
        prefix = [("user", cw.user_prompt(s))]
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            prefix += [("assistant", cw.reply(s, rng.randint(1, 3), style="paragraph")), ("user", cw.follow_up(s))]
        c, r = _pref_pair(cw, s, longer)
        return prefix, c, r

    def hh_payload(prefix: list[tuple[str, str]], c: str, r: str) -> dict[str, str]:
        return {"chosen": transcript([*prefix, ("assistant", c)]), "rejected": transcript([*prefix, ("assistant", r)])}

    for longer in _flags(rng, 250, 125):
        hh_b.add(_unique(lambda lg=longer: hh_payload(*hh_row(lg)), seen))
    orig = hh_b.entries[rng.randrange(250)]
    dup = hh_b.add(dict(orig.payload), note="exact_dup")
    hh_b.exact_groups.append(("within_source", [orig.key, dup.key]))
    for _ in range(3):
        prefix, c, r = hh_row(rng.random() < 0.5)
        other = [*prefix]
        other[0] = ("user", other[0][1] + " " + cw.follow_up(cw.slots()))
        hh_b.add(
            {"chosen": transcript([*prefix, ("assistant", c)]), "rejected": transcript([*other, ("assistant", r)])},
            reason="pair_prefix_mismatch",
            note="first Human turn differs",
        )
    hh_b.add(None, raw=_truncate(hh_payload(*hh_row(True)), rng), reason="bad_json")
    hh_b.add(None, raw=_with_invalid_utf8(hh_payload(*hh_row(False)), "chosen"), reason="invalid_utf8")
    _label_judges(uf_b, _rng(seed, f"labels:{uf_b.spec.name}"))
    _rate_by_annotators(ex_b, _rng(seed, f"labels:{ex_b.spec.name}"))
    return ex_b, im_b, uf_b, hh_b


def _label_judges(build: SourceBuild, rng: random.Random) -> None:
    """Give every row of the length-biased UltraFeedback source a judge and the two completing models.

    The first judge labels only chosen-longer pairs; the second the other :data:`JUDGE_B_PAIRS` (70 chosen-longer
    drawn at random and all 30 chosen-shorter), so the judge-stratified audit shows which judge carries the bias.
    Its own random stream: the rows' text is unchanged.
    """
    longer = [e for e in build.entries if (w := _final_reply_words(build, e)) is not None and w[0] > w[1]]
    shorter = [e for e in build.entries if (w := _final_reply_words(build, e)) is not None and w[0] <= w[1]]
    if len(shorter) != JUDGE_B_PAIRS[1]:
        raise AssertionError(f"{build.spec.name}: expected {JUDGE_B_PAIRS[1]} chosen-shorter pairs")
    second = {e.key for e in rng.sample(longer, JUDGE_B_PAIRS[0])} | {e.key for e in shorter}
    for entry in build.entries:
        chosen_model, rejected_model = rng.sample(COMPLETING_MODELS, 2)
        entry.payload.update(
            judge=JUDGES[1] if entry.key in second else JUDGES[0],
            chosen_model=chosen_model,
            rejected_model=rejected_model,
        )


def _rate_by_annotators(build: SourceBuild, rng: random.Random) -> None:
    """Give every well-formed pair of the multi-rater source :data:`RATERS_PER_PAIR` annotators' 1-10 scores.

    Raters agree with the label, except in :data:`LOW_AGREEMENT_PAIRS` (one rater for the chosen side, two for the
    rejected: the planted low-agreement subset) and :data:`ONE_DISSENT_PAIRS` (one rater of three dissents). Near
    duplicates carry the scores of their original, and neither takes part in the planting (dedup may keep either).
    Its own random stream: the rows' text is unchanged.
    """
    near = {key for dup, orig, *_ in build.near for key in (dup, orig)}
    plain = [e for e in build.entries if e.reason is None and e.key not in near]
    longer = [e for e in plain if (w := _final_reply_words(build, e)) is not None and w[0] > w[1]]
    shorter = [e for e in plain if e not in longer]
    low = rng.sample(longer, LOW_AGREEMENT_PAIRS[0]) + rng.sample(shorter, LOW_AGREEMENT_PAIRS[1])
    low_keys = {e.key for e in low}
    dissent = {e.key for e in rng.sample([e for e in plain if e.key not in low_keys], ONE_DISSENT_PAIRS)}
    for entry in build.entries:
        if entry.reason is not None or entry.payload is None:
            continue
        dissenting = 2 if entry.key in low_keys else 1 if entry.key in dissent else 0
        ratings = []
        for i, rater in enumerate(rng.sample(ANNOTATORS, RATERS_PER_PAIR)):
            high, low_score = rng.randint(6, 10), rng.randint(1, 5)
            agrees = i >= dissenting
            chosen, rejected = (high, low_score) if agrees else (low_score, high)
            ratings.append({"rater": rater, "chosen": chosen, "rejected": rejected})
        entry.payload["ratings"] = ratings
    originals = {e.key: e for e in build.entries}
    for dup, orig, *_ in build.near:
        originals[dup].payload["ratings"] = [dict(r) for r in originals[orig].payload["ratings"]]


def _build_rl(seed: int) -> tuple[SourceBuild, SourceBuild, SourceBuild, SourceBuild, list[tuple[str, str]]]:
    """gsm8k train (JSONL), math (JSONL), verl (Parquet), eval gsm8k (JSONL) and contamination links."""
    gs_b, ma_b, ve_b, ev_b = (SourceBuild(spec) for spec in SOURCES[7:11])
    pool = QuestionPool()

    # eval first, so training rows can copy it
    rng = _rng(seed, ev_b.spec.name)
    for _ in range(60):
        ev_b.add(_gsm8k_row(rng, *pool.gsm8k(rng, EVAL_FAMILIES)))

    rng = _rng(seed, gs_b.spec.name)
    for _ in range(400):
        gs_b.add(_gsm8k_row(rng, *pool.gsm8k(rng)))
    clean = list(gs_b.entries)
    exact_idx, near_idx = _pick(rng, clean, 2, 4, min_words=30)
    for idx in exact_idx:
        dup = gs_b.add(dict(clean[idx].payload), note="exact_dup")
        gs_b.exact_groups.append(("within_source", [clean[idx].key, dup.key]))
    for idx in near_idx:
        orig = clean[idx].payload
        texts, k = _near_dup_texts(rng, [orig["question"], orig["answer"]])
        dup = gs_b.add({"question": texts[0], "answer": texts[1]}, note="near_dup")
        gs_b.near.append(
            (
                dup.key,
                clean[idx].key,
                k,
                sum(_words(t) for t in texts),
                shingle_jaccard([orig["question"], orig["answer"]], texts),
            )
        )
    contaminated: list[tuple[str, str]] = []
    for idx in rng.sample(range(60), 5):
        dup = gs_b.add(dict(ev_b.entries[idx].payload), note="copied_from_eval")
        contaminated.append((dup.key, ev_b.entries[idx].key))
    gs_b.add(None, raw=_truncate(_gsm8k_row(rng, *pool.gsm8k(rng)), rng), reason="bad_json")
    gs_b.add(None, raw=_with_invalid_utf8(_gsm8k_row(rng, *pool.gsm8k(rng)), "question"), reason="invalid_utf8")
    gs_b.add({"question": pool.gsm8k(rng)[0]}, reason="missing_field", note="no 'answer'")
    row = _gsm8k_row(rng, *pool.gsm8k(rng))
    gs_b.add({"question": 12, "answer": row["answer"]}, reason="wrong_type", note="'question' is a number")
    for _ in range(2):
        q, sol, ans = pool.gsm8k(rng)
        gs_b.add(
            {"question": q, "answer": "\n".join(sol) + f"\nSo the answer is {ans}."},
            reason="missing_gold_answer",
            note="no '####' line",
        )

    rng = _rng(seed, ma_b.spec.name)
    for _ in range(200):
        prob, sol, ans, level, typ = pool.math(rng)
        ma_b.add({"problem": prob, "solution": f"{sol} The answer is $\\boxed{{{ans}}}$.", "level": level, "type": typ})
    prob, sol, ans, level, typ = pool.math(rng)
    ma_b.add(
        {"problem": prob, "solution": f"{sol} So the answer is ${ans}$.", "level": level, "type": typ},
        reason="missing_gold_answer",
        note="no \\boxed{}",
    )
    prob, _, _, level, typ = pool.math(rng)
    ma_b.add({"problem": prob, "level": level, "type": typ}, reason="missing_field", note="no 'solution'")

    rng = _rng(seed, ve_b.spec.name)
    suffix = ' Let\'s think step by step and output the final answer after "####".'
    for i in range(250):
        if rng.random() < 0.7:
            q, _, ans = pool.gsm8k(rng)
            src, content, truth = "openai/gsm8k", q + suffix, str(ans)
        else:
            prob, _, truth, _, _ = pool.math(rng)
            src, content = "DigitalLearningGmbH/MATH-lighteval", prob + " Put your final answer within \\boxed{}."
        ve_b.add(
            {
                "data_source": src,
                "prompt": [{"role": "user", "content": content}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": truth},
                "extra_info": {"index": i, "split": "train"},
            }
        )
    return gs_b, ma_b, ve_b, ev_b, contaminated


# --------------------------------------------------------------------------------------
# Writing

_MSG_LIST = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PARQUET_SCHEMAS: dict[str, pa.Schema] = {
    "demo_pref_trl_implicit": pa.schema([("chosen", _MSG_LIST), ("rejected", _MSG_LIST)]),
    "demo_pref_ultrafeedback": pa.schema(
        [
            ("prompt", pa.string()),
            ("prompt_id", pa.string()),
            ("chosen", _MSG_LIST),
            ("rejected", _MSG_LIST),
            ("score_chosen", pa.float64()),
            ("score_rejected", pa.float64()),
            ("judge", pa.string()),
            ("chosen_model", pa.string()),
            ("rejected_model", pa.string()),
        ]
    ),
    "demo_rl_verl": pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", _MSG_LIST),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
        ]
    ),
}


def _shuffle(build: SourceBuild, rng: random.Random) -> dict[str, int]:
    """Shuffle the rows in place (planted rows end up scattered); return key -> row number."""
    rng.shuffle(build.entries)
    return {e.key: i for i, e in enumerate(build.entries)}


def _write(build: SourceBuild, out_dir: Path) -> None:
    """Write one source's rows in its container format."""
    path = out_dir / build.spec.path
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = build.spec.path
    if suffix.endswith(".parquet"):
        table = pa.Table.from_pylist([e.payload for e in build.entries], schema=PARQUET_SCHEMAS[build.spec.name])
        pq.write_table(
            table,
            path,
            compression="zstd",
            compression_level=3,
            use_dictionary=False,
            write_statistics=False,
            version="2.6",
            data_page_version="1.0",
            row_group_size=100_000,
        )
    elif suffix.endswith(".json"):
        rows = [e.payload for e in build.entries]
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    else:
        lines = [
            e.raw if e.raw is not None else json.dumps(e.payload, ensure_ascii=False).encode("utf-8")
            for e in build.entries
        ]
        if not all(line.strip() and b"\n" not in line for line in lines):
            raise ValueError(f"{path}: a JSONL row is blank or spans lines")
        data = b"\n".join(lines) + b"\n"
        if suffix.endswith(".gz"):
            data = gzip.compress(data, compresslevel=6, mtime=0)
        path.write_bytes(data)


def _registry_text(seed: int) -> str:
    """The ``sources.yaml`` text."""
    origin = f"generated by posttrain_assets.demo.generator (seed {seed})"
    return render_registry(
        ({**vars(s), "origin": origin} for s in SOURCES),
        [
            "Demo landing zone written by posttrain_assets.demo.generator. Paths are relative to this file;",
            "order = source priority.",
        ],
    )


def _final_reply_words(build: SourceBuild, entry: Entry) -> tuple[int, int] | None:
    """(chosen words, rejected words) of a well-formed preference row, else None."""
    if entry.reason is not None:
        return None
    p = entry.payload
    fmt = build.spec.format
    if fmt == "hh_rlhf":
        c, r = (p[k].rsplit("\n\nAssistant:", 1)[1] for k in ("chosen", "rejected"))
    elif fmt == "ultrafeedback" or isinstance(p["chosen"], list):
        c, r = p["chosen"][-1]["content"], p["rejected"][-1]["content"]
    else:
        c, r = p["chosen"], p["rejected"]
    return _words(c), _words(r)


def generate_demo_data(out_dir: Path, seed: int = 7) -> Path:
    """Write the demo landing zone, ``sources.yaml`` and ``manifest.json`` under ``out_dir``.

    Returns the path of the source registry. Same ``seed`` -> byte-identical files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    *builds_rl, contaminated = _build_rl(seed)
    builds: list[SourceBuild] = [*_build_sft(seed), *_build_preference(seed), *builds_rl]  # type: ignore[list-item]
    assert [b.spec for b in builds] == list(SOURCES)

    where: dict[str, tuple[str, str, int]] = {}  # entry key -> (source, file, row)
    for b in builds:
        for key, row in _shuffle(b, _rng(seed, f"shuffle:{b.spec.name}")).items():
            where[key] = (b.spec.name, b.spec.path, row)
        _write(b, out_dir)

    def ref(key: str) -> dict[str, Any]:
        source, file, row = where[key]
        return {"source": source, "file": file, "row": row}

    manifest_sources: dict[str, Any] = {}
    pref_stats: dict[str, Any] = {}
    for b in builds:
        malformed = sorted(
            (
                {"file": b.spec.path, "row": i, "reason": e.reason, "note": e.note}
                for i, e in enumerate(b.entries)
                if e.reason
            ),
            key=lambda m: m["row"],
        )
        manifest_sources[b.spec.name] = {
            "path": b.spec.path,
            "format": b.spec.format,
            "regime": b.spec.regime,
            "kind": b.spec.kind,
            "license": b.spec.license,
            "role": b.spec.role or "train",
            "rows": len(b.entries),
            "well_formed": len(b.entries) - len(malformed),
            "malformed": malformed,
        }
        if b.spec.regime == "preference":
            counts = [w for e in b.entries if (w := _final_reply_words(b, e)) is not None]
            longer = sum(1 for c, r in counts if c > r)
            pref_stats[b.spec.name] = {
                "pairs": len(counts),
                "chosen_longer": longer,
                "fraction": round(longer / len(counts), 4),
            }

    labels: dict[str, Any] = {}
    for b in builds:
        well_formed = [(i, e) for i, e in enumerate(b.entries) if e.reason is None]
        if b.spec.name == LENGTH_BIASED_SOURCE:
            judges: dict[str, dict[str, int]] = {}
            for _, e in well_formed:
                c, r = _final_reply_words(b, e)
                stats = judges.setdefault(e.payload["judge"], {"pairs": 0, "chosen_longer": 0})
                stats["pairs"] += 1
                stats["chosen_longer"] += int(c > r)
            labels[b.spec.name] = {"judges": dict(sorted(judges.items()))}
        elif b.spec.name == MULTI_RATER_SOURCE:
            against = [(i, sum(x["chosen"] < x["rejected"] for x in e.payload["ratings"])) for i, e in well_formed]
            labels[b.spec.name] = {
                "raters_per_pair": RATERS_PER_PAIR,
                "low_agreement_rows": [i for i, n in against if n >= 2],
                "one_dissent_rows": [i for i, n in against if n == 1],
            }

    exact = [
        {
            "kind": kind,
            "regime": b.spec.regime,
            "rows": sorted((ref(k) for k in keys), key=lambda r: (r["source"], r["row"])),
        }
        for b in builds
        for kind, keys in b.exact_groups
    ]
    near = [
        {
            **ref(dup),
            "of_row": where[orig][2],
            "edited_words": k,
            "total_words": total,
            "fraction": round(k / total, 4),
            "jaccard_5gram": round(jac, 4),
        }
        for b in builds
        for dup, orig, k, total, jac in b.near
    ]
    contam = [
        {**ref(dup), "eval_source": where[ev][0], "eval_file": where[ev][1], "eval_row": where[ev][2]}
        for dup, ev in contaminated
    ]
    manifest = {
        "seed": seed,
        "registry": "sources.yaml",
        "formats": sorted({s.format for s in SOURCES}),
        "sources": manifest_sources,
        "total_rows": sum(s["rows"] for s in manifest_sources.values()),
        "total_malformed": sum(len(s["malformed"]) for s in manifest_sources.values()),
        "exact_duplicates": exact,
        "exact_duplicate_surplus_rows": sum(len(g["rows"]) - 1 for g in exact),
        "near_duplicates": near,
        "contaminated": contam,
        "length_biased_source": LENGTH_BIASED_SOURCE,
        "preference_length_stats": pref_stats,
        "preference_labels": labels,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    registry = out_dir / "sources.yaml"
    registry.write_text(_registry_text(seed), encoding="utf-8")
    return registry


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python -m posttrain_assets.demo.generator OUT_DIR [--seed N]``."""
    parser = argparse.ArgumentParser(description="Write a seeded demo landing zone of post-training data.")
    parser.add_argument("out_dir", type=Path, help="directory to write into (created if missing)")
    parser.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    args = parser.parse_args(argv)
    registry = generate_demo_data(args.out_dir, seed=args.seed)
    manifest = json.loads((args.out_dir / "manifest.json").read_text(encoding="utf-8"))
    for spec in SOURCES:
        info = manifest["sources"][spec.name]
        print(f"{spec.name:26s} {info['path']:34s} rows={info['rows']:4d} malformed={len(info['malformed'])}")
    print(
        f"total rows={manifest['total_rows']} malformed={manifest['total_malformed']} "
        f"exact-dup groups={len(manifest['exact_duplicates'])} near-dups={len(manifest['near_duplicates'])} "
        f"contaminated={len(manifest['contaminated'])}"
    )
    print(f"registry: {registry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
