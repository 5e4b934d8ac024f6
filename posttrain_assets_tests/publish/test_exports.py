"""Trainer-ready exports (``posttrain_assets.publish.exports``) read by real clients.

The whole graph runs once on the demo data; its gold tables are exported, loaded offline with Hugging Face
``datasets`` from the files, and prepared by TRL's own ``SFTTrainer`` and ``DPOTrainer`` (dataset preparation only,
on a tiny random model: nothing is trained). On the SFT export TRL's assistant mask, computed from a
``{% generation %}``-tagged copy of SmolLM2's ChatML template, must equal our labels position by position.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain_assets.demo.generator import generate_demo_data
from posttrain_assets.publish import exports
from posttrain_assets.publish.exports import (
    CARD_FILE,
    EMPTY_SHARD,
    EXPORTS,
    MANIFEST_FILE,
    PARQUET_OPTIONS,
    SHARD_DIR,
    ExportError,
    ExportManifest,
    export_gold,
    shard_files,
)
from posttrain_assets.sft.tokenizer import tokenizer_identity
from posttrain_assets.warehouse.catalogue import GOLD_SFT
from posttrain_assets.warehouse.io import fingerprint_table, trusted_fingerprints
from posttrain_assets.warehouse.model import Table
from posttrain_assets_tests.graph import deployed
from posttrain_assets_tests.sft.test_masking import CHATML_TAGGED

# TRL's own config still sets the deprecated transformers argument.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
# Tests marked slow read the demo graph's warehouse, built by one whole-graph run (about 17 s); the writers'
# pure parts are tested without it.

CREATED_AT = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
CHECKS = [
    {"name": "bronze_accounting_check", "asset": "silver/records", "passed": True, "description": "accounted"},
    {"name": "loss_mask_check", "asset": "silver/sft_tokenized", "passed": True, "description": "masks exact"},
    {"name": "gold_sft_schema_check", "asset": "gold/sft", "passed": True},
    {"name": "gold_preference_schema_check", "asset": "gold/preference", "passed": True},
    {
        "name": "gold_preference_length_balanced_schema_check",
        "asset": "gold/preference_length_balanced",
        "passed": True,
    },
    {"name": "gold_rl_prompts_schema_check", "asset": "gold/rl_prompts", "passed": True},
]

_WAREHOUSE: dict[str, Path] = {}


def demo_warehouse(tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path) -> Path:
    """The DuckDB file of one whole-graph run on the demo data, built once per session (test_trace uses it too).

    Tests that change it must work on a copy.
    """
    if "db" not in _WAREHOUSE:
        landing = tmp_path_factory.mktemp("exports_demo_landing")
        generate_demo_data(landing, seed=7)
        with deployed(
            landing / "sources.yaml", tmp_path_factory.mktemp("exports_demo_graph"), tokenizer_cache_dir
        ) as g:
            g.run_all()
            _WAREHOUSE["db"] = g.database
    return _WAREHOUSE["db"]


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory, tokenizer_cache_dir: Path) -> Path:
    return demo_warehouse(tmp_path_factory, tokenizer_cache_dir)


def _export(
    database: Path,
    out: Path,
    tok: Any,
    created_at: datetime = CREATED_AT,
    stat_cache: Path | None = None,
    rehash: bool = False,
) -> ExportManifest:
    with duckdb.connect(str(database), read_only=True) as conn:
        return export_gold(
            conn,
            out,
            tokenizer_identity=tokenizer_identity(tok),
            checks=CHECKS,
            created_at=created_at,
            stat_cache=stat_cache,
            rehash=rehash,
        )


@pytest.fixture(scope="module")
def exported(warehouse: Path, tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any) -> ExportManifest:
    return _export(warehouse, tmp_path_factory.mktemp("exports"), smollm2_tokenizer)


@dataclass(frozen=True)
class Offline:
    """The ``datasets`` module, switched offline, and a cache directory under tmp."""

    datasets: Any
    cache: Path

    def load(self, path: Path | list[Path], schema: pa.Schema | None = None) -> Any:
        """``load_dataset`` of an export folder (as its card declares it), or of a list of exported files (all
        ``.parquet`` or all ``.jsonl``: the ``parquet`` or ``json`` builder). JSON Lines carry no types: ``schema``
        gives them (a shard whose column is null throughout would otherwise be read as null-typed, and the next
        shard's values would not cast to it)."""
        if isinstance(path, Path):
            return self.datasets.load_dataset(str(path), split="train", cache_dir=str(self.cache))
        builder = "parquet" if path[0].suffix == ".parquet" else "json"
        files = {"train": [str(p) for p in path]}
        features = self.datasets.Features.from_arrow_schema(schema) if schema is not None else None
        return self.datasets.load_dataset(
            builder, data_files=files, split="train", cache_dir=str(self.cache), features=features
        )


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Offline]:
    """``datasets``, offline (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1), with its cache under tmp."""
    cache = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_HOME", str(cache))
        env.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
        import datasets
        import huggingface_hub.constants

        # Both libraries read these variables at import time; another test may have imported them first.
        env.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        env.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        env.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        datasets.disable_progress_bars()
        yield Offline(datasets, cache / "datasets")


