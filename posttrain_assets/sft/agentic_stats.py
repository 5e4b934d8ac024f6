"""Agentic and reasoning statistics of SFT rows, per source: how much of the data calls tools, how many calls a
turn makes, and how much of the assistant's text is reasoning. Set-based DuckDB SQL over any relation of SFT rows
with a ``messages`` column (gold.sft, a mixture); the token counts use the project tokenizer. No Dagster here.

Definitions (over the rendered conversation: the first ``num_messages`` messages when the relation has that
column):

- **rows_with_tools**: rows with at least one assistant tool call; ``tools_share`` = that / rows.
- **calls_per_turn_histogram**: assistant turns per number of tool calls they make (``"0"``, ``"1"``, ...; turns
  with :data:`CALLS_HISTOGRAM_CAP` calls or more share the last bucket, ``"8+"``). A turn that calls hundreds of
  tools in parallel is the symptom of a model that never learned to stop (the quality gate caps it,
  ``max_parallel_tool_calls``).
- **rows_with_reasoning**: rows with at least one assistant ``reasoning_content``.
- **reasoning_tokens** / **answer_tokens**: tokens of the assistant turns' reasoning and of their content, counted
  with the tokenizer over the rows that have reasoning (the rows where the split matters; counting every answer of a
  million-row corpus again would cost a second tokenisation), and ``reasoning_share`` = reasoning / (reasoning +
  answer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import duckdb

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CALLS_HISTOGRAM_CAP = 8
ALL = "all"
# Texts per tokenizer call when counting reasoning and answer tokens.
_ENCODE_BATCH = 1024


@dataclass(frozen=True)
class AgenticStats:
    """Tool-use and reasoning statistics of one group of SFT rows (see the module docstring)."""

    group: str
    rows: int
    rows_with_tools: int
    tools_share: float
    tool_calls: int
    assistant_turns: int
    calls_per_turn_histogram: dict[str, int]
    rows_with_reasoning: int
    reasoning_tokens: int
    answer_tokens: int
    reasoning_share: float | None  # None when no row has reasoning

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain Python values (for Dagster metadata or JSON)."""
        return asdict(self)


def agentic_stats(
    conn: duckdb.DuckDBPyConnection,
    relation: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    group_by: str | None = "source",
    params: Mapping[str, Any] | None = None,
) -> dict[str, AgenticStats]:
    """:class:`AgenticStats` per value of ``group_by`` (``None``: one group, ``"all"``), ordered by group; token
    counts are 0 without a ``tokenizer``. ``relation`` is a table name or a parenthesised query (bound ``params``
    allowed) over SFT rows with ``messages`` and optionally ``num_messages``."""
    bound = dict(params or {})
    columns = {c[0] for c in conn.execute(f"SELECT * FROM {relation} LIMIT 0", bound).description}
    if "messages" not in columns:
        raise ValueError(f"{relation} has no messages column")
    group = f'CAST("{group_by}" AS VARCHAR)' if group_by else f"'{ALL}'"
    rendered = "messages[1:num_messages]" if "num_messages" in columns else "messages"
    # rows are numbered first, then unnested: one row_id per conversation
    turns = f"""
        SELECT grp, row_id, unnest(msgs) AS m FROM (
            SELECT {group} AS grp, row_number() OVER () AS row_id, {rendered} AS msgs FROM {relation}
        )
    """
    per_row = f"SELECT *, 0 AS reasoning_tokens, 0 AS answer_tokens FROM ({agentic_rows_sql(columns, relation, group)})"
    stats = agentic_stats_from_rows(conn, per_row, bound)
    if tokenizer is None:
        return stats
    tokens = _reasoning_tokens(conn, turns, bound, tokenizer)
    return {grp: _with_tokens(s, *tokens.get(grp, (0, 0))) for grp, s in stats.items()}


