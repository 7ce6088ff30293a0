"""Retrieval-based curation: grow a curated seed set with its nearest images from the pool.

DINOv2's LVD-142M retrieved, for every image of its curated seed datasets, the k nearest
images of the deduplicated uncurated pool (k = 4) by cosine similarity of self-supervised
embeddings. ``sample`` mode here does the same with the project's semantic vectors:

- the k nearest pool images of every seed image, kept only at cosine similarity >= a floor
  (a seed with no close pool image retrieves nothing rather than k unrelated images);
- deduplicated across seeds: an image retrieved by several seeds counts once, credited to
  the seed it is most similar to;
- budgeted: at most ``budget`` images, the most similar first.

``cluster`` mode (LVD-142M's cluster-based retrieval) takes whole clusters instead: the
level-1 clusters of the pool's hierarchical k-means whose centroid lies within a cosine
distance of a seed image, each up to a cap (its images nearest the centroid first).

The search is exact for small sets: the pool is read in chunks, each chunk is an exact faiss
inner-product index the seeds search, and each seed's running k best are merged with the
chunk's. Memory is one chunk plus the seeds' (m, k) results, never a seeds x pool matrix. At
scale (more than :data:`~curation_assets.core.dedup.nearest.FLAT_MAX_PRODUCTS` seed x pool
products) the pool goes into one IVF-Flat index for every seed set, nprobe calibrated for
recall >= 0.99 of the neighbours above the similarity floor, the candidates re-scored exactly
(:mod:`curation_assets.core.dedup.nearest`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:  # nearest imports the index module (faiss): only the searching steps load it
    from curation_assets.core.dedup.nearest import IvfSearch

SELECTION_SCHEMA = {
    "image_id": pl.String(),
    "seed_set": pl.String(),
    "seed_image": pl.String(),
    "similarity": pl.Float32(),
    "rank": pl.Int32(),  # sample: 1 = the seed's nearest pool image; cluster: 1 = nearest its centroid
    "cluster": pl.Int64(),  # cluster mode: the level-1 cluster that selected it (sample mode: null)
}


@dataclass(frozen=True)
class Neighbours:
    """Per seed row: its k nearest pool rows (-1 past the pool's end) and their cosine similarities."""

    rows: np.ndarray  # int64 (m, k)
    similarity: np.ndarray  # float32 (m, k), -inf where rows is -1


def normalised(vectors: np.ndarray) -> np.ndarray:
    """float32, L2-normalised rows (stored vectors are float16: renormalise after the cast)."""
    out = np.asarray(vectors, dtype=np.float32).copy()
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def pool_index(
    pool: np.ndarray, seeds: np.ndarray, k: int, min_similarity: float | None = None, seed: int = 0
) -> IvfSearch:
    """An IVF index of the pool for :func:`nearest_pool_images`, shared by every seed set; nprobe
    calibrated on a sample of ``seeds`` for recall >= 0.99 of their k nearest above the floor."""
    from curation_assets.core.dedup.nearest import IvfSearch, Prepared

    return IvfSearch.build(Prepared(pool), Prepared(seeds), k, min_score=min_similarity, seed=seed)


def nearest_pool_images(
    pool: np.ndarray,
    seeds: np.ndarray,
    k: int,
    chunk: int = 65536,
    *,
    kind: str = "auto",
    min_similarity: float | None = None,
    ivf: IvfSearch | None = None,
) -> Neighbours:
    """The ``k`` nearest pool rows of every seed row, by cosine similarity, most similar first
    (ties: the lower pool row first): exact, or (``kind`` ivf, or auto above FLAT_MAX_PRODUCTS
    products, or an ``ivf`` from :func:`pool_index`) by the IVF path, re-scored exactly."""
    import faiss

    from curation_assets.core.dedup.nearest import Prepared, use_ivf

    if len(seeds) and len(pool) and (ivf is not None or use_ivf(len(seeds), len(pool), kind)):
        ivf = ivf or pool_index(pool, seeds, k, min_similarity)
        rows, similarity = ivf.search(Prepared(seeds), k)
        return Neighbours(rows, similarity.astype(np.float32))
    queries = normalised(seeds)
    m = len(queries)
    best_rows = np.full((m, k), -1, dtype=np.int64)
    best_sim = np.full((m, k), -np.inf, dtype=np.float32)
    for start in range(0, len(pool), chunk):
        block = normalised(pool[start : start + chunk])
        index = faiss.IndexFlatIP(block.shape[1])
        index.add(block)
        sim, rows = index.search(queries, min(k, len(block)))
        rows = np.where(rows >= 0, rows + start, -1)
        sim = np.where(rows >= 0, sim, -np.inf).astype(np.float32)
        all_rows = np.concatenate([best_rows, rows], axis=1)
        all_sim = np.concatenate([best_sim, sim], axis=1)
        # most similar first; among equals the lower pool row, so chunking never changes the answer
        tie = np.where(all_rows >= 0, all_rows, np.iinfo(np.int64).max)
        order = np.lexsort((tie, -all_sim), axis=1)[:, :k]
        best_rows = np.take_along_axis(all_rows, order, axis=1)
        best_sim = np.take_along_axis(all_sim, order, axis=1)
    return Neighbours(best_rows, best_sim)


def sample_selection(
    pool_ids: list[str],
    pool: np.ndarray,
    seed_sets: dict[str, tuple[list[str], np.ndarray]],
    k: int,
    min_similarity: float,
    budget: int | None = None,
    *,
    kind: str = "auto",
    neighbours: dict[str, Neighbours] | None = None,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """``sample`` mode over every seed set: (selection, counts).

    ``seed_sets``: set name -> (seed image names, their vectors). The selection has one row per
    retrieved pool image (``SELECTION_SCHEMA``), most similar first; counts say how many
    candidates the floor, the deduplication and the budget took out. ``kind``: the search (auto,
    flat, ivf; see :func:`nearest_pool_images`); at scale one IVF index of the pool serves every
    set. ``neighbours``, when given, receives each set's search results (benchmarks measure
    their recall).
    """
    from curation_assets.core.dedup.nearest import use_ivf

    every_seed = [vectors for _, vectors in seed_sets.values() if len(vectors)]
    shared = None
    if every_seed and len(pool) and use_ivf(sum(len(v) for v in every_seed), len(pool), kind):
        shared = pool_index(pool, np.concatenate(every_seed), k, min_similarity)
    frames = []
    for name, (seed_images, vectors) in seed_sets.items():
        found = nearest_pool_images(pool, vectors, k, kind=kind, ivf=shared)
        if neighbours is not None:
            neighbours[name] = found
        have = (found.rows >= 0) & (found.similarity >= min_similarity)
        seed_row, rank = np.nonzero(have)
        frames.append(
            pl.DataFrame(
                {
                    "image_id": np.asarray(pool_ids, dtype=object)[found.rows[have]].tolist(),
                    "seed_set": [name] * len(seed_row),
                    "seed_image": np.asarray(seed_images, dtype=object)[seed_row].tolist(),
                    "similarity": found.similarity[have],
                    "rank": (rank + 1).astype(np.int32),
                    "cluster": [None] * len(seed_row),
                },
                schema=SELECTION_SCHEMA,
            )
        )
    candidates = sum(min(k, len(pool)) * len(v[0]) for v in seed_sets.values())
    hits = pl.concat(frames) if frames else pl.DataFrame(schema=SELECTION_SCHEMA)
    # one row per pool image: the seed it is most similar to (stable order for equal similarities)
    unique = hits.sort(["similarity", "seed_set", "seed_image"], descending=[True, False, False]).unique(
        "image_id", keep="first", maintain_order=True
    )
    selected = unique.head(budget) if budget is not None else unique
    counts = {
        "candidates": candidates,
        "under_the_floor": candidates - hits.height,
        "retrieved_by_several_seeds": hits.height - unique.height,
        "over_the_budget": unique.height - selected.height,
        "selected": selected.height,
    }
    return selected, counts


def cluster_selection(
    image_ids: list[str],
    clusters: np.ndarray,
    centroid_distance: np.ndarray,
    centroids: np.ndarray,
    seed_sets: dict[str, tuple[list[str], np.ndarray]],
    max_distance: float,
    per_cluster_cap: int,
    budget: int | None = None,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """``cluster`` mode: (selection, counts).

    ``clusters[i]`` is image i's level-1 cluster, ``centroid_distance[i]`` its distance to that
    centroid, ``centroids`` the level-1 centroids. A cluster is taken when the cosine distance of
    its centroid to its nearest seed image (over every set) is <= ``max_distance``; its images
    nearest the centroid come first, at most ``per_cluster_cap``. Rows carry the seed nearest the
    cluster and the centroid's similarity to it; over ``budget``, the nearest clusters' first.
    """
    if not seed_sets or not len(centroids):
        return pl.DataFrame(schema=SELECTION_SCHEMA), {"clusters": len(centroids), "clusters_taken": 0}
    names = [(name, image) for name, (images, _) in seed_sets.items() for image in images]
    seeds = np.concatenate([vectors for _, vectors in seed_sets.values()])
    # each centroid's nearest seed: search the seeds with the centroids as queries
    back = nearest_pool_images(seeds, centroids, 1)
    similarity, seed_row = back.similarity[:, 0], back.rows[:, 0]
    taken = np.nonzero(1.0 - similarity <= max_distance)[0]
    members = pl.DataFrame(
        {"image_id": image_ids, "cluster": np.asarray(clusters, np.int64), "d": np.asarray(centroid_distance)}
    )
    members = (
        members.filter(pl.col("cluster").is_in(taken.tolist()))
        .sort("cluster", "d", "image_id")
        .with_columns(rank=pl.int_range(1, pl.len() + 1).over("cluster").cast(pl.Int32))
        .filter(pl.col("rank") <= per_cluster_cap)
    )
    cluster_seed = pl.DataFrame(
        {
            "cluster": taken.astype(np.int64),
            "seed_set": [names[seed_row[c]][0] for c in taken],
            "seed_image": [names[seed_row[c]][1] for c in taken],
            "similarity": similarity[taken].astype(np.float32),
        }
    )
    selected = (
        members.join(cluster_seed, on="cluster")
        .sort(["similarity", "cluster", "rank"], descending=[True, False, False])
        .select(list(SELECTION_SCHEMA))
        .cast(SELECTION_SCHEMA)
    )
    capped = selected.height
    if budget is not None:
        selected = selected.head(budget)
    counts = {
        "clusters": len(centroids),
        "clusters_taken": len(taken),
        "images_in_taken_clusters": int(np.isin(clusters, taken).sum()),
        "over_the_cap": int(np.isin(clusters, taken).sum()) - capped,
        "over_the_budget": capped - selected.height,
        "selected": selected.height,
    }
    return selected, counts