def _gold(database: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(database), read_only=True) as conn:
        return conn.execute(sql).fetchall()


def _count(database: Path, table: str, where: str = "TRUE") -> int:
    return _gold(database, f"SELECT count(*) FROM {table} WHERE {where}")[0][0]


def _preference_exports(exported: ExportManifest) -> list[str]:
    names = [t.name for t in exported.tables if t.name.startswith("preference")]
    assert names, "no gold preference table was materialised"
    return names


# ---------------------------------------------------------------------------------------------------------------
# files, cards, determinism
# ---------------------------------------------------------------------------------------------------------------


def _shard_ids(path: Path, name: str) -> list[str]:
    """The gold ids of one Parquet shard, in file order."""
    column = pq.read_table(path).column("extra_info" if name == "rl" else "id").to_pylist()
    return [row["id"] for row in column] if name == "rl" else column


@pytest.mark.slow
def test_every_folder_has_a_shard_per_source_in_parquet_and_jsonl_and_a_card(
    exported: ExportManifest, warehouse: Path
) -> None:
    root = exported.out_dir
    # Every gold table that exists is exported (gold.preference is not while the length gate fails on it).
    names = {t.name for t in exported.tables}
    assert {"sft", "rl"} <= names and names & {"preference", "preference_length_balanced"}
    assert {spec.table for spec in EXPORTS} == {t.table for t in exported.tables} | set(exported.skipped)
    listed = json.loads((root / MANIFEST_FILE).read_text())["exports"]
    for table, entry in zip(exported.tables, listed, strict=True):
        assert table.rows == _count(warehouse, table.table) > 0
        # The demo sources are small: one shard per source, named after it, with that source's rows.
        by_source = dict(_gold(warehouse, f"SELECT source, count(*) FROM {table.table} GROUP BY ALL"))
        assert [(s.source, s.rows) for s in table.shards] == sorted(by_source.items())
        assert [s.name for s in table.shards] == [f"{source}-00000-of-00001" for source in sorted(by_source)]
        data = [f"{table.name}/{SHARD_DIR}/{s.name}{suffix}" for s in table.shards for suffix in (".parquet", ".jsonl")]
        extra = (exports.REWARD_FILE,) if table.name == "rl" else ()
        assert [f.path for f in table.files] == data + [f"{table.name}/{n}" for n in (*extra, CARD_FILE)]
        assert sorted(p.relative_to(root).as_posix() for p in (root / table.name / SHARD_DIR).iterdir()) == sorted(data)
        for shard in table.shards:
            parquet, jsonl = (root / path for path in shard.paths(table.name))
            ids = _shard_ids(parquet, table.name)
            assert ids == sorted(ids) and len(ids) == shard.rows  # each shard sorted by id
            of_source = _gold(warehouse, f"SELECT id FROM {table.table} WHERE source = '{shard.source}'")
            assert {i for (i,) in of_source} == set(ids)
            rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
            assert [r["extra_info"]["id"] if table.name == "rl" else r["id"] for r in rows] == ids
        assert sum(s.rows for s in table.shards) == table.rows
        # The manifest lists each shard (source, rows, fingerprint, files) and each file's sha256.
        assert entry["shards"] == [s.to_dict(table.name) for s in table.shards]
        assert [f["sha256"] for f in entry["files"]] == [f.sha256 for f in table.files]
        assert len({s["fingerprint"] for s in entry["shards"]}) == len(table.shards)


@pytest.mark.slow
def test_cards_name_rows_sources_licenses_checks_tokenizer_and_schema(
    exported: ExportManifest, smollm2_tokenizer: Any
) -> None:
    identity = tokenizer_identity(smollm2_tokenizer)
    for table in exported.tables:
        card = (exported.out_dir / table.name / CARD_FILE).read_text(encoding="utf-8")
        assert card.startswith("---\nconfigs:\n")
        assert f"- rows: {table.rows}\n" in card
        assert "- created: 2025-06-01T12:00:00+00:00\n" in card
        for key in ("name", "tokenizer_sha256", "chat_template_sha256"):
            assert identity[key] in card
        assert sum(s["rows"] for s in table.sources) == table.rows
        for source in table.sources:
            assert f"| `{source['source']}` | {source['rows']} | {source['kind']} | {source['license']} |" in card
        assert "| `loss_mask_check` | silver/sft_tokenized | passed | masks exact |" in card
        spec = next(s for s in EXPORTS if s.name == table.name)
        own = f"gold_{spec.table.split('.')[1]}_schema_check"
        assert f"`{own}`" in card
        assert card.count("_schema_check`") == 1  # another gold table's check is not on this card
        for field in spec.schema:
            assert f"| `{field.name}` |" in card
    licenses = {s["source"]: s["license"] for s in exported.table("sft").sources}
    assert licenses["demo_sft_alpaca"] == "CC-BY-NC-4.0"


