"""sft_turn_depth_check: warn when the SFT training set is (almost) all single-turn.

Single-turn data makes single-turn models. The check measures gold.sft's turn depth
(:func:`posttrain_assets.sft.turn_depth.turn_depth`) and warns, without blocking anything, when the share of
multi-turn conversations in the whole table is below the configured floor. Per-source figures are in the
metadata; a single-turn source (Alpaca-style instructions) is normal on its own, so only the set is judged.
"""

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.curation.tables import GOLD_MIXTURES
from posttrain_assets.defs.checks.verdicts import warehouse_check
from posttrain_assets.sft.turn_depth import (
    ALL,
    below_multi_turn_floor,
    markdown_turn_depth_table,
    turn_depth,
    turn_depth_with_overall,
)
from posttrain_assets.warehouse.catalogue import GOLD_SFT

# The SFT rows of every mixture as drawn (a row up-sampled by epochs counts once per copy, as it is trained), with
# the conversation and labels of its gold.sft row: what turn depth is measured on per mixture.
MIXTURE_SFT_ROWS = (
    f"(SELECT m.mixture, m.mixture || '/' || m.source AS mixture_source, g.messages, g.num_messages, g.labels "
    f"FROM {GOLD_MIXTURES.qualified} m JOIN {GOLD_SFT.qualified} g USING (id) WHERE m.regime = 'sft')"
)


class TurnDepthConfig(dg.Config):
    """The multi-turn floor of a training set (documented defaults; set in the launchpad)."""

    min_multi_turn_share: float = 0.2  # warn below this share of rows with two or more assistant turns
    min_rows: int = 50  # a set with fewer rows is reported, not judged


def turn_depth_check_result(
    duckdb: DuckDBResource, relation: str, config: TurnDepthConfig, what: str
) -> dg.AssetCheckResult:
    """The WARN verdict on the SFT rows of ``relation`` (a table or a parenthesised query); ``what`` names them."""
    with duckdb.get_connection() as conn:
        by_source, overall = turn_depth_with_overall(conn, relation)  # one scan for both
    metadata = {
        "turn_depth": dg.MetadataValue.md(markdown_turn_depth_table({**by_source, **overall})),
        "thresholds": dg.MetadataValue.json(config.model_dump()),
    }
    if not overall:
        return dg.AssetCheckResult(
            passed=True, severity=dg.AssetCheckSeverity.WARN, description=f"{what} has no rows", metadata=metadata
        )
    depth = overall[ALL]
    metadata["multi_turn_share"] = dg.MetadataValue.float(depth.multi_turn_share)
    metadata["rows"] = dg.MetadataValue.int(depth.rows)
    low = below_multi_turn_floor(depth, config.min_multi_turn_share, config.min_rows)
    if depth.rows < config.min_rows:
        verdict = f"not judged: fewer than {config.min_rows} rows"
    else:
        verdict = f"{'below' if low else 'at or above'} the floor {config.min_multi_turn_share:g}"
    return dg.AssetCheckResult(
        passed=not low,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{what}: multi-turn share {depth.multi_turn_share:.3f} ({depth.multi_turn_rows} of "
        f"{depth.rows} rows), {verdict}",
        metadata=metadata,
    )


@warehouse_check(
    asset=["gold", "sft"],
    description="Warns (never blocks) when the share of multi-turn conversations in gold.sft is below the floor.",
)
def sft_turn_depth_check(config: TurnDepthConfig, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    return turn_depth_check_result(duckdb, GOLD_SFT.qualified, config, GOLD_SFT.qualified)


@warehouse_check(
    asset=["gold", "mixtures"],
    description="Warns (never blocks) when an SFT mixture's share of multi-turn conversations is below the floor.",
)
def mixture_turn_depth_check(config: TurnDepthConfig, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    """Each SFT mixture of gold.mixtures judged on its own (rows as drawn); WARN when any is below the floor."""
    with duckdb.get_connection() as conn:
        by_mixture = turn_depth(conn, MIXTURE_SFT_ROWS, "mixture")
    metadata: dict[str, dg.MetadataValue] = {
        "turn_depth": dg.MetadataValue.md(markdown_turn_depth_table(by_mixture)),
        "thresholds": dg.MetadataValue.json(config.model_dump()),
        **{f"multi_turn_share/{name}": dg.MetadataValue.float(d.multi_turn_share) for name, d in by_mixture.items()},
    }
    if not by_mixture:
        return dg.AssetCheckResult(
            passed=True, severity=dg.AssetCheckSeverity.WARN, description="no SFT mixture", metadata=metadata
        )
    floor, min_rows = config.min_multi_turn_share, config.min_rows
    low = [name for name, d in by_mixture.items() if below_multi_turn_floor(d, floor, min_rows)]
    shares = ", ".join(f"{name} {d.multi_turn_share:.3f} ({d.rows} rows)" for name, d in by_mixture.items())
    verdict = (
        f"below the floor {config.min_multi_turn_share:g}: {', '.join(low)}"
        if low
        else f"none below the floor {config.min_multi_turn_share:g} (mixtures under {config.min_rows} rows not judged)"
    )
    return dg.AssetCheckResult(
        passed=not low,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"multi-turn share per SFT mixture: {shares}; {verdict}",
        metadata=metadata,
    )
