"""Turn depth and response length of SFT rows: how many assistant turns a conversation has, and how many tokens
an assistant turn trains. Set-based DuckDB SQL over any relation of SFT rows (gold.sft, a mixture, a subquery);
no Dagster here.

Single-turn data makes single-turn models, so the share of multi-turn conversations is watched per source and
for a whole training set (the ``sft_turn_depth_check`` on gold.sft, and any mixture that calls
:func:`turn_depth`).

Definitions:

- **turns** of a row: its assistant messages, counted in the rendered conversation (the first ``num_messages``
  messages when the relation has that column, so a row truncated to fit ``max_seq_len`` counts what is trained;
  all of ``messages`` otherwise). A row is **multi-turn** when it has at least two.
- **turns histogram**: rows per number of turns; rows with :data:`HISTOGRAM_CAP` turns or more share the last
  bucket, keyed ``"<cap>+"``.
- **tokens per assistant turn** (when the relation has ``labels``): per row, its trained tokens (labels other
  than -100) over its trained turns (maximal runs of trained labels: the template's untrained header separates
  two assistant turns, so each run is one turn, whatever ``train_on`` was). ``tokens_per_turn_mean`` is
  sum(trained tokens) / sum(trained turns) over the group (the mean over turns); ``p50`` / ``p90`` are
  quantiles of the per-row means (exact, ``quantile_cont``). The trained tokens include each turn's
  end-of-turn marker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import duckdb

HISTOGRAM_CAP = 8  # rows with this many turns or more share the last histogram bucket ("8+")
ALL = "all"  # the group name when the rows are not grouped


@dataclass(frozen=True)
class TurnDepth:
    """Turn-depth statistics of one group of SFT rows (see the module docstring)."""

    group: str  # the group's value of the grouping column, or "all"
    rows: int  # SFT rows in the group
    turns_histogram: dict[str, int]  # rows per number of assistant turns ("1", "2", ..., "8+"), zero buckets left out
    multi_turn_rows: int  # rows with at least two assistant turns
    multi_turn_share: float  # multi_turn_rows / rows
    mean_turns: float  # mean assistant turns per row
    trained_turns: int | None  # trained assistant turns (runs of trained labels); None without labels
    tokens_per_turn_mean: float | None  # sum(trained tokens) / sum(trained turns); None without labels
    tokens_per_turn_p50: float | None  # median of the per-row tokens per trained turn
    tokens_per_turn_p90: float | None  # 90th percentile of the per-row tokens per trained turn

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain Python values (for Dagster metadata or JSON)."""
        return asdict(self)


def _columns(conn: duckdb.DuckDBPyConnection, relation: str, params: dict[str, Any]) -> set[str]:
    return {column[0] for column in conn.execute(f"SELECT * FROM {relation} LIMIT 0", params).description}


def turn_depth(
    conn: duckdb.DuckDBPyConnection,
    relation: str,
    group_by: str | None = "source",
    params: Mapping[str, Any] | None = None,
) -> dict[str, TurnDepth]:
    """:class:`TurnDepth` per value of ``group_by`` (a column of ``relation``), ordered by group; ``group_by=None``
    gives one group, ``"all"``. Empty relation: empty dict.

    ``relation`` is a table name or a parenthesised query (bound ``params`` allowed) over SFT rows with a
    ``messages`` column (``STRUCT(role, content)[]``) and optionally ``num_messages`` and ``labels`` (gold.sft has
    all three). Everything is computed by DuckDB over the whole relation in one aggregate query;
    :func:`turn_depth_with_overall` gives the groups and the whole relation from that same one scan.
    """
    if group_by is None:
        return turn_depth_with_overall(conn, relation, None, params)[1]
    return turn_depth_with_overall(conn, relation, group_by, params)[0]


def turn_depth_with_overall(
    conn: duckdb.DuckDBPyConnection,
    relation: str,
    group_by: str | None = "source",
    params: Mapping[str, Any] | None = None,
) -> tuple[dict[str, TurnDepth], dict[str, TurnDepth]]:
    """``(turn_depth(conn, relation, group_by, params), turn_depth(conn, relation, None, params))`` from one scan
    of ``relation`` (GROUPING SETS), with the same figures as the two calls; ``group_by=None`` gives ``({}, all)``.

    The per-row work (assistant turns, trained tokens and turns from the labels) is what costs, so it is done
    once per row for both groupings, and the turns histogram comes from the same aggregate.
    """
    bound = dict(params or {})
    columns = _columns(conn, relation, bound)
    if "messages" not in columns:
        raise ValueError(f"{relation} has no messages column; turn depth needs the conversation")
    if group_by is not None and group_by not in columns:
        raise ValueError(f"{relation} has no column {group_by!r} to group by")
    group = f'CAST("{group_by}" AS VARCHAR)' if group_by else "NULL::VARCHAR"
    per_row = turn_depth_rows_sql(columns, relation, group)
    return turn_depth_from_rows(conn, per_row, group_by is not None, bound)


