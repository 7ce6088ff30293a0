"""Balanced hierarchical sampling (core/sampling): water-filling, exact budgets, the five-rings toy."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from curation_assets.core.select.kmeans import Hierarchy, Level, LevelResult, hierarchical_kmeans
from curation_assets.core.select.sampling import gini, hierarchical_sample, normalized_entropy, water_fill


def test_water_fill_reference_case():
    rng = np.random.default_rng(0)
    assert water_fill(np.array([1000, 100, 10]), 300, rng).tolist() == [190, 100, 10]


def test_water_fill_properties_over_random_sizes():
    rng = np.random.default_rng(42)
    for _ in range(300):
        sizes = rng.integers(0, 60, size=rng.integers(1, 12))
        sizes[rng.random(len(sizes)) < 0.3] = 0  # empty children too
        multiplier = int(rng.integers(1, 4))
        caps = sizes * multiplier
        budget = int(rng.integers(0, caps.sum() + 20))
        got = water_fill(sizes, budget, rng, multiplier)
        assert got.dtype == np.int64 and got.shape == sizes.shape
        assert got.sum() == min(budget, caps.sum())
        assert np.all(got >= 0) and np.all(got <= caps)
        # max-min fair: a child still below its cap is within one of the largest share
        below = got < caps
        if below.any():
            assert got[below].min() >= got.max() - 1


def test_water_fill_remainder_goes_to_random_children_with_room():
    outcomes = set()
    for seed in range(20):
        got = water_fill(np.array([2, 9, 9, 9]), 12, np.random.default_rng(seed))
        # level 3 for the three big children (2 + 3 * 3 = 11), one more to one of them
        assert got[0] == 2 and sorted(got[1:].tolist()) == [3, 3, 4]
        outcomes.add(tuple(got.tolist()))
    assert len(outcomes) > 1  # the +1 is drawn, not always the same child
    again = water_fill(np.array([2, 9, 9, 9]), 12, np.random.default_rng(7))
    assert again.tolist() == water_fill(np.array([2, 9, 9, 9]), 12, np.random.default_rng(7)).tolist()


def test_water_fill_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="non-negative"):
        water_fill(np.array([3, -1]), 2, rng)
    with pytest.raises(ValueError, match="budget"):
        water_fill(np.array([3, 1]), -2, rng)


def toy_hierarchy() -> Hierarchy:
    """Hand-made 2-level hierarchy: 10 points, 4 leaf clusters, 2 top clusters.

    leaf 0: points 0-5 (6), leaf 1: 6-7 (2), leaf 2: 8 (1), leaf 3: 9 (1);
    top 0 = leaves {0, 1} (8 points), top 1 = leaves {2, 3} (2 points).
    """
    leaf = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 3])
    distances = np.array([0.5, 0.1, 0.4, 0.2, 0.3, 0.6, 0.2, 0.1, 0.0, 0.0], dtype=np.float32)
    level1 = LevelResult(
        centroids=np.zeros((4, 2), np.float32),
        assignment=leaf,
        sizes=np.bincount(leaf),
        distances=distances,
    )
    level2 = LevelResult(
        centroids=np.zeros((2, 2), np.float32),
        assignment=np.array([0, 0, 1, 1]),
        sizes=np.array([2, 2]),
        distances=np.zeros(4, np.float32),
    )
    return Hierarchy(levels=[level1, level2], metric="l2")


def test_hierarchical_sample_exact_budget_and_balance():
    hierarchy = toy_hierarchy()
    leaf = hierarchy.levels[0].assignment
    for seed in range(10):
        picked = hierarchical_sample(hierarchy, 6, seed=seed)
        assert len(picked) == 6 and len(np.unique(picked)) == 6
        # top clusters 8 and 2 points, budget 6: the small one gives all 2, the big one 4;
        # inside the big one leaves of 6 and 2 points: 2 each is the level, so 2 + 2
        counts = np.bincount(leaf[picked], minlength=4)
        assert counts.tolist() == [2, 2, 1, 1]


def test_hierarchical_sample_closest_strategy_takes_nearest_members():
    picked = hierarchical_sample(toy_hierarchy(), 6, strategy="closest")
    # leaf 0 gives its 2 closest members (distances 0.1 and 0.2: points 1 and 3)
    assert picked.tolist() == [1, 3, 6, 7, 8, 9]


def test_hierarchical_sample_seed_changes_random_members_only():
    hierarchy = toy_hierarchy()
    runs = {tuple(hierarchical_sample(hierarchy, 6, seed=s).tolist()) for s in range(10)}
    assert len(runs) > 1
    assert (
        hierarchical_sample(hierarchy, 6, seed=3).tolist()
        == hierarchical_sample(hierarchy, 6, seed=3).tolist()
    )


def test_hierarchical_sample_multiplier_allows_repeats():
    hierarchy = toy_hierarchy()
    picked = hierarchical_sample(hierarchy, 16, multiplier=2, seed=0)
    assert len(picked) == 16
    times = np.bincount(picked, minlength=10)
    assert times.max() <= 2
    # the small top cluster gives its cap (2 points x 2 = 4), the big one the other 12
    assert times[8:].sum() == 4 and times[:8].sum() == 12


def test_budget_over_the_pool_keeps_everything_and_warns():
    warnings: list[str] = []
    picked = hierarchical_sample(toy_hierarchy(), 50, warn=warnings.append)
    assert picked.tolist() == list(range(10))
    assert len(warnings) == 1 and "keeping everything" in warnings[0]
    doubled = hierarchical_sample(toy_hierarchy(), 25, multiplier=2, warn=warnings.append)
    assert np.bincount(doubled).tolist() == [2] * 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": -1}, "budget"),
        ({"budget": 3, "strategy": "best"}, "strategy"),
        ({"budget": 3, "multiplier": 0}, "multiplier"),
    ],
)
def test_hierarchical_sample_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hierarchical_sample(toy_hierarchy(), **kwargs)


def test_normalized_entropy_and_gini():
    assert normalized_entropy([5, 5, 5, 5]) == pytest.approx(1.0)
    assert normalized_entropy([10, 0, 0, 0]) == pytest.approx(0.0)
    assert 0.0 < normalized_entropy([8, 1, 1]) < 1.0
    assert gini([3, 3, 3]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 12]) == pytest.approx(0.75)  # (n - 1) / n when one holds everything
    assert gini([1, 2, 3, 4]) == pytest.approx(0.25)


# ----------------------------------------------------------------------------- five rings (Vo et al.)

RING_SIZES = (20000, 200, 1000, 500, 8000)
RING_CENTRES = ((-2.2, 1.0), (0.0, 1.0), (2.2, 1.0), (-1.2, 0.2), (1.2, 0.2))


def five_rings(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The toy of Vo et al. 2024: five rings of very different sizes, radius uniform in [0.7, 1]."""
    rng = np.random.default_rng(seed)
    points, labels = [], []
    for ring, (size, centre) in enumerate(zip(RING_SIZES, RING_CENTRES, strict=True)):
        radius = rng.uniform(0.7, 1.0, size)
        angle = rng.uniform(0.0, 2 * np.pi, size)
        points.append(np.c_[centre[0] + radius * np.cos(angle), centre[1] + radius * np.sin(angle)])
        labels.append(np.full(size, ring))
    return np.concatenate(points).astype(np.float32), np.concatenate(labels)


