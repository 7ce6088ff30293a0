"""Grouping pairs: no chaining with representative linkage, keepers by policy, sweeps."""

from __future__ import annotations

import numpy as np
import polars as pl

from curation_assets.core.dedup.grouping import (
    connected_components,
    group_duplicates,
    sweep_thresholds,
    threshold_sweep,
)


def _pairs(rows: list[tuple[str, str, float]]) -> pl.DataFrame:
    a, b, d = zip(*rows, strict=True)
    return pl.DataFrame(
        {"image_id_a": a, "image_id_b": b, "distance": d}, schema_overrides={"distance": pl.Float32}
    )


CHAIN = _pairs([("a", "b", 0.10), ("b", "c", 0.10), ("a", "c", 0.22)])  # a-c beyond a 0.15 threshold
SIZES = pl.DataFrame({"image_id": ["a", "b", "c"], "pixels": [300, 200, 100], "size_bytes": [1, 1, 1]})


def test_representative_linkage_does_not_chain():
    groups = group_duplicates(CHAIN, 0.15, "representative", "quality", SIZES)
    group_of = dict(zip(groups["image_id"], groups["group_id"], strict=True))
    assert group_of == {"a": "a", "b": "a"}  # c is not within 0.15 of the keeper a: it stays
    removed = groups.filter(~pl.col("is_keeper")).row(0, named=True)
    assert removed["keeper_id"] == "a" and abs(removed["distance"] - 0.10) < 1e-6


def test_single_linkage_chains_like_connected_components():
    groups = group_duplicates(CHAIN, 0.15, "single", "quality", SIZES)
    assert set(groups["image_id"]) == {"a", "b", "c"} and set(groups["group_id"]) == {"a"}
    c = groups.filter(pl.col("image_id") == "c").row(0, named=True)
    assert c["distance"] is None and c["linked_to"] == "b" and "through b" in c["reason"]


def test_every_removed_member_is_within_the_threshold_of_its_keeper():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(300, 2)).cumsum(axis=0) * 0.05  # a random walk: long chains
    ids = [f"i{k:03d}" for k in range(len(points))]
    rows = [
        (ids[i], ids[j], float(np.linalg.norm(points[i] - points[j])))
        for i in range(len(points))
        for j in range(i + 1, len(points))
        if np.linalg.norm(points[i] - points[j]) < 0.3
    ]
    groups = group_duplicates(_pairs(rows), 0.2, "representative", "alphabetical")
    removed = groups.filter(~pl.col("is_keeper"))
    assert len(removed) > 0 and (removed["distance"] < 0.2).all()
    assert (groups.group_by("group_id").agg(pl.col("is_keeper").sum())["is_keeper"] == 1).all()
    single = group_duplicates(_pairs(rows), 0.2, "single", "alphabetical")
    assert single["group_size"].max() > groups["group_size"].max()  # chaining makes bigger groups


def test_keeper_policies():
    quality = group_duplicates(CHAIN, 0.3, "single", "quality", SIZES)
    assert quality.filter(pl.col("is_keeper"))["image_id"].to_list() == ["a"]  # the largest image
    smaller_first = SIZES.with_columns(pixels=pl.Series([100, 200, 300]))
    assert group_duplicates(CHAIN, 0.3, "single", "quality", smaller_first).filter(pl.col("is_keeper"))[
        "image_id"
    ].to_list() == ["c"]
    keepers = {
        seed: group_duplicates(CHAIN, 0.3, "single", "random", seed=seed).filter(pl.col("is_keeper"))[
            "image_id"
        ][0]
        for seed in range(12)
    }
    again = group_duplicates(CHAIN, 0.3, "single", "random", seed=5).filter(pl.col("is_keeper"))["image_id"][
        0
    ]
    assert again == keepers[5] and len(set(keepers.values())) > 1


def test_sweep_counts_grow_with_the_threshold():
    sweep = threshold_sweep(CHAIN, sweep_thresholds(0.3), "representative", "quality", SIZES)
    assert sweep["threshold"].to_list()[0] == 0.02 and sweep["threshold"].to_list()[-1] == 0.3
    assert sweep["pairs"].is_sorted() and sweep["removed"].is_sorted()
    last = sweep.row(-1, named=True)
    assert last["removed"] == 2 and last["groups"] == 1


def test_connected_components():
    labels = connected_components(5, np.array([0, 3]), np.array([1, 4]))
    assert labels[0] == labels[1] and labels[3] == labels[4] and len({labels[0], labels[2], labels[3]}) == 3
