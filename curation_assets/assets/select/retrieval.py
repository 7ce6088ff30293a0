"""`retrieval_selection` (global): the pool images nearest the project's seed sets.

For every ``seed`` set of ``references.sets``: its semantic vectors (the pool's semantic model,
cached per model in the store; another model's vectors are refused), and the k nearest pool
images of each seed image within the similarity floor (see
:mod:`curation_assets.core.select.retrieval`). Only images that survive every earlier decision
(sanitize, duplicates, decontamination, filters) are candidates, as LVD-142M retrieved from its
deduplicated, decontaminated pool. ``cluster`` mode takes instead the level-1 clusters of
`hierarchical_clusters` (computed over the same survivors) whose centroid lies near a seed image.
Output: image_id, seed_set, seed_image (the seed that selected it, or the seed nearest the
cluster that did), similarity, rank, cluster.
"""

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.common import GPU_STEP_TAGS, asset_key, group_name, load_project_model, md_table
from curation_assets.assets.dedup.exact_duplicates import processed_shards
from curation_assets.assets.dedup.references import (
    ensure_reference_vectors,
    pool_vectors,
    reference_model,
    refuse_other_model,
)
from curation_assets.assets.keys import CLUSTERS, RETRIEVAL, SANITIZED, SEMANTIC_EMBEDDINGS
from curation_assets.assets.outputs.decision_inputs import MissingInputError, decision_asset, decisions_for
from curation_assets.config import ProjectConfig
from curation_assets.core.outputs.decisions import survivors
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import ProjectStore, StoreResource

# faiss and torch are imported by the functions that search and embed (issue 12: cheap step start)

CHECK_UNIQUE = "each_image_selected_once"
CHECK_FLOOR_AND_BUDGET = "within_the_floor_and_the_budget"


def retrieval_enabled(project: ProjectConfig) -> bool:
    return bool(project.references.of_role("seed"))


def selection_path(store: ProjectStore):
    return store.global_path(RETRIEVAL, f"{RETRIEVAL}.parquet")


def _earlier_decisions(project: ProjectConfig) -> list[str]:
    """The global assets whose decisions come before sampling (read through the registry)."""
    from curation_assets.assets.outputs.decision_inputs import project_stages

    return [
        decision_asset(project, stage)
        for stage in project_stages(project, with_sample=False)
        if stage != "sanitize"
    ]


