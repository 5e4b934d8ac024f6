"""The shared cleaning pass over the whole silver corpus, all regimes together, before any gold table.

Stages, in order (each named by its role; a stage returns what it drops and why, nothing is discarded):

1. ``quality_gate``: license policy, empty turns, role order, SFT ending, tie pairs, refusal
   boilerplate, language (``posttrain_assets.quality``).
2. ``decontaminate``: rows sharing a long word n-gram with any evaluation row (``role: eval`` sources)
   are removed (``posttrain_assets.decontamination``).
3. ``deduplicate``: exact-normalised and MinHash near duplicates per regime; a preference pair is one
   unit, so it is kept or dropped whole (``posttrain_assets.dedup``).
4. ``cross_regime_leaks``: the same prompt in more than one regime is reported; with
   ``leak_policy="prefer_rl"`` the SFT/preference rows whose prompt is in the RL bank are removed, so the
   policy is never trained on the answers of the prompts it is rewarded on.

Quality runs first so a kept duplicate twin is always a row that survives the gate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain_assets.decontamination import EvalIndex, contamination_scan
from posttrain_assets.dedup import DEFAULT_CONFIGS, MinHashConfig, cross_regime_leaks, deduplicate
from posttrain_assets.quality import QualityConfig, apply_quality_gate

Record = dict[str, Any]
LEAK_POLICIES = ("report", "prefer_rl")


@dataclass(frozen=True)
class CleaningConfig:
    quality: QualityConfig = field(default_factory=QualityConfig)
    minhash: Mapping[str, MinHashConfig] = field(default_factory=lambda: dict(DEFAULT_CONFIGS))
    decontamination_ngram: int = 13
    leak_policy: Literal["report", "prefer_rl"] = "report"


@dataclass
class Dropped:
    """A silver row the pass removed: which stage, the reason code and a human-readable detail."""

    id: str
    stage: str
    reason: str
    detail: str


@dataclass
class CleaningResult:
    kept: list[Record]
    dropped: list[Dropped]
    duplicates: list[dict[str, Any]]  # from posttrain_assets.dedup.deduplicate: member_id -> kept_id
    contamination: list[dict[str, Any]]  # one row per (training row, eval row, field) overlap
    contamination_report: list[dict[str, Any]]  # per benchmark
    leaks: list[dict[str, Any]]  # prompts found in more than one regime


def clean_corpus(
    records: Sequence[Record],
    eval_records: Sequence[Record],
    priority: Callable[[str], int],
    cfg: CleaningConfig | None = None,
) -> CleaningResult:
    """Run the four stages; every input row ends in ``kept``, ``dropped`` or ``duplicates`` exactly once."""
    cfg = cfg or CleaningConfig()
    kept, quality_drops = apply_quality_gate(records, cfg.quality)
    dropped = [Dropped(d["id"], "quality", d["reason"], d["detail"]) for d in quality_drops]

    index = EvalIndex.build(eval_records, n=cfg.decontamination_ngram)
    matches, report = contamination_scan(kept, index)
    first_match: dict[str, dict[str, Any]] = {}
    for match in matches:
        first_match.setdefault(match["id"], match)
    for record_id, match in first_match.items():
        detail = (
            f"{match['field']} overlaps {match['benchmark']} row {match['eval_id']} ({match['eval_field']}): "
            f"'{match['ngram_text']}'"
        )
        dropped.append(Dropped(record_id, "decontamination", "contaminated", detail))
    kept = [r for r in kept if r["id"] not in first_match]

    kept_ids, duplicates = deduplicate(kept, priority, cfg.minhash)
    survivors = set(kept_ids)
    kept = [r for r in kept if r["id"] in survivors]

    leaks = cross_regime_leaks(kept)
    if cfg.leak_policy == "prefer_rl":
        by_id = {r["id"]: r for r in kept}
        leaked = {i for leak in leaks if "rl" in leak["regimes"] for i in leak["ids"] if by_id[i]["regime"] != "rl"}
        dropped += [
            Dropped(i, "leak", "cross_regime_leak", "the prompt is also in the RL prompt bank") for i in sorted(leaked)
        ]
        kept = [r for r in kept if r["id"] not in leaked]
    elif cfg.leak_policy not in LEAK_POLICIES:
        raise ValueError(f"leak_policy must be one of {LEAK_POLICIES}, got {cfg.leak_policy!r}")
    return CleaningResult(kept, dropped, duplicates, matches, report, leaks)
