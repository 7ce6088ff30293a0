"""Decontamination: the pool images that are near-copies of an evaluation set's images.

DINOv2's LVD-142M removed every pool image that a copy-detection search found near an image
of the evaluation benchmarks, so reported results are not inflated by training on test
images. Here the pool's copy-detection vectors are searched against each ``decontaminate``
reference set's vectors:

- both sides are prepared as the near-duplicate index prepares them (centred with the pool's
  mean, L2-normalised: :func:`curation_assets.core.dedup.index.prepare`), so a distance
  means the same here as in near-dedup and its threshold carries over;
- the references (thousands to tens of thousands) go into an exact faiss inner-product
  index, and the pool is searched against it in chunks: memory is the references plus one
  chunk, never a pool x references matrix;
- at scale (more than :data:`~curation_assets.core.dedup.nearest.FLAT_MAX_PRODUCTS` pool x
  reference products: 25 T multiply-adds at 1M x 50k x 512) the references go into an IVF-Flat
  index instead, with nprobe chosen for recall >= 0.99 of the matches within
  ``relevant_distance`` (the threshold plus the report's margin) on a sample of the pool
  (:mod:`curation_assets.core.dedup.nearest`); farther than that the nearest reference found
  may not be the nearest, which decides nothing;
- each pool image gets its nearest reference per set, with the exact cosine distance.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:  # nearest imports the index module (faiss): only the searching steps load it
    from curation_assets.core.dedup.nearest import IvfSearch

MATCH_SCHEMA = {
    "image_id": pl.String(),
    "reference_set": pl.String(),
    "reference_image": pl.String(),
    "distance": pl.Float32(),
}


@dataclass(frozen=True)
class NearestReferences:
    """For every pool row: its nearest reference row and the cosine distance to it."""

    rows: np.ndarray  # int64 (n,), -1 when there is no reference
    distance: np.ndarray  # float32 (n,), inf when there is no reference


def _chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def reference_index(
    references: np.ndarray,
    mean: np.ndarray,
    calibration_pool: np.ndarray,
    relevant_distance: float | None = None,
    seed: int = 0,
) -> IvfSearch:
    """An IVF index of the (raw) references for :func:`nearest_references`, built once per set and
    reused for every shard; nprobe is calibrated on a sample of ``calibration_pool``'s rows for
    recall >= 0.99 of the references within ``relevant_distance`` (all nearest ones when None)."""
    from curation_assets.core.dedup.nearest import IvfSearch, Prepared

    min_score = None if relevant_distance is None else 1.0 - relevant_distance
    return IvfSearch.build(
        Prepared(references, mean), Prepared(calibration_pool, mean), 1, min_score=min_score, seed=seed
    )


def nearest_references(
    pool: np.ndarray,
    references: np.ndarray,
    mean: np.ndarray,
    chunk: int = 32768,
    *,
    kind: str = "auto",
    relevant_distance: float | None = None,
    ivf: IvfSearch | None = None,
) -> NearestReferences:
    """The nearest of ``references`` to each row of ``pool`` (raw vectors, float16 or float32).

    Both are prepared with ``mean`` (centred, L2-normalised); the pool one chunk at a time, so a
    memory-mapped pool is read once and never held as float32 whole. ``kind``: ``flat`` (exact),
    ``ivf`` or ``auto`` (IVF above FLAT_MAX_PRODUCTS products); ``ivf``: an index from
    :func:`reference_index` to reuse (else one is built here, calibrated on this pool).
    """
    import faiss

    from curation_assets.core.dedup.index import prepare
    from curation_assets.core.dedup.nearest import Prepared, use_ivf

    n = len(pool)
    rows = np.full(n, -1, dtype=np.int64)
    distance = np.full(n, np.inf, dtype=np.float32)
    if not n or not len(references):
        return NearestReferences(rows, distance)
    if ivf is not None or use_ivf(n, len(references), kind):
        ivf = ivf or reference_index(references, mean, pool, relevant_distance)
        found, score = ivf.search(Prepared(pool, mean), 1)
        hit = found[:, 0] >= 0
        rows[hit] = found[hit, 0]
        distance[hit] = (1.0 - score[hit, 0]).astype(np.float32)
        return NearestReferences(rows, distance)
    prepared_refs = prepare(np.asarray(references), mean)
    index = faiss.IndexFlatIP(prepared_refs.shape[1])
    index.add(prepared_refs)
    for start, end in _chunks(n, chunk):
        queries = prepare(np.asarray(pool[start:end]), mean)
        _, found = index.search(queries, 1)
        rows[start:end] = found[:, 0]
        # faiss's float32 dot products, re-scored in float64 so a distance right at the threshold
        # is decided the same way as near-dedup's exact re-scoring
        hit = found[:, 0] >= 0
        exact = np.einsum("ij,ij->i", queries[hit], prepared_refs[found[hit, 0]], dtype=np.float64)
        block = np.full(end - start, np.inf, dtype=np.float32)
        block[hit] = (1.0 - exact).astype(np.float32)
        distance[start:end] = block
    return NearestReferences(rows, distance)


def nearest_table(
    image_ids: list[str], set_name: str, reference_paths: list[str], nearest: NearestReferences
) -> pl.DataFrame:
    """One row per pool image with a nearest reference: image_id, reference_set, reference_image, distance."""
    have = nearest.rows >= 0
    paths = np.asarray(reference_paths, dtype=object)
    return pl.DataFrame(
        {
            "image_id": np.asarray(image_ids, dtype=object)[have].tolist(),
            "reference_set": [set_name] * int(have.sum()),
            "reference_image": paths[nearest.rows[have]].tolist(),
            "distance": nearest.distance[have],
        },
        schema=MATCH_SCHEMA,
    )


def contaminated(nearest: pl.DataFrame, threshold: float) -> pl.DataFrame:
    """The matches: pool images at cosine distance <= ``threshold`` of a reference, closest first."""
    return nearest.filter(pl.col("distance") <= threshold).sort("distance", "image_id", "reference_set")


def borderline(nearest: pl.DataFrame, threshold: float, margin: float, shown: int) -> pl.DataFrame:
    """The ``shown`` matches closest to the threshold on each side (within ``margin``), for a reviewer
    choosing the threshold: the weakest matches removed and the strongest ones kept."""
    near = nearest.filter((pl.col("distance") - threshold).abs() <= margin)
    below = near.filter(pl.col("distance") <= threshold).sort("distance", descending=True).head(shown)
    above = near.filter(pl.col("distance") > threshold).sort("distance").head(shown)
    return pl.concat(
        [
            below.with_columns(side=pl.lit("removed")),
            above.with_columns(side=pl.lit("kept")),
        ]
    ).sort("distance")
