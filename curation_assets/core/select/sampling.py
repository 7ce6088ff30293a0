"""Balanced hierarchical sampling to an exact budget (Vo et al. 2024), and balance measures.

:func:`hierarchical_sample` walks a :class:`~curation_assets.core.select.kmeans.Hierarchy` top-down.
The budget is split across the top-level clusters by water-filling (:func:`water_fill`):
every cluster gets the same share unless it has fewer points, and what small clusters
cannot take goes to the larger ones. Each cluster's share is split across its children
the same way, down to the level-1 clusters, which give their share in points: ``random``
members (default) or the ``closest`` to their centroid. A skewed pool thus comes out as
even across concepts as its sizes allow, and exactly ``budget`` long.

:func:`combined_sample` joins a retrieval selection (images chosen for being near a seed set)
with the balanced sample: the selection's best first up to its share of the budget, the
balanced sample drawn from the other images for the rest, so the union is exactly the budget
and never holds an image twice.

With ``multiplier`` m > 1 a cluster of s points can give up to m x s (a point is taken
more than once, the whole cluster as evenly as possible: each member q or q + 1 times).

Pure library: no Dagster import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # kmeans imports torch and scipy; sampling needs only the type (issue 12)
    from curation_assets.core.select.kmeans import Hierarchy

STRATEGIES = ("random", "closest")


def water_fill(sizes: np.ndarray, budget: int, rng: np.random.Generator, multiplier: int = 1) -> np.ndarray:
    """Split ``budget`` across children of the given sizes: (per-child allocation, int64).

    Each child gets ``min(c, cap_i)`` with ``cap_i = size_i x multiplier`` and c the largest
    integer level that fits in the budget; the remainder (fewer than the children with room
    above c) goes +1 to children drawn at random among those. The allocation sums to the
    budget, or to the sum of the caps when the budget exceeds it.
    ``water_fill([1000, 100, 10], 300, rng) -> [190, 100, 10]``.
    """
    caps = np.asarray(sizes, dtype=np.int64).reshape(-1)
    if (caps < 0).any():
        raise ValueError("sizes must be non-negative")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if multiplier < 1:
        raise ValueError(f"multiplier must be >= 1, got {multiplier}")
    caps = caps * int(multiplier)
    if budget >= caps.sum():
        return caps.copy()
    # sum(min(c, cap)) is piecewise linear in c with kinks at the sorted caps: find the
    # first cap where it overshoots, then solve the linear piece below it
    ordered = np.sort(caps)
    below = np.concatenate([[0], np.cumsum(ordered)])  # below[j]: sum of the j smallest caps
    remaining = len(ordered) - np.arange(len(ordered))
    at_cap = below[:-1] + ordered * remaining  # sum(min(ordered[j], cap)) for each j
    j = int(np.searchsorted(at_cap, budget, side="right"))
    level = (budget - below[j]) // remaining[j]
    allocation = np.minimum(caps, level)
    rest = int(budget - allocation.sum())
    if rest:
        room = np.flatnonzero(caps > level)
        allocation[rng.choice(room, rest, replace=False)] += 1
    return allocation


def _points_per_cluster(hierarchy: Hierarchy, available: np.ndarray | None = None) -> list[np.ndarray]:
    """For each level, the number of (available) points under each of its clusters."""
    leaf = hierarchy.levels[0].assignment
    if available is not None:
        leaf = leaf[available]
    counts = [np.bincount(leaf, minlength=len(hierarchy.levels[0].centroids))]
    for level in hierarchy.levels[1:]:
        counts.append(
            np.bincount(level.assignment, weights=counts[-1], minlength=len(level.centroids)).astype(np.int64)
        )
    return counts


def _split_down(
    parent_quota: np.ndarray, parent_of: np.ndarray, child_sizes: np.ndarray, rng, multiplier: int
) -> np.ndarray:
    """Each parent's quota water-filled across its children."""
    quota = np.zeros(len(parent_of), dtype=np.int64)
    order = np.argsort(parent_of, kind="stable")
    bounds = np.searchsorted(parent_of[order], np.arange(len(parent_quota) + 1))
    for parent in np.flatnonzero(parent_quota).tolist():  # fixed order: the draws are reproducible
        children = order[bounds[parent] : bounds[parent + 1]]
        quota[children] = water_fill(child_sizes[children], int(parent_quota[parent]), rng, multiplier)
    return quota


