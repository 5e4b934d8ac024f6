"""The curation stages over the warehouse: embed silver rows, find semantic near-duplicates, select diverse rows.

Each writes its table whole, atomically (built aside, swapped in inside one transaction), so a rerun over the same
silver and gold gives the same table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa

from posttrain_assets.cleaning.dedup import dedup_unit, rl_same_key
from posttrain_assets.curation import selection, semantic
from posttrain_assets.curation.embedder import Embedder
from posttrain_assets.curation.tables import (
    GOLD_TABLES,
    SILVER_DIVERSITY_SELECTION,
    SILVER_EMBEDDINGS,
    SILVER_SEMANTIC_DUPLICATES,
    pool_sql,
)
from posttrain_assets.warehouse.catalogue import SILVER_RECORDS
from posttrain_assets.warehouse.io import building, ordered_arrow, swap_in, transaction

# silver.records rows read and embedded at once: bounds the texts and vectors held; any value gives the same table.
EMBED_READ_ROWS = 4096
UNIT_COLUMNS = ("id", "regime", "source", "messages", "prompt", "chosen", "rejected")
POLICIES = ("report", "drop")


def existing_tables(conn: duckdb.DuckDBPyConnection) -> set[str]:
    rows = conn.execute("SELECT schema_name || '.' || table_name FROM duckdb_tables()").fetchall()
    return {r[0] for r in rows}


def embed_silver(conn: duckdb.DuckDBPyConnection, embedder: Embedder, read_rows: int = EMBED_READ_ROWS) -> int:
    """Replace silver.embeddings with one vector per silver.records row (its dedup unit); return the row count."""
    identity = embedder.identity
    columns = ", ".join(UNIT_COLUMNS)
    rows = 0
    with building(conn, SILVER_EMBEDDINGS) as twin:
        for batch in ordered_arrow(conn, f"SELECT {columns} FROM {SILVER_RECORDS.qualified}", "id", read_rows):
            records = batch.to_pylist()
            vectors = embedder.embed([dedup_unit(r) for r in records])
            twin.append(
                pa.table(
                    {
                        "id": batch.column("id"),
                        "regime": batch.column("regime"),
                        "source": batch.column("source"),
                        "embedding": pa.FixedSizeListArray.from_arrays(
                            pa.array(vectors.reshape(-1), pa.float32()), embedder.dim
                        ).cast(pa.list_(pa.float32())),
                        "model": pa.array([identity.name] * len(records)),
                        "model_sha256": pa.array([identity.model_sha256] * len(records)),
                    }
                )
            )
            rows += len(records)
        twin.finish()
        with transaction(conn):
            swap_in(conn, twin, SILVER_EMBEDDINGS)
    return rows


def embedding_model(conn: duckdb.DuckDBPyConnection) -> tuple[str, str]:
    """(model, model_sha256) of silver.embeddings; ValueError when it is empty or mixes models."""
    found = conn.execute(f"SELECT DISTINCT model, model_sha256 FROM {SILVER_EMBEDDINGS.qualified}").fetchall()
    if len(found) != 1:
        raise ValueError(f"silver.embeddings must hold one model's vectors, found {found or 'none'}: re-embed")
    return found[0]


def vectors_of(
    conn: duckdb.DuckDBPyConnection, relation: str, params: dict | None = None
) -> tuple[list[str], np.ndarray]:
    """Ids (sorted) and their embeddings for the ids ``relation`` (a query with an ``id`` column) returns; every id
    must have an embedding (else ValueError naming how many lack one)."""
    data = conn.sql(
        f"SELECT q.id, e.embedding FROM ({relation}) q LEFT JOIN {SILVER_EMBEDDINGS.qualified} e USING (id) "
        "ORDER BY q.id",
        params=params or {},
    ).to_arrow_table()
    missing = data.column("embedding").null_count
    if missing:
        raise ValueError(f"{missing} rows have no embedding in silver.embeddings: materialise silver/embeddings first")
    ids = data.column("id").to_pylist()
    if not ids:
        return ids, np.zeros((0, 0), dtype=np.float32)
    flat = data.column("embedding").combine_chunks()
    vectors = flat.values.to_numpy(zero_copy_only=False).reshape(len(ids), -1).astype(np.float32, copy=False)
    return ids, vectors


@dataclass(frozen=True)
class SemanticDuplicatesReport:
    """Pairs and rows per regime, and how many rows the policy takes out of curation."""

    threshold: float
    policy: str
    pairs: dict[str, int] = field(default_factory=dict)
    rows_in_pairs: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)


def find_semantic_duplicates(
    conn: duckdb.DuckDBPyConnection, threshold: float, policy: str
) -> SemanticDuplicatesReport:
    """Replace silver.semantic_duplicates with every same-regime pair at or above ``threshold`` (cosine)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown semantic duplicate policy {policy!r}; expected one of {', '.join(POLICIES)}")
    model, model_sha = embedding_model(conn)
    report = SemanticDuplicatesReport(threshold, policy)
    regimes = [
        r[0] for r in conn.execute(f"SELECT DISTINCT regime FROM {SILVER_EMBEDDINGS.qualified} ORDER BY 1").fetchall()
    ]
    with building(conn, SILVER_SEMANTIC_DUPLICATES) as twin:
        for regime in regimes:
            ids, vectors = vectors_of(
                conn, f"SELECT id FROM {SILVER_EMBEDDINGS.qualified} WHERE regime = $regime", {"regime": regime}
            )
            sources = dict(
                conn.execute(
                    f"SELECT id, source FROM {SILVER_EMBEDDINGS.qualified} WHERE regime = ?", [regime]
                ).fetchall()
            )
            pairs = semantic.similar_pairs(vectors, threshold)
            if regime == "rl" and len(pairs):
                # As in near dedup: templated problems that differ in a number or in the answer are different
                # tasks, however close their texts' vectors (a mean of token vectors barely moves with a number).
                records = conn.execute(
                    f"SELECT id, regime, prompt, answer FROM {SILVER_RECORDS.qualified} WHERE regime = 'rl'"
                ).fetchall()
                keys = {r[0]: rl_same_key({"regime": r[1], "prompt": r[2], "answer": r[3]}) for r in records}
                same = [
                    keys[ids[i]] == keys[ids[j]] for i, j in zip(pairs["i"].tolist(), pairs["j"].tolist(), strict=True)
                ]
                pairs = pairs[np.array(same, dtype=bool)]
            heads = semantic.group_heads(len(ids), pairs)
            in_pairs = np.unique(np.concatenate([pairs["i"], pairs["j"]])) if len(pairs) else np.array([], dtype=int)
            report.pairs[regime] = len(pairs)
            report.rows_in_pairs[regime] = len(in_pairs)
            report.dropped[regime] = int(np.sum(heads[in_pairs] != in_pairs)) if policy == "drop" else 0
            if not len(pairs):
                continue
            id_a = [ids[i] for i in pairs["i"].tolist()]
            id_b = [ids[j] for j in pairs["j"].tolist()]
            twin.append(
                pa.table(
                    {
                        "regime": [regime] * len(pairs),
                        "id_a": id_a,
                        "id_b": id_b,
                        "source_a": [sources[i] for i in id_a],
                        "source_b": [sources[i] for i in id_b],
                        "similarity": pa.array(pairs["similarity"], pa.float64()),
                        "group_id": [ids[h] for h in heads[pairs["i"]].tolist()],
                        "policy": [policy] * len(pairs),
                        "model": [model] * len(pairs),
                        "model_sha256": [model_sha] * len(pairs),
                    }
                )
            )
        twin.finish()
        with transaction(conn):
            swap_in(conn, twin, SILVER_SEMANTIC_DUPLICATES)
    return report


