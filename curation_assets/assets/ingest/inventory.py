"""`image_inventory` (per shard): every file of the shard, hashed and classified."""

import dagster as dg
import polars as pl

from curation_assets.assets.common import RateLogger, asset_key, group_name, md_table
from curation_assets.assets.ingest.discovery import FINGERPRINT_KEY, resolve_shard
from curation_assets.assets.keys import INVENTORY
from curation_assets.config import ProjectConfig
from curation_assets.core.ingest.inventory import build_inventory
from curation_assets.core.ingest.shards import list_shard_files
from curation_assets.resources.store import StoreResource


def build_inventory_asset(project: ProjectConfig, partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=asset_key(project, INVENTORY),
        partitions_def=partitions,
        group_name=group_name(project, "ingest"),
        kinds={"parquet"},
        description=(
            "Every file of the shard: image_id, path, size, mtime, content hash (xxh3-128), extension and "
            "real format by magic bytes. Non-image and unreadable files are listed with a note, "
            "never skipped."
        ),
    )
    def image_inventory(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        shard = resolve_shard(project, project_store, context.partition_key)
        # The fingerprint is taken before listing: files added during the listing make the
        # next sensor tick see a change and re-run, rather than being missed.
        fingerprint = shard.fingerprint(project.dataset.follow_symlinks)
        rate = RateLogger(context.log, f"inventory {shard.key}", unit="files")
        files = list_shard_files(shard, project.dataset.follow_symlinks, project.dataset.parquet)
        table = build_inventory(shard, files, rate)
        files_per_s = rate.finish(len(table))
        path = project_store.shard_path(INVENTORY, shard.key)
        project_store.write_parquet(
            table,
            path,
            metadata={FINGERPRINT_KEY: fingerprint, "shard_kind": shard.kind, "location": shard.location},
        )
        formats = (
            table.group_by(pl.col("detected_format").fill_null("-"), "is_image")
            .agg(files=pl.len(), bytes=pl.col("size_bytes").sum())
            .sort("files", descending=True)
        )
        return dg.MaterializeResult(
            metadata={
                "files": len(table),
                "images": int(table["is_image"].sum()),
                "not_images": int((~table["is_image"]).sum()),
                "unreadable": int(table["note"].str.starts_with("unreadable").sum()),
                "bytes": int(table["size_bytes"].sum()),
                "files_per_second": round(files_per_s, 1),
                "formats": md_table(formats.to_dicts()),
                "shard_location": dg.MetadataValue.path(shard.location),
                "path": dg.MetadataValue.path(str(path)),
                "dagster/row_count": len(table),
            }
        )

    return image_inventory


def read_inventory(store: StoreResource, project: ProjectConfig, shard: str) -> pl.DataFrame:
    project_store = store.for_project(project)
    path = project_store.shard_path(INVENTORY, shard)
    if not path.is_file():
        raise dg.Failure(f"no image_inventory for shard {shard!r} at {path}: materialize it first")
    return project_store.read_parquet(path)
