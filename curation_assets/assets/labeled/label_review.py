"""Labels and review: `label_issues` -> `review_manifest` (+ the review page) -> `cleaning_outputs`.

- `label_issues` (global): per labeled split, k-NN label disagreement in the semantic
  embedding space: mislabel candidates with a suggested label, outliers and ambiguous images
  (curation_assets/core/labeled/labels.py).
- `review_manifest` (global): every image some machine flagged (leaks, label issues, exact
  and near duplicates, quality filters, corrupt files, another tool's flags) with the tag
  taxonomy and a proposed action, merged with the reviewer's exported decisions (humans
  win); the static review page is written next to it.
- `cleaning_outputs` (global): the removal list, relabel map and final manifest that
  :class:`curation_assets.torch_dataset.CuratedImageFolder` applies in training code.
"""

from pathlib import Path

import dagster as dg
import polars as pl

from curation_assets.assets.common import GPU_STEP_TAGS, RateLogger, asset_key, group_name, md_table
from curation_assets.assets.dedup.exact_duplicates import processed_shards
from curation_assets.assets.filters.filter_decisions import filter_rules, score_assets
from curation_assets.assets.keys import (
    CLEANING,
    EXACT,
    FILTER_DECISIONS,
    GROUPS,
    INVENTORY,
    LABEL_ISSUES,
    LEAKS,
    REVIEW,
    SANITIZED,
    SEMANTIC_EMBEDDINGS,
)
from curation_assets.assets.labeled.labeled_data import all_images, kept, semantic_matrix, with_labels
from curation_assets.config import ProjectConfig
from curation_assets.core.labeled import labels as label_core
from curation_assets.core.labeled.cleaning import cleaning_outputs as write_cleaning_outputs
from curation_assets.core.labeled.cleaning import final_actions
from curation_assets.core.labeled.review import (
    TAGS,
    build_review_manifest,
    merge_human_decisions,
    write_review_page,
)
from curation_assets.core.outputs.reasons import Reason
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import ProjectStore, StoreResource

REVIEW_PAGE = "review.html"
CHECK_ONE_ROW = "one_row_per_image"
CHECK_KNOWN_TAGS = "tags_in_the_taxonomy"
CHECK_FILES_MATCH = "files_match_the_final_manifest"
EXAMPLES = 10
# Sanitize rejections that mean the file itself is broken (shown as low_quality_corrupt): a
# training loader would crash on them. Geometry or format-policy rejections are not defects of
# the file and are left to the curation decisions.
CORRUPT_REASONS: tuple[str, ...] = (
    Reason.TRUNCATED,
    Reason.DECODE_ERROR,
    Reason.UNRECOGNIZED_FORMAT,
    Reason.EMPTY_FILE,
    Reason.UNREADABLE,
)
FLAGS_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String(),
    "source": pl.String(),
    "flag": pl.String(),
    "detail": pl.String(),
    "confidence": pl.Float64(),
    "suggested_label": pl.String(),
}


def label_issues_path(store: ProjectStore) -> Path:
    return store.global_path(LABEL_ISSUES, f"{LABEL_ISSUES}.parquet")


def manifest_path(store: ProjectStore) -> Path:
    return store.global_path(REVIEW, f"{REVIEW}.parquet")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- label_issues


