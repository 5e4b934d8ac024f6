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
    per_row = conn.execute(
        f"""
        WITH turns AS ({turns}), assistant AS (
            SELECT grp, row_id, coalesce(len(m.tool_calls), 0) AS calls,
                   m.reasoning_content IS NOT NULL AND m.reasoning_content <> '' AS reasons
            FROM turns WHERE m.role = 'assistant'
        ), rows AS (
            SELECT grp, row_id, sum(calls) AS calls, bool_or(reasons) AS reasons, count(*) AS turns
            FROM assistant GROUP BY grp, row_id
        )
        SELECT grp, count(*), count(*) FILTER (WHERE calls > 0), sum(calls), sum(turns),
               count(*) FILTER (WHERE reasons)
        FROM rows GROUP BY grp ORDER BY grp
        """,
        bound,
    ).fetchall()
    histogram_rows = conn.execute(
        f"""
        WITH turns AS ({turns})
        SELECT grp, least(coalesce(len(m.tool_calls), 0), {CALLS_HISTOGRAM_CAP}) AS bucket, count(*)
        FROM turns WHERE m.role = 'assistant' GROUP BY ALL ORDER BY ALL
        """,
        bound,
    ).fetchall()
    histograms: dict[str, dict[str, int]] = {}
    for grp, bucket, count in histogram_rows:
        key = f"{bucket}+" if bucket == CALLS_HISTOGRAM_CAP else str(bucket)
        histograms.setdefault(grp, {})[key] = count
    tokens = _reasoning_tokens(conn, turns, bound, tokenizer) if tokenizer is not None else {}
    out: dict[str, AgenticStats] = {}
    for grp, rows, with_tools, calls, assistant_turns, with_reasoning in per_row:
        reasoning, answer = tokens.get(grp, (0, 0))
        out[grp] = AgenticStats(
            group=grp,
            rows=rows,
            rows_with_tools=with_tools,
            tools_share=round(with_tools / rows, 4) if rows else 0.0,
            tool_calls=int(calls or 0),
            assistant_turns=int(assistant_turns or 0),
            calls_per_turn_histogram=histograms.get(grp, {}),
            rows_with_reasoning=with_reasoning,
            reasoning_tokens=reasoning,
            answer_tokens=answer,
            reasoning_share=round(reasoning / (reasoning + answer), 4)
            if with_reasoning and reasoning + answer
            else None,
        )
    return out


def _reasoning_tokens(
    conn: duckdb.DuckDBPyConnection, turns: str, params: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> dict[str, tuple[int, int]]:
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
