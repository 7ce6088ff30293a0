"""Balanced selection: `hierarchical_clusters` -> `curated_sample` (both global).

- `hierarchical_clusters`: hierarchical k-means with resampling (Vo et al. 2024) over the
  semantic vectors of every image that survives sanitize, deduplication and the content
  filters. The vectors are gathered once into a memory-mapped float16 file; each finished
  level is cached, so an interrupted run resumes where it stopped. Runs in pool "gpu" on
  the compute resource's device.
- `curated_sample`: top-down water-filling to exactly the budget (project file, or the
  `budget` run config at launch), `random` or `closest` members of each leaf cluster. With
  seed sets (and `stages.sampling.retrieval_share` > 0) it is `retrieval_selection` ∪ the
  balanced sample: the selection's best first up to its share, the balanced sample drawn from
  the other images for the rest; column `sampled_by` says which part each image is in.
"""

import time
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.common import GPU_STEP_TAGS, asset_key, group_name, md_table, plot_md
from curation_assets.assets.dedup.exact_duplicates import processed_shards
from curation_assets.assets.keys import (
    CLUSTERS,
    RETRIEVAL,
    SAMPLE,
    SANITIZED,
    SEMANTIC_EMBEDDINGS,
)
from curation_assets.assets.outputs.decision_inputs import (
    MissingInputError,
    decision_asset,
    decisions_for,
    project_stages,
)
from curation_assets.assets.select.retrieval import retrieval_enabled, selection_path
from curation_assets.config import ProjectConfig
from curation_assets.core.atomic import atomic_path
from curation_assets.core.embed.vectors import VectorMismatchError, assert_compatible
from curation_assets.core.outputs.decisions import survivors
from curation_assets.core.select.sampling import (
    combined_sample,
    gini,
    normalized_entropy,
    retrieval_quota,
)
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import ProjectStore, StoreResource

# core.kmeans (torch, scipy) and core.plots (matplotlib) are imported inside the functions that
# use them, so that loading the Definitions stays cheap (issue 12).
if TYPE_CHECKING:
    from curation_assets.core.select.kmeans import Hierarchy, Level

VECTORS_FILE = "vectors.f16.npy"
CHECK_BUDGET = "sample_size_equals_budget"
CHECK_UNIQUE = "no_duplicate_ids_unless_multiplier"
CHECK_KEPT = "every_sampled_id_is_a_kept_image"


class SampleConfig(dg.Config):
    """Launch-time override of the sampling budget (the project file's budget otherwise)."""

    budget: int | None = None


def _level_file(store: ProjectStore, level: int, what: str) -> Path:
    return store.global_path(CLUSTERS, f"level{level}_{what}.npy")


def gather_vectors(
    store: ProjectStore, pool: pl.DataFrame, shards: list[str], log
) -> tuple[pl.DataFrame, np.ndarray, dict]:
    """The semantic vectors of ``pool``'s images, written once into a float16 memory-mapped file.

    Returns (image ids in row order, the memmap, the vectors' metadata). Images without a
    vector (a decode failure at embedding time) are left out and logged.
    """
    wanted = set(pool["image_id"])
    parts, metas, total = [], [], 0
    for shard in shards:
        ids, vectors, meta = store.read_vectors(SEMANTIC_EMBEDDINGS, shard)
        rows = ids.filter(pl.col("row").is_not_null() & pl.col("image_id").is_in(wanted)).sort("row")
        parts.append((rows, vectors))
        metas.append(meta)
        total += rows.height
    if not metas:
        raise MissingInputError(f"no {SEMANTIC_EMBEDDINGS} yet")
    reference = metas[0]
    for shard, meta in zip(shards[1:], metas[1:], strict=True):
        try:  # one clustering space: every shard's vectors from the same model and preprocessing
            assert_compatible(shard, meta["model"], reference["model"])
        except VectorMismatchError as exc:
            raise dg.Failure(str(exc)) from None
    dim = int(reference["dim"])
    path = store.work_path(CLUSTERS, VECTORS_FILE)  # local even when the store is remote
    at, order = 0, []
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, dim))
        for rows, vectors in parts:
            out[at : at + rows.height] = np.asarray(vectors)[rows["row"].to_numpy()]
            order.append(rows.select("image_id"))
            at += rows.height
        out.flush()
        del out  # the map is closed before the rename
    ids = pl.concat(order) if order else pl.DataFrame(schema={"image_id": pl.String})
    missing = len(wanted) - ids.height
    if missing:
        log.warning(f"{missing} surviving image(s) have no semantic vector and are left out of clustering")
    return ids, np.load(path, mmap_mode="r"), reference


