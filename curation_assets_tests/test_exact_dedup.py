"""Exact duplicates and keeper policies on hand-made tables."""

from __future__ import annotations

import polars as pl

from curation_assets.core.dedup.exact import find_exact_duplicates, summarize


def _rows() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": [
                "s1/b.jpg",
                "s2/a.jpg",
                "s1/c.png",
                "s2/c.bmp",
                "s3/x.jpg",
                "s3/bad.jpg",
                "s1/bad.jpg",
            ],
            "content_hash": ["h1", "h1", "h2", "h3", "h4", "h5", "h5"],
            "pixel_hash": ["p1", "p1", "p2", "p2", "p4", None, None],
            "status": ["ok", "fixable", "ok", "ok", "ok", "rejected", "rejected"],
            "width": [100, 100, 50, 50, 10, None, None],
            "height": [100, 100, 50, 50, 10, None, None],
            "size_bytes": [10, 10, 20, 30, 5, 1, 1],
            "n_findings": [0, 1, 0, 0, 0, 1, 1],
        }
    )


def test_groups_byte_and_pixel_copies_with_one_keeper():
    groups = find_exact_duplicates(_rows(), "quality")
    assert set(groups["image_id"]) == {
        "s1/b.jpg",
        "s2/a.jpg",
        "s1/c.png",
        "s2/c.bmp",
    }  # rejected ones take no part
    keepers = dict(groups.filter(pl.col("is_keeper")).select("group_id", "image_id").iter_rows())
    # quality: the ok copy beats the fixable one (a wrong extension, say) even though it sorts later
    assert keepers["p1"] == "s1/b.jpg"
    # same pixels, no findings: the larger file wins
    assert keepers["p2"] == "s2/c.bmp"
    removed = {r["image_id"]: r for r in groups.filter(~pl.col("is_keeper")).to_dicts()}
    assert removed["s2/a.jpg"]["match"] == "byte" and removed["s2/a.jpg"]["reason"] == "byte copy of s1/b.jpg"
    assert removed["s1/c.png"]["match"] == "pixel" and removed["s1/c.png"]["keeper_id"] == "s2/c.bmp"
    assert summarize(groups) == {
        "groups": 2,
        "duplicates_removed": 2,
        "byte_copies": 1,
        "pixel_copies": 1,
        "largest_group": 2,
    }


def test_alphabetical_and_seeded_random_keepers():
    alpha = find_exact_duplicates(_rows(), "alphabetical")
    assert set(alpha.filter(pl.col("is_keeper"))["image_id"]) == {"s1/b.jpg", "s1/c.png"}
    draws = {
        seed: tuple(
            sorted(find_exact_duplicates(_rows(), "random", seed).filter(pl.col("is_keeper"))["image_id"])
        )
        for seed in range(8)
    }
    assert draws[3] == tuple(
        sorted(find_exact_duplicates(_rows().reverse(), "random", 3).filter(pl.col("is_keeper"))["image_id"])
    )
    assert len(set(draws.values())) > 1  # the seed matters


def test_no_duplicates_gives_an_empty_table_with_the_schema():
    rows = _rows().filter(pl.col("image_id") == "s3/x.jpg")
    groups = find_exact_duplicates(rows, "quality")
    assert groups.is_empty() and "keeper_id" in groups.columns
