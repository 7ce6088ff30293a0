"""Filter arithmetic: example distances, threshold decisions, summaries and the histogram plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_assets.core.filters.rules import (
    PERCENTILES,
    FilterRule,
    decide,
    min_cosine_distance,
    percentile_table,
    summarize,
)
from curation_assets.core.outputs.plots import histogram_plot


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_min_cosine_distance_matches_brute_force(dtype):
    rng = np.random.default_rng(3)
    vectors, examples = _unit(rng, 53, 24).astype(dtype), _unit(rng, 6, 24).astype(dtype)
    examples[2] = vectors[10]  # an image identical to an example is at distance 0
    v64, e64 = vectors.astype(np.float64), examples.astype(np.float64)
    expected = np.array([min(1.0 - float(v @ e) for e in e64) for v in v64])

    got = min_cosine_distance(vectors, examples, chunk_size=7)  # several chunks and a ragged tail
    assert got.dtype == np.float32 and got.shape == (53,)
    np.testing.assert_allclose(got, expected, atol=1e-3 if dtype == np.float16 else 1e-6)
    assert got[10] == pytest.approx(0.0, abs=1e-3)
    assert np.array_equal(got, min_cosine_distance(vectors, examples))  # chunking changes nothing
    assert min_cosine_distance(vectors[:0], examples).shape == (0,)


def test_min_cosine_distance_rejects_bad_shapes():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no example"):
        min_cosine_distance(_unit(rng, 4, 8), np.zeros((0, 8)))
    with pytest.raises(ValueError, match="dimensions"):
        min_cosine_distance(_unit(rng, 4, 8), _unit(rng, 2, 9))


def _scores() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e"],
            "dist_document": [0.10, 0.30, None, 0.25, 0.50],
            "aesthetic": [6.0, 3.5, 2.0, float("nan"), 5.0],
            "brightness_p5": [0.2, 0.97, 0.99, 0.95, 0.1],
        }
    )


RULES = [
    FilterRule("example:document", "dist_document", 0.25, "below"),
    FilterRule("aesthetic", "aesthetic", 4.0, "below"),
    FilterRule("quality:light", "brightness_p5", 0.95, "above"),
]


def test_decide_lists_removing_rules_and_margins():
    out = decide(_scores(), RULES)
    assert out.columns == [
        "image_id",
        "removed",
        "removed_by",
        "dist_document_margin",
        "aesthetic_margin",
        "brightness_p5_margin",
    ]
    rows = {r["image_id"]: r for r in out.iter_rows(named=True)}
    assert rows["a"]["removed_by"] == ["example:document"]
    assert rows["b"]["removed_by"] == ["aesthetic", "quality:light"]
    # c: no distance (null) is never removed, its other scores still count
    assert rows["c"]["removed_by"] == ["aesthetic", "quality:light"]
    assert rows["c"]["dist_document_margin"] is None
    # d: exactly at both thresholds is kept; a NaN score is like a missing one
    assert rows["d"]["removed"] is False and rows["d"]["removed_by"] == []
    assert rows["d"]["dist_document_margin"] == 0.0 and rows["d"]["brightness_p5_margin"] == 0.0
    assert rows["d"]["aesthetic_margin"] is None
    assert rows["e"]["removed"] is False
    # margins: positive = past the threshold by that much, whichever side removes
    assert rows["a"]["dist_document_margin"] == pytest.approx(0.15)
    assert rows["e"]["dist_document_margin"] == pytest.approx(-0.25)
    assert rows["b"]["aesthetic_margin"] == pytest.approx(0.5)
    assert rows["b"]["brightness_p5_margin"] == pytest.approx(0.02)
    assert rows["e"]["brightness_p5_margin"] == pytest.approx(-0.85)
    assert out["removed"].to_list() == [True, True, True, False, False]


def test_decide_without_rules_and_with_bad_input():
    none = decide(_scores(), [])
    assert none["removed"].to_list() == [False] * 5 and none["removed_by"].to_list() == [[]] * 5
    with pytest.raises(ValueError, match=r"no column missing.*needed by oops"):
        decide(_scores(), [FilterRule("oops", "missing", 1.0)])
    duplicated = pl.concat([_scores(), _scores().head(1)])
    with pytest.raises(ValueError, match="not unique"):
        decide(duplicated, RULES)
    with pytest.raises(ValueError, match="'below' or 'above'"):
        FilterRule("x", "aesthetic", 1.0, "under")
    with pytest.raises(ValueError, match="finite"):
        FilterRule("x", "aesthetic", float("nan"))


def test_summarize_matches_numpy_and_counts_missing():
    rng = np.random.default_rng(5)
    values = rng.gamma(2.0, 0.1, 997)
    with_gaps = np.concatenate([values, [np.nan, np.nan, np.inf]])
    threshold = float(np.quantile(values, 0.137))
    s = summarize(with_gaps, threshold, "below")
    assert s["count"] == 997 and s["missing"] == 3
    assert s["removed"] == int((values < threshold).sum())
    assert s["percent_removed"] == pytest.approx(100 * s["removed"] / 997)
    assert s["min"] == values.min() and s["max"] == values.max() and s["mean"] == pytest.approx(values.mean())
    assert list(s["percentiles"]) == [f"P{p}" for p in range(5, 100, 5)]
    np.testing.assert_allclose(list(s["percentiles"].values()), np.percentile(values, list(PERCENTILES)))
    assert s["threshold_percentile"] == pytest.approx(13.7, abs=0.15)

    above = summarize(with_gaps, threshold, "above")
    assert above["removed"] == int((values > threshold).sum())
    assert above["threshold_percentile"] == s["threshold_percentile"]
    # a polars column with nulls and a list with None are read the same way
    series = summarize(pl.Series([0.1, None, 0.3, 0.5]), 0.35, "below")
    assert series == summarize([0.1, None, 0.3, 0.5], 0.35, "below")
    assert (series["count"], series["missing"], series["removed"]) == (3, 1, 2)
    empty = summarize(np.array([np.nan]), 0.5)
    assert empty["count"] == 0 and empty["min"] is None and empty["threshold_percentile"] is None


def test_percentile_table_marks_the_row_nearest_the_threshold():
    values = np.linspace(0.0, 1.0, 1001)
    rows = percentile_table(values, 0.42, "below")
    assert [r["percentile"] for r in rows] == [f"P{p}" for p in PERCENTILES]
    marked = [r for r in rows if r["threshold"]]
    assert len(marked) == 1 and marked[0]["percentile"] == "P40"
    assert "0.42" in marked[0]["threshold"]
    assert [r["removed"] == "yes" for r in rows] == [r["value"] < 0.42 for r in rows]
    above = percentile_table(values, 0.9, "above")
    assert [r["percentile"] for r in above if r["removed"]] == ["P95"]
    assert percentile_table([], 0.5, "below") == []


@pytest.mark.parametrize("removes", ["below", "above"])
def test_histogram_plot_writes_a_png(tmp_path: Path, removes: str):
    values = np.random.default_rng(1).normal(0.5, 0.1, 400)
    path = tmp_path / f"hist_{removes}.png"
    histogram_plot(values, 0.4, path, "example:document", "distance", removes=removes)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
    empty = tmp_path / "empty.png"
    histogram_plot(np.array([math.nan]), 0.4, empty, "nothing", "distance", removes=removes)
    with Image.open(empty) as im:
        assert im.format == "PNG"
