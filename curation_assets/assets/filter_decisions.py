"""`filter_decisions` (global): which content filters remove each kept image, and by how much.

Reads the per-shard scores (example distances, aesthetic, quality, rotation
probabilities) of every processed shard and applies the thresholds of the project file:
a distance below a category's threshold removes, a score below a score threshold removes
(over-exposure: a 5th brightness percentile above the threshold). Rotation decisions are
made here too (top class not 0 degrees with probability >= the threshold).

It is global and cheap on purpose: one threshold change re-materializes only this asset,
and its metadata shows the whole pool's distribution with the threshold marked (percentile
table, histogram), which is what a user tunes by.
"""

import base64
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.aesthetic import AESTHETIC
from curation_assets.assets.common import asset_key, group_name, md_table
from curation_assets.assets.exact_duplicates import processed_shards
from curation_assets.assets.example_filters import EXAMPLE_DISTANCES, distance_column
from curation_assets.assets.quality import QUALITY
from curation_assets.assets.rotation import PROBABILITY_COLUMNS, ROTATION
from curation_assets.assets.sanitize import SANITIZED
from curation_assets.config import ProjectConfig
from curation_assets.core.filters import FilterRule, decide, percentile_table, summarize
from curation_assets.core.reasons import Status
from curation_assets.core.rotation import rotation_decisions
from curation_assets.resources.store import ProjectStore, StoreResource

# core.quality (scipy) and core.plots (matplotlib) are imported inside the functions that use
# them: every decision-side module imports this one, and loading the Definitions must stay
# cheap (issue 12).

FILTER_DECISIONS = "filter_decisions"
CHECK_ONE_ROW = "one_row_per_kept_image"


def filter_rules(project: ProjectConfig) -> list[FilterRule]:
    """Every threshold the project file switches on, as a named rule."""
    stages = project.stages
    rules = []
    if stages.example_filters.enabled:
        rules += [
            FilterRule(f"example:{name}", distance_column(name), category.threshold, "below")
            for name, category in stages.example_filters.categories.items()
        ]
    if stages.aesthetic.enabled:
        rules.append(FilterRule("aesthetic", "aesthetic", stages.aesthetic.threshold, "below"))
    if stages.quality.enabled:
        q = stages.quality
        rules += [
            FilterRule("quality:dark", "brightness_p99", q.dark_threshold, "below"),
            FilterRule("quality:light", "brightness_p5", q.light_threshold, "above"),
            FilterRule("quality:low_information", "entropy", q.low_information_threshold, "below"),
            FilterRule("quality:blur", "blur", q.blur_threshold, "below"),
        ]
        if q.grayscale:
            from curation_assets.core.quality import GRAYSCALE_COLORFULNESS

            rules.append(FilterRule("quality:grayscale", "colorfulness", GRAYSCALE_COLORFULNESS, "below"))
    return rules


def score_assets(project: ProjectConfig) -> list[str]:
    """The per-shard score assets this project has (in join order)."""
    stages = project.stages
    return [
        asset
        for asset, on in (
            (EXAMPLE_DISTANCES, stages.example_filters.enabled),
            (AESTHETIC, stages.aesthetic.enabled),
            (QUALITY, stages.quality.enabled),
            (ROTATION, stages.rotation.enabled),
        )
        if on
    ]


def gather_scores(store: ProjectStore, shards: list[str], assets: list[str], log) -> pl.DataFrame:
    """Kept images of ``shards`` with every score column joined (null where a score is missing)."""
    sanitized = store.scan_shards(SANITIZED, shards)
    frame = (
        sanitized.filter(pl.col("status") != Status.REJECTED).select("image_id", "content_hash").collect()
        if sanitized is not None
        else pl.DataFrame(schema={"image_id": pl.String, "content_hash": pl.String})
    )
    for asset in assets:
        have = [s for s in shards if store.shard_path(asset, s).is_file()]
        if len(have) < len(shards):
            log.warning(f"{len(shards) - len(have)} shard(s) have no {asset}: their images keep null scores")
        scan = store.scan_shards(asset, have)
        if scan is None:
            continue
        scores = scan.drop([c for c in ("content_hash", "error") if c in scan.collect_schema()]).collect()
        frame = frame.join(scores, on="image_id", how="left")
    return frame


def rotation_columns(frame: pl.DataFrame, threshold: float) -> pl.DataFrame:
    """Adds rotate (clockwise degrees to undo, 0 = none), rotation_angle and rotation_probability.

    An image without probabilities (no prediction yet) gets nulls and is not rotated.
    """
    probabilities = frame.select(PROBABILITY_COLUMNS).fill_null(float("nan")).to_numpy()
    decisions = rotation_decisions(probabilities, threshold)
    return frame.with_columns(
        rotate=decisions["correction"].fill_null(0),
        rotation_angle=decisions["predicted_angle"],
        rotation_probability=decisions["probability"],
    )


