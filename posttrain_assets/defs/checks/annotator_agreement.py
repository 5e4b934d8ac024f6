"""annotator_agreement_check: warn when the annotators of a multi-rater preference source do not agree.

Re-measures the stored pairs (:func:`posttrain_assets.preference.labelling.annotator_agreement`) and warns, without
blocking, when a source with at least ``min_rated_pairs`` pairs scored by several annotators has an order alpha
below ``min_order_alpha``. A source whose alpha is undefined (every annotator gave every pair the same order, so
there is no variation to agree on) is reported, not judged. Human labels are only as good as their agreement;
the pairs the annotators disagree on are dropped from the balanced set by ``disagreement_policy``.
"""

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.checks.verdicts import warehouse_check
from posttrain_assets.defs.silver.preference_pairs import LengthConfoundConfig, agreement_metadata
from posttrain_assets.preference.labelling import Agreement, annotator_agreement
from posttrain_assets.warehouse.catalogue import SILVER_PREFERENCE_PAIRS
from posttrain_assets.warehouse.model import Table


def judged_sources(agreement: list[Agreement], config: LengthConfoundConfig) -> list[Agreement]:
    """The sources the check judges: enough rated pairs and a defined order alpha."""
    return [a for a in agreement if a.rated_pairs >= config.min_rated_pairs and a.order_alpha is not None]


def agreement_check_result(duckdb: DuckDBResource, table: Table, config: LengthConfoundConfig) -> dg.AssetCheckResult:
    """The WARN verdict on the pairs of ``table``."""
    with duckdb.get_connection() as conn:
        agreement = annotator_agreement(conn, table.qualified, config.min_pair_agreement)
    judged = judged_sources(agreement, config)
    low = [a for a in judged if a.order_alpha < config.min_order_alpha]
    if low:
        description = "; ".join(
            f"source {a.source}: order alpha {a.order_alpha:.3f} below {config.min_order_alpha:g} "
            f"({a.rated_pairs} rated pairs, {a.disagreeing_pairs} disagreeing)"
            for a in low
        )
    elif judged:
        description = f"{len(judged)} multi-rater source(s) at or above order alpha {config.min_order_alpha:g}: " + (
            ", ".join(a.source for a in judged)
        )
    else:
        description = (
            f"no source has {config.min_rated_pairs} or more pairs scored by several annotators and a defined alpha"
        )
    return dg.AssetCheckResult(
        passed=not low,
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={
            **agreement_metadata(agreement),
            "sources_judged": dg.MetadataValue.int(len(judged)),
            "thresholds": dg.MetadataValue.json(
                {k: getattr(config, k) for k in ("min_order_alpha", "min_rated_pairs", "min_pair_agreement")}
            ),
        },
    )


@warehouse_check(
    asset=["silver", "preference_pairs"],
    description="Warns (never blocks) when a multi-rater source's Krippendorff alpha of the annotators' orders is "
    "below the floor.",
)
def annotator_agreement_check(config: LengthConfoundConfig, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return agreement_check_result(duckdb, SILVER_PREFERENCE_PAIRS, config)