def build_retrieval_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    key = asset_key(project, RETRIEVAL)
    config = project.references.retrieval
    sets = sorted(project.references.of_role("seed"))
    deps = [SEMANTIC_EMBEDDINGS, SANITIZED, *_earlier_decisions(project)]
    deps += [CLUSTERS] if config.mode == "cluster" else []
    if config.mode == "sample":
        what = (
            f"the {config.k} nearest surviving pool images of every seed image at cosine similarity >= "
            f"{config.min_similarity}, each image once (credited to its most similar seed)"
        )
    else:
        what = (
            f"the level-1 clusters of {CLUSTERS} whose centroid is within cosine distance "
            f"{config.cluster_max_distance} of a seed image, at most {config.per_cluster_cap} images each"
        )

    @dg.asset(
        key=key,
        deps=[asset_key(project, name) for name in deps],
        group_name=group_name(project, "clustering"),
        kinds={"faiss", "parquet"},
        pool="gpu",
        op_tags=GPU_STEP_TAGS,
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_UNIQUE, asset=key, blocking=True, description="No image is selected twice."
            ),
            dg.AssetCheckSpec(
                CHECK_FLOOR_AND_BUDGET,
                asset=key,
                blocking=True,
                description="Every similarity is at least the floor; at most budget images.",
            ),
        ],
        description=(
            f"Retrieval from the seed set(s) {', '.join(sets)} (references.sets, role seed), mode "
            f"{config.mode}: {what}"
            + (f", at most {config.budget}" if config.budget else "")
            + ". Columns: image_id, seed_set, seed_image, similarity, rank, cluster."
        ),
    )
    def retrieval_selection(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        from curation_assets.core.select.retrieval import cluster_selection, sample_selection

        project_store = store.for_project(project)
        settings = compute.settings()
        identity = load_project_model(project, reference_model(project, "seed")).identity
        shards = processed_shards(context, project, project_store, SEMANTIC_EMBEDDINGS)
        try:
            standing = set(survivors(decisions_for(project, project_store, shards))["image_id"])
        except MissingInputError as exc:
            raise dg.Failure(str(exc)) from None
        image_ids, vectors, _ = pool_vectors(project_store, SEMANTIC_EMBEDDINGS, shards, identity)
        keep = np.fromiter((i in standing for i in image_ids), dtype=bool, count=len(image_ids))
        pool_ids = [i for i, k in zip(image_ids, keep, strict=True) if k]
        pool = vectors[keep]
        if not pool_ids:
            raise dg.Failure(f"{RETRIEVAL}: no surviving pool image has a semantic vector")
        seeds, recomputed = {}, []
        for name in sets:
            reference = ensure_reference_vectors(project, project_store, name, settings, context.log)
            refuse_other_model(reference, identity)
            seeds[name] = (reference.paths, reference.vectors)
            recomputed += [name] if reference.computed else []
        if config.mode == "sample":
            selected, counts = sample_selection(
                pool_ids, pool, seeds, config.k, config.min_similarity, config.budget
            )
        else:
            clusters_file = project_store.global_path(CLUSTERS, f"{CLUSTERS}.parquet")
            centroids_file = project_store.global_path(CLUSTERS, "level1_centroids.npy")
            if not (clusters_file.is_file() and centroids_file.is_file()):
                raise dg.Failure(f"{RETRIEVAL} (mode cluster): no {CLUSTERS} yet: materialize it first")
            members = project_store.read_parquet(
                clusters_file, columns=["image_id", "cluster_l1", "distance"]
            )
            selected, counts = cluster_selection(
                members["image_id"].to_list(),
                members["cluster_l1"].to_numpy(),
                members["distance"].to_numpy(),
                project_store.read_npy(centroids_file),
                seeds,
                config.cluster_max_distance,
                config.per_cluster_cap,
                config.budget,
            )
        meta = {"mode": config.mode, "k": config.k, "min_similarity": config.min_similarity, "sets": sets}
        out = project_store.write_parquet(selected, selection_path(project_store), metadata=meta)
        per_set = selected.group_by("seed_set").agg(
            images=pl.len(),
            seeds_with_a_hit=pl.col("seed_image").n_unique(),
            median_similarity=pl.col("similarity").median().round(4),
        )
        by_set = {row["seed_set"]: row for row in per_set.to_dicts()}
        summary = [
            {
                "seed set": name,
                "seed images": len(seeds[name][0]),
                "seeds with a hit": by_set.get(name, {}).get("seeds_with_a_hit", 0),
                "selected": by_set.get(name, {}).get("images", 0),
                "median similarity": by_set.get(name, {}).get("median_similarity"),
            }
            for name in sets
        ]
        context.log.info(f"{RETRIEVAL}: {selected.height} of {len(pool_ids)} surviving pool images selected")
        floor = config.min_similarity if config.mode == "sample" else 1.0 - config.cluster_max_distance
        # float32 similarities against a float64 floor: a hair of tolerance, not a looser rule
        too_low = selected.filter(pl.col("similarity") < floor - 1e-6).height
        return dg.MaterializeResult(
            metadata={
                "mode": config.mode,
                "k" if config.mode == "sample" else "per-cluster cap": (
                    config.k if config.mode == "sample" else config.per_cluster_cap
                ),
                "similarity floor": floor,
                "budget": config.budget if config.budget is not None else "none",
                "surviving pool images": len(pool_ids),
                "selected": selected.height,
                "seed sets": md_table(summary),
                "candidates": md_table(
                    [{"step": k.replace("_", " "), "images": v} for k, v in counts.items()]
                ),
                "reference vectors recomputed": ", ".join(recomputed) or "none (cached)",
                "dagster/row_count": selected.height,
                "path": dg.MetadataValue.path(str(out)),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=CHECK_UNIQUE,
                    passed=selected["image_id"].n_unique() == selected.height,
                    metadata={"rows": selected.height},
                ),
                dg.AssetCheckResult(
                    check_name=CHECK_FLOOR_AND_BUDGET,
                    passed=too_low == 0 and (config.budget is None or selected.height <= config.budget),
                    metadata={"under_the_floor": too_low, "selected": selected.height},
                ),
            ],
        )

    return retrieval_selection
