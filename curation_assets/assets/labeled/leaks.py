"""Train/test leaks: `perceptual_hashes` (per shard) -> `train_test_leaks` (global).

- `perceptual_hashes`: the 64-bit DCT perceptual hash of every kept image of the shard,
  skipped when the shard's sanitize table is unchanged (like the other score assets).
- `train_test_leaks`: for every pair of splits (train before val before test), the images
  of the later split that copy one of the earlier split, by the methods of the project file:
  `exact` (content hash), `perceptual` (Hamming distance of the hashes), `semantic` (cosine
  of the semantic embeddings through a faiss index). See curation_assets/core/labeled/leaks.py.
"""

import dagster as dg
import polars as pl

from curation_assets.assets.common import GPU_STEP_TAGS, asset_key, group_name, md_table
from curation_assets.assets.dedup.exact_duplicates import processed_shards
from curation_assets.assets.filters.shard_scores import (
    coverage_check,
    sanitized_bytes,
    signature_of,
)
from curation_assets.assets.keys import INVENTORY, LEAKS, PHASHES, SANITIZED, SEMANTIC_EMBEDDINGS
from curation_assets.assets.labeled.labeled_data import all_images, kept, semantic_matrix
from curation_assets.assets.stage_spec import CheckDef, DecodePart, PassContext
from curation_assets.config import ProjectConfig
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import ProjectStore, StoreResource

CHECK_HASHED = "every_kept_image_has_a_perceptual_hash"
CHECK_CONSISTENT = "leaks_cross_splits_within_thresholds"
EXAMPLES_PER_METHOD = 8

# core.leaks imports faiss and scipy: it is imported inside the functions that use it, so that
# loading the Definitions (and the headless runner's staleness checks) stays cheap (issue 12).


def phash_version() -> str:
    """The hash recipe's version; bump the suffix when the recipe changes (stored hashes of
    another version are recomputed)."""
    from curation_assets.core.labeled import phash

    # v2: hashed from the shard pass's 256 px working copy of each image's one decode
    return f"dct{phash.HASH_SIZE}-{phash.HASH_BLOCK}x{phash.HASH_BLOCK}-v2"


def perceptual_enabled(project: ProjectConfig) -> bool:
    stage = project.stages.train_test_leaks
    return stage.enabled and "perceptual" in stage.methods


def phash_signature(project: ProjectConfig, store: ProjectStore, shard: str) -> str:
    # The hashes depend on the kept images and the recipe only; no threshold enters.
    return signature_of(sanitized_bytes(store, shard), f"phash-{phash_version()}")


def phash_description(project: ProjectConfig) -> str:
    return (
        "64-bit DCT perceptual hash of every kept image of the shard (survives re-encodes, resizes and "
        "1-2% border trims), for train/test leak detection. Computed in the shard pass from each "
        "image's one decode; skipped when the shard is unchanged."
    )


def finish_phashes(ctx: PassContext) -> dg.MaterializeResult:
    """Write the hashes from the shard pass (or report the stored table when current)."""
    from curation_assets.core.labeled.phash import hashes_frame

    table = ctx.per_image_table(hashes_frame, {"phash_version": phash_version()}, "perceptual hash")
    errors = table.filter(pl.col("error").is_not_null())
    return dg.MaterializeResult(
        asset_key=ctx.key,
        metadata={
            "skipped": ctx.skipped,
            "images": table.height,
            "errors": errors.height,
            "dagster/row_count": table.height,
            "path": dg.MetadataValue.path(str(ctx.store.shard_path(PHASHES, ctx.shard))),
        },
        check_results=[coverage_check(ctx.key, CHECK_HASHED, ctx.kept.height, table, ["phash"], "hash")],
    )


PHASH_PART = DecodePart(
    group="labels",
    kinds=frozenset({"pillow", "polars"}),
    description=phash_description,
    checks=(CheckDef(CHECK_HASHED, "Every kept image has a perceptual hash."),),
    finish=finish_phashes,
    per_image="curation_assets.core.labeled.phash:hash_row",
)


def _hashes(store: ProjectStore, shards: list[str]) -> pl.DataFrame:
    scan = store.scan_shards(PHASHES, [s for s in shards if store.shard_path(PHASHES, s).is_file()])
    if scan is None:
        return pl.DataFrame(schema={"image_id": pl.String(), "phash": pl.UInt64()})
    return scan.select("image_id", "phash").collect()


def leak_examples(table: pl.DataFrame, per_method: int = EXAMPLES_PER_METHOD) -> list[dict]:
    """A few rows of each method, most similar first, for the metadata table."""
    from curation_assets.core.labeled import leaks

    rows = []
    for method in leaks.METHODS:
        part = table.filter(pl.col("method") == method).sort("similarity", descending=True).head(per_method)
        for row in part.iter_rows(named=True):
            rows.append(
                {
                    "method": method,
                    "test_image": row["test_image"],
                    "train_image": row["train_image"],
                    "similarity": f"{row['similarity']:.4f}",
                    "hamming": "" if row["hamming_distance"] is None else row["hamming_distance"],
                    "leak_type": row["leak_type"],
                    "splits": f"{row['train_split']} -> {row['test_split']}",
                }
            )
    return rows


def consistency_check(table: pl.DataFrame, max_hamming: int, min_similarity: float) -> dg.AssetCheckResult:
    """No pair within one split; perceptual pairs within max_hamming; semantic ones at min_similarity."""
    same_split = table.filter(pl.col("train_split") == pl.col("test_split")).height
    bad_hamming = table.filter(
        (pl.col("method") == "perceptual") & (pl.col("hamming_distance") > max_hamming)
    ).height
    bad_semantic = table.filter(
        (pl.col("method") == "semantic") & (pl.col("similarity") < min_similarity - 1e-6)
    ).height
    return dg.AssetCheckResult(
        check_name=CHECK_CONSISTENT,
        passed=same_split == bad_hamming == bad_semantic == 0,
        metadata={
            "pairs_within_one_split": same_split,
            "perceptual_over_max_hamming": bad_hamming,
            "semantic_under_min_similarity": bad_semantic,
        },
    )


