"""silver.preference_pairs: audited pairs; silver.preference_pairs_balanced: the length-balanced remedy.

The balanced pairs are a sibling output, not a downstream asset of silver.preference_pairs, so a failing
length_confound_check blocks gold.preference while gold.preference_length_balanced can still be built.
"""

import base64
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets import settings
from posttrain_assets.defs.metadata import column_lineage, markdown_table, table_metadata
from posttrain_assets.defs.resources import TokenizerResource
from posttrain_assets.defs.silver.canonical import SILVER_RECORDS_KEY
from posttrain_assets.defs.silver.common import silver_spec
from posttrain_assets.parallel import default_processes
from posttrain_assets.preference.audit import DROP_REASONS, ConfoundThresholds, markdown_audit_table
from posttrain_assets.preference.audit_sql import (
    StoredHistogram,
    audit_relation,
    balance_relation,
    stored_length_histogram,
)
from posttrain_assets.preference.labelling import (
    DEFAULT_MIN_PAIR_AGREEMENT,
    Agreement,
    JudgeBias,
    annotator_agreement,
    curation_drops_query,
    judge_bias_audit,
)
from posttrain_assets.preference.pairs import PairJob
from posttrain_assets.preference.pairs_stage import measure_preference_pairs, sync_preference_pairs
from posttrain_assets.text import DEFAULT_TIE_SIMILARITY
from posttrain_assets.warehouse.catalogue import (
    SILVER_PREFERENCE_AGREEMENT,
    SILVER_PREFERENCE_AUDIT,
    SILVER_PREFERENCE_BALANCE_DROPS,
    SILVER_PREFERENCE_JUDGE_AUDIT,
    SILVER_PREFERENCE_PAIRS,
    SILVER_PREFERENCE_PAIRS_BALANCED,
    SILVER_RECORDS,
)
from posttrain_assets.warehouse.io import replace_table, sync_table, transaction

PAIRS_KEY = dg.AssetKey(["silver", "preference_pairs"])
AUDIT_KEY = dg.AssetKey(["silver", "preference_audit"])
BALANCED_KEY = dg.AssetKey(["silver", "preference_pairs_balanced"])
DROPS_KEY = dg.AssetKey(["silver", "preference_balance_drops"])
JUDGE_AUDIT_KEY = dg.AssetKey(["silver", "preference_judge_audit"])
AGREEMENT_KEY = dg.AssetKey(["silver", "preference_agreement"])

PREFERENCE_ROW_COUNT = f"SELECT count(*) FROM {SILVER_RECORDS.qualified} WHERE regime = 'preference'"
BATCH_ROWS = 4096
BALANCED_RANGE_ROWS = 32_768  # rows per sorted id range when the balanced pairs are written
PAIRS_QUERY = f"SELECT * FROM {SILVER_PREFERENCE_PAIRS.qualified}"
# The balanced set: every pair the balancing did not drop (synced, so a refresh writes only the changes).
BALANCED_PAIRS = (
    f"SELECT * FROM {SILVER_PREFERENCE_PAIRS.qualified} "
    f"WHERE id NOT IN (SELECT id FROM {SILVER_PREFERENCE_BALANCE_DROPS.qualified})"
)
AUDIT_FIELDS = [c.name for c in SILVER_PREFERENCE_AUDIT.columns[2:]]
# Statistics plotted per source across materialisations.
PLOTTED = ("chosen_longer_share", "point_biserial_r", "tie_rate", "median_length_ratio", "pairs")


class LengthConfoundGateConfig(dg.Config):
    """Thresholds of the length-confound gate (documented defaults): the config of both length-confound checks. The
    checks judge the stored pairs, ties by their ``is_tie`` flag, so the tie similarity is not theirs to set: it is
    :class:`LengthConfoundConfig`'s, which decides the flags."""

    share_low: float = 0.35
    share_high: float = 0.65
    max_abs_r: float = 0.2
    max_tie_rate: float = 0.01
    min_pairs: int = 50

    def thresholds(self) -> ConfoundThresholds:
        return ConfoundThresholds(
            share_low=self.share_low,
            share_high=self.share_high,
            max_abs_r=self.max_abs_r,
            max_tie_rate=self.max_tie_rate,
            min_pairs=self.min_pairs,
        )


