"""`sanitized_images` (per shard): one row per inventoried file with status, reasons and fixes.

Its one full decode per image is the root of the shard pass (assets/ingest/shard_pass.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg
import polars as pl

from curation_assets.assets.common import asset_key, md_table
from curation_assets.assets.keys import INVENTORY, SANITIZED
from curation_assets.assets.signatures import SIGNATURE, signature_of
from curation_assets.assets.stage_spec import CheckDef, DecodePart
from curation_assets.config import ProjectConfig
from curation_assets.core.ingest.sanitize import rejected_row
from curation_assets.core.outputs.reasons import Reason, Status
from curation_assets.resources.store import ProjectStore

if TYPE_CHECKING:
    from curation_assets.core.shard_pass import PassOutput

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


def sanitize_table(inventory: pl.DataFrame, checked: dict[str, dict]) -> pl.DataFrame:
    """The sanitize table of a shard from the checked rows of its image files, in inventory order."""
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


SANITIZE_VERSION = 1  # bump when a check changes what it finds: stored tables are recomputed


def sanitize_signature(project: ProjectConfig, inventory: pl.DataFrame) -> str:
    """Changes when the shard's files (ids, hashes, sizes) or the sanitize rules change."""
    listed = inventory.select("image_id", "content_hash", "size_bytes", "is_image", "note").write_csv()
    rules = project.stages.sanitize.model_dump_json()
    return signature_of(listed, rules, f"sanitize-{SANITIZE_VERSION}")


def kept_images(store: ProjectStore, shard: str) -> pl.DataFrame:
    """Sanitize rows that are not rejected, with where their bytes are (from the inventory)."""
    sanitized = store.read_parquet(store.shard_path(SANITIZED, shard))
    where = store.read_parquet(
        store.shard_path(INVENTORY, shard), columns=["image_id", "source_path", "offset"]
    )
    return (
        sanitized.filter(pl.col("status") != Status.REJECTED)
        .select("image_id", "content_hash", "size_bytes", "width", "height")
        .join(where, on="image_id", how="left", maintain_order="left")
    )


def sanitize_description(project: ProjectConfig) -> str:
    return (
        "Full decode and named checks per file: status ok / fixable / rejected, the reasons, and the "
        "fixes export applies (EXIF orientation, RGB conversion, first frame, resize, re-encode, "
        "rename). Thresholds: stages.sanitize in the project file. Its decode feeds every other "
        "per-shard stage (the shard pass)."
    )


SANITIZE_CHECKS = (
    CheckDef(CHECK_ROWS_MATCH, "One sanitize row per inventoried file, no id twice.", blocking=True),
    CheckDef(CHECK_REJECTS_EXPLAINED, "Every rejected file names at least one reason.", blocking=True),
)


def finish_sanitize(
    context: dg.AssetExecutionContext,
    project: ProjectConfig,
    store: ProjectStore,
    inventory: pl.DataFrame,
    signature: str,
    output: PassOutput | None,
) -> dg.MaterializeResult:
    """Write the sanitize table from the pass's rows (or report the stored one when current)."""
    shard = context.partition_key
    key = asset_key(project, SANITIZED)
    rules = project.stages.sanitize
    path = store.shard_path(SANITIZED, shard)
    if output is None:
        table = store.read_parquet(path)
        images_per_s = None
    else:
        candidates = inventory.filter(pl.col("is_image"))["image_id"]
        checked = dict(zip(candidates, output.sanitize, strict=True))
        table = sanitize_table(inventory, checked)
        images_per_s = output.images_per_second
        store.write_parquet(
            table, path, metadata={"rules": rules.model_dump(mode="json"), SIGNATURE: signature}
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
    metadata = {
        "skipped": output is None,
        "files": len(table),
        "ok": counts.get(Status.OK, 0),
        "fixable": counts.get(Status.FIXABLE, 0),
        "rejected": counts.get(Status.REJECTED, 0),
        "not_images": int(table["reasons"].list.contains(str(Reason.NOT_AN_IMAGE)).sum()),
        "by_reason": md_table(by_reason.to_dicts()),
        "workers": rules.workers or "all cores",
        "thresholds": md_table([{"key": k, "value": v} for k, v in rules.model_dump().items()]),
        "path": dg.MetadataValue.path(str(path)),
        "dagster/row_count": len(table),
    }
    if images_per_s is not None:
        metadata["shard_pass_images_per_second"] = round(images_per_s, 1)
    return dg.MaterializeResult(
        asset_key=key, metadata=metadata, check_results=sanitize_checks(inventory, table, key)
    )


def shard_sanitize_signature(project: ProjectConfig, store: ProjectStore, shard: str) -> str:
    """Today's sanitize signature of a shard, from its stored inventory."""
    return sanitize_signature(project, store.read_parquet(store.shard_path(INVENTORY, shard)))


SANITIZE_PART = DecodePart(
    group="sanitize",
    kinds=frozenset({"parquet", "pillow"}),
    description=sanitize_description,
    checks=SANITIZE_CHECKS,
    finish=None,  # the root of the pass: the pass writes it before its outputs (finish_sanitize)
)
