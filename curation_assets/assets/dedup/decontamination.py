"""`decontamination` (global): pool images that are near-copies of an evaluation set's images.

For every ``decontaminate`` set of ``references.sets``: the set's copy-detection vectors (the
pool's copy model, cached per model in the store), centred with the same mean as the
near-duplicate index (the index's kept ``mean.npy`` when it was made by this model, else the
pool's mean) and searched by every pool vector (exactly, chunked; at scale an IVF index of the
set calibrated for recall at the threshold; see :mod:`curation_assets.core.dedup.decontaminate`).
Each shard's nearest references are kept with what they were searched for, so a new shard costs
a search of its rows and a lower threshold none. Output: one row per (pool image, set) within
the threshold, naming the matched reference image and the distance; `curation_decisions` removes
them with reason ``contamination:<set>``. ``borderline.parquet`` keeps the closest matches
either side of the threshold for the report.
"""

import time
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.common import GPU_STEP_TAGS, asset_key, group_name, load_project_model, md_table
from curation_assets.assets.dedup.exact_duplicates import processed_shards
from curation_assets.assets.dedup.references import (
    ReferenceVectors,
    ensure_reference_vectors,
    reference_model,
    refuse_other_model,
)
from curation_assets.assets.keys import COPY_EMBEDDINGS, DECONTAMINATION, INDEX
from curation_assets.assets.signatures import signature_of
from curation_assets.config import ProjectConfig
from curation_assets.core.dedup.decontaminate import MATCH_SCHEMA, borderline, contaminated, nearest_table
from curation_assets.core.embed.vectors import VectorMismatchError, assert_compatible
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import VECTORS_FILE, ProjectStore, StoreResource

# faiss and torch are imported by the functions that search and embed (issue 12: cheap step start)

BORDERLINE = "borderline.parquet"
NEAREST = "nearest"  # per shard: every image's nearest reference per set (the incremental cache)
CHECK_WITHIN_THRESHOLD = "every_match_within_the_threshold"
CHECK_ONE_ROW = "one_row_per_image_and_set"


def decontamination_threshold(project: ProjectConfig) -> float:
    configured = project.references.decontamination.threshold
    return project.stages.near_dedup.threshold if configured is None else configured


def decontamination_enabled(project: ProjectConfig) -> bool:
    return bool(project.references.of_role("decontaminate"))


def matches_path(store: ProjectStore) -> Path:
    return store.global_path(DECONTAMINATION, f"{DECONTAMINATION}.parquet")


def borderline_path(store: ProjectStore) -> Path:
    return store.global_path(DECONTAMINATION, BORDERLINE)


def centring_mean(store: ProjectStore, identity: dict[str, Any], shards: list[str]) -> tuple[np.ndarray, str]:
    """The near-dedup index's kept mean when this model made it (so distances match near-dedup's,
    and stay put as shards arrive), else the pool's own mean (what the index's first build would
    keep). Never written here: the index owns its mean."""
    folder = store.asset_dir(INDEX)
    mean_file, identity_file = folder / "mean.npy", folder / "mean.json"
    if mean_file.is_file() and identity_file.is_file() and store.read_json(identity_file) == identity:
        return store.read_npy(mean_file), "near-dedup index mean"
    from curation_assets.core.dedup.index import dataset_mean

    def chunks():
        for shard in shards:
            _, vectors, _ = store.read_vectors(COPY_EMBEDDINGS, shard)
            for start in range(0, len(vectors), 65536):
                yield np.asarray(vectors[start : start + 65536], dtype=np.float32)

    return dataset_mean(chunks()), "pool mean"


def nearest_path(store: ProjectStore, shard: str) -> Path:
    return store.global_path(DECONTAMINATION, f"{NEAREST}/{shard}.parquet")


