"""Curation throughput, apart from the end-to-end benchmark (which the optional `curation` extra does not burden):
texts embedded per second and the time of a diversity selection at half the rows, on the benchmark's texts.

``.venv/bin/python -m benchmarks.curation_bench --texts 20000`` prints one JSON object; docs/curation.md records
the figures. Needs the `curation` extra.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

from benchmarks.bench import DEFAULT_SEED, TextMaker, _sentence_pool
from posttrain_assets.curation import selection
from posttrain_assets.curation.embedder import load_embedder


def curation_throughput(texts: int, seed: int = DEFAULT_SEED, method: str = "facility_location") -> dict[str, Any]:
    """Embed ``texts`` benchmark texts (20-400 words, log-normal around the reply length), then select half of them
    with ``method``; the seconds and rates of each step, and the selection's coverage against random."""
    rng = random.Random(f"{seed}:curation")
    maker = TextMaker(rng, _sentence_pool(seed, 20_000))
    corpus = [maker.text(min(400, max(20, maker.reply_words() // 2))) for _ in range(texts)]
    embedder = load_embedder()
    started = time.perf_counter()
    vectors = embedder.embed(corpus)
    embed_seconds = time.perf_counter() - started
    started = time.perf_counter()
    picked = selection.select(vectors, texts // 2, method=method, seed=seed)
    select_seconds = time.perf_counter() - started
    cover = selection.coverage(vectors, picked.indices, seed)
    return {
        "texts": texts,
        "words": sum(len(t.split()) for t in corpus),
        "model": embedder.identity.name,
        "embed_seconds": round(embed_seconds, 3),
        "texts_per_second": round(texts / embed_seconds, 1) if embed_seconds else None,
        "method": method,
        "selected": len(picked),
        "select_seconds": round(select_seconds, 3),
        "coverage": cover.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Curation throughput: embedding and diversity selection.")
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--method", choices=selection.METHODS, default="facility_location")
    args = parser.parse_args(argv)
    print(json.dumps(curation_throughput(args.texts, args.seed, args.method), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