def save_hierarchy(store: ProjectStore, hierarchy: "Hierarchy") -> None:
    for t, level in enumerate(hierarchy.levels, start=1):
        store.write_npy(level.centroids.astype(np.float32), _level_file(store, t, "centroids"))
        store.write_npy(level.assignment.astype(np.int64), _level_file(store, t, "assignment"))
        store.write_npy(level.sizes.astype(np.int64), _level_file(store, t, "sizes"))
        store.write_npy(level.distances.astype(np.float32), _level_file(store, t, "distances"))


def load_hierarchy(store: ProjectStore, n_levels: int, metric: str) -> "Hierarchy":
    from curation_assets.core.select.kmeans import Hierarchy, LevelResult

    levels = []
    for t in range(1, n_levels + 1):
        files = [_level_file(store, t, what) for what in ("centroids", "assignment", "sizes", "distances")]
        if not all(f.is_file() for f in files):
            raise MissingInputError(f"no {CLUSTERS} level {t}: materialize {CLUSTERS} first")
        levels.append(LevelResult(*(store.read_npy(f) for f in files)))
    return Hierarchy(levels=levels, metric=metric)


def effective_levels(configured, n: int) -> "list[Level]":
    """The configured levels, each capped at its number of inputs (n points, then the previous k).

    A small pool (a demo, a first shard) still clusters instead of failing; the cap is logged.
    """
    from curation_assets.core.select.kmeans import Level

    levels, inputs = [], n
    for level in configured:
        k = max(1, min(level.n_clusters, inputs))
        levels.append(Level(k, level.n_samples))
        inputs = k
    return levels


def level_stats(hierarchy: "Hierarchy", point_clusters: np.ndarray) -> list[dict]:
    """Per level: clusters, images per cluster (max / median), empty clusters, Gini of the sizes."""
    rows = []
    for t, level in enumerate(hierarchy.levels, start=1):
        images = (
            np.bincount(point_clusters[:, t - 1], minlength=len(level.sizes)) if len(point_clusters) else []
        )
        images = np.asarray(images)
        rows.append(
            {
                "level": t,
                "clusters": len(level.sizes),
                "max_images": int(images.max()) if images.size else 0,
                "median_images": float(np.median(images)) if images.size else 0.0,
                "empty": int((images == 0).sum()),
                "gini": round(float(gini(images)), 4) if images.size else 0.0,
            }
        )
    return rows