class LengthConfoundConfig(LengthConfoundGateConfig):
    """The preference stage: the gate's thresholds (the balancing aims at them), the tie similarity that flags ties
    (``is_tie``; part of the pairs' stage key), the balancing seed, the curation drops and the agreement warning."""

    tie_similarity: float = DEFAULT_TIE_SIMILARITY
    balance_seed: int = 0
    processes: int = 0  # worker processes that count tokens and flag ties; 0: one per core this process may use
    # True: count tokens and flag ties of every pair again instead of reading earlier runs' from the pairs cache
    full_rebuild: bool = False
    # Curation drops of the balanced set (preference/labelling.py): pairs whose score margin is below this (None:
    # no margin filter), and pairs whose annotators disagree (label agreement below min_pair_agreement).
    min_score_margin: float | None = None
    min_pair_agreement: float = DEFAULT_MIN_PAIR_AGREEMENT
    disagreement_policy: str = "drop"  # drop | report
    # annotator_agreement_check (WARN): a source with at least min_rated_pairs pairs rated by several annotators
    # warns when its order alpha is below min_order_alpha (Krippendorff's 0.667: the lowest for tentative use).
    min_order_alpha: float = 0.667
    min_rated_pairs: int = 20


def histogram_metadata(histogram: StoredHistogram, path: Path) -> dict[str, dg.MetadataValue]:
    """The histogram inline and its file (``path``, written by :func:`stored_length_histogram`); whether this run
    drew it (False: no length changed, the file was reused)."""
    encoded = base64.b64encode(histogram.png).decode()
    return {
        "length_histogram": dg.MetadataValue.md(f"![chosen vs rejected lengths](data:image/png;base64,{encoded})"),
        "length_histogram_file": dg.MetadataValue.path(str(path)),
        "length_histogram_drawn": dg.MetadataValue.bool(histogram.drawn),
    }


def judge_bias_metadata(judge_bias: list[JudgeBias]) -> dict[str, dg.MetadataValue]:
    """The judge-bias audit as a table and, per source and judge, each feature's chosen-higher share as a float
    the UI plots across materialisations."""
    metadata: dict[str, dg.MetadataValue] = {
        "judge_audit": dg.MetadataValue.md(
            markdown_table(
                ["source", "stratum", "feature", "pairs", "chosen / rejected mean", "chosen higher", "r"],
                [
                    (
                        b.source,
                        f"{b.stratum_kind} `{b.stratum}`",
                        b.feature,
                        b.pairs,
                        f"{b.chosen_mean:.2f} / {b.rejected_mean:.2f}",
                        f"{b.chosen_higher_share:.3f}",
                        f"{b.point_biserial_r:.3f}",
                    )
                    for b in judge_bias
                ],
            )
        )
    }
    for b in judge_bias:
        if b.stratum_kind in ("source", "judge"):
            key = f"judge_bias/{b.source}/{b.stratum_kind}={b.stratum}/{b.feature}/chosen_higher_share"
            metadata[key] = dg.MetadataValue.float(b.chosen_higher_share)
    return metadata


def agreement_metadata(agreement: list[Agreement]) -> dict[str, dg.MetadataValue]:
    """Agreement per source as a table and plotted floats (alpha is left out where it is undefined)."""
    metadata: dict[str, dg.MetadataValue] = {
        "agreement": dg.MetadataValue.md(
            markdown_table(
                [
                    "source",
                    "rated pairs",
                    "raters",
                    "label agreement",
                    "order agreement",
                    "order α",
                    "rating α",
                    "disagreeing pairs",
                ],
                [
                    (
                        a.source,
                        a.rated_pairs,
                        a.raters,
                        f"{a.label_agreement:.3f}",
                        f"{a.order_agreement:.3f}",
                        "—" if a.order_alpha is None else f"{a.order_alpha:.3f}",
                        "—" if a.rating_alpha is None else f"{a.rating_alpha:.3f}",
                        a.disagreeing_pairs,
                    )
                    for a in agreement
                ],
            )
        )
    }
    for a in agreement:
        for field in ("order_alpha", "rating_alpha", "label_agreement", "order_agreement"):
            value = getattr(a, field)
            if value is not None:
                metadata[f"agreement/{a.source}/{field}"] = dg.MetadataValue.float(value)
    return metadata