@pytest.mark.slow
def test_reexporting_gives_identical_files_except_the_creation_time(
    warehouse: Path, exported: ExportManifest, tmp_path: Path, smollm2_tokenizer: Any
) -> None:
    again = _export(warehouse, tmp_path / "same", smollm2_tokenizer)
    later = _export(warehouse, tmp_path / "later", smollm2_tokenizer, datetime(2030, 1, 1, tzinfo=UTC))
    files = [f.path for t in exported.tables for f in t.files] + [MANIFEST_FILE]
    for name in files:
        original = (exported.out_dir / name).read_bytes()
        assert (tmp_path / "same" / name).read_bytes() == original, name
        changed = (tmp_path / "later" / name).read_bytes() != original
        assert changed == name.endswith((CARD_FILE, MANIFEST_FILE)), name
    assert again.to_dict() == exported.to_dict()
    assert later.created_at == "2030-01-01T00:00:00+00:00" != exported.created_at


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too), relative path -> bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _without_source(warehouse: Path, tmp_path: Path, table: str, source: str) -> Path:
    """A copy of the warehouse whose ``table`` lacks ``source``'s rows (what the warehouse was before that source
    was added), their stored row fingerprints deleted with them as io.sync_table deletes them."""
    database = tmp_path / f"without_{source}.duckdb"
    shutil.copy(warehouse, database)
    schema, name = table.split(".")
    with duckdb.connect(str(database)) as conn:
        conn.execute(
            f"DELETE FROM {fingerprint_table(Table(schema, name, '', ()))} "
            f"WHERE sync_key IN (SELECT id FROM {table} WHERE source = $source)",
            {"source": source},
        )
        conn.execute(f"DELETE FROM {table} WHERE source = $source", {"source": source})
    return database


def _shards_by_path(manifest: ExportManifest, name: str) -> dict[str, str]:
    return {shard.paths(name)[0]: shard.fingerprint for shard in manifest.table(name).shards}


@pytest.mark.slow
def test_shards_are_planned_from_the_gold_tables_stored_fingerprints_while_they_are_trusted(
    warehouse: Path, exported: ExportManifest, tmp_path: Path, smollm2_tokenizer: Any
) -> None:
    """An exported row is a function of its gold row, so a shard's fingerprint is read from gold's stored row
    fingerprints (kept by io.sync_table) instead of hashing input_ids and labels; a gold row changed through the
    sync (new fingerprint) rewrites its shard alone, byte for byte what a fresh export writes."""
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        assert trusted_fingerprints(conn, GOLD_SFT) is not None  # the demo build synced gold.sft
    database = tmp_path / "edited.duckdb"
    shutil.copy(warehouse, database)
    with duckdb.connect(str(database)) as conn:
        (row_id, source) = conn.execute("SELECT id, source FROM gold.sft ORDER BY id LIMIT 1").fetchone()
        conn.execute("UPDATE gold.sft SET num_tokens = num_tokens + 1 WHERE id = $id", {"id": row_id})
        side = fingerprint_table(GOLD_SFT)
        conn.execute(f"UPDATE {side} SET sync_fingerprint = sync_fingerprint + 1 WHERE sync_key = $id", {"id": row_id})
    out = tmp_path / "out"
    shutil.copytree(exported.out_dir, out)
    manifest = _export(database, out, smollm2_tokenizer)
    before, after = _shards_by_path(exported, "sft"), _shards_by_path(manifest, "sft")
    changed = [path for path in after if after[path] != before[path]]
    assert len(changed) == 1 and f"/{source}" in changed[0]
    assert {t.name: len(t.written) for t in manifest.tables if t.written} == {"sft": 2}  # its Parquet and JSONL
    _export(database, tmp_path / "fresh", smollm2_tokenizer)
    assert _tree(out) == _tree(tmp_path / "fresh")

    # edited outside the sync (fingerprints no longer agree with the rows): every row is hashed, the same files
    with duckdb.connect(str(database)) as conn:
        conn.execute(f"DELETE FROM {fingerprint_table(GOLD_SFT)} WHERE sync_key = $id", {"id": row_id})
        assert trusted_fingerprints(conn, GOLD_SFT) is None
    hashed = _export(database, tmp_path / "hashed", smollm2_tokenizer)

    def data_files(root: Path) -> dict[str, bytes]:
        return {path: data for path, data in _tree(root).items() if f"/{SHARD_DIR}/" in path}

    assert data_files(tmp_path / "hashed") == data_files(tmp_path / "fresh")
    assert _shards_by_path(hashed, "sft").keys() == after.keys()
    assert not set(_shards_by_path(hashed, "sft").values()) & set(after.values())  # the other basis


def _smallest_sft_source(warehouse: Path) -> str:
    return _gold(warehouse, "SELECT source FROM gold.sft GROUP BY source ORDER BY count(*), source LIMIT 1")[0][0]


@pytest.mark.slow
def test_a_second_export_with_no_change_writes_no_data_file(
    warehouse: Path, exported: ExportManifest, tmp_path: Path, smollm2_tokenizer: Any
) -> None:
    out = tmp_path / "out"
    shutil.copytree(exported.out_dir, out)
    before, mtimes = _tree(out), _mtimes(out)
    manifest = _export(warehouse, out, smollm2_tokenizer)
    assert [(t.name, t.written, t.rows_written) for t in manifest.tables] == [(t.name, (), 0) for t in exported.tables]
    assert _tree(out) == before
    assert _mtimes(out) == mtimes  # not even rewritten with the same bytes (cards and manifest neither)


