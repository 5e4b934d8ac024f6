"""Fuzz: generated malformed rows and damaged files of every input format, in every container, go through the
readers, bronze ingestion and the silver pass (driven directly, without Dagster). The pass always completes and
every bronze row is accounted for: in silver, eval, quarantine with a known reason, or a dedup cluster.

Hypothesis draws one landing file per input format (ADAPTERS) per example, each in one of the containers the
readers know (JSONL, JSON array, both optionally gzipped, Parquet), with rows that are valid, mutated, random JSON,
random bytes, nested past the depth limit, over the byte limit or behind a byte order mark, and files that are
truncated, have a byte flipped, are empty or carry trailing garbage. The readers' chunk size is drawn too, so rows
and elements cross chunk edges. Derandomized with a bounded number of examples: CI runs the same examples each time.
"""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from posttrain_assets.cleaning.quality import QUALITY_REASONS
from posttrain_assets.cleaning.silver_pass import CleaningConfig, run_silver_pass
from posttrain_assets.ingest import readers
from posttrain_assets.ingest.registry import Registry, Source
from posttrain_assets.records.formats import ADAPTERS
from posttrain_assets.records.schema import MAX_JSON_DEPTH, REASONS
from posttrain_assets.warehouse.validation import account_sources
from posttrain_assets_tests.ingest.test_malformed_input import CREATED, ingest

MAX_ROW_BYTES = 8192  # small, so rows over it are cheap to generate (deep rows stay under it)
CONTAINERS = ("jsonl", "jsonl.gz", "json", "json.gz", "parquet")
DAMAGE = ("none", "none", "none", "truncate", "flip_byte", "empty", "trailing_garbage")
# every reason a silver.quarantine row may carry (docs/tables.md)
KNOWN_REASONS = {*REASONS, *QUALITY_REASONS, "contaminated", "cross_regime_leak"}