def dropped_ids_sql(conn: duckdb.DuckDBPyConnection) -> str:
    """SQL of the ids the semantic duplicate policy takes out of curation (none when it reports, or never ran)."""
    if SILVER_SEMANTIC_DUPLICATES.qualified not in existing_tables(conn):
        return "SELECT NULL::VARCHAR AS id WHERE FALSE"
    t = SILVER_SEMANTIC_DUPLICATES.qualified
    return (
        f"SELECT id_a AS id FROM {t} WHERE policy = 'drop' AND id_a <> group_id "
        f"UNION SELECT id_b FROM {t} WHERE policy = 'drop' AND id_b <> group_id"
    )


def gold_table(conn: duckdb.DuckDBPyConnection, regime: str) -> str | None:
    """The regime's gold table to draw from: the first of :data:`GOLD_TABLES` that exists (None: none does)."""
    present = existing_tables(conn)
    return next((t for t in GOLD_TABLES[regime] if t in present), None)


@dataclass(frozen=True)
class Pool:
    """A set of gold rows to select from, in id order."""

    ids: list[str]
    sources: list[str]
    domains: list[str | None]
    tokens: np.ndarray
    vectors: np.ndarray | None


def load_pool(
    conn: duckdb.DuckDBPyConnection,
    regime: str,
    table: str,
    *,
    sources: list[str] | None = None,
    domains: list[str] | None = None,
    with_vectors: bool = True,
) -> Pool:
    """The rows of ``table`` (optionally only these sources / domains), minus the semantic duplicates the policy
    drops, with their embeddings when ``with_vectors``."""
    where = [f"id NOT IN ({dropped_ids_sql(conn)})"]
    params: dict[str, object] = {}
    if sources:
        where.append("list_contains($sources, source)")
        params["sources"] = sources
    if domains:
        where.append("list_contains($domains, domain)")
        params["domains"] = domains
    query = f"SELECT * FROM ({pool_sql(regime, table)}) WHERE {' AND '.join(where)}"
    data = conn.sql(f"{query} ORDER BY id", params=params).to_arrow_table()
    ids = data.column("id").to_pylist()
    vectors = None
    if with_vectors:
        vector_ids, vectors = vectors_of(conn, f"SELECT id FROM ({query})", params)
        assert vector_ids == ids
    return Pool(
        ids,
        data.column("source").to_pylist(),
        data.column("domain").to_pylist(),
        np.asarray(data.column("tokens").to_numpy(zero_copy_only=False), dtype=np.int64),
        vectors,
    )


