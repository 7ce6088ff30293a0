"""Near-duplicates (global): `lsh_index` -> `duplicate_pairs` -> `duplicate_groups`.

- `lsh_index`: a faiss index over every processed shard's copy-detection vectors, centred
  with the dataset mean and L2-normalised (the name keeps VDC's; the kind is set by
  stages.near_dedup.index). New shards are added to the existing index; a changed or
  removed shard, another model or another index kind rebuilds it (metadata says why).
  The centring mean is computed once, at the first build, and kept (``mean.npy``) for
  every later build with the same model, so a vector's meaning never shifts as shards
  arrive and an incremental update equals a rebuild; delete ``mean.npy`` to recompute it.
- `duplicate_pairs`: every pair under report_threshold, re-scored exactly. After an
  incremental index update only the new rows are searched (against everything).
- `duplicate_groups`: groups at `threshold` with the linkage and keeper policy of the
  project file; cheap, so changing the threshold re-materializes only this asset. Carries
  the threshold sweep (table and plot) to choose a threshold from numbers.
"""

import json
import time
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.common import (
    CHECK_ONE_KEEPER,
    GPU_STEP_TAGS,
    asset_key,
    group_name,
    load_project_model,
    md_table,
    one_keeper_check,
    plot_md,
)
from curation_assets.assets.dedup.exact_duplicates import processed_shards
from curation_assets.assets.keys import COPY_EMBEDDINGS, GROUPS, INDEX, PAIRS, SANITIZED
from curation_assets.config import ProjectConfig
from curation_assets.core.embed.vectors import assert_compatible
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import VECTORS_FILE, ProjectStore, StoreResource

# core.index (faiss), core.grouping (scipy) and core.plots (matplotlib) are imported inside the
# functions that use them, so that loading the Definitions stays cheap (issue 12).

MANIFEST = "manifest.json"
MEAN = "mean.npy"
MEAN_IDENTITY = "mean.json"
CHECK_NO_SELF_PAIRS = "no_self_pairs"
CHECK_DISTANCE_RANGE = "distances_within_0_2"
CHECK_GROUP_SIZES = "no_mega_groups"
MEGA_GROUP = 100  # a group this large is worth a look: chaining or a degenerate descriptor

PAIRS_SCHEMA = {"image_id_a": pl.String(), "image_id_b": pl.String(), "distance": pl.Float32()}


# ----------------------------------------------------------------------------- the index


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _expected_identity(project: ProjectConfig) -> dict[str, Any]:
    name = project.stages.near_dedup.model
    return load_project_model(project, name).identity


def _shard_vectors(store: ProjectStore, shards: list[str], identity: dict[str, Any]):
    """(shard, ids, memory-mapped vectors, vectors file) per shard, refusing other models' vectors."""
    found = []
    for shard in shards:
        ids, vectors, meta = store.read_vectors(COPY_EMBEDDINGS, shard)
        try:
            assert_compatible(shard, meta["model"], identity)
        except ValueError as exc:
            raise dg.Failure(str(exc)) from None
        embedded = ids.filter(pl.col("row").is_not_null()).sort("row")
        found.append((shard, embedded["image_id"].to_list(), vectors, meta[VECTORS_FILE]))
    return found


def _centring_mean(store: ProjectStore, folder: Path, vectors: list, identity: dict[str, Any]) -> np.ndarray:
    """The kept mean of this model's vectors, or a new one over every vector when there is none."""
    kept = folder / MEAN_IDENTITY
    if (folder / MEAN).is_file() and kept.is_file() and json.loads(kept.read_text()) == identity:
        return store.read_npy(folder / MEAN)
    from curation_assets.core.dedup.index import dataset_mean

    mean = dataset_mean(np.asarray(v[2], dtype=np.float32) for v in vectors)
    store.write_npy(mean, folder / MEAN)
    store.write_json(identity, folder / MEAN_IDENTITY)
    return mean


def _plan(
    previous: dict[str, Any] | None, current: dict[str, str], settings: dict[str, Any]
) -> tuple[bool, str]:
    """(incremental?, why) for an index update."""
    if previous is None:
        return False, "first build"
    if previous["settings"] != settings:
        return False, "index settings or model changed"
    changed = [s for s, f in previous["shards"].items() if current.get(s) != f]
    if changed:
        return (
            False,
            f"{len(changed)} shard(s) changed or removed since the last build ({', '.join(changed[:5])})",
        )
    return True, "new shards added to the existing index"


