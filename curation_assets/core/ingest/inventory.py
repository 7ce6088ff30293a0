"""The inventory of a shard: every file, hashed and classified, none silently skipped."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable

import polars as pl
import xxhash

from curation_assets.core.ingest.formats import HEAD_BYTES, classify_file, extension_of
from curation_assets.core.ingest.shards import Shard, ShardFile
from curation_assets.core.ingest.sources import ByteFeed, needs_feed, read_source
from curation_assets.core.outputs.reasons import Reason

_READ_BLOCK = 1 << 20

INVENTORY_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String(),
    "shard": pl.String(),
    "split": pl.String(),
    "rel_path": pl.String(),
    "source_path": pl.String(),
    "offset": pl.Int64(),
    "size_bytes": pl.Int64(),
    "mtime": pl.Float64(),
    "content_hash": pl.String(),
    "extension": pl.String(),
    "detected_format": pl.String(),
    "is_image": pl.Boolean(),
    "note": pl.String(),
    "metadata": pl.String(),  # JSON: WebDataset sidecars or a parquet row's other columns (else null)
}


def hash_file(file: ShardFile) -> tuple[str, bytes]:
    """(xxh3-128 hex digest of the bytes, first bytes) of a file or tar member, streamed.

    Bytes the listing already read (tar members, parquet rows) are hashed as they are; an
    object on object storage is read whole (one GET).
    """
    if file.data is not None or needs_feed(file.source_path):
        data = file.data if file.data is not None else read_source(file.source_path, file.offset, file.size)
        return xxhash.xxh3_128_hexdigest(data), data[:HEAD_BYTES]
    digest = xxhash.xxh3_128()
    head = b""
    with open(file.source_path, "rb") as handle:
        if file.offset is not None:
            handle.seek(file.offset)
        remaining = file.size if file.offset is not None else None
        while True:
            want = _READ_BLOCK if remaining is None else min(_READ_BLOCK, remaining)
            block = handle.read(want) if want else b""
            if not block:
                break
            if not head:
                head = block[:HEAD_BYTES]
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    if remaining:  # a tar member cut short by a damaged archive
        raise OSError(f"member data ends {remaining} bytes early")
    return digest.hexdigest(), head


def inventory_row(shard: Shard, file: ShardFile) -> dict:
    """One inventory row: identity, size, hash, format by magic bytes, and why it is not an image."""
    row = {
        "image_id": file.image_id,
        "shard": shard.key,
        "split": shard.split,
        "rel_path": file.rel_path,
        "source_path": file.source_path,
        "offset": file.offset,
        "size_bytes": file.size,
        "mtime": file.mtime,
        "content_hash": None,
        "extension": extension_of(file.rel_path),
        "detected_format": None,
        "is_image": False,
        "note": None,
        "metadata": json.dumps(file.metadata, sort_keys=True, default=str) if file.metadata else None,
    }
    if file.error is not None:
        row["note"] = f"{Reason.UNREADABLE}: {file.error}"
        return row
    try:
        row["content_hash"], head = hash_file(file)
    except Exception as exc:  # OSError locally; object stores raise their own types
        row["note"] = f"{Reason.UNREADABLE}: {type(exc).__name__}: {exc}"
        return row
    real, reason = classify_file(file.rel_path, file.size, head)
    row["detected_format"] = real
    row["is_image"] = reason is None
    row["note"] = None if reason is None else str(reason)
    return row


def build_inventory(
    shard: Shard,
    files: Iterable[ShardFile],
    progress: Callable[[int, float], None] | None = None,
    progress_every: int = 2000,
) -> pl.DataFrame:
    """The inventory table of a shard; ``progress(files_done, files_per_second)`` now and then."""
    rows = []
    start = time.perf_counter()
    feed = ByteFeed(())  # objects on object storage: fetched 64 at a time, concurrently
    listed = iter(files)
    while batch := tuple(itertools.islice(listed, 64)):  # itertools.batched needs Python 3.12
        for file in feed.fill(batch):
            rows.append(inventory_row(shard, file))
            if progress and len(rows) % progress_every == 0:
                progress(len(rows), len(rows) / max(time.perf_counter() - start, 1e-9))
    return pl.DataFrame(rows, schema=INVENTORY_SCHEMA) if rows else pl.DataFrame(schema=INVENTORY_SCHEMA)
