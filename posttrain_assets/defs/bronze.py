"""Bronze: every landing-file row, raw and unchanged, one partition per registry source."""

import datetime as dt

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets import settings
from posttrain_assets.defs.metadata import table_metadata
from posttrain_assets.defs.resources import SourceRegistryResource
from posttrain_assets.ingest.bronze import IngestRun, bronze_batches, landing_fingerprint
from posttrain_assets.ingest.readers import LandingFileError
from posttrain_assets.parallel import prefetched
from posttrain_assets.warehouse.bronze import (
    bronze_source_table,
    ensure_bronze,
    ingested_with,
    record_ingest,
    replace_bronze_source,
)
from posttrain_assets.warehouse.catalogue import BRONZE_RECORDS
from posttrain_assets.warehouse.io import building

source_partitions = dg.DynamicPartitionsDefinition(name="source")


@dg.asset(
    key=["bronze", "records"],
    partitions_def=source_partitions,
    group_name="bronze",
    kinds={"duckdb"},
    pool="duckdb",
    description=BRONZE_RECORDS.description,
)
def bronze_records(
    context: dg.AssetExecutionContext, duckdb: DuckDBResource, registry: SourceRegistryResource
) -> dg.MaterializeResult:
    """Re-ingest one source: every row of its files into a fresh table that replaces the source's old one, unless
    its landing files are unchanged since the last ingest (ingest.bronze.landing_fingerprint)."""
    source = registry.load().get(context.partition_key)
    files = source.files()
    if not files:
        raise dg.Failure(f"source {source.name!r}: no file matches {source.pattern}")
    run = IngestRun(source.name, dt.datetime.now(dt.UTC), context.run_id)
    per_file: dict[str, int] = {}
    hashes: dict[str, str] = {}
    fingerprint = landing_fingerprint(source, files)
    with duckdb.get_connection() as conn:
        ensure_bronze(conn)
        unchanged = not settings.full_rebuild() and ingested_with(conn, source.name, fingerprint)
        if unchanged:
            # Same registry entry, same files with the same sizes and modification times, same readers: the rows
            # would be the same, so the source's bronze table stays (POSTTRAIN_FULL_REBUILD=1 reads them anyway).
            context.log.info(f"{source.name}: landing files unchanged since the last ingest; bronze rows kept")
        else:
            # Batches are committed one by one into a twin (appending them inside one transaction would hold the
            # source in memory), read and built in a background thread while DuckDB inserts the previous one; the
            # twin then replaces the source's table in one short transaction.
            with building(conn, bronze_source_table(source.name)) as twin:
                try:
                    for batch in prefetched(bronze_batches(run, files)):
                        twin.append(batch.rows)
                        per_file[str(batch.path)] = per_file.get(str(batch.path), 0) + batch.rows.num_rows
                        hashes[str(batch.path)] = batch.file_sha256
                except LandingFileError as exc:  # one line naming source and file; the source keeps its old rows
                    raise dg.Failure(f"source {source.name!r}: {exc}") from None
                replace_bronze_source(conn, source.name, twin)
            record_ingest(conn, source.name, fingerprint)
        for path, count in per_file.items():
            log = context.log.warning if count == 0 else context.log.info
            log(f"{source.name}: {path} ({hashes[path][:12]}): {count} rows")
        metadata = table_metadata(
            conn,
            BRONZE_RECORDS,
            preview_columns=["row_number", "payload"],
            where="source = ?",
            params=[source.name],
        )
    if not unchanged:
        metadata["files"] = dg.MetadataValue.json(per_file)
    metadata["license"] = dg.MetadataValue.text(source.license)
    metadata["origin"] = dg.MetadataValue.text(source.origin)
    rows = metadata["dagster/row_count"].value
    metadata["rows_computed/bronze_ingest"] = dg.MetadataValue.int(0 if unchanged else rows)
    metadata["rows_reused/bronze_ingest"] = dg.MetadataValue.int(rows if unchanged else 0)
    # The data version is the landing fingerprint: the UI shows which partitions' inputs changed since the last run.
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(fingerprint))
