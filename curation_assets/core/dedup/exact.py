"""Exact duplicates: byte-identical files and pixel-identical images, one keeper per group.

Two images are exact duplicates when their upright RGB pixels are identical (sanitize's
``pixel_hash``); a group whose members also share the file bytes is a byte copy. Rejected
images take no part (they are removed anyway), so a keeper is always usable.
"""

from __future__ import annotations

import polars as pl

from curation_assets.core.dedup.keepers import KEEPER_EXPLANATION, KeeperPolicy, order_for_keeping

EXACT_DUPLICATES_SCHEMA: dict[str, pl.DataType] = {
    "group_id": pl.String(),
    "image_id": pl.String(),
    "is_keeper": pl.Boolean(),
    "keeper_id": pl.String(),
    "match": pl.String(),  # "keeper", "byte" (same file bytes as the keeper) or "pixel"
    "group_size": pl.Int64(),
    "reason": pl.String(),
}


def find_exact_duplicates(
    candidates: pl.LazyFrame | pl.DataFrame, policy: KeeperPolicy, seed: int = 0
) -> pl.DataFrame:
    """Groups of identical images among ``candidates``.

    ``candidates`` needs image_id, content_hash, pixel_hash, status, width, height,
    size_bytes and n_findings. Returns one row per member of every group of two or more.
    """
    lazy = candidates.lazy() if isinstance(candidates, pl.DataFrame) else candidates
    members = (
        lazy.filter((pl.col("status") != "rejected") & pl.col("pixel_hash").is_not_null())
        .with_columns(pixels=pl.col("width").cast(pl.Int64) * pl.col("height").cast(pl.Int64))
        .filter(pl.len().over("pixel_hash") > 1)
        .collect()
    )
    if members.is_empty():
        return pl.DataFrame(schema=EXACT_DUPLICATES_SCHEMA)
    ordered = order_for_keeping(members, policy, seed)
    keepers = (
        ordered.group_by("pixel_hash", maintain_order=True)
        .first()
        .select("pixel_hash", keeper_id=pl.col("image_id"), keeper_hash=pl.col("content_hash"))
    )
    why_kept = f"kept: {KEEPER_EXPLANATION[policy]}"
    return (
        ordered.join(keepers, on="pixel_hash", how="left")
        .with_columns(
            group_id=pl.col("pixel_hash"),
            is_keeper=pl.col("image_id") == pl.col("keeper_id"),
            group_size=pl.len().over("pixel_hash").cast(pl.Int64),
        )
        .with_columns(
            match=pl.when(pl.col("is_keeper"))
            .then(pl.lit("keeper"))
            .when(pl.col("content_hash") == pl.col("keeper_hash"))
            .then(pl.lit("byte"))
            .otherwise(pl.lit("pixel")),
        )
        .with_columns(
            reason=pl.when(pl.col("is_keeper"))
            .then(pl.lit(why_kept))
            .when(pl.col("match") == "byte")
            .then(pl.concat_str(pl.lit("byte copy of "), pl.col("keeper_id")))
            .otherwise(pl.concat_str(pl.lit("same pixels as "), pl.col("keeper_id")))
        )
        .select(list(EXACT_DUPLICATES_SCHEMA))
        .sort("group_id", "is_keeper", "image_id", descending=[False, True, False])
    )


def summarize(groups: pl.DataFrame) -> dict[str, int]:
    """Counts for metadata and the funnel."""
    removed = groups.filter(~pl.col("is_keeper"))
    return {
        "groups": groups["group_id"].n_unique() if len(groups) else 0,
        "duplicates_removed": len(removed),
        "byte_copies": int((removed["match"] == "byte").sum()),
        "pixel_copies": int((removed["match"] == "pixel").sum()),
        "largest_group": int(groups["group_size"].max() or 0) if len(groups) else 0,
    }
