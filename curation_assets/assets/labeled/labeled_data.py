"""What the labeled-dataset assets share: every image with its split and label, and semantic vectors.

Labels are not an asset of their own: they are a cheap join of the inventory with the
directory layout or the labels file, so each asset that needs them derives them from the
same inputs (and reports the same match statistics) rather than reading a copy that could
be stale.
"""

from typing import Any

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.keys import INVENTORY, SANITIZED, SEMANTIC_EMBEDDINGS
from curation_assets.config import ProjectConfig
from curation_assets.core.embed.vectors import VectorMismatchError, assert_compatible
from curation_assets.core.labeled.labels import (
    labels_from_layout,
    labels_from_metadata,
    match_labels,
    read_labels_file,
)
from curation_assets.core.outputs.reasons import Status
from curation_assets.resources.store import ProjectStore

IMAGES_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String(),
    "shard": pl.String(),
    "split": pl.String(),
    "rel_path": pl.String(),
    "source_path": pl.String(),
    "offset": pl.Int64(),
    "size_bytes": pl.Int64(),
    "content_hash": pl.String(),
    "status": pl.String(),
    "reasons": pl.List(pl.String()),
    "detail": pl.String(),
    "metadata": pl.String(),  # the inventory's JSON metadata (WebDataset sidecars, parquet columns)
    "label": pl.String(),
    "caption": pl.String(),
}


def all_images(store: ProjectStore, shards: list[str]) -> pl.DataFrame:
    """Every image file of ``shards`` (inventory joined with sanitize): where it is and its status.

    Rejected images stay (the review lists corrupt files, and the torch wrapper must skip
    them); use :func:`kept` for the images later stages read.
    """
    inventory = store.scan_shards(INVENTORY, shards)
    sanitized = store.scan_shards(SANITIZED, shards)
    if inventory is None or sanitized is None:
        return pl.DataFrame(schema={k: v for k, v in IMAGES_SCHEMA.items() if k not in ("label", "caption")})
    files = inventory.filter(pl.col("is_image")).select(
        "image_id", "shard", "split", "rel_path", "source_path", "offset", "size_bytes", "metadata"
    )
    status = sanitized.select("image_id", "content_hash", "status", "reasons", "detail")
    return files.join(status, on="image_id", how="inner").collect().sort("image_id")


def kept(images: pl.DataFrame) -> pl.DataFrame:
    """The images sanitize did not reject."""
    return images.filter(pl.col("status") != Status.REJECTED)


def with_labels(project: ProjectConfig, images: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, Any]]:
    """``images`` plus label and caption columns (null when unknown), and how the labels matched.

    ``labels.source``: ``column`` reads ``label_column`` (and ``caption_column``) from each
    image's metadata (parquet columns, WebDataset sidecars); ``layout`` reads the class folder
    under each split's root; ``file``
    reads the labels file and ties its references to image_ids by id, full path or path
    suffix (see :func:`curation_assets.core.labeled.labels.resolve_refs`). A file reference that
    matches no image, or several, is counted, not fatal: a labels file usually covers
    more (or other versions of) files than one run has inventoried.
    """
    config = project.labels
    stats: dict[str, Any] = {"label_source": config.source}
    if config.source == "none" or images.is_empty():
        out = images.with_columns(label=pl.lit(None, pl.String()), caption=pl.lit(None, pl.String()))
    elif config.source == "column":
        found = labels_from_metadata(images, config.label_column, config.caption_column)
        out = images.join(found, on="image_id", how="left")
    elif config.source == "layout":
        layout = labels_from_layout(images, roots=project.dataset.roots)
        out = images.join(layout.select("image_id", "label"), on="image_id", how="left").with_columns(
            caption=pl.lit(None, pl.String())
        )
    else:
        assert config.file is not None  # the config refuses source: file without a file
        try:
            table = read_labels_file(
                config.file,
                id_column=config.id_column,
                label_column=config.label_column,
                caption_column=config.caption_column,
            )
            matched = match_labels(table, images)
        except (OSError, ValueError) as exc:
            raise dg.Failure(f"labels.file: {exc}") from None
        counts = matched.group_by("matched_by").len()
        stats["label_refs"] = matched.height
        stats["label_refs_matched_by"] = dict(zip(counts["matched_by"], counts["len"], strict=True))
        found = matched.filter(pl.col("image_id").is_not_null())
        if "caption" not in found.columns:
            found = found.with_columns(caption=pl.lit(None, pl.String()))
        # Two references to one file (its id and its path, say) keep the first; differing labels
        # for one image are counted so the metadata shows the file disagrees with itself.
        conflicts = found.group_by("image_id").agg(pl.col("label").n_unique()).filter(pl.col("label") > 1)
        stats["images_with_conflicting_labels"] = conflicts.height
        found = found.unique("image_id", keep="first", maintain_order=True)
        out = images.join(found.select("image_id", "label", "caption"), on="image_id", how="left")
    labeled = int(out["label"].is_not_null().sum()) if out.height else 0
    stats["images"] = out.height
    stats["labeled_images"] = labeled
    stats["unlabeled_images"] = out.height - labeled
    return out.cast({"label": pl.String(), "caption": pl.String()}), stats


def semantic_matrix(
    store: ProjectStore, shards: list[str], image_ids: pl.Series, model_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(vectors row-aligned with ``image_ids``, mask of rows that have one).

    Rows without a vector (a decode error, a shard not embedded yet) are zeros, which the
    leak and label-issue searches treat as "pairs with nothing". Every shard's vectors must
    come from the configured semantic model and from one model identity: a mix would put
    incomparable vectors into one index.
    """
    parts: list[tuple[pl.DataFrame, np.ndarray]] = []
    identity: dict[str, Any] | None = None
    for shard in shards:
        if not store.shard_path(SEMANTIC_EMBEDDINGS, shard).is_file():
            continue
        ids, vectors, meta = store.read_vectors(SEMANTIC_EMBEDDINGS, shard)
        if meta.get("model_name") != model_name:
            raise dg.Failure(
                f"shard {shard!r}: semantic vectors were made by model {meta.get('model_name')!r}, the "
                f"project says stages.embeddings.semantic_model {model_name!r}; "
                f"re-materialize {SEMANTIC_EMBEDDINGS}"
            )
        if identity is None:
            identity = meta["model"]
        else:
            try:
                assert_compatible(shard, meta["model"], identity)
            except VectorMismatchError as exc:
                raise dg.Failure(str(exc)) from None
        have = ids.filter(pl.col("row").is_not_null()).select("image_id", "row")
        parts.append((have, vectors))
    n = len(image_ids)
    if not parts:
        return np.zeros((n, 1), np.float32), np.zeros(n, dtype=bool)
    dim = parts[0][1].shape[1]
    # the stored dtype (float16): half the memory of float32 on a million-image split
    out = np.zeros((n, dim), parts[0][1].dtype)
    mask = np.zeros(n, dtype=bool)
    position = pl.DataFrame({"image_id": image_ids}).with_row_index("_pos")
    for have, vectors in parts:
        # one join per shard: the vectors are read straight from the memory map into place
        rows = position.join(have, on="image_id", how="inner")
        if rows.is_empty():
            continue
        at = rows["_pos"].to_numpy().astype(np.int64)
        out[at] = np.asarray(vectors)[rows["row"].to_numpy()]
        mask[at] = True
    return out, mask
