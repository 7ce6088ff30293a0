"""The funnel: how many images each stage takes out, the way the walkthroughs tell it."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from curation_assets.core.outputs.reasons import Reason, Status


@dataclass
class Funnel:
    files_in: int
    not_images: int
    rejected_by_reason: dict[str, int]  # rejected images (not_an_image excluded), per reason
    rejected: int
    fixable: int
    exact_duplicates: int
    near_duplicates: int | None = None  # None: the stage is not part of the project
    steps: list[tuple[str, int]] = field(default_factory=list)  # (stage, images left after it)

    @property
    def kept(self) -> int:
        return self.steps[-1][1] if self.steps else 0


def build_funnel(
    sanitized: pl.DataFrame, exact: pl.DataFrame | None, near: pl.DataFrame | None = None
) -> Funnel:
    """Funnel over sanitize, exact- and near-duplicate results (later stages add their own steps).

    An image removed by two stages counts at the first one only.
    """
    not_image = sanitized["reasons"].list.contains(str(Reason.NOT_AN_IMAGE))
    images = sanitized.filter(~not_image)
    rejected = images.filter(pl.col("status") == Status.REJECTED)
    by_reason = dict(
        rejected.explode("reasons").group_by("reasons").len().sort("len", descending=True).iter_rows()
    )
    usable = set(images.filter(pl.col("status") != Status.REJECTED)["image_id"])
    exact_removed = _removed(exact) & usable
    near_removed = _removed(near) & usable - exact_removed
    after_sanitize = len(images) - len(rejected)
    steps = [
        ("images in", len(images)),
        ("after sanitize", after_sanitize),
        ("after exact duplicates", after_sanitize - len(exact_removed)),
    ]
    if near is not None:
        steps.append(("after near duplicates", steps[-1][1] - len(near_removed)))
    return Funnel(
        files_in=len(sanitized),
        not_images=int(not_image.sum()),
        rejected_by_reason=by_reason,
        rejected=len(rejected),
        fixable=int((images["status"] == Status.FIXABLE).sum()),
        exact_duplicates=len(exact_removed),
        near_duplicates=None if near is None else len(near_removed),
        steps=steps,
    )


def _removed(groups: pl.DataFrame | None) -> set[str]:
    if groups is None or groups.is_empty():
        return set()
    return set(groups.filter(~pl.col("is_keeper"))["image_id"])


def format_funnel(funnel: Funnel, title: str = "") -> str:
    """The funnel as text: '5,908,775 -> ... -> 3,000,000' plus the reasons."""
    lines = [title] if title else []
    lines.append(f"files found:               {funnel.files_in:>10,}")
    lines.append(f"  not images:              {funnel.not_images:>10,}")
    lines.append(f"images in:                 {funnel.steps[0][1]:>10,}")
    lines.append(f"  rejected by sanitize:    {funnel.rejected:>10,}")
    for reason, count in funnel.rejected_by_reason.items():
        lines.append(f"    {reason:<23}{count:>10,}")
    lines.append(f"  fixable (kept, fixed on export): {funnel.fixable:,}")
    lines.append(f"  exact duplicates:        {funnel.exact_duplicates:>10,}")
    if funnel.near_duplicates is not None:
        lines.append(f"  near duplicates:         {funnel.near_duplicates:>10,}")
    lines.append(f"kept:                      {funnel.kept:>10,}")
    lines.append("funnel: " + " -> ".join(f"{count:,}" for _, count in funnel.steps))
    return "\n".join(lines)
