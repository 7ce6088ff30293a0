"""Class-aware subsets: exact sizes, class counts, trimmed tails, matched frequencies, caption scores."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from curation_assets.core.select.subsets import (
    caption_filter,
    class_counts,
    match_frequencies,
    subset_by_classes,
    subset_by_count,
    trim_tail,
)

SIZES = {"ant": 50, "bee": 30, "cat": 12, "dog": 5, "eel": 3}


def make_labels(sizes: dict[str, int], seed: int = 0) -> pl.DataFrame:
    """Labels in shuffled row order, ids that do not sort by class."""
    rows = [(f"s{(i * 7919) % 1000:03d}_{name}{i}.jpg", name) for name, n in sizes.items() for i in range(n)]
    order = np.random.default_rng(seed).permutation(len(rows))
    return pl.DataFrame([rows[i] for i in order], schema=["image_id", "label"], orient="row")


def ideal_share(weights: dict[str, float], n: int) -> dict[str, float]:
    total = sum(weights.values())
    return {name: n * w / total for name, w in weights.items()}


def assert_within_one(counts: dict[str, int], ideal: dict[str, float]) -> None:
    for name, share in ideal.items():
        got = counts.get(name, 0)
        assert math.floor(share) <= got <= math.ceil(share), (name, got, share)


@pytest.mark.parametrize("n", [0, 1, 17, 63, 100])
def test_subset_by_count_has_exact_size_and_keeps_class_shares(n: int) -> None:
    labels = make_labels(SIZES)
    subset = subset_by_count(labels, n, seed=3)
    assert len(subset) == n
    assert subset["image_id"].is_unique().all()
    assert set(subset["image_id"]) <= set(labels["image_id"])
    assert_within_one(class_counts(subset), ideal_share(SIZES, n))


def test_subset_by_count_is_deterministic_by_seed_and_ignores_row_order() -> None:
    labels = make_labels(SIZES, seed=0)
    shuffled = make_labels(SIZES, seed=1)
    first = subset_by_count(labels, 40, seed=5)
    assert first.equals(subset_by_count(shuffled, 40, seed=5))
    assert set(first["image_id"]) != set(subset_by_count(labels, 40, seed=6)["image_id"])
    uniform = subset_by_count(labels, 40, seed=5, stratified=False)
    assert len(uniform) == 40
    assert uniform.equals(subset_by_count(shuffled, 40, seed=5, stratified=False))
    # With one seed a smaller uniform draw is part of a larger one.
    assert set(subset_by_count(labels, 25, seed=5, stratified=False)["image_id"]) <= set(uniform["image_id"])
    with pytest.raises(ValueError, match="between 0 and the 100"):
        subset_by_count(labels, 101, seed=0)


def test_subset_by_classes_draws_k_whole_classes_or_takes_named_ones() -> None:
    labels = make_labels(SIZES)
    subset = subset_by_classes(labels, k=2, seed=4)
    chosen = class_counts(subset)
    assert len(chosen) == 2
    assert all(count == SIZES[name] for name, count in chosen.items())
    assert subset.equals(subset_by_classes(make_labels(SIZES, seed=9), k=2, seed=4))
    draws = {tuple(sorted(class_counts(subset_by_classes(labels, k=2, seed=s)))) for s in range(8)}
    assert len(draws) > 1  # the seed matters
    named = subset_by_classes(labels, classes=["dog", "ant"])
    assert class_counts(named) == {"ant": 50, "dog": 5}
    with pytest.raises(ValueError, match="not in the labels"):
        subset_by_classes(labels, classes=["ant", "yak"])
    with pytest.raises(ValueError, match="give exactly one"):
        subset_by_classes(labels, k=1, classes=["ant"])
    with pytest.raises(ValueError, match="k must be between"):
        subset_by_classes(labels, k=6)


def test_trim_tail_caps_only_the_least_frequent_classes() -> None:
    labels = make_labels(SIZES)
    trimmed = trim_tail(labels, k=3, ceil=4, seed=0)
    counts = class_counts(trimmed)
    # The three rarest classes (cat 12, dog 5, eel 3) are capped at 4; the head is untouched.
    tail = sorted(SIZES, key=SIZES.get)[:3]
    for name, size in SIZES.items():
        assert counts[name] == (min(size, 4) if name in tail else size), name
    assert len(trimmed) == sum(counts.values())
    assert trimmed.equals(trim_tail(make_labels(SIZES, seed=2), k=3, ceil=4, seed=0))


def test_trim_tail_breaks_frequency_ties_with_the_seed() -> None:
    balanced = make_labels({f"c{i}": 6 for i in range(10)})
    picks = set()
    for seed in range(6):
        counts = class_counts(trim_tail(balanced, k=3, ceil=2, seed=seed))
        capped = sorted(name for name, c in counts.items() if c == 2)
        assert len(capped) == 3
        assert sum(counts.values()) == 60 - 3 * 4
        picks.add(tuple(capped))
    assert len(picks) > 1


def test_match_frequencies_follows_the_target_within_one_image(tmp_path) -> None:
    labels = make_labels(SIZES)
    target = {"ant": 5, "bee": 3, "cat": 2, "dog": 1}
    for n in (11, 23, 37):
        subset = match_frequencies(labels, target, n, seed=1)
        counts = class_counts(subset)
        assert len(subset) == n
        assert "eel" not in counts  # not in the target: no image
        assert_within_one(counts, ideal_share(target, n))
    # The same target from a JSON or CSV file (fractions, another header) gives the same subset.
    as_json = tmp_path / "target.json"
    as_json.write_text(json.dumps({k: v / 11 for k, v in target.items()}))
    as_csv = tmp_path / "target.csv"
    as_csv.write_text("label,count\n" + "".join(f"{k},{v}\n" for k, v in target.items()))
    expected = match_frequencies(labels, target, 23, seed=1)
    assert match_frequencies(labels, as_json, 23, seed=1).equals(expected)
    assert match_frequencies(labels, as_csv, 23, seed=1).equals(expected)


def test_match_frequencies_says_when_a_class_is_too_small() -> None:
    labels = make_labels(SIZES)
    target = {"ant": 1, "eel": 1}  # eel has 3 images, so n can be at most about 7
    with pytest.raises(ValueError, match=r"'eel'.*largest n that matches the target is (\d+)") as info:
        match_frequencies(labels, target, 20, seed=0)
    largest = int(info.value.args[0].rsplit(" ", 1)[-1])
    smaller = match_frequencies(labels, target, 20, seed=0, allow_smaller=True)
    assert len(smaller) == largest
    assert class_counts(smaller)["eel"] <= 3
    assert_within_one(class_counts(smaller), ideal_share(target, largest))
    with pytest.raises(ValueError, match="not in the labels"):
        match_frequencies(labels, {"ant": 1, "yak": 1}, 5, seed=0)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        match_frequencies(labels, {"ant": -1}, 5, seed=0)


def test_bad_labels_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="missing column"):
        subset_by_count(pl.DataFrame({"image_id": ["a"]}), 1, seed=0)
    twice = pl.DataFrame({"image_id": ["a", "a"], "label": ["x", "y"]})
    with pytest.raises(ValueError, match="listed twice"):
        subset_by_classes(twice, k=1)
    unlabeled = pl.DataFrame({"image_id": ["a", "b"], "label": ["x", None]})
    with pytest.raises(ValueError, match="without an image_id or label"):
        trim_tail(unlabeled, k=1, ceil=1, seed=0)


def test_caption_filter_keeps_captions_close_to_their_class_definition() -> None:
    rng = np.random.default_rng(0)
    dim = 32
    classes = {name: rng.normal(size=dim) for name in ("ant", "bee", "cat")}
    labels = pl.DataFrame({"image_id": [f"i{i}" for i in range(60)], "label": ["ant", "bee", "cat"] * 20})
    on_topic = rng.random(60) < 0.5
    vectors = np.empty((60, dim), dtype=np.float32)
    for i, name in enumerate(labels["label"]):
        if on_topic[i]:  # the caption talks about its class: close to the definition
            vectors[i] = classes[name] + 0.3 * rng.normal(size=dim)
        else:  # an off-topic caption: an unrelated direction
            vectors[i] = rng.normal(size=dim)
    vectors[0] = 0.0  # an empty caption embedding must never pass
    expected = on_topic.copy()
    expected[0] = False
    mask = caption_filter(vectors.astype(np.float16), classes, labels, threshold=0.7)
    assert mask.dtype == bool and mask.shape == (60,)
    assert np.array_equal(mask, expected)
    # A higher threshold keeps no more than a lower one.
    assert not (caption_filter(vectors, classes, labels, 0.9) & ~mask).any()
    with pytest.raises(ValueError, match="no definition vector"):
        caption_filter(vectors, {"ant": classes["ant"]}, labels, 0.5)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        caption_filter(vectors[:10], classes, labels, 0.5)
