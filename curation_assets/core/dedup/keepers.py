"""Keeper policies: which member of a duplicate group stays, decided the same way everywhere.

- ``quality``: the biggest, cleanest copy: most pixels, then larger file, then higher
  quality score when one is given, then fewest sanitize findings (ok before fixable),
  then path. Deterministic, never random. (Exact duplicates share their pixels, so there
  the file size and the findings decide.)
- ``alphabetical``: the first image_id.
- ``random``: a seeded draw that does not depend on row order (a hash of seed and id).
"""

from __future__ import annotations

from typing import Literal

import polars as pl

KeeperPolicy = Literal["quality", "alphabetical", "random"]

# (column, higher is better) in priority order for the quality policy; absent columns are skipped.
QUALITY_ORDER: tuple[tuple[str, bool], ...] = (
    ("pixels", True),
    ("size_bytes", True),
    ("quality_score", True),
    ("n_findings", False),
)

KEEPER_EXPLANATION: dict[str, str] = {
    "quality": "most pixels, then largest file, then best quality score, then fewest sanitize findings, "
    "then first image_id",
    "alphabetical": "first image_id in sorted order",
    "random": "seeded random draw",
}


def order_for_keeping(frame: pl.DataFrame, policy: KeeperPolicy, seed: int = 0) -> pl.DataFrame:
    """``frame`` sorted so that, within any group, the first row is the keeper."""
    if policy == "alphabetical":
        return frame.sort("image_id")
    if policy == "random":
        draw = pl.concat_str(pl.lit(f"{seed}:"), pl.col("image_id")).hash(seed=seed)
        return frame.with_columns(_draw=draw).sort("_draw", "image_id").drop("_draw")
    if policy == "quality":
        present = [(c, better_high) for c, better_high in QUALITY_ORDER if c in frame.columns]
        return frame.sort(
            [c for c, _ in present] + ["image_id"],
            descending=[high for _, high in present] + [False],
            nulls_last=True,
        )
    raise ValueError(f"unknown keeper policy {policy!r}; allowed: quality, alphabetical, random")