def _issue_examples(table: pl.DataFrame) -> dict[str, dg.MetadataValue]:
    mislabels = table.filter(pl.col("is_mislabel")).sort("label_confidence").head(EXAMPLES)
    outliers = table.filter(pl.col("is_outlier")).sort("outlier_score", descending=True).head(EXAMPLES)
    ambiguous = table.filter(pl.col("is_ambiguous")).sort("suggested_confidence").head(EXAMPLES)
    return {
        "mislabel_examples": md_table(
            {
                "split": r["split"],
                "image_id": r["image_id"],
                "given": r["given_label"],
                "suggested": r["suggested_label"],
                "given_support": _fmt(r["label_confidence"]),
                "suggested_support": _fmt(r["suggested_confidence"]),
            }
            for r in mislabels.iter_rows(named=True)
        ),
        "outlier_examples": md_table(
            {
                "split": r["split"],
                "image_id": r["image_id"],
                "label": r["given_label"],
                "knn_distance": _fmt(r["knn_distance"]),
                "robust_sigmas": _fmt(r["outlier_score"], 1),
            }
            for r in outliers.iter_rows(named=True)
        ),
        "ambiguous_examples": md_table(
            {
                "split": r["split"],
                "image_id": r["image_id"],
                "label": r["given_label"],
                "top": f"{r['suggested_label']} {_fmt(r['suggested_confidence'], 2)}",
                "runner_up": f"{r['runner_up_label']} {_fmt(r['runner_up_confidence'], 2)}",
            }
            for r in ambiguous.iter_rows(named=True)
        ),
    }


def build_label_issues_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    key = asset_key(project, LABEL_ISSUES)
    stage = project.stages.label_issues
    model_name = project.stages.embeddings.semantic_model

    @dg.asset(
        key=key,
        deps=[
            asset_key(project, INVENTORY),
            asset_key(project, SANITIZED),
            asset_key(project, SEMANTIC_EMBEDDINGS),
        ],
        group_name=group_name(project, "labels"),
        kinds={"faiss", "polars", "parquet"},
        pool="gpu",
        op_tags=GPU_STEP_TAGS,
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_ONE_ROW, asset=key, blocking=True, description="One row per kept image of each split."
            )
        ],
        description=(
            f"Per labeled split ({project.labels.source} labels): the {stage.k} nearest neighbours in the "
            f"semantic embedding space (`{model_name}`) vote for a label. Mislabel candidates (another label "
            f"wins, the given one has < {stage.mislabel_threshold} of the vote) with a suggested label; "
            f"outliers (k-NN distance > class median + {stage.outlier_factor} robust sigmas); ambiguous "
            f"images (top two labels within {stage.ambiguity_margin})."
        ),
    )
    def label_issues(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        shards = processed_shards(context, project, project_store, SANITIZED)
        images, label_stats = with_labels(project, all_images(project_store, shards))
        pool = kept(images)
        on_gpu = compute.settings().device.type == "cuda"
        parts, per_split = [], []
        for split in sorted(pool["split"].drop_nulls().unique().to_list()):
            part = pool.filter(pl.col("split") == split)
            if part["label"].is_null().all():
                context.log.info(f"split {split}: no labels, no label issues")
                continue
            vectors, has_vector = semantic_matrix(project_store, shards, part["image_id"], model_name)
            try:
                issues = label_core.label_issues(
                    vectors,
                    part["label"].to_list(),
                    image_ids=part["image_id"].to_list(),
                    k=stage.k,
                    mislabel_threshold=stage.mislabel_threshold,
                    outlier_factor=stage.outlier_factor,
                    ambiguity_margin=stage.ambiguity_margin,
                    use_gpu=on_gpu,
                )
            except ValueError as exc:
                raise dg.Failure(f"stages.label_issues ({split}): {exc}") from None
            summary = label_core.label_issue_summary(issues)
            per_split.append(
                {
                    "split": split,
                    "images": summary["images"],
                    "labeled": int(part["label"].is_not_null().sum()),
                    "classes": part["label"].drop_nulls().n_unique(),
                    "mislabel": summary["mislabel_candidates"],
                    "outlier": summary["outlier_candidates"],
                    "ambiguous": summary["ambiguous_candidates"],
                    "no_vector": int((~has_vector).sum()),
                }
            )
            context.log.info(f"split {split}: {per_split[-1]}")
            parts.append(issues.select(pl.lit(split, pl.String()).alias("split"), pl.all()))
        schema = {"split": pl.String(), **label_core.LABEL_ISSUES_SCHEMA}
        table = pl.concat(parts) if parts else pl.DataFrame(schema=schema)
        path = project_store.write_parquet(
            table,
            label_issues_path(project_store),
            metadata={"thresholds": stage.model_dump(mode="json"), "model": model_name, "shards": shards},
        )
        totals = {
            flag: sum(row[flag] for row in per_split)
            for flag in ("mislabel", "outlier", "ambiguous", "no_vector")
        }
        return dg.MaterializeResult(
            metadata={
                **label_stats,
                **{f"{flag}_candidates": count for flag, count in totals.items() if flag != "no_vector"},
                "images_without_vector": totals["no_vector"],
                "per_split": md_table(per_split),
                **_issue_examples(table),
                "k": stage.k,
                "mislabel_threshold": stage.mislabel_threshold,
                "outlier_factor": stage.outlier_factor,
                "ambiguity_margin": stage.ambiguity_margin,
                "semantic_model": model_name,
                "dagster/row_count": table.height,
                "path": dg.MetadataValue.path(str(path)),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=CHECK_ONE_ROW,
                    passed=table.select(pl.col("image_id").n_unique()).item() == table.height,
                    metadata={"rows": table.height},
                )
            ],
        )

    return label_issues