@pytest.mark.slow
def test_a_new_source_writes_its_own_shard_only_and_the_files_equal_a_fresh_export(
    warehouse: Path, exported: ExportManifest, tmp_path: Path, smollm2_tokenizer: Any
) -> None:
    source = _smallest_sft_source(warehouse)
    out = tmp_path / "out"
    earlier = _export(_without_source(warehouse, tmp_path, "gold.sft", source), out, smollm2_tokenizer)
    assert source not in {s.source for s in earlier.table("sft").shards}
    data_mtimes = {k: v for k, v in _mtimes(out).items() if f"/{SHARD_DIR}/" in k}
    manifest = _export(warehouse, out, smollm2_tokenizer)  # the source arrives
    shard = next(s for s in manifest.table("sft").shards if s.source == source)
    assert {t.name: t.written for t in manifest.tables if t.written} == {"sft": shard.paths("sft")}
    assert manifest.table("sft").rows_written == shard.rows == _count(warehouse, "gold.sft", f"source = '{source}'")
    assert {k: v for k, v in _mtimes(out).items() if k in data_mtimes} == data_mtimes  # the others untouched
    assert _tree(out) == _tree(exported.out_dir)  # byte for byte a fresh export (the same created_at)
    assert manifest.to_dict() == exported.to_dict()


@pytest.mark.slow
def test_a_removed_source_deletes_its_shard_and_nothing_else_is_written(
    warehouse: Path, exported: ExportManifest, tmp_path: Path, smollm2_tokenizer: Any
) -> None:
    source = _smallest_sft_source(warehouse)
    out = tmp_path / "out"
    shutil.copytree(exported.out_dir, out)
    gone = next(s for s in exported.table("sft").shards if s.source == source).paths("sft")
    assert all((out / path).is_file() for path in gone)
    database = _without_source(warehouse, tmp_path, "gold.sft", source)
    manifest = _export(database, out, smollm2_tokenizer)
    assert [t.written for t in manifest.tables] == [()] * len(manifest.tables)
    assert not any((out / path).exists() for path in gone)
    removed = _count(warehouse, "gold.sft", f"source = '{source}'")
    assert manifest.table("sft").rows == exported.table("sft").rows - removed > 0
    _export(database, tmp_path / "fresh", smollm2_tokenizer)
    assert _tree(out) == _tree(tmp_path / "fresh")


@pytest.mark.slow
def test_a_corrupted_or_missing_shard_file_is_rewritten_and_leftovers_removed(
    warehouse: Path, exported: ExportManifest, tmp_path: Path, smollm2_tokenizer: Any
) -> None:
    out = tmp_path / "out"
    shutil.copytree(exported.out_dir, out)
    truncated, edited = exported.table("sft").shards[0].paths("sft")[1], exported.table("rl").shards[-1].paths("rl")[0]
    missing = exported.table("rl").shards[0].paths("rl")[1]
    (out / truncated).write_bytes((out / truncated).read_bytes()[:100])
    body = bytearray((out / edited).read_bytes())
    body[200] ^= 1  # same size, other bytes: only the sha256 tells
    (out / edited).write_bytes(bytes(body))
    (out / missing).unlink()
    # What a killed export leaves: a temporary file, and a shard of a source no longer in gold.
    (out / "sft" / SHARD_DIR / ".x-00000-of-00001.parquet.tmp").write_bytes(b"partial")
    (out / "sft" / SHARD_DIR / "gone_source-00000-of-00001.jsonl").write_text("{}\n")
    (out / "sft" / "train.parquet").write_bytes(b"the single file of the earlier layout")
    manifest = _export(warehouse, out, smollm2_tokenizer)
    written = {path for t in manifest.tables for path in t.written}
    # A shard is written whole: both of its files, from the gold rows.
    shards = {Path(p).name.rsplit(".", 1)[0] for p in (truncated, edited, missing)}
    assert {Path(p).name.rsplit(".", 1)[0] for p in written} == shards and len(written) == 6
    assert _tree(out) == _tree(exported.out_dir)


def _data_files(manifest: ExportManifest) -> list[str]:
    return [path for t in manifest.tables for shard in t.shards for path in shard.paths(t.name)]


def _hashed(manifest: ExportManifest) -> int:
    return sum(t.files_hashed for t in manifest.tables)