class ReferenceSearch:
    """How each set's references are searched in this run: exactly, or (a pool x references
    search past FLAT_MAX_PRODUCTS products) by one IVF index per set, built at the first shard
    that needs a search (its nprobe calibrated on that shard, for recall at the threshold, which
    decides removals) and reused for the others; the report's range past the threshold comes
    from the same search (see core.dedup.decontaminate)."""

    def __init__(
        self, mean: np.ndarray, pool_rows: int, relevant_distance: float, report_distance: float | None = None
    ):
        self.mean, self.pool_rows, self.relevant_distance = mean, pool_rows, relevant_distance
        self.report_distance = relevant_distance if report_distance is None else report_distance
        self.indexes: dict[str, Any] = {}

    @property
    def searched_for(self) -> str:
        """What a shard's stored nearest references are good for: every distance (exact search),
        or the distances up to the one the IVF search was calibrated for."""
        exact = all(index is None for index in self.indexes.values())
        return "exact" if exact else str(self.relevant_distance)

    def nearest(self, reference: ReferenceVectors, pool: np.ndarray):
        from curation_assets.core.dedup.decontaminate import nearest_references, reference_index
        from curation_assets.core.dedup.nearest import use_ivf

        if reference.name not in self.indexes:
            ivf = use_ivf(self.pool_rows, len(reference.vectors)) and len(pool) > 0
            self.indexes[reference.name] = (
                reference_index(
                    reference.vectors,
                    self.mean,
                    pool,
                    self.relevant_distance,
                    report_distance=self.report_distance,
                )
                if ivf
                else None
            )
        return nearest_references(
            pool,
            reference.vectors,
            self.mean,
            kind="flat",
            relevant_distance=self.relevant_distance,
            ivf=self.indexes[reference.name],
        )


def shard_nearest(
    store: ProjectStore,
    shard: str,
    identity: dict[str, Any],
    mean: np.ndarray,
    references: list[ReferenceVectors],
    search: ReferenceSearch | None = None,
) -> tuple[pl.DataFrame, float | None]:
    """Each of the shard's images' nearest reference per set: (table, search seconds or None when
    the stored table was current).

    Kept per shard with the signature of what it was computed from (the shard's vectors file, the
    centring mean, each set's vectors), so a new shard costs a search of its rows alone and a
    threshold change costs no search at all.
    """
    ids, vectors, meta = store.read_vectors(COPY_EMBEDDINGS, shard)
    try:
        assert_compatible(shard, meta["model"], identity)
    except VectorMismatchError as exc:
        raise dg.Failure(str(exc)) from None
    signature = signature_of(
        meta[VECTORS_FILE],
        np.asarray(mean, dtype=np.float32).tobytes(),
        *(f"{r.name}:{r.meta['input_signature']}" for r in references),
    )
    path = nearest_path(store, shard)
    search = search or ReferenceSearch(mean, len(ids), 0.0)
    if path.is_file():
        stored = store.parquet_metadata(path)
        # an IVF search was calibrated for one threshold: a higher one needs a new search
        searched_for = stored.get("searched_for", "exact")
        if stored.get("input_signature") == signature and (
            searched_for == "exact" or float(searched_for) >= search.relevant_distance
        ):
            return store.read_parquet(path), None
    started = time.perf_counter()
    have = ids.filter(pl.col("row").is_not_null()).sort("row")
    image_ids = have["image_id"].to_list()
    pool = np.asarray(vectors)[have["row"].to_numpy()]
    tables = [nearest_table(image_ids, r.name, r.paths, search.nearest(r, pool)) for r in references]
    table = pl.concat(tables) if tables else pl.DataFrame(schema=MATCH_SCHEMA)
    metadata = {"input_signature": signature, "searched_for": search.searched_for}
    store.write_parquet(table, path, metadata=metadata)
    return table, time.perf_counter() - started