def turn_depth_rows_sql(columns: set[str], relation: str, group: str, key: str | None = None) -> str:
    """SQL for the per-row figures of the rows of ``relation`` (whose columns are ``columns``): ``row_key`` (column
    ``key``, or a row number without one), ``grp`` (the SQL expression ``group``), ``turns`` (assistant turns),
    ``trained_tokens`` and ``trained_turns`` (null without labels). What :func:`turn_depth_from_rows` aggregates;
    kept per row, a table's figures need only its changed rows' (gold.sft's row statistics)."""
    # The roles alone, then the rendered slice: filtering the whole message structs (contents and tool calls
    # included) costs five times as much for the same count.
    roles = "list_transform(messages, lambda m: m.role)"
    rendered = f"{roles}[1:num_messages]" if "num_messages" in columns else roles
    turns = f"len(list_filter({rendered}, lambda role: role = 'assistant'))"
    row_key = key or "row_number() OVER ()"
    if "labels" in columns:
        # Each label next to the one before it (-100 before the first), from two unnests that DuckDB runs in step;
        # a trained label after an untrained one starts a trained turn. Counted per row (row_key) in one hash
        # aggregate: half the CPU of list lambdas that look back at labels[i - 1]. The unnested list has at least
        # one element, so every row is kept; a row without labels (NULL) has no token figures.
        return f"""
            SELECT row_key, any_value(grp) AS grp, any_value(turns) AS turns,
                   CASE WHEN NOT any_value(no_labels) THEN count(*) FILTER (WHERE label <> -100) END AS trained_tokens,
                   CASE WHEN NOT any_value(no_labels)
                        THEN count(*) FILTER (WHERE label <> -100 AND previous = -100) END AS trained_turns
            FROM (
                SELECT row_key, grp, turns, labels IS NULL AS no_labels,
                       unnest(coalesce(labels, [])) AS label,
                       unnest(list_prepend(-100, coalesce(labels, []))) AS previous
                FROM (SELECT {row_key} AS row_key, {group} AS grp, {turns} AS turns, labels FROM {relation})
            )
            GROUP BY row_key
        """
    return (
        f"SELECT {row_key} AS row_key, {group} AS grp, {turns} AS turns, NULL::BIGINT AS trained_tokens, "
        f"NULL::BIGINT AS trained_turns FROM {relation}"
    )


def turn_depth_from_rows(
    conn: duckdb.DuckDBPyConnection, per_row: str, by_group: bool, params: Mapping[str, Any] | None = None
) -> tuple[dict[str, TurnDepth], dict[str, TurnDepth]]:
    """``(by group, overall)`` :class:`TurnDepth` from the query ``per_row`` (bound ``params``) of per-row figures
    (``grp``, ``turns``, ``trained_tokens``, ``trained_turns``: :func:`turn_depth_rows_sql`), ``by_group`` False when
    ``grp`` is one constant (then ``({}, overall)``)."""
    rows = conn.execute(
        f"""
        WITH r AS ({per_row})
        SELECT grouping(grp) = 1 AS overall, grp, count(*), count(*) FILTER (WHERE turns >= 2), avg(turns),
               sum(trained_turns), sum(trained_tokens) / nullif(sum(trained_turns), 0),
               quantile_cont(trained_tokens / trained_turns, 0.5) FILTER (WHERE trained_turns > 0),
               quantile_cont(trained_tokens / trained_turns, 0.9) FILTER (WHERE trained_turns > 0),
               histogram(least(turns, {HISTOGRAM_CAP}))
        FROM r GROUP BY GROUPING SETS ((grp), ()) ORDER BY overall, grp
        """,
        dict(params or {}),
    ).fetchall()
    grouped: dict[str, TurnDepth] = {}
    overall: dict[str, TurnDepth] = {}
    for is_overall, grp, n, multi, mean_turns, trained_turns, per_turn, p50, p90, buckets in rows:
        # The grand total of an empty relation is a row of zero rows (no group); without group_by the one group
        # (a constant) is the total again.
        if not n or (not by_group and not is_overall):
            continue
        depth = TurnDepth(
            group=ALL if is_overall else grp,
            rows=n,
            turns_histogram={
                f"{bucket}+" if bucket >= HISTOGRAM_CAP else str(bucket): count
                for bucket, count in sorted(buckets.items())
            },
            multi_turn_rows=multi,
            multi_turn_share=multi / n,
            mean_turns=float(mean_turns),
            trained_turns=None if trained_turns is None else int(trained_turns),
            tokens_per_turn_mean=None if per_turn is None else float(per_turn),
            tokens_per_turn_p50=None if p50 is None else float(p50),
            tokens_per_turn_p90=None if p90 is None else float(p90),
        )
        (overall if is_overall else grouped)[depth.group] = depth
    return grouped, overall


def below_multi_turn_floor(depth: TurnDepth, floor: float, min_rows: int = 1) -> bool:
    """Whether a group with at least ``min_rows`` rows has a multi-turn share below ``floor`` (smaller groups are
    not judged: a handful of rows says little about a training set's depth)."""
    return depth.rows >= min_rows and depth.multi_turn_share < floor


def markdown_turn_depth_table(depths: Mapping[str, TurnDepth]) -> str:
    """A Markdown table, one row per group (for the Dagster UI)."""

    def fmt(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    lines = [
        "| group | rows | multi-turn share | mean turns | turns histogram | tokens / assistant turn (mean, p50, p90) |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in depths.items():
        histogram = ", ".join(f"{k}: {v}" for k, v in d.turns_histogram.items())
        lines.append(
            f"| `{name}` | {d.rows} | {d.multi_turn_share:.3f} | {d.mean_turns:.2f} | {histogram} "
            f"| {fmt(d.tokens_per_turn_mean)}, {fmt(d.tokens_per_turn_p50)}, {fmt(d.tokens_per_turn_p90)} |"
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "ALL",
    "HISTOGRAM_CAP",
    "TurnDepth",
    "below_multi_turn_floor",
    "markdown_turn_depth_table",
    "turn_depth",
    "turn_depth_from_rows",
    "turn_depth_rows_sql",
    "turn_depth_with_overall",
]