@pytest.mark.slow
def test_kept_files_are_proven_by_their_recorded_size_and_mtime_and_rehashed_only_when_those_change(
    warehouse: Path, exported: ExportManifest, tmp_path: Path, smollm2_tokenizer: Any
) -> None:
    out, cache = tmp_path / "out", tmp_path / "stat_cache"
    shutil.copytree(exported.out_dir, out)
    data = _data_files(exported)
    # A folder with no stat record (an export of an earlier version, or another machine's): every kept file is
    # hashed once, and recorded.
    first = _export(warehouse, out, smollm2_tokenizer, stat_cache=cache)
    assert (_hashed(first), sum(len(t.written) for t in first.tables)) == (len(data), 0)
    # Nothing changed: nothing is read again, nothing written, the manifest and files as a fresh export's.
    mtimes = _mtimes(out)
    again = _export(warehouse, out, smollm2_tokenizer, stat_cache=cache)
    assert (_hashed(again), [t.written for t in again.tables]) == (0, [()] * len(again.tables))
    assert _mtimes(out) == mtimes and _tree(out) == _tree(exported.out_dir)
    assert again.to_dict() == exported.to_dict()

    # One file of each of four shards (data lists each shard's Parquet file, then its JSONL file).
    same_size, appended, touched, missing = data[0], data[3], data[4], data[7]
    body = bytearray((out / same_size).read_bytes())
    body[200] ^= 1  # same size, other bytes, a later mtime
    (out / same_size).write_bytes(bytes(body))
    os.utime(out / same_size, ns=(mtimes[same_size] + 1_000_000, mtimes[same_size] + 1_000_000))
    with (out / appended).open("ab") as edited:
        edited.write(b"\n")
    os.utime(out / touched, ns=(mtimes[touched] + 1_000_000, mtimes[touched] + 1_000_000))  # same bytes
    (out / missing).unlink()
    repaired = _export(warehouse, out, smollm2_tokenizer, stat_cache=cache)
    # The same-size edit and the touched file are hashed (the appended one fails on its size, the missing one on
    # its stat); the edited shards are rewritten whole, the touched one kept.
    assert _hashed(repaired) == 2
    rewritten = {Path(p).name.rsplit(".", 1)[0] for t in repaired.tables for p in t.written}
    assert rewritten == {Path(p).name.rsplit(".", 1)[0] for p in (same_size, appended, missing)}
    assert (out / touched).stat().st_mtime_ns == mtimes[touched] + 1_000_000
    assert _tree(out) == _tree(exported.out_dir)
    # What was rewritten or re-hashed is recorded: the next export reads nothing.
    assert _hashed(_export(warehouse, out, smollm2_tokenizer, stat_cache=cache)) == 0
    # A full rebuild distrusts the record: every kept file is hashed (and recorded again).
    assert _hashed(_export(warehouse, out, smollm2_tokenizer, stat_cache=cache, rehash=True)) == len(data)
    assert _hashed(_export(warehouse, out, smollm2_tokenizer, stat_cache=cache)) == 0


@pytest.mark.slow
def test_without_a_stat_record_every_kept_file_is_hashed(
    warehouse: Path, exported: ExportManifest, tmp_path: Path, smollm2_tokenizer: Any
) -> None:
    out = tmp_path / "out"
    shutil.copytree(exported.out_dir, out)
    assert _hashed(_export(warehouse, out, smollm2_tokenizer)) == len(_data_files(exported))
    # A record of another folder, or a corrupt one, is no record.
    cache = tmp_path / "stat_cache"
    _export(warehouse, tmp_path / "elsewhere", smollm2_tokenizer, stat_cache=cache)
    assert _hashed(_export(warehouse, out, smollm2_tokenizer, stat_cache=cache)) == len(_data_files(exported))
    for record in (cache / "export_file_stats").iterdir():
        record.write_text("{not json")
    assert _hashed(_export(warehouse, out, smollm2_tokenizer, stat_cache=cache)) == len(_data_files(exported))


def _preference_fingerprints(prompt: str, score: str) -> list[str]:
    """The shard fingerprints of a one-row gold.preference whose ``messages`` and ``score_chosen`` are the SQL
    literals given."""
    spec = next(s for s in EXPORTS if s.name == "preference")
    with duckdb.connect() as conn:
        conn.execute("CREATE SCHEMA gold")
        conn.execute(
            f"""CREATE TABLE gold.preference AS SELECT 'ab12' AS id, 'src' AS source,
                ({prompt})::STRUCT(role VARCHAR, content VARCHAR)[] AS messages, 'yes' AS chosen, 'no' AS rejected,
                ({score})::DOUBLE AS score_chosen, NULL::DOUBLE AS score_rejected"""
        )
        return [shard.fingerprint for shard in exports._plan_shards(conn, spec, {})]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (("[]", "1.0"), ("NULL", "1.0")),
        (("[NULL]", "1.0"), ("[]", "1.0")),
        (("[{'role': 'user', 'content': NULL}]", "1.0"), ("[NULL]", "1.0")),
        (("[{'role': 'user', 'content': 'a'}]", "'0.0'"), ("[{'role': 'user', 'content': 'a'}]", "'-0.0'")),
    ],
)
def test_a_fingerprint_tells_apart_values_that_duckdbs_hash_takes_for_the_same(
    before: tuple[str, str], after: tuple[str, str]
) -> None:
    # Each pair is written differently (null, [], [null]; -0.0) though hash() gives both the same value.
    assert _preference_fingerprints(*before) == _preference_fingerprints(*before)
    assert _preference_fingerprints(*before) != _preference_fingerprints(*after)