@dg.multi_asset(
    specs=[
        silver_spec(PAIRS_KEY, SILVER_PREFERENCE_PAIRS, [SILVER_RECORDS_KEY]),
        silver_spec(AUDIT_KEY, SILVER_PREFERENCE_AUDIT, [SILVER_RECORDS_KEY]),
        silver_spec(BALANCED_KEY, SILVER_PREFERENCE_PAIRS_BALANCED, [SILVER_RECORDS_KEY]),
        silver_spec(DROPS_KEY, SILVER_PREFERENCE_BALANCE_DROPS, [SILVER_RECORDS_KEY]),
        silver_spec(JUDGE_AUDIT_KEY, SILVER_PREFERENCE_JUDGE_AUDIT, [SILVER_RECORDS_KEY]),
        silver_spec(AGREEMENT_KEY, SILVER_PREFERENCE_AGREEMENT, [SILVER_RECORDS_KEY]),
    ],
    pool="duckdb",
)
def silver_preference_pairs(
    context: dg.AssetExecutionContext,
    config: LengthConfoundConfig,
    duckdb: DuckDBResource,
    tokenizer: TokenizerResource,
):
    """Count response tokens, flag ties, audit per source / kind / overall, and balance offending sources."""
    thresholds = config.thresholds()
    job = PairJob(tokenizer.get(), config.tie_similarity)
    with duckdb.get_connection() as conn:
        (rows,) = conn.execute(PREFERENCE_ROW_COUNT).fetchone()
        processes = config.processes or default_processes()
        context.log.info(
            f"pairing {rows} preference rows: token counts and tie flags of those not measured before (stage key: "
            f"tokenizer, tie similarity, code), {BATCH_ROWS} at a time in id order, in up to {processes} process(es)"
        )
        # Token counts and tie flags (most of the stage's work) come from the pairs cache or are computed in worker
        # processes (preference/pairs_stage.py). Then, in one transaction, silver.preference_pairs is synced to the
        # cache joined with the current silver.records (only changed pairs written) and every audit is computed in
        # SQL over the whole table, as in a full build: only aggregates and the offending sources' pairs (the remedy)
        # come to Python; the balanced set is synced too.
        measured = measure_preference_pairs(
            conn,
            job,
            tokenizer.identity()["tokenizer_sha256"],
            processes=processes,
            batch_rows=BATCH_ROWS,
            reuse=not (config.full_rebuild or settings.full_rebuild()),
            progress=lambda done: context.log.info(f"measured {done} preference pairs"),
        )
        pairs_table = SILVER_PREFERENCE_PAIRS.qualified
        with transaction(conn):
            built = sync_preference_pairs(conn, measured)
            audits = audit_relation(conn, PAIRS_QUERY)
            # who labelled the pairs: set-based SQL over the table (the texts never come to Python)
            judge_bias = judge_bias_audit(conn, pairs_table)
            agreement = annotator_agreement(conn, pairs_table, config.min_pair_agreement)
            excluded, excluded_params = curation_drops_query(
                pairs_table, config.min_score_margin, config.min_pair_agreement, config.disagreement_policy
            )
            # writes silver.preference_balance_drops (ties, curation drops, length balancing) in SQL
            balance = balance_relation(
                conn,
                PAIRS_QUERY,
                SILVER_PREFERENCE_BALANCE_DROPS,
                thresholds,
                seed=config.balance_seed,
                excluded=excluded,
                params=excluded_params,
            )
            audit_rows = [
                {"group_kind": kind, "group_name": name, **{f: getattr(result, f) for f in AUDIT_FIELDS}}
                for (kind, name), result in audits.items()
            ]
            replace_table(conn, SILVER_PREFERENCE_AUDIT, audit_rows, transaction=False)
            replace_table(conn, SILVER_PREFERENCE_JUDGE_AUDIT, [b.as_dict() for b in judge_bias], transaction=False)
            replace_table(conn, SILVER_PREFERENCE_AGREEMENT, [a.as_dict() for a in agreement], transaction=False)
            balanced = sync_table(conn, SILVER_PREFERENCE_PAIRS_BALANCED, BALANCED_PAIRS, "id", BALANCED_RANGE_ROWS)
        kept = balance.kept
        preview = ["id", "source", "chosen_tokens", "rejected_tokens", "is_tie"]
        pairs_meta = table_metadata(conn, SILVER_PREFERENCE_PAIRS, preview_columns=preview, group_by="source")
        audit_meta = table_metadata(
            conn, SILVER_PREFERENCE_AUDIT, preview_columns=["group_kind", "group_name", "pairs"]
        )
        balanced_meta = table_metadata(
            conn, SILVER_PREFERENCE_PAIRS_BALANCED, preview_columns=preview, group_by="source"
        )
        drops_meta = table_metadata(
            conn, SILVER_PREFERENCE_BALANCE_DROPS, preview_columns=["id", "source", "reason"], group_by="reason"
        )
        judge_meta = table_metadata(
            conn, SILVER_PREFERENCE_JUDGE_AUDIT, preview_columns=["source", "stratum_kind", "stratum", "feature"]
        )
        agreement_meta = table_metadata(
            conn, SILVER_PREFERENCE_AGREEMENT, preview_columns=["source", "rated_pairs", "order_alpha"]
        )
        histogram_file = Path(duckdb.database).resolve().parent / "artifacts" / "preference_length_histogram.png"
        histogram = stored_length_histogram(
            conn,
            PAIRS_QUERY,
            "chosen vs rejected tokens (all pairs)",
            histogram_file,
            redraw=config.full_rebuild or settings.full_rebuild(),
        )
    stats: dict[str, dg.MetadataValue] = {"audit": dg.MetadataValue.md(markdown_audit_table(audits))}
    for (kind, name), result in audits.items():
        for field in PLOTTED:
            stats[f"{kind}/{name}/{field}"] = dg.MetadataValue.float(float(getattr(result, field)))
    stats.update(histogram_metadata(histogram, histogram_file))
    pairs = audits[("overall", "all")].pairs if audits else 0
    context.log.info(f"{pairs} pairs audited; balancing kept {kept}, dropped {balance.dropped_counts}")
    derived = {
        "chosen_tokens": ["chosen"],
        "rejected_tokens": ["rejected"],
        "length_diff": ["chosen", "rejected"],
        "is_tie": ["chosen", "rejected"],
        "score_margin": ["score_chosen", "score_rejected"],
    }
    stats["dagster/column_lineage"] = column_lineage(
        {
            c.name: [(SILVER_RECORDS_KEY, name) for name in derived.get(c.name, [c.name])]
            for c in SILVER_PREFERENCE_PAIRS.columns
        }
    )
    reuse = {
        k: dg.MetadataValue.int(v)
        for k, v in {
            **built.reuse.metadata("preference_pairs"),
            **built.synced.metadata("silver_preference_pairs"),
        }.items()
    }
    yield dg.MaterializeResult(asset_key=PAIRS_KEY, metadata={**pairs_meta, **stats, **reuse})
    yield dg.MaterializeResult(asset_key=AUDIT_KEY, metadata=audit_meta)
    yield dg.MaterializeResult(
        asset_key=BALANCED_KEY,
        metadata={
            **balanced_meta,
            **{k: dg.MetadataValue.int(v) for k, v in balanced.metadata("silver_preference_pairs_balanced").items()},
            "dropped": dg.MetadataValue.json(balance.dropped_counts),
            "strata": dg.MetadataValue.json(balance.strata),
        },
    )
    yield dg.MaterializeResult(
        asset_key=DROPS_KEY,
        metadata={**drops_meta, "reasons": dg.MetadataValue.json(DROP_REASONS)},
    )
    yield dg.MaterializeResult(asset_key=JUDGE_AUDIT_KEY, metadata={**judge_meta, **judge_bias_metadata(judge_bias)})
    yield dg.MaterializeResult(asset_key=AGREEMENT_KEY, metadata={**agreement_meta, **agreement_metadata(agreement)})