def agentic_rows_sql(columns: set[str], relation: str, group: str, key: str | None = None) -> str:
    """SQL for the per-row figures of the rows of ``relation`` (whose columns are ``columns``) that have messages:
    ``row_key`` (column ``key``, or a row number without one), ``grp`` (the SQL expression ``group``), ``turns``
    (assistant turns rendered), ``calls`` (their tool calls), ``reasons`` (one has reasoning) and ``call_buckets``
    (each turn's tool calls, capped at :data:`CALLS_HISTOGRAM_CAP`, in order). A row with no message is left out
    (it has no assistant turn, so no figure). What :func:`agentic_stats_from_rows` aggregates, with the rows'
    ``reasoning_tokens`` and ``answer_tokens`` (:func:`reasoning_tokens_by_row`)."""
    rendered = "messages[1:num_messages]" if "num_messages" in columns else "messages"
    row_key = key or "row_number() OVER ()"
    assistant = "FILTER (WHERE m.role = 'assistant')"
    return f"""
        SELECT row_key, any_value(grp) AS grp, count(*) {assistant} AS turns,
               CAST(coalesce(sum(coalesce(len(m.tool_calls), 0)) {assistant}, 0) AS BIGINT) AS calls,
               coalesce(bool_or(m.reasoning_content IS NOT NULL AND m.reasoning_content <> '') {assistant}, false)
                   AS reasons,
               coalesce(list(least(coalesce(len(m.tool_calls), 0), {CALLS_HISTOGRAM_CAP})) {assistant}, [])
                   AS call_buckets
        FROM (
            SELECT row_key, grp, unnest(msgs) AS m
            FROM (SELECT {row_key} AS row_key, {group} AS grp, {rendered} AS msgs FROM {relation})
        )
        GROUP BY row_key
    """


def agentic_stats_from_rows(
    conn: duckdb.DuckDBPyConnection, per_row: str, params: Mapping[str, Any] | None = None
) -> dict[str, AgenticStats]:
    """:class:`AgenticStats` per ``grp`` of the query ``per_row`` (bound ``params``) of per-row figures (``grp``,
    ``turns``, ``calls``, ``reasons``, ``call_buckets``: :func:`agentic_rows_sql`; ``reasoning_tokens``,
    ``answer_tokens``), ordered by group; the rows without an assistant turn are not counted, and a group with none
    is left out."""
    bound = dict(params or {})
    totals = conn.execute(
        f"""
        WITH r AS ({per_row})
        SELECT grp, count(*) FILTER (WHERE turns > 0), count(*) FILTER (WHERE calls > 0), sum(calls), sum(turns),
               count(*) FILTER (WHERE reasons), sum(reasoning_tokens), sum(answer_tokens)
        FROM r GROUP BY grp HAVING count(*) FILTER (WHERE turns > 0) > 0 ORDER BY grp
        """,
        bound,
    ).fetchall()
    histogram_rows = conn.execute(
        f"""
        WITH r AS ({per_row})
        SELECT grp, bucket, count(*) FROM (SELECT grp, unnest(call_buckets) AS bucket FROM r)
        GROUP BY ALL ORDER BY ALL
        """,
        bound,
    ).fetchall()
    histograms: dict[str, dict[str, int]] = {}
    for grp, bucket, count in histogram_rows:
        key = f"{bucket}+" if bucket == CALLS_HISTOGRAM_CAP else str(bucket)
        histograms.setdefault(grp, {})[key] = count
    out: dict[str, AgenticStats] = {}
    for grp, rows, with_tools, calls, assistant_turns, with_reasoning, reasoning, answer in totals:
        stats = AgenticStats(
            group=grp,
            rows=rows,
            rows_with_tools=with_tools,
            tools_share=round(with_tools / rows, 4) if rows else 0.0,
            tool_calls=int(calls or 0),
            assistant_turns=int(assistant_turns or 0),
            calls_per_turn_histogram=histograms.get(grp, {}),
            rows_with_reasoning=with_reasoning,
            reasoning_tokens=0,
            answer_tokens=0,
            reasoning_share=None,
        )
        out[grp] = _with_tokens(stats, int(reasoning or 0), int(answer or 0))
    return out


def _with_tokens(stats: AgenticStats, reasoning: int, answer: int) -> AgenticStats:
    """``stats`` with its reasoning and answer tokens, and the reasoning share computed from them."""
    share = round(reasoning / (reasoning + answer), 4) if stats.rows_with_reasoning and reasoning + answer else None
    return dataclasses.replace(stats, reasoning_tokens=reasoning, answer_tokens=answer, reasoning_share=share)


def reasoning_tokens_by_row(
    conn: duckdb.DuckDBPyConnection, columns: set[str], relation: str, key: str, tokenizer: PreTrainedTokenizerBase
) -> dict[Any, tuple[int, int]]:
    """(reasoning tokens, answer tokens) per row of ``relation`` (whose columns are ``columns``) that has reasoning,
    by its column ``key``: the rows' shares of :func:`agentic_stats`'s token counts."""
    rendered = "messages[1:num_messages]" if "num_messages" in columns else "messages"
    turns = f"SELECT {key} AS grp, {key} AS row_id, unnest({rendered}) AS m FROM {relation}"
    return _reasoning_tokens(conn, turns, {}, tokenizer)