def build_leaks_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    key = asset_key(project, LEAKS)
    stage = project.stages.train_test_leaks
    methods = list(stage.methods)
    deps = [asset_key(project, INVENTORY), asset_key(project, SANITIZED)]
    deps += [asset_key(project, PHASHES)] if "perceptual" in methods else []
    deps += [asset_key(project, SEMANTIC_EMBEDDINGS)] if "semantic" in methods else []

    @dg.asset(
        key=key,
        deps=deps,
        group_name=group_name(project, "labels"),
        kinds={"faiss", "polars", "parquet"},
        pool="gpu",
        op_tags=GPU_STEP_TAGS,
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_CONSISTENT,
                asset=key,
                blocking=True,
                description="Leaks cross splits; perceptual and semantic pairs respect their thresholds.",
            )
        ],
        description=(
            "Images of a later split (val, test) that copy an image of an earlier one (train), for every "
            f"pair of splits, by {', '.join(methods)}: one row per (train_image, test_image, method) with "
            "similarity, hamming_distance and leak_type (the strongest method that found the pair). "
            f"Thresholds: Hamming <= {stage.max_hamming}, cosine >= {stage.min_similarity}."
        ),
    )
    def train_test_leaks(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        from curation_assets.core.labeled import leaks

        project_store = store.for_project(project)
        shards = processed_shards(context, project, project_store, SANITIZED)
        pool = kept(all_images(project_store, shards)).select("image_id", "split", "content_hash")
        if "perceptual" in methods:
            hashed = processed_shards(context, project, project_store, PHASHES)
            pool = pool.join(_hashes(project_store, hashed), on="image_id", how="left")
        vectors = has_vector = None
        if "semantic" in methods:
            model = project.stages.embeddings.semantic_model
            vectors, has_vector = semantic_matrix(project_store, shards, pool["image_id"], model)
            if not has_vector.all():
                context.log.warning(
                    f"{int((~has_vector).sum())} kept image(s) have no semantic vector: "
                    "the semantic method cannot pair them"
                )
        on_gpu = compute.settings().device.type == "cuda"
        pairs = leaks.split_pairs(pool["split"].drop_nulls().unique().to_list())
        found = []
        for train_split, test_split in pairs:
            train_rows = (pool["split"] == train_split).to_numpy()
            test_rows = (pool["split"] == test_split).to_numpy()
            try:
                found.append(
                    leaks.find_leaks(
                        pool.filter(train_rows),
                        pool.filter(test_rows),
                        train_vectors=None if vectors is None else vectors[train_rows],
                        test_vectors=None if vectors is None else vectors[test_rows],
                        methods=methods,
                        max_hamming=stage.max_hamming,
                        min_similarity=stage.min_similarity,
                        train_split=train_split,
                        test_split=test_split,
                        use_gpu=on_gpu,
                    )
                )
            except ValueError as exc:  # a threshold out of range for the search
                raise dg.Failure(f"stages.train_test_leaks: {exc}") from None
            context.log.info(f"{train_split} -> {test_split}: {found[-1].height} leak row(s)")
        table = (
            pl.concat(found)
            if found
            else pl.DataFrame(schema=leaks.LEAKS_SCHEMA)  # one split: nothing to compare
        )
        test_side = {test for _, test in pairs}
        n_test = int(pool["split"].is_in(sorted(test_side)).sum())
        summary = leaks.leak_summary(table, n_test)
        path = project_store.write_parquet(
            table,
            project_store.global_path(LEAKS, f"{LEAKS}.parquet"),
            metadata={
                "methods": methods,
                "max_hamming": stage.max_hamming,
                "min_similarity": stage.min_similarity,
                "split_pairs": [list(p) for p in pairs],
                "summary": summary,
            },
        )
        by_method = [
            {"method": method, **counts}
            for method, counts in summary["by_method"].items()
            if method in methods
        ]
        metadata: dict[str, object] = {
            "split_pairs": ", ".join(f"{a} -> {b}" for a, b in pairs) or "none (one split)",
            "test_side_images": n_test,
            "pairs": summary["pairs"],
            "unique_pairs": summary["unique_pairs"],
            "test_images_affected": summary["test_images_affected"],
            "percent_test_affected": summary["percent_test_affected"],
            **{f"leaks_{row['method']}": row["pairs"] for row in by_method},
            "by_method": md_table(by_method),
            "by_split_pair": md_table(
                [{"splits": k, "test_images": v} for k, v in summary["test_images_by_split_pair"].items()]
            ),
            "examples": md_table(leak_examples(table)),
            "methods": ", ".join(methods),
            "max_hamming": stage.max_hamming,
            "min_similarity": stage.min_similarity,
            "dagster/row_count": table.height,
            "path": dg.MetadataValue.path(str(path)),
        }
        if has_vector is not None:
            metadata["images_without_semantic_vector"] = int((~has_vector).sum())
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=[consistency_check(table, stage.max_hamming, stage.min_similarity)],
        )

    return train_test_leaks


def leak_rows(store: ProjectStore) -> pl.DataFrame | None:
    """The stored leak table (None before the first run)."""
    path = store.global_path(LEAKS, f"{LEAKS}.parquet")
    return store.read_parquet(path) if path.is_file() else None


__all__ = [
    "LEAKS",
    "PHASHES",
    "build_leaks_asset",
    "leak_rows",
    "perceptual_enabled",
    "phash_signature",
]
