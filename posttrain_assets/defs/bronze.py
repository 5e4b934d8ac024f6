"""Bronze: every landing-file row, raw and unchanged, one partition per registry source."""

import datetime as dt
import hashlib

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.defs.metadata import table_metadata
from posttrain_assets.defs.resources import SourceRegistryResource
from posttrain_assets.files import file_sha256
from posttrain_assets.formats.readers import read_raw_rows
from posttrain_assets.tables import BRONZE_RECORDS, building, insert_rows

source_partitions = dg.DynamicPartitionsDefinition(name="source")

# Rows are handed to DuckDB in Arrow batches of this size, so memory stays bounded.
BATCH_ROWS = 5_000


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
    """Re-ingest one source: delete its partition, insert every row of its files, in one transaction."""
    source = registry.load().get(context.partition_key)
    files = source.files()
    if not files:
        raise dg.Failure(f"source {source.name!r}: no file matches {source.pattern}")
    ingested_at = dt.datetime.now(dt.UTC)
    per_file: dict[str, int] = {}
    with duckdb.get_connection() as conn:
        conn.execute(BRONZE_RECORDS.create_sql())
        # Rows go to a twin with a commit per batch, then replace the partition in one transaction
        # (tables.building: appending every batch inside that transaction would hold the source in memory).
        suffix = "_" + hashlib.sha256(source.name.encode("utf-8")).hexdigest()[:12]
        with building(conn, BRONZE_RECORDS, suffix) as twin:
            for path in files:
                file_hash = file_sha256(path)
                batch: list[dict] = []
                count = 0
                for row in read_raw_rows(path):
                    batch.append(
                        {
                            "source": source.name,
                            "file_path": str(path),
                            "row_number": row.row_number,
                            "record_sha256": row.record_sha256,
                            "payload": row.payload,
                            "decode_error": row.decode_error,
                            "file_sha256": file_hash,
                            "ingested_at": ingested_at,
                            "run_id": context.run_id,
                        }
                    )
                    count += 1
                    if len(batch) >= BATCH_ROWS:
                        insert_rows(conn, twin, batch)
                        batch = []
                if batch:
                    insert_rows(conn, twin, batch)
                per_file[str(path)] = count
                context.log.info(f"{source.name}: {path} ({file_hash[:12]}): {count} rows")
            conn.execute("BEGIN TRANSACTION")
            conn.execute(f"DELETE FROM {BRONZE_RECORDS.qualified} WHERE source = ?", [source.name])
            conn.execute(BRONZE_RECORDS.insert_sql(twin.qualified))
            conn.execute("COMMIT")
        metadata = table_metadata(
            conn,
            BRONZE_RECORDS,
            preview_columns=["row_number", "payload"],
            where="source = ?",
            params=[source.name],
        )
    metadata["files"] = dg.MetadataValue.json(per_file)
    metadata["license"] = dg.MetadataValue.text(source.license)
    metadata["origin"] = dg.MetadataValue.text(source.origin)
    return dg.MaterializeResult(metadata=metadata)
