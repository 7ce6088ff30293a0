"""Train/test leaks: images of an evaluation split that are copies of training images.

Three methods, strongest first:

- ``exact``: the same file bytes (the inventory's ``content_hash``), a join.
- ``perceptual``: a 64-bit DCT perceptual hash (:func:`perceptual_hash`) within
  ``max_hamming`` bits: re-encodes, resizes, format changes and border trims.
- ``semantic``: cosine similarity of semantic embeddings at least ``min_similarity``
  through a faiss index (:func:`curation_assets.core.dedup.index.find_pairs`): the same picture
  after edits the hash does not survive (larger crops, overlays, colour changes).

No method builds an N x M matrix: exact is a hash join, perceptual a faiss binary range
search (popcount over packed codes, queries in chunks), semantic the vector index's
blocked join or k-NN search.

What the perceptual hash survives (measured on 60 views of scikit-image photos, 160-256
px): a 2x downscale stays within 4 bits; JPEG quality 50 within 8 (98% within 5). Crops
do not fare well: trimming 1% of the width and height kept 96% of images within 5 bits,
2% kept ~80%, 4% ~37%, 6% ~15% and 10% ~2%. Crops beyond a percent or two are the
semantic method's job. Unrelated images, even other views of the same photo, were at
least 12 bits apart (1st percentile 22).

How a pair found by several methods is reported: once per method that finds it (one
row per (train_image, test_image, method)), so each method's rows are complete on
their own; ``leak_type`` names the strongest method that found the pair (the same on
every row of the pair), so ``unique(["train_image", "test_image"])`` after sorting by
method strength, or a filter ``method == strongest_method``, counts each pair once.

Pure library: no Dagster import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import polars as pl

from curation_assets.core.dedup.index import VectorIndex, find_pairs, prepare
from curation_assets.core.labeled.phash import (  # noqa: F401  (re-exported: leak detection's hashes)
    HASH_BITS,
    HASH_BLOCK,
    HASH_SIZE,
    HASHES_SCHEMA,
    hamming_distance,
    hash_images,
    perceptual_hash,
)

if TYPE_CHECKING:  # decode imports torch: hashing workers should not pay for it
    pass

METHODS: tuple[str, ...] = ("exact", "perceptual", "semantic")  # strongest first
LEAK_TYPES: dict[str, str] = {
    "exact": "exact_copy",
    "perceptual": "near_copy",
    "semantic": "semantic_duplicate",
}
DEFAULT_MAX_HAMMING = 5
DEFAULT_MIN_SIMILARITY = 0.95
QUERY_CHUNK = 65536  # test hashes per binary range search: bounds the result buffers

LEAKS_SCHEMA: dict[str, pl.DataType] = {
    "train_image": pl.String(),
    "test_image": pl.String(),
    "method": pl.String(),
    "similarity": pl.Float64(),
    "hamming_distance": pl.Int64(),
    "leak_type": pl.String(),
    "train_split": pl.String(),
    "test_split": pl.String(),
}
# Splits that play the "train" side against later ones; others follow in name order.
SPLIT_PRECEDENCE: tuple[str, ...] = ("train", "val", "validation", "dev", "test")


# ----------------------------------------------------------------------------- leak search


def _require(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{what} frame lacks column(s) {missing} (needed by the methods asked for); "
            f"found: {frame.columns}"
        )


def _exact_pairs(train: pl.DataFrame, test: pl.DataFrame) -> pl.DataFrame:
    left = train.select(train_image="image_id", content_hash="content_hash").drop_nulls("content_hash")
    right = test.select(test_image="image_id", content_hash="content_hash").drop_nulls("content_hash")
    return left.join(right, on="content_hash", how="inner").select(
        "train_image", "test_image", similarity=pl.lit(1.0, pl.Float64)
    )


def _codes(hashes: pl.Series) -> np.ndarray:
    """UInt64 hashes as faiss binary codes (8 bytes a row; any fixed byte order keeps Hamming)."""
    values = hashes.cast(pl.UInt64).to_numpy().astype(np.uint64, copy=False)
    return np.ascontiguousarray(values.astype(">u8").view(np.uint8).reshape(-1, 8))


def hamming_pairs(
    train_hashes: np.ndarray, test_hashes: np.ndarray, max_hamming: int, chunk: int = QUERY_CHUNK
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train rows, test rows, distances) of every pair of 64-bit hashes within ``max_hamming``.

    A faiss ``IndexBinaryFlat`` range search: an exhaustive popcount scan that holds only
    the codes and each chunk's results, ~1.7e9 comparisons a second on this machine's 2
    cores (50k test x 1.28M train, ImageNet's size: ~40 s). faiss's multi-index hashing
    (``IndexBinaryMultiHash``, 6 tables of 10 bits for distance 5) measured barely faster
    (2.2 s against 2.7 s at 1M x 5k), so the exact scan is kept.
    """
    if not 0 <= max_hamming < HASH_BITS:
        raise ValueError(f"max_hamming must be in [0, {HASH_BITS}), got {max_hamming}")
    train_codes = _codes(pl.Series(train_hashes, dtype=pl.UInt64))
    test_codes = _codes(pl.Series(test_hashes, dtype=pl.UInt64))
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    if not len(train_codes) or not len(test_codes):
        return empty
    index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(train_codes)
    parts = []
    for start in range(0, len(test_codes), chunk):
        block = test_codes[start : start + chunk]
        # faiss keeps distances strictly below the radius
        lims, dist, ids = index.range_search(block, int(max_hamming) + 1)
        counts = np.diff(lims.astype(np.int64))
        queries = np.repeat(np.arange(start, start + len(block), dtype=np.int64), counts)
        parts.append((ids.astype(np.int64), queries, dist.astype(np.int64)))
    if not parts:
        return empty
    rows_a, rows_b, dist = (np.concatenate(p) for p in zip(*parts, strict=True))
    return rows_a, rows_b, dist


