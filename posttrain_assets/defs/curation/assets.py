"""Curation assets (group ``curation``, opt-in): embeddings of silver rows, semantic near-duplicates, diversity
selection over the gold tables and the mixtures of ``POSTTRAIN_MIXTURES``, with their trainer exports.

None has an automation condition and the refresh_corpus job leaves the group out unless ``POSTTRAIN_CURATION`` is
``on``: the default refresh never loads the embedding model. The ``curate`` job runs the group.
"""

from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.curation import store
from posttrain_assets.curation.mixtures import build_mixture, load_spec
from posttrain_assets.curation.tables import (
    GOLD_MIXTURE_MANIFESTS,
    GOLD_MIXTURES,
    SILVER_DIVERSITY_SELECTION,
    SILVER_EMBEDDINGS,
    SILVER_SEMANTIC_DUPLICATES,
)
from posttrain_assets.defs.checks.turn_depth import MIXTURE_SFT_ROWS
from posttrain_assets.defs.curation.resources import EmbedderResource, MixtureSpecsResource
from posttrain_assets.defs.gold.sft import turn_depth_metadata
from posttrain_assets.defs.metadata import markdown_table, table_metadata
from posttrain_assets.defs.resources import SourceRegistryResource
from posttrain_assets.publish.exports import export_mixture
from posttrain_assets.sft.turn_depth import turn_depth
from posttrain_assets.warehouse.io import transaction

GROUP = "curation"
SILVER_RECORDS_KEY = dg.AssetKey(["silver", "records"])
EMBEDDINGS_KEY = dg.AssetKey(["silver", "embeddings"])
SEMANTIC_KEY = dg.AssetKey(["silver", "semantic_duplicates"])
SELECTION_KEY = dg.AssetKey(["silver", "diversity_selection"])
MIXTURES_KEY = dg.AssetKey(["gold", "mixtures"])
GOLD_TABLE_KEYS = {
    table: dg.AssetKey(table.split("."))
    for table in ("gold.sft", "gold.preference", "gold.preference_length_balanced", "gold.rl_prompts")
}


@dg.asset(
    key=EMBEDDINGS_KEY,
    deps=[SILVER_RECORDS_KEY],
    group_name=GROUP,
    kinds={"duckdb"},
    pool="duckdb",
    description=SILVER_EMBEDDINGS.description,
)
def silver_embeddings(duckdb: DuckDBResource, embedder: EmbedderResource) -> dg.MaterializeResult:
    model = embedder.get()
    with duckdb.get_connection() as conn:
        store.embed_silver(conn, model)
        metadata = table_metadata(
            conn, SILVER_EMBEDDINGS, preview_columns=["id", "regime", "source"], group_by="regime"
        )
    metadata.update({f"model/{k}": dg.MetadataValue.text(v) for k, v in model.identity.to_dict().items()})
    return dg.MaterializeResult(metadata=metadata)


class SemanticDuplicatesConfig(dg.Config):
    """``threshold``: cosine similarity from which two rows of a regime are semantic duplicates. ``policy``:
    ``report`` (listed only) or ``drop`` (every row of a group but its smallest id leaves selection and mixtures)."""

    threshold: float = 0.95
    policy: str = "report"