def test_json_lines_carry_every_value_as_written(tmp_path: Path) -> None:
    texts = ['quote" back\\slash /slash', "ctrl \x00\x01\x1f\x7f", "lines\n\r\t", "utf-8 é 中文 😀 \u2028", ""]
    data = pa.table(
        {
            "id": pa.array([f"id{i}" for i in range(len(texts))]),
            "messages": pa.array([[{"role": "user", "content": t}] for t in texts], exports._MESSAGES),
            "score": pa.array([0.1, 1e-07, 1e22, None, -0.0], pa.float64()),
            "ids": pa.array([[0, -100, 2147483647]] * len(texts), pa.list_(pa.int32())),
        }
    )
    spec = EXPORTS[0]
    out = tmp_path / "rows.jsonl"
    with out.open("w", encoding="utf-8", newline="\n") as lines, duckdb.connect() as writer:
        exports._write_jsonl(spec, data, lines, writer)
    text = out.read_text(encoding="utf-8")
    assert _jsonl_rows(text, data.schema) == data.to_pylist()
    # compact, and UTF-8 as is rather than \u escapes
    assert text.split("\n")[0].startswith('{"id":"id0","messages":[{"role":"user","content":"quote\\"')
    assert "中文 😀" in text


@pytest.mark.parametrize(
    ("score", "difficulty", "column"),
    [(float("nan"), 0.5, "score"), (1.0, float("-inf"), "extra_info.difficulty")],
)
def test_a_non_finite_float_fails_the_export_naming_its_column(
    tmp_path: Path, score: float, difficulty: float, column: str
) -> None:
    table = pa.table(
        {
            "id": ["a", "b"],
            "score": [1.0, score],
            "extra_info": [{"difficulty": 0.5}, {"difficulty": difficulty}],
        }
    )
    rl = next(s for s in EXPORTS if s.name == "rl")
    with (
        (tmp_path / "x.jsonl").open("w") as out,
        duckdb.connect() as writer,
        pytest.raises(ExportError, match=f"^gold.rl_prompts: {column} holds NaN or an infinity"),
    ):
        exports._write_jsonl(rl, table, out, writer)


@pytest.mark.slow
def test_a_different_tokenizer_is_refused(warehouse: Path, tmp_path: Path, smollm2_tokenizer: Any) -> None:
    identity = dict(tokenizer_identity(smollm2_tokenizer), chat_template_sha256="0" * 64)
    rows = _count(warehouse, "gold.sft")
    with duckdb.connect(str(warehouse), read_only=True) as conn, pytest.raises(ExportError, match=f": {rows} row"):
        export_gold(conn, tmp_path, tokenizer_identity=identity, created_at=CREATED_AT)


@pytest.mark.slow
def test_a_missing_gold_table_is_skipped_and_its_old_files_removed(
    warehouse: Path, exported: ExportManifest, tmp_path: Path, smollm2_tokenizer: Any
) -> None:
    database = tmp_path / "copy.duckdb"
    shutil.copy(warehouse, database)
    with duckdb.connect(str(database)) as conn:
        conn.execute("DROP TABLE gold.rl_prompts")
    out = tmp_path / "out"
    shutil.copytree(exported.out_dir, out)  # an earlier export with an rl/ folder
    manifest = _export(database, out, smollm2_tokenizer)
    assert "gold.rl_prompts" in manifest.skipped and "rl" not in {t.name for t in manifest.tables}
    assert not any((out / "rl").iterdir())
    assert json.loads((out / MANIFEST_FILE).read_text())["skipped"] == list(manifest.skipped)


def _reference(database: Path, spec: Any) -> tuple[pa.Table, list[str]]:
    """What the export of ``spec`` must hold: its query read whole with one ORDER BY id (fine on the demo data),
    and each row's source."""
    with duckdb.connect(str(database), read_only=True) as conn:
        data = conn.sql(f"SELECT * FROM ({spec.query}) ORDER BY id", params=spec.params()).to_arrow_table()
    rows = pa.Table.from_pylist(data.select(spec.schema.names).to_pylist(), schema=spec.schema)
    return rows, data.column("source").to_pylist()


def _jsonl_rows(text: str, schema: pa.Schema) -> list[dict[str, Any]]:
    """The rows of a JSON Lines text; each line one compact object with the schema's keys in order."""
    assert text == "" or text.endswith("\n")
    rows = [json.loads(line) for line in text.split("\n")[:-1]]  # JSON Lines split on \n only (not U+2028)
    assert all(list(row) == schema.names for row in rows)
    return rows


