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
    all three). Everything is computed by DuckDB over the whole relation in two aggregate queries.
    """
    bound = dict(params or {})
    columns = _columns(conn, relation, bound)
    if "messages" not in columns:
        raise ValueError(f"{relation} has no messages column; turn depth needs the conversation")
    if group_by is not None and group_by not in columns:
        raise ValueError(f"{relation} has no column {group_by!r} to group by")
    group = f'CAST("{group_by}" AS VARCHAR)' if group_by else f"'{ALL}'"
    rendered = "messages[1:num_messages]" if "num_messages" in columns else "messages"
    has_labels = "labels" in columns
    trained = (
        "len(list_filter(labels, lambda x: x <> -100))" if has_labels else "NULL::BIGINT",
        "len(list_filter(labels, lambda x, i: x <> -100 AND (i = 1 OR labels[i - 1] = -100)))"
        if has_labels
        else "NULL::BIGINT",
    )
    per_row = f"""
        SELECT {group} AS grp,
               len(list_filter({rendered}, lambda m: m.role = 'assistant')) AS turns,
               {trained[0]} AS trained_tokens,
               {trained[1]} AS trained_turns
        FROM {relation}
    """
    summary = conn.execute(
        f"""
        WITH r AS ({per_row})
        SELECT grp, count(*), count(*) FILTER (WHERE turns >= 2), avg(turns),
               sum(trained_turns), sum(trained_tokens) / nullif(sum(trained_turns), 0),
               quantile_cont(trained_tokens / trained_turns, 0.5) FILTER (WHERE trained_turns > 0),
               quantile_cont(trained_tokens / trained_turns, 0.9) FILTER (WHERE trained_turns > 0)
        FROM r GROUP BY grp ORDER BY grp
        """,
        bound,
    ).fetchall()
    buckets = conn.execute(
        f"""
        WITH r AS ({per_row})
        SELECT grp, least(turns, {HISTOGRAM_CAP}) AS bucket, count(*) FROM r GROUP BY ALL ORDER BY grp, bucket
        """,
        bound,
    ).fetchall()
    histograms: dict[str, dict[str, int]] = {}
    for grp, bucket, rows in buckets:
        key = f"{bucket}+" if bucket >= HISTOGRAM_CAP else str(bucket)
        histograms.setdefault(grp, {})[key] = rows
    return {
        grp: TurnDepth(
            group=grp,
            rows=rows,
            turns_histogram=histograms[grp],
            multi_turn_rows=multi,
            multi_turn_share=multi / rows,
            mean_turns=float(mean_turns),
            trained_turns=None if trained_turns is None else int(trained_turns),
            tokens_per_turn_mean=None if per_turn is None else float(per_turn),
            tokens_per_turn_p50=None if p50 is None else float(p50),
            tokens_per_turn_p90=None if p90 is None else float(p90),
        )
        for grp, rows, multi, mean_turns, trained_turns, per_turn, p50, p90 in summary
    }


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


__all__ = ["ALL", "HISTOGRAM_CAP", "TurnDepth", "below_multi_turn_floor", "markdown_turn_depth_table", "turn_depth"]