@dg.asset(
    key=SEMANTIC_KEY,
    deps=[EMBEDDINGS_KEY],
    group_name=GROUP,
    kinds={"duckdb"},
    pool="duckdb",
    description=SILVER_SEMANTIC_DUPLICATES.description,
)
def silver_semantic_duplicates(duckdb: DuckDBResource, config: SemanticDuplicatesConfig) -> dg.MaterializeResult:
    with duckdb.get_connection() as conn:
        report = store.find_semantic_duplicates(conn, config.threshold, config.policy)
        metadata = table_metadata(
            conn,
            SILVER_SEMANTIC_DUPLICATES,
            preview_columns=["regime", "id_a", "id_b", "similarity"],
            group_by="regime",
        )
        closest = conn.execute(
            f"SELECT regime, source_a, source_b, round(similarity, 4) FROM {SILVER_SEMANTIC_DUPLICATES.qualified} "
            "ORDER BY similarity DESC, id_a, id_b LIMIT 10"
        ).fetchall()
    metadata["closest_pairs"] = dg.MetadataValue.md(markdown_table(["regime", "source a", "source b", "cos"], closest))
    metadata["threshold"] = dg.MetadataValue.float(config.threshold)
    metadata["policy"] = dg.MetadataValue.text(config.policy)
    for regime in report.pairs:
        metadata[f"pairs/{regime}"] = dg.MetadataValue.int(report.pairs[regime])
        metadata[f"rows_in_pairs/{regime}"] = dg.MetadataValue.int(report.rows_in_pairs[regime])
        metadata[f"dropped/{regime}"] = dg.MetadataValue.int(report.dropped[regime])
    return dg.MaterializeResult(metadata=metadata)


class DiversitySelectionConfig(dg.Config):
    """A budget per regime: ``budget`` is a share of each regime's pool (0.5 = half) unless ``budget_is_fraction``
    is false, then an amount; in ``unit`` (rows or tokens). ``group_by``: "" (the whole regime), source or domain
    (the budget is shared across groups by their size). ``method``: facility_location or k_center. ``seed``: the
    selection's and the random baseline's."""

    regimes: list[str] = ["sft", "preference", "rl"]
    budget: float = 0.5
    budget_is_fraction: bool = True
    unit: str = "rows"
    group_by: str = ""
    method: str = "facility_location"
    seed: int = 0


@dg.asset(
    key=SELECTION_KEY,
    deps=[EMBEDDINGS_KEY, SEMANTIC_KEY, *GOLD_TABLE_KEYS.values()],
    group_name=GROUP,
    kinds={"duckdb"},
    pool="duckdb",
    description=SILVER_DIVERSITY_SELECTION.description,
)
def silver_diversity_selection(duckdb: DuckDBResource, config: DiversitySelectionConfig) -> dg.MaterializeResult:
    with duckdb.get_connection() as conn:
        results = store.select_diverse(
            conn,
            dict.fromkeys(config.regimes, config.budget),
            unit=config.unit,
            fraction=config.budget_is_fraction,
            group_by=config.group_by or None,
            method=config.method,
            seed=config.seed,
        )
        metadata = table_metadata(
            conn,
            SILVER_DIVERSITY_SELECTION,
            preview_columns=["regime", "group", "rank", "id", "gain"],
            group_by="regime",
        )
    rows = []
    for r in results:
        c = r.coverage
        rows.append(
            (
                r.regime,
                r.group,
                f"{r.selected}/{r.pool_rows}",
                f"{c.mean_distance:.4f}",
                f"{c.random_mean_distance:.4f}",
                f"{c.max_distance:.4f}",
                f"{c.random_max_distance:.4f}",
                f"{c.clusters_covered}/{c.clusters}",
                f"{c.random_clusters_covered}/{c.clusters}",
            )
        )
        # Numbers the UI plots across materialisations: coverage of the selection and of random, side by side.
        for name, value in c.to_dict().items():
            metadata[f"coverage/{r.regime}/{r.group}/{name}"] = (
                dg.MetadataValue.int(value) if isinstance(value, int) else dg.MetadataValue.float(float(value))
            )
    headers = ["regime", "group", "rows", "mean dist", "random", "max dist", "random", "clusters", "random"]
    metadata["coverage"] = dg.MetadataValue.md(markdown_table(headers, rows))
    metadata["method"] = dg.MetadataValue.text(config.method)
    return dg.MaterializeResult(metadata=metadata)


class MixturesConfig(dg.Config):
    """Where the mixtures' trainer files go (empty: ``exports/mixtures`` next to the DuckDB file), one folder per
    mixture, in its gold table's layout (TRL for SFT and preference, verl for RL)."""

    out_dir: str = ""


