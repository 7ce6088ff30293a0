"""`sscd_embeddings` and `semantic_embeddings` (per shard): float16 vectors of the kept images.

Copy-detection vectors (stages.embeddings.copy_model, SSCD in the walkthroughs) feed the
near-duplicate index; semantic vectors (semantic_model, CLIP / PE) feed filters and
clustering. Both are outputs of the shard pass (assets/ingest/shard_pass.py): each model's
inputs are resized from the one decode of each image. A shard whose sanitize table and
model are unchanged is skipped; a changed model recomputes only its own vectors.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import xxhash

from curation_assets.assets.keys import COPY_EMBEDDINGS, SANITIZED, SEMANTIC_EMBEDDINGS
from curation_assets.assets.signatures import SIGNATURE
from curation_assets.assets.stage_spec import CheckDef, DecodePart, PassContext
from curation_assets.config import ModelEntry, ProjectConfig
from curation_assets.resources.store import ProjectStore

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


def embedding_description(asset: str, model_name: str, entry: ModelEntry) -> str:
    return (
        f"{_PURPOSE[asset]} vectors (model `{model_name}`, kind {entry.kind}) of every kept image of the "
        "shard: "
        "float16 .npy row-aligned with a parquet of image_ids; model identity and preprocessing in its "
        "metadata. Made from the shard pass's one decode per image; skipped when the shard and the "
        "model are unchanged."
    )


EMBEDDING_CHECKS = (
    CheckDef(CHECK_ONE_VECTOR, "Every kept image has a vector."),
    CheckDef(CHECK_FINITE, "No NaN or Inf.", blocking=True),
    CheckDef(CHECK_NORMS, "Norms as the model promises.", blocking=True),
)


def finish_embeddings(ctx: PassContext, asset: str, model_name: str) -> dg.MaterializeResult:
    """Write a model's vectors from the shard pass (or report the stored ones when current)."""
    entry = ctx.project.models[model_name]
    if ctx.output is None:
        ids, vectors, meta = ctx.store.read_vectors(asset, ctx.shard)
        return dg.MaterializeResult(
            asset_key=ctx.key,
            metadata={"skipped": True, "vectors": len(vectors), "model": model_name},
            check_results=embedding_checks(
                ctx.key,
                len(ids),
                np.asarray(vectors),
                int(ids["error"].is_not_null().sum()),
                bool(meta.get("normalized")),
            ),
        )
    model = ctx.models[model_name]
    out = ctx.output.models[model_name]
    done = out.done
    vectors = out.vectors[done].astype(np.float16)
    rows = np.full(len(done), -1, dtype=np.int64)
    rows[done] = np.arange(int(done.sum()))
    errors = [
        None if ok else (error or "not processed") for ok, error in zip(done, ctx.output.errors, strict=True)
    ]
    ids = ctx.kept.select("image_id", "content_hash").with_columns(
        row=pl.Series([int(r) if r >= 0 else None for r in rows], dtype=pl.Int64),
        error=pl.Series(errors, dtype=pl.String),
    )
    table_path = ctx.store.shard_path(asset, ctx.shard)
    ctx.store.write_vectors(
        asset,
        ctx.shard,
        ids.select(list(IDS_SCHEMA)),
        vectors,
        metadata={
            "model": model.identity,
            "model_name": model_name,
            "preprocessing": model.preprocessing.describe(),
            "dim": model.dim,
            "normalized": model.normalized,
            "count": len(vectors),
            SIGNATURE: ctx.signature,
        },
    )
    failed = ids.filter(pl.col("error").is_not_null())
    for image_id, error in failed.select("image_id", "error").head(20).iter_rows():
        ctx.log.warning(f"{image_id}: no vector ({error})")
    return dg.MaterializeResult(
        asset_key=ctx.key,
        metadata={
            "model": model_name,
            "kind": entry.kind,
            "preprocessing": model.preprocessing.summary(),
            "dim": model.dim,
            "vectors": len(vectors),
            "decode_errors": failed.height,
            "model_seconds": round(out.seconds, 2),
            "shard_pass_images_per_second": round(ctx.output.images_per_second, 1),
            "compute": dg.MetadataValue.json(ctx.compute),
            "oom_backoffs": out.backoffs,
            "path": dg.MetadataValue.path(str(table_path)),
            "dagster/row_count": ids.height,
        },
        check_results=embedding_checks(ctx.key, ctx.kept.height, vectors, failed.height, model.normalized),
    )


def embedding_models(project: ProjectConfig) -> dict[str, str]:
    """Embedding asset name -> the model it runs (empty when the stage is off)."""
    stage = project.stages.embeddings
    if not stage.enabled:
        return {}
    return {COPY_EMBEDDINGS: stage.copy_model, SEMANTIC_EMBEDDINGS: stage.semantic_model}


_PURPOSE = {COPY_EMBEDDINGS: "Copy-detection", SEMANTIC_EMBEDDINGS: "Semantic"}


def embedding_part(asset: str) -> DecodePart:
    """The shard-pass part of ``sscd_embeddings`` or ``semantic_embeddings``."""

    def model_of(project: ProjectConfig) -> str:
        return embedding_models(project)[asset]

    return DecodePart(
        group="embeddings",
        kinds=frozenset({"pytorch", "numpy"}),
        description=lambda project: embedding_description(
            asset, model_of(project), project.models[model_of(project)]
        ),
        checks=EMBEDDING_CHECKS,
        finish=lambda ctx: finish_embeddings(ctx, asset, model_of(ctx.project)),
        model=model_of,
    )


def embedding_signature(asset: str):
    """The input-signature function of an embedding asset (kept images, model entry, weights file)."""

    def signature(project: ProjectConfig, store: ProjectStore, shard: str) -> str:
        model_name = embedding_models(project)[asset]
        return input_signature(store.shard_path(SANITIZED, shard), model_name, project.models[model_name])

    return signature