@dataclass(frozen=True)
class GroupSelection:
    """One budget group's selection and its coverage against random."""

    regime: str
    group: str
    budget: float
    unit: str
    selected: int
    tokens: int
    pool_rows: int
    coverage: selection.Coverage


def _groups(pool: Pool, group_by: str | None) -> Iterator[tuple[str, np.ndarray]]:
    if group_by is None:
        yield "all", np.arange(len(pool.ids))
        return
    labels = pool.sources if group_by == "source" else pool.domains
    names = np.array([str(x) if x is not None else "unknown" for x in labels])
    for name in sorted(set(names.tolist())):
        yield name, np.flatnonzero(names == name)


def select_diverse(
    conn: duckdb.DuckDBPyConnection,
    budgets: dict[str, float],
    *,
    unit: str = "rows",
    fraction: bool = True,
    group_by: str | None = None,
    method: str = "facility_location",
    seed: int = 0,
) -> list[GroupSelection]:
    """Replace silver.diversity_selection with a selection per regime of ``budgets`` ({regime: budget}).

    ``fraction``: each budget is a share of the regime's pool (0.5 = half its rows or tokens), else an amount.
    ``unit``: ``rows`` or ``tokens``. ``group_by`` (None, ``source`` or ``domain``) splits each regime's budget
    across its groups in proportion to their size in that unit (:func:`selection.split_budget`)."""
    if unit not in ("rows", "tokens"):
        raise ValueError(f"budget unit must be rows or tokens, got {unit!r}")
    if group_by not in (None, "source", "domain"):
        raise ValueError(f"group_by must be source, domain or empty, got {group_by!r}")
    model, model_sha = embedding_model(conn)
    results: list[GroupSelection] = []
    with building(conn, SILVER_DIVERSITY_SELECTION) as twin:
        for regime in sorted(budgets):
            table = gold_table(conn, regime)
            if table is None:
                continue
            pool = load_pool(conn, regime, table)
            costs = pool.tokens.astype(np.float64) if unit == "tokens" else np.ones(len(pool.ids))
            groups = list(_groups(pool, group_by))
            total = budgets[regime] * float(costs.sum()) if fraction else budgets[regime]
            shares = selection.split_budget(total, {name: float(costs[idx].sum()) for name, idx in groups})
            for name, idx in groups:
                picked = selection.select(
                    pool.vectors[idx],
                    shares[name],
                    costs=costs[idx] if unit == "tokens" else None,
                    method=method,
                    seed=seed,
                )
                chosen = idx[picked.indices]
                cov = selection.coverage(pool.vectors[idx], picked.indices, seed)
                results.append(
                    GroupSelection(
                        regime, name, shares[name], unit, len(chosen), int(pool.tokens[chosen].sum()), len(idx), cov
                    )
                )
                twin.append(
                    pa.table(
                        {
                            "regime": [regime] * len(chosen),
                            "group": [name] * len(chosen),
                            "id": [pool.ids[i] for i in chosen.tolist()],
                            "rank": pa.array(np.arange(1, len(chosen) + 1), pa.int32()),
                            "gain": pa.array(picked.gains, pa.float64(), mask=np.isnan(picked.gains)),
                            "tokens": pa.array(pool.tokens[chosen], pa.int32()),
                            "method": [method] * len(chosen),
                            "seed": pa.array([seed] * len(chosen), pa.int64()),
                            "model": [model] * len(chosen),
                            "model_sha256": [model_sha] * len(chosen),
                        }
                    )
                )
        twin.finish()
        with transaction(conn):
            swap_in(conn, twin, SILVER_DIVERSITY_SELECTION)
    return results
