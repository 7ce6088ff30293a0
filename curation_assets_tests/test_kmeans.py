"""k-means and hierarchical k-means with resampling (core/kmeans): correctness, determinism, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from curation_assets.core.select import kmeans as kmeans_module
from curation_assets.core.select.kmeans import Hierarchy, Level, assign, hierarchical_kmeans, kmeans


def blobs(
    sizes: list[int], dim: int, seed: int, spread: float = 0.05, unit: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Points around random centres (unit directions when ``unit``), with their blob label."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim))
    if unit:
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    else:
        centres *= 4.0
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[labels] + spread * rng.standard_normal((len(labels), dim))
    order = rng.permutation(len(labels))
    return x[order].astype(np.float32), labels[order]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the two labelings group the points identically (up to renaming)."""
    pairs = np.unique(np.stack([a, b]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_kmeans_recovers_separated_blobs_cosine():
    x, labels = blobs([300, 120, 60, 20], dim=32, seed=1)
    result = kmeans(x, 4, seed=0)
    assert same_partition(result.assignment, labels)
    assert sorted(result.sizes.tolist()) == [20, 60, 120, 300]
    assert result.centroids.shape == (4, 32) and result.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    # distances are 1 - cos to the own centroid, and the inertia is their sum
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    own = 1.0 - np.einsum("ij,ij->i", xn, result.centroids[result.assignment])
    np.testing.assert_allclose(result.distances, own, atol=1e-5)
    assert result.inertia == pytest.approx(float(own.sum()), rel=1e-4)


def test_kmeans_l2_low_dimensional_matches_brute_force_assignment():
    x, labels = blobs([400, 50, 50], dim=2, seed=3, spread=0.3, unit=False)
    result = kmeans(x, 3, metric="l2", seed=0)
    assert same_partition(result.assignment, labels)
    squared = ((x[:, None, :] - result.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(result.assignment, squared.argmin(1))
    np.testing.assert_allclose(result.distances, squared.min(1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dim", [3, 24])
def test_greedy_kmeanspp_finds_small_far_groups(dim):
    # uniform seeding would almost never pick a centre in both 5-point groups; D^2 seeding does
    x, labels = blobs([2000, 5, 5], dim=dim, seed=dim, spread=0.02, unit=False)
    for seed in range(3):
        result = kmeans(x, 3, metric="l2", seed=seed, max_iters=1)
        assert same_partition(result.assignment, labels)


def test_same_seed_same_result_and_seed_matters():
    x, _ = blobs([50] * 12, dim=16, seed=5, spread=0.6)
    a = kmeans(x, 8, seed=11)
    b = kmeans(x, 8, seed=11)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.assignment, b.assignment)
    c = kmeans(x, 8, seed=12)
    assert not np.array_equal(a.centroids, c.centroids)


@pytest.mark.parametrize("dim", [2, 16])
def test_chunked_streaming_equals_unchunked(dim):
    x, _ = blobs([80, 60, 40, 20], dim=dim, seed=7, spread=0.4)
    whole = kmeans(x, 6, seed=2, chunk_size=65536)
    streamed = kmeans(x, 6, seed=2, chunk_size=37, max_cache_bytes=0)  # 37-row chunks, never cached
    np.testing.assert_array_equal(whole.assignment, streamed.assignment)
    np.testing.assert_allclose(whole.centroids, streamed.centroids, atol=1e-6)
    np.testing.assert_allclose(whole.distances, streamed.distances, atol=1e-6)
    assert whole.iterations == streamed.iterations


def test_backends_agree_on_separated_data():
    x, labels = blobs([200, 100, 50, 25], dim=6, seed=9, spread=0.05)
    results = {backend: kmeans(x, 4, seed=0, backend=backend) for backend in ("torch", "faiss", "kdtree")}
    reference = results["torch"]
    assert same_partition(reference.assignment, labels)
    for backend, result in results.items():
        np.testing.assert_array_equal(result.assignment, reference.assignment, err_msg=backend)
        np.testing.assert_allclose(result.centroids, reference.centroids, atol=1e-5, err_msg=backend)
        np.testing.assert_allclose(result.distances, reference.distances, atol=1e-5, err_msg=backend)


@pytest.mark.parametrize(
    ("dim", "metric", "backend"), [(2, "l2", "auto"), (16, "cosine", "torch"), (16, "l2", "torch")]
)
def test_torch_code_path_matches_numpy(monkeypatch, dim, metric, backend):
    # the CUDA code path (torch arrays) run on the CPU: same clustering as the numpy path
    x, labels = blobs([120, 60, 30, 15], dim=dim, seed=8, spread=0.2, unit=False)
    options = {"n_resamples": 2, "metric": metric, "seed": 1, "backend": backend}
    reference = hierarchical_kmeans(x, [Level(12, 3), Level(4)], **options)
    monkeypatch.setattr(kmeans_module, "_TORCH_ON_CPU", True)
    on_torch = hierarchical_kmeans(x, [Level(12, 3), Level(4)], **options)
    streamed = kmeans(x, 4, metric=metric, seed=2, backend=backend, chunk_size=50, max_cache_bytes=0)
    monkeypatch.setattr(kmeans_module, "_TORCH_ON_CPU", False)
    for got, want in zip(on_torch.levels, reference.levels, strict=True):
        np.testing.assert_array_equal(got.assignment, want.assignment)
        np.testing.assert_allclose(got.centroids, want.centroids, atol=1e-5)
        np.testing.assert_allclose(got.distances, want.distances, atol=1e-5)
    assert same_partition(streamed.assignment, labels)
    np.testing.assert_array_equal(streamed.assignment, kmeans(x, 4, metric=metric, seed=2).assignment)


def test_float16_memmap_input_is_streamed(tmp_path: Path):
    x, labels = blobs([150, 100, 50], dim=16, seed=4)
    path = tmp_path / "vectors.npy"
    np.save(path, x.astype(np.float16))
    mapped = np.load(path, mmap_mode="r")
    streamed = kmeans(mapped, 3, seed=1, chunk_size=64, max_cache_bytes=0)
    in_memory = kmeans(np.asarray(mapped, dtype=np.float32), 3, seed=1)
    assert same_partition(streamed.assignment, labels)
    np.testing.assert_array_equal(streamed.assignment, in_memory.assignment)
    np.testing.assert_allclose(streamed.centroids, in_memory.centroids, atol=1e-6)


def test_assign_is_the_nearest_centroid():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12)).astype(np.float32)
    centroids = rng.standard_normal((7, 12)).astype(np.float32)
    nearest, distance = assign(x, centroids, metric="l2", chunk_size=50)
    squared = ((x[:, None] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(nearest, squared.argmin(1))
    np.testing.assert_allclose(distance, squared.min(1), rtol=1e-4)
    nearest_cos, distance_cos = assign(x, centroids, metric="cosine")
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cn = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    np.testing.assert_array_equal(nearest_cos, (xn @ cn.T).argmax(1))
    np.testing.assert_allclose(distance_cos, 1 - (xn @ cn.T).max(1), atol=1e-5)


def test_fewer_distinct_points_than_clusters_is_handled():
    # 3 distinct points, 5 clusters: extra centres duplicate points, clusters go empty and are
    # re-seeded; the result must still be complete, exact and reproducible
    x = np.repeat(np.eye(3, 8, dtype=np.float32), 10, axis=0)
    a = kmeans(x, 5, seed=0)
    b = kmeans(x, 5, seed=0)
    assert a.sizes.sum() == 30 and len(a.sizes) == 5
    assert np.all(a.distances < 1e-6)
    np.testing.assert_array_equal(a.assignment, b.assignment)


@pytest.mark.parametrize(
    ("x", "k", "message"),
    [
        (np.ones((5, 3), np.float32), 6, "k must be between"),
        (np.ones((5,), np.float32), 2, "2-D"),
        (np.array([[1, 2], [3, 4]]), 1, "floating-point"),
        (np.array([[1.0, np.nan], [1.0, 2.0]], np.float32), 1, "NaN"),
        (np.array([[1.0, 0.0], [0.0, 0.0]], np.float32), 1, "all-zero row"),
    ],
)
def test_bad_input_gets_a_clear_error(x, k, message):
    with pytest.raises(ValueError, match=message):
        kmeans(x, k)


def rings_like(seed: int) -> np.ndarray:
    x, _ = blobs([400, 200, 100, 40, 20, 10], dim=12, seed=seed, spread=0.15)
    return x


def test_hierarchy_levels_are_consistent():
    x = rings_like(0)
    hierarchy = hierarchical_kmeans(x, [Level(40, 4), Level(8, 2), Level(3)], n_resamples=2, seed=0)
    assert isinstance(hierarchy, Hierarchy) and len(hierarchy.levels) == 3
    clusters = hierarchy.point_clusters()
    assert clusters.shape == (len(x), 3) and clusters.dtype == np.int64
    for t, level in enumerate(hierarchy.levels):
        k = (40, 8, 3)[t]
        assert level.centroids.shape == (k, 12)
        assert level.sizes.sum() == (len(x) if t == 0 else (40, 8)[t - 1])
        assert np.array_equal(level.sizes, np.bincount(level.assignment, minlength=k))
    # a point's level-2 cluster is the level-2 cluster of its level-1 cluster's centroid
    assert np.array_equal(clusters[:, 1], hierarchy.levels[1].assignment[clusters[:, 0]])
    # each input sits with its nearest centroid at every level, at the reported distance
    inputs = x
    for level in hierarchy.levels:
        nearest, distance = assign(inputs, level.centroids, metric="cosine")
        np.testing.assert_array_equal(nearest, level.assignment)
        np.testing.assert_allclose(level.distances, distance, atol=1e-5)
        inputs = level.centroids
    assert np.array_equal(hierarchy.point_distances(), hierarchy.levels[0].distances)


def test_resampling_changes_centroids_and_stays_reproducible():
    x = rings_like(1)
    plain = hierarchical_kmeans(x, [Level(30, 0)], seed=3)
    resampled = hierarchical_kmeans(x, [Level(30, 3)], n_resamples=3, seed=3)
    again = hierarchical_kmeans(x, [Level(30, 3)], n_resamples=3, seed=3)
    assert resampled.levels[0].stats["resamples"] == 3 and plain.levels[0].stats["resamples"] == 0
    assert not np.array_equal(plain.levels[0].centroids, resampled.levels[0].centroids)
    np.testing.assert_array_equal(resampled.levels[0].centroids, again.levels[0].centroids)
    np.testing.assert_array_equal(resampled.point_clusters(), again.point_clusters())


class StopAtLevel2Error(RuntimeError):
    pass


def test_resume_after_interruption_gives_the_same_result(tmp_path: Path):
    x = rings_like(2)
    levels = [Level(30, 3), Level(6, 2)]
    options = {"n_resamples": 2, "seed": 4, "checkpoint_dir": tmp_path / "ckpt"}
    uninterrupted = hierarchical_kmeans(x, levels, n_resamples=2, seed=4)

    def stop_at_level_2(message: str) -> None:
        if message.startswith("level 2/2") and "clustering" in message:
            raise StopAtLevel2Error(message)

    with pytest.raises(StopAtLevel2Error):
        hierarchical_kmeans(x, levels, progress=stop_at_level_2, **options)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["level_1.npz"]

    messages: list[str] = []
    resumed = hierarchical_kmeans(x, levels, progress=messages.append, **options)
    assert any("level 1/2" in m and "loaded from checkpoint" in m for m in messages)
    assert not any(m.startswith("level 1/2") and "clustering" in m for m in messages)
    assert resumed.levels[0].stats.get("from_checkpoint") is True
    for got, want in zip(resumed.levels, uninterrupted.levels, strict=True):
        np.testing.assert_array_equal(got.centroids, want.centroids)
        np.testing.assert_array_equal(got.assignment, want.assignment)
    np.testing.assert_array_equal(resumed.point_clusters(), uninterrupted.point_clusters())

    # another seed or other data: the checkpoint does not match and is not used
    messages.clear()
    hierarchical_kmeans(x, levels, progress=messages.append, **{**options, "seed": 5})
    assert not any("loaded from checkpoint" in m for m in messages)
    messages.clear()
    hierarchical_kmeans(x[::-1].copy(), levels, progress=messages.append, **options)
    assert not any("loaded from checkpoint" in m for m in messages)


def test_progress_reports_rates():
    x = rings_like(3)
    messages: list[str] = []
    hierarchical_kmeans(x, [Level(20, 2), Level(4)], n_resamples=1, seed=0, progress=messages.append)
    assert any("points/s" in m and "iteration" in m for m in messages)
    assert any(m.startswith("level 2/2") and "done" in m for m in messages)


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ([], "levels is empty"),
        ([Level(1000, 0)], "only 770 points"),
        ([Level(10, 0), Level(20, 0)], "only 10 level 1 clusters"),
        ([Level(0, 0)], "n_clusters must be >= 1"),
    ],
)
def test_bad_levels_get_a_clear_error(levels, message):
    with pytest.raises(ValueError, match=message):
        hierarchical_kmeans(rings_like(0), levels)


# ----------------------------------------------------------------------------- bfloat16 screen


def _random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_bf16_screen_finds_the_float32_nearest_centroid():
    # random directions: many near-ties, the hard case for a rounded product
    x = _random_unit(3000, 256, seed=11)
    centroids = _random_unit(200, 256, seed=12)
    # rows whose best cosine is negative or tiny: no positive order, scored in float32
    x[:50] = -centroids[:50].sum(axis=0) / np.linalg.norm(centroids[:50].sum(axis=0))
    ops = kmeans_module._Ops(kmeans_module.torch.device("cpu"))
    plain = kmeans_module._Searcher(centroids, "cosine", "torch", ops)
    screen = kmeans_module._Screen(centroids)
    want_nearest, want_distance = plain(x)
    got_nearest, got_distance = screen(x, None)
    scores = x.astype(np.float64) @ centroids.T.astype(np.float64)
    best = scores.max(axis=1)
    chosen = scores[np.arange(len(x)), got_nearest]
    assert np.all(best - chosen <= 1e-6)  # the true best, or a float32 tie with it
    assert np.mean(got_nearest == want_nearest) > 0.999
    np.testing.assert_allclose(got_distance, want_distance, atol=1e-6)


def test_bf16_screen_leaves_kmeans_and_hierarchy_unchanged(monkeypatch):
    x = _random_unit(4000, 96, seed=13)
    x[:400] = x[400:800] + 0.02 * _random_unit(400, 96, seed=14)  # some tight pairs
    levels = [Level(64, 5), Level(8, 0)]
    runs = {}
    for screen in (False, True):
        monkeypatch.setattr(kmeans_module, "_SCREEN", screen)
        runs[screen] = (
            hierarchical_kmeans(x, levels, n_resamples=2, max_iters=8, seed=3),
            kmeans(x, 40, seed=4, max_iters=6, chunk_size=700, max_cache_bytes=0),  # streamed blocks
        )
    for got, want in zip(runs[True][0].levels, runs[False][0].levels, strict=True):
        np.testing.assert_array_equal(got.assignment, want.assignment)
        np.testing.assert_allclose(got.centroids, want.centroids, atol=1e-5)
        np.testing.assert_allclose(got.distances, want.distances, atol=1e-5)
    np.testing.assert_array_equal(runs[True][1].assignment, runs[False][1].assignment)


def test_random_init_is_seeded_and_checked():
    x, _ = blobs([200, 150, 100], dim=24, seed=15)
    first = kmeans(x, 3, seed=5, init="random")
    np.testing.assert_array_equal(first.assignment, kmeans(x, 3, seed=5, init="random").assignment)
    assert first.timings["init_s"] < 0.05
    with pytest.raises(ValueError, match="init must be one of"):
        kmeans(x, 3, init="forgy")
