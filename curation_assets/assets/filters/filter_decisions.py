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

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.common import asset_key, group_name, md_table, plot_md
from curation_assets.assets.dedup.exact_duplicates import processed_shards
from curation_assets.assets.filters.rotation import PROBABILITY_COLUMNS
from curation_assets.assets.keys import (
    EXACT,
    FILTER_DECISIONS,
    GROUPS,
    SANITIZED,
)
from curation_assets.config import ProjectConfig
from curation_assets.core.filters.rotation import rotation_decisions
from curation_assets.core.filters.rules import FilterRule, decide, percentile_table, summarize
from curation_assets.core.outputs.reasons import Status
from curation_assets.resources.store import ProjectStore, StoreResource

# core.quality (scipy) and core.plots (matplotlib) are imported inside the functions that use
# them: every decision-side module imports this one, and loading the Definitions must stay
# cheap (issue 12).

CHECK_ONE_ROW = "one_row_per_kept_image"


def filter_rules(project: ProjectConfig) -> list[FilterRule]:
    """Every threshold the project file switches on, as a named rule (each score stage names its own)."""
    from curation_assets.assets.stages import enabled_stages

    return [
        rule
        for stage in enabled_stages(project)
        if stage.filter_rules
        for rule in stage.filter_rules(project)
    ]


def score_assets(project: ProjectConfig) -> list[str]:
    """The per-shard score assets this project has (in join order)."""
    from curation_assets.assets.stages import enabled_stages

    return [stage.name for stage in enabled_stages(project) if stage.scores]


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


def duplicate_removed_ids(project: ProjectConfig, store: ProjectStore) -> set[str] | None:
    """Images exact or near dedup removes before the filters see them; None when a dedup stage the
    project runs has not written its output (then "still in" cannot be told apart from "all")."""
    removed: set[str] = set()
    for asset, on in (
        (EXACT, project.stages.exact_dedup.enabled),
        (GROUPS, project.stages.near_dedup.enabled),
    ):
        if not on:
            continue
        path = store.global_path(asset, f"{asset}.parquet")
        if not path.is_file():
            return None
        table = store.read_parquet(path, columns=["image_id", "is_keeper"])
        removed.update(table.filter(~pl.col("is_keeper"))["image_id"].to_list())
    return removed


def still_in_mask(frame: pl.DataFrame, duplicates: set[str] | None) -> np.ndarray:
    """True for the rows (sanitized images) that dedup left in, i.e. that reach the filter stage."""
    if duplicates is None:
        return np.ones(frame.height, dtype=bool)
    return ~frame["image_id"].is_in(list(duplicates)).to_numpy()


def filter_report(
    store: ProjectStore, frame: pl.DataFrame, rules: list[FilterRule], still_in: np.ndarray | None = None
) -> tuple[list[dict], list[dict], dict[str, dg.MetadataValue]]:
    """Per rule: a narrow summary row (both counts), a detail row, and its percentile table and
    histogram as metadata entries.

    "would remove" counts over every sanitized image, duplicates included (the score
    distribution a user tunes by); "removed here" counts only images ``still_in`` at the filter
    stage, which is what the funnel charges to the filters.
    """
    from curation_assets.core.outputs.plots import histogram_plot

    still_in = np.ones(frame.height, dtype=bool) if still_in is None else still_in
    reaching = int(still_in.sum())
    rows, details, entries = [], [], {}
    for rule in rules:
        values = (
            frame[rule.column].cast(pl.Float64).to_numpy() if rule.column in frame.columns else np.zeros(0)
        )
        summary = summarize(values, rule.threshold, rule.removes)
        here = summarize(values[still_in] if values.size else values, rule.threshold, rule.removes)
        rows.append(
            {
                "filter": rule.name,
                "threshold": f"{rule.removes} {rule.threshold:g}",
                "would remove (of all)": f"{summary['removed']:,} of {frame.height:,}",
                "removed here (of still in)": f"{here['removed']:,} of {reaching:,}",
            }
        )
        details.append(
            {
                "filter": rule.name,
                "percent of all": f"{summary['percent_removed']:.2f}",
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
        # one entry per plot (the histogram embedded as markdown, as every *_plot entry is)
        entries[f"{slug}_plot"] = plot_md(plot, rule.name)
    return rows, details, entries


def _fmt(value: float | None) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.4g}"


def build_filter_decisions_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    key = asset_key(project, FILTER_DECISIONS)
    assets = score_assets(project)
    rules = filter_rules(project)

    @dg.asset(
        key=key,
        # dedup outputs only tell which images are still in at this stage (the "removed here" counts)
        deps=[
            asset_key(project, SANITIZED),
            *(asset_key(project, a) for a in assets),
            *([asset_key(project, EXACT)] if project.stages.exact_dedup.enabled else []),
            *([asset_key(project, GROUPS)] if project.stages.near_dedup.enabled else []),
        ],
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
        still_in = still_in_mask(table, duplicate_removed_ids(project, project_store))
        rows, details, entries = filter_report(project_store, table, rules, still_in)
        removed = int(table["removed"].sum()) if table.height else 0
        removed_here = (
            int(table["removed"].fill_null(False).to_numpy()[still_in].sum()) if table.height else 0
        )
        metadata = {
            "images": table.height,
            "removed": removed,
            "percent_removed": round(100 * removed / max(table.height, 1), 2),
            # the funnel's filter step: one image counted once, whatever number of filters hit it
            "images_still_in_at_filters": int(still_in.sum()),
            "removed_here_of_still_in": removed_here,
            "filters": md_table(rows),
            "filters_detail": md_table(details),
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
