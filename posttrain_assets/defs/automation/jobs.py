"""Jobs: ingest one source partition into bronze; refresh everything downstream of bronze."""

import dagster as dg

from posttrain_assets.defs.bronze import source_partitions

BRONZE = dg.AssetSelection.assets(["bronze", "records"])

ingest_source_job = dg.define_asset_job(
    "ingest_source",
    selection=BRONZE,
    partitions_def=source_partitions,
    description="Re-ingest one registry source (a bronze partition) from its landing files.",
)

refresh_corpus_job = dg.define_asset_job(
    "refresh_corpus",
    selection=dg.AssetSelection.all() - BRONZE,
    description="Rebuild silver and gold from bronze, running every check; blocking checks stop gold.",
)
