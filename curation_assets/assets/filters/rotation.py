"""`rotation_predictions` (per shard): a 4-way rotation model's probabilities for every kept image.

The model sees images already turned upright by their EXIF orientation (``load_rgb``
honours it), so it only predicts what EXIF does not say. Probabilities are stored; the
decision (top class not 0 degrees and probability >= stages.rotation.threshold) is made by
`filter_decisions`, so changing the threshold recomputes nothing. Pixels are never
rotated here: export and the apply job do that.
"""

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.common import RateLogger, asset_key, group_name, load_project_model
from curation_assets.assets.embed.embeddings import model_stamp
from curation_assets.assets.filters.shard_scores import (
    coverage_check,
    kept_refs,
    sanitized_bytes,
    signature_of,
    skip_or_compute,
)
from curation_assets.assets.keys import ROTATION, SANITIZED
from curation_assets.config import ProjectConfig
from curation_assets.core.filters.rotation import ANGLES
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import ProjectStore, StoreResource

CHECK_PREDICTED = "every_kept_image_has_a_rotation_prediction"
PROBABILITY_COLUMNS = [f"p{angle}" for angle in ANGLES]


def rotation_signature(project: ProjectConfig, store: ProjectStore, shard: str) -> str:
    model = project.stages.rotation.model
    return signature_of(sanitized_bytes(store, shard), model_stamp(model, project.models[model]))


def build_rotation_asset(project: ProjectConfig, partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    key = asset_key(project, ROTATION)
    stage = project.stages.rotation

    @dg.asset(
        key=key,
        partitions_def=partitions,
        deps=[asset_key(project, SANITIZED)],
        group_name=group_name(project, "rotation"),
        kinds={"pytorch"},
        pool="gpu",
        check_specs=[
            dg.AssetCheckSpec(CHECK_PREDICTED, asset=key, description="Every kept image has probabilities.")
        ],
        description=(
            f"Probabilities of 0/90/180/270 degrees (model `{stage.model}`) for every kept image of the "
            "shard, after its EXIF orientation. The decision is made by filter_decisions."
        ),
    )
    def rotation_predictions(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        shard = context.partition_key
        project_store = store.for_project(project)
        settings = compute.settings()
        signature = rotation_signature(project, project_store, shard)

        def predict() -> tuple[pl.DataFrame, dict]:
            # core.embed imports torch: imported here so that loading the Definitions stays cheap (issue 12)
            from curation_assets.core.embed.embed import embed_images

            model = load_project_model(project, stage.model, settings.device)
            _, refs = kept_refs(project_store, shard)
            rate = RateLogger(context.log, f"rotation {shard}")
            result = embed_images(
                model.module, model.preprocessing, model.dim, refs, settings, progress=rate, dtype=np.float32
            )
            rate.finish(len(refs))
            for image_id, error in result.errors[:20]:
                context.log.warning(f"{image_id}: no rotation prediction ({error})")
            probabilities = np.asarray(result.vectors, dtype=np.float32)
            table = pl.DataFrame({"image_id": result.image_ids}).with_columns(
                pl.Series(name, probabilities[:, i], dtype=pl.Float32)
                for i, name in enumerate(PROBABILITY_COLUMNS)
            )
            return table, {"model": model.identity}

        table, _, skipped = skip_or_compute(context, project_store, ROTATION, signature, predict)
        kept, _ = kept_refs(project_store, shard)
        top = table.select(PROBABILITY_COLUMNS).to_numpy() if table.height else np.zeros((0, 4))
        turned = top.argmax(axis=1) != 0 if len(top) else np.zeros(0, dtype=bool)
        confident = top.max(axis=1) >= stage.threshold if len(top) else np.zeros(0, dtype=bool)
        return dg.MaterializeResult(
            metadata={
                "skipped": skipped,
                "images": table.height,
                "predicted_turned": int(turned.sum()),
                "turned_at_threshold": int((turned & confident).sum()),
                "threshold": stage.threshold,
                "dagster/row_count": table.height,
                "path": dg.MetadataValue.path(str(project_store.shard_path(ROTATION, shard))),
            },
            check_results=[
                coverage_check(key, CHECK_PREDICTED, kept.height, table, PROBABILITY_COLUMNS, "probabilities")
            ],
        )

    return rotation_predictions