def _perceptual_pairs(train: pl.DataFrame, test: pl.DataFrame, max_hamming: int) -> pl.DataFrame:
    left = train.select("image_id", "phash").drop_nulls("phash")
    right = test.select("image_id", "phash").drop_nulls("phash")
    a, b, dist = hamming_pairs(left["phash"].to_numpy(), right["phash"].to_numpy(), max_hamming)
    return pl.DataFrame(
        {
            "train_image": left["image_id"].gather(a),
            "test_image": right["image_id"].gather(b),
            "similarity": 1.0 - dist.astype(np.float64) / HASH_BITS,
        }
    )


def semantic_pairs(
    train_vectors: np.ndarray,
    test_vectors: np.ndarray,
    min_similarity: float,
    *,
    index_kind: str = "auto",
    use_gpu: bool = False,
    seed: int = 0,
    max_neighbours: int = 100,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train rows, test rows, cosine) of every cross pair with cosine >= ``min_similarity``.

    One vector index holds train then test (L2-normalised, not centred: the threshold is
    a plain cosine), and :func:`find_pairs` searches from the test rows only, so the
    cost is that of the test split against the whole (exact ``flat`` up to 65k vectors
    on the CPU, IVF above; the GPU when asked). Pairs within the test split are dropped.
    Scores are exact (float64 re-scoring). A test image with more than ``max_neighbours``
    train neighbours in range keeps its closest ones (find_pairs warns).
    """
    if not 0.0 < min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be in (0, 1], got {min_similarity}")
    n_train, n_test = len(train_vectors), len(test_vectors)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if not n_train or not n_test:
        return empty
    if train_vectors.ndim != 2 or test_vectors.ndim != 2 or train_vectors.shape[1] != test_vectors.shape[1]:
        raise ValueError(
            f"train and test vectors must be 2-d of one width, got {train_vectors.shape} "
            f"and {test_vectors.shape}"
        )
    dim = train_vectors.shape[1]
    zero = np.zeros(dim, np.float32)
    combined = np.concatenate([prepare(train_vectors, zero), prepare(test_vectors, zero)])
    index = VectorIndex.build(index_kind, combined, seed=seed, use_gpu=use_gpu)
    rows = np.arange(n_train, n_train + n_test, dtype=np.int64)
    # the distance threshold of find_pairs is cosine distance; a hair of slack for float rounding
    lo, hi, distance = find_pairs(
        index,
        None,
        rows,
        max_distance=min(1.0 - min_similarity + 1e-9, 1.999),
        all_vectors=combined,
        max_neighbours=max_neighbours,
    )
    cross = (lo < n_train) & (hi >= n_train)  # lo < hi, so train is always lo
    similarity = 1.0 - distance[cross].astype(np.float64)
    keep = similarity >= min_similarity - 1e-6
    return lo[cross][keep], hi[cross][keep] - n_train, similarity[keep]


def _vectors_of(frame: pl.DataFrame, vectors: np.ndarray | None, what: str) -> np.ndarray:
    if vectors is None:
        raise ValueError(f"the semantic method needs {what}_vectors (row-aligned with the {what} frame)")
    if len(vectors) != frame.height:
        raise ValueError(f"{what}_vectors has {len(vectors)} rows, the {what} frame {frame.height}")
    return vectors


def find_leaks(
    train: pl.DataFrame,
    test: pl.DataFrame,
    *,
    train_vectors: np.ndarray | None = None,
    test_vectors: np.ndarray | None = None,
    methods: Sequence[str] = METHODS,
    max_hamming: int = DEFAULT_MAX_HAMMING,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    train_split: str = "train",
    test_split: str = "test",
    index_kind: str = "auto",
    use_gpu: bool = False,
    seed: int = 0,
) -> pl.DataFrame:
    """Every (train image, test image) pair that a method calls a copy, one row per method.

    ``train`` and ``test`` need ``image_id`` plus ``content_hash`` (exact) and ``phash``
    (perceptual, UInt64; null hashes take no part); ``train_vectors``/``test_vectors``
    (semantic) are row-aligned with the frames. Columns: see ``LEAKS_SCHEMA``;
    ``similarity`` is 1.0 for exact, ``1 - hamming / 64`` for perceptual and the cosine
    for semantic; ``hamming_distance`` is filled wherever both hashes are known (so a
    semantic pair also says how far its hashes are); ``leak_type`` names the strongest
    method that found the pair (see the module docstring on how pairs are deduplicated).
    Sorted by test image, train image, method strength.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown leak method(s) {unknown or list(methods)}; allowed: {list(METHODS)}")
    needed = ["image_id"]
    needed += ["content_hash"] if "exact" in methods else []
    needed += ["phash"] if "perceptual" in methods else []
    _require(train, needed, train_split)
    _require(test, needed, test_split)
    found: list[pl.DataFrame] = []
    if "exact" in methods:
        found.append(_exact_pairs(train, test).with_columns(method=pl.lit("exact")))
    if "perceptual" in methods:
        found.append(_perceptual_pairs(train, test, max_hamming).with_columns(method=pl.lit("perceptual")))
    if "semantic" in methods:
        a, b, sim = semantic_pairs(
            _vectors_of(train, train_vectors, "train"),
            _vectors_of(test, test_vectors, "test"),
            min_similarity,
            index_kind=index_kind,
            use_gpu=use_gpu,
            seed=seed,
        )
        found.append(
            pl.DataFrame(
                {
                    "train_image": train["image_id"].gather(a),
                    "test_image": test["image_id"].gather(b),
                    "similarity": sim,
                    "method": pl.Series([], dtype=pl.String).extend_constant("semantic", len(a)),
                }
            )
        )
    columns = ("train_image", "test_image", pl.col("similarity").cast(pl.Float64), "method")
    pairs = pl.concat([f.select(*columns) for f in found])
    pairs = pairs.unique(["train_image", "test_image", "method"], keep="first")
    return _finish(pairs, train, test, train_split, test_split)


