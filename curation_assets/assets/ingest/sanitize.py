"""`sanitized_images` (per shard): one row per inventoried file with status, reasons and fixes."""

import dagster as dg
import polars as pl

from curation_assets.assets.common import RateLogger, asset_key, group_name, md_table
from curation_assets.assets.ingest.inventory import read_inventory
from curation_assets.assets.keys import INVENTORY, SANITIZED
from curation_assets.config import ProjectConfig
from curation_assets.core.ingest.sanitize import SanitizeItem, rejected_row, sanitize_items
from curation_assets.core.outputs.reasons import Reason, Status
from curation_assets.resources.store import StoreResource

CHECK_ROWS_MATCH = "one_row_per_inventoried_file"
CHECK_REJECTS_EXPLAINED = "every_rejection_has_a_reason"

SANITIZED_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String(),
    "shard": pl.String(),
    "rel_path": pl.String(),
    "content_hash": pl.String(),
    "size_bytes": pl.Int64(),
    "status": pl.String(),
    "reasons": pl.List(pl.String()),
    "fixes": pl.List(pl.String()),
    "n_findings": pl.Int64(),
    "detail": pl.String(),
    "format": pl.String(),
    "width": pl.Int64(),
    "height": pl.Int64(),
    "mode": pl.String(),
    "n_frames": pl.Int64(),
    "exif_orientation": pl.Int64(),
    "pixel_hash": pl.String(),
}


def _rejected_by_inventory(note: str) -> dict:
    """The row of a file the inventory already ruled out (not an image, empty, unreadable)."""
    reason, _, detail = note.partition(": ")
    return rejected_row(Reason(reason), detail or None)


def sanitize_shard(inventory: pl.DataFrame, project: ProjectConfig, progress=None) -> pl.DataFrame:
    """Run every check over a shard's inventory; rows keep the inventory's order."""
    rules = project.stages.sanitize
    candidates = inventory.filter(pl.col("is_image"))
    items = [
        SanitizeItem(row["image_id"], row["source_path"], row["offset"], row["size_bytes"], row["rel_path"])
        for row in candidates.select("image_id", "source_path", "offset", "size_bytes", "rel_path").iter_rows(
            named=True
        )
    ]
    checked = {row["image_id"]: row for row in sanitize_items(items, rules, progress)}
    rows = []
    for row in inventory.select(
        "image_id", "shard", "rel_path", "content_hash", "size_bytes", "is_image", "note"
    ).iter_rows(named=True):
        found = checked[row["image_id"]] if row["is_image"] else _rejected_by_inventory(row["note"])
        merged = {key: found.get(key) for key in SANITIZED_SCHEMA}
        merged.update({k: row[k] for k in ("image_id", "shard", "rel_path", "content_hash", "size_bytes")})
        merged["n_findings"] = len(merged["reasons"] or [])
        rows.append(merged)
    return pl.DataFrame(rows, schema=SANITIZED_SCHEMA) if rows else pl.DataFrame(schema=SANITIZED_SCHEMA)


def sanitize_checks(
    inventory: pl.DataFrame, table: pl.DataFrame, key: dg.AssetKey
) -> list[dg.AssetCheckResult]:
    """Invariants: the same ids as the inventory, and no rejection without a reason."""
    missing = set(inventory["image_id"]) - set(table["image_id"])
    unexplained = table.filter((pl.col("status") == Status.REJECTED) & (pl.col("n_findings") == 0))
    return [
        dg.AssetCheckResult(
            asset_key=key,
            check_name=CHECK_ROWS_MATCH,
            passed=len(inventory) == len(table) and not missing and table["image_id"].is_unique().all(),
            metadata={
                "inventory_rows": len(inventory),
                "sanitized_rows": len(table),
                "missing": len(missing),
            },
        ),
        dg.AssetCheckResult(
            asset_key=key,
            check_name=CHECK_REJECTS_EXPLAINED,
            passed=unexplained.is_empty(),
            metadata={"unexplained": len(unexplained), "examples": unexplained["image_id"].head(5).to_list()},
        ),
    ]


def build_sanitize_asset(project: ProjectConfig, partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    key = asset_key(project, SANITIZED)
    rules = project.stages.sanitize

    @dg.asset(
        key=key,
        partitions_def=partitions,
        deps=[asset_key(project, INVENTORY)],
        group_name=group_name(project, "sanitize"),
        kinds={"parquet", "pillow"},
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_ROWS_MATCH,
                asset=key,
                blocking=True,
                description="One sanitize row per inventoried file, no id twice.",
            ),
            dg.AssetCheckSpec(
                CHECK_REJECTS_EXPLAINED,
                asset=key,
                blocking=True,
                description="Every rejected file names at least one reason.",
            ),
        ],
        description=(
            "Full decode and named checks per file: status ok / fixable / rejected, the reasons, and the "
            "fixes export applies (EXIF orientation, RGB conversion, first frame, resize, re-encode, "
            "rename). "
            "Thresholds: stages.sanitize in the project file."
        ),
    )
    def sanitized_images(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        shard = context.partition_key
        inventory = read_inventory(store, project, shard)
        rate = RateLogger(context.log, f"sanitize {shard}")
        table = sanitize_shard(
            inventory, project, progress=lambda done, total, per_s: rate(done, total, per_s)
        )
        images_per_s = rate.finish(int(inventory["is_image"].sum()))
        path = store.for_project(project).write_parquet(
            table,
            store.for_project(project).shard_path(SANITIZED, shard),
            metadata={"rules": rules.model_dump(mode="json")},
        )
        by_reason = (
            table.explode("reasons")
            .drop_nulls("reasons")
            .group_by("reasons", "status")
            .len()
            .sort("len", descending=True)
            .rename({"reasons": "reason", "len": "files"})
        )
        counts = dict(table.group_by("status").len().iter_rows())
        return dg.MaterializeResult(
            metadata={
                "files": len(table),
                "ok": counts.get(Status.OK, 0),
                "fixable": counts.get(Status.FIXABLE, 0),
                "rejected": counts.get(Status.REJECTED, 0),
                "not_images": int(table["reasons"].list.contains(str(Reason.NOT_AN_IMAGE)).sum()),
                "by_reason": md_table(by_reason.to_dicts()),
                "images_per_second": round(images_per_s, 1),
                "workers": rules.workers or "all cores",
                "thresholds": md_table([{"key": k, "value": v} for k, v in rules.model_dump().items()]),
                "path": dg.MetadataValue.path(str(path)),
                "dagster/row_count": len(table),
            },
            check_results=sanitize_checks(inventory, table, key),
        )

    return sanitized_images
