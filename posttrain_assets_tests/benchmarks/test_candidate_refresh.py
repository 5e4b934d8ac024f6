"""The candidate-refresh benchmark (``benchmarks.candidate_refresh``) at a size a test affords."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from benchmarks import candidate_refresh


def test_a_small_refresh_lists_the_candidates_a_full_listing_does(tmp_path: Path, capsys) -> None:
    assert candidate_refresh.main(["--records", "3000", "--refresh-rows", "150", "--out", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert report.count("refresh equals the full listing") == 3  # sft, preference, rl
    pairs = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) candidate pairs", report)]
    assert len(pairs) == 3 and min(pairs) > 0  # equal sets with something in them
    signatures = duckdb.connect(str(tmp_path / "signatures.duckdb"), read_only=True)
    counts = signatures.execute("SELECT refresh, count(*) FROM corpus_rows GROUP BY ALL ORDER BY ALL").fetchall()
    assert counts == [(False, 3000), (True, 150)]
    assert not (tmp_path / "candidates.duckdb").exists()  # the working copy is removed