# ----------------------------------------------------------------------------- review_manifest


def _flags(frame: pl.DataFrame, **columns: pl.Expr) -> pl.DataFrame:
    """A flag table in FLAGS_SCHEMA from ``frame`` and one expression per column (missing: null)."""
    exprs = {name: columns.get(name, pl.lit(None)).cast(dtype) for name, dtype in FLAGS_SCHEMA.items()}
    return frame.select(**exprs)


def leak_flags(table: pl.DataFrame) -> pl.DataFrame:
    """Both images of every leak pair, so the reviewer can drop either copy.

    Which copy goes is the project's call: benchmarks usually keep the test split fixed and
    drop the training copy (ImageNet, CIFAR), a new split may drop the test copy instead.
    """
    hamming = (
        pl.when(pl.col("hamming_distance").is_not_null())
        .then(pl.lit(", hamming ") + pl.col("hamming_distance").cast(pl.String))
        .otherwise(pl.lit(""))
    )
    similarity = pl.lit(", similarity ") + pl.col("similarity").round(4).cast(pl.String) + hamming

    def side(image: str, other: str, other_split: str, words: str) -> pl.DataFrame:
        return _flags(
            table,
            image_id=pl.col(image),
            source=pl.lit("leak"),
            flag=pl.col("method"),
            detail=pl.concat_str(
                pl.lit(words), pl.col(other), pl.lit(" ("), pl.col(other_split), pl.lit(")"), similarity
            ),
            # no confidence: the manifest's confidence is the best one of the image's flags, shown
            # beside the suggested label; a copy's similarity there would read as the label's
        )

    return pl.concat(
        [
            side("test_image", "train_image", "train_split", "copy of "),
            side("train_image", "test_image", "test_split", "copied as "),
        ]
    )


def label_flags(table: pl.DataFrame) -> pl.DataFrame:
    """Mislabel (with the suggested label and its share of the vote), outlier and ambiguous flags."""
    mislabel = _flags(
        table.filter(pl.col("is_mislabel")),
        image_id=pl.col("image_id"),
        source=pl.lit("label"),
        flag=pl.lit("mislabel"),
        detail=pl.format(
            "labeled {} ({} of the vote); neighbours vote {}",
            pl.col("given_label"),
            pl.col("label_confidence").round(3),
            pl.col("suggested_label"),
        ),
        # the suggestion's share of the vote: >= review.confirm_at makes it mislabel_confirmed
        confidence=pl.col("suggested_confidence"),
        suggested_label=pl.col("suggested_label"),
    )
    outlier = _flags(
        table.filter(pl.col("is_outlier")),
        image_id=pl.col("image_id"),
        source=pl.lit("label"),
        flag=pl.lit("outlier"),
        detail=pl.format(
            "k-NN distance {}, {} robust sigmas above class {}",
            pl.col("knn_distance").round(3),
            pl.col("outlier_score").round(1),
            pl.col("given_label").fill_null("(unlabeled)"),
        ),
    )
    ambiguous = _flags(
        table.filter(pl.col("is_ambiguous")),
        image_id=pl.col("image_id"),
        source=pl.lit("label"),
        flag=pl.lit("ambiguous"),
        detail=pl.format(
            "{} {} vs {} {}",
            pl.col("suggested_label"),
            pl.col("suggested_confidence").round(2),
            pl.col("runner_up_label"),
            pl.col("runner_up_confidence").round(2),
        ),
    )
    return pl.concat([mislabel, outlier, ambiguous])


