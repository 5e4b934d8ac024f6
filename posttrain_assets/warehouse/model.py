"""The table model: a table's schema, name, columns and meaning, and the SQL derived from them."""

from __future__ import annotations

from dataclasses import dataclass

# A conversation: role and content, plus the structured fields of agentic and reasoning turns (null where absent;
# posttrain_assets.records.tools describes them).
MESSAGES_TYPE = (
    "STRUCT(role VARCHAR, content VARCHAR, reasoning_content VARCHAR, "
    'tool_calls STRUCT(id VARCHAR, "type" VARCHAR, "function" STRUCT("name" VARCHAR, arguments VARCHAR))[], '
    'tool_call_id VARCHAR, "name" VARCHAR)[]'
)
ORIGIN_TYPE = (
    'STRUCT(source VARCHAR, uri VARCHAR, file VARCHAR, "row" BIGINT, record_sha256 VARCHAR, file_sha256 VARCHAR)'
)


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str
    nullable: bool = True
    # SQL over the other columns of the rows being inserted that :meth:`Table.insert_sql` stores in this column,
    # instead of reading it from the inserted relation (e.g. a content hash DuckDB computes as a row is cached).
    computed: str | None = None


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    description: str
    columns: tuple[Column, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(f"{self.qualified} has no column {name!r}")

    def columns_sql(self) -> str:
        """The column list of a CREATE TABLE statement (identifiers are constants of this module)."""
        return ",\n  ".join(f'"{c.name}" {c.type}' + ("" if c.nullable else " NOT NULL") for c in self.columns)

    def create_sql(self, *, replace: bool = False) -> str:
        """CREATE [OR REPLACE] TABLE statement, with its schema."""
        verb = "CREATE OR REPLACE TABLE" if replace else "CREATE TABLE IF NOT EXISTS"
        return f"CREATE SCHEMA IF NOT EXISTS {self.schema};\n{verb} {self.qualified} (\n  {self.columns_sql()}\n)"

    def insert_sql(self, relation: str) -> str:
        """INSERT of every column, by name, from a registered relation (an Arrow table); a computed column's value
        is its expression over the relation's columns."""
        names = ", ".join(f'"{n}"' for n in self.column_names)
        values = ", ".join(c.computed or f'"{c.name}"' for c in self.columns)
        return f"INSERT INTO {self.qualified} ({names}) SELECT {values} FROM {relation}"
