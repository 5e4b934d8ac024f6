"""Near-dup candidates of a refresh, apart from the end-to-end benchmark: the candidate phase
(``dedup_tables.list_candidates``) over the MinHash signatures of the benchmark corpus's own texts, a full listing
of the corpus, then a refresh adding the refresh corpus's rows (the issue's 10,000 at 1M), each regime on its own.

The signatures (each record's strings joined by newlines, shingled by the regime's config) are computed once into
``OUT/signatures.duckdb`` (about 100 s at 1M on two cores) and planted in the signature cache, so both runs list
candidates from cached signatures, as a refresh does. After the refresh, the candidate state is forgotten and the
same rows listed in full: the two candidate sets must be equal, which the report states.

    .venv/bin/python -m benchmarks.candidate_refresh --records 1000000 --refresh-rows 10000 --out data/candidates

prints per regime the seconds of the full listing, the refresh and the check listing, the slowest statements of
the refresh (``--statements N``) and the candidate pairs; the figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from benchmarks import bench
from posttrain_assets.cleaning import dedup, dedup_tables
from posttrain_assets.cleaning.dedup import MinHashConfig
from posttrain_assets.parallel import default_processes, map_batches

CONFIGS = dedup.regime_configs(None)
# The staged rows: what dedup_tables reads of a regime's rows (ids as their own exact keys: no exact twins).
STAGED = """
CREATE OR REPLACE TABLE staged AS
SELECT row_number() OVER (ORDER BY id) AS seq, id, regime, id AS exact_key,
       row_number() OVER (ORDER BY id) AS kept_rank,
       NULL::STRUCT(role VARCHAR, content VARCHAR)[] AS messages, NULL::VARCHAR AS prompt,
       NULL::VARCHAR AS chosen, NULL::VARCHAR AS rejected, NULL::VARCHAR AS answer
FROM corpus_rows WHERE regime = $regime AND (NOT refresh OR $with_refresh)
"""
CANDIDATE_IDS = f"""
SELECT least(x.id, y.id) AS a, greatest(x.id, y.id) AS b FROM {dedup_tables.NEAR_CANDIDATES.qualified} c
JOIN {dedup_tables.DEDUP_ROWS.qualified} x ON x.seq = c.a JOIN {dedup_tables.DEDUP_ROWS.qualified} y ON y.seq = c.b
ORDER BY ALL
"""


def signature_batch(
    configs: dict[str, MinHashConfig], batch: tuple[str, list[str], list[str]]
) -> tuple[str, list[str], np.ndarray]:
    """A worker's item: one batch of (regime, ids, texts) with its texts' MinHash signatures under the regime's
    config, in place of the texts."""
    regime, ids, texts = batch
    return regime, ids, dedup.minhash_signatures(texts, configs[regime]).astype(np.uint32)


def _importable(fn: Any) -> Any:
    """``fn`` as its module's importable name sees it: run as ``python -m``, this module is ``__main__``, which the
    worker processes do not import (parallel.map_batches)."""
    if fn.__module__ != "__main__":
        return fn
    import importlib

    return getattr(importlib.import_module("benchmarks.candidate_refresh"), fn.__name__)


def _corpus_texts(corpus: Path, prefix: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """(regime, ids, texts) per batch of each landing file of a generated corpus."""
    conn = duckdb.connect()
    for s in bench.SOURCES:
        path = corpus / s.path
        if path.exists():
            for i, texts in enumerate(bench._record_texts(conn, path, bench._floor_relation(s))):
                yield s.regime, [f"{prefix}{s.name}:{i}:{k}" for k in range(len(texts))], texts


def build_signatures(out: Path, records: int, refresh_rows: int, seed: int) -> Path:
    """Generate the two corpora (once) and their rows' signatures into ``out/signatures.duckdb``."""
    path = out / "signatures.duckdb"
    if path.exists():
        return path
    for corpus, n, corpus_seed in (("corpus", records, seed), ("refresh_corpus", refresh_rows, seed + 1)):
        if not (out / corpus).exists():
            bench.generate_corpus(out / corpus, n, corpus_seed)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    conn = duckdb.connect(str(tmp))
    conn.execute("CREATE SCHEMA cache")
    conn.execute(dedup_tables.SIGNATURE_CACHE.create_sql())
    conn.execute("CREATE TABLE corpus_rows (id VARCHAR, regime VARCHAR, refresh BOOLEAN)")
    keys = {regime: dedup_tables.signature_stage_key(cfg) for regime, cfg in CONFIGS.items()}
    for corpus, prefix in (("corpus", ""), ("refresh_corpus", "refresh_")):
        batches = _corpus_texts(out / corpus, prefix)  # read once, a batch at a time
        for regime, ids, sigs in map_batches(_importable(signature_batch), CONFIGS, batches, default_processes()):
            cfg = CONFIGS[regime]
            rows = pa.table(
                {
                    "stage_key": pa.array([keys[regime]] * len(ids)),
                    "id": pa.array(ids),
                    "signature": pa.FixedSizeListArray.from_arrays(pa.array(sigs.ravel()), cfg.num_perm),
                    "same_key": pa.nulls(len(ids), pa.int64()),
                }
            )
            conn.register("signed", rows)
            conn.execute(f"INSERT INTO {dedup_tables.SIGNATURE_CACHE.qualified} SELECT * FROM signed")
            conn.execute(
                "INSERT INTO corpus_rows SELECT unnest($ids), $regime, $refresh",
                {"ids": ids, "regime": regime, "refresh": prefix != ""},
            )
            conn.unregister("signed")
    conn.close()
    tmp.rename(path)
    return path


