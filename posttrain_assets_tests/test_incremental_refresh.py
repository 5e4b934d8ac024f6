"""Issue 23's acceptance test: a warehouse refreshed after each change of its inputs holds exactly the tables a
fresh full build over the same inputs holds.

One warehouse ("incremental") lives through seven changes of its landing files, registry and config; after each
one it is refreshed on the same Dagster instance and DuckDB file (``pipeline.run_all``: every source re-ingested,
then refresh_corpus and publish), and every silver and gold table is compared with a full build in a new
warehouse over the same files, registry and config (:func:`compare_with_full_build`). Today every run rebuilds
everything, so the two agree by construction; once the refresh reuses per-row work, this is what proves the reuse
changes nothing. Each scenario also asserts the outcome its change must have (a displaced row, a contaminated
row, a threshold that clusters a pair), so no comparison passes on tables that did not move.

The scenarios are cumulative and run in file order; a scenario run alone first applies the changes before it
(:meth:`Incremental.advance_to`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import dagster as dg
import duckdb
import pytest

from posttrain_assets import pipeline
from posttrain_assets.cleaning.dedup import dedup_unit, shingles
from posttrain_assets.ingest.registry import render_registry
from posttrain_assets.publish.trace import TRACE_VIEW
from posttrain_assets.warehouse.catalogue import ALL_TABLES, BRONZE_RECORDS, CHECK_VERDICTS
from posttrain_assets_tests.graph import Graph, deployed
from posttrain_assets_tests.real_data import REAL_DATA

# Fifteen builds of the whole graph on a few hundred rows; `make test-fast` skips it.
pytestmark = pytest.mark.slow

# Columns that differ between two builds of the same inputs made at different times, excluded by name:
# bronze's ingested_at and run_id say when and by which Dagster run a partition was ingested; a check verdict's
# evaluated_at says when the check ran. Nothing else is excluded: created_at comes from the landing files' mtimes,
# which both builds read from the same files.
RUN_COLUMNS = {
    BRONZE_RECORDS.qualified: ("ingested_at", "run_id"),
    CHECK_VERDICTS.qualified: ("evaluated_at",),
}
# Every silver and gold table, bronze (its data, not its run columns), the provenance view publish builds over
# gold, and the check verdicts the dataset cards are written from.
COMPARED_TABLES = (
    *(t.qualified for t in ALL_TABLES),
    TRACE_VIEW,
    CHECK_VERDICTS.qualified,
)
PROVENANCE = ("source", "file_path", "row_number", "record_sha256")
EXISTING_RELATIONS = (
    "SELECT table_schema || '.' || table_name FROM information_schema.tables WHERE table_catalog = current_database()"
)

# The cleaning pass's run config with the dedup threshold of scenario 7 (CleaningPassConfig.jaccard_threshold;
# default 0.7).
LOWERED_THRESHOLD = 0.5
LOWERED_THRESHOLD_CONFIG = {"ops": {"silver_canonical": {"config": {"jaccard_threshold": LOWERED_THRESHOLD}}}}

# alpaca_tail's last row: quarantined at parse (empty_content), so silver.quarantine has rows from the first build.
EMPTY_OUTPUT_ROW = {"instruction": "Say nothing at all.", "input": "", "output": ""}

# Two short alpaca rows (dedup units under the 40 words of the edit rule, so only the shingle Jaccard rule
# decides) that differ in one word in the middle: 5-word shingle Jaccard 18/28 = 0.64, between 0.5 and 0.7.
THRESHOLD_PAIR = (
    {
        "instruction": "Write one calm sentence about the autumn rain falling slowly on the old stone bridge.",
        "input": "",
        "output": "Soft rain settles on the ancient stones while the quiet village sleeps.",
    },
    {
        "instruction": "Write one calm sentence about the autumn rain falling gently on the old stone bridge.",
        "input": "",
        "output": "Soft rain settles on the ancient stones while the quiet village sleeps.",
    },
)


# ---------------------------------------------------------------------------------------------------------------
# snapshots and the comparison
# ---------------------------------------------------------------------------------------------------------------


class Rows(NamedTuple):
    """One table's rows in a fixed order, with its column names (for the failure message)."""

    columns: tuple[str, ...]
    rows: list[tuple]


Snapshot = dict[str, Rows | None]