def _reasoning_tokens(
    conn: duckdb.DuckDBPyConnection, turns: str, params: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> dict[Any, tuple[int, int]]:
    """(reasoning tokens, answer tokens) per group, over the assistant turns of rows that have reasoning."""
    cursor = conn.execute(
        f"""
        WITH turns AS ({turns}), reasoning_rows AS (
            SELECT DISTINCT row_id FROM turns
            WHERE m.role = 'assistant' AND m.reasoning_content IS NOT NULL AND m.reasoning_content <> ''
        )
        SELECT grp, coalesce(m.reasoning_content, ''), coalesce(m.content, '')
        FROM turns JOIN reasoning_rows USING (row_id) WHERE m.role = 'assistant'
        """,
        params,
    )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    totals: dict[str, list[int]] = {}
    while batch := cursor.fetchmany(_ENCODE_BATCH):
        texts = [text for _, reasoning, content in batch for text in (reasoning, content)]
        if backend is not None:
            lengths = [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        else:
            lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for k, (grp, _, _) in enumerate(batch):
            total = totals.setdefault(grp, [0, 0])
            total[0] += lengths[2 * k]
            total[1] += lengths[2 * k + 1]
    return {grp: (r, a) for grp, (r, a) in totals.items()}


def agentic_stats_with_overall(
    conn: duckdb.DuckDBPyConnection,
    relation: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    group_by: str = "source",
    params: Mapping[str, Any] | None = None,
) -> tuple[dict[str, AgenticStats], dict[str, AgenticStats]]:
    """``(agentic_stats(... group_by ...), agentic_stats(... None ...))`` with the same figures, from one pass over
    ``relation``: every figure of the whole relation is a sum of its groups' (:func:`combined`), so the rows are
    read and their reasoning tokenised once, not twice."""
    groups = agentic_stats(conn, relation, tokenizer, group_by, params)
    return groups, ({ALL: combined(groups.values())} if groups else {})


def combined(groups: Iterable[AgenticStats], name: str = ALL) -> AgenticStats:
    """The statistics of the union of disjoint ``groups`` (what :func:`agentic_stats` gives for their rows as one
    group): counts, token totals and histograms summed, shares computed again from the sums."""
    groups = list(groups)
    rows = sum(g.rows for g in groups)
    with_tools = sum(g.rows_with_tools for g in groups)
    with_reasoning = sum(g.rows_with_reasoning for g in groups)
    reasoning = sum(g.reasoning_tokens for g in groups)
    answer = sum(g.answer_tokens for g in groups)
    buckets: dict[str, int] = {}
    for g in groups:
        for bucket, count in g.calls_per_turn_histogram.items():
            buckets[bucket] = buckets.get(bucket, 0) + count
    return AgenticStats(
        group=name,
        rows=rows,
        rows_with_tools=with_tools,
        tools_share=round(with_tools / rows, 4) if rows else 0.0,
        tool_calls=sum(g.tool_calls for g in groups),
        assistant_turns=sum(g.assistant_turns for g in groups),
        # in bucket order, as the SQL of agentic_stats orders them ("0", "1", ..., "8+")
        calls_per_turn_histogram={b: buckets[b] for b in sorted(buckets, key=lambda b: int(b.rstrip("+")))},
        rows_with_reasoning=with_reasoning,
        reasoning_tokens=reasoning,
        answer_tokens=answer,
        reasoning_share=round(reasoning / (reasoning + answer), 4) if with_reasoning and reasoning + answer else None,
    )


def markdown_agentic_table(stats: Mapping[str, AgenticStats]) -> str:
    """The statistics as a markdown table, one line per group."""
    lines = [
        "| group | rows | with tools | tool calls | calls per turn | with reasoning | reasoning share |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        histogram = ", ".join(f"{k}: {v}" for k, v in s.calls_per_turn_histogram.items())
        share = "" if s.reasoning_share is None else f"{s.reasoning_share:.1%}"
        lines.append(
            f"| {name} | {s.rows} | {s.rows_with_tools} ({s.tools_share:.1%}) | {s.tool_calls} | {histogram} | "
            f"{s.rows_with_reasoning} | {share} |"
        )
    return "\n".join(lines)