def build_clusters_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    stage = project.stages.clustering
    # every decision stage before sampling (the registry's), so clustering sees the survivors
    deps = [SEMANTIC_EMBEDDINGS, SANITIZED]
    deps += [
        decision_asset(project, s) for s in project_stages(project, with_sample=False) if s != "sanitize"
    ]

    @dg.asset(
        key=asset_key(project, CLUSTERS),
        deps=[asset_key(project, d) for d in deps],
        group_name=group_name(project, "clustering"),
        kinds={"faiss", "pytorch", "numpy"},
        pool="gpu",
        op_tags=GPU_STEP_TAGS,
        description=(
            "Hierarchical k-means with resampling over the semantic vectors of the images that survive every "
            f"earlier decision: levels {[lv.n_clusters for lv in stage.levels]}, n_samples "
            f"{[lv.n_samples for lv in stage.levels]}, {stage.n_resamples} resamples, {stage.metric}. "
            "Per image: its cluster at each level and its distance to its level-1 centroid."
        ),
    )
    def hierarchical_clusters(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        from curation_assets.core.outputs.plots import cluster_sizes_plot
        from curation_assets.core.select.kmeans import hierarchical_kmeans

        project_store = store.for_project(project)
        shards = processed_shards(context, project, project_store, SANITIZED)
        try:
            pool = survivors(decisions_for(project, project_store, shards))
            ids, vectors, meta = gather_vectors(project_store, pool, shards, context.log)
        except MissingInputError as exc:
            raise dg.Failure(str(exc)) from None
        n = len(vectors)
        if n == 0:
            raise dg.Failure("no surviving image has a semantic vector: nothing to cluster")
        levels = effective_levels(stage.levels, n)
        if [lv.n_clusters for lv in levels] != [lv.n_clusters for lv in stage.levels]:
            context.log.warning(
                f"{n} surviving images: cluster counts {[lv.n_clusters for lv in stage.levels]} lowered to "
                f"{[lv.n_clusters for lv in levels]} (a level cannot have more clusters than inputs)"
            )
        settings = compute.settings()
        start = time.perf_counter()
        hierarchy = hierarchical_kmeans(
            vectors,
            levels,
            n_resamples=stage.n_resamples,
            max_iters=stage.max_iters,
            tol=stage.tol,
            metric=stage.metric,
            seed=stage.seed,
            device=str(settings.device),
            checkpoint_dir=project_store.work_path(CLUSTERS, "checkpoints"),
            progress=context.log.info,
        )
        seconds = time.perf_counter() - start
        save_hierarchy(project_store, hierarchy)
        point_clusters = hierarchy.point_clusters()
        table = ids.with_columns(
            *(pl.Series(f"cluster_l{t + 1}", point_clusters[:, t]) for t in range(point_clusters.shape[1])),
            distance=pl.Series(hierarchy.point_distances(), dtype=pl.Float32),
        )
        out = project_store.write_parquet(
            table,
            project_store.global_path(CLUSTERS, f"{CLUSTERS}.parquet"),
            metadata={"model": meta.get("model_name"), "levels": [lv.model_dump() for lv in stage.levels]},
        )
        stats = level_stats(hierarchy, point_clusters)
        plot = project_store.write_with(
            project_store.global_path(CLUSTERS, "cluster_sizes.png"),
            lambda path: cluster_sizes_plot(
                [
                    np.bincount(point_clusters[:, t], minlength=len(lv.sizes))
                    for t, lv in enumerate(hierarchy.levels)
                ],
                path,
            ),
        )
        return dg.MaterializeResult(
            metadata={
                "images": n,
                "n_clusters": str([lv.n_clusters for lv in levels]),
                "levels": md_table(stats),
                "seconds": round(seconds, 1),
                "images_per_second": round(n / max(seconds, 1e-9), 1),
                "device": str(settings.device),
                "cluster_sizes_plot": plot_md(plot, "cluster sizes per level"),
                "dagster/row_count": n,
                "path": dg.MetadataValue.path(str(out)),
            }
        )

    return hierarchical_clusters


def with_retrieval(project: ProjectConfig) -> bool:
    """Whether `curated_sample` takes `retrieval_selection`'s images (seed sets and a share > 0)."""
    return retrieval_enabled(project) and project.stages.sampling.retrieval_share > 0


def retrieved_points(clusters: pl.DataFrame, selection: pl.DataFrame, log) -> pl.DataFrame:
    """The selection's images that are clustered, best first, with their row in ``clusters``
    (the hierarchy's point order). An image the clustering did not see (a stale selection) is
    left out and logged."""
    rows = clusters.select("image_id").with_row_index("point")
    found = selection.with_row_index("order").join(rows, on="image_id", how="inner").sort("order")
    if found.height < selection.height:
        log.warning(
            f"{selection.height - found.height} image(s) of {RETRIEVAL} are not in {CLUSTERS} "
            "(materialize both from the same decisions); left out of the sample"
        )
    return found


def label_sample(clusters: pl.DataFrame, taken: pl.DataFrame, balanced: np.ndarray) -> pl.DataFrame:
    """The combined sample in cluster-table order: the clusters' columns, ``sampled_by``
    (retrieval / balanced) and, for the retrieval part, the seed set, seed image, similarity
    and level-1 cluster that selected each image."""
    retrieval = taken.select(
        "point",
        sampled_by=pl.lit("retrieval"),
        seed_set="seed_set",
        seed_image="seed_image",
        retrieval_similarity="similarity",
        retrieval_cluster="cluster",
    )
    drawn = pl.DataFrame({"point": np.sort(balanced).astype(np.uint32)}).with_columns(
        sampled_by=pl.lit("balanced")
    )
    parts = pl.concat([retrieval.cast({"point": pl.UInt32}), drawn], how="diagonal_relaxed")
    return (
        clusters.with_row_index("point")
        .join(parts, on="point", how="inner")
        .sort("point", maintain_order=True)
        .drop("point")
    )


def build_sample_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    stage = project.stages.sampling
    key = asset_key(project, SAMPLE)
    n_levels = len(project.stages.clustering.levels)
    combine = with_retrieval(project)
    deps = [CLUSTERS] + ([RETRIEVAL] if combine else [])
    combined_text = (
        f" Combined with {RETRIEVAL}: its most similar images first, up to {stage.retrieval_share:g} of the "
        "budget; the balanced sample, drawn from the other images, fills the rest (column sampled_by)."
        if combine
        else ""
    )

    @dg.asset(
        key=key,
        deps=[asset_key(project, d) for d in deps],
        group_name=group_name(project, "clustering"),
        kinds={"numpy", "parquet"},
        check_specs=[
            dg.AssetCheckSpec(CHECK_BUDGET, asset=key, blocking=True, description="Exactly the budget."),
            dg.AssetCheckSpec(
                CHECK_UNIQUE, asset=key, blocking=True, description="No repeats (multiplier 1)."
            ),
            dg.AssetCheckSpec(CHECK_KEPT, asset=key, blocking=True, description="Only clustered images."),
        ],
        description=(
            f"Balanced hierarchical sample of exactly {stage.budget:,} images (override with run config "
            f"`budget`): water-filling from the top level down, {stage.strategy} members per leaf cluster."
            + combined_text
        ),
    )
    def curated_sample(
        context: dg.AssetExecutionContext, config: SampleConfig, store: StoreResource
    ) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        budget = config.budget or stage.budget
        clusters_path = project_store.global_path(CLUSTERS, f"{CLUSTERS}.parquet")
        if not clusters_path.is_file():
            raise dg.Failure(f"no {CLUSTERS} yet: materialize it first")
        clusters = pl.read_parquet(clusters_path)
        try:
            hierarchy = load_hierarchy(project_store, n_levels, project.stages.clustering.metric)
        except MissingInputError as exc:
            raise dg.Failure(str(exc)) from None
        retrieved = pl.DataFrame(schema={"point": pl.UInt32})
        if combine:
            if not selection_path(project_store).is_file():
                raise dg.Failure(f"no {RETRIEVAL} yet: materialize it first")
            selection = pl.read_parquet(selection_path(project_store))
            retrieved = retrieved_points(clusters, selection, context.log)
        warnings: list[str] = []
        taken, balanced = combined_sample(
            hierarchy,
            retrieved["point"].to_numpy(),
            budget,
            stage.retrieval_share if combine else 0.0,
            strategy=stage.strategy,
            seed=stage.seed,
            multiplier=stage.multiplier,
            warn=warnings.append,
        )
        for line in warnings:
            context.log.warning(line)
        if combine:
            sample = label_sample(clusters, retrieved.head(len(taken)), balanced)
        else:  # no seed sets: today's sample, unchanged
            sample = clusters[np.sort(balanced)]
        out = project_store.write_parquet(
            sample,
            project_store.global_path(SAMPLE, f"{SAMPLE}.parquet"),
            metadata={"budget": budget, "strategy": stage.strategy, "seed": stage.seed},
        )
        top = f"cluster_l{n_levels}"
        per_top = sample.group_by(top).len().sort("len", descending=True)
        pool_top = clusters.group_by(top).len()
        expected = min(budget, len(taken) + (clusters.height - len(taken)) * stage.multiplier)
        unique = sample["image_id"].n_unique()
        parts = (
            {
                "retrieval share": stage.retrieval_share,
                "retrieval quota": retrieval_quota(budget, stage.retrieval_share),
                "retrieval candidates": retrieved.height,
                "from retrieval": len(taken),
                "from the balanced sample": len(balanced),
            }
            if combine
            else {}
        )
        return dg.MaterializeResult(
            metadata={
                "budget": budget,
                **parts,
                "pool": clusters.height,
                "sampled": sample.height,
                "unique": unique,
                "top_clusters": pool_top.height,
                "normalized_entropy_top": round(float(normalized_entropy(per_top["len"].to_numpy())), 4),
                "pool_normalized_entropy_top": round(
                    float(normalized_entropy(pool_top["len"].to_numpy())), 4
                ),
                "samples_per_top_cluster": md_table(
                    [{"cluster": c, "sampled": k} for c, k in per_top.head(30).iter_rows()]
                ),
                "dagster/row_count": sample.height,
                "path": dg.MetadataValue.path(str(out)),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=CHECK_BUDGET,
                    passed=sample.height == expected,
                    metadata={"sampled": sample.height, "expected": expected},
                ),
                dg.AssetCheckResult(
                    check_name=CHECK_UNIQUE, passed=stage.multiplier > 1 or unique == sample.height
                ),
                dg.AssetCheckResult(
                    check_name=CHECK_KEPT,
                    passed=set(sample["image_id"]) <= set(clusters["image_id"]),
                ),
            ],
        )

    return curated_sample
