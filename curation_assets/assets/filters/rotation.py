"""`rotation_predictions` (per shard): a 4-way rotation model's probabilities for every kept image.

The model sees images already turned upright by their EXIF orientation (the shard pass's
decode honours it), so it only predicts what EXIF does not say. Probabilities are stored; the
decision (top class not 0 degrees and probability >= stages.rotation.threshold) is made by
`filter_decisions`, so changing the threshold recomputes nothing. Pixels are never
rotated here: export and the apply job do that.
"""

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.embed.embeddings import model_stamp
from curation_assets.assets.filters.shard_scores import coverage_check
from curation_assets.assets.keys import ROTATION
from curation_assets.assets.signatures import SIGNATURE, sanitized_bytes, signature_of
from curation_assets.assets.stage_spec import CheckDef, DecodePart, PassContext
from curation_assets.config import ProjectConfig
from curation_assets.core.filters.rotation import ANGLES
from curation_assets.resources.store import ProjectStore

CHECK_PREDICTED = "every_kept_image_has_a_rotation_prediction"
PROBABILITY_COLUMNS = [f"p{angle}" for angle in ANGLES]


def rotation_signature(project: ProjectConfig, store: ProjectStore, shard: str) -> str:
    model = project.stages.rotation.model
    return signature_of(sanitized_bytes(store, shard), model_stamp(model, project.models[model]))


def rotation_description(project: ProjectConfig) -> str:
    return (
        f"Probabilities of 0/90/180/270 degrees (model `{project.stages.rotation.model}`) for every kept "
        "image of the shard, after its EXIF orientation, from the shard pass's one decode per image. "
        "The decision is made by filter_decisions."
    )


def finish_rotation(ctx: PassContext) -> dg.MaterializeResult:
    """Write the probabilities from the shard pass (or report the stored table when current)."""
    stage = ctx.project.stages.rotation
    path = ctx.store.shard_path(ROTATION, ctx.shard)
    if ctx.output is None:
        table = ctx.store.read_parquet(path)
    else:
        out = ctx.output.models[stage.model]
        for image_id, error in zip(ctx.kept["image_id"], ctx.output.errors, strict=True):
            if error is not None:
                ctx.log.warning(f"{image_id}: no rotation prediction ({error})")
        probabilities = np.asarray(out.vectors[out.done], dtype=np.float32)
        table = pl.DataFrame({"image_id": ctx.kept["image_id"].filter(pl.Series(out.done))}).with_columns(
            pl.Series(name, probabilities[:, i], dtype=pl.Float32)
            for i, name in enumerate(PROBABILITY_COLUMNS)
        )
        meta = {"model": ctx.models[stage.model].identity, SIGNATURE: ctx.signature}
        ctx.store.write_parquet(table, path, metadata=meta)
    top = table.select(PROBABILITY_COLUMNS).to_numpy() if table.height else np.zeros((0, 4))
    turned = top.argmax(axis=1) != 0 if len(top) else np.zeros(0, dtype=bool)
    confident = top.max(axis=1) >= stage.threshold if len(top) else np.zeros(0, dtype=bool)
    return dg.MaterializeResult(
        asset_key=ctx.key,
        metadata={
            "skipped": ctx.skipped,
            "images": table.height,
            "predicted_turned": int(turned.sum()),
            "turned_at_threshold": int((turned & confident).sum()),
            "threshold": stage.threshold,
            "dagster/row_count": table.height,
            "path": dg.MetadataValue.path(str(path)),
        },
        check_results=[
            coverage_check(
                ctx.key, CHECK_PREDICTED, ctx.kept.height, table, PROBABILITY_COLUMNS, "probabilities"
            )
        ],
    )


ROTATION_PART = DecodePart(
    group="rotation",
    kinds=frozenset({"pytorch"}),
    description=rotation_description,
    checks=(CheckDef(CHECK_PREDICTED, "Every kept image has probabilities."),),
    finish=finish_rotation,
    model=lambda project: project.stages.rotation.model,
    vector_dtype="float32",
)
