"""Unwanted-example filters: `example_embeddings` (global) -> `example_distances` (per shard).

- `example_embeddings`: the example images of every category (``examples_root/<category>/``
  or the category's own folder), embedded with the semantic model, so distances compare
  like with like. Re-embedded only when a file, the category list or the model changes.
- `example_distances`: for every kept image of the shard, the minimum cosine distance to
  each category's examples, one column ``dist_<category>`` per category. Cheap (one small
  matmul per chunk); the thresholds are applied by `filter_decisions`, not here.

A shard run may start before anyone materialized `example_embeddings` (the sensor runs
shards as they appear), so `example_distances` builds the example vectors itself when the
stored ones are missing or stale: the same function, the same file, written atomically.
"""

from typing import TYPE_CHECKING

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.common import (
    GPU_STEP_TAGS,
    RateLogger,
    asset_key,
    group_name,
    load_project_model,
    md_table,
)
from curation_assets.assets.embed.embeddings import model_stamp
from curation_assets.assets.filters.shard_scores import (
    coverage_check,
    kept_refs,
    semantic_vectors,
    signature_of,
    skip_or_compute,
    vectors_signature,
)
from curation_assets.assets.keys import EXAMPLE_DISTANCES, EXAMPLE_EMBEDDINGS, SEMANTIC_EMBEDDINGS
from curation_assets.config import ProjectConfig
from curation_assets.core.filters.examples import (
    ExamplesError,
    ExampleSet,
    category_folders,
    example_refs,
    find_examples,
    vectors_by_category,
)
from curation_assets.core.filters.rules import FilterRule, min_cosine_distance
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import ProjectStore, StoreResource

# core.embed imports torch: it is imported where images are embedded, so that loading the
# Definitions stays cheap (issue 12).
if TYPE_CHECKING:
    from curation_assets.core.embed.embed import ComputeSettings

EXAMPLES_SHARD = "examples"  # the one "shard" of the global example table
CHECK_DISTANCES = "every_kept_image_has_a_distance_per_category"


def distance_column(category: str) -> str:
    return f"dist_{category}"


def example_set(project: ProjectConfig) -> ExampleSet:
    stage = project.stages.example_filters
    folders = {name: category.folder for name, category in stage.categories.items()}
    try:
        return find_examples(category_folders(stage.examples_root, folders))
    except ExamplesError as exc:
        raise dg.Failure(f"stages.example_filters: {exc}") from None


def examples_signature(project: ProjectConfig, examples: ExampleSet) -> str:
    model_name = project.stages.example_filters.model
    return signature_of(examples.fingerprint(), model_stamp(model_name, project.models[model_name]))


def ensure_example_embeddings(
    project: ProjectConfig, store: ProjectStore, settings: "ComputeSettings", log
) -> tuple[dict[str, np.ndarray], dict, bool]:
    """Per-category example vectors from the store, (re)computed when missing or stale.

    Returns (category -> (m, d) float16 vectors, footer metadata, computed now?).
    """
    examples = example_set(project)
    signature = examples_signature(project, examples)
    table_path = store.shard_path(EXAMPLE_EMBEDDINGS, EXAMPLES_SHARD)
    if table_path.is_file() and store.parquet_metadata(table_path).get("input_signature") == signature:
        ids, vectors, meta = store.read_vectors(EXAMPLE_EMBEDDINGS, EXAMPLES_SHARD)
        return vectors_by_category(ids["category"].to_list(), vectors, examples.categories), meta, False

    from curation_assets.core.embed.embed import embed_images

    model_name = project.stages.example_filters.model
    model = load_project_model(project, model_name, settings.device)
    refs, categories, unreadable = example_refs(examples)
    for problem in unreadable:
        log.warning(f"example image skipped: {problem}")
    rate = RateLogger(log, "example images")
    result = embed_images(model.module, model.preprocessing, model.dim, refs, settings, progress=rate)
    rate.finish(len(refs))
    for image_id, error in result.errors:
        log.warning(f"example image skipped: {image_id}: {error}")
    category_of = dict(zip([r.image_id for r in refs], categories, strict=True))
    ids = pl.DataFrame(
        {
            "path": result.image_ids,
            "category": [category_of[i] for i in result.image_ids],
            "row": np.arange(len(result.image_ids), dtype=np.int64),
        }
    )
    empty = [c for c in examples.categories if c not in set(ids["category"])]
    if empty:
        raise dg.Failure(f"stages.example_filters: no readable example image for {', '.join(empty)}")
    meta = {
        "model": model.identity,
        "model_name": model_name,
        "normalized": model.normalized,
        "input_signature": signature,
        "counts": {c: int((ids["category"] == c).sum()) for c in examples.categories},
        "skipped_files": len(unreadable) + len(result.errors),
    }
    store.write_vectors(EXAMPLE_EMBEDDINGS, EXAMPLES_SHARD, ids, result.vectors, metadata=meta)
    return vectors_by_category(ids["category"].to_list(), result.vectors, examples.categories), meta, True


