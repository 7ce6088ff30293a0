"""Content-filter arithmetic: distances to example sets, threshold decisions, and their summaries.

Pure library, no Dagster. A filter is a :class:`FilterRule` over one score column: a
distance to a category's example images ("below": closer than the threshold removes), an
aesthetic or quality score ("below" removes) or a score where high is bad ("above"
removes). :func:`decide` applies every rule to a score table and says which rules remove
each image and by how much; :func:`summarize` and :func:`percentile_table` describe one
score's distribution with its threshold, which is what a user tunes a threshold by.

Comparisons are strict: a value exactly at its threshold is kept. A null or NaN score is
never removed: a missing score is a gap to report, not evidence against an image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

PERCENTILES: tuple[int, ...] = tuple(range(5, 100, 5))  # P5 ... P95
REMOVES = ("below", "above")


# ----------------------------------------------------------------------------- distances


def min_cosine_distance(vectors: np.ndarray, examples: np.ndarray, chunk_size: int = 65536) -> np.ndarray:
    """For each row of ``vectors`` (n, d), ``min over examples of 1 - cos`` as float32 (n,).

    Both inputs are expected L2-normalised (float16 or float32), so the cosine is a dot
    product. The n x m similarity matrix is never built whole: ``chunk_size`` rows of
    ``vectors`` at a time, in float32. Results are clipped to [0, 2] (rounding of
    float16 unit vectors can step just outside).
    """
    vectors = np.asarray(vectors)
    examples = np.asarray(examples)
    if vectors.ndim != 2 or examples.ndim != 2:
        raise ValueError(
            f"min_cosine_distance: expected 2-D arrays, got shapes {vectors.shape} and {examples.shape}"
        )
    if examples.shape[0] == 0:
        raise ValueError("min_cosine_distance: no example vectors (a category needs at least one)")
    if vectors.shape[1] != examples.shape[1]:
        raise ValueError(
            f"min_cosine_distance: vectors have {vectors.shape[1]} dimensions, examples {examples.shape[1]}"
        )
    chunk_size = max(1, int(chunk_size))
    reference = np.ascontiguousarray(examples, dtype=np.float32).T  # (d, m)
    out = np.empty(vectors.shape[0], dtype=np.float32)
    for start in range(0, vectors.shape[0], chunk_size):
        block = np.asarray(vectors[start : start + chunk_size], dtype=np.float32)
        out[start : start + block.shape[0]] = 1.0 - (block @ reference).max(axis=1)
    return np.clip(out, 0.0, 2.0, out=out)


# ----------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class FilterRule:
    """One threshold on one score column.

    ``removes="below"``: a value < threshold removes (distances, aesthetic, most quality
    scores); ``"above"``: a value > threshold removes (scores where high is bad).
    """

    name: str  # e.g. "example:document", "aesthetic", "quality:blur"
    column: str  # the column of the score frame it reads
    threshold: float
    removes: str = "below"

    def __post_init__(self) -> None:
        if self.removes not in REMOVES:
            raise ValueError(f"filter {self.name!r}: removes is 'below' or 'above', not {self.removes!r}")
        try:
            threshold = float(self.threshold)
        except (TypeError, ValueError):
            threshold = math.nan
        if not math.isfinite(threshold):
            raise ValueError(f"filter {self.name!r}: threshold must be a finite number: {self.threshold!r}")
        object.__setattr__(self, "threshold", threshold)  # numpy scalars and ints become plain floats

    @property
    def margin_column(self) -> str:
        return f"{self.column}_margin"

    def margin(self) -> pl.Expr:
        """How far past the threshold the score is: positive = removed by that much; null for no score."""
        value = pl.col(self.column).cast(pl.Float64).fill_nan(None)
        return (self.threshold - value) if self.removes == "below" else (value - self.threshold)


def decide(scores: pl.DataFrame, rules: Sequence[FilterRule]) -> pl.DataFrame:
    """Which rules remove each image of ``scores`` (needs ``image_id`` and every rule's column).

    One row per image, in ``scores`` order: ``image_id``, ``removed`` (bool),
    ``removed_by`` (names of the removing rules, in rule order) and one
    ``<column>_margin`` per rule (Float64; positive = past the threshold by that much,
    0 = exactly at it and kept, null when the score is null or NaN).
    """
    if "image_id" not in scores.columns:
        raise ValueError("decide: the score table has no image_id column")
    missing = sorted({r.column for r in rules if r.column not in scores.columns})
    if missing:
        raise ValueError(
            f"decide: the score table has no column {', '.join(missing)} "
            f"(needed by {', '.join(r.name for r in rules if r.column in missing)})"
        )
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ValueError(f"decide: rule names must be unique, got {names}")
    columns = [r.column for r in rules]
    if len(set(columns)) != len(columns):
        raise ValueError(f"decide: two rules read the same column, their margins would collide: {columns}")
    if scores["image_id"].n_unique() != scores.height:
        raise ValueError("decide: image_id is not unique in the score table")

    margins = [rule.margin().alias(rule.margin_column) for rule in rules]
    frame = scores.select(pl.col("image_id"), *margins)
    hits = [pl.when(pl.col(rule.margin_column) > 0).then(pl.lit(rule.name)).otherwise(None) for rule in rules]
    removed_by = (
        pl.concat_list(hits).list.drop_nulls() if hits else pl.repeat([], pl.len(), dtype=pl.List(pl.String))
    )
    frame = frame.with_columns(removed_by.cast(pl.List(pl.String)).alias("removed_by"))
    frame = frame.with_columns((pl.col("removed_by").list.len() > 0).alias("removed"))
    return frame.select("image_id", "removed", "removed_by", *(r.margin_column for r in rules))


# ----------------------------------------------------------------------------- summaries


def _as_float_array(values: Any) -> np.ndarray:
    """Values as float64 with null/None as NaN (numpy arrays, lists, polars Series)."""
    if isinstance(values, pl.Series):
        return values.cast(pl.Float64).to_numpy()
    array = np.asarray(values, dtype=object if isinstance(values, list | tuple) else None)
    if array.dtype == object:
        array = np.array([np.nan if v is None else v for v in array.ravel()], dtype=np.float64)
    return np.asarray(array, dtype=np.float64).ravel()


def _removed_mask(finite: np.ndarray, threshold: float, removes: str) -> np.ndarray:
    if removes not in REMOVES:
        raise ValueError(f"removes must be 'below' or 'above', not {removes!r}")
    return finite < threshold if removes == "below" else finite > threshold


def summarize(values: Any, threshold: float, removes: str = "below") -> dict[str, Any]:
    """What one threshold does to one score's distribution.

    Keys: ``count`` (finite values), ``missing`` (nulls and NaN, ignored otherwise),
    ``removed``, ``percent_removed`` (of count), ``min``/``mean``/``max`` (None when no
    value), ``percentiles`` ({"P5": ..., ..., "P95": ...}, numpy's linear interpolation)
    and ``threshold_percentile``: the percentile rank where the threshold cuts, i.e. the
    percent of values below it (for a "below" rule, the percent removed).
    """
    array = _as_float_array(values)
    finite = array[np.isfinite(array)]
    count = int(finite.size)
    removed = int(_removed_mask(finite, threshold, removes).sum())
    summary: dict[str, Any] = {
        "count": count,
        "missing": int(array.size - count),
        "removed": removed,
        "percent_removed": 100.0 * removed / count if count else 0.0,
        "min": None,
        "mean": None,
        "max": None,
        "percentiles": {f"P{p}": None for p in PERCENTILES},
        "threshold_percentile": None,
    }
    if count:
        quantiles = np.percentile(finite, PERCENTILES)
        summary.update(
            min=float(finite.min()),
            mean=float(finite.mean()),
            max=float(finite.max()),
            percentiles={f"P{p}": float(q) for p, q in zip(PERCENTILES, quantiles, strict=True)},
            threshold_percentile=100.0 * float((finite < threshold).sum()) / count,
        )
    return summary


def percentile_table(values: Any, threshold: float, removes: str = "below") -> list[dict[str, Any]]:
    """Rows P5..P95 for a markdown table: the value, whether it is removed, and the threshold marker.

    Each row: ``percentile`` ("P5"), ``value``, ``removed`` ("yes"/""), ``threshold``
    (a marker such as "<- 0.32 (P23.4)" on the row whose percentile is nearest the
    threshold's, "" elsewhere). Empty when there is no finite value.
    """
    summary = summarize(values, threshold, removes)
    if not summary["count"]:
        return []
    rank = summary["threshold_percentile"]
    nearest = min(PERCENTILES, key=lambda p: abs(p - rank))
    rows = []
    for p in PERCENTILES:
        value = summary["percentiles"][f"P{p}"]
        removed = value < threshold if removes == "below" else value > threshold
        rows.append(
            {
                "percentile": f"P{p}",
                "value": round(value, 6),
                "removed": "yes" if removed else "",
                "threshold": f"<- {threshold:g} (P{rank:.1f})" if p == nearest else "",
            }
        )
    return rows


__all__ = [
    "PERCENTILES",
    "FilterRule",
    "decide",
    "min_cosine_distance",
    "percentile_table",
    "summarize",
]
