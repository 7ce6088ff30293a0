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