def build_index_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    stage = project.stages.near_dedup

    @dg.asset(
        key=asset_key(project, INDEX),
        deps=[asset_key(project, COPY_EMBEDDINGS)],
        group_name=group_name(project, "near_dedup"),
        kinds={"faiss", "numpy"},
        pool="gpu",
        op_tags=GPU_STEP_TAGS,
        description=(
            "faiss index over every processed shard's copy-detection vectors (centred with the dataset mean, "
            f"L2-normalised; kind: {stage.index}). Despite its name (the walkthroughs' word) it is not "
            "only LSH: auto picks exact flat search for small pools and IVF (or HNSW) at scale; lsh is one "
            "option. New shards are added; a changed shard rebuilds it."
        ),
    )
    def lsh_index(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        from curation_assets.core.dedup.index import VectorIndex, choose_kind, prepare

        started = time.perf_counter()
        project_store = store.for_project(project)
        identity = _expected_identity(project)
        shards = processed_shards(context, project, project_store, COPY_EMBEDDINGS)
        vectors = _shard_vectors(project_store, shards, identity)
        folder = project_store.asset_dir(INDEX)
        previous = _read_manifest(folder)
        settings = {"index": stage.index, "model": identity}
        incremental, why = _plan(previous, {s: f for s, _, _, f in vectors}, settings)
        on_gpu = compute.settings().device.type == "cuda"
        total = sum(len(ids) for _, ids, _, _ in vectors)

        if incremental:
            assert previous is not None
            version = previous["version"] + 1
            local = project_store.local_folder(folder / previous["folder"], context.log.info)
            index = VectorIndex.load(local)
            mean = index.mean
            fresh = [v for v in vectors if v[0] not in previous["shards"]]
            ids = pl.read_parquet(local / "ids.parquet")
            prepared_old = np.load(local / "prepared.npy", mmap_mode="r")
            start = len(ids)
        else:
            version = (previous["version"] + 1) if previous else 1
            mean = _centring_mean(project_store, folder, vectors, identity)
            kind = choose_kind(total, stage.index, on_gpu)
            fresh = vectors
            ids = pl.DataFrame(schema={"image_id": pl.String(), "shard": pl.String()})
            prepared_old = None
            start = 0
            index = None
        new_ids = pl.DataFrame(
            {
                "image_id": [i for _, shard_ids, _, _ in fresh for i in shard_ids],
                "shard": [s for s, shard_ids, _, _ in fresh for _ in shard_ids],
            },
            schema={"image_id": pl.String(), "shard": pl.String()},
        )
        dim = vectors[0][2].shape[1] if vectors else 1
        new_prepared = (
            np.concatenate([prepare(np.asarray(v[2]), mean) for v in fresh])
            if fresh
            else np.zeros((0, dim), np.float32)
        )
        if index is None:
            index = VectorIndex.build(kind, new_prepared, seed=stage.seed, mean=mean, use_gpu=on_gpu)
        elif len(new_prepared):
            index.add(new_prepared)
        prepared = new_prepared if prepared_old is None else np.concatenate([prepared_old, new_prepared])
        all_ids = pl.concat([ids, new_ids])

        def write_version(local: Path) -> None:
            index.save(local)
            np.save(local / "prepared.npy", prepared)
            all_ids.write_parquet(local / "ids.parquet")

        target = project_store.publish_folder(folder / f"v{version:06d}", write_version)
        manifest = {
            "version": version,
            "folder": target.name,
            # a new id at every full build: pairs found against an older build are never reused
            "build_id": previous["build_id"] if incremental and previous else uuid.uuid4().hex,
            "settings": settings,
            "kind": index.kind,
            "params": index.params,
            "shards": {s: f for s, _, _, f in vectors},
            "count": len(all_ids),
            "added_rows": [start, len(all_ids)],
            "why": why,
        }
        project_store.write_json(manifest, folder / MANIFEST)  # the switch to the new version
        for old in folder.iterdir():
            if old.name.startswith("v") and old.name != target.name and old.is_dir():
                project_store.remove(old)
        seconds = time.perf_counter() - started
        context.log.info(
            f"{INDEX}: {why}; {len(new_prepared)} vectors added, {len(all_ids)} in all, {seconds:.1f} s"
        )
        return dg.MaterializeResult(
            metadata={
                "kind": index.kind,
                "params": dg.MetadataValue.json(index.params),
                "vectors": len(all_ids),
                "added": len(new_prepared),
                "rebuilt": not incremental,
                # IVF lists were trained on the first build's data; new shards only add to them
                "retrain_advised": index.retrain_advised,
                "why": why,
                "shards": len(vectors),
                "seconds": round(seconds, 2),
                "path": dg.MetadataValue.path(str(target)),
            }
        )

    return lsh_index


# ----------------------------------------------------------------------------- pairs


def build_pairs_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    stage = project.stages.near_dedup
    key = asset_key(project, PAIRS)

    @dg.asset(
        key=key,
        deps=[asset_key(project, INDEX)],
        group_name=group_name(project, "near_dedup"),
        kinds={"faiss", "parquet"},
        check_specs=[
            dg.AssetCheckSpec(CHECK_NO_SELF_PAIRS, asset=key, blocking=True),
            dg.AssetCheckSpec(CHECK_DISTANCE_RANGE, asset=key, blocking=True),
        ],
        description=(
            f"Every pair of images under cosine distance {stage.report_threshold} (report_threshold), found "
            "through the index and re-scored exactly. After an incremental index update only the new rows "
            "are searched, against everything."
        ),
    )
    def duplicate_pairs(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        from curation_assets.core.dedup.index import VectorIndex, find_pairs

        started = time.perf_counter()
        project_store = store.for_project(project)
        index_folder = project_store.asset_dir(INDEX)
        manifest = _read_manifest(index_folder)
        if manifest is None:
            raise dg.Failure(f"no {INDEX} yet: materialize it first")
        version_folder = project_store.local_folder(index_folder / manifest["folder"], context.log.info)
        index = VectorIndex.load(version_folder)
        ids = pl.read_parquet(version_folder / "ids.parquet")["image_id"]
        prepared = np.load(version_folder / "prepared.npy", mmap_mode="r")
        pairs_path = project_store.global_path(PAIRS, f"{PAIRS}.parquet")
        done = project_store.parquet_metadata(pairs_path) if pairs_path.is_file() else {}
        incremental = done.get("build_id") == manifest["build_id"] and done.get("searched_upto", 0) <= len(
            ids
        )
        start = done["searched_upto"] if incremental else 0
        query_rows = np.arange(start, len(ids), dtype=np.int64)
        search: dict = {}
        rows_a, rows_b, distance = find_pairs(
            index, np.asarray(prepared[start:]), query_rows, stage.report_threshold, prepared, stats=search
        )
        found = pl.DataFrame(
            {
                "image_id_a": ids.gather(rows_a),
                "image_id_b": ids.gather(rows_b),
                "distance": distance.astype(np.float32),
            },
            schema=PAIRS_SCHEMA,
        )
        kept = project_store.read_parquet(pairs_path) if incremental else pl.DataFrame(schema=PAIRS_SCHEMA)
        pairs = pl.concat([kept, found]).unique(["image_id_a", "image_id_b"]).sort("distance", "image_id_a")
        project_store.write_parquet(
            pairs,
            pairs_path,
            metadata={
                "build_id": manifest["build_id"],
                "searched_upto": len(ids),
                "report_threshold": stage.report_threshold,
            },
        )
        seconds = time.perf_counter() - started
        return dg.MaterializeResult(
            metadata={
                "pairs": len(pairs),
                "new_pairs": len(found),
                "queried_rows": len(query_rows),
                "incremental": incremental,
                "report_threshold": stage.report_threshold,
                "seconds": round(seconds, 2),
                "search_seconds": round(search.get("search_s", 0.0), 2),
                "queried_rows_per_s": round(len(query_rows) / max(search.get("search_s", 0.0), 1e-9)),
                "candidates_rescored": int(search.get("candidates", 0)),
                "queries_capped": int(search.get("capped_queries", 0)),
                # IVF: inverted lists searched per query, of nprobe (the probe window narrows them)
                **(
                    {"lists_per_query": search["lists_per_query"], "nprobe": int(index.params["nprobe"])}
                    if "lists_per_query" in search
                    else {}
                ),
                "path": dg.MetadataValue.path(str(pairs_path)),
                "dagster/row_count": len(pairs),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=CHECK_NO_SELF_PAIRS,
                    passed=bool((pairs["image_id_a"] != pairs["image_id_b"]).all()),
                ),
                dg.AssetCheckResult(
                    check_name=CHECK_DISTANCE_RANGE,
                    passed=bool(pairs["distance"].is_between(-1e-4, 2 + 1e-4).all()),
                    metadata={
                        "min": float(pairs["distance"].min() or 0),
                        "max": float(pairs["distance"].max() or 0),
                    },
                ),
            ],
        )

    return duplicate_pairs


# ----------------------------------------------------------------------------- groups


def keeper_attributes(store: ProjectStore, shards: list[str]) -> pl.DataFrame | None:
    scan = store.scan_shards(SANITIZED, shards)
    if scan is None:
        return None
    return scan.select(
        "image_id",
        "n_findings",
        "size_bytes",
        pixels=pl.col("width").cast(pl.Int64) * pl.col("height").cast(pl.Int64),
    ).collect()


def build_groups_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    stage = project.stages.near_dedup
    key = asset_key(project, GROUPS)

    @dg.asset(
        key=key,
        deps=[asset_key(project, PAIRS), asset_key(project, SANITIZED)],
        group_name=group_name(project, "near_dedup"),
        kinds={"polars", "parquet"},
        check_specs=[
            dg.AssetCheckSpec(CHECK_ONE_KEEPER, asset=key, blocking=True),
            dg.AssetCheckSpec(
                CHECK_GROUP_SIZES, asset=key, description=f"No group over {MEGA_GROUP} images."
            ),
        ],
        description=(
            f"Near-duplicate groups at cosine distance < {stage.threshold} ({stage.linkage} linkage, keeper "
            f"{stage.keeper}); every removed image records its keeper and distance. Cheap: change "
            "stages.near_dedup.threshold and re-materialize only this. Metadata: the threshold sweep."
        ),
    )
    def duplicate_groups(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        from curation_assets.core.dedup.grouping import group_duplicates, sweep_thresholds, threshold_sweep
        from curation_assets.core.outputs.plots import sweep_plot

        project_store = store.for_project(project)
        pairs_path = project_store.global_path(PAIRS, f"{PAIRS}.parquet")
        if not pairs_path.is_file():
            raise dg.Failure(f"no {PAIRS} yet: materialize it first")
        pairs = project_store.read_parquet(pairs_path)
        attributes = keeper_attributes(
            project_store, processed_shards(context, project, project_store, SANITIZED)
        )
        groups = group_duplicates(pairs, stage.threshold, stage.linkage, stage.keeper, attributes, stage.seed)
        sweep = threshold_sweep(
            pairs,
            sweep_thresholds(stage.report_threshold),
            stage.linkage,
            stage.keeper,
            attributes,
            stage.seed,
        )
        out = project_store.write_parquet(
            groups,
            project_store.global_path(GROUPS, f"{GROUPS}.parquet"),
            metadata={"threshold": stage.threshold, "linkage": stage.linkage, "keeper": stage.keeper},
        )
        plot = project_store.write_with(
            project_store.global_path(GROUPS, "threshold_sweep.png"),
            lambda path: sweep_plot(sweep, pairs["distance"].to_numpy(), stage.threshold, path),
        )
        sizes = groups.group_by("group_id").agg(pl.len().alias("size"))
        largest = int(sizes["size"].max() or 0) if len(sizes) else 0
        return dg.MaterializeResult(
            metadata={
                "threshold": stage.threshold,
                "linkage": stage.linkage,
                "keeper": stage.keeper,
                "groups": len(sizes),
                "removed": int((~groups["is_keeper"]).sum()) if len(groups) else 0,
                "largest_group": largest,
                "sweep": md_table(sweep.to_dicts()),
                "sweep_plot": plot_md(plot, "threshold sweep: groups and removed images per threshold"),
                "path": dg.MetadataValue.path(str(out)),
                "dagster/row_count": len(groups),
            },
            check_results=[
                one_keeper_check(groups),
                dg.AssetCheckResult(
                    check_name=CHECK_GROUP_SIZES,
                    passed=largest <= MEGA_GROUP,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={
                        "largest_group": largest,
                        "median_group": float(sizes["size"].median() or 0) if len(sizes) else 0.0,
                    },
                ),
            ],
        )

    return duplicate_groups


def build_near_dedup_assets(project: ProjectConfig) -> list[dg.AssetsDefinition]:
    if not project.stages.near_dedup.enabled:
        return []
    return [build_index_asset(project), build_pairs_asset(project), build_groups_asset(project)]
