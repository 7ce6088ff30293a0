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
  index instead (the smaller side: 50k references train in a second, and each pool row probes a
  few lists of it), with nprobe chosen for recall >= 0.99 of the matches within
  ``relevant_distance`` (the threshold: what decides a removal) on a sample of the pool
  (:mod:`curation_assets.core.dedup.nearest`). The report's matches just past the threshold
  come from the same search, their distances exact and their order checked against the
  screen's rounding up to ``report_distance``, but found at the recall the threshold's
  calibration gives there; farther than that the nearest reference found may not be the
  nearest, which decides nothing;
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
    report_distance: float | None = None,
) -> IvfSearch:
    """An IVF index of the (raw) references for :func:`nearest_references`, built once per set and
    reused for every shard; nprobe is calibrated on a sample of ``calibration_pool``'s rows for
    recall >= 0.99 of the references within ``relevant_distance`` (all nearest ones when None),
    and the screen's order checked up to ``report_distance`` (default: ``relevant_distance``)."""
    from curation_assets.core.dedup.nearest import IvfSearch, Prepared

    min_score = None if relevant_distance is None else 1.0 - relevant_distance
    report = relevant_distance if report_distance is None else max(report_distance, relevant_distance or 0.0)
    return IvfSearch.build(
        Prepared(references, mean),
        Prepared(calibration_pool, mean),
        1,
        min_score=min_score,
        seed=seed,
        verify_score=None if report is None else 1.0 - report,
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
    report_distance: float | None = None,
) -> NearestReferences:
    """The nearest of ``references`` to each row of ``pool`` (raw vectors, float16 or float32).

    Both are prepared with ``mean`` (centred, L2-normalised); the pool one chunk at a time, so a
    memory-mapped pool is read once and never held as float32 whole. ``kind``: ``flat`` (exact),
    ``ivf`` or ``auto`` (IVF above FLAT_MAX_PRODUCTS products); ``ivf``: an index from
    :func:`reference_index` to reuse (else one is built here, calibrated on this pool for recall
    within ``relevant_distance``, its screen checked up to ``report_distance``).
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
        ivf = ivf or reference_index(
            references, mean, pool, relevant_distance, report_distance=report_distance
        )
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
    # in float64, identical vectors at 0: a float32 distance of -2e-8 minus a threshold of 0.1
    # rounds past a margin of 0.1, and an exact copy would drop out of the report
    gap = (pl.col("distance").cast(pl.Float64).clip(lower_bound=0.0) - threshold).abs()
    near = nearest.filter(gap <= margin)
    below = near.filter(pl.col("distance") <= threshold).sort("distance", descending=True).head(shown)
    above = near.filter(pl.col("distance") > threshold).sort("distance").head(shown)
    return pl.concat(
        [
            below.with_columns(side=pl.lit("removed")),
            above.with_columns(side=pl.lit("kept")),
        ]
    ).sort("distance")


@dataclass(frozen=True)
class ReferenceImageLocation:
    """Where a reference image's bytes are: a plain file (offset None) or a member of a tar."""

    source_path: str
    offset: int | None = None
    size_bytes: int | None = None


def locate_reference_images(root: str, kind: str, names: list[str]) -> dict[str, ReferenceImageLocation]:
    """Where the named images of a reference set are, for showing them (a report's thumbnails).

    Names are the ones decontamination records (:mod:`curation_assets.core.dedup.references`): a
    path under the set's folder (``directory``) or ``<tar path>/<member>`` (``webdataset``: the
    member is found in its tar's headers, only the tars named are read). A ``vectors`` set has no
    images, and a name whose tar or member is gone is left out: the caller shows the name alone.
    """
    import tarfile

    from curation_assets.core.storage import as_path, open_input

    folder = as_path(str(root))
    if kind == "directory":
        return {name: ReferenceImageLocation(str(folder / name)) for name in names}
    if kind != "webdataset":
        return {}
    by_tar: dict[str, dict[str, str]] = {}  # tar path under the folder -> member -> name
    for name in names:
        parts = name.split("/")
        # the first component ending in .tar ends the tar's path: members may hold folders
        cut = next((i for i, part in enumerate(parts[:-1]) if part.endswith(".tar")), None)
        if cut is not None:
            by_tar.setdefault("/".join(parts[: cut + 1]), {})["/".join(parts[cut + 1 :])] = name
    found: dict[str, ReferenceImageLocation] = {}
    for tar, members in by_tar.items():
        path = str(folder / tar)
        try:
            with open_input(path) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
                wanted = dict(members)
                for member in archive:  # headers only, stopping once every wanted member is seen
                    name = wanted.pop(member.name, None)
                    if name is not None and member.isfile():
                        found[name] = ReferenceImageLocation(path, member.offset_data, member.size)
                    if not wanted:
                        break
        except (OSError, tarfile.TarError, EOFError):
            continue  # the set changed since it was searched: its images show as names
    return found