def build_example_embeddings_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    stage = project.stages.example_filters

    @dg.asset(
        key=asset_key(project, EXAMPLE_EMBEDDINGS),
        group_name=group_name(project, "filters"),
        kinds={"pytorch", "numpy"},
        pool="gpu",
        op_tags=GPU_STEP_TAGS,
        description=(
            f"Semantic vectors (model `{stage.model}`) of the example images of each unwanted category "
            f"({', '.join(stage.categories)}). Recomputed only when an example file or the model changes."
        ),
    )
    def example_embeddings(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        _, meta, computed = ensure_example_embeddings(project, project_store, compute.settings(), context.log)
        counts = meta["counts"]
        return dg.MaterializeResult(
            metadata={
                "recomputed": computed,
                "model": stage.model,
                "examples": md_table(
                    [
                        {"category": c, "images": n, "threshold": stage.categories[c].threshold}
                        for c, n in counts.items()
                    ]
                ),
                "skipped_files": meta.get("skipped_files", 0),
                "dagster/row_count": sum(counts.values()),
                "path": dg.MetadataValue.path(
                    str(project_store.shard_path(EXAMPLE_EMBEDDINGS, EXAMPLES_SHARD))
                ),
            }
        )

    return example_embeddings


def shard_distances(
    project: ProjectConfig, store: ProjectStore, shard: str, examples: dict[str, np.ndarray]
) -> pl.DataFrame:
    """image_id, content_hash and dist_<category> for every image of the shard that has a vector."""
    ids, vectors = semantic_vectors(store, shard)
    columns = {
        distance_column(category): min_cosine_distance(vectors, refs) for category, refs in examples.items()
    }
    return ids.with_columns(pl.Series(name, values, dtype=pl.Float32) for name, values in columns.items())


def distances_signature(store: ProjectStore, shard: str, examples_signature: str) -> str:
    return signature_of(vectors_signature(store, SEMANTIC_EMBEDDINGS, shard), examples_signature)


def build_example_distances_asset(
    project: ProjectConfig, partitions: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    key = asset_key(project, EXAMPLE_DISTANCES)
    stage = project.stages.example_filters

    @dg.asset(
        key=key,
        partitions_def=partitions,
        deps=[asset_key(project, SEMANTIC_EMBEDDINGS), asset_key(project, EXAMPLE_EMBEDDINGS)],
        group_name=group_name(project, "filters"),
        kinds={"numpy", "polars"},
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_DISTANCES, asset=key, description="Every kept image has a distance to every category."
            )
        ],
        description=(
            "Minimum cosine distance of every kept image of the shard to each category's examples "
            f"(columns {', '.join(distance_column(c) for c in stage.categories)})."
        ),
    )
    def example_distances(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        shard = context.partition_key
        project_store = store.for_project(project)
        examples, example_meta, _ = ensure_example_embeddings(
            project, project_store, compute.settings(), context.log
        )
        signature = distances_signature(project_store, shard, example_meta["input_signature"])
        table, _, skipped = skip_or_compute(
            context,
            project_store,
            EXAMPLE_DISTANCES,
            signature,
            lambda: (
                shard_distances(project, project_store, shard, examples),
                {"categories": list(examples)},
            ),
        )
        kept, _ = kept_refs(project_store, shard)
        columns = [distance_column(c) for c in examples]
        summary = [
            {
                "category": c,
                "threshold": stage.categories[c].threshold,
                "min": round(float(table[distance_column(c)].min() or 0), 4),
                "median": round(float(table[distance_column(c)].median() or 0), 4),
                "below_threshold": int((table[distance_column(c)] < stage.categories[c].threshold).sum()),
            }
            for c in examples
        ]
        return dg.MaterializeResult(
            metadata={
                "skipped": skipped,
                "images": table.height,
                "distances": md_table(summary),
                "dagster/row_count": table.height,
                "path": dg.MetadataValue.path(str(project_store.shard_path(EXAMPLE_DISTANCES, shard))),
            },
            check_results=[coverage_check(key, CHECK_DISTANCES, kept.height, table, columns, "distances")],
        )

    return example_distances


def example_rules(project: ProjectConfig) -> list[FilterRule]:
    """One rule per category: removed when the distance to its examples is below its threshold."""
    return [
        FilterRule(f"example:{name}", distance_column(name), category.threshold, "below")
        for name, category in project.stages.example_filters.categories.items()
    ]


def example_distances_signature(project: ProjectConfig, store: ProjectStore, shard: str) -> str:
    return distances_signature(store, shard, examples_signature(project, example_set(project)))
