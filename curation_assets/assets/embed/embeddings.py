"""`sscd_embeddings` and `semantic_embeddings` (per shard): float16 vectors of the kept images.

Copy-detection vectors (stages.embeddings.copy_model, SSCD in the walkthroughs) feed the
near-duplicate index; semantic vectors (semantic_model, CLIP / PE) feed filters and
clustering. Both run in the Dagster pool "gpu" with the compute resource. A shard whose
sanitize table and model are unchanged is skipped; a changed model recomputes.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import xxhash

from curation_assets.assets.common import RateLogger, asset_key, group_name, load_project_model
from curation_assets.assets.keys import COPY_EMBEDDINGS, INVENTORY, SANITIZED, SEMANTIC_EMBEDDINGS
from curation_assets.config import ModelEntry, ProjectConfig
from curation_assets.core.ingest.images import ImageRef
from curation_assets.core.outputs.reasons import Status
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import ProjectStore, StoreResource

CHECK_ONE_VECTOR = "one_vector_per_kept_image"
CHECK_FINITE = "vectors_are_finite"
CHECK_NORMS = "norms_as_expected"

IDS_SCHEMA = {"image_id": pl.String(), "row": pl.Int64(), "content_hash": pl.String(), "error": pl.String()}


def model_stamp(model_name: str, entry: ModelEntry) -> str:
    """Changes when the model entry or its weights file (size, mtime) change; cheap, loads nothing."""
    parts = [model_name, entry.model_dump_json()]
    for path in (entry.path, entry.config):
        if path and Path(path).is_file():
            stat = Path(path).stat()
            parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\n".join(parts)


def input_signature(sanitized_path: Path, model_name: str, entry: ModelEntry) -> str:
    """Changes when the shard's kept images, the model entry or its weights file change."""
    digest = xxhash.xxh3_128(sanitized_path.read_bytes())
    digest.update(model_stamp(model_name, entry).encode())
    return digest.hexdigest()


def kept_images(store: ProjectStore, shard: str) -> pl.DataFrame:
    """Sanitize rows that are not rejected, with where their bytes are (from the inventory)."""
    sanitized = pl.read_parquet(store.shard_path(SANITIZED, shard))
    where = pl.read_parquet(store.shard_path(INVENTORY, shard), columns=["image_id", "source_path", "offset"])
    return (
        sanitized.filter(pl.col("status") != Status.REJECTED)
        .select("image_id", "content_hash", "size_bytes", "width", "height")
        .join(where, on="image_id", how="left")
    )


def embedding_checks(
    key: dg.AssetKey, kept: int, vectors: np.ndarray, errors: int, unit_norm: bool
) -> list[dg.AssetCheckResult]:
    finite = bool(np.isfinite(vectors).all()) if len(vectors) else True
    norms = np.linalg.norm(vectors.astype(np.float32), axis=1) if len(vectors) else np.ones(0)
    norms_ok = bool(np.all(np.abs(norms - 1) < 1e-2)) if unit_norm else bool(np.all(norms > 0))
    return [
        dg.AssetCheckResult(
            asset_key=key,
            check_name=CHECK_ONE_VECTOR,
            passed=len(vectors) + errors == kept and errors == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"kept_images": kept, "vectors": len(vectors), "decode_errors": errors},
        ),
        dg.AssetCheckResult(asset_key=key, check_name=CHECK_FINITE, passed=finite),
        dg.AssetCheckResult(
            asset_key=key,
            check_name=CHECK_NORMS,
            passed=norms_ok,
            metadata={
                "expected": "unit norm" if unit_norm else "non-zero",
                "min_norm": float(norms.min()) if len(norms) else 0.0,
                "max_norm": float(norms.max()) if len(norms) else 0.0,
            },
        ),
    ]