def hierarchical_sample(
    hierarchy: Hierarchy,
    budget: int,
    *,
    strategy: str = "random",
    seed: int = 0,
    multiplier: int = 1,
    warn: Callable[[str], None] | None = None,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted point indices, exactly ``budget`` of them (repeats only with ``multiplier`` > 1).

    A budget of at least the pool (points x multiplier) keeps everything (each point
    ``multiplier`` times) and calls ``warn``. ``exclude``: indices of points already chosen
    elsewhere (retrieval); they are never drawn, and the budget is water-filled over the
    clusters as if they were not there.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if int(budget) != budget or budget < 0:
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    if int(multiplier) != multiplier or multiplier < 1:
        raise ValueError(f"multiplier must be an integer >= 1, got {multiplier!r}")
    budget, multiplier = int(budget), int(multiplier)
    leaf = hierarchy.levels[0].assignment
    n = len(leaf)
    available = np.ones(n, dtype=bool)
    if exclude is not None:
        available[np.asarray(exclude, dtype=np.int64)] = False
    left = int(available.sum())
    if budget >= left * multiplier:
        if warn is not None:
            warn(
                f"budget {budget} >= pool of {left} points x multiplier {multiplier}: "
                f"keeping everything ({left * multiplier} samples)"
            )
        return np.repeat(np.flatnonzero(available).astype(np.int64), multiplier)

    rng = np.random.default_rng(seed)
    counts = _points_per_cluster(hierarchy, None if exclude is None else available)
    quota = water_fill(counts[-1], budget, rng, multiplier)
    for t in range(len(hierarchy.levels) - 1, 0, -1):
        quota = _split_down(quota, hierarchy.levels[t].assignment, counts[t - 1], rng, multiplier)

    # leaves: members ranked by a random key or by distance to their centroid (ties by index)
    key = rng.random(n) if strategy == "random" else hierarchy.point_distances()
    order = np.lexsort((np.arange(n), key, leaf))
    order = order[available[order]]  # excluded points take no rank in their leaf
    sizes = counts[0]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    labels = leaf[order]
    rank = np.arange(len(order)) - starts[labels]
    whole, part = np.divmod(quota[labels], np.maximum(sizes[labels], 1))
    times = whole + (rank < part)  # each member q or q + 1 times, the first-ranked ones q + 1
    return np.sort(np.repeat(order, times))


def normalized_entropy(counts: np.ndarray) -> float:
    """Entropy of the distribution ``counts`` divided by ln(number of categories): 1 when even.

    One category counts as even (1.0); no samples at all give 0.0.
    """
    values = np.asarray(counts, dtype=np.float64).reshape(-1)
    if len(values) <= 1:
        return 1.0
    total = values.sum()
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(-(p * np.log(p)).sum() / np.log(len(values)))


def gini(sizes: np.ndarray) -> float:
    """Gini coefficient of the sizes: 0 when all equal, towards 1 when one holds everything."""
    values = np.sort(np.asarray(sizes, dtype=np.float64).reshape(-1))
    total = values.sum()
    if len(values) == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, len(values) + 1)
    return float(2.0 * (ranks * values).sum() / (len(values) * total) - (len(values) + 1) / len(values))


def retrieval_quota(budget: int, share: float) -> int:
    """The part of ``budget`` reserved for retrieval: floor(share x budget)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"retrieval share must be in [0, 1], got {share}")
    return int(np.floor(budget * share + 1e-9))


def combined_sample(
    hierarchy: Hierarchy,
    retrieved: np.ndarray,
    budget: int,
    share: float,
    *,
    strategy: str = "random",
    seed: int = 0,
    multiplier: int = 1,
    warn: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(point indices of the retrieval part, point indices of the balanced part).

    ``retrieved``: point indices of the retrieval selection, best first (no repeats). Its first
    ``floor(share x budget)`` are taken; what retrieval leaves of its share goes to the balanced
    part, which is drawn (:func:`hierarchical_sample`) from the points not taken so that the two
    parts together are exactly ``budget`` (or every point, when the pool is smaller).
    """
    retrieved = np.asarray(retrieved, dtype=np.int64)
    if len(np.unique(retrieved)) != len(retrieved):
        raise ValueError("the retrieval selection names a point twice")
    taken = retrieved[: min(retrieval_quota(budget, share), budget)]
    balanced = hierarchical_sample(
        hierarchy,
        budget - len(taken),
        strategy=strategy,
        seed=seed,
        multiplier=multiplier,
        warn=warn,
        exclude=taken,
    )
    return taken, balanced