def duplicate_flags(groups: pl.DataFrame, flag: str) -> pl.DataFrame:
    """Every non-keeper of a duplicate group (exact_duplicates or duplicate_groups)."""
    copies = groups.filter(~pl.col("is_keeper"))
    if flag == "duplicate_exact":
        detail = pl.format("{} copy of {}", pl.col("match"), pl.col("keeper_id"))
    else:
        detail = pl.concat_str(
            pl.lit("near copy of "),
            pl.col("keeper_id"),
            pl.when(pl.col("distance").is_not_null())
            .then(pl.lit(", distance ") + pl.col("distance").round(3).cast(pl.String))
            .otherwise(pl.lit("")),
        )
    return _flags(
        copies, image_id=pl.col("image_id"), source=pl.lit("duplicate"), flag=pl.lit(flag), detail=detail
    )


def quality_flags(decisions: pl.DataFrame, project: ProjectConfig) -> pl.DataFrame:
    """Images a quality:* filter removes, flagged by the filter's name (blur -> low_quality_blur)."""
    rules = {rule.name: rule for rule in filter_rules(project)}
    removed = (
        decisions.select("image_id", rule=pl.col("removed_by"))
        .explode("rule")
        .filter(pl.col("rule").str.starts_with("quality:"))
    )
    described = {
        name: f"{rule.column} {rule.removes} threshold {rule.threshold}" for name, rule in rules.items()
    }
    return _flags(
        removed,
        image_id=pl.col("image_id"),
        source=pl.lit("quality"),
        flag=pl.col("rule").str.strip_prefix("quality:"),
        detail=pl.col("rule").replace_strict(described, default=None, return_dtype=pl.String),
    )


def corrupt_flags(images: pl.DataFrame) -> pl.DataFrame:
    """Files sanitize rejected as broken; the flag's "corrupt" maps to low_quality_corrupt."""
    broken = (
        images.filter(pl.col("status") == "rejected")
        .select("image_id", "detail", reason=pl.col("reasons"))
        .explode("reason")
        .filter(pl.col("reason").is_in([str(r) for r in CORRUPT_REASONS]))
    )
    return _flags(
        broken,
        image_id=pl.col("image_id"),
        source=pl.lit("sanitize"),
        flag=pl.lit("corrupt:") + pl.col("reason"),
        detail=pl.col("detail"),
    )


