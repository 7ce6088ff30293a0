"""Vector indexes and near-duplicate pairs: exactness, recall, incremental use, persistence, caps."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from curation_assets.core.dedup.index import (
    CPU_FLAT_MAX,
    VectorIndex,
    choose_kind,
    dataset_mean,
    default_nlist,
    find_pairs,
    prepare,
    resolve_params,
)

THRESHOLD = 0.1


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _copy_at(original: np.ndarray, distance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at exactly ``distance`` (cosine) from ``original`` (unit rows)."""
    u = rng.standard_normal(original.shape).astype(np.float32)
    u -= np.sum(u * original, axis=1, keepdims=True) * original
    u = _unit(u)
    cos = (1.0 - distance)[:, None]
    return (cos * original + np.sqrt(1.0 - cos**2) * u).astype(np.float32)


def clustered(n: int, dim: int, n_dup: int, seed: int, spread: float = THRESHOLD) -> np.ndarray:
    """Unit vectors in clusters (one per 100 rows, power-law spectrum), ``n_dup`` rows replaced by
    copies of other rows at cosine distances uniform in (0, spread]."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    spectrum = (np.arange(dim) + 1.0) ** -0.7
    basis = (rotation * np.sqrt(spectrum / spectrum.sum())).T.astype(np.float32)
    centres = _unit(rng.standard_normal((max(4, n // 100), dim)).astype(np.float32) @ basis)
    labels = rng.integers(0, len(centres), n)
    x = _unit(0.8 * centres[labels] + rng.standard_normal((n, dim), dtype=np.float32) @ basis)
    order = rng.permutation(n)
    copies, originals = order[:n_dup], order[n_dup : 2 * n_dup]
    x[copies] = _copy_at(x[originals], rng.uniform(1e-4, spread, n_dup).astype(np.float32), rng)
    return x


def brute_force(x: np.ndarray, max_distance: float) -> dict:
    """{(a, b): distance} of every pair under ``max_distance`` (float64 products)."""
    scores = x.astype(np.float64) @ x.T.astype(np.float64)
    a, b = np.nonzero(np.triu(1.0 - scores <= max_distance, 1))
    lo, hi, d = a, b, 1.0 - scores[a, b]
    return dict(zip(zip(lo.tolist(), hi.tolist(), strict=True), d.tolist(), strict=True))


def as_dict(rows_a: np.ndarray, rows_b: np.ndarray, distance: np.ndarray) -> dict:
    assert np.all(rows_a < rows_b)
    pairs = dict(zip(zip(rows_a.tolist(), rows_b.tolist(), strict=True), distance.tolist(), strict=True))
    assert len(pairs) == len(rows_a), "a pair came out twice"
    return pairs


def all_pairs(index: VectorIndex, x: np.ndarray, **kwargs) -> dict:
    rows = np.arange(index.count, dtype=np.int64)
    return as_dict(*find_pairs(index, x, rows, THRESHOLD, x, **kwargs))


def assert_distances(found: dict, truth: dict) -> None:
    common = found.keys() & truth.keys()
    assert common
    assert max(abs(found[p] - truth[p]) for p in common) < 1e-5


# ----------------------------------------------------------------------------- preparation


def test_prepare_centres_normalises_and_keeps_zero_rows_zero():
    rng = np.random.default_rng(0)
    raw = (rng.standard_normal((1000, 16)) + 3.0).astype(np.float16)
    mean = dataset_mean(raw[s : s + 300] for s in range(0, 1000, 300))
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, raw.astype(np.float64).mean(axis=0), atol=1e-6)
    raw[5] = mean.astype(np.float16)  # centred: (almost) zero
    raw[6] = np.nan
    x = prepare(raw, mean, chunk=128)
    assert x.dtype == np.float32 and x.shape == raw.shape and np.isfinite(x).all()
    assert not x[6].any()
    norms = np.linalg.norm(np.delete(x, [5, 6], axis=0), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    expected = raw[10].astype(np.float32) - mean
    np.testing.assert_allclose(x[10], expected / np.linalg.norm(expected), atol=1e-6)
    zeros = prepare(np.zeros((4, 16), np.float16), np.zeros(16, np.float32))
    assert not zeros.any() and np.isfinite(zeros).all()
    with pytest.raises(ValueError):
        dataset_mean([])


def test_choose_kind_and_parameters():
    assert choose_kind(1000) == "flat"
    assert choose_kind(CPU_FLAT_MAX + 1) == "ivf"
    assert choose_kind(CPU_FLAT_MAX + 1, on_gpu=True) == "flat"
    assert choose_kind(10, "hnsw") == "hnsw"
    with pytest.raises(ValueError):
        choose_kind(10, "annoy")
    params = resolve_params("ivf", 1_000_000, None)
    assert params["nlist"] == default_nlist(1_000_000) == 2048
    assert params["nprobe"] == 16 and params["train_size"] == 40 * 2048
    assert resolve_params("ivf", 1000, {"nprobe": 4})["nlist"] <= 1000 // 39
    with pytest.raises(ValueError):
        resolve_params("flat", 10, {"nlist": 4})


# ----------------------------------------------------------------------------- exactness and recall


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_flat_returns_exactly_the_brute_force_pairs(precision):
    rng = np.random.default_rng(1)
    x = _unit(rng.standard_normal((3000, 64)).astype(np.float32))
    rows = rng.permutation(3000)
    at = 0
    for distance in [0.0005, 0.02, 0.05, 0.09, 0.098, 0.1 - 2e-4, 0.1 + 2e-4, 0.102, 0.11, 0.15]:
        for _ in range(8):  # pairs
            a, b = rows[at], rows[at + 1]
            x[b] = _copy_at(x[[a]], np.array([distance], np.float32), rng)[0]
            at += 2
        for _ in range(4):  # triples: two copies of one original
            a, b, c = rows[at : at + 3]
            x[[b, c]] = _copy_at(x[[a, a]], np.array([distance, distance / 2], np.float32), rng)
            at += 3
    truth = brute_force(x, THRESHOLD)
    assert 100 < len(truth) < 200
    index = VectorIndex.build("flat", x, seed=0)
    found = all_pairs(index, x, precision=precision)
    assert found.keys() == truth.keys()
    assert_distances(found, truth)


def test_ivf_finds_99_percent_of_flat_pairs_on_100k_vectors():
    x = clustered(100_000, 512, 1000, seed=2)
    index = VectorIndex.build("ivf", x, seed=0)  # ~4 s with the search on 2 cores
    found = all_pairs(index, x)
    assert index.params["nlist"] == 512 and index.params["nprobe"] == 16
    # flat over every row would take ~20 s here: compare on 3,000 rows (half of them planted)
    rng = np.random.default_rng(3)
    planted = np.unique(list(found.keys()))
    rows = np.unique(np.concatenate([rng.choice(100_000, 1500, replace=False), rng.choice(planted, 1500)]))
    flat = VectorIndex.build("flat", x)
    reference = as_dict(*find_pairs(flat, x[rows], rows, THRESHOLD, x))
    sampled = set(rows.tolist())
    near_rows = {p for p in found if p[0] in sampled or p[1] in sampled}
    assert len(reference) > 500
    recall = len(reference.keys() & near_rows) / len(reference)
    assert recall >= 0.99, recall
    assert near_rows <= reference.keys()  # nothing over the threshold
    assert_distances(found, reference)


@pytest.mark.parametrize(
    ("kind", "params"), [("hnsw", None), ("lsh", None), ("ivf", {"nlist": 32, "pq_m": 16, "pq_bits": 4})]
)
def test_graph_hash_and_pq_kinds_reach_95_percent_of_flat(kind, params):
    x = clustered(8000, 128, 160, seed=4)
    truth = brute_force(x, THRESHOLD)
    flat = all_pairs(VectorIndex.build("flat", x), x)
    assert flat.keys() == truth.keys()
    index = VectorIndex.build(kind, x, params, seed=5)
    found = all_pairs(index, x)
    assert found.keys() <= truth.keys()
    assert len(found.keys() & flat.keys()) >= 0.95 * len(flat)
    assert_distances(found, truth)


# ----------------------------------------------------------------------------- incremental use


def _shards(seed: int) -> tuple[np.ndarray, int, int]:
    """Three shards of 1500 rows with copies inside and across shards."""
    rng = np.random.default_rng(seed)
    x = _unit(rng.standard_normal((4500, 48)).astype(np.float32))
    originals = rng.choice(4500, 120, replace=False)
    copies = rng.choice(np.setdiff1d(np.arange(4500), originals), 120, replace=False)
    x[copies] = _copy_at(x[originals], rng.uniform(1e-4, THRESHOLD, 120).astype(np.float32), rng)
    return x, 3000, 4500


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_adding_a_shard_and_searching_its_rows_completes_the_pairs(kind):
    x, old, total = _shards(6)
    # every list (no probe window): exact
    params = {"nlist": 16, "nprobe": 16, "probe_window": 0} if kind == "ivf" else None
    index = VectorIndex.build(kind, x[:old], params, seed=0)
    before = all_pairs(index, x[:old])
    index.add(x[old:])
    assert index.count == total
    new_rows = np.arange(old, total, dtype=np.int64)
    added = as_dict(*find_pairs(index, x[old:], new_rows, THRESHOLD, x))
    assert all(b >= old for _, b in added)  # every new pair has a new row
    assert not before.keys() & added.keys()
    full = all_pairs(VectorIndex.build("flat", x), x)
    combined = {**before, **added}
    assert combined.keys() == full.keys()
    assert max(abs(combined[p] - full[p]) for p in full) < 1e-5
    assert sum(a >= old for a, _ in added) > 0 and sum(a < old for a, _ in added) > 0  # (new,new), (new,old)


def test_ivf_add_keeps_centroids_and_advises_a_retrain_after_10x_growth():
    x = clustered(6000, 32, 60, seed=7)
    index = VectorIndex.build("ivf", x[:500], {"nlist": 8}, seed=0)
    centroids = index.ivf.quantizer.reconstruct_n(0, 8)
    index.add(x[500:])
    np.testing.assert_array_equal(index.ivf.quantizer.reconstruct_n(0, 8), centroids)
    assert index.count == 6000 and index.trained_count == 500 and index.retrain_advised


# ----------------------------------------------------------------------------- persistence, caps


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "lsh"])
def test_save_and_load_round_trip(tmp_path, kind):
    x = clustered(3000, 32, 60, seed=8)
    mean = np.linspace(-1, 1, 32, dtype=np.float32)
    index = VectorIndex.build(kind, x[:2500], seed=3, mean=mean)
    index.save(tmp_path / "v1")
    assert {p.name for p in (tmp_path / "v1").iterdir()} == {"index.faiss", "mean.npy", "index.json"}
    loaded = VectorIndex.load(tmp_path / "v1")
    assert (loaded.kind, loaded.params, loaded.dim, loaded.count) == (kind, index.params, 32, 2500)
    np.testing.assert_array_equal(loaded.mean, mean)
    assert all_pairs(loaded, x[:2500]) == all_pairs(index, x[:2500])
    for each in (index, loaded):
        each.add(x[2500:])
    rows = np.arange(2500, 3000)
    assert as_dict(*find_pairs(loaded, x[2500:], rows, THRESHOLD, x)) == as_dict(
        *find_pairs(index, x[2500:], rows, THRESHOLD, x)
    )


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_degenerate_copies_stay_within_the_cap_and_warn(kind):
    rng = np.random.default_rng(9)
    x = _unit(rng.standard_normal((3000, 32)).astype(np.float32))
    same = rng.choice(3000, 1200, replace=False)
    x[same] = x[same[0]]
    x[same[600:]] += 1e-4 * rng.standard_normal((600, 32)).astype(np.float32)  # nearly identical
    cap = 40
    index = VectorIndex.build(kind, x, {"nlist": 4} if kind == "ivf" else None, seed=0)
    with pytest.warns(RuntimeWarning, match="max_neighbours"):
        rows_a, rows_b, distance = find_pairs(index, x, np.arange(3000), THRESHOLD, x, max_neighbours=cap)
    assert len(rows_a) <= 3000 * cap
    assert len(rows_a) >= 1200 * cap // 2
    assert np.all(np.isin(rows_a, same)) and np.all(np.isin(rows_b, same)) and np.all(distance < 1e-3)
    # the group still comes out connected: one component holds every copy
    parent = np.arange(3000)

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in zip(rows_a.tolist(), rows_b.tolist(), strict=True):
        parent[max(root(a), root(b))] = min(root(a), root(b))
    assert len({root(i) for i in same.tolist()}) == 1


def test_find_pairs_checks_its_input():
    x = clustered(500, 16, 10, seed=10)
    index = VectorIndex.build("flat", x)
    with pytest.raises(ValueError):
        find_pairs(index, x, np.arange(500), 2.5, x)
    with pytest.raises(ValueError):
        find_pairs(index, x[:10], np.arange(20), THRESHOLD, x)
    with pytest.raises(ValueError):
        find_pairs(index, x[:1], np.array([500]), THRESHOLD, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows_a, _, _ = find_pairs(index, None, np.zeros(0, np.int64), THRESHOLD, x)
    assert len(rows_a) == 0
    by_function = find_pairs(index, None, np.arange(500), THRESHOLD, lambda rows: x[rows])
    by_array = find_pairs(index, x, np.arange(500), THRESHOLD, x)
    for left, right in zip(by_function, by_array, strict=True):
        np.testing.assert_array_equal(left, right)


def test_ivf_lists_come_from_our_kmeans_seeded_and_zero_rows_left_out():
    x = clustered(6000, 64, 60, seed=9)
    x[:100] = 0.0  # vectors equal to the mean: prepare() leaves them zero, no direction
    first = VectorIndex.build("ivf", x, {"nlist": 32}, seed=4)
    again = VectorIndex.build("ivf", x, {"nlist": 32}, seed=4)
    centroids = first.ivf.quantizer.reconstruct_n(0, 32)
    np.testing.assert_array_equal(centroids, again.ivf.quantizer.reconstruct_n(0, 32))
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)  # spherical
    assert first.ivf.is_trained and first.count == 6000
    # every vector sits in the list of its nearest centroid
    lists = np.array([first.ivf.invlists.list_size(i) for i in range(32)])
    nearest = np.bincount((x[100:] @ centroids.T).argmax(axis=1), minlength=32)
    assert lists.sum() == 6000 and np.abs(lists - nearest).sum() <= 100 + 0.01 * 6000


# ----------------------------------------------------------------------------- the join's kernels


def test_search_above_returns_every_probed_row_over_each_querys_threshold_best_first():
    """With every list probed, search_above is a brute-force range search per query (screened
    scores within the screen's margin of the exact ones), capped to the best ``cap``."""
    from curation_assets.core.dedup.index import screen_margin, search_above

    x = clustered(4000, 64, 40, seed=3)
    queries = clustered(300, 64, 0, seed=4)
    index = VectorIndex.build("ivf", x, {"nlist": 16, "nprobe": 16}, seed=0)
    exact = queries.astype(np.float64) @ x.T.astype(np.float64)
    low = np.quantile(exact, 0.995, axis=1).astype(np.float32)  # ~20 rows per query
    for precision in ("fp32", "bf16"):
        margin = screen_margin(precision)
        rows, scores, capped = search_above(index, queries, low, 1000, 16, precision=precision)
        assert not capped.any()
        for q in range(len(queries)):
            got = rows[q][rows[q] >= 0]
            assert np.all(np.diff(scores[q][: len(got)]) <= 0)  # best first
            assert set(np.flatnonzero(exact[q] >= low[q] + margin)) <= set(got.tolist())
            assert np.all(exact[q, got] >= low[q] - margin)
            np.testing.assert_allclose(scores[q][: len(got)], exact[q, got], atol=margin)
        # a cap keeps each query's best screened rows and says which queries had more
        top, top_scores, cut = search_above(index, queries, low, 5, 16, precision=precision)
        counts = (rows >= 0).sum(axis=1)
        assert cut.tolist() == (counts > 5).tolist()
        np.testing.assert_array_equal(top_scores, scores[:, :5])
        assert all(set(top[q][top[q] >= 0].tolist()) <= set(rows[q].tolist()) for q in range(len(queries)))


def test_the_float32_gather_above_the_word_budget_finds_the_same_pairs(monkeypatch):
    """The join gathers bfloat16 query words up to WORDS_MAX_BYTES, float32 rows above: the same
    pairs, exact distances either way."""
    from curation_assets.core.dedup import index as index_module

    x = clustered(20000, 64, 200, seed=11)
    index = VectorIndex.build("ivf", x, {"nlist": 64, "nprobe": 16}, seed=0)
    words = all_pairs(index, x, precision="bf16")
    monkeypatch.setattr(index_module, "WORDS_MAX_BYTES", 0)
    rows = all_pairs(index, x, precision="bf16")
    assert words == rows and len(words) >= 200


def test_the_probe_window_searches_fewer_lists_and_keeps_the_pairs():
    """Each query searches only those of its nprobe lists whose centroid score is within the
    window of its best: fewer lists, nearly every pair (a pair is found from either side)."""
    x = clustered(20_000, 128, 300, seed=6)
    pairs, probed = {}, {}
    for window in (0.2, 0):
        index = VectorIndex.build("ivf", x, {"nlist": 128, "nprobe": 16, "probe_window": window}, seed=0)
        stats: dict = {}
        rows = np.arange(index.count)
        pairs[window] = as_dict(*find_pairs(index, x, rows, THRESHOLD, x, stats=stats))
        probed[window] = stats["lists_per_query"]
    assert probed[0] == 16  # no window: every one of the nprobe lists
    assert probed[0.2] < 0.7 * 16
    assert pairs[0.2].keys() <= pairs[0].keys()
    assert len(pairs[0.2]) >= 0.99 * len(pairs[0]) and len(pairs[0]) >= 300