@pytest.mark.slow
def test_export_reads_id_ranges_in_order_and_writes_what_one_sorted_read_would(
    warehouse: Path, exported: ExportManifest, tmp_path: Path, smollm2_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ranges of 7 ids and row groups of 10 rows: many of each, the row groups cutting across ranges; sources of
    # more than 40 rows split into parts by id.
    monkeypatch.setattr(exports, "EXPORT_BATCH_ROWS", 7)
    monkeypatch.setitem(PARQUET_OPTIONS, "row_group_size", 10)
    monkeypatch.setattr(exports, "SHARD_ROWS", 40)
    ranges: dict[str, list[int]] = {}
    ordered_arrow = exports.ordered_arrow

    def counted(conn: Any, relation: str, key: str, rows: int, params: Any = None) -> Iterator[pa.Table]:
        sizes = ranges.setdefault(next(s.table for s in EXPORTS if s.query in relation), [])
        for batch in ordered_arrow(conn, relation, key, rows, params):
            sizes.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(exports, "ordered_arrow", counted)
    manifest = _export(warehouse, tmp_path, smollm2_tokenizer)
    split = 0
    for table in manifest.tables:
        spec = next(s for s in EXPORTS if s.name == table.name)
        assert len(ranges[spec.table]) > 2 and max(ranges[spec.table]) <= 7 and sum(ranges[spec.table]) == table.rows
        expected, sources = _reference(warehouse, spec)
        ids = expected.column("extra_info" if table.name == "rl" else "id").to_pylist()
        ids = [i["id"] for i in ids] if table.name == "rl" else ids
        assert ids == [r[0] for r in _gold(warehouse, f"SELECT id FROM {spec.table} ORDER BY id")]
        per_source = {source: sources.count(source) for source in sources}
        for shard in table.shards:
            # 2, 4, 8 ... parts: the fewest of at most 40 rows on average; a part holds the ids whose first byte
            # has the part's leading bits.
            assert 2 ** (shard.bits - 1) < -(-per_source[shard.source] // 40) <= 2**shard.bits or shard.bits == 0
            split += shard.bits > 0
            mine = [
                i
                for i, (source, id_) in enumerate(zip(sources, ids, strict=True))
                if source == shard.source and int(id_[:2], 16) >> (8 - shard.bits) == shard.part
            ]
            want = expected.take(mine)
            parquet, jsonl = (tmp_path / path for path in shard.paths(table.name))
            assert pq.read_table(parquet).equals(want), shard.name
            assert pq.ParquetFile(parquet).metadata.num_row_groups == max(1, -(-shard.rows // 10))
            # Byte for byte what writing the shard's sorted rows whole gives, and the same rows as JSON lines.
            pq.write_table(want, tmp_path / "whole.parquet", **PARQUET_OPTIONS)
            assert parquet.read_bytes() == (tmp_path / "whole.parquet").read_bytes(), shard.name
            assert _jsonl_rows(jsonl.read_text(encoding="utf-8"), spec.schema) == want.to_pylist()
        assert sum(s.rows for s in table.shards) == table.rows == expected.num_rows
        # Parts are id ranges in part order: a folder's JSON lines in shard order are the same whatever the
        # parts (and the range size never shows).
        whole = b"".join(p.read_bytes() for p in shard_files(exported.out_dir / table.name, ".jsonl"))
        assert b"".join(p.read_bytes() for p in shard_files(tmp_path / table.name, ".jsonl")) == whole
    assert split > 2  # several sources were split into parts
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_an_empty_gold_table_gives_files_with_the_schema_and_no_rows(
    warehouse: Path, tmp_path: Path, smollm2_tokenizer: Any
) -> None:
    database = tmp_path / "copy.duckdb"
    shutil.copy(warehouse, database)
    with duckdb.connect(str(database)) as conn:
        conn.execute("DELETE FROM gold.rl_prompts")
    manifest = _export(database, tmp_path / "out", smollm2_tokenizer)
    spec = next(s for s in EXPORTS if s.name == "rl")
    folder = tmp_path / "out" / "rl"
    assert manifest.table("rl").rows == 0 and "- rows: 0\n" in (folder / CARD_FILE).read_text(encoding="utf-8")
    assert [s.name for s in manifest.table("rl").shards] == [EMPTY_SHARD]
    assert shard_files(folder) == [folder / SHARD_DIR / f"{EMPTY_SHARD}.parquet"]
    assert pq.read_table(shard_files(folder)[0]).equals(spec.schema.empty_table())
    pq.write_table(spec.schema.empty_table(), tmp_path / "empty.parquet", **PARQUET_OPTIONS)
    assert shard_files(folder)[0].read_bytes() == (tmp_path / "empty.parquet").read_bytes()
    assert (folder / SHARD_DIR / f"{EMPTY_SHARD}.jsonl").read_bytes() == b""


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets, offline
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_datasets_loads_parquet_jsonl_and_the_folder_alike(
    hf: Offline, exported: ExportManifest, warehouse: Path
) -> None:
    for table in exported.tables:
        folder = exported.out_dir / table.name
        from_parquet = hf.load(shard_files(folder))
        from_jsonl = hf.load(shard_files(folder, ".jsonl"), pq.read_schema(shard_files(folder)[0]))
        from_folder = hf.load(folder)  # the card's YAML header names data/*.parquet as the train split
        assert from_parquet.num_rows == from_jsonl.num_rows == from_folder.num_rows == table.rows
        assert from_parquet.column_names == from_jsonl.column_names == from_folder.column_names
        assert from_parquet.to_list() == from_jsonl.to_list() == from_folder.to_list()
        ids = [r["id"] for r in from_folder] if table.name != "rl" else [r["extra_info"]["id"] for r in from_folder]
        # Every row once, shard after shard in name order, each shard's rows by id.
        assert ids == [i for path in shard_files(folder) for i in _shard_ids(path, table.name)]
        assert len(set(ids)) == len(ids) == _count(warehouse, table.table)


# ---------------------------------------------------------------------------------------------------------------
# TRL: SFT and DPO dataset preparation
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(smollm2_tokenizer: Any) -> Any:
    """A one-layer random Llama over SmolLM2's vocabulary: the trainers need a model, nothing is trained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
    )
    return LlamaForCausalLM(config)


def _sft_trainer(dataset: Any, tok: Any, model: Any, out: Path) -> Any:
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), report_to="none", use_cpu=True, max_length=None, assistant_only_loss=True)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)


@pytest.mark.slow
def test_trl_sft_takes_our_tokens_and_its_own_assistant_mask_agrees_with_our_labels(
    hf: Offline, exported: ExportManifest, smollm2_tokenizer: Any, tiny_model: Any, tmp_path: Path
) -> None:
    from trl.data_utils import is_conversational

    ours = hf.load(exported.out_dir / "sft")
    assert is_conversational(ours[0])
    assert all(
        m == [1 if label != -100 else 0 for label in r["labels"]]
        for r, m in zip(ours, ours["assistant_masks"], strict=True)
    )
    # TRL's assistant-only loss needs {% generation %} markers: the tagged copy renders exactly like SmolLM2's.
    tagged = copy.deepcopy(smollm2_tokenizer)
    tagged.chat_template = CHATML_TAGGED

    # 1. As exported (pre-tokenised): TRL keeps our input_ids and labels as they are.
    prepared = _sft_trainer(ours, tagged, tiny_model, tmp_path / "pretokenised").train_dataset
    assert prepared["input_ids"] == ours["input_ids"]
    assert prepared["labels"] == ours["labels"]

    # 2. Conversations only: TRL renders and tokenises them itself and builds labels from its assistant masks.
    conversations = ours.remove_columns(["input_ids", "labels", "assistant_masks"])
    trainer = _sft_trainer(conversations, tagged, tiny_model, tmp_path / "conversational")
    theirs = trainer.train_dataset
    assert theirs.num_rows == ours.num_rows
    for mine, trl_row in zip(ours, theirs, strict=True):
        assert trl_row["id"] == mine["id"]
        assert trl_row["input_ids"] == mine["input_ids"], mine["id"]
        assert trl_row["labels"] == mine["labels"], mine["id"]  # position by position

    batch = trainer.data_collator([theirs[i] for i in range(4)])
    width = batch["input_ids"].shape[1]
    for row, labels in enumerate(batch["labels"].tolist()):
        expected = ours[row]["labels"]
        assert labels == expected + [-100] * (width - len(expected))


@pytest.mark.slow
def test_trl_dpo_prepares_the_preference_exports(
    hf: Offline, exported: ExportManifest, warehouse: Path, smollm2_tokenizer: Any, tiny_model: Any, tmp_path: Path
) -> None:
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer
    from trl.data_utils import is_conversational

    tok = copy.deepcopy(smollm2_tokenizer)
    reference = LlamaForCausalLM(tiny_model.config)
    for name in _preference_exports(exported):
        pairs = hf.load(exported.out_dir / name)
        assert is_conversational(pairs[0])
        args = DPOConfig(output_dir=str(tmp_path / name), report_to="none", use_cpu=True, max_length=None)
        trainer = DPOTrainer(
            model=tiny_model, ref_model=reference, args=args, train_dataset=pairs, processing_class=tok
        )
        prepared = trainer.train_dataset
        assert prepared.num_rows == pairs.num_rows
        for pair, row in zip(pairs, prepared, strict=True):
            prompt = tok.apply_chat_template(pair["prompt"], add_generation_prompt=True, return_dict=True)
            assert row["prompt_ids"] == list(prompt["input_ids"]), pair["id"]
            # The completion TRL trains on is exactly the response and its end-of-turn marker.
            assert tok.decode(row["chosen_ids"]) == pair["chosen"][0]["content"] + "<|im_end|>\n", pair["id"]
            assert tok.decode(row["rejected_ids"]) == pair["rejected"][0]["content"] + "<|im_end|>\n", pair["id"]
        batch = trainer.data_collator([prepared[i] for i in range(4)])
        assert batch["input_ids"].shape[0] == 8  # chosen and rejected of each pair
        scored = [p for p in pairs if p["score_chosen"] is not None]
        assert len(scored) == _count(warehouse, f"gold.{name}", "score_chosen IS NOT NULL") > 0
        assert all(p["score_rejected"] is not None for p in scored)


# ---------------------------------------------------------------------------------------------------------------
# verl RL layout
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rl_export_has_verls_layout_and_the_gold_answers(
    hf: Offline, exported: ExportManifest, warehouse: Path, smollm2_tokenizer: Any
) -> None:
    rows = hf.load(exported.out_dir / "rl")
    assert rows.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    gold = {
        r[0]: r[1:]
        for r in _gold(warehouse, "SELECT id, source, answer, verifier, domain, messages FROM gold.rl_prompts")
    }
    for row in rows:
        info = row["extra_info"]
        source, answer, verifier, domain, messages = gold[info["id"]]
        assert info["source"] == source and info["verifier"] == verifier
        assert row["ability"] == domain
        assert row["reward_model"] == {"style": "rule", "ground_truth": answer}
        # Gold's prompt, the last turn with its answer-format instruction (data_source, split, index and the
        # instruction: test_trainer_handoff.py).
        assert row["prompt"][:-1] == [dict(m) for m in messages][:-1] and row["prompt"][-1]["role"] == "user"
    # What verl's RLHFDataset does with a row: render the prompt with the generation prompt.
    rendered = smollm2_tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
