"""Resources, built from environment variables (never chosen at import time).

- ``duckdb``: the warehouse file, ``POSTTRAIN_DUCKDB_PATH``, with DuckDB's memory capped at
  :data:`DUCKDB_MEMORY_LIMIT` (a :class:`WarehouseResource`, which closes its connection when a step fails).
- ``registry``: the source registry YAML, ``POSTTRAIN_SOURCES``.
- ``tokenizer``: the project tokenizer, ``POSTTRAIN_TOKENIZER`` (``smollm2`` = the bundled default,
  a local tokenizer directory, or a model id already in the local Hugging Face cache), cached under
  ``POSTTRAIN_CACHE_DIR``.

A variable that is set is passed as ``dg.EnvVar`` (Dagster reads it when a run starts); one that is not takes its
documented default from :mod:`posttrain_assets.settings` when the definitions load, the same default ``posttrain``
sets. So ``dagster dev -m posttrain_assets.definitions`` and ``dagster job execute -m posttrain_assets.definitions
-j publish`` run with no project variable set, on ``data/`` under the current directory.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from pydantic import PrivateAttr

from posttrain_assets.ingest.registry import Registry, load_registry
from posttrain_assets.settings import CACHE_DIR, DUCKDB_PATH, SOURCES, TOKENIZER, environment_defaults

# DuckDB's default cap is 80% of the machine's memory, so joining or aggregating a large bronze table would grow
# the process towards it; under this cap those operators spill to a temporary directory beside the database
# instead, and memory stays bounded as the corpus grows (the launchpad's resource config can change it). Sorts
# of wide rows do not spill, which is why no stage sorts them whole (see io.insert_ordered).
DUCKDB_MEMORY_LIMIT = "1GB"


class WarehouseResource(DuckDBResource):
    """``DuckDBResource`` whose connection is closed when the step using it raises, not only when it returns.

    dagster-duckdb's ``get_connection`` closes after its ``yield`` only, so a failing asset left its read-write
    connection open for as long as the exception's traceback lived (until a garbage collection): in the same
    process (the in-process executor, ``posttrain run``, the benchmark) the database could then not be opened
    read-only ("different configuration than existing connections"), nor by another process. The database file's
    folder is created when missing, so the default ``data/posttrain.duckdb`` works in a fresh checkout.
    """

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if not self.database.startswith(":"):  # a file (not :memory:): its folder may not exist yet (data/)
            Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        with super().get_connection() as conn:
            try:
                yield conn
            finally:
                conn.close()


class SourceRegistryResource(dg.ConfigurableResource):
    """The source registry file (see ``posttrain_assets.ingest.registry``)."""

    path: str

    def load(self) -> Registry:
        return load_registry(self.path)


class TokenizerResource(dg.ConfigurableResource):
    """The tokenizer whose chat template renders SFT rows and counts tokens for every regime."""

    spec: str = "smollm2"
    cache_dir: str

    _tokenizer: object = PrivateAttr(default=None)
    _identity: dict[str, str] | None = PrivateAttr(default=None)

    def get(self):  # -> transformers.PreTrainedTokenizerFast
        """Load once per process; no network (local files or the local HF cache only)."""
        if self._tokenizer is None:
            from posttrain_assets.sft.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.spec, Path(self.cache_dir))
        return self._tokenizer

    def identity(self) -> dict[str, str]:
        """Name and hashes of the tokenizer files and chat template, recorded with every row set. Known without
        loading the tokenizer (nor importing transformers) once computed for the same files and libraries
        (``stored_tokenizer_identity``): a step that only records it does not pay for a load."""
        if self._identity is None:
            from posttrain_assets.sft.tokenizer import stored_tokenizer_identity

            self._identity = stored_tokenizer_identity(self.spec, Path(self.cache_dir))
        return self._identity


def from_environment(name: str) -> str | dg.EnvVar:
    """``dg.EnvVar(name)`` when the variable is set (and not empty), else its documented default."""
    return dg.EnvVar(name) if os.environ.get(name) else environment_defaults()[name]


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            "duckdb": WarehouseResource(
                database=from_environment(DUCKDB_PATH), connection_config={"memory_limit": DUCKDB_MEMORY_LIMIT}
            ),
            "registry": SourceRegistryResource(path=from_environment(SOURCES)),
            "tokenizer": TokenizerResource(spec=from_environment(TOKENIZER), cache_dir=from_environment(CACHE_DIR)),
        }
    )
