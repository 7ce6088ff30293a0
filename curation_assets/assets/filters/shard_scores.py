"""What every per-shard score asset shares: input signatures, skipping unchanged shards, reading inputs.

A score asset (example distances, quality, aesthetic, rotation) writes one parquet per
shard with an ``input_signature`` in its footer. When the signature of today's inputs
equals the stored one the shard is not recomputed, so materializing the whole graph after
a threshold change costs only the cheap decision asset. ``shard_is_current`` (headless
runs) asks the same functions, so the CLI and the assets agree on what is stale.
"""

from collections.abc import Callable

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.ingest.sanitize import kept_images
from curation_assets.assets.keys import SEMANTIC_EMBEDDINGS
from curation_assets.assets.signatures import (  # noqa: F401  (the score assets import them from here)
    SIGNATURE,
    sanitized_bytes,
    signature_of,
    stored_signature,
    vectors_signature,
)
from curation_assets.core.ingest.images import ImageRef
from curation_assets.resources.store import ProjectStore


def kept_refs(store: ProjectStore, shard: str) -> tuple[pl.DataFrame, list[ImageRef]]:
    """The shard's kept images (sanitize not rejected) and where their bytes are."""
    kept = kept_images(store, shard)
    refs = [
        ImageRef(r["image_id"], r["source_path"], r["offset"], r["size_bytes"], r["width"], r["height"])
        for r in kept.iter_rows(named=True)
    ]
    return kept, refs


def semantic_vectors(store: ProjectStore, shard: str) -> tuple[pl.DataFrame, np.ndarray]:
    """(image_id, content_hash of images with a vector, float16 vectors in that order)."""
    ids, vectors, _ = store.read_vectors(SEMANTIC_EMBEDDINGS, shard)
    have = ids.filter(pl.col("row").is_not_null()).sort("row")
    return have.select("image_id", "content_hash"), np.asarray(vectors)[have["row"].to_numpy()]


def skip_or_compute(
    context: dg.AssetExecutionContext,
    store: ProjectStore,
    asset: str,
    signature: str,
    compute: Callable[[], tuple[pl.DataFrame, dict]],
) -> tuple[pl.DataFrame, dict, bool]:
    """The stored table when its signature is current; otherwise compute, write and return it.

    ``compute`` returns (table, extra footer metadata). The third value says whether it was skipped.
    """
    shard = context.partition_key
    path = store.shard_path(asset, shard)
    if stored_signature(store, asset, shard) == signature:
        context.log.info(f"{asset} {shard}: inputs unchanged, kept the existing table")
        return store.read_parquet(path), store.parquet_metadata(path), True
    table, extra = compute()
    meta = {**extra, SIGNATURE: signature}
    store.write_parquet(table, path, metadata=meta)
    return table, meta, False


def coverage_check(
    key: dg.AssetKey, name: str, kept: int, table: pl.DataFrame, columns: list[str], what: str
) -> dg.AssetCheckResult:
    """Every kept image of the shard has a non-null value in every one of ``columns``."""
    complete = (
        table.filter(pl.all_horizontal(pl.col(c).is_not_null() for c in columns)).height if columns else 0
    )
    missing = kept - complete
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=name,
        passed=missing == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"kept_images": kept, f"with_{what}": complete, "missing": missing},
    )
