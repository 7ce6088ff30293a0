"""`aesthetic_scores` (per shard): the LAION aesthetic MLP over CLIP ViT-L/14 image embeddings, 0-10.

When the aesthetic stage's `clip_model` is the project's semantic model, the stored
semantic vectors are scored directly (no second pass over the images); otherwise the CLIP
model embeds the shard first. Tree of Life removed blurred images this way.
"""

from typing import TYPE_CHECKING

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.common import GPU_STEP_TAGS, asset_key, group_name, load_project_model
from curation_assets.assets.embed.embeddings import model_stamp
from curation_assets.assets.filters.shard_scores import (
    coverage_check,
    sanitized_bytes,
    semantic_vectors,
    signature_of,
    vectors_signature,
)
from curation_assets.assets.ingest.sanitize import kept_images
from curation_assets.assets.keys import AESTHETIC, SEMANTIC_EMBEDDINGS
from curation_assets.assets.signatures import SIGNATURE, stored_signature
from curation_assets.assets.stage_spec import CheckDef, DecodePart, PassContext
from curation_assets.config import ProjectConfig
from curation_assets.core.filters.rules import FilterRule
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import ProjectStore, StoreResource

# torch and the core modules that import it are imported inside the functions that use them:
# loading the Definitions must stay cheap (issue 12).
if TYPE_CHECKING:
    import torch

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


def _description(project: ProjectConfig) -> str:
    stage = project.stages.aesthetic
    source = (
        "the stored semantic vectors"
        if reuses_semantic_vectors(project)
        else "vectors from the shard pass's one decode per image"
    )
    return (
        f"Aesthetic score 0-10 (model `{stage.model}` over `{stage.clip_model}` image embeddings, {source}) "
        "of every kept image of the shard."
    )


def _result(
    project: ProjectConfig,
    store: ProjectStore,
    shard: str,
    key: dg.AssetKey,
    signature: str,
    clip: tuple[pl.DataFrame, np.ndarray] | None,
    device,
) -> dg.MaterializeResult:
    """Score ``clip`` (image ids, CLIP vectors) with the MLP and write them; None: report the stored table."""
    stage = project.stages.aesthetic
    path = store.shard_path(AESTHETIC, shard)
    if clip is None:
        table, meta = store.read_parquet(path), store.parquet_metadata(path)
    else:
        mlp = load_project_model(project, stage.model, device)
        ids, vectors = clip
        scores = score_vectors(mlp, vectors, device)
        table = ids.with_columns(aesthetic=pl.Series(np.clip(scores, 0, 10), dtype=pl.Float32))
        out_of_range = int(((scores < 0) | (scores > 10) | ~np.isfinite(scores)).sum())
        meta = {"model": mlp.identity, "raw_out_of_range": out_of_range, SIGNATURE: signature}
        store.write_parquet(table, path, metadata=meta)
    kept = kept_images(store, shard)
    values = table["aesthetic"]
    return dg.MaterializeResult(
        asset_key=key,
        metadata={
            "skipped": clip is None,
            "images": table.height,
            "mean": round(float(values.mean() or 0), 3),
            "below_threshold": int((values < stage.threshold).sum()),
            "threshold": stage.threshold,
            # raw MLP outputs outside 0-10 are clipped; many of them means the wrong CLIP model
            "raw_out_of_range": meta.get("raw_out_of_range", 0),
            "dagster/row_count": table.height,
            "path": dg.MetadataValue.path(str(path)),
        },
        check_results=[coverage_check(key, CHECK_SCORED, kept.height, table, ["aesthetic"], "score")],
    )


def build_aesthetic_asset(project: ProjectConfig, partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """The aesthetic asset of a project whose semantic model is the aesthetic head's CLIP model:
    it scores the stored semantic vectors and decodes nothing."""
    key = asset_key(project, AESTHETIC)

    @dg.asset(
        key=key,
        partitions_def=partitions,
        deps=[asset_key(project, SEMANTIC_EMBEDDINGS)],
        group_name=group_name(project, "filters"),
        kinds={"pytorch"},
        pool="gpu",
        op_tags=GPU_STEP_TAGS,
        check_specs=[dg.AssetCheckSpec(CHECK_SCORED, asset=key, description=_CHECK.description)],
        description=_description(project),
    )
    def aesthetic_scores(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        shard = context.partition_key
        project_store = store.for_project(project)
        signature = aesthetic_signature(project, project_store, shard)
        if stored_signature(project_store, AESTHETIC, shard) == signature:
            context.log.info(f"{AESTHETIC} {shard}: inputs unchanged, kept the existing table")
            return _result(project, project_store, shard, key, signature, None, None)
        device = compute.settings().device
        clip = semantic_vectors(project_store, shard)
        return _result(project, project_store, shard, key, signature, clip, device)

    return aesthetic_scores


def finish_aesthetic(ctx: PassContext) -> dg.MaterializeResult:
    """Score the CLIP vectors the shard pass computed for the aesthetic head (its own CLIP model)."""
    clip = None
    if ctx.output is not None:
        out = ctx.output.models[ctx.project.stages.aesthetic.clip_model]
        ids = ctx.kept.select("image_id", "content_hash").filter(pl.Series(out.done))
        clip = (ids, out.vectors[out.done])
        for image_id, error in zip(ctx.kept["image_id"], ctx.output.errors, strict=True):
            if error is not None:
                ctx.log.warning(f"{image_id}: no CLIP vector ({error})")
    device = ctx.compute.get("device", "cpu")  # the compute resource's device, as the pass ran
    return _result(ctx.project, ctx.store, ctx.shard, ctx.key, ctx.signature, clip, device)


_CHECK = CheckDef(CHECK_SCORED, "Every kept image has an aesthetic score.")

AESTHETIC_PART = DecodePart(
    group="filters",
    kinds=frozenset({"pytorch"}),
    description=_description,
    checks=(_CHECK,),
    finish=finish_aesthetic,
    model=lambda project: project.stages.aesthetic.clip_model,
)


def aesthetic_rules(project: ProjectConfig) -> list[FilterRule]:
    return [FilterRule("aesthetic", "aesthetic", project.stages.aesthetic.threshold, "below")]
