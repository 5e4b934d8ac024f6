"""Metadata every table asset reports: row count, column schema, a preview, counts by group."""

from typing import Any

import dagster as dg
import duckdb

from posttrain_assets.warehouse.model import Table

PREVIEW_ROWS = 5
PREVIEW_CELL_CHARS = 80


def column_schema(table: Table) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=c.name,
                type=c.type,
                description=c.description,
                constraints=dg.TableColumnConstraints(nullable=c.nullable),
            )
            for c in table.columns
        ]
    )


def markdown_table(headers: list[str], rows: list[tuple[Any, ...]]) -> str:
    def cell(value: Any) -> str:
        text = str(value).replace("\n", "⏎").replace("|", "\\|")
        return text if len(text) <= PREVIEW_CELL_CHARS else text[: PREVIEW_CELL_CHARS - 1] + "…"

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def table_metadata(
    conn: duckdb.DuckDBPyConnection,
    table: Table,
    *,
    preview_columns: list[str],
    where: str = "TRUE",
    params: list[Any] | None = None,
    group_by: str | None = None,
) -> dict[str, Any]:
    """Standard metadata for ``table``; ``where`` is a constant SQL predicate with ``?`` params."""
    params = params or []
    count = conn.execute(f"SELECT count(*) FROM {table.qualified} WHERE {where}", params).fetchone()[0]
    cols = ", ".join(f'"{c}"' for c in preview_columns)
    preview = conn.execute(
        f"SELECT {cols} FROM {table.qualified} WHERE {where} ORDER BY ALL LIMIT {PREVIEW_ROWS}", params
    ).fetchall()
    metadata: dict[str, Any] = {
        "dagster/row_count": dg.MetadataValue.int(count),
        "dagster/column_schema": column_schema(table),
        "dagster/table_name": dg.MetadataValue.text(table.qualified),
        "preview": dg.MetadataValue.md(markdown_table(preview_columns, preview)),
    }
    if group_by:
        groups = conn.execute(
            f"SELECT {group_by}, count(*) FROM {table.qualified} WHERE {where} GROUP BY ALL ORDER BY ALL", params
        ).fetchall()
        metadata[f"rows_by_{group_by}"] = dg.MetadataValue.md(markdown_table([group_by, "rows"], groups))
        for key, n in groups:
            metadata[f"rows/{key}"] = dg.MetadataValue.int(n)
    return metadata


def column_lineage(deps: dict[str, list[tuple[dg.AssetKey, str]]]) -> dg.TableColumnLineage:
    """``dagster/column_lineage`` from {column: [(upstream asset, upstream column), ...]}."""
    return dg.TableColumnLineage(
        deps_by_column={
            column: [dg.TableColumnDep(asset_key=key, column_name=name) for key, name in upstream]
            for column, upstream in deps.items()
        }
    )
