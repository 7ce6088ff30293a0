"""`exact_duplicates` (global): byte- and pixel-identical images across all shards."""

import dagster as dg
import polars as pl

from curation_assets.assets.common import CHECK_ONE_KEEPER, asset_key, group_name, md_table, one_keeper_check
from curation_assets.assets.ingest.discovery import partitions_name
from curation_assets.assets.keys import EXACT, SANITIZED
from curation_assets.config import ProjectConfig
from curation_assets.core.dedup.exact import find_exact_duplicates, summarize
from curation_assets.core.dedup.keepers import KEEPER_EXPLANATION
from curation_assets.resources.store import ProjectStore, StoreResource


def processed_shards(
    context: dg.AssetExecutionContext, project: ProjectConfig, store: ProjectStore, asset: str
) -> list[str]:
    """Shards that are partitions now and have ``asset`` written; warns about the others.

    Only current partitions count, so a shard deleted from the instance stops contributing
    even though its old files stay in the store.
    """
    partitions = set(context.instance.get_dynamic_partitions(partitions_name(project)))
    written = set(store.shards_written(asset))
    missing = sorted(partitions - written)
    if missing:
        context.log.warning(
            f"{len(missing)} shard(s) have no {asset} yet and are left out: {', '.join(missing[:10])}"
        )
    return sorted(partitions & written)


def build_exact_duplicates_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    key = asset_key(project, EXACT)
    stage = project.stages.exact_dedup

    @dg.asset(
        key=key,
        deps=[asset_key(project, SANITIZED)],
        group_name=group_name(project, "dedup"),
        kinds={"parquet", "polars"},
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_ONE_KEEPER,
                asset=key,
                blocking=True,
                description="Every duplicate group has exactly one keeper.",
            ),
        ],
        description=(
            "Groups of identical images across all shards: same upright RGB pixels (sanitize's pixel hash); "
            "`match` says whether a copy also has the keeper's exact bytes. One keeper per group "
            f"(policy: {stage.keeper}); every other member records its keeper."
        ),
    )
    def exact_duplicates(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        shards = processed_shards(context, project, project_store, SANITIZED)
        columns = [
            "image_id",
            "content_hash",
            "pixel_hash",
            "status",
            "width",
            "height",
            "size_bytes",
            "n_findings",
        ]
        scan = project_store.scan_shards(SANITIZED, shards)
        candidates = (
            scan.select(columns) if scan is not None else pl.LazyFrame(schema={c: pl.String for c in columns})
        )
        groups = find_exact_duplicates(candidates, stage.keeper, stage.seed)
        path = project_store.write_parquet(
            groups,
            project_store.global_path(EXACT, f"{EXACT}.parquet"),
            metadata={"keeper": stage.keeper, "shards": shards},
        )
        examples = (
            groups.filter(pl.col("group_size") == pl.col("group_size").max()).head(6)
            if len(groups)
            else groups
        )
        return dg.MaterializeResult(
            metadata={
                **summarize(groups),
                "shards": len(shards),
                "keeper_policy": f"{stage.keeper}: {KEEPER_EXPLANATION[stage.keeper]}",
                "largest_groups": md_table(examples.select("image_id", "match", "reason").to_dicts()),
                "path": dg.MetadataValue.path(str(path)),
                "dagster/row_count": len(groups),
            },
            check_results=[one_keeper_check(groups)],
        )

    return exact_duplicates
