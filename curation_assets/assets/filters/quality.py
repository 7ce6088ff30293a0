"""`quality_scores` (per shard): weight-free technical-quality scores of every kept image.

Blur (edge energy), darkness and over-exposure (luminance percentiles), low information
(entropy) and colourfulness (grayscale), computed on a small grey copy in worker
processes. Always available: no weights. Thresholds are applied by `filter_decisions`,
so changing one never recomputes the scores.
"""

import dagster as dg
import polars as pl

from curation_assets.assets.common import RateLogger, asset_key, group_name, md_table
from curation_assets.assets.filters.shard_scores import (
    coverage_check,
    kept_refs,
    sanitized_bytes,
    signature_of,
    skip_or_compute,
)
from curation_assets.assets.keys import QUALITY, SANITIZED
from curation_assets.config import ProjectConfig
from curation_assets.resources.store import ProjectStore, StoreResource

# core.quality imports scipy: it is imported inside the functions that use it, so that loading
# the Definitions stays cheap (issue 12).

CHECK_SCORED = "every_kept_image_has_a_quality_score"
SCORE_COLUMNS = ["blur", "brightness_p99", "brightness_p5", "entropy", "colorfulness"]


def quality_signature(project: ProjectConfig, store: ProjectStore, shard: str) -> str:
    from curation_assets.core.filters import quality

    # The scores depend on the kept images and the scoring code, not on any threshold.
    return signature_of(sanitized_bytes(store, shard), f"quality-{quality.QUALITY_VERSION}")


def build_quality_asset(project: ProjectConfig, partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    key = asset_key(project, QUALITY)
    stage = project.stages.quality

    @dg.asset(
        key=key,
        partitions_def=partitions,
        deps=[asset_key(project, SANITIZED)],
        group_name=group_name(project, "filters"),
        kinds={"pillow", "polars"},
        check_specs=[
            dg.AssetCheckSpec(CHECK_SCORED, asset=key, description="Every kept image has quality scores.")
        ],
        description=(
            "Weight-free quality scores of every kept image of the shard: blur (edge energy), luminance "
            "percentiles (dark / over-exposed), entropy (low information), colourfulness (grayscale)."
        ),
    )
    def quality_scores(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        shard = context.partition_key
        project_store = store.for_project(project)
        signature = quality_signature(project, project_store, shard)
        kept, refs = kept_refs(project_store, shard)

        def compute() -> tuple[pl.DataFrame, dict]:
            from curation_assets.core.filters import quality

            rate = RateLogger(context.log, f"quality {shard}")
            scores = quality.score_images(refs, workers=stage.workers, progress=rate)
            rate.finish(len(refs))
            return scores, {"quality_version": quality.QUALITY_VERSION}

        table, _, skipped = skip_or_compute(context, project_store, QUALITY, signature, compute)
        errors = table.filter(pl.col("error").is_not_null())
        for row in errors.head(20).iter_rows(named=True):
            context.log.warning(f"{row['image_id']}: no quality score ({row['error']})")
        stats = [
            {
                "score": column,
                "min": round(float(table[column].min() or 0), 4),
                "median": round(float(table[column].median() or 0), 4),
                "max": round(float(table[column].max() or 0), 4),
            }
            for column in SCORE_COLUMNS
            if column in table.columns
        ]
        return dg.MaterializeResult(
            metadata={
                "skipped": skipped,
                "images": table.height,
                "errors": errors.height,
                "scores": md_table(stats),
                "dagster/row_count": table.height,
                "path": dg.MetadataValue.path(str(project_store.shard_path(QUALITY, shard))),
            },
            check_results=[
                coverage_check(
                    key,
                    CHECK_SCORED,
                    kept.height,
                    table,
                    [c for c in SCORE_COLUMNS if c in table.columns],
                    "scores",
                )
            ],
        )

    return quality_scores