def external_flags(project: ProjectConfig, images: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """The external tool's flags tied to image_ids; (flags, match counts)."""
    config = project.external_flags
    assert config.path is not None
    try:
        raw = label_core.read_external_flags(config.path, config.mapping or None)
        matched = label_core.match_flags(raw, images)
    except (OSError, ValueError) as exc:
        raise dg.Failure(f"external_flags ({config.path}): {exc}") from None
    counts = matched.group_by("matched_by").len()
    stats = {f"external_{k}": int(v) for k, v in zip(counts["matched_by"], counts["len"], strict=True)}
    found = matched.filter(pl.col("image_id").is_not_null())
    reason = pl.col("reason").fill_null("")
    label = pl.when(pl.col("label").is_not_null()).then(pl.lit(" (label ") + pl.col("label") + pl.lit(")"))
    flags = _flags(
        found,
        image_id=pl.col("image_id"),
        source=pl.lit("external"),
        flag=pl.col("issue_type"),
        detail=pl.concat_str(reason, label.otherwise(pl.lit(""))),
        confidence=pl.col("confidence"),
        suggested_label=pl.col("suggested_label"),
    )
    return flags.filter(pl.col("flag").is_not_null()), stats


def _read(store: ProjectStore, path: Path) -> pl.DataFrame | None:
    return store.read_parquet(path) if path.is_file() else None


def review_inputs(project: ProjectConfig) -> list[str]:
    """The global assets whose findings the review manifest folds in (those the project has)."""
    stages = project.stages
    inputs = []
    inputs += [LEAKS] if stages.train_test_leaks.enabled else []
    inputs += [LABEL_ISSUES] if stages.label_issues.enabled else []
    inputs += [EXACT] if stages.exact_dedup.enabled else []
    inputs += [GROUPS] if stages.near_dedup.enabled else []
    inputs += [FILTER_DECISIONS] if score_assets(project) else []
    return inputs


def machine_flags(
    project: ProjectConfig, store: ProjectStore, images: pl.DataFrame, log: dg.DagsterLogManager
) -> tuple[pl.DataFrame, dict[str, int], list[str]]:
    """Every machine flag as one long table; (flags, flags per source, inputs not written yet)."""
    found: dict[str, pl.DataFrame] = {}
    missing: list[str] = []
    readers = {
        LEAKS: (store.global_path(LEAKS, f"{LEAKS}.parquet"), leak_flags),
        LABEL_ISSUES: (label_issues_path(store), label_flags),
        EXACT: (
            store.global_path(EXACT, f"{EXACT}.parquet"),
            lambda t: duplicate_flags(t, "duplicate_exact"),
        ),
        GROUPS: (
            store.global_path(GROUPS, f"{GROUPS}.parquet"),
            lambda t: duplicate_flags(t, "duplicate_near"),
        ),
        FILTER_DECISIONS: (
            store.global_path(FILTER_DECISIONS, f"{FILTER_DECISIONS}.parquet"),
            lambda t: quality_flags(t, project),
        ),
    }
    for name in review_inputs(project):
        path, to_flags = readers[name]
        table = _read(store, path)
        if table is None:
            # Review what exists rather than fail: the page is useful before every stage ran.
            log.warning(f"{name} is not materialized yet: its flags are missing from the review")
            missing.append(name)
            continue
        found[name] = to_flags(table)
    found[SANITIZED] = corrupt_flags(images)
    stats: dict[str, int] = {}
    if project.external_flags.path:
        found["external_flags"], stats = external_flags(project, images)
    flags = pl.concat(list(found.values())) if found else pl.DataFrame(schema=FLAGS_SCHEMA)
    # Findings about images no longer in the pool (a shard removed since) cannot be reviewed.
    known = flags.join(images.select("image_id"), on="image_id", how="semi")
    if known.height < flags.height:
        log.warning(f"{flags.height - known.height} flag(s) name images not in the current shards: dropped")
    per_source = {f"flags_{name}": 0 for name in found}
    for name, table in found.items():
        per_source[f"flags_{name}"] = table.join(images.select("image_id"), on="image_id", how="semi").height
    return known, {**per_source, **stats}, missing


def _counts(values: pl.Series) -> list[dict]:
    counts = values.drop_nulls().value_counts(sort=True)
    return [{"value": row[0], "images": int(row[1])} for row in counts.iter_rows()]


def build_review_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    key = asset_key(project, REVIEW)
    config = project.review
    inputs = review_inputs(project)

    @dg.asset(
        key=key,
        deps=[
            asset_key(project, INVENTORY),
            asset_key(project, SANITIZED),
            *(asset_key(project, name) for name in inputs),
        ],
        group_name=group_name(project, "labels"),
        kinds={"polars", "parquet", "html"},
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_ONE_ROW, asset=key, blocking=True, description="One row per flagged image."
            ),
            dg.AssetCheckSpec(
                CHECK_KNOWN_TAGS, asset=key, description="Machine and user tags are in the taxonomy."
            ),
        ],
        description=(
            "Every flagged image with its machine flags ("
            + ", ".join(
                [*inputs, "corrupt files", *(["external flags"] if project.external_flags.path else [])]
            )
            + "), the standard tags and a proposed action, merged with the reviewer's decisions from "
            "review.decisions_csv (humans win). Writes review.html next to it: thumbnails, filters, keyboard "
            "tagging and a CSV export of the decisions."
        ),
    )
    def review_manifest(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        shards = processed_shards(context, project, project_store, SANITIZED)
        images, _ = with_labels(project, all_images(project_store, shards))
        flags, flag_counts, missing = machine_flags(project, project_store, images, context.log)
        try:
            manifest = build_review_manifest(
                flags,
                images.select("image_id", "source_path", "split", "label", "offset", "size_bytes"),
                confirm_at=config.confirm_at,
                auto_remove=config.auto_remove,
                auto_relabel=config.auto_relabel,
            )
        except ValueError as exc:
            raise dg.Failure(f"review manifest: {exc}") from None
        csv_path = Path(config.decisions_csv) if config.decisions_csv else None
        merged_from = csv_path if csv_path is not None and csv_path.is_file() else None
        try:
            manifest = merge_human_decisions(manifest, merged_from)
        except ValueError as exc:  # a decision the manifest cannot hold: fix the CSV, never drop it
            raise dg.Failure(f"review.decisions_csv: {exc}") from None
        path = project_store.write_parquet(
            manifest,
            manifest_path(project_store),
            metadata={"decisions_csv": str(merged_from) if merged_from else None, "shards": shards},
        )
        rate = RateLogger(context.log, "review thumbnails")
        page = write_review_page(
            manifest,
            project_store.asset_dir(REVIEW),
            thumb_side=config.thumb_side,
            title=f"{project.name}: review flagged images",
            progress=rate,
        )
        rate.finish(manifest.height)
        decided = manifest.filter(pl.col("user_action").is_not_null() | (pl.col("user_tags").list.len() > 0))
        if csv_path is None:
            where = "set review.decisions_csv in the project file, then save the page's export there"
        else:
            where = f"save the page's export (review_decisions.csv) as {csv_path}, then re-materialize"
        tags = pl.concat([manifest["machine_tags"].explode(), manifest["user_tags"].explode()]).drop_nulls()
        unknown_tags = sorted(set(tags.to_list()) - set(TAGS))
        return dg.MaterializeResult(
            metadata={
                "flagged_images": manifest.height,
                **flag_counts,
                "machine_tags": md_table(_counts(manifest["machine_tags"].explode())),
                "machine_actions": md_table(_counts(manifest["machine_action"])),
                "human_decisions": decided.height,
                "human_actions": md_table(_counts(manifest["user_action"])),
                "decisions_merged_from": str(merged_from) if merged_from else "none yet",
                "review_page": dg.MetadataValue.path(str(page)),
                "open_page": dg.MetadataValue.url(page.resolve().as_uri()),
                "how_to_review": dg.MetadataValue.md(
                    f"Open `{page}` in a browser, tag with the keyboard, export the decisions, and {where}. "
                    "Human decisions win over machine flags in the manifest and in `cleaning_outputs`."
                ),
                "missing_inputs": ", ".join(missing) or "none",
                "confirm_at": config.confirm_at,
                "auto_remove": ", ".join(config.auto_remove) or "none",
                "auto_relabel": ", ".join(config.auto_relabel) or "none",
                "dagster/row_count": manifest.height,
                "path": dg.MetadataValue.path(str(path)),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=CHECK_ONE_ROW,
                    passed=manifest["image_id"].n_unique() == manifest.height,
                    metadata={"rows": manifest.height},
                ),
                dg.AssetCheckResult(
                    check_name=CHECK_KNOWN_TAGS,
                    passed=not unknown_tags,
                    metadata={"unknown_tags": ", ".join(unknown_tags) or "none"},
                ),
            ],
        )

    return review_manifest


