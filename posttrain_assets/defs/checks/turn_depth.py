"""sft_turn_depth_check: warn when the SFT training set is (almost) all single-turn.

Single-turn data makes single-turn models. The check measures gold.sft's turn depth
(:func:`posttrain_assets.sft.turn_depth.turn_depth`) and warns, without blocking anything, when the share of
multi-turn conversations in the whole table is below the configured floor. Per-source figures are in the
metadata; a single-turn source (Alpaca-style instructions) is normal on its own, so only the set is judged.
"""

from contextlib import suppress

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from posttrain_assets.curation.tables import GOLD_MIXTURES
from posttrain_assets.defs.checks.verdicts import warehouse_check
from posttrain_assets.sft.row_stats import row_stats_table, turn_depth_from_row_stats
from posttrain_assets.sft.turn_depth import (
    ALL,
    TurnDepth,
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


def gold_sft_turn_depth(conn: duckdb.DuckDBPyConnection) -> tuple[dict[str, TurnDepth], dict[str, TurnDepth]]:
    """gold.sft's turn depth by source and overall. From the per-row figures gold_sft keeps beside the table
    (``sft.row_stats``, written in the transaction that writes gold.sft) while they cover as many rows as the table
    holds: a narrow aggregate instead of unnesting every row's labels again. Otherwise from the table itself."""
    stats = row_stats_table(GOLD_SFT).qualified
    with suppress(duckdb.CatalogException):  # no statistics stored yet
        (table_rows, stats_rows) = conn.execute(
            f"SELECT (SELECT count(*) FROM {GOLD_SFT.qualified}), (SELECT count(*) FROM {stats})"
        ).fetchone()
        if table_rows == stats_rows:
            return turn_depth_from_row_stats(conn, GOLD_SFT)
    return turn_depth_with_overall(conn, GOLD_SFT.qualified)


def turn_depth_check_result(
    depth_by_source: tuple[dict[str, TurnDepth], dict[str, TurnDepth]], config: TurnDepthConfig, what: str
) -> dg.AssetCheckResult:
    """The WARN verdict on SFT rows whose turn depth by source and overall is ``depth_by_source``; ``what`` names
    them."""
    by_source, overall = depth_by_source
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
    with duckdb.get_connection() as conn:
        depth = gold_sft_turn_depth(conn)
    return turn_depth_check_result(depth, config, GOLD_SFT.qualified)


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