class StatementClock:
    """A connection whose ``execute`` calls are timed (the rest is the connection's own)."""

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self.conn = conn
        self.seconds: list[tuple[float, str]] = []

    def execute(self, sql: str, params: Any = None) -> duckdb.DuckDBPyConnection:
        started = time.perf_counter()
        result = self.conn.execute(sql, params or {})
        self.seconds.append((time.perf_counter() - started, " ".join(sql.split())[:100]))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def list_regime(conn: duckdb.DuckDBPyConnection, regime: str, with_refresh: bool) -> tuple[float, int, StatementClock]:
    """Stage the regime's rows (with or without the refresh's) and list their candidates: seconds, survivors listed,
    and the timed statements."""
    conn.execute(STAGED, {"regime": regime, "with_refresh": with_refresh})
    dedup_tables.group_exact_duplicates(conn, "SELECT seq, id, exact_key, kept_rank FROM staged", {})
    clock = StatementClock(conn)
    with bench.timed() as t:
        _computed, listed = dedup_tables.list_candidates(
            clock,  # a connection whose statements are timed (duck-typed)
            regime=regime,
            records="staged",
            cfg=CONFIGS[regime],
            batch_rows=65_536,
            processes=default_processes(),
        )
    return round(t["seconds"], 2), listed, clock


def run(out: Path, records: int, refresh_rows: int, seed: int, statements: int) -> bool:
    """Full listing, refresh and check listing per regime; prints the report, returns whether every check held."""
    work = out / "candidates.duckdb"
    shutil.copy(build_signatures(out, records, refresh_rows, seed), work)
    conn = duckdb.connect(str(work))
    held = True
    try:
        for regime in CONFIGS:
            full, survivors, _ = list_regime(conn, regime, with_refresh=False)
            refresh, listed, clock = list_regime(conn, regime, with_refresh=True)
            pairs = conn.execute(CANDIDATE_IDS).fetchall()
            state = {"state": dedup_tables.candidate_state_key(regime, CONFIGS[regime])}
            for table in dedup_tables.CANDIDATE_STATE_TABLES:
                conn.execute(f"DELETE FROM {table.qualified} WHERE stage_key = $state", state)
            check, _, _ = list_regime(conn, regime, with_refresh=True)
            same = conn.execute(CANDIDATE_IDS).fetchall() == pairs
            held &= same
            digest = hashlib.sha256(repr(pairs).encode()).hexdigest()[:16]
            print(
                f"{regime}: {survivors:,} survivors; full listing {full} s, refresh {refresh} s ({listed:,} survivors "
                f"listed again), check listing {check} s; {len(pairs):,} candidate pairs (sha256 {digest}), "
                f"refresh {'equals' if same else 'DIFFERS FROM'} the full listing"
            )
            for seconds, sql in sorted(clock.seconds, reverse=True)[:statements]:
                print(f"  {seconds:6.2f}  {sql}")
    finally:
        conn.close()
        work.unlink(missing_ok=True)
    return held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=bench.DEFAULT_RECORDS)
    parser.add_argument("--refresh-rows", type=int, default=None, help="default: bench.default_refresh_rows")
    parser.add_argument("--out", type=Path, default=Path("data/candidates"))
    parser.add_argument("--seed", type=int, default=bench.DEFAULT_SEED)
    parser.add_argument("--statements", type=int, default=8, help="slowest refresh statements shown per regime")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    refresh_rows = args.refresh_rows or bench.default_refresh_rows(args.records)
    return 0 if run(args.out, args.records, refresh_rows, args.seed, args.statements) else 1


if __name__ == "__main__":
    raise SystemExit(main())
