"""The benchmark script: a deterministic corpus generator with the planned mix, and a tiny end-to-end run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from benchmarks import bench
from posttrain_assets.cleaning.silver_pass import STAGE_NAMES, SUBSTAGE_NAMES
from posttrain_assets.defs.silver import sft_tokenized
from posttrain_assets.parallel import default_processes

N = 300


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "plan.json"
    }


def _rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if path.suffix == ".json":
        return len(json.loads(path.read_text(encoding="utf-8")))
    return sum(1 for line in path.read_bytes().split(b"\n") if line.strip())


def test_counts_follow_the_planned_mix() -> None:
    counts = bench.source_counts(N)
    by_regime: dict[str, int] = {}
    for s in bench.SOURCES:
        by_regime[s.regime] = by_regime.get(s.regime, 0) + counts[s.name]["rows"]
    assert by_regime == {"sft": 180, "preference": 75, "rl": 45}
    assert sum(c["near_duplicates"] for c in counts.values()) == pytest.approx(N * 0.10, abs=3)
    assert sum(c["malformed"] for c in counts.values()) == pytest.approx(N * 0.01, abs=1)
    assert counts["bench_pref_ultrafeedback"]["malformed"] == 0  # Parquet holds no malformed rows


def test_generator_is_deterministic_and_writes_the_plan(tmp_path: Path) -> None:
    plan = bench.generate_corpus(tmp_path / "a", N, seed=3)
    again = bench.generate_corpus(tmp_path / "b", N, seed=3)
    bench.generate_corpus(tmp_path / "c", N, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert {k: v for k, v in plan.items() if k not in ("generate_seconds", "registry")} == {
        k: v for k, v in again.items() if k not in ("generate_seconds", "registry")
    }

    assert plan["by_regime"] == {"sft": 180, "preference": 75, "rl": 45}
    for s in bench.SOURCES:
        assert _rows(tmp_path / "a" / s.path) == plan["sources"][s.name]["rows"], s.name
    planted = bench.planted_pairs(tmp_path / "a")
    assert len(planted) == plan["near_duplicates"] == sum(c["near_duplicates"] for c in plan["sources"].values())
    assert plan["malformed"] == sum(plan["malformed_by_reason"].values()) == 3
    for p in planted:
        assert p["of_row"] < p["row"] < plan["sources"][p["source"]]["rows"]
        assert bench.EDIT_RANGE[0] <= p["fraction"] <= bench.EDIT_RANGE[1]
    # a planted copy keeps the word count of its original and differs from it
    lines = (tmp_path / "a" / "sft/messages.jsonl").read_text(encoding="utf-8").splitlines()
    p = next(p for p in planted if p["source"] == "bench_sft_messages")
    copy, original = json.loads(lines[p["row"]]), json.loads(lines[p["of_row"]])
    assert copy != original
    assert [len(m["content"].split()) for m in copy["messages"]] == [
        len(m["content"].split()) for m in original["messages"]
    ]


def test_score_dedup() -> None:
    planted = [
        {"source": "s", "row": 5, "of_row": 1, "fraction": 0.06},
        {"source": "s", "row": 6, "of_row": 1, "fraction": 0.14},
        {"source": "s", "row": 7, "of_row": 2, "fraction": 0.10},
    ]
    # 5 -> 1 found, 6 missed, 7 found the other way round, and one false pair 9 -> 3
    found = [(("s", 5), ("s", 1)), (("s", 2), ("s", 7)), (("s", 9), ("s", 3))]
    score = bench.score_dedup(planted, found)
    assert (score["recalled"], score["planted"], score["true_positives"], score["detected"]) == (2, 3, 2, 3)
    assert score["recall"] == score["precision"] == round(2 / 3, 4)
    assert score["recall_by_edit_fraction"] == {"0.05-0.08": 1.0, "0.08-0.12": 1.0, "0.12-0.15": 0.0}


@pytest.mark.slow  # the whole graph, through the benchmark's own runner
def test_tiny_benchmark_end_to_end(
    tmp_path: Path, tokenizer_cache_dir: Path, smollm2_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTTRAIN_CACHE_DIR", str(tokenizer_cache_dir))
    out = tmp_path / "bench"
    result_path = out / "result.json"
    assert bench.main(["--records", str(N), "--out", str(out), "--json", str(result_path), "--skip-peers"]) == 0
    result = json.loads(result_path.read_text(encoding="utf-8"))
    assert {"schema_version", "machine", "corpus", "pipeline"} <= set(result)
    assert "peers" not in result
    assert result["pipeline"]["failure"] is None
    corpus, run = result["corpus"], result["pipeline"]
    assert corpus["records"] == N and corpus["by_regime"] == {"sft": 180, "preference": 75, "rl": 45}
    assert set(run["stages"]) >= {
        "bronze ingest",
        "silver canonical + cleaning",
        "silver sft_tokenized",
        "loss_mask_check",
        "silver preference pairs",
        "silver RL certification",
        "gold",
        "exports (Parquet + JSONL)",
    }
    assert run["stages"]["silver RL certification"]["records"] == run["silver_by_regime"]["rl"]
    exported = sum(n for table, n in run["tables"].items() if table.startswith("gold.") and table != "gold.trace")
    assert run["stages"]["exports (Parquet + JSONL)"]["records"] == exported > 0
    for stage in run["stages"].values():
        assert stage["seconds"] >= 0 and stage["peak_rss_mib"] > 0
    assert run["end_to_end"]["peak_rss_mib"] > 0
    # the silver pass's own stage clock, inside its step
    passed = run["silver_pass_seconds"]
    assert set(passed) == {*STAGE_NAMES, *SUBSTAGE_NAMES}
    assert sum(passed[name] for name in STAGE_NAMES) <= run["stages"]["silver canonical + cleaning"]["seconds"]
    assert run["tables"]["bronze.records"] == N
    assert run["stages"]["bronze ingest"]["records"] == N
    # every planted malformed row is quarantined by the canonical stage, with its planned reason
    assert run["quarantine"]["canonical"] == corpus["malformed_by_reason"]
    assert set(run["bronze_seconds_by_source"]) == {s.name for s in bench.SOURCES}
    dedup = run["dedup"]
    assert dedup["planted"] == corpus["near_duplicates"]
    assert 0.0 <= dedup["recall"] <= 1.0 and 0.0 <= dedup["precision"] <= 1.0
    assert dedup["recalled"] > 0
    # accounting: bronze = silver + quarantine + duplicates (no eval sources in the benchmark corpus)
    tables = run["tables"]
    assert tables["silver.records"] + tables["silver.quarantine"] + tables["silver.dedup_clusters"] == N
    assert sum(run["silver_by_regime"].values()) == tables["silver.records"]
    # the floor, measured in the same run, and the ratio the throughput goal is stated in
    floor = run["floor"]
    assert floor["records"] == N - corpus["malformed_by_reason"].get("bad_json", 0) and floor["tokens"] > 0
    assert floor["seconds"] == pytest.approx(floor["read_seconds"] + floor["encode_seconds"], abs=0.011)
    assert run["end_to_end_over_floor"] == round(run["end_to_end"]["seconds"] / floor["seconds"], 2)
    # the full build computed every bronze row in the gate; the figures above are its own (bronze.records == N,
    # ingest timed for the first corpus's sources only), measured before the refresh
    assert run["reuse"]["normalise_and_gate"] == {"computed": N, "reused": 0}
    # the incremental refresh, same run: the refresh corpus's sources added, only their rows gated
    refresh = run["refresh"]
    refresh_plan = json.loads((out / "refresh_corpus" / "plan.json").read_text(encoding="utf-8"))
    assert refresh["failure"] is None
    assert refresh["rows_added"] == refresh_plan["records"] == bench.default_refresh_rows(N) == 50
    assert refresh["sources_added"] == [f"refresh_{s.name}" for s in bench.SOURCES]
    assert refresh["seconds"] > 0 and refresh["peak_rss_mib"] > 0
    assert refresh["share_of_full"] == round(refresh["seconds"] / run["end_to_end"]["seconds"], 4)
    assert refresh["reuse"]["normalise_and_gate"] == {"computed": refresh_plan["records"], "reused": N}
    assert refresh["reuse"]["sft_tokenize"]["reused"] > 0
    assert set(refresh["stages"]) >= {"bronze ingest", "silver canonical + cleaning", "silver sft_tokenized", "gold"}
    # this run's steps only: the new sources are ingested, the unchanged ones get no run (pipeline.run_all)
    assert refresh["stages"]["bronze ingest"]["steps"] == len(bench.SOURCES)
    assert refresh["reuse"]["bronze_ingest"] == {"computed": refresh_plan["records"], "reused": 0}


@pytest.mark.slow  # starts the fork server and two workers: about 5 s (test_masking checks the masks fast)
def test_masking_peer_finds_our_worker_masks_identical_to_transformers(
    tmp_path: Path, tokenizer_cache_dir: Path, smollm2_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stage's batches shrunk from 1024 rows to 100 (the peer reads the stage's BATCH_ROWS when called), so a
    # tenth of the data still makes three batches.
    monkeypatch.setattr(sft_tokenized, "BATCH_ROWS", 100)
    bench.generate_corpus(tmp_path, n=600)
    # a bit over two batches, so ours runs in worker processes as in the stage
    result = bench.peer_masking(tmp_path, tokenizer_cache_dir, limit=220)
    assert result["identical_masks"] is True
    assert result["ours_processes"] == min(2, default_processes())
    assert result["ours_one_process"]["seconds"] > 0 and result["ours_one_process_speedup"] > 0
    assert 200 < result["conversations"] <= 220
    assert result["tokens"] > 100 * result["conversations"]


@pytest.mark.slow  # the whole graph, through the benchmark's own runner
def test_a_failed_job_still_reports_the_stages_that_ran(
    tmp_path: Path, tokenizer_cache_dir: Path, smollm2_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from posttrain_assets.defs.checks import provenance

    def out_of_memory(_conn):
        raise RuntimeError("planted: out of memory in the audit")

    monkeypatch.setenv("POSTTRAIN_CACHE_DIR", str(tokenizer_cache_dir))
    monkeypatch.setattr(provenance, "provenance_violations", out_of_memory)
    result_path = tmp_path / "result.json"
    assert bench.main(["--records", str(N), "--out", str(tmp_path), "--json", str(result_path), "--skip-peers"]) == 1
    run = json.loads(result_path.read_text(encoding="utf-8"))["pipeline"]
    assert "planted: out of memory in the audit" in run["failure"]
    assert run["stages"]["silver canonical + cleaning"]["records"] == N
    assert run["stages"]["loss_mask_check"]["seconds"] > 0
    assert run["tables"]["gold.sft"] == run["silver_by_regime"]["sft"]
    assert run["refresh"] == {"skipped": "the full build failed"}


def test_refresh_registry_keeps_the_first_sources_and_appends_the_new_ones(tmp_path: Path) -> None:
    from posttrain_assets.ingest.registry import load_registry

    plan = bench.generate_corpus(tmp_path / "corpus", 100, seed=3)
    refresh_plan = bench.generate_corpus(tmp_path / "refresh_corpus", 50, seed=4)
    path = bench.write_refresh_registry(plan, refresh_plan)
    assert path == tmp_path / "corpus" / "sources_refresh.yaml"
    first, combined = load_registry(plan["registry"]), load_registry(path)
    # the first corpus's entries unchanged and first (highest priority), the new ones after, renamed
    assert combined.sources[: len(bench.SOURCES)] == first.sources
    assert combined.names[len(bench.SOURCES) :] == [f"refresh_{s.name}" for s in bench.SOURCES]
    for s in bench.SOURCES:
        added = combined.get(f"refresh_{s.name}")
        assert added.files() == [(tmp_path / "refresh_corpus" / s.path).resolve()]


def test_refresh_report_says_whether_the_goal_holds() -> None:
    refresh = {
        "rows_added": 10_000,
        "sources_added": ["refresh_a", "refresh_b"],
        "seconds": 30.0,
        "peak_rss_mib": 900.0,
        "share_of_full": 0.03,
        "stages": {"silver canonical + cleaning": {"seconds": 12.5}, "gold": {"seconds": 4.0}},
        "reuse": {
            "normalise_and_gate": {"computed": 10_000, "reused": 1_000_000},
            "new_cache": {"computed": 1, "reused": 2},
        },
        "failure": None,
    }
    text = "\n".join(bench._refresh_lines(refresh, 1000.0, 1_000_000))
    assert "refresh 30.0 s vs full build 1000.0 s (same run) = 3.0% of the full build" in text
    assert "refresh goal (<= 5% of the full build): holds in this run\n" in text
    rows = [line.split() for line in text.splitlines()]
    # each cache under the stage that runs it; an unknown one after the stages
    assert ["cache", "normalise_and_gate", "-", "10,000", "1,000,000"] in rows
    names = [row[0] if row[0] != "cache" else row[1] for row in rows if row]
    assert names.index("normalise_and_gate") == names.index("silver") + 1
    assert names[-1] == "new_cache"
    slow = {**refresh, "share_of_full": 0.2, "rows_added": 50}
    text = "\n".join(bench._refresh_lines(slow, 150.0, 300))
    assert (
        "does NOT hold in this run (the goal is stated for 1,000,000 records + 10,000 rows; this run: 300 + 50)" in text
    )


def test_floor_reads_every_file_and_encodes_every_record_text(tmp_path: Path, tokenizer_cache_dir: Path) -> None:
    plan = bench.generate_corpus(tmp_path / "corpus", 200, seed=3)
    floor = bench.measure_floor(tmp_path / "corpus", tokenizer_cache_dir)
    # malformed JSON lines carry no text; every other row is read and encoded
    assert floor["records"] == 200 - plan["malformed_by_reason"].get("bad_json", 0)
    leaves: list[str] = []
    bench._text_leaves({"a": "x y", "b": [{"c": "z"}, 3, None], "d": ["w"]}, leaves)
    assert leaves == ["x y", "z", "w"]
    assert floor["tokens"] > floor["records"] * 10  # every record has text of some length
    assert floor["seconds"] > 0


def test_encode_probe_times_the_same_texts_and_the_report_says_how_far_the_speed_moved(
    tmp_path: Path, tokenizer_cache_dir: Path
) -> None:
    bench.generate_corpus(tmp_path / "corpus", 200, seed=3)
    first = bench.encode_probe(tmp_path / "corpus", tokenizer_cache_dir, records=50)
    again = bench.encode_probe(tmp_path / "corpus", tokenizer_cache_dir, records=50)
    # the same fifty texts each time (the first landing file's first records), so the same tokens
    assert first["records"] == again["records"] == 50
    assert first["tokens"] == again["tokens"] > 50 * 10
    assert first["us_per_token"] > 0
    pipeline = {"encode_probe": {"before": {"tokens": 1000, "us_per_token": 0.5}, "after": {"us_per_token": 0.6}}}
    assert bench._probe_line(pipeline) == (
        "machine speed during the run: the floor's encode of the same 1,000 tokens took 0.5 us/token before the "
        "floor and 0.6 after the pipeline (+20%); a ratio is only as steady as this"
    )
    assert bench._probe_line({}) is None


def test_linearity_prints_each_stage_growth_over_the_growth_of_n() -> None:
    def result(n: int, silver: float, gold: float, floor: float) -> dict:
        stages = {"silver": {"seconds": silver}, "gold": {"seconds": gold}}
        pipeline = {"stages": stages, "end_to_end": {"seconds": silver + gold}, "floor": {"seconds": floor}}
        return {"corpus": {"records": n}, "pipeline": pipeline}

    text = bench.linearity([result(1_000_000, 100.0, 60.0, 80.0), result(100_000, 10.0, 2.0, 8.0)])
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}
    # silver grows as N (1.0); gold grows 30x for 10x the rows (3.0); the floor grows linearly
    assert rows["silver"] == ["10.0", "100.0", "1.0"]
    assert rows["gold"] == ["2.0", "60.0", "3.0"]
    assert rows["end"] == ["to", "end", "12.0", "160.0", "1.33"]
    assert rows["floor"] == ["8.0", "80.0", "1.0"]
