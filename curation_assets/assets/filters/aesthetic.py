"""`aesthetic_scores` (per shard): the LAION aesthetic MLP over CLIP ViT-L/14 image embeddings, 0-10.

When the aesthetic stage's `clip_model` is the project's semantic model, the stored
semantic vectors are scored directly (no second pass over the images); otherwise the CLIP
model embeds the shard first. Tree of Life removed blurred images this way.
"""

from typing import TYPE_CHECKING

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.common import RateLogger, asset_key, group_name, load_project_model
from curation_assets.assets.embed.embeddings import model_stamp
from curation_assets.assets.filters.shard_scores import (
    coverage_check,
    kept_refs,
    sanitized_bytes,
    semantic_vectors,
    signature_of,
    skip_or_compute,
    vectors_signature,
)
from curation_assets.assets.keys import AESTHETIC, SANITIZED, SEMANTIC_EMBEDDINGS
from curation_assets.config import ProjectConfig
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import ProjectStore, StoreResource

# torch and the core modules that import it are imported inside the functions that use them:
# loading the Definitions must stay cheap (issue 12).
if TYPE_CHECKING:
    import torch

    from curation_assets.core.embed.embed import ComputeSettings
    from curation_assets.core.embed.models import LoadedModel

CHECK_SCORED = "every_kept_image_has_an_aesthetic_score"
SCORE_BATCH = 4096


def reuses_semantic_vectors(project: ProjectConfig) -> bool:
    embeddings = project.stages.embeddings
    return embeddings.enabled and embeddings.semantic_model == project.stages.aesthetic.clip_model


def score_vectors(mlp: "LoadedModel", vectors: np.ndarray, device: "torch.device") -> np.ndarray:
    """Aesthetic scores of CLIP image embeddings (unit-normalised first, as the LAION head expects)."""
    import torch

    out = np.empty(len(vectors), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(vectors), SCORE_BATCH):
            chunk = torch.from_numpy(np.asarray(vectors[start : start + SCORE_BATCH], dtype=np.float32))
            chunk = torch.nn.functional.normalize(chunk, dim=1).to(device)
            out[start : start + len(chunk)] = mlp.module(chunk).float().cpu().numpy().reshape(-1)
    return out


def clip_vectors(
    project: ProjectConfig, store: ProjectStore, shard: str, settings: "ComputeSettings", log
) -> tuple[pl.DataFrame, np.ndarray]:
    if reuses_semantic_vectors(project):
        return semantic_vectors(store, shard)
    from curation_assets.core.embed.embed import embed_images

    clip = load_project_model(project, project.stages.aesthetic.clip_model, settings.device)
    kept, refs = kept_refs(store, shard)
    rate = RateLogger(log, f"aesthetic CLIP {shard}")
    result = embed_images(clip.module, clip.preprocessing, clip.dim, refs, settings, progress=rate)
    rate.finish(len(refs))
    for image_id, error in result.errors[:20]:
        log.warning(f"{image_id}: no CLIP vector ({error})")
    ids = pl.DataFrame({"image_id": result.image_ids}).join(
        kept.select("image_id", "content_hash"), on="image_id", how="left", maintain_order="left"
    )
    return ids, result.vectors


def aesthetic_signature(project: ProjectConfig, store: ProjectStore, shard: str) -> str:
    """The scores depend on the CLIP vectors (or the images and the CLIP model) and the MLP."""
    stage = project.stages.aesthetic
    inputs = (
        vectors_signature(store, SEMANTIC_EMBEDDINGS, shard)
        if reuses_semantic_vectors(project)
        else signature_of(
            sanitized_bytes(store, shard), model_stamp(stage.clip_model, project.models[stage.clip_model])
        )
    )
    return signature_of(inputs, model_stamp(stage.model, project.models[stage.model]))


def build_aesthetic_asset(project: ProjectConfig, partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    key = asset_key(project, AESTHETIC)
    stage = project.stages.aesthetic
    reuse = reuses_semantic_vectors(project)

    @dg.asset(
        key=key,
        partitions_def=partitions,
        deps=[asset_key(project, SEMANTIC_EMBEDDINGS if reuse else SANITIZED)],
        group_name=group_name(project, "filters"),
        kinds={"pytorch"},
        pool="gpu",
        check_specs=[
            dg.AssetCheckSpec(CHECK_SCORED, asset=key, description="Every kept image has an aesthetic score.")
        ],
        description=(
            f"Aesthetic score 0-10 (model `{stage.model}` over `{stage.clip_model}` image embeddings"
            f"{', the stored semantic vectors' if reuse else ''}) of every kept image of the shard."
        ),
    )
    def aesthetic_scores(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        shard = context.partition_key
        project_store = store.for_project(project)
        settings = compute.settings()
        signature = aesthetic_signature(project, project_store, shard)

        def compute_scores() -> tuple[pl.DataFrame, dict]:
            mlp = load_project_model(project, stage.model, settings.device)
            ids, vectors = clip_vectors(project, project_store, shard, settings, context.log)
            scores = score_vectors(mlp, vectors, settings.device)
            table = ids.with_columns(aesthetic=pl.Series(np.clip(scores, 0, 10), dtype=pl.Float32))
            out_of_range = int(((scores < 0) | (scores > 10) | ~np.isfinite(scores)).sum())
            return table, {"model": mlp.identity, "raw_out_of_range": out_of_range}

        table, meta, skipped = skip_or_compute(context, project_store, AESTHETIC, signature, compute_scores)
        kept, _ = kept_refs(project_store, shard)
        values = table["aesthetic"]
        return dg.MaterializeResult(
            metadata={
                "skipped": skipped,
                "images": table.height,
                "mean": round(float(values.mean() or 0), 3),
                "below_threshold": int((values < stage.threshold).sum()),
                "threshold": stage.threshold,
                # raw MLP outputs outside 0-10 are clipped; many of them means the wrong CLIP model
                "raw_out_of_range": meta.get("raw_out_of_range", 0),
                "dagster/row_count": table.height,
                "path": dg.MetadataValue.path(str(project_store.shard_path(AESTHETIC, shard))),
            },
            check_results=[coverage_check(key, CHECK_SCORED, kept.height, table, ["aesthetic"], "score")],
        )

    return aesthetic_scores