def _rows(graph: Graph, sql: str, params: dict[str, Any] | None = None) -> Rows:
    with duckdb.connect(str(graph.database), read_only=True) as conn:
        cursor = conn.execute(sql, params)
        rows = cursor.fetchall()
        return Rows(tuple(d[0] for d in cursor.description), rows)


def snapshot(graph: Graph) -> Snapshot:
    """Every compared table's rows, ordered by all columns (run columns excluded); None for a table not there.
    Bronze whole: a source removed from the registry leaves no rows in it (pipeline.run_all drops them)."""
    existing = {name for (name,) in graph.query(EXISTING_RELATIONS)}
    tables: Snapshot = {}
    for name in COMPARED_TABLES:
        if name not in existing:
            tables[name] = None
            continue
        excluded = RUN_COLUMNS.get(name)
        columns = f"* EXCLUDE ({', '.join(excluded)})" if excluded else "*"
        tables[name] = _rows(graph, f"SELECT {columns} FROM {name} ORDER BY ALL")
    tables.update(exports_snapshot(graph.database.parent / "exports"))
    return tables


def exports_snapshot(exports: Path) -> Snapshot:
    """publish's trainer files, as ``exports/<path>`` -> their lines (data files: their sha256).

    The build time is left out by name: the manifest's ``created_at`` and each dataset card's ``- created:`` line,
    and so the cards' sha256 and size in the manifest. Everything else is compared as written.
    """
    files: Snapshot = {}
    for path in sorted(p for p in exports.rglob("*") if p.is_file()):
        relative = path.relative_to(exports).as_posix()
        if path.name == "manifest.json":
            manifest = json.loads(path.read_text(encoding="utf-8"))
            del manifest["created_at"]
            for export in manifest["exports"]:
                for entry in export.get("files", []):
                    if entry["path"].endswith("README.md"):
                        del entry["sha256"], entry["bytes"]
            lines = json.dumps(manifest, indent=1, sort_keys=True).splitlines()
        elif path.name == "README.md":
            lines = [
                line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("- created: ")
            ]
        elif path.suffix in (".jsonl", ".py"):
            lines = path.read_text(encoding="utf-8").splitlines()
        else:
            lines = [hashlib.sha256(path.read_bytes()).hexdigest()]
        files[f"exports/{relative}"] = Rows(("line",), [(line,) for line in lines])
    return files


def _differences(name: str, incremental: Rows | None, full: Rows | None, shown: int = 3) -> str:
    """What differs in one table, readably: the columns whose values differ, then the first rows only one side
    has, each as its first three columns and the differing ones (long values cut)."""
    if incremental is None or full is None:
        return f"{name}: exists in the {'full build' if incremental is None else 'incremental warehouse'} only"
    if incremental.columns != full.columns:
        return f"{name}: columns differ: incremental {incremental.columns}, full build {full.columns}"
    columns = full.columns
    differing = [
        column
        for i, column in enumerate(columns)
        if Counter(repr(r[i]) for r in incremental.rows) != Counter(repr(r[i]) for r in full.rows)
    ]
    shown_columns = [i for i, column in enumerate(columns) if i < 3 or column in differing]

    def brief(row: tuple) -> str:
        return ", ".join(f"{columns[i]}={repr(row[i])[:160]}" for i in shown_columns)

    # rows hold lists and structs (unhashable): counted by their repr, shown as the rows themselves
    row_of = {repr(row): row for row in (*incremental.rows, *full.rows)}
    left, right = Counter(map(repr, incremental.rows)), Counter(map(repr, full.rows))
    only_incremental = [row_of[key] for key in (left - right).elements()]
    only_full = [row_of[key] for key in (right - left).elements()]
    lines = [
        f"{name}: {len(incremental.rows)} rows incremental, {len(full.rows)} full; {len(only_incremental)} only "
        f"incremental, {len(only_full)} only in the full build; columns that differ: {', '.join(differing) or '-'}"
    ]
    lines += [f"  incremental only: {brief(row)}" for row in only_incremental[:shown]]
    lines += [f"  full build only:  {brief(row)}" for row in only_full[:shown]]
    return "\n".join(lines)


def assert_same_tables(incremental: Snapshot, full: Snapshot) -> None:
    """Table by table equality; the failure names every differing table and shows its first differing rows."""
    differing = [name for name in incremental.keys() | full.keys() if incremental.get(name) != full.get(name)]
    assert not differing, "tables differ from a full build:\n" + "\n".join(
        _differences(name, incremental.get(name), full.get(name)) for name in sorted(differing)
    )


