"""The IVF coarse quantizer: centroid training, and each row's nearest lists with their gaps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curation_assets.core.dedup.quantizer import argmax_rows, top_lists, train_centroids


def _bf16(scores: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(scores).to(torch.bfloat16)


def test_argmax_is_each_rows_highest_score_even_where_every_score_is_negative():
    """bfloat16 bit patterns read as int16 order like the scores only where the best is
    positive: rows whose every score is negative are decided in float32 (their arg-max is the
    least negative score, not the largest bit pattern)."""
    rng = np.random.default_rng(2)
    scores = rng.uniform(-1.0, 1.0, (500, 40)).astype(np.float32)
    scores[:200] = -np.abs(scores[:200])
    tensor = _bf16(scores)
    cols, values = argmax_rows(tensor)
    rounded = tensor.float().numpy()
    np.testing.assert_array_equal(cols, rounded.argmax(axis=1))
    np.testing.assert_array_equal(values, rounded.max(axis=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_top_lists_are_the_best_scores_best_first_with_their_gaps(dtype):
    rng = np.random.default_rng(3)
    scores = rng.uniform(-0.2, 1.0, (300, 100)).astype(np.float32)
    scores[:40] = -np.abs(scores[:40])  # rows with fewer positive scores than nprobe
    scores[40:60, :30] = 0.5  # ties
    tensor = torch.from_numpy(scores).to(dtype)
    rounded = tensor.float().numpy()
    lists, gaps = top_lists(tensor, 8)
    assert lists.shape == gaps.shape == (300, 8) and lists.dtype == np.int32
    picked = np.take_along_axis(rounded, lists.astype(np.int64), axis=1)
    expected = -np.sort(-rounded, axis=1)[:, :8]
    np.testing.assert_array_equal(picked, expected)  # the 8 best, best first
    assert all(len(set(row)) == 8 for row in lists.tolist())  # no column twice
    np.testing.assert_allclose(gaps.astype(np.float32), picked[:, :1] - picked, atol=1e-3)
    if dtype == torch.bfloat16:  # equal scores: lowest columns first
        tied = rounded[40:60].max(axis=1) == 0.5
        assert np.array_equal(lists[40:60][tied, 0], np.zeros(int(tied.sum()), np.int32)) or not tied.any()
    single, zero = top_lists(tensor, 1)
    np.testing.assert_array_equal(single[:, 0], rounded.argmax(axis=1))
    assert not zero.any()


def test_trained_centroids_find_the_clusters_are_seeded_and_skip_zero_rows():
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((16, 64)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, 16, 4000)] + 0.05 * rng.standard_normal((4000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[:50] = 0.0  # rows prepare() left zero: no direction
    for bf16 in (True, False):
        centroids = train_centroids(x, 32, 10, seed=1, bf16=bf16)
        assert centroids.shape == (32, 64) and centroids.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
        assert (centres @ centroids.T).max(axis=1).min() > 0.99  # every cluster has a centroid
        np.testing.assert_array_equal(centroids, train_centroids(x, 32, 10, seed=1, bf16=bf16))
    assert not np.array_equal(train_centroids(x, 32, 10, seed=2, bf16=True), centroids)
    assert train_centroids(x[:60], 32, 10, seed=1, bf16=True) is None  # 10 usable rows, 32 lists