# 10 Lloyd iterations per k-means keep the test fast; the balance comes from the resampling
RING_OPTIONS = {"metric": "l2", "max_iters": 10}


def sample_histogram(seed: int, levels: list[Level], n_resamples: int) -> np.ndarray:
    """Samples per ring of a budget of 1000, after checking the sample is exact and unique."""
    x, ring = five_rings(seed)
    hierarchy = hierarchical_kmeans(x, levels, n_resamples=n_resamples, seed=seed, **RING_OPTIONS)
    picked = hierarchical_sample(hierarchy, 1000, seed=seed)
    assert len(picked) == 1000 and len(np.unique(picked)) == 1000
    return np.bincount(ring[picked], minlength=5)


@cache
def balanced_histogram(seed: int) -> np.ndarray:
    """Hierarchical k-means with resampling as in the paper: levels [1000, 300], r = [15, 2]."""
    return sample_histogram(seed, [Level(1000, 15), Level(300, 2)], n_resamples=10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_five_rings_sample_is_balanced(seed):
    balanced = balanced_histogram(seed)
    assert balanced.max() / balanced.min() <= 4.0, balanced
    assert balanced[1] >= 70, balanced  # the 200-point ring
    assert normalized_entropy(balanced) >= 0.95, balanced


def test_plain_kmeans_sampling_is_clearly_worse_on_five_rings():
    balanced = balanced_histogram(0)
    plain = sample_histogram(0, [Level(1000, 0)], n_resamples=0)
    # k-means centroids follow density^(d/(d+2)): the 20000-point ring takes about half
    assert plain.max() / plain.min() > 2 * balanced.max() / balanced.min(), (plain, balanced)
    assert plain[1] < 0.6 * balanced[1], (plain, balanced)
    assert normalized_entropy(plain) < normalized_entropy(balanced) - 0.1, (plain, balanced)