def _run_all(graph: Graph, refresh_run_config: dict | None) -> None:
    pipeline.run_all(graph.instance, graph.definitions, refresh_run_config=refresh_run_config)


@dataclass
class Comparison:
    """The two warehouses after one change, for the scenario's own assertions: their snapshots, and the metadata
    of each silver and gold materialisation of the incremental refresh (where a refresh says what it recomputed
    and what it reused)."""

    incremental: Snapshot
    full: Snapshot
    incremental_metadata: dict[str, dict[str, Any]]


def materialisation_metadata(graph: Graph) -> dict[str, dict[str, Any]]:
    """``schema.table`` -> the metadata values of its latest materialisation, for every silver and gold asset."""
    metadata = {}
    for table in ALL_TABLES:
        if table.schema not in ("silver", "gold"):
            continue
        event = graph.instance.get_latest_materialization_event(dg.AssetKey([table.schema, table.name]))
        if event is not None and event.asset_materialization is not None:
            metadata[table.qualified] = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    return metadata


def compare_with_full_build(
    incremental: Graph, workdir: Path, cache_dir: Path, refresh_run_config: dict | None = None
) -> Comparison:
    """Refresh ``incremental`` in place, build a fresh warehouse under ``workdir`` from the same registry, files
    and refresh config, and assert their tables are identical.

    Both builds run one after the other over the same files, so they read the same bytes and mtimes.
    """
    _run_all(incremental, refresh_run_config)
    incremental_tables = snapshot(incremental)
    incremental_metadata = materialisation_metadata(incremental)
    # deployed() points the environment at the fresh warehouse and back at the incremental one on exit.
    with deployed(incremental.registry, workdir, cache_dir) as full:
        _run_all(full, refresh_run_config)
        full_tables = snapshot(full)
        full_metadata = materialisation_metadata(full)
    # the fresh build is a full build: it had nothing to reuse (rows_reused/<stage>, docs/incremental.md)
    reused = {f"{table} {key}": value for table, m in full_metadata.items() for key, value in m.items()}
    assert {k: v for k, v in reused.items() if " rows_reused/" in k and v} == {}
    assert_same_tables(incremental_tables, full_tables)
    return Comparison(incremental_tables, full_tables, incremental_metadata)


# ---------------------------------------------------------------------------------------------------------------
# the landing folder and its changes
# ---------------------------------------------------------------------------------------------------------------


def _alpaca_rows() -> list[dict[str, str]]:
    return json.loads((REAL_DATA / "alpaca" / "alpaca_data_cleaned_1000.json").read_text(encoding="utf-8"))


def _jsonl(path: Path) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