def _turns(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {text}?"}, {"role": "assistant", "content": f"Answer {text}."}]


# A valid row of each format around a text (RL formats with a gold answer).
VALID: dict[str, Callable[[str], dict[str, Any]]] = {
    "messages": lambda t: {"messages": _turns(t)},
    "sharegpt": lambda t: {"conversations": [{"from": "human", "value": f"Q {t}"}, {"from": "gpt", "value": f"A {t}"}]},
    "hermes": lambda t: {
        "conversations": [
            {"from": "system", "value": '<tools> {"name": "look", "parameters": {"type": "object"}} </tools>'},
            {"from": "human", "value": f"Q {t}"},
            {"from": "gpt", "value": '<tool_call>\n{"name": "look", "arguments": {}}\n</tool_call>'},
            {"from": "tool", "value": f'<tool_response>\n{{"name": "look", "content": "{t}"}}\n</tool_response>'},
            {"from": "gpt", "value": f"A {t}"},
        ]
    },
    "alpaca": lambda t: {"instruction": f"Explain {t}", "input": "", "output": f"It is {t}."},
    "trl_preference": lambda t: {"prompt": f"Which {t}?", "chosen": f"This {t}.", "rejected": "No."},
    "ultrafeedback": lambda t: {
        "prompt": f"Say {t}",
        "chosen": [{"role": "user", "content": f"Say {t}"}, {"role": "assistant", "content": f"{t} indeed"}],
        "rejected": [{"role": "user", "content": f"Say {t}"}, {"role": "assistant", "content": "no"}],
        "score_chosen": 8,
        "score_rejected": 2,
    },
    "hh_rlhf": lambda t: {
        "chosen": f"\n\nHuman: Tell me {t}\n\nAssistant: Sure, {t}.",
        "rejected": f"\n\nHuman: Tell me {t}\n\nAssistant: Never.",
    },
    "gsm8k": lambda t: {"question": f"How many {t}?", "answer": f"Count {t}.\n#### 72"},
    "math": lambda t: {"problem": f"Compute {t}.", "solution": f"So {t} is $\\boxed{{3}}$.", "level": "Level 2"},
    "verl": lambda t: {
        "data_source": "fuzz",
        "prompt": [{"role": "user", "content": f"Solve {t}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "72"},
    },
    "humaneval": lambda t: {
        "task_id": "HumanEval/0",
        "prompt": f'def f():\n    """Return {t}."""\n',
        "canonical_solution": f"    return {t!r}\n",
        "test": f"def check(candidate):\n    assert candidate() == {t!r}\n",
        "entry_point": "f",
    },
}
assert set(VALID) == set(ADAPTERS), "every input format is fuzzed"

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=30).map(lambda t: "w" + t)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@dataclass(frozen=True)
class Row:
    """One generated row: its kind and text. ``expected`` is the canonical-stage verdict the kind must get."""

    kind: str
    text: str
    expected: str | None = None  # a quarantine reason, or "parsed" (never quarantined at stage canonical)


@st.composite
def rows_of(draw: st.DrawFn, fmt: str, container: str) -> list[Row]:
    kinds = ["valid", "mutated", "large"]
    if container != "parquet":  # Parquet rows are typed records: only valid, mutated and oversized ones
        kinds += ["json", "garbage", "deep", "shallow", "bom"]
    out = []
    for kind in draw(st.lists(st.sampled_from(kinds), max_size=6)):
        valid = VALID[fmt](draw(words))
        if kind == "valid":
            out.append(Row(kind, json.dumps(valid), "parsed"))
        elif kind == "mutated":  # a field dropped, or its value replaced by another of the same row or random JSON
            key = draw(st.sampled_from(sorted(valid)))
            value = None if container == "parquet" else draw(json_values)  # Parquet columns keep one type
            mutated = {k: v for k, v in valid.items() if k != key} if value is None else {**valid, key: value}
            if not mutated:  # a Parquet row has at least one column: the only field is null instead of dropped
                mutated = {key: None}
            out.append(Row(kind, json.dumps(mutated)))
        elif kind == "large":
            out.append(Row(kind, json.dumps(valid | {"note": "x" * MAX_ROW_BYTES}), "too_large"))
        elif kind == "json":
            out.append(Row(kind, json.dumps(draw(json_values), ensure_ascii=False)))
        elif kind == "garbage":
            raw = b"~" + draw(st.binary(max_size=40)).replace(b"\n", b" ")  # never a blank line
            out.append(Row(kind, raw.decode("latin-1")))  # bytes kept one per character, see _line
        elif kind in ("deep", "shallow"):
            # the row's object is one level: nested arrays deeper than MAX_JSON_DEPTH - 1 put it over the limit
            depth = draw(st.integers(MAX_JSON_DEPTH, 1500) if kind == "deep" else st.integers(1, MAX_JSON_DEPTH - 1))
            text = json.dumps(valid | {"nested": "__NESTED__"}).replace('"__NESTED__"', "[" * depth + "]" * depth)
            out.append(Row(kind, text, "too_deep" if kind == "deep" else None))
        else:  # bom: a valid row behind a byte order mark
            out.append(Row(kind, json.dumps(valid), "parsed"))
    return out


def _line(row: Row) -> bytes:
    if row.kind == "garbage":
        return row.text.encode("latin-1")
    return (b"\xef\xbb\xbf" if row.kind == "bom" else b"") + row.text.encode()


def file_bytes(container: str, rows: list[Row]) -> bytes:
    if container == "parquet":
        buffer = io.BytesIO()
        records = [json.loads(r.text) for r in rows]
        keys = dict.fromkeys(k for record in records for k in record)  # every row's keys (from_pylist: the first's)
        pq.write_table(pa.table({k: [record.get(k) for record in records] for k in keys}), buffer, row_group_size=3)
        return buffer.getvalue()
    if container.startswith("jsonl"):
        data = b"".join(_line(r) + b"\n" for r in rows)
    else:
        bom = b"\xef\xbb\xbf" if any(r.kind == "bom" for r in rows) else b""
        data = bom + b"[" + b",\n ".join(_line(r).removeprefix(b"\xef\xbb\xbf") for r in rows) + b"]"
    return gzip.compress(data, mtime=0) if container.endswith(".gz") else data


def damaged(data: bytes, damage: str, at: float) -> bytes:
    cut = int(len(data) * at)
    if damage == "truncate":
        return data[:cut]
    if damage == "flip_byte" and data:
        return data[:cut] + bytes([data[min(cut, len(data) - 1)] ^ 0xFF]) + data[cut + 1 :]
    if damage == "empty":
        return b""
    if damage == "trailing_garbage":
        return data + b"\x00garbage"
    return data


@dataclass(frozen=True)
class LandingFile:
    fmt: str
    container: str
    rows: list[Row]
    damage: str
    at: float

    @property
    def name(self) -> str:
        return f"{self.fmt}.{self.container}"

    def predictable(self) -> bool:
        """Whether row i of the list is bronze row i with its planted verdict: an intact file whose container keeps
        row numbers (an array with a non-JSON element is one broken row)."""
        if self.damage != "none":
            return False
        return (
            self.container.startswith("jsonl")
            or self.container == "parquet"
            or all(r.kind != "garbage" for r in self.rows)
        )


@st.composite
def landing_files(draw: st.DrawFn) -> list[LandingFile]:
    files = []
    for fmt in ADAPTERS:
        container = draw(st.sampled_from(CONTAINERS))
        rows = draw(rows_of(fmt, container))
        files.append(LandingFile(fmt, container, rows, draw(st.sampled_from(DAMAGE)), draw(st.floats(0.0, 1.0))))
    return files


@pytest.mark.slow  # 25 generated landing zones, each through ingest and the silver pass: about 17 s
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(files=landing_files(), chunk_bytes=st.integers(3, 64))
def test_malformed_rows_and_files_never_stop_the_pass_and_every_row_is_accounted_for(
    smollm2_tokenizer, files: list[LandingFile], chunk_bytes: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(readers, "_CHUNK_BYTES", chunk_bytes):
        base = Path(tmp)
        sources = []
        for f in files:
            (base / f.name).write_bytes(damaged(file_bytes(f.container, f.rows), f.damage, f.at))
            adapter = ADAPTERS[f.fmt]
            role = "eval" if f.fmt == "gsm8k" else "train"  # one evaluation source, so eval rows are placed too
            sources.append(Source(f.fmt, f.name, f.fmt, adapter.default_regime, "MIT", "fuzz", "human", role, base))
        registry = Registry(base / "sources.yaml", tuple(sources))
        with duckdb.connect(str(base / "warehouse.duckdb")) as conn:
            for source in registry.sources:
                ingest(conn, source.name, source.files())
            cfg = CleaningConfig(processes=1, max_row_bytes=MAX_ROW_BYTES)
            run_silver_pass(conn, registry, smollm2_tokenizer, lambda _path: CREATED, cfg)

            for account in account_sources(conn, registry.names):
                assert account.ingested and account.balanced, account
                assert account.bronze == account.silver + account.eval + account.quarantined + account.duplicates

            quarantine = conn.execute(
                "SELECT source, file_path, row_number, stage, reason, message FROM silver.quarantine"
            ).fetchall()
            canonical: dict[tuple[str, int], str] = {}
            for source, file_path, row_number, stage, reason, message in quarantine:
                assert reason in KNOWN_REASONS, reason
                assert message.startswith(f"{file_path}, row {row_number}"), message
                if stage == "canonical":
                    canonical[(source, row_number)] = reason
                event(f"quarantined: {reason}")  # pytest --hypothesis-show-statistics: what the examples reached

            bronze_rows = dict(conn.execute("SELECT source, count(*) FROM bronze.records GROUP BY source").fetchall())
            for f in files:
                if not f.predictable():
                    continue
                assert bronze_rows.get(f.fmt, 0) == len(f.rows), f.name
                for number, row in enumerate(f.rows):
                    verdict = canonical.get((f.fmt, number))
                    if row.expected == "parsed":
                        assert verdict is None, (f.name, number, row, verdict)
                    elif row.expected is not None:
                        assert verdict == row.expected, (f.name, number, row, verdict)
                    if row.kind == "shallow":  # within the depth limit: judged by the parser and the adapter
                        assert verdict != "too_deep", (f.name, number)
