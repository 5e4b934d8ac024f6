"""Mixtures: a YAML spec drawn reproducibly from the gold tables, with a manifest of what was asked and delivered.

A spec (docs/curation.md#mixtures has the reference)::

    name: demo_sft_mix
    regime: sft
    seed: 7
    total_tokens: 40000            # or total_rows: what `weight` components share
    components:
      - name: conversations
        sources: [demo_sharegpt]   # selectors: sources and/or domains (none: every row of the regime)
        weight: 3                  # a share of the total ...
        diversity: true            # ... picked by diversity selection (else in seeded random order)
      - name: instructions
        sources: [demo_alpaca]
        tokens: 5000               # ... or an explicit budget: tokens or rows
        epochs: 2                  # explicit up-sampling: each drawn row appears twice

Rules: a component draws rows from its pool (the regime's gold rows its selectors match, minus rows an earlier
component drew and the semantic duplicates the drop policy removed) until its budget divided by ``epochs`` is spent,
never more, then repeats them ``epochs`` times. A pool smaller than the budget delivers less, and the manifest says
so (``shortfall``): up-sampling happens only through ``epochs``. Random order is the rows sorted by sha256 of
(seed, component, id), so a row's place never depends on which other rows are in the pool; diversity order is
:func:`posttrain_assets.curation.selection.select` with the spec's seed. The same spec over the same gold tables
gives the same rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import yaml

from posttrain_assets.curation import selection
from posttrain_assets.curation.store import dropped_ids_sql, embedding_model, existing_tables, load_pool
from posttrain_assets.curation.tables import GOLD_MIXTURE_MANIFESTS, GOLD_MIXTURES, GOLD_TABLES
from posttrain_assets.warehouse.io import insert_arrow, transaction

BUDGET_KEYS = ("weight", "tokens", "rows")
SPEC_KEYS = {"name", "regime", "seed", "table", "total_tokens", "total_rows", "method", "components", "description"}
COMPONENT_KEYS = {"name", "sources", "domains", "weight", "tokens", "rows", "epochs", "diversity"}


class MixtureSpecError(ValueError):
    """A mixture spec that cannot be used, naming the file and the field."""


@dataclass(frozen=True)
class Component:
    name: str
    sources: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    weight: float | None = None
    tokens: int | None = None
    rows: int | None = None
    epochs: int = 1
    diversity: bool = False

    @property
    def unit(self) -> str | None:
        """rows or tokens for an explicit budget; None for a weight (the spec's total says)."""
        return "tokens" if self.tokens is not None else "rows" if self.rows is not None else None


@dataclass(frozen=True)
class MixtureSpec:
    name: str
    regime: str
    seed: int
    components: tuple[Component, ...]
    table: str | None = None
    total_tokens: int | None = None
    total_rows: int | None = None
    method: str = "facility_location"
    description: str = ""

    def canonical(self) -> dict[str, Any]:
        """Every field with its default filled in, components in spec order: what the hash is taken of."""
        return asdict(self)

    @property
    def sha256(self) -> str:
        """Hash of :meth:`canonical`: the same however the YAML is laid out (key order, comments, quoting)."""
        text = json.dumps(self.canonical(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def asked(self, component: Component) -> tuple[str, float]:
        """(unit, amount) the component asks for."""
        if component.unit is not None:
            return component.unit, float(component.tokens if component.tokens is not None else component.rows)
        weights = sum(c.weight for c in self.components if c.weight is not None)
        unit, total = ("tokens", self.total_tokens) if self.total_tokens is not None else ("rows", self.total_rows)
        return unit, float(total) * component.weight / weights


def _fail(where: str, message: str) -> MixtureSpecError:
    return MixtureSpecError(f"{where}: {message}")


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _fail(where, "must be a name or a list of names")
    return tuple(value)


def _number(value: Any, where: str, *, integer: bool, minimum: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise _fail(where, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < minimum or (minimum == 0 and not integer and value == 0):
        raise _fail(where, f"must be {'>' if minimum == 0 and not integer else '>='} {minimum}, got {value!r}")
    return value


def parse_spec(data: Any, origin: str = "<spec>") -> MixtureSpec:
    """A :class:`MixtureSpec` from parsed YAML; :class:`MixtureSpecError` naming ``origin`` and the field."""
    if not isinstance(data, dict):
        raise _fail(origin, "a mixture spec is a mapping (name, regime, seed, components)")
    unknown = sorted(set(data) - SPEC_KEYS)
    if unknown:
        raise _fail(origin, f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(SPEC_KEYS))}")
    for key in ("name", "regime", "components"):
        if key not in data:
            raise _fail(origin, f"missing field {key!r}")
    name = data["name"]
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise _fail(f"{origin}: name", f"must be letters, digits, - and _, got {name!r}")
    regime = data["regime"]
    if regime not in GOLD_TABLES:
        raise _fail(f"{origin}: regime", f"must be one of {', '.join(GOLD_TABLES)}, got {regime!r}")
    table = data.get("table")
    if table is not None and table not in GOLD_TABLES[regime]:
        raise _fail(f"{origin}: table", f"must be one of {', '.join(GOLD_TABLES[regime])}, got {table!r}")
    seed = _number(data.get("seed", 0), f"{origin}: seed", integer=True, minimum=0)
    method = data.get("method", "facility_location")
    if method not in selection.METHODS:
        raise _fail(f"{origin}: method", f"must be one of {', '.join(selection.METHODS)}, got {method!r}")
    totals = {k: data.get(k) for k in ("total_tokens", "total_rows") if data.get(k) is not None}
    if len(totals) > 1:
        raise _fail(origin, "give total_tokens or total_rows, not both")
    for key, value in totals.items():
        _number(value, f"{origin}: {key}", integer=True, minimum=1)
    raw = data["components"]
    if not isinstance(raw, list) or not raw:
        raise _fail(f"{origin}: components", "must be a non-empty list")
    components = []
    seen: set[str] = set()
    for i, comp in enumerate(raw):
        where = f"{origin}: components[{i}]"
        if not isinstance(comp, dict):
            raise _fail(where, "must be a mapping")
        unknown = sorted(set(comp) - COMPONENT_KEYS)
        if unknown:
            raise _fail(where, f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(COMPONENT_KEYS))}")
        cname = comp.get("name")
        if not isinstance(cname, str) or not cname:
            raise _fail(f"{where}.name", "is required (a non-empty string)")
        if cname in seen:
            raise _fail(f"{where}.name", f"{cname!r} is used twice")
        seen.add(cname)
        budgets = [k for k in BUDGET_KEYS if comp.get(k) is not None]
        if len(budgets) != 1:
            raise _fail(where, f"give exactly one of weight, tokens, rows (got {', '.join(budgets) or 'none'})")
        if "weight" in budgets and not totals:
            raise _fail(where, "a weight needs the spec's total_tokens or total_rows")
        diversity = comp.get("diversity", False)
        if not isinstance(diversity, bool):
            raise _fail(f"{where}.diversity", f"must be true or false, got {diversity!r}")
        components.append(
            Component(
                name=cname,
                sources=_strings(comp.get("sources"), f"{where}.sources"),
                domains=_strings(comp.get("domains"), f"{where}.domains"),
                weight=float(_number(comp["weight"], f"{where}.weight", integer=False, minimum=0))
                if "weight" in budgets
                else None,
                tokens=_number(comp["tokens"], f"{where}.tokens", integer=True, minimum=1)
                if "tokens" in budgets
                else None,
                rows=_number(comp["rows"], f"{where}.rows", integer=True, minimum=1) if "rows" in budgets else None,
                epochs=_number(comp.get("epochs", 1), f"{where}.epochs", integer=True, minimum=1),
                diversity=diversity,
            )
        )
    return MixtureSpec(
        name=name,
        regime=regime,
        seed=seed,
        components=tuple(components),
        table=table,
        total_tokens=totals.get("total_tokens"),
        total_rows=totals.get("total_rows"),
        method=method,
        description=str(data.get("description", "")),
    )


def load_spec(path: Path) -> MixtureSpec:
    """Read and parse a mixture spec file (errors name the file)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise MixtureSpecError(f"{path}: cannot read the mixture spec: {exc}") from exc
    return parse_spec(data, str(path))


@dataclass
class ComponentReport:
    """One component as asked and as delivered (delivered counts every copy)."""

    name: str
    sources: list[str]
    domains: list[str]
    order: str
    epochs: int
    unit: str
    asked: float
    asked_rows: int | None
    asked_tokens: int | None
    pool_rows: int
    pool_tokens: int
    drawn_rows: int
    drawn_tokens: int
    delivered_rows: int
    delivered_tokens: int
    shortfall: float
    pool_exhausted: bool
    excluded_as_drawn_earlier: int


@dataclass
class Manifest:
    mixture: str
    spec_sha256: str
    regime: str
    table: str
    seed: int
    method: str
    gold_versions: dict[str, dict[str, Any]]
    embedding_model: dict[str, str] | None
    semantic_duplicates_excluded: int
    components: list[ComponentReport] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(c.delivered_rows for c in self.components)

    @property
    def tokens(self) -> int:
        return sum(c.delivered_tokens for c in self.components)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["delivered"] = {"rows": self.rows, "tokens": self.tokens}
        return out


def gold_version(conn: duckdb.DuckDBPyConnection, table: str) -> dict[str, Any]:
    """A gold table's rows and a content hash (sha256 of its sorted content ids): equal hashes, equal rows."""
    rows, digest = conn.execute(
        f"SELECT count(*), sha256(coalesce(string_agg(id, ',' ORDER BY id), '')) FROM {table}"
    ).fetchone()
    return {"rows": int(rows), "content_sha256": digest}


def random_order(seed: int, component: str, ids: list[str]) -> np.ndarray:
    """Pool positions sorted by sha256(seed, component, id): a row's rank never depends on the other rows."""
    keys = [hashlib.sha256(f"{seed}\x00{component}\x00{i}".encode()).hexdigest() for i in ids]
    return np.array(sorted(range(len(ids)), key=keys.__getitem__), dtype=np.int64)


def _take_in_order(order: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """The rows of ``order`` that fit, in order, skipping a row only when it alone would exceed what is left."""
    taken, left = [], budget
    for row in order.tolist():
        if costs[row] <= left:
            taken.append(row)
            left -= costs[row]
    return np.array(taken, dtype=np.int64)


def build_mixture(
    conn: duckdb.DuckDBPyConnection, spec: MixtureSpec, data_versions: dict[str, str] | None = None
) -> Manifest:
    """Draw ``spec`` from the gold tables; replace its rows in gold.mixtures and its manifest in
    gold.mixture_manifests (one transaction); return the manifest. ``data_versions`` ({gold table: version}) are
    the orchestrator's versions of the tables, recorded beside their content hashes."""
    present = existing_tables(conn)
    table = spec.table or next((t for t in GOLD_TABLES[spec.regime] if t in present), None)
    if table is None or table not in present:
        raise ValueError(f"mixture {spec.name!r}: no gold table of regime {spec.regime!r} exists: materialise gold")
    uses_diversity = any(c.diversity for c in spec.components)
    model = None
    if uses_diversity:
        name, sha = embedding_model(conn)
        model = {"name": name, "model_sha256": sha}
    version = gold_version(conn, table)
    if data_versions and table in data_versions:
        version["data_version"] = data_versions[table]
    excluded = conn.execute(f"SELECT count(*) FROM ({dropped_ids_sql(conn)})").fetchone()[0]
    manifest = Manifest(
        spec.name, spec.sha256, spec.regime, table, spec.seed, spec.method, {table: version}, model, int(excluded)
    )
    drawn: set[str] = set()
    batches: list[pa.Table] = []
    position = 0
    for comp in spec.components:
        pool = load_pool(
            conn,
            spec.regime,
            table,
            sources=list(comp.sources) or None,
            domains=list(comp.domains) or None,
            with_vectors=comp.diversity,
        )
        keep = np.array([i not in drawn for i in pool.ids], dtype=bool)
        positions = np.flatnonzero(keep)
        ids = [pool.ids[i] for i in positions.tolist()]
        tokens = pool.tokens[positions]
        unit, asked = spec.asked(comp)
        costs = tokens.astype(np.float64) if unit == "tokens" else np.ones(len(ids))
        per_copy = asked / comp.epochs
        if comp.diversity:
            picked = selection.select(
                pool.vectors[positions],
                per_copy,
                costs=costs if unit == "tokens" else None,
                method=spec.method,
                seed=spec.seed,
            ).indices
        else:
            picked = _take_in_order(random_order(spec.seed, comp.name, ids), costs, per_copy)
        drawn.update(ids[i] for i in picked.tolist())
        sources = [pool.sources[i] for i in positions[picked].tolist()]
        picked_tokens = tokens[picked]
        delivered = float(picked_tokens.sum() if unit == "tokens" else len(picked)) * comp.epochs
        manifest.components.append(
            ComponentReport(
                name=comp.name,
                sources=list(comp.sources),
                domains=list(comp.domains),
                order="diversity" if comp.diversity else "random",
                epochs=comp.epochs,
                unit=unit,
                asked=asked,
                asked_rows=int(round(asked)) if unit == "rows" else None,
                asked_tokens=int(round(asked)) if unit == "tokens" else None,
                pool_rows=len(ids),
                pool_tokens=int(tokens.sum()),
                drawn_rows=len(picked),
                drawn_tokens=int(picked_tokens.sum()),
                delivered_rows=len(picked) * comp.epochs,
                delivered_tokens=int(picked_tokens.sum()) * comp.epochs,
                shortfall=max(0.0, asked - delivered),
                pool_exhausted=len(picked) == len(ids) and delivered < asked,
                excluded_as_drawn_earlier=int(len(pool.ids) - len(ids)),
            )
        )
        n = len(picked)
        for epoch in range(comp.epochs):
            batches.append(
                pa.table(
                    {
                        "mixture": [spec.name] * n,
                        "spec_sha256": [spec.sha256] * n,
                        "position": pa.array(np.arange(position, position + n), pa.int64()),
                        "component": [comp.name] * n,
                        "id": [ids[i] for i in picked.tolist()],
                        "epoch": pa.array([epoch] * n, pa.int32()),
                        "regime": [spec.regime] * n,
                        "source": sources,
                        "tokens": pa.array(picked_tokens, pa.int32()),
                    }
                )
            )
            position += n
    with transaction(conn):
        for t in (GOLD_MIXTURES, GOLD_MIXTURE_MANIFESTS):
            conn.execute(t.create_sql())
            conn.execute(f"DELETE FROM {t.qualified} WHERE mixture = ?", [spec.name])
        for batch in batches:
            insert_arrow(conn, GOLD_MIXTURES, batch)
        conn.execute(
            f"INSERT INTO {GOLD_MIXTURE_MANIFESTS.qualified} VALUES (?, ?, ?)",
            [spec.name, spec.sha256, json.dumps(manifest.to_dict(), sort_keys=True)],
        )
    return manifest