# ----------------------------------------------------------------------------- cleaning_outputs


def usage_note(project: ProjectConfig, paths: dict[str, Path]) -> str:
    """How training code applies the outputs: one CuratedImageFolder per split."""
    lines = ["```python", "from curation_assets.torch_dataset import CuratedImageFolder", ""]
    for split, root in sorted(project.dataset.roots.items()):
        lines += [
            f"{split} = CuratedImageFolder(",
            f'    "{root}",',
            f'    removal_list="{paths["removal_list"]}",',
            f'    relabel_map="{paths["relabel_map"]}",',
            f'    split="{split}",',
            ")",
        ]
    lines.append("```")
    return (
        "Entries are `<split>/<path under the split's root>`; the wrapper drops removed files, applies new "
        "labels and refuses entries that name no file (strict=True).\n\n" + "\n".join(lines)
    )


def build_cleaning_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    key = asset_key(project, CLEANING)

    @dg.asset(
        key=key,
        deps=[asset_key(project, REVIEW)],
        group_name=group_name(project, "labels"),
        kinds={"parquet", "json"},
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_FILES_MATCH,
                asset=key,
                blocking=True,
                description="The removal list and relabel map hold exactly the final manifest's decisions.",
            )
        ],
        description=(
            "The reviewed decisions as files for training code: removal_list.txt, relabel_map.json and "
            "final_manifest.parquet (final action, final label, decided by human or machine). "
            "curation_assets.torch_dataset.CuratedImageFolder applies them to an image folder."
        ),
    )
    def cleaning_outputs(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        manifest = _read(project_store, manifest_path(project_store))
        if manifest is None:
            raise dg.Failure(f"no {REVIEW} at {manifest_path(project_store)}: materialize it first")
        try:
            paths = write_cleaning_outputs(
                manifest, project_store.asset_dir(CLEANING), roots=project.dataset.roots
            )
        except ValueError as exc:
            raise dg.Failure(f"cleaning outputs: {exc}") from None
        final = final_actions(manifest)
        removed = final.filter(pl.col("final_action") == "remove")
        relabeled = final.filter(pl.col("final_action") == "relabel")
        listed = [line for line in paths["removal_list"].read_text(encoding="utf-8").splitlines() if line]
        mapping = project_store.read_json(paths["relabel_map"])
        by_whom = (
            final.filter(pl.col("final_action") != "keep")
            .group_by("final_action", "decided_by")
            .len()
            .sort("final_action", "decided_by")
        )
        return dg.MaterializeResult(
            metadata={
                "reviewed_images": final.height,
                "removed": removed.height,
                "relabeled": relabeled.height,
                "kept": final.height - removed.height - relabeled.height,
                "human_decisions": int((final["decided_by"] == "human").sum()),
                "decided_by": md_table(by_whom.rename({"len": "images"}).to_dicts()),
                "removal_list": dg.MetadataValue.path(str(paths["removal_list"])),
                "relabel_map": dg.MetadataValue.path(str(paths["relabel_map"])),
                "final_manifest": dg.MetadataValue.path(str(paths["final_manifest"])),
                "usage": dg.MetadataValue.md(usage_note(project, paths)),
                "dagster/row_count": final.height,
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=CHECK_FILES_MATCH,
                    passed=len(listed) == removed.height and len(mapping) == relabeled.height,
                    metadata={
                        "removal_list_entries": len(listed),
                        "relabel_map_entries": len(mapping),
                        "removed_in_manifest": removed.height,
                        "relabeled_in_manifest": relabeled.height,
                    },
                )
            ],
        )

    return cleaning_outputs
