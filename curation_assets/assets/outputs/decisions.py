"""`curation_decisions` (global): what happens to every inventoried file, and every reason why.

One row per file: action (keep / keep_with_fix / remove), the first stage that removes it,
every reason that applies, a sentence that explains it, the fixes export and apply will
make, and the scores. Its metadata tells the funnel the way the walkthroughs do
("5,908,775 -> ... -> 3,000,000").
"""

import dagster as dg
import polars as pl

from curation_assets.assets.common import asset_key, group_name, md_table
from curation_assets.assets.dedup.exact_duplicates import processed_shards
from curation_assets.assets.filters.filter_decisions import score_assets
from curation_assets.assets.keys import (
    DECISIONS,
    DECONTAMINATION,
    EXACT,
    FILTER_DECISIONS,
    GROUPS,
    INVENTORY,
    SAMPLE,
    SANITIZED,
)
from curation_assets.assets.outputs.decision_inputs import MissingInputError, decisions_for, project_stages
from curation_assets.config import ProjectConfig
from curation_assets.core.outputs.decisions import (
    KEEP,
    KEEP_WITH_FIX,
    REMOVE,
    STAGES,
    decision_funnel,
    funnel_line,
)
from curation_assets.core.outputs.reasons import Status
from curation_assets.resources.store import ProjectStore, StoreResource

CHECK_ONE_ROW = "one_row_per_inventoried_file"
CHECK_KEPT_VALID = "every_kept_image_is_valid"
CHECK_SAMPLE_KEPT = "kept_count_equals_the_sample"


def decisions_path(store: ProjectStore):
    return store.global_path(DECISIONS, f"{DECISIONS}.parquet")


def sample_path(project: ProjectConfig, store: ProjectStore):
    return store.global_path(SAMPLE, f"{SAMPLE}.parquet") if project.stages.sampling.enabled else None


def decision_deps(project: ProjectConfig) -> list[dg.AssetKey]:
    names = [INVENTORY, SANITIZED]
    stages = project.stages
    names += [EXACT] if stages.exact_dedup.enabled else []
    names += [GROUPS] if stages.near_dedup.enabled else []
    names += [DECONTAMINATION] if project.references.of_role("decontaminate") else []
    names += [FILTER_DECISIONS] if score_assets(project) else []
    names += [SAMPLE] if stages.sampling.enabled else []
    return [asset_key(project, name) for name in names]


def removed_by_stage(decisions: pl.DataFrame) -> list[dict]:
    """Removed images counted once, at the first stage that removes them: these add up to the funnel.

    Files that are not images are inside sanitize's count here (the funnel lists them apart), so
    the column sums to the number of removed files.
    """
    counts = dict(decisions.filter(pl.col("action") == REMOVE).group_by("stage").len().iter_rows())
    rows = [{"first removing stage": s, "removed images": counts[s]} for s in STAGES if counts.get(s)]
    return [*rows, {"first removing stage": "total", "removed images": sum(counts.values())}]


def reason_hits(decisions: pl.DataFrame) -> list[dict]:
    """How often each reason kind applies: one image can carry several, so these do not add up to
    the removed images (a near duplicate that is also blurred counts under both)."""
    removed = decisions.filter(pl.col("action") == REMOVE)
    kinds = removed.select(
        "image_id", kind=pl.col("reasons").list.eval(pl.element().str.split(":").list.first())
    ).explode("kind")
    table = (
        kinds.drop_nulls("kind")
        .group_by("kind")
        .agg(hits=pl.len(), images=pl.col("image_id").n_unique())
        .sort("hits", "kind", descending=[True, False])
    )
    return [
        {"reason": kind, "reason hits": hits, "removed images with it": images}
        for kind, hits, images in table.iter_rows()
    ]


def decision_checks(decisions: pl.DataFrame, sampled: pl.DataFrame | None) -> list[dg.AssetCheckResult]:
    kept = decisions.filter(pl.col("action") != REMOVE)
    invalid = kept.filter(
        pl.col("sanitize_status").is_null() | (pl.col("sanitize_status") == Status.REJECTED)
    )
    checks = [
        dg.AssetCheckResult(
            check_name=CHECK_ONE_ROW,
            passed=decisions["image_id"].n_unique() == decisions.height,
            metadata={"rows": decisions.height, "unique_ids": decisions["image_id"].n_unique()},
        ),
        dg.AssetCheckResult(
            check_name=CHECK_KEPT_VALID,
            passed=invalid.is_empty(),
            metadata={"kept": kept.height, "kept_but_rejected_by_sanitize": invalid.height},
        ),
    ]
    if sampled is not None:
        unique = sampled["image_id"].n_unique()
        checks.append(
            dg.AssetCheckResult(
                check_name=CHECK_SAMPLE_KEPT,
                passed=kept.height == unique,
                metadata={"kept": kept.height, "sampled_unique": unique},
            )
        )
    return checks


def build_decisions_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    key = asset_key(project, DECISIONS)
    sampling = project.stages.sampling.enabled
    specs = [
        dg.AssetCheckSpec(
            CHECK_ONE_ROW, asset=key, blocking=True, description="One row per inventoried file."
        ),
        dg.AssetCheckSpec(
            CHECK_KEPT_VALID, asset=key, blocking=True, description="No kept image was rejected."
        ),
    ]
    if sampling:
        specs.append(
            dg.AssetCheckSpec(
                CHECK_SAMPLE_KEPT, asset=key, description="Exactly the sampled images are kept."
            )
        )

    @dg.asset(
        key=key,
        deps=decision_deps(project),
        group_name=group_name(project, "curation"),
        kinds={"polars", "parquet"},
        check_specs=specs,
        description=(
            "One row per inventoried file: action (keep / keep_with_fix / remove), the stage that "
            "removes it, "
            "every reason that applies, an explanation, the fixes export applies, and the scores. "
            "Metadata: the funnel."
        ),
    )
    def curation_decisions(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        shards = processed_shards(context, project, project_store, SANITIZED)
        path = sample_path(project, project_store)
        try:
            decisions = decisions_for(project, project_store, shards, path)
        except MissingInputError as exc:
            raise dg.Failure(str(exc)) from None
        funnel = decision_funnel(decisions, project_stages(project, with_sample=sampling))
        out = project_store.write_parquet(
            decisions, decisions_path(project_store), metadata={"funnel": funnel}
        )
        project_store.write_json(funnel, project_store.global_path(DECISIONS, "funnel.json"))
        actions = dict(decisions.group_by("action").len().iter_rows())
        context.log.info("funnel: " + funnel_line(funnel))
        return dg.MaterializeResult(
            metadata={
                "funnel": funnel_line(funnel),
                "funnel_table": md_table(funnel, ["step", "removed", "left"]),
                "files": decisions.height,
                "kept": actions.get(KEEP, 0) + actions.get(KEEP_WITH_FIX, 0),
                "kept_with_fix": actions.get(KEEP_WITH_FIX, 0),
                "removed": actions.get(REMOVE, 0),
                "removed_images_by_stage": md_table(
                    removed_by_stage(decisions), ["first removing stage", "removed images"]
                ),
                "reason_hits": md_table(
                    reason_hits(decisions), ["reason", "reason hits", "removed images with it"]
                ),
                "dagster/row_count": decisions.height,
                "path": dg.MetadataValue.path(str(out)),
            },
            check_results=decision_checks(decisions, project_store.read_parquet(path) if path else None),
        )

    return curation_decisions
