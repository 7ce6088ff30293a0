"""Plots for asset metadata and reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are files linked from the Dagster UI and the report

import matplotlib.pyplot as plt
import numpy as np
import polars as pl


def sweep_plot(sweep: pl.DataFrame, distances: np.ndarray, threshold: float, path: Path) -> None:
    """Groups / removals per threshold beside the histogram of pair distances, threshold marked."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    left.plot(sweep["threshold"], sweep["removed"], marker="o", label="images removed")
    left.plot(sweep["threshold"], sweep["groups"], marker="s", label="groups")
    left.axvline(threshold, color="crimson", linestyle="--", label=f"threshold {threshold:g}")
    left.set_xlabel("cosine distance threshold")
    left.set_ylabel("count")
    left.set_title("threshold sweep")
    left.legend()
    if len(distances):
        right.hist(distances, bins=60, color="steelblue")
    right.axvline(threshold, color="crimson", linestyle="--")
    right.set_xlabel("cosine distance of found pairs")
    right.set_ylabel("pairs")
    right.set_title("pair distances")
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def histogram_plot(
    values: np.ndarray,
    threshold: float,
    path: Path,
    title: str,
    xlabel: str,
    removes: str = "below",
) -> None:
    """Histogram of one score with its threshold as a vertical line and the removed side shaded.

    ``removes="below"``: values < threshold are removed; ``"above"``: values > threshold.
    NaN values are left out; the legend gives the kept and removed counts.
    """
    if removes not in ("below", "above"):
        raise ValueError(f"removes must be 'below' or 'above', not {removes!r}")
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    removed = int((values < threshold).sum() if removes == "below" else (values > threshold).sum())
    kept = int(values.size - removed)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if values.size:
        # the bins span the threshold too, so its line always falls inside the plotted range
        low, high = min(float(values.min()), threshold), max(float(values.max()), threshold)
        if high <= low:
            low, high = low - 0.5, high + 0.5
        bins = np.linspace(low, high, 61)
        axes.hist(values, bins=bins, color="steelblue", label=f"{values.size} images, kept: {kept}")
    else:
        low, high = threshold - 1.0, threshold + 1.0
        axes.text(0.5, 0.5, "no values", transform=axes.transAxes, ha="center", va="center")
    pad = 0.02 * (high - low)
    axes.set_xlim(low - pad, high + pad)
    share = f" ({100 * removed / values.size:.1f}%)" if values.size else ""
    side = (low - pad, threshold) if removes == "below" else (threshold, high + pad)
    axes.axvspan(*side, color="crimson", alpha=0.12, label=f"removed: {removed}{share}")
    axes.axvline(threshold, color="crimson", linestyle="--", label=f"threshold {threshold:g} ({removes})")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("images")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def cluster_sizes_plot(sizes_per_level: list[np.ndarray], path: Path) -> None:
    """Images per cluster at each level, sorted largest first (log scale): how skewed the pool is."""
    figure, ax = plt.subplots(figsize=(7, 4))
    for level, sizes in enumerate(sizes_per_level, start=1):
        ordered = np.sort(np.asarray(sizes))[::-1]
        ax.plot(
            np.arange(1, len(ordered) + 1), np.maximum(ordered, 0.5), label=f"level {level} ({len(ordered)})"
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cluster rank")
    ax.set_ylabel("images in cluster")
    ax.set_title("Cluster sizes per level")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