def build_decontamination_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    key = asset_key(project, DECONTAMINATION)
    config = project.references.decontamination
    threshold = decontamination_threshold(project)
    sets = sorted(project.references.of_role("decontaminate"))
    deps = [COPY_EMBEDDINGS] + ([INDEX] if project.stages.near_dedup.enabled else [])

    @dg.asset(
        key=key,
        deps=[asset_key(project, name) for name in deps],
        group_name=group_name(project, "near_dedup"),
        kinds={"faiss", "parquet"},
        pool="gpu",
        op_tags=GPU_STEP_TAGS,
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_WITHIN_THRESHOLD,
                asset=key,
                blocking=True,
                description="Every match is within the threshold.",
            ),
            dg.AssetCheckSpec(CHECK_ONE_ROW, asset=key, description="At most one match per image and set."),
        ],
        description=(
            f"Pool images within copy-detection cosine distance {threshold} of an image of the evaluation "
            f"set(s) {', '.join(sets)} (references.sets, role decontaminate): image_id, reference_set, "
            "reference_image (its path in the set), distance. curation_decisions removes them "
            "(reason contamination:<set>)."
        ),
    )
    def decontamination(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        settings = compute.settings()
        identity = load_project_model(project, reference_model(project, "decontaminate")).identity
        shards = processed_shards(context, project, project_store, COPY_EMBEDDINGS)
        if not shards:
            raise dg.Failure(f"{DECONTAMINATION}: no {COPY_EMBEDDINGS} yet: run the shard job first")
        mean, mean_source = centring_mean(project_store, identity, shards)
        references = []
        for name in sets:
            reference = ensure_reference_vectors(project, project_store, name, settings, context.log)
            refuse_other_model(reference, identity)
            references.append(reference)
        searched, nearest, seconds = [], [], 0.0
        # the IVF path (at scale) is calibrated for the matches the decisions act on (the
        # threshold); the report's margin past it is read from the same search
        search = ReferenceSearch(
            mean,
            sum(project_store.parquet_rows(project_store.shard_path(COPY_EMBEDDINGS, s)) for s in shards),
            threshold,
            threshold + config.report_margin,
        )
        for shard in shards:
            table, took = shard_nearest(project_store, shard, identity, mean, references, search)
            nearest.append(table)
            if took is not None:
                searched.append(shard)
                seconds += took
        pool_images = sum(t["image_id"].n_unique() for t in nearest)
        summary = [
            {
                "set": reference.name,
                "reference images": len(reference.paths),
                "contaminated pool images": sum(
                    int(((t["reference_set"] == reference.name) & (t["distance"] <= threshold)).sum())
                    for t in nearest
                ),
                "recomputed": reference.computed,
            }
            for reference in references
        ]
        everything = pl.concat(nearest) if nearest else pl.DataFrame(schema=MATCH_SCHEMA)
        matches = contaminated(everything, threshold)
        edge = borderline(everything, threshold, config.report_margin, config.closest_shown)
        meta = {"threshold": threshold, "sets": sets, "mean": mean_source}
        out = project_store.write_parquet(matches, matches_path(project_store), metadata=meta)
        project_store.write_parquet(edge, borderline_path(project_store), metadata=meta)
        context.log.info(
            f"{DECONTAMINATION}: {len(searched)} of {len(shards)} shard(s) searched in {seconds:.1f} s; "
            f"{matches['image_id'].n_unique()} of {pool_images} pool images within "
            f"{threshold} of {', '.join(sets)}"
        )
        shown = edge.select(
            "image_id", "reference_set", "reference_image", pl.col("distance").round(4), "side"
        )
        return dg.MaterializeResult(
            metadata={
                "threshold": threshold,
                "centred with": mean_source,
                "pool images": pool_images,
                "shards searched": f"{len(searched)} of {len(shards)} (the others were current)",
                "search seconds": round(seconds, 2),
                "contaminated images": matches["image_id"].n_unique(),
                "sets": md_table(summary),
                "closest matches either side of the threshold": md_table(shown.to_dicts()),
                "dagster/row_count": matches.height,
                "path": dg.MetadataValue.path(str(out)),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=CHECK_WITHIN_THRESHOLD,
                    passed=bool(matches.is_empty() or float(matches["distance"].max()) <= threshold),
                    metadata={
                        "max_distance": float(matches["distance"].max() or 0.0) if matches.height else 0.0
                    },
                ),
                dg.AssetCheckResult(
                    check_name=CHECK_ONE_ROW,
                    passed=matches.select("image_id", "reference_set").is_duplicated().sum() == 0,
                    metadata={"rows": matches.height},
                ),
            ],
        )

    return decontamination