@dg.asset(
    key=MIXTURES_KEY,
    deps=[EMBEDDINGS_KEY, SEMANTIC_KEY, *GOLD_TABLE_KEYS.values()],
    group_name=GROUP,
    kinds={"duckdb", "parquet"},
    pool="duckdb",
    description=GOLD_MIXTURES.description + " Specs: POSTTRAIN_MIXTURES; manifests in gold.mixture_manifests.",
)
def gold_mixtures(
    context: dg.AssetExecutionContext,
    duckdb: DuckDBResource,
    mixture_specs: MixtureSpecsResource,
    registry: SourceRegistryResource,
    config: MixturesConfig,
) -> dg.MaterializeResult:
    specs = [load_spec(Path(p)) for p in mixture_specs.files()]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"mixture names must be unique across POSTTRAIN_MIXTURES, got {names}")
    versions = {}
    for table, key in GOLD_TABLE_KEYS.items():
        event = context.instance.get_latest_materialization_event(key)
        materialization = event.asset_materialization if event else None
        version = materialization.tags.get("dagster/data_version") if materialization and materialization.tags else None
        if version:
            versions[table] = version
    answer_formats = {s.name: s.answer_format for s in registry.load().sources if s.answer_format is not None}
    out_root = Path(config.out_dir) if config.out_dir else Path(duckdb.database).parent / "exports" / "mixtures"
    metadata: dict[str, dg.MetadataValue] = {}
    summary = []
    with duckdb.get_connection() as conn:
        for spec in specs:
            manifest = build_mixture(conn, spec, versions)
            files = export_mixture(
                conn,
                out_root / spec.name,
                mixture=spec.name,
                table=manifest.table,
                mixture_manifest=manifest.to_dict(),
                answer_formats=answer_formats,
            )
            summary.append((spec.name, spec.regime, manifest.rows, manifest.tokens, spec.sha256[:12], len(files)))
            metadata[f"mixture/{spec.name}/rows"] = dg.MetadataValue.int(manifest.rows)
            metadata[f"mixture/{spec.name}/tokens"] = dg.MetadataValue.int(manifest.tokens)
            metadata[f"mixture/{spec.name}/manifest"] = dg.MetadataValue.json(manifest.to_dict())
        # Mixtures whose spec is no longer listed are dropped, so the tables hold exactly the listed ones.
        with transaction(conn):
            for table in (GOLD_MIXTURES, GOLD_MIXTURE_MANIFESTS):
                conn.execute(table.create_sql())
                conn.execute(
                    f"DELETE FROM {table.qualified} WHERE NOT list_contains($names, mixture)", {"names": names}
                )
        metadata.update(
            table_metadata(
                conn, GOLD_MIXTURES, preview_columns=["mixture", "position", "component", "id"], group_by="mixture"
            )
        )
        # Turn depth of each SFT mixture as drawn, overall and per source (plotted like gold.sft's).
        metadata.update(
            turn_depth_metadata(
                turn_depth(conn, MIXTURE_SFT_ROWS, "mixture_source"), turn_depth(conn, MIXTURE_SFT_ROWS, "mixture")
            )
        )
    metadata["mixtures"] = dg.MetadataValue.md(
        markdown_table(["mixture", "regime", "rows", "tokens", "spec sha256", "files"], summary)
    )
    metadata["exports"] = dg.MetadataValue.path(str(out_root))
    metadata["specs"] = dg.MetadataValue.json(mixture_specs.files())
    return dg.MaterializeResult(metadata=metadata)


curate_job = dg.define_asset_job(
    "curate",
    selection=dg.AssetSelection.groups(GROUP),
    description="Curation (opt-in, extra `curation`): embed silver rows, report semantic near-duplicates, select "
    "diverse subsets of gold under a budget, build the mixtures of POSTTRAIN_MIXTURES and export them.",
)
