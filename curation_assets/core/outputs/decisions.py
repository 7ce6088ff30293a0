"""The curation decisions: one row per inventoried file, what happens to it and every reason why.

Stages are applied in the walkthroughs' order: sanitize, exact duplicates, near duplicates,
decontamination (near-copies of an evaluation set's images, when the project names one),
content filters, sampling. ``stage`` names the first stage that removes an image (the
funnel counts it there, once); ``reasons`` lists every reason that applies, so a reviewer
also sees that a near duplicate was blurred too. A duplicate always points at an image that
is kept, or at the image that stands for its group (a near-duplicate keeper that is itself an
exact copy points on to the exact group's keeper).

Actions: ``keep``, ``keep_with_fix`` (kept, and export/apply change its pixels or file:
sanitize fixes, EXIF or model rotation), ``remove``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import polars as pl

from curation_assets.core.outputs.reasons import Status

KEEP, KEEP_WITH_FIX, REMOVE = "keep", "keep_with_fix", "remove"
STAGES = ("sanitize", "exact_dedup", "near_dedup", "decontamination", "filters", "sampling")
FUNNEL_LABELS = {
    "sanitize": "after sanitize",
    "exact_dedup": "after exact duplicates",
    "near_dedup": "after near duplicates",
    "decontamination": "after decontamination",
    "filters": "after content filters",
    "sampling": "after balanced sampling",
}


@dataclass(frozen=True)
class DecisionInputs:
    """What the stages decided; a stage that is off is None."""

    inventory: pl.DataFrame  # image_id, shard, split, rel_path, source_path, offset, size_bytes, content_hash
    sanitized: pl.DataFrame  # image_id, status, reasons, fixes, width, height
    exact: pl.DataFrame | None = None  # image_id, is_keeper, keeper_id, match
    near: pl.DataFrame | None = None  # image_id, is_keeper, keeper_id, distance
    filters: pl.DataFrame | None = None  # image_id, removed, removed_by, scores, rotate
    # image_id (+ cluster columns; with seed sets sampled_by, seed_set, seed_image,
    # retrieval_similarity, retrieval_cluster) of the curated sample
    sample: pl.DataFrame | None = None
    # image_id, reference_set, reference_image, distance (one row per image and evaluation set);
    # last, so that positional callers of the earlier fields are unaffected
    contamination: pl.DataFrame | None = None


def root_relative_paths(inventory: pl.DataFrame, roots: Mapping[str, str], input_kind: str) -> pl.Series:
    """Each file's path relative to its split root (a tar member: ``<tar shard>/<member>``).

    This is what an exported tree and the apply job's backup tree mirror.
    """
    if input_kind == "webdataset":
        return (inventory["shard"] + "/" + inventory["rel_path"]).alias("root_path")
    return pl.Series(
        "root_path",
        [
            os.path.relpath(source, roots[split]) if split in roots else rel
            for source, split, rel in inventory.select("source_path", "split", "rel_path").iter_rows()
        ],
        dtype=pl.String,
    )


def _duplicate_columns(inputs: DecisionInputs) -> pl.DataFrame:
    """image_id -> exact/near flags, who it duplicates (resolved to a standing image) and the distance."""
    frame = inputs.inventory.select("image_id")
    exact_keeper: dict[str, str] = {}
    if inputs.exact is not None and inputs.exact.height:
        removed = inputs.exact.filter(~pl.col("is_keeper"))
        exact_keeper = dict(removed.select("image_id", "keeper_id").iter_rows())
        frame = frame.join(
            removed.select("image_id", exact_of="keeper_id", exact_match="match"), on="image_id", how="left"
        )
    else:
        frame = frame.with_columns(exact_of=pl.lit(None, pl.String), exact_match=pl.lit(None, pl.String))
    if inputs.near is not None and inputs.near.height:
        removed = inputs.near.filter(~pl.col("is_keeper")).select(
            "image_id", near_of="keeper_id", near_distance="distance"
        )
        # the near keeper may be an exact copy that exact dedup removed: point at what stands for it
        removed = removed.with_columns(
            near_of=pl.col("near_of").replace_strict(exact_keeper, default=pl.col("near_of"))
        )
        frame = frame.join(removed, on="image_id", how="left")
    else:
        frame = frame.with_columns(near_of=pl.lit(None, pl.String), near_distance=pl.lit(None, pl.Float32))
    return frame


def build_decisions(
    inputs: DecisionInputs, roots: Mapping[str, str], input_kind: str = "directory"
) -> pl.DataFrame:
    """One row per inventoried file: action, first removing stage, every reason, fixes, scores."""
    inv = inputs.inventory.select(
        "image_id", "shard", "split", "rel_path", "source_path", "offset", "size_bytes", "content_hash"
    ).with_columns(root_relative_paths(inputs.inventory, roots, input_kind))
    sanitized = inputs.sanitized.select(
        "image_id",
        pl.col("status").alias("sanitize_status"),
        pl.col("reasons").alias("sanitize_reasons"),
        pl.col("fixes").alias("sanitize_fixes"),
        "width",
        "height",
    )
    frame = inv.join(sanitized, on="image_id", how="left").join(
        _duplicate_columns(inputs), on="image_id", how="left"
    )
    if inputs.filters is not None:
        scores = inputs.filters.drop([c for c in ("content_hash",) if c in inputs.filters.columns])
        frame = frame.join(
            scores.rename({"removed": "filter_removed", "removed_by": "filter_removed_by"}),
            on="image_id",
            how="left",
        )
    else:
        frame = frame.with_columns(
            filter_removed=pl.lit(None, pl.Boolean), filter_removed_by=pl.lit(None, pl.List(pl.String))
        )
    if inputs.contamination is not None:
        frame = frame.join(_contamination_columns(inputs.contamination), on="image_id", how="left")
    if "rotate" not in frame.columns:
        frame = frame.with_columns(rotate=pl.lit(0, pl.Int64))
    sampled = inputs.sample is not None
    if sampled:
        sample = inputs.sample.group_by("image_id", maintain_order=True).agg(
            pl.len().alias("times_sampled"),
            *(pl.col(c).first() for c in inputs.sample.columns if c != "image_id"),
        )
        frame = frame.join(sample, on="image_id", how="left")
    return _decide(frame, sampled)


def _contamination_columns(matches: pl.DataFrame) -> pl.DataFrame:
    """image_id -> the sets it is a near-copy from (sorted), and its closest reference image and distance."""
    return (
        matches.sort("distance", "reference_set")
        .group_by("image_id", maintain_order=True)
        .agg(
            contamination_sets=pl.col("reference_set").unique().sort(),
            contamination_set=pl.col("reference_set").first(),
            contamination_of=pl.col("reference_image").first(),
            contamination_distance=pl.col("distance").first(),
        )
    )


def _decide(frame: pl.DataFrame, sampled: bool) -> pl.DataFrame:
    rejected = pl.col("sanitize_status").fill_null(Status.REJECTED) == Status.REJECTED
    exact = pl.col("exact_of").is_not_null()
    near = pl.col("near_of").is_not_null()
    filtered = pl.col("filter_removed").fill_null(False)
    # the columns exist only when the project decontaminates: without references nothing changes
    decontaminate = "contamination_sets" in frame.columns
    contaminated = pl.col("contamination_sets").is_not_null() if decontaminate else pl.lit(False)
    # only an image still in when sampling ran can be "not drawn"; an earlier removal never
    # reached the sampler, so calling it not_sampled would overcount that stage's reason
    reached_sampling = ~(rejected | exact | near | contaminated | filtered)
    not_sampled = (pl.col("times_sampled").is_null() & reached_sampling) if sampled else pl.lit(False)
    stage = (
        pl.when(rejected)
        .then(pl.lit("sanitize"))
        .when(exact)
        .then(pl.lit("exact_dedup"))
        .when(near)
        .then(pl.lit("near_dedup"))
        .when(contaminated)
        .then(pl.lit("decontamination"))
        .when(filtered)
        .then(pl.lit("filters"))
        .when(not_sampled)
        .then(pl.lit("sampling"))
        .otherwise(pl.lit(None, pl.String))
    )
    rotate = pl.col("rotate").fill_null(0)
    fixes = pl.concat_list(
        pl.col("sanitize_fixes").fill_null(pl.lit([], pl.List(pl.String))),
        pl.when(rotate != 0)
        .then(pl.concat_list(pl.format("rotate:{}", rotate)))
        .otherwise(pl.lit([], pl.List(pl.String))),
    )
    reasons = pl.concat_list(
        pl.when(rejected)
        .then(
            pl.col("sanitize_reasons")
            .fill_null(pl.lit(["not_sanitized"], pl.List(pl.String)))
            .list.eval(pl.format("sanitize:{}", pl.element()))
        )
        .otherwise(pl.lit([], pl.List(pl.String))),
        _when_list(exact, "exact_duplicate"),
        _when_list(near, "near_duplicate"),
        *(
            [
                pl.when(contaminated)
                .then(pl.col("contamination_sets").list.eval(pl.format("contamination:{}", pl.element())))
                .otherwise(pl.lit([], pl.List(pl.String)))
            ]
            if decontaminate
            else []
        ),
        pl.when(filtered)
        .then(pl.col("filter_removed_by").list.eval(pl.format("filter:{}", pl.element())))
        .otherwise(pl.lit([], pl.List(pl.String))),
        _when_list(not_sampled, "not_sampled"),
    )
    frame = frame.with_columns(stage=stage, fixes=fixes, reasons=reasons)
    action = (
        pl.when(pl.col("stage").is_not_null())
        .then(pl.lit(REMOVE))
        .when(pl.col("fixes").list.len() > 0)
        .then(pl.lit(KEEP_WITH_FIX))
        .otherwise(pl.lit(KEEP))
    )
    frame = frame.with_columns(action=action)
    return frame.with_columns(explanation=_explanations(frame)).select(
        "image_id", "action", "stage", "reasons", "explanation", "fixes", *_rest(frame)
    )


def _when_list(condition: pl.Expr, value: str) -> pl.Expr:
    return (
        pl.when(condition).then(pl.lit([value], pl.List(pl.String))).otherwise(pl.lit([], pl.List(pl.String)))
    )


def _rest(frame: pl.DataFrame) -> list[str]:
    first = {"image_id", "action", "stage", "reasons", "explanation", "fixes"}
    return [c for c in frame.columns if c not in first]


def _explanations(frame: pl.DataFrame) -> pl.Series:
    """A sentence per image a reviewer can read without looking anything up."""
    out = []
    margin_columns = [c for c in frame.columns if c.endswith("_margin")]
    for row in frame.iter_rows(named=True):
        parts = []
        if row["stage"] == "sanitize" or row.get("sanitize_status") is None:
            reasons = row.get("sanitize_reasons") or ["not sanitized yet"]
            parts.append("rejected by sanitize: " + ", ".join(reasons))
        if row.get("exact_of"):
            parts.append(f"exact duplicate ({row.get('exact_match')}) of {row['exact_of']}")
        if row.get("near_of"):
            distance = row.get("near_distance")
            at = f" at distance {distance:.4f}" if distance is not None else " (chained)"
            parts.append(f"near duplicate of {row['near_of']}{at}")
        if row.get("contamination_of"):
            others = [s for s in row["contamination_sets"] if s != row["contamination_set"]]
            also = f" (also near images of {', '.join(others)})" if others else ""
            parts.append(
                f"near-copy of evaluation image {row['contamination_of']} of reference set "
                f"{row['contamination_set']} at distance {row['contamination_distance']:.4f}{also}"
            )
        for name in row.get("filter_removed_by") or []:
            parts.append(f"filtered by {name}" + _margin_text(row, name, margin_columns))
        if row.get("times_sampled") is None and row["stage"] == "sampling":
            parts.append("not sampled (balanced sampling budget)")
        if row.get("sampled_by") == "retrieval" and row["stage"] is None:
            # kept for being near a seed image, not drawn by the balanced sample
            parts.append(
                f"retrieved from seed set {row['seed_set']} (seed image {row['seed_image']}, "
                f"similarity {row['retrieval_similarity']:.4f})"
            )
        if row["fixes"]:
            parts.append("fixes: " + ", ".join(row["fixes"]))
        out.append("; ".join(parts) if parts else "kept")
    return pl.Series("explanation", out, dtype=pl.String)


def _margin_text(row: dict, rule: str, margin_columns: list[str]) -> str:
    # rule names are "<kind>:<detail>"; the score column of each is recorded as "<column>_margin"
    for column in margin_columns:
        value = row.get(column)
        score = column.removesuffix("_margin")
        if value is not None and value > 0 and _rule_column(rule) == score:
            return f" ({score} {row.get(score):.4g}, past the threshold by {value:.4g})"
    return ""


_RULE_COLUMNS = {
    "aesthetic": "aesthetic",
    "quality:dark": "brightness_p99",
    "quality:light": "brightness_p5",
    "quality:low_information": "entropy",
    "quality:blur": "blur",
    "quality:grayscale": "colorfulness",
}


def _rule_column(rule: str) -> str:
    if rule.startswith("example:"):
        return "dist_" + rule.removeprefix("example:")
    return _RULE_COLUMNS.get(rule, rule)


def survivors(decisions: pl.DataFrame) -> pl.DataFrame:
    """Images no stage removed (before sampling): what clustering and sampling work on."""
    return decisions.filter(pl.col("action") != REMOVE)


def decision_funnel(decisions: pl.DataFrame, stages: list[str]) -> list[dict]:
    """Images in, removed at each stage (first removal only) and left, in the walkthroughs' order.

    ``stages`` are the stages the project runs (sanitize always); files that are not images
    are counted apart from "images in".
    """
    not_images = decisions.filter(pl.col("reasons").list.contains("sanitize:not_an_image")).height
    left = decisions.height - not_images
    rows = [{"step": "images in", "removed": 0, "left": left, "not_images": not_images}]
    counts = dict(decisions.group_by("stage").len().iter_rows())
    for stage in STAGES:
        if stage not in stages:
            continue
        removed = counts.get(stage, 0) - (not_images if stage == "sanitize" else 0)
        left -= removed
        rows.append({"step": FUNNEL_LABELS[stage], "removed": removed, "left": left})
    return rows


def funnel_line(rows: list[dict]) -> str:
    return " -> ".join(f"{row['left']:,}" for row in rows)