def md_image(path: Path, alt: str) -> str:
    """A PNG embedded in markdown, so the Dagster UI shows the plot itself, not only its path."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


def filter_report(
    store: ProjectStore, frame: pl.DataFrame, rules: list[FilterRule]
) -> tuple[list[dict], dict[str, dg.MetadataValue]]:
    """Per rule: a summary row, and its percentile table and histogram as metadata entries."""
    from curation_assets.core.plots import histogram_plot

    rows, entries = [], {}
    for rule in rules:
        values = (
            frame[rule.column].cast(pl.Float64).to_numpy() if rule.column in frame.columns else np.zeros(0)
        )
        summary = summarize(values, rule.threshold, rule.removes)
        rows.append(
            {
                "filter": rule.name,
                "threshold": rule.threshold,
                "removes": f"{rule.removes} threshold",
                "removed": summary["removed"],
                "percent": f"{summary['percent_removed']:.2f}",
                "min": _fmt(summary["min"]),
                "mean": _fmt(summary["mean"]),
                "max": _fmt(summary["max"]),
                "threshold_percentile": _fmt(summary["threshold_percentile"]),
            }
        )
        slug = rule.name.replace(":", "_")
        plot = store.write_with(
            store.global_path(FILTER_DECISIONS, f"{slug}.png"),
            lambda path, rule=rule, values=values: histogram_plot(
                values[np.isfinite(values)],
                rule.threshold,
                path,
                rule.name,
                rule.column,
                removes=rule.removes,
            ),
        )
        entries[f"{slug}_percentiles"] = md_table(percentile_table(values, rule.threshold, rule.removes))
        entries[f"{slug}_histogram"] = dg.MetadataValue.md(md_image(plot, rule.name))
        entries[f"{slug}_plot"] = dg.MetadataValue.path(str(plot))
    return rows, entries


def _fmt(value: float | None) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.4g}"


def build_filter_decisions_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    key = asset_key(project, FILTER_DECISIONS)
    assets = score_assets(project)
    rules = filter_rules(project)

    @dg.asset(
        key=key,
        deps=[asset_key(project, SANITIZED), *(asset_key(project, a) for a in assets)],
        group_name=group_name(project, "filters"),
        kinds={"polars", "parquet"},
        check_specs=[
            dg.AssetCheckSpec(CHECK_ONE_ROW, asset=key, blocking=True, description="One row per kept image.")
        ],
        description=(
            "For every kept image: which filters remove it (`removed_by`) and by how much "
            "(`<score>_margin`), "
            f"from the project's thresholds ({', '.join(r.name for r in rules) or 'none'})"
            + (", and its rotation decision" if project.stages.rotation.enabled else "")
            + ". Cheap: change a threshold and re-materialize only this."
        ),
    )
    def filter_decisions(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        shards = processed_shards(context, project, project_store, SANITIZED)
        frame = gather_scores(project_store, shards, assets, context.log)
        # a score no shard has yet is null for everyone: null scores are kept, never removed
        frame = frame.with_columns(
            pl.lit(None, pl.Float64).alias(rule.column) for rule in rules if rule.column not in frame.columns
        )
        if project.stages.rotation.enabled:
            frame = frame.with_columns(
                pl.lit(None, pl.Float32).alias(c) for c in PROBABILITY_COLUMNS if c not in frame.columns
            )
        table = frame.join(decide(frame, rules), on="image_id", how="left", maintain_order="left")
        if project.stages.rotation.enabled:
            table = rotation_columns(table, project.stages.rotation.threshold)
        out = project_store.write_parquet(
            table,
            project_store.global_path(FILTER_DECISIONS, f"{FILTER_DECISIONS}.parquet"),
            metadata={"rules": [r.__dict__ for r in rules], "shards": shards},
        )
        rows, entries = filter_report(project_store, table, rules)
        removed = int(table["removed"].sum()) if table.height else 0
        metadata = {
            "images": table.height,
            "removed": removed,
            "percent_removed": round(100 * removed / max(table.height, 1), 2),
            "filters": md_table(rows),
            **entries,
            "dagster/row_count": table.height,
            "path": dg.MetadataValue.path(str(out)),
        }
        if project.stages.rotation.enabled:
            metadata["rotated"] = int((table["rotate"] != 0).sum())
            metadata["rotation_threshold"] = project.stages.rotation.threshold
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name=CHECK_ONE_ROW,
                    passed=table["image_id"].n_unique() == table.height,
                    metadata={"rows": table.height, "unique_ids": table["image_id"].n_unique()},
                )
            ],
        )

    return filter_decisions
