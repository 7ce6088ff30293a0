"""`quality_scores` (per shard): weight-free technical-quality scores of every kept image.

Blur (edge energy), darkness and over-exposure (luminance percentiles), low information
(entropy) and colourfulness (grayscale), computed on a small copy of each image's one
decode in the shard pass. Always available: no weights. Thresholds are applied by `filter_decisions`,
so changing one never recomputes the scores.
"""

import dagster as dg
import polars as pl

from curation_assets.assets.common import md_table
from curation_assets.assets.filters.shard_scores import coverage_check
from curation_assets.assets.keys import QUALITY
from curation_assets.assets.signatures import sanitized_bytes, signature_of
from curation_assets.assets.stage_spec import CheckDef, DecodePart, PassContext
from curation_assets.config import ProjectConfig
from curation_assets.core.filters.rules import FilterRule
from curation_assets.resources.store import ProjectStore

# core.quality imports scipy: it is imported inside the functions that use it, so that loading
# the Definitions stays cheap (issue 12).

CHECK_SCORED = "every_kept_image_has_a_quality_score"
SCORE_COLUMNS = ["blur", "brightness_p99", "brightness_p5", "entropy", "colorfulness"]


def quality_signature(project: ProjectConfig, store: ProjectStore, shard: str) -> str:
    from curation_assets.core.filters import quality

    # The scores depend on the kept images and the scoring code, not on any threshold.
    return signature_of(sanitized_bytes(store, shard), f"quality-{quality.QUALITY_VERSION}")


def quality_description(project: ProjectConfig) -> str:
    return (
        "Weight-free quality scores of every kept image of the shard: blur (edge energy), luminance "
        "percentiles (dark / over-exposed), entropy (low information), colourfulness (grayscale). "
        "Computed in the shard pass on a 256 px copy of each image's one decode."
    )


def finish_quality(ctx: PassContext) -> dg.MaterializeResult:
    """Write the scores from the shard pass (or report the stored table when current)."""
    from curation_assets.core.filters import quality

    table = ctx.per_image_table(
        quality.scores_frame, {"quality_version": quality.QUALITY_VERSION}, "quality score"
    )
    errors = table.filter(pl.col("error").is_not_null())
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
    columns = [c for c in SCORE_COLUMNS if c in table.columns]
    return dg.MaterializeResult(
        asset_key=ctx.key,
        metadata={
            "skipped": ctx.skipped,
            "images": table.height,
            "errors": errors.height,
            "scores": md_table(stats),
            "dagster/row_count": table.height,
            "path": dg.MetadataValue.path(str(ctx.store.shard_path(QUALITY, ctx.shard))),
        },
        check_results=[coverage_check(ctx.key, CHECK_SCORED, ctx.kept.height, table, columns, "scores")],
    )


QUALITY_PART = DecodePart(
    group="filters",
    kinds=frozenset({"pillow", "polars"}),
    description=quality_description,
    checks=(CheckDef(CHECK_SCORED, "Every kept image has quality scores."),),
    finish=finish_quality,
    per_image="curation_assets.core.filters.quality:score_image",
)


def quality_rules(project: ProjectConfig) -> list[FilterRule]:
    """The thresholds of stages.quality as named rules (grayscale only when switched on)."""
    from curation_assets.core.filters.quality import GRAYSCALE_COLORFULNESS

    q = project.stages.quality
    rules = [
        FilterRule("quality:dark", "brightness_p99", q.dark_threshold, "below"),
        FilterRule("quality:light", "brightness_p5", q.light_threshold, "above"),
        FilterRule("quality:low_information", "entropy", q.low_information_threshold, "below"),
        FilterRule("quality:blur", "blur", q.blur_threshold, "below"),
    ]
    if q.grayscale:
        rules.append(FilterRule("quality:grayscale", "colorfulness", GRAYSCALE_COLORFULNESS, "below"))
    return rules