ALPACA = _alpaca_rows()
GSM8K_TRAIN = _jsonl(REAL_DATA / "gsm8k" / "train.jsonl")
GSM8K_TEST = _jsonl(REAL_DATA / "gsm8k" / "test.jsonl")
HH_RLHF = _jsonl(REAL_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz")
FASTCHAT = json.loads((REAL_DATA / "fastchat" / "dummy_conversation.json").read_text(encoding="utf-8"))

# The one registry entry (highest priority) scenario 1 adds and scenario 4 removes.
PRIORITY_SOURCE = {
    "name": "alpaca_priority",
    "path": "alpaca/priority.json",
    "format": "alpaca",
    "license": "CC-BY-NC-4.0",
    "origin": "lm-sys/FastChat@04a1074d:data/alpaca_data_cleaned_1000.json",
    "kind": "ai",
}
EVAL_SOURCE = {
    "name": "gsm8k_eval",
    "path": "gsm8k/eval.jsonl",
    "format": "gsm8k",
    "license": "MIT",
    "origin": "openai/grade-school-math@3101c7d5:grade_school_math/data/test.jsonl",
    "kind": "human",
    "role": "eval",
}
# The rows of alpaca/priority.json: exact copies of alpaca_main's rows 0-2 (they displace them), then new rows.
PRIORITY_COPIES = (0, 1, 2)
# alpaca_main's row that scenario 3 rewrites, and the alpaca_tail row that scenario 6's new alpaca_main row
# (a near duplicate) displaces.
MODIFIED_ROW = 5
DISPLACED_TAIL_ROW = 4
# gsm8k training rows scenario 5 copies into the eval file: (file, row).
CONTAMINATED = (("train-000.jsonl", 3), ("train-001.jsonl", 1))


@dataclass
class Landing:
    """The landing folder under tmp: the registry file and the files it names. Every write gets a new mtime
    (created_at comes from it), one second later than the last, so a rewritten file is visibly newer."""

    root: Path
    entries: list[dict[str, str]] = field(default_factory=list)
    clock: int = 1_750_000_000

    @property
    def registry(self) -> Path:
        return self.root / "sources.yaml"

    def write_registry(self) -> None:
        self.registry.write_text(render_registry(self.entries), encoding="utf-8")

    def write(self, relative: str, text: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.clock += 1
        os.utime(path, (self.clock, self.clock))
        return path

    def write_json(self, relative: str, rows: list[dict[str, Any]]) -> Path:
        return self.write(relative, json.dumps(rows, ensure_ascii=False, indent=1))

    def write_jsonl(self, relative: str, lines: list[str]) -> Path:
        return self.write(relative, "".join(f"{line}\n" for line in lines))

    def read_json(self, relative: str) -> list[dict[str, Any]]:
        return json.loads((self.root / relative).read_text(encoding="utf-8"))


def initial_landing(root: Path) -> Landing:
    """Five sources of every regime, a few dozen real rows each, in priority order: alpaca_main (sft, JSON
    array), gsm8k_train (rl, a glob over JSONL files), hh_pref (preference, gzipped JSONL), fastchat (sft,
    sharegpt: FastChat's identity chats, many near duplicates of each other), alpaca_tail (sft, with the
    threshold pair of scenario 7)."""
    landing = Landing(root)
    landing.write_json("alpaca/main.json", ALPACA[0:30])
    landing.write_jsonl("gsm8k/train-000.jsonl", GSM8K_TRAIN[0:20])
    hh = landing.root / "hh" / "pref.jsonl.gz"
    hh.parent.mkdir(parents=True, exist_ok=True)
    hh.write_bytes(gzip.compress("".join(f"{line}\n" for line in HH_RLHF[0:30]).encode(), mtime=0))
    os.utime(hh, (landing.clock, landing.clock))
    landing.write_json("fastchat/dummy.json", FASTCHAT[0:40])
    landing.write_json("alpaca/tail.json", [*ALPACA[30:50], *THRESHOLD_PAIR, EMPTY_OUTPUT_ROW])
    real = "lm-sys/FastChat@04a1074d:data/alpaca_data_cleaned_1000.json"
    landing.entries = [
        {"name": "alpaca_main", "path": "alpaca/main.json", "format": "alpaca", "license": "CC-BY-NC-4.0",
         "origin": real, "kind": "ai"},
        {"name": "gsm8k_train", "path": "gsm8k/train-*.jsonl", "format": "gsm8k", "license": "MIT",
         "origin": "openai/grade-school-math@3101c7d5:grade_school_math/data/train.jsonl", "kind": "human"},
        {"name": "hh_pref", "path": "hh/pref.jsonl.gz", "format": "hh_rlhf", "license": "MIT",
         "origin": "anthropics/hh-rlhf@354e5c3c:harmless-base/test.jsonl.gz", "kind": "human"},
        {"name": "fastchat", "path": "fastchat/dummy.json", "format": "sharegpt", "license": "Apache-2.0",
         "origin": "lm-sys/FastChat@0e6d3e4b:data/dummy_conversation.json", "kind": "human"},
        {"name": "alpaca_tail", "path": "alpaca/tail.json", "format": "alpaca", "license": "CC-BY-NC-4.0",
         "origin": real, "kind": "ai"},
    ]  # fmt: skip
    landing.write_registry()
    return landing


def add_source(landing: Landing) -> None:
    """1. A new source, first in the registry: exact copies of three alpaca_main rows, then ten new rows."""
    landing.write_json("alpaca/priority.json", [ALPACA[i] for i in PRIORITY_COPIES] + ALPACA[50:60])
    landing.entries.insert(0, PRIORITY_SOURCE)
    landing.write_registry()


def add_file_to_glob(landing: Landing) -> None:
    """2. A second file matching gsm8k_train's glob."""
    landing.write_jsonl("gsm8k/train-001.jsonl", GSM8K_TRAIN[20:35])


def modify_one_row(landing: Landing) -> None:
    """3. One row of alpaca_main rewritten (its answer), the others unchanged (the file gets a new mtime)."""
    rows = landing.read_json("alpaca/main.json")
    rows[MODIFIED_ROW] = {**rows[MODIFIED_ROW], "output": rows[MODIFIED_ROW]["output"] + " In short: it depends."}
    landing.write_json("alpaca/main.json", rows)


def delete_source(landing: Landing) -> None:
    """4. alpaca_priority leaves the registry (its file stays on disk, unread)."""
    landing.entries = [e for e in landing.entries if e["name"] != PRIORITY_SOURCE["name"]]
    landing.write_registry()


def add_contaminating_eval_source(landing: Landing) -> None:
    """5. An eval source: ten GSM8K test rows and two training rows copied verbatim (question and answer)."""
    copied = [_gsm8k_line(file, row) for file, row in CONTAMINATED]
    landing.write_jsonl("gsm8k/eval.jsonl", GSM8K_TEST[0:10] + copied)
    landing.entries.append(EVAL_SOURCE)
    landing.write_registry()


def _gsm8k_line(file: str, row: int) -> str:
    offset = {"train-000.jsonl": 0, "train-001.jsonl": 20}[file]
    return GSM8K_TRAIN[offset + row]


def displacing_row() -> dict[str, str]:
    """alpaca_tail's row DISPLACED_TAIL_ROW with one word of its answer changed: a near duplicate (edit rule)."""
    original = ALPACA[30 + DISPLACED_TAIL_ROW]
    words = original["output"].split(" ")
    words[len(words) // 2] = "notably"
    return {**original, "output": " ".join(words)}


def add_displacing_row(landing: Landing) -> None:
    """6. A row appended to alpaca_main (now the first source) that is a near duplicate of a kept alpaca_tail
    row: the kept rule prefers the higher-priority source, so the old kept row becomes a dropped member."""
    rows = landing.read_json("alpaca/main.json")
    landing.write_json("alpaca/main.json", [*rows, displacing_row()])


def change_threshold(landing: Landing) -> None:
    """7. No file changes: the refresh runs with the dedup threshold lowered (LOWERED_THRESHOLD_CONFIG)."""


CHANGES: tuple[Callable[[Landing], None], ...] = (
    add_source,
    add_file_to_glob,
    modify_one_row,
    delete_source,
    add_contaminating_eval_source,
    add_displacing_row,
    change_threshold,
)


@dataclass
class Incremental:
    """The incremental warehouse and its landing folder, with the changes applied so far."""

    graph: Graph
    landing: Landing
    workdir: Path
    cache_dir: Path
    applied: int = 0
    before: Snapshot = field(default_factory=dict)

    def advance_to(self, scenario: int) -> None:
        """Apply the changes before ``scenario`` that are not applied yet (refreshing once after them), then
        ``scenario``'s own change; remembers the tables as they were before it."""
        if self.applied < scenario - 1:
            for change in CHANGES[self.applied : scenario - 1]:
                change(self.landing)
            _run_all(self.graph, None)
        self.before = snapshot(self.graph)
        CHANGES[scenario - 1](self.landing)
        self.applied = scenario

    def compare(self, refresh_run_config: dict | None = None) -> Comparison:
        return compare_with_full_build(
            self.graph, self.workdir / f"full_{self.applied}", self.cache_dir, refresh_run_config
        )

    def query(self, sql: str, params: Any = None) -> list[tuple]:
        return self.graph.query(sql, params)


@pytest.fixture(scope="module")
def incremental(tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path) -> Iterator[Incremental]:
    workdir = tmp_path_factory.mktemp("incremental_refresh")
    landing = initial_landing(workdir / "landing")
    with deployed(landing.registry, workdir / "incremental", tokenizer_cache_dir) as graph:
        _run_all(graph, None)
        yield Incremental(graph, landing, workdir, tokenizer_cache_dir)


def _count(state: Incremental, sql: str, params: Any = None) -> int:
    return state.query(sql, params)[0][0]


POPULATED_TABLES = (
    "silver.records",
    "silver.quarantine",
    "silver.dedup_clusters",
    "silver.sft_tokenized",
    "silver.preference_pairs",
    "gold.sft",
    "gold.preference_length_balanced",
    "gold.rl_prompts",
)


def _assert_populated(state: Incremental) -> None:
    """The comparison is not over empty tables: each kind of outcome has rows (eval rows from scenario 5 on)."""
    tables = (*POPULATED_TABLES, "silver.eval_records") if state.applied >= 5 else POPULATED_TABLES
    for table in tables:
        assert _count(state, f"SELECT count(*) FROM {table}") > 0, table


# ---------------------------------------------------------------------------------------------------------------
# the scenarios, in order
# ---------------------------------------------------------------------------------------------------------------


def test_1_add_a_source(incremental: Incremental) -> None:
    incremental.advance_to(1)
    comparison = incremental.compare()
    _assert_populated(incremental)
    # the refresh's own account of silver.records matches the table it left (where per-stage "computed vs reused"
    # counts will be read from)
    records = comparison.incremental["silver.records"]
    assert records is not None
    assert comparison.incremental_metadata["silver.records"]["dagster/row_count"] == len(records.rows)
    # The new first source's exact copies displaced alpaca_main's rows 0-2 (same content id).
    displaced = incremental.query(
        "SELECT row_number, method FROM silver.dedup_clusters WHERE source = 'alpaca_main' AND row_number < 3 "
        "ORDER BY ALL"
    )
    assert displaced == [(0, "exact"), (1, "exact"), (2, "exact")]
    assert _count(incremental, "SELECT count(*) FROM silver.records WHERE source = 'alpaca_priority'") == 13
    assert _count(incremental, "SELECT count(*) FROM gold.sft WHERE source = 'alpaca_priority'") == 13


def test_2_add_a_file_to_a_glob(incremental: Incremental) -> None:
    incremental.advance_to(2)
    incremental.compare()
    _assert_populated(incremental)
    files = incremental.query(
        "SELECT regexp_extract(file_path, '[^/]+$'), count(*) FROM bronze.records WHERE source = 'gsm8k_train' "
        "GROUP BY ALL ORDER BY ALL"
    )
    assert files == [("train-000.jsonl", 20), ("train-001.jsonl", 15)]
    assert _count(incremental, "SELECT count(*) FROM gold.rl_prompts WHERE source = 'gsm8k_train'") == 35


def test_3_modify_one_row_of_a_file(incremental: Incremental) -> None:
    incremental.advance_to(3)
    comparison = incremental.compare()
    _assert_populated(incremental)
    # The refresh parsed and gated the one changed row and reused the others.
    records = comparison.incremental_metadata["silver.records"]
    assert records["rows_computed/normalise_and_gate"] == 1
    assert records["rows_reused/normalise_and_gate"] > 100
    (response,) = incremental.query(
        "SELECT response FROM silver.records WHERE source = 'alpaca_main' AND origin.row = ?", [MODIFIED_ROW]
    )[0]
    assert response.endswith(" In short: it depends.")
    # The row's old content id is gone everywhere it was.
    before = incremental.before["silver.records"]
    old_ids = {r[0] for r in before.rows if r[1] == "alpaca_main"} if before else set()
    new_ids = {r for (r,) in incremental.query("SELECT id FROM silver.records WHERE source = 'alpaca_main'")}
    assert len(old_ids - new_ids) == 1 and len(new_ids - old_ids) == 1


def test_4_delete_a_source(incremental: Incremental) -> None:
    incremental.advance_to(4)
    incremental.compare()
    _assert_populated(incremental)
    assert _count(incremental, "SELECT count(*) FROM silver.records WHERE source = 'alpaca_priority'") == 0
    assert _count(incremental, "SELECT count(*) FROM gold.sft WHERE source = 'alpaca_priority'") == 0
    assert _count(incremental, "SELECT count(*) FROM bronze.records WHERE source = 'alpaca_priority'") == 0
    # The rows alpaca_priority had displaced are kept again.
    promoted = incremental.query(
        "SELECT origin.row FROM silver.records WHERE source = 'alpaca_main' AND origin.row < 3 ORDER BY 1"
    )
    assert promoted == [(0,), (1,), (2,)]
    assert _count(incremental, "SELECT count(*) FROM silver.dedup_clusters WHERE source = 'alpaca_main'") == 0


def test_5_add_an_eval_source_that_contaminates_training_rows(incremental: Incremental) -> None:
    incremental.advance_to(5)
    comparison = incremental.compare()
    _assert_populated(incremental)
    contaminated = incremental.query(
        "SELECT regexp_extract(file_path, '[^/]+$'), row_number, stage, reason FROM silver.quarantine "
        "WHERE source = 'gsm8k_train' ORDER BY ALL"
    )
    expected = [(file, row, "decontamination", "contaminated") for file, row in CONTAMINATED]
    assert contaminated == expected
    # the same rows, with the same reason, in the full build's quarantine (compared whole above too)
    quarantine = comparison.full["silver.quarantine"]
    assert quarantine is not None and quarantine.columns[:7] == (*PROVENANCE, "id", "stage", "reason")
    in_full = sorted((r[1].rsplit("/", 1)[1], r[2], r[5], r[6]) for r in quarantine.rows if r[0] == "gsm8k_train")
    assert in_full == expected
    assert _count(incremental, "SELECT count(*) FROM silver.eval_records WHERE source = 'gsm8k_eval'") == 12
    assert _count(incremental, "SELECT count(*) FROM gold.rl_prompts WHERE source = 'gsm8k_train'") == 33


def test_6_add_a_row_that_displaces_a_kept_duplicate(incremental: Incremental) -> None:
    previously_kept = incremental.query(
        "SELECT id FROM silver.records WHERE source = 'alpaca_tail' AND origin.row = ?", [DISPLACED_TAIL_ROW]
    )
    assert len(previously_kept) == 1  # before the change, alpaca_tail's row is the kept one
    incremental.advance_to(6)
    incremental.compare()
    _assert_populated(incremental)
    new_rows = incremental.query(
        "SELECT id, origin.row FROM silver.records WHERE source = 'alpaca_main' ORDER BY origin.row DESC LIMIT 1"
    )
    ((new_id, new_row),) = new_rows
    assert new_row == 30
    members = incremental.query(
        "SELECT member_id, kept_id, method FROM silver.dedup_clusters WHERE source = 'alpaca_tail' AND row_number = ?",
        [DISPLACED_TAIL_ROW],
    )
    assert members == [(previously_kept[0][0], new_id, "near")]
    assert _count(incremental, "SELECT count(*) FROM gold.sft WHERE id = ?", [previously_kept[0][0]]) == 0
    assert _count(incremental, "SELECT count(*) FROM gold.sft WHERE id = ?", [new_id]) == 1


def _threshold_pair_rows(state: Incremental) -> dict[int, tuple[str, bool]]:
    """alpaca_tail's two threshold rows: row -> (id, dropped as a near duplicate)."""
    first = 20  # after ALPACA[30:50]
    rows = state.query(
        "SELECT b.row_number, coalesce(r.id, d.member_id), d.member_id IS NOT NULL FROM bronze.records b "
        "LEFT JOIN silver.records r ON r.source = b.source AND r.origin.row = b.row_number "
        "LEFT JOIN silver.dedup_clusters d ON d.source = b.source AND d.row_number = b.row_number "
        "WHERE b.source = 'alpaca_tail' AND b.row_number IN (?, ?) ORDER BY 1",
        [first, first + 1],
    )
    return {row: (record_id, dropped) for row, record_id, dropped in rows}


def test_7_change_the_dedup_threshold(incremental: Incremental) -> None:
    incremental.advance_to(7)
    # The pair is really between the two thresholds, measured on its dedup units as silver stored them.
    units = [
        dedup_unit({"regime": "sft", "messages": messages})
        for (messages,) in incremental.query(
            "SELECT messages FROM silver.records WHERE source = 'alpaca_tail' AND origin.row IN (20, 21) "
            "ORDER BY origin.row"
        )
    ]
    assert len(units) == 2 and all(len(u.split()) < 40 for u in units)
    a, b = (set(shingles(u, 5)) for u in units)
    assert LOWERED_THRESHOLD < len(a & b) / len(a | b) < 0.7
    # At the default threshold neither is dropped.
    assert [dropped for _, dropped in _threshold_pair_rows(incremental).values()] == [False, False]

    comparison = incremental.compare(LOWERED_THRESHOLD_CONFIG)
    _assert_populated(incremental)
    # No row changed, so nothing was parsed again; the threshold is part of the pair verdicts' key, so the
    # candidate pairs were verified again.
    records = comparison.incremental_metadata["silver.records"]
    assert records["rows_computed/normalise_and_gate"] == 0
    assert records["rows_computed/near_dedup_pairs"] > 0
    pair = _threshold_pair_rows(incremental)
    assert [dropped for _, dropped in pair.values()] == [False, True]
    kept_id, member_id = pair[20][0], pair[21][0]
    assert incremental.query(
        "SELECT kept_id, method FROM silver.dedup_clusters WHERE member_id = ? AND source = 'alpaca_tail'",
        [member_id],
    ) == [(kept_id, "near")]