def build_embedding_asset(
    project: ProjectConfig, partitions: dg.PartitionsDefinition, asset: str, model_name: str, purpose: str
) -> dg.AssetsDefinition:
    key = asset_key(project, asset)
    entry = project.models[model_name]

    @dg.asset(
        key=key,
        partitions_def=partitions,
        deps=[asset_key(project, SANITIZED)],
        group_name=group_name(project, "embeddings"),
        kinds={"pytorch", "numpy"},
        pool="gpu",
        check_specs=[
            dg.AssetCheckSpec(CHECK_ONE_VECTOR, asset=key, description="Every kept image has a vector."),
            dg.AssetCheckSpec(CHECK_FINITE, asset=key, blocking=True, description="No NaN or Inf."),
            dg.AssetCheckSpec(
                CHECK_NORMS, asset=key, blocking=True, description="Norms as the model promises."
            ),
        ],
        description=(
            f"{purpose} vectors (model `{model_name}`, kind {entry.kind}) of every kept image of the shard: "
            "float16 .npy row-aligned with a parquet of image_ids; model identity and preprocessing in its "
            "metadata. Skipped when the shard and the model are unchanged."
        ),
    )
    def embeddings(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        # core.models and core.embed import torch: imported here, not at the top, so that loading
        # the Definitions stays cheap (issue 12)
        from curation_assets.core.embed.embed import embed_images
        from curation_assets.core.embed.models import ModelFileError, check_model_file

        shard = context.partition_key
        project_store = store.for_project(project)
        try:  # before any image is read
            check_model_file(model_name, entry, project.allow_download)
        except ModelFileError as exc:
            raise dg.Failure(str(exc)) from None
        sanitized_path = project_store.shard_path(SANITIZED, shard)
        if not sanitized_path.is_file():
            raise dg.Failure(f"no sanitized_images for shard {shard!r}: materialize it first")
        signature = input_signature(sanitized_path, model_name, entry)
        table_path = project_store.shard_path(asset, shard)
        if (
            table_path.is_file()
            and project_store.parquet_metadata(table_path).get("input_signature") == signature
        ):
            ids, vectors, meta = project_store.read_vectors(asset, shard)
            context.log.info(f"{asset} {shard}: inputs and model unchanged, kept the existing vectors")
            return dg.MaterializeResult(
                metadata={"skipped": True, "vectors": len(vectors), "model": model_name},
                check_results=embedding_checks(
                    key,
                    len(ids),
                    np.asarray(vectors),
                    int(ids["error"].is_not_null().sum()),
                    bool(meta.get("normalized")),
                ),
            )

        settings = compute.settings()
        model = load_project_model(project, model_name, settings.device)
        kept = kept_images(project_store, shard)
        refs = [
            ImageRef(r["image_id"], r["source_path"], r["offset"], r["size_bytes"], r["width"], r["height"])
            for r in kept.iter_rows(named=True)
        ]
        rate = RateLogger(context.log, f"{asset} {shard} on {settings.device}")
        result = embed_images(model.module, model.preprocessing, model.dim, refs, settings, progress=rate)
        rate.finish(len(refs))
        rows = {image_id: row for row, image_id in enumerate(result.image_ids)}
        errors = dict(result.errors)
        ids = kept.select("image_id", "content_hash").with_columns(
            row=pl.col("image_id").replace_strict(rows, default=None, return_dtype=pl.Int64),
            error=pl.col("image_id").replace_strict(errors, default=None, return_dtype=pl.String),
        )
        ids = ids.select(list(IDS_SCHEMA))
        project_store.write_vectors(
            asset,
            shard,
            ids,
            result.vectors,
            metadata={
                "model": model.identity,
                "model_name": model_name,
                "preprocessing": model.preprocessing.describe(),
                "dim": model.dim,
                "normalized": model.normalized,
                "count": len(result.image_ids),
                "input_signature": signature,
            },
        )
        for image_id, error in result.errors[:20]:
            context.log.warning(f"{image_id}: no vector ({error})")
        return dg.MaterializeResult(
            metadata={
                "model": model_name,
                "kind": entry.kind,
                "preprocessing": model.preprocessing.summary(),
                "dim": model.dim,
                "vectors": len(result.image_ids),
                "decode_errors": len(result.errors),
                "images_per_second": round(result.images_per_second, 1),
                "compute": dg.MetadataValue.json(settings.describe()),
                "oom_backoffs": result.backoffs,
                "path": dg.MetadataValue.path(str(table_path)),
                "dagster/row_count": len(ids),
            },
            check_results=embedding_checks(
                key, len(refs), result.vectors, len(result.errors), model.normalized
            ),
        )

    return embeddings


def embedding_models(project: ProjectConfig) -> dict[str, str]:
    """Embedding asset name -> the model it runs (empty when the stage is off)."""
    stage = project.stages.embeddings
    if not stage.enabled:
        return {}
    return {COPY_EMBEDDINGS: stage.copy_model, SEMANTIC_EMBEDDINGS: stage.semantic_model}


_PURPOSE = {COPY_EMBEDDINGS: "Copy-detection", SEMANTIC_EMBEDDINGS: "Semantic"}


def build_embedding_assets(
    project: ProjectConfig, partitions: dg.PartitionsDefinition
) -> list[dg.AssetsDefinition]:
    return [
        build_embedding_asset(project, partitions, asset, model_name, _PURPOSE[asset])
        for asset, model_name in embedding_models(project).items()
    ]