def _finish(
    pairs: pl.DataFrame, train: pl.DataFrame, test: pl.DataFrame, train_split: str, test_split: str
) -> pl.DataFrame:
    strength = {m: i for i, m in enumerate(METHODS)}
    pairs = pairs.with_columns(rank=pl.col("method").replace_strict(strength, return_dtype=pl.Int64))
    pairs = pairs.with_columns(
        leak_type=pl.col("method")
        .sort_by("rank")
        .first()
        .over("train_image", "test_image")
        .replace_strict(LEAK_TYPES, return_dtype=pl.String)
    )
    if "phash" in train.columns and "phash" in test.columns:
        hashes_a = train.select(train_image="image_id", phash_a=pl.col("phash").cast(pl.UInt64))
        hashes_b = test.select(test_image="image_id", phash_b=pl.col("phash").cast(pl.UInt64))
        pairs = (
            pairs.join(hashes_a.unique("train_image"), on="train_image", how="left")
            .join(hashes_b.unique("test_image"), on="test_image", how="left")
            .with_columns(
                hamming_distance=(pl.col("phash_a") ^ pl.col("phash_b")).bitwise_count_ones().cast(pl.Int64)
            )
        )
    else:
        pairs = pairs.with_columns(hamming_distance=pl.lit(None, pl.Int64))
    return (
        pairs.sort("test_image", "train_image", "rank")
        .with_columns(train_split=pl.lit(train_split), test_split=pl.lit(test_split))
        .select(list(LEAKS_SCHEMA))
        .cast(LEAKS_SCHEMA)  # type: ignore[arg-type]
    )


