"""Per-row stage caches: what a per-row stage computed for a row, kept under the key of everything it depends on.

A refresh computes a per-row stage only for rows whose key is new and reads every other row's result from the
stage's cache tables (schema ``cache``), so adding 10,000 rows to a million re-parses, re-gates and re-tokenises
10,000 rows. The key of a row has two parts:

- the row's own locator and content (e.g. source, file, row and ``record_sha256`` for the gate; the record's
  content id for tokenisation), and
- a **stage key** (:func:`stage_key`): a hash of the stage's config, the registry entry or tokenizer it uses,
  the installed versions of the libraries that decide its output, and a fingerprint of its own source code
  (:func:`code_fingerprint`). Changing any of them changes the key, so the next run recomputes exactly the rows
  it affects, with no manual wipe; editing the gate's code invalidates the gate's cache and nothing else.

Global decisions (exact and near dedup, decontamination, the kept member of a cluster, the regime split) are not
cached: they are recomputed as set operations over the cached per-row results, so a refresh gives the same tables
as a full build by construction (``posttrain_assets_tests/test_incremental_refresh.py`` checks it).

A cache table whose rows a synced table publishes may carry a ``content_hash`` (:func:`with_content_hash`):
DuckDB fingerprints the entry's published columns as it is inserted, and the sync derives its row fingerprints
from it instead of hashing every published row again, the same for the same content whatever the stage key.

Entries whose key no longer matches any current row are deleted at the end of the stage that owns them, so a
cache holds one entry per current row and a deleted source leaves nothing behind. A killed run leaves whole
batches (each written in one transaction) that the next run reuses.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from posttrain_assets.warehouse.io import fingerprint_sql
from posttrain_assets.warehouse.model import Column, Table

CACHE_SCHEMA = "cache"


def stage_key(stage: str, **parts: Any) -> str:
    """The sha256 (hex) of a stage's name and everything its per-row output depends on besides the row itself
    (``parts``: config values, hashes, versions; serialised as sorted JSON, anything else by ``str``)."""
    payload = json.dumps({"stage": stage, **parts}, sort_keys=True, default=_jsonable, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _jsonable(value: Any) -> Any:
    """JSON for what ``json`` cannot serialise: sets in sorted order (their iteration order varies between
    processes), dataclasses as dicts, anything else as its ``str``."""
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


@functools.cache
def code_fingerprint(*modules: str) -> str:
    """sha256 over the source files of ``modules`` (a package: every ``.py`` file under it), so a change to the
    code of a stage changes its stage key."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        module = importlib.import_module(name)
        path = Path(module.__file__ or "")
        files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
        for file in files:
            digest.update(str(file.relative_to(path.parent.parent)).encode("utf-8"))
            digest.update(file.read_bytes())
    return digest.hexdigest()


@functools.cache
def library_versions(*distributions: str) -> dict[str, str]:
    """Installed versions of the libraries whose behaviour decides a stage's output (missing: "absent")."""
    versions = {}
    for name in distributions:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def cache_table(name: str, description: str, key_columns: tuple[Column, ...], table: Table, *drop: str) -> Table:
    """The cache twin of ``table``: ``key_columns`` first, then ``table``'s columns but those named in ``drop``."""
    columns = tuple(c for c in table.columns if c.name not in drop and c.name not in {k.name for k in key_columns})
    return dataclasses.replace(
        table, schema=CACHE_SCHEMA, name=name, description=description, columns=key_columns + columns
    )


CONTENT_HASH = "content_hash"


def with_content_hash(cached: Table, published: Table, *carried: str) -> Table:
    """``cached`` with a last column ``content_hash``: io.fingerprint_sql over the columns of ``published`` (the
    synced table its entries become) that the entry holds, but those named in ``carried`` (the publishing query
    takes them from elsewhere, e.g. the current provenance), computed by DuckDB as an entry is inserted
    (model.Column.computed). Not the cache's key: an entry under another stage key with the same content has the
    same hash."""
    held = {c.name for c in cached.columns}
    hashed = [(c.name, c.type) for c in published.columns if c.name in held and c.name not in carried]
    column = Column(
        CONTENT_HASH,
        "UBIGINT",
        f"fingerprint of the {published.qualified} columns this entry holds (io.fingerprint_sql), computed as the "
        "entry is inserted",
        False,
        computed=fingerprint_sql(hashed),
    )
    return dataclasses.replace(cached, columns=(*cached.columns, column))


def keyed_rows(rows: pa.Table, key: str) -> pa.Table:
    """``rows`` (a worker's results for a cache table) with the ``stage_key`` column the cache keeps them under."""
    return rows.append_column("stage_key", pa.repeat(key, rows.num_rows))


def ensure_cache_table(conn: duckdb.DuckDBPyConnection, table: Table) -> bool:
    """Create ``table`` if it does not exist; a stored table with other columns (written by older code) is dropped
    first: its entries are forgotten and recomputed, never inserted into with the wrong shape. Returns whether
    such a table was dropped."""
    stored = [
        name
        for (name,) in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_catalog = current_database() "
            "AND table_schema = $schema AND table_name = $name ORDER BY ordinal_position",
            {"schema": table.schema, "name": table.name},
        ).fetchall()
    ]
    dropped = bool(stored) and stored != table.column_names
    if dropped:
        conn.execute(f"DROP TABLE {table.qualified}")
    conn.execute(table.create_sql())
    return dropped


def open_caches(conn: duckdb.DuckDBPyConnection, *tables: Table, reuse: bool = True) -> None:
    """Make a stage's cache tables ready (:func:`ensure_cache_table`); all emptied when ``reuse`` is False (a full
    rebuild: every row is computed again) or when one of them had another shape and was made anew. A stage's
    tables describe the same rows (the gate's gate_rows says where a row went, gate_staged holds its record): a row
    whose entry survived in one while the other forgot it would count as computed, with nothing to read."""
    made_anew = [ensure_cache_table(conn, table) for table in tables]
    if not reuse or any(made_anew):
        for table in tables:
            conn.execute(f"DELETE FROM {table.qualified}")


@dataclass(frozen=True)
class Reuse:
    """How many rows a per-row stage computed in a run and how many it read from its cache."""

    computed: int = 0
    reused: int = 0

    def __add__(self, other: Reuse) -> Reuse:
        return Reuse(self.computed + other.computed, self.reused + other.reused)

    def metadata(self, stage: str) -> dict[str, int]:
        """``rows_computed/<stage>`` and ``rows_reused/<stage>`` (plottable materialisation metadata)."""
        return {f"rows_computed/{stage}": self.computed, f"rows_reused/{stage}": self.reused}