def split_pairs(splits: Sequence[str]) -> list[tuple[str, str]]:
    """Every (earlier, later) pair of splits: train before val before test, others by name.

    The earlier split plays "train" (what a model learned from), the later one "test".
    """
    order = {name: i for i, name in enumerate(SPLIT_PRECEDENCE)}
    ranked = sorted(set(splits), key=lambda s: (order.get(s, len(order)), s))
    return [(ranked[i], ranked[j]) for i in range(len(ranked)) for j in range(i + 1, len(ranked))]


def leak_summary(leaks: pl.DataFrame, n_test: int) -> dict[str, Any]:
    """Counts for metadata: pairs and test images affected, per method and overall.

    ``n_test`` is the number of images of the test side (all test splits together when
    ``leaks`` covers several split pairs); percentages are of that number.
    """
    if n_test < 0:
        raise ValueError(f"n_test must be >= 0, got {n_test}")

    def percent(count: int) -> float:
        return round(100.0 * count / n_test, 3) if n_test else 0.0

    by_method: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        rows = leaks.filter(pl.col("method") == method)
        images = rows["test_image"].n_unique() if rows.height else 0
        by_method[method] = {
            "pairs": rows.height,
            "test_images": images,
            "percent_test": percent(images),
        }
    affected = leaks["test_image"].n_unique() if leaks.height else 0
    split_counts: dict[str, int] = {}
    if leaks.height and {"train_split", "test_split"} <= set(leaks.columns):
        grouped = leaks.group_by("train_split", "test_split").agg(pl.col("test_image").n_unique())
        for row in grouped.sort("train_split", "test_split").iter_rows(named=True):
            split_counts[f"{row['train_split']}->{row['test_split']}"] = int(row["test_image"])
    return {
        "n_test": n_test,
        "pairs": leaks.height,
        "unique_pairs": leaks.select("train_image", "test_image").n_unique() if leaks.height else 0,
        "test_images_affected": affected,
        "percent_test_affected": percent(affected),
        "by_method": by_method,
        "test_images_by_split_pair": split_counts,
    }


__all__ = [
    "DEFAULT_MAX_HAMMING",
    "DEFAULT_MIN_SIMILARITY",
    "HASHES_SCHEMA",
    "LEAKS_SCHEMA",
    "LEAK_TYPES",
    "METHODS",
    "find_leaks",
    "hamming_distance",
    "hamming_pairs",
    "hash_images",
    "leak_summary",
    "perceptual_hash",
    "semantic_pairs",
    "split_pairs",
]
